"""Group-wise quantization references, bit packing, and AWQ/GPTQ unpacking against packers written from the specs."""

import numpy as np
import pytest

from koifish_core.infer.quant import (
    AWQ_ORDER,
    QuantizedWeight,
    awq_pack,
    awq_unpack,
    fake_quantize,
    gptq_pack,
    gptq_unpack,
    quantize_weight,
)
from koifish_cuda.quant import (
    dequant_matmul_ref,
    dequantize_groupwise_ref,
    pack_codes_ref,
    quantize_groupwise_ref,
    unpack_codes_ref,
)


def _w(N=16, K=256, seed=0):
    return np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32) * 0.05


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_quantize_error_is_at_most_half_a_step_and_zero_is_exact(bits):
    w = _w()
    w[0, :5] = 0.0
    codes, scales, zeros = quantize_groupwise_ref(w, bits, 128)
    assert codes.max() <= 2**bits - 1 and scales.dtype == np.float16 and scales.shape == (16, 2)
    back = dequantize_groupwise_ref(codes, scales, zeros, 128)
    step = np.repeat(scales.astype(np.float64), 128, axis=1)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
    assert np.all(back[0, :5] == 0.0)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_dequantize_equals_an_explicit_float64_loop(bits):
    w = _w(N=3, K=64, seed=1)
    G = 16
    codes, scales, zeros = quantize_groupwise_ref(w, bits, G)
    got = dequantize_groupwise_ref(codes, scales, zeros, G)
    for n in range(3):
        for k in range(64):
            expected = (int(codes[n, k]) - int(zeros[n, k // G])) * float(scales[n, k // G])
            assert got[n, k] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_error_shrinks_with_more_bits():
    w = _w(seed=2)
    errors = [np.sqrt(np.mean((fake_quantize(w, b) - w) ** 2)) for b in (3, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert errors[2] < 0.01 * np.std(w)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_bit_packing_round_trips_and_lays_codes_out_little_endian(bits):
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 2**bits, (5, 64)).astype(np.uint8)
    packed = pack_codes_ref(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    np.testing.assert_array_equal(unpack_codes_ref(packed, bits, 64), codes)
    # independent: the row as one Python integer, code k at bit k*bits
    for row in range(5):
        number = sum(int(c) << (k * bits) for k, c in enumerate(codes[row]))
        assert packed[row].tobytes() == number.to_bytes(64 * bits // 8, "little")


def test_quantized_weight_apply_and_rows():
    w = _w(N=12, K=256, seed=4)
    qw = quantize_weight(w, 4, 128)
    dense = qw.dequantize()
    x = np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_allclose(qw.apply(x), x @ dense.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dequant_matmul_ref(x, qw.codes(), qw.scales, qw.zeros, 128), x @ dense.T, rtol=1e-5)
    np.testing.assert_array_equal(qw.rows(np.array([[3, 0], [11, 3]])), dense[[[3, 0], [11, 3]]])
    assert qw.nbytes < w.nbytes / 6


def test_narrow_matrices_use_one_group_and_bad_widths_are_refused():
    assert quantize_weight(_w(N=4, K=64), 4, 128).group_size == 64
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_weight(_w(N=4, K=200), 4, 128)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(_w(), 5)


# ---- AWQ ----

def test_awq_nibble_order_by_hand():
    # output columns 0..7 of input row 0 hold codes 0..7; nibble i takes column AWQ_ORDER[i]
    codes = np.zeros((8, 8), np.uint8)
    codes[:, 0] = np.arange(8)
    qweight, _, _ = awq_pack(codes, np.zeros((8, 1), np.uint8), np.ones((8, 1), np.float16))
    assert qweight.shape == (8, 1) and qweight.dtype == np.int32
    assert int(qweight[0, 0]) & 0xFFFFFFFF == 0x75316420
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


def test_awq_round_trip_is_exact():
    rng = np.random.default_rng(6)
    N, K, G = 32, 256, 64
    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    zeros = rng.integers(0, 16, (N, K // G)).astype(np.uint8)
    scales = (rng.random((N, K // G)) * 0.01 + 1e-3).astype(np.float16)
    qweight, qzeros, s = awq_pack(codes, zeros, scales)
    assert qweight.shape == (K, N // 8) and qzeros.shape == (K // G, N // 8) and s.shape == (K // G, N)
    assert qweight.flags.c_contiguous and qzeros.flags.c_contiguous  # safetensors saves memory as it lies
    qw = awq_unpack(qweight, qzeros, s, G)
    np.testing.assert_array_equal(qw.codes(), codes)
    np.testing.assert_array_equal(qw.zeros, zeros)
    np.testing.assert_array_equal(qw.scales, scales)
    ref = (codes.astype(np.float64) - np.repeat(zeros, G, 1)) * np.repeat(scales.astype(np.float64), G, 1)
    np.testing.assert_allclose(qw.dequantize(), ref, rtol=1e-6)


# ---- GPTQ ----

def test_gptq_layout_by_hand():
    # input rows 0..7 of output 0 hold codes 0..7, packed sequentially along the input dimension
    codes = np.zeros((8, 8), np.uint8)
    codes[0, :] = np.arange(8)
    zeros = np.full((8, 1), 8, np.uint8)  # symmetric 4-bit: zero point 8, stored as 7 by v1
    qweight, qzeros, _, _ = gptq_pack(codes, zeros, np.ones((8, 1)), np.zeros(8), bits=4, zero_offset=1)
    assert qweight.shape == (1, 8) and int(qweight[0, 0]) & 0xFFFFFFFF == 0x76543210
    assert qzeros.shape == (1, 1) and int(qzeros[0, 0]) & 0xFFFFFFFF == 0x77777777


@pytest.mark.parametrize("bits,zero_offset", [(4, 1), (4, 0), (8, 1)])
def test_gptq_round_trip_with_act_order_is_exact(bits, zero_offset):
    rng = np.random.default_rng(7)
    N, K, G = 16, 256, 32
    codes = rng.integers(0, 2**bits, (N, K)).astype(np.uint8)
    zeros = rng.integers(0, 2**bits, (N, K // G)).astype(np.uint8)  # includes 0, which v1 stores as 2^b - 1
    zeros[0, 0] = 0
    scales = (rng.random((N, K // G)) * 0.01 + 1e-3).astype(np.float16)
    g_idx = rng.permutation(np.arange(K) // G)  # act-order: each input's group, in permuted order
    qweight, qzeros, s, gi = gptq_pack(codes, zeros, scales, g_idx, bits, zero_offset)
    assert qweight.shape == (K * bits // 32, N) and qzeros.shape == (K // G, N * bits // 32)
    qw = gptq_unpack(qweight, qzeros, s, gi, bits, G, zero_offset)
    np.testing.assert_array_equal(qw.codes(), codes)
    np.testing.assert_array_equal(qw.zeros, zeros)
    got = qw.dequantize()
    for k in rng.choice(K, 20, replace=False):
        g = g_idx[k]
        expected = (codes[:, k].astype(np.float64) - zeros[:, g]) * scales[:, g].astype(np.float64)
        np.testing.assert_allclose(got[:, k], expected, rtol=1e-6)


def test_gptq_plain_group_order_drops_g_idx():
    N, K, G = 8, 64, 32
    codes = np.ones((N, K), np.uint8)
    packed = gptq_pack(codes, np.ones((N, 2), np.uint8), np.ones((N, 2)), np.arange(K) // G, 4)
    qw = gptq_unpack(*packed, bits=4, group_size=G)
    assert qw.g_idx is None
    assert isinstance(qw, QuantizedWeight) and np.all(qw.dequantize() == 0)


# ---- perplexity at each bit width (quant_quality) ----

def _gpt2_folder(tmp_path):
    from koifish_core.models.gpt2 import GPT2, GPT2Config
    from koifish_core.models.hf_gpt2 import save_hf_folder

    model = GPT2(GPT2Config(vocab_size=97, n_ctx=16, n_layer=2, n_head=2, n_embd=32))
    model.init_weights(0)
    for view in model.param_views().values():
        view *= 8.0  # larger weights than the init's, so rounding them moves the loss visibly
    return save_hf_folder(model, tmp_path / "gpt2")


def test_perplexity_by_bits_on_gpt2_matches_eval_and_reference_dequantization(tmp_path, tiny_data):
    from koifish_core.infer.evaluate_model import evaluate_model
    from koifish_core.infer.quant_quality import GPT2_LINEARS, perplexity_by_bits
    from koifish_core.models.hf_gpt2 import load_hf_folder

    folder = _gpt2_folder(tmp_path)
    data = str(tiny_data / "tiny_val_*.bin")
    results = perplexity_by_bits(folder, data, bits_list=(8, 4, 3), seq_len=16, batch_size=4, max_windows=10,
                                 group_size=16)
    assert [r.bits for r in results] == [32, 8, 4, 3]
    fp = evaluate_model(folder, data, seq_len=16, batch_size=4, max_windows=10)
    assert results[0].loss == pytest.approx(fp.loss, rel=1e-6) and results[0].tokens == fp.tokens

    from koifish_core.data.loader import iter_windows, resolve_paths

    windows = list(iter_windows(resolve_paths(data), 16))[:10]
    x, y = np.stack([w[0] for w in windows]), np.stack([w[1] for w in windows])
    for r in results[1:]:
        model = load_hf_folder(folder)
        for name, view in model.param_views().items():
            if name.endswith(GPT2_LINEARS):
                codes, scales, zeros = quantize_groupwise_ref(view, r.bits, 16)
                view[...] = dequantize_groupwise_ref(codes, scales, zeros, 16)
        assert r.loss == pytest.approx(float(model.forward(x, y)[1]), rel=1e-5)
    gaps = [abs(r.loss - results[0].loss) for r in results[1:]]
    assert gaps[0] < gaps[2] and gaps[0] < 0.05


def test_int8_activations_row_rounds_every_linear_input(tmp_path, tiny_data):
    """int8_activations adds a 4-bit row whose model rounds each linear's input per 16 values (what the
    GPU's 4-bit decode GEMVs compute), equal to a hand-made forward with rounded inputs; the models'
    own linears are back afterwards."""
    import koifish_core.models.gpt2 as gpt2
    from koifish_core.infer.quant_quality import GPT2_LINEARS, perplexity_by_bits
    from koifish_core.models.hf_gpt2 import load_hf_folder
    from koifish_cuda.quant_a8 import round_x16_ref

    folder = _gpt2_folder(tmp_path)
    data = str(tiny_data / "tiny_val_*.bin")
    original = gpt2.matmul_forward_ref
    results = perplexity_by_bits(folder, data, bits_list=(4,), seq_len=16, batch_size=4, max_windows=10, group_size=16,
                                 int8_activations=True)
    assert [(r.bits, r.act_bits) for r in results] == [(32, 16), (4, 16), (4, 8)]
    assert gpt2.matmul_forward_ref is original
    from koifish_core.data.loader import iter_windows, resolve_paths

    windows = list(iter_windows(resolve_paths(data), 16))[:10]
    x, y = np.stack([w[0] for w in windows]), np.stack([w[1] for w in windows])
    model = load_hf_folder(folder)
    for name, view in model.param_views().items():
        if name.endswith(GPT2_LINEARS):
            view[...] = dequantize_groupwise_ref(*quantize_groupwise_ref(view, 4, 16), 16)
    rounded = []
    gpt2.matmul_forward_ref = lambda a, w, b=None: rounded.append(1) or original(round_x16_ref(a), w, b)
    try:
        loss = float(model.forward(x, y)[1])
    finally:
        gpt2.matmul_forward_ref = original
    assert len(rounded) == 4 * 2 and results[2].loss == pytest.approx(loss, rel=1e-5)
    assert results[2].loss != results[1].loss


def test_perplexity_by_bits_on_a_qwen3_folder(tmp_path, tiny_data):
    pytest.importorskip("torch")
    from koifish_core.infer.quant_quality import perplexity_by_bits
    from tests.qwen3_fixtures import tiny_hf_qwen3

    tiny_hf_qwen3(seed=4).save_pretrained(tmp_path / "q", safe_serialization=True)
    results = perplexity_by_bits(tmp_path / "q", str(tiny_data / "tiny_val_*.bin"), bits_list=(8, 3), seq_len=16,
                                 max_windows=6, group_size=32)
    assert [r.bits for r in results] == [32, 8, 3]
    from koifish_core.data.loader import iter_windows, resolve_paths
    from koifish_core.models.hf_qwen3 import load_hf_folder

    windows = list(iter_windows(resolve_paths(str(tiny_data / "tiny_val_*.bin")), 16))[:6]
    x, y = np.stack([w[0] for w in windows]), np.stack([w[1] for w in windows])
    for r in results:  # the same losses through the quantize-at-load path (QuantizedWeight, not float copies)
        model = load_hf_folder(tmp_path / "q", bits=None if r.bits == 32 else r.bits, group_size=32)
        assert r.loss == pytest.approx(model.forward(x, y)[1], rel=1e-5)
    assert results[2].loss != results[0].loss


# ---- device kernels (GPU when present, else Numba's simulator) ----

@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_dequant_kernels_match_the_reference(bits):
    from koifish_cuda.quant import dequant_matvec
    from tests.cuda_harness import ON_GPU, dev, host, rel_err

    rng = np.random.default_rng()
    N, K, G, M = (4096, 4096, 128, 4) if ON_GPU else (3, 64, 32, 2)
    w = rng.standard_normal((N, K)).astype(np.float32)
    codes, scales, zeros = quantize_groupwise_ref(w, bits, G)
    words = pack_codes_ref(codes, bits).view(np.uint32)  # the same bit stream, read 32 bits at a time
    ref = dequantize_groupwise_ref(codes, scales, zeros, G, dtype=np.float64)
    d_words, d_scales, d_zeros = dev(words), dev(scales.astype(np.float32)), dev(zeros)
    x = rng.standard_normal((M, K))
    y = dev(np.full((M, N), np.nan, np.float32))
    dequant_matvec(y, dev(x.astype(np.float32)), d_words, d_scales, d_zeros, bits, G)
    assert rel_err(host(y), x @ ref.T) < 2e-5
    y1 = dev(np.full((1, N), np.nan, np.float32))  # batch 1 takes the decode fast path at 4 bits
    dequant_matvec(y1, dev(x[:1].astype(np.float32)), d_words, d_scales, d_zeros, bits, G)
    assert rel_err(host(y1), x[:1] @ ref.T) < 2e-5
    with pytest.raises(ValueError, match="up to 8 rows"):
        dequant_matvec(y, dev(np.zeros((9, K), np.float32)), d_words, d_scales, d_zeros, bits, G)


@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
def test_batch1_4bit_kernel_with_ragged_row_blocks_and_warp_splits():
    """The decode kernel: 17 rows (a block of 16 and a clamped one), 40 uint64 per row (the block's
    second warp has a partial share of K), overwriting whatever out held."""
    from koifish_cuda.quant import dequant_matvec
    from tests.cuda_harness import ON_GPU, dev, host, rel_err

    rng = np.random.default_rng(8)
    N, K, G = (4099, 5120, 128) if ON_GPU else (17, 640, 128)
    codes, scales, zeros = quantize_groupwise_ref(rng.standard_normal((N, K)).astype(np.float32), 4, G)
    words = pack_codes_ref(codes, 4).view(np.uint32)
    x = rng.standard_normal((1, K))
    y = dev(np.full((1, N), np.nan, np.float32))
    dequant_matvec(y, dev(x.astype(np.float32)), dev(words), dev(scales.astype(np.float32)), dev(zeros), 4, G)
    assert rel_err(host(y), dequant_matmul_ref(x, codes, scales, zeros, G)) < 1e-5  # float32, ~3e-6 here
