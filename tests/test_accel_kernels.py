"""accel/cpu's kernels beyond the op table: what tests/test_backend_ops.py (every kernel against its refimpl twin, on
every backend) does not cover: the vectorised exp's accuracy, the epilogues' agreement between the matrix-vector
and BLAS paths, the storage formats (Q8_0 as llama.cpp's, exact widening of fp16 / bf16), nan propagation, the
sampler kept with the tests (tests/support/numba_sampling.py), dtype promotion, the kernel cache.

Tolerances come from the arithmetic. Two float32 sums of the same n products, taken in different orders, each lie
within n*u*sum|a_j b_j| of the exact sum (u = eps/2), so they differ by at most n * eps * sum|a_j b_j|: that bound,
computed per output element, is the tolerance of every dot-product comparison. Every output's dtype is asserted.

Also run under NUMBA_DISABLE_JIT=1 (the kernels as plain Python): the shapes are kept small for that.
"""
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("numba", reason="accel needs Numba (pip install 'refimpl[accel]')")

from refimpl import generate as ref_generate  # noqa: E402
from refimpl import processors as ref_processors  # noqa: E402
from refimpl import ops  # noqa: E402
from refimpl_accel import formats  # noqa: E402
from refimpl_accel.cpu import attention, linear, ops as cpu_ops  # noqa: E402
from support import numba_sampling as sampling  # noqa: E402

EPS = float(np.finfo(np.float32).eps)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_f32(*arrays):
    for a in arrays:
        assert np.asarray(a).dtype == np.float32, f"dtype {np.asarray(a).dtype}, expected float32"


def dot_bound(x, w):
    """n * eps * (|x| @ |w|^T): the largest gap between two orderings of the float32 sums x @ w.T."""
    n = x.shape[-1]
    return n * EPS * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T) + 1e-30


seeds = st.integers(0, 2**31 - 1)
dims = st.integers(1, 97)


# --- exp -----------------------------------------------------------------------------------------------------------

def test_vectorisable_exp_is_within_an_ulp_and_a_bit_of_exact():
    """accel.cpu.ops._exp (Cephes' expf: a degree-7 polynomial after Cody-Waite reduction, ~1 ulp by design) against
    exp in float64 rounded once: <= 1.5 ulp of the float32 result over [-103.9, 88.7], which is also within the 4 ulp
    the other kernels allow against NumPy's own expf (<= 2.5 ulp from exact on this machine); the subnormal results
    within one subnormal step; overflow, underflow, infinities and nan as np.exp gives them."""
    from refimpl_accel.cpu.jit import JIT_DISABLED
    n = 3_000 if JIT_DISABLED else 300_000
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-103.9, 88.72, n), np.linspace(-1, 1, n // 10)]).astype(np.float32)
    ours = np.array([cpu_ops._exp(v) for v in x], np.float32)  # a jitted scalar comes back as a Python float
    exact = np.exp(x.astype(np.float64))
    normal = exact >= np.finfo(np.float32).tiny
    ulp = np.spacing(exact[normal].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(ours[normal] - exact[normal]) / ulp) <= 1.5
    assert np.max(np.abs(ours[~normal] - exact[~normal])) <= 2.0 ** -149
    special = np.float32([88.72284, 89.0, 1e30, np.inf, -103.98, -120.0, -1e30, -np.inf, np.nan, 0.0, -0.0])
    with np.errstate(all="ignore"):  # NUMBA_DISABLE_JIT: NumPy warns on the scalar steps an inf or nan takes
        expected, got = np.exp(special), np.array([cpu_ops._exp(v) for v in special], np.float32)
    np.testing.assert_array_equal(got, expected)


# --- activations and the linear kernels ---------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["silu", "relu"])  # vectorised NumPy epilogue / Numba's exact one on the BLAS path
@pytest.mark.parametrize("epilogue", [formats.STORE, formats.ADD, formats.ACT, formats.GATED])
@pytest.mark.parametrize("rows", [1, linear.SMALL_M + 3])
def test_epilogues_agree_between_matrix_vector_and_blas(epilogue, rows, act):
    """The fused epilogues (residual add, activation, gated) give the same numbers on both paths."""
    rng = np.random.default_rng(epilogue * 10 + rows)
    x, w, b = randn(rng, rows, 40), randn(rng, 2 * 24, 40), randn(rng, 48)
    width = 24 if epilogue == formats.GATED else 48
    out = randn(rng, rows, width)
    expected = out.copy()
    y = ops.linear(x, w, b)
    if epilogue == formats.STORE:
        expected = y
    elif epilogue == formats.ADD:
        expected = expected + y
    elif epilogue == formats.ACT:
        expected = ops.ACTIVATIONS[act](y)
    else:
        expected = ops.ACTIVATIONS[act](y[:, :24]) * y[:, 24:]
    linear.linear_into(x, linear.Weight("fp32", w), b, formats.ACT_CODES[act], epilogue, out)
    assert_f32(out)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --- weight formats -----------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, o=st.integers(1, 40), d=st.integers(1, 130))
