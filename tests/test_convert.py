"""`refimpl convert SRC DST` writes what transformers writes.

Meta folders: transformers' own conversion script (convert_llama_weights_to_hf.write_model, called in-process) runs
on the same folder, and every tensor must come out equal bit for bit; in fact the safetensors files must be equal
byte for byte, since both follow the safetensors library's layout. Hugging Face folders: the golden models are
re-sharded with a tiny --max-shard-size, and the files, names and index must equal what save_pretrained writes with
the same limit, and refimpl must give the same outputs from them. GGUF and .bin sources, the refusals, the cleanup
after a failure and the tile-by-tile streaming are checked too.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest

import checkpoint_files as cf
import refimpl
from golden_cases import GOLDEN, replay
from refimpl import InputError
from refimpl import convert
from refimpl.cli import main
from refimpl.weights import list_checkpoint
from test_meta_checkpoint import GQA_CONFIG, golden_meta, gqa_meta

RESHARD_CASES = ["llama_mha", "llama_base", "openllama_default", "opt_350m_like", "opt_qa"]


def run_cli(*argv):
    return main(["convert", *map(str, argv), "--quiet"])


def safetensors_files(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")}


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def outputs(case, model) -> dict:
    return {f"{call}.{key}": np.asarray(actual) for call, key, _, actual in replay(case, model=model)}


def run_conversion_script(src, dst, vocab_size):
    """transformers' write_model as its main() calls it for a Llama 2 folder, minus the tokenizer step: main() passes
    vocab_size=len(tokenizer) and the shard count; we pass both directly (num_shards=2, the count of our
    consolidated.NN.pth, which also selects the script's sharded branch). It saves with save_pretrained (bf16)."""
    script = pytest.importorskip("transformers.models.llama.convert_llama_weights_to_hf")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        script.write_model(model_path=str(dst), input_base_path=str(src), llama_version="2", vocab_size=vocab_size,
                           num_shards=2, safe_serialization=True)


# --- Meta -> Hugging Face, against transformers' conversion script --------------------------------------------------

@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_meta_conversion_equals_transformers_script(which, tmp_path):
    """bf16 shards (what Meta ships): every tensor of ours equals the script's bit for bit (names, shapes, dtypes,
    values: compared through the safetensors library), the files are equal byte for byte, and config.json and
    generation_config.json agree on every field but transformers_version."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    src = golden_meta(tmp_path, kind="bf16") if which == "mha" else gqa_meta(tmp_path, kind="bf16")
    assert run_cli(src, tmp_path / "ours") == 0
    run_conversion_script(src, tmp_path / "theirs", vocab_size=192 if which == "mha" else GQA_CONFIG["vocab_size"])
    ours, theirs = st.load_file(tmp_path / "ours" / "model.safetensors"), st.load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype == torch.bfloat16 and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name].view(torch.int16), tensor.view(torch.int16)), name
    assert safetensors_files(tmp_path / "ours") == safetensors_files(tmp_path / "theirs")
    for file in ("config.json", "generation_config.json"):
        expected = read_json(tmp_path / "theirs" / file)
        expected.pop("transformers_version")
        assert read_json(tmp_path / "ours" / file) == expected, file
    assert os.path.isfile(tmp_path / "ours" / "tokenizer.model")  # copied; the script writes it in another step


def test_fp32_meta_converted_to_bf16_equals_the_script(tmp_path):
    """The script rounds to bfloat16 (from_pretrained(torch_dtype=bfloat16)); --dtype bf16 rounds the same way."""
    src = gqa_meta(tmp_path, kind="fp32")
    assert run_cli(src, tmp_path / "ours", "--dtype", "bf16") == 0
    run_conversion_script(src, tmp_path / "theirs", vocab_size=GQA_CONFIG["vocab_size"])
    assert safetensors_files(tmp_path / "ours") == safetensors_files(tmp_path / "theirs")
    assert run_cli(src, tmp_path / "kept") == 0  # without --dtype: the stored fp32, which loads as the Meta folder
    ids = [[1, 5, 9, 33, 2]]
    np.testing.assert_array_equal(refimpl.load(tmp_path / "kept")(input_ids=ids).logits,
                                  refimpl.load(src)(input_ids=ids).logits)


def test_bf16_rounding_is_torch_rounding():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    normal = (rng.standard_normal(10000) * 10.0 ** rng.integers(-44, 37, 10000)).astype(np.float32)  # subnormals too
    special = np.array([0x7FC00000, 0xFFC00000, 0x7F800000, 0xFF800000, 0, 0x80000000, 0x7F7FFFFF,  # NaN, inf, 0, max
                        0x7F800001, 0xFFFFFFFF, 0x3F808000, 0x3F818000], np.uint32).view(np.float32)  # payloads, ties
    x = np.concatenate([normal, special])
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(convert.f32_to_bf16_bits(x), expected)


def test_a_file_is_laid_out_as_the_safetensors_library_lays_it_out(tmp_path):
    """Every dtype in one file: tensors grouped by dtype in the library's order, then by name; the same bytes."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    rng = np.random.default_rng(1)
    tensors = {f"t{i}.{dtype}": torch.from_numpy(rng.standard_normal((3, 5)) * 9).to(getattr(torch, dtype))
               for i, dtype in enumerate(["bfloat16", "float16", "float32", "float64", "int64", "int32", "int16",
                                          "int8", "uint8", "bool"])}
    st.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    stored = list_checkpoint(tmp_path / "theirs.safetensors", progress=False)
    convert.write_safetensors(tmp_path / "ours.safetensors", [(n, t, t.dtype) for n, t in reversed(stored.items())])
    assert open(tmp_path / "ours.safetensors", "rb").read() == open(tmp_path / "theirs.safetensors", "rb").read()


# --- Hugging Face -> Hugging Face, against save_pretrained ------------------------------------------------------------

@pytest.mark.parametrize("case", RESHARD_CASES)
def test_resharding_a_golden_model_matches_save_pretrained(case, tmp_path):
    """--max-shard-size 20KB splits every golden model into several shards (a tensor over the limit alone in its own):
    refimpl gives the same outputs bit for bit, and the shard files and index equal save_pretrained's byte for byte."""
    golden = os.path.join(GOLDEN, "models", case)
    assert run_cli(golden, tmp_path / "ours", "--max-shard-size", "20KB") == 0
    ours = safetensors_files(tmp_path / "ours")
    assert len(ours) > 2 and "model.safetensors" not in ours
    for name, value in outputs(case, refimpl.load(golden)).items():
        np.testing.assert_array_equal(outputs(case, refimpl.load(tmp_path / "ours"))[name], value, err_msg=name)
    transformers = pytest.importorskip("transformers")
    architecture = read_json(os.path.join(golden, "config.json"))["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(golden)
    model.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    assert ours == safetensors_files(tmp_path / "theirs")
    index = "model.safetensors.index.json"
    assert open(tmp_path / "ours" / index).read() == open(tmp_path / "theirs" / index).read()
    assert read_json(tmp_path / "ours" / "config.json") == read_json(os.path.join(golden, "config.json"))


def test_what_save_pretrained_would_not_write_is_dropped(tmp_path):
    """A tied lm_head stored anyway and the rotary_emb.inv_freq buffers of transformers < 4.31 (both in old .bin
    files) are not written, as save_pretrained of the loaded model would not write them."""
    transformers = pytest.importorskip("transformers")
    src = cf.new_folder("llama_tied", tmp_path, "extra")
    tensors = cf.golden_tensors("llama_tied")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    tensors["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    cf.write_safetensors(os.path.join(src, "model.safetensors"), tensors)
    assert run_cli(src, tmp_path / "ours") == 0
    assert sorted(list_checkpoint(tmp_path / "ours", progress=False)) == sorted(cf.golden_tensors("llama_tied"))
    transformers.LlamaForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "theirs")
    assert safetensors_files(tmp_path / "ours") == safetensors_files(tmp_path / "theirs")


def test_a_small_model_stays_one_file_and_keeps_its_tokenizer(tmp_path):
    src = os.path.join(GOLDEN, "models", "llama_text")
    assert run_cli(src, tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(src))
    for name in os.listdir(src):
        if name != "model.safetensors":
            assert open(tmp_path / "out" / name, "rb").read() == open(os.path.join(src, name), "rb").read(), name
    assert refimpl.load_tokenizer(tmp_path / "out").encode("hello world") == \
        refimpl.load_tokenizer(src).encode("hello world")


def test_sharded_bin_folder_becomes_safetensors(tmp_path):
    pytest.importorskip("torch")
    src = cf.bin_variant("llama_gqa_bias", tmp_path, shards=3)
    assert run_cli(src, tmp_path / "out") == 0
    assert sorted(safetensors_files(tmp_path / "out")) == ["model.safetensors"]
    converted = {n: t.load() for n, t in list_checkpoint(tmp_path / "out", progress=False).items()}
    golden = cf.golden_tensors("llama_gqa_bias")
    assert sorted(converted) == sorted(golden)
    for name, array in golden.items():
        np.testing.assert_array_equal(converted[name], array, err_msg=name)


@pytest.mark.parametrize("qtype, dtype", [("F32", None), ("Q8_0", None), ("Q8_0", "f16")])
def test_gguf_is_written_dequantized(qtype, dtype, tmp_path):
    """GGUF blocks become F32 (or F16 with --dtype f16); refimpl then computes from the file what it computes from
    the GGUF, bit for bit for F32 (every golden matrix fits in one tile)."""
    pytest.importorskip("gguf")
    src = cf.write_gguf(tmp_path / "m.gguf", "llama_mha", qtype)
    assert run_cli(src, tmp_path / "out", *(["--dtype", dtype] if dtype else [])) == 0
    stored = list_checkpoint(tmp_path / "out", progress=False)
    assert {t.dtype for t in stored.values()} == {"F16" if dtype else "F32"}
    gguf_model = refimpl.load(src)
    ids = [[1, 17, 42, 5, 100]]
    if dtype is None:
        np.testing.assert_array_equal(refimpl.load(tmp_path / "out")(input_ids=ids).logits,
                                      gguf_model(input_ids=ids).logits)
    q = gguf_model.params["layers"][0]["q_proj"]
    np.testing.assert_array_equal(stored["model.layers.0.self_attn.q_proj.weight"].load(),
                                  np.asarray(q).astype(np.float16 if dtype else np.float32))
    assert read_json(tmp_path / "out" / "config.json")["torch_dtype"] == ("float16" if dtype else "float32")


# --- bounded memory ----------------------------------------------------------------------------------------------

def test_matrices_are_streamed_tile_by_tile(tmp_path, monkeypatch):
    """No matrix is ever loaded whole: with load() refused for matrices and tiles of 5 rows (which cut through
    shards and heads), the Meta conversion still writes the same bytes."""
    src = gqa_meta(tmp_path, kind="bf16")
    assert run_cli(src, tmp_path / "whole") == 0
    real = convert.list_checkpoint

    def no_whole_matrices(path, progress=None):
        def refuse():
            raise AssertionError("a matrix was loaded whole")
        return {n: t._replace(load=refuse) if len(t.shape) == 2 else t for n, t in real(path, progress).items()}

    monkeypatch.setattr(convert, "list_checkpoint", no_whole_matrices)
    monkeypatch.setattr(convert, "tile_rows", lambda shape: 5)
    assert run_cli(src, tmp_path / "tiled") == 0
    assert safetensors_files(tmp_path / "tiled") == safetensors_files(tmp_path / "whole")


# --- refusals and failures -------------------------------------------------------------------------------------------

def test_sizes_parse_as_transformers_parses_them():
    assert convert.parse_size("5GB") == 5 * 10**9
    assert convert.parse_size("500MB") == 500 * 10**6
    assert convert.parse_size("20kb") == 20000
    assert convert.parse_size("1.5GB") == 1_500_000_000
    assert convert.parse_size("2GiB") == 2 * 2**30
    assert convert.parse_size(1234) == 1234
    for bad in ("5", "GB", "-1MB", "5XB", "0MB", "5 G B", True, 0):
        with pytest.raises(InputError, match="expected a size such as 5GB"):
            convert.parse_size(bad)


def test_an_existing_destination_is_refused_unless_forced(tmp_path, capsys):
    src = os.path.join(GOLDEN, "models", "llama_mha")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    assert run_cli(src, tmp_path / "dst") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--force" in err
    assert run_cli(tmp_path / "no-such-source", tmp_path / "dst") == 2  # refused before the source is even read
    assert "dst exists" in capsys.readouterr().err
    assert os.listdir(tmp_path / "dst") == ["keep.txt"]
    assert run_cli(src, tmp_path / "dst", "--force") == 0
    assert "keep.txt" not in os.listdir(tmp_path / "dst") and "model.safetensors" in os.listdir(tmp_path / "dst")
    assert sorted(os.listdir(tmp_path)) == ["dst"]  # no temporary folder, no old copy left
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    with pytest.raises(InputError, match="is or holds the source"):
        convert.convert_checkpoint(copy, copy, force=True)
    with pytest.raises(InputError, match="is or holds the source"):
        convert.convert_checkpoint(copy, tmp_path, force=True)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    src = os.path.join(GOLDEN, "models", "llama_mha")
    assert run_cli(src, tmp_path / "a", "--max-shard-size", "lots") == 2
    assert run_cli(tmp_path / "missing", tmp_path / "b") == 2
    assert run_cli(os.path.join(src, "model.safetensors"), tmp_path / "c") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("refimpl: error: ") for line in err)
    assert "--max-shard-size 'lots'" in err[0] and "give the checkpoint folder" in err[2]
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_midway_leaves_no_destination_and_no_temporary_folder(existing, tmp_path, monkeypatch):
    src = os.path.join(GOLDEN, "models", "llama_mha")
    dst = tmp_path / "out" / "dst"
    if existing:
        dst.mkdir(parents=True)
        (dst / "keep.txt").write_text("mine")
    real, calls = convert.write_tensor, []

    def failing(f, stored, dtype):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(f, stored, dtype)

    monkeypatch.setattr(convert, "write_tensor", failing)
    with pytest.raises(OSError, match="No space left"):
        convert.convert_checkpoint(src, dst, max_shard_bytes="60KB", force=existing)
    assert len(calls) == 3
    if existing:
        assert os.listdir(tmp_path / "out") == ["dst"] and os.listdir(dst) == ["keep.txt"]
    else:
        assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []
