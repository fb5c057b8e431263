"""Qwen3 on the GPU: weights resident, the decode step replayed as one CUDA graph.

Weights: the linear layers of a block as three device matrices (q|k|v and gate|up concatenated
by rows, so one GEMV each), 4/8/3-bit group-wise (koifish_cuda.quant) or float32; norms float32;
embeddings and head float32 or quantized. Activations are float32; the KV cache float16 (or
float32, or int8 with one float32 scale per head vector: --kv-bits 8), preallocated for max_len positions.

One decode step (B sequences, one token each), as the graph runs it:
    embed_rows(tok) -> per layer: add_rmsnorm, qkv GEMV, q/k norm + RoPE (+ KV store),
    split attention + merge, o GEMV, add_rmsnorm, gate|up GEMV, SwiGLU, down GEMV
    -> final norm -> head GEMV -> sample (writes the next tok) -> advance (pos += 1, rng counter)
Everything it reads is a static device buffer: the token (tok), the position (pos), the sampling
parameters, the seed/counter and the context flags for the repetition penalty; so the same
graph replays every step, and the host only reads back the sampled token (4 bytes per row).

Prefill: prompt chunks of up to PREFILL_ROWS tokens (all sequences together), launched eagerly
(not captured; the GPU work of a layer outlasts its launches): the GEMM operands are bf16 (float32
accumulation, cuBLAS GemmEx). Each matrix is dequantized into a bf16 scratch slab in bands of rows
(the MLP in bands of its hidden width: gate|up rows f0:f1, SwiGLU, then down's columns f0:f1, so
the hidden activations never exist whole), and attention is two batched GEMMs around a causal
softmax (koifish_cuda.attention_prefill). A chunk of at most MAX_BATCH rows runs the decode
kernels instead (GEMVs read the packed weights once; no dequantization pays off there).

Without a GPU (NUMBA_ENABLE_CUDASIM=1) the same code runs on NumPy arrays under Numba's
simulator, GEMMs in NumPy and no graph: that is how the tests check the engine on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import koifish_cuda.compat  # noqa: F401  (before numba compiles)
from koifish_core.errors import KoifishError
from koifish_core.infer.quant import QuantizedWeight
from koifish_core.infer.sampling import SamplingParams

PREFILL_ROWS = 2048  # prompt tokens (over all sequences) per prefill pass: sizes the activation buffers
PREFILL_SPLITS = 4  # key splits of the attention kernel in a short (GEMV) prefill chunk
SLAB_BYTES = 256 << 20  # prefill scratch: bf16 weight bands, or the attention scores (float32)
MLP_BAND = 16384  # hidden units of the MLP per band, at most (multiples of 128: quantization groups stay whole)


GPU_DEFAULT_CONTEXT = 8192  # KV positions chat allocates on the GPU unless told (Qwen3's 40,960 would take 10.7 GB at 32B)


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" from --device cpu|cuda|auto (auto: the GPU when one is visible)."""
    if device not in ("cpu", "cuda", "auto"):
        raise KoifishError(f"--device: expected cpu, cuda or auto, got {device!r}")
    if device == "auto":
        return "cuda" if gpu_available() else "cpu"
    if device == "cuda" and not gpu_available():
        raise KoifishError("--device cuda: no CUDA GPU is visible (or CuPy / numba-cuda are missing); "
                           "use --device cpu or auto")
    return device


def kv_cache_dtype(kv_bits: int):
    """Qwen3GPU's cache_dtype for --kv-bits: 16 is float16; 8 is int8 codes with one float32 scale per
    head vector (koifish_cuda.rope), about half the bytes (the cache at 8k context, Qwen3-32B: 2.15 vs 1.11 GB)."""
    if kv_bits not in (16, 8):
        raise KoifishError(f"--kv-bits: expected 16 or 8, got {kv_bits}")
    return np.float16 if kv_bits == 16 else np.int8


ACT_BITS = 8  # the batch-1 4-bit GEMVs' input: int8 per 16 values (koifish_cuda.quant_a8), or 16: float32


def check_act_bits(act_bits: int) -> int:
    """--act-bits as Qwen3GPU takes it: 8 or 16."""
    if act_bits not in (16, 8):
        raise KoifishError(f"--act-bits: expected 16 or 8, got {act_bits}")
    return act_bits


def engine_options(kv_bits: int = 16, act_bits: int | None = None, on_gpu: bool = True, run: str = "this run",
                   device: str = "cpu") -> dict:
    """Qwen3GPU keyword arguments for --kv-bits and --act-bits (None: the engine's ACT_BITS), checked before
    anything loads. Both are the GPU engine's: a run on the CPU refuses them."""
    cache_dtype = kv_cache_dtype(kv_bits)
    if act_bits is not None:
        check_act_bits(act_bits)
    if not on_gpu:
        if kv_bits != 16:
            raise KoifishError(f"--kv-bits {kv_bits}: the int8 KV cache is the GPU engine's; {run} runs on the CPU "
                               f"(--device {device})")
        if act_bits is not None:
            raise KoifishError(f"--act-bits {act_bits}: the GPU engine's 4-bit GEMVs take it; {run} runs on the CPU "
                               f"(--device {device})")
        return {}
    return dict(cache_dtype=cache_dtype, act_bits=ACT_BITS if act_bits is None else act_bits)


def simulated() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def gpu_available() -> bool:
    if simulated():
        return False
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001  (no CuPy, no driver, no device)
        return False


