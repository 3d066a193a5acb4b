"""One op table: every kernel of every accel backend against its refimpl twin (in the spirit of llama.cpp's
test-backend-ops: one table of ops, every backend checked against the reference).

Each row of OPS is an op: its refimpl twin, the shapes it runs on (a hypothesis strategy), the tolerance with its
derivation, and the call on each backend that implements it. test_op runs every (row, backend) pair:
  numba     accel/cpu/, in this process;
  cuda-sim  accel/cuda/ under Numba's CUDA simulator, where the kernels take NumPy arrays. The simulator must be
            chosen before Numba is first imported, and a pytest process has usually imported Numba already, so
            test_the_table_under_the_cuda_simulator re-runs this file in a subprocess with NUMBA_ENABLE_CUDASIM=1
            (there, only the cuda-sim rows run; blocks of 4..32 threads exercise the multi-block, multi-pass paths);
  cuda      accel/cuda/ on a real GPU when CuPy finds one (CuPy arrays; skipped otherwise).

Tolerances come from the arithmetic. Two float32 sums of the same n terms in different orders differ by at most
n * eps * sum|terms| (the "dot bound"); elementwise kernels evaluate the twin's float32 expression, so they match it
bit for bit, except that exp / erf / tanh may differ in their last ulps (4 of them), and a GPU compiler may contract
a*b + c into one FMA (2 eps of the terms' magnitudes on a device).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

pytest.importorskip("numba", reason="accel's kernels need Numba (pip install 'refimpl[accel]')")

from refimpl import ops  # noqa: E402

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = float(np.finfo(np.float32).eps)
F32 = np.float32


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def dot_bound(x, w):
    """n * eps * (|x| @ |w|^T): the largest gap between two orderings of the float32 sums x @ w.T (n = x's width)."""
    return x.shape[-1] * EPS * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)


def act_bound(x, ref):
    """The same float32 expression, but exp / erf / tanh may differ in their last bits (4 ulp of the result), and
    GELU's 1 + erf (1 + tanh) cancels for negative x: there an ulp of erf (of 1) is 0.5 |x| eps absolute."""
    return 8 * EPS * np.abs(ref) + 4 * EPS * np.abs(x)


# --- the backends: how arrays get to the kernels and back -----------------------------------------------------------

@dataclass
class Backend:
    name: str
    kind: str  # "numba" | "cuda": which implementation of an op it runs
    dev: object = np.ascontiguousarray  # host array -> where the kernels run
    host: object = np.asarray  # and back
    threads: object = field(default_factory=lambda: st.just(None))  # CUDA threads per block to try
    device: bool = False  # a real GPU: FMA contraction, float16 products


def backends():
    if SIMULATED:
        return [Backend("cuda-sim", "cuda", threads=st.sampled_from([4, 8, 32]))]
    found = [Backend("numba", "numba")]
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            found.append(Backend("cuda", "cuda", cupy.asarray, cupy.asnumpy, device=True))
    except Exception:  # no CuPy, no driver, no device: the cuda rows run under the simulator only
        pass
    return found


# --- the ops --------------------------------------------------------------------------------------------------------

@dataclass
class Op:
    """One row: `case(rng, **params)` -> (inputs, reference, bound); `run[kind](backend, inputs, threads)` -> ours."""
    name: str
    twin: str
    params: st.SearchStrategy
    case: object
    run: dict
    why: str
    applies: object = lambda kind, params: True  # False: this backend does not take these params (a format)


def _cpu():
    from refimpl_accel.cpu import attention, linear, ops as cpu_ops

    return cpu_ops, linear, attention


def _cuda():
    from refimpl_accel.cuda import attention, linear, ops as cuda_ops

    return cuda_ops, linear, attention


def out_like(b, shape, start=None):
    return b.dev(np.zeros(shape, F32) if start is None else start.copy())


# rms_norm ------------------------------------------------------------------------------------------------------------

def rms_norm_case(rng, rows, d, eps):
    x, w = randn(rng, rows, d, scale=3.0), randn(rng, d)
    ref = ops.rms_norm(x, w, eps)
    return (x, w, eps), ref, (d + 4) * EPS * np.abs(ref) + 1e-30


