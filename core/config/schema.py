"""The case: a tree of typed dataclasses. Each field is documented once, here, where it is declared.

A case file holds only what differs from these defaults. `docs/case-format.md` lists the same
fields, generated from this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ARCHS = ("gpt2", "qwen3")
DEVICES = ("cpu", "cuda")
DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)
BITS = (32, 16, 8, 4, 3, 2, 1)
COMPUTE = ("fp32", "bf16")


@dataclass
class ModelConfig:
    arch: str = field(default="gpt2", metadata={"choices": ARCHS})
    """Architecture: gpt2 trains; qwen3 is for inference (`koifish chat`, `eval`, `generate`)."""
    n_layer: int = field(default=4, metadata={"min": 1})
    """Transformer blocks."""
    n_head: int = field(default=4, metadata={"min": 1})
    """Attention heads; must divide n_embd."""
    n_embd: int = field(default=128, metadata={"min": 1})
    """Width of the residual stream."""
    n_ctx: int = field(default=128, metadata={"min": 1})
    """Longest sequence the model sees (rows of the position embedding)."""
    vocab_size: int = field(default=50257, metadata={"min": 2})
    """Vocabulary size (GPT-2's BPE has 50257); padded internally to a multiple of 128."""
    ffn: int | None = field(default=None, metadata={"min": 1})
    """Hidden width of the MLP; null means 4 * n_embd."""
    remat: int = field(default=0, metadata={"choices": (0, 1, 2)})
    """Rematerialisation: 0 keeps all activations, 1 recomputes LayerNorm and GELU outputs in
    backward, 2 keeps only each block's input and recomputes the block. The CUDA engine does
    all three; the CPU engine keeps all activations (and warns)."""


@dataclass
class DataConfig:
    train: str = "builtin:kjv:train"
    """Training shards: a glob, a folder of *.bin, or builtin:kjv:train (the shipped corpus)."""
    val: str | None = "builtin:kjv:val"
    """Validation shards (same forms), or null for no evaluation."""
    max_shards: int | None = field(default=None, metadata={"min": 1})
    """Use at most this many training shards (Koifish's `most`)."""
    batch_size: int = field(default=8, metadata={"min": 1})
    """Sequences per micro-batch (B)."""
    seq_len: int = field(default=128, metadata={"min": 1})
    """Tokens per sequence (T); at most model.n_ctx."""


@dataclass
class PrecisionConfig:
    compute: str = field(default="fp32", metadata={"choices": COMPUTE})
    """Arithmetic of activations and weights: fp32 (CPU path) or bf16 (GPU engine, fp32 master weights)."""
    weights: int = field(default=32, metadata={"choices": BITS})
    """Default bits of stored weights (16/8/4/3/2/1 are the low-bit plan of the GPU engine)."""
    rules: dict = field(default_factory=dict, metadata={"value_choices": BITS})
    """Per-tensor bits: {tensor-name glob: bits}, e.g. {"h.*.mlp.*.weight": 4}."""
    residual: str = field(default="fp32", metadata={"choices": COMPUTE})
    """The CUDA engine's residual stream (the blocks' inputs and outputs) under compute bf16: fp32, or
    bf16 as llm.c keeps it (half its bytes and memory; the LayerNorm statistics stay fp32). The CPU
    engine computes in fp32 either way."""
    residual_grad: str = field(default="fp32", metadata={"choices": COMPUTE})
    """The residual stream's gradient in the CUDA engine's backward: fp32, or bf16 (needs residual bf16;
    llm.c's: each LayerNorm backward reads and writes half the bytes, and no bf16 copy of it is made for
    the GEMMs). cases/gpt2_*.json set both bf16 (docs/case-format.md: what was measured)."""


@dataclass
class OptimizerConfig:
    name: str = field(default="adamw", metadata={"choices": OPTIMIZERS})
    """Optimizer; AdamW with decoupled weight decay on matrices only."""
    lr: float = field(default=1e-3, metadata={"gt": 0})
    """Peak learning rate."""
    beta1: float = field(default=0.9, metadata={"min": 0, "lt": 1})
    beta2: float = field(default=0.95, metadata={"min": 0, "lt": 1})
    eps: float = field(default=1e-8, metadata={"gt": 0})
    weight_decay: float = field(default=0.1, metadata={"min": 0})
    """Decoupled weight decay, applied to 2-D weights (embeddings and linear layers)."""
    grad_clip: float = field(default=1.0, metadata={"min": 0})
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    grad_accum: int = field(default=1, metadata={"min": 1})
    """Micro-batches per optimizer step; the gradient is their mean."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = field(default=20, metadata={"min": 0})
    """Linear warm-up from lr/warmup_steps to lr."""
    decay: str = field(default="cosine", metadata={"choices": DECAYS})
    """Shape of the decay after warm-up, down to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = field(default=0.1, metadata={"min": 0, "max": 1})
    """Final learning rate as a fraction of the peak."""


@dataclass
class TrainConfig:
    steps: int = field(default=200, metadata={"min": 1})
    """Optimizer steps."""
    log_every: int = field(default=10, metadata={"min": 1})
    """A log line every this many steps (metrics.jsonl gets every step)."""
    device: str = field(default="cpu", metadata={"choices": DEVICES})
    """Where to train: cpu (NumPy) or cuda (Numba kernels + CuPy)."""


@dataclass
class EvalConfig:
    every: int = field(default=50, metadata={"min": 0})
    """Evaluate on the validation shards every this many steps (and at the end); 0 only at the end."""
    batches: int = field(default=8, metadata={"min": 1})
    """Validation batches per evaluation (always the same ones, from the start of the set)."""


@dataclass
class CheckpointConfig:
    every: int = field(default=100, metadata={"min": 0})
    """Write a checkpoint every this many steps (and at the end); 0 only at the end."""
    keep_last: int = field(default=2, metadata={"min": 1})
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""
    init_from: str | None = None
    """Start from these weights: a run folder, checkpoint folder or Hugging Face GPT-2 folder."""


@dataclass
class DistConfig:
    zero1: bool = False
    """ZeRO-1: shard AdamW's moments over the data-parallel ranks (1/N of the optimizer memory;
    gradients reduce-scattered, parameters all-gathered). Checkpoints stay independent of N."""
    bucket_mb: float = field(default=25.0, metadata={"min": 0.001})
    """Size of the gradient buckets whose all-reduce overlaps the backward pass."""
    overlap: bool = True
    """All-reduce each bucket as soon as backward has produced it (false: one all-reduce after backward)."""


@dataclass
class Case:
    name: str = "default"
    """Name of the run; the run folder defaults to runs/<name>."""
    seed: int = 42
    """Seed of the weight initialisation and of anything random in training."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    """Data-parallel training over several GPUs (`--gpus N`, torchrun, srun, mpirun; docs/distributed.md)."""
    instability: dict = field(default_factory=dict)
    """Instability detection and recovery (see docs/instability.md); empty means defaults."""
    fuyou: dict = field(default_factory=dict)
    """Evolutionary optimization of experts (Koifish's `fuyou` block); kept for the EOE engine."""
