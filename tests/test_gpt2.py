"""The NumPy GPT-2: every gradient against finite differences and against transformers."""

import numpy as np
import pytest

from koifish_core.models.gpt2 import GPT2, GPT2Config

TINY = GPT2Config(vocab_size=37, n_ctx=8, n_layer=2, n_head=4, n_embd=16)


def _model(cfg=TINY, dtype=np.float64, seed=0):
    m = GPT2(cfg, dtype=dtype)
    m.init_weights(seed)
    rng = np.random.default_rng(seed + 1)
    # non-trivial LayerNorm and bias values so their gradients are exercised
    for name, v in m.param_views().items():
        if v.ndim == 1:
            v[...] += rng.standard_normal(v.shape) * 0.1
    return m


def _batch(cfg, B=2, T=8, seed=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def test_every_gradient_matches_finite_differences():
    m = _model()
    x, y = _batch(TINY)
    m.zero_grad()
    m.forward(x, y)
    m.backward()
    rng = np.random.default_rng(7)
    eps = 1e-6
    for name, view in m.param_views().items():
        flat = view.reshape(-1)
        rows = flat.size if name != "wte" else TINY.vocab_size * TINY.n_embd
        for i in rng.choice(rows, size=min(4, rows), replace=False):
            old = flat[i]
            flat[i] = old + eps
            lp = m.forward(x, y, need_backward=False)[1]
            flat[i] = old - eps
            lm = m.forward(x, y, need_backward=False)[1]
            flat[i] = old
            num = (lp - lm) / (2 * eps)
            ana = m.grad_views()[name].reshape(-1)[i]
            assert abs(num - ana) <= 1e-6 * max(1.0, abs(num)) + 1e-9, (name, i, num, ana)


def test_padding_changes_nothing():
    cfg = GPT2Config(vocab_size=1100, n_ctx=8, n_layer=1, n_head=2, n_embd=8)
    assert cfg.padded_vocab_size == 1152
    m = _model(cfg)
    x, y = _batch(cfg)
    logits, loss = m.forward(x, y)
    m.zero_grad()
    m.backward()
    assert logits.shape[-1] == 1100
    assert np.all(m.param_views()["wte"][1100:] == 0) and np.all(m.grad_views()["wte"][1100:] == 0)


def test_parameter_counts_match_gpt2_sizes():
    assert GPT2Config().num_parameters() == 124_439_808
    assert GPT2Config(n_layer=48, n_head=25, n_embd=1600).num_parameters() == 1_557_611_200


def _hf_pair(dtype):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from koifish_core.models.hf_gpt2 import load_state_dict_into

    hf_cfg = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():  # random LayerNorm/bias values, not the init's ones and zeros
        for n, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf.eval()
    ours = GPT2(GPT2Config(vocab_size=101, n_ctx=32, n_layer=2, n_head=4, n_embd=32), dtype=dtype)
    load_state_dict_into(ours, {k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()}, "hf")
    return torch, hf, ours


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-9), (np.float32, 2e-5)])
def test_logits_loss_and_every_gradient_match_transformers(dtype, tol):
    from koifish_core.models.hf_gpt2 import CONV1D

    torch, hf, ours = _hf_pair(dtype)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 101, (3, 20))
    y = rng.integers(0, 101, (3, 20))
    logits, loss = ours.forward(x, y)
    ours.zero_grad()
    ours.backward()
    out = hf(input_ids=torch.tensor(x))
    hf_logits = out.logits
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.reshape(-1, 101), torch.tensor(y).reshape(-1))
    hf_loss.backward()

    def rel(a, b):
        return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)

    assert rel(logits, hf_logits.detach().numpy()) < tol
    assert abs(loss - hf_loss.item()) < tol * abs(hf_loss.item())
    grads = dict(hf.named_parameters())
    for name, g in ours.grad_views().items():
        key = f"transformer.{name}.weight" if name in ("wte", "wpe") else f"transformer.{name}"
        ref = grads[key].grad.numpy()
        if name.endswith(CONV1D):
            ref = ref.T
        assert rel(g, ref) < 50 * tol, name  # gradients sum many products: a looser bound


def test_hf_folder_round_trip(tmp_path):
    torch, hf, ours = _hf_pair(np.float32)
    from transformers import GPT2LMHeadModel

    from koifish_core.models.hf_gpt2 import load_hf_folder, save_hf_folder

    save_hf_folder(ours, tmp_path / "ours")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    x = np.random.default_rng(1).integers(0, 101, (2, 12))
    ref = hf(input_ids=torch.tensor(x)).logits.detach().numpy()
    assert np.abs(back(input_ids=torch.tensor(x)).logits.detach().numpy() - ref).max() < 1e-5
    hf.save_pretrained(tmp_path / "hf")  # written by transformers itself
    loaded = load_hf_folder(tmp_path / "hf")
    assert np.abs(loaded.forward(x)[0] - ref).max() < 1e-5


def test_bad_hf_folders(tmp_path):
    import json

    from koifish_core.errors import ModelError
    from koifish_core.models.hf_gpt2 import load_hf_folder, save_hf_folder

    with pytest.raises(ModelError, match="no such model folder"):
        load_hf_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_hf_folder(tmp_path / "empty")
    good = save_hf_folder(_model(TINY, np.float32), tmp_path / "good")
    st = good / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated or damaged"):
        load_hf_folder(good)
    cfg = json.loads((good / "config.json").read_text())
    cfg["model_type"] = "llama"
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="'llama' is not gpt2"):
        load_hf_folder(good)
