"""Hostile checkpoint files: each gives a CheckpointError that says what is wrong, and no code in them runs.

The .bin files here are written without torch (tests/checkpoint_files.py writes torch.save's pickle opcodes by
hand), so these tests run on a machine without PyTorch, as refimpl's users do.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest

import checkpoint_files as cf
from refimpl import CheckpointError
from refimpl.formats.torch_bin import LEGACY_MAGIC
from refimpl.weights import list_checkpoint, read_checkpoint

TENSORS = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}


def read_all(path):
    return read_checkpoint(str(path), progress=False)


def header_file(tmp_path, header: dict, data: bytes, name="model.safetensors"):
    """A safetensors file with this exact header (no checks) and data section."""
    text = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# --- safetensors ---------------------------------------------------------------------------------------------------

def test_truncated_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    data = cf.safetensors_bytes(TENSORS)
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="'b'.*does not fit the file"):
        read_all(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        read_all(path)


def test_header_length_larger_than_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63 + 5) + b"{}")
    with pytest.raises(CheckpointError, match="header length 9223372036854775813 is larger than the file"):
        read_all(path)


def test_header_length_over_the_limit(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(160_000_000)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="exceeds the limit"):
        read_all(path)


def test_lying_offsets(tmp_path):
    data = bytes(64)
    with pytest.raises(CheckpointError, match="does not fit the file"):
        read_all(header_file(tmp_path, {"a": entry("F32", [32], 0, 128)}, data))
    with pytest.raises(CheckpointError, match=r"needs 64 bytes, but its byte range \[0, 32\) holds 32"):
        read_all(header_file(tmp_path, {"a": entry("F32", [16], 0, 32)}, data))
    with pytest.raises(CheckpointError, match="not \\[begin, end\\]"):
        read_all(header_file(tmp_path, {"a": entry("F32", [0], 40, 8)}, data))


def test_overlapping_ranges_holes_and_trailing_bytes(tmp_path):
    data = bytes(64)
    overlapping = {"a": entry("F32", [8], 0, 32), "b": entry("F32", [8], 16, 48), "c": entry("F32", [4], 48, 64)}
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap at data byte 16"):
        read_all(header_file(tmp_path, overlapping, data))
    with pytest.raises(CheckpointError, match=r"data bytes \[32, 48\) belong to no tensor"):
        read_all(header_file(tmp_path, {"a": entry("F32", [8], 0, 32), "b": entry("F32", [4], 48, 64)}, data))
    with pytest.raises(CheckpointError, match="32 bytes after the last tensor"):
        read_all(header_file(tmp_path, {"a": entry("F32", [8], 0, 32)}, data))


def test_unknown_dtype_and_malformed_entries(tmp_path):
    data = bytes(16)
    with pytest.raises(CheckpointError, match="dtype 'F8_E4M3', which refimpl cannot read"):
        read_all(header_file(tmp_path, {"a": entry("F8_E4M3", [16], 0, 16)}, data))
    for shape in ([-4], ["4"], [True, 4], 4.0, None):
        with pytest.raises(CheckpointError, match="not a list of sizes"):
            read_all(header_file(tmp_path, {"a": entry("F32", shape, 0, 16)}, data))
    with pytest.raises(CheckpointError, match="malformed header entry"):
        read_all(header_file(tmp_path, {"a": {"dtype": "F32", "shape": [4]}}, data))
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_all(header_file(tmp_path, [1, 2], data))
    with pytest.raises(CheckpointError, match="__metadata__ is not a JSON object"):
        read_all(header_file(tmp_path, {"__metadata__": 3, "a": entry("F32", [4], 0, 16)}, data))


def test_header_json_attacks(tmp_path):
    path = tmp_path / "model.safetensors"
    text = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [0], ' \
           b'"data_offsets": [0, 0]}}'
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))
    with pytest.raises(CheckpointError, match="names 'a' twice"):
        read_all(path)
    deep = b"[" * 100_000 + b"]" * 100_000  # json recursion
    path.write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_all(path)
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_all(path)


# --- sharded indexes -----------------------------------------------------------------------------------------------

def sharded(tmp_path, weight_map, shards):
    for name, tensors in shards.items():
        cf.write_safetensors(tmp_path / name, tensors)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


def test_index_cannot_leave_the_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    cf.write_safetensors(tmp_path / "outside.safetensors", TENSORS)
    sharded(folder, {"a": "../outside.safetensors"}, {})
    with pytest.raises(CheckpointError, match="not a file name in the checkpoint folder"):
        read_all(folder)


def test_index_and_shards_must_agree(tmp_path):
    one, two = {"a": TENSORS["a"]}, {"b": TENSORS["b"]}
    with pytest.raises(CheckpointError, match="puts 'b' in s1.safetensors, but it is not there"):
        read_all(sharded(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"}, {"s1.safetensors": one}))
    with pytest.raises(CheckpointError, match="'a' is in both"):
        read_all(sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"},
                         {"s1.safetensors": one, "s2.safetensors": {**two, **one}}))
    with pytest.raises(CheckpointError, match="which the index does not list"):
        read_all(sharded(tmp_path, {"a": "s1.safetensors"}, {"s1.safetensors": {**one, **two}}))
    with pytest.raises(CheckpointError, match="no such file"):
        read_all(sharded(tmp_path, {"a": "s1.safetensors", "b": "gone.safetensors"}, {"s1.safetensors": one}))
    (tmp_path / "model.safetensors.index.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="weight_map"):
        read_all(tmp_path)


# --- PyTorch .bin: the unpickler runs no code --------------------------------------------------------------------

def payload_zip(tmp_path, pickled: bytes):
    path = tmp_path / "pytorch_model.bin"
    cf.torch_zip(path, pickled, {})
    return path


def command_pickle(module: str, name: str, argument: str) -> bytes:
    """module.name(argument), as a pickle: GLOBAL, the argument, TUPLE1, REDUCE, STOP."""
    return b"\x80\x02" + cf.op_global(module, name) + cf.op_str(argument) + b"\x85R."


def test_pickle_asking_for_os_system_is_refused_and_does_not_run(tmp_path):
    sentinel = tmp_path / "pwned"
    path = payload_zip(tmp_path, command_pickle("os", "system", f"touch {sentinel}"))
    with pytest.raises(CheckpointError, match=r"asks for the global os\.system.*refused, nothing was imported"):
        read_all(path)
    assert not sentinel.exists()
    assert pickle.loads(command_pickle("os", "system", f"touch {sentinel}")) == 0 and sentinel.exists()  # it is live


def test_pickle_asking_for_builtins_eval_is_refused_and_does_not_run(tmp_path):
    sentinel = tmp_path / "pwned"
    path = payload_zip(tmp_path, command_pickle("builtins", "eval", f"open({str(sentinel)!r}, 'w').close()"))
    with pytest.raises(CheckpointError, match=r"builtins\.eval"):
        read_all(path)
    assert not sentinel.exists()


class Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_payload_hidden_inside_a_valid_state_dict_does_not_run(tmp_path):
    sentinel = tmp_path / "pwned"
    exploit = pickle.dumps(Exploit(f"touch {sentinel}"), protocol=2)[2:-1]  # the ops without PROTO and STOP
    items = [("weight", cf.tensor_ops("FloatStorage", "0", 4, 0, [4], [1])), ("extra", exploit)]
    path = tmp_path / "pytorch_model.bin"
    cf.torch_zip(path, cf.state_dict_pickle(items), {"0": bytes(16)})
    module = os.system.__module__  # 'posix' on Linux, 'nt' on Windows: pickle names the defining module
    with pytest.raises(CheckpointError, match=rf"global {module}\.system"):
        read_all(path)
    assert not sentinel.exists()


def test_other_torch_globals_are_refused_by_name(tmp_path):
    path = payload_zip(tmp_path, command_pickle("torch.serialization", "load", "x"))
    with pytest.raises(CheckpointError, match=r"torch\.serialization\.load"):
        read_all(path)


def test_missing_storage(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    items = [(name, cf.tensor_ops("FloatStorage", key, 4, 0, [4], [1])) for name, key in (("a", "0"), ("b", "1"))]
    cf.torch_zip(path, cf.state_dict_pickle(items), {"0": bytes(16)})
    with pytest.raises(CheckpointError, match="storage '1', but the archive has no archive/data/1"):
        read_all(path)


def test_storages_that_lie_about_their_size(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    cf.torch_zip(path, cf.state_dict_pickle([("a", cf.tensor_ops("FloatStorage", "0", 8, 0, [8], [1]))]),
                 {"0": bytes(16)})
    with pytest.raises(CheckpointError, match="holds 16 bytes, but the pickle says 8 elements of F32"):
        read_all(path)
    for offset, size, stride in ((2, [4], [1]), (0, [2, 3], [3, 1]), (0, [4, 4], [0, 1])):
        cf.torch_zip(path, cf.state_dict_pickle([("a", cf.tensor_ops("FloatStorage", "0", 4, offset, size, stride))]),
                     {"0": bytes(16)})
        with pytest.raises(CheckpointError, match="storage"):
            read_all(path)


def test_strided_views_are_honoured(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    base = np.arange(12, dtype=np.float32)
    items = [("t", cf.tensor_ops("FloatStorage", "0", 12, 0, [4, 3], [1, 4])),  # a transposed [3, 4]
             ("row", cf.tensor_ops("FloatStorage", "0", 12, 8, [4], [1]))]  # shares the storage at offset 8
    cf.torch_zip(path, cf.state_dict_pickle(items), {"0": base.tobytes()})
    out = read_all(path)
    np.testing.assert_array_equal(out["t"], base.reshape(3, 4).T)
    np.testing.assert_array_equal(out["row"], base[8:12])
    assert not out["t"].flags.writeable and np.shares_memory(out["t"], out["row"])  # views of one mapping


def test_compressed_storage_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    cf.torch_zip(path, cf.state_dict_pickle([("a", cf.tensor_ops("FloatStorage", "0", 4, 0, [4], [1]))]),
                 {"0": bytes(16)}, compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="is compressed"):
        read_all(path)


def test_lying_zip_offsets_are_refused(tmp_path):
    """Point the central directory entry of data/1 at the bytes of data/0: the two would overlap."""
    path = tmp_path / "pytorch_model.bin"
    items = [(name, cf.tensor_ops("FloatStorage", key, 4, 0, [4], [1])) for name, key in (("a", "0"), ("b", "1"))]
    cf.torch_zip(path, cf.state_dict_pickle(items), {"0": bytes(16), "1": bytes(16)})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        offset0 = z.getinfo("archive/data/0").header_offset
    record = data.index(b"PK\x01\x02")  # central directory records: signature, ..., offset at +42, name at +46
    while data[record + 46: record + 46 + len(b"archive/data/1")] != b"archive/data/1":
        record = data.index(b"PK\x01\x02", record + 4)
    data[record + 42: record + 46] = struct.pack("<I", offset0)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="overlap"):
        read_all(path)


def test_legacy_and_non_zip_files(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(LEGACY_MAGIC + bytes(100))
    with pytest.raises(CheckpointError, match="legacy .*torch < 1.6"):
        read_all(path)
    path.write_bytes(b"this is not a zip" * 10)
    with pytest.raises(CheckpointError, match="not a readable zip"):
        read_all(path)


def test_zip_without_a_state_dict(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/version", "3")
    with pytest.raises(CheckpointError, match="expected one <archive>/data.pkl"):
        read_all(path)
    cf.torch_zip(path, b"\x80\x02]q\x00.", {})  # an empty list
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_all(path)
    cf.torch_zip(path, cf.state_dict_pickle([("step", cf.op_int(3))]), {})
    with pytest.raises(CheckpointError, match="'step' is a int, not a tensor"):
        read_all(path)
    cf.torch_zip(path, b"\x80\x02(X\x01\x00\x00\x00aJ\x05\x00\x00\x00tQ.", {})  # persistent id ('a', 5)
    with pytest.raises(CheckpointError, match="not a storage reference"):
        read_all(path)


def test_corrupted_pickle_crc(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    cf.write_bin_numpy(path, TENSORS)
    data = bytearray(path.read_bytes())
    data[data.index(b"_rebuild_tensor_v2")] ^= 1  # inside data.pkl: the zip CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="BadZipFile"):
        read_all(path)


def test_torchless_writer_matches_torch_load(tmp_path):
    """The hand-written .bin files of these tests are what torch itself reads (so the tests test the real format)."""
    torch = pytest.importorskip("torch", reason="torch checks the hand-written .bin format")
    path = tmp_path / "pytorch_model.bin"
    cf.write_bin_numpy(path, TENSORS)
    loaded = torch.load(path, weights_only=True)
    for name, a in TENSORS.items():
        np.testing.assert_array_equal(loaded[name].numpy(), a)
        np.testing.assert_array_equal(read_all(path)[name], a)


# --- GGUF --------------------------------------------------------------------------------------------------------

def test_gguf_without_the_package_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(CheckpointError, match=r"pip install 'refimpl\[gguf\]'"):
        read_all(path)


def test_hostile_gguf(tmp_path):
    gguf = pytest.importorskip("gguf", reason="GGUF reading needs the optional gguf package")
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        read_all(path)
    cf.write_gguf(path, "llama_mha", "F32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="GGUF"):
        read_all(path)
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match="general.architecture is 'gpt2'"):
        list_checkpoint(path, progress=False)
