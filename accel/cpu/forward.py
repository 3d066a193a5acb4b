"""The decoder stacks on the CPU: refimpl.llama.llama_model's and refimpl.opt.opt_model's steps, each step the twin
kernel of the refimpl function it replaces.

Packed parameters (accel.packing): q, k, v stacked into one matrix (one product per layer), gate and up stacked
(the activation is applied as the up projection is written), every matrix an accel.cpu.linear.Weight; the residual
adds happen in the output projections' epilogues; past_key_values is an accel.kv_cache.KVCache, appended in place.
A decode forward of a few rows that records nothing per layer runs all its layers in one compiled call (the fused
stacks below: the same kernels with the same arguments in the same order, so the same bits as the loop); otherwise
the per-layer loop runs.

Why fuse: decoding (one new token per row, a few rows) streams each weight once and is memory-bound, and on a small
model the Python around its ~5 kernel calls a layer costs as much as the work (a 12-layer toy: ~0.2-0.3 ms of ~0.8 ms
a token; what remains is mostly Numba's ~4 us launch of each parallel kernel). The layers' parameters reach a fused
stack as one numba.typed.List of per-layer namedtuples (LlamaLayer, OPTLayer), built once per packed parameter tree
(stack_for) and kept while its weights live.

Shapes: B batch, S new tokens, M = B*S rows, T cached, K = T + S keys, D hidden, H heads, Hkv kv heads,
R = H / Hkv, NH = H + 2 Hkv, Dh head dim, F intermediate, V vocab.
"""
from __future__ import annotations

import sys
import weakref
from collections import namedtuple

import numba
import numpy as np
from numba.extending import overload
from numba.typed import List

from refimpl import llama as ref_llama
from refimpl import opt as ref_opt
from refimpl.inputs import attention_mask_2d, head_mask_2d, position_ids_2d, token_inputs
from refimpl.ops import linear as ref_linear

from ..formats import ACT, ADD, GATED, GGUF_BLOCKS, STORE, activation_code
from ..kv_cache import KVCache, storage_for
from ..models import twin_classes
from ..plan import attention_plan
from . import blas, jit
from .attention import _decode_step, attention
from .jit import njit
from .linear import NO_BIAS, SMALL_M, Weight, _linear_f32, _linear_half, _linear_q8, linear, linear_into
from .ops import _layer_norm_rows, _rms_norm_rows, layer_norm, rms_norm

NAME = "numba"
F32 = np.float32
FUSED_DECODE = True  # False: decode through the per-layer loops below too (tests compare the two)


# --- Llama and Open-Llama -----------------------------------------------------------------------------------------

