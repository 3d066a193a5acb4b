"""Checkpoint files -> NumPy arrays, and the literal tables that name them.

Reads what people download: a Hugging Face folder holding model.safetensors (one file, or the shards listed in
model.safetensors.index.json) or pytorch_model.bin (one file or sharded; read without torch), fp32, fp16, bf16 or
fp64; a llama.cpp .gguf file (with the optional `gguf` package); or a folder of Meta's original Llama 2 checkpoint
(params.json + consolidated.NN.pth, refimpl/formats/meta.py). The readers, each treating its file as hostile,
live in refimpl/formats/; this module picks one and maps names. The tables map Hugging Face tensor names to
refimpl's; every expected tensor must be found with its shape and every tensor in the file must be used (head
tensors of another class excepted), else a CheckpointError names the first one that is not.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .config import from_hf_config, read_config
from .errors import CheckpointError, ConfigError
from .formats.common import Stored, human_bytes, report, show_progress
from .formats.gguf import read_gguf_file
from .formats.meta import is_meta_folder, list_meta, meta_shard_files, read_meta_config
from .formats.safetensors import list_safetensors
from .formats.torch_bin import list_torch_bin
from .formats.untrusted import layer_index, summary
from .stored import StoredMatrix


def list_gguf(path: str) -> dict[str, Stored]:
    return read_gguf_file(path)[1]


# What a checkpoint folder may hold, in transformers' order of preference: (single file, index of shards, reader).
CHECKPOINT_FILES = (
    ("model.safetensors", "model.safetensors.index.json", list_safetensors),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", list_torch_bin),
)
# A file named directly: suffix -> reader.
FILE_READERS = {".safetensors": list_safetensors, ".bin": list_torch_bin, ".gguf": list_gguf}

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
# Buffers that transformers < 4.31 saved with the weights (Llama, Open-Llama on the Hub); like transformers
# (_keys_to_ignore_on_load_unexpected), refimpl recomputes them from the config and skips them.
IGNORED_LAYER = ("self_attn.rotary_emb.inv_freq",)
# Prefixes stripped before the tables apply: save_pretrained writes "model." (OPT: "model.decoder."); the Hub's OPT
# files were saved from OPTModel and start with "decoder.".
PREFIXES = {"llama": ("model.",), "opt": ("model.decoder.", "decoder.")}
HEADS = {
    "lm_head.weight": "lm_head",
    "score.weight": "score",
    "qa_outputs.weight": "qa_outputs",
    "qa_outputs.bias": "qa_outputs_bias",
}


def checkpoint_files(path) -> tuple[list[str], object, dict | None]:
    """A checkpoint folder or file -> (the files holding its tensors, their reader, the shard index's weight_map)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        for suffix, reader in FILE_READERS.items():
            if path.endswith(suffix):
                return [path], reader, None
        raise CheckpointError(f"{path}: not a .safetensors, .bin or .gguf file")
    if is_meta_folder(path):  # Meta's model-parallel shards, each a torch zip; list_checkpoint joins them (list_meta)
        return meta_shard_files(path), list_torch_bin, None
    for single, index, reader in CHECKPOINT_FILES:
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)], reader, None
        if os.path.isfile(os.path.join(path, index)):
            weight_map = read_index(os.path.join(path, index))
            return [os.path.join(path, shard) for shard in sorted(set(weight_map.values()))], reader, weight_map
    present = sorted(os.listdir(path)) if os.path.isdir(path) else []
    raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json, nor Meta's "
                          f"params.json + consolidated.NN.pth (found: {present[:20]})")


def read_index(path: str) -> dict[str, str]:
    """A *.index.json -> its weight_map {tensor name: shard file}; shard names must be plain names in the folder."""
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (ValueError, RecursionError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a JSON object with a weight_map ({type(exc).__name__})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: weight_map is missing or empty")
    for name, shard in weight_map.items():
        # a shard name like "../../.ssh/id_rsa" must not lead the reader out of the checkpoint folder
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{path}: tensor {name!r} is mapped to {str(shard)[:80]!r}, not a file name in "
                                  "the checkpoint folder")
    return weight_map


