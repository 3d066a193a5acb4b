"""GGUF files (llama.cpp) of the Llama family; quantized blocks are dequantized by the optional `gguf` package.

A GGUF file carries its own config (llama.* metadata), a tokenizer, and the tensors under llama.cpp's names, as F32,
F16 or quantized blocks (Q8_0, Q4_K, ...: whatever gguf.quants can dequantize). This reader maps the config and the
names back to transformers' spelling, so that an auditor can ask whether a GGUF conversion gives the logits of the
original checkpoint. The one quirk: convert_hf_to_gguf.py permutes the rows of q_proj and k_proj
(LlamaModel.permute) because llama.cpp rotates adjacent pairs where transformers rotates halves; `unpermute`
undoes it exactly.

The header is read here, not by gguf.GGUFReader, which trusts the counts in the file (an array that claims 2**62
elements makes it read past the end of the file until memory runs out). Layout (little-endian):

  'GGUF', version u32 (2 or 3), tensor count u64, metadata count u64
  metadata:     key (string), value type u32, value       string = u64 length + UTF-8 bytes
                an array is element type u32, count u64, elements
  tensor infos: name (string), n_dims u32, dims u64 each (fastest first), ggml type u32, offset u64
  padding to general.alignment (32 by default), then the data; tensor offsets count from there

Every count and length is checked against the bytes left in the file, and against a limit, before anything is
allocated or looped over; numeric arrays are NumPy views, string arrays are skipped length by length.
"""
from __future__ import annotations

import os
import struct
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError
from .common import Stored, check_ranges, element_count
from .untrusted import check_shape, error_text, layer_index, summary