RMS_NORM = Op(
    "rms_norm", "refimpl.ops.rms_norm",
    st.fixed_dictionaries({"rows": st.integers(1, 9), "d": st.integers(1, 97),
                           "eps": st.sampled_from([1e-5, 1e-6, 1e-12])}),
    rms_norm_case,
    {"numba": lambda b, a, t: _cpu()[0].rms_norm(*a),
     "cuda": lambda b, a, t: _cuda()[0].rms_norm(b.dev(a[0]), b.dev(a[1]), a[2], out_like(b, a[0].shape), t)},
    "only mean(x^2) is summed in another order: relative error of the scale <= d eps, + sqrt and divide (4 eps)")


# layer_norm ----------------------------------------------------------------------------------------------------------

def layer_norm_case(rng, rows, d, affine):
    x = randn(rng, rows, d, scale=2.0) + F32(1.5)
    w, b = (randn(rng, d), randn(rng, d)) if affine else (None, None)
    ref = ops.layer_norm(x, w, b, eps=1e-5)
    scale = np.abs(ops.layer_norm(x, None, None, 1e-5)) * (1.0 if w is None else np.abs(w)) + 1.0
    return (x, w, b), ref, (2 * d + 4) * EPS * scale


def cuda_layer_norm(b, a, t):
    x, w, bias = a
    d = x.shape[1]
    w = np.ones(d, F32) if w is None else w  # the launcher takes ones / zeros for a norm without affine
    bias = np.zeros(d, F32) if bias is None else bias
    return _cuda()[0].layer_norm(b.dev(x), b.dev(w), b.dev(bias), 1e-5, out_like(b, x.shape), t)


LAYER_NORM = Op(
    "layer_norm", "refimpl.ops.layer_norm",
    st.fixed_dictionaries({"rows": st.integers(1, 9), "d": st.integers(2, 97), "affine": st.booleans()}),
    layer_norm_case,
    {"numba": lambda b, a, t: _cpu()[0].layer_norm(a[0], a[1], a[2], eps=1e-5), "cuda": cuda_layer_norm},
    "mean and variance are sums in another order: each output moves by <= (2d + 4) eps of its normalised size")


# apply_rotary_ -------------------------------------------------------------------------------------------------------

def rotary_case(rng, b, h, s, half, per_row):
    """RoPE in place on the first h heads of a fused [B, S, NH, Dh] row (one more head, a v head, stays as it is) =
    refimpl.ops.apply_rotary on [B, H, S, Dh]."""
    dh = 2 * half
    x = randn(rng, b, s, h + 1, dh)
    angles = rng.uniform(0, 50, (b if per_row else 1, s, half))
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(F32)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(F32)
    q = x[:, :, :h].transpose(0, 2, 1, 3)  # [B, H, S, Dh]
    full_cos, full_sin = np.broadcast_to(cos, (b, s, dh)), np.broadcast_to(sin, (b, s, dh))
    ref = x.copy()
    ref[:, :, :h] = ops.apply_rotary(q, full_cos, full_sin).transpose(0, 2, 1, 3)
    mag = np.zeros_like(x)
    mag[:, :, :h] = (np.abs(q) * np.abs(cos[:, None]) + np.abs(ops.rotate_half(q)) * np.abs(sin[:, None])
                     ).transpose(0, 2, 1, 3)
    return (x, h, cos, sin), ref, 2 * EPS * mag  # only a device's FMA can move it (see rotary_bound)


def cpu_rotary(b, a, t):
    x, h, cos, sin = a
    buf = x.copy()
    _cpu()[0].apply_rotary_(buf, h, cos, sin)
    return buf


def cuda_rotary(b, a, t):
    x, h, cos, sin = a
    buf = b.dev(x.copy())
    _cuda()[0].apply_rotary_(buf, h, b.dev(cos), b.dev(sin), t)
    return buf


ROTARY = Op(
    "apply_rotary_", "refimpl.ops.apply_rotary",
    st.fixed_dictionaries({"b": st.integers(1, 2), "h": st.integers(1, 4), "s": st.integers(1, 5),
                           "half": st.integers(1, 16), "per_row": st.booleans()}),
    rotary_case, {"numba": cpu_rotary, "cuda": cuda_rotary},
    "the same float32 expression x cos + rotate_half(x) sin: bit for bit on the CPU and the simulator; a device "
    "may contract one product into an FMA: 2 eps of the terms' magnitudes")


# activation ----------------------------------------------------------------------------------------------------------

