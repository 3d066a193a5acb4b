"""accel.cpu.forward's fused stacks: the decode path's layers in one compiled call give the per-layer loop's numbers bit for bit.

The fused stack calls the loop's kernels with the loop's arguments in the loop's order, so nothing may differ: the
logits of every decode step and every cached key and value are compared with array_equal, not a tolerance, for
Llama (GQA with biases, pretraining_tp = 2), Open-Llama and pre-LN OPT, in the four weight formats, on a batch of two
rows, one left-padded (the mask bias), over two steps (the cache growing at the first). The loop is forced with
accel.cpu.forward.FUSED_DECODE = False. Also run under NUMBA_DISABLE_JIT=1 (the stubs' Python bodies): the golden models
are tiny and the steps few.
"""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("numba", reason="accel needs Numba (pip install 'refimpl[accel]')")

import numba  # noqa: E402
import refimpl  # noqa: E402
from refimpl_accel import formats  # noqa: E402
from refimpl_accel.cpu import forward as fused, linear  # noqa: E402
accel_model = fused
from golden_cases import GOLDEN  # noqa: E402

FORMATS = ("fp32", "int8", "fp16", "bf16")
FUSED_CASES = ("llama_gqa_bias",  # GQA (8 heads, 2 kv heads), q/k/v/o and MLP biases, gelu
               "llama_tp2",  # pretraining_tp = 2: no residual biases
               "openllama_default",  # the stable embedding's LayerNorm, shared embedding
               "opt_preln",  # pre-LN OPT with biases
               "opt_nobias_noaffine",  # OPT without biases and without LayerNorm weights
               "opt_silu_wepd")  # OPT with project_in / project_out
STEPS = 2


def load(case, fmt):
    return refimpl.load(os.path.join(GOLDEN, "models", case), backend="numba", weights=fmt)


@pytest.fixture
def count_fused(monkeypatch):
    """The number of fused-stack calls made so far (the drivers wrapped to count)."""
    calls = []
    for name in ("llama_decode_stack", "opt_decode_stack"):
        original = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *args, _f=original: calls.append(1) or _f(*args))
    return lambda: len(calls)


