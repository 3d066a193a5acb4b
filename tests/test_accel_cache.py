"""accel's converted-weight cache: keyed by the checkpoint's content, checked entry by entry on every load, replaced
atomically when it fails. Each test tampers with a checkpoint or a cache folder the way issue 15 found possible and
checks that the tampered bytes never run: the load converts again (correct logits) or raises CheckpointError."""
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest

pytest.importorskip("numba", reason="accel needs Numba (pip install 'refimpl[accel]')")
if os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
    pytest.skip("whole models on pure-Python kernels are too slow", allow_module_level=True)

import refimpl  # noqa: E402
from refimpl import CheckpointError  # noqa: E402
from refimpl_accel import convert, loader  # noqa: E402
from refimpl_accel.cpu.forward import ACCEL_CLASSES  # noqa: E402
from refimpl_accel.packing import iter_packed  # noqa: E402

from golden_cases import GOLDEN  # noqa: E402

MODELS = os.path.join(GOLDEN, "models")
ALL_MODELS = sorted(os.listdir(MODELS))
IDS = [[1, 5, 9, 2, 7]]

OPENED = None  # a list while a test records the files Python opens (audit hook: builtins.open, os.open, np.load)


def _record_opens(event, args):
    if event == "open" and OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_record_opens)


def load(path, weights, cache_dir=None):
    return refimpl.load(path, backend="numba", weights=weights, cache_dir=cache_dir)


def output(model):
    """The first output array of a forward on IDS (logits, QA start logits, or the base model's hidden state)."""
    out = model(input_ids=IDS)
    return next(out[k] for k in ("logits", "start_logits", "last_hidden_state") if out[k] is not None)


def entries(cache):
    """The cache folder's entries, temporary and set-aside folders (names starting with '.') excluded."""
    return sorted(cache / e for e in os.listdir(cache) if not e.startswith("."))


def layout_of(path, fmt):
    """(expected layout, key) of a checkpoint in a format, as accel.loader computes them."""
    config = loader.read_model_config(path)
    return convert.expected_layout(config, ACCEL_CLASSES[loader.refimpl_class(config)].head, fmt), \
        convert.fingerprint(path, fmt)


def cached_model(tmp_path, case="llama_mha", weights="fp16"):
    """(checkpoint path, cache dir, the one cache folder, logits of the converting load)."""
    path, cache = os.path.join(MODELS, case), tmp_path / "cache"
    logits = output(load(path, weights, cache))
    (folder,) = entries(cache)
    return path, cache, folder, logits


def scale_weights_in_place(path, factor):
    """Multiply every float32 tensor of path/model.safetensors by factor, in place: same size, same header."""
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = np.memmap(f, dtype=np.uint8, mode="r+", offset=8 + n)
        for name, info in header.items():
            if name != "__metadata__" and info["dtype"] == "F32":
                begin, end = info["data_offsets"]
                values = data[begin:end].view(np.float32)
                values *= np.float32(factor)
        data.flush()
        del data


def copy_with_times(source, dest):
    """A copy of a checkpoint folder whose files keep the source's modification times to the nanosecond."""
    shutil.copytree(source, dest)
    for name in os.listdir(source):
        st = os.stat(os.path.join(source, name))
        os.utime(os.path.join(dest, name), ns=(st.st_atime_ns, st.st_mtime_ns))
    return str(dest)


# --- 1: the key addresses the content -----------------------------------------------------------------------------

def test_same_name_size_and_times_but_other_weights_get_their_own_entry(tmp_path):
    """Two folders named alike whose files have the same sizes and mtimes but other weight bytes: each model runs
    its own weights (the old key, names + sizes + mtimes, gave the second model the first one's cache)."""
    first = copy_with_times(os.path.join(MODELS, "llama_mha"), tmp_path / "a" / "llama_mha")
    second = copy_with_times(os.path.join(MODELS, "llama_mha"), tmp_path / "b" / "llama_mha")
    times = {n: os.stat(os.path.join(second, n)).st_mtime_ns for n in os.listdir(second)}
    scale_weights_in_place(second, 0.5)
    for name, ns in times.items():
        os.utime(os.path.join(second, name), ns=(ns, ns))
        assert os.path.getsize(os.path.join(second, name)) == os.path.getsize(os.path.join(first, name))
    cache = tmp_path / "cache"
    for path in (first, second):
        cached = output(load(path, "fp16", cache))
        np.testing.assert_array_equal(cached, output(load(path, "fp16")))  # the in-memory conversion of this path
    assert len(entries(cache)) == 2
    assert not np.array_equal(output(load(first, "fp16", cache)), output(load(second, "fp16", cache)))


