"""The decode path's decoder stack in one Numba call: every layer of one forward, without Python in between.

Decoding (one new token per row, a few rows) streams each weight once and is memory-bound, and on a small model
the Python around its ~5 kernel calls a layer costs as much as the work (a 12-layer toy: ~0.2-0.3 ms of ~0.8 ms a
token; what remains is mostly Numba's ~4 us launch of each parallel kernel). The drivers here are the per-layer
loops of accel.model.llama_model and opt_model for the "decode" plan, compiled: the same kernels (kernels_cpu's and
quant's parallel ones, each still parallel when called from here) with the same arguments in the same order, so the
results are bit for bit those of the loop.

The layers' parameters reach a driver as one numba.typed.List of per-layer namedtuples (LlamaLayer, OPTLayer),
built once per packed parameter tree (stack_for) and kept while its weights live.
"""
from __future__ import annotations

import weakref
from collections import namedtuple

import numba
import numpy as np
from numba.extending import overload
from numba.typed import List

from .jit import njit
from .kernels_cpu import ACT, ADD, GATED, STORE, _decode_step, _layer_norm_rows, _rms_norm_rows
from .quant import NO_BIAS, SMALL_M, _linear_f32, _linear_half, _linear_q8

F32 = np.float32
NO_SCALES = np.zeros((0, 0), F32)  # the scales of a format that has none (fp32, fp16, bf16)

# One layer's matrix: data [O, D] (float32, int8 or uint16 bits), scales [O, nb] (int8) or NO_SCALES, bias [O] or
# NO_BIAS; bf16 tells the uint16 kernel which half format it reads.
Linear = namedtuple("Linear", "data scales bias bf16")
# One layer's parameters (the stacks get a typed List of them: one argument to unbox a call, ~3 us; a tuple of
# per-kind lists costs ~40 us per tuple in the dispatcher's typeof)
LlamaLayer = namedtuple("LlamaLayer", "input_norm post_norm qkv o_proj gate_up down_proj")
OPTLayer = namedtuple("OPTLayer", "ln1_weight ln1_bias ln2_weight ln2_bias qkv out_proj fc1 fc2")


# --- one matrix-vector product in any storage format ----------------------------------------------------------------

def linear_rows(x, data, scales, bf16, bias, act, epilogue, out):
    """out [M, O] <- epilogue(x [M, D] @ W^T + b) for M <= quant.SMALL_M, W stored as `data` (+ `scales`).

    twin: the M <= SMALL_M branch of quant.linear_into (the same kernel for each format). Compiled, the format is
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


# --- the stacks ------------------------------------------------------------------------------------------------------

@njit()
def llama_decode_stack(x, layers, H, Hkv, eps, act, cos, sin, kv, T, mask_bias, divisor):
    """All decoder layers for one new position per row, in place on the residual x [B, D].

    twin: the layer loop of accel.model.llama_model on the "decode" plan (refimpl.llama.decoder_layer per layer).
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

    twin: the layer loop of accel.model.opt_model on the "decode" plan with do_layer_norm_before (refimpl.opt's
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
    eps = 1e-5  # kernels_cpu.layer_norm's default, as the loop calls it
    no_rotation = np.zeros((1, 1, 1), F32)  # kernels_cpu.NO_ROTATION (a global would be a read-only array type)
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
    """The Linear of params layer[name] (a quant.Weight) and its bias (None: an array the kernels do not take)."""
    weight = layer[name]
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
    ones, zeros = np.ones(D, F32), np.zeros(D, F32)  # what kernels_cpu.layer_norm passes for a missing w, b
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
    """The typed List of LlamaLayer / OPTLayer for a packed parameter tree (accel.model.pack_llama / pack_opt),
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


def fits(rows):
    """Whether a decode forward of `rows` rows takes the fused stack: the loop would use the matrix-vector
    kernels for its products (quant.linear_into, M <= SMALL_M); more rows go to BLAS there, and here too."""
    return rows <= SMALL_M
