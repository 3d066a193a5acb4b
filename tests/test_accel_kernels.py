"""accel's kernels against their refimpl twins, op by op (llama.cpp's test-backend-ops idea), over hypothesis shapes.

Tolerances come from the arithmetic. Two float32 sums of the same n products, taken in different orders, each lie
within n*u*sum|a_j b_j| of the exact sum (u = eps/2), so they differ by at most n * eps * sum|a_j b_j|: that bound,
computed per output element, is the tolerance of every dot-product kernel. Elementwise kernels (RoPE, activations,
epilogues) evaluate the twin's float32 expression in the twin's order and must match it exactly, up to the last
bit of exp/tanh/log1p (libm vs NumPy's SIMD code: 4 ulp allowed). Every output's dtype is asserted: float32.

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
from accel import kernels_cpu as k  # noqa: E402
from accel import quant, sampling  # noqa: E402

EPS = float(np.finfo(np.float32).eps)
ULP4 = 4 * EPS  # relative: libm vs NumPy SIMD transcendental functions
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


# --- norms --------------------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, rows=st.integers(1, 9), d=dims, eps=st.sampled_from([1e-5, 1e-6, 1e-12]))
def test_rms_norm_matches_twin(seed, rows, d, eps):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, rows, d, scale=3.0), randn(rng, d)
    ours, ref = k.rms_norm(x, w, eps), ops.rms_norm(x, w, eps)
    assert_f32(ours)
    # only mean(x^2) is summed in another order: relative error of the scale <= d*eps (+ sqrt and divide, 2 eps)
    np.testing.assert_allclose(ours, ref, rtol=(d + 4) * EPS, atol=1e-30)


@SETTINGS
@given(seed=seeds, rows=st.integers(1, 9), d=st.integers(2, 97), affine=st.booleans())
def test_layer_norm_matches_twin(seed, rows, d, affine):
    rng = np.random.default_rng(seed)
    x = randn(rng, rows, d, scale=2.0) + np.float32(1.5)
    w, b = (randn(rng, d), randn(rng, d)) if affine else (None, None)
    ours, ref = k.layer_norm(x, w, b, eps=1e-5), ops.layer_norm(x, w, b, eps=1e-5)
    assert_f32(ours)
    # mean and variance are sums in another order: each output moves by <= (2d+4) eps of its normalised size
    scale = np.abs(ops.layer_norm(x, None, None, 1e-5)) * (1.0 if w is None else np.abs(w)) + 1.0
    assert np.all(np.abs(ours - ref) <= (2 * d + 4) * EPS * scale)


# --- exp -----------------------------------------------------------------------------------------------------------

def test_vectorisable_exp_is_within_an_ulp_and_a_bit_of_exact():
    """kernels_cpu._exp (Cephes' expf: a degree-7 polynomial after Cody-Waite reduction, ~1 ulp by design) against
    exp in float64 rounded once: <= 1.5 ulp of the float32 result over [-103.9, 88.7], which is also within the 4 ulp
    the other kernels allow against NumPy's own expf (<= 2.5 ulp from exact on this machine); the subnormal results
    within one subnormal step; overflow, underflow, infinities and nan as np.exp gives them."""
    from accel.jit import JIT_DISABLED
    n = 3_000 if JIT_DISABLED else 300_000
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-103.9, 88.72, n), np.linspace(-1, 1, n // 10)]).astype(np.float32)
    ours = np.array([k._exp(v) for v in x], np.float32)  # a jitted scalar comes back as a Python float
    exact = np.exp(x.astype(np.float64))
    normal = exact >= np.finfo(np.float32).tiny
    ulp = np.spacing(exact[normal].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(ours[normal] - exact[normal]) / ulp) <= 1.5
    assert np.max(np.abs(ours[~normal] - exact[~normal])) <= 2.0 ** -149
    special = np.float32([88.72284, 89.0, 1e30, np.inf, -103.98, -120.0, -1e30, -np.inf, np.nan, 0.0, -0.0])
    with np.errstate(all="ignore"):  # NUMBA_DISABLE_JIT: NumPy warns on the scalar steps an inf or nan takes
        expected, got = np.exp(special), np.array([k._exp(v) for v in special], np.float32)
    np.testing.assert_array_equal(got, expected)


# --- activations and the linear kernels ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ops.ACTIVATIONS))
def test_activation_matches_twin(name):
    x = np.concatenate([np.linspace(-30, 30, 241, dtype=np.float32), np.float32([0.0, -0.0, 1e-30, -1e-30, 88.0])])
    ours, ref = k.activation(x[None], name)[0], ops.ACTIVATIONS[name](x)
    assert_f32(ours)
    # a few ulp of exp/tanh; for the tanh GELUs at negative x, 0.5 x (1 + tanh) cancels, so an ulp of tanh (~1)
    # becomes 0.5 |x| eps absolute: hence the |x| term
    assert np.all(np.abs(ours - ref) <= ULP4 * (np.abs(ref) + np.abs(x)) + 1e-37)


@SETTINGS
@given(seed=seeds, rows=st.integers(1, 9), d=dims, o=dims, bias=st.booleans())
def test_linear_matches_twin_for_one_row_and_many(seed, rows, d, o, bias):
    """rows <= SMALL_M run the Numba matrix-vector kernel, more rows BLAS: both are refimpl.ops.linear."""
    rng = np.random.default_rng(seed)
    x, w = randn(rng, rows, d), randn(rng, o, d)
    b = randn(rng, o) if bias else None
    ours, ref = quant.linear(x, w, b), ops.linear(x, w, b)
    assert_f32(ours)
    assert np.all(np.abs(ours - ref) <= dot_bound(x, w) + (np.abs(ref) * EPS if bias else 0))


@SETTINGS
@given(seed=seeds, rows=st.integers(1, 9), d=dims, f=st.integers(1, 60),
       act=st.sampled_from(["silu", "gelu", "gelu_new", "relu"]))
def test_gated_linear_matches_llama_mlp_lines(seed, rows, d, f, act):
    """act(gate(x)) * up(x) with gate and up stacked in one matrix: refimpl.llama.mlp's first three lines."""
    rng = np.random.default_rng(seed)
    x, wg, wu = randn(rng, rows, d), randn(rng, f, d), randn(rng, f, d)
    bg, bu = randn(rng, f), randn(rng, f)
    ours = quant.gated_linear(x, np.concatenate([wg, wu]), np.concatenate([bg, bu]), k.ACT_CODES[act])
    gate, up = ops.linear(x, wg, bg), ops.linear(x, wu, bu)
    ref = ops.ACTIVATIONS[act](gate) * up
    assert_f32(ours)
    # the two products carry the dot bound; the activation's slope is <= 1.13 (gelu) so it scales gate's error
    err_gate, err_up = dot_bound(x, wg) + np.abs(gate) * EPS, dot_bound(x, wu) + np.abs(up) * EPS
    bound = 1.2 * err_gate * np.abs(up) + err_up * (np.abs(gate) + err_gate) + np.abs(ref) * 4 * EPS
    assert np.all(np.abs(ours - ref) <= bound + 1e-30)


@pytest.mark.parametrize("act", ["silu", "relu"])  # vectorised NumPy epilogue / Numba's exact one on the BLAS path
@pytest.mark.parametrize("epilogue", [k.STORE, k.ADD, k.ACT, k.GATED])
@pytest.mark.parametrize("rows", [1, quant.SMALL_M + 3])
def test_epilogues_agree_between_matrix_vector_and_blas(epilogue, rows, act):
    """The fused epilogues (residual add, activation, gated) give the same numbers on both paths."""
    rng = np.random.default_rng(epilogue * 10 + rows)
    x, w, b = randn(rng, rows, 40), randn(rng, 2 * 24, 40), randn(rng, 48)
    width = 24 if epilogue == k.GATED else 48
    out = randn(rng, rows, width)
    expected = out.copy()
    y = ops.linear(x, w, b)
    if epilogue == k.STORE:
        expected = y
    elif epilogue == k.ADD:
        expected = expected + y
    elif epilogue == k.ACT:
        expected = ops.ACTIVATIONS[act](y)
    else:
        expected = ops.ACTIVATIONS[act](y[:, :24]) * y[:, 24:]
    quant.linear_into(x, quant.Weight("fp32", w), b, k.ACT_CODES[act], epilogue, out)
    assert_f32(out)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --- weight formats -----------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, o=st.integers(1, 40), d=st.integers(1, 130))
