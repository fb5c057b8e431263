"""The tensor-core product and float16 packing (koifish_cuda.mma) against NumPy (simulator in CI, the GPU when there is one)."""

import numpy as np
from numba import cuda, float32, uint32

from koifish_cuda.mma import fragments_ref, mma_f16, mma_ref, pack_f16x2, unpack_f16x2
from tests.cuda_harness import dev, host


@cuda.jit
def mma_kernel(d, fa, fb, c):  # one warp; each lane its fragments in, its four outputs out
    lane = cuda.threadIdx.x
    buf = cuda.shared.array((32, 6), uint32)
    g, q = lane // 4, lane % 4
    d0, d1, d2, d3 = mma_f16(fa[lane, 0], fa[lane, 1], fa[lane, 2], fa[lane, 3], fb[lane, 0], fb[lane, 1],
                             c[g, 2 * q], c[g, 2 * q + 1], c[g + 8, 2 * q], c[g + 8, 2 * q + 1], buf)
    d[g, 2 * q], d[g, 2 * q + 1], d[g + 8, 2 * q], d[g + 8, 2 * q + 1] = d0, d1, d2, d3


@cuda.jit
def pack_kernel(packed, back, x):
    i = cuda.threadIdx.x
    u = pack_f16x2(x[2 * i], x[2 * i + 1])
    packed[i] = u
    back[2 * i], back[2 * i + 1] = unpack_f16x2(u)


def test_mma_matches_the_float64_product_of_its_fragments():
    r = np.random.default_rng()
    a, b = r.standard_normal((16, 16)).astype(np.float16), r.standard_normal((16, 8)).astype(np.float16)
    c = r.standard_normal((16, 8)).astype(np.float32)
    fa, fb = fragments_ref(a, b)
    d = dev(np.full((16, 8), np.nan, np.float32))
    mma_kernel[1, 32](d, dev(fa), dev(fb), dev(c))
    ref = mma_ref(a, b, c.astype(np.float64))
    # float16 products are exact in float32; only the float32 sums round
    assert np.abs(host(d) - ref).max() <= 1e-5 * (np.abs(a).astype(np.float64) @ np.abs(b) + np.abs(c)).max()


def test_pack_rounds_to_float16_and_unpack_reads_it_back():
    r = np.random.default_rng()
    x = np.concatenate([r.standard_normal(62) * 10, [65504.0, -1e-8]]).astype(np.float32)
    packed, back = dev(np.zeros(32, np.uint32)), dev(np.zeros(64, np.float32))
    pack_kernel[1, 32](packed, back, dev(x))
    assert np.array_equal(host(packed), x.astype(np.float16).view(np.uint32))
    assert np.array_equal(host(back), x.astype(np.float16).astype(np.float32))
