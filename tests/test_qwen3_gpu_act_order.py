"""GPTQ act-order matrices on the GPU engine: kept packed, columns reordered so groups are contiguous,
inputs gathered by that order (the down projection's order moved into gate|up's rows instead).
Under Numba's simulator in CI (tiny shapes), and the whole engine on a GPU."""

import numpy as np
import pytest

from tests.cuda_harness import ON_GPU, dev, host
from tests.qwen3_fixtures import tiny_hf_qwen3, write_gptq_act_order_folder

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
torch = pytest.importorskip("torch")
G = 32


@pytest.fixture(scope="module")
def act_order(tmp_path_factory):
    """(folder, CPU model) of a tiny untied GQA Qwen3 stored as GPTQ act-order."""
    from koifish_core.models.hf_qwen3 import load_hf_folder

    folder, _ = write_gptq_act_order_folder(tmp_path_factory.mktemp("ao") / "gptq", tiny_hf_qwen3(kv_heads=2, seed=5), G,
                                            shared_order=True)
    return folder, load_hf_folder(folder)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_gather_columns_matches_the_reference(dtype):
    from koifish_cuda.gather import gather_columns, gather_columns_ref

    r = np.random.default_rng()
    R, K = (8, 5120) if ON_GPU else (3, 70)
    x = (r.standard_normal((R, K)) * 1000).astype(dtype)
    perm = r.permutation(K).astype(np.int32)
    out = dev(np.zeros((R, K), dtype))
    gather_columns(out, dev(x), dev(perm))
    assert np.array_equal(host(out), gather_columns_ref(x, perm))


def test_sorted_by_group_is_the_same_matrix_with_columns_reordered(act_order):
    from koifish_core.infer.quant import QuantizedWeight

    w = act_order[1].weights["layers.0.self_attn.q_proj"]
    assert isinstance(w, QuantizedWeight) and w.g_idx is not None
    w2, perm = w.sorted_by_group()
    assert w2.g_idx is None and np.array_equal(w2.dequantize(), w.dequantize()[:, perm])
    uneven = QuantizedWeight(w.packed, w.scales, w.zeros, w.bits, w.group_size, np.sort(w.g_idx)[::-1].copy())
    assert uneven.sorted_by_group()[1] is not None  # descending groups: still whole, just reversed
    broken = w.g_idx.copy()
    broken[:2] = broken[0]  # one group one column short, another one long
    if w.g_idx[1] != w.g_idx[0]:
        assert QuantizedWeight(w.packed, w.scales, w.zeros, w.bits, w.group_size, broken).sorted_by_group() is None


def _engines(act_order):
    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from koifish_core.infer.qwen3_gpu_load import load_folder_gpu

    folder, cpu = act_order
    return [Qwen3GPU.from_model(cpu, act_bits=16), load_folder_gpu(folder, act_bits=16)]


def _deq(cpu, name):
    return cpu.weights[name].dequantize(np.float64)