def test_q8_0_round_trip_error_is_within_half_a_step(seed, o, d):
    rng = np.random.default_rng(seed)
    w = randn(rng, o, d, scale=0.05)
    q, scales = quant.quantize_q8_0(w)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (o, -(-d // 32))
    back = quant.dequantize_q8_0(q, scales)
    assert_f32(back)
    # q = round(w / d) with the unrounded d, stored d rounded to fp16 (rel. 2^-11): |w - q d16| <= d/2 + 127 d 2^-11
    step = np.repeat(scales, 32, axis=1)[:, :d] / (1 - 2.0 ** -11)
    assert np.all(np.abs(back - w) <= step * (0.5 + 127 * 2.0 ** -11) + 1e-12)


def test_q8_0_is_llamas_q8_0_bit_for_bit():
    gguf = pytest.importorskip("gguf", reason="the gguf package holds llama.cpp's reference quantiser")
    rng = np.random.default_rng(0)
    w = randn(rng, 48, 256, scale=0.02)
    q, scales = quant.quantize_q8_0(w)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).reshape(48, 8, 34)  # per block: fp16 d, 32 q
    np.testing.assert_array_equal(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32), scales)
    np.testing.assert_array_equal(blocks[..., 2:].view(np.int8).reshape(48, 256), q)