def test_q8_0_round_trip_error_is_within_half_a_step(seed, o, d):
    rng = np.random.default_rng(seed)
    w = randn(rng, o, d, scale=0.05)
    q, scales = formats.quantize_q8_0(w)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (o, -(-d // 32))
    back = formats.dequantize_q8_0(q, scales)
    assert_f32(back)
    # q = round(w / d) with the unrounded d, stored d rounded to fp16 (rel. 2^-11): |w - q d16| <= d/2 + 127 d 2^-11
    step = np.repeat(scales, 32, axis=1)[:, :d] / (1 - 2.0 ** -11)
    assert np.all(np.abs(back - w) <= step * (0.5 + 127 * 2.0 ** -11) + 1e-12)


def test_q8_0_is_llamas_q8_0_bit_for_bit():
    gguf = pytest.importorskip("gguf", reason="the gguf package holds llama.cpp's reference quantiser")
    rng = np.random.default_rng(0)
    w = randn(rng, 48, 256, scale=0.02)
    q, scales = formats.quantize_q8_0(w)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).reshape(48, 8, 34)  # per block: fp16 d, 32 q
    np.testing.assert_array_equal(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32), scales)
    np.testing.assert_array_equal(blocks[..., 2:].view(np.int8).reshape(48, 256), q)


@pytest.mark.parametrize("fmt", ["int8", "fp16", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, linear.SMALL_M + 2])
def test_stored_formats_compute_the_linear_of_their_dequantized_matrix(fmt, rows):
    """The on-the-fly kernels (rows <= SMALL_M) and the dequantise-then-BLAS path are linear() of dequantize()."""
    rng = np.random.default_rng(rows)
    for d in (64, 70):  # whole Q8_0 blocks, and a partial last block
        x, w, b = randn(rng, rows, d), randn(rng, 37, d, scale=0.1), randn(rng, 37)
        weight = linear.Weight.from_array(w, fmt)
        dense = weight.dequantize()
        assert_f32(dense)
        ours, ref = linear.linear(x, weight, b), ops.linear(x, dense, b)
        assert_f32(ours)
        assert np.all(np.abs(ours - ref) <= dot_bound(x, dense) + np.abs(ref) * EPS + 1e-30)
        np.testing.assert_array_equal(weight[np.array([[3, 0], [36, 3]])], dense[np.array([[3, 0], [36, 3]])])


def test_half_formats_widen_exactly():
    w = np.float32([[0.0, -0.0, 1.0, -2.5, 6.1e-5, 5.96e-8, 65504.0, 3.14159, 1e-9]])
    np.testing.assert_array_equal(linear.Weight.from_array(w, "fp16").dequantize(), w.astype(np.float16).astype(np.float32))
    bits = w.view(np.uint32).astype(np.uint64)
    rounded = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    np.testing.assert_array_equal(linear.Weight.from_array(w, "bf16").dequantize(), rounded)
    with pytest.raises(ValueError, match="fp16's range"):
        linear.Weight.from_array(np.float32([[1e5]]), "fp16")


# --- softmax ------------------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, h=st.integers(1, 8), s=st.integers(1, 9), past=st.integers(0, 20))
def test_the_serial_masked_softmax_gives_the_parallel_bits(seed, h, s, past):
    """The serial kernel (used beside OpenBLAS's spinning threads) runs the same row function as the parallel one
    (tests/test_backend_ops.py holds both against refimpl): the same bits."""
    rng = np.random.default_rng(seed)
    scores = randn(rng, 2, h, s, past + s, scale=4.0)
    mask2d = np.ones((2, past + s), np.int64)
    mask2d[1, :past] = 0
    mask = ops.causal_mask(mask2d, past, np.float32)
    ours = cpu_ops.masked_softmax_(scores.copy(), mask, 8.0)
    np.testing.assert_array_equal(cpu_ops.masked_softmax_(scores.copy(), mask, 8.0, parallel=False), ours)


