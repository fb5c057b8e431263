"""The original Koifish case layout, mapped onto koifish's case.

Keys beginning with '#' are comments there. What koifish supports is mapped; what it does not
support yet becomes a warning that names the key, never a failure. docs/case-format.md has the
table of this mapping.
"""

from __future__ import annotations

from koifish_core.errors import ConfigError

ARCH_NAMES = {"gpt2": "gpt2", "qwen3": "qwen3", "qwen2": "qwen3"}
DTYPE_BITS = {"F32": 32, "FP32": 32, "BF16": 16, "F16": 16, "FP16": 16, "F8": 8, "FP8": 8, "Q8": 8, "Q4": 4,
              "Q3": 3, "Q2": 2, "TERNARY": 2, "BINARY": 1}
# The architecture blocks of GPT-2 as Koifish writes them; anything else is a block koifish lacks.
KNOWN_BLOCKS = {"inp_embd", "embed_tokens", "layer", "Layer", "attn", "self_attn", "ffn", "mlp", "out", "output",
                "last_normal", "output_norm", "norm", "backbone"}
# Tensor-name prefixes of the original (for `ternary` lists and `quantizer` blocks) -> koifish globs.
TENSOR_GLOBS = {"ffn_up": "h.*.mlp.c_fc.weight", "ffn_down": "h.*.mlp.c_proj.weight", "mlp": "h.*.mlp.*.weight",
                "attn": "h.*.attn.*.weight", "self_attn": "h.*.attn.*.weight", "embed_tokens": "wte",
                "wq": "h.*.attn.c_attn.weight", "wk": "h.*.attn.c_attn.weight", "wv": "h.*.attn.c_attn.weight",
                "wo": "h.*.attn.c_proj.weight"}
IGNORED = {"version", "threads", "dump", "debug", "vendor", "title", "env", "gpt", "tensors", "tokenizer", "sft"}


def is_original_layout(raw: dict) -> bool:
    model = raw.get("model")
    return ("datasets" in raw or "CLI_params" in raw
            or (isinstance(model, dict) and ("parameter" in model or "arch" in model and str(model["arch"]).isupper())))


def _strip_comments(node):
    if isinstance(node, dict):
        return {k: _strip_comments(v) for k, v in node.items() if not str(k).lstrip().startswith("#")}
    if isinstance(node, list):
        return [_strip_comments(v) for v in node]
    return node


def _every(value, path: str, source: str, warnings: list[str]) -> int:
    n = _int(value, path, source)
    if n < 0:
        warnings.append(f"{path}: {n}: a negative period means 'not periodically' here: at the end of training only")
        return 0
    return n


def _int(value, path: str, source: str) -> int:
    # The originals write some sizes as strings ("Embed": "768").
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{source}: {path}: expected an integer, got {value!r}") from None