def decode_run(model, fused_on, monkeypatch, steps=STEPS):
    """A 4-token prompt on two rows (row 0 left-padded by two) then `steps` decode steps (the full cache grows at
    the first). Returns (logits of each step, the cache storage) with the fused stack on or off."""
    monkeypatch.setattr(accel_model, "FUSED_DECODE", fused_on)
    ids = np.array([[0, 0, 5, 9], [3, 7, 11, 4]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    llama = model.family != "opt"
    kwargs = {"position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)} if llama else {}
    out = model(input_ids=ids, attention_mask=mask, past_key_values=model.new_cache(2, 4), use_cache=True, **kwargs)
    cache, logits = out.past_key_values, []
    for t in range(steps):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        kwargs = {"position_ids": np.sum(mask, 1, keepdims=True) - 1} if llama else {}
        out = model(input_ids=[[t + 2], [t + 6]], attention_mask=mask, past_key_values=cache, use_cache=True,
                    **kwargs)
        assert out.logits.dtype == np.float32
        cache, logits = out.past_key_values, logits + [out.logits]
    assert cache.length == 4 + steps and cache.storage.filled == 4 + steps
    for key, value in cache:
        assert key.dtype == np.float32 and value.dtype == np.float32
    return np.stack(logits), cache.storage.data


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_decode_is_bit_identical_to_the_layer_loop(case, fmt, monkeypatch, count_fused):
    model = load(case, fmt)
    loop_logits, loop_cache = decode_run(model, False, monkeypatch)
    assert count_fused() == 0
    fused_logits, fused_cache = decode_run(model, True, monkeypatch)
    assert count_fused() == STEPS  # every decode step, never the prompt
    assert fused_logits.dtype == np.float32 and fused_cache.dtype == np.float32
    np.testing.assert_array_equal(fused_logits, loop_logits)
    np.testing.assert_array_equal(fused_cache, loop_cache)


def test_fused_decode_without_a_mask_and_a_single_row(monkeypatch, count_fused):
    """No attention mask (bias [B, 0]) and batch 1, the common generate step."""
    model = load("llama_gqa_bias", "fp32")
    results = []
    for fused_on in (False, True):
        monkeypatch.setattr(accel_model, "FUSED_DECODE", fused_on)
        cache, logits = model.new_cache(1, 8), []
        for token in (3, 8, 1, 5):
            out = model(input_ids=[[token]], past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, logits + [out.logits]
        results.append((np.stack(logits), cache.storage.data))
    assert count_fused() == 4
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("case, kwargs", [
    ("opt_350m_like", {}),  # post-LN OPT: the loop
    ("llama_gqa_bias", {"output_hidden_states": True}),  # per-layer hidden states: the loop
    ("opt_preln", {"output_attentions": True}),  # attention maps: the general plan
    ("opt_preln", {"head_mask": np.ones((2, 4), np.float32)}),  # head_mask: the general plan
])
def test_forwards_the_fused_stack_does_not_take_keep_the_loop(case, kwargs, count_fused):
    model = load(case, "fp32")
    out = model(input_ids=[[3, 4]], use_cache=True)
    out = model(input_ids=[[5]], past_key_values=out.past_key_values, use_cache=True, **kwargs)
    assert count_fused() == 0
    assert out.logits.dtype == np.float32


def test_more_rows_than_the_matrix_vector_kernels_take_keep_the_loop(count_fused):
    """B > linear.SMALL_M decode rows: the loop's products go to BLAS, so the fused stack stays out."""
    model = load("opt_preln", "fp32")
    B = linear.SMALL_M + 1
    out = model(input_ids=np.full((B, 2), 3), use_cache=True)
    model(input_ids=np.full((B, 1), 4), past_key_values=out.past_key_values, use_cache=True)
    assert count_fused() == 0


def test_the_layer_lists_are_built_once_per_parameter_tree():
    model = load("llama_gqa_bias", "int8")
    first = fused.stack_for(model.params, "llama")
    assert fused.stack_for(model.params, "llama") is first
    assert len(first) == model.config.num_hidden_layers
    assert first[0].qkv.data.dtype == np.int8 and first[0].o_proj.bias.shape == (model.config.hidden_size,)
    assert fused.stack_for(model.params, "llama", tp=True)[0].o_proj.bias.shape == (0,)  # tp: no residual bias


# --- the format dispatch ----------------------------------------------------------------------------------------------

@numba.njit
def compiled_linear_rows(x, data, scales, bf16, bias, act, epilogue, out):
    """linear_rows called from compiled code: its overload (the stub's Python body under NUMBA_DISABLE_JIT=1)."""
    fused.linear_rows(x, data, scales, bf16, bias, act, epilogue, out)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, linear.SMALL_M), d=st.integers(1, 70),
       o=st.integers(1, 40), fmt=st.sampled_from(FORMATS), bias=st.booleans(),
       epilogue=st.sampled_from([formats.STORE, formats.ADD, formats.ACT, formats.GATED]))
def test_linear_rows_is_linear_into_for_every_format(seed, rows, d, o, fmt, bias, epilogue):
    """fused.linear_rows (the format picked from the data's dtype, compiled and from Python) against
    linear.linear_into: the same kernel, the same bits."""
    rng = np.random.default_rng(seed)
    O = 2 * o if epilogue == formats.GATED else o
    w = linear.Weight.from_array(rng.standard_normal((O, d)).astype(np.float32), fmt)
    b = rng.standard_normal(O).astype(np.float32) if bias else None
    x = rng.standard_normal((rows, d)).astype(np.float32)
    start = rng.standard_normal((rows, o)).astype(np.float32)
    act = formats.ACT_CODES["silu"]
    theirs = linear.linear_into(x, w, b, act, epilogue, start.copy())
    scales = fused.NO_SCALES if w.scales is None else w.scales
    for linear_rows in (compiled_linear_rows, fused.linear_rows):
        ours = start.copy()
        linear_rows(x, w.data, scales, fmt == "bf16", linear.NO_BIAS if b is None else b, act, epilogue, ours)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)
