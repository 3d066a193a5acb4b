"""Numba kernels that compute on llama.cpp's quantized GGUF blocks as they lie in the file, without converting a tensor.

A weight matrix W [O, D] of a block type is `raw`: uint8 [O, row_bytes(name, D)], each row D / block_elements
blocks back to back, often a read-only memory map of the GGUF file (Numba compiles a second specialisation of each
kernel for read-only arrays). fp16 is IEEE half, little-endian. The layouts (ggml-common.h; decoded as in ggml-quants.c
dequantize_row_q8_0, _q4_0, _q5_0, _q4_K, _q5_K, _q6_K):

  Q8_0   32 weights,  34 bytes: fp16 d, 32 int8 q;                              w = d * q
  Q4_0   32 weights,  18 bytes: fp16 d, 16 bytes of nibbles (low: w 0..15, high: w 16..31); w = d * (q - 8)
  Q5_0   32 weights,  22 bytes: fp16 d, uint32 qh (bit j: 5th bit of w j), 16 bytes of nibbles as Q4_0; w = d * (q - 16)
  Q4_K  256 weights, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 8 packed 6-bit (scale, min), 128 bytes of nibbles;
        sub-block s of 32: w = (d * sc_s) * q - dmin * m_s; byte group g of 32 holds s = 2g (low), 2g + 1 (high)
  Q5_K  256 weights, 176 bytes: as Q4_K with 32 bytes qh (bit s of qh[l]: 5th bit of w 32 s + l) before the nibbles
  Q6_K  256 weights, 210 bytes: 128 ql (low 4 bits), 64 qh (high 2 bits), 16 int8 scales (one per 16 w), fp16 d;
        w = (d * sc) * (q - 32)

Twins: each dequantizer reproduces gguf.quants.dequantize (gguf-py) bit for bit: the same float32 operations in the
same order, compiled without fastmath, so no FMA is contracted. matvec's twin is refimpl.ops.linear (x @ W.T) on the
dequantized matrix; it factors each block's scale out of its sum (tests/test_gguf_blocks.py states the bound).
"""
from __future__ import annotations

import numpy as np

from .jit import FASTMATH, f32_from_half_bits, njit, prange

# name: (ggml type number, weights a block, bytes a block), as gguf.GGMLQuantizationType / GGML_QUANT_SIZES
BLOCKS = {
    "Q8_0": (8, 32, 34),
    "Q4_0": (2, 32, 18),
    "Q5_0": (6, 32, 22),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
}
_KIND = {name: kind for kind, name in enumerate(BLOCKS)}  # the kernels' branch code
ZERO = np.float32(0.0)


def _block(name):
    try:
        return BLOCKS[name]
    except KeyError:
        raise ValueError(f"unknown GGUF block type {name!r}: expected one of {', '.join(BLOCKS)}") from None


def row_bytes(name, D):
    """Bytes of one row of D weights of block type `name`; ValueError unless D is a multiple of its block."""
    _, elements, nbytes = _block(name)
    if D <= 0 or D % elements:
        raise ValueError(f"{name}: row length D={D} is not a positive multiple of its block of {elements} weights")
    return D // elements * nbytes


# --- bytes -> numbers (integer work: exact, shared by the dequantizers and the dot products) -----------------------

@njit()
def _half(row, i):
    """The fp16 at row[i:i + 2] (little-endian) as float32, exactly."""
    return f32_from_half_bits(np.uint16(np.int32(row[i]) | (np.int32(row[i + 1]) << 8)))


@njit()
def _u32(row, i):
    """The little-endian uint32 at row[i:i + 4] (as int64)."""
    return (np.int64(row[i]) | (np.int64(row[i + 1]) << 8) | (np.int64(row[i + 2]) << 16)
            | (np.int64(row[i + 3]) << 24))


