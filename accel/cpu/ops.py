"""The Numba twins of refimpl/ops.py: norms, activations, rotary embedding, the masked softmax.

A public function here is named as its refimpl twin, takes what the twin takes and returns what the twin returns
(some also write in place, marked by a trailing underscore or an `out=`); its docstring names the twin
("twin: refimpl.ops.X"), and tests/test_backend_ops.py holds each against it. The `_`-prefixed cores take float32
C-contiguous arrays of one rank each, so each core compiles once. A twin's result differs in the last bits only
where a sum is taken in another order (norm means, softmax sums) and in the last ulps of exp (_exp below,
vectorisable, is not NumPy's expf: <= 3 ulp apart); other elementwise maths (RoPE, activations, masking) is the
same float32 expression, operation for operation, so it matches its twin bit for bit.

Shapes: M rows (B*S tokens), D features, B batch, S new tokens, H heads, Dh head dim, K keys.
"""
from __future__ import annotations

import math

import numpy as np

from ..formats import ACT_CODES
from .jit import FASTMATH, f32_from_bits, njit, prange

F32_MIN = np.float32(np.finfo(np.float32).min)  # transformers' additive mask value and score clamp


ZERO, HALF, ONE = np.float32(0.0), np.float32(0.5), np.float32(1.0)


NEG_INF = np.float32(-np.inf)


SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))


SQRT_2 = math.sqrt(2.0)  # float64: exact GELU takes erf in double, as refimpl.ops.gelu does


LOG_2 = np.float32(math.log(2.0))


# --- scalar helpers (inlined by LLVM into the kernels) ------------------------------------------------------------

# exp(x) in float32 for vectorised loops: Numba's np.exp on a float32 is a call to libm's scalar expf, which stops
# LLVM from vectorising the loop around it. Cephes' expf (Moshier): x = n ln2 + r with ln2 split in two (Cody-Waite),
# |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, times 2^n built from its bit pattern (in two halves, so that
# n = 128 and the subnormal results below 2^-126 need no special case). Measured over 22M float32 inputs in
# [-110, 90]: <= 1.01 ulp from the exact value (NumPy's own SIMD expf: <= 2.54), <= 3 ulp from NumPy's; inf, 0 and
# nan where np.exp gives them. Compiled with "contract" only: reassociating `p * 2^n1 * 2^n2` would overflow.
# Inputs below EXP_LO (masked scores, finfo.min) compute exp(0) and select 0: arithmetic on subnormals costs a
# microcode assist per element (a causal 128-token softmax ran 2.3x slower).
EXP_HI = np.float32(88.72283935546875)  # largest x with a finite exp


EXP_LO = np.float32(-103.97208404541016)  # below: exp rounds to 0


LOG2_E = np.float32(1.4426950408889634)


LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)


EXP_P = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
         np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))


POS_INF = np.float32(np.inf)


@njit(fastmath={"contract"})
def _exp(x):
    """exp(x) for a float32 x, vectorisable.  twin: np.exp on float32 (within 3 ulp, see above)"""
    xc = min(x if x >= EXP_LO else ZERO, EXP_HI)  # below EXP_LO the result is 0: compute exp(0), not a subnormal
    n = np.floor(xc * LOG2_E + HALF)
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = ((((EXP_P[0] * r + EXP_P[1]) * r + EXP_P[2]) * r + EXP_P[3]) * r + EXP_P[4]) * r + EXP_P[5]
    p = p * (r * r) + r + ONE
    n1 = np.int32(n) >> np.int32(1)
    n2 = np.int32(n) - n1
    y = p * f32_from_bits((n1 + np.int32(127)) << np.int32(23)) * f32_from_bits((n2 + np.int32(127)) << np.int32(23))
    y = POS_INF if x > EXP_HI else y
    y = ZERO if x < EXP_LO else y
    return x if x != x else y  # nan stays nan


