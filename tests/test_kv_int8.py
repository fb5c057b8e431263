"""The int8 KV cache of the Qwen3 GPU engine: the store (qk_norm_rope) and the load (attention_decode)
against their NumPy references, the engine's logits against float16/float32, the --kv-bits option.

GPU when present, else Numba's simulator at tiny shapes (one Python thread per GPU thread: a few
blocks per launch keep this file at ~25 s on 2 cores).
"""

import numpy as np
import pytest

from koifish_core.errors import KoifishError
from tests.cuda_harness import ON_GPU, dev, host, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

# The float64 reference and the kernel's float32 rmsnorm/RoPE differ by ~1e-6 relative in a k value, up to ~1e-4
# in code units (x * 127 / absmax): a k code may differ by one only that close to a .5 tie. V codes are exact.
K_TIE = 1e-3
# int8 rounds a value by up to scale/2 = absmax/254; random Gaussian head vectors lose ~0.6% (rms) of their norm.
INT8_VEC_REL = 0.012
# Logits with an int8 cache against a float16 one, random tiny Qwen3s (_tiny_qwen3, 1-2 layers, head_dim 16-128):
# 0.5-1.5% relative (NumPy emulation, 100 models; max 2.4%), float16 against float32 0.07%. 2^-5 bounds that;
# a missing or misplaced scale moves logits by O(1).
INT8_LOGITS_REL = 2.0**-5
# The engine's int8 cache against the NumPy Qwen3 whose cache stores quantize-dequantize (_Int8Store): 1.9e-7
# measured (float32 arithmetic), while int8 itself moves these logits 0.44%; 1e-3 lets a k code flip at a tie (one
# step of one element) and still fails an engine that skipped quantizing.
EMULATED_REL = 1e-3


def f32(a):
    return dev(np.asarray(a, np.float32))


def _xp():
    return __import__("cupy") if ON_GPU else np


def test_quantize_kv_ref_round_trip():
    from koifish_cuda.attention_decode import dequantize_kv_ref
    from koifish_cuda.rope import quantize_kv_ref

    x = np.random.default_rng(0).standard_normal((3, 5, 128)) * np.array([1e-3, 1.0, 50.0])[:, None, None]
    x[1, 2] = 0.0  # an all-zero vector: scale 0, codes 0
    codes, scales = quantize_kv_ref(x)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (3, 5)
    assert np.abs(codes).max() == 127 and not codes[1, 2].any() and scales[1, 2] == 0
    assert (np.abs(codes).max(-1)[scales > 0] == 127).all()  # each vector's absmax maps to +-127
    err = np.abs(dequantize_kv_ref(codes, scales) - x)
    assert (err <= scales[..., None] * (0.5 + 1e-6) + 1e-12).all()  # round to nearest: at most half a step
    assert rel_err(dequantize_kv_ref(codes, scales), x) < INT8_VEC_REL


def test_qk_norm_rope_stores_int8_codes_and_scales():
    from koifish_cuda.rope import qk_norm_rope, qk_norm_rope_ref, quantize_kv_ref, rope_tables

    r = np.random.default_rng(1)
    B, T, nh, nkv, hd, past, max_len = (2, 3, 64, 8, 128, 1000, 1100) if ON_GPU else (2, 2, 2, 2, 16, 3, 8)
    qkv = (r.standard_normal((B * T, (nh + 2 * nkv) * hd)) * 2).astype(np.float32)
    qn, kn = 1 + 0.2 * r.standard_normal(hd), 1 + 0.2 * r.standard_normal(hd)
    cos, sin = rope_tables(max_len, hd, 1e6)
    q = dev(np.full((B * T, nh * hd), np.nan, np.float32))
    kc, vc = (dev(np.zeros((B, nkv, max_len, hd), np.int8)) for _ in range(2))
    ks, vs = (dev(np.zeros((B, nkv, max_len), np.float32)) for _ in range(2))
    qk_norm_rope(q, kc, vc, f32(qkv), f32(qn), f32(kn), dev(cos), dev(sin), dev(np.array([past], np.int32)), T, nh,
                 1e-6, k_scale=ks, v_scale=vs)
    rq, rk, rv = qk_norm_rope_ref(qkv, qn, kn, cos, sin, past, B, nh, nkv, hd, 1e-6)
    assert rel_err(host(q), rq) < 2e-5
    kc, vc, ks, vs = host(kc), host(vc), host(ks), host(vs)
    new = slice(past, past + T)
    # v is stored as it comes (float32): the kernel's codes and scales are the reference's, bit for bit
    v_codes, v_scales = quantize_kv_ref(rv)
    assert np.array_equal(vc[:, :, new], v_codes) and np.array_equal(vs[:, :, new], v_scales)
    # k passes the float32 norm and RoPE first: scales within float32 error, codes equal but next to a tie
    k_codes, k_scales = quantize_kv_ref(rk)
    assert np.allclose(ks[:, :, new], k_scales, rtol=1e-5, atol=0)
    u = rk * 127.0 / np.abs(rk).max(-1, keepdims=True)
    diff = kc[:, :, new].astype(int) - k_codes
    near_tie = np.abs(np.abs(u - np.floor(u)) - 0.5) < K_TIE
    assert np.abs(diff).max() <= 1 and not diff[~near_tie].any()
    for a in (kc, vc, ks, vs):  # nothing else written
        assert not a[:, :, :past].any() and not a[:, :, past + T:].any()
    with pytest.raises(ValueError, match="int8 KV cache needs its k_scale and v_scale"):
        qk_norm_rope(dev(np.zeros((B * T, nh * hd), np.float32)), dev(kc), dev(vc), f32(qkv), f32(qn), f32(kn),
                     dev(cos), dev(sin), dev(np.array([past], np.int32)), T, nh, 1e-6)


