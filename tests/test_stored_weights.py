"""Weights stay as the checkpoint stores them (refimpl.stored): no full-model conversion, same numbers.

A 7B checkpoint cannot be converted to float32 on a 24 GB machine, so these tests prove the property on small
models by construction: the parameters are views of the file before and after a forward pass, the memory a load
and a forward allocate stays far below one converted copy of the matrices, and every result equals an eagerly
converted load. The big runs are bench/bench_scale.py's.
"""
from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest

import refimpl
from refimpl import stored
from refimpl.stored import StoredMatrix

import checkpoint_files as cf
from test_checkpoint_formats import assert_same_outputs, golden_outputs, max_logit_error, outputs, tolerance

RNG = np.random.default_rng(0)


def matrices(params):
    """Every 2-D parameter of a tree, by dotted name."""
    out = {}
    for name, value in params.items():
        if name == "layers":
            for i, layer in enumerate(value):
                out.update({f"layers.{i}.{k}": v for k, v in layer.items() if getattr(v, "ndim", 0) == 2})
        elif getattr(value, "ndim", 0) == 2:
            out[name] = value
    return out


def is_file_view(array):
    """A read-only view whose memory belongs to a memory map of the checkpoint, not to NumPy."""
    while isinstance(array, np.ndarray) and array.base is not None and not isinstance(array, np.memmap):
        array = array.base
    return isinstance(array, np.memmap) or type(array).__name__ == "mmap"


@pytest.mark.parametrize("case", ["llama_gqa_bias", "opt_350m_like"])
@pytest.mark.parametrize("kind", ["sharded", "fp16", "bf16"])
def test_matrices_stay_in_the_file_through_a_forward(case, kind, tmp_path):
    """fp32 files: each matrix is the memory map itself; fp16 / bf16: a StoredMatrix over the memory map. Both stay
    so after a forward and a decode step (nothing swaps in a converted copy)."""
    model = refimpl.load(cf.safetensors_variant(case, tmp_path, kind))
    before = matrices(model.params)
    out = model(input_ids=[[1, 5, 7]], use_cache=True)
    model(input_ids=[[3]], past_key_values=out.past_key_values)
    after = matrices(model.params)
    assert before.keys() == after.keys() and all(after[n] is before[n] for n in before)
    for name, matrix in after.items():
        if kind == "sharded":
            assert isinstance(matrix, np.ndarray) and not matrix.flags.writeable and is_file_view(matrix), name
        else:
            assert isinstance(matrix, StoredMatrix), name
            rows = matrix.rows(0, 1)
            assert rows.dtype == (np.float16 if kind == "fp16" else np.uint16) and is_file_view(rows), name


