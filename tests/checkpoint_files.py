"""Writers for the checkpoint variants the format tests load: the golden models re-stored as sharded, fp16, bf16,
fp64 safetensors (NumPy only), .bin (needs torch) and GGUF (needs gguf), each in a temporary folder."""
from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np

from golden_cases import GOLDEN
from refimpl.weights import read_safetensors

SAFETENSORS_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                     np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8"}


def golden_tensors(case: str) -> dict[str, np.ndarray]:
    tensors = read_safetensors(os.path.join(GOLDEN, "models", case, "model.safetensors"))
    return {name: np.array(a) for name, a in tensors.items()}


def golden_config(case: str) -> dict:
    with open(os.path.join(GOLDEN, "models", case, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def new_folder(case: str, root, tag: str):
    """root/<case>-<tag>/ with the case's config.json and nothing else."""
    folder = os.path.join(root, f"{case}-{tag}")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(GOLDEN, "models", case, "config.json"), folder)
    return folder


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (what torch's .to(torch.bfloat16) does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def safetensors_bytes(tensors: dict, dtypes: dict | None = None, metadata: dict | None = None) -> bytes:
    """{name: array} -> the bytes of a .safetensors file; dtypes overrides the dtype name (e.g. 'BF16' for uint16)."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<")).tobytes()
        dtype = (dtypes or {}).get(name) or SAFETENSORS_NAMES[np.dtype(tensors[name].dtype)]
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the safetensors library pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_safetensors(path, tensors: dict, dtypes: dict | None = None) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, dtypes, {"format": "pt"}))


def split(names, shards: int) -> list[list[str]]:
    names = sorted(names)
    return [names[i::shards] for i in range(shards)]


def write_index(folder, index_name: str, parts: list[list[str]], shard_name) -> None:
    weight_map = {name: shard_name(i) for i, part in enumerate(parts) for name in part}
    with open(os.path.join(folder, index_name), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def safetensors_variant(case: str, root, kind: str) -> str:
    """The golden model re-stored as kind = 'sharded' (fp32, 3 shards), 'fp16', 'bf16' or 'fp64'."""
    tensors = golden_tensors(case)
    folder = new_folder(case, root, kind)
    if kind == "sharded":
        parts = split(tensors, 3)
        name = lambda i: f"model-{i + 1:05d}-of-00003.safetensors"  # noqa: E731
        for i, part in enumerate(parts):
            write_safetensors(os.path.join(folder, name(i)), {n: tensors[n] for n in part})
        write_index(folder, "model.safetensors.index.json", parts, name)
    elif kind == "bf16":
        write_safetensors(os.path.join(folder, "model.safetensors"), {n: to_bf16_bits(a) for n, a in tensors.items()},
                          {n: "BF16" for n in tensors})
    else:
        dtype = {"fp16": np.float16, "fp64": np.float64}[kind]
        write_safetensors(os.path.join(folder, "model.safetensors"), {n: a.astype(dtype) for n, a in tensors.items()})
    return folder


def rounded_tensors(case: str, kind: str) -> dict[str, np.ndarray]:
    """The golden weights after the storage rounding of `kind`, back in float32: what a lossless loader must give."""
    tensors = golden_tensors(case)
    if kind == "fp16":
        return {n: a.astype(np.float16).astype(np.float32) for n, a in tensors.items()}
    if kind == "bf16":
        return {n: from_bf16_bits(to_bf16_bits(a)) for n, a in tensors.items()}
    return tensors


def bin_variant(case: str, root, shards: int = 1, rename=None, extra: dict | None = None, dtype=None) -> str:
    """The golden model saved with torch.save as pytorch_model.bin (or `shards` shards + index), its tensors cast to
    `dtype` ("float16", "bfloat16") when given, as the OPT checkpoints ship in float16. Needs torch."""
    import torch

    tensors = {(rename(n) if rename else n): a for n, a in golden_tensors(case).items()}
    tensors.update(extra or {})
    folder = new_folder(case, root, f"bin{shards}{dtype or ''}")
    state = {n: torch.from_numpy(np.array(a)) for n, a in tensors.items()}
    if dtype is not None:
        state = {n: t.to(getattr(torch, dtype)) for n, t in state.items()}
    if shards == 1:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return folder
    parts = split(state, shards)
    name = lambda i: f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"  # noqa: E731
    for i, part in enumerate(parts):
        torch.save({n: state[n] for n in part}, os.path.join(folder, name(i)))
    write_index(folder, "pytorch_model.bin.index.json", parts, name)
    return folder


# transformers name -> llama.cpp name, as convert_hf_to_gguf.py maps them (the inverse of refimpl's GGUF table).
def gguf_name(name: str) -> str:
    from refimpl.formats.gguf import GGUF_LAYER, GGUF_TOP

    top = {hf: g for g, hf in GGUF_TOP.items()}
    if name in top:
        return top[name]
    _, _, index, rest = name.split(".", 3)  # model.layers.N.rest
    layer = {hf: g for g, hf in GGUF_LAYER.items()}
    return f"blk.{index}.{layer[rest]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: rows (head, 2, Dh/2) -> (head, Dh/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, case: str, qtype: str = "F32") -> str:
    """The golden Llama model as convert_hf_to_gguf.py would write it: metadata, permuted Q/K, F32 / F16 / Q8_0.

    As llama.cpp does, 1-D tensors (norms, biases) stay F32 whatever the file type."""
    import gguf

    cfg = golden_config(case)
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if cfg.get("rope_scaling"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg["rope_scaling"]["factor"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    for name, a in sorted(golden_tensors(case).items()):
        if ".q_proj." in name:
            a = permute(a, heads)
        elif ".k_proj." in name:
            a = permute(a, kv_heads)
        if a.ndim == 1 or qtype == "F32":
            writer.add_tensor(gguf_name(name), a.astype(np.float32))
        elif qtype == "F16":
            writer.add_tensor(gguf_name(name), a.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(a, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def quantized_tensors(case: str, qtype: str) -> dict[str, np.ndarray]:
    """The golden weights after a GGUF round trip of type qtype (2-D tensors only, as write_gguf does)."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    out = {}
    for name, a in golden_tensors(case).items():
        if a.ndim == 1 or qtype == "F32":
            out[name] = a
        elif qtype == "F16":
            out[name] = a.astype(np.float16).astype(np.float32)
        else:
            out[name] = gguf.quants.dequantize(gguf.quants.quantize(a, kind), kind).reshape(a.shape)
    return out


# --- .bin files without torch: the pickle opcodes torch.save emits, written by hand (protocol 2) -------------------

STORAGE_CLASSES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                   np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage"}


def op_str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def op_int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def op_ints(values) -> bytes:
    return b"(" + b"".join(op_int(v) for v in values) + b"t"  # MARK ... TUPLE


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def tensor_ops(storage_class: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    """_rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict()) as torch.save writes it."""
    storage = b"(" + op_str("storage") + op_global("torch", storage_class) + op_str(key) + op_str("cpu") + \
        op_int(numel) + b"tQ"  # MARK ... TUPLE BINPERSID
    hooks = op_global("collections", "OrderedDict") + b")R"  # EMPTY_TUPLE REDUCE
    return op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + op_int(offset) + op_ints(size) + \
        op_ints(stride) + b"\x89" + hooks + b"tR"  # NEWFALSE, TUPLE REDUCE


def state_dict_pickle(items: list[tuple[str, bytes]]) -> bytes:
    """OrderedDict(name -> value ops) as a protocol-2 pickle."""
    body = b"".join(op_str(name) + ops for name, ops in items)
    return b"\x80\x02" + op_global("collections", "OrderedDict") + b")R(" + body + b"u."  # SETITEMS STOP


def torch_zip(path, pickled: bytes, storages: dict, archive: str = "archive", compress=None) -> None:
    """A zip laid out as torch.save lays it out: <archive>/data.pkl, byteorder, data/<key>."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", pickled)
        z.writestr(f"{archive}/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"{archive}/data/{key}", raw, compress_type=compress or zipfile.ZIP_STORED)
        z.writestr(f"{archive}/version", "3\n")


def write_bin_numpy(path, tensors: dict) -> None:
    """{name: array} -> a torch-format .bin, one contiguous storage per tensor, without torch."""
    items, storages = [], {}
    for i, (name, a) in enumerate(tensors.items()):
        a = np.ascontiguousarray(a)
        stride = [s // a.itemsize for s in a.strides] if a.size else [1] * a.ndim
        items.append((name, tensor_ops(STORAGE_CLASSES[a.dtype], str(i), a.size, 0, a.shape, stride)))
        storages[str(i)] = a.astype(a.dtype.newbyteorder("<")).tobytes()
    torch_zip(path, state_dict_pickle(items), storages)