# Under the simulator one case covers two sequences of T = 2 rows (prefill), GQA (2 query heads per kv head, 2 kv
# heads), two splits and two tiles in a split, the second one partial (masked keys' scales); on a GPU, decode too.
@pytest.mark.parametrize("T,splits", [(2, 2)] + ([(1, 4), (1, 1), (5, 3)] if ON_GPU else []))
def test_attention_decode_over_an_int8_cache(T, splits):
    from koifish_cuda.attention_decode import attention_decode, attention_ref, attention_scratch, dequantize_kv_ref

    r = np.random.default_rng(2)
    if ON_GPU:
        B, nh, nkv, hd, past, max_len = 4, 64, 8, 128, 700, 1024
    else:
        B, nh, nkv, hd, past, max_len = 2, 4, 2, 16, 64, 72  # 65 or 66 keys: splits of 33, tiles of 32 + 1
    q = r.standard_normal((B * T, nh * hd))
    kc, vc = (r.integers(-127, 128, (B, nkv, max_len, hd)).astype(np.int8) for _ in range(2))
    ks, vs = ((r.random((B, nkv, max_len)) * 0.02 + 0.001).astype(np.float32) for _ in range(2))
    ks[0, 0, 3] = vs[0, 0, 5] = 0.0  # an all-zero vector (its codes as stored: zero)
    kc[0, 0, 3] = vc[0, 0, 5] = 0
    out = dev(np.full((B * T, nh * hd), np.nan, np.float32))
    scratch = attention_scratch(_xp(), B * T, nh, hd, splits)
    attention_decode(out, f32(q), dev(kc), dev(vc), dev(np.array([past], np.int32)), T, scratch,
                     k_scale=dev(ks), v_scale=dev(vs))
    ref = attention_ref(q, dequantize_kv_ref(kc, ks), dequantize_kv_ref(vc, vs), past, B, nh)
    assert rel_err(host(out), ref) < 2e-5  # the same cache: only the kernel's float32 arithmetic differs
    with pytest.raises(ValueError, match="int8 KV cache needs its k_scale and v_scale"):
        attention_decode(out, f32(q), dev(kc), dev(vc), dev(np.array([past], np.int32)), T, scratch)


class _Int8Store(np.ndarray):
    """A CPU KVCache array that keeps what is stored as the int8 cache does (codes * scale): the NumPy Qwen3 with
    these arrays is the int8 engine's reference."""

    def __setitem__(self, key, value):
        from koifish_cuda.attention_decode import dequantize_kv_ref
        from koifish_cuda.rope import quantize_kv_ref

        super().__setitem__(key, dequantize_kv_ref(*quantize_kv_ref(value)))


def _tiny_qwen3(seed=0, n_layer=1, nh=2, nkv=1, hd=16, C=32, V=64):
    """A random NumPy Qwen3 (no transformers: the simulator's time goes to the engine); matrices N(0, 1/K)."""
    from koifish_core.models.qwen3 import Qwen3, Qwen3Config

    cfg = Qwen3Config(vocab_size=V, hidden_size=C, intermediate_size=2 * C, n_layer=n_layer, n_head=nh,
                      n_kv_head=nkv, head_dim=hd, rope_theta=10000.0, tie_word_embeddings=True, n_ctx=128)
    r = np.random.default_rng(seed)
    W = {name: (1 + 0.2 * r.standard_normal(shape)).astype(np.float32) if len(shape) == 1 else
         (r.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32) for name, shape in cfg.shapes().items()}
    return Qwen3(cfg, W)


def _logits(model, cache, ids, P):
    """Logits (B, T, V) of a prefill of ids[:, :P], then one token at a time."""
    out = [model.forward(ids[:, :P], cache=cache)[0]]
    out += [model.forward(ids[:, t:t + 1], cache=cache)[0] for t in range(P, ids.shape[1])]
    return np.concatenate(out, 1)


def _emulated_int8_cache(model, batch, max_len):
    cache = model.new_cache(batch, max_len)
    cache.k, cache.v = [k.view(_Int8Store) for k in cache.k], [v.view(_Int8Store) for v in cache.v]
    return cache