@dataclass
class DeviceLinear:
    """W (N, K) on the device: float32 `w`, or packed codes (words uint32, scales float32, zeros uint8).
    perm (device int32 (K,), perm_host its NumPy copy): a GPTQ act-order matrix stored with its input
    columns reordered so that groups are contiguous; it is applied to x[:, perm]."""

    N: int
    K: int
    w: object = None
    words: object = None
    scales: object = None
    zeros: object = None
    bits: int = 0
    group_size: int = 0
    perm: object = None
    perm_host: np.ndarray | None = None

    @property
    def quantized(self) -> bool:
        return self.words is not None

    @property
    def nbytes(self) -> int:
        if self.quantized:
            return int(self.words.nbytes + self.scales.nbytes + self.zeros.nbytes)
        return int(self.w.nbytes)


class GPUCache:
    """The chat/generate view of the engine's KV cache: length and max_len (the keys live in the engine)."""

    def __init__(self, engine, batch: int, max_len: int):
        self.engine, self.batch, self.max_len, self.length = engine, batch, max_len, 0

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


def _mlp_band(F: int, C: int, slab_elems: int) -> int:
    """Hidden units per MLP band: gate, up and down bands (3 x band x C bf16) fit the slab, at most
    MLP_BAND, a multiple of 128 unless one band takes all of F; bands as even as that allows."""
    most = min(MLP_BAND, slab_elems // (3 * C)) // 128 * 128
    if most >= F:
        return F
    if most < 128:
        raise KoifishError(f"the prefill scratch ({slab_elems} bf16) cannot hold an MLP band of hidden size {C}")
    per = -(-F // -(-F // most))  # ceil(F / bands)
    return -(-per // 128) * 128


def _packable(w) -> bool:
    """A host weight the device kernels take packed: group-wise codes in column order (no act-order
    g_idx) whose rows and groups are whole 32-code chunks."""
    return isinstance(w, QuantizedWeight) and w.g_idx is None and w.shape[1] % 32 == 0 and w.group_size % 32 == 0


def _same_perm(parts) -> bool:
    """All parts take their input in one order (none reordered, or all by the same permutation)."""
    first = parts[0].perm_host
    return all((p.perm_host is None) == (first is None) and (first is None or np.array_equal(p.perm_host, first))
               for p in parts)


class Qwen3GPU:
    """Decoder protocol of koifish_core.models.qwen3.Qwen3 (new_cache, forward), plus sampling on the device:
    set_sampling, prefill_sample, decode_sample."""

    def __init__(self, config, tf32: bool = True, cache_dtype=np.float16, decode_splits: int = 32,
                 act_bits: int = ACT_BITS):
        from koifish_cuda.quant import MAX_BATCH

        self.config = config
        # 8: the batch-1 4-bit GEMVs take x rounded to int8 per 16 values (koifish_cuda.quant_a8)
        self.act_bits = check_act_bits(act_bits)
        self.sim = simulated()
        self.gemv_rows = MAX_BATCH  # prompt chunks of at most this many rows run the decode kernels
        if not self.sim and not gpu_available():
            raise KoifishError("--device cuda: no CUDA GPU is visible (or CuPy / numba-cuda are missing)")
        from numba import cuda

        if config.attention_bias:
            raise KoifishError("the GPU engine does not take attention biases (no released Qwen3 has them)")
        if self.sim:
            from koifish_cuda.cublas_raw import NumpyBlas

            self.xp, self.stream, self.ns, self.blas = np, None, 0, NumpyBlas()
        else:
            import cupy as cp

            from koifish_cuda.cublas_raw import Cublas

            self.xp = cp
            self.stream = cp.cuda.Stream(non_blocking=True)
            self.ns = cuda.external_stream(self.stream.ptr)
            with self.stream:
                self.blas = Cublas(self.stream, tf32=tf32)
        from koifish_cuda.attention_decode import check_shapes

        check_shapes(config.n_head, config.n_kv_head, config.head_dim)
        self.cache_dtype = np.dtype(cache_dtype).type
        if self.cache_dtype not in (np.float16, np.float32, np.int8):
            raise KoifishError(f"KV cache: expected float16, float32 or int8, got {np.dtype(cache_dtype).name}")
        self.kv_scales = None  # int8 cache: (k_scale, v_scale), float32 (n_layer, B, nkv, max_len)
        self.decode_splits = decode_splits
        # the decode attention's split kernel (attention_decode): "mma" (tensor-core scores; float16 caches,
        # head_dim a multiple of 64, at most 8 query heads a kv head, else "warps" runs), "warps" or "tiles"
        # (int8 caches use it whatever is asked); bench_qwen3_decode.py --attention. Set before the first
        # decode step (the graph captures it)
        self.attention_variant = "mma"
        # decode with the mma kernel: q/k norm and RoPE run inside it (attention_decode rope=), not as a node
        # of their own; False for measurement (bench_qwen3_decode.py --unfused-rope)
        self.fuse_rope = True
        # decode: spare blocks of each norm, attention merge and SwiGLU pull the first prefetch_mb MB of the
        # next GEMV's weights into L2 while the bus is idle (koifish_cuda.prefetch); 0 = off. H200, stop 17:
        # 2 MB 126.3 against 125.0 tokens/s without PDL, 127.5 against 126.7 with it; 8 MB no gain, 16 MB slower
        self.prefetch_mb = 2.0
        # decode: each kernel's launch overlaps the end of the one before it (programmatic dependent launch,
        # koifish_cuda.pdl; sm_90+, else nothing changes). H200, stop 17: +1.2% at 1k context and 8k
        self.pdl = True
        self.layers: list[dict] = []
        self.embed = self.head = self.norm = None
        self.batch = self.max_len = 0
        self.graph = None
        self._eager_steps = 0
        self._cache: GPUCache | None = None
        self.reordered = False  # some matrix takes its input gathered (GPTQ act-order): gather buffers

    # ---- weights ------------------------------------------------------------------------------
    def _put(self, a):
        if self.sim:
            return np.ascontiguousarray(a)
        with self.stream:
            return self.xp.asarray(np.ascontiguousarray(a))

    def _linear(self, ws, reorder: bool = True) -> DeviceLinear:
        """Device matrix of the rows of the host weights ws stacked (one GEMV for q|k|v and gate|up).
        reorder=False keeps act-order matrices dense (the embedding and the head, read by rows)."""
        return self._join([self._upload_weight(w, reorder) for w in ws])

    def _upload_weight(self, w, reorder: bool = True) -> DeviceLinear:
        """One host weight (float array or QuantizedWeight) on the device: packed when the kernels take it
        so (a GPTQ act-order one with its columns reordered, when reorder), else dequantized to float32."""
        N, K = w.shape
        if reorder and isinstance(w, QuantizedWeight) and w.g_idx is not None:
            got = w.sorted_by_group()
            if got is not None and _packable(got[0]):
                lin = self._upload_weight(got[0])
                lin.perm, lin.perm_host = self._put(got[1].astype(np.int32)), got[1]
                self.reordered = True
                return lin
        if _packable(w):
            return DeviceLinear(N, K, words=self._put(np.ascontiguousarray(w.packed).view(np.uint32)),
                                scales=self._put(np.asarray(w.scales, np.float32)), zeros=self._put(w.zeros),
                                bits=w.bits, group_size=w.group_size)
        dense = w.dequantize(np.float32) if isinstance(w, QuantizedWeight) else np.asarray(w, np.float32)
        return DeviceLinear(N, K, w=self._put(dense))

    def _join(self, parts: list[DeviceLinear]) -> DeviceLinear:
        """One DeviceLinear of the parts' rows stacked: packed when all are packed alike, else float32
        (a mixed layer, e.g. one GPTQ act-order part among plain ones)."""
        if len(parts) == 1:
            return parts[0]
        N, K, xp = sum(p.N for p in parts), parts[0].K, self.xp
        with self._ctx():
            if (all(p.quantized for p in parts) and len({(p.bits, p.group_size) for p in parts}) == 1
                    and _same_perm(parts)):
                return DeviceLinear(N, K, words=xp.concatenate([p.words for p in parts]),
                                    scales=xp.concatenate([p.scales for p in parts]),
                                    zeros=xp.concatenate([p.zeros for p in parts]), bits=parts[0].bits,
                                    group_size=parts[0].group_size, perm=parts[0].perm, perm_host=parts[0].perm_host)
            return DeviceLinear(N, K, w=xp.concatenate([self._dense(p) for p in parts]))

    def _dense(self, lin: DeviceLinear):
        """lin as float32 on the device, its columns in the model's order. A packed part goes through the
        host's own dequantization (one part of a mixed layer, rare): its values are then exactly the CPU
        model's."""
        if not lin.quantized:
            return lin.w
        packed = np.ascontiguousarray(self._get(lin.words)).view(np.uint8)
        qw = QuantizedWeight(packed, self._get(lin.scales).astype(np.float16), self._get(lin.zeros), lin.bits,
                             lin.group_size)
        dense = qw.dequantize(np.float32)
        if lin.perm_host is not None:  # stored as W[:, perm]
            dense = dense[:, np.argsort(lin.perm_host)]
        return self._put(np.ascontiguousarray(dense))

    def _absorb_down_perm(self, layer: dict) -> None:
        """An act-order down projection reads the hidden units in the order perm: gate|up's rows are put in
        that order instead (SwiGLU pairs gate row j with up row j, so h comes out as h[perm]) and down
        needs no gather; the prefill's MLP bands rely on it (down's columns f0.. meet gate|up's rows f0..)."""
        down, gu = layer.get("down"), layer.get("gu")
        if down is None or gu is None or down.perm_host is None:
            return
        F = down.K
        idx = np.concatenate([down.perm_host, F + down.perm_host])
        with self._ctx():
            rows = self._put(idx.astype(np.int64))
            if gu.quantized:
                layer["gu"] = DeviceLinear(gu.N, gu.K, words=gu.words[rows], scales=gu.scales[rows],
                                           zeros=gu.zeros[rows], bits=gu.bits, group_size=gu.group_size,
                                           perm=gu.perm, perm_host=gu.perm_host)
            else:
                layer["gu"] = DeviceLinear(gu.N, gu.K, w=gu.w[rows])
        layer["down"] = DeviceLinear(down.N, down.K, words=down.words, scales=down.scales, zeros=down.zeros,
                                     bits=down.bits, group_size=down.group_size)

    @classmethod
    def from_model(cls, model, **kw) -> "Qwen3GPU":
        """Upload a koifish_core.models.qwen3.Qwen3 (float or QuantizedWeight matrices)."""
        eng = cls(model.config, **kw)
        W = model.weights
        for l in range(model.config.n_layer):
            p = f"layers.{l}."
            a, m = p + "self_attn.", p + "mlp."
            eng.layers.append(dict(
                ln1=eng._put(np.asarray(W[p + "input_layernorm"], np.float32)),
                ln2=eng._put(np.asarray(W[p + "post_attention_layernorm"], np.float32)),
                qn=eng._put(np.asarray(W[a + "q_norm"], np.float32)), kn=eng._put(np.asarray(W[a + "k_norm"], np.float32)),
                qkv=eng._linear([W[a + "q_proj"], W[a + "k_proj"], W[a + "v_proj"]]), o=eng._linear([W[a + "o_proj"]]),
                gu=eng._linear([W[m + "gate_proj"], W[m + "up_proj"]]), down=eng._linear([W[m + "down_proj"]])))
            eng._absorb_down_perm(eng.layers[-1])
        eng.norm = eng._put(np.asarray(W["norm"], np.float32))
        eng.embed = eng._linear([W["embed_tokens"]], reorder=False)
        eng.head = eng.embed if W["lm_head"] is W["embed_tokens"] else eng._linear([W["lm_head"]], reorder=False)
        return eng

    @classmethod
    def random(cls, config, bits: int = 4, group_size: int = 128, seed: int = 0, **kw) -> "Qwen3GPU":
        """Random quantized weights made on the device (benchmarks at full size: nothing crosses from the host).

        Codes are uniform, zero points at mid-range, scales ~ 1/sqrt(K) / 2^(bits-1) so each layer keeps
        activations in range."""
        eng = cls(config, **kw)
        xp = eng.xp
        rs = xp.random.RandomState(seed) if not eng.sim else np.random.RandomState(seed)

        def q(N, K):
            ng = K // group_size
            with eng._ctx():
                words = rs.randint(0, 2**31, size=(N, K * bits // 32), dtype=np.int64).astype(np.uint32)
                words ^= rs.randint(0, 2, size=(N, K * bits // 32), dtype=np.int64).astype(np.uint32) << 31
                scales = (rs.random_sample((N, ng)).astype(np.float32) + 0.5) * np.float32(1.0 / np.sqrt(K) / 2 ** (bits - 1))
                zeros = xp.full((N, ng), 2 ** (bits - 1), dtype=np.uint8)
            return DeviceLinear(N, K, words=words, scales=scales, zeros=zeros, bits=bits, group_size=group_size)

        c = config
        C, F, hd = c.hidden_size, c.intermediate_size, c.head_dim
        ones = lambda n: eng._put(np.ones(n, np.float32))  # noqa: E731
        for _ in range(c.n_layer):
            eng.layers.append(dict(ln1=ones(C), ln2=ones(C), qn=ones(hd), kn=ones(hd),
                                   qkv=q((c.n_head + 2 * c.n_kv_head) * hd, C), o=q(C, c.n_head * hd),
                                   gu=q(2 * F, C), down=q(C, F)))
        eng.norm = ones(C)
        eng.embed = q(c.vocab_size, C)
        eng.head = eng.embed if c.tie_word_embeddings else q(c.vocab_size, C)
        return eng

    def weight_bytes(self) -> int:
        mats = [L[k] for L in self.layers for k in ("qkv", "o", "gu", "down")]
        mats += [self.embed] + ([self.head] if self.head is not self.embed else [])
        vecs = sum(int(L[k].nbytes) for L in self.layers for k in ("ln1", "ln2", "qn", "kn")) + int(self.norm.nbytes)
        return sum(m.nbytes for m in mats) + vecs

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads (every layer matrix, the head and the norms; one embedding row)."""
        mats = [L[k] for L in self.layers for k in ("qkv", "o", "gu", "down")] + [self.head]
        vecs = sum(int(L[k].nbytes) for L in self.layers for k in ("ln1", "ln2", "qn", "kn")) + int(self.norm.nbytes)
        return sum(m.nbytes for m in mats) + vecs

    # ---- buffers ------------------------------------------------------------------------------
    def _ctx(self):
        import contextlib

        return contextlib.nullcontext() if self.sim else self.stream

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> GPUCache:
        """A fresh cache; the engine's buffers are (re)sized for batch and max_len when these change."""
        from koifish_cuda.attention_decode import attention_scratch
        from koifish_cuda.quant import MAX_BATCH
        from koifish_cuda.rope import rope_tables
        from koifish_cuda.sampling import sample_scratch

        c = self.config
        max_len = int(max_len or c.n_ctx)
        if not 1 <= batch <= MAX_BATCH:
            raise KoifishError(f"the GPU engine decodes batches of 1 to {MAX_BATCH} sequences, got {batch}")
        if (batch, max_len) != (self.batch, self.max_len):
            xp, f = self.xp, np.float32
            C, F, hd, nh, nkv, V = c.hidden_size, c.intermediate_size, c.head_dim, c.n_head, c.n_kv_head, c.vocab_size
            self.graph = None
            self.kv = self.kv_scales = None  # free the old cache before the new one is made
            self.chunk = max(1, min(max_len, PREFILL_ROWS // batch))  # prompt tokens per sequence per pass
            R = batch * self.chunk
            Rs = min(R, MAX_BATCH)  # rows of the decode-kernel buffers
            with self._ctx():
                kv_shape = (c.n_layer, batch, nkv, max_len, hd)
                self.kv = (xp.zeros(kv_shape, self.cache_dtype), xp.zeros(kv_shape, self.cache_dtype))
                if self.cache_dtype == np.int8:  # a scale per head vector: 4 bytes beside its hd codes
                    self.kv_scales = (xp.zeros(kv_shape[:4], f), xp.zeros(kv_shape[:4], f))
                cos, sin = rope_tables(max_len, hd, c.rope_theta)
                self.cos, self.sin = self._put(cos), self._put(sin)
                self.x, self.xn, self.delta = (xp.zeros((R, C), f) for _ in range(3))
                self.qkv = xp.zeros((R, (nh + 2 * nkv) * hd), f)
                self.q, self.att = xp.zeros((R, nh * hd), f), xp.zeros((Rs, nh * hd), f)
                self.gu, self.h = xp.zeros((Rs, 2 * F), f), xp.zeros((Rs, F), f)
                kq = max(C, F, nh * hd)  # a batch-1 GEMV's x rounded to int8 once (quant_a8.quantize_x16)
                self.xq = (xp.zeros(kq // 4, np.uint32), xp.zeros(kq // 16, f), xp.zeros(kq // 16, np.int32))
                self.ids = xp.zeros(R, np.int32)
                self.hl = xp.zeros((batch, C), f)
                self.logits, self.zbuf = xp.zeros((batch, V), f), xp.zeros((batch, V), f)
                self.tok = xp.zeros(batch, np.int32)
                self.pos = xp.zeros(1, np.int32)
                self.rng = xp.zeros(2, np.int64)
                self.params = self._put(np.array([0, 0, 1, 0, 1], np.float32))  # greedy until set_sampling
                self.seen = xp.zeros((batch, V), np.uint8)
                self.samp = sample_scratch(xp, batch, V)
                splits = max(1, min(self.decode_splits, max_len // 64))
                self.dec_scratch = attention_scratch(xp, batch, nh, hd, splits)
                self.pre_scratch = attention_scratch(xp, Rs, nh, hd, PREFILL_SPLITS)
                # the bf16 prefill (chunks of more than MAX_BATCH rows)
                self.slab = xp.zeros(SLAB_BYTES // 4, f)  # float32 scores, or (viewed as uint16) bf16 weights
                self.band = _mlp_band(F, C, self.slab.size * 2)
                self.xb = xp.zeros(R * max(C, nh * hd), np.uint16)
                kg = max(C, nh * hd) if self.reordered else 1  # act-order inputs gathered: decode rows, prefill rows
                self.xg, self.xgb = xp.zeros(Rs * kg, f), xp.zeros(R * kg, np.uint16)
                int8 = self.cache_dtype == np.int8
                self.qh = xp.zeros(R * nh * hd, np.float16 if int8 else self.cache_dtype)
                # an int8 cache's keys and values of one layer, as float16 operands of the attention GEMMs
                self.kv16 = tuple(xp.zeros(kv_shape[1:], np.float16) for _ in range(2)) if int8 else None
                self.gub, self.hb = xp.zeros(R * 2 * self.band, np.uint16), xp.zeros(R * self.band, np.uint16)
            self.batch, self.max_len = batch, max_len
            self._eager_steps = 0
        self._cache = GPUCache(self, batch, max_len)
        return self._cache

    def _set(self, dst, values) -> None:
        values = np.asarray(values, dtype=dst.dtype).reshape(dst.shape)
        if self.sim:
            dst[...] = values
        else:
            dst.set(values, stream=self.stream)

    def _get(self, src) -> np.ndarray:
        return np.array(src) if self.sim else src.get(stream=self.stream)

    def recapture(self) -> None:
        """After changing a decode setting (attention_variant, fuse_rope, prefetch_mb, pdl, ...): the next
        decode step runs eagerly (compiling what is new) and captures a fresh graph."""
        self.graph, self._eager_steps = None, 0

    def sync(self) -> None:
        if not self.sim:
            self.stream.synchronize()

    def _kv_scales(self, l: int) -> dict:
        """Layer l's int8-cache scales as keyword arguments of qk_norm_rope and attention_decode ({} for float)."""
        return {} if self.kv_scales is None else dict(k_scale=self.kv_scales[0][l], v_scale=self.kv_scales[1][l])

    # ---- the math -----------------------------------------------------------------------------
    def _w4a8(self, lin: DeviceLinear, R: int) -> bool:
        """Whether lin's product over R rows is the W4A8 GEMV (quant_a8): batch 1, 4 bits, act_bits 8."""
        return R == 1 and lin.quantized and lin.bits == 4 and self.act_bits == 8

    def _takes_rounded(self, lin: DeviceLinear, R: int) -> bool:
        """Whether lin's GEMV over R rows reads its x rounded to int8 in self.xq, so that the kernel making
        x can round it too (add_rmsnorm_x16, swiglu_x16): the W4A8 GEMV with no gather first."""
        return self._w4a8(lin, R) and lin.perm is None

    def _xq(self, K: int):
        """The rounded-x triple's first K values (quant_a8.quantize_x16)."""
        return self.xq[0][:K // 4], self.xq[1][:K // 16], self.xq[2][:K // 16]

    def _apply(self, out, x, lin: DeviceLinear, rounded: bool = False) -> None:
        """out (M, N) = x (M, K) @ W.T for the decode step and short chunks (M <= MAX_BATCH), float32.
        rounded: x's producer also wrote it rounded into self.xq (see _takes_rounded)."""
        from koifish_cuda.quant import dequant_matvec

        if lin.perm is not None:
            x = self._gathered(x, lin, self.xg)
        if self._w4a8(lin, x.shape[0]):
            from koifish_cuda.quant_a8 import dequant_matvec4_a8, quantize_x16

            # x rounded once, not by each of the GEMV's blocks (H200, a Qwen3-32B token's GEMVs: 9.60 ->
            # 8.19 ms), by its producer where it can, else by a kernel of its own
            xq = self._xq(x.shape[1])
            if not rounded:
                quantize_x16(x, *xq, stream=self.ns)
            dequant_matvec4_a8(out, xq, lin.words, lin.scales, lin.zeros, lin.group_size, self.ns)
        elif lin.quantized:
            dequant_matvec(out, x, lin.words, lin.scales, lin.zeros, lin.bits, lin.group_size, self.ns)
        else:
            self.blas.matmul(out, x, lin.w)

    def _gathered(self, x, lin: DeviceLinear, buf):
        """x[:, lin.perm] in buf (a flat scratch of x's dtype): the input of an act-order matrix."""
        from koifish_cuda.gather import gather_columns

        R, K = x.shape
        out = buf[:R * K].reshape(R, K)
        gather_columns(out, x, lin.perm, self.ns)
        return out

    # ---- the bf16 prefill -----------------------------------------------------------------------
    def _weight_bf16(self, dst, lin: DeviceLinear, n0: int, k0: int, then: tuple[int, int] | None = None) -> None:
        """dst (n, kc) uint16 = bf16 of W[n0:n0+n, k0:k0+kc]; then = (split, n1): rows from split on are
        W's rows n1.. (see koifish_cuda.quant.dequantize_bf16)."""
        from koifish_cuda.bf16 import to_bf16
        from koifish_cuda.quant import dequantize_bf16

        n, kc = dst.shape
        if lin.quantized:
            dequantize_bf16(dst, lin.words, lin.scales, lin.zeros, lin.bits, lin.group_size, n0, k0, self.ns, then)
            return
        split, n1 = then if then is not None else (n, 0)
        to_bf16(dst[:split], lin.w[n0:n0 + split, k0:k0 + kc], self.ns)
        if split < n:
            to_bf16(dst[split:], lin.w[n1:n1 + n - split, k0:k0 + kc], self.ns)

    def _bf16_rows(self, x):
        """x (R, K) float32 as bf16 in the xb buffer."""
        from koifish_cuda.bf16 import to_bf16

        R, K = x.shape
        xb = self.xb[:R * K].reshape(R, K)
        to_bf16(xb, x, self.ns)
        return xb

    def _linear_bf16(self, out, xb, lin: DeviceLinear) -> None:
        """out (R, N) float32 = xb (R, K) bf16 @ W.T, W through the slab in bands of rows."""
        if lin.perm is not None:
            xb = self._gathered(xb, lin, self.xgb)
        slab = self.slab.view(np.uint16)
        rows = max(1, min(lin.N, slab.size // lin.K))
        for n0 in range(0, lin.N, rows):
            n = min(rows, lin.N - n0)
            w = slab[:n * lin.K].reshape(n, lin.K)
            self._weight_bf16(w, lin, n0, 0)
            self.blas.matmul(out[:, n0:n0 + n], xb, w)

    def _mlp_bf16(self, delta, xb, gu: DeviceLinear, down: DeviceLinear) -> None:
        """delta (R, C) = down(SwiGLU(gate|up(xb))) band by band of the hidden units."""
        from koifish_cuda.swiglu import swiglu_bf16

        R, C = xb.shape
        F = down.K
        assert down.perm is None, "an act-order down projection is absorbed into gate|up (_absorb_down_perm)"
        if gu.perm is not None:
            xb = self._gathered(xb, gu, self.xgb)
        slab = self.slab.view(np.uint16)
        for f0 in range(0, F, self.band):
            fb = min(self.band, F - f0)
            w = slab[:2 * fb * C].reshape(2 * fb, C)  # gate rows f0:f0+fb, then up rows F+f0:F+f0+fb
            self._weight_bf16(w, gu, f0, 0, then=(fb, F + f0))
            g = self.gub[:R * 2 * fb].reshape(R, 2 * fb)
            self.blas.matmul(g, xb, w)
            h = self.hb[:R * fb].reshape(R, fb)
            swiglu_bf16(h, g, self.ns)
            wd = slab[2 * fb * C:3 * fb * C].reshape(C, fb)  # down's columns f0:f0+fb
            self._weight_bf16(wd, down, 0, f0)
            self.blas.matmul(delta, h, wd, beta=0.0 if f0 == 0 else 1.0)

    def _prefill_layers(self, R: int, T: int, past: int) -> None:
        """_layers for a chunk of R = B*T > MAX_BATCH rows at positions past..past+T-1, on bf16 GEMMs."""
        from koifish_cuda.attention_prefill import attention_prefill, kv_to_f16
        from koifish_cuda.rmsnorm import add_rmsnorm
        from koifish_cuda.rope import qk_norm_rope

        c, s = self.config, self.ns
        eps, nh, hd = c.rms_norm_eps, c.n_head, c.head_dim
        x, xn, delta, qkv = self.x[:R], self.xn[:R], self.delta[:R], self.qkv[:R]
        qh = self.qh[:R * nh * hd].reshape(R * nh, hd)
        o = self.q.reshape(-1).view(qh.dtype)[:R * nh * hd].reshape(R * nh, hd)  # decode's q buffer, unused here
        kc, vc = self.kv
        xb = self.xb[:R * c.hidden_size].reshape(R, c.hidden_size)  # the normed rows as bf16 GEMM operands
        for l, L in enumerate(self.layers):
            add_rmsnorm(xb, x, None if l == 0 else delta, L["ln1"], eps, s)
            self._linear_bf16(qkv, xb, L["qkv"])
            sc = self._kv_scales(l)
            qk_norm_rope(qh, kc[l], vc[l], qkv, L["qn"], L["kn"], self.cos, self.sin, self.pos, T, nh, eps, s,
                         regroup=True, **sc)
            k, v = kc[l], vc[l]
            if sc:  # int8 cache: this layer's keys and values so far as float16
                k, v = self.kv16
                kv_to_f16(k, kc[l], sc["k_scale"], past + T, s)
                kv_to_f16(v, vc[l], sc["v_scale"], past + T, s)
            att = self.xb[:R * nh * hd].reshape(R, nh * hd)
            attention_prefill(att, qh, k, v, past, T, self.blas, o, self.slab, s)
            self._linear_bf16(delta, att, L["o"])
            add_rmsnorm(xb, x, delta, L["ln2"], eps, s)
            self._mlp_bf16(delta, xb, L["gu"], L["down"])
        add_rmsnorm(xn, x, delta, self.norm, eps, s)

    def _embed(self, out, ids) -> None:
        from koifish_cuda.embedding_rows import embed_rows

        e = self.embed
        if e.quantized:
            embed_rows(out, ids, quant=(e.words, e.scales, e.zeros, e.bits, e.group_size), stream=self.ns)
        else:
            embed_rows(out, ids, table=e.w, stream=self.ns)

    def _layers(self, R: int, T: int, scratch, head: DeviceLinear | None = None) -> bool:
        """The blocks over rows x[:R] (R = B*T, positions pos[0] + t); leaves the final normed states in xn[:R].
        head: the matrix that reads them next; True when they are also rounded for it in self.xq."""
        from koifish_cuda.attention_decode import attention_decode, fuses_rope
        from koifish_cuda.prefetch import weight_lines
        from koifish_cuda.rmsnorm import X16_MAX, add_rmsnorm, add_rmsnorm_x16
        from koifish_cuda.rope import qk_norm_rope
        from koifish_cuda.swiglu import swiglu, swiglu_x16

        c, s = self.config, self.ns
        eps = c.rms_norm_eps
        x, xn, delta = self.x[:R], self.xn[:R], self.delta[:R]
        qkv, q, att, gu, h = self.qkv[:R], self.q[:R], self.att[:R], self.gu[:R], self.h[:R]
        kc, vc = self.kv

        def ahead(lin):  # the first prefetch_mb MB of lin's packed weights, for the kernel before its GEMV
            if not self.prefetch_mb or lin is None or not self._w4a8(lin, R) or not lin.words.flags.c_contiguous:
                return None
            return weight_lines(lin.words, int(self.prefetch_mb * 2**20))

        def norm(w, lin, residual=True):  # rounds for lin's GEMV too, when it reads x so; True if it did
            rounded = lin is not None and self._takes_rounded(lin, R) and c.hidden_size <= X16_MAX
            if rounded:
                add_rmsnorm_x16(xn, self._xq(c.hidden_size), x, delta if residual else None, w, eps, s,
                                prefetch=ahead(lin))
            else:
                add_rmsnorm(xn, x, delta if residual else None, w, eps, s)
            return rounded

        for l, L in enumerate(self.layers):
            self._apply(qkv, xn, L["qkv"], rounded=norm(L["ln1"], L["qkv"], residual=l > 0))
            sc = self._kv_scales(l)  # int8 cache: its scales
            fused = self.fuse_rope and not sc and fuses_rope(self.attention_variant, qkv, kc[l], vc[l], c.n_head, T)
            if not fused:  # else the attention kernel norms and rotates q and k itself
                qk_norm_rope(q, kc[l], vc[l], qkv, L["qn"], L["kn"], self.cos, self.sin, self.pos, T, c.n_head, eps, s,
                             **sc)
            ro = self._takes_rounded(L["o"], R) and c.head_dim % 16 == 0
            attention_decode(att, qkv if fused else q, kc[l], vc[l], self.pos, T, scratch, s,
                             variant=self.attention_variant, xq=self._xq(c.n_head * c.head_dim) if ro else None,
                             rope=(L["qn"], L["kn"], self.cos, self.sin, eps) if fused else None,
                             prefetch=ahead(L["o"]), **sc)
            self._apply(delta, att, L["o"], rounded=ro)
            self._apply(gu, xn, L["gu"], rounded=norm(L["ln2"], L["gu"]))
            if self._takes_rounded(L["down"], R):
                swiglu_x16(h, self._xq(c.intermediate_size), gu, s, prefetch=ahead(L["down"]))
                self._apply(delta, h, L["down"], rounded=True)
            else:
                swiglu(h, gu, s)
                self._apply(delta, h, L["down"])
        return norm(self.norm, head)

    def _decode_body(self) -> None:
        from koifish_cuda.sampling import advance, sample

        B = self.batch
        self._embed(self.x[:B], self.tok)
        rounded = self._layers(B, 1, self.dec_scratch, head=self.head)
        self._apply(self.logits, self.xn[:B], self.head, rounded=rounded)
        sample(self.tok, self.seen, self.zbuf, self.logits, self.params, self.rng, self.samp, stream=self.ns)
        advance(self.rng, self.pos, 1, stream=self.ns)

    def _decode(self) -> None:
        """One step: the eager body the first time (kernels compile), the captured graph after."""
        from koifish_cuda.pdl import programmatic

        if self.sim or self._eager_steps < 1:
            with self._ctx(), programmatic(self.pdl):
                self._decode_body()
            self._eager_steps += 1
            return
        if self.graph is None:
            with self.stream, programmatic(self.pdl):
                self.stream.begin_capture()
                try:
                    self._decode_body()
                finally:
                    graph = self.stream.end_capture()
            self.graph = graph
        self.graph.launch(self.stream)

    def _prefill(self, idx: np.ndarray, past: int, all_logits: bool):
        """Runs idx (B, T) from position past; logits of each sequence's last token land in self.logits.
        With all_logits, returns every position's logits (B, T, V) on the host (tests)."""
        B, T = idx.shape
        V = self.config.vocab_size
        full = np.zeros((B, T, V), np.float32) if all_logits else None
        with self._ctx():
            for c0 in range(0, T, self.chunk):
                Tc = min(self.chunk, T - c0)
                R = B * Tc
                self._set(self.ids[:R], idx[:, c0:c0 + Tc].reshape(-1))
                self._set(self.pos, [past + c0])
                self._embed(self.x[:R], self.ids[:R])
                short = R <= self.gemv_rows
                if short:
                    self._layers(R, Tc, self.pre_scratch)
                else:
                    self._prefill_layers(R, Tc, past + c0)
                if all_logits:
                    out = self.xp.zeros((R, V), np.float32)
                    if short:
                        self._apply(out, self.xn[:R], self.head)
                    else:
                        self._linear_bf16(out, self._bf16_rows(self.xn[:R]), self.head)
                    full[:, c0:c0 + Tc] = self._get(out).reshape(B, Tc, V)
            self.hl[...] = self.xn[:R].reshape(B, Tc, -1)[:, Tc - 1]
            self._apply(self.logits, self.hl, self.head)
        return full

    # ---- the decoder protocol (logits to the host) ----------------------------------------------
    def forward(self, idx, targets=None, cache: GPUCache | None = None, last_only: bool = False):
        """(logits (B, T, V) or (B, 1, V) as NumPy float32, None), like the NumPy Qwen3 (no loss on the GPU)."""
        idx = np.asarray(idx)
        B, T = idx.shape
        if targets is not None:
            raise KoifishError("the GPU engine computes logits only; use the CPU path for the loss")
        if cache is None:
            cache = self.new_cache(B, T)
        self._check(cache, B, T)
        past = cache.length
        if T == 1:
            self._set(self.tok, idx[:, 0])
            self._set(self.pos, [past])
            self._decode()
            full = None
        else:
            full = self._prefill(idx, past, all_logits=not last_only)
        cache.length = past + T
        if full is not None:
            return full, None
        return self._get(self.logits)[:, None, :], None

    def _check(self, cache: GPUCache, B: int, T: int) -> None:
        if cache is not self._cache or B != self.batch:
            raise KoifishError("this KV cache is not the engine's current one (one cache per GPU engine)")
        if cache.length + T > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} positions; {cache.length} used, {T} more asked")

    # ---- sampling on the device -----------------------------------------------------------------
    def set_sampling(self, params: SamplingParams, seed: int | None = None) -> None:
        """Sampling parameters and the seed of the draws (None: a fresh one)."""
        from koifish_cuda.sampling import params_array

        params.check()
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**62))
        self._set(self.params, params_array(params))
        self._set(self.rng, [seed, 0])

    def prefill_sample(self, idx, cache: GPUCache, context=None) -> np.ndarray:
        """Prefill idx (B, T) and draw each sequence's next token (B,); context (per row: the ids the
        repetition penalty looks at, default the cached ids + idx) flags `seen`."""
        from koifish_cuda.sampling import advance, sample

        idx = np.asarray(idx)
        B, T = idx.shape
        self._check(cache, B, T)
        seen = np.zeros((B, self.config.vocab_size), np.uint8)
        for b in range(B):
            seen[b, np.asarray(idx[b] if context is None else context[b], np.int64)] = 1
        self._set(self.seen, seen)
        self._prefill(idx, cache.length, all_logits=False)
        cache.length += T
        with self._ctx():
            sample(self.tok, self.seen, self.zbuf, self.logits, self.params, self.rng, self.samp, stream=self.ns)
            advance(self.rng, self.pos, 0, stream=self.ns)
        self._set(self.pos, [cache.length])
        return self._get(self.tok)

    def seek(self, cache: GPUCache, length: int) -> None:
        """The next decode step takes position `length` (the keys at and after it are overwritten): a step
        timed at a chosen context without feeding the cache that far (the benches)."""
        cache.length = length
        self._set(self.pos, [length])

    def decode_sample(self, cache: GPUCache) -> np.ndarray:
        """Feed the tokens last drawn and draw the next ones (B,): one graph replay, 4 bytes a row back."""
        self._check(cache, self.batch, 1)
        self._decode()
        cache.length += 1
        return self._get(self.tok)