@njit()
def _act(x, code):
    """One activation of refimpl.ops.ACTIVATIONS on a float32 scalar, the same expression in the same order."""
    if code == 0:
        return x
    if code == 1:  # silu: x / (1 + exp(-x))
        return x / (ONE + _exp(-x))
    if code == 2:  # relu
        return max(x, ZERO)
    if code == 3:  # exact gelu, erf in double as refimpl.ops.gelu
        erf = np.float32(math.erf(np.float64(x) / SQRT_2))
        return HALF * x * (ONE + erf)
    if code == 4:  # gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return HALF * x * (ONE + np.tanh(SQRT_2_OVER_PI * (x + np.float32(0.044715) * (x * x * x))))
    if code == 5:  # gelu_fast
        return HALF * x * (ONE + np.tanh(x * np.float32(0.7978845608) * (ONE + np.float32(0.044715) * x * x)))
    if code == 6:  # quick_gelu: x sigmoid(1.702 x)
        return x * (ONE / (ONE + _exp(-(np.float32(1.702) * x))))
    if code == 7:  # relu2
        r = max(x, ZERO)
        return r * r
    if code == 8:  # relu6
        return min(max(x, ZERO), np.float32(6.0))
    if code == 9:  # mish: x tanh(logaddexp(x, 0)), NumPy's npy_logaddexpf with y = 0
        if x == ZERO:
            softplus = LOG_2
        elif x > ZERO:
            softplus = x + np.log1p(np.exp(-x))
        else:
            softplus = np.log1p(np.exp(x))
        return x * np.tanh(softplus)
    if code == 10:
        return np.tanh(x)
    return ONE / (ONE + _exp(-x))  # 11: sigmoid


@njit(fastmath=FASTMATH)
def _dot(a, b):
    """sum_j a[j] b[j] in float32, vectorised (the order BLAS would also take the liberty to change)."""
    s = ZERO
    for j in range(a.shape[0]):
        s += a[j] * b[j]
    return s


@njit(fastmath=FASTMATH)
def _sum(a):
    s = ZERO
    for j in range(a.shape[0]):
        s += a[j]
    return s


@njit(fastmath=FASTMATH)
def _sum_sq(a):
    s = ZERO
    for j in range(a.shape[0]):
        s += a[j] * a[j]
    return s


# --- norms ---------------------------------------------------------------------------------------------------------

@njit()
def _rms_norm_rows(x, weight, eps, out):
    """x [M, D] -> out [M, D]: w * (x * (1 / sqrt(mean(x^2) + eps)))."""
    M, D = x.shape
    eps32 = np.float32(eps)
    for m in range(M):
        variance = _sum_sq(x[m]) / np.float32(D)
        inv = ONE / np.sqrt(variance + eps32)
        for j in range(D):
            out[m, j] = weight[j] * (x[m, j] * inv)


def rms_norm(x, weight, eps, out=None):
    """y = w * x / sqrt(mean(x^2) + eps) over the last axis.  twin: refimpl.ops.rms_norm"""
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    result = np.empty_like(x2) if out is None else out.reshape(x2.shape)
    _rms_norm_rows(x2, weight, float(eps), result)
    return result.reshape(x.shape)


@njit()
def _layer_norm_rows(x, weight, bias, eps, out):
    """x [M, D] -> out [M, D]: (x - mean) / sqrt(var + eps) * w + b (w = 1, b = 0 when the norm has none)."""
    M, D = x.shape
    eps32 = np.float32(eps)
    n = np.float32(D)
    centered = np.empty(D, np.float32)
    for m in range(M):
        mean = _sum(x[m]) / n
        for j in range(D):
            centered[j] = x[m, j] - mean
        variance = _sum_sq(centered) / n
        root = np.sqrt(variance + eps32)
        for j in range(D):
            out[m, j] = centered[j] / root * weight[j] + bias[j]


