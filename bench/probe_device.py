"""One-shot check of a GPU machine: versions, the numpy shim, Numba kernels on CuPy arrays,
graph capture of Numba + CuPy work, GEMM rates (fp32, TF32, bf16), copy bandwidth. JSON out."""

import json
import os
import sys

import koifish_cuda.compat  # noqa: F401  (before numba compiles anything)
import numpy as np


def timed(fn, reps=20):
    import cupy as cp

    fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / 1e3 / reps


def main(out_path):
    import cupy as cp
    import numba
    from numba import cuda

    res = {"python": sys.version.split()[0], "numpy": np.__version__, "numba": numba.__version__, "cupy": cp.__version__,
           "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}

    @cuda.jit
    def add_one(a):
        i = cuda.grid(1)
        if i < a.size:
            a[i] += 1.0

    a = cp.zeros(1000, dtype=cp.float32)
    add_one[8, 128](a)
    res["numba_on_cupy"] = bool(cp.all(a == 1).get())

    # graph capture: a Numba kernel and a CuPy op on one stream, replayed
    stream = cp.cuda.Stream(non_blocking=True)
    x = cp.zeros(1 << 20, dtype=cp.float32)
    with stream:
        stream.begin_capture()
        nstream = cuda.external_stream(stream.ptr)
        for _ in range(100):
            add_one[(x.size + 255) // 256, 256, nstream](x)
        x *= 0.5
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    res["graph_value"] = float(x[0].get())  # 100 * 0.5 = 50
    t = timed(lambda: graph.launch(stream))
    res["graph_us_per_kernel"] = t / 101 * 1e6

    # launch cost from Python
    res["numba_launch_us"] = timed(lambda: add_one[(x.size + 255) // 256, 256](x), 200) * 1e6

    n = 8192
    A = cp.random.standard_normal((n, n), dtype=cp.float32)
    B = cp.random.standard_normal((n, n), dtype=cp.float32)
    res["fp32_tflops"] = 2 * n**3 / timed(lambda: A @ B, 5) / 1e12
    from cupy_backends.cuda.libs import cublas

    handle = cp.cuda.device.get_cublas_handle()
    try:
        cublas.setMathMode(handle, cublas.CUBLAS_TF32_TENSOR_OP_MATH)
        res["tf32_tflops"] = 2 * n**3 / timed(lambda: A @ B, 5) / 1e12
        cublas.setMathMode(handle, cublas.CUBLAS_DEFAULT_MATH)
    except Exception as e:  # noqa: BLE001
        res["tf32_error"] = repr(e)
    try:
        import ml_dtypes

        Ab, Bb = A.astype(ml_dtypes.bfloat16), B.astype(ml_dtypes.bfloat16)
        res["bf16_tflops"] = 2 * n**3 / timed(lambda: Ab @ Bb, 5) / 1e12
    except Exception as e:  # noqa: BLE001
        res["bf16_error"] = repr(e)
    big = cp.empty(1 << 30, dtype=cp.uint8)
    dst = cp.empty_like(big)
    res["copy_GBps"] = 2 * big.nbytes / timed(lambda: dst.__setitem__(Ellipsis, big), 10) / 1e9

    @cuda.jit
    def bits(out, v):
        i = cuda.grid(1)
        if i < out.size:
            out[i] = cuda.libdevice.int_as_float(cuda.libdevice.float_as_int(v[i]) & 0xFFFF0000)

    try:
        v = cp.asarray(np.random.standard_normal(64).astype(np.float32))
        o = cp.empty_like(v)
        bits[1, 64](o, v)
        res["libdevice_bitcast_ok"] = bool(cp.allclose(o, v, rtol=1e-2).get())
    except Exception as e:  # noqa: BLE001
        res["libdevice_error"] = repr(e)[:300]
    print(json.dumps(res, indent=1))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".") + "/probe.json")