ACT_NAMES = sorted(ops.ACTIVATIONS)


def activation_case(rng, rows, f, act):
    y = randn(rng, rows, f, scale=4.0)
    ref = ops.ACTIVATIONS[act](y)
    return (y, act), ref, act_bound(y, ref) + 1e-30


def cuda_activation(b, a, t):
    from refimpl_accel.formats import ACT_CODES

    y, act = a
    return _cuda()[0].activation(b.dev(y), ACT_CODES[act], out_like(b, y.shape), t)


ACTIVATION = Op(
    "activation", "refimpl.ops.ACTIVATIONS",
    st.fixed_dictionaries({"rows": st.integers(1, 3), "f": st.integers(1, 70), "act": st.sampled_from(ACT_NAMES)}),
    activation_case, {"numba": lambda b, a, t: _cpu()[0].activation(*a), "cuda": cuda_activation},
    "the twin's float32 expression; exp / erf / tanh within 4 ulp, and GELU's 1 + erf cancels for negative x "
    "(an ulp of erf becomes 0.5 |x| eps absolute)")


# gated linear (Llama's MLP: act(gate) * up, gate and up stacked) -------------------------------------------------------

def gated_case(rng, rows, d, f, act):
    x, wg, wu = randn(rng, rows, d), randn(rng, f, d), randn(rng, f, d)
    bg, bu = randn(rng, f), randn(rng, f)
    gate, up = ops.linear(x, wg, bg), ops.linear(x, wu, bu)
    ref = ops.ACTIVATIONS[act](gate) * up
    # gate and up each within their dot bound (+ the bias add); act's slope is <= 1.13 for these activations
    dg, du = dot_bound(x, wg) + EPS * np.abs(gate), dot_bound(x, wu) + EPS * np.abs(up)
    bound = 1.13 * dg * np.abs(up) + (np.abs(ops.ACTIVATIONS[act](gate)) + 1.13 * dg) * du
    bound += act_bound(gate, ops.ACTIVATIONS[act](gate)) * np.abs(up) + 2 * EPS * np.abs(ref) + 1e-30
    return (x, np.concatenate([wg, wu]), np.concatenate([bg, bu]), act), ref, bound


def cpu_gated(b, a, t):
    from refimpl_accel.formats import ACT_CODES

    x, w, bias, act = a
    return _cpu()[1].gated_linear(x, w, bias, ACT_CODES[act])