def llama_model(params, cfg, rope_state, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, want_attentions=False, want_hidden=False, xp=np):
    """The decoder stack, refimpl.llama.llama_model's steps. Returns (final hidden [B, S, D], hidden states,
    attentions, KVCache, new RoPE state)."""
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.hidden_size, F32)
    L, H, Hkv, Dh, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    storage, T = storage_for(past_key_values, L, B, Hkv, Dh, S)  # refimpl's checks of the past, then room for S
    if ids is not None:
        x = params["embed_tokens"][ids]  # [B, S] -> [B, S, D]
        if cfg.use_stable_embedding:  # Open-Llama: LayerNorm (eps 1e-5) on token embeddings only
            x = layer_norm(x, params["embed_layer_norm"], params["embed_layer_norm_bias"], eps=1e-5)
    else:
        x = embeds
    x = np.array(x, dtype=F32, order="C").reshape(B * S, D)  # [M, D], our own copy: residuals add into it
    mask2d = attention_mask_2d(attention_mask, B, T + S)
    if position_ids is None:
        position_ids = np.arange(T, T + S)[None]
    else:
        position_ids = position_ids_2d(position_ids, B, S)
    cos, sin, rope_state = ref_llama.rotary_tables(cfg, rope_state, position_ids, T + S, F32)  # [B or 1, S, Dh]
    cos, sin = np.ascontiguousarray(cos, dtype=F32), np.ascontiguousarray(sin, dtype=F32)
    plan = attention_plan(mask2d, T, S, want_attentions)
    divisor = np.sqrt(F32(Dh))  # scores are divided by sqrt(Dh) after the product, in float32
    act = activation_code(cfg.hidden_act)
    tp = cfg.pretraining_tp > 1  # refimpl's linear_tp path adds no o_proj / down_proj bias
    eps = float(cfg.rms_norm_eps)

    layers = params["layers"]
    stack = fused_stack(params, "llama", plan, B, want_hidden, tp=tp)
    if stack is not None:  # one new position per row: all layers in one compiled call
        llama_decode_stack(x, stack, H, Hkv, eps, act, cos, sin, storage.data, T, plan.mask, divisor)
        layers = []  # done: the loop below has nothing left to run
    h = np.empty((B * S, D), F32)
    qkv = np.empty((B * S, (H + 2 * Hkv) * Dh), F32)
    gated = np.empty((B * S, cfg.intermediate_size), F32)
    hidden_states, attentions = [], []
    for i, layer in enumerate(layers):
        if want_hidden:
            hidden_states.append(x.reshape(B, S, D).copy())
        _rms_norm_rows(x, layer["input_layernorm"], eps, h)  # ops.rms_norm without its wrapper
        linear_into(h, layer["qkv"], layer.get("qkv_bias"), 0, STORE, qkv)  # [M, D] -> [M, NH*Dh]
        qkv4 = qkv.reshape(B, S, H + 2 * Hkv, Dh)
        context, probs = attention(qkv4, H, Hkv, storage, i, T, plan, divisor, cos, sin)  # RoPE, cache, attention
        attentions.append(probs)
        linear_into(context, layer["o_proj"], None if tp else layer.get("o_proj_bias"), 0, ADD, x)  # x += o(ctx)
        _rms_norm_rows(x, layer["post_attention_layernorm"], eps, h)
        linear_into(h, layer["gate_up"], layer.get("gate_up_bias"), act, GATED, gated)  # act(gate) * up [M, F]
        linear_into(gated, layer["down_proj"], None if tp else layer.get("down_proj_bias"), 0, ADD, x)  # x += down
    storage.filled = T + S
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps).reshape(B, S, D)
    hidden_states.append(x)
    return x, tuple(hidden_states), tuple(attentions), KVCache(storage, T + S), rope_state


# --- OPT ----------------------------------------------------------------------------------------------------------

def opt_model(params, cfg, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
              past_key_values=None, head_mask=None, want_attentions=False, want_hidden=False, xp=np):
    """The decoder stack, refimpl.opt.opt_model's steps (pre- and post-LN). Returns (final hidden, hidden states,
    attentions, KVCache)."""
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.word_embed_proj_dim, F32)
    L, H, Dh, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    storage, T = storage_for(past_key_values, L, B, H, Dh, S)  # refimpl's checks of the past, then room for S
    mask2d = attention_mask_2d(attention_mask, B, T + S)
    x = params["embed_tokens"][ids] if ids is not None else embeds  # [B, S, E]
    position_ids = ref_opt.checked_position_ids(cfg, params["embed_positions"].shape[0], mask2d, position_ids, T, B, S)
    pos_embeds = params["embed_positions"][position_ids + ref_opt.POSITION_OFFSET]  # [B or 1, S, D]
    if "project_in" in params:
        x = linear(x, params["project_in"])  # [B, S, E] -> [B, S, D]
    x = np.ascontiguousarray(x + pos_embeds, dtype=F32).reshape(B * S, D)  # [M, D], a new array
    head_mask = head_mask_2d(head_mask, L, H, F32)  # [L, H] or None
    plan = attention_plan(mask2d, T, S, want_attentions or head_mask is not None)
    pre = cfg.do_layer_norm_before
    act = activation_code(cfg.activation_function)
    q_scale = F32(Dh ** -0.5)

    layers = params["layers"]
    stack = fused_stack(params, "opt", plan, B, want_hidden or not pre)
    if stack is not None:  # one new position per row, pre-LN: all layers in one compiled call
        opt_decode_stack(x, stack, H, q_scale, act, storage.data, T, plan.mask)
        layers = []  # done: the loop below has nothing left to run
    qkv = np.empty((B * S, 3 * D), F32)
    ffn = np.empty((B * S, cfg.ffn_dim), F32)
    hidden_states, attentions = [], []
    for i, layer in enumerate(layers):
        if want_hidden:
            hidden_states.append(x.reshape(B, S, D).copy())
        ln1 = (layer.get("self_attn_layer_norm"), layer.get("self_attn_layer_norm_bias"))
        ln2 = (layer.get("final_layer_norm"), layer.get("final_layer_norm_bias"))
        h = layer_norm(x, *ln1) if pre else x
        linear_into(h, layer["qkv"], layer.get("qkv_bias"), 0, STORE, qkv)  # [M, D] -> [M, 3D]
        qkv[:, :D] *= q_scale  # q is scaled after its bias
        context, probs = attention(qkv.reshape(B, S, 3 * H, Dh), H, H, storage, i, T, plan, F32(1.0),
                                   layer_head_mask=None if head_mask is None else head_mask[i])
        attentions.append(probs)
        linear_into(context, layer["out_proj"], layer.get("out_proj_bias"), 0, ADD, x)  # x += out_proj(ctx)
        if not pre:
            x = layer_norm(x, *ln1)  # 350m: LayerNorm after the residual
        h = layer_norm(x, *ln2) if pre else x
        linear_into(h, layer["fc1"], layer.get("fc1_bias"), act, ACT, ffn)  # act(fc1(h)) [M, F]
        linear_into(ffn, layer["fc2"], layer.get("fc2_bias"), 0, ADD, x)  # x += fc2(...)
        if not pre:
            x = layer_norm(x, *ln2)
    storage.filled = T + S
    x = x.reshape(B, S, D)
    if ref_opt.has_final_layer_norm(cfg):
        x = layer_norm(x, params.get("final_layer_norm"), params.get("final_layer_norm_bias"))
    if "project_out" in params:
        x = linear(x, params["project_out"])  # [B, S, D] -> [B, S, E]
    hidden_states.append(x)
    return x, tuple(hidden_states), tuple(attentions), KVCache(storage, T + S)


