"""Values read from a hostile file: how refimpl prints them, which shapes it accepts, how it reads a layer index.

A pickle of a few hundred bytes can describe a tuple whose text is exponentially long, so an error message never
calls str() or repr() on a value from a file: it prints `summary(value)`, whose work and length are bounded. A shape
must be one NumPy can index (else numpy raises its own ValueError, not a CheckpointError). A layer index must be
written the one way Python writes it, so that two names in a file can never mean the same parameter.
"""
from __future__ import annotations

import re
import reprlib

from ..errors import CheckpointError

MAX_DIMS = 64  # NumPy's limit on ndim
MAX_EXTENT = 2**62  # bytes: the non-zero dims times 8 (float64) must stay below what NumPy can index
LAYER_INDEX = re.compile(r"0|[1-9][0-9]*")  # ASCII decimal without leading zeros: '0', '7', '31', never '07' or '٣'


class _Summary(reprlib.Repr):
    """reprlib with every container handled by its own bounded method, and anything else named by its type only
    (plain reprlib would call the full repr() of an OrderedDict or a tuple subclass, and sorts dict keys)."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxtuple, self.maxlist, self.maxdict, self.maxstring = 2, 6, 6, 4, 60

    def repr1(self, x, level):
        if isinstance(x, bool) or x is None or isinstance(x, float):
            return repr(x)
        if isinstance(x, int):  # repr of a 10**6-digit int is quadratic (and refused by Python 3.11)
            return repr(x) if x.bit_length() <= 128 else f"<int of {x.bit_length()} bits>"
        if isinstance(x, str):
            return self.repr_str(x, level)
        if isinstance(x, (bytes, bytearray)):
            return repr(bytes(x[:self.maxstring])) + ("..." if len(x) > self.maxstring else "")
        if isinstance(x, tuple):
            return self.repr_tuple(x, level)
        if isinstance(x, list):
            return self.repr_list(x, level)
        if isinstance(x, dict):
            return self.repr_dict(x, level)
        return f"<{type(x).__name__}>"

    def repr_dict(self, x, level):
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = []
        for i, key in enumerate(x):  # insertion order: sorting would compare (and may hash) untrusted keys
            if i == self.maxdict:
                items.append("...")
                break
            items.append(f"{self.repr1(key, level - 1)}: {self.repr1(x[key], level - 1)}")
        return "{" + ", ".join(items) + "}"


_SUMMARY = _Summary()


def summary(value) -> str:
    """A short description of an untrusted value for an error message: at most 6 items a container, 2 levels deep
    and 60 characters a string, whatever the value's size (bounded work: nothing is hashed, sorted or printed whole)."""
    return _SUMMARY.repr(value)


def error_text(exc: BaseException) -> str:
    """'TypeName: message' of an exception raised while parsing a file, bounded (its args may hold file values)."""
    args = exc.args
    detail = args[0][:200] if len(args) == 1 and isinstance(args[0], str) else summary(args)
    return f"{type(exc).__name__}: {detail}"


def too_large(shape) -> bool:
    """Whether NumPy could not index the values of `shape` widened to float64 (8 bytes each, what the audit mode
    computes in), counting a zero dim as 1: more than MAX_EXTENT bytes."""
    extent = 8
    for dim in shape:
        extent *= max(dim, 1)
        if extent > MAX_EXTENT:
            return True
    return False


def check_shape(where: str, shape) -> tuple:
    """A shape read from a file -> tuple of ints, or CheckpointError when NumPy could not hold its values widened to
    float64, even with a zero among the dims (too_large)."""
    if len(shape) > MAX_DIMS:
        raise CheckpointError(f"{where} has {len(shape)} dimensions; NumPy (and every real model) has at most "
                              f"{MAX_DIMS}")
    if too_large(shape):
        raise CheckpointError(f"{where} has shape {summary(tuple(shape))}, too large to index (more than "
                              f"2**62 bytes)")
    return tuple(shape)


def layer_index(text: str):
    """'12' -> 12; '012', '+1', '١' (an Arabic-Indic digit that str.isdigit accepts), '' -> None."""
    return int(text) if LAYER_INDEX.fullmatch(text) else None
