"""What the format readers share: the `Stored` record, element types, exact bfloat16 widening, range checks."""
from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Optional

import numpy as np

from ..errors import CheckpointError

# Element type name (safetensors' spelling, reused for .bin and GGUF) -> little-endian NumPy dtype.
# BF16 has no NumPy dtype: its 16-bit patterns are read as uint16 and widened by `bf16_to_f32`.
NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


class Stored(NamedTuple):
    """One tensor as a file holds it. A NamedTuple, so that nothing (a pickle's BUILD included) can change it."""

    dtype: str  # the file's element type: "F32", "F16", "BF16", "Q8_0", ...
    shape: tuple  # NumPy (row-major) order, as the model uses it
    nbytes: int  # bytes it occupies in the file
    load: Callable[[], np.ndarray]  # -> read-only values: memory-mapped where the dtype allows, BF16 widened
    # (start, stop) -> rows [start, stop) as stored, no widening: F16/F32/F64 values (memory-mapped views), BF16 as
    # uint16 bits, quantized blocks dequantized to float32. What refimpl.stored.StoredMatrix reads tile by tile.
    rows: Optional[Callable[[int, int], np.ndarray]] = None
    view: bool = True  # load() returns a view of the file; False when it builds a copy (joined shards, permuted rows)
    # GGUF quantized tensors: () -> (uint8 [rows, bytes a row] of the file's blocks, the file row of each model row or
    # None). What a backend that computes on the blocks themselves reads (accel's weights="gguf"); refimpl dequantizes.
    blocks: Optional[Callable[[], tuple]] = None


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: a bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def element_count(shape) -> int:
    """Product of the dimensions as a Python int (no int64 overflow on a hostile shape)."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def is_dims(value) -> bool:
    """A list or tuple of non-negative ints (bools excluded: JSON true is not a dimension)."""
    return isinstance(value, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                    for d in value)


def check_ranges(where: str, ranges: list, end: int, what: str = "data") -> None:
    """[(begin, end, name)] byte ranges must lie inside [0, end) and must not overlap; the first offender is named."""
    previous_end, previous_name = 0, None
    for begin, stop, name in sorted(ranges):
        if begin < 0 or stop < begin or stop > end:
            raise CheckpointError(f"{where}: tensor {name!r} has byte range [{begin}, {stop}), which runs past the "
                                  f"end of the {what} ({end} bytes)")
        if begin < previous_end:
            raise CheckpointError(f"{where}: tensors {previous_name!r} and {name!r} overlap (byte {begin} is used "
                                  "twice); a file from a real writer never does this")
        previous_end, previous_name = stop, name


def show_progress(progress) -> bool:
    """progress=None: report only when stderr is a terminal; True / False force it on / off (quiet)."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def report(enabled: bool, message: str) -> None:
    if enabled:
        print(f"refimpl: {message}", file=sys.stderr, flush=True)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