# --- what the model classes call (accel.models): the same names in accel/cuda/forward.py ------------------------

def enter(model):
    """Before each forward: Numba's (and MKL's) thread count, which are per Python thread."""
    threads = model.threads or jit.default_threads()
    jit.set_threads(threads)
    blas.set_threads(threads)  # a no-op without MKL


def to_host(a):
    return a


def llama_last_logits(params, cfg, h):
    """Logits [B, V] of the last position only (what generate needs)."""
    return ref_llama.lm_logits(params, cfg, h[:, -1:])[:, -1]


def opt_last_logits(params, cfg, h):
    return ref_linear(h[:, -1], params["lm_head"])  # [B, E] -> [B, V]


ACCEL_CLASSES = twin_classes(sys.modules[__name__])  # refimpl class -> its twin on this backend


# --- the fused decode stacks ------------------------------------------------------------------------------------------

def fused_stack(params, family, plan, rows, unfused_steps, tp=False):
    """The per-layer lists when this forward can run its layers in one fused call (the "decode" plan, few rows,
    nothing recorded between layers: unfused_steps False), else None (the per-layer loop)."""
    if not FUSED_DECODE or plan.kind != "decode" or unfused_steps or rows > SMALL_M:
        return None
    return stack_for(params, family, tp)


NO_SCALES = np.zeros((0, 0), F32)  # the scales of a format that has none (fp32, fp16, bf16)


# One layer's matrix: data [O, D] (float32, int8 or uint16 bits), scales [O, nb] (int8) or NO_SCALES, bias [O] or
# NO_BIAS; bf16 tells the uint16 kernel which half format it reads.
Linear = namedtuple("Linear", "data scales bias bf16")


# One layer's parameters (the stacks get a typed List of them: one argument to unbox a call, ~3 us; a tuple of
# per-kind lists costs ~40 us per tuple in the dispatcher's typeof)
LlamaLayer = namedtuple("LlamaLayer", "input_norm post_norm qkv o_proj gate_up down_proj")


OPTLayer = namedtuple("OPTLayer", "ln1_weight ln1_bias ln2_weight ln2_bias qkv out_proj fc1 fc2")


def linear_rows(x, data, scales, bf16, bias, act, epilogue, out):
    """out [M, O] <- epilogue(x [M, D] @ W^T + b) for M <= SMALL_M, W stored as `data` (+ `scales`).

    twin: the M <= SMALL_M branch of accel.cpu.linear.linear_into (the same kernel for each format). Compiled, the format is
    picked from data's dtype when the caller is typed (the overload below); this body runs without the JIT."""
    if data.dtype == np.float32:
        _linear_f32(x, data, bias, act, epilogue, out)
    elif data.dtype == np.int8:
        _linear_q8(x, data, scales, bias, act, epilogue, out)
    else:
        _linear_half(x, data, bf16, bias, act, epilogue, out)