def test_act_order_layers_stay_packed_and_mean_the_same_matrices(act_order):
    """Every layer matrix packed (a dense float32 copy would not fit a 32B model); attention matrices
    dequantize to the CPU's; the MLP computes the CPU's function though gate|up's rows and down's
    columns are stored in down's act-order."""
    cpu = act_order[1]
    x = np.random.default_rng(0).standard_normal(cpu.config.hidden_size)
    for eng in _engines(act_order):
        assert eng.reordered
        for l, L in enumerate(eng.layers):
            p = f"layers.{l}."
            assert all(L[k].quantized for k in ("qkv", "o", "gu", "down"))
            assert L["qkv"].perm is not None and L["down"].perm is None  # down's order moved into gate|up
            # read on the engine's stream: its uploads are queued there, and the null stream does not wait for it
            dense = lambda lin: np.asarray(eng._get(eng._dense(lin)), np.float64)  # noqa: E731
            qkv = np.concatenate([_deq(cpu, p + f"self_attn.{m}_proj") for m in "qkv"])
            assert np.allclose(dense(L["qkv"]), qkv, rtol=1e-6, atol=1e-7)
            assert np.allclose(dense(L["o"]), _deq(cpu, p + "self_attn.o_proj"), rtol=1e-6, atol=1e-7)
            F = cpu.config.intermediate_size

            def mlp(gu, down):
                g, u = gu[:F] @ x, gu[F:] @ x
                return down @ (g / (1 + np.exp(-g)) * u)

            ref = mlp(np.concatenate([_deq(cpu, p + "mlp.gate_proj"), _deq(cpu, p + "mlp.up_proj")]),
                      _deq(cpu, p + "mlp.down_proj"))
            got = mlp(dense(L["gu"]), dense(L["down"]))  # h comes out as h[perm]: down's columns are W[:, perm]
            assert not np.allclose(dense(L["down"]), _deq(cpu, p + "mlp.down_proj"))  # really stored reordered
            assert np.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_parts_in_different_orders_are_joined_dense_and_correct(act_order):
    """q, k, v reordered differently (not what GPTQ writes, but legal): one float32 matrix, right values."""
    from koifish_core.infer.quant import QuantizedWeight
    from koifish_core.infer.qwen3_gpu import Qwen3GPU

    cpu = act_order[1]
    eng = Qwen3GPU.from_model(cpu, act_bits=16)
    r = np.random.default_rng(4)
    parts = []
    for m in "qkv":
        w = cpu.weights[f"layers.0.self_attn.{m}_proj"]
        parts.append(QuantizedWeight(w.packed, w.scales, w.zeros, w.bits, w.group_size, r.permutation(w.g_idx)))
    joined = eng._linear(parts)
    assert not joined.quantized
    want = np.concatenate([p.dequantize(np.float64) for p in parts])
    assert np.allclose(np.asarray(eng._get(eng._dense(joined)), np.float64), want, rtol=1e-6, atol=1e-7)


def test_act_order_matrix_gathers_its_input_in_the_gemv(act_order):
    """One decode GEMV of a reordered matrix (q|k|v) against x @ W.T (the simulator runs the kernels)."""
    cpu = act_order[1]
    eng = _engines(act_order)[0]
    eng.new_cache(1, 16)
    L = eng.layers[1]
    x = np.random.default_rng(1).standard_normal((1, cpu.config.hidden_size)).astype(np.float32)
    out = dev(np.zeros((1, L["qkv"].N), np.float32))
    eng._apply(out, dev(x), L["qkv"])
    eng.sync()
    W = np.concatenate([_deq(cpu, f"layers.1.self_attn.{m}_proj") for m in "qkv"])
    ref = x.astype(np.float64) @ W.T
    assert np.linalg.norm(host(out) - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the whole 4-bit engine takes minutes under the simulator")
def test_act_order_folder_on_the_gpu_equals_the_cpu_model(act_order):
    """A 12-token prompt (the bf16 prefill: gathered bf16 inputs, gate|up bands in down's order) and
    decode steps (float32 GEMVs on gathered inputs), against the CPU model's logits."""
    folder, cpu = act_order
    ids = np.random.default_rng(3).integers(0, 200, (1, 15))
    for eng in _engines(act_order):
        ref_cache, cache = cpu.new_cache(max_len=32), eng.new_cache(1, 32)
        ref = [cpu.forward(ids[:, :12], cache=ref_cache)[0]]
        got = [eng.forward(ids[:, :12], cache=cache)[0]]
        for t in range(12, 15):
            ref.append(cpu.forward(ids[:, t:t + 1], cache=ref_cache)[0])
            got.append(eng.forward(ids[:, t:t + 1], cache=cache)[0])
        ref, got = np.concatenate(ref, 1), np.concatenate(got, 1)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2.0**-6  # bf16 prefill operands, as test_qwen3_gpu
