"""Numba CPU kernels, each the fast twin of one refimpl function (its docstring says which: "twin: refimpl.ops.X").

A public function here takes what its twin takes and returns what its twin returns (some also write in place,
marked by a trailing underscore or an `out=`). The `_`-prefixed cores they call take float32 C-contiguous arrays
of one rank each, so each core compiles once. A twin's result differs in the last bits only where a sum is taken
in another order (norm means, softmax sums, dot products) and in the last ulps of exp (_exp below, vectorisable, is
not NumPy's expf: <= 3 ulp apart); other elementwise maths (RoPE, activations, masking, the epilogues) is the same
float32 expression, operation for operation, so it matches its twin bit for bit.

Shapes: M rows (B*S tokens), D features in, O features out, F intermediate, B batch, S new tokens, H query heads,
Hkv key/value heads, R = H / Hkv query heads per kv head, NH heads in a fused qkv row, Dh head dim,
K keys (cached + new), C cache capacity.
"""
from __future__ import annotations

import math

import numpy as np

from .jit import FASTMATH, f32_from_bits, njit, prange

F32_MIN = np.float32(np.finfo(np.float32).min)  # transformers' additive mask value and score clamp
ZERO, HALF, ONE = np.float32(0.0), np.float32(0.5), np.float32(1.0)
NEG_INF = np.float32(-np.inf)
SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
SQRT_2 = math.sqrt(2.0)  # float64: exact GELU takes erf in double, as refimpl.ops.gelu does
LOG_2 = np.float32(math.log(2.0))

# transformers' ACT2FN names -> the code the kernels switch on (the same table as refimpl.ops.ACTIVATIONS)
ACT_CODES = {"linear": 0, "silu": 1, "swish": 1, "relu": 2, "gelu": 3, "gelu_new": 4, "gelu_pytorch_tanh": 4,
             "gelu_fast": 5, "quick_gelu": 6, "relu2": 7, "relu6": 8, "mish": 9, "tanh": 10, "sigmoid": 11}

# What a linear kernel does with y = x . w[o] + b[o]  (for GATED, u is the same for row o + F)
STORE, ADD, ACT, GATED = 0, 1, 2, 3  # out = y | out += y (residual) | out = act(y) | out = act(y) * u


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


@njit()
def _finish(out, m, o, y, u, act, epilogue):
    """Write one linear output y (and u, the paired up-projection for GATED) as the epilogue says."""
    if epilogue == GATED:
        out[m, o] = _act(y, act) * u
    elif epilogue == ADD:
        out[m, o] += y
    elif epilogue == ACT:
        out[m, o] = _act(y, act)
    else:
        out[m, o] = y


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


# --- activations and the linear epilogues --------------------------------------------------------------------------

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


# The matrix-vector kernels read four weight rows at once, from four distant places in the matrix (task t reads rows
# t, t+q, t+2q, t+3q with q = O/4; for GATED, gate rows t, t+q and the up rows F+t, F+t+q). Four concurrent streams
# per core keep more cache-line fills in flight than one: on the 2-core bench machine a 110M-shape decode pass
# streams at ~23 GB/s this way against ~17 GB/s row by row (bench/bench_decode.py; the ceiling is DRAM bandwidth).

@njit()
def _task_rows(t, q, O, gated):
    """The four weight rows task t reads (clamped to the last row; a clamped duplicate is computed, not stored)."""
    if gated:
        r1 = min(t + q, O - 1)
        return t, r1, O + t, O + r1
    return t, min(t + q, O - 1), min(t + 2 * q, O - 1), min(t + 3 * q, O - 1)


@njit()
def _task_stride(O, gated):
    """q: outputs per stream (two outputs a task when gated, each needing a gate and an up row; else four)."""
    return (O + 1) // 2 if gated else (O + 3) // 4


@njit()
def _finish_task(out, m, t, q, a0, a1, a2, a3, bias, r0, r1, r2, r3, act, epilogue):
    """Add the biases of the task's rows and write its outputs (t, t+q, ...) that exist."""
    O = out.shape[1]
    if bias.shape[0] > 0:
        a0 += bias[r0]
        a1 += bias[r1]
        a2 += bias[r2]
        a3 += bias[r3]
    if epilogue == GATED:
        _finish(out, m, t, a0, a2, act, epilogue)
        if t + q < O:
            _finish(out, m, t + q, a1, a3, act, epilogue)
        return
    _finish(out, m, t, a0, ZERO, act, epilogue)
    if t + q < O:
        _finish(out, m, t + q, a1, ZERO, act, epilogue)
    if t + 2 * q < O:
        _finish(out, m, t + 2 * q, a2, ZERO, act, epilogue)
    if t + 3 * q < O:
        _finish(out, m, t + 3 * q, a3, ZERO, act, epilogue)


