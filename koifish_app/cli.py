"""The `koifish` command line: parse, call the core, print. Nothing here computes.

Every KoifishError raised by the core is printed as one line and ends the command with exit
code 2; the core's metrics stream is what the log lines and the progress bar show.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from koifish_core.errors import KoifishError

app = typer.Typer(
    name="koifish",
    help="Sparse and quantized LLM training and inference on one GPU, or none.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Token shards: prepare them from plain text, inspect them.", no_args_is_help=True)
app.add_typer(data_app, name="data")
KV_BITS_HELP = "KV cache on the GPU: 16 (float16) or 8 (int8 codes and a scale per head vector: about half the memory)."
ACT_BITS_HELP = ("Input of the GPU's 4-bit decode GEMVs: 8 (int8 per 16 values, dp4a: the default; a Qwen3-32B "
                 "token's GEMVs 5.7 ms instead of 14.6) or 16 (float32, exact).")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _json_last_line(obj: dict) -> None:
    # Scripts read the last line; keep it plain JSON with no rich markup or wrapping.
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@app.command()
def train(
    case: Optional[Path] = typer.Argument(None, help="Case JSON (koifish or original Koifish layout). Default: the embedded tiny case."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Train this many steps (overrides train.steps)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<case name>)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the case's train.device)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in the run folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the case, print the plan and exit."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as JSON on the last line."),
    inject: List[str] = typer.Option([], "--inject", help="Fault injection for testing recovery: KIND@STEP (nan, spike, inf-param). Repeatable."),
    gpus: int = typer.Option(1, "--gpus", help="Data-parallel over this many processes on this host (one per GPU)."),
):
    """Train a model from a case file (headless; `koifish tui` watches the run)."""
    from koifish_app.train_view import run_train

    if gpus > 1 and not dry_run:
        from koifish_core.dist.launch_env import from_environ
        from koifish_core.dist.spawn import launch, strip_gpus

        if from_environ().world_size == 1:  # not yet inside a launched job: start the ranks
            raise typer.Exit(launch(strip_gpus(sys.argv[1:]), gpus))
    elif gpus < 1:
        raise KoifishError(f"--gpus: expected 1 or more, got {gpus}")
    run_train(case, steps=steps, out_dir=out_dir, device=device, resume=resume, dry_run=dry_run,
              as_json=as_json, inject=inject, out=out, err=err, json_line=_json_last_line)


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="A run folder, a checkpoint folder, or a Hugging Face model folder."),
    data: str = typer.Option(..., "--data", help="Token shards: a glob, a folder or builtin:kjv:val."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Window length T (default: the model's context)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows evaluated together."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Stop after this many windows."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print {\"loss\": ..., \"tokens\": ...} on the last line."),
):
    """Mean next-token cross-entropy of MODEL over consecutive windows of the shards."""
    from koifish_core.infer.evaluate_model import evaluate_model

    result = evaluate_model(model, data, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows, device=device)
    if as_json:
        _json_last_line({"loss": result.loss, "tokens": result.tokens, "perplexity": result.perplexity})
    else:
        out.print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  over {result.tokens:,} tokens")


@app.command()
def generate(
    model: Path = typer.Argument(..., help="A run folder, a checkpoint folder, or a Hugging Face model folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (needs a tokenizer)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Prompt as token ids: 1,2,3."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(1.0, "--temperature", help="0 is greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto (the GPU engine for Qwen3 when a GPU is visible), cpu or cuda."),
    kv_bits: int = typer.Option(16, "--kv-bits", help=KV_BITS_HELP),
    act_bits: Optional[int] = typer.Option(None, "--act-bits", help=ACT_BITS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print {\"ids\": [...], \"text\": ...} on the last line."),
):
    """Continue a prompt with MODEL."""
    from koifish_core.infer.generate_cli import generate_from_path

    result = generate_from_path(model, prompt=prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, seed=seed, device=device, kv_bits=kv_bits,
                                act_bits=act_bits,
                                on_text=None if as_json else (lambda s: out.print(s, end="", markup=False)))
    if as_json:
        _json_last_line({"ids": result.ids, "text": result.text})
    else:
        out.print()


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="A run folder holding metrics.jsonl."),
    png: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default RUN_DIR/loss.png)."),
    x: str = typer.Option("tokens", "--x", help="tokens or step."),
):
    """Plot train and eval loss of a run to a PNG."""
    from koifish_app.plot import plot_run

    path = plot_run(run_dir, png, x_axis=x)
    out.print(f"wrote {path}")


@app.command()
def export(
    model: Path = typer.Argument(..., help="A run folder or a checkpoint folder."),
    hf_out: Path = typer.Option(..., "--out", help="Folder for config.json + model.safetensors (Hugging Face layout)."),
):
    """Export a koifish GPT-2 checkpoint as a Hugging Face folder that transformers loads unchanged."""
    from koifish_core.models.from_path import export_hf

    path = export_hf(model, hf_out)
    out.print(f"wrote {path}")


@data_app.command("prepare")
def data_prepare(
    files: List[Path] = typer.Argument(..., help="Plain text files; each is one document."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the shards."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of tokens held out for validation."),
    shard_tokens: int = typer.Option(100_000_000, "--shard-tokens", help="Tokens per shard."),
    name: Optional[str] = typer.Option(None, "--name", help="Shard name prefix (default: the out folder's name)."),
    split_docs: bool = typer.Option(False, "--split-docs", help="Blank-line separated blocks are separate documents."),
):
    """Tokenize plain text (GPT-2 BPE) into llm.c shards."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from koifish_core.data.prepare import prepare_texts

    if not 0.0 <= val_fraction < 1.0:
        raise KoifishError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as progress:
        kwargs = dict(val_fraction=val_fraction, shard_tokens=shard_tokens, progress=progress, split_docs=split_docs)
        if name:
            kwargs["name"] = name
        result = prepare_texts(files, out_dir, **kwargs)
    out.print(f"train: {result.num_train_tokens:,} tokens in {len(result.train_paths)} shard(s); "
              f"val: {result.num_val_tokens:,} tokens in {len(result.val_paths)} shard(s) -> {out_dir}")


