"""Golden packs: the inputs, logits and full trace of one forward pass, as a plain safetensors file.

A pack holds `input_ids` and `attention_mask` (int64 [B, S]) and one tensor per trace name, stored under that name
(refimpl/trace.py lists them); `logits` is one of the trace names. Its `__metadata__` (strings, as safetensors
requires) says how it was made: format, refimpl version, class, family, compute dtype, the checkpoint's files and
their sha256, its config.json, the prompt text if any, and the trace names in graph order. A port in any language
can write a pack with any safetensors writer; `refimpl diff` needs none of the metadata.

Summary packs (for models too large to store every intermediate) keep, per trace name, a float64 vector of
SUMMARY_FIELDS instead of the tensor; inputs and logits are stored in full.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .formats.common import is_dims
from .formats.safetensors import MAX_HEADER_BYTES
from .formats.untrusted import summary
from .safe_write import write_atomically
from .trace import Trace, graph_order

FORMAT = "refimpl-golden-pack/1"
INPUT_NAMES = ("input_ids", "attention_mask")
FULL_IN_SUMMARY = INPUT_NAMES + ("logits",)  # stored in full even in a summary pack
SUMMARY_EDGE = 8  # how many first and last values a summary keeps
SUMMARY_FIELDS = ("sum", "mean", "absmax", "nan_count", "inf_count",
                  *(f"first[{k}]" for k in range(SUMMARY_EDGE)), *(f"last[{k}]" for k in range(SUMMARY_EDGE)))

# Metadata read back and used: a pack comes from any port, so each is checked before diff reads it.
JSON_METADATA = {  # key -> (what its JSON must be, test)
    "trace_order": ("a list of trace names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "summary_fields": ("a list of field names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "summary_shapes": ("an object of name: shape", lambda v: isinstance(v, dict)
                       and all(is_dims(s) for s in v.values())),
    "config": ("an object (config.json)", lambda v: isinstance(v, dict)),
    "checkpoint_sha256": ("an object of file: sha256", lambda v: isinstance(v, dict)
                          and all(isinstance(d, str) for d in v.values())),
}
CHOICES_METADATA = {"mode": ("full", "summary"), "raw_logits": ("all", "last")}
PRINTED_METADATA = ("format", "refimpl_version", "class", "family", "dtype", "checkpoint")  # in diff's report
MAX_PRINTED = 200  # characters

# NumPy dtype -> safetensors dtype name (little-endian; NumPy has no bfloat16, see formats/common.py for reading)
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                      "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path, tensors, metadata=None):
    """{name: array} (in the order given) and {str: str} metadata -> a .safetensors file.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}} plus
    "__metadata__", padded with spaces to a multiple of 8, then the tensors' bytes back to back.
    """
    header, blobs, offset = {}, [], 0
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise InputError(f"safetensors metadata must map strings to strings; {bad[0]!r} does not")
        header["__metadata__"] = dict(metadata)
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.name not in SAFETENSORS_DTYPES:
            raise InputError(f"tensor {name!r} has dtype {array.dtype}, which a pack cannot store "
                             f"({', '.join(SAFETENSORS_DTYPES)})")
        blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    def write(f):
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)

    write_atomically(path, write)  # a failed write leaves a previous file whole


def read_header(path):
    """-> (metadata {str: str}, [(name, safetensors dtype, shape)] in file order). Reads the header only; the
    metadata refimpl reads back (JSON_METADATA, CHOICES_METADATA) is checked, else InputError."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: {size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise InputError(f"{path}: header length {length} is larger than the file ({size} bytes) or the "
                             f"limit ({MAX_HEADER_BYTES})")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (ValueError, RecursionError):
            raise InputError(f"{path}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: __metadata__ is {summary(metadata)}, not a JSON object of strings")
    bad = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise InputError(f"{path}: __metadata__ {summary(bad)} is {summary(metadata[bad])}; safetensors metadata "
                         f"maps strings to strings")
    check_metadata(path, metadata)
    entries = []
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and is_dims(info.get("shape"))):
            raise InputError(f"{path}: tensor {summary(name)} has a malformed header entry {summary(info)}")
        entries.append((name, info["dtype"], tuple(info["shape"])))
    return metadata, entries


