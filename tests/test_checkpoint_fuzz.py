"""Fuzzing the readers: valid files, mutated by hypothesis (bytes flipped, cut, inserted; header values replaced;
pickle opcodes changed), must read or fail with a CheckpointError, never with any other exception."""
from __future__ import annotations

import json
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoint_files as cf
from refimpl import CheckpointError
from refimpl.weights import read_checkpoint

TENSORS = {"embed": np.arange(24, dtype=np.float32).reshape(6, 4), "norm": np.ones(4, np.float16),
           "bias": np.zeros(3, np.float64), "ids": np.arange(2, dtype=np.int64)}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# one mutation: ("flip", position, byte) | ("cut", position) | ("insert", position, bytes)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**16)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=16)),
)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def mutate(data: bytes, mutations) -> bytes:
    data = bytearray(data)
    for kind, position, *rest in mutations:
        position %= len(data) + 1
        if kind == "flip" and position < len(data):
            data[position] = rest[0]
        elif kind == "cut":
            del data[position:]
        elif kind == "insert":
            data[position:position] = rest[0]
        if not data:
            break
    return bytes(data)


def only_checkpoint_errors(data: bytes, suffix: str) -> None:
    """Write `data` to a file and read every tensor of it: fine, or a CheckpointError; anything else fails."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        try:
            for array in read_checkpoint(path, progress=False).values():
                np.asarray(array, dtype=np.float64)
        except CheckpointError:
            pass


SAFETENSORS = cf.safetensors_bytes(TENSORS, metadata={"format": "pt"})


@FUZZ
@given(st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_safetensors_bytes(mutations):
    only_checkpoint_errors(mutate(SAFETENSORS, mutations), ".safetensors")


@FUZZ
@given(st.sampled_from(sorted(TENSORS)), st.sampled_from(["dtype", "shape", "data_offsets", None]), JSON_VALUE)
def test_mutated_safetensors_header_values(name, field, value):
    (length,) = struct.unpack("<Q", SAFETENSORS[:8])
    header = json.loads(SAFETENSORS[8:8 + length])
    if field is None:
        header[name] = value
    else:
        header[name][field] = value
    text = json.dumps(header).encode()
    only_checkpoint_errors(struct.pack("<Q", len(text)) + text + SAFETENSORS[8 + length:], ".safetensors")


def bin_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        cf.write_bin_numpy(os.path.join(folder, "m.bin"), TENSORS)
        with open(os.path.join(folder, "m.bin"), "rb") as f:
            return f.read()


BIN = bin_bytes()


@FUZZ
@given(st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_bin_bytes(mutations):
    only_checkpoint_errors(mutate(BIN, mutations), ".bin")


@FUZZ
@given(st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_pickles_in_valid_zips(mutations):
    """The zip stays valid (CRC recomputed), so every mutation reaches the unpickler."""
    import zipfile

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "m.bin")
        with open(source, "wb") as f:
            f.write(BIN)
        with zipfile.ZipFile(source) as z:
            members = {name: z.read(name) for name in z.namelist()}
        members["archive/data.pkl"] = mutate(members["archive/data.pkl"], mutations)
        target = os.path.join(folder, "mutated.bin")
        with zipfile.ZipFile(target, "w") as z:
            for name, raw in members.items():
                z.writestr(name, raw)
        with open(target, "rb") as f:
            data = f.read()
    only_checkpoint_errors(data, ".bin")


def gguf_bytes() -> bytes:
    gguf = pytest.importorskip("gguf", reason="GGUF fuzzing needs the optional gguf package")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.gguf")
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_block_count(1), writer.add_head_count(2), writer.add_embedding_length(32)
        writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
        q = gguf.quants.quantize(np.ones((4, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
        with open(path, "rb") as f:
            return f.read()


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_gguf_bytes(mutations):
    only_checkpoint_errors(mutate(gguf_bytes(), mutations), ".gguf")