def list_checkpoint(path, progress=None) -> dict[str, Stored]:
    """A checkpoint folder or file -> {name: Stored}: dtypes, shapes and byte counts, no tensor read yet.

    progress=None reports each file on stderr when stderr is a terminal; False is quiet, True always reports.
    """
    if is_meta_folder(path):
        return list_meta(path, progress)  # one Stored per transformers tensor, joined from every shard
    files, reader, weight_map = checkpoint_files(path)
    verbose = show_progress(progress)
    stored, shard_of = {}, {}
    for i, file in enumerate(files, 1):
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: listed in the shard index, but there is no such file")
        report(verbose, f"reading {i}/{len(files)} {os.path.basename(file)} ({human_bytes(os.path.getsize(file))})")
        for name, tensor in reader(file).items():
            if name in stored:
                raise CheckpointError(f"tensor {name!r} is in both {shard_of[name]} and {os.path.basename(file)}")
            stored[name], shard_of[name] = tensor, os.path.basename(file)
    if weight_map is not None:
        _check_index(path, weight_map, shard_of)
    return stored


def _check_index(path, weight_map, shard_of):
    for name, shard in weight_map.items():
        if shard_of.get(name) != shard:
            raise CheckpointError(f"{path}: the index puts {name!r} in {shard}, but it is not there")
    for name, shard in shard_of.items():
        if name not in weight_map:
            raise CheckpointError(f"{path}: {shard} holds {name!r}, which the index does not list")


