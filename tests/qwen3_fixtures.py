"""Tiny random Qwen3 models built with transformers (the reference), saved as Hugging Face folders."""

from __future__ import annotations

import json

import numpy as np


def tiny_hf_qwen3(tie: bool = False, kv_heads: int = 2, seed: int = 0, vocab: int = 200, n_ctx: int = 64,
                  hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4, head_dim: int = 16):
    """A float32 transformers Qwen3ForCausalLM: by default hidden 64, 2 layers, 4 heads of 16, SwiGLU 128."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=tie,
                      max_position_embeddings=n_ctx, rope_theta=10000.0, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # norms start at 1; perturb so their weights matter
                p.add_(torch.randn_like(p) * 0.2)
            elif "embed_tokens" not in name:  # HF's init (std 0.02) gives near-uniform logits
                p.mul_(4.0)
    return model


def hf_logits(model, idx: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(idx), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


# Qwen3's chat template as its tokenizer_config.json ships it ("chat_template")
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

QWEN3_TOKENIZER_CONFIG = {
    "add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    "model_max_length": 131072, "tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN3_CHAT_TEMPLATE,
}


CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello there! How are you today?",
          "I think, therefore I am.", "def add(a, b):\n    return a + b\n", "你好，世界", "2 + 2 = 4"] * 20


def tiny_chat_tokenizer():
    """A byte-level BPE with Qwen's pre-tokenizer, trained on a few lines (~330 tokens), HF `tokenizers`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken(t, special=t.startswith("<|"), normalized=False) for t in CHAT_SPECIALS])
    return tok


def tiny_chat_folder(folder, seed: int = 0):
    """A complete Qwen3 chat folder: weights, tokenizer.json, tokenizer_config.json, generation_config.json.

    Returns (folder, transformers model, HF tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_chat_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    model = tiny_hf_qwen3(tie=False, kv_heads=2, seed=seed, vocab=tok.get_vocab_size(), n_ctx=512)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(QWEN3_TOKENIZER_CONFIG))
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [im_end, eot], "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}))
    return folder, model, tok


def state_arrays(hf_model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


def is_linear(name: str) -> bool:
    from koifish_core.models.qwen3 import LINEARS

    return name.endswith(tuple(m + ".weight" for m in LINEARS))


def write_quantized_folder(folder, hf_model, tensors, quantization_config):
    from safetensors.numpy import save_file

    folder.mkdir()
    cfg = hf_model.config.to_dict()
    cfg["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_gptq_act_order_folder(folder, hf_model, group_size: int, checkpoint_format: str = "gptq", offset: int = 1,
                                seed: int = 2, shared_order: bool = False):
    """hf_model as a GPTQ 4-bit act-order folder (input columns assigned to groups by a random
    permutation, as desc_act does), packed by the spec-written gptq_pack. shared_order: linears that
    read the same input (q, k, v; gate, up) share one order, as GPTQ gives them (one Hessian);
    else every linear draws its own. Returns (folder, the float64 dequantization of each linear)."""
    from koifish_core.infer.quant import gptq_pack
    from koifish_cuda.quant import quantize_groupwise_ref

    rng = np.random.default_rng(seed)
    tensors, deq, orders = {}, {}, {}
    readers = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in"}
    for name, w in state_arrays(hf_model).items():
        if not is_linear(name):
            tensors[name] = w
            continue
        K = w.shape[1]
        module = name.removesuffix(".weight").rsplit(".", 1)
        key = (module[0], readers.get(module[1], module[1])) if shared_order else name
        if key not in orders:  # act-order: groups gather scattered input columns
            orders[key] = rng.permutation(np.arange(K) // group_size)
        g_idx = orders[key]
        order = np.argsort(g_idx, kind="stable")
        codes_sorted, scales, zeros = quantize_groupwise_ref(w[:, order], 4, group_size)
        codes = np.empty_like(codes_sorted)
        codes[:, order] = codes_sorted
        qweight, qzeros, s, gi = gptq_pack(codes, zeros, scales, g_idx, 4, zero_offset=offset)
        base = name.removesuffix(".weight")
        tensors.update({base + ".qweight": qweight, base + ".qzeros": qzeros, base + ".scales": s,
                        base + ".g_idx": gi})
        deq[name] = (codes - zeros[:, g_idx].astype(np.float64)) * scales[:, g_idx].astype(np.float64)
    folder = write_quantized_folder(folder, hf_model, tensors,
                                    {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": True,
                                     "sym": False, "checkpoint_format": checkpoint_format})
    return folder, deq
