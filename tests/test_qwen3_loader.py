"""Qwen3 folders in every stored form (AWQ, GPTQ act-order, koifish quantized, quantized at load), and bad folders."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from koifish_core.errors import ModelError
from koifish_core.infer.quant import awq_pack
from koifish_core.infer.qwen3_quantize import quantize_folder
from koifish_core.models.hf_qwen3 import load_hf_folder
from koifish_core.models.registry import load_model
from koifish_cuda.quant import quantize_groupwise_ref
from tests.qwen3_fixtures import (hf_logits, is_linear, state_arrays, tiny_hf_qwen3, write_gptq_act_order_folder,
                                   write_quantized_folder)

torch = pytest.importorskip("torch")
G = 32  # group size: the tiny model's widths (64, 128) hold several groups


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_qwen3(tie=False, kv_heads=2, seed=11)


@pytest.fixture(scope="module")
def src(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    hf_model.save_pretrained(folder, safe_serialization=True)
    return folder


def _reference_with(hf_model, dequantized: dict[str, np.ndarray]):
    """A copy of the transformers model whose linear weights are the given float64 dequantizations."""
    import copy

    ref = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in dequantized:
                p.copy_(torch.tensor(dequantized[name], dtype=torch.float32))
    return ref


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, 200, (2, 16))


def test_awq_folder_equals_transformers_on_the_dequantized_weights(hf_model, tmp_path):
    tensors, deq = {}, {}
    for name, w in state_arrays(hf_model).items():
        if not is_linear(name):
            tensors[name] = w
            continue
        codes, scales, zeros = quantize_groupwise_ref(w, 4, G)
        qweight, qzeros, s = awq_pack(codes, zeros, scales)
        base = name.removesuffix(".weight")
        tensors.update({base + ".qweight": qweight, base + ".qzeros": qzeros, base + ".scales": s})
        deq[name] = (codes - np.repeat(zeros, G, 1).astype(np.float64)) * np.repeat(scales.astype(np.float64), G, 1)
    folder = write_quantized_folder(tmp_path / "awq", hf_model, tensors,
                                    {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm"})
    idx = _ids(1)
    ours = load_hf_folder(folder).forward(idx)[0]
    np.testing.assert_allclose(ours, hf_logits(_reference_with(hf_model, deq), idx), atol=2e-5, rtol=1e-5)
    assert np.abs(ours - hf_logits(hf_model, idx)).max() > 1e-3  # 4 bits really changed the model


@pytest.mark.parametrize("checkpoint_format,offset", [("gptq", 1), ("gptq_v2", 0)])
def test_gptq_act_order_folder_equals_transformers_on_the_dequantized_weights(hf_model, tmp_path, checkpoint_format,
                                                                              offset):
    folder, deq = write_gptq_act_order_folder(tmp_path / "gptq", hf_model, G, checkpoint_format, offset)
    idx = _ids(2)
    np.testing.assert_allclose(load_hf_folder(folder).forward(idx)[0],
                               hf_logits(_reference_with(hf_model, deq), idx), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_quantize_at_load_equals_transformers_on_reference_dequantization(hf_model, src, bits):
    deq = {}
    for name, w in state_arrays(hf_model).items():
        if is_linear(name):
            codes, scales, zeros = quantize_groupwise_ref(w, bits, G)
            deq[name] = (codes - np.repeat(zeros, G, 1).astype(np.float64)) * np.repeat(scales.astype(np.float64), G, 1)
    idx = _ids(3)
    np.testing.assert_allclose(load_hf_folder(src, bits=bits, group_size=G).forward(idx)[0],
                               hf_logits(_reference_with(hf_model, deq), idx), atol=2e-5, rtol=1e-5)


def test_quantized_folder_loads_the_same_codes(src, tmp_path):
    out = quantize_folder(src, tmp_path / "q4", bits=4, group_size=G, embed_bits=8, head_bits=8,
                          max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists() and not (tmp_path / "q4.partial").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "koifish" and cfg["quantization_config"]["bits"] == 4
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size < 0.4 * (src / "model.safetensors").stat().st_size
    idx = _ids(4)
    expected = load_hf_folder(src, bits=4, group_size=G, embed_bits=8, head_bits=8).forward(idx)[0]
    np.testing.assert_array_equal(load_hf_folder(out).forward(idx)[0], expected)
    model, kind = load_model(out)
    assert kind == "qwen3" and model.config.n_layer == 2


def test_quantized_tied_folder_with_float_embeddings(tmp_path):
    hf = tiny_hf_qwen3(tie=True, seed=12)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    out = quantize_folder(tmp_path / "src", tmp_path / "q8", bits=8, group_size=G)
    idx = _ids(5)
    # fp16 embeddings: the only difference from quantizing at load is the embedding's rounding
    np.testing.assert_allclose(load_hf_folder(out).forward(idx)[0],
                               load_hf_folder(tmp_path / "src", bits=8, group_size=G).forward(idx)[0], atol=2e-3)


# ---- what users get for bad folders ----

def test_quantize_refuses_bad_requests(src, tmp_path):
    with pytest.raises(ModelError, match="--bits: expected one of 8, 4, 3, got 5"):
        quantize_folder(src, tmp_path / "x", bits=5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        quantize_folder(src, tmp_path / "full", bits=4)
    done = quantize_folder(src, tmp_path / "once", bits=4, group_size=G)
    with pytest.raises(ModelError, match="already quantized"):
        quantize_folder(done, tmp_path / "twice", bits=4)


def _copy_with(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    from safetensors.numpy import load_file

    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_wrong_shape_missing_and_unexpected_tensors(src, tmp_path):
    def wrong(t):
        t["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)

    with pytest.raises(ModelError, match=r"model.layers.1.mlp.up_proj.weight: expected shape \(128, 64\)"):
        load_hf_folder(_copy_with(src, tmp_path / "a", wrong))
    with pytest.raises(ModelError, match=r"1 weights missing, e.g. model.norm.weight"):
        load_hf_folder(_copy_with(src, tmp_path / "b", lambda t: t.pop("model.norm.weight")))

    def extra(t):
        t["model.layers.0.mystery.weight"] = np.zeros(2, np.float32)

    with pytest.raises(ModelError, match="unexpected tensor model.layers.0.mystery.weight"):
        load_hf_folder(_copy_with(src, tmp_path / "c", extra))

    def zero_bias(t):  # GPTQ packers add zero biases; harmless, so accepted
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float16)

    load_hf_folder(_copy_with(src, tmp_path / "d", zero_bias))

    def real_bias(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.ones(64, np.float16)

    with pytest.raises(ModelError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        load_hf_folder(_copy_with(src, tmp_path / "e", real_bias))


def test_broken_folders(src, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights: expected model.safetensors"):
        load_hf_folder(folder)
    (folder / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelError, match="cannot read as safetensors"):
        load_hf_folder(folder)
    index = {"weight_map": {"a": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="not in the folder: model-00002-of-00002.safetensors"):
        load_hf_folder(folder)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        load_hf_folder(folder)


def test_registry_dispatches_and_names_what_it_supports(src, tmp_path):
    model, kind = load_model(src)
    assert kind == "qwen3" and model.config.n_kv_head == 2
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="unsupported model_type 'llama'; supported: gpt2, qwen3"):
        load_model(llama)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    odd = tmp_path / "bnb"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="quant_method 'bitsandbytes' is not supported; expected awq, gptq or koifish"):
        load_hf_folder(odd)


def test_generate_and_eval_open_qwen3_folders(src, hf_model, tmp_path):
    from koifish_core.data.shards import write_shard
    from koifish_core.infer.evaluate_model import evaluate_model
    from koifish_core.infer.generate_cli import generate_from_path
    from tests.qwen3_fixtures import hf_greedy

    result = generate_from_path(src, prompt=None, prompt_ids="5,17,99", max_new_tokens=6, temperature=0.0,
                                top_k=None, seed=None)
    assert result.ids == hf_greedy(hf_model, [5, 17, 99], 6) and result.text is None  # no tokenizer files
    tokens = np.random.default_rng(9).integers(0, 200, 4 * 16 + 1).astype(np.uint32)
    write_shard(tmp_path / "val_000000.bin", tokens, dtype=np.uint32)
    got = evaluate_model(src, str(tmp_path / "val_*.bin"), seq_len=16, batch_size=2)
    x, y = tokens[:-1].reshape(4, 16), tokens[1:].reshape(4, 16)
    with torch.no_grad():
        ref = hf_model(torch.tensor(x.astype(np.int64)), labels=torch.tensor(x.astype(np.int64)))
    logits = ref.logits.numpy().astype(np.float64)  # loss over the same 64 targets, from transformers' logits
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = float(np.mean(lse - np.take_along_axis(logits, y[..., None].astype(np.int64), -1)[..., 0]))
    assert got.tokens == 64 and got.loss == pytest.approx(expected, rel=1e-5)


def test_a_model_too_big_for_memory_is_refused_up_front(src, monkeypatch):
    import koifish_core.models.hf_qwen3 as hq

    monkeypatch.setattr(hq, "host_memory_bytes", lambda: 200_000)  # the tiny model needs ~ 270 KB at float32
    with pytest.raises(ModelError, match=r"needs about 0.0 GiB .* load with --bits 4"):
        load_hf_folder(src)
    assert load_hf_folder(src, bits=4, group_size=G, embed_bits=4, head_bits=4).config.n_layer == 2


def test_keeping_dequantized_copies_changes_speed_not_numbers(src):
    model = load_hf_folder(src, bits=4, group_size=G, embed_bits=8, head_bits=8)
    idx = _ids(7)
    before = model.forward(idx)[0]
    assert not model.keep_dequantized(budget_bytes=1000)  # too small a budget: nothing kept
    assert model.keep_dequantized(budget_bytes=10**9)
    np.testing.assert_array_equal(model.forward(idx)[0], before)
    np.testing.assert_array_equal(model.forward(idx)[0], before)  # the second call reads the kept copies
    assert model.weights["layers.0.mlp.up_proj"]._dense is not None
