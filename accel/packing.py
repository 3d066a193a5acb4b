"""refimpl's parameter tree -> accel's packed tree, the one packer of every backend.

q, k, v are stacked into one matrix `qkv` (one product per layer) and Llama's gate and up into `gate_up` (the
activation is applied as the up projection is written); every matrix becomes an accel.cpu.linear.Weight in the
chosen storage format (accel.formats), the same array (tied embeddings) the same Weight; norms, biases, position
tables and the small heads (score, qa_outputs) stay float32 arrays. The numba backend computes on this tree (or
on its copy in the weight cache, accel.convert); the cuda backend uploads it (accel.cuda.forward.upload).
Packing goes one layer at a time (iter_packed), so a 7B model is never held twice.
"""
from __future__ import annotations

import numpy as np

from .cpu.linear import StackedWeight, Weight, writable

F32 = np.float32

class _Packer:
    """float32 arrays -> Weight in one format; the same array (tied embeddings) becomes the same Weight."""

    def __init__(self, fmt):
        self.fmt = fmt
        self.done = {}

    def __call__(self, array, name):
        key = id(array)
        if key not in self.done:
            self.done[key] = (array, Weight.from_array(array, self.fmt, name))  # keep array alive: id stays unique
        return self.done[key][1]


def _stack(layer, names):
    """Matrices stacked along their rows in float32 (a StoredMatrix widens here, one layer's matrices at a time)."""
    arrays = [np.asarray(layer.pop(n), dtype=F32) for n in names]
    return np.concatenate(arrays, axis=0)


def _stacked(layer, names, fmt, name):
    """One Weight of the matrices stacked (converted from float32), or for weights="gguf" a StackedWeight of each
    matrix as the GGUF file stores it (no copy, no conversion)."""
    if fmt == "gguf":
        return StackedWeight([Weight.from_gguf(layer.pop(n), f"{name}.{n}") for n in names])
    return Weight.from_array(_stack(layer, names), fmt, name)


def _stack_bias(layer, names):
    if names[0] not in layer:
        return None
    return np.ascontiguousarray(np.concatenate([layer.pop(n) for n in names]), dtype=F32)


HEAD_ARRAYS = ("score", "qa_outputs", "qa_outputs_bias")  # small heads stay float32 arrays


def pack_llama(params, fmt):
    """refimpl.llama parameter tree -> accel's: qkv and gate_up stacked, matrices as Weight."""
    return dict(iter_packed(params, "llama", fmt, nested=True))


def pack_opt(params, fmt):
    """refimpl.opt parameter tree -> accel's: qkv stacked, matrices as Weight."""
    return dict(iter_packed(params, "opt", fmt, nested=True))


def iter_packed(params, family, fmt, nested=False):
    """refimpl's parameter tree -> accel's packed entries, one at a time: (name, leaf) for the top level, then each
    layer packed only when it is reached, so a caller that writes entries out (accel.convert) holds one layer.
    nested=True yields ("layers", [per-layer dicts]) at the end instead of "layers.N.name" entries."""
    pack = _Packer(fmt)
    top = _pack_llama_top if family != "opt" else _pack_opt_top
    yield from top(params, pack)
    layer_packer = _pack_llama_layer if family != "opt" else _pack_opt_layer
    layers = (layer_packer(layer, i, fmt) for i, layer in enumerate(params["layers"]))
    if nested:
        yield "layers", list(layers)
        return
    for i, layer in enumerate(layers):
        for name, leaf in layer.items():
            yield f"layers.{i}.{name}", leaf


def _pack_llama_top(params, pack):
    yield "embed_tokens", pack(params["embed_tokens"], "embed_tokens")
    yield "norm", writable(params["norm"])
    for name in ("embed_layer_norm", "embed_layer_norm_bias", *HEAD_ARRAYS):
        if name in params:
            yield name, writable(params[name])
    if "lm_head" in params:
        yield "lm_head", pack(params["lm_head"], "lm_head")  # the embedding's Weight when tied


def _pack_llama_layer(ref_layer, i, fmt):
    layer = dict(ref_layer)
    out = {"input_layernorm": writable(layer.pop("input_layernorm")),
           "post_attention_layernorm": writable(layer.pop("post_attention_layernorm")),
           "qkv_bias": _stack_bias(layer, ("q_proj_bias", "k_proj_bias", "v_proj_bias")),
           "gate_up_bias": _stack_bias(layer, ("gate_proj_bias", "up_proj_bias"))}
    out["qkv"] = _stacked(layer, ("q_proj", "k_proj", "v_proj"), fmt, f"layers.{i}.qkv")
    out["gate_up"] = _stacked(layer, ("gate_proj", "up_proj"), fmt, f"layers.{i}.gate_up")
    out["o_proj"] = Weight.from_array(layer.pop("o_proj"), fmt, f"layers.{i}.o_proj")
    out["down_proj"] = Weight.from_array(layer.pop("down_proj"), fmt, f"layers.{i}.down_proj")
    out.update({name: writable(a) for name, a in layer.items()})  # o_proj_bias, down_proj_bias
    return {k: v for k, v in out.items() if v is not None}


def _pack_opt_top(params, pack):
    yield "embed_tokens", pack(params["embed_tokens"], "embed_tokens")
    yield "embed_positions", writable(params["embed_positions"])
    for name in ("project_in", "project_out"):
        if name in params:
            yield name, pack(params[name], name)
    for name in ("final_layer_norm", "final_layer_norm_bias", *HEAD_ARRAYS):
        if name in params:
            yield name, writable(params[name])
    if "lm_head" in params:
        yield "lm_head", pack(params["lm_head"], "lm_head")


def _pack_opt_layer(ref_layer, i, fmt):
    layer = dict(ref_layer)
    out = {"qkv_bias": _stack_bias(layer, ("q_proj_bias", "k_proj_bias", "v_proj_bias")),
           "qkv": _stacked(layer, ("q_proj", "k_proj", "v_proj"), fmt, f"layers.{i}.qkv")}
    for name in ("out_proj", "fc1", "fc2"):
        out[name] = Weight.from_array(layer.pop(name), fmt, f"layers.{i}.{name}")
    out.update({name: writable(a) for name, a in layer.items()})  # biases and LayerNorms
    return {k: v for k, v in out.items() if v is not None}


def parameter_leaves(params):
    """Every leaf of a parameter tree (dicts and lists of arrays / Weights), a shared one (tied embeddings) once."""
    seen, stack = set(), [params]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif id(node) not in seen:
            seen.add(id(node))
            yield node
