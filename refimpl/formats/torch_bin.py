"""PyTorch `.bin` checkpoints (the zip format torch.save has written since torch 1.6), read without torch.

A .bin is a zip archive: `<archive>/data.pkl`, a pickle of the state dict, and `<archive>/data/<key>`, one raw
storage per key, stored uncompressed. A pickle may call any function it names, and may describe values whose hash
or text is exponentially large, so data.pkl is first checked opcode by opcode against the shapes a state dict has
(refimpl/formats/pickle_scan.py), then read by an unpickler that knows only the few globals a state dict uses
(ALLOWED_GLOBALS, each mapped to a stand-in defined here). Storages are memory-mapped from the zip; a tensor is a
view of its storage with torch's offset, size and stride (in elements), copied only when it is widened.
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError
from .common import NUMPY_DTYPES, Stored, bf16_to_f32, check_ranges, element_count, is_dims
from .pickle_scan import check_state_dict_pickle
from .untrusted import MAX_EXTENT, check_shape, error_text, summary

# torch < 1.6 wrote a bare pickle stream that starts with this pickled magic number (torch/serialization.py).
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
MAX_PICKLE_BYTES = 256 * 1024 * 1024  # a 70B state dict pickles to well under 1 MiB
LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature, (skipped), name and extra lengths
LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"

# torch storage classes, as data.pkl names them in each storage's persistent id -> element type.
STORAGE_TYPES = {
    "torch.FloatStorage": "F32",
    "torch.DoubleStorage": "F64",
    "torch.HalfStorage": "F16",
    "torch.BFloat16Storage": "BF16",
    "torch.LongStorage": "I64",
    "torch.IntStorage": "I32",
    "torch.ShortStorage": "I16",
    "torch.CharStorage": "I8",
    "torch.ByteStorage": "U8",
    "torch.BoolStorage": "BOOL",
}


class StorageView(NamedTuple):
    """One storage of the archive: its element type and its elements (BF16 as uint16), memory-mapped."""

    dtype: str
    data: np.ndarray


def rebuild_tensor(storage, storage_offset, size, stride):
    """Stand-in for torch._utils._rebuild_tensor: a Stored view of `storage`, every index checked to lie inside it."""
    if not isinstance(storage, StorageView):
        raise CheckpointError(f"a tensor is rebuilt from a {type(storage).__name__}, not from a storage")
    if not (is_dims([storage_offset]) and isinstance(size, tuple) and isinstance(stride, tuple) and is_dims(size)
            and is_dims(stride) and len(size) == len(stride)):
        raise CheckpointError(f"a tensor has offset {summary(storage_offset)}, size {summary(size)}, stride "
                              f"{summary(stride)}: not sizes")
    itemsize = storage.data.itemsize
    check_shape(f"a tensor of size {summary(size)}", size)
    if any(s * itemsize > MAX_EXTENT for s in stride):
        raise CheckpointError(f"a tensor has stride {summary(stride)}, too large to index")
    count, numel = element_count(size), storage.data.shape[0]
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if (count and last >= numel) or storage_offset > numel:
        raise CheckpointError(f"a tensor of size {list(size)} (offset {storage_offset}, stride {list(stride)}) reads "
                              f"past the end of its storage of {numel} elements")
    if count > numel:  # only an expanded (stride 0) tensor repeats elements; no state dict holds one
        raise CheckpointError(f"a tensor of size {list(size)} has more elements than its storage ({numel})")
    shape, strides = tuple(size), tuple(s * itemsize for s in stride)
    view = np.lib.stride_tricks.as_strided(storage.data[storage_offset:], shape, strides, writeable=False)

    def load():  # the view itself (BF16 widened from its uint16 bits)
        return bf16_to_f32(view) if storage.dtype == "BF16" else view

    return Stored(storage.dtype, shape, count * itemsize, load, lambda a, b: view[a:b])


def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2 (what torch.save writes for every tensor)."""
    if backward_hooks:
        raise CheckpointError("a tensor in the pickle carries backward hooks; a state dict never does")
    return rebuild_tensor(storage, storage_offset, size, stride)


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stand-in for torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its tensor."""
    if not isinstance(data, Stored) or backward_hooks:
        raise CheckpointError("a parameter in the pickle is not a plain tensor")
    return data


# module.name a state-dict pickle may ask for -> what refimpl gives it. Every other name is refused.
ALLOWED_GLOBALS = {
    "collections.OrderedDict": OrderedDict,  # the state dict itself, and its empty backward_hooks
    "torch._utils._rebuild_tensor": rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
    **STORAGE_TYPES,  # a storage class stands for its element type: an immutable string that nothing can call
}


class StateDictUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS, and persistent ids to this archive's storages."""

    def __init__(self, file, storage):
        super().__init__(file)
        self.storage = storage  # (key, dtype, numel) -> StorageView

    def find_class(self, module, name):
        qualified = f"{module}.{name}"
        if qualified not in ALLOWED_GLOBALS:
            raise CheckpointError(f"the pickle asks for the global {qualified}, which a state dict never needs: "
                                  "refused, nothing was imported or called")
        return ALLOWED_GLOBALS[qualified]

    def persistent_load(self, pid):
        # torch.save: ("storage", storage class, key, location, number of elements); types first, then values
        if not (isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[0], str) and pid[0] == "storage"):
            raise CheckpointError(f"the pickle has persistent id {summary(pid)}, not a storage reference")
        _, dtype, key, _location, numel = pid
        if not (isinstance(dtype, str) and dtype in STORAGE_TYPES.values() and isinstance(key, str)
                and is_dims([numel])):
            raise CheckpointError(f"the pickle has a malformed storage reference {summary(pid)}")
        return self.storage(key, dtype, numel)


