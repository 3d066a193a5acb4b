"""Converted weights on disk: packed once, then memory-mapped by every later load (no conversion, little RSS).

A folder cache_dir/<checkpoint name>-<format>-<key>/ holds one .npy file per array of the packed parameter tree
(entry name + ".npy", and + ".scales.npy" for int8's block scales) and manifest.json, which lists the entries, which
of them are the same Weight (tied embeddings), the format and the key.

The key (fingerprint) addresses the checkpoint's content, not its name or dates: SHA-256 over LAYOUT_VERSION, the
format, the config as refimpl reads it, and for every file a conversion reads (config.json / params.json, the shard
index, every tensor file) its name, its size and hashed ranges of its bytes: the whole file up to FULL_HASH_BYTES;
above that the first HEAD_BYTES (at least the whole JSON header of a .safetensors file: every tensor's dtype, shape
and offsets) and SAMPLE_BLOCKS blocks of SAMPLE_BYTES at fixed offsets spread evenly to the file's end. Sampled, not
all of it, because the key is computed on every load: SHA-256 ran at 1.3 GiB/s here (one core, SHA-NI), so hashing
a 13.5 GB 7B checkpoint in full costs ~10 s of CPU and ~15 s at the 0.9 GB/s disk of docs/checkpoints.md, against
0.4 s for the whole cached load. The sample catches a replaced or re-saved file (another size, header or sampled
block), a changed config and any edit inside the hashed ranges; it does not catch an in-place edit of a large
file that keeps its size and touches no hashed byte. Such an edit is the only way to get a stale cache entry.

Loading trusts nothing in the folder: entry names must be plain file names (ENTRY_NAME, no "..", no separator),
the entries must be exactly those packing writes for the config, head and format (expected_layout), each .npy must
be a regular file whose shape, dtype and C order are the expected ones, and the manifest's key must be the folder's.
Anything else raises CheckpointError naming the entry; accel.loader then converts again and replaces the folder.
Writes are atomic: a temporary folder renamed into place; a replaced folder is first renamed aside, then deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid

import numpy as np

from refimpl.errors import CheckpointError
from refimpl.formats.safetensors import MAX_HEADER_BYTES
from refimpl.opt import POSITION_OFFSET, has_final_layer_norm
from refimpl.weights import checkpoint_files, read_model_config

from .cpu.linear import Weight
from .formats import QBLOCK

LAYOUT_VERSION = 2
FULL_HASH_BYTES = 64 << 20  # files up to this size (configs, small checkpoints) are hashed whole
HEAD_BYTES = 8 << 20  # of larger files: the start in full (headers, pickles, GGUF metadata) ...
SAMPLE_BLOCKS = 64  # ... and this many blocks
SAMPLE_BYTES = 64 << 10  # of this size, at evenly spread fixed offsets, the last one ending at the end of the file
SIDE_FILES = ("config.json", "params.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
ENTRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a dotted parameter name; ".." is refused separately
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.npy")
MAX_MANIFEST_BYTES = 1 << 24  # a 96-layer model's manifest is ~70 KB
STORED_DTYPE = {"fp32": np.float32, "fp16": np.uint16, "bf16": np.uint16, "int8": np.int8}


# --- the key ------------------------------------------------------------------------------------------------------

def fingerprint(path, fmt):
    """The cache key of a checkpoint converted to `fmt`: 32 hex digits of SHA-256 over LAYOUT_VERSION, the format,
    the config and every source file's name, size and hashed ranges (the module docstring says which and why)."""
    h = hashlib.sha256(f"refimpl-accel-cache:{LAYOUT_VERSION}:{fmt}\n".encode())
    h.update(repr(read_model_config(path)).encode() + b"\n")  # GGUF metadata and params.json as refimpl reads them
    for file in source_files(path):
        _hash_file(h, file)
    return h.hexdigest()[:32]


def source_files(path):
    """The files a conversion reads, sorted: a named file itself; in a folder its config, params.json and shard
    index where present, and its tensor files (refimpl.weights.checkpoint_files)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    side = [os.path.join(path, name) for name in SIDE_FILES if os.path.isfile(os.path.join(path, name))]
    return sorted(set(side + checkpoint_files(path)[0]))


def _hash_file(h, file):
    """Feed one file into h: its name and size, then each hashed range's offsets and bytes."""
    name = os.path.basename(file)
    if not os.path.isfile(file):  # a shard the index lists but the folder lacks: loading it will say so
        h.update(f"{name}\0missing\0".encode())
        return
    size = os.path.getsize(file)
    h.update(f"{name}\0{size}\0".encode())
    with open(file, "rb") as f:
        for start, stop in hashed_ranges(f, size, name.endswith(".safetensors")):
            f.seek(start)
            h.update(f"{start}:{stop}\0".encode())
            for done in range(start, stop, 1 << 20):
                h.update(f.read(min(1 << 20, stop - done)))