def write_llama(folder, kind, hidden=256, inter=768, layers=4, vocab=4096):
    """A Llama checkpoint whose matrices (not its activations) dominate memory, stored as fp16 or bf16."""
    os.makedirs(folder)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    tensors = {n: (RNG.standard_normal(s) * 0.05).astype(np.float32) for n, s in shapes.items()}
    if kind == "bf16":
        cf.write_safetensors(os.path.join(folder, "model.safetensors"),
                             {n: cf.to_bf16_bits(a) for n, a in tensors.items()}, {n: "BF16" for n in tensors})
    else:
        cf.write_safetensors(os.path.join(folder, "model.safetensors"),
                             {n: a.astype(np.float16) for n, a in tensors.items()})
    return sum(a.size for a in tensors.values() if a.ndim == 2) * 4  # bytes of the matrices in float32


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_load_and_forward_allocate_far_less_than_a_converted_model(kind, tmp_path, monkeypatch):
    """tracemalloc sees every NumPy allocation: a load, a 4-token forward and a decode step together peak at well
    under a tenth of the float32 matrices (22 MB here), where converting at load costs all of them."""
    monkeypatch.setattr(stored, "TILE_ELEMENTS", 1 << 14)  # small tiles, as 2M elements are to a 7B matrix
    folder = str(tmp_path / "m")
    converted_bytes = write_llama(folder, kind)
    tracemalloc.start()
    try:
        model = refimpl.load(folder)
        out = model(input_ids=[[1, 2, 3, 4]], use_cache=True)
        model(input_ids=[[5]], past_key_values=out.past_key_values)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < converted_bytes / 10, f"peak {peak} B against {converted_bytes} B of converted matrices"
    tracemalloc.start()
    try:
        refimpl.load(folder, weights_dtype=np.float32)  # the opt-in eager conversion: the bound above can fail
        _, eager_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert eager_peak >= converted_bytes


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_tiled_products_equal_the_converted_matrix(kind, monkeypatch):
    """Several tiles per matrix: W[ids], W[a:b] and W[:, a:b] equal the matrix converted at once bit for bit. x @ W.T
    agrees up to the summation order BLAS picks per call (a one-row product per tile may take another kernel than
    one over the whole matrix): within D u sum|x_i w_i| of each output, the standard bound of a float32 dot
    product of D terms (u = 2^-24), with the widened values themselves exact."""
    monkeypatch.setattr(stored, "TILE_ELEMENTS", 1 << 10)
    w32 = (RNG.standard_normal((300, 64)) * 0.1).astype(np.float32)
    if kind == "fp16":
        raw = w32.astype(np.float16)
        widened = raw.astype(np.float32)
    else:
        raw = cf.to_bf16_bits(w32)
        widened = cf.from_bf16_bits(raw)
    w = StoredMatrix(lambda a, b: raw[a:b], raw.shape, kind.upper(), np.float32, "w")
    assert stored.tile_rows(w.shape) < w.shape[0]  # the test is about several tiles
    for x in (RNG.standard_normal((1, 1, 64)), RNG.standard_normal((2, 7, 64))):
        x = x.astype(np.float32)
        y = x @ w.T
        assert y.dtype == np.float32 and y.shape == (*x.shape[:-1], 300)
        bound = 64 * 2.0**-24 * (np.abs(x) @ np.abs(widened).T)
        assert np.all(np.abs(y - x @ widened.T) <= bound)
    ids = np.array([[0, 299, 17], [5, 5, 150]])
    np.testing.assert_array_equal(w[ids], widened[ids])
    np.testing.assert_array_equal(np.asarray(w[10:200]), widened[10:200])
    np.testing.assert_array_equal(np.asarray(w[:, 16:48]), widened[:, 16:48])
    np.testing.assert_array_equal(np.asarray(w), widened)


def test_widening_is_exact_for_every_special_value():
    """fp16: subnormals, +-0, +-inf, NaN, the largest value; bf16 the same: the widened float32 is exact."""
    half = np.array([0.0, -0.0, 6e-8, -6e-8, 65504.0, -65504.0, np.inf, -np.inf, np.nan, 1 / 3], np.float16)
    out = np.empty((1, half.size), np.float32)
    stored.widen_into(half[None], out)
    np.testing.assert_array_equal(out[0].view(np.uint32), half.astype(np.float32).view(np.uint32))
    bits = np.array([0x0000, 0x8000, 0x0001, 0x7F80, 0xFF80, 0x7FC0, 0x3F80, 0xC2F7], np.uint16)
    stored.widen_into(bits[None], out[:, :bits.size])
    np.testing.assert_array_equal(out[0, :bits.size].view(np.uint32), bits.astype(np.uint32) << 16)
    out64 = np.empty((1, bits.size), np.float64)
    stored.widen_into(bits[None], out64)
    np.testing.assert_array_equal(out64[0], (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64))


def test_float64_audit_widens_fp32_matrices_exactly(tmp_path):
    """dtype=float64 on an fp32 file: StoredMatrix widens per product, the same numbers as before (golden replay)."""
    folder = cf.safetensors_variant("llama_gqa_bias", tmp_path, "sharded")
    model = refimpl.load(folder, dtype=np.float64)
    assert isinstance(model.params["layers"][0]["q_proj"], StoredMatrix)
    eager = refimpl.load(folder, dtype=np.float64, weights_dtype=np.float64)
    assert_same_outputs("llama_gqa_bias", outputs("llama_gqa_bias", model), outputs("llama_gqa_bias", eager))


