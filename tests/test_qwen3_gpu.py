"""The GPU Qwen3 engine against the NumPy Qwen3 on tiny random models (transformers-built folders).

Runs on the GPU when there is one (`gpu` tests at larger sizes too), else under Numba's CUDA
simulator (NumPy GEMMs, no graph). The engine keeps a float16 KV cache; prompts of at most 8 rows
and decode steps run float32 kernels (logits within 2^-8 of the float32 CPU model), longer prompts
the bf16 prefill (2^-6: bf16 GEMM operands, rounded by up to 2^-8 each, through two layers).
"""

import numpy as np
import pytest

from tests.cuda_harness import ON_GPU
from tests.qwen3_fixtures import tiny_hf_qwen3

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
torch = pytest.importorskip("torch")
BF16_REL = 2.0**-8
PREFILL_REL = 2.0**-6  # prompts of more than 8 rows: bf16 GEMM operands through two layers


# The 4-bit engine's decode GEMVs take minutes under the simulator (one Python thread per GPU
# thread): there the 4-bit kernels are checked one by one (test_quant.py), the whole engine on a GPU.
@pytest.fixture(scope="module", params=["float", pytest.param("4bit", marks=pytest.mark.gpu)])
def cpu_model(request, tmp_path_factory):
    from koifish_core.models.hf_qwen3 import load_hf_folder

    hf = tiny_hf_qwen3(tie=request.param == "float", kv_heads=2)  # tied float, untied 4-bit
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, safe_serialization=True)
    return load_hf_folder(folder, bits=None if request.param == "float" else 4)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_prefill_and_decode_logits_equal_the_cpu_model(cpu_model):
    from koifish_core.infer.qwen3_gpu import Qwen3GPU

    eng = Qwen3GPU.from_model(cpu_model, act_bits=16)
    ids = np.random.default_rng(1).integers(0, 200, (1, 9 if ON_GPU else 5))
    P = ids.shape[1] - 3
    ref_cache = cpu_model.new_cache(max_len=32)
    ref = [cpu_model.forward(ids[:, :P], cache=ref_cache)[0]]
    cache = eng.new_cache(1, 32)
    got = [eng.forward(ids[:, :P], cache=cache)[0]]
    for t in range(P, ids.shape[1]):  # decode steps through the graph
        ref.append(cpu_model.forward(ids[:, t:t + 1], cache=ref_cache)[0])
        got.append(eng.forward(ids[:, t:t + 1], cache=cache)[0])
    ref, got = np.concatenate(ref, 1), np.concatenate(got, 1)
    assert cache.length == ids.shape[1]
    assert _rel(got, ref) < BF16_REL
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.gpu  # under the simulator (~3 min) the logits test above covers the decode graph already
def test_greedy_continuation_equals_the_cpu_model(cpu_model):
    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from koifish_core.infer.sampling import SamplingParams

    n = 16 if ON_GPU else 5
    prompt = [5, 17, 99, 3, 150, 42]
    cache = cpu_model.new_cache(max_len=40)
    logits, _ = cpu_model.forward(np.array([prompt]), cache=cache, last_only=True)
    expected = []
    for _ in range(n):
        tok = int(np.argmax(logits[0, -1]))
        expected.append(tok)
        logits, _ = cpu_model.forward(np.array([[tok]]), cache=cache, last_only=True)
    eng = Qwen3GPU.from_model(cpu_model, act_bits=16)
    gcache = eng.new_cache(1, 40)
    eng.set_sampling(SamplingParams(temperature=0.0), seed=0)
    got = [int(eng.prefill_sample(np.array([prompt]), gcache)[0])]
    while len(got) < n:
        got.append(int(eng.decode_sample(gcache)[0]))
    assert got == expected
    assert gcache.length == len(prompt) + n - 1


