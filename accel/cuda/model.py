"""backend="cuda": the Llama / Open-Llama decoder composed from accel.cuda.kernels and an array module `xp`.

Everything here is written against `xp` (CuPy on a GPU, NumPy in tests) and the kernel launchers, which take either
(CuPy arrays on a device; NumPy arrays under NUMBA_ENABLE_CUDASIM=1). So tests/test_cuda_model.py runs this exact
code on the golden checkpoints without a GPU, and tests/test_cuda_device.py runs it on one.

  weights     uploaded once (`upload_llama`): q, k, v stacked into one matrix and gate, up into one (as accel.model),
              each matrix fp32, fp16 or int8 (Q8_0 blocks: int8 values + float32 scales) on the device;
  products    xp.matmul (cuBLAS on CuPy) on float32 (fp16 widened per call; int8 dequantised on the device for a
              prompt); one row per sequence with int8 weights (decode): kernels.linear_q8, dequantising on the fly;
  kernels     rms_norm, layer_norm (Open-Llama's embedding norm), rope_ (q and k heads of the fused qkv row, in place),
              attention_decode (one new position: online softmax over the device KV cache, GQA by index),
              gated_act (act(gate) * up);
  prompts     attention over several new positions is xp's: scores matmul, mask, clamp, softmax (refimpl's lines);
  cache       one device array [L, 2, B, Hkv, C, Dh] allocated for the whole generation (`DeviceCache`).
The RoPE tables are refimpl's (refimpl.llama.rotary_tables, every rope_type), computed on the host per call
(a [B, S, Dh] table) and copied over. Sampling, when generating, is accel.sampling on the host logits row.
Not covered yet: OPT (ConfigError), pretraining_tp > 1 vocab chunking, output_attentions / hidden states.
"""
from __future__ import annotations

import numpy as np

from refimpl import ConfigError, InputError
from refimpl import llama as ref_llama
from refimpl.ops import causal_mask

from . import kernels as K

F32 = np.float32
FORMATS = ("fp32", "fp16", "int8")
SMALL_M = 4  # rows up to which int8 products use the on-the-fly matvec kernel


class DeviceWeight:
    """A matrix [O, D] on the device: fp32 / fp16 (`data`) or int8 (`data` int8 + `scales` float32 [O, D/32])."""

    def __init__(self, w, fmt, xp):
        if fmt not in FORMATS:
            raise ConfigError(f"weights={fmt!r}: backend='cuda' stores {', '.join(FORMATS)}")
        self.format, self.xp, self.shape = fmt, xp, tuple(w.shape)
        self.scales = None
        if fmt == "int8":
            from accel.quant import quantize_q8_0

            q, d = quantize_q8_0(w)
            self.data, self.scales = xp.asarray(q), xp.asarray(d)
        elif fmt == "fp16":
            from accel.quant import to_fp16_bits

            self.data = xp.asarray(to_fp16_bits(w).view(np.float16))
        else:
            self.data = xp.asarray(np.array(w, dtype=F32, order="C", copy=True))  # writable (the simulator copies back)

    @property
    def nbytes(self):
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def dense(self):
        """float32 [O, D] (the stored array for fp32, else a new dequantised one)."""
        xp = self.xp
        if self.format == "fp32":
            return self.data
        if self.format == "fp16":
            return self.data.astype(F32)
        d = xp.repeat(self.scales, K.QBLOCK, axis=1)[:, :self.shape[1]]
        return self.data.astype(F32) * d

    def rows(self, ids):
        """float32 rows [n, D] (embedding lookup)."""
        if self.format == "fp32":
            return self.data[ids]
        if self.format == "fp16":
            return self.data[ids].astype(F32)
        d = self.xp.repeat(self.scales[ids], K.QBLOCK, axis=1)[:, :self.shape[1]]
        return self.data[ids].astype(F32) * d


