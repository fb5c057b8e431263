"""Case files: validation messages, the original Koifish layout, the plan."""

import json
from pathlib import Path

import pytest

from koifish_cases import CASES_DIR
from koifish_core.config import case_to_dict, load_case
from koifish_core.config.load import build_case
from koifish_core.config.plan import make_plan
from koifish_core.errors import ConfigError

ORIGINALS = sorted((CASES_DIR / "koifish").glob("*.json"))


def _write(tmp_path, obj, name="case.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_default_case_loads():
    loaded = load_case(None)
    assert loaded.case.model.arch == "gpt2" and loaded.case.data.train == "builtin:kjv:train"
    assert loaded.warnings == [] and loaded.format == "koifish"


@pytest.mark.parametrize("path", ORIGINALS, ids=lambda p: p.name)
def test_every_original_koifish_case_loads(path):
    loaded = load_case(path)
    assert loaded.format == "koifish-original"
    assert loaded.case.model.n_layer >= 1 and loaded.case.model.n_embd % loaded.case.model.n_head == 0


def test_original_124m_is_mapped():
    loaded = load_case(CASES_DIR / "koifish" / "gpt2_124M.json")
    c = loaded.case
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.n_ctx) == (12, 12, 768, 1024)
    assert (c.data.batch_size, c.data.seq_len, c.data.max_shards) == (80, 1024, 10)
    assert c.optimizer.lr == 0.0006 and c.eval.every == 100 and c.checkpoint.every == 500
    assert c.data.train == "/hy-tmp/edu_fineweb1B/*train*.bin"
    assert any("HellaSwag" in w for w in loaded.warnings)
    assert make_plan(c).parameters == 124_439_808


def test_original_fuyou_and_string_sizes():
    c = load_case(CASES_DIR / "koifish" / "gpt2_124M_shard50_F6_lr0.001_F6_lr0.001.json").case
    assert c.model.n_embd == 768  # written as the string "768" there
    assert c.fuyou["method"] == "pso_ga" and c.precision.compute == "bf16"
    assert c.optimizer.weight_decay == 0.1 and c.seed == 42


def test_unsupported_optimizer_warns():
    loaded = load_case(CASES_DIR / "koifish" / "gpt2_1558M.json")
    assert any("muon" in w for w in loaded.warnings)


@pytest.mark.parametrize("case, words", [
    ({"data": {"batch_size": -4}}, "data.batch_size: expected an integer >= 1, got -4"),
    ({"model": {"n_embd": 100, "n_head": 3}}, "model.n_head: 3 heads do not divide model.n_embd 100"),
    ({"model": {"arch": "llama9"}}, "model.arch: expected one of gpt2, qwen3, got \"llama9\""),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected a number, got \"fast\""),
    ({"optimizr": {}}, "optimizr: unknown key (did you mean 'optimizer'?)"),
    ({"model": {"n_layers": 2}}, "model.n_layers: unknown key (did you mean 'n_layer'?)"),
    ({"data": {"seq_len": 512}}, "data.seq_len: expected at most model.n_ctx (128), got 512"),
    ({"precision": {"rules": {"h.*": 5}}}, "precision.rules.h.*: expected one of 32, 16, 8, 4, 3, 2, 1, got 5"),
])
def test_bad_values_name_file_and_key(tmp_path, case, words):
    p = _write(tmp_path, case)
    with pytest.raises(ConfigError) as e:
        load_case(p)
    assert str(p) in str(e.value) and words in str(e.value)


def test_all_problems_reported_at_once(tmp_path):
    p = _write(tmp_path, {"data": {"batch_size": 0}, "optimizer": {"lr": -1}, "train": {"device": "tpu"}})
    with pytest.raises(ConfigError, match="3 problems") as e:
        load_case(p)
    for key in ("data.batch_size", "optimizer.lr", "train.device"):
        assert key in str(e.value)


def test_json_syntax_error_gives_line_and_column(tmp_path):
    p = _write(tmp_path, '{\n  "model": {"n_layer": 2,}\n}')
    with pytest.raises(ConfigError, match=r"JSON syntax error at line 2, column \d+"):
        load_case(p)


def test_unknown_original_arch(tmp_path):
    p = _write(tmp_path, {"model": {"arch": "MAMBA", "parameter": {"Layer": 2}}, "datasets": {}})
    with pytest.raises(ConfigError, match="unknown architecture 'MAMBA'"):
        load_case(p)


def test_missing_case_file(tmp_path):
    with pytest.raises(ConfigError, match="no such case file"):
        load_case(tmp_path / "nope.json")


