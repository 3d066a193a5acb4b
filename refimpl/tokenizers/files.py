"""Tokenizer files are untrusted input: JSON read with errors that name the file, fields checked for their type.

A field of the wrong type (a vocabulary that is a list, an id that is a string, a flag that is "false") is a
TokenizerFileError naming the file, the field and the value, raised while loading: never a TypeError or
AttributeError from deep inside encode. Bad values are shown by summary(), whose length is bounded
whatever the size of the value (a file can hold a 100 MB string where a token should be).
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path

from .errors import TokenizerFileError

KINDS = {str: "a string", bool: "true or false", int: "an integer", float: "a number", dict: "an object",
         list: "a list", type(None): "null"}


class _Summary(reprlib.Repr):
    """reprlib's cut-down repr, for JSON values (and bytes): dicts in file order, not sorted; no 4300-digit int repr."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxstring, self.maxother = 2, 6, 4, 60, 60

    def repr_int(self, x, level):
        return f"<a {x.bit_length()}-bit integer>" if x.bit_length() > 128 else repr(x)

    def repr_bytes(self, x, level):  # bytes passed where ids belong: reprlib would print them whole, then cut
        return repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    def repr_dict(self, x, level):
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(x[k], level - 1)}" for k in list(x)[: self.maxdict]]
        return "{" + ", ".join(items + (["..."] if len(x) > self.maxdict else [])) + "}"


summary = _Summary().repr  # a bounded description of an untrusted value, for error messages


def read_json(path: Path, what: str = "object"):
    """json.load with errors that name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also a 5000-digit number
        raise TokenizerFileError(f"{path}: cannot read it as JSON ({str(e)[:200]})") from None
    if what == "object" and not isinstance(data, dict):
        raise TokenizerFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_a(value, types: tuple) -> bool:
    """isinstance, except that true/false count as bool only: JSON true is not an id."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def expect(value, types: tuple, where, name: str):
    """value, if it is one of types; else a TokenizerFileError "where: name must be ..., got <value>"."""
    if not is_a(value, types):
        kinds = " or ".join(KINDS.get(t, t.__name__) for t in types)
        raise TokenizerFileError(f"{where}: {name} must be {kinds}, got {summary(value)}")
    return value


def field(obj: dict, key: str, types: tuple, where, default=None, prefix: str = ""):
    """obj[key] (default when absent), checked by expect. prefix names obj inside the file: "decoder.decoders[1]."."""
    return expect(obj.get(key, default), types, where, prefix + key)


def token_id(value, where, name: str = "token id", as_key: bool = False) -> int:
    """An id from a file: a non-negative integer; as an object key (added_tokens_decoder's), its decimal string."""
    if as_key and isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    if is_a(value, (int,)) and value >= 0:
        return value
    raise TokenizerFileError(f"{where}: {name} is {summary(value)}, not a non-negative integer")


def check_vocab(vocab: dict, where, prefix: str = "") -> dict[str, int]:
    """A token -> id object whose every id is a non-negative integer."""
    for token, i in vocab.items():
        token_id(i, where, f"{prefix}the id of {summary(token)}")
    return vocab