@data_app.command("info")
def data_info(shards: str = typer.Argument(..., help="A shard, a glob or a folder.")):
    """Print the header of each shard."""
    from koifish_core.data.loader import resolve_paths
    from koifish_core.data.shards import read_header

    for path in resolve_paths(shards):
        h = read_header(path)
        out.print(f"{path}: magic {h.magic} version {h.version} {h.num_tokens:,} tokens ({h.dtype})")


@app.command()
def chat(
    model: str = typer.Argument(..., help="A Hugging Face Qwen3 folder or a name such as qwen3-32b."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Another folder to look for models in."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Quantize weights at load: 8, 4 or 3."),
    device: str = typer.Option("auto", "--device", help="auto (the GPU when one is visible), cpu or cuda."),
    kv_bits: int = typer.Option(16, "--kv-bits", help=KV_BITS_HELP),
    act_bits: Optional[int] = typer.Option(None, "--act-bits", help=ACT_BITS_HELP),
    think: bool = typer.Option(True, "--think/--no-think", help="Let Qwen3 think before answering."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    seed: Optional[int] = typer.Option(None, "--seed"),
):
    """Chat with a Qwen3 model (reads the prompt from stdin when it is not a terminal)."""
    from koifish_app.chat_view import run_chat

    run_chat(model, models_dir=models_dir, bits=bits, device=device, kv_bits=kv_bits, act_bits=act_bits, think=think,
             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, out=out, err=err)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="A Hugging Face Qwen3 folder or a name such as qwen3-32b."),
    bits: int = typer.Option(4, "--bits", help="8, 4 or 3."),
    quant_out: Path = typer.Option(..., "--out", help="Folder for the quantized model."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir"),
):
    """Quantize a Hugging Face model once, so later loads take seconds."""
    from koifish_core.infer.model_resolve import resolve_model
    from koifish_core.infer.qwen3_quantize import quantize_folder

    path = quantize_folder(resolve_model(model, models_dir=models_dir), quant_out, bits=bits)
    out.print(f"wrote {path}")


@app.command()
def tui(
    run_dir: Optional[Path] = typer.Argument(None, help="Open this run directly."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder whose runs the home screen lists."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Folder with model folders for chat."),
):
    """Live dashboard: runs, loss curves, GPU health, instability alerts and chat."""
    from koifish_app.tui.app import make_app

    make_app(run_dir=run_dir, runs_dir=runs, models_dir=models_dir).run()


def main() -> None:
    try:
        app()
    except KoifishError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
