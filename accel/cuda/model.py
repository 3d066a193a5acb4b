"""backend="cuda": refimpl's classes with the decoder stack composed from accel.cuda.kernels and an array module `xp`.

As accel/model.py does for the numba backend, each class here subclasses the refimpl class of the same name, so its
call signature, argument checks, heads, losses and ModelOutput are refimpl's own code; `_decoder` (the stack), the
cache and `_last_logits` are replaced, and generate's three hooks come from accel.generate (refimpl's loop runs).
The functions before the classes are written against `xp` (CuPy on a GPU, NumPy in tests) and the kernel launchers,
which take either (CuPy arrays on a device; NumPy arrays under NUMBA_ENABLE_CUDASIM=1). So tests/test_cuda_model.py
runs this exact code on the golden checkpoints without a GPU (`build(path, weights, numpy)`), and
tests/test_cuda_device.py runs it on one (`refimpl.load(path, backend="cuda")`).

  weights     uploaded once (`upload_llama`, `upload_opt`): q, k, v stacked into one matrix and gate, up into one,
              each a DeviceWeight (fp32, fp16, or int8 as Q8_0 blocks: int8 values + float32 scales); norms, biases
              and OPT's position table float32 on the device; the small heads (score, qa_outputs) float32 on the
              host, where refimpl's head code runs on the host final hidden state;
  products    `linear`: xp.matmul (cuBLAS on CuPy) in float32; fp16 weights multiply float16 activations on CuPy
              (float32 accumulation, see `product`), widened exactly on NumPy; int8 dequantised on the device for
              a prompt and read by kernels.linear_q8 (dequantising on the fly) for a few rows (decode);
  kernels     rms_norm, layer_norm (OPT, Open-Llama's embedding norm), rope_ (q and k heads of the fused qkv row,
              in place), attention_decode (one new position: online softmax over the device cache, GQA by index),
              gated_act (Llama's act(gate) * up), activation (OPT's act(fc1));
  prompts     attention over several new positions (or when attention maps / OPT's head_mask are asked for) is
              xp's: scores matmul, mask, clamp, softmax (refimpl's lines);
  cache       past_key_values is a DeviceKVCache: L (key, value) pairs, views of one device buffer
              [L, 2, B, Hkv, C, Dh] written in place (as accel.kv_cache.KVCache on the host);
  outputs     host NumPy float32 (`to_host`): logits, hidden states, attention maps; generate brings only the last
              position's logits (computed on the device) to the host for the processors and the sampler.
RoPE tables are refimpl's (refimpl.llama.rotary_tables, every rope_type), computed on the host per call and copied
over. Shapes: B batch, S new tokens, M = B*S rows, T cached, K = T + S keys, D hidden, E OPT's word_embed_proj_dim,
H heads, Hkv kv heads, NH = H + 2 Hkv, Dh head dim, F intermediate, V vocab, C cache capacity.
"""
from __future__ import annotations

import numpy as np

from refimpl import ConfigError, InputError
from refimpl import llama as ref_llama
from refimpl import opt as ref_opt
from refimpl.inputs import (attention_mask_2d, head_mask_2d, learned_positions, past_length, position_ids_2d,
                            token_inputs)
from refimpl.ops import causal_mask, mask_min
from refimpl.outputs import ModelOutput
from refimpl.trace import NO_TRACE

from . import kernels as K
from ..generate import GenerationHooks

F32 = np.float32
F32_MIN = mask_min(F32)
FORMATS = ("fp32", "fp16", "int8")
SMALL_M = 4  # rows up to which int8 products use the on-the-fly matvec kernel


def to_host(a):
    """A device (CuPy) array -> NumPy; NumPy arrays pass through."""
    get = getattr(a, "get", None)
    return np.asarray(get() if callable(get) else a)


def _upload(xp, a):
    """A host array -> a new float32 C-contiguous device array (writable: the simulator copies kernel args back)."""
    return xp.asarray(np.array(a, dtype=F32, order="C", copy=True))


def check_format(weights):
    if weights not in FORMATS:
        raise ConfigError(f"weights={weights!r}: backend='cuda' stores {', '.join(FORMATS)} (bf16 is the numba "
                          "backend's)")


# --- weights and products -----------------------------------------------------------------------------------------