def map_original(raw: dict, source: str) -> tuple[dict, list[str]]:
    """(case dict in koifish's layout, warnings)."""
    warnings: list[str] = []
    raw = _strip_comments(raw)
    if "model" not in raw and isinstance(raw.get("CLI_params"), dict) and isinstance(raw["CLI_params"].get("config"), dict):
        warnings.append("this is a Koifish run dump; its CLI_params.config is the case that was run")
        raw = raw["CLI_params"]["config"]
    # Koifish is a GPU program: its cases train on the GPU unless --device says otherwise.
    out: dict = {"model": {"n_ctx": 1024}, "data": {"seq_len": 1024}, "optimizer": {}, "schedule": {},
                 "train": {"device": "cuda"}, "eval": {}, "checkpoint": {}, "precision": {}}
    model_out, data_out, opt_out = out["model"], out["data"], out["optimizer"]

    def unsupported(key: str, what: str = "not supported yet; ignored") -> None:
        warnings.append(f"{key}: {what}")

    # ---- model ------------------------------------------------------------------------------
    model = raw.get("model", {})
    arch = str(model.get("arch", "GPT2")).lower()
    if arch not in ARCH_NAMES:
        raise ConfigError(f"{source}: model.arch: unknown architecture {model.get('arch')!r}; "
                          f"supported: {', '.join(sorted({a.upper() for a in ARCH_NAMES}))}")
    model_out["arch"] = ARCH_NAMES[arch]
    if arch == "qwen2":
        warnings.append("model.arch: QWEN2 cases map to the Qwen3 code path (inference only)")
    if model_out["arch"] != "gpt2":
        warnings.append(f"model.arch: {model.get('arch')}: koifish trains GPT-2 only; use `koifish chat` or "
                        "`koifish eval` for Qwen3 models")
    param = model.get("parameter", {})
    if "Layer" in param:
        model_out["n_layer"] = _int(param["Layer"], "model.parameter.Layer", source)
    tf = param.get("transformer", {})
    for src, dst in (("Ctx", "n_ctx"), ("Embed", "n_embd"), ("Head", "n_head")):
        if src in tf:
            model_out[dst] = _int(tf[src], f"model.parameter.transformer.{src}", source)
    if "Ctx" in tf:
        data_out["seq_len"] = model_out["n_ctx"]
    if "Ffn" in tf:
        ffn = _int(tf["Ffn"], "model.parameter.transformer.Ffn", source)
        if model_out["arch"] == "gpt2" and ffn == model_out.get("n_embd"):
            # gpt2_124M.json writes Ffn = Embed = 768, yet GPT-2 124M's MLP is 4 x 768 wide: Koifish's
            # GPT-2 builder uses 4 * Embed there, so does koifish.
            warnings.append(f"model.parameter.transformer.Ffn: {ffn} equals Embed; GPT-2's MLP is 4 x Embed = {4 * ffn}")
        else:
            model_out["ffn"] = ffn
    for key in ("KVHead", "head_dim", "on"):
        if key in tf and model_out["arch"] == "gpt2" and key != "on":
            unsupported(f"model.parameter.transformer.{key}", "applies to Qwen3 only; ignored for GPT-2")
    for key in ("max_pos_embeddings", "tie_word_embeddings"):
        if key in param:
            unsupported(f"model.parameter.{key}", "used by Qwen3 inference, which reads config.json instead; ignored")
    if "vocab_size" in model:
        model_out["vocab_size"] = _int(model["vocab_size"], "model.vocab_size", source)
    if "fuyou" in model:
        out["fuyou"] = dict(model["fuyou"])
    dtype = model.get("datatype", {})
    if "weight" in dtype:
        bits = DTYPE_BITS.get(str(dtype["weight"]).upper())
        if bits is None:
            unsupported("model.datatype.weight", f"{dtype['weight']!r} is not a known type; using the default")
        else:
            out["precision"]["weights"] = bits
            if bits == 16:
                out["precision"]["compute"] = "bf16"
    rules = {}
    if "embed" in dtype:
        bits = DTYPE_BITS.get(str(dtype["embed"]).upper())
        if bits is not None:
            rules["wte"] = rules["wpe"] = bits
    for name in dtype.get("ternary", []) or []:
        glob = TENSOR_GLOBS.get(str(name).split(".")[0])
        if glob:
            rules[glob] = 2  # ternary weights (1.58 bits) are stored in 2-bit fields
        else:
            unsupported(f"model.datatype.ternary: {name}", "unknown tensor name; ignored")
    quant = raw.get("quantizer", {})
    for name, block in quant.items():
        if isinstance(block, dict) and "bits" in block:
            glob = TENSOR_GLOBS.get(name)
            if glob:
                rules[glob] = _int(block["bits"], f"quantizer.{name}.bits", source)
            else:
                unsupported(f"quantizer.{name}", "unknown tensor group; ignored")
        elif name not in ("MINI",):
            unsupported(f"quantizer.{name}")
    if rules:
        out["precision"]["rules"] = rules
    for key in ("datatype.gradient",):
        if "gradient" in dtype:
            unsupported(f"model.{key}", "gradients follow precision.compute; ignored")
    blocks = set(model.get("backbone", {})) | {k for k in model if k not in ("arch", "parameter", "fuyou", "datatype", "backbone")}
    for layer_key in ("layer", "Layer"):
        for holder in (model, model.get("backbone", {})):
            if isinstance(holder.get(layer_key), dict):
                blocks |= set(holder[layer_key])
    for b in sorted(blocks - KNOWN_BLOCKS):
        if b in ("hf-card", "card", "token_bin_path", "vocab_size"):
            if b != "vocab_size":
                unsupported(f"model.{b}", "koifish reads Hugging Face folders given on the command line; ignored")
        else:
            unsupported(f"model block {b!r}", "koifish builds the standard GPT-2 blocks; this one is ignored")

    # ---- data -------------------------------------------------------------------------------
    datasets = raw.get("datasets", {})
    train = datasets.get("train", {})
    if "glob" in train:
        data_out["train"] = train["glob"]
    if "most" in train:
        data_out["max_shards"] = _int(train["most"], "datasets.train.most", source)
    evals = [k for k in datasets if k.startswith("eval")]
    val_set = False
    for k in sorted(evals):
        block = datasets[k]
        if block.get("type") == "hellaswag":
            unsupported(f"datasets.{k}", "HellaSwag evaluation is not supported yet; ignored")
            continue
        if val_set:
            unsupported(f"datasets.{k}", "koifish evaluates one validation set; ignored")
            continue
        val_set = True
        if "glob" in block:
            data_out["val"] = block["glob"]
        if "eval-every" in block:
            out["eval"]["every"] = _every(block["eval-every"], f"datasets.{k}.eval-every", source, warnings)
        if "samp" in block:
            unsupported(f"datasets.{k}.samp", "koifish evaluates eval.batches batches instead of a random sample")
    if not val_set:
        data_out["val"] = None
    for k in datasets:
        if k != "train" and not k.startswith("eval"):
            unsupported(f"datasets.{k}")

    # ---- training ---------------------------------------------------------------------------
    tr = raw.get("train", {})
    if "batch" in tr:
        data_out["batch_size"] = _int(tr["batch"], "train.batch", source)
    if "learning-rate" in tr:
        opt_out["lr"] = float(tr["learning-rate"])
    if "decay" in tr:
        opt_out["weight_decay"] = float(tr["decay"])
    if "save-every" in tr:
        out["checkpoint"]["every"] = _every(tr["save-every"], "train.save-every", source, warnings)
    if "epoch" in tr:
        warnings.append("train.epoch: koifish counts optimizer steps; set train.steps (or --steps). "
                        f"The original asks for {tr['epoch']} epoch(s) of its data")
    for key in ("dump-every", "gpt-every", "batch_sample", "sample"):
        if key in tr:
            unsupported(f"train.{key}")
    opt = tr.get("optimizatioin", tr.get("optimization", {}))
    method = str(opt.get("method", "adamw")).lower()
    if method != "adamw":
        warnings.append(f"train.optimizatioin.method: optimizer {method!r} is not supported yet; koifish trains this case with adamw")
    if "grad_accumulation" in opt:
        opt_out["grad_accum"] = _int(opt["grad_accumulation"], "train.optimizatioin.grad_accumulation", source)
    for key in ("sign", "lars_ratio", "ZMUV_ratio"):
        if key in opt and float(opt[key]) != 0:
            unsupported(f"train.optimizatioin.{key}")
    sched = raw.get("scheduler", {})
    if sched.get("memory") not in (None, "off"):
        model_out["remat"] = 2
    for key in sched:
        if key != "memory":
            unsupported(f"scheduler.{key}")

    # ---- checkpoints ------------------------------------------------------------------------
    ck_out = raw.get("checkpoint-out") or raw.get("checkpoint_out") or (raw.get("checkpoint") or {}).get("out")
    if isinstance(ck_out, str):
        out["name"] = ck_out.rstrip("_/").split("/")[-1] or "koifish"
    elif isinstance(ck_out, dict):
        for name, block in ck_out.items():
            out["name"] = name
            if isinstance(block, dict) and "save-every" in block:
                out["checkpoint"]["every"] = _every(block["save-every"], f"checkpoint_out.{name}.save-every", source, warnings)
            break
    if isinstance(raw.get("checkpoint"), dict) and "save-every" in raw["checkpoint"]:
        out["checkpoint"]["every"] = _every(raw["checkpoint"]["save-every"], "checkpoint.save-every", source, warnings)
    ck_in = raw.get("checkpoint-in") or raw.get("checkpoint_in")
    if ck_in:
        unsupported("checkpoint-in", "Koifish's own checkpoint format (.fuyou/.gguf) cannot be read; ignored")
    for key in ("sparsing", "checkpoints"):
        if key in raw:
            unsupported(key)
    if "seed" in raw:
        out["seed"] = _int(raw["seed"], "seed", source)
    for key in sorted(set(raw) & IGNORED):
        unsupported(key, "Koifish's runtime setting; ignored")
    known = {"model", "datasets", "train", "scheduler", "checkpoint-out", "checkpoint_out", "checkpoint", "checkpoint-in",
             "checkpoint_in", "seed", "quantizer", "sparsing", "checkpoints", "CLI_params"} | IGNORED
    for key in sorted(set(raw) - known):
        unsupported(key)
    out = {k: v for k, v in out.items() if v != {}}
    return out, warnings