def cuda_gated(b, a, t):
    from refimpl_accel.cpu.linear import Weight
    from refimpl_accel.formats import ACT_CODES

    cuda_ops, linear, _ = _cuda()
    x, w, bias, act = a
    xp = np if not b.device else __import__("cupy")
    y = linear.linear(b.dev(x), linear.DeviceWeight.from_host(Weight.from_array(w, "fp32"), xp), b.dev(bias))
    return cuda_ops.gated_act(xp.ascontiguousarray(y), ACT_CODES[act], out_like(b, (x.shape[0], w.shape[0] // 2)), t)


GATED = Op(
    "gated_linear", "refimpl.llama.mlp",
    st.fixed_dictionaries({"rows": st.integers(1, 9), "d": st.integers(1, 97), "f": st.integers(1, 60),
                           "act": st.sampled_from(["silu", "gelu", "gelu_new", "relu"])}),
    gated_case, {"numba": cpu_gated, "cuda": cuda_gated},
    "gate and up within their dot bounds, propagated through act (slope <= 1.13) and the product, + act's ulps")


# linear, every storage format ----------------------------------------------------------------------------------------

FORMATS_CPU = ("fp32", "fp16", "bf16", "int8")


def linear_case(rng, rows, d, o, bias, fmt):
    from refimpl_accel.cpu.linear import Weight

    x, w = randn(rng, rows, d), randn(rng, o, d)
    weight = Weight.from_array(w, fmt)
    dense = weight.dequantize().copy()  # the stored numbers, widened: what the kernels compute with
    b = randn(rng, o) if bias else None
    ref = ops.linear(x, dense, b)
    bound = dot_bound(x, dense) + (EPS * np.abs(ref) if bias else 0) + 1e-30
    return (x, weight, b, dense), ref, bound


def cuda_linear(b, a, t):
    from refimpl_accel.cuda.linear import DeviceWeight, linear

    x, weight, bias, _ = a
    xp = np if not b.device else __import__("cupy")
    return linear(b.dev(x), DeviceWeight.from_host(weight, xp), None if bias is None else b.dev(bias))


def linear_device_bound(a, bound):
    """On a GPU, fp16 weights multiply float16 activations (accel.cuda.linear.product): each x rounded by 2^-11 and
    the product by 2^-11 of |y| (float32 accumulation)."""
    x, weight, _, dense = a
    if weight.format != "fp16":
        return bound
    return bound + 2.0 ** -10 * (np.abs(x.astype(np.float64)) @ np.abs(dense.astype(np.float64)).T)


LINEAR = Op(
    "linear", "refimpl.ops.linear",
    st.fixed_dictionaries({"rows": st.integers(1, 9), "d": st.integers(1, 97), "o": st.integers(1, 97),
                           "bias": st.booleans(), "fmt": st.sampled_from(FORMATS_CPU)}),
    linear_case,
    {"numba": lambda b, a, t: _cpu()[1].linear(a[0], a[1], a[2]), "cuda": cuda_linear},
    "rows <= 4: a matrix-vector kernel that widens in registers; more rows: BLAS on dequantized tiles. Either way "
    "a dot product summed in another order (the dot bound on the stored numbers), + the bias add (1 eps)",
    applies=lambda kind, params: params["fmt"] in {"numba": FORMATS_CPU, "cuda": ("fp32", "fp16", "int8")}[kind])


# linear on a GGUF file's own blocks (numba only) ----------------------------------------------------------------------

def gguf_linear_case(rng, rows, blocks, o, bias, kind):
    """W as llama.cpp stores it: quantized by gguf's quantizer (Q8_0, Q4_0, Q5_0) or random valid blocks with edge
    blocks (the K-quants; tests/test_gguf_blocks.py's make_raw); the twin runs on gguf.quants.dequantize's matrix."""
    import gguf
    from test_gguf_blocks import make_raw, matvec_bound

    from refimpl_accel.cpu import gguf_blocks
    from refimpl_accel.cpu.linear import Weight

    D = blocks * gguf_blocks.BLOCKS[kind][1]
    raw = make_raw(kind, o, D, int(rng.integers(1 << 30)))
    dense = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(o, D)
    x = randn(rng, rows, D)
    b = randn(rng, o) if bias else None
    ref = ops.linear(x, dense, b)
    # rows <= 4: the blocks dequantized in registers (matvec_bound, derived in test_gguf_blocks.py); more rows: BLAS
    # on tiles dequantized bit for bit as gguf does (the dot bound); + the bias add
    bound = np.maximum(matvec_bound(kind, x, raw), dot_bound(x, dense)) + (EPS * np.abs(ref) if bias else 0) + 1e-30
    return (x, Weight(kind, raw, columns=D), b), ref, bound


GGUF_LINEAR = Op(
    "linear_gguf", "refimpl.ops.linear",
    st.fixed_dictionaries({"rows": st.integers(1, 9), "blocks": st.integers(1, 3), "o": st.integers(1, 40),
                           "bias": st.booleans(),
                           "kind": st.sampled_from(["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])}),
    gguf_linear_case,
    {"numba": lambda b, a, t: _cpu()[1].linear(*a)},
    "decode: each block's scale factored out of its sum (gamma_{bs+nb+3} of sum |x| (|dl q| + |dm|)); prompt: "
    "BLAS on gguf's own dequantization (the dot bound)")


# attention_decode ----------------------------------------------------------------------------------------------------

def reference_attention(q, keys, values, mask, divisor):
    """refimpl.llama.attention's lines for q [B, H, S, Dh], keys/values [B, Hkv, K, Dh], mask [B, 1, S, K]."""
    H, Hkv = q.shape[1], keys.shape[1]
    keys, values = ops.repeat_kv(keys, H // Hkv), ops.repeat_kv(values, H // Hkv)
    scores = (q @ keys.transpose(0, 1, 3, 2)) / divisor + mask
    scores = np.maximum(scores, ops.mask_min(scores.dtype))
    probs = ops.softmax(scores)
    return probs @ values, probs, values


def attention_case(rng, heads, head_dim, length, batch, pad, spare):
    H, Hkv = heads
    q = randn(rng, batch, H, head_dim)
    capacity = length + spare  # the cache has room beyond the valid positions
    k_cache, v_cache = randn(rng, batch, Hkv, capacity, head_dim), randn(rng, batch, Hkv, capacity, head_dim)
    mask2d = np.ones((batch, length), np.int64)
    if pad and length > 1:
        mask2d[0, : rng.integers(1, length)] = 0  # left padding in row 0
    bias = np.where(mask2d == 0, ops.mask_min(F32), F32(0)).astype(F32) if pad else np.zeros((batch, 0), F32)
    divisor = np.sqrt(F32(head_dim))
    mask = ops.causal_mask(mask2d, length - 1, F32)  # [B, 1, 1, K]
    ref, probs, values = reference_attention(q[:, :, None], k_cache[:, :, :length], v_cache[:, :, :length], mask,
                                             divisor)
    ref = ref[:, :, 0]
    scale = (probs[:, :, 0, :, None] * np.abs(values)).sum(-2)
    bound = (length + head_dim + 8) * EPS * (scale + np.abs(ref)) + 1e-30
    return (q, k_cache, v_cache, length, bias, divisor), ref, bound


def cuda_attention(b, a, t):
    q, k, v, length, bias, divisor = a
    return _cuda()[2].attention_decode(b.dev(q), b.dev(k), b.dev(v), length, b.dev(bias), divisor,
                                       out_like(b, q.shape), t)


ATTENTION = Op(
    "attention_decode", "refimpl.llama.attention",
    st.fixed_dictionaries({"heads": st.sampled_from([(1, 1), (4, 4), (4, 2), (6, 2), (8, 1), (3, 3)]),
                           "head_dim": st.sampled_from([2, 8, 16, 64, 80]), "length": st.integers(1, 300),
                           "batch": st.integers(1, 2), "pad": st.booleans(), "spare": st.integers(0, 5)}),
    attention_case,
    {"numba": lambda b, a, t: _cpu()[2].attention_decode(*a), "cuda": cuda_attention},
    "scores: a dot of Dh terms; softmax: a K-term sum (online, block by block); context: a K-term weighted sum; "
    "all relative to probs @ |v|: (K + Dh + 8) eps")


# masked softmax (the prompt path's; on CUDA the general path is refimpl's own xp lines) --------------------------------

def softmax_case(rng, h, s, past, divisor):
    scores = randn(rng, 2, h, s, past + s, scale=4.0)
    mask2d = np.ones((2, past + s), np.int64)
    mask2d[1, :past] = 0
    mask = ops.causal_mask(mask2d, past, F32)
    ref = ops.softmax(np.maximum(scores / F32(divisor) + mask, ops.mask_min(F32)))
    return (scores, mask, divisor), ref, (past + s + 4) * EPS * np.abs(ref) + 1e-38


SOFTMAX = Op(
    "masked_softmax_", "refimpl.ops.softmax",
    st.fixed_dictionaries({"h": st.integers(1, 8), "s": st.integers(1, 9), "past": st.integers(0, 20),
                           "divisor": st.sampled_from([1.0, 8.0])}),
    softmax_case,
    {"numba": lambda b, a, t: _cpu()[0].masked_softmax_(a[0].copy(), a[1], a[2])},
    "the row sum in another order: K + 4 eps relative (exp within 3 ulp of NumPy's, inside it)")


OPS = [RMS_NORM, LAYER_NORM, ROTARY, ACTIVATION, GATED, LINEAR, GGUF_LINEAR, ATTENTION, SOFTMAX]
BACKENDS = backends()


def device_bound(op, backend, args, bound):
    if not backend.device:
        return bound
    if op is LINEAR:
        return linear_device_bound(args, bound)
    return bound


@pytest.mark.parametrize("backend", BACKENDS, ids=[b.name for b in BACKENDS])
@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
@settings(max_examples=8 if SIMULATED else 25, deadline=None, derandomize=True)
@given(data=st.data())
def test_op(op, backend, data):
    """ours within the row's bound of its refimpl twin, float32 out, on this backend."""
    if backend.kind not in op.run:
        pytest.skip(f"{op.name} has no {backend.kind} kernel (that backend computes it with refimpl's own lines)")
    params = data.draw(op.params, label="params")
    assume(op.applies(backend.kind, params))
    threads = data.draw(backend.threads, label="threads")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    args, ref, bound = op.case(np.random.default_rng(seed), **params)
    ours = np.asarray(backend.host(op.run[backend.kind](backend, args, threads)))
    assert ours.dtype == np.float32, f"{op.name} on {backend.name}: dtype {ours.dtype}"
    assert ours.shape == ref.shape
    bound = device_bound(op, backend, args, bound)
    worst = np.abs(ours.astype(np.float64) - ref) - bound
    assert np.all(worst <= 0), (f"{op.name} on {backend.name} {params}: exceeds its bound by {worst.max():.3g} "
                                f"({op.why})")


# Real sizes (a 7B layer's widths, long caches): too slow for the simulator, run on the CPU and on a device.
LARGE = [(RMS_NORM, dict(rows=3, d=4096, eps=1e-6)), (LAYER_NORM, dict(rows=3, d=4096, affine=True)),
         (ROTARY, dict(b=2, h=4, s=3, half=64, per_row=True)),
         (ATTENTION, dict(heads=(32, 8), head_dim=128, length=1000, batch=2, pad=True, spare=3)),
         (ATTENTION, dict(heads=(8, 2), head_dim=80, length=129, batch=2, pad=False, spare=0)),
         (LINEAR, dict(rows=1, d=4096, o=64, bias=True, fmt="int8")),
         (LINEAR, dict(rows=4, d=4096, o=33, bias=False, fmt="fp16")),
         (GATED, dict(rows=3, d=64, f=1000, act="silu"))]
REAL = [b for b in BACKENDS if b.name != "cuda-sim"]


@pytest.mark.parametrize("backend", REAL, ids=[b.name for b in REAL])
@pytest.mark.parametrize("op, params", LARGE, ids=[f"{op.name}-{i}" for i, (op, _) in enumerate(LARGE)])
def test_op_at_real_sizes(op, params, backend):
    args, ref, bound = op.case(np.random.default_rng(0), **params)
    ours = np.asarray(backend.host(op.run[backend.kind](backend, args, None)))
    assert ours.dtype == np.float32
    assert np.all(np.abs(ours.astype(np.float64) - ref) <= device_bound(op, backend, args, bound)), op.why


@pytest.mark.parametrize("backend", BACKENDS, ids=[b.name for b in BACKENDS])
@pytest.mark.parametrize("act", ACT_NAMES)
def test_every_activation_over_a_sweep_and_its_edges(act, backend):
    """Each name of refimpl.ops.ACTIVATIONS (the ACTIVATION row draws a few) over [-30, 30] and its edges: signed
    zeros, tiny values, the largest finite exp argument."""
    y = np.concatenate([np.linspace(-30, 30, 241, dtype=F32), F32([0.0, -0.0, 1e-30, -1e-30, 88.0])])[None]
    ref = ops.ACTIVATIONS[act](y)
    ours = np.asarray(backend.host(ACTIVATION.run[backend.kind](backend, (y, act), None)))
    assert ours.dtype == np.float32
    assert np.all(np.abs(ours - ref) <= act_bound(y, ref) + 1e-37)


def test_every_op_names_its_twin_and_every_cuda_launcher_has_a_row():
    """The table covers accel.cuda's public launchers (a new kernel needs a row), and each row's twin exists."""
    import importlib

    covered = {"rms_norm", "layer_norm", "apply_rotary_", "activation", "gated_act", "attention_decode",
               "linear_q8"}  # gated_act: the gated_linear row; linear_q8: the linear row's int8 decode
    for module in ("ops", "attention", "linear"):
        source = open(os.path.join(ROOT, "accel", "cuda", module + ".py")).read()
        launchers = {line.split("(")[0][4:] for line in source.splitlines()
                     if line.startswith("def ") and not line.startswith("def _")}
        launchers -= {"upload_array", "product", "linear", "general_attention", "attention"}  # not kernels
        assert launchers <= covered, f"accel/cuda/{module}.py: {launchers - covered} have no row in the op table"
    for op in OPS:
        module, attr = op.twin.rsplit(".", 1)
        assert op.twin.startswith("refimpl.") and op.why
        assert hasattr(importlib.import_module(module), attr), op.twin


if not SIMULATED:
    def test_the_table_under_the_cuda_simulator():
        """This file's cuda rows in a subprocess with NUMBA_ENABLE_CUDASIM=1 (see the module docstring)."""
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                   "-k", "test_op"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        assert "passed" in done.stdout and "failed" not in done.stdout