# GGUF metadata key -> config.json field (convert_hf_to_gguf.py writes them from config.json).
GGUF_CONFIG = {
    "llama.vocab_size": "vocab_size",
    "llama.context_length": "max_position_embeddings",
    "llama.embedding_length": "hidden_size",
    "llama.feed_forward_length": "intermediate_size",
    "llama.block_count": "num_hidden_layers",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.key_length": "head_dim",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.rope.freq_base": "rope_theta",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")
ROPE_KEYS = ("llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
             "llama.rope.scale_linear", "llama.rope.dimension_count")

# llama.cpp tensor name -> transformers name; per block, "blk.N." -> "model.layers.N.".
GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
# Tensors whose rows convert_hf_to_gguf.py permuted, and the config field that gives the head count it used.
PERMUTED = {"attn_q.weight": "num_attention_heads", "attn_q.bias": "num_attention_heads",
            "attn_k.weight": "num_key_value_heads", "attn_k.bias": "num_key_value_heads"}
# ggml types memory-mapped as they are (NumPy order); every other type is rows of blocks for gguf.quants.dequantize.
VIEWS = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
DIRECT = ("F32", "F16", "F64")

# GGUF value type -> struct format (also a NumPy dtype string); 8 is a string, 9 an array.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_METADATA = 2**20  # metadata entries; a Llama GGUF has ~30
MAX_TENSORS = 2**16  # a 405B Llama has ~1,100
MAX_STRING = 2**20  # bytes in one string (a chat template is a few KB)
MAX_ARRAY_STRINGS = 2**22  # strings in all arrays together (a vocab and its merges: ~300,000 each)
MAX_GGUF_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32


class TensorInfo(NamedTuple):
    """One tensor of a GGUF file: its ggml type, its dims in ggml order (fastest first), its bytes as NumPy sees
    them (a view of the file: values for VIEWS types, else uint8 rows of quantized blocks)."""

    name: str
    kind: str  # "F32", "Q8_0", ...
    qtype: object  # gguf.GGMLQuantizationType
    dims: tuple
    start: int  # its first byte in the file
    nbytes: int
    data: np.ndarray


class MetadataArray(NamedTuple):
    """A metadata array. Not a bare NumPy array, so that `value == "llama"` on a hostile file stays one bool."""

    element_type: int  # a GGUF value type
    count: int
    values: object  # numeric: a read-only NumPy view of the file; strings: None (walked, not decoded)


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a .gguf file needs the gguf package: pip install 'refimpl[gguf]'") from None
    return gguf


def read_gguf_file(path: str) -> tuple[dict, dict[str, Stored]]:
    """A Llama GGUF file -> (config.json-style dict, {transformers name: Stored})."""
    gguf = import_gguf()
    fields, tensors = read_gguf_header(path, gguf)
    names = {t.name for t in tensors}
    config = gguf_config(path, fields, names, tensors)
    stored = {}
    for t in tensors:
        hf_name, rest = _hf_name(path, t.name, config["num_hidden_layers"])
        stored[hf_name] = _stored(path, gguf, t, config[PERMUTED[rest]] if rest in PERMUTED else None)
    return config, stored


def read_gguf_header(path: str, gguf) -> tuple[dict, list[TensorInfo]]:
    """-> ({metadata key: value}, [TensorInfo]), every count checked before it is used; no tensor byte is read."""
    size = os.path.getsize(path)
    if size < 24:
        raise CheckpointError(f"{path}: not a readable GGUF file: {size} bytes is shorter than a GGUF header")
    cursor = Cursor(path, np.memmap(path, dtype=np.uint8, mode="r"))
    if bytes(cursor.buffer[:4]) != b"GGUF":  # the bytes are not shown: the file may be a symlink to a secret
        raise CheckpointError(f"{path}: not a readable GGUF file: it does not start with 'GGUF'")
    version = struct.unpack_from("<I", cursor.buffer, 4)[0]
    if version not in (2, 3):
        raise CheckpointError(f"{path}: not a readable GGUF file: version {version}; refimpl reads little-endian "
                              "GGUF version 2 and 3")
    cursor.pos = 8
    tensor_count, kv_count = cursor.scalar("<Q", "the tensor count"), cursor.scalar("<Q", "the metadata count")
    if tensor_count > MAX_TENSORS or kv_count > MAX_METADATA:
        raise CheckpointError(f"{path}: not a readable GGUF file: it claims {tensor_count} tensors and {kv_count} "
                              f"metadata entries (limits {MAX_TENSORS} and {MAX_METADATA})")
    fields = {}
    for _ in range(kv_count):
        key = cursor.string("a metadata key")
        if key in fields:
            raise CheckpointError(f"{path}: not a readable GGUF file: metadata key {summary(key)} appears twice")
        fields[key] = cursor.value(cursor.scalar("<I", key), key)
    infos = [cursor.tensor_info() for _ in range(tensor_count)]
    alignment = _alignment(path, fields)
    return fields, _tensors(path, gguf, cursor.buffer, infos, _align(cursor.pos, alignment), alignment)


class Cursor:
    """A read position in the file; every read checks the bytes left before it reads, allocates or loops."""

    def __init__(self, path, buffer):
        self.path, self.buffer, self.pos, self.end = path, buffer, 0, buffer.shape[0]
        self.strings_left = MAX_ARRAY_STRINGS

    def fail(self, message):
        return CheckpointError(f"{self.path}: not a readable GGUF file: {message}")

    def take(self, n: int, what: str) -> int:
        """Advance over n bytes -> where they start; refused when fewer than n are left."""
        if n > self.end - self.pos:
            raise self.fail(f"{summary(what)} needs {n} bytes at byte {self.pos}, but the file ends at {self.end}")
        self.pos += n
        return self.pos - n

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if n > MAX_STRING:
            raise self.fail(f"{summary(what)} is a string of {n} bytes (limit {MAX_STRING})")
        start = self.take(n, what)
        try:
            return bytes(self.buffer[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{summary(what)} is not UTF-8") from None

    def value(self, vtype: int, key: str):
        """One metadata value: a Python scalar or str, or a MetadataArray."""
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], key)
        if vtype == STRING:
            return self.string(key)
        if vtype != ARRAY:
            raise self.fail(f"metadata {summary(key)} has value type {vtype}, which GGUF does not define")
        etype, count = self.scalar("<I", key), self.scalar("<Q", key)
        if etype in SCALARS:
            itemsize = struct.calcsize(SCALARS[etype])
            start = self.take(count * itemsize, key)  # checked against the file before anything is read
            return MetadataArray(etype, count, self.buffer[start:start + count * itemsize].view(SCALARS[etype]))
        if etype != STRING:
            raise self.fail(f"metadata {summary(key)} is an array of type {etype} (arrays of arrays are not read)")
        return self.skip_strings(count, key)

    def skip_strings(self, count: int, key: str) -> MetadataArray:
        """Walk an array of `count` strings without decoding them: each holds at least its 8-byte length."""
        if count * 8 > self.end - self.pos or count > self.strings_left:
            raise self.fail(f"metadata {summary(key)} claims {count} strings, more than the file holds (or the "
                            f"limit of {MAX_ARRAY_STRINGS} strings in arrays)")
        self.strings_left -= count
        for _ in range(count):
            n = self.scalar("<Q", key)
            if n > MAX_STRING:
                raise self.fail(f"metadata {summary(key)} holds a string of {n} bytes (limit {MAX_STRING})")
            self.take(n, key)
        return MetadataArray(STRING, count, None)

    def tensor_info(self) -> tuple:
        """(name, dims in ggml order, ggml type number, offset from the data start)."""
        name = self.string("a tensor name")
        n_dims = self.scalar("<I", name)
        if n_dims > MAX_GGUF_DIMS:
            raise self.fail(f"tensor {summary(name)} has {n_dims} dimensions; ggml tensors have at most "
                            f"{MAX_GGUF_DIMS}")
        dims = tuple(self.scalar("<Q", name) for _ in range(n_dims))
        return name, dims, self.scalar("<I", name), self.scalar("<Q", name)


def _alignment(path, fields) -> int:
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: not a readable GGUF file: general.alignment is {summary(alignment)}, not a "
                              "power of two")
    return alignment


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)


