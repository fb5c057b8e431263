"""Open a model from what a user points at: a run folder, a checkpoint folder or a HF folder.

    run folder        RUN_DIR/case.json + RUN_DIR/checkpoints/step_*/  (newest complete checkpoint)
    checkpoint folder RUN_DIR/checkpoints/step_XXXXXXXX/ (the case is two folders up)
    Hugging Face      config.json + model.safetensors (model_type gpt2 or qwen3)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from koifish_core.errors import ModelError


@dataclass
class OpenedModel:
    model: object  # GPT2 or Qwen3 (NumPy reference): forward(idx, targets) -> (logits, loss); or a Qwen3GPU
    kind: str  # "gpt2" | "qwen3"
    n_ctx: int  # longest context the model was built for
    encoding: object | None  # tiktoken.Encoding, or None when the folder has no tokenizer
    source: Path


def _case_of_checkpoint(ckpt: Path) -> Path:
    for candidate in (ckpt.parent.parent / "case.json", ckpt.parent / "case.json"):
        if candidate.exists():
            return candidate
    raise ModelError(f"{ckpt}: checkpoint found, but no case.json beside its run folder ({ckpt.parent.parent}) "
                     "to say what model it holds")


def _open_checkpoint(ckpt: Path, source: Path) -> OpenedModel:
    from koifish_core.config import load_case
    from koifish_core.data.tokenizer import gpt2_encoding
    from koifish_core.models.gpt2 import GPT2, GPT2Config
    from koifish_core.train import checkpoint

    case = load_case(_case_of_checkpoint(ckpt)).case
    if case.model.arch != "gpt2":
        raise ModelError(f"{ckpt}: checkpoints of arch {case.model.arch!r} cannot be opened; supported: gpt2")
    model = GPT2(GPT2Config.from_model_config(case.model))
    checkpoint.load_model_weights(ckpt, model)
    encoding = gpt2_encoding() if case.model.vocab_size >= 50257 else None
    return OpenedModel(model, "gpt2", case.model.n_ctx, encoding, source)


def _hf_encoding(folder: Path, kind: str):
    if (folder / "tokenizer.json").exists():
        from koifish_core.infer.tokenizer_hf import load_tokenizer_json

        return load_tokenizer_json(folder / "tokenizer.json")
    if kind == "gpt2" and (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        from koifish_core.data.tokenizer import gpt2_encoding

        return gpt2_encoding()
    return None


def open_model(path: str | Path, gpu_engine: dict | None = None) -> OpenedModel:
    """gpu_engine (Qwen3GPU keyword arguments, may be empty): a Qwen3 folder goes straight onto the GPU,
    streamed (koifish_core.infer.qwen3_gpu_load), and model is the engine; other models load on the host."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model folder (expected a run folder, a checkpoint folder or a "
                         "Hugging Face folder with config.json and model.safetensors)")
    if path.is_file():
        raise ModelError(f"{path}: expected a folder (run, checkpoint or Hugging Face model), got a file")
    if (path / "config.json").exists():
        from koifish_core.models.registry import load_model

        model, kind = load_model(path, gpu_engine=gpu_engine)
        return OpenedModel(model, kind, model.config.n_ctx, _hf_encoding(path, kind), path)
    if (path / "model.safetensors").exists() and (path / "state.json").exists():
        return _open_checkpoint(path, path)
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists():
        from koifish_core.train import checkpoint

        latest = checkpoint.latest(path)
        if latest is None:
            raise ModelError(f"{path}: this run has no complete checkpoint yet (looked in {path / 'checkpoints'})")
        return _open_checkpoint(latest, path)
    raise ModelError(f"{path}: not a model folder: expected config.json (Hugging Face), checkpoints/ (a run) "
                     "or model.safetensors + state.json (a checkpoint)")


def export_hf(path: str | Path, out_dir: str | Path) -> Path:
    """Write a koifish GPT-2 (run or checkpoint) as a Hugging Face folder."""
    from koifish_core.models.hf_gpt2 import save_hf_folder

    opened = open_model(path)
    if opened.kind != "gpt2":
        raise ModelError(f"{path}: export writes GPT-2 models; this one is {opened.kind}")
    save_hf_folder(opened.model, Path(out_dir))
    return Path(out_dir)