def test_the_key_hashes_every_header_and_samples_of_large_files(tmp_path, monkeypatch):
    """With every file treated as large (FULL_HASH_BYTES = 0): an edit of the safetensors header or of a sampled
    block changes the key; an in-place edit between the samples does not (the limit docs/accel.md states), and
    files up to FULL_HASH_BYTES are hashed whole, so there the same edit does."""
    path = copy_with_times(os.path.join(MODELS, "llama_mha"), tmp_path / "llama_mha")
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    monkeypatch.setattr(convert, "FULL_HASH_BYTES", 0)
    monkeypatch.setattr(convert, "HEAD_BYTES", 0)
    monkeypatch.setattr(convert, "SAMPLE_BLOCKS", 4)
    monkeypatch.setattr(convert, "SAMPLE_BYTES", 16)
    with open(file, "rb") as f:
        header_end = 8 + struct.unpack("<Q", f.read(8))[0]
        ranges = convert.hashed_ranges(f, size, safetensors=True)
    assert ranges[0] == (0, header_end) and ranges[-1] == (size - 16, size)
    hashed = np.zeros(size, bool)
    for start, stop in ranges:
        hashed[start:stop] = True
    unsampled = int(np.flatnonzero(~hashed)[len(np.flatnonzero(~hashed)) // 2])

    def key_after_flipping(offset):
        st = os.stat(file)
        with open(file, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x01]))
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
        try:
            return convert.fingerprint(path, "fp16")
        finally:
            with open(file, "r+b") as f:
                f.seek(offset)
                f.write(byte)
            os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))

    key = convert.fingerprint(path, "fp16")
    assert key_after_flipping(20) != key  # inside the JSON header
    assert key_after_flipping(size - 1) != key  # the last sampled block
    assert key_after_flipping(unsampled) == key  # sampled hashing: not seen
    monkeypatch.setattr(convert, "FULL_HASH_BYTES", 64 << 20)
    assert key_after_flipping(unsampled) != convert.fingerprint(path, "fp16")  # small files: hashed whole


def test_a_cache_made_for_fp16_is_not_used_for_int8(tmp_path, capsys):
    """The fp16 folder copied to the int8 folder's name (a copy, a rename, an old layout): its key is refused and
    int8 is converted; the int8 load runs int8 weights, bit for bit those of an in-memory conversion."""
    path, cache, fp16_folder, fp16_logits = cached_model(tmp_path, weights="fp16")
    assert convert.fingerprint(path, "fp16") != convert.fingerprint(path, "int8")
    int8_folder = convert.folder_for(cache, path, "int8")
    shutil.copytree(fp16_folder, int8_folder)
    with pytest.raises(CheckpointError, match=r"manifest\.json: key '[0-9a-f]{32}', expected '[0-9a-f]{32}'"):
        convert.load(int8_folder, *layout_of(path, "int8"), "int8")
    capsys.readouterr()
    int8_logits = output(load(path, "int8", cache))
    assert "failed its check" in capsys.readouterr().err
    np.testing.assert_array_equal(int8_logits, output(load(path, "int8")))
    assert not np.array_equal(int8_logits, fp16_logits)


# --- 2: every entry's shape and dtype checked ---------------------------------------------------------------------

def _truncate_rows(file):
    np.save(file, np.load(file)[:-1])  # a smaller array, its header consistent: the old load mapped it and ran


def _cut_bytes(file):
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 64)  # the header promises more bytes than the file holds


def _wrong_dtype(file):
    np.save(file, np.load(file).view(np.int16))  # fp16 bit patterns saved as int16: same shape and size


def _fortran_order(file):
    np.save(file, np.asfortranarray(np.load(file)))  # same shape, dtype and values; kernels read C order


