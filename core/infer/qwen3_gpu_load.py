"""A Qwen3 folder straight onto the GPU engine, one tensor at a time: the host never holds the model.

Plain (bf16/fp16/fp32) weights are uploaded one by one as float32 and, when their width says so,
quantized there (koifish_cuda.quantize_device, bit-exact to the CPU's quantize_weight); the float
copy is freed before the next tensor comes. Folders stored quantized (koifish, AWQ, GPTQ) are
assembled on the host as QuantizedWeight (small) and uploaded packed, as Qwen3GPU.from_model does.
q|k|v and gate|up become one DeviceLinear each, concatenated by rows on the device when a layer's
last part arrives. Folder rules, widths and errors are load_hf_folder's: both read
koifish_core.models.hf_qwen3.stream_weights. The result equals
Qwen3GPU.from_model(load_hf_folder(...)) array for array.

Under Numba's simulator (NUMBA_ENABLE_CUDASIM=1) the engine's device arrays are NumPy arrays and
the kernels run simulated: that is how CI checks this loader.
"""

from __future__ import annotations

import numpy as np

from koifish_core.errors import ModelError
from koifish_core.infer.quant import QuantizedWeight, effective_group_size, quantize_weight
from koifish_core.infer.qwen3_gpu import DeviceLinear, Qwen3GPU
from koifish_core.models.hf_qwen3 import FolderPlan, plan_folder, quantized_at_load, stream_weights, weight_bytes
from koifish_cuda.quant import SUPPORTED_BITS

# linear -> (engine matrix, its row band, the number of bands)
BANDS = {"self_attn.q_proj": ("qkv", 0, 3), "self_attn.k_proj": ("qkv", 1, 3), "self_attn.v_proj": ("qkv", 2, 3),
         "self_attn.o_proj": ("o", 0, 1), "mlp.gate_proj": ("gu", 0, 2), "mlp.up_proj": ("gu", 1, 2),
         "mlp.down_proj": ("down", 0, 1)}
VECTORS = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2", "self_attn.q_norm": "qn",
           "self_attn.k_norm": "kn"}


def load_folder_gpu(folder, bits: int | None = None, group_size: int = 128, embed_bits: int | None = None,
                    head_bits: int | None = None, on_tensor=None, **engine_kwargs) -> Qwen3GPU:
    """Qwen3GPU from a Hugging Face folder; bits, embed_bits, head_bits as load_hf_folder (8, 4, 3 or None).

    on_tensor(name, index, total) reports progress; engine_kwargs go to Qwen3GPU (tf32, cache_dtype, ...)."""
    for flag, value in (("bits", bits), ("embed_bits", embed_bits), ("head_bits", head_bits)):
        if value is not None and value < 16 and value not in SUPPORTED_BITS:
            raise ValueError(f"{flag} must be one of {SUPPORTED_BITS} (or None: float), got {value}")
    plan = plan_folder(folder, bits, embed_bits, head_bits)
    eng = Qwen3GPU(plan.config, **engine_kwargs)
    _check_gpu_memory(plan, eng)
    parts = _Parts(eng)

    def fit(name, array, width):
        return _upload(eng, array, width, group_size)

    for name, weight in stream_weights(plan, fit, on_tensor):
        parts.add(name, weight)
    parts.finish()
    return eng


def _upload(eng: Qwen3GPU, array: np.ndarray, bits: int | None, group_size: int):
    """A plain tensor on the device: a float32 vector, a float32 DeviceLinear, or one quantized there."""
    if array.ndim == 1:
        return eng._put(np.asarray(array, np.float32))
    N, K = array.shape
    if not quantized_at_load(bits, array.shape):
        return DeviceLinear(N, K, w=eng._put(np.asarray(array, np.float32)))
    G = effective_group_size(K, group_size)
    if K % 32 or G % 32:  # the engine keeps such matrices dense anyway (see qwen3_gpu._packable)
        return eng._linear([quantize_weight(np.asarray(array, np.float32), bits, group_size)])
    from koifish_cuda.quantize_device import quantize

    xp = eng.xp
    with eng._ctx():  # on the engine's stream: the float copy's memory is reused only after the kernel
        w = eng._put(np.asarray(array, np.float32))
        out = DeviceLinear(N, K, words=xp.empty((N, K * bits // 32), np.uint32),
                           scales=xp.empty((N, K // G), np.float32), zeros=xp.empty((N, K // G), np.uint8), bits=bits,
                           group_size=G)
        quantize(out.words, out.scales, out.zeros, w, bits, G, eng.ns)
        del w
    return out


class _Parts:
    """Weights as they stream in, placed in the engine; a layer's q|k|v (gate|up) joined when complete."""

    def __init__(self, eng: Qwen3GPU):
        self.eng = eng
        n = eng.config.n_layer
        self.layers: list[dict] = [{} for _ in range(n)]
        self.bands: list[dict] = [{} for _ in range(n)]  # matrix -> {band: DeviceLinear} until complete
        self.top: dict = {}

    def add(self, name: str, weight) -> None:
        top = not name.startswith("layers.")
        if isinstance(weight, QuantizedWeight):  # stored quantized: assembled on the host, uploaded packed
            weight = self.eng._linear([weight], reorder=not top)  # the embedding and head are read by rows
        if top:
            self.top[name] = weight  # embed_tokens, lm_head, norm
            return
        _, l, rest = name.split(".", 2)
        l = int(l)
        if rest in VECTORS:
            self.layers[l][VECTORS[rest]] = weight
            return
        matrix, band, count = BANDS[rest]
        got = self.bands[l].setdefault(matrix, {})
        got[band] = weight
        if len(got) == count:
            self.layers[l][matrix] = self.eng._join([got[b] for b in range(count)])
            del self.bands[l][matrix]  # the parts' memory goes once the joined copy exists
            self.eng._absorb_down_perm(self.layers[l])  # once gate|up and down are both there

    def finish(self) -> None:
        eng = self.eng
        eng.layers = self.layers
        eng.norm, eng.embed = self.top["norm"], self.top["embed_tokens"]
        eng.head = eng.embed if eng.config.tie_word_embeddings else self.top["lm_head"]
        eng.sync()
        if not eng.sim:  # hand the float staging copies' memory back to the driver
            import cupy as cp

            cp.get_default_memory_pool().free_all_blocks()


def _check_gpu_memory(plan: FolderPlan, eng: Qwen3GPU) -> None:
    """Refuse up front a model whose weights (plus the float copy of its largest tensor) cannot fit."""
    if eng.sim:
        return
    import cupy as cp

    free = cp.cuda.runtime.memGetInfo()[0]
    need = weight_bytes(plan, 4) + 4 * max(int(np.prod(s)) for s in plan.shapes.values())
    if need > 0.95 * free:
        raise ModelError(f"{plan.folder}: needs about {need / 2**30:.1f} GiB of GPU memory for its weights as "
                         f"loaded, the GPU has {free / 2**30:.1f} GiB free; load with --bits 4 (or 3)")