def _tensors(path, gguf, buffer, infos, data_start, alignment) -> list[TensorInfo]:
    """Tensor infos -> TensorInfo with views of the file, every byte range checked to lie in it, names unique."""
    tensors, seen = [], set()
    for name, dims, type_number, offset in infos:
        if name in seen:
            raise CheckpointError(f"{path}: not a readable GGUF file: tensor {summary(name)} appears twice")
        seen.add(name)
        tensors.append(_tensor(path, gguf, buffer, name, dims, type_number, data_start, offset, alignment))
    check_ranges(f"{path} (GGUF)", [(t.start, t.start + t.nbytes, t.name) for t in tensors], buffer.shape[0],
                 what="file")
    return tensors


def _tensor(path, gguf, buffer, name, dims, type_number, data_start, offset, alignment) -> TensorInfo:
    try:
        qtype = gguf.GGMLQuantizationType(type_number)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise CheckpointError(f"{path}: GGUF tensor {summary(name)} has ggml type {type_number}, which the gguf "
                              "package does not know") from None
    row = dims[0] if dims else 1  # ggml's fastest dim: whole blocks of `block` values
    if row % block:
        raise CheckpointError(f"{path}: GGUF tensor {summary(name)} has rows of {row} values, not whole "
                              f"{qtype.name} blocks of {block}")
    if offset % alignment:  # llama.cpp refuses such a file too
        raise CheckpointError(f"{path}: GGUF tensor {summary(name)} has offset {offset}, not a multiple of the "
                              f"alignment {alignment}")
    nbytes = element_count(dims) // block * type_size
    start = data_start + offset
    if start + nbytes > buffer.shape[0]:
        raise CheckpointError(f"{path}: not a readable GGUF file: tensor {summary(name)} has bytes [{start}, "
                              f"{start + nbytes}), past the end of the file ({buffer.shape[0]} bytes): truncated?")
    kind = qtype.name
    shape = check_shape(f"{path}: GGUF tensor {summary(name)}", tuple(reversed(dims)))  # NumPy order
    if kind in VIEWS:
        data = buffer[start:start + nbytes].view(VIEWS[kind]).reshape(shape)
    else:  # rows of blocks, as gguf.quants.dequantize takes them (fewer bytes than the values checked above)
        data = buffer[start:start + nbytes].reshape((*shape[:-1], row // block * type_size) if shape else (type_size,))
    return TensorInfo(name, kind, qtype, dims, start, nbytes, data)


def gguf_config(path: str, fields: dict, tensor_names: set, tensors: list) -> dict:
    """GGUF metadata -> a dict that refimpl.config.from_hf_config reads (model_type llama)."""
    architecture = fields.get("general.architecture")
    if architecture != "llama":
        raise CheckpointError(f"{path}: GGUF general.architecture is {summary(architecture)}; refimpl reads "
                              "'llama' GGUF files only")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path}: the GGUF holds rope_freqs.weight (llama3-style RoPE factors baked into a "
                              "tensor), which cannot be mapped back to a rope_scaling config")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_act": "silu"}  # llama.cpp's llama graph hard-codes SiLU: the file does not say
    for key, name in GGUF_CONFIG.items():
        if key in fields:
            config[name] = _number(path, key, fields[key], float if name in FLOAT_FIELDS else int)
    if "head_dim" not in config and "llama.rope.dimension_count" in fields:
        # Llama rotates the whole head, so llama.cpp's rotary dimension count is the head dim
        config["head_dim"] = _number(path, "llama.rope.dimension_count", fields["llama.rope.dimension_count"], int)
    embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if "vocab_size" not in config and embed is not None and len(embed.dims) == 2:
        config["vocab_size"] = embed.dims[-1]  # ggml order: (hidden, vocab)
    config["tie_word_embeddings"] = "output.weight" not in tensor_names  # llama.cpp reuses token_embd when absent
    config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config["mlp_bias"] = "blk.0.ffn_gate.bias" in tensor_names
    config["rope_scaling"] = _rope_scaling(path, fields)
    for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if name not in config:
            raise CheckpointError(f"{path}: the GGUF metadata has no {name} (llama.* key missing)")
    if config["num_hidden_layers"] > len(tensors):  # checked here, before anything is made per layer
        raise CheckpointError(f"{path}: GGUF llama.block_count is {config['num_hidden_layers']}, but the file holds "
                              f"{len(tensors)} tensors in all; every layer has several")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    return config


def _number(path, key, value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)) \
            or value < 0:
        raise CheckpointError(f"{path}: GGUF metadata {key} is {summary(value)}, expected one {kind.__name__} >= 0")
    if kind is float:
        # GGUF stores float32; the shortest decimal that round-trips it is the config.json value it came from (1e-05)
        return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))
    return value