class DeviceWeight:
    """A matrix [O, D] on the device: fp32 / fp16 (`data`) or int8 (`data` int8 + `scales` float32 [O, D/32]).

    Like accel.quant.Weight it can stand where refimpl's head code expects a matrix: `x @ w.T` (refimpl.ops.linear)
    runs `linear` on the device, taking and returning host arrays, and `w[a:b]` is a band of rows (pretraining_tp's
    vocab chunks).
    """

    __array_ufunc__ = None  # `x @ w.T` defers to w.T.__rmatmul__ instead of converting w to an array
    dtype = np.dtype(F32)
    ndim = 2

    def __init__(self, fmt, xp, data, scales=None):
        check_format(fmt)
        self.format, self.xp, self.data, self.scales = fmt, xp, data, scales
        self.shape = tuple(data.shape)

    @classmethod
    def upload(cls, w, fmt, xp, name="weight"):
        """float32 [O, D] on the host -> DeviceWeight in `fmt` (converted on the host, copied over once)."""
        check_format(fmt)
        if fmt == "int8":
            from accel.quant import quantize_q8_0

            q, d = quantize_q8_0(w)
            return cls(fmt, xp, xp.asarray(q), xp.asarray(d))
        if fmt == "fp16":
            from accel.quant import to_fp16_bits

            return cls(fmt, xp, xp.asarray(to_fp16_bits(w, name).view(np.float16)))
        return cls(fmt, xp, _upload(xp, w))

    @property
    def nbytes(self):
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)

    @property
    def T(self):
        return _DeviceTransposed(self)

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("a DeviceWeight is indexed by a slice of rows only (use rows() for an embedding)")
        return DeviceWeight(self.format, self.xp, self.data[index], None if self.scales is None else self.scales[index])

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
        """float32 rows [n, D] for device integer ids [n] (the embedding lookup)."""
        if self.format == "fp32":
            return self.data[ids]
        if self.format == "fp16":
            return self.data[ids].astype(F32)
        d = self.xp.repeat(self.scales[ids], K.QBLOCK, axis=1)[:, :self.shape[1]]
        return self.data[ids].astype(F32) * d

    def __repr__(self):
        return f"DeviceWeight({self.format}, {list(self.shape)}, {self.nbytes / 1e6:.1f} MB)"


class _DeviceTransposed:
    """w.T of a DeviceWeight: only `x @ w.T` is defined on it (refimpl.ops.linear's product, on the device)."""

    __array_ufunc__ = None

    def __init__(self, weight):
        self.weight = weight

    def astype(self, dtype, copy=True):
        if np.dtype(dtype) != F32:
            raise TypeError(f"backend='cuda' computes in float32, not {np.dtype(dtype).name}")
        return self

    def __rmatmul__(self, x):
        """x [..., D] -> [..., O]; host in, host out (refimpl's heads), device in, device out."""
        w = self.weight
        host = isinstance(x, np.ndarray)
        x2 = w.xp.asarray(np.ascontiguousarray(x, dtype=F32) if host else x).reshape(-1, x.shape[-1])
        y = linear(x2, w).reshape(*x.shape[:-1], w.shape[0])
        return to_host(y) if host else y


def product(x, w):
    """x [M, D] @ W^T in float32 for a DeviceWeight W (fp32 or fp16).  twin: refimpl.ops.linear without the bias

    fp16 on CuPy: float16 x float16 -> cuBLAS gemmEx with CUBLAS_COMPUTE_32F (float32 accumulation), which is what
    CuPy picks for float16 under its default compute type (cupy/_core/_routines_linalg.pyx, tensordot_core_v11);
    the weight is never widened, the activations are rounded to float16 (relative error <= 2^-11 each) and so is
    the product (<= 2^-11 of |y|, overflowing past 65504), then widened to float32. The bound this gives is stated
    and checked in tests/test_cuda_device.py. On NumPy (the simulator tests) the weight is widened exactly, so those
    tests hold the composition to float32 accuracy.
    """
    xp = w.xp
    if w.format == "fp16" and xp is not np:
        return (x.astype(xp.float16) @ w.data.T).astype(F32)
    return x @ w.dense().T


def linear(x, w, bias=None, out=None, add=False):
    """x [M, D] @ W^T + b; with add, accumulated into out (the residual).  twin: refimpl.ops.linear"""
    xp = w.xp
    if w.format == "int8" and x.shape[0] <= SMALL_M:
        if out is None:
            out = xp.empty((x.shape[0], w.shape[0]), F32)
        b = xp.zeros(0, F32) if bias is None else bias
        return K.linear_q8(xp.ascontiguousarray(x), w.data, w.scales, b, out, K.ADD if add else K.STORE)
    y = product(x, w)
    if bias is not None:
        y += bias
    if add:
        out += y
        return out
    return y


# --- the KV cache on the device -------------------------------------------------------------------------------------

class DeviceStorage:
    """The device buffer [L, 2, B, Hkv, C, Dh] and how many positions of it are written (accel.kv_cache._Storage)."""

    def __init__(self, xp, layers, batch, kv_heads, capacity, head_dim):
        self.xp = xp
        self.data = xp.zeros((layers, 2, batch, kv_heads, capacity, head_dim), F32)
        self.filled = 0

    @property
    def capacity(self):
        return self.data.shape[4]