@pytest.mark.parametrize("fmt", ["int8", "fp16", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, quant.SMALL_M + 2])
def test_stored_formats_compute_the_linear_of_their_dequantized_matrix(fmt, rows):
    """The on-the-fly kernels (rows <= SMALL_M) and the dequantise-then-BLAS path are linear() of dequantize()."""
    rng = np.random.default_rng(rows)
    for d in (64, 70):  # whole Q8_0 blocks, and a partial last block
        x, w, b = randn(rng, rows, d), randn(rng, 37, d, scale=0.1), randn(rng, 37)
        weight = quant.Weight.from_array(w, fmt)
        dense = weight.dequantize()
        assert_f32(dense)
        ours, ref = quant.linear(x, weight, b), ops.linear(x, dense, b)
        assert_f32(ours)
        assert np.all(np.abs(ours - ref) <= dot_bound(x, dense) + np.abs(ref) * EPS + 1e-30)
        np.testing.assert_array_equal(weight[np.array([[3, 0], [36, 3]])], dense[np.array([[3, 0], [36, 3]])])


def test_half_formats_widen_exactly():
    w = np.float32([[0.0, -0.0, 1.0, -2.5, 6.1e-5, 5.96e-8, 65504.0, 3.14159, 1e-9]])
    np.testing.assert_array_equal(quant.Weight.from_array(w, "fp16").dequantize(), w.astype(np.float16).astype(np.float32))
    bits = w.view(np.uint32).astype(np.uint64)
    rounded = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    np.testing.assert_array_equal(quant.Weight.from_array(w, "bf16").dequantize(), rounded)
    with pytest.raises(ValueError, match="fp16's range"):
        quant.Weight.from_array(np.float32([[1e5]]), "fp16")


# --- RoPE, softmax, attention -------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, b=st.integers(1, 3), h=st.integers(1, 5), s=st.integers(1, 12), half=st.integers(1, 24),
       per_row=st.booleans())
def test_apply_rotary_matches_twin_exactly(seed, b, h, s, half, per_row):
    rng = np.random.default_rng(seed)
    x = randn(rng, b, h, s, 2 * half)
    angles = rng.uniform(0, 100, (b if per_row else 1, s, half)).astype(np.float32)
    cos = np.cos(np.concatenate([angles, angles], -1))
    sin = np.sin(np.concatenate([angles, angles], -1))
    ours = k.apply_rotary(x, cos, sin)
    assert_f32(ours)
    np.testing.assert_array_equal(ours, ops.apply_rotary(x, cos, sin))  # the same float32 expression


def reference_attention(q, keys, values, mask, divisor):
    """refimpl.llama.attention's lines for q [B, H, S, Dh], keys/values [B, Hkv, K, Dh], mask [B, 1, S, K]."""
    H, Hkv = q.shape[1], keys.shape[1]
    keys, values = ops.repeat_kv(keys, H // Hkv), ops.repeat_kv(values, H // Hkv)
    scores = (q @ keys.transpose(0, 1, 3, 2)) / divisor + mask
    scores = np.maximum(scores, ops.mask_min(scores.dtype))
    probs = ops.softmax(scores)
    return probs @ values, probs, values


gqa = st.sampled_from([(1, 1), (4, 4), (4, 2), (6, 2), (8, 1), (3, 3)])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=seeds, heads=gqa, head_dim=st.sampled_from([2, 8, 16, 64, 80]), length=st.integers(1, 300),
       batch=st.integers(1, 2), pad=st.booleans(), spare=st.integers(0, 5))