def _rope_scaling(path, fields):
    kind = fields.get("llama.rope.scaling.type", "none")
    if not isinstance(kind, str):
        raise CheckpointError(f"{path}: GGUF rope scaling type is {summary(kind)}, not a string")
    factor = fields.get("llama.rope.scaling.factor", fields.get("llama.rope.scale_linear"))
    if kind == "none" and "llama.rope.scale_linear" in fields:
        kind = "linear"  # older GGUF files spell linear scaling as llama.rope.scale_linear
    if kind == "none":
        return None
    factor = _number(path, "llama.rope.scaling.factor", factor, float)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = _number(path, "llama.rope.scaling.original_context_length",
                           fields.get("llama.rope.scaling.original_context_length"), int)
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise CheckpointError(f"{path}: GGUF rope scaling type {summary(kind)} is not one refimpl maps back "
                          "(none, linear, yarn)")


def _hf_name(path: str, name: str, num_layers: int) -> tuple[str, str]:
    """'blk.3.attn_q.weight' -> ('model.layers.3.self_attn.q_proj.weight', 'attn_q.weight'). The index is written
    as Python writes it ('blk.03.' would be a second name for the same parameter) and below the block count."""
    if name in GGUF_TOP:
        return GGUF_TOP[name], name
    parts = name.split(".", 2)
    index = layer_index(parts[1]) if len(parts) == 3 and parts[0] == "blk" else None
    if index is not None and index < num_layers and parts[2] in GGUF_LAYER:
        return f"model.layers.{index}.{GGUF_LAYER[parts[2]]}", parts[2]
    raise CheckpointError(f"{path}: GGUF tensor {summary(name)} is not a parameter of a Llama model with "
                          f"{num_layers} layers (blocks are 'blk.N.', N from 0, no leading zeros)")


def _stored(path, gguf, tensor, heads) -> Stored:
    """One tensor: load() dequantizes (and un-permutes Q/K) the whole; rows(a, b) gathers and dequantizes a band."""
    kind, qtype, data = tensor.kind, tensor.qtype, tensor.data
    shape = tuple(reversed(tensor.dims))  # ggml lists dims fastest first

    def values(block, rows):
        if kind in DIRECT:
            return block.reshape(rows)
        try:
            return gguf.quants.dequantize(block, qtype).reshape(rows)
        except Exception as exc:  # NotImplementedError for a type gguf cannot dequantize, ValueError for junk
            raise CheckpointError(f"{path}: cannot dequantize {summary(tensor.name)} ({kind}): "
                                  f"{error_text(exc)}") from None

    def load():
        full = values(data, shape)
        return full if heads is None else unpermute(path, tensor.name, full, heads)

    order = None  # for q/k: the stored row of each transformers row, so a tile is un-permuted as it is gathered

    def rows(start, stop):
        nonlocal order
        if heads is not None and order is None:
            order = unpermute(path, tensor.name, np.arange(shape[0]), heads)
        block = data[start:stop] if order is None else data[order[start:stop]]
        return values(block, (stop - start, *shape[1:]))

    def blocks():
        nonlocal order
        if heads is not None and order is None:
            order = unpermute(path, tensor.name, np.arange(shape[0]), heads)
        return data, order

    quantized = kind not in VIEWS and len(shape) == 2
    return Stored(kind, shape, tensor.nbytes, load, rows, view=heads is None and kind in DIRECT,
                  blocks=blocks if quantized else None)


def unpermute(path: str, name: str, w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py LlamaModel.permute, whose rows go (head, 2, Dh/2) -> (head, Dh/2, 2).

    permute:   w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    inverse:   w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    """
    rows = w.shape[0] if w.ndim else 0
    if n_head <= 0 or not rows or rows % (2 * n_head):
        raise CheckpointError(f"{path}: GGUF tensor {name} has {rows} rows, not a multiple of 2 x {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