class DeviceKVCache(tuple):
    """past_key_values on the device: L pairs (key, value) [B, Hkv, T, Dh], views of one preallocated buffer.

    The device twin of accel.kv_cache.KVCache: a forward given the latest cache over its buffer appends in place;
    given an older one (a branch) it copies first, so an older cache never changes. `to_host()` gives refimpl's
    tuples of host arrays.
    """

    def __new__(cls, storage, length):
        pairs = tuple((storage.data[i, 0, :, :, :length], storage.data[i, 1, :, :, :length])
                      for i in range(storage.data.shape[0]))
        cache = super().__new__(cls, pairs)
        cache.storage = storage
        cache.length = length
        return cache

    @classmethod
    def allocate(cls, xp, layers, batch, kv_heads, capacity, head_dim):
        """An empty cache (T = 0) with room for `capacity` positions: pass it as past_key_values to a first call."""
        return cls(DeviceStorage(xp, layers, batch, kv_heads, max(int(capacity), 1), head_dim), 0)

    @property
    def capacity(self):
        return self.storage.capacity

    def to_host(self):
        return tuple((to_host(k), to_host(v)) for k, v in self)

    def __repr__(self):
        L, _, B, Hkv, C, Dh = self.storage.data.shape
        return (f"DeviceKVCache(layers={L}, batch={B}, kv_heads={Hkv}, length={self.length}, capacity={C}, "
                f"head_dim={Dh})")


def _host_pairs(past):
    """Any past_key_values -> the same structure with host arrays, for refimpl's layout check (past_length)."""
    if not isinstance(past, (tuple, list)):
        return past
    return tuple(tuple(to_host(t) for t in pair) if isinstance(pair, (tuple, list)) else pair for pair in past)


def storage_for(past, xp, layers, batch, kv_heads, head_dim, new):
    """(device storage with room for `new` more positions after the past, T), as accel.kv_cache.storage_for: the
    latest DeviceKVCache with room is appended in place; an older or full one is copied (growing by doubling);
    refimpl's tuples (or accel's KVCache) of host arrays are checked as refimpl checks them and uploaded."""
    if past is None:
        return DeviceStorage(xp, layers, batch, kv_heads, new, head_dim), 0
    if isinstance(past, DeviceKVCache):
        shape = past.storage.data.shape
        if (shape[0], shape[2], shape[3], shape[5]) != (layers, batch, kv_heads, head_dim):
            raise InputError(f"past_key_values is a DeviceKVCache of {shape[0]} layers, [B, Hkv, T, Dh] = "
                             f"[{shape[2]}, {shape[3]}, T, {shape[5]}]; this call needs {layers} layers of "
                             f"[{batch}, {kv_heads}, T, {head_dim}]")
        T = past.length
        if past.storage.filled == T and past.storage.capacity >= T + new:
            return past.storage, T
        capacity = max(T + new, min(2 * past.storage.capacity, T + max(new, 256)))
        storage = DeviceStorage(xp, layers, batch, kv_heads, capacity, head_dim)
        storage.data[:, :, :, :, :T] = past.storage.data[:, :, :, :, :T]
    else:
        host = _host_pairs(past)
        T = past_length(host, layers, batch, kv_heads, head_dim)
        storage = DeviceStorage(xp, layers, batch, kv_heads, T + new, head_dim)
        for i, (k, v) in enumerate(host):
            storage.data[i, 0, :, :, :T] = xp.asarray(np.asarray(k, dtype=F32))
            storage.data[i, 1, :, :, :T] = xp.asarray(np.asarray(v, dtype=F32))
    storage.filled = T
    return storage, T


# --- attention over the cache, shared by both families ------------------------------------------------------------

def attention_plan(mask2d, T, S, general, xp):
    """("decode", bias [B, K] or [B, 0]) when one new position per row can use the cache kernel, else ("general",
    the 4-D additive mask [B, 1, S, K]) (accel.model.attention_plan)."""
    if S == 1 and not general:
        if np.all(mask2d == 1):
            return "decode", xp.zeros((mask2d.shape[0], 0), F32)
        return "decode", xp.asarray(np.where(mask2d == 0, F32_MIN, F32(0)).astype(F32))  # causal_mask's values
    return "general", xp.asarray(causal_mask(mask2d, T, F32))


def general_attention(q, keys, values, mask, divisor, clamp, xp, layer_head_mask=None):
    """refimpl.llama.attention's (refimpl.opt.attention's) lines for several new positions, in xp: q [B, H, S, Dh],
    keys/values [B, Hkv, K, Dh] (GQA by a reshape: the R query heads of a kv head side by side, no repeat_kv copy).
    Returns (context [M, H*Dh], probs [B, H, S, K] after OPT's head_mask)."""
    B, H, S, Dh = q.shape
    Hkv, Kn = keys.shape[1], keys.shape[2]
    R = H // Hkv
    scores = (q.reshape(B, Hkv, R * S, Dh) @ keys.transpose(0, 1, 3, 2)).reshape(B, H, S, Kn)
    scores = scores / divisor + mask
    if clamp:
        scores = xp.maximum(scores, F32_MIN)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    if layer_head_mask is not None:
        probs = probs * layer_head_mask[None, :, None, None]
    context = probs.reshape(B, Hkv, R * S, Kn) @ values
    return context.reshape(B, H, S, Dh).transpose(0, 2, 1, 3).reshape(B * S, H * Dh), probs