@pytest.mark.gpu
def test_batched_decode_equals_one_sequence_at_a_time(cpu_model):
    from koifish_core.infer.qwen3_gpu import Qwen3GPU

    eng = Qwen3GPU.from_model(cpu_model, act_bits=16)
    eng.gemv_rows = 0  # prompts of 3 and of 1 sequence both take the bf16 prefill: same arithmetic
    ids = np.random.default_rng(4).integers(0, 200, (3, 12))
    cache = eng.new_cache(3, 32)
    batched = [eng.forward(ids[:, :8], cache=cache, last_only=True)[0]]
    batched += [eng.forward(ids[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    for b in range(3):
        one = eng.new_cache(1, 32)
        single = [eng.forward(ids[b:b + 1, :8], cache=one, last_only=True)[0]]
        single += [eng.forward(ids[b:b + 1, t:t + 1], cache=one)[0] for t in range(8, 12)]
        one_at_a_time, together = np.concatenate(single, 1), np.concatenate(batched, 1)[b:b + 1]
        # GEMMs of different heights: not bit-equal
        assert _rel(one_at_a_time, together) < 2e-3
        assert np.array_equal(one_at_a_time.argmax(-1), together.argmax(-1))


@pytest.mark.gpu
def test_seeded_sampling_on_the_gpu_repeats(cpu_model):
    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from koifish_core.infer.sampling import SamplingParams

    eng = Qwen3GPU.from_model(cpu_model, act_bits=16)
    runs = []
    for _ in range(2):
        cache = eng.new_cache(1, 64)
        eng.set_sampling(SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1), seed=123)
        out = [int(eng.prefill_sample(np.array([[1, 2, 3, 4]]), cache)[0])]
        out += [int(eng.decode_sample(cache)[0]) for _ in range(20)]
        runs.append(out)
    assert runs[0] == runs[1]


@pytest.mark.gpu
def test_chat_and_generate_on_the_gpu_equal_the_cpu_path(tmp_path):
    from koifish_core.infer.chat_open import open_chat
    from koifish_core.infer.generate_cli import generate_from_path
    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from tests.qwen3_fixtures import tiny_chat_folder

    folder = tiny_chat_folder(tmp_path / "chat")[0]
    cpu = open_chat(folder, device="cpu", temperature=0.0, max_new_tokens=12, think=False)
    gpu = open_chat(folder, device="cuda", temperature=0.0, max_new_tokens=12, think=False)
    assert isinstance(gpu.model, Qwen3GPU)
    for turn in ("Hello there!", "How are you today?"):  # the second turn reuses the cached prefix
        assert gpu.ask(turn).text == cpu.ask(turn).text
    kw = dict(prompt=None, prompt_ids="5,17,99,3", max_new_tokens=10, temperature=0.0, top_k=None, seed=None)
    assert generate_from_path(folder, device="cuda", **kw).ids == generate_from_path(folder, device="cpu", **kw).ids
    sampled = dict(kw, temperature=0.8, top_k=20, seed=7)
    assert generate_from_path(folder, device="cuda", **sampled).ids == \
        generate_from_path(folder, device="cuda", **sampled).ids


def test_long_prompt_in_chunks_then_decode(cpu_model, monkeypatch):
    """The bf16 prefill on the GPU: two sequences, a prompt cut into chunks (each sees the earlier
    ones' keys), a short tail chunk on the decode kernels, then decode steps: all against the CPU model."""
    import koifish_core.infer.qwen3_gpu as q3

    # the simulator (a GPU thread is a Python thread) runs one bf16 chunk of 3 rows and no decode step;
    # test_prefill_kernels checks the attention of a later chunk (past > 0) there
    B, T, steps, chunk = (2, 40, 2, 12) if ON_GPU else (1, 3, 0, 3)
    monkeypatch.setattr(q3, "PREFILL_ROWS", B * chunk)
    eng = q3.Qwen3GPU.from_model(cpu_model, act_bits=16)
    if not ON_GPU:
        eng.gemv_rows = 2
    ids = np.random.default_rng(2).integers(0, 200, (B, T + steps))
    cache = eng.new_cache(B, 48)
    assert eng.chunk == chunk  # on the GPU the last chunk, 4 tokens a sequence, takes the GEMVs
    got = [eng.forward(ids[:, :T], cache=cache)[0]]
    got += [eng.forward(ids[:, t:t + 1], cache=cache)[0] for t in range(T, T + steps)]
    ref = cpu_model.forward(ids)[0]
    got = np.concatenate(got, 1)
    assert _rel(got, ref) < PREFILL_REL
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95



@pytest.mark.gpu
def test_int8_activations_stay_near_the_cpu_model(cpu_model):
    """act_bits 8: the decode GEMVs round x to int8 per 16 values (koifish_cuda.quant_a8); the 4-bit
    model's decode logits move by about that rounding (~5e-3 a GEMV, through two layers), no more."""
    from koifish_core.infer.qwen3_gpu import Qwen3GPU

    if not any(getattr(w, "bits", None) == 4 for w in cpu_model.weights.values()):
        pytest.skip("float model: no 4-bit GEMVs")
    ids = np.random.default_rng(2).integers(0, 200, (1, 10))
    out = {}
    for bits in (16, 8):
        eng = Qwen3GPU.from_model(cpu_model, act_bits=bits)
        cache = eng.new_cache(1, 32)
        eng.forward(ids[:, :4], cache=cache)
        out[bits] = np.concatenate([eng.forward(ids[:, t:t + 1], cache=cache)[0] for t in range(4, 10)], 1)
    ref_cache = cpu_model.new_cache(max_len=32)
    cpu_model.forward(ids[:, :4], cache=ref_cache)
    ref = np.concatenate([cpu_model.forward(ids[:, t:t + 1], cache=ref_cache)[0] for t in range(4, 10)], 1)
    err = _rel(out[8], ref)
    assert _rel(out[16], ref) < BF16_REL
    assert 1e-4 < err < 2e-2  # above 1e-4: the int8 kernel really ran


@pytest.mark.gpu
def test_decode_at_wide_shapes_stays_near_the_cpu_model(tmp_path):
    """Shapes the tiny model never reaches: hidden 1280 (80 chunks of 16, a block of whole warps not a
    power of two), SwiGLU 3456, head_dim 128 (the warps attention, the merge rounding for o_proj), a
    200-token prompt over several key splits. 4-bit weights; act_bits 8 rounds x in the norms, the merge
    and SwiGLU. The mma attention with q/k norm and RoPE inside it (the default) and the warps attention
    after qk_norm_rope. Decode logits within the prefill's bf16 bound (act_bits 16) and the int8 bound (8),
    the two attentions alike, and the same to the bit with the weights prefetch on and with PDL off."""
    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from koifish_core.models.hf_qwen3 import load_hf_folder

    hf = tiny_hf_qwen3(hidden=1280, intermediate=3456, heads=10, kv_heads=2, head_dim=128, vocab=512, n_ctx=256)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cpu = load_hf_folder(tmp_path, bits=4)
    ids = np.random.default_rng(3).integers(0, 512, (1, 206))
    ref_cache = cpu.new_cache(max_len=256)
    cpu.forward(ids[:, :200], cache=ref_cache)
    ref = np.concatenate([cpu.forward(ids[:, t:t + 1], cache=ref_cache)[0] for t in range(200, 206)], 1)
    got = {}
    runs = ((16, "mma", 0, True, PREFILL_REL), (16, "warps", 0, True, PREFILL_REL), (8, "mma", 0, True, 3e-2),
            (8, "mma", 2, True, 3e-2), (8, "mma", 0, False, 3e-2))
    for bits, variant, mb, pdl, bound in runs:
        eng = Qwen3GPU.from_model(cpu, act_bits=bits)
        eng.attention_variant = variant  # "warps": q/k norm and RoPE by qk_norm_rope
        eng.prefetch_mb = mb  # spare blocks pull the next GEMV's first MB into L2
        eng.pdl = pdl  # each kernel launched while the one before it drains (sm_90+)
        cache = eng.new_cache(1, 256)
        eng.forward(ids[:, :200], cache=cache)
        key = bits, variant, mb, pdl
        got[key] = np.concatenate([eng.forward(ids[:, t:t + 1], cache=cache)[0] for t in range(200, 206)], 1)
        assert _rel(got[key], ref) < bound, key
    assert _rel(got[16, "mma", 0, True], got[16, "warps", 0, True]) < 1e-3  # float32 either way, other orders
    assert np.array_equal(got[8, "mma", 2, True], got[8, "mma", 0, True])  # a prefetch changes no value
    assert np.array_equal(got[8, "mma", 0, False], got[8, "mma", 0, True])  # nor does an earlier launch