def linear(x, w, bias=None, out=None, add=False):
    """x [M, D] @ W^T + b; with add, accumulated into out (the residual).  twin: refimpl.ops.linear"""
    xp = w.xp
    if w.format == "int8" and x.shape[0] <= SMALL_M:
        if out is None:
            out = xp.empty((x.shape[0], w.shape[0]), F32)
        b = xp.zeros(0, F32) if bias is None else bias
        return K.linear_q8(xp.ascontiguousarray(x), w.data, w.scales, b, out, K.ADD if add else K.STORE)
    y = x @ w.dense().T
    if bias is not None:
        y += bias
    if add:
        out += y
        return out
    return y


class DeviceCache:
    """The KV cache on the device: data [L, 2, B, Hkv, C, Dh], `length` positions written."""

    def __init__(self, xp, layers, batch, kv_heads, capacity, head_dim):
        self.data = xp.zeros((layers, 2, batch, kv_heads, capacity, head_dim), F32)
        self.length = 0

    @property
    def capacity(self):
        return self.data.shape[4]


def upload_llama(params, cfg, fmt, xp):
    """refimpl.llama's host parameter tree -> the device tree (stacked qkv and gate_up, matrices as DeviceWeight)."""
    if cfg.pretraining_tp > 1:
        raise ConfigError("backend='cuda' does not implement pretraining_tp > 1 (use backend='numba')")
    act = cfg.hidden_act
    if act not in K.ACT_CODES:
        raise ConfigError(f"hidden_act={act!r}: the CUDA kernels implement {', '.join(K.ACT_CODES)}")
    vec = lambda a: xp.asarray(np.array(a, dtype=F32, order="C", copy=True))  # noqa: E731  (writable, see above)
    out = {"embed_tokens": DeviceWeight(params["embed_tokens"], fmt, xp), "norm": vec(params["norm"])}
    if cfg.use_stable_embedding:
        out["embed_layer_norm"] = vec(params["embed_layer_norm"])
        out["embed_layer_norm_bias"] = vec(params["embed_layer_norm_bias"])
    tied = cfg.shared_input_output_embedding or params.get("lm_head") is None \
        or params["lm_head"] is params["embed_tokens"]
    out["lm_head"] = out["embed_tokens"] if tied else DeviceWeight(params["lm_head"], fmt, xp)
    layers = []
    for layer in params["layers"]:
        d = {"input_layernorm": vec(layer["input_layernorm"]),
             "post_attention_layernorm": vec(layer["post_attention_layernorm"]),
             "qkv": DeviceWeight(np.concatenate([layer["q_proj"], layer["k_proj"], layer["v_proj"]]), fmt, xp),
             "o_proj": DeviceWeight(layer["o_proj"], fmt, xp),
             "gate_up": DeviceWeight(np.concatenate([layer["gate_proj"], layer["up_proj"]]), fmt, xp),
             "down_proj": DeviceWeight(layer["down_proj"], fmt, xp)}
        if "q_proj_bias" in layer:
            d["qkv_bias"] = vec(np.concatenate([layer["q_proj_bias"], layer["k_proj_bias"], layer["v_proj_bias"]]))
            d["o_proj_bias"] = vec(layer["o_proj_bias"])
        if "gate_proj_bias" in layer:
            d["gate_up_bias"] = vec(np.concatenate([layer["gate_proj_bias"], layer["up_proj_bias"]]))
            d["down_proj_bias"] = vec(layer["down_proj_bias"])
        layers.append(d)
    out["layers"] = layers
    return out