def attention(qkv4, H, Hkv, storage, i, T, plan, divisor, clamp, xp, layer_head_mask=None):
    """Context [M, H*Dh] and probs (general path) or None for q/k/v in the fused buffer [B, S, NH, Dh] (RoPE already
    applied): the new keys and values are written into the cache at T..T+S (refimpl concatenates them to the
    past), then attention_decode reads the cache, or the xp lines do.  twin: the attention part of
    refimpl.llama.attention / refimpl.opt.attention (as accel.model.attention)."""
    B, S, _, Dh = qkv4.shape
    k_cache, v_cache = storage.data[i, 0], storage.data[i, 1]  # [B, Hkv, C, Dh]
    k_cache[:, :, T:T + S] = qkv4[:, :, H:H + Hkv].transpose(0, 2, 1, 3)
    v_cache[:, :, T:T + S] = qkv4[:, :, H + Hkv:].transpose(0, 2, 1, 3)
    if plan[0] == "decode":
        context = xp.empty((B, H, Dh), F32)
        K.attention_decode(xp.ascontiguousarray(qkv4[:, 0, :H]), k_cache, v_cache, T + 1, plan[1], divisor, context)
        return context.reshape(B, H * Dh), None
    q = qkv4[:, :, :H].transpose(0, 2, 1, 3)
    return general_attention(q, k_cache[:, :, :T + S], v_cache[:, :, :T + S], plan[1], divisor, clamp, xp,
                             layer_head_mask)


def layer_norm(x, weight, bias, xp):
    """LayerNorm of x [M, D] into a new array (weight / bias are ones / zeros when not affine).
    twin: refimpl.ops.layer_norm (eps 1e-5)"""
    out = xp.empty_like(x)
    return K.layer_norm(x, weight, bias, 1e-5, out)


def activation_code(name):
    if name not in K.ACT_CODES:
        raise ConfigError(f"activation {name!r}: the CUDA kernels implement {', '.join(K.ACT_CODES)}")
    return K.ACT_CODES[name]


class _Stack:
    """What one forward collects: hidden states (device copies) and attention maps when asked for."""

    def __init__(self, want_hidden, want_attentions):
        self.want_hidden, self.want_attentions = want_hidden, want_attentions
        self.hidden, self.attentions = [], []

    def layer_input(self, x, shape):
        if self.want_hidden:
            self.hidden.append(x.reshape(shape).copy())

    def probs(self, probs):
        if self.want_attentions:
            self.attentions.append(probs)


# --- Llama and Open-Llama -----------------------------------------------------------------------------------------

def upload_llama(params, cfg, fmt, xp):
    """refimpl.llama's host parameter tree -> the device tree: stacked qkv and gate_up as DeviceWeight, tied
    matrices one DeviceWeight, the small score head kept on the host (accel.model.pack_llama's layout)."""
    activation_code(cfg.hidden_act)
    pack = _Packer(fmt, xp)
    out = {"embed_tokens": pack(params["embed_tokens"], "embed_tokens"), "norm": _upload(xp, params["norm"])}
    for name in ("embed_layer_norm", "embed_layer_norm_bias"):
        if name in params:
            out[name] = _upload(xp, params[name])
    if "lm_head" in params:
        out["lm_head"] = pack(params["lm_head"], "lm_head")  # the embedding's DeviceWeight when tied
    if "score" in params:
        out["score"] = np.array(params["score"], dtype=F32)  # refimpl's head on the host final hidden state
    out["layers"] = [_llama_layer(layer, fmt, xp, i) for i, layer in enumerate(params["layers"])]
    return out


def _llama_layer(layer, fmt, xp, i):
    d = {"input_layernorm": _upload(xp, layer["input_layernorm"]),
         "post_attention_layernorm": _upload(xp, layer["post_attention_layernorm"]),
         "qkv": DeviceWeight.upload(np.concatenate([layer["q_proj"], layer["k_proj"], layer["v_proj"]]), fmt, xp,
                                    f"layers.{i}.qkv"),
         "o_proj": DeviceWeight.upload(layer["o_proj"], fmt, xp, f"layers.{i}.o_proj"),
         "gate_up": DeviceWeight.upload(np.concatenate([layer["gate_proj"], layer["up_proj"]]), fmt, xp,
                                        f"layers.{i}.gate_up"),
         "down_proj": DeviceWeight.upload(layer["down_proj"], fmt, xp, f"layers.{i}.down_proj")}
    if "q_proj_bias" in layer:
        d["qkv_bias"] = _upload(xp, np.concatenate([layer["q_proj_bias"], layer["k_proj_bias"],
                                                    layer["v_proj_bias"]]))
        d["o_proj_bias"] = _upload(xp, layer["o_proj_bias"])
    if "gate_proj_bias" in layer:
        d["gate_up_bias"] = _upload(xp, np.concatenate([layer["gate_proj_bias"], layer["up_proj_bias"]]))
        d["down_proj_bias"] = _upload(xp, layer["down_proj_bias"])
    return d


