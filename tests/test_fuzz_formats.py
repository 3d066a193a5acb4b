"""Fuzzing every reader from hostile structure, in one child process with a memory limit.

Hypothesis builds safetensors headers, pickle opcode streams and GGUF headers from structured strategies (counts,
lengths, shapes and nesting chosen to hit the limits), and mutates real files: a .bin written by torch.save and a
GGUF written by gguf.GGUFWriter. Every case must end in a RefimplError or a valid load (every tensor read), within
CASE_SECONDS, in a process limited to MEMORY_LIMIT bytes of address space; a crash or a hang fails the test. The
whole loop runs in ONE child (`python tests/test_fuzz_formats.py FOLDER EXAMPLES`) to keep CI time low; the counts
are printed (pytest -s). REFIMPL_FUZZ_EXAMPLES=5000 runs a longer campaign.
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
import zipfile

EXAMPLES = int(os.environ.get("REFIMPL_FUZZ_EXAMPLES", "400"))  # per target: ~15 s in all
CASE_SECONDS = 5.0
MEMORY_LIMIT = 4 * 2**30
OUTCOMES = ("clean errors", "valid loads", "other")
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def test_every_reader_under_fuzzing(tmp_path):
    """The parent writes the seed files (torch and gguf live here, not in the child) and reads the child's counts."""
    write_seeds(str(tmp_path))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    timeout = 300 + 2 * EXAMPLES
    try:
        done = subprocess.run([sys.executable, __file__, str(tmp_path), str(EXAMPLES)], capture_output=True,
                              text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the fuzz child ran past {timeout} s: a case hangs") from None
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
    counts = json.loads(last) if last.startswith("{") else {}
    print("\n" + report(counts))
    assert done.returncode == 0, (f"the fuzz child ended with status {done.returncode} (negative: a signal; -11 is "
                                  f"SIGSEGV):\n{done.stderr[-6000:]}")
    assert counts and all(c["other"] == 0 for c in counts.values()), report(counts)
    assert all(c["clean errors"] > 0 for c in counts.values())  # each target reached the readers' checks


def report(counts: dict) -> str:
    rows = [f"{'fuzz target':<28} {'tried':>6} " + " ".join(f"{o:>12}" for o in OUTCOMES) + "  slowest"]
    for target, c in counts.items():
        rows.append(f"{target:<28} {sum(c[o] for o in OUTCOMES):>6} " + " ".join(f"{c[o]:>12}" for o in OUTCOMES)
                    + f"  {c['slowest']:.3f} s")
    total = {o: sum(c[o] for c in counts.values()) for o in OUTCOMES}
    rows.append(f"{'all':<28} {sum(total.values()):>6} " + " ".join(f"{total[o]:>12}" for o in OUTCOMES))
    return "\n".join(rows)


def write_seeds(folder: str) -> None:
    """seed.bin from torch.save (hand-written opcodes when torch is absent) and seed.gguf from gguf.GGUFWriter."""
    import numpy as np

    import checkpoint_files as cf

    tensors = {"embed": np.arange(24, dtype=np.float32).reshape(6, 4), "norm": np.ones(4, np.float16),
               "ids": np.arange(3, dtype=np.int64)}
    try:
        import torch

        state = {name: torch.from_numpy(a) for name, a in tensors.items()}
        state["transposed"] = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t()
        torch.save(state, os.path.join(folder, "seed.bin"))
    except ImportError:
        cf.write_bin_numpy(os.path.join(folder, "seed.bin"), tensors)
    try:
        import gguf
    except ImportError:
        return
    writer = gguf.GGUFWriter(os.path.join(folder, "seed.gguf"), "llama")
    writer.add_block_count(1), writer.add_head_count(2), writer.add_embedding_length(32)
    writer.add_token_list([b"<s>", b"a", b"b"]), writer.add_token_scores([0.0, 1.0, 2.0])
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    q = gguf.quants.quantize(np.ones((4, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()


# --- the child: strategies, one check per case, counts --------------------------------------------------------

def child(folder: str, examples: int) -> int:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    sys.path[:0] = [REPO, TESTS]
    from hypothesis import HealthCheck, given, settings

    counts, failures = {}, []
    fuzz = settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    for name, strategy, suffix in targets(folder):
        counts[name] = {**{o: 0 for o in OUTCOMES}, "slowest": 0.0}
        try:
            given(strategy)(fuzz(one_case(folder, suffix, counts[name])))()
        except Exception as exc:  # hypothesis re-raises the shrunk failing case; the other targets still run
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:2000]}")
    for failure in failures:
        print(failure, file=sys.stderr)
    print(json.dumps(counts))
    return 1 if failures else 0


def one_case(folder: str, suffix: str, counts: dict):
    """The function hypothesis calls with each generated file (hypothesis refuses lambdas with defaults)."""
    def case(data):
        check(folder, data, suffix, counts)
    return case


def check(folder: str, data: bytes, suffix: str, counts: dict) -> None:
    """Write the case, read every tensor: a RefimplError or a valid load, in CASE_SECONDS; anything else fails."""
    import numpy as np

    from refimpl.errors import RefimplError
    from refimpl.weights import read_checkpoint

    path = os.path.join(folder, "case" + suffix)
    with open(path, "wb") as f:
        f.write(data)
    start = time.perf_counter()
    try:
        for array in read_checkpoint(path, progress=False).values():
            np.asarray(array, dtype=np.float64)
        outcome, problem = "valid loads", None
    except RefimplError:
        outcome, problem = "clean errors", None
    except Exception as exc:  # noqa: BLE001 -- what the fuzz looks for
        outcome, problem = "other", f"{type(exc).__name__}: {str(exc)[:300]}"
    took = time.perf_counter() - start
    if took > CASE_SECONDS:
        outcome, problem = "other", f"took {took:.1f} s"
    counts[outcome] += 1
    counts["slowest"] = max(counts["slowest"], round(took, 4))
    assert problem is None, f"{problem} on {len(data)} bytes: {data[:300]!r}"


def targets(folder: str):
    """(name, strategy of file bytes, file suffix) for each fuzz target; the GGUF ones only with the gguf package."""
    with open(os.path.join(folder, "seed.bin"), "rb") as f:
        seed_bin = f.read()
    yield "safetensors headers", safetensors_files(), ".safetensors"
    yield "pickle opcode streams", pickle_streams().map(bin_with_pickle), ".bin"
    yield "torch.save .bin, mutated", mutated_bins(seed_bin), ".bin"
    if os.path.exists(os.path.join(folder, "seed.gguf")):
        with open(os.path.join(folder, "seed.gguf"), "rb") as f:
            seed_gguf = f.read()
        yield "GGUF headers", gguf_files(), ".gguf"
        yield "GGUFWriter file, mutated", mutations().map(lambda m: mutate(seed_gguf, m)), ".gguf"


# --- byte mutations -------------------------------------------------------------------------------------------

INTERESTING = (0, 1, 7, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1)


def mutations():
    """Lists of ('flip', pos, byte) | ('cut', pos) | ('insert', pos, bytes) | ('int', pos, value, width)."""
    from hypothesis import strategies as st

    position = st.integers(0, 2**16)
    one = st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 255)),
        st.tuples(st.just("cut"), position),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("int"), position, st.sampled_from(INTERESTING), st.sampled_from([4, 8])),
    )
    return st.lists(one, min_size=1, max_size=4)