@njit()
def _scale_min_k4(row, p, j):
    """(scale, min) of sub-block j of the Q4_K / Q5_K block at p: ggml's get_scale_min_k4 on the 12 bytes at p + 4.
    Bytes 0..3: scales 0..3 in bits 0..5, bits 6..7 are the high bits of scales 4..7; bytes 4..7 likewise for the
    mins; bytes 8..11: low 4 bits of scales 4..7 (low nibble) and of mins 4..7 (high nibble)."""
    q = p + 4
    if j < 4:
        return np.int32(row[q + j] & 63), np.int32(row[q + j + 4] & 63)
    return (np.int32((row[q + j + 4] & 15) | ((row[q + j - 4] >> 6) << 4)),
            np.int32((row[q + j + 4] >> 4) | ((row[q + j] >> 6) << 4)))


@njit()
def _q5(c, h, shift):
    """A 5-bit quant: the nibble c with bit `shift` of h as its 5th bit."""
    return c | (((h >> shift) & 1) << 4)


@njit()
def _q6(ql, shift_l, qh, shift_h):
    """A Q6_K quant minus 32: 4 bits of ql at shift_l, 2 bits of qh at shift_h above them."""
    return (((ql >> shift_l) & 15) | (((qh >> shift_h) & 3) << 4)) - 32


# --- dequantizers: one row each, serial, no fastmath (gguf.quants' float32 operations in its order) ----------------

