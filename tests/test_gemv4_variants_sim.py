import time, numpy as np, pytest
from koifish_cuda.quant import (GEMV4_VARIANTS, dequant_matmul_ref, make_gemv4_shared_x, pack_codes_ref,
                                quantize_groupwise_ref, zero_kernel)

@pytest.mark.parametrize("name", list(GEMV4_VARIANTS))
def test_variant(name):
    rng = np.random.default_rng(0)
    N, K, G = 37, 256, 64
    w = rng.standard_normal((N, K)).astype(np.float32)
    codes, scales, zeros = quantize_groupwise_ref(w, 4, G)
    words = pack_codes_ref(codes, 4).view(np.uint32)
    x = rng.standard_normal((1, K)).astype(np.float32)
    ref = dequant_matmul_ref(x.astype(np.float64), codes, scales, zeros, G)
    out = np.full((1, N), np.nan, np.float32)
    t = time.time()
    GEMV4_VARIANTS[name](out, x, words, scales.astype(np.float32), zeros, G)
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(name, time.time() - t, err)
    assert err < 2e-6

def test_split_and_tiles():
    rng = np.random.default_rng(1)
    N, K, G = 11, 512, 128
    w = rng.standard_normal((N, K)).astype(np.float32)
    codes, scales, zeros = quantize_groupwise_ref(w, 4, G)
    q64 = pack_codes_ref(codes, 4).view(np.uint64)
    x = rng.standard_normal((1, K)).astype(np.float32)
    ref = dequant_matmul_ref(x.astype(np.float64), codes, scales, zeros, G)
    for direct, splits in ((False, 3), (True, 1)):
        launch = make_gemv4_shared_x(2, 2, 2, 80, direct)   # Q = 5 uint64 per tile: ragged tiles
        out = np.zeros((1, N), np.float32) if not direct else np.full((1, N), np.nan, np.float32)
        launch.kern[(3, splits), 64](out, x, q64, scales.astype(np.float32), zeros, G)
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert err < 2e-6, (direct, err)