@njit(fastmath=FASTMATH)
def _dot4(w0, w1, w2, w3, x):
    """(w0 . x, w1 . x, w2 . x, w3 . x) in one pass over x."""
    s0 = s1 = s2 = s3 = ZERO
    for j in range(x.shape[0]):
        xj = x[j]
        s0 += w0[j] * xj
        s1 += w1[j] * xj
        s2 += w2[j] * xj
        s3 += w3[j] * xj
    return s0, s1, s2, s3


@njit(parallel=True, fastmath=FASTMATH)
def _linear_f32(x, w, bias, act, epilogue, out):
    """out[m, o] <- epilogue(x[m] . w[o] + b[o]) for a few rows m: each weight row is read from memory once.

    One parallel loop per kind of epilogue, each writing its outputs directly: the shared _finish_task dispatch
    (as the int8 and half kernels use) streamed ~7% slower here, bench machine, 110M decode weights.
    """
    O = out.shape[1]
    M = x.shape[0]
    has_bias = bias.shape[0] > 0
    if epilogue == GATED:  # rows r0, r1 of the gate, u0, u1 the matching rows of up (F = O further on)
        q = _task_stride(O, True)
        for task in prange(q):
            t = np.int64(task)
            r0, r1, u0, u1 = _task_rows(t, q, O, True)
            for m in range(M):
                g0, g1, a0, a1 = _dot4(w[r0], w[r1], w[u0], w[u1], x[m])
                if has_bias:
                    g0, g1, a0, a1 = g0 + bias[r0], g1 + bias[r1], a0 + bias[u0], a1 + bias[u1]
                out[m, t] = _act(g0, act) * a0
                if t + q < O:
                    out[m, t + q] = _act(g1, act) * a1
        return
    q = _task_stride(O, False)
    for task in prange(q):
        t = np.int64(task)
        r0, r1, r2, r3 = _task_rows(t, q, O, False)
        for m in range(M):
            a0, a1, a2, a3 = _dot4(w[r0], w[r1], w[r2], w[r3], x[m])
            if has_bias:
                a0, a1, a2, a3 = a0 + bias[r0], a1 + bias[r1], a2 + bias[r2], a3 + bias[r3]
            if epilogue == ACT:
                a0, a1, a2, a3 = _act(a0, act), _act(a1, act), _act(a2, act), _act(a3, act)
            if epilogue == ADD:  # x += y: the residual add
                a0, a1, a2, a3 = out[m, t] + a0, out[m, r1] + a1, out[m, r2] + a2, out[m, r3] + a3
            out[m, t] = a0  # rows past O were clamped to O - 1: only the task that owns a row writes it
            if t + q < O:
                out[m, t + q] = a1
            if t + 2 * q < O:
                out[m, t + 2 * q] = a2
            if t + 3 * q < O:
                out[m, t + 3 * q] = a3


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