def test_round_trip_through_dict():
    case = load_case(CASES_DIR / "gpt2_774M.json").case
    assert build_case(case_to_dict(case), "x") == case


@pytest.mark.parametrize("name, params", [("gpt2_124M", 124_439_808), ("gpt2_355M", 354_823_168),
                                          ("gpt2_774M", 774_030_080), ("gpt2_1558M", 1_557_611_200)])
def test_plan_parameter_counts(name, params):
    plan = make_plan(load_case(CASES_DIR / f"{name}.json").case)
    assert plan.parameters == params
    assert plan.tokens_per_step == 524_288 and plan.memory_total > plan.memory_weights > 0


def test_case_format_doc_lists_every_field():
    import dataclasses
    import typing

    from koifish_core.config import schema

    doc = (Path(__file__).resolve().parents[1] / "docs" / "case-format.md").read_text()
    hints = typing.get_type_hints(schema.Case)
    for f in dataclasses.fields(schema.Case):
        assert f"`{f.name}`" in doc, f.name
        if dataclasses.is_dataclass(hints[f.name]):
            for sub in dataclasses.fields(hints[f.name]):
                assert f"| `{sub.name}` |" in doc, f"{f.name}.{sub.name}"


def test_bf16_residual_needs_bf16_compute_and_halves_the_streams_bytes():
    base = {"model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_ctx": 1024}, "train": {"device": "cuda"},
            "data": {"batch_size": 16, "seq_len": 1024}}
    with pytest.raises(ConfigError, match="precision.residual: bf16 needs precision.compute bf16, got compute fp32"):
        build_case({**base, "precision": {"residual": "bf16"}}, "case")
    fp32, bf16 = (make_plan(build_case({**base, "precision": {"compute": "bf16", "residual": r}}, "case"))
                  for r in ("fp32", "bf16"))
    # x0 and every layer's res2 and res3: 2 bytes a value fewer
    assert fp32.memory_total - bf16.memory_total == 16 * 1024 * 768 * 2 * (1 + 2 * 12)
    with pytest.raises(ConfigError, match="precision.residual_grad: bf16 needs precision.residual bf16, got residual fp32"):
        build_case({**base, "precision": {"compute": "bf16", "residual_grad": "bf16"}}, "case")
    grad16 = make_plan(build_case({**base, "precision": {"compute": "bf16", "residual": "bf16", "residual_grad": "bf16"}},
                                  "case"))
    # dres in bf16 (2 bytes fewer a value) and no bf16 copy of it (2 more)
    assert bf16.memory_total - grad16.memory_total == 16 * 1024 * 768 * 4


# Peak VRAM of the CUDA engine in bf16 measured on an H200 (CuPy's pool, GiB): the plan counts the engine's own
# buffers. Float32 residual stream, 512 MiB logits buffer: bench/results/train_h200_*_s13.json; the cases'
# bf16 residual stream and its gradient, 1 GiB logits buffer (the default since stop 21): train_s21_b*_head1024.json
@pytest.mark.parametrize("layers,heads,width,batch,remat,residual,head_mib,measured", [
    (12, 12, 768, 16, 0, "fp32", 512, 8.1), (12, 12, 768, 16, 1, "fp32", 512, 6.5),
    (12, 12, 768, 16, 2, "fp32", 512, 3.9), (24, 16, 1024, 16, 0, "fp32", 512, 20.7),
    (36, 20, 1280, 4, 0, "fp32", 512, 20.6), (48, 25, 1600, 4, 0, "fp32", 512, 38.7),
    (12, 12, 768, 16, 0, "bf16", 1024, 7.82), (12, 12, 768, 32, 0, "bf16", 1024, 12.64)])
def test_cuda_plan_matches_the_measured_peak_memory(layers, heads, width, batch, remat, residual, head_mib, measured,
                                                    monkeypatch):
    monkeypatch.setattr("koifish_core.config.plan.HEAD_BYTES", head_mib << 20)
    case = build_case({"model": {"n_layer": layers, "n_head": heads, "n_embd": width, "n_ctx": 1024, "remat": remat},
                       "data": {"batch_size": batch, "seq_len": 1024}, "train": {"device": "cuda"},
                       "precision": {"compute": "bf16", "residual": residual, "residual_grad": residual}}, "plan")
    estimate = make_plan(case).memory_total / 2**30
    assert 0.94 * measured < estimate <= measured  # measured 2-5% above: the pool's rounding, cuDNN's workspace