def layer_norm(x, weight=None, bias=None, eps=1e-5, out=None):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis.  twin: refimpl.ops.layer_norm

    A missing weight is passed as ones and a missing bias as zeros: y * 1 and y + 0 are exact, so one compiled
    kernel serves affine and non-affine norms with the twin's numbers.
    """
    D = x.shape[-1]
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, D)
    w = np.ones(D, np.float32) if weight is None else weight
    b = np.zeros(D, np.float32) if bias is None else bias
    result = np.empty_like(x2) if out is None else out.reshape(x2.shape)
    _layer_norm_rows(x2, w, b, float(eps), result)
    return result.reshape(x.shape)


# --- activations ---------------------------------------------------------------------------------------------------

@njit()
def _activation_rows(x, act, out):
    M, N = x.shape
    for m in range(M):
        for j in range(N):
            out[m, j] = _act(x[m, j], act)


def activation(x, name):
    """refimpl.ops.ACTIVATIONS[name](x) elementwise.  twin: refimpl.ops.ACTIVATIONS (silu, gelu, relu, ...)"""
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(x2)
    _activation_rows(x2, ACT_CODES[name], out)
    return out.reshape(x.shape)


# --- rotary position embedding -------------------------------------------------------------------------------------

@njit()
def _rotate_head(x, cos, sin):
    """In place on one head x [Dh]: x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]."""
    half = x.shape[0] // 2
    for j in range(half):
        x1 = x[j]
        x2 = x[j + half]
        x[j] = x1 * cos[j] + (-x2) * sin[j]
        x[j + half] = x2 * cos[j + half] + x1 * sin[j + half]


@njit()
def _rotary_heads(x, n_heads, cos, sin):
    """In place on x [B, S, NH, Dh], heads 0..n_heads-1, with cos/sin [1 or B, S, Dh]."""
    B, S = x.shape[0], x.shape[1]
    for b in range(B):
        cb = b if cos.shape[0] > 1 else 0
        for s in range(S):
            for h in range(n_heads):
                _rotate_head(x[b, s, h], cos[cb, s], sin[cb, s])


def apply_rotary_(x, n_heads, cos, sin):
    """RoPE in place on the first n_heads heads of x [B, S, NH, Dh] (q then k heads of a fused qkv row).

    twin: refimpl.ops.apply_rotary (x * cos + rotate_half(x) * sin), on the layout before the head transpose.
    """
    _rotary_heads(x, int(n_heads), np.ascontiguousarray(cos), np.ascontiguousarray(sin))
    return x


def apply_rotary(x, cos, sin):
    """x [B, H, S, Dh] -> x * cos + rotate_half(x) * sin.  twin: refimpl.ops.apply_rotary (same signature)"""
    y = np.array(x.transpose(0, 2, 1, 3), dtype=np.float32, order="C", copy=True)  # -> [B, S, H, Dh], a copy
    apply_rotary_(y, y.shape[2], cos, sin)
    return y.transpose(0, 2, 1, 3)


# --- softmax -------------------------------------------------------------------------------------------------------

@njit(fastmath={"reassoc", "nsz"})
def _softmax_row_(row, mask, divisor):
    """One row in place: v = max(row / divisor + mask, finfo.min); exp(v - max v) / sum. "reassoc" lets LLVM take
    the max and the sum in SIMD lanes; the divisions stay IEEE divisions (no "arcp"), as NumPy's."""
    top = NEG_INF
    for k in range(row.shape[0]):
        v = row[k] / divisor + mask[k]
        v = F32_MIN if v < F32_MIN else v  # np.maximum: nan stays nan
        row[k] = v
        top = v if v > top else top
    total = ZERO
    for k in range(row.shape[0]):
        e = _exp(row[k] - top)
        row[k] = e
        total += e
    for k in range(row.shape[0]):
        row[k] = row[k] / total


@njit(parallel=True)
def _masked_softmax(scores, mask, divisor):
    """scores [B, H, S, K] in place, mask [B, 1, S, K]: every (b, h) is a task."""
    B, H, S = scores.shape[0], scores.shape[1], scores.shape[2]
    for task in prange(B * H):
        b, h = task // H, task % H
        for s in range(S):
            _softmax_row_(scores[b, h, s], mask[b, 0, s], divisor)


@njit()
def _masked_softmax_serial(scores, mask, divisor):
    """_masked_softmax on the calling thread only."""
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for s in range(scores.shape[2]):
                _softmax_row_(scores[b, h, s], mask[b, 0, s], divisor)


def masked_softmax_(scores, mask, divisor, parallel=True):
    """probs = softmax(max(scores / divisor + mask, finfo.min)), in place on scores [B, H, S, K] (mask [B, 1, S, K]).

    twin: the scores -> probs lines of refimpl.llama.attention (divisor sqrt(Dh); OPT passes 1, its q is scaled)
    and refimpl.ops.softmax. Scores are clamped at finfo.min as Open-Llama and OPT do; for Llama the clamp
    changes nothing unless a score overflows to -inf. One pass per row over what NumPy does in eight, with the
    vectorised _exp (on the 110M shape, a 128-token prompt: ~0.9 ms a layer in NumPy). parallel=False keeps to
    the calling thread: between products of a BLAS with its own spinning threads (OpenBLAS), a Numba parallel
    region fights them (accel.cpu.blas.shares_numba_threads says when it does not).
    """
    kernel = _masked_softmax if parallel else _masked_softmax_serial
    kernel(scores, np.ascontiguousarray(mask, dtype=np.float32), np.float32(divisor))
    return scores
