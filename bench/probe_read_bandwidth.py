"""How fast this GPU reads memory when nothing is written: the ceiling a GEMV (which only reads) can reach,
beside the copy bandwidth (read + write) the decode roofline is defined by.

    python bench/probe_read_bandwidth.py --out bench/results/read_bandwidth.json

A grid-stride kernel reads a 1 GiB buffer in 16-byte loads, U of them issued before any is used, and
folds them into one word a thread; the grid is a multiple of the SM count. Every (threads, blocks an SM,
U) is timed from CUDA-graph replays; the best is the ceiling. CuPy's sum (CUB) is timed too.

Then the W4A8 GEMV's read pattern without its arithmetic (`gemv_read_kernel`): a block takes R rows of a
uint64 matrix (N, Kq) and its lanes read uint64 t + BUF s of each row, turn after turn, as
quant_a8's kernel does; once on the row-major matrix the GEMV reads, once on a tiled copy where each
block's turn (R rows x BUF lanes) lies contiguous. If the row-major pattern alone reads at the GEMV's
rate, the pattern (not the arithmetic) is what holds the GEMV; if the tiled one reads faster, a tiled
weight layout is the fix.

Last, what writing costs (`stream_kernel`): a 1 GiB float32 buffer copied to another, updated in place,
or filled, in 16-byte loads and stores: whether a kernel writing a new buffer (LayerNorm's output) can
move bytes as fast as one updating in place (AdamW, the classifier).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.vload import load4
from numba import cuda, float32, uint32, uint64

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import commit, copy_bandwidth, gpu_name, median_time, write_json  # noqa: E402


@functools.lru_cache(maxsize=None)
def read_kernel(U: int):
    @cuda.jit
    def kernel(out, a):
        """a: uint32 (n,); reads whole turns of the grid (U * threads * 16 bytes), the tail left out."""
        nt = cuda.gridDim.x * cuda.blockDim.x
        t = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        acc = uint32(0)
        v = cuda.local.array((U, 4), uint32)
        turns = a.shape[0] // 4 // (nt * U)
        for base in range(t, turns * nt * U, nt * U):
            for u in range(U):  # all U loads before any use
                v[u, 0], v[u, 1], v[u, 2], v[u, 3] = load4(a, 4 * (base + u * nt))
            for u in range(U):
                acc ^= v[u, 0] ^ v[u, 1] ^ v[u, 2] ^ v[u, 3]
        out[t] = acc

    return kernel


@functools.lru_cache(maxsize=None)
def gemv_read_kernel(R: int, W: int, tiled: bool):
    BUF = 32 * W

    @cuda.jit
    def kernel(out, q64, N, Kq):
        """q64: (N, Kq) row-major, or tiled: ((N / R) (Kq / BUF) R BUF,) flat, block b's turn s at
        ((b Kq / BUF + s) R + r) BUF + t. Kq a multiple of BUF, N of R."""
        t = cuda.threadIdx.x
        b = cuda.blockIdx.x
        acc = uint32(0)
        wv = cuda.local.array(R, uint64)
        turns = Kq // BUF
        for s in range(turns):
            for r in range(R):
                if tiled:
                    wv[r] = q64[((b * turns + s) * R + r) * BUF + t]
                else:
                    wv[r] = q64[(b * R + r) * Kq + s * BUF + t]
            for r in range(R):  # both halves: the loads stay 8 bytes wide
                acc ^= uint32(wv[r] & 0xFFFFFFFF) ^ uint32(wv[r] >> 32)
        out[b * BUF + t] = acc

    return kernel


def read_ceiling() -> float:
    """Bytes/s of the contiguous read at a configuration that reaches the ceiling on the H200
    (256 threads x 4 blocks an SM, U=4: 4,453 GB/s against the best 4,481 in stop 17's sweep)."""
    import cupy as cp

    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    a = cp.zeros((1 << 30) // 4, cp.uint32)
    grid, threads, U = 4 * sms, 256, 4
    out = cp.zeros(grid * threads, cp.uint32)
    k = read_kernel(U)
    read = (a.nbytes // 16) // (grid * threads * U) * (grid * threads * U) * 16
    return read / median_time(lambda s: k[grid, threads, s](out, a), 10, 4)


@functools.lru_cache(maxsize=None)
def stream_kernel(U: int, mode: str):
    """Grid-stride over float32 x in 16-byte groups, U loads in flight a thread: "copy" y = x (another buffer),
    "inplace" x = 1.0001 x (the read line written back, as AdamW and the classifier do), "fill" y = 0
    (writes only). Whole turns only: the tail past the last whole turn is left out (and not counted)."""
    from koifish_cuda.vload import store4

    @cuda.jit
    def kernel(y, x):
        nt = cuda.gridsize(1)
        v = cuda.local.array((U, 4), float32)
        for base in range(cuda.grid(1), x.size // 4 // (nt * U) * (nt * U), nt * U):
            if mode != "fill":
                for u in range(U):
                    v[u, 0], v[u, 1], v[u, 2], v[u, 3] = load4(x, 4 * (base + u * nt))
            for u in range(U):
                if mode == "copy":
                    store4(y, 4 * (base + u * nt), v[u, 0], v[u, 1], v[u, 2], v[u, 3])
                elif mode == "inplace":
                    c = float32(1.0001)
                    store4(x, 4 * (base + u * nt), v[u, 0] * c, v[u, 1] * c, v[u, 2] * c, v[u, 3] * c)
                else:
                    store4(y, 4 * (base + u * nt), float32(0.0), float32(0.0), float32(0.0), float32(0.0))

    return kernel


def write_patterns(cp, sms: int, copy: float) -> list[dict]:
    """What writing costs: copy to another buffer, update in place, fill; read + write bytes a second. The
    memory-bound kernels are measured against a device-to-device copy, yet AdamW (in place) moved 154% of
    its bytes a second (stop 19): this says whether a kernel writing a new buffer can."""
    rows = []
    n = (1 << 30) // 4
    x, y = cp.ones(n, cp.float32), cp.zeros(n, cp.float32)
    for mode in ("copy", "inplace", "fill"):
        for per_sm, U in ((4, 2), (4, 4), (8, 2)):
            grid, threads = sms * per_sm, 256
            k = stream_kernel(U, mode)
            sec = median_time(lambda s: k[grid, threads, s](y, x), 10, 2)
            turn = grid * threads * U * 16
            moved = x.nbytes // turn * turn * (1 if mode == "fill" else 2)
            rows.append({"mode": mode, "blocks_per_sm": per_sm, "U": U, "GBps": moved / sec / 1e9,
                         "share_of_copy": moved / sec / copy})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/read_bandwidth.json")
    args = ap.parse_args()

    import cupy as cp

    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    nbytes = 1 << 30
    a = cp.zeros(nbytes // 4, cp.uint32)
    copy = copy_bandwidth()
    rows = []
    print(f"{gpu_name()}: {sms} SMs; copy {copy / 1e9:.0f} GB/s (read + write)")
    print(f"{'kernel':<34}{'GB/s':>8}{'of copy':>9}")
    for threads in (256, 512, 1024):
        for per_sm in (1, 2, 4, 8):
            if threads * per_sm > 2048:
                continue
            for U in (1, 2, 4, 8):
                grid = sms * per_sm
                read = (nbytes // 16) // (grid * threads * U) * (grid * threads * U) * 16
                out = cp.zeros(grid * threads, cp.uint32)
                k = read_kernel(U)
                sec = median_time(lambda s: k[grid, threads, s](out, a), 10, 4)
                name = f"numba {threads} thr x {per_sm}/SM, U={U}"
                rows.append({"kernel": name, "GBps": read / sec / 1e9, "share_of_copy": read / sec / copy})
    for dtype in (cp.uint32, cp.uint64):
        b = a.view(dtype)
        try:
            sec = median_time(lambda s: b.sum(), 10, 4)
        except Exception as e:  # noqa: BLE001  (a reduction that cannot be captured: say so, go on)
            print(f"cupy sum {cp.dtype(dtype).name}: not timed ({type(e).__name__})")
            continue
        rows.append({"kernel": f"cupy sum {cp.dtype(dtype).name}", "GBps": nbytes / sec / 1e9,
                     "share_of_copy": nbytes / sec / copy})
    for r in sorted(rows, key=lambda r: -r["GBps"])[:12]:
        print(f"{r['kernel']:<34}{r['GBps']:>8.0f}{r['share_of_copy']:>9.0%}")
    best = max(rows, key=lambda r: r["GBps"])
    pattern = []
    for name, N, K in (("qkv", 10240, 5120), ("gate_up", 51200, 5120), ("down", 5120, 25600)):
        Kq = K // 16
        for R, W in ((8, 3), (8, 1), (8, 4)):
            BUF = 32 * W
            Kq_run = Kq // BUF * BUF  # whole turns (the pattern, not the exact byte count)
            q = cp.zeros(N * Kq_run, cp.uint64)
            out = cp.zeros(N // R * BUF, cp.uint32)
            for tiled in (False, True):
                k = gemv_read_kernel(R, W, tiled)
                sec = median_time(lambda s: k[N // R, BUF, s](out, q, N, Kq_run), 10, 4)
                nb = N * Kq_run * 8
                pattern.append({"shape": name, "N": N, "K": K, "rows": R, "warps": W, "tiled": tiled,
                                "GBps": nb / sec / 1e9, "share_of_copy": nb / sec / copy, "us": sec * 1e6})
    print(f"{'GEMV read pattern':<34}{'GB/s':>8}{'of copy':>9}{'us':>8}")
    for r in pattern:
        name = f"{r['shape']} {r['rows']}x{r['warps']}w {'tiled' if r['tiled'] else 'row-major'}"
        print(f"{name:<34}{r['GBps']:>8.0f}{r['share_of_copy']:>9.0%}{r['us']:>8.1f}")
    print(f"best read: {best['GBps']:.0f} GB/s ({best['share_of_copy']:.0%} of copy), {best['kernel']}")
    writes = write_patterns(cp, sms, copy)
    print(f"{'write pattern (read + write bytes)':<34}{'GB/s':>8}{'of copy':>9}")
    for r in writes:
        label = f"{r['mode']} {r['blocks_per_sm']}/SM U={r['U']}"
        print(f"{label:<34}{r['GBps']:>8.0f}{r['share_of_copy']:>9.0%}")
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "copy_GBps": copy / 1e9, "rows": rows,
                          "best_read_GBps": best["GBps"], "gemv_pattern": pattern, "write_patterns": writes})


if __name__ == "__main__":
    main()
