"""What the GPU benchmarks share: timing by CUDA-graph replay, the copy bandwidth they compare
against, and what every result records beside its numbers (which GPU, which commit)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np


def gpu_name() -> str:
    """nvidia-smi's name of each GPU, one per line ('' without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    except FileNotFoundError:
        return ""
    return out.stdout.strip()


def commit() -> str:
    """The koifish commit measured: KOIFISH_COMMIT when set (a copy whose .git is missing or stale,
    as the device machine's can be), else git's HEAD."""
    if os.environ.get("KOIFISH_COMMIT"):
        return os.environ["KOIFISH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        return ""


def child_result(cmd: list[str], tail: int = 2000) -> dict:
    """Run a benchmark's child process (a framework or size in a process of its own, so that its peak memory
    is its own): the JSON it printed after "RESULT ", or {"error": the last `tail` characters it wrote}."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"error": (proc.stderr or proc.stdout)[-tail:]}
    return json.loads(line[0][7:])


def gpu_kernels(prof) -> list[tuple[int, int, str]]:
    """(start ns, duration ns, name) of each GPU activity a torch.profiler run recorded (its CUPTI records
    see every kernel of the process, those inside CUDA graphs too); a bench-only reader."""
    try:
        return [(e.start_ns(), e.duration_ns(), e.name()) for e in prof.profiler.kineto_results.events()
                if e.device_type().name == "CUDA"]
    except AttributeError:  # another torch: the function events, in microseconds
        return [(int(e.time_range.start * 1e3), int(e.time_range.elapsed_us() * 1e3), e.name)
                for e in prof.events() if e.device_type.name == "CUDA"]


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def median_time(fn, reps=20, per_graph=10, stream=None):
    """Median time of one call of fn(numba_stream), from CUDA-graph replays of `per_graph` calls:
    timing single launches from Python would measure the ~50 us launch cost, not the kernel.
    stream: the CuPy stream to capture on (one a library handle is bound to), else a new one."""
    import cupy as cp
    from numba import cuda

    stream = stream or cp.cuda.Stream(non_blocking=True)
    ns = cuda.external_stream(stream.ptr)
    with stream:
        fn(ns)
        stream.synchronize()
        stream.begin_capture()
        for _ in range(per_graph):
            fn(ns)
        graph = stream.end_capture()
    graph.launch(stream)
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        graph.launch(stream)
        b.record(stream)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) / 1e3 / per_graph)
    return float(np.median(times))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of a 1 GiB buffer: the ceiling the
    memory-bound kernels are measured against, taken in the same run."""
    import cupy as cp

    bw = _copy_bandwidth(cp.empty(1 << 30, dtype=cp.uint8))
    cp.get_default_memory_pool().free_all_blocks()  # the 2 GiB go back to the GPU
    return bw


def _copy_bandwidth(src) -> float:
    dst = src.copy()
    return 2 * src.nbytes / median_time(lambda s: dst.__setitem__(Ellipsis, src), 10, 2)


def engine_options(ap) -> None:
    """The CUDA engine's options still being measured, as command-line flags (apply_engine_options)."""
    ap.add_argument("--variants", default="", help="kernel variants, e.g. classifier=registers")
    ap.add_argument("--tune", type=int, default=8, help="cuBLASLt algorithms timed per GEMM shape")
    ap.add_argument("--gemm-workspace", type=int, default=None,
                    help="MiB of workspace cuBLASLt's heuristic may plan for (default all 32; 0: algorithms without one)")
    ap.add_argument("--tune-graph", action="store_true", help="time cuBLASLt's candidates as CUDA-graph replays")
    ap.add_argument("--update-sample", type=int, default=None, help="instability.update_sample (default: the case's)")
    ap.add_argument("--head-mib", type=int, default=None,
                    help="the LM head's logits buffer (koifish_core.config.plan.HEAD_BYTES, default 1024): its chunks of rows")
    ap.add_argument("--residual", default="bf16", choices=("fp32", "bf16"),
                    help="the case's precision.residual (default bf16, as cases/gpt2_*.json; fp32 under --compute fp32)")
    ap.add_argument("--residual-grad", default="bf16", choices=("fp32", "bf16"),
                    help="the case's precision.residual_grad (default bf16, as cases/gpt2_*.json; fp32 with --residual fp32)")


def engine_flags(args) -> list[str]:
    """engine_options' flags as parsed, back as a command line (for a child process to parse again)."""
    flags = ["--variants", args.variants, "--tune", str(args.tune), "--residual", args.residual,
             "--residual-grad", args.residual_grad] + (["--tune-graph"] if args.tune_graph else [])
    flags += [] if args.gemm_workspace is None else ["--gemm-workspace", str(args.gemm_workspace)]
    flags += [] if args.head_mib is None else ["--head-mib", str(args.head_mib)]
    return flags + ([] if args.update_sample is None else ["--update-sample", str(args.update_sample)])


def apply_engine_options(eng, args) -> dict:
    """Set engine_options' flags on a CUDA engine before its first step; returns what was set."""
    for item in filter(None, args.variants.split(",")):
        kernel, variant = item.split("=")
        if kernel not in eng.variants:
            raise SystemExit(f"--variants: no kernel {kernel!r} (one of {', '.join(eng.variants)})")
        eng.variants[kernel] = variant
    eng.lt.tune = args.tune  # candidates timed per GEMM shape (the first step tunes them)
    eng.lt.tune_in_graph = args.tune_graph
    if args.gemm_workspace is not None:
        eng.lt.max_workspace = args.gemm_workspace << 20
    if args.update_sample is not None:
        eng.stat_sample = args.update_sample
    return {"variants": dict(eng.variants), "tune": args.tune, "tune_graph": args.tune_graph,
            "gemm_workspace_mib": args.gemm_workspace, "update_sample": eng.stat_sample, "head_rows": eng.head_rows}


def parse_settings(text: str) -> list[dict]:
    """'pdl=0;pdl=1,prefetch_mb=2' -> [{'pdl': 0.0}, {'pdl': 1.0, 'prefetch_mb': 2.0}] ([{}] for ''); a value
    that is not a number stays a string (attention_variant=mma_pv)."""
    def value(v: str):
        try:
            return float(v)
        except ValueError:
            return v
    return [dict((k, value(v)) for k, v in (kv.split("=") for kv in group.split(",")))
            for group in text.split(";") if group] or [{}]


def apply_settings(eng, settings: dict) -> str:
    """Set a Qwen3GPU's decode settings (each cast to its attribute's type) and have the next step capture
    them; returns their label ('' for none)."""
    for k, v in settings.items():
        if not hasattr(eng, k):
            raise SystemExit(f"--sweep: the engine has no setting {k!r}")
        setattr(eng, k, type(getattr(eng, k))(v))
    if settings:
        eng.recapture()
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