def general_attention(q, keys, values, mask, divisor, clamp, xp):
    """refimpl.llama.attention's lines for several new positions, in xp: q [B, H, S, Dh], keys/values
    [B, Hkv, K, Dh] (GQA by a reshape: the R query heads of a kv head side by side, no repeat_kv copy)."""
    B, H, S, Dh = q.shape
    Hkv, Kn = keys.shape[1], keys.shape[2]
    R = H // Hkv
    scores = (q.reshape(B, Hkv, R * S, Dh) @ keys.transpose(0, 1, 3, 2)).reshape(B, H, S, Kn)
    scores = scores / divisor + mask
    if clamp:
        scores = xp.maximum(scores, np.finfo(F32).min)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    context = probs.reshape(B, Hkv, R * S, Kn) @ values
    return context.reshape(B, H, S, Dh).transpose(0, 2, 1, 3).reshape(B * S, H * Dh)


def llama_forward(dparams, cfg, rope_state, ids, cache, xp, attention_mask=None):
    """One forward of new tokens ids [B, S] (host ints) after `cache.length` cached positions.

    Returns (logits [B, S, V] on the device, new RoPE state); the cache is appended in place.
    Step order and twins: refimpl.llama.llama_model / decoder_layer / attention / mlp.
    """
    ids = np.asarray(ids, dtype=np.int64)
    B, S = ids.shape
    L, H, Hkv, Dh, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
        cfg.hidden_size
    T = cache.length
    if T + S > cache.capacity:
        raise InputError(f"the device cache holds {cache.capacity} positions; {T} + {S} do not fit")
    x = dparams["embed_tokens"].rows(xp.asarray(ids.reshape(-1)))  # [M, D]
    x = xp.ascontiguousarray(x, dtype=F32)
    if cfg.use_stable_embedding:
        K.layer_norm(x.copy(), dparams["embed_layer_norm"], dparams["embed_layer_norm_bias"], 1e-5, x)
    mask2d = np.ones((B, T + S), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    position_ids = np.arange(T, T + S)[None]
    cos, sin, rope_state = ref_llama.rotary_tables(cfg, rope_state, position_ids, T + S, F32)
    cos, sin = xp.asarray(np.ascontiguousarray(cos, F32)), xp.asarray(np.ascontiguousarray(sin, F32))
    decode = S == 1
    if decode:
        bias = np.zeros((B, 0), F32) if np.all(mask2d == 1) else \
            np.where(mask2d == 0, np.finfo(F32).min, F32(0)).astype(F32)
        bias = xp.asarray(bias)
    else:
        mask = xp.asarray(causal_mask(mask2d, T, F32))  # [B, 1, S, K]
    divisor = F32(np.sqrt(F32(Dh)))
    clamp = cfg.family == "open-llama"
    eps = float(cfg.rms_norm_eps)
    act = K.ACT_CODES[cfg.hidden_act]
    h = xp.empty((B * S, D), F32)
    gated = xp.empty((B * S, cfg.intermediate_size), F32)
    for i, layer in enumerate(dparams["layers"]):
        K.rms_norm(x, layer["input_layernorm"], eps, h)
        qkv = linear(h, layer["qkv"], layer.get("qkv_bias"))  # [M, (H + 2 Hkv) Dh]
        qkv4 = xp.ascontiguousarray(qkv).reshape(B, S, H + 2 * Hkv, Dh)
        K.rope_(qkv4, H + Hkv, cos, sin)  # q and k heads, in place
        k_cache, v_cache = cache.data[i, 0], cache.data[i, 1]  # [B, Hkv, C, Dh]
        k_cache[:, :, T:T + S] = qkv4[:, :, H:H + Hkv].transpose(0, 2, 1, 3)
        v_cache[:, :, T:T + S] = qkv4[:, :, H + Hkv:].transpose(0, 2, 1, 3)
        if decode:
            context = xp.empty((B, H, Dh), F32)
            K.attention_decode(xp.ascontiguousarray(qkv4[:, 0, :H]), k_cache, v_cache, T + 1, bias, divisor, context)
            context = context.reshape(B, H * Dh)
        else:
            q = qkv4[:, :, :H].transpose(0, 2, 1, 3)
            context = general_attention(q, k_cache[:, :, :T + S], v_cache[:, :, :T + S], mask, divisor, clamp, xp)
        linear(context, layer["o_proj"], layer.get("o_proj_bias"), out=x, add=True)  # x += o(context)
        K.rms_norm(x, layer["post_attention_layernorm"], eps, h)
        y = linear(h, layer["gate_up"], layer.get("gate_up_bias"))  # [M, 2F]
        K.gated_act(xp.ascontiguousarray(y), act, gated)
        linear(gated, layer["down_proj"], layer.get("down_proj_bias"), out=x, add=True)  # x += down(...)
    cache.length = T + S
    K.rms_norm(x.copy(), dparams["norm"], eps, x)
    logits = linear(x, dparams["lm_head"])
    return logits.reshape(B, S, -1), rope_state


class CudaLlama:
    """A Llama / Open-Llama causal LM on the device: `model(ids, cache)` -> logits [B, S, V] (host float32),
    `generate(ids, max_new_tokens)` greedy (or sampled with top_k / top_p / seed, accel.sampling on the host)."""

    def __init__(self, reference, fmt, xp):
        self.config = reference.config
        self.rope_state = reference.rope_state
        self.generation_config = getattr(reference, "generation_config", None)
        self.xp, self.weights = xp, fmt
        self.params = upload_llama(reference.params, self.config, fmt, xp)

    def new_cache(self, batch, capacity):
        c = self.config
        return DeviceCache(self.xp, c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim)

    def logits(self, ids, cache, attention_mask=None):
        """Device logits [B, S, V] for new tokens ids after the cache (appended in place)."""
        out, self.rope_state = llama_forward(self.params, self.config, self.rope_state, ids, cache, self.xp,
                                             attention_mask)
        return out

    def __call__(self, ids, cache=None, attention_mask=None):
        ids = np.asarray(ids, dtype=np.int64)
        if cache is None:
            cache = self.new_cache(ids.shape[0], ids.shape[1])
        return to_host(self.logits(ids, cache, attention_mask))

    def generate(self, input_ids, max_new_tokens=16, top_k=0, top_p=1.0, seed=None, do_sample=False):
        ids = np.asarray(input_ids, dtype=np.int64)
        cache = self.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        rng = np.random.default_rng(seed)
        step = ids
        for _ in range(max_new_tokens):
            last = to_host(self.logits(step, cache)[:, -1])
            if do_sample:
                from accel.sampling import sample

                nxt = sample(last, top_k, top_p, rng)
            else:
                nxt = np.argmax(last, axis=-1)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            step = nxt[:, None]
        return ids

    def weight_bytes(self):
        seen, total = set(), 0
        for node in [self.params["embed_tokens"], self.params["lm_head"]] + \
                [w for layer in self.params["layers"] for w in layer.values()]:
            if id(node) not in seen:
                seen.add(id(node))
                total += node.nbytes
        return total


def to_host(a):
    """A device (CuPy) array -> NumPy; NumPy arrays pass through."""
    get = getattr(a, "get", None)
    return np.asarray(get() if callable(get) else a)


def load_cuda(path, dtype, weights, cache_dir=None):
    """accel.load(backend="cuda"): refimpl loads and checks the checkpoint, its weights are uploaded once."""
    import cupy

    import refimpl

    if np.dtype(dtype) != np.float32:
        raise ConfigError(f"dtype={np.dtype(dtype).name}: backend='cuda' computes in float32")
    if weights not in FORMATS:
        raise ConfigError(f"weights={weights!r}: backend='cuda' stores {', '.join(FORMATS)}")
    reference = refimpl.load(path, dtype=np.float32)
    if reference.config.family == "opt" or reference.head != "causal_lm":
        raise ConfigError(f"backend='cuda' runs Llama / Open-Llama causal LMs so far, not {type(reference).__name__}"
                          " (use backend='numba')")
    return CudaLlama(reference, weights, cupy)
