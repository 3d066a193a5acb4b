"""weights="gguf": accel computes on a GGUF file's own quantized blocks (memory-mapped, nothing converted) and gives
refimpl's numbers on the same file (refimpl dequantizes with gguf.quants, one band of rows at a time).

Files: the golden Llama models written as convert_hf_to_gguf.py would (tests/checkpoint_files.write_gguf: Q/K rows
permuted, Q8_0 / Q4_0 / Q5_0 blocks from gguf's quantizer), and a Llama with hidden 256 (K-quant blocks need rows of
256) in llama.cpp's Q4_K_M mix (Q6_K for attn_v, ffn_down, output; Q4_K for the rest; tests/support/kquants.py).

Tolerance. accel and refimpl multiply the same dequantized weights; what differs is summation order (BLAS blocks,
the matrix-vector kernels' vectorised sums, the blockwise online softmax) and, for decode, that the block scales
are factored out of each block's sum (tests/test_gguf_blocks.py bounds one product). On the golden models those
reorderings keep fp32 logits within the project's 1e-5 (tests/test_accel_model.py); a quantized model's logits are
of the same size (|logit| < 10 here), and each product's bound is of the same order as the dot bound, so the same
ATOL holds: 1e-5 for logits of |logit| <= ~10, stated relative to the largest logit as 1e-6 * max|logit| + 1e-5.
"""
import os

import numpy as np
import pytest

pytest.importorskip("numba", reason="accel needs Numba (pip install 'refimpl[accel]')")
gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install 'refimpl[gguf]')")

import refimpl  # noqa: E402
from checkpoint_files import write_gguf  # noqa: E402
from refimpl_accel.cpu.linear import StackedWeight, Weight  # noqa: E402
from support.kquants import QUANTIZERS, q4_k_m_type  # noqa: E402

IDS = [[1, 5, 9, 13, 2, 7, 3, 8, 4, 6, 11, 12]]  # 12 rows: the prompt path (BLAS on dequantized tiles)


def atol(ref):
    return 1e-6 * float(np.abs(ref).max()) + 1e-5


def compare(path):
    ref = refimpl.load(path)
    fast = refimpl.load(path, backend="numba", weights="gguf")
    prompt, ref_prompt = fast(input_ids=IDS, use_cache=True), ref(input_ids=IDS, use_cache=True)
    assert prompt.logits.dtype == np.float32
    np.testing.assert_allclose(prompt.logits, ref_prompt.logits, atol=atol(ref_prompt.logits), rtol=0)
    # decode steps: the matrix-vector kernels on the blocks, one new token against the cache
    step = fast(input_ids=[[21]], past_key_values=prompt.past_key_values, use_cache=True)
    ref_step = ref(input_ids=[[21]], past_key_values=ref_prompt.past_key_values, use_cache=True)
    np.testing.assert_allclose(step.logits, ref_step.logits, atol=atol(ref_step.logits), rtol=0)
    ids = np.array([[1, 5, 9]])
    np.testing.assert_array_equal(fast.generate(ids, max_new_tokens=8), ref.generate(ids, max_new_tokens=8))
    return fast


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0"])
@pytest.mark.parametrize("case", ["llama_mha", "llama_gqa_bias"])
def test_golden_llama_in_a_quantized_gguf_equals_refimpl_on_the_same_file(case, qtype, tmp_path):
    fast = compare(write_gguf(tmp_path / f"{case}.gguf", case, qtype))
    layer = fast.params["layers"][0]
    assert isinstance(layer["qkv"], StackedWeight) and {p.format for p in layer["qkv"].parts} == {qtype}
    assert layer["o_proj"].format == qtype and layer["o_proj"].data.dtype == np.uint8