def llama_embed(dparams, cfg, ids, embeds, xp):
    """The first hidden state [M, D] (a new device array): token rows, Open-Llama's embedding LayerNorm on token
    ids only, or the given inputs_embeds.  twin: the embedding lines of refimpl.llama.llama_model"""
    if ids is None:
        return _upload(xp, embeds.reshape(-1, embeds.shape[-1]))
    x = xp.ascontiguousarray(dparams["embed_tokens"].rows(xp.asarray(ids.reshape(-1))), dtype=F32)
    if cfg.use_stable_embedding:
        x = layer_norm(x, dparams["embed_layer_norm"], dparams["embed_layer_norm_bias"], xp)
    return x


def llama_forward(dparams, cfg, rope_state, xp, input_ids=None, inputs_embeds=None, attention_mask=None,
                  position_ids=None, past_key_values=None, want_attentions=False, want_hidden=False):
    """The decoder stack on the device, refimpl.llama.llama_model's steps (decoder_layer, attention, mlp).

    Returns (final hidden [B, S, D] on the device, hidden states, attentions (device arrays), DeviceKVCache,
    new RoPE state). The argument checks are refimpl's (refimpl.inputs, rotary_tables), made before any kernel runs.
    """
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.hidden_size, F32)
    H, Hkv, Dh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    storage, T = storage_for(past_key_values, xp, cfg.num_hidden_layers, B, Hkv, Dh, S)
    mask2d = attention_mask_2d(attention_mask, B, T + S)
    position_ids = np.arange(T, T + S)[None] if position_ids is None else position_ids_2d(position_ids, B, S)
    cos, sin, rope_state = ref_llama.rotary_tables(cfg, rope_state, position_ids, T + S, F32)  # [B or 1, S, Dh]
    cos, sin = _upload(xp, cos), _upload(xp, sin)
    x = llama_embed(dparams, cfg, ids, embeds, xp)  # [M, D], our own copy: residuals add into it
    plan = attention_plan(mask2d, T, S, want_attentions, xp)
    divisor = F32(np.sqrt(F32(Dh)))  # scores are divided by sqrt(Dh) after the product
    clamp = cfg.family == "open-llama"
    tp = cfg.pretraining_tp > 1  # refimpl's linear_tp path adds no o_proj / down_proj bias
    eps, act = float(cfg.rms_norm_eps), activation_code(cfg.hidden_act)
    h = xp.empty((B * S, D), F32)
    gated = xp.empty((B * S, cfg.intermediate_size), F32)
    stack = _Stack(want_hidden, want_attentions)
    for i, layer in enumerate(dparams["layers"]):
        stack.layer_input(x, (B, S, D))
        K.rms_norm(x, layer["input_layernorm"], eps, h)
        qkv4 = xp.ascontiguousarray(linear(h, layer["qkv"], layer.get("qkv_bias"))).reshape(B, S, H + 2 * Hkv, Dh)
        K.rope_(qkv4, H + Hkv, cos, sin)  # q and k heads, in place
        context, probs = attention(qkv4, H, Hkv, storage, i, T, plan, divisor, clamp, xp)
        stack.probs(probs)
        linear(context, layer["o_proj"], None if tp else layer.get("o_proj_bias"), out=x, add=True)  # x += o(ctx)
        K.rms_norm(x, layer["post_attention_layernorm"], eps, h)
        K.gated_act(xp.ascontiguousarray(linear(h, layer["gate_up"], layer.get("gate_up_bias"))), act, gated)
        linear(gated, layer["down_proj"], None if tp else layer.get("down_proj_bias"), out=x, add=True)
    storage.filled = T + S
    x = K.rms_norm(x, dparams["norm"], eps, xp.empty_like(x)).reshape(B, S, D)
    stack.hidden.append(x)  # the last entry is after the final norm
    return x, tuple(stack.hidden), tuple(stack.attentions), DeviceKVCache(storage, T + S), rope_state


