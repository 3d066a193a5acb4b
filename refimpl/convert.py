"""`refimpl convert SRC DST`: any checkpoint refimpl reads -> a Hugging Face folder, as save_pretrained writes one.

SRC is a Hugging Face folder (safetensors or .bin, sharded or not), a .gguf file, or Meta's params.json +
consolidated.NN.pth folder. DST gets config.json, generation_config.json (SRC's, or for Meta the one transformers'
conversion script writes), model.safetensors or model-0000k-of-0000n.safetensors shards with
model.safetensors.index.json (split by transformers' rule), and SRC's tokenizer files. Each tensor keeps its stored
dtype (BF16 bits stay BF16; GGUF blocks are dequantized to F32) unless `dtype` asks for another. Memory stays bounded:
each file's header is computed from the shapes first, then tensors are streamed in a tile of rows at a time.
Everything is written into a temporary folder beside DST and renamed into place once complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import tempfile

import numpy as np

from .errors import InputError
from .formats.common import NUMPY_DTYPES, bf16_to_f32, element_count, human_bytes, report, show_progress
from .formats.gguf import read_gguf_file
from .formats.meta import is_meta_folder, read_meta_config
from .stored import tile_rows
from .weights import HEADS, IGNORED_LAYER, list_checkpoint, strip_prefix

MAX_SHARD_SIZE = "5GB"  # save_pretrained's default
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3,  # huggingface_hub's parse_size_to_int
              "TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}
DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}  # --dtype -> safetensors dtype
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
NON_FLOAT_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")
TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}  # config.json torch_dtype
# The safetensors library lays out a file's tensors by dtype in this order, then by name (its Rust Dtype ordering).
SAFETENSORS_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
# What write_model writes for a Meta checkpoint (GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, ...)).
META_GENERATION_CONFIG = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "temperature": 0.6, "top_p": 0.9}

# The order in which the transformers modules register their parameters (model.state_dict()), which save_pretrained
# follows when it fills shards: (modules before the layers, a layer's modules, modules after the layers).
MODULE_ORDER = {
    "llama": (("embed_tokens",),
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"),
              ("norm", "lm_head", "score", "qa_outputs")),
    "open-llama": (("embed_tokens", "embed_layer_norm"),
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                    "mlp.down_proj", "mlp.up_proj", "input_layernorm", "post_attention_layernorm"),
                   ("norm", "lm_head", "score")),
    "opt": (("embed_tokens", "embed_positions", "project_out", "project_in", "final_layer_norm"),  # OPTDecoder
            ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "self_attn_layer_norm",
             "fc1", "fc2", "final_layer_norm"),
            ("lm_head", "score", "qa_outputs")),
}


def parse_size(size) -> int:
    """'5GB' -> 5 * 10**9, '500MB', '2GiB', or an int of bytes (what save_pretrained's max_shard_size accepts)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)\s*", str(size), re.IGNORECASE)
    if match is None or float(match.group(1)) * SIZE_UNITS[match.group(2).upper()] < 1:
        raise InputError(f"--max-shard-size {str(size)[:40]!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def convert_checkpoint(src, dst, max_shard_bytes=MAX_SHARD_SIZE, dtype=None, force=False, progress=None) -> str:
    """SRC checkpoint -> DST Hugging Face folder (see the module docstring); -> DST.

    dtype None keeps each tensor's stored dtype; "f32", "f16" or "bf16" converts every float tensor (bf16 rounds to
    nearest even, as torch does). DST must not exist; force=True replaces it, only once the new folder is complete.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    out_dtype = _dtype_option(dtype)
    max_bytes = parse_size(max_shard_bytes)
    _check_destination(src, dst, force)
    verbose = show_progress(progress)
    config, tensors = read_source(src)  # checked as refimpl.load checks it, before anything is written
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dst))}.", suffix=".partial", dir=parent)
    try:
        entries = [(name, stored, output_dtype(stored.dtype, out_dtype)) for name, stored in tensors]
        write_weights(tmp, entries, max_bytes, verbose)
        write_configs(src, tmp, config, entries)
        _install(tmp, dst, force)
    except BaseException:  # an error or ^C: nothing is left behind, and an existing DST is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _dtype_option(dtype):
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise InputError(f"dtype={str(dtype)[:20]!r}: choose f32, f16 or bf16 (or None to keep the stored dtypes)")
    return DTYPES[dtype]


def _check_destination(src, dst, force):
    if os.path.lexists(dst) and not force:
        raise InputError(f"{dst} exists: refimpl convert writes a new folder (give --force to replace it once the "
                         "new one is complete)")
    source, target = os.path.realpath(src), os.path.realpath(dst)
    if os.path.commonpath([source, target]) == target:
        raise InputError(f"{dst} is or holds the source {src}: replacing it would delete what is being converted")


# --- reading the source ---------------------------------------------------------------------------------------------

def read_source(src):
    """SRC -> (config.json dict, [(Hugging Face name, Stored)] in the order save_pretrained would write them)."""
    from . import load

    if os.path.isfile(src) and not src.endswith(".gguf"):
        raise InputError(f"{src}: give the checkpoint folder (a .safetensors or .bin file needs its config.json)")
    # refimpl.load checks that every tensor is a parameter with the shape the config implies. At float64 it reads
    # only the norms: no checkpoint stores float64 matrices for real, so every matrix stays a lazy StoredMatrix.
    model = load(src, dtype=np.float64)
    config = source_config(src)
    family = "opt" if model.config.family == "opt" else "llama"
    stored = list_checkpoint(src, progress=False)
    kept = [(name, tensor) for name, tensor in stored.items() if _saved(name, family, model.params)]
    return config, sorted(kept, key=lambda item: module_order(item[0], model.config.family))


def source_config(src) -> dict:
    if is_meta_folder(src):
        return read_meta_config(src)
    if src.endswith(".gguf"):
        return read_gguf_file(src)[0]
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        return json.load(f)  # refimpl.load parsed and checked this file a moment ago


def _saved(name, family, params) -> bool:
    """Would save_pretrained of the loaded model write this tensor? Not a recomputed rotary buffer, not a head the
    class lacks, not an lm_head tied to the embedding (transformers drops tied copies)."""
    short = strip_prefix(name, family)
    if short.startswith("layers.") and short.split(".", 2)[-1] in IGNORED_LAYER:
        return False
    if short in HEADS:
        param = params.get(HEADS[short])
        return param is not None and param is not params.get("embed_tokens")
    return True


def module_order(name, family):
    """Sort key: the position of a tensor in the transformers model's state_dict (weight before bias)."""
    before, layer, after = MODULE_ORDER[family]
    module, _, kind = strip_prefix(name, "opt" if family == "opt" else "llama").rpartition(".")
    rank = ("weight", "bias").index(kind) if kind in ("weight", "bias") else 2
    if module.startswith("layers."):
        _, index, rest = module.split(".", 2)
        return (1, int(index), _position(layer, rest), rank, name)
    if module in before:
        return (0, 0, before.index(module), rank, name)
    return (2, 0, _position(after, module), rank, name)


def _position(names, name):
    return names.index(name) if name in names else len(names)


def output_dtype(stored_dtype: str, dtype) -> str:
    """The dtype a tensor is written in: integers as they are, floats as asked, else stored; GGUF blocks as F32."""
    if stored_dtype in NON_FLOAT_DTYPES:
        return stored_dtype
    if dtype is not None:
        return dtype
    return stored_dtype if stored_dtype in FLOAT_DTYPES else "F32"


# --- writing safetensors --------------------------------------------------------------------------------------------

def nbytes(entry) -> int:
    name, stored, dtype = entry
    return element_count(stored.shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize


def shard_plan(entries, max_bytes) -> list[list]:
    """Entries in state_dict order -> shards, as huggingface_hub's split_state_dict_into_shards_factory fills them: a
    new shard when the next tensor would overflow this one; a tensor over the limit gets a shard of its own."""
    shards, current, size = [], [], 0
    for entry in entries:
        n = nbytes(entry)
        if n > max_bytes:
            shards.append([entry])
            continue
        if size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current:
        shards.append(current)
    return shards


def write_weights(folder, entries, max_bytes, verbose):
    """model.safetensors, or model-0000k-of-0000n.safetensors shards and model.safetensors.index.json."""
    shards = shard_plan(entries, max_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    for k, (file, shard) in enumerate(zip(names, shards), 1):
        report(verbose, f"writing {k}/{len(shards)} {file} ({human_bytes(sum(nbytes(e) for e in shard))}, "
                        f"{len(shard)} tensors)")
        write_safetensors(os.path.join(folder, file), shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes(e) for e in entries)},
                 "weight_map": {name: file for file, shard in zip(names, shards) for name, _, _ in shard}}
        _write_json(os.path.join(folder, "model.safetensors.index.json"), index)


def write_safetensors(path, entries):
    """One .safetensors file laid out as the safetensors library lays it out; the header is computed from shapes and
    dtypes first, then each tensor is streamed in and its byte count checked against the header."""
    entries = sorted(entries, key=lambda e: (SAFETENSORS_ORDER.index(e[2]), e[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in entries:
        name, stored, dtype = entry
        header[name] = {"dtype": dtype, "shape": list(stored.shape), "data_offsets": [offset, offset + nbytes(entry)]}
        offset += nbytes(entry)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the library pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for entry in entries:
            written = write_tensor(f, entry[1], entry[2])
            if written != nbytes(entry):
                raise InputError(f"{entry[0]}: wrote {written} bytes, the header says {nbytes(entry)}")


def write_tensor(f, stored, dtype) -> int:
    """Stream one tensor into f as `dtype`, a tile of rows at a time (only vectors are read whole); -> bytes written."""
    written = 0
    for block in stored_blocks(stored):
        data = encode(block, stored.dtype, dtype)
        f.write(data.tobytes())
        written += data.nbytes
    return written


def stored_blocks(stored):
    """The tensor as stored, in tiles of rows (refimpl.stored's tile size); anything but a matrix in one block."""
    if len(stored.shape) != 2 or stored.rows is None:
        yield stored.load()
        return
    step = tile_rows(stored.shape)
    for start in range(0, stored.shape[0], step):
        yield stored.rows(start, min(start + step, stored.shape[0]))  # [rows, D]


def encode(block: np.ndarray, stored_dtype: str, dtype: str) -> np.ndarray:
    """A block as read (values, BF16 bits from rows, or BF16 values widened by load) -> little-endian `dtype`."""
    if stored_dtype == "BF16" and block.dtype.kind == "u":  # bfloat16 bit patterns
        if dtype == "BF16":
            return np.ascontiguousarray(block, dtype="<u2")
        block = bf16_to_f32(block)
    if dtype == "BF16":
        return f32_to_bf16_bits(block)  # exact for values that came from bfloat16
    return np.ascontiguousarray(block, dtype=NUMPY_DTYPES[dtype])


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns rounded to nearest even, as torch's tensor.to(torch.bfloat16) on the CPU:
    its vectorised cast writes every NaN as 0xFFFF (its scalar path would write 0x7FC0)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return np.where(np.isnan(x), np.uint16(0xFFFF), rounded).astype("<u2")


# --- configs, tokenizer, installing ---------------------------------------------------------------------------------

def write_configs(src, folder, config, entries):
    """config.json (torch_dtype: the first float tensor's dtype, as model.dtype), generation_config.json and the
    tokenizer files the source has (Meta: tokenizer.model alone; GGUF keeps its tokenizer inside, none is written)."""
    first = next((dtype for _, _, dtype in entries if dtype in FLOAT_DTYPES), None)
    _write_json(os.path.join(folder, "config.json"), {**config, "torch_dtype": TORCH_DTYPE.get(first)})
    source = None if src.endswith(".gguf") else src
    if is_meta_folder(src):
        _write_json(os.path.join(folder, "generation_config.json"), META_GENERATION_CONFIG)
    elif source is not None and os.path.isfile(os.path.join(source, "generation_config.json")):
        shutil.copyfile(os.path.join(source, "generation_config.json"), os.path.join(folder, "generation_config.json"))
    for name in TOKENIZER_FILES if source is not None else ():
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")  # as transformers writes its JSON files


def _install(tmp, dst, force):
    """Rename the finished folder to DST; with force, the old DST is moved aside first and deleted last."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    if not force:  # it appeared while we were writing
        raise InputError(f"{dst} exists: refimpl convert writes a new folder (give --force to replace it)")
    old = tmp + ".old"
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


# --- the command line ----------------------------------------------------------------------------------------------

def add_parser(subparsers):
    """Register `refimpl convert SRC DST [--max-shard-size 5GB] [--dtype f16] [--force] [--quiet]`."""
    p = subparsers.add_parser("convert", help="write any checkpoint refimpl reads (Meta, .bin, GGUF, safetensors) "
                              "as a Hugging Face safetensors folder")
    p.add_argument("src", help="a checkpoint folder (Hugging Face, or Meta's params.json + consolidated.NN.pth) or a "
                   ".gguf file")
    p.add_argument("dst", help="the folder to write; it must not exist (unless --force)")
    p.add_argument("--max-shard-size", default=MAX_SHARD_SIZE,
                   help="largest safetensors file before the weights are sharded, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="write every float tensor in this dtype (default: as stored; GGUF blocks as f32)")
    p.add_argument("--force", action="store_true", help="replace DST, once the new folder is complete")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    try:
        convert_checkpoint(args.src, args.dst, args.max_shard_size, args.dtype, args.force,
                           progress=False if args.quiet else None)
    except OSError as exc:  # a full disk, a folder we may not write
        print(f"refimpl: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0
