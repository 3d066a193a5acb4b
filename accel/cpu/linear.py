"""Weights in a storage format and the linear kernels that read them (twin: refimpl.ops.linear).

A `Weight` is a matrix [O, D] that stands in for the float32 array refimpl keeps in params: `x @ w.T` runs accel's
linear kernel and `w[ids]` returns float32 rows (embedding lookup), so refimpl's own head code (lm_logits, OPT's
lm_head) runs unchanged on it. Everything computes in float32; only storage differs (accel.formats lists the
formats: fp32, fp16, bf16, int8 as Q8_0 blocks, and a GGUF file's own quantized blocks).

Few rows (decode: M <= SMALL_M) go to a Numba matrix-vector kernel that widens or dequantises each row in
registers while it streams the weights once; more rows (a prompt) are dequantised a tile at a time into a float32
scratch and multiplied by BLAS, which wins there (bench/bench_decode.py measures both). The kernels write through
an epilogue (accel.formats: STORE, ADD into the residual, ACT, GATED = act(gate) * up), so a product and what
follows it are one pass.
"""
from __future__ import annotations

import threading

import numpy as np

from refimpl import ConfigError
from refimpl.ops import ACTIVATIONS

from ..formats import (ACT, ACT_CODES, ADD, GATED, GGUF_BLOCKS, QBLOCK, STORE, STORAGE, dequantize_q8_0,
                       half_bits_to_f32, quantize_q8_0, to_bf16_bits, to_fp16_bits)
from . import gguf_blocks
from .blas import matmul_nt
from .jit import FASTMATH, f32_from_bits, f32_from_half_bits, njit, prange
from .ops import ONE, ZERO, _act, _exp

CONVERT_ELEMENTS = 1 << 22  # weights converted at a time when packing (16 MiB of float32)


SMALL_M = 4  # rows up to which the matrix-vector kernels are used (above: BLAS on a float32 matrix)


NO_BIAS = np.zeros(0, np.float32)


EXACT_ACTS = (0, 2, 7, 8)  # linear, relu, relu2, relu6: no exp / tanh, Numba's epilogue is refimpl's bits


# activations the BLAS path's Numba epilogue computes: the exact ones, and silu and sigmoid through the vectorised
# accel.cpu.ops._exp (a few ulp from NumPy's exp); the others go through refimpl's NumPy expressions
NUMBA_EPILOGUE_ACTS = EXACT_ACTS + (1, 11)


ACT_FUNCTIONS = {code: ACTIVATIONS[name] for name, code in ACT_CODES.items()}  # kernel code -> refimpl's function


# --- the matrix-vector kernels: rows handed out in tasks, outputs written through the epilogue ----------------------

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


@njit(fastmath=FASTMATH)
def _dot2_q8(q0, q1, d0, d1, x):
    """(sum_j q_r[j] x[j] d_r[j // 32] for r = 0, 1): two int8 rows widened in registers, never written out.

    One flat loop with the block scale looked up per element (j >> 5): LLVM vectorises it without a horizontal
    sum per block, ~5x faster than a nested block loop. int8 is compute-bound, not memory-bound: two rows a pass
    ran fastest (one: fewer loads in flight; four: register pressure), bench machine, 110M shape.
    """
    s0 = s1 = ZERO
    for j in range(x.shape[0]):
        xj = x[j]
        b = j >> 5
        s0 += np.float32(q0[j]) * (xj * d0[b])
        s1 += np.float32(q1[j]) * (xj * d1[b])
    return s0, s1


@njit(parallel=True, fastmath=FASTMATH)
def _linear_q8(x, q, d, bias, act, epilogue, out):
    """out[m, o] <- epilogue(x[m] . dequant(q[o]) + b[o]) for a few rows m.  twin: refimpl.ops.linear"""
    O = out.shape[1]
    gated = epilogue == GATED
    stride = _task_stride(O, gated)
    for task in prange(stride):
        t = np.int64(task)
        r0, r1, r2, r3 = _task_rows(t, stride, O, gated)
        for m in range(x.shape[0]):
            a0, a1 = _dot2_q8(q[r0], q[r1], d[r0], d[r1], x[m])
            a2, a3 = _dot2_q8(q[r2], q[r3], d[r2], d[r3], x[m])
            _finish_task(out, m, t, stride, a0, a1, a2, a3, bias, r0, r1, r2, r3, act, epilogue)