def hashed_ranges(f, size, safetensors=False):
    """[(start, stop)] of an open file that the key hashes: all of it up to FULL_HASH_BYTES; else its head
    (HEAD_BYTES, and at least a safetensors file's whole header) and SAMPLE_BLOCKS blocks at fixed offsets."""
    if size <= FULL_HASH_BYTES:
        return [(0, size)]
    head = min(size, max(HEAD_BYTES, _safetensors_header_end(f, size) if safetensors else 0))
    last = max(0, size - SAMPLE_BYTES)
    starts = sorted({i * last // max(1, SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)})
    return [(0, head)] + [(s, min(size, s + SAMPLE_BYTES)) for s in starts]


def _safetensors_header_end(f, size):
    """8 + the header length of a safetensors file, or 0 when that is not a plausible header (the reader refuses)."""
    f.seek(0)
    n = int.from_bytes(f.read(8).ljust(8, b"\0"), "little")
    return 8 + n if n <= min(MAX_HEADER_BYTES, size - 8) else 0


def folder_for(cache_dir, path, fmt, key=None):
    """cache_dir/<checkpoint name>-<format>-<key>, the key computed here unless given."""
    name = os.path.basename(os.path.normpath(os.fspath(path))) or "model"
    key = fingerprint(path, fmt) if key is None else key
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), f"{name}-{fmt}-{key}")


# --- what packing writes, from the config -------------------------------------------------------------------------

def expected_layout(config, head, fmt):
    """{entry name: spec} that packing (accel.packing.iter_packed) writes for this config, refimpl head ("base",
    "causal_lm", "seq_cls", "qa") and format; spec is ("array", shape) for a float32 array, ("weight", shape) for a
    matrix stored in fmt, or ("same_as", entry name) for a tied lm_head."""
    top, layer = (_opt_layout if config.family == "opt" else _llama_layout)(config)
    top.update(_head_layout(config, head, config.word_embed_proj_dim if config.family == "opt"
                            else config.hidden_size))
    entries = dict(top)
    for i in range(config.num_hidden_layers):
        entries.update({f"layers.{i}.{name}": spec for name, spec in layer.items()})
    return entries


def _llama_layout(c):
    """(top-level, per-layer) specs of a Llama / Open-Llama tree: refimpl.llama.llama_parameters' shapes, packed."""
    D, F = c.hidden_size, c.intermediate_size
    Hq, Hkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    top = {"embed_tokens": ("weight", (c.vocab_size, D)), "norm": ("array", (D,))}
    if c.use_stable_embedding:
        top.update(embed_layer_norm=("array", (D,)), embed_layer_norm_bias=("array", (D,)))
    layer = {"input_layernorm": ("array", (D,)), "post_attention_layernorm": ("array", (D,)),
             "qkv": ("weight", (Hq + 2 * Hkv, D)), "gate_up": ("weight", (2 * F, D)),
             "o_proj": ("weight", (D, Hq)), "down_proj": ("weight", (D, F))}
    if c.attention_bias:
        layer.update(qkv_bias=("array", (Hq + 2 * Hkv,)), o_proj_bias=("array", (D,)))
    if c.mlp_bias:
        layer.update(gate_up_bias=("array", (2 * F,)), down_proj_bias=("array", (D,)))
    return top, layer


def _opt_layout(c):
    """(top-level, per-layer) specs of an OPT tree: refimpl.opt.opt_parameters' shapes, packed."""
    D, E, F = c.hidden_size, c.word_embed_proj_dim, c.ffn_dim
    top = {"embed_tokens": ("weight", (c.vocab_size, E)),
           "embed_positions": ("array", (c.max_position_embeddings + POSITION_OFFSET, D))}
    if E != D:
        top.update(project_in=("weight", (D, E)), project_out=("weight", (E, D)))
    if has_final_layer_norm(c) and c.layer_norm_elementwise_affine:
        top.update(final_layer_norm=("array", (D,)), final_layer_norm_bias=("array", (D,)))
    layer = {"qkv": ("weight", (3 * D, D)), "out_proj": ("weight", (D, D)), "fc1": ("weight", (F, D)),
             "fc2": ("weight", (D, F))}
    if c.enable_bias:
        layer.update(qkv_bias=("array", (3 * D,)), out_proj_bias=("array", (D,)), fc1_bias=("array", (F,)),
                     fc2_bias=("array", (D,)))
    if c.layer_norm_elementwise_affine:
        layer.update({name: ("array", (D,)) for name in ("self_attn_layer_norm", "self_attn_layer_norm_bias",
                                                        "final_layer_norm", "final_layer_norm_bias")})
    return top, layer