def mutate(data: bytes, changes) -> bytes:
    data = bytearray(data)
    for kind, position, *rest in changes:
        position %= len(data) + 1
        if kind == "flip" and position < len(data):
            data[position] = rest[0]
        elif kind == "cut":
            del data[position:]
        elif kind == "insert":
            data[position:position] = rest[0]
        elif kind == "int":
            value, width = rest
            data[position:position + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    return bytes(data)


def mutated_bins(seed: bytes):
    """The torch.save file mutated as bytes, or its data.pkl mutated inside a re-written, valid zip."""
    from hypothesis import strategies as st

    return st.one_of(mutations().map(lambda m: mutate(seed, m)),
                     mutations().map(lambda m: rezip(seed, lambda pickled: mutate(pickled, m))))


def rezip(data: bytes, change) -> bytes:
    """A zip with the members of `data`, data.pkl passed through change (CRCs recomputed, so the pickle is read)."""
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, raw in members.items():
            z.writestr(name, change(raw) if name.endswith("/data.pkl") else raw)
    return out.getvalue()


# --- safetensors headers ----------------------------------------------------------------------------------------

def safetensors_files():
    """A header of 1-3 entries laid out correctly, then perhaps one field or the length prefix made hostile."""
    from hypothesis import strategies as st

    dims = st.one_of(st.integers(0, 5), st.sampled_from([2**31, 2**40, 2**62, 2**63, 2**64, -1]))
    shape = st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(dims, max_size=4),
                      st.integers(60, 70).map(lambda n: [1] * n))
    dtype = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "", 3])
    entry = st.tuples(st.text(max_size=6), dtype, shape)
    hostile = st.one_of(st.none(), st.tuples(st.sampled_from(["dtype", "shape", "data_offsets", None]),
                                             st.recursive(st.none() | st.integers(-2**65, 2**65) | st.text(max_size=4),
                                                          lambda x: st.lists(x, max_size=3), max_leaves=6)))
    prefix = st.one_of(st.none(), st.sampled_from(INTERESTING))
    return st.builds(safetensors_bytes, st.lists(entry, min_size=1, max_size=3), hostile, prefix,
                     st.integers(-8, 8))