@njit()
def _widen_half(bits, bf16, out):
    """One row of uint16 half / bfloat16 bit patterns -> float32, exactly (F16C for fp16, a shift for bf16)."""
    if bf16:
        for j in range(bits.shape[0]):
            out[j] = f32_from_bits(np.uint32(bits[j]) << np.uint32(16))
    else:
        for j in range(bits.shape[0]):
            out[j] = f32_from_half_bits(bits[j])


@njit(fastmath=FASTMATH)
def _dot4_half(b0, b1, b2, b3, bf16, x):
    """(w_r . x for r = 0..3) with w_r the fp16 / bf16 rows b_r widened in registers, never written out: fp16 by
    F16C's vcvtph2ps (jit.f32_from_half_bits), bf16 by a 16-bit shift. One flat loop each, as _dot2_q8."""
    s0 = s1 = s2 = s3 = ZERO
    if bf16:
        for j in range(x.shape[0]):
            xj = x[j]
            s0 += f32_from_bits(np.uint32(b0[j]) << np.uint32(16)) * xj
            s1 += f32_from_bits(np.uint32(b1[j]) << np.uint32(16)) * xj
            s2 += f32_from_bits(np.uint32(b2[j]) << np.uint32(16)) * xj
            s3 += f32_from_bits(np.uint32(b3[j]) << np.uint32(16)) * xj
    else:
        for j in range(x.shape[0]):
            xj = x[j]
            s0 += f32_from_half_bits(b0[j]) * xj
            s1 += f32_from_half_bits(b1[j]) * xj
            s2 += f32_from_half_bits(b2[j]) * xj
            s3 += f32_from_half_bits(b3[j]) * xj
    return s0, s1, s2, s3


@njit(parallel=True, fastmath=FASTMATH)
def _linear_half(x, bits, bf16, bias, act, epilogue, out):
    """out[m, o] <- epilogue(x[m] . float32(bits[o]) + b[o]) for a few rows m.  twin: refimpl.ops.linear

    Four rows a task, widened in registers while their bits stream in (a row written to a scratch and read back
    cost half the bandwidth on a 7B model: 1.27 s a token where 0.56 s is the limit)."""
    O = out.shape[1]
    gated = epilogue == GATED
    stride = _task_stride(O, gated)
    for task in prange(stride):
        t = np.int64(task)
        r0, r1, r2, r3 = _task_rows(t, stride, O, gated)
        for m in range(x.shape[0]):
            a0, a1, a2, a3 = _dot4_half(bits[r0], bits[r1], bits[r2], bits[r3], bf16, x[m])
            _finish_task(out, m, t, stride, a0, a1, a2, a3, bias, r0, r1, r2, r3, act, epilogue)


# Serial: dequantising feeds a BLAS product (many rows), and Numba's OpenMP threads spinning after a parallel region
# slow BLAS's threads down more than the second thread would gain here.
@njit()
def _dequantize_q8(q, d, out):
    O, D = q.shape
    for o in range(O):
        for j in range(D):
            out[o, j] = np.float32(q[o, j]) * d[o, j // QBLOCK]


@njit()
def _dequantize_half(bits, bf16, out):
    O, D = bits.shape
    for o in range(O):
        _widen_half(bits[o], bf16, out[o])


def writable(a):
    """a as a C-contiguous, writable float32 array (copied when it is a read-only memory map): kernels are compiled
    for writable arrays only, so read-only ones would cost a second compilation of each."""
    a = np.asarray(a)
    if a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=np.float32, order="C", copy=True)


# --- the weight object ---------------------------------------------------------------------------------------------

