"""The command line as a user meets it: one clear line and exit code 2 for bad input, JSON last lines."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from koifish_core.data.shards import HEADER_BYTES, write_shard


def koifish(*args, cwd=None):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "koifish_app.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_clean_error(res, *words):
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out, out
    for w in words:
        assert w in out, (w, out)


def test_dry_run_json_last_line():
    res = koifish("train", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout.strip().splitlines()[-1])
    assert plan["parameters"] == 7_242_624 and plan["tokens_per_step"] == 1024


def test_original_case_dry_run_warns(tmp_path):
    from koifish_cases import CASES_DIR

    res = koifish("train", CASES_DIR / "koifish" / "gpt2_124M.json", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["parameters"] == 124_439_808
    assert "warning" in res.stderr and "HellaSwag" in res.stderr


@pytest.mark.parametrize("text, words", [
    ('{"model": {"n_layer": 2,}}', ["JSON syntax error at line 1"]),
    ('{"model": {"arch": "llama9"}}', ["model.arch", "llama9"]),
    ('{"data": {"batch_size": -1}}', ["data.batch_size", "-1"]),
    ('{"model": {"n_embd": 10, "n_head": 3}}', ["model.n_head", "do not divide"]),
])
def test_bad_cases(tmp_path, text, words):
    case = tmp_path / "bad.json"
    case.write_text(text)
    assert_clean_error(koifish("train", case, "--dry-run"), str(case), *words)


def test_bad_shards(tmp_path, tiny_case):
    good = write_shard(tmp_path / "s.bin", np.arange(500) % 97)
    raw = good.read_bytes()
    (tmp_path / "magic.bin").write_bytes(b"\x00\x01\x02\x03" + raw[4:])
    (tmp_path / "short.bin").write_bytes(raw[:HEADER_BYTES + 10])
    assert_clean_error(koifish("data", "info", tmp_path / "magic.bin"), "magic.bin", "magic number")
    assert_clean_error(koifish("data", "info", tmp_path / "short.bin"), "short.bin", "truncated")
    case = tiny_case(data={"train": str(tmp_path / "magic.bin")})
    res = koifish("train", case, "--out", tmp_path / "run")
    assert_clean_error(res, "magic.bin")
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_bad_model_folders(tmp_path):
    from koifish_core.models.gpt2 import GPT2, GPT2Config
    from koifish_core.models.hf_gpt2 import save_hf_folder

    shard = write_shard(tmp_path / "v.bin", np.arange(200) % 50)
    assert_clean_error(koifish("eval", tmp_path / "nope", "--data", shard), "nope", "no such model folder")
    m = GPT2(GPT2Config(vocab_size=50, n_ctx=16, n_layer=1, n_head=2, n_embd=8))
    m.init_weights(0)
    folder = save_hf_folder(m, tmp_path / "hf")
    res = koifish("eval", folder, "--data", shard, "--json")
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout.strip().splitlines()[-1])) >= {"loss", "tokens"}
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:200])
    assert_clean_error(koifish("eval", folder, "--data", shard), "model.safetensors", "truncated or damaged")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(koifish("generate", folder, "--prompt-ids", "1,2"), "unsupported model_type 'mamba'")


def test_kv_and_act_bits_are_checked_before_loading(tmp_path):
    assert_clean_error(koifish("generate", tmp_path, "--prompt-ids", "1,2", "--kv-bits", "4"),
                       "--kv-bits: expected 16 or 8, got 4")
    assert_clean_error(koifish("chat", "qwen3-nonexistent-9b", "--device", "cpu", "--kv-bits", "8"),
                       "--kv-bits 8: the int8 KV cache is the GPU engine's")
    assert_clean_error(koifish("generate", tmp_path, "--prompt-ids", "1,2", "--act-bits", "4"),
                       "--act-bits: expected 16 or 8, got 4")
    assert_clean_error(koifish("chat", "qwen3-nonexistent-9b", "--device", "cpu", "--act-bits", "16"),
                       "--act-bits 16: the GPU engine's 4-bit GEMVs take it; this chat runs on the CPU")


def test_train_eval_generate_plot_export(tmp_path, tiny_case):
    run = tmp_path / "run"
    res = koifish("train", tiny_case(), "--out", run)
    assert res.returncode == 0, res.stderr
    assert "step" in res.stdout and "val loss" in res.stdout and (run / "loss.png").exists()
    res = koifish("eval", run, "--data", tmp_path / "data" / "tiny_val_000000.bin", "--json")
    loss = json.loads(res.stdout.strip().splitlines()[-1])["loss"]
    assert 0 < loss < 10
    res = koifish("generate", run, "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--temperature", "0", "--json")
    ids = json.loads(res.stdout.strip().splitlines()[-1])["ids"]
    assert len(ids) == 5 and all(0 <= i < 97 for i in ids)
    assert koifish("plot", run, "--out", tmp_path / "p.png").returncode == 0 and (tmp_path / "p.png").stat().st_size > 0
    res = koifish("export", run, "--out", tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    res2 = koifish("eval", tmp_path / "hf", "--data", tmp_path / "data" / "tiny_val_000000.bin", "--json")
    assert json.loads(res2.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(loss, rel=1e-6)
    assert_clean_error(koifish("train", tiny_case(), "--out", run), "already holds a run")


def test_data_prepare(tmp_path):
    (tmp_path / "a.txt").write_text("In the beginning was the word.\n" * 50)
    res = koifish("data", "prepare", tmp_path / "a.txt", "--out", tmp_path / "shards", "--val-fraction", "0.1")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shards_train_000000.bin", "shards_val_000000.bin"]
    assert_clean_error(koifish("data", "prepare", tmp_path / "missing.txt", "--out", tmp_path / "x"), "missing.txt")


def test_chat_reads_stdin_when_not_a_terminal(tmp_path):
    from tests.qwen3_fixtures import tiny_chat_folder

    folder = tiny_chat_folder(tmp_path / "chat")[0]
    env = dict(os.environ, COLUMNS="200")
    res = subprocess.run([sys.executable, "-m", "koifish_app.cli", "chat", str(folder), "--no-think",
                          "--max-new-tokens", "8", "--temperature", "0"], input="hello there", capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() != "" or "loading" in res.stderr
    missing = subprocess.run([sys.executable, "-m", "koifish_app.cli", "chat", "qwen3-nonexistent-9b",
                              "--models-dir", str(tmp_path)], input="hi", capture_output=True, text=True, env=env,
                             timeout=300)
    assert_clean_error(missing, "qwen3-nonexistent-9b")