# --- OPT as shipped: pytorch_model.bin in float16, single and sharded -------------------------------------------------

@pytest.mark.parametrize("case", ["opt_350m_like", "opt_preln", "opt_qa"])
@pytest.mark.parametrize("shards", [1, 3])
def test_opt_fp16_bin_streams_and_matches_the_golden_logits(case, shards, tmp_path):
    pytest.importorskip("torch", reason="torch.save writes the .bin files")
    folder = cf.bin_variant(case, tmp_path, shards, dtype="float16")
    model = refimpl.load(folder)
    assert all(isinstance(m, StoredMatrix) and m.stored_dtype == "F16" for m in matrices(model.params).values())
    replayed = outputs(case, model)
    rounded = refimpl.load(cf.bin_variant(case, tmp_path / "eager", shards, dtype="float16"),
                           weights_dtype=np.float32)
    assert_same_outputs(case, replayed, outputs(case, rounded))
    assert max_logit_error(replayed) < tolerance(case, 2.0**-11)


@pytest.mark.parametrize("case", ["llama_gqa_bias", "opt_preln"])
def test_bf16_bin_matches_the_bf16_safetensors_bit_for_bit(case, tmp_path):
    pytest.importorskip("torch", reason="torch.save writes the .bin files")
    from_bin = outputs(case, refimpl.load(cf.bin_variant(case, tmp_path, 1, dtype="bfloat16")))
    assert_same_outputs(case, from_bin, outputs(case, refimpl.load(cf.safetensors_variant(case, tmp_path, "bf16"))))


def test_fp32_default_is_unchanged_bit_for_bit():
    """The golden fp32 models: memory-mapped parameters give the numbers refimpl gave when it converted at load."""
    case = "llama_gqa_bias"
    eager = refimpl.load(os.path.join(cf.GOLDEN, "models", case), weights_dtype=np.float32)
    assert_same_outputs(case, golden_outputs(case), outputs(case, eager))


def test_copies_made_by_a_reader_stay_lazy_as_fp32_too(tmp_path):
    """A float32 tensor whose load() would build a copy (Meta shards joined, q/k rows un-permuted; GGUF q/k) is kept
    as a StoredMatrix like any other, not read whole at load; an unpermuted single-file fp32 matrix is the map."""
    pytest.importorskip("torch", reason="the test writes Meta's .pth shards with torch.save")
    from test_meta_checkpoint import golden_meta

    model = refimpl.load(golden_meta(tmp_path / "meta", shards=2, kind="fp32"))
    layer = model.params["layers"][0]
    assert isinstance(layer["q_proj"], StoredMatrix) and isinstance(layer["o_proj"], StoredMatrix)
    pytest.importorskip("gguf")
    gguf_model = refimpl.load(cf.write_gguf(tmp_path / "m.gguf", "llama_mha", "F32"))
    layer = gguf_model.params["layers"][0]
    assert isinstance(layer["q_proj"], StoredMatrix) and isinstance(layer["k_proj"], StoredMatrix)
    assert isinstance(layer["v_proj"], np.ndarray) and is_file_view(layer["v_proj"])


def test_half_to_single_is_exact_for_every_float16():
    """All 65536 float16 bit patterns: the three-pass widening equals NumPy's cast bit for bit, finite ones without
    the fallback (checked on a band holding none with exponent 31), inf and NaN through it."""
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)].reshape(1, -1)
    out = np.empty(finite.shape, np.float32)
    stored.half_to_single(finite, out)
    np.testing.assert_array_equal(out.view(np.uint32), finite.astype(np.float32).view(np.uint32))
    out = np.empty((1, every.size), np.float32)
    stored.half_to_single(every.reshape(1, -1), out)
    np.testing.assert_array_equal(out[0].view(np.uint32), every.astype(np.float32).view(np.uint32))
