"""Every checkpoint format gives the golden logits: the golden models re-stored as sharded / fp16 / bf16 / fp64
safetensors, single and sharded PyTorch .bin, and GGUF (F32, F16, Q8_0), each loaded by refimpl and replayed.

Lossless re-storings (sharded, fp64 of fp32 values, .bin, GGUF F32) must give bit-identical outputs to the golden
safetensors. Lossy ones must give exactly what refimpl computes from the golden weights rounded the same way in
NumPy (the loader adds no error of its own), and the golden logits within a tolerance derived from the rounding:

    storing a weight rounds it with relative error at most u (fp16: 2^-11; bf16: 2^-8; Q8_0: 1/254 of the largest
    weight of its 32-block). To first order each stored matrix changes what it produces by at most u relative, and
    the logits go through the embedding, per layer two sublayers of at most two chained matrices, and the head: we
    allow 4 (L + 1) u max|logit|. Measured on these cases, error / (u max|logit|) is 1.1-2.8 for fp16 and bf16 and
    3.5-5.9 for Q8_0 (largest errors: fp16 8.3e-3, bf16 5.9e-2, Q8_0 0.14, with max|logit| about 6).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import checkpoint_files as cf
import refimpl
from golden_cases import GOLDEN, load_case, replay
from refimpl import CheckpointError
from refimpl.stored import StoredMatrix
from refimpl.weights import (list_checkpoint, parameter_dtype, read_checkpoint, read_gguf, read_model_config,
                             rename, take)

CASES = ["llama_mha", "llama_gqa_bias", "llama_tied", "llama_seqcls", "openllama_default", "openllama_flags_off",
         "opt_350m_like", "opt_preln", "opt_qa"]
GGUF_CASES = ["llama_mha", "llama_tied", "llama_rope_linear"]  # SiLU Llamas: GGUF cannot say hidden_act
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8, "F16": 2.0**-11, "Q8_0": 1 / 254}


def outputs(case, model) -> dict:
    """{'call.key': (golden, ours)} for every stored output of the case."""
    return {f"{call}.{key}": (expected, np.asarray(actual))
            for call, key, expected, actual in replay(case, model=model)}


def max_logit_error(replayed: dict) -> float:
    return max(float(np.max(np.abs(ours.astype(np.float64) - golden)))
               for key, (golden, ours) in replayed.items() if "logits" in key)


def tolerance(case, u):
    data, meta = load_case(case)
    largest = max(float(np.max(np.abs(data[k]))) for k in data.files if "logits" in k)
    layers = refimpl.read_config(os.path.join(GOLDEN, "models", case)).num_hidden_layers
    return 4 * (layers + 1) * u * largest


@functools.lru_cache(maxsize=None)
def golden_outputs(case) -> dict:
    return outputs(case, refimpl.load(os.path.join(GOLDEN, "models", case)))


def assert_same_outputs(case, replayed: dict, reference: dict) -> None:
    for key, (_, theirs) in reference.items():
        np.testing.assert_array_equal(replayed[key][1], theirs, err_msg=f"{case} {key}")


def model_of(case, tensors, tmp_path, tag):
    """refimpl on `tensors` (the golden weights changed in NumPy), stored as plain fp32 safetensors."""
    folder = cf.new_folder(case, tmp_path, tag)
    cf.write_safetensors(os.path.join(folder, "model.safetensors"),
                         {n: a.astype(np.float32) for n, a in tensors.items()})
    return refimpl.load(folder)


def load_gguf(path, monkeypatch):
    """refimpl.load on a .gguf file (its config comes from the GGUF metadata)."""
    return refimpl.load(path)


# --- safetensors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["sharded", "fp64"])
def test_lossless_safetensors_variants_are_bit_identical(case, kind, tmp_path):
    replayed = outputs(case, refimpl.load(cf.safetensors_variant(case, tmp_path, kind)))
    assert max_logit_error(replayed) < 1e-5
    assert_same_outputs(case, replayed, golden_outputs(case))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_half_precision_safetensors(case, kind, tmp_path):
    replayed = outputs(case, refimpl.load(cf.safetensors_variant(case, tmp_path, kind)))
    rounded = model_of(case, cf.rounded_tensors(case, kind), tmp_path, "rounded")
    assert_same_outputs(case, replayed, outputs(case, rounded))
    assert max_logit_error(replayed) < tolerance(case, UNIT_ROUNDOFF[kind])


@pytest.mark.parametrize("case", ["llama_gqa_bias", "openllama_default", "opt_350m_like"])
@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_half_precision_kept_as_stored_computes_the_same_as_converted(case, kind, tmp_path):
    """The default keeps fp16 / bf16 matrices as the file stores them (memory-mapped) and widens them exactly in each
    product, so every output equals a load that converts to float32 (weights_dtype=np.float32) bit for bit, and
    outputs keep the compute dtype."""
    folder = cf.safetensors_variant(case, tmp_path, kind)
    kept = refimpl.load(folder)
    q = kept.params["layers"][0]["q_proj"]
    assert isinstance(q, StoredMatrix) and q.stored_dtype == {"fp16": "F16", "bf16": "BF16"}[kind] and q.dtype == np.float32
    assert isinstance(kept.params["embed_tokens"], StoredMatrix)
    converted = refimpl.load(folder, weights_dtype=np.float32)
    assert isinstance(converted.params["layers"][0]["q_proj"], np.ndarray)
    replayed = outputs(case, kept)
    assert_same_outputs(case, replayed, outputs(case, converted))
    assert all(ours.dtype == np.float32 for _, ours in replayed.values() if ours.dtype.kind == "f")


def test_bf16_is_widened_exactly(tmp_path):
    bits = np.array([0x3F80, 0xC2F7, 0x0001, 0x7F80, 0xFF80, 0x8000], np.uint16)  # 1, -123.5, tiny, +-inf, -0
    cf.write_safetensors(tmp_path / "w.safetensors", {"w": bits}, {"w": "BF16"})
    w = read_checkpoint(tmp_path / "w.safetensors")["w"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w.view(np.uint32), bits.astype(np.uint32) << 16)
    assert w[1] == -123.5 and w[2] == np.float32(2.0**-133)


# --- PyTorch .bin (torch writes them) ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_is_bit_identical(case, shards, tmp_path):
    pytest.importorskip("torch", reason="torch.save writes the .bin files")
    replayed = outputs(case, refimpl.load(cf.bin_variant(case, tmp_path, shards)))
    assert max_logit_error(replayed) < 1e-5
    assert_same_outputs(case, replayed, golden_outputs(case))


def test_pytorch_bin_as_transformers_and_the_hub_write_it(tmp_path):
    """save_pretrained(safe_serialization=False) output, and the Hub's old spellings: OPT 'decoder.*' names, Llama
    files with rotary_emb.inv_freq buffers (transformers < 4.31)."""
    pytest.importorskip("torch", reason="torch and transformers write the .bin files")
    transformers = pytest.importorskip("transformers")
    for case in ("llama_tied", "opt_preln"):
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(GOLDEN, "models", case))
        folder = tmp_path / f"{case}-hf"
        model.save_pretrained(folder, safe_serialization=False)
        assert os.listdir(folder).count("pytorch_model.bin") == 1
        assert_same_outputs(case, outputs(case, refimpl.load(folder)), golden_outputs(case))
    hub_opt = cf.bin_variant("opt_preln", tmp_path / "hub", rename=lambda n: n.replace("model.decoder.", "decoder."))
    assert_same_outputs("opt_preln", outputs("opt_preln", refimpl.load(hub_opt)), golden_outputs("opt_preln"))
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32) for i in range(2)}
    old_llama = cf.bin_variant("llama_mha", tmp_path / "old", extra=inv_freq)
    assert_same_outputs("llama_mha", outputs("llama_mha", refimpl.load(old_llama)), golden_outputs("llama_mha"))


def test_pytorch_bin_half_precision_and_shared_storage(tmp_path):
    torch = pytest.importorskip("torch", reason="torch.save writes the .bin files")
    w = torch.randn(6, 4)
    state = {"bf16": w.to(torch.bfloat16), "fp16": w.half(), "t": w.t(), "row": w[3], "tied": w}
    torch.save(state, tmp_path / "pytorch_model.bin")
    out = read_checkpoint(tmp_path / "pytorch_model.bin")
    for name, tensor in state.items():
        expected = tensor.float().numpy() if name == "bf16" else tensor.numpy()
        np.testing.assert_array_equal(out[name], expected, err_msg=name)
    assert out["fp16"].dtype == np.float16 and out["bf16"].dtype == np.float32
    assert np.shares_memory(out["t"], out["tied"])  # one storage, memory-mapped once


# --- GGUF ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def gguf():
    return pytest.importorskip("gguf", reason="GGUF reading needs the optional gguf package (refimpl[gguf])")


@pytest.mark.parametrize("case", GGUF_CASES)
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_gguf_gives_the_golden_logits(case, qtype, gguf, tmp_path, monkeypatch):
    replayed = outputs(case, load_gguf(cf.write_gguf(tmp_path / f"{case}.gguf", case, qtype), monkeypatch))
    if qtype == "F32":
        assert_same_outputs(case, replayed, golden_outputs(case))
    else:
        rounded = model_of(case, cf.quantized_tensors(case, qtype), tmp_path, "rounded")
        assert_same_outputs(case, replayed, outputs(case, rounded))
        assert max_logit_error(replayed) < tolerance(case, UNIT_ROUNDOFF[qtype])


@pytest.mark.parametrize("case", ["llama_mha", "llama_gqa_bias", "llama_tied", "llama_rope_linear"])
def test_gguf_unpermutes_q_and_k_and_reads_the_config(case, gguf, tmp_path):
    """Weights bit-identical to the original (GQA: K permuted with the kv head count; biases permuted too), and the
    config that convert_hf_to_gguf.py wrote comes back as the original config.json said it."""
    config, tensors = read_gguf(cf.write_gguf(tmp_path / f"{case}.gguf", case, "F32"))
    golden = cf.golden_tensors(case)
    assert sorted(tensors) == sorted(golden)
    for name, a in golden.items():
        np.testing.assert_array_equal(tensors[name], a, err_msg=name)
    ours, theirs = refimpl.from_hf_config(config), refimpl.read_config(os.path.join(GOLDEN, "models", case))
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "rope_type", "bos_token_id", "eos_token_id"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert (ours.rope_scaling or {}).get("factor") == (theirs.rope_scaling or {}).get("factor")


def test_gguf_refuses_what_it_cannot_map_back(gguf, tmp_path):
    path = tmp_path / "llama3.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(2), writer.add_block_count(1), writer.add_embedding_length(8)
    writer.add_tensor("rope_freqs.weight", np.ones(4, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        read_gguf(path)


# --- the loader API: stored precision, progress, name tables --------------------------------------------------------

def test_weights_kept_in_stored_precision_stay_memory_mapped(tmp_path):
    folder = cf.safetensors_variant("llama_mha", tmp_path, "fp16")
    top, layers = rename(list_checkpoint(folder), "llama", 2)
    q = take(layers[0], "q_proj", (64, 64), np.float32)
    stored = q.rows(0, 64)
    assert stored.dtype == np.float16 and not stored.flags.owndata and not stored.flags.writeable  # a view of the file
    assert take(top, "norm", (64,), np.float32).dtype == np.float32  # vectors are read into the compute dtype
    assert parameter_dtype(np.float64, np.float16) is np.float16
    assert parameter_dtype(np.float32, None) is None and parameter_dtype(np.float32, "stored") is None
    with pytest.raises(refimpl.ConfigError, match="weights_dtype"):
        parameter_dtype(np.float32, "int8")


def test_progress_is_reported_shard_by_shard_only_when_asked(tmp_path, capsys):
    folder = cf.safetensors_variant("llama_mha", tmp_path, "sharded")
    read_checkpoint(folder, progress=True)
    err = capsys.readouterr().err
    assert "reading 1/3 model-00001-of-00003.safetensors" in err and "reading 3/3" in err
    read_checkpoint(folder)  # progress=None: stderr is not a terminal under pytest
    read_checkpoint(folder, progress=False)
    assert capsys.readouterr().err == ""


def test_every_tensor_used_and_every_parameter_found(tmp_path):
    pytest.importorskip("torch", reason="torch.save writes the .bin files")
    extra = cf.bin_variant("opt_preln", tmp_path / "extra", extra={"decoder.layers.0.adapter.weight": np.ones(2)})
    with pytest.raises(CheckpointError, match="decoder.layers.0.adapter.weight"):
        refimpl.load(extra)
    missing = cf.bin_variant("llama_mha", tmp_path / "missing",
                             rename=lambda n: n.replace("layers.1.mlp.up_proj", "layers.1.mlp.upproj"))
    with pytest.raises(CheckpointError, match="layers.1.mlp.upproj"):
        refimpl.load(missing)


def test_a_file_can_be_named_directly(tmp_path):
    stored = list_checkpoint(os.path.join(GOLDEN, "models", "llama_mha", "model.safetensors"), progress=False)
    assert stored["lm_head.weight"].dtype == "F32" and stored["lm_head.weight"].shape == (192, 64)
    with pytest.raises(CheckpointError, match="not a .safetensors, .bin or .gguf file"):
        list_checkpoint(os.path.join(GOLDEN, "models", "llama_mha", "config.json"))


# --- refimpl inspect -----------------------------------------------------------------------------------------------

def run_inspect(*argv):
    import argparse

    from refimpl import inspect

    parser = argparse.ArgumentParser(prog="refimpl")
    inspect.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", *argv])
    return args.run(args)


def test_inspect_prints_the_table(tmp_path, capsys):
    assert run_inspect(os.path.join(GOLDEN, "models", "llama_mha"), "--quiet") == 0
    out = capsys.readouterr().out
    for expected in ("family      llama", "class       LlamaForCausalLM",
                     "2 layers, hidden 64, 4 heads (4 kv, head_dim",
                     "parameters  94,528 in 21 tensors", "F32: 21 tensors, 94,528 values",
                     "float32 369.2 KiB, float64 738.5 KiB", "untied", "gpu         "):
        assert expected in out, expected
    run_inspect(cf.safetensors_variant("opt_350m_like", tmp_path, "fp16"), "--quiet")
    out = capsys.readouterr().out
    assert "F16: 36 tensors" in out and "weights kept as stored 167.0 KiB" in out and "tied" in out
    run_inspect(os.path.join(GOLDEN, "models", "openllama_default"))
    assert "shared_input_output_embedding" in capsys.readouterr().out


def test_inspect_gguf(gguf, tmp_path, capsys):
    run_inspect(cf.write_gguf(tmp_path / "m.gguf", "llama_tied", "Q8_0"), "--quiet")
    out = capsys.readouterr().out
    assert "GGUF, 1 file" in out and "Q8_0:" in out and "F32:" in out and "tied" in out
