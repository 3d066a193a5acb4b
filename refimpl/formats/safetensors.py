"""safetensors files, read with NumPy alone and memory-mapped.

Layout: an 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets"}} (and an
optional "__metadata__"), then the tensor bytes; data_offsets count from the end of the header. The file is hostile
until checked: the header is bounded and parsed without duplicate names, every entry's dtype, shape and byte count
must agree, and the byte ranges must tile the data exactly, as the safetensors library itself requires (no overlap,
no hole, nothing past the end of the file).
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..errors import CheckpointError
from .common import NUMPY_DTYPES, Stored, bf16_to_f32, element_count, is_dims
from .untrusted import check_shape, summary

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def list_safetensors(path: str) -> dict[str, Stored]:
    """One .safetensors file -> {name: Stored}, every entry checked; nothing is read but the header."""
    size = os.path.getsize(path)
    header, data_start = read_header(path, size)
    entries = {name: _entry(path, name, info) for name, info in header.items()}
    _check_tiling(path, entries, size - data_start)
    buffer = np.memmap(path, dtype=np.uint8, mode="r")  # read-only: pages are read when a tensor is used
    return {name: _stored(buffer[data_start + begin: data_start + end], dtype, shape, end - begin)
            for name, (dtype, shape, begin, end) in entries.items()}


def read_header(path: str, size: int) -> tuple[dict, int]:
    """-> ({name: entry}, offset of the first data byte). Refuses a header longer than the file or the limit."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        shown = "" if _is_link(path) else f" {header_len}"  # a link's target may be a secret: show none of its bytes
        if header_len > size - 8:
            raise CheckpointError(f"{path}: header length{shown} is larger than the file ({size} bytes)")
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length{shown} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        text = f.read(header_len)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: the safetensors __metadata__ is not a JSON object")
    return header, 8 + header_len


def _is_link(path: str) -> bool:
    """Whether the path or a folder above it is a symlink (as in the Hugging Face cache, or a hostile repository)."""
    return os.path.realpath(path) != os.path.abspath(path)


def _refuse_duplicates(pairs):
    # json.loads would keep the last of two equal names silently; a file could hide a tensor that way
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise CheckpointError(f"the safetensors header names {summary(duplicate)} twice")
    return dict(pairs)


def _entry(path: str, name: str, info) -> tuple[str, tuple, int, int]:
    """A header entry -> (dtype, shape, begin, end), with dtype, shape and byte count agreeing."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{path}: tensor {summary(name)} has a malformed header entry (needs dtype, shape, "
                              f"data_offsets): {summary(info)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in NUMPY_DTYPES:
        raise CheckpointError(f"{path}: tensor {summary(name)} has dtype {summary(dtype)}, which refimpl cannot "
                              f"read "
                              f"({', '.join(NUMPY_DTYPES)})")
    if not is_dims(shape):
        raise CheckpointError(f"{path}: tensor {summary(name)} has shape {summary(shape)}, not a list of sizes")
    if not is_dims(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: tensor {summary(name)} has data_offsets {summary(offsets)}, not [begin, end]")
    begin, end = offsets
    check_shape(f"{path}: tensor {summary(name)}", shape)
    needed = element_count(shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
    if end - begin != needed:
        raise CheckpointError(f"{path}: tensor {summary(name)} ({dtype} {summary(shape)}) needs {needed} bytes, but "
                              f"its byte range [{begin}, {end}) holds {end - begin}")
    return dtype, tuple(shape), begin, end


def _check_tiling(path: str, entries: dict, data_len: int) -> None:
    """The byte ranges, sorted, must follow one another from 0 to the end of the file."""
    previous_end, previous_name = 0, None
    for begin, end, name in sorted((e[2], e[3], name) for name, e in entries.items()):
        if end > data_len:
            raise CheckpointError(f"{path}: tensor {summary(name)} has byte range [{begin}, {end}) that does not fit "
                                  f"the file: the data section holds {data_len} bytes (truncated file or lying offset)")
        if begin < previous_end:
            raise CheckpointError(f"{path}: tensors {summary(previous_name)} and {summary(name)} overlap at data byte "
                                  f"{begin}")
        if begin > previous_end:
            raise CheckpointError(f"{path}: data bytes [{previous_end}, {begin}) belong to no tensor")
        previous_end, previous_name = end, name
    if previous_end != data_len:
        raise CheckpointError(f"{path}: {data_len - previous_end} bytes after the last tensor belong to no tensor")


def _stored(raw: np.ndarray, dtype: str, shape: tuple, nbytes: int) -> Stored:
    """One tensor: its values (a view of the memory map, or for BF16 an exact float32 copy) and its stored rows."""
    stored = raw.view(NUMPY_DTYPES[dtype]).reshape(shape)  # BF16 as uint16 bit patterns
    if dtype == "BF16":
        return Stored(dtype, shape, nbytes, lambda: bf16_to_f32(stored), lambda a, b: stored[a:b])
    return Stored(dtype, shape, nbytes, lambda: stored, lambda a, b: stored[a:b])