@pytest.mark.parametrize("tamper, expected", [
    (_truncate_rows, r"layers\.0\.qkv.* has shape \[191, 64\] <u2, the config and format imply \[192, 64\] <u2"),
    (_cut_bytes, r"entry 'layers\.0\.qkv' is not a readable \.npy file .*expected shape \[192, 64\] uint16"),
    (_wrong_dtype, r"layers\.0\.qkv.* has shape \[192, 64\] <i2, the config and format imply \[192, 64\] <u2"),
    (_fortran_order, r"layers\.0\.qkv.* has shape \[192, 64\] <u2 in Fortran order"),
])
def test_a_tampered_entry_is_refused_then_converted_again(tmp_path, capsys, tamper, expected):
    """An .npy rewritten smaller, cut short, of another dtype or in Fortran order: convert.load raises
    CheckpointError naming the entry, expected and found; accel.load converts again and runs the right weights."""
    path, cache, folder, logits = cached_model(tmp_path)
    tamper(os.path.join(folder, "layers.0.qkv.npy"))
    with pytest.raises(CheckpointError, match=expected):
        convert.load(folder, *layout_of(path, "fp16"), "fp16")
    capsys.readouterr()
    again = output(load(path, "fp16", cache))
    err = capsys.readouterr().err
    assert "failed its check" in err and "layers.0.qkv" in err
    assert np.all(np.isfinite(again))
    np.testing.assert_array_equal(again, logits)
    assert convert.load(folder, *layout_of(path, "fp16"), "fp16") is not None  # the replacement passes
    assert entries(cache) == [folder] and not [e for e in os.listdir(cache) if e.startswith(".")]


def test_a_missing_or_unknown_entry_is_refused(tmp_path):
    path, cache, folder, _ = cached_model(tmp_path, case="llama_tied", weights="int8")
    layout, key = layout_of(path, "int8")
    manifest_file = os.path.join(folder, "manifest.json")
    with open(manifest_file, encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["entries"]["lm_head"] == {"same_as": "embed_tokens"}
    for change, message in (({"lm_head": {"weight": "int8"}}, r"entry 'lm_head' is \{'weight': 'int8'\}"),
                            ({"extra": {"array": True}}, "entry 'extra' is not a parameter the config implies")):
        with open(manifest_file, "w", encoding="utf-8") as f:
            json.dump({**manifest, "entries": {**manifest["entries"], **change}}, f)
        with pytest.raises(CheckpointError, match=message):
            convert.load(folder, layout, key, "int8")
    os.remove(os.path.join(folder, "layers.1.down_proj.scales.npy"))
    with open(manifest_file, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match=r"layers\.1\.down_proj\.scales\.npy: entry 'layers\.1\.down_proj' is "
                                              "missing"):
        convert.load(folder, layout, key, "int8")


# --- 3: no path out of the folder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_manifest_names_leading_out_of_the_folder_are_refused(tmp_path, outside):
    """A manifest entry named '../decoy/embed_tokens' or '/abs/.../embed_tokens', with a decoy there that is a valid
    embed_tokens array: CheckpointError, the decoy is never opened, and accel.load converts again."""
    path, cache, folder, logits = cached_model(tmp_path, weights="fp32")
    decoy_dir = tmp_path / "decoy"
    decoy_dir.mkdir()
    decoy = decoy_dir / "embed_tokens.npy"
    shutil.copy(os.path.join(folder, "embed_tokens.npy"), decoy)
    name = "../../decoy/embed_tokens" if outside == "relative" else str(decoy_dir / "embed_tokens")
    assert os.path.realpath(os.path.join(folder, name + ".npy")) == os.path.realpath(decoy)
    manifest_file = os.path.join(folder, "manifest.json")
    with open(manifest_file, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["entries"] = {(name if k == "embed_tokens" else k): v for k, v in manifest["entries"].items()}
    with open(manifest_file, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    global OPENED
    OPENED = []
    try:
        with pytest.raises(CheckpointError, match="is not a plain file name"):
            convert.load(folder, *layout_of(path, "fp32"), "fp32")
        again = output(load(path, "fp32", cache))
    finally:
        opened, OPENED = OPENED, None
    assert os.path.realpath(decoy) not in opened
    np.testing.assert_array_equal(again, logits)


def test_an_entry_file_that_is_a_link_is_refused(tmp_path):
    """layers.0.o_proj.npy replaced by a link to a valid decoy outside the folder: refused, never followed."""
    path, cache, folder, logits = cached_model(tmp_path, weights="fp32")
    decoy = tmp_path / "decoy.npy"
    entry = os.path.join(folder, "layers.0.o_proj.npy")
    shutil.move(entry, decoy)
    os.symlink(decoy, entry)
    global OPENED
    OPENED = []
    try:
        with pytest.raises(CheckpointError, match=r"layers\.0\.o_proj\.npy: entry 'layers\.0\.o_proj' is not a "
                                                  "regular file"):
            convert.load(folder, *layout_of(path, "fp32"), "fp32")
    finally:
        opened, OPENED = OPENED, None
    assert os.path.realpath(decoy) not in opened
    np.testing.assert_array_equal(output(load(path, "fp32", cache)), logits)


# --- 5: atomic replacement ----------------------------------------------------------------------------------------

def test_a_failing_folder_is_swapped_whole_never_half_deleted(tmp_path, monkeypatch):
    """Rebuilding a folder that failed its check: a failure while converting leaves the old folder exactly as it
    was (nothing deleted, no temporary folder left); a successful rebuild never deletes inside the live folder."""
    path, cache, folder, logits = cached_model(tmp_path)
    _truncate_rows(os.path.join(folder, "layers.1.gate_up.npy"))
    before = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)}

    def failing(*args, **kwargs):
        yield from iter_packed(*args, **kwargs)
        raise OSError("disk full")  # after every array is written, before the manifest

    monkeypatch.setattr(loader, "iter_packed", failing)
    with pytest.raises(OSError, match="disk full"):
        load(path, "fp16", cache)
    assert {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)} == before
    assert os.listdir(cache) == [os.path.basename(folder)]
    monkeypatch.undo()
    removed = []
    real_rmtree = convert.shutil.rmtree
    monkeypatch.setattr(convert.shutil, "rmtree", lambda p, **kw: (removed.append(str(p)), real_rmtree(p, **kw)))
    np.testing.assert_array_equal(output(load(path, "fp16", cache)), logits)
    assert removed and all(os.path.basename(p).startswith(".stale-") for p in removed)
    assert os.listdir(cache) == [os.path.basename(folder)]