@overload(linear_rows)
def _linear_rows_typed(x, data, scales, bf16, bias, act, epilogue, out):
    """linear_rows in compiled code: only the kernel of data's format is typed and compiled."""
    name = str(data.dtype)
    if name == "float32":
        def impl(x, data, scales, bf16, bias, act, epilogue, out):
            _linear_f32(x, data, bias, act, epilogue, out)
    elif name == "int8":
        def impl(x, data, scales, bf16, bias, act, epilogue, out):
            _linear_q8(x, data, scales, bias, act, epilogue, out)
    elif name == "uint16":
        def impl(x, data, scales, bf16, bias, act, epilogue, out):
            _linear_half(x, data, bf16, bias, act, epilogue, out)
    else:
        return None
    return impl


@njit()
def llama_decode_stack(x, layers, H, Hkv, eps, act, cos, sin, kv, T, mask_bias, divisor):
    """All decoder layers for one new position per row, in place on the residual x [B, D].

    twin: the layer loop of llama_model above on the "decode" plan (refimpl.llama.decoder_layer per layer).
    layers: typed List of LlamaLayer; kv: the cache storage [L, 2, B, Hkv, C, Dh] with T positions written;
    mask_bias [B, T+1] or [B, 0] (none).
    """
    B, D = x.shape
    Dh = kv.shape[5]
    NH = H + 2 * Hkv
    h = np.empty((B, D), F32)
    qkv = np.empty((B, NH * Dh), F32)
    context = np.empty((B, H * Dh), F32)
    gated = np.empty((B, layers[0].gate_up.data.shape[0] // 2), F32)
    qkv3, context3 = qkv.reshape(B, NH, Dh), context.reshape(B, H, Dh)
    no_act = 0
    rotate = cos.shape[0] > 0  # always true; a run-time bool as the loop passes (a literal True would specialise)
    for i in range(len(layers)):
        layer = layers[i]
        _rms_norm_rows(x, layer.input_norm, eps, h)
        _linear(h, layer.qkv, no_act, STORE, qkv)  # [B, D] -> [B, NH*Dh]
        _decode_step(qkv3, H, Hkv, rotate, cos, sin, kv[i, 0], kv[i, 1], T, mask_bias, divisor, context3)
        _linear(context, layer.o_proj, no_act, ADD, x)  # x += o_proj(context)
        _rms_norm_rows(x, layer.post_norm, eps, h)
        _linear(h, layer.gate_up, act, GATED, gated)  # act(gate) * up [B, F]
        _linear(gated, layer.down_proj, no_act, ADD, x)  # x += down_proj(...)


@njit()
def opt_decode_stack(x, layers, H, q_scale, act, kv, T, mask_bias):
    """All decoder layers (pre-LN OPT) for one new position per row, in place on the residual x [B, D].

    twin: the layer loop of opt_model above on the "decode" plan with do_layer_norm_before (refimpl.opt's
    decoder layer); layers: typed List of OPTLayer; kv [L, 2, B, H, C, Dh], mask_bias as in llama_decode_stack.
    """
    B, D = x.shape
    Dh = kv.shape[5]
    h = np.empty((B, D), F32)
    qkv = np.empty((B, 3 * D), F32)
    context = np.empty((B, D), F32)
    ffn = np.empty((B, layers[0].fc1.data.shape[0]), F32)
    qkv3, context3 = qkv.reshape(B, 3 * H, Dh), context.reshape(B, H, Dh)
    no_act = 0
    eps = 1e-5  # ops.layer_norm's default, as the loop calls it
    no_rotation = np.zeros((1, 1, 1), F32)  # attention.NO_ROTATION (a global would be a read-only array type)
    rotate = no_rotation.shape[0] == 0  # false, but a run-time bool (see llama_decode_stack)
    for i in range(len(layers)):
        layer = layers[i]
        _layer_norm_rows(x, layer.ln1_weight, layer.ln1_bias, eps, h)
        _linear(h, layer.qkv, no_act, STORE, qkv)  # [B, D] -> [B, 3D]
        for b in range(B):  # q is scaled after its bias
            for j in range(D):
                qkv[b, j] *= q_scale
        _decode_step(qkv3, H, H, rotate, no_rotation, no_rotation, kv[i, 0], kv[i, 1], T, mask_bias, F32(1.0),
                     context3)
        _linear(context, layer.out_proj, no_act, ADD, x)  # x += out_proj(context)
        _layer_norm_rows(x, layer.ln2_weight, layer.ln2_bias, eps, h)
        _linear(h, layer.fc1, act, ACT, ffn)  # act(fc1(h)) [B, F]
        _linear(ffn, layer.fc2, no_act, ADD, x)  # x += fc2(...)


@njit(inline="always")
def _linear(x, matrix, act, epilogue, out):
    """One layer's product (linear_rows on a Linear). Spliced into the stacks: compiled on its own, each call
    site's constant epilogue would make another specialisation of it."""
    linear_rows(x, matrix.data, matrix.scales, matrix.bf16, matrix.bias, act, epilogue, out)


# --- building the layer lists, once per parameter tree ----------------------------------------------------------------

@njit()
def _list_of(first):
    """A typed List holding `first` (built in compiled code: its methods come from Numba's cache, not a compile)."""
    items = List()
    items.append(first)
    return items


@njit()
def _append(items, item):
    items.append(item)


def _usable(a):
    """Whether an array has the one type the kernels are compiled for: C-contiguous and writable."""
    return isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable


def _linear_of(layer, name, bias_name, with_bias=True):
    """The Linear of params layer[name] (a linear.Weight) and its bias (None: an array the kernels do not take)."""
    weight = layer[name]
    if not isinstance(weight, Weight) or weight.format in GGUF_BLOCKS:  # GGUF blocks: the per-layer loop runs them
        return None
    bias = layer.get(bias_name) if with_bias else None
    matrix = Linear(weight.data, NO_SCALES if weight.scales is None else weight.scales,
                    NO_BIAS if bias is None else bias, weight.format == "bf16")
    return matrix if all(_usable(a) for a in matrix[:3]) else None


def _typed_list(items):
    """numba.typed.List of the per-layer namedtuples, or None when one is missing or their types differ (a list
    holds one type: the same formats and array types in every layer)."""
    if not items or any(item is None or any(part is None for part in item) for item in items):
        return None
    first = numba.typeof(items[0])
    if any(numba.typeof(item) != first for item in items[1:]):
        return None
    layers = _list_of(items[0])
    for item in items[1:]:
        _append(layers, item)
    return layers


def _llama_layer(layer, tp):
    norms = (layer["input_layernorm"], layer["post_attention_layernorm"])
    if not all(_usable(a) for a in norms):
        return None
    return LlamaLayer(*norms, _linear_of(layer, "qkv", "qkv_bias"),
                      _linear_of(layer, "o_proj", "o_proj_bias", with_bias=not tp),  # tp: linear_tp adds no bias
                      _linear_of(layer, "gate_up", "gate_up_bias"),
                      _linear_of(layer, "down_proj", "down_proj_bias", with_bias=not tp))


def _opt_layer(layer):
    D = layer["qkv"].shape[1]
    ones, zeros = np.ones(D, F32), np.zeros(D, F32)  # what ops.layer_norm passes for a missing w, b
    norms = (layer.get("self_attn_layer_norm", ones), layer.get("self_attn_layer_norm_bias", zeros),
             layer.get("final_layer_norm", ones), layer.get("final_layer_norm_bias", zeros))
    if not all(_usable(a) for a in norms):
        return None
    return OPTLayer(*norms, _linear_of(layer, "qkv", "qkv_bias"), _linear_of(layer, "out_proj", "out_proj_bias"),
                    _linear_of(layer, "fc1", "fc1_bias"), _linear_of(layer, "fc2", "fc2_bias"))


# packed tree -> its lists, keyed by the first layer's qkv Weight: dropped with the model's weights. The tree is
# taken as fixed once decoding started (replacing a layer's arrays afterwards is not seen here).
_STACKS = weakref.WeakKeyDictionary()


_UNSUPPORTED = object()


def stack_for(params, family, tp=False):
    """The typed List of LlamaLayer / OPTLayer for a packed parameter tree (accel.packing),
    built on first use; None when the fused stack cannot take these layers (none, or arrays of mixed types)."""
    layers = params["layers"]
    if not layers:
        return None
    built = _STACKS.setdefault(layers[0]["qkv"], {})
    key = (family, bool(tp), len(layers))
    if key not in built:
        if family == "opt":
            stack = _typed_list([_opt_layer(layer) for layer in layers])
        else:
            stack = _typed_list([_llama_layer(layer, tp) for layer in layers])
        built[key] = _UNSUPPORTED if stack is None else stack
    stack = built[key]
    return None if stack is _UNSUPPORTED else stack