@njit()
def _deq_q8_0(row, y):
    for b in range(y.shape[0] // 32):
        p, j = 34 * b, 32 * b
        d = _half(row, p)
        for l in range(32):
            y[j + l] = np.float32(np.int8(row[p + 2 + l])) * d


@njit()
def _deq_q4_0(row, y):
    for b in range(y.shape[0] // 32):
        p, j = 18 * b, 32 * b
        d = _half(row, p)
        for l in range(16):
            c = np.int32(row[p + 2 + l])
            y[j + l] = d * np.float32((c & 15) - 8)
            y[j + 16 + l] = d * np.float32((c >> 4) - 8)


@njit()
def _deq_q5_0(row, y):
    for b in range(y.shape[0] // 32):
        p, j = 22 * b, 32 * b
        d, h = _half(row, p), _u32(row, p + 2)
        for l in range(16):
            c = np.int32(row[p + 6 + l])
            y[j + l] = d * np.float32(_q5(c & 15, h, l) - 16)
            y[j + 16 + l] = d * np.float32(_q5(c >> 4, h, l + 16) - 16)


@njit()
def _deq_k(row, y, five):
    """Q4_K (five=False) or Q5_K (five=True): w = (d * sc) * q - dmin * m, as gguf (no fused multiply-add)."""
    nbytes, qs = (176, 48) if five else (144, 16)
    for b in range(y.shape[0] // 256):
        p = nbytes * b
        d, dmin = _half(row, p), _half(row, p + 2)
        for s in range(8):
            sc, m = _scale_min_k4(row, p, s)
            dl, dm = d * np.float32(sc), dmin * np.float32(m)
            q, shift, j = p + qs + 32 * (s >> 1), 4 * (s & 1), 256 * b + 32 * s
            for l in range(32):
                c = (np.int32(row[q + l]) >> shift) & 15
                if five:
                    c = _q5(c, np.int32(row[p + 16 + l]), s)
                y[j + l] = dl * np.float32(c) - dm


@njit()
def _deq_q6_k(row, y):
    for b in range(y.shape[0] // 256):
        p = 210 * b
        d = _half(row, p + 208)
        for h in range(2):  # halves of 128 weights: 64 bytes of ql, 32 of qh, 8 scales each
            ql, qh, sc, j = p + 64 * h, p + 128 + 32 * h, p + 192 + 8 * h, 256 * b + 128 * h
            for t in range(4):  # weights j + 32 t + l: ql[32 (t & 1) + l] >> 4 (t >> 1), qh[l] >> 2 t
                for l in range(32):
                    dl = d * np.float32(np.int8(row[sc + 2 * t + (l >> 4)]))
                    q = _q6(np.int32(row[ql + 32 * (t & 1) + l]), 4 * (t >> 1), np.int32(row[qh + l]), 2 * t)
                    y[j + 32 * t + l] = dl * np.float32(q)


# Serial: dequantising feeds a BLAS product, whose threads Numba's would compete with.
@njit()
def _dequantize(kind, raw, out):
    for o in range(raw.shape[0]):
        if kind == 0:
            _deq_q8_0(raw[o], out[o])
        elif kind == 1:
            _deq_q4_0(raw[o], out[o])
        elif kind == 2:
            _deq_q5_0(raw[o], out[o])
        elif kind == 3:
            _deq_k(raw[o], out[o], False)
        elif kind == 4:
            _deq_k(raw[o], out[o], True)
        else:
            _deq_q6_k(raw[o], out[o])


# --- dot products of two rows with x, dequantised in registers ----------------------------------------------------
# Each block's (sub-block's) integer quants times x are summed in a flat inner loop, then scaled once: sum_b d_b *
# sum_l q_l x_l (minus dmin * m * sum_l x_l for the K-quants with mins, from the precomputed sub-block sums xs).

@njit(fastmath=FASTMATH)
def _dot2_q8_0(r0, r1, x):
    s0 = s1 = ZERO
    for b in range(x.shape[0] // 32):
        p, j = 34 * b, 32 * b
        t0 = t1 = ZERO
        for l in range(32):
            xj = x[j + l]
            t0 += np.float32(np.int8(r0[p + 2 + l])) * xj
            t1 += np.float32(np.int8(r1[p + 2 + l])) * xj
        s0 += _half(r0, p) * t0
        s1 += _half(r1, p) * t1
    return s0, s1


@njit(fastmath=FASTMATH)
def _dot2_q4_0(r0, r1, x):
    s0 = s1 = ZERO
    for b in range(x.shape[0] // 32):
        p, j = 18 * b + 2, 32 * b
        t0 = t1 = ZERO
        for l in range(16):
            xl, xh = x[j + l], x[j + 16 + l]
            c0, c1 = np.int32(r0[p + l]), np.int32(r1[p + l])
            t0 += np.float32((c0 & 15) - 8) * xl + np.float32((c0 >> 4) - 8) * xh
            t1 += np.float32((c1 & 15) - 8) * xl + np.float32((c1 >> 4) - 8) * xh
        s0 += _half(r0, p - 2) * t0
        s1 += _half(r1, p - 2) * t1
    return s0, s1


@njit(fastmath=FASTMATH)
def _dot2_q5_0(r0, r1, x):
    s0 = s1 = ZERO
    for b in range(x.shape[0] // 32):
        p, j = 22 * b, 32 * b
        h0, h1 = _u32(r0, p + 2), _u32(r1, p + 2)
        t0 = t1 = ZERO
        for l in range(16):
            xl, xh = x[j + l], x[j + 16 + l]
            c0, c1 = np.int32(r0[p + 6 + l]), np.int32(r1[p + 6 + l])
            t0 += np.float32(_q5(c0 & 15, h0, l) - 16) * xl + np.float32(_q5(c0 >> 4, h0, l + 16) - 16) * xh
            t1 += np.float32(_q5(c1 & 15, h1, l) - 16) * xl + np.float32(_q5(c1 >> 4, h1, l + 16) - 16) * xh
        s0 += _half(r0, p) * t0
        s1 += _half(r1, p) * t1
    return s0, s1


@njit(fastmath=FASTMATH)
def _k_term(row, p, s, d, dmin, t, xsum):
    """Sub-block s's share of row . x: (d * sc_s) * sum(q x) - (dmin * m_s) * sum(x)."""
    sc, m = _scale_min_k4(row, p, s)
    return (d * np.float32(sc)) * t - (dmin * np.float32(m)) * xsum


@njit(fastmath=FASTMATH)
def _dot2_k(r0, r1, x, xs, five):
    """Q4_K (five=False) / Q5_K (five=True). xs[k]: sum of x over sub-block k (32 weights)."""
    nbytes, qs = (176, 48) if five else (144, 16)
    s0 = s1 = ZERO
    for b in range(x.shape[0] // 256):
        p = nbytes * b
        d0, m0, d1, m1 = _half(r0, p), _half(r0, p + 2), _half(r1, p), _half(r1, p + 2)
        for g in range(4):  # 32 bytes of nibbles: sub-block 2g in the low ones, 2g + 1 in the high ones
            q, j, k = p + qs + 32 * g, 256 * b + 64 * g, 8 * b + 2 * g
            lo0 = hi0 = lo1 = hi1 = ZERO
            for l in range(32):
                xl, xh = x[j + l], x[j + 32 + l]
                c0, c1 = np.int32(r0[q + l]), np.int32(r1[q + l])
                a0, b0, a1, b1 = c0 & 15, c0 >> 4, c1 & 15, c1 >> 4
                if five:  # bits 2g, 2g + 1 of qh[l]
                    e0, e1 = np.int32(r0[p + 16 + l]), np.int32(r1[p + 16 + l])
                    a0, b0 = _q5(a0, e0, 2 * g), _q5(b0, e0, 2 * g + 1)
                    a1, b1 = _q5(a1, e1, 2 * g), _q5(b1, e1, 2 * g + 1)
                lo0 += np.float32(a0) * xl
                hi0 += np.float32(b0) * xh
                lo1 += np.float32(a1) * xl
                hi1 += np.float32(b1) * xh
            s0 += _k_term(r0, p, 2 * g, d0, m0, lo0, xs[k]) + _k_term(r0, p, 2 * g + 1, d0, m0, hi0, xs[k + 1])
            s1 += _k_term(r1, p, 2 * g, d1, m1, lo1, xs[k]) + _k_term(r1, p, 2 * g + 1, d1, m1, hi1, xs[k + 1])
    return s0, s1


@njit(fastmath=FASTMATH)
def _dot2_q6_k(r0, r1, x):
    """Q6_K: per half of 128 and per 16 weights l of each group of 32, four sums (one per group t) a row, each
    scaled once by d * scale[8h + l // 16 + 2t]. Straight-line integer unpacking in one 16-long loop (helper calls
    and a per-element scale lookup kept LLVM from vectorising it: 8x slower)."""
    s0 = s1 = ZERO
    for b in range(x.shape[0] // 256):
        p = 210 * b
        d0, d1 = _half(r0, p + 208), _half(r1, p + 208)
        for h in range(2):
            ql, qh, sc, j = p + 64 * h, p + 128 + 32 * h, p + 192 + 8 * h, 256 * b + 128 * h
            for i in range(2):  # weights l < 16 and l >= 16 of each group of 32 have their own scale
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = ZERO
                for l in range(16 * i, 16 * i + 16):
                    x0, x1, x2, x3 = x[j + l], x[j + 32 + l], x[j + 64 + l], x[j + 96 + l]
                    c, e, g = np.int32(r0[ql + l]), np.int32(r0[ql + 32 + l]), np.int32(r0[qh + l])
                    a0 += np.float32(((c & 15) | ((g & 3) << 4)) - 32) * x0
                    a1 += np.float32(((e & 15) | (((g >> 2) & 3) << 4)) - 32) * x1
                    a2 += np.float32(((c >> 4) | (((g >> 4) & 3) << 4)) - 32) * x2
                    a3 += np.float32(((e >> 4) | (((g >> 6) & 3) << 4)) - 32) * x3
                    c, e, g = np.int32(r1[ql + l]), np.int32(r1[ql + 32 + l]), np.int32(r1[qh + l])
                    b0 += np.float32(((c & 15) | ((g & 3) << 4)) - 32) * x0
                    b1 += np.float32(((e & 15) | (((g >> 2) & 3) << 4)) - 32) * x1
                    b2 += np.float32(((c >> 4) | (((g >> 4) & 3) << 4)) - 32) * x2
                    b3 += np.float32(((e >> 4) | (((g >> 6) & 3) << 4)) - 32) * x3
                k = sc + i
                s0 += ((d0 * np.float32(np.int8(r0[k]))) * a0 + (d0 * np.float32(np.int8(r0[k + 2]))) * a1
                       + (d0 * np.float32(np.int8(r0[k + 4]))) * a2 + (d0 * np.float32(np.int8(r0[k + 6]))) * a3)
                s1 += ((d1 * np.float32(np.int8(r1[k]))) * b0 + (d1 * np.float32(np.int8(r1[k + 2]))) * b1
                       + (d1 * np.float32(np.int8(r1[k + 4]))) * b2 + (d1 * np.float32(np.int8(r1[k + 6]))) * b3)
    return s0, s1


@njit(fastmath=FASTMATH)
def _dot2(kind, r0, r1, x, xs):
    if kind == 0:
        return _dot2_q8_0(r0, r1, x)
    if kind == 1:
        return _dot2_q4_0(r0, r1, x)
    if kind == 2:
        return _dot2_q5_0(r0, r1, x)
    if kind == 3:
        return _dot2_k(r0, r1, x, xs, False)
    if kind == 4:
        return _dot2_k(r0, r1, x, xs, True)
    return _dot2_q6_k(r0, r1, x)


@njit(parallel=True, fastmath=FASTMATH)
def _matvec(kind, x, xs, raw, out):
    """out[m, o] = x[m] . dequant(raw[o]), two rows a task (an odd O's last task pairs its row with itself)."""
    O = raw.shape[0]
    for task in prange((O + 1) // 2):
        r0 = 2 * np.int64(task)
        r1 = min(r0 + 1, O - 1)
        for m in range(x.shape[0]):
            a0, a1 = _dot2(kind, raw[r0], raw[r1], x[m], xs[m])
            out[m, r0] = a0
            if r1 != r0:
                out[m, r1] = a1


# --- public --------------------------------------------------------------------------------------------------------

def _check_raw(name, raw, D):
    raw = np.asarray(raw)  # a np.memmap as a plain view (read-only stays read-only)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"{name}: raw must be uint8 [O, row_bytes], got {raw.dtype} {raw.shape}")
    if raw.shape[1] != row_bytes(name, D):
        raise ValueError(f"{name}: rows of D={D} weights take {row_bytes(name, D)} bytes, raw has {raw.shape[1]}")
    if not raw.flags.c_contiguous:
        raise ValueError(f"{name}: raw must be C-contiguous (a slice of rows of the memory map is)")
    return raw


def _check_out(out, shape):
    if out is None:
        return np.empty(shape, np.float32)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape {shape}")
    return out


def dequantize_rows(name, raw, out=None):
    """raw uint8 [O, row_bytes] of block type `name` -> out float32 [O, D], equal bit for bit to
    gguf.quants.dequantize(raw, GGMLQuantizationType[name]). Returns out (allocated when None)."""
    _, elements, nbytes = _block(name)
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.shape[1] % nbytes:
        raise ValueError(f"{name}: raw must be [O, a multiple of {nbytes} bytes], got shape {raw.shape}")
    D = raw.shape[1] // nbytes * elements
    raw = _check_raw(name, raw, D)
    out = _check_out(out, (raw.shape[0], D))
    _dequantize(_KIND[name], raw, out)
    return out


def dequantize_tile(name, raw, start, stop, out=None):
    """Rows [start, stop) of raw dequantized into out float32 [stop - start, D] (a prompt: a tile, then BLAS)."""
    if not 0 <= start <= stop <= len(raw):
        raise ValueError(f"{name}: rows [{start}, {stop}) are not within the {len(raw)} rows of raw")
    return dequantize_rows(name, raw[start:stop], out)


def matvec(name, x, raw, out=None):
    """x float32 [M, D] (few rows: decode) -> out float32 [M, O] = x @ dequant(raw).T, the rows of raw dequantized
    in registers, never written out; parallel over pairs of output rows. Returns out (allocated when None)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [M, D], got shape {x.shape}")
    M, D = x.shape
    raw = _check_raw(name, raw, D)
    out = _check_out(out, (M, raw.shape[0]))
    if name in ("Q4_K", "Q5_K"):  # sums of x over each sub-block of 32, for the mins
        xs = np.ascontiguousarray(x.reshape(M, D // 32, 32).sum(axis=2, dtype=np.float32))
    else:
        xs = np.zeros((M, 1), np.float32)
    if raw.shape[0]:
        _matvec(_KIND[name], x, xs, raw, out)
    return out


def kind_of(name):
    """The kernels' code of a block type name (the `kind` argument of _dot2)."""
    _block(name)
    return _KIND[name]