def check_metadata(path, metadata):
    """InputError naming the first metadata value refimpl reads back that is not what refimpl writes there."""
    for key in PRINTED_METADATA:
        if len(metadata.get(key, "")) > MAX_PRINTED:
            raise InputError(f"{path}: pack metadata {key} is {len(metadata[key])} characters long (at most "
                             f"{MAX_PRINTED}): {summary(metadata[key])}")
    for key, choices in CHOICES_METADATA.items():
        if key in metadata and metadata[key] not in choices:
            raise InputError(f"{path}: pack metadata {key}={summary(metadata[key])}, expected one of {choices}")
    for key, (expected, test) in JSON_METADATA.items():
        if key not in metadata:
            continue
        try:
            value = json.loads(metadata[key])
        except (ValueError, RecursionError):  # also a number beyond Python's int-parsing limit
            raise InputError(f"{path}: pack metadata {key} is not valid JSON: {summary(metadata[key])}") from None
        if not test(value):
            raise InputError(f"{path}: pack metadata {key} must be {expected}, got {summary(value)}")
    if metadata.get("mode") == "summary" and "summary_fields" in metadata:
        if json.loads(metadata["summary_fields"]) != list(SUMMARY_FIELDS):
            raise InputError(f"{path}: the summary pack's summary_fields are not this refimpl's "
                             f"({', '.join(SUMMARY_FIELDS[:6])}, ...): it cannot be compared")


def read_metadata(path):
    """A pack's __metadata__ ({} when it has none, e.g. one written by a port)."""
    return read_header(path)[0]


@dataclass
class Pack:
    """A pack read back: tensors in graph order, metadata strings, and the dtype each tensor was stored in."""

    path: str
    tensors: dict
    metadata: dict = field(default_factory=dict)
    stored_dtypes: dict = field(default_factory=dict)  # name -> "F32", "BF16", ...

    @property
    def family(self):
        return self.metadata.get("family")

    @property
    def summary(self):
        return self.metadata.get("mode") == "summary"

    def config(self):
        """config.json as a dict (from the metadata), or None."""
        try:
            return json.loads(self.metadata["config"])
        except (KeyError, ValueError):
            return None

    def trace_names(self):
        """Every stored name but the inputs, in graph order."""
        names = [n for n in self.tensors if n not in INPUT_NAMES]
        if "trace_order" in self.metadata:
            order = json.loads(self.metadata["trace_order"])
            return [n for n in order if n in self.tensors] + [n for n in names if n not in order]
        return graph_order(names, guess_family(names, self.family))


def guess_family(names, family=None):
    """The family named in metadata, else guessed from the trace names (OPT has pos_embed, Llama rope.cos)."""
    if family in ("llama", "open-llama", "opt"):
        return family
    names = set(names)
    if {"pos_embed", "layers.0.attn_in", "layers.0.fc1"} & names:
        return "opt"
    return "llama"


def read_pack(path):
    """A .safetensors pack -> Pack (tensors memory-mapped, read-only; BF16 widened to float32)."""
    from .weights import read_safetensors

    metadata, entries = read_header(path)
    tensors = read_safetensors(path)
    ordered = {name: tensors[name] for name, _, _ in entries if name in tensors}
    if metadata.get("mode") == "summary":
        wrong = [(n, s) for n, _, s in entries if n not in FULL_IN_SUMMARY and s != (len(SUMMARY_FIELDS),)]
        if wrong:
            raise InputError(f"{path}: a summary pack stores {summary(wrong[0][0])} with shape {list(wrong[0][1])}, "
                             f"not a vector of the {len(SUMMARY_FIELDS)} summary fields")
    return Pack(os.fspath(path), ordered, metadata, {name: dtype for name, dtype, _ in entries})