def list_torch_bin(path: str) -> dict[str, Stored]:
    """One zip-format .bin -> {name: Stored}; the pickle is run through StateDictUnpickler, storages are mapped."""
    with open(path, "rb") as f:
        start = f.read(len(LEGACY_MAGIC))
    if start == LEGACY_MAGIC:
        raise CheckpointError(f"{path}: a legacy (torch < 1.6) checkpoint, which refimpl does not read: re-save it "
                              "with torch.save, or convert it to safetensors")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = _members(path, archive)
            prefix = _archive_prefix(path, infos)
            pickled = _read_member(path, archive, infos[f"{prefix}/data.pkl"], MAX_PICKLE_BYTES)
            order = infos.get(f"{prefix}/byteorder")
            byteorder = _read_member(path, archive, order, 16).decode("ascii", "replace") if order else "little"
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile raises a dozen exception types on damaged archives; all mean "not readable"
        raise CheckpointError(f"{path}: not a readable zip archive ({error_text(exc)})") from None
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: byteorder is {byteorder[:16]!r}, not 'little' or 'big'")
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    offsets = _data_offsets(path, buffer, infos)
    storage = _storage_reader(path, prefix, infos, offsets, buffer, byteorder)
    try:
        check_state_dict_pickle(pickled, ALLOWED_GLOBALS, set(STORAGE_TYPES))  # by structure, before unpickling
        state = StateDictUnpickler(io.BytesIO(pickled), storage).load()
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # anything else from the pickle machine means a malformed data.pkl
        raise CheckpointError(f"{path}: data.pkl is not a state-dict pickle ({error_text(exc)})") from None
    return _check_state_dict(path, state)


def _members(path, archive) -> dict:
    """{name: ZipInfo}; a name listed twice is refused (zipfile would read the last, another reader the first)."""
    infos = {}
    for info in archive.infolist():
        if info.filename in infos:
            raise CheckpointError(f"{path}: the zip lists the member {summary(info.filename)} twice; torch.save "
                                  "never does, and readers disagree on which copy counts")
        infos[info.filename] = info
    return infos


def _archive_prefix(path, infos) -> str:
    """The one top-level folder that holds data.pkl (torch names it after the file: 'pytorch_model', 'archive')."""
    prefixes = [name[:-len("/data.pkl")] for name in infos if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(prefixes) != 1:
        raise CheckpointError(f"{path}: expected one <archive>/data.pkl in the zip, found {len(prefixes)}")
    return prefixes[0]


def _read_member(path, archive, info, limit) -> bytes:
    if info.file_size > limit:
        raise CheckpointError(f"{path}: {info.filename[:200]} claims {info.file_size} bytes, more than the limit "
                              f"{limit}")
    return archive.read(info)  # zipfile checks the CRC of what it reads


def _data_offsets(path, buffer, infos) -> dict[str, int]:
    """Where each member's bytes start: after its local header, whose lengths may differ from the central copy."""
    offsets = {}
    for name, info in infos.items():
        head = bytes(buffer[info.header_offset: info.header_offset + LOCAL_HEADER.size])
        if len(head) < LOCAL_HEADER.size or head[:4] != LOCAL_HEADER_SIGNATURE:
            raise CheckpointError(f"{path}: zip member {summary(name)} has no local header at offset "
                                  f"{info.header_offset}")
        _, name_len, extra_len = LOCAL_HEADER.unpack(head)
        offsets[name] = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
    check_ranges(path, [(offsets[name], offsets[name] + info.compress_size, name) for name, info in infos.items()],
                 buffer.shape[0], what="file")
    return offsets


def _storage_reader(path, prefix, infos, offsets, buffer, byteorder):
    """(key, dtype, numel) -> StorageView of `<prefix>/data/<key>`, checked against the zip and cached per key."""
    seen = {}

    def storage(key, dtype, numel):
        name = f"{prefix}/data/{key}"
        if name not in infos:
            raise CheckpointError(f"the pickle refers to storage {summary(key)}, but the archive has no "
                                  f"{name[:200]}")
        if seen.setdefault(name, (dtype, numel)) != (dtype, numel):
            raise CheckpointError(f"storage {summary(key)} is referred to as {seen[name]} and as {(dtype, numel)}")
        info = infos[name]
        if info.compress_type != zipfile.ZIP_STORED:
            # torch.save never compresses; a compressed storage cannot be memory-mapped
            raise CheckpointError(f"storage {name[:200]} is compressed (zip method {info.compress_type}); "
                                  "torch.save stores storages uncompressed")
        element = np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<" if byteorder == "little" else ">")
        if info.file_size != numel * element.itemsize:
            raise CheckpointError(f"storage {name[:200]} holds {info.file_size} bytes, but the pickle says {numel} "
                                  f"elements of {dtype} ({numel * element.itemsize} bytes)")
        start = offsets[name]
        return StorageView(dtype, buffer[start: start + info.file_size].view(element))

    return storage


def _check_state_dict(path, state) -> dict[str, Stored]:
    """The unpickled value must be {str: Stored}; types are checked before a key or value is used or printed."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: data.pkl holds a {type(state).__name__}, not a state dict")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, Stored):
            raise CheckpointError(f"{path}: data.pkl entry {summary(name)} is a {type(value).__name__}, not a "
                                  "tensor (a training checkpoint? save model.state_dict() instead)")
    return dict(state)