def safetensors_bytes(entries, hostile, prefix, extra) -> bytes:
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = {"F64": 8, "F32": 4, "I64": 8, "F16": 2, "BF16": 2}.get(dtype, 1)
        count = 1
        for d in shape:
            count *= d
        nbytes = max(0, min(count * size, 4096))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if hostile is not None:
        field, value = hostile
        first = header[next(iter(header))]
        if field is None:
            header[next(iter(header))] = value
        else:
            first[field] = value
    text = json.dumps(header).encode()
    length = len(text) if prefix is None else prefix
    return struct.pack("<Q", length) + text + bytes(max(0, offset + extra))


# --- pickles ------------------------------------------------------------------------------------------------------

STORAGES = {"0": bytes(16), "1": bytes(8)}


def bin_with_pickle(pickled: bytes) -> bytes:
    import io

    import checkpoint_files as cf

    out = io.BytesIO()
    cf.torch_zip(out, pickled, STORAGES)
    return out.getvalue()


def pickle_streams():
    """PROTO 2, a body, STOP. The body is a state dict of generated items, or a free sequence of opcode tokens."""
    from hypothesis import strategies as st

    import checkpoint_files as cf

    token = pickle_token()
    value = st.one_of(tensor_ops(), valid_tensor_ops(), st.lists(token, max_size=6).map(b"".join))
    items = st.lists(st.tuples(st.sampled_from(["a", "b", "_metadata", ""]), value), max_size=4)
    free = st.lists(token, max_size=40).map(lambda ops: b"\x80\x02" + b"".join(ops) + b".")
    return st.one_of(items.map(cf.state_dict_pickle), free)


