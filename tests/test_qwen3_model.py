"""The NumPy Qwen3 against transformers' Qwen3ForCausalLM (float32, CPU): logits, loss, greedy decoding."""

import numpy as np
import pytest
from tests.qwen3_fixtures import hf_greedy, hf_logits, tiny_hf_qwen3

from koifish_core.models.hf_qwen3 import load_hf_folder
from koifish_core.models.qwen3 import gqa_attention_ref, rmsnorm_ref, rope_ref, rope_tables

torch = pytest.importorskip("torch")

VARIANTS = {"untied-gqa": dict(tie=False, kv_heads=2), "tied-gqa": dict(tie=True, kv_heads=2),
            "untied-mha": dict(tie=False, kv_heads=4)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, koifish model loaded from its saved folder)."""
    hf = tiny_hf_qwen3(**VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, safe_serialization=True)
    return hf, load_hf_folder(folder)


def _ids(B=2, T=20, seed=1, vocab=200):
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


def test_logits_and_loss_equal_transformers(pair):
    hf, ours = pair
    idx = _ids()
    ref = hf_logits(hf, idx)
    logits, loss = ours.forward(idx[:, :-1], idx[:, 1:])
    np.testing.assert_allclose(logits, ref[:, :-1], atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        ref_loss = hf(torch.tensor(idx), labels=torch.tensor(idx)).loss.item()
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert np.std(ref) > 0.1  # the weights make a difference: not a near-constant comparison


def test_kv_cache_steps_equal_one_full_forward(pair):
    _, ours = pair
    idx = _ids(B=2, T=15, seed=2)
    full, _ = ours.forward(idx)
    cache = ours.new_cache(batch=2, max_len=32)
    pieces = [ours.forward(idx[:, :6], cache=cache)[0]]  # a prefill, then one token at a time
    for t in range(6, 15):
        pieces.append(ours.forward(idx[:, t:t + 1], cache=cache)[0])
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 15


def test_greedy_continuation_equals_transformers(pair):
    hf, ours = pair
    prompt = [5, 17, 99, 3, 150, 42]
    expected = hf_greedy(hf, prompt, 24)
    cache = ours.new_cache(max_len=40)
    logits, _ = ours.forward(np.array([prompt]), cache=cache, last_only=True)
    got = []
    for _ in range(24):
        tok = int(np.argmax(logits[0, -1]))
        got.append(tok)
        logits, _ = ours.forward(np.array([[tok]]), cache=cache)
    assert got == expected
    assert len(set(got)) > 1


def test_sharded_save_loads_the_same(tmp_path):
    hf = tiny_hf_qwen3(tie=False, kv_heads=2, seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    idx = _ids(seed=4)
    np.testing.assert_allclose(load_hf_folder(tmp_path).forward(idx)[0], hf_logits(hf, idx), atol=2e-5, rtol=1e-5)


def test_bf16_folder_matches_transformers_reading_it(tmp_path):
    from transformers import Qwen3ForCausalLM

    tiny_hf_qwen3(tie=True, seed=5).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    ref_model = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = _ids(seed=6)
    np.testing.assert_allclose(load_hf_folder(tmp_path).forward(idx)[0], hf_logits(ref_model, idx),
                               atol=2e-5, rtol=1e-5)


# ---- the layer references against float64 formulas written out differently ----

def test_rmsnorm_against_float64():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 5, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = w * x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rmsnorm_ref(x, w, 1e-6), expected, rtol=1e-5, atol=1e-6)


def test_rope_is_a_rotation_of_pairs_i_and_i_plus_half():
    rng = np.random.default_rng(1)
    hd, theta, positions = 8, 10000.0, np.array([0, 1, 7, 300])
    x = rng.standard_normal((2, 4, hd)).astype(np.float32)
    cos, sin = rope_tables(positions, hd, theta)
    got = rope_ref(x, cos, sin)
    for t, pos in enumerate(positions):
        for i in range(hd // 2):
            a = pos * theta ** (-2 * i / hd)
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            pair_ = rot @ np.stack([x[:, t, i], x[:, t, i + hd // 2]])
            np.testing.assert_allclose(got[:, t, i], pair_[0], atol=1e-5)
            np.testing.assert_allclose(got[:, t, i + hd // 2], pair_[1], atol=1e-5)


def test_gqa_attention_equals_repeated_kv_heads_with_an_explicit_loop():
    rng = np.random.default_rng(2)
    B, nh, nkv, T, past, hd = 1, 4, 2, 3, 2, 8
    q = rng.standard_normal((B, nh, T, hd))
    k = rng.standard_normal((B, nkv, past + T, hd))
    v = rng.standard_normal((B, nkv, past + T, hd))
    got = gqa_attention_ref(q, k, v, past)
    for h in range(nh):
        kv = h // (nh // nkv)  # query heads 0,1 share kv head 0
        for t in range(T):
            keys = np.arange(past + t + 1)
            s = k[0, kv, keys] @ q[0, h, t] / np.sqrt(hd)
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(got[0, h, t], p @ v[0, kv, keys], atol=1e-6)