class Weight:
    """A matrix [O, D] in one storage format, computed with in float32 (see the module docstring).

    data: float32 [O, D] (fp32), uint16 [O, D] (fp16, bf16 bit patterns), int8 [O, D] (int8), or for a GGUF block
    type (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K) the file's rows of blocks, uint8 [O, bytes a row] (a view of the
    memory-mapped file); scales: float32 [O, ceil(D/32)] for int8, else None.
    """

    __array_ufunc__ = None  # `x @ w.T` defers to w.T.__rmatmul__ instead of converting w to an array
    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, fmt, data, scales=None, columns=None):
        if fmt not in STORAGE:
            raise ConfigError(f"weights={fmt!r}: choose one of {', '.join(STORAGE)}")
        self.format = fmt
        self.data = data
        self.scales = scales
        self.shape = (data.shape[0], columns) if fmt in GGUF_BLOCKS else tuple(data.shape)

    @classmethod
    def from_gguf(cls, w, name="weight"):
        """A matrix of a GGUF file as the file stores it: block types as their rows of blocks (Q/K rows gathered into
        the model's order: a copy of those two matrices only), F16 / BF16 / F32 as fp16 / bf16 / fp32 (exact), other
        block types (Q4_1, Q2_K, ...) dequantized and re-quantized to int8."""
        blocks = getattr(w, "blocks", None)
        kind = getattr(w, "stored_dtype", "F32")
        if blocks is not None and kind in GGUF_BLOCKS:
            raw, order = blocks()
            raw = np.ascontiguousarray(raw if order is None else raw[order])
            gguf_blocks.row_bytes(kind, w.shape[1])  # the row length is whole blocks (the reader checked it too)
            return cls(kind, raw, columns=w.shape[1])
        fmt = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp32"}.get(kind, "int8")
        return cls.from_array(w, fmt, name)

    @classmethod
    def from_array(cls, w, fmt, name="weight"):
        """float32 [O, D] (an array or refimpl's StoredMatrix) -> Weight in `fmt` (fp32 keeps a writable float32
        array as it is). Other formats convert CONVERT_ELEMENTS at a time into the packed arrays, so converting a
        7B embedding needs its packed size plus a few MB, not the converters' float32 / uint64 temporaries."""
        if fmt == "fp32":
            return cls(fmt, writable(w))
        if fmt == "gguf":
            return cls.from_gguf(w, name)
        if fmt not in STORAGE:
            raise ConfigError(f"weights={fmt!r}: choose one of {', '.join(STORAGE)}")
        O, D = w.shape
        data = np.empty((O, D), np.int8 if fmt == "int8" else np.uint16)
        scales = np.empty((O, -(-D // QBLOCK)), np.float32) if fmt == "int8" else None
        step = max(1, CONVERT_ELEMENTS // max(D, 1))
        for start in range(0, O, step):
            rows = np.asarray(w[start:start + step], dtype=np.float32)  # [<= step, D], widened here when stored
            if fmt == "int8":
                data[start:start + step], scales[start:start + step] = quantize_q8_0(rows)
            elif fmt == "bf16":
                data[start:start + step] = to_bf16_bits(rows)
            else:
                data[start:start + step] = to_fp16_bits(rows, name)
        return cls(fmt, data, scales)

    @property
    def nbytes(self):
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)

    @property
    def T(self):
        return _Transposed(self)

    def dequantize(self, out=None):
        """The float32 matrix [O, D] (a view for fp32; into `out` when given)."""
        if self.format == "fp32":
            if out is None:
                return self.data
            out[...] = self.data
            return out
        out = np.empty(self.shape, np.float32) if out is None else out
        if self.format == "int8":
            _dequantize_q8(self.data, self.scales, out)
        elif self.format in GGUF_BLOCKS:
            gguf_blocks.dequantize_rows(self.format, self.data, out)
        else:
            _dequantize_half(self.data, self.format == "bf16", out)
        return out

    def band(self, start, stop):
        """Rows [start, stop) as a Weight of the same format (views, no copy)."""
        return Weight(self.format, self.data[start:stop], None if self.scales is None else self.scales[start:stop],
                      self.shape[1])

    def rows(self, ids):
        """float32 rows [n, D] for integer ids [n]: the embedding lookup of refimpl's `params["embed_tokens"][ids]`."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.format == "fp32":
            return self.data[ids]
        if self.format == "int8":
            return dequantize_q8_0(self.data[ids], self.scales[ids])
        if self.format in GGUF_BLOCKS:
            return gguf_blocks.dequantize_rows(self.format, np.ascontiguousarray(self.data[ids]))
        return half_bits_to_f32(self.data[ids], self.format == "bf16")

    def __getitem__(self, index):
        if isinstance(index, slice):  # a band of rows (refimpl's pretraining_tp vocab chunks)
            start, stop, _ = index.indices(self.shape[0])
            return self.band(start, stop)
        ids = np.asarray(index)
        return self.rows(ids.reshape(-1)).reshape(*ids.shape, self.shape[1])

    def __repr__(self):
        return f"Weight({self.format}, {list(self.shape)}, {self.nbytes / 1e6:.1f} MB)"


class _Transposed:
    """w.T of a Weight: only `x @ w.T` is defined on it, which is accel's linear."""

    __array_ufunc__ = None

    def __init__(self, weight):
        self.weight = weight

    def astype(self, dtype, copy=True):
        """Kernels compute in float32 whatever the storage: widening to float32 is what they already do."""
        if np.dtype(dtype) != np.float32:
            raise TypeError(f"accel weights compute in float32, not {np.dtype(dtype).name}")
        return self

    def __rmatmul__(self, x):
        return linear(x, self.weight)


# --- the linear dispatch -------------------------------------------------------------------------------------------

_scratch = threading.local()


TILE_ELEMENTS = 1 << 20  # a prompt dequantizes this many weights at a time (4 MiB of float32, cache-resident)


def _tile_scratch(rows, cols):
    """A per-thread float32 [rows, cols] scratch for one dequantized tile of weights, reused between calls."""
    flat = getattr(_scratch, "tile", None)
    if flat is None or flat.size < rows * cols:
        flat = _scratch.tile = np.empty(rows * cols, np.float32)
    return flat[:rows * cols].reshape(rows, cols)


def _matmul_tiles(x, weight, y):
    """y [M, O] <- x [M, D] @ W^T, W dequantized TILE_ELEMENTS at a time (a band of rows) into a small scratch and
    multiplied by BLAS into the matching band of columns of y: never a float32 copy of the whole matrix, and the
    dequantization is amortised over the M rows of the prompt."""
    if weight.format == "fp32":
        return matmul_nt(x, weight.data, y)
    O, D = weight.shape
    step = max(16, (TILE_ELEMENTS // max(D, 1)) // 16 * 16)
    for start in range(0, O, step):
        stop = min(start + step, O)
        tile = weight.band(start, stop).dequantize(out=_tile_scratch(stop - start, D))
        matmul_nt(x, tile, y[:, start:stop])
    return y


def linear_into(x, weight, bias, act, epilogue, out):
    """out [M, O] <- epilogue(x [M, D] @ W^T + b), the epilogue one of accel.formats' STORE, ADD, ACT, GATED.

    For GATED, W holds gate then up rows ([2F, D]) and out is [M, F]: act(gate) * up.
    """
    bias = NO_BIAS if bias is None else bias
    M = x.shape[0]
    if isinstance(weight, StackedWeight):  # a GGUF file's q, k, v (gate, up) kept as the file stores each
        return weight.linear_into(x, bias, act, epilogue, out)
    if M <= SMALL_M:
        if weight.format == "fp32":
            _linear_f32(x, weight.data, bias, act, epilogue, out)
        elif weight.format == "int8":
            _linear_q8(x, weight.data, weight.scales, bias, act, epilogue, out)
        elif weight.format in GGUF_BLOCKS:
            _linear_gguf(x, _block_sums(weight.format, x), weight.data, gguf_blocks.kind_of(weight.format), bias,
                         act, epilogue, out)
        else:
            _linear_half(x, weight.data, weight.format == "bf16", bias, act, epilogue, out)
        return out
    # many rows: GEMMs (accel.cpu.blas: MKL when installed, else NumPy's BLAS) over tiles of W, then the epilogue
    if epilogue == STORE and bias.shape[0] == 0:
        return _matmul_tiles(x, weight, out)
    return _epilogue(_matmul_tiles(x, weight, _scratch_rows(M, weight.shape[0])), bias, act, epilogue, out)


def _epilogue(y, bias, act, epilogue, out):
    """out <- epilogue(y + b) for a product y [M, O] already in a scratch (the BLAS path's second pass)."""
    if act not in NUMBA_EPILOGUE_ACTS and epilogue in (ACT, GATED):
        # tanh / erf / log1p activations: refimpl's own vectorised NumPy expressions (Numba calls scalar libm)
        if bias.shape[0]:
            y += bias
        if epilogue == ACT:
            out[...] = ACT_FUNCTIONS[act](y)
        else:
            F = out.shape[1]
            out[...] = ACT_FUNCTIONS[act](y[:, :F]) * y[:, F:]
        return out
    _epilogue_rows(y, bias, act, epilogue, out)  # y + b, then stored / added to the residual / activated / gated
    return out


def _scratch_rows(M, O):
    """A per-thread float32 [M, O] scratch for GEMM results, reused between calls of the same shape."""
    cache = getattr(_scratch, "rows", None)
    if cache is None:
        cache = _scratch.rows = {}
    buffer = cache.get((M, O))
    if buffer is None:
        if len(cache) > 16:  # prompts of many lengths: keep the cache small
            cache.clear()
        buffer = cache[M, O] = np.empty((M, O), np.float32)
    return buffer


@njit()
def _epilogue_rows(y, bias, act, epilogue, out):
    """out <- epilogue(y + b) (STORE, ADD, ACT or GATED with an activation of NUMBA_EPILOGUE_ACTS), refimpl's float32
    operations in order; for GATED, y is [M, 2F] (gate, up) and out [M, F].

    One tight loop per case (a per-element switch costs ~30x). Serial, as _dequantize_q8 below: it sits between two
    BLAS calls, and a parallel region there costs more in thread hand-over than it saves on one pass over [M, O]."""
    M, O = out.shape
    b = bias if bias.shape[0] > 0 else np.zeros(y.shape[1], np.float32)
    for m in range(M):
        if epilogue == ADD:
            for o in range(O):
                out[m, o] += y[m, o] + b[o]
        elif epilogue == STORE:
            for o in range(O):
                out[m, o] = y[m, o] + b[o]
        elif epilogue == GATED and act == 1:  # silu(gate) * up, the Llama MLP
            for o in range(O):
                gate = y[m, o] + b[o]
                out[m, o] = gate / (ONE + _exp(-gate)) * (y[m, O + o] + b[O + o])
        elif epilogue == GATED:
            for o in range(O):
                out[m, o] = _act(y[m, o] + b[o], act) * (y[m, O + o] + b[O + o])
        elif act == 2:  # relu
            for o in range(O):
                out[m, o] = max(y[m, o] + b[o], ZERO)
        elif act == 1:
            for o in range(O):
                v = y[m, o] + b[o]
                out[m, o] = v / (ONE + _exp(-v))
        else:
            for o in range(O):
                out[m, o] = _act(y[m, o] + b[o], act)


def _block_sums(kind, x):
    """Q4_K / Q5_K: the sums of x [M, D] over each sub-block of 32 (their mins multiply them); else a dummy."""
    if kind in ("Q4_K", "Q5_K"):
        M, D = x.shape
        return np.ascontiguousarray(x.reshape(M, D // 32, 32).sum(axis=2, dtype=np.float32))
    return np.zeros((x.shape[0], 1), np.float32)


@njit(parallel=True, fastmath=FASTMATH)
def _gated_gguf(x, xs_gate, xs_up, gate, up, kind_gate, kind_up, act, out):
    """out[m, f] <- act(x[m] . dequant(gate[f])) * (x[m] . dequant(up[f])) for a few rows m, gate and up two matrices
    of the file (each of its own block type), dequantized in registers.  twin: refimpl.llama.mlp's first three lines"""
    F = out.shape[1]
    for task in prange((F + 1) // 2):
        r0 = 2 * np.int64(task)
        r1 = min(r0 + 1, F - 1)
        for m in range(x.shape[0]):
            g0, g1 = gguf_blocks._dot2(kind_gate, gate[r0], gate[r1], x[m], xs_gate[m])
            u0, u1 = gguf_blocks._dot2(kind_up, up[r0], up[r1], x[m], xs_up[m])
            _finish(out, m, r0, g0, u0, act, GATED)
            if r1 != r0:
                _finish(out, m, r1, g1, u1, act, GATED)


@njit(parallel=True, fastmath=FASTMATH)
def _linear_gguf(x, xs, raw, kind, bias, act, epilogue, out):
    """out[m, o] <- epilogue(x[m] . dequant(raw[o]) + b[o]) for a few rows m, raw the GGUF file's rows of blocks,
    dequantized in registers (accel.cpu.gguf_blocks' dot products).  twin: refimpl.ops.linear"""
    O = out.shape[1]
    gated = epilogue == GATED
    stride = _task_stride(O, gated)
    for task in prange(stride):
        t = np.int64(task)
        r0, r1, r2, r3 = _task_rows(t, stride, O, gated)
        for m in range(x.shape[0]):
            a0, a1 = gguf_blocks._dot2(kind, raw[r0], raw[r1], x[m], xs[m])
            a2, a3 = gguf_blocks._dot2(kind, raw[r2], raw[r3], x[m], xs[m])
            _finish_task(out, m, t, stride, a0, a1, a2, a3, bias, r0, r1, r2, r3, act, epilogue)


class StackedWeight:
    """Matrices stacked along their rows without a copy: a GGUF file's q, k, v (or gate, up) each kept as the file
    stores it, their block types possibly different (llama.cpp's Q4_K_M keeps v in Q6_K). A product runs each part
    into its columns of one scratch, then the epilogue runs once over it."""

    __array_ufunc__ = None
    dtype = np.dtype(np.float32)
    ndim = 2
    format = "gguf"
    scales = None

    def __init__(self, parts):
        if len({p.shape[1] for p in parts}) != 1:
            raise ConfigError(f"stacked matrices of different widths: {[list(p.shape) for p in parts]}")
        self.parts = list(parts)
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def nbytes(self):
        return sum(p.nbytes for p in self.parts)

    @property
    def T(self):
        return _Transposed(self)

    def linear_into(self, x, bias, act, epilogue, out):
        """linear_into on the parts. Decode (few rows, no bias): q, k, v each written straight into its columns of
        out, and gate, up read by one kernel that applies act(gate) * up as it writes; else the parts into a scratch
        and the epilogue over it."""
        few = x.shape[0] <= SMALL_M and bias.shape[0] == 0
        if few and epilogue == STORE:
            start = 0
            for part in self.parts:
                linear_into(x, part, None, 0, STORE, out[:, start:start + part.shape[0]])
                start += part.shape[0]
            return out
        if few and epilogue == GATED and all(p.format in GGUF_BLOCKS for p in self.parts) and len(self.parts) == 2:
            gate, up = self.parts
            _gated_gguf(x, _block_sums(gate.format, x), _block_sums(up.format, x), gate.data, up.data,
                        gguf_blocks.kind_of(gate.format), gguf_blocks.kind_of(up.format), act, out)
            return out
        return _epilogue(self.product(x, _scratch_rows(x.shape[0], self.shape[0])), bias, act, epilogue, out)

    def product(self, x, y):
        """y [M, O] <- x @ W^T, part by part."""
        start = 0
        for part in self.parts:
            stop = start + part.shape[0]
            if x.shape[0] <= SMALL_M:
                column = np.empty((x.shape[0], part.shape[0]), np.float32)
                linear_into(x, part, None, 0, STORE, column)
                y[:, start:stop] = column
            else:
                _matmul_tiles(x, part, y[:, start:stop])
            start = stop
        return y

    def dequantize(self, out=None):
        out = np.empty(self.shape, np.float32) if out is None else out
        start = 0
        for part in self.parts:
            part.dequantize(out=out[start:start + part.shape[0]])
            start += part.shape[0]
        return out

    def __repr__(self):
        return f"StackedWeight({', '.join(f'{p.format} {list(p.shape)}' for p in self.parts)})"


def as_weight(weight):
    return weight if isinstance(weight, (Weight, StackedWeight)) else Weight("fp32", writable(weight))


def linear(x, weight, bias=None):
    """y = x W^T + b for x [..., D] and W [O, D] in any storage format.  twin: refimpl.ops.linear"""
    weight = as_weight(weight)
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty((x2.shape[0], weight.shape[0]), np.float32)
    linear_into(x2, weight, bias, 0, STORE, out)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def gated_linear(x, weight, bias, act):
    """act(x Wg^T + bg) * (x Wu^T + bu) with W = [Wg; Wu] ([2F, D]), the activation fused into the up projection.

    twin: the first three lines of refimpl.llama.mlp (gate, up, act(gate) * up); act is an accel.formats.ACT_CODES code.
    """
    weight = as_weight(weight)
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty((x2.shape[0], weight.shape[0] // 2), np.float32)
    linear_into(x2, weight, bias, act, GATED, out)
    return out.reshape(*x.shape[:-1], weight.shape[0] // 2)
