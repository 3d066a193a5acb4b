"""Hostile checkpoint files that crashed, hung or exhausted memory, and names that meant two parameters at once.

Each file is built here byte by byte (pickle opcodes, GGUF with struct). Where the failure mode is a crash (SIGSEGV),
a hang or running out of memory, the read runs in a child Python limited to 4 GB of address space and 20 seconds
(`isolated`), so that the test fails instead of the test run; each must end with a CheckpointError, quickly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest

import checkpoint_files as cf
import refimpl
from golden_cases import GOLDEN
from refimpl import CheckpointError
from refimpl.formats import pickle_scan
from refimpl.weights import read_checkpoint, rename

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import resource, sys, time
limit = 4 * 2**30  # bytes of address space: a runaway allocation fails here, not on the machine
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from refimpl import CheckpointError
start = time.perf_counter()
try:
    exec(sys.argv[1])
    outcome = "no error"
except CheckpointError as exc:
    message = str(exc)
    outcome = f"CheckpointError of {len(message)} characters: " + message[:400].replace("\n", " ")
print(outcome)
print(f"seconds {time.perf_counter() - start:.3f}")
"""


def isolated(code: str, timeout: float = 20) -> tuple[str, float]:
    """Run `code` in a fresh Python with 4 GB of address space -> (outcome line, seconds it took). A crash, a hang
    past `timeout` seconds, or any exception other than CheckpointError fails the calling test."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, code], capture_output=True, text=True, timeout=timeout,
                              cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s (a hang): {code}")
    assert done.returncode == 0, (f"the child ended with status {done.returncode} (negative: killed by signal "
                                  f"{-done.returncode}, -11 is SIGSEGV): {done.stderr[-1500:]}")
    outcome, seconds = done.stdout.splitlines()[-2:]
    return outcome, float(seconds.split()[1])


def refused_quickly(code: str, match: str, seconds: float = 5) -> str:
    """`code` raises a CheckpointError whose message holds `match` and is short, within `seconds`, in a child."""
    outcome, took = isolated(code)
    assert outcome.startswith("CheckpointError") and match in outcome, outcome
    assert int(outcome.split()[2]) < 1000, f"a message of {outcome.split()[2]} characters: {outcome}"
    assert took < seconds, f"{took:.1f} s: {outcome}"
    return outcome


def read_code(path) -> str:
    return f"from refimpl.weights import read_checkpoint; read_checkpoint({str(path)!r}, progress=False)"


# --- .bin: pickles whose values are built, hashed or printed out of all proportion ----------------------------------

def bin_file(tmp_path, pickled: bytes, storages=None):
    path = tmp_path / "pytorch_model.bin"
    cf.torch_zip(path, pickled, storages or {})
    return path


def deep_tuple(depth: int) -> bytes:
    """((...((0,),)...),): TUPLE1 applied `depth` times, one byte each."""
    return cf.op_int(0) + b"\x85" * depth


def dup_bomb(levels: int) -> bytes:
    """x = 0; x = (x, x) `levels` times with DUP: 2**levels leaves in 2 * levels bytes."""
    return cf.op_int(0) + b"2\x86" * levels


def memo_bomb(levels: int) -> bytes:
    """The same with the memo: BINPUT i, BINGET i, TUPLE2 (what a pickler writes for a shared reference)."""
    return cf.op_int(0) + b"".join(b"q" + bytes([i]) + b"h" + bytes([i]) + b"\x86" for i in range(levels))


def as_key(value_ops: bytes) -> bytes:
    """{value: 0}: the unpickler hashes the value when it sets the item."""
    return b"\x80\x02}" + value_ops + cf.op_int(0) + b"s."


def test_a_tuple_nested_a_million_deep_is_refused_without_a_crash(tmp_path):
    """Before: hashing the key overflowed the C stack and the process died with SIGSEGV."""
    path = bin_file(tmp_path, as_key(deep_tuple(1_000_000)))
    refused_quickly(read_code(path), "nests a tuple in a tuple")


@pytest.mark.parametrize("bomb", [dup_bomb, memo_bomb], ids=["DUP", "memo"])
@pytest.mark.parametrize("where", ["key", "OrderedDict items", "persistent id", "tensor offset"])
def test_shared_reference_bombs_are_refused_without_hashing_or_printing_them(tmp_path, bomb, where):
    """A few hundred bytes whose value has 2**100 leaves: hashed as a key (or by OrderedDict's constructor), or
    formatted by an error message about a persistent id or a tensor. Before: each hung forever."""
    value = bomb(100)
    storage = b"(" + cf.op_str("storage") + cf.op_global("torch", "FloatStorage") + cf.op_str("0") + \
        cf.op_str("cpu") + cf.op_int(0) + b"tQ"
    pickled = b"\x80\x02" + {
        "key": as_key(value)[2:-1],
        "OrderedDict items": cf.op_global("collections", "OrderedDict") + value + cf.op_int(0) + b"\x86\x85\x85R",
        "persistent id": value + b"Q",
        "tensor offset": cf.op_global("torch._utils", "_rebuild_tensor") + b"(" + storage + value + b"))tR",
    }[where] + b"."
    refused_quickly(read_code(bin_file(tmp_path, pickled, {"0": b""})), "pytorch_model.bin")


def test_pickle_structure_limits(tmp_path, monkeypatch):
    """Each bound of the opcode scan, one at a time."""
    cases = {
        "a tuple of 65 items": (b"\x80\x02(" + cf.op_int(1) * 65 + b"t.", "tuple of 65 items"),
        "17 open MARKs": (b"\x80\x02" + b"(" * 17, "more than 16 MARKs"),
        "a long string": (b"\x80\x02" + cf.op_str("x" * 70_000) + b".", "string of 70000 characters"),
        "a set": (b"\x80\x02\x8f.", "opcode EMPTY_SET"),
        "a float": (b"\x80\x02G" + struct.pack(">d", 1.5) + b".", "opcode BINFLOAT"),
        "a list with items": (b"\x80\x02]" + cf.op_int(1) + b"a.", "opcode APPEND"),
        "an object": (b"\x80\x02" + cf.op_global("collections", "OrderedDict") + b")\x81.", "opcode NEWOBJ"),
        "a call of a str": (b"\x80\x02" + cf.op_str("x") + b")R.", "calls 'str'"),
        "a wrong call": (b"\x80\x02" + cf.op_global("collections", "OrderedDict") + cf.op_int(1) + b"\x85R.",
                         "calls collections.OrderedDict with arguments (int)"),
        "a tuple key": (as_key(cf.op_ints([1, 2])), "puts a int under a ints key"),
        "dicts 9 deep": (b"\x80\x02}" + (cf.op_str("k") + b"}") * 9 + b"s" * 9 + b".", "more than 8 deep"),
        "a dict in itself": (b"\x80\x02}q\x00" + cf.op_str("k") + b"h\x00s.", "puts a dict into itself"),
        "a cycle of two dicts": (b"\x80\x02}q\x00" + cf.op_str("k") + b"}" + cf.op_str("j") + b"h\x00ss.",
                                 "not on a dict being built"),  # d0['k'] = d1 after d1['j'] = d0
        "a memo hole": (b"\x80\x02h\x05.", "memo entry 5"),
        "no STOP": (b"\x80\x02}", "ends before its STOP"),
        "two values at STOP": (b"\x80\x02}}.", "2 values on its stack"),
        "stack underflow": (b"\x80\x02s.", "sets items on a none"),
    }
    for name, (pickled, match) in cases.items():
        with pytest.raises(CheckpointError, match=re.escape(match)):
            read_checkpoint(str(bin_file(tmp_path, pickled)), progress=False)
    monkeypatch.setattr(pickle_scan, "MAX_OPS", 100)
    with pytest.raises(CheckpointError, match="more than 100 opcodes"):
        read_checkpoint(str(bin_file(tmp_path, b"\x80\x02(" + b"N" * 200 + b"t.")), progress=False)


def test_what_torch_save_writes_still_loads(tmp_path):
    """OrderedDict state dicts with _metadata (set by BUILD), parameters and scalars, as torch.save writes them."""
    torch = pytest.importorskip("torch", reason="torch.save writes the reference file")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    state = model.state_dict()
    state["scalar"] = torch.tensor(1.5)
    state["transposed_bf16"] = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    out = read_checkpoint(str(path), progress=False)
    for name, tensor in state.items():
        np.testing.assert_array_equal(out[name], tensor.float().numpy())
    torch.save({"p": torch.nn.Parameter(torch.ones(2))}, path)
    np.testing.assert_array_equal(read_checkpoint(str(path), progress=False)["p"], np.ones(2, np.float32))


def test_duplicate_zip_members_are_refused(tmp_path):
    """zipfile keeps the last of two members with one name, other readers the first: the file is ambiguous."""
    path = tmp_path / "pytorch_model.bin"
    cf.torch_zip(path, cf.state_dict_pickle([("a", cf.tensor_ops("FloatStorage", "0", 4, 0, [4], [1]))]),
                 {"0": bytes(16)})
    for member, raw in (("archive/data/0", np.ones(4, np.float32).tobytes()), ("archive/data.pkl", b"\x80\x02}.")):
        copy = tmp_path / "copy.bin"
        shutil.copy(path, copy)
        with warnings.catch_warnings(), zipfile.ZipFile(copy, "a") as z:
            warnings.simplefilter("ignore")  # zipfile warns "Duplicate name" and writes it anyway
            z.writestr(member, raw)
        with pytest.raises(CheckpointError, match=f"lists the member '{member}' twice"):
            read_checkpoint(str(copy), progress=False)


SECRET = b"SECRETPASSWORD=hunter2 and the rest of a private file\n" * 30


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "model.gguf"])
def test_a_symlinked_file_does_not_show_its_targets_bytes(tmp_path, name):
    """A repository can hold a symlink to a private file; the error must not print its first bytes (as text or as
    the integer that the first 8 bytes read as a header length)."""
    pytest.importorskip("gguf") if name.endswith(".gguf") else None
    (tmp_path / "secret").write_bytes(SECRET)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.symlink(tmp_path / "secret", folder / name)
    leaks = ["SECRET", "PASSWORD", *(str(int.from_bytes(SECRET[a:b], "little")) for a, b in ((0, 8), (4, 8), (0, 4)))]
    for path in (folder, folder / name):
        with pytest.raises(CheckpointError) as caught:
            read_checkpoint(str(path), progress=False)
        assert not any(leak in str(caught.value) for leak in leaks), str(caught.value)


def test_summary_is_bounded():
    """The message helper does bounded work on values whose str() would be exponential or huge (in a child: were
    it str(), the test would hang)."""
    outcome, took = isolated("from refimpl.formats.untrusted import summary\n"
                             "x = 0\n"
                             "for _ in range(200):\n"
                             "    x = (x, x)\n"
                             "assert len(summary(x)) < 100 and len(summary('y' * 10**7)) < 100\n"
                             "assert len(summary(10**5000)) < 40\n"
                             "cyclic = {}\n"
                             "cyclic['self'] = cyclic\n"
                             "assert summary(cyclic) == \"{'self': {'self': {...}}}\", summary(cyclic)")
    assert outcome == "no error" and took < 1


# --- GGUF: counts in the header are checked against the file before they are used ---------------------------------

def gguf_str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return gguf_str(key) + struct.pack("<I", 8) + gguf_str(value)


def kv_u32(key: str, value: int) -> bytes:
    return gguf_str(key) + struct.pack("<II", 4, value)


def tensor_info(name: str, dims, ggml_type: int = 0, offset: int = 0) -> bytes:
    return gguf_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


LLAMA_KV = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1),
            kv_u32("llama.attention.head_count", 1), kv_u32("llama.embedding_length", 4)]


def gguf_bytes(kvs, tensors=(), data=b"", counts=None) -> bytes:
    """A GGUF v3 file; counts=(tensor count, metadata count) overrides what the header claims. Without tensors it
    ends right after the metadata, as the attack file does (the gguf package then reads on past the end)."""
    n_tensors, n_kv = counts or (len(tensors), len(kvs))
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % 32 if tensors else 0) + data


def gguf_file(tmp_path, data: bytes):
    pytest.importorskip("gguf", reason="GGUF reading needs the optional gguf package")
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return path


HOSTILE_GGUF = {  # name -> (file bytes, what the message says)
    "numeric array of 2**62": (gguf_bytes(LLAMA_KV + [gguf_str("tokenizer.ggml.token_type") +
                                                      struct.pack("<IIQ", 9, 0, 2**62)]), "needs"),
    "string array of 2**62": (gguf_bytes(LLAMA_KV + [gguf_str("tokenizer.ggml.tokens") +
                                                     struct.pack("<IIQ", 9, 8, 2**62)]), "claims 4611686018427387904"),
    "string of 2**62 bytes": (gguf_bytes(LLAMA_KV + [gguf_str("x") + struct.pack("<IQ", 8, 2**62)]),
                              "string of 4611686018427387904 bytes"),
    "2**62 metadata entries": (gguf_bytes(LLAMA_KV, counts=(0, 2**62)), "metadata entries"),
    "2**62 tensors": (gguf_bytes(LLAMA_KV, counts=(2**62, 4)), "claims 4611686018427387904 tensors"),
    "2**32-1 dims": (gguf_bytes(LLAMA_KV, [gguf_str("token_embd.weight") + struct.pack("<I", 2**32 - 1)]),
                     "4294967295 dimensions"),
    "5 dims": (gguf_bytes(LLAMA_KV, [tensor_info("token_embd.weight", [1] * 5)]), "5 dimensions"),
    "dims overflowing": (gguf_bytes(LLAMA_KV, [tensor_info("token_embd.weight", [2**63, 2**63])]), "past the end"),
    "dims too large to index": (gguf_bytes(LLAMA_KV, [tensor_info("token_embd.weight", [2**40, 2**40, 0])]),
                                "too large to index"),
    "array of arrays": (gguf_bytes(LLAMA_KV + [gguf_str("a") + struct.pack("<IIQ", 9, 9, 1)]), "arrays of arrays"),
    "unknown value type": (gguf_bytes(LLAMA_KV + [gguf_str("a") + struct.pack("<I", 13)]), "value type 13"),
    "alignment not a power of two": (gguf_bytes(LLAMA_KV + [kv_u32("general.alignment", 24)]), "power of two"),
    "duplicate key": (gguf_bytes(LLAMA_KV + [kv_u32("llama.block_count", 1)]), "appears twice"),
    "duplicate tensor": (gguf_bytes(LLAMA_KV, [tensor_info("output_norm.weight", [4])] * 2, bytes(16)),
                         "appears twice"),
    "unknown ggml type": (gguf_bytes(LLAMA_KV, [tensor_info("output_norm.weight", [4], 1000)], bytes(16)),
                          "ggml type 1000"),
    "partial block": (gguf_bytes(LLAMA_KV, [tensor_info("output_norm.weight", [4], 8)], bytes(64)),
                      "not whole Q8_0 blocks of 32"),
    "misaligned offset": (gguf_bytes(LLAMA_KV, [tensor_info("output_norm.weight", [4], 0, 4)], bytes(32)),
                          "not a multiple of the alignment"),
    "big-endian or v1": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "version 50331648"),
    # found by tests/test_fuzz_formats.py: a metadata array compared with a str raised NumPy's ValueError
    "architecture an array": (gguf_bytes([gguf_str("general.architecture") + struct.pack("<IIQ", 9, 0, 0)]),
                              "general.architecture is (0, 0, <ndarray>)"),
    "rope scaling type an array": (gguf_bytes(LLAMA_KV + [gguf_str("llama.rope.scaling.type") +
                                                          struct.pack("<IIQ", 9, 0, 0)]),
                                   "rope scaling type is (0, 0, <ndarray>), not a string"),
}


UNBOUNDED = {"numeric array of 2**62", "string array of 2**62", "string of 2**62 bytes", "2**62 metadata entries",
             "2**62 tensors", "2**32-1 dims", "dims overflowing"}  # read in a child: a loop or allocation runs away


@pytest.mark.parametrize("case", sorted(HOSTILE_GGUF))
def test_hostile_gguf_headers_are_refused_within_bounds(tmp_path, case):
    """Before: the 2**62-element array made the gguf package read past the end of the file, allocating ~110 MB/s
    until the machine ran out of memory; `refimpl inspect` too."""
    data, match = HOSTILE_GGUF[case]
    path = gguf_file(tmp_path, data)
    assert len(data) < 400
    if case not in UNBOUNDED:
        with pytest.raises(CheckpointError, match=re.escape(match)):
            read_checkpoint(str(path), progress=False)
        return
    refused_quickly(read_code(path), match)
    if case == "numeric array of 2**62":
        refused_quickly(f"from refimpl.inspect import describe; describe({str(path)!r}, progress=False)", match)


def test_a_legitimate_large_vocabulary_reads_quickly(tmp_path):
    """A 256,000-token vocabulary (~3 MB of metadata arrays) is walked in well under a second (before: minutes)."""
    gguf = pytest.importorskip("gguf", reason="GGUF reading needs the optional gguf package")
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1), writer.add_head_count(1), writer.add_embedding_length(4)
    count = 256_000
    writer.add_token_list([f"tok{i}".encode() for i in range(count)])
    writer.add_token_scores(np.linspace(0, 1, count, dtype=np.float32).tolist())
    writer.add_token_types([1] * count)
    writer.add_tensor("output_norm.weight", np.ones(4, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    outcome, took = isolated(f"from refimpl.weights import read_gguf; read_gguf({str(path)!r})")
    assert outcome == "no error" and took < 3, (outcome, took)
    from refimpl.formats.gguf import MetadataArray, read_gguf_header

    fields, tensors = read_gguf_header(str(path), gguf)
    assert fields["tokenizer.ggml.tokens"] == MetadataArray(8, count, None)
    assert fields["tokenizer.ggml.scores"].values[-1] == 1 and fields["tokenizer.ggml.token_type"].count == count
    assert tensors[0].data.tolist() == [1.0] * 4


def llama_gguf(tmp_path, block_count: int, names=("blk.0.attn_norm.weight",)):
    """A GGUF file with the llama keys, `block_count` claimed, and a 4-value F32 tensor per name."""
    kvs = [kv_str("general.architecture", "llama"), kv_u32("llama.attention.head_count", 1),
           kv_u32("llama.embedding_length", 4), gguf_str("llama.block_count") + struct.pack("<IQ", 10, block_count)]
    infos = [tensor_info(name, [4], 0, 32 * i) for i, name in enumerate(names)]
    return gguf_file(tmp_path, gguf_bytes(kvs, infos, bytes(32 * len(names))))


def test_an_absurd_block_count_is_refused_before_anything_per_layer(tmp_path):
    path = llama_gguf(tmp_path, 2**40)
    refused_quickly(f"import refimpl; refimpl.load({str(path)!r})", "block_count is 1099511627776")


@pytest.mark.parametrize("name", ["blk.00.attn_norm.weight", "blk.\u0660.attn_norm.weight", "blk.+0.attn_norm.weight",
                                  "blk.2.attn_norm.weight", "blk.\u00b2.attn_norm.weight"])
def test_gguf_block_indices_are_canonical_and_in_range(tmp_path, name):
    path = llama_gguf(tmp_path, 2, ["blk.0.attn_norm.weight", name])
    with pytest.raises(CheckpointError, match="not a parameter of a Llama model with 2 layers"):
        read_checkpoint(str(path), progress=False)


# --- names: one file name, one parameter ------------------------------------------------------------------------

LAYER = "self_attn.q_proj.weight"


@pytest.mark.parametrize("family, first, second", [
    ("llama", "model.norm.weight", "norm.weight"),
    ("llama", "model.layers.0." + LAYER, "layers.0." + LAYER),
    ("llama", "model.lm_head.weight", "lm_head.weight"),
    ("opt", "model.decoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"),
    ("opt", "decoder.layers.1.fc1.weight", "layers.1.fc1.weight"),
])
def test_two_names_for_one_parameter_are_refused_naming_both(family, first, second):
    """Before: the second silently replaced the first."""
    with pytest.raises(CheckpointError, match=f"'{first}' and '{second}' are two names for one parameter"):
        rename({first: 1, second: 2}, family, 2)


@pytest.mark.parametrize("index", ["00", "01", "\u0660", "\u0661", "\u00b2", "+1", " 1", "1_0", "-1", "", "2"])
def test_layer_indices_are_ascii_without_leading_zeros_and_in_range(index):
    """Before: 'layers.00.' aliased 'layers.0.', str.isdigit let '\u0660' (Arabic-Indic zero) through, and
    'layers.\u00b2.' raised a bare ValueError from int()."""
    names = {"model.layers.0." + LAYER: 1, f"model.layers.{index}.{LAYER}": 2}
    with pytest.raises(CheckpointError, match="not a parameter of this llama model \\(2 layers"):
        rename(names, "llama", 2)


def test_rename_allocates_nothing_per_configured_layer():
    """num_layers from a hostile config: before, rename built 10**12 dicts first."""
    refused_quickly("from refimpl.weights import rename; "
                    f"rename({{'model.layers.0.{LAYER}': 0}}, 'llama', 10**12)", "no tensor of layer 1")
    names = {"model.layers.1." + LAYER: 1, "model.layers.0." + LAYER: 0, "model.norm.weight": 2}
    top, layers = rename(names, "llama", 2)
    assert top == {"norm": 2} and layers == [{"q_proj": 0}, {"q_proj": 1}]


def test_a_folder_with_an_aliased_tensor_does_not_load(tmp_path):
    tensors = cf.golden_tensors("llama_mha")
    tensors["norm.weight"] = tensors["model.norm.weight"] + 1  # a second value for the final norm
    folder = tmp_path / "aliased"
    folder.mkdir()
    shutil.copy(os.path.join(GOLDEN, "models", "llama_mha", "config.json"), folder)
    cf.write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match="'model.norm.weight' and 'norm.weight' are two names"):
        refimpl.load(str(folder))


# --- shapes NumPy cannot hold: a CheckpointError, not NumPy's ValueError ----------------------------------------

def safetensors_with(tmp_path, shape, nbytes=0):
    header = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))
    return path


@pytest.mark.parametrize("shape, match", [([1] * 65, "65 dimensions"), ([2**40, 2**40, 0], "too large to index"),
                                          ([2**63, 0], "too large to index"),
                                          ([0, 2**31, 2**31], "too large to index")])  # float64 needs 2**65 bytes
def test_safetensors_shapes_numpy_cannot_hold(tmp_path, shape, match):
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(str(safetensors_with(tmp_path, shape, 4 if 0 not in shape else 0)), progress=False)


def op_longs(values) -> bytes:
    """MARK, one LONG1 per value, TUPLE."""
    def long1(n):
        raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw
    return b"(" + b"".join(long1(v) for v in values) + b"t"


@pytest.mark.parametrize("size, stride, match", [
    ([2**40, 2**40, 0], [1, 1, 1], "too large to index"),
    ([0], [2**62], "stride .* too large"),
    ([1] * 65, [1] * 65, "tuple of 65 items"),
])
def test_pickled_shapes_numpy_cannot_hold(tmp_path, size, stride, match):
    tensor = cf.tensor_ops("FloatStorage", "0", 0, 0, [7] * len(size), [7] * len(stride))
    ints = cf.op_ints([7] * len(size))  # the size and stride ops, replaced by LONG1 ints of any size
    assert tensor.count(ints) == 2
    first = tensor.index(ints)
    tensor = tensor[:first] + op_longs(size) + op_longs(stride) + tensor[first + 2 * len(ints):]
    path = bin_file(tmp_path, cf.state_dict_pickle([("a", tensor)]), {"0": b""})
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(str(path), progress=False)