def test_masked_softmax_propagates_nan_and_inf_as_numpy_does():
    """A nan score, or one that overflowed to +inf, makes its row nan in the twin (max and exp of inf - inf); the
    Numba kernel's clamp and running max must not hide it."""
    scores = np.float32([[[[1, np.nan, 2, 3], [1, 2, np.inf, 3], [1, 2, 3, 4]]]])
    mask = np.zeros((1, 1, 3, 4), np.float32)
    with np.errstate(invalid="ignore"):
        ref = ops.softmax(np.maximum(scores / np.float32(2) + mask, ops.mask_min(np.float32)))
        ours = cpu_ops.masked_softmax_(scores.copy(), mask, 2.0)
    assert np.isnan(ours[0, 0, :2]).all() and np.isnan(ref[0, 0, :2]).all()
    np.testing.assert_allclose(ours[0, 0, 2], ref[0, 0, 2], rtol=8 * EPS)

# --- sampling -----------------------------------------------------------------------------------------------------

vocab_scores = st.integers(2, 400).flatmap(lambda v: st.lists(st.floats(-12, 12, allow_nan=False, width=32),
                                                              min_size=v, max_size=v))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(values=vocab_scores, top_k=st.integers(0, 60), top_p=st.sampled_from([1.0, 0.95, 0.8, 0.5, 0.1]),
       seed=st.integers(0, 2**32 - 1))
def test_sampling_draws_refimpls_token_from_the_same_random_number(values, top_k, top_p, seed):
    """top-k then top-p then the inverse-CDF draw, without a vocabulary sort: refimpl's token for the same u."""
    scores = np.array([values], dtype=np.float32)
    filtered = scores
    if top_k:
        filtered = ref_processors.top_k(None, filtered, top_k)
    if top_p < 1.0:
        filtered = ref_processors.top_p(None, filtered, top_p)
    expected = ref_generate.sample(filtered, np.random.default_rng(seed))
    got = sampling.sample(scores, top_k, top_p, np.random.default_rng(seed))
    assert got.dtype == np.int64
    if got[0] != expected[0]:
        # allowed only where refimpl's float32 cumulative top-p mass sits within rounding of 1 - top_p
        probs = np.exp(filtered[0].astype(np.float64) - filtered[0].max())
        probs /= probs.sum()
        order = np.argsort(filtered[0], kind="stable")
        cumulative = np.cumsum(probs[order])
        assert np.min(np.abs(cumulative - (1 - top_p))) < 1e-5, (got, expected)


def test_sampling_keeps_ties_at_the_kth_score_and_never_picks_removed_tokens():
    scores = np.float32([[1.0, 3.0, 3.0, 3.0, -np.inf, 0.5]])
    draws = {int(sampling.sample(scores, 2, 1.0, np.random.default_rng(s))[0]) for s in range(200)}
    assert draws == {1, 2, 3}  # the three tied at the 2nd largest score are all kept, as TopKLogitsWarper keeps them


def test_kernel_inputs_of_another_dtype_do_not_promote():
    """A float64 scalar (np.sqrt(head_dim)) must not turn activations into float64: outputs stay float32."""
    rng = np.random.default_rng(0)
    q, kc = randn(rng, 1, 2, 8), randn(rng, 1, 2, 4, 8)
    assert_f32(attention.attention_decode(q, kc, kc, 3, None, math.sqrt(8.0)),
               cpu_ops.rms_norm(randn(rng, 2, 8), randn(rng, 8), 1e-5),
               cpu_ops.masked_softmax_(randn(rng, 1, 1, 2, 3), np.zeros((1, 1, 2, 3), np.float32), np.float64(8.0) ** 0.5))


def test_a_changed_kernel_file_drops_every_cached_entry(tmp_path):
    """Numba keys a cache entry on its own file only; accel.cpu.jit drops all of accel/cpu's entries when any file
    there changes, so forward.py never runs a stale copy of a linear.py kernel."""
    import shutil

    from refimpl_accel.cpu import jit

    here = os.path.dirname(jit.__file__)
    for name in os.listdir(here):
        if name.endswith(".py"):
            shutil.copy(os.path.join(here, name), tmp_path / name)
    cache = tmp_path / "__pycache__"
    jit.drop_stale_cache(str(tmp_path))
    (cache / "forward.f-1.py311.nbi").write_bytes(b"index")
    jit.drop_stale_cache(str(tmp_path))  # nothing changed: kept
    assert (cache / "forward.f-1.py311.nbi").exists()
    with open(tmp_path / "linear.py", "a") as f:
        f.write("\n# changed\n")
    jit.drop_stale_cache(str(tmp_path))
    assert not (cache / "forward.f-1.py311.nbi").exists()