def summarize(array):
    """One tensor -> float64 [len(SUMMARY_FIELDS)]: sum, mean, absmax (finite values), NaN and inf counts,
    the first and last SUMMARY_EDGE values in row-major order (NaN-padded when the tensor is smaller)."""
    x = np.asarray(array, dtype=np.float64).ravel()
    finite = x[np.isfinite(x)]
    edge = np.full(2 * SUMMARY_EDGE, np.nan)
    first, last = x[:SUMMARY_EDGE], x[-SUMMARY_EDGE:] if x.size else x[:0]
    edge[:first.size] = first
    edge[SUMMARY_EDGE:SUMMARY_EDGE + last.size] = last
    stats = [finite.sum(), finite.mean() if finite.size else 0.0, np.abs(finite).max() if finite.size else 0.0,
             np.isnan(x).sum(), np.isinf(x).sum()]
    return np.concatenate([np.array(stats, dtype=np.float64), edge])


def run_trace(model, input_ids, attention_mask=None, keep=None, transform=None):
    """One forward pass of `model` on input_ids [B, S] -> its Trace (logits included); keep / transform as Trace's."""
    trace = Trace(keep=keep, transform=transform)
    model(input_ids=input_ids, attention_mask=attention_mask, trace=trace)
    return trace


def summarize_unless_full(name, value):
    """A Trace transform for summary packs: inputs and logits in full, every other value summarized as recorded."""
    return np.array(value, copy=True) if name in FULL_IN_SUMMARY else summarize(value)


def checkpoint_sha256(model_path):
    """{file name: sha256} for config.json and the weight files of a checkpoint folder (or file)."""
    from .weights import checkpoint_files

    files, _, _ = checkpoint_files(model_path)
    config = os.path.join(model_path, "config.json") if os.path.isdir(model_path) else None
    digests = {}
    for file in ([config] if config and os.path.isfile(config) else []) + files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digests[os.path.basename(file)] = digest.hexdigest()
    return digests


def make_pack(model, input_ids, attention_mask=None, summary=False, model_path=None, text=None, keep=None,
              checkpoint_digests=None):
    """Run `model` with a trace -> (tensors, metadata) of a golden pack, tensors in graph order. Summaries are taken
    as values are recorded, and keep (refimpl.trace.selection) leaves out layers and ops: a 7B pack stays small.

    checkpoint_digests: checkpoint_sha256(model_path), when the caller has it already (a batch of packs hashes a
    7B's 13 GB once, not once per pack)."""
    from . import __version__

    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1, np.shape(input_ids)[-1])  # [B, S]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    trace = run_trace(model, ids, mask, keep, summarize_unless_full if summary else None)
    tensors = {"input_ids": ids, "attention_mask": mask}
    tensors.update(trace.items())
    metadata = {
        "format": FORMAT,
        "refimpl_version": __version__,
        "class": type(model).__name__,
        "family": model.config.family,
        "dtype": np.dtype(model.dtype).name,
        "mode": "summary" if summary else "full",
        "trace_order": json.dumps(list(trace)),
    }
    if summary:
        metadata["summary_fields"] = json.dumps(SUMMARY_FIELDS)
        metadata["summary_shapes"] = json.dumps({n: list(shape) for n, shape in trace.shapes.items()})
    if model_path is not None:
        metadata["checkpoint"] = os.path.basename(os.path.normpath(os.fspath(model_path)))
        digests = checkpoint_sha256(model_path) if checkpoint_digests is None else checkpoint_digests
        metadata["checkpoint_sha256"] = json.dumps(digests)
        config_file = os.path.join(model_path, "config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                metadata["config"] = json.dumps(json.load(f), sort_keys=True)
    if text is not None:
        metadata["text"] = text
    return tensors, metadata


def write_pack(path, tensors, metadata):
    write_safetensors(path, tensors, metadata)