def test_attention_decode_matches_llama_attention(seed, heads, head_dim, length, batch, pad, spare):
    """One new position against the cache (online softmax, no repeat_kv) = refimpl's eager attention for S = 1."""
    H, Hkv = heads
    rng = np.random.default_rng(seed)
    q = randn(rng, batch, H, head_dim)
    capacity = length + spare  # the cache has room beyond the valid positions
    k_cache, v_cache = randn(rng, batch, Hkv, capacity, head_dim), randn(rng, batch, Hkv, capacity, head_dim)
    mask2d = np.ones((batch, length), np.int64)
    if pad and length > 1:
        mask2d[0, : rng.integers(1, length)] = 0  # left padding in row 0
    bias = np.where(mask2d == 0, ops.mask_min(np.float32), np.float32(0)).astype(np.float32)
    divisor = np.sqrt(np.float32(head_dim))
    ours = k.attention_decode(q, k_cache, v_cache, length, bias if pad else None, divisor)
    assert_f32(ours)
    mask = ops.causal_mask(mask2d, length - 1, np.float32)  # [B, 1, 1, K]
    ref, probs, values = reference_attention(q[:, :, None], k_cache[:, :, :length], v_cache[:, :, :length], mask,
                                             divisor)
    ref = ref[:, :, 0]
    # scores: dot bound of Dh terms; softmax: K-term sum; context: K-term weighted sum, all relative to probs@|v|
    scale = (probs[:, :, 0, :, None] * np.abs(values)).sum(-2)
    np.testing.assert_array_less(np.abs(ours - ref), (length + head_dim + 8) * EPS * (scale + np.abs(ref)) + 1e-30)


@SETTINGS
@given(seed=seeds, heads=gqa, s=st.integers(1, 9), past=st.integers(0, 20), divisor=st.sampled_from([1.0, 8.0]))
def test_masked_softmax_matches_the_attention_lines(seed, heads, s, past, divisor):
    H, _ = heads
    rng = np.random.default_rng(seed)
    scores = randn(rng, 2, H, s, past + s, scale=4.0)
    mask2d = np.ones((2, past + s), np.int64)
    mask2d[1, :past] = 0
    mask = ops.causal_mask(mask2d, past, np.float32)
    ref = ops.softmax(np.maximum(scores / np.float32(divisor) + mask, ops.mask_min(np.float32)))
    ours = k.masked_softmax_(scores.copy(), mask, divisor)
    assert_f32(ours)
    np.testing.assert_allclose(ours, ref, rtol=(past + s + 4) * EPS, atol=1e-38)
    # the serial kernel (used beside OpenBLAS) runs the same row function: the same bits
    np.testing.assert_array_equal(k.masked_softmax_(scores.copy(), mask, divisor, parallel=False), ours)



def test_masked_softmax_propagates_nan_and_inf_as_numpy_does():
    """A nan score, or one that overflowed to +inf, makes its row nan in the twin (max and exp of inf - inf); the
    Numba kernel's clamp and running max must not hide it."""
    scores = np.float32([[[[1, np.nan, 2, 3], [1, 2, np.inf, 3], [1, 2, 3, 4]]]])
    mask = np.zeros((1, 1, 3, 4), np.float32)
    with np.errstate(invalid="ignore"):
        ref = ops.softmax(np.maximum(scores / np.float32(2) + mask, ops.mask_min(np.float32)))
        ours = k.masked_softmax_(scores.copy(), mask, 2.0)
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
    assert_f32(k.attention_decode(q, kc, kc, 3, None, math.sqrt(8.0)),
               k.rms_norm(randn(rng, 2, 8), randn(rng, 8), 1e-5),
               k.masked_softmax_(randn(rng, 1, 1, 2, 3), np.zeros((1, 1, 2, 3), np.float32), np.float64(8.0) ** 0.5))


def test_a_changed_kernel_file_drops_every_cached_entry(tmp_path):
    """Numba keys a cache entry on its own file only; accel.jit drops all of accel's entries when any kernel file
    changes, so fused.py never runs a stale copy of a quant.py kernel."""
    import shutil

    from accel import jit

    here = os.path.dirname(jit.__file__)
    for name in jit.KERNEL_FILES:
        shutil.copy(os.path.join(here, name), tmp_path / name)
    cache = tmp_path / "__pycache__"
    jit.drop_stale_cache(str(tmp_path))
    (cache / "fused.f-1.py311.nbi").write_bytes(b"index")
    jit.drop_stale_cache(str(tmp_path))  # nothing changed: kept
    assert (cache / "fused.f-1.py311.nbi").exists()
    with open(tmp_path / "quant.py", "a") as f:
        f.write("\n# changed\n")
    jit.drop_stale_cache(str(tmp_path))
    assert not (cache / "fused.f-1.py311.nbi").exists()
