"""Quantization on the device (koifish_cuda.quantize_device) and the streaming GPU loader (qwen3_gpu_load).

The kernel must give the very codes, scales and zeros of the NumPy reference (quantize_groupwise_ref +
pack_codes_ref): inputs are fresh random draws each run (the seed is in the failure message), with
the groups that stress it: all zero, one sign only, fp16-subnormal scales, and exact ties in the fp16
rounding of the scale and in the rounding of codes and zeros. The loader must build the engine
Qwen3GPU.from_model(load_hf_folder(...)) builds, array for array. Runs on the GPU when there is one,
else under Numba's simulator on tiny shapes; the `gpu` tests add real sizes and the engine's logits.
"""

import numpy as np
import pytest

from koifish_cuda.quant import pack_codes_ref, quantize_groupwise_ref
from koifish_cuda.quantize_device import check_shapes, fp16_round_bits, quantize
from tests.cuda_harness import ON_GPU, dev, host

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


def _run(w: np.ndarray, bits: int, G: int, rows_before: int = 0):
    """The kernel's (words, scales, zeros) on the host; rows_before > 0 writes into a band of bigger outputs."""
    N, K = w.shape
    total = N + 2 * rows_before
    words = dev(np.zeros((total, K * bits // 32), np.uint32))
    scales = dev(np.zeros((total, K // G), np.float32))
    zeros = dev(np.zeros((total, K // G), np.uint8))
    band = slice(rows_before, rows_before + N)
    quantize(words[band], scales[band], zeros[band], dev(w), bits, G)
    words, scales, zeros = host(words), host(scales), host(zeros)
    if rows_before:  # nothing outside the band was touched
        assert not words[:rows_before].any() and not words[band.stop:].any() and not scales[band.stop:].any()
    return words[band], scales[band], zeros[band]


def _assert_like_reference(w: np.ndarray, bits: int, G: int, seed: int, rows_before: int = 0) -> None:
    words, scales, zeros = _run(w, bits, G, rows_before)
    codes, ref_scales, ref_zeros = quantize_groupwise_ref(w, bits, G)
    where = f"bits {bits}, group {G}, seed {seed}"
    np.testing.assert_array_equal(scales, ref_scales.astype(np.float32), err_msg=f"scales, {where}")
    np.testing.assert_array_equal(zeros, ref_zeros, err_msg=f"zeros, {where}")
    np.testing.assert_array_equal(words, pack_codes_ref(codes, bits).view(np.uint32), err_msg=f"codes, {where}")


def _hard_groups(rng, bits: int, G: int, K: int) -> np.ndarray:
    """Rows whose first group is each hard case in turn (the rest of each row random)."""
    levels = (1 << bits) - 1
    rows = rng.standard_normal((8, K)).astype(np.float32)
    rows[0, :G] = 0.0  # all zero: scale 2^-24
    rows[1, :G] = -np.abs(rows[1, :G])  # negative only: zero point at the top
    rows[2, :G] = np.abs(rows[2, :G])  # positive only: zero point 0
    # fp16-subnormal scales (about 2^-25 to 2^-15: some underflow to 0 and take 2^-24)
    rows[3] *= np.float32(2.0 ** rng.uniform(-25, -15) * levels / 6)
    s = np.float32(2.0 ** rng.integers(-20, 3) * 1.25)  # an exact fp16 scale
    k = rng.integers(-5, 2 * levels - 5, G).astype(np.float32)
    rows[4, :G] = k / 2 * s  # w / scale lands on x.5: codes round half to even
    rows[4, 0], rows[4, 1] = -2.5 * s, (levels - 2.5) * s  # range levels * s; -lo / scale = 2.5: zero is 2
    ties = ((1024 + 2 * rng.integers(0, 512) + 1.5) * 2.0 ** rng.integers(-24, 5),  # midway between fp16 normals,
            (1024 + 2 * rng.integers(0, 512) + 0.5) * 2.0 ** rng.integers(-24, 5),  # odd and even below
            (rng.integers(0, 1024) + 0.5) * 2.0**-24)  # midway between fp16 subnormals
    for r, tie in zip((5, 6, 7), ties):  # (hi - lo) / levels is exactly the tie
        rows[r, :G] = rng.uniform(0, 1, G) * levels * tie
        rows[r, 0] = levels * tie
    return rows


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_kernel_is_bit_exact_against_the_reference(bits, G):
    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    K = 128
    w = np.concatenate([_hard_groups(rng, bits, G, K), rng.standard_normal((3, K)).astype(np.float32) * 3])
    _assert_like_reference(w, bits, G, seed, rows_before=2 if G == 64 else 0)


def test_kernel_on_many_groups_of_a_row_and_a_partial_block():
    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((7, 384)) * rng.uniform(0.01, 10, (7, 1))).astype(np.float32)  # 84 pairs: 3 blocks
    _assert_like_reference(w, 3, 32, seed)


def test_fp16_rounding_matches_numpy_over_every_binade():
    """fp16_round_bits against NumPy's float32 -> float16, compiled for the CPU from the same source: every
    binade from 2^-27 to 2^17 with all 2^16 low-bit patterns under assorted high bits, and every tie of
    the subnormal range (where the rounding shifts reach 24 bits)."""
    numba = pytest.importorskip("numba")
    one = numba.njit(fp16_round_bits)

    @numba.vectorize(["int32(int32)"])
    def rounded(b):
        return one(b)

    rng = np.random.default_rng(_fresh_seed())
    low = np.arange(1 << 16, dtype=np.int32)
    high = (0, 1, 2, 4, 8, 16, 32, 64, 0x7F, *rng.integers(0, 128, 3))
    parts = [(e << 23) | (int(h) << 16) | low for e in range(100, 145) for h in high]
    q = np.arange(1025, dtype=np.float64)
    ties = (q + 0.5) * 2.0**-24  # exact in float32
    parts += [ties.astype(np.float32).view(np.int32) + d for d in (-1, 0, 1)]
    specials = np.array([0.0, 2.0**-25, 2.0**-24, 65504.0, 65519.996, 65520.0, 1e30, np.inf], np.float32)
    b = np.concatenate(parts + [specials.view(np.int32)]).astype(np.int32)
    with np.errstate(over="ignore"):
        expected = b.view(np.float32).astype(np.float16).astype(np.float32).view(np.int32)
    got = rounded(b)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, f"{bad.size} values differ, e.g. {b.view(np.float32)[bad[:3]]}"
    assert rounded(np.array([-5], np.int32))[0] == 0  # negative input (never a scale): 0


def test_kernel_refuses_shapes_it_cannot_pack():
    with pytest.raises(ValueError, match="bits in"):
        check_shapes(4, 64, 5, 32)
    with pytest.raises(ValueError, match="group_size a multiple of 32"):
        check_shapes(4, 48, 4, 48)
    with pytest.raises(ValueError, match="K a multiple of group_size"):
        check_shapes(4, 96, 4, 64)
    with pytest.raises(ValueError, match=r"scales must be float32 \(2, 1\)"):
        quantize(dev(np.zeros((2, 4), np.uint32)), dev(np.zeros((2, 1), np.float16)), dev(np.zeros((2, 1), np.uint8)),
                 dev(np.zeros((2, 32), np.float32)), 4, 32)


# ---- the streaming loader --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 1-layer Qwen3 (hidden 32, SwiGLU 64, 2 heads of 16 over 1 kv head, vocab 64), untied and tied."""
    pytest.importorskip("torch")
    from tests.qwen3_fixtures import tiny_hf_qwen3

    folders = {}
    for tie in (False, True):
        hf = tiny_hf_qwen3(tie=tie, kv_heads=1, vocab=64, hidden=32, intermediate=64, layers=1, heads=2, seed=3)
        folders[tie] = tmp_path_factory.mktemp("tied" if tie else "untied")
        hf.save_pretrained(folders[tie], safe_serialization=True)
    return folders


def _same_linear(got, ref, what: str) -> None:
    assert (got.N, got.K, got.bits, got.group_size, got.quantized) == \
        (ref.N, ref.K, ref.bits, ref.group_size, ref.quantized), what
    for field in ("w", "words", "scales", "zeros"):
        a, b = getattr(got, field), getattr(ref, field)
        assert (a is None) == (b is None), f"{what}.{field}"
        if a is not None:
            a, b = host(a), host(b)
            assert a.dtype == b.dtype, f"{what}.{field}: {a.dtype} vs {b.dtype}"
            np.testing.assert_array_equal(a, b, err_msg=f"{what}.{field}")


def _assert_same_engine(got, ref) -> None:
    for l, (L, R) in enumerate(zip(got.layers, ref.layers, strict=True)):
        for k in ("qkv", "o", "gu", "down"):
            _same_linear(L[k], R[k], f"layers.{l}.{k}")
        for k in ("ln1", "ln2", "qn", "kn"):
            np.testing.assert_array_equal(host(L[k]), host(R[k]), err_msg=f"layers.{l}.{k}")
    np.testing.assert_array_equal(host(got.norm), host(ref.norm))
    _same_linear(got.embed, ref.embed, "embed")
    _same_linear(got.head, ref.head, "head")
    assert (got.head is got.embed) == (ref.head is ref.embed)


def _both(folder, **kw):
    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from koifish_core.infer.qwen3_gpu_load import load_folder_gpu
    from koifish_core.models.hf_qwen3 import load_hf_folder

    cpu = load_hf_folder(folder, **kw)
    return load_folder_gpu(folder, **kw), Qwen3GPU.from_model(cpu), cpu


def _as_cpu_model(eng):
    """The NumPy Qwen3 holding exactly the engine's weights (q|k|v and gate|up split back): its logits are
    those of the weights as loaded, without the engine's kernels (minutes under the simulator)."""
    from koifish_core.infer.quant import QuantizedWeight
    from koifish_core.models.qwen3 import Qwen3

    c = eng.config

    def mat(lin, r0=0, r1=None):
        if not lin.quantized:
            return host(lin.w)[r0:r1]
        return QuantizedWeight(np.ascontiguousarray(host(lin.words)[r0:r1]).view(np.uint8),
                               host(lin.scales)[r0:r1].astype(np.float16), host(lin.zeros)[r0:r1], lin.bits,
                               lin.group_size)

    q, kv, F = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
    W = {"norm": host(eng.norm), "embed_tokens": mat(eng.embed)}
    if not c.tie_word_embeddings:
        W["lm_head"] = mat(eng.head)
    for l, L in enumerate(eng.layers):
        a, m = f"layers.{l}.self_attn.", f"layers.{l}.mlp."
        W.update({f"layers.{l}.input_layernorm": host(L["ln1"]), f"layers.{l}.post_attention_layernorm": host(L["ln2"]),
                  a + "q_norm": host(L["qn"]), a + "k_norm": host(L["kn"]), a + "q_proj": mat(L["qkv"], 0, q),
                  a + "k_proj": mat(L["qkv"], q, q + kv), a + "v_proj": mat(L["qkv"], q + kv, None),
                  a + "o_proj": mat(L["o"]), m + "gate_proj": mat(L["gu"], 0, F), m + "up_proj": mat(L["gu"], F, None),
                  m + "down_proj": mat(L["down"])})
    return Qwen3(c, W)


IDS = np.array([[1, 5, 9, 3, 7, 11, 2, 8]])


def test_quantized_at_load_equals_the_host_path(small):
    gpu, ref, cpu = _both(small[False], bits=4, group_size=32)
    _assert_same_engine(gpu, ref)
    assert gpu.layers[0]["qkv"].quantized and gpu.layers[0]["qkv"].bits == 4 and not gpu.embed.quantized
    np.testing.assert_array_equal(_as_cpu_model(gpu).forward(IDS)[0], cpu.forward(IDS)[0])


def test_embeddings_and_head_take_their_own_widths(small):
    gpu, ref, cpu = _both(small[False], bits=3, group_size=32, embed_bits=8, head_bits=4)
    _assert_same_engine(gpu, ref)
    assert (gpu.layers[0]["down"].bits, gpu.embed.bits, gpu.head.bits) == (3, 8, 4)
    assert gpu.layers[0]["down"].group_size == 32
    np.testing.assert_array_equal(_as_cpu_model(gpu).forward(IDS)[0], cpu.forward(IDS)[0])


def test_tied_embeddings_are_one_matrix_quantized_at_the_head_width(small):
    gpu, ref, cpu = _both(small[True], bits=8, head_bits=4)  # group 128: the tiny widths' own (32, 64)
    _assert_same_engine(gpu, ref)
    assert gpu.head is gpu.embed and gpu.embed.bits == 4 and gpu.layers[0]["down"].group_size == 64
    np.testing.assert_array_equal(_as_cpu_model(gpu).forward(IDS)[0], cpu.forward(IDS)[0])


def test_float_load_and_progress_reports_match_the_host_path(small):
    from koifish_core.infer.qwen3_gpu_load import load_folder_gpu
    from koifish_core.models.hf_qwen3 import load_hf_folder

    seen = {"cpu": [], "gpu": []}
    cpu = load_hf_folder(small[True], on_tensor=lambda *a: seen["cpu"].append(a))
    gpu = load_folder_gpu(small[True], on_tensor=lambda *a: seen["gpu"].append(a))
    from koifish_core.infer.qwen3_gpu import Qwen3GPU

    _assert_same_engine(gpu, Qwen3GPU.from_model(cpu))
    assert seen["gpu"] == seen["cpu"] and seen["gpu"][-1][1:] == (len(cpu.config.shapes()),) * 2


def test_a_koifish_quantized_folder_loads_its_own_codes(small, tmp_path):
    from koifish_core.infer.qwen3_quantize import quantize_folder

    out = quantize_folder(small[False], tmp_path / "q4", bits=4, group_size=32, embed_bits=8)
    gpu, ref, _ = _both(out)
    _assert_same_engine(gpu, ref)
    assert gpu.layers[0]["gu"].bits == 4 and gpu.embed.bits == 8 and not gpu.head.quantized


def test_parts_that_cannot_share_packing_join_as_float_like_the_host_path(small):
    """q quantized on the device, k and v float (a mixed folder): q|k|v is float32, q dequantized there."""
    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from koifish_core.infer.qwen3_gpu_load import _upload
    from koifish_core.infer.quant import quantize_weight
    from koifish_core.models.hf_qwen3 import plan_folder

    eng = Qwen3GPU(plan_folder(small[False]).config)
    rng = np.random.default_rng(_fresh_seed())
    q, k, v = (rng.standard_normal((n, 64)).astype(np.float32) for n in (32, 16, 16))
    got = eng._join([_upload(eng, q, 4, 32), _upload(eng, k, None, 32), _upload(eng, v, None, 32)])
    _same_linear(got, eng._linear([quantize_weight(q, 4, 32), k, v]), "qkv")


def test_folder_errors_are_the_host_paths(small, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from koifish_core.errors import ModelError
    from koifish_core.infer.qwen3_gpu_load import load_folder_gpu

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(small[False] / "config.json", bad / "config.json")
    tensors = load_file(str(small[False] / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ModelError, match=r"model.safetensors: tensor model.layers.0.mlp.up_proj.weight: "
                                         r"expected shape \(64, 32\)"):
        load_folder_gpu(bad, bits=4)
    with pytest.raises(ValueError, match=r"bits must be one of \(8, 4, 3\)"):
        load_folder_gpu(small[False], bits=5)


def test_host_memory_does_not_refuse_a_streamed_gpu_load(small, monkeypatch):
    import koifish_core.models.hf_qwen3 as hq
    from koifish_core.errors import ModelError
    from koifish_core.infer.qwen3_gpu_load import load_folder_gpu

    monkeypatch.setattr(hq, "host_memory_bytes", lambda: 20_000)  # far below the float model's ~60 KB
    with pytest.raises(ModelError, match="needs about"):
        hq.load_hf_folder(small[False])
    assert load_folder_gpu(small[False]).config.n_layer == 1


# ---- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_kernel_at_real_sizes(bits):
    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((1000, 2048)) * rng.uniform(1e-6, 4, (1000, 1))).astype(np.float32)
    w[::97, 128:256] = 0.0
    _assert_like_reference(w, bits, 128, seed)


@pytest.mark.gpu
def test_streamed_engine_equals_the_uploaded_one_and_the_cpu_model(tmp_path):
    from tests.qwen3_fixtures import tiny_hf_qwen3

    assert ON_GPU
    pytest.importorskip("torch")
    tiny_hf_qwen3(tie=False, kv_heads=2, seed=5).save_pretrained(tmp_path, safe_serialization=True)
    gpu, ref, cpu = _both(tmp_path, bits=4, embed_bits=8)
    _assert_same_engine(gpu, ref)
    ids = np.random.default_rng(1).integers(0, 200, (1, 12))
    got = gpu.forward(ids, cache=gpu.new_cache(1, 32))[0]
    np.testing.assert_allclose(got, ref.forward(ids, cache=ref.new_cache(1, 32))[0], rtol=1e-6, atol=1e-6)
    want = cpu.forward(ids)[0]
    # a 12-token prompt takes the bf16 prefill (operands rounded by up to 2^-8), and an fp16 KV cache
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2.0**-6