def llama_lm_weight(dparams, cfg):
    """The DeviceWeight of the logits: lm_head, or the embedding when shared; the first tp * (V // tp) rows under
    pretraining_tp (refimpl.llama.lm_logits' vocab chunks, concatenated)."""
    weight = dparams["embed_tokens"] if cfg.shared_input_output_embedding else dparams["lm_head"]
    tp = cfg.pretraining_tp
    return weight[:tp * (cfg.vocab_size // tp)] if tp > 1 else weight


# --- OPT ----------------------------------------------------------------------------------------------------------

def upload_opt(params, cfg, fmt, xp):
    """refimpl.opt's host parameter tree -> the device tree (accel.model.pack_opt's layout); LayerNorms without
    elementwise affine get ones / zeros (exact: y * 1 + 0)."""
    activation_code(cfg.activation_function)
    pack = _Packer(fmt, xp)
    D = cfg.hidden_size
    ones, zeros = np.ones(D, F32), np.zeros(D, F32)
    out = {"embed_tokens": pack(params["embed_tokens"], "embed_tokens"),
           "embed_positions": _upload(xp, params["embed_positions"])}
    for name in ("project_in", "project_out", "lm_head"):
        if name in params:
            out[name] = pack(params[name], name)
    if ref_opt.has_final_layer_norm(cfg):
        out["final_layer_norm"] = _upload(xp, params.get("final_layer_norm", ones))
        out["final_layer_norm_bias"] = _upload(xp, params.get("final_layer_norm_bias", zeros))
    for name in ("score", "qa_outputs", "qa_outputs_bias"):
        if name in params:
            out[name] = np.array(params[name], dtype=F32)  # refimpl's heads on the host final hidden state
    out["layers"] = []
    for i, layer in enumerate(params["layers"]):
        d = {"qkv": DeviceWeight.upload(np.concatenate([layer["q_proj"], layer["k_proj"], layer["v_proj"]]), fmt,
                                        xp, f"layers.{i}.qkv")}
        for name in ("out_proj", "fc1", "fc2"):
            d[name] = DeviceWeight.upload(layer[name], fmt, xp, f"layers.{i}.{name}")
        if "q_proj_bias" in layer:
            d["qkv_bias"] = _upload(xp, np.concatenate([layer["q_proj_bias"], layer["k_proj_bias"],
                                                        layer["v_proj_bias"]]))
        for name in ("out_proj_bias", "fc1_bias", "fc2_bias"):
            if name in layer:
                d[name] = _upload(xp, layer[name])
        for name in ("self_attn_layer_norm", "final_layer_norm"):
            d[name] = _upload(xp, layer.get(name, ones))
            d[name + "_bias"] = _upload(xp, layer.get(name + "_bias", zeros))
        out["layers"].append(d)
    return out


def opt_position_ids(cfg, rows, mask2d, position_ids, T, B, S):
    """Host position ids [B or 1, S] (from the mask, or given), checked against the learned table of `rows` rows.
    twin: the position lines of refimpl.opt.opt_model (and accel.model.opt_positions), same InputErrors."""
    if position_ids is None:
        position_ids = ref_opt.positions_from_mask(mask2d, T)
    else:
        position_ids = position_ids_2d(position_ids, B, S, non_negative=False)
    learned_positions(position_ids, ref_opt.POSITION_OFFSET, rows, cfg.max_position_embeddings)
    return position_ids


def opt_head_mask(head_mask, cfg, xp):
    """head_mask [L, H] checked as refimpl.opt.opt_model checks it, on the device (or None)."""
    head_mask = head_mask_2d(head_mask, cfg.num_hidden_layers, cfg.num_attention_heads, F32)
    return None if head_mask is None else _upload(xp, head_mask)


def opt_embed(dparams, ids, embeds, positions, B, S, D, xp):
    """token rows (or inputs_embeds), project_in, + learned positions -> [M, D], a new device array.
    twin: the embedding lines of refimpl.opt.opt_model"""
    if ids is None:
        x = _upload(xp, embeds.reshape(B * S, -1))
    else:
        x = dparams["embed_tokens"].rows(xp.asarray(ids.reshape(-1)))  # [M, E]
    if "project_in" in dparams:
        x = linear(xp.ascontiguousarray(x, dtype=F32), dparams["project_in"])  # [M, E] -> [M, D]
    pos_embeds = dparams["embed_positions"][xp.asarray(positions + ref_opt.POSITION_OFFSET)]  # [B or 1, S, D]
    return xp.ascontiguousarray(x.reshape(B, S, D) + pos_embeds, dtype=F32).reshape(B * S, D)


def opt_forward(dparams, cfg, xp, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, head_mask=None, want_attentions=False, want_hidden=False):
    """The decoder stack on the device, refimpl.opt.opt_model's steps (decoder_layer, attention): learned positions
    (offset 2, from the mask), project_in / project_out, pre-LN or post-LN (do_layer_norm_before False: 350m), q
    scaled after its bias, head_mask, the final LayerNorm when refimpl.opt.has_final_layer_norm.

    Returns (final hidden [B, S, E] on the device, hidden states, attentions, DeviceKVCache).
    """
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.word_embed_proj_dim, F32)
    H, Dh, D = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    storage, T = storage_for(past_key_values, xp, cfg.num_hidden_layers, B, H, Dh, S)
    mask2d = attention_mask_2d(attention_mask, B, T + S)
    positions = opt_position_ids(cfg, dparams["embed_positions"].shape[0], mask2d, position_ids, T, B, S)
    head_mask = opt_head_mask(head_mask, cfg, xp)
    x = opt_embed(dparams, ids, embeds, positions, B, S, D, xp)  # [M, D]
    plan = attention_plan(mask2d, T, S, want_attentions or head_mask is not None, xp)
    pre, act = cfg.do_layer_norm_before, activation_code(cfg.activation_function)
    q_scale = F32(Dh ** -0.5)
    ffn = xp.empty((B * S, cfg.ffn_dim), F32)
    stack = _Stack(want_hidden, want_attentions)
    for i, layer in enumerate(dparams["layers"]):
        stack.layer_input(x, (B, S, D))
        ln1 = (layer["self_attn_layer_norm"], layer["self_attn_layer_norm_bias"], xp)
        ln2 = (layer["final_layer_norm"], layer["final_layer_norm_bias"], xp)
        h = layer_norm(x, *ln1) if pre else x
        qkv = xp.ascontiguousarray(linear(h, layer["qkv"], layer.get("qkv_bias")))  # [M, 3D]
        qkv[:, :D] *= q_scale  # q is scaled after its bias
        context, probs = attention(qkv.reshape(B, S, 3 * H, Dh), H, H, storage, i, T, plan, F32(1.0), True, xp,
                                   None if head_mask is None else head_mask[i])
        stack.probs(probs)
        linear(context, layer["out_proj"], layer.get("out_proj_bias"), out=x, add=True)  # x += out_proj(ctx)
        if not pre:
            x = layer_norm(x, *ln1)  # 350m: LayerNorm after the residual
        h = layer_norm(x, *ln2) if pre else x
        K.activation(xp.ascontiguousarray(linear(h, layer["fc1"], layer.get("fc1_bias"))), act, ffn)
        linear(ffn, layer["fc2"], layer.get("fc2_bias"), out=x, add=True)  # x += fc2(act(fc1(h)))
        if not pre:
            x = layer_norm(x, *ln2)
    storage.filled = T + S
    if ref_opt.has_final_layer_norm(cfg):
        x = layer_norm(x, dparams["final_layer_norm"], dparams["final_layer_norm_bias"], xp)
    if "project_out" in dparams:
        x = linear(x, dparams["project_out"])  # [M, D] -> [M, E]
    x = x.reshape(B, S, -1)
    stack.hidden.append(x)  # after the final LN and project_out
    return x, tuple(stack.hidden), tuple(stack.attentions), DeviceKVCache(storage, T + S)


# --- packing ----------------------------------------------------------------------------------------------------------

class _Packer:
    """host matrices -> DeviceWeight in one format; the same array (tied embeddings) becomes the same DeviceWeight."""

    def __init__(self, fmt, xp):
        self.fmt, self.xp, self.done = fmt, xp, {}

    def __call__(self, array, name):
        key = id(array)
        if key not in self.done:
            self.done[key] = (array, DeviceWeight.upload(array, self.fmt, self.xp, name))  # array kept: id unique
        return self.done[key][1]


# --- the classes --------------------------------------------------------------------------------------------------

def _no_trace(trace):
    if trace is not None and trace is not NO_TRACE:
        raise InputError("backend='cuda' does not record traces: load with backend='numpy' to trace")


def _output(cache, hidden, attentions, use_cache, output_hidden_states, output_attentions):
    """refimpl's ModelOutput with host float32 hidden states and attention maps, the DeviceKVCache as the past."""
    return ModelOutput(past_key_values=cache if use_cache else None,
                       hidden_states=tuple(to_host(a) for a in hidden) if output_hidden_states else None,
                       attentions=tuple(to_host(a) for a in attentions) if output_attentions else None)


class CudaModel(GenerationHooks):
    """What every cuda-backend class adds to its refimpl class: the array module, the weights format, the device
    cache, the device forward for generate, and accel's generate."""

    weights = "fp32"
    xp = np

    def _decoder(self, *args, **kwargs):
        """refimpl's _decoder: (final hidden [B, S, D or E] on the host, ModelOutput)."""
        h, out = self._device_decoder(*args, **kwargs)
        return to_host(h), out

    def new_cache(self, batch, capacity):
        """An empty DeviceKVCache with room for `capacity` positions (pass it as past_key_values)."""
        c = self.config
        heads = c.num_attention_heads if self.family == "opt" else c.num_key_value_heads
        return DeviceKVCache.allocate(self.xp, c.num_hidden_layers, batch, heads, capacity, c.head_dim)

    def _last_logits(self, h):
        """Logits [B, V] of the last position, computed on the device, as host float32 (what generate needs)."""
        return to_host(linear(self.xp.ascontiguousarray(h[:, -1]), self._lm_weight()))

    def weight_bytes(self):
        """Bytes of all parameters as stored (a tied embedding counted once)."""
        seen, total = set(), 0

        def walk(node):
            nonlocal total
            if isinstance(node, dict):
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
            elif id(node) not in seen:
                seen.add(id(node))
                total += node.nbytes
        walk(self.params)
        return total

    def __repr__(self):
        return f"accel.cuda.{super().__repr__()[:-1]}, weights={self.weights})"


class _LlamaStack(CudaModel):
    def _device_decoder(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                        output_attentions, output_hidden_states, trace=None):
        _no_trace(trace)
        h, hidden, attn, cache, self.rope_state = llama_forward(
            self.params, self.config, self.rope_state, self.xp, input_ids, inputs_embeds, attention_mask,
            position_ids, past_key_values, output_attentions, output_hidden_states)
        return h, _output(cache, hidden, attn, use_cache, output_hidden_states, output_attentions)

    def _decoder_call(self, ids, mask, positions, cache, output_attentions=False, output_hidden_states=False):
        """One forward for generate: (final hidden on the device, ModelOutput with the DeviceKVCache)."""
        return self._device_decoder(ids, mask, positions, cache, None, True, output_attentions, output_hidden_states)

    def _lm_weight(self):
        return llama_lm_weight(self.params, self.config)


class _OPTStack(CudaModel):
    def _device_decoder(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, head_mask,
                        use_cache, output_attentions, output_hidden_states, trace=None):
        _no_trace(trace)
        h, hidden, attn, cache = opt_forward(self.params, self.config, self.xp, input_ids, inputs_embeds,
                                             attention_mask, position_ids, past_key_values, head_mask,
                                             output_attentions, output_hidden_states)
        return h, _output(cache, hidden, attn, use_cache, output_hidden_states, output_attentions)

    def _decoder_call(self, ids, mask, positions, cache, output_attentions=False, output_hidden_states=False):
        return self._device_decoder(ids, mask, positions, cache, None, None, True, output_attentions,
                                    output_hidden_states)

    def _lm_weight(self):
        return self.params["lm_head"]


class LlamaModel(_LlamaStack, ref_llama.LlamaModel):
    """refimpl.LlamaModel on the CUDA backend."""


class LlamaForCausalLM(_LlamaStack, ref_llama.LlamaForCausalLM):
    """refimpl.LlamaForCausalLM on the CUDA backend."""


class LlamaForSequenceClassification(_LlamaStack, ref_llama.LlamaForSequenceClassification):
    """refimpl.LlamaForSequenceClassification on the CUDA backend."""


class OpenLlamaModel(_LlamaStack, ref_llama.OpenLlamaModel):
    """refimpl.OpenLlamaModel on the CUDA backend."""


class OpenLlamaForCausalLM(_LlamaStack, ref_llama.OpenLlamaForCausalLM):
    """refimpl.OpenLlamaForCausalLM on the CUDA backend."""


class OpenLlamaForSequenceClassification(_LlamaStack, ref_llama.OpenLlamaForSequenceClassification):
    """refimpl.OpenLlamaForSequenceClassification on the CUDA backend."""


class OPTModel(_OPTStack, ref_opt.OPTModel):
    """refimpl.OPTModel on the CUDA backend."""


class OPTForCausalLM(_OPTStack, ref_opt.OPTForCausalLM):
    """refimpl.OPTForCausalLM on the CUDA backend."""


class OPTForSequenceClassification(_OPTStack, ref_opt.OPTForSequenceClassification):
    """refimpl.OPTForSequenceClassification on the CUDA backend."""


class OPTForQuestionAnswering(_OPTStack, ref_opt.OPTForQuestionAnswering):
    """refimpl.OPTForQuestionAnswering on the CUDA backend."""


# refimpl class -> its CUDA twin
CUDA_CLASSES = {cls.__bases__[1]: cls for cls in (
    LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification, OpenLlamaModel, OpenLlamaForCausalLM,
    OpenLlamaForSequenceClassification, OPTModel, OPTForCausalLM, OPTForSequenceClassification,
    OPTForQuestionAnswering)}


# --- loading ------------------------------------------------------------------------------------------------------

def from_reference(reference, weights, xp):
    """A loaded refimpl model (float32) -> its CUDA twin with the parameters uploaded through `xp`."""
    check_format(weights)
    cfg = reference.config
    if cfg.head_dim > K.MAX_HEAD_DIM:
        raise ConfigError(f"head_dim={cfg.head_dim}: the CUDA decode kernel handles heads up to {K.MAX_HEAD_DIM} "
                          "(use backend='numba')")
    upload = upload_opt if cfg.family == "opt" else upload_llama
    model = CUDA_CLASSES[type(reference)](cfg, upload(reference.params, cfg, weights, xp), np.float32)
    model.generation_config = reference.generation_config
    model.problem_type = reference.problem_type
    model.weights, model.xp = weights, xp
    return model


def build(path, weights="fp32", xp=np):
    """refimpl loads and checks the checkpoint (class, shapes), then the weights are uploaded through `xp`:
    cupy on a GPU (load_cuda), numpy under the CUDA simulator (the tests)."""
    import refimpl

    check_format(weights)
    return from_reference(refimpl.load(path, dtype=np.float32), weights, xp)


def load_cuda(path, dtype, weights, cache_dir=None, threads=None):
    """accel.load(backend="cuda") once accel.cuda.device.check_cuda() has said the backend is usable here."""
    if np.dtype(dtype) != np.float32:
        raise ConfigError(f"dtype={np.dtype(dtype).name}: backend='cuda' computes in float32 (float64 audit mode is "
                          "refimpl's: backend='numpy')")
    check_format(weights)
    if cache_dir is not None:
        raise ConfigError("cache_dir applies to backend='numba': backend='cuda' converts the weights as it uploads "
                          "them")
    if threads is not None:
        raise ConfigError("threads applies to backend='numba' (CPU threads), not to backend='cuda'")
    import cupy

    return build(path, weights, cupy)