def _head_layout(c, head, width):
    """The head's entries: refimpl.pretrained's _head_parameters (a tied lm_head is the embedding's Weight)."""
    if head == "causal_lm":
        if getattr(c, "shared_input_output_embedding", False):
            return {}
        if c.tie_word_embeddings:
            return {"lm_head": ("same_as", "embed_tokens")}
        return {"lm_head": ("weight", (c.vocab_size, width))}
    if head == "seq_cls":
        return {"score": ("array", (c.num_labels, width))}
    if head == "qa":
        return {"qa_outputs": ("array", (2, width)), "qa_outputs_bias": ("array", (2,))}
    return {}


def expected_files(name, spec, fmt):
    """{file name: (shape, dtype)} an entry's spec implies in a format (int8 matrices: codes and block scales)."""
    kind, shape = spec
    if kind == "array":
        return {name + ".npy": (tuple(shape), np.dtype(np.float32))}
    files = {name + ".npy": (tuple(shape), np.dtype(STORED_DTYPE[fmt]))}
    if fmt == "int8":
        files[name + ".scales.npy"] = ((shape[0], -(-shape[1] // QBLOCK)), np.dtype(np.float32))
    return files


# --- writing ------------------------------------------------------------------------------------------------------

def _flatten(params):
    """Param tree -> [(dotted name, leaf)] with layers as "layers.N.name"."""
    items = []
    for name, value in params.items():
        if name == "layers":
            for i, layer in enumerate(value):
                items += [(f"layers.{i}.{k}", v) for k, v in layer.items()]
        else:
            items.append((name, value))
    return items


def save(params, folder, key, fmt, progress=False, replace=False):
    """Write a packed tree into `folder` (atomically: a temporary folder renamed into place)."""
    save_entries(_flatten(params), folder, key, fmt, progress, replace)


def save_entries(entries, folder, key, fmt, progress=False, replace=False):
    """Write (dotted name, leaf) entries into `folder` one at a time, atomically (a temporary folder renamed into
    place). `entries` may be a generator that packs each layer only when it is reached (accel.packing.iter_packed):
    then no more than one packed layer is ever in memory, whatever the model's size. replace=True swaps out a
    folder already there (one that failed its check); otherwise an existing folder means another process converted
    first, and it is kept."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=".converting-")
    try:
        manifest = {"version": LAYOUT_VERSION, "key": key, "format": fmt, "entries": {}}
        seen, layer = {}, None
        for name, leaf in entries:
            if progress and name.startswith("layers.") and name.split(".")[1] != layer:
                layer = name.split(".")[1]
                print(f"refimpl: converting layer {layer}", file=sys.stderr, flush=True)
            if id(leaf) in seen:  # a tied lm_head: the embedding's Weight
                manifest["entries"][name] = {"same_as": seen[id(leaf)][0]}
                continue
            if not name.startswith("layers."):  # only top-level entries are ever shared; kept alive so that
                seen[id(leaf)] = (name, leaf)  # a freed layer's object id cannot be mistaken for one of them
            manifest["entries"][name] = _save_leaf(work, name, leaf)
        with open(os.path.join(work, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f)
        _put_in_place(work, folder, replace)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _put_in_place(work, folder, replace):
    """Rename the finished folder `work` to `folder`. With replace, an existing folder is renamed aside first and
    deleted after: at every moment `folder` is the old complete entry, absent, or the new complete one."""
    aside = os.path.join(os.path.dirname(os.path.abspath(folder)), f".stale-{uuid.uuid4().hex}")
    if replace:
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            pass  # another process moved it first
    try:
        os.rename(work, folder)
    except OSError:
        if not os.path.exists(os.path.join(folder, "manifest.json")):
            raise
        shutil.rmtree(work, ignore_errors=True)  # another process converted it first; load() checks theirs
    _remove(aside)


def _remove(path):
    """Delete a folder, file or link if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _save_leaf(work, name, leaf):
    if isinstance(leaf, Weight):
        np.save(os.path.join(work, name + ".npy"), leaf.data)
        if leaf.scales is not None:
            np.save(os.path.join(work, name + ".scales.npy"), leaf.scales)
        return {"weight": leaf.format}
    np.save(os.path.join(work, name + ".npy"), np.asarray(leaf))
    return {"array": True}


# --- reading, every entry checked ---------------------------------------------------------------------------------

def load(folder, layout, key, fmt):
    """The packed tree saved in `folder`, every array memory-mapped and checked against `layout` (expected_layout)
    and `key`; None when there is no such folder. A folder that fails any check raises CheckpointError naming the
    entry and what was expected and found: nothing in it is used."""
    manifest = read_manifest(folder, key)
    if manifest is None:
        return None
    entries = manifest["entries"]
    _check_names(folder, entries, layout)
    leaves = {}
    for name, spec in layout.items():  # the expected names, in packing order; never a name only the manifest has
        leaves[name] = _leaf(folder, name, spec, entries[name], fmt, leaves)
    return _nest(leaves)


def read_manifest(folder, key):
    """manifest.json of a cache folder, its version and key checked; None when the folder does not exist."""
    if not os.path.lexists(folder):
        return None
    file = os.path.join(folder, "manifest.json")
    _regular_file(file, "manifest.json")
    if os.path.getsize(file) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{file}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest refimpl wrote")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), dict):
        raise CheckpointError(f"{file}: not a JSON object with an entries object")
    if manifest.get("version") != LAYOUT_VERSION:
        raise CheckpointError(f"{file}: layout version {str(manifest.get('version'))[:20]!r}, expected "
                              f"{LAYOUT_VERSION}")
    if manifest.get("key") != key:
        raise CheckpointError(f"{file}: key {str(manifest.get('key'))[:40]!r}, expected {key!r} (the folder was made "
                              "for another checkpoint or format)")
    return manifest


def _check_names(folder, entries, layout):
    """Every manifest name a plain file name (no path), and the names exactly the layout's."""
    for name in entries:
        if not isinstance(name, str) or not ENTRY_NAME.fullmatch(name) or ".." in name:
            raise CheckpointError(f"{folder}: manifest entry {str(name)[:80]!r} is not a plain file name "
                                  f"({ENTRY_NAME.pattern}, no '..'); refusing a path out of the cache folder")
    for name in layout:
        if name not in entries:
            raise CheckpointError(f"{folder}: manifest has no entry {name!r}, which the config implies")
    for name in entries:
        if name not in layout:
            raise CheckpointError(f"{folder}: manifest entry {name!r} is not a parameter the config implies")


def _leaf(folder, name, spec, entry, fmt, leaves):
    """One entry's leaf: the tied entry's Weight, a checked float32 array, or a checked Weight in fmt."""
    kind = spec[0]
    want = {"same_as": {"same_as": spec[1]}, "array": {"array": True}, "weight": {"weight": fmt}}[kind]
    if entry != want:
        raise CheckpointError(f"{folder}: manifest entry {name!r} is {str(entry)[:80]}, expected {want}")
    if kind == "same_as":
        return leaves[spec[1]]
    arrays = [_mapped_checked(folder, name, file, shape, dtype)
              for file, (shape, dtype) in expected_files(name, spec, fmt).items()]
    return arrays[0] if kind == "array" else Weight(fmt, *arrays)


def _mapped_checked(folder, name, file, shape, dtype):
    """folder/file memory-mapped, refused unless a regular .npy of exactly this shape, dtype and C order."""
    if not FILE_NAME.fullmatch(file) or ".." in file:
        raise CheckpointError(f"{folder}: entry {name!r}: file name {file[:80]!r} is not a plain .npy file name")
    path = os.path.join(folder, file)
    _regular_file(path, f"entry {name!r}")
    try:
        array = _mapped(path)
    except (ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: entry {name!r} is not a readable .npy file ({exc}); expected shape "
                              f"{list(shape)} {dtype.name}") from None
    if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous:
        order = "" if array.flags.c_contiguous else " in Fortran order"
        raise CheckpointError(f"{path}: entry {name!r} has shape {list(array.shape)} {array.dtype.str}{order}, the "
                              f"config and format imply {list(shape)} {dtype.str}")
    return array


def _regular_file(path, what):
    """Refuse anything at path but a regular file: a link could lead out of the folder, a FIFO would block."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"{path}: {what} is missing from the cache folder ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: {what} is not a regular file (a link, folder or device); refused")


def _mapped(file):
    """A .npy file memory-mapped copy-on-write, as a plain writable ndarray (the array type every kernel compiled
    for: a read-only array would be another Numba specialisation)."""
    return np.lib.format.open_memmap(file, mode="c").view(np.ndarray)  # .npy only: never a pickle or an .npz


def _nest(leaves):
    """{"layers.N.name": leaf, "name": leaf} -> the param tree {"name": leaf, "layers": [{name: leaf}, ...]}."""
    params = {"layers": []}
    for name, leaf in leaves.items():
        if name.startswith("layers."):
            _, index, key = name.split(".", 2)
            while len(params["layers"]) <= int(index):
                params["layers"].append({})
            params["layers"][int(index)][key] = leaf
        else:
            params[name] = leaf
    return params