def read_checkpoint(path, progress=None) -> dict[str, np.ndarray]:
    """A checkpoint folder or file -> all its tensors: memory-mapped views (F32, F16, F64), BF16 widened exactly to
    float32, GGUF blocks dequantized to float32 and Q/K rows un-permuted."""
    return {name: tensor.load() for name, tensor in list_checkpoint(path, progress).items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """One .safetensors file -> {name: read-only array}, memory-mapped (BF16 widened to float32 in memory)."""
    return {name: tensor.load() for name, tensor in list_safetensors(os.fspath(path)).items()}


def read_gguf(path) -> tuple[dict, dict[str, np.ndarray]]:
    """A Llama .gguf file -> (config.json-style dict, {transformers tensor name: array})."""
    config, stored = read_gguf_file(os.fspath(path))
    return config, {name: tensor.load() for name, tensor in stored.items()}


def read_model_config(path):
    """config.json of a checkpoint folder, the metadata of a .gguf file, or a Meta folder's params.json (as
    transformers' conversion script turns it into a config.json) -> a config dataclass."""
    path = os.fspath(path)
    if path.endswith(".gguf") and os.path.isfile(path):
        return from_hf_config(read_gguf_file(path)[0])
    if is_meta_folder(path):
        return from_hf_config(read_meta_config(path))
    return read_config(path)


def parameter_dtype(dtype, weights_dtype=None):
    """What load does with the matrices. weights_dtype=None or "stored" (the default): keep them as the file stores
    them, widened per product (-> None). A NumPy float dtype: convert every matrix to it at load (-> that dtype;
    the whole model in memory, as refimpl did before it kept weights stored)."""
    if weights_dtype is None or (isinstance(weights_dtype, str) and weights_dtype == "stored"):
        return None
    try:
        scalar = np.dtype(weights_dtype).type
    except TypeError:
        scalar = None
    if scalar not in (np.float16, np.float32, np.float64):
        raise ConfigError(f"weights_dtype={weights_dtype!r}: expected None, 'stored', float16, float32 or float64")
    return scalar


def strip_prefix(name: str, family: str) -> str:
    """'model.layers.0...' -> 'layers.0...'; OPT: 'model.decoder.layers.0...' or 'decoder.layers.0...' likewise."""
    for prefix in PREFIXES[family]:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def rename(tensors: dict, family: str, num_layers: int) -> tuple[dict, list[dict]]:
    """HF names -> ({top-level name: array}, [per-layer {name: array}]). Each file name is exactly one parameter:
    an unknown name, a layer index written otherwise than Python writes it or >= num_layers, or two names for one
    parameter ('model.norm.weight' beside 'norm.weight', 'layers.00.' beside 'layers.0.') raise CheckpointError.
    Layers are gathered by index and listed only once all are present: nothing is made per configured layer first."""
    top, by_index, source = {}, {}, {}  # source: (layer index or None, refimpl name) -> the file's name for it
    for hf_name, array in tensors.items():
        target = _parameter(hf_name, family, num_layers)
        if target is None:
            continue  # a buffer that transformers recomputes
        if target in source:
            raise CheckpointError(f"checkpoint tensors {summary(source[target])} and {summary(hf_name)} are two names "
                                  f"for one parameter ({_spelled(target)}); a checkpoint names each parameter once")
        source[target] = hf_name
        index, name = target
        (top if index is None else by_index.setdefault(index, {}))[name] = array
    return top, _layer_list(by_index, num_layers)


def _parameter(hf_name: str, family: str, num_layers: int):
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'up_proj'); 'model.norm.weight' -> (None, 'norm'); None for a
    skipped buffer. Anything else raises CheckpointError."""
    top_table, layer_table = (OPT_TOP, OPT_LAYER) if family == "opt" else (LLAMA_TOP, LLAMA_LAYER)
    name = strip_prefix(hf_name, family)
    if name in HEADS:
        return None, HEADS[name]
    if name in top_table:
        return None, top_table[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers":
        index = layer_index(parts[1])  # '0', '12'; never '012', '+1', ' 1' or a non-ASCII digit
        if index is not None and index < num_layers and (parts[2] in layer_table or parts[2] in IGNORED_LAYER):
            return None if parts[2] in IGNORED_LAYER else (index, layer_table[parts[2]])
        raise CheckpointError(f"checkpoint tensor {summary(hf_name)} is not a parameter of this {family} model "
                              f"({num_layers} layers, numbered 0, 1, ... without leading zeros)")
    raise CheckpointError(f"checkpoint tensor {summary(hf_name)} is not a parameter of a {family} model")


def _spelled(target) -> str:
    index, name = target
    return name if index is None else f"layers.{index}.{name}"


def _layer_list(by_index: dict, num_layers: int) -> list[dict]:
    """{index: {name: array}} -> [one dict per layer]; a layer with no tensor at all is named."""
    if len(by_index) != num_layers:  # every index is < num_layers, so some layer is missing: find the first
        missing = next(i for i in range(num_layers) if i not in by_index)
        raise CheckpointError(f"checkpoint has no tensor of layer {missing} (the config has {num_layers} layers)")
    return [by_index[i] for i in range(num_layers)]


FLOAT_STORAGE = ("F16", "BF16", "F32", "F64")  # plus every quantized GGUF type, which dequantizes to float32
NON_FLOAT_STORAGE = ("I64", "I32", "I16", "I8", "U8", "BOOL")
NO_COPY = {("F32", np.float32), ("F64", np.float64)}  # stored dtype == compute dtype: the memory map is the parameter


def take(store: dict, name: str, shape: tuple, dtype, where: str = ""):
    """store[name] (a Stored record) checked against shape -> the parameter computing in `dtype`.

    Vectors (norms, biases) are read into `dtype` now; they are a few KB. Matrices stay where the file keeps them:
    the memory map itself when its dtype is the compute dtype, else a StoredMatrix that widens per product.
    """
    if name not in store:
        raise CheckpointError(f"checkpoint is missing the tensor {where}{name} (expected shape {list(shape)})")
    stored = store.pop(name)
    if tuple(stored.shape) != tuple(shape):
        raise CheckpointError(f"checkpoint tensor {where}{name} has shape {list(stored.shape)}, "
                              f"the config implies {list(shape)}")
    if stored.dtype in NON_FLOAT_STORAGE:
        raise CheckpointError(f"checkpoint tensor {where}{name} has dtype {stored.dtype}, expected a float type")
    if len(shape) != 2 or stored.rows is None:
        return np.asarray(stored.load(), dtype=dtype)
    if (stored.dtype, np.dtype(dtype).type) in NO_COPY and stored.view:
        return stored.load()
    return StoredMatrix(stored.rows, shape, stored.dtype, dtype, f"{where}{name}", stored.blocks)


def convert_weights(params: dict, weights_dtype) -> dict:
    """Every StoredMatrix of a parameter tree converted at load to weights_dtype (the weights_dtype=float16/32/64
    option): an in-memory array when that is the compute dtype, else an in-memory StoredMatrix widened per product."""
    def convert(value):
        if isinstance(value, StoredMatrix):
            array = np.asarray(value).astype(weights_dtype, copy=False)
            if array.dtype == value.dtype:
                return array
            return StoredMatrix(lambda a, b: array[a:b], value.shape, array.dtype.name, value.dtype, value.name)
        if isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype != weights_dtype:
            array = value.astype(weights_dtype)
            return StoredMatrix(lambda a, b: array[a:b], value.shape, array.dtype.name, value.dtype) \
                if array.dtype != value.dtype else array
        return value

    done = {}  # tied embeddings stay one object
    out = {}
    for key, value in params.items():
        if key == "layers":
            out[key] = [{k: convert(v) for k, v in layer.items()} for layer in value]
        else:
            if id(value) not in done:
                done[id(value)] = convert(value)
            out[key] = done[id(value)]
    return out
