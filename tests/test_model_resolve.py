"""MODEL names -> folders: paths, --models-dir, the Hugging Face cache layout, and the message when absent."""

import os

import pytest

from koifish_core.errors import ModelError
from koifish_core.infer.model_resolve import resolve_model


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No real cache can leak in: HOME and every HF variable point into tmp."""
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _snapshot(hub, repo_id, commit, with_ref=True, mtime=None):
    org, name = repo_id.split("/")
    repo = hub / f"models--{org}--{name}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    if with_ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    if mtime is not None:
        os.utime(snap, (mtime, mtime))
    return snap


def test_a_folder_is_itself(tmp_path):
    (tmp_path / "m").mkdir()
    assert resolve_model(tmp_path / "m") == tmp_path / "m"
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(ModelError, match="got a file"):
        resolve_model(tmp_path / "f.bin")


def test_names_in_the_default_cache_any_case(isolated_home):
    snap = _snapshot(isolated_home / ".cache" / "huggingface" / "hub", "Qwen/Qwen3-32B", "abc123")
    for name in ("qwen3-32b", "Qwen3-32B", "Qwen/Qwen3-32B", "qwen/qwen3-32b"):
        assert resolve_model(name) == snap
    with pytest.raises(ModelError):
        resolve_model("other/Qwen3-32B")  # the org, when given, must match too


def test_hf_home_and_hub_cache_variables(tmp_path, monkeypatch):
    snap = _snapshot(tmp_path / "hfhome" / "hub", "Qwen/Qwen3-0.6B", "c1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert resolve_model("qwen3-0.6b") == snap
    snap2 = _snapshot(tmp_path / "hubcache", "Qwen/Qwen3-0.6B", "c2")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert resolve_model("qwen3-0.6b") == snap2


def test_refs_main_wins_else_the_newest_snapshot(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    _snapshot(hub, "Qwen/Qwen3-8B", "old", with_ref=False, mtime=1_000_000)
    newest = _snapshot(hub, "Qwen/Qwen3-8B", "new", with_ref=False, mtime=2_000_000)
    assert resolve_model("qwen3-8b") == newest
    (hub / "models--Qwen--Qwen3-8B" / "refs").mkdir()
    (hub / "models--Qwen--Qwen3-8B" / "refs" / "main").write_text("old")
    assert resolve_model("qwen3-8b").name == "old"
    assert resolve_model(hub / "models--Qwen--Qwen3-8B").name == "old"  # the cache entry's own folder


def test_models_dir_plain_folders_first(tmp_path, isolated_home):
    _snapshot(isolated_home / ".cache" / "huggingface" / "hub", "Qwen/Qwen3-4B", "c")
    mine = tmp_path / "models" / "Qwen3-4B"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    assert resolve_model("qwen3-4b", models_dir=tmp_path / "models") == mine


def test_not_found_says_where_it_looked_and_what_to_download(tmp_path, monkeypatch, isolated_home):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfh"))
    with pytest.raises(ModelError) as e:
        resolve_model("qwen3-32b-awq", models_dir=tmp_path / "models")
    message = str(e.value)
    assert "model 'qwen3-32b-awq' not found" in message
    for place in (str(tmp_path / "models"), str(tmp_path / "hfh" / "hub"),
                  str(isolated_home / ".cache" / "huggingface" / "hub")):
        assert place in message
    assert "hf download Qwen/Qwen3-32B-AWQ" in message


def test_a_snapshot_without_config_is_not_a_model(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    (hub / "models--Qwen--Qwen3-1.7B" / "snapshots" / "partial").mkdir(parents=True)
    with pytest.raises(ModelError, match="hf download Qwen/Qwen3-1.7B"):
        resolve_model("qwen3-1.7b")