def pickle_token():
    """One opcode with its argument: the ones torch.save writes, and some it never does (DUP, POP, lists, sets)."""
    from hypothesis import strategies as st

    import checkpoint_files as cf

    ints = st.one_of(st.integers(-3, 300), st.sampled_from([2**31, 2**62, 2**64, -2**70, 10**40]))
    strings = st.one_of(st.sampled_from(["storage", "0", "1", "2", "cpu", "version", "_metadata"]),
                        st.text(max_size=6))
    names = st.sampled_from([("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                             ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_parameter"),
                             ("torch", "FloatStorage"), ("torch", "BFloat16Storage"), ("torch", "LongStorage"),
                             ("builtins", "eval"), ("os", "system")])
    simple = st.sampled_from([b"(", b")", b"t", b"\x85", b"\x86", b"\x87", b"}", b"]", b"s", b"u", b"R", b"b",
                              b"Q", b"N", b"\x88", b"\x89", b"2", b"0", b"a", b"\x94", b"\x8f", b"1", b"e"])
    memo = st.tuples(st.sampled_from([b"q", b"h"]), st.integers(0, 6)).map(lambda t: t[0] + bytes([t[1]]))
    return st.one_of(ints.map(op_any_int), strings.map(cf.op_str), names.map(lambda n: cf.op_global(*n)), simple,
                     memo, tensor_ops())


def op_any_int(n: int) -> bytes:
    import checkpoint_files as cf

    if -2**31 <= n < 2**31:
        return cf.op_int(n)
    raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def tensor_ops():
    """A whole _rebuild_tensor_v2 call: storage, numel, offset, size and stride drawn around the valid ones."""
    from hypothesis import strategies as st

    import checkpoint_files as cf

    def ops(cls, key, numel, offset, size):
        return cf.tensor_ops(cls, key, numel, offset, size, stride_of(size))

    small = st.integers(0, 5)
    return st.builds(ops, st.sampled_from(["FloatStorage", "HalfStorage", "LongStorage", "BFloat16Storage"]),
                     st.sampled_from(["0", "1", "9"]), st.sampled_from([0, 1, 2, 4, 8, 2**31 - 1]), small,
                     st.lists(small, max_size=3))


def valid_tensor_ops():
    """A _rebuild_tensor_v2 call that fits its storage: what makes valid loads reachable."""
    from hypothesis import strategies as st

    import checkpoint_files as cf

    def ops(key, cls, size):
        itemsize = {"FloatStorage": 4, "HalfStorage": 2, "LongStorage": 8}[cls]
        return cf.tensor_ops(cls, key, len(STORAGES[key]) // itemsize, 0, size, stride_of(size))

    return st.builds(ops, st.just("0"), st.sampled_from(["FloatStorage", "HalfStorage", "LongStorage"]),
                     st.sampled_from([[], [2], [2, 1], [1, 2], [0, 3]]))


def stride_of(size) -> list:
    stride, step = [], 1
    for d in reversed(size):
        stride.insert(0, step)
        step *= max(d, 1)
    return stride


# --- GGUF headers ---------------------------------------------------------------------------------------------------

def gguf_files():
    """Metadata and tensor infos from GGUF's own vocabulary, with counts and lengths that may lie."""
    from hypothesis import strategies as st

    counts = st.one_of(st.none(), st.sampled_from(INTERESTING))
    hostile = st.builds(gguf_bytes, st.sampled_from([3, 3, 3, 2, 1, 4, 2**31]), st.lists(gguf_kv(), max_size=7),
                        st.lists(gguf_tensor(), max_size=4), counts, counts, st.binary(max_size=300), st.booleans())
    laid_out = st.builds(laid_out_gguf, st.lists(gguf_kv(), max_size=3),
                         st.lists(st.tuples(st.sampled_from(list(VALID_TENSORS)), st.sampled_from([0, 1])),
                                  min_size=1, max_size=4, unique_by=lambda t: t[0]))
    return st.one_of(hostile, laid_out)


VALID_TENSORS = {"token_embd.weight": (4, 8), "output_norm.weight": (4,), "blk.0.attn_norm.weight": (4,),
                 "blk.0.attn_q.weight": (4, 4), "output.weight": (4, 8)}  # ggml dims, fastest first


def laid_out_gguf(kvs, tensors) -> bytes:
    """A llama GGUF whose F32/F16 tensors are laid out as GGUFWriter lays them out (32-byte aligned), then kvs."""
    infos, offset = [], 0
    for name, ggml_type in tensors:
        dims = VALID_TENSORS[name]
        infos.append(g_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset))
        nbytes = (4 if ggml_type == 0 else 2) * math.prod(dims)
        offset += nbytes + (-nbytes % 32)
    return gguf_bytes(3, kvs, infos, None, None, bytes(offset), True)