def write_k_model(path, rng):
    """A random Llama (hidden 256, 2 layers, 4 heads, 2 kv heads, intermediate 512, vocab 512) in the Q4_K_M mix."""
    from checkpoint_files import gguf_name, permute

    D, F, L, H, Hkv, V = 256, 512, 2, 4, 2, 512
    Dh = D // H
    t = {"model.embed_tokens.weight": rng.standard_normal((V, D)), "model.norm.weight": 1 + 0.1 * rng.standard_normal(D),
         "lm_head.weight": rng.standard_normal((V, D))}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": rng.standard_normal((H * Dh, D)),
                  p + "self_attn.k_proj.weight": rng.standard_normal((Hkv * Dh, D)),
                  p + "self_attn.v_proj.weight": rng.standard_normal((Hkv * Dh, D)),
                  p + "self_attn.o_proj.weight": rng.standard_normal((D, H * Dh)),
                  p + "mlp.gate_proj.weight": rng.standard_normal((F, D)),
                  p + "mlp.up_proj.weight": rng.standard_normal((F, D)),
                  p + "mlp.down_proj.weight": rng.standard_normal((D, F)),
                  p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(D),
                  p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(D)})
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_vocab_size, V), (writer.add_context_length, 256), (writer.add_embedding_length, D),
                       (writer.add_block_count, L), (writer.add_feed_forward_length, F), (writer.add_head_count, H),
                       (writer.add_head_count_kv, Hkv), (writer.add_rope_dimension_count, Dh),
                       (writer.add_rope_freq_base, 10000.0), (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    kinds = {}
    for name, a in sorted(t.items()):
        a = a.astype(np.float32)
        if a.ndim == 2:
            a = a * np.float32(0.05)
        if ".q_proj." in name:
            a = permute(a, H)
        elif ".k_proj." in name:
            a = permute(a, Hkv)
        g = gguf_name(name)
        if a.ndim == 1:
            writer.add_tensor(g, a)
            continue
        kinds[name] = q4_k_m_type(g)
        writer.add_tensor(g, QUANTIZERS[kinds[name]](a), raw_dtype=gguf.GGMLQuantizationType[kinds[name]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path), kinds


def test_a_q4_k_m_gguf_equals_refimpl_on_the_same_file(tmp_path):
    path, kinds = write_k_model(tmp_path / "q4_k_m.gguf", np.random.default_rng(0))
    assert set(kinds.values()) == {"Q4_K", "Q6_K"}
    fast = compare(path)
    layer = fast.params["layers"][1]
    assert [p.format for p in layer["qkv"].parts] == ["Q4_K", "Q4_K", "Q6_K"]  # v in Q6_K, as llama.cpp's mix
    assert layer["down_proj"].format == "Q6_K" and fast.params["lm_head"].format == "Q6_K"


def test_the_blocks_stay_in_the_memory_map(tmp_path):
    """Nothing converted: every matrix but Q and K (their rows gathered into the model's order) is a view of the
    file, and the weights take the file's own bytes."""
    path = write_gguf(tmp_path / "m.gguf", "llama_mha", "Q4_0")
    fast = refimpl.load(path, backend="numba", weights="gguf")
    layer = fast.params["layers"][0]
    q, k, v = layer["qkv"].parts
    assert q.data.flags.writeable and k.data.flags.writeable  # gathered: a copy of these two (the map is read-only)
    for w in (v, layer["o_proj"], *layer["gate_up"].parts, layer["down_proj"], fast.params["embed_tokens"]):
        assert isinstance(w, Weight) and not w.data.flags.owndata and not w.data.flags.writeable
    matrices = sum(w.nbytes for w in (*layer["qkv"].parts, layer["o_proj"], *layer["gate_up"].parts,
                                      layer["down_proj"]))
    D = fast.config.hidden_size
    assert matrices == 18 * (4 * D * D + 3 * D * fast.config.intermediate_size) // 32  # Q4_0: 18 bytes per 32


def test_weights_gguf_needs_a_gguf_file():
    with pytest.raises(refimpl.ConfigError, match="weights='gguf' computes on a GGUF file's own blocks"):
        refimpl.load(os.path.join(os.path.dirname(__file__), "..", "golden", "models", "llama_mha"), backend="numba",
                     weights="gguf")
    with pytest.raises(refimpl.ConfigError, match="weights='gguf'"):
        refimpl.load(os.path.join(os.path.dirname(__file__), "..", "golden", "models", "llama_mha"), backend="cuda",
                     weights="gguf")