# --- softmax and attention -----------------------------------------------------------------------------------------

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
    region fights them (accel.blas.shares_numba_threads says when it does not).
    """
    kernel = _masked_softmax if parallel else _masked_softmax_serial
    kernel(scores, np.ascontiguousarray(mask, dtype=np.float32), np.float32(divisor))
    return scores


ATTENTION_BLOCK = 64  # keys scored per block of the online softmax


@njit()
def _attend_group(q, b, g, R, k_cache, v_cache, length, bias, divisor, out):
    """Query heads g*R .. g*R+R-1 of row b (q [B, >= H, Dh]) against kv head g's first `length` cached positions.

    Online softmax over blocks of keys: scores of a block, its max, rescale the running sum and context, add.
    """
    Dh = q.shape[2]
    has_bias = bias.shape[1] > 0
    running_max = np.full(R, NEG_INF, np.float32)
    running_sum = np.zeros(R, np.float32)
    acc = np.zeros((R, Dh), np.float32)
    block = np.empty((R, ATTENTION_BLOCK), np.float32)
    for start in range(0, length, ATTENTION_BLOCK):
        stop = min(start + ATTENTION_BLOCK, length)
        for r in range(R):
            h = g * R + r
            block_max = NEG_INF
            for t in range(start, stop):
                s = _dot(q[b, h], k_cache[b, g, t]) / divisor
                if has_bias:
                    s = s + bias[b, t]
                s = max(s, F32_MIN)
                block[r, t - start] = s
                block_max = max(block_max, s)
            new_max = max(running_max[r], block_max)
            rescale = np.exp(running_max[r] - new_max)  # exp(-inf) = 0 on the first block
            running_sum[r] *= rescale
            for d in range(Dh):
                acc[r, d] *= rescale
            for t in range(start, stop):
                p = np.exp(block[r, t - start] - new_max)
                running_sum[r] += p
                for d in range(Dh):
                    acc[r, d] += p * v_cache[b, g, t, d]
            running_max[r] = new_max
    for r in range(R):
        for d in range(Dh):
            out[b, g * R + r, d] = acc[r, d] / running_sum[r]


@njit(parallel=True)
def _attention_decode(q, k_cache, v_cache, length, bias, divisor, out):
    """q [B, H, Dh] against the cache [B, Hkv, C, Dh]; bias [B, length] additive (or [B, 0]: none); out [B, H, Dh].

    Work is split over (batch row, kv head); the R query heads of a kv head share each key and value load.
    """
    B, H = q.shape[0], q.shape[1]
    Hkv = k_cache.shape[1]
    for task in prange(B * Hkv):
        _attend_group(q, task // Hkv, task % Hkv, H // Hkv, k_cache, v_cache, length, bias, divisor, out)


@njit(parallel=True)
def _decode_step(qkv, H, Hkv, rotate, cos, sin, k_cache, v_cache, T, bias, divisor, out):
    """One new position per row, fused: RoPE on its q and k heads (when rotate), k and v written into the cache at
    position T, then attention over T + 1 keys. qkv [B, NH, Dh] (q heads, k heads, v heads), cos/sin [1 or B, 1, Dh].
    """
    B = qkv.shape[0]
    R = H // Hkv
    for task in prange(B * Hkv):
        b = task // Hkv
        g = task % Hkv
        cb = b if cos.shape[0] > 1 else 0
        if rotate:
            for h in range(g * R, g * R + R):
                _rotate_head(qkv[b, h], cos[cb, 0], sin[cb, 0])
            _rotate_head(qkv[b, H + g], cos[cb, 0], sin[cb, 0])
        k_cache[b, g, T] = qkv[b, H + g]
        v_cache[b, g, T] = qkv[b, H + Hkv + g]
        _attend_group(qkv, b, g, R, k_cache, v_cache, T + 1, bias, divisor, out)


def attention_decode(q, k_cache, v_cache, length, bias=None, divisor=1.0, out=None):
    """softmax(q k^T / divisor + bias) v for one new position per row, read straight from the KV cache.

    q [B, H, Dh]; k_cache, v_cache [B, Hkv, C, Dh] of which the first `length` positions are valid; bias [B, length]
    (0 or finfo.min, from the attention mask) or None. Returns [B, H, Dh].
    twin: refimpl.llama.attention from `scores = ...` to `probs @ v` for S = 1 (repeat_kv, the divide after the
    product, the mask, Open-Llama/OPT's clamp, softmax), and refimpl.opt.attention with divisor 1.
    Differs in rounding only: the softmax is accumulated block by block (online) instead of over the whole row.
    """
    B = q.shape[0]
    bias = np.zeros((B, 0), np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    result = np.empty(q.shape, np.float32) if out is None else out
    _attention_decode(q, k_cache, v_cache, int(length), bias, np.float32(divisor), result)
    return result


NO_ROTATION = np.zeros((1, 1, 1), np.float32)


def decode_step_(qkv, H, Hkv, cos, sin, k_cache, v_cache, T, bias=None, divisor=1.0, out=None):
    """RoPE, cache append and attention for one new position per row, in one parallel kernel (the decode path).

    qkv [B, NH, Dh] holds the row's q, k and v heads (k and v rotated/written in place); cos, sin [1 or B, 1, Dh] or
    None (OPT: no rotation); k_cache, v_cache [B, Hkv, C, Dh] with T positions written. Returns context [B, H, Dh].
    twin: refimpl.llama.attention for S = 1 from apply_rotary on (the other lines as attention_decode).
    """
    B = qkv.shape[0]
    bias = np.zeros((B, 0), np.float32) if bias is None else bias
    result = np.empty((B, H, qkv.shape[2]), np.float32) if out is None else out
    rotate = cos is not None
    _decode_step(qkv, int(H), int(Hkv), rotate, cos if rotate else NO_ROTATION, sin if rotate else NO_ROTATION,
                 k_cache, v_cache, int(T), bias, np.float32(divisor), result)
    return result