def gguf_bytes(version, kvs, tensors, tensor_count, kv_count, data, llama) -> bytes:
    head_kvs = [g_str("general.architecture") + struct.pack("<I", 8) + g_str("llama"),
                g_str("llama.block_count") + struct.pack("<II", 4, 1),
                g_str("llama.attention.head_count") + struct.pack("<II", 4, 1),
                g_str("llama.embedding_length") + struct.pack("<II", 4, 4)] if llama else []
    kvs = head_kvs + kvs
    n_tensors = len(tensors) if tensor_count is None else tensor_count
    n_kv = len(kvs) if kv_count is None else kv_count
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % 32) + data


def g_str(text: str, claimed=None) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw


def gguf_kv():
    from hypothesis import strategies as st

    keys = st.one_of(st.sampled_from(["general.architecture", "llama.block_count", "llama.attention.head_count",
                                      "llama.embedding_length", "general.alignment", "tokenizer.ggml.tokens",
                                      "llama.rope.freq_base", "llama.rope.scaling.type", "llama.context_length"]),
                     st.text(max_size=6))
    scalar = st.tuples(st.sampled_from([0, 4, 5, 6, 7, 10, 11, 12]), st.integers(0, 2**64 - 1))
    value = st.one_of(
        scalar.map(lambda t: struct.pack("<I", t[0]) + pack_scalar(*t)),
        st.tuples(st.text(max_size=8), st.one_of(st.none(), st.sampled_from(INTERESTING))).map(
            lambda t: struct.pack("<I", 8) + g_str(*t)),
        st.tuples(st.sampled_from([0, 4, 6, 8, 9, 13]), st.lists(st.integers(0, 255), max_size=8),
                  st.one_of(st.none(), st.sampled_from(INTERESTING))).map(lambda t: gguf_array(*t)),
        st.integers(13, 2**32 - 1).map(lambda t: struct.pack("<I", t)),
    )
    return st.tuples(keys.map(g_str), value).map(b"".join)


def pack_scalar(vtype: int, n: int) -> bytes:
    fmt = {0: "<B", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}[vtype]
    size = struct.calcsize(fmt)
    return (n % 2 ** (8 * size)).to_bytes(size, "little")


def gguf_array(etype: int, items, claimed) -> bytes:
    if etype == 8:
        body = b"".join(g_str(str(i)) for i in items)
    else:
        body = b"".join(struct.pack("<I", i) if etype in (4, 6) else bytes([i]) for i in items)
    count = len(items) if claimed is None else claimed
    return struct.pack("<IIQ", 9, etype, count) + body


def gguf_tensor():
    from hypothesis import strategies as st

    names = st.one_of(st.sampled_from(["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
                                       "blk.0.attn_norm.weight", "blk.00.attn_norm.weight", "blk.1.ffn_up.weight",
                                       "output.weight", "rope_freqs.weight"]), st.text(max_size=6))
    dims = st.lists(st.one_of(st.sampled_from([0, 1, 2, 4, 32]), st.sampled_from(INTERESTING)), max_size=6)
    return st.builds(lambda name, ds, t, off: g_str(name) + struct.pack(f"<I{len(ds)}QIQ", len(ds), *ds, t, off),
                     names, dims, st.sampled_from([0, 1, 8, 12, 28, 30, 26, 1000]),
                     st.sampled_from([0, 32, 64, 7, 2**63]))


if __name__ == "__main__":
    sys.exit(child(sys.argv[1], int(sys.argv[2])))