# --- the layout table and cache hits ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ALL_MODELS)
def test_the_expected_layout_is_what_packing_writes(case, tmp_path):
    """For every golden model: entries packed by accel.packing.iter_packed, saved, pass convert.load's checks against
    expected_layout (the same names, shapes, dtypes and ties), in fp16 and int8."""
    path = os.path.join(MODELS, case)
    reference = refimpl.load(path)
    family = "opt" if reference.config.family == "opt" else "llama"
    for fmt in ("fp16", "int8"):
        layout, key = layout_of(path, fmt)
        folder = tmp_path / fmt
        convert.save_entries(iter_packed(reference.params, family, fmt), folder, key, fmt)
        params = convert.load(folder, layout, key, fmt)
        assert len([n for n in os.listdir(folder) if n.endswith(".npy")]) == sum(
            len(convert.expected_files(n, s, fmt)) for n, s in layout.items() if s[0] != "same_as")
        assert len(params["layers"]) == reference.config.num_hidden_layers


@pytest.mark.parametrize("case, weights", [("llama_tied", "int8"), ("opt_350m_like", "fp16"),
                                           ("openllama_default", "bf16"), ("opt_qa", "fp32"),
                                           ("llama_seqcls", "int8")])
def test_a_cache_hit_gives_the_fresh_conversion_bit_for_bit(case, weights, tmp_path, capsys):
    path, cache, folder, converting = cached_model(tmp_path, case, weights)
    capsys.readouterr()
    hit = load(path, weights, cache)
    assert capsys.readouterr().err == ""  # no conversion
    np.testing.assert_array_equal(output(hit), converting)
    np.testing.assert_array_equal(output(hit), output(load(path, weights)))
