"""Checkpoint tensors -> NumPy arrays, and the literal tables that name them.

Reads `model.safetensors` (or shards listed in `model.safetensors.index.json`) with NumPy alone, memory-mapped:
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
The tables map Hugging Face tensor names to refimpl's; every expected tensor must be found with its shape and every
tensor in the file must be used (head tensors of another class excepted), else a CheckpointError names it.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype -> NumPy dtype. BF16 has no NumPy dtype: it is widened exactly to float32 (the top 16 bits).
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16",
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}

# Hugging Face name (after the "model." / "decoder." prefixes are removed) -> refimpl name, per family.
LLAMA_TOP = {
    "embed_tokens.weight": "embed_tokens",
    "embed_layer_norm.weight": "embed_layer_norm",  # Open-Llama use_stable_embedding
    "embed_layer_norm.bias": "embed_layer_norm_bias",
    "norm.weight": "norm",
}
LLAMA_LAYER = {
    "input_layernorm.weight": "input_layernorm",
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.q_proj.bias": "q_proj_bias",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.k_proj.bias": "k_proj_bias",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.v_proj.bias": "v_proj_bias",
    "self_attn.o_proj.weight": "o_proj",
    "self_attn.o_proj.bias": "o_proj_bias",
    "post_attention_layernorm.weight": "post_attention_layernorm",
    "mlp.gate_proj.weight": "gate_proj",
    "mlp.gate_proj.bias": "gate_proj_bias",
    "mlp.up_proj.weight": "up_proj",
    "mlp.up_proj.bias": "up_proj_bias",
    "mlp.down_proj.weight": "down_proj",
    "mlp.down_proj.bias": "down_proj_bias",
}
OPT_TOP = {
    "embed_tokens.weight": "embed_tokens",
    "embed_positions.weight": "embed_positions",
    "project_in.weight": "project_in",
    "project_out.weight": "project_out",
    "final_layer_norm.weight": "final_layer_norm",
    "final_layer_norm.bias": "final_layer_norm_bias",
}
OPT_LAYER = {
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.q_proj.bias": "q_proj_bias",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.k_proj.bias": "k_proj_bias",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.v_proj.bias": "v_proj_bias",
    "self_attn.out_proj.weight": "out_proj",
    "self_attn.out_proj.bias": "out_proj_bias",
    "self_attn_layer_norm.weight": "self_attn_layer_norm",
    "self_attn_layer_norm.bias": "self_attn_layer_norm_bias",
    "fc1.weight": "fc1",
    "fc1.bias": "fc1_bias",
    "fc2.weight": "fc2",
    "fc2.bias": "fc2_bias",
    "final_layer_norm.weight": "final_layer_norm",
    "final_layer_norm.bias": "final_layer_norm_bias",
}
HEADS = {
    "lm_head.weight": "lm_head",
    "score.weight": "score",
    "qa_outputs.weight": "qa_outputs",
    "qa_outputs.bias": "qa_outputs_bias",
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """One .safetensors file -> {name: read-only array}, memory-mapped (BF16 widened to float32 in memory)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: header length {header_len} exceeds the file size {size} or the limit")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    buffer = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        tensors[name] = _tensor(path, name, info, buffer, data_start, size)
    return tensors


def _tensor(path, name, info, buffer, data_start, size):
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which refimpl cannot read")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    itemsize = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
    count = int(np.prod(shape, dtype=np.int64))
    if not (0 <= begin <= end <= size - data_start) or end - begin != count * itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} ({dtype_name} {list(shape)}) has byte range [{begin}, {end}) "
                              f"that does not fit the file or the shape")
    raw = buffer[data_start + begin: data_start + end]
    if dtype == "bf16":
        bits = raw.view(np.uint16).astype(np.uint32) << 16  # bfloat16 is the top half of a float32
        return bits.view(np.float32).reshape(shape)
    return raw.view(dtype).reshape(shape)


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A checkpoint folder -> all its tensors: model.safetensors, or the shards of model.safetensors.index.json."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return read_safetensors(single)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(os.path.join(path, shard)))
        return tensors
    present = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if any(name.endswith(".bin") for name in present):
        raise CheckpointError(f"{path}: only PyTorch .bin weights found; refimpl reads safetensors "
                              "(convert with safetensors, or wait for the .bin reader)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (found: {present})")


def strip_prefix(name: str, family: str) -> str:
    """'model.layers.0...' -> 'layers.0...'; OPT also drops 'decoder.' (Hub OPT files lack the 'model.' prefix)."""
    if name.startswith("model."):
        name = name[len("model."):]
    if family == "opt" and name.startswith("decoder."):
        name = name[len("decoder."):]
    return name


def rename(tensors: dict, family: str, num_layers: int) -> tuple[dict, list[dict]]:
    """HF names -> ({top-level name: array}, [per-layer {name: array}]). Unknown names raise CheckpointError."""
    top_table, layer_table = (OPT_TOP, OPT_LAYER) if family == "opt" else (LLAMA_TOP, LLAMA_LAYER)
    top, layers = {}, [{} for _ in range(num_layers)]
    for hf_name, array in tensors.items():
        name = strip_prefix(hf_name, family)
        if name in HEADS:
            top[HEADS[name]] = array
        elif name in top_table:
            top[top_table[name]] = array
        elif name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if not index.isdigit() or int(index) >= num_layers or rest not in layer_table:
                raise CheckpointError(f"checkpoint tensor {hf_name!r} is not a parameter of this {family} model "
                                      f"({num_layers} layers)")
            layers[int(index)][layer_table[rest]] = array
        else:
            raise CheckpointError(f"checkpoint tensor {hf_name!r} is not a parameter of a {family} model")
    return top, layers


def take(store: dict, name: str, shape: tuple, dtype, where: str = ""):
    """store[name] checked against shape and cast to the compute dtype (no copy when it already matches)."""
    if name not in store:
        raise CheckpointError(f"checkpoint is missing the tensor {where}{name} (expected shape {list(shape)})")
    array = store.pop(name)
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"checkpoint tensor {where}{name} has shape {list(array.shape)}, "
                              f"the config implies {list(shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise CheckpointError(f"checkpoint tensor {where}{name} has dtype {array.dtype}, expected a float type")
    return np.asarray(array, dtype=dtype)