def test_engine_with_an_int8_cache_equals_its_numpy_emulation():
    from koifish_core.infer.qwen3_gpu import Qwen3GPU

    model = _tiny_qwen3()  # 1 layer, 2 query heads on 1 kv head of 16: ~15 s under the simulator
    ids = np.random.default_rng(1).integers(0, 64, (1, 4))
    emulated = _logits(model, _emulated_int8_cache(model, 1, 16), ids, 3)
    exact = _logits(model, model.new_cache(1, 16), ids, 3)
    eng = Qwen3GPU.from_model(model, cache_dtype=np.int8, tf32=False)
    cache = eng.new_cache(1, 16)
    got = _logits(eng, cache, ids, 3)  # a 3-token prefill (T = 3 rows), then a decode step reading its cache
    assert eng.kv[0].dtype == np.int8 and eng.kv_scales[0].shape == (1, 1, 1, 16) and cache.length == 4
    assert rel_err(got, emulated) < EMULATED_REL
    assert np.array_equal(got.argmax(-1), emulated.argmax(-1))
    assert rel_err(got, exact) < INT8_LOGITS_REL


def test_kv_bits_option_errors():
    from koifish_core.infer.chat_open import open_chat
    from koifish_core.infer.generate_cli import generate_from_path
    from koifish_core.infer.qwen3_gpu import Qwen3GPU, kv_cache_dtype

    assert kv_cache_dtype(16) is np.float16 and kv_cache_dtype(8) is np.int8
    with pytest.raises(KoifishError, match="--kv-bits: expected 16 or 8, got 4"):
        kv_cache_dtype(4)
    with pytest.raises(KoifishError, match="KV cache: expected float16, float32 or int8, got int16"):
        Qwen3GPU(_tiny_qwen3(n_layer=1).config, cache_dtype=np.int16)
    # the CPU path has no int8 cache: asking for one is an error, not a silent float cache (checked before loading)
    with pytest.raises(KoifishError, match="--kv-bits 8: the int8 KV cache is the GPU engine's"):
        open_chat("no-such-model", device="cpu", kv_bits=8)
    with pytest.raises(KoifishError, match="--kv-bits: expected 16 or 8, got 4"):
        open_chat("no-such-model", device="cpu", kv_bits=4)
    with pytest.raises(KoifishError, match="--kv-bits 8: the int8 KV cache is the GPU engine's"):
        generate_from_path("no-such-folder", prompt=None, prompt_ids="1,2", max_new_tokens=2, temperature=0.0,
                           top_k=None, seed=None, device="cpu", kv_bits=8)


@pytest.mark.gpu
@pytest.mark.parametrize("P", [6, 40])  # 6 prompt rows run the decode kernels; 2 x 40 rows the bf16 prefill
def test_int8_cache_logits_stay_close_to_float16_on_the_gpu(P):
    from koifish_core.infer.qwen3_gpu import Qwen3GPU

    model = _tiny_qwen3(seed=3, n_layer=2, nh=8, nkv=2, hd=128, C=256, V=512)
    ids = np.random.default_rng(5).integers(0, 512, (2, P + 8))
    engines = {dt: Qwen3GPU.from_model(model, cache_dtype=dt) for dt in (np.float16, np.int8)}
    out = {dt: _logits(eng, eng.new_cache(2, 64), ids, P) for dt, eng in engines.items()}
    assert rel_err(out[np.int8], out[np.float16]) < INT8_LOGITS_REL
    eng = engines[np.int8]
    # batched against one sequence at a time (each sequence's scales at its own row): GEMMs of other heights round
    # differently and a code next to a tie flips (NumPy: weights perturbed 2^-11 move int8 logits <= 1%)
    for b in range(2):
        single = _logits(eng, eng.new_cache(1, 64), ids[b:b + 1], P)
        assert rel_err(single, out[np.int8][b:b + 1]) < INT8_LOGITS_REL / 2


@pytest.mark.gpu
def test_chat_and_generate_with_kv_bits_8(tmp_path):
    from koifish_core.infer.chat_open import open_chat
    from koifish_core.infer.generate_cli import generate_from_path
    from tests.qwen3_fixtures import tiny_chat_folder

    folder = tiny_chat_folder(tmp_path / "chat")[0]
    chat = open_chat(folder, device="cuda", kv_bits=8, temperature=0.0, max_new_tokens=12, think=False)
    assert chat.model.cache_dtype is np.int8
    for turn in ("Hello there!", "How are you today?"):  # the second turn reuses the cached prefix
        assert isinstance(chat.ask(turn).text, str)
    res = generate_from_path(folder, prompt=None, prompt_ids="5,17,99,3", max_new_tokens=10, temperature=0.0,
                             top_k=None, seed=None, device="cuda", kv_bits=8)
    assert len(res.ids) == 10
