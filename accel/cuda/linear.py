"""Weights on the device and the products that read them (twin: refimpl.ops.linear).

A DeviceWeight is a matrix [O, D] on the device: fp32, fp16, or int8 as Q8_0 blocks (int8 values + float32 scales,
accel.formats), uploaded from the packed host Weight (accel.packing) without converting again. `linear` is
xp.matmul (cuBLAS on CuPy) in float32; fp16 weights multiply float16 activations on CuPy (float32 accumulation, see
`product`), widened exactly on NumPy; int8 is dequantised on the device for a prompt and read by linear_q8
(dequantising on the fly) for a few rows (decode).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..formats import ADD, QBLOCK, STORE, check_format
from ..kv_cache import to_host
from .ops import MAX_THREADS, ZERO, _block_sum, _threads

F32 = np.float32
SMALL_M = 4  # rows up to which int8 products use the on-the-fly matvec kernel


def upload_array(xp, a):
    """A host array -> a new float32 C-contiguous device array (writable: the simulator copies kernel args back)."""
    return xp.asarray(np.array(a, dtype=F32, order="C", copy=True))


# --- the int8 matrix-vector kernel ---------------------------------------------------------------------------------

@cuda.jit
def _linear_q8_kernel(x, q, d, bias, epilogue, out):
    """Block o: output column o for every row m; threads stride over D, dequantising q * d on the fly."""
    scratch = cuda.shared.array(MAX_THREADS, np.float32)
    o = cuda.blockIdx.x
    D = x.shape[1]
    for m in range(x.shape[0]):
        s = ZERO
        for j in range(cuda.threadIdx.x, D, cuda.blockDim.x):
            s += np.float32(q[o, j]) * (x[m, j] * d[o, j // QBLOCK])
        y = _block_sum(scratch, s)
        if cuda.threadIdx.x == 0:
            if bias.shape[0] > 0:
                y += bias[o]
            if epilogue == ADD:
                out[m, o] += y
            else:
                out[m, o] = y


def linear_q8(x, q, d, bias, out, epilogue=STORE, threads=None):
    """out [M, O] <- x [M, D] @ dequant(q, d)^T + b (epilogue ADD: out +=), for few rows M (decode).

    q int8 [O, D], d float32 [O, ceil(D/32)] (accel.formats.quantize_q8_0's blocks); the weights are widened in
    registers, never written out. bias [O] or [0] for none.
    twin: refimpl.ops.linear on accel.formats.dequantize_q8_0(q, d) (the CPU twin: accel.cpu.linear._linear_q8).
    """
    O = q.shape[0]
    if O and x.shape[0]:
        _linear_q8_kernel[O, _threads(threads)](x, q, d, bias, int(epilogue), out)
    return out


# --- weights and products -----------------------------------------------------------------------------------------

class DeviceWeight:
    """A matrix [O, D] on the device: fp32 / fp16 (`data`) or int8 (`data` int8 + `scales` float32 [O, D/32]).

    Like accel.cpu.linear.Weight it can stand where refimpl's head code expects a matrix: `x @ w.T` (refimpl.ops.linear)
    runs `linear` on the device, taking and returning host arrays, and `w[a:b]` is a band of rows (pretraining_tp's
    vocab chunks).
    """

    __array_ufunc__ = None  # `x @ w.T` defers to w.T.__rmatmul__ instead of converting w to an array
    dtype = np.dtype(F32)
    ndim = 2

    def __init__(self, fmt, xp, data, scales=None):
        check_format(fmt, "cuda")
        self.format, self.xp, self.data, self.scales = fmt, xp, data, scales
        self.shape = tuple(data.shape)

    @classmethod
    def from_host(cls, weight, xp):
        """A packed host Weight (accel.cpu.linear.Weight: fp32, fp16 bits, or int8 + scales) -> the same numbers on
        the device, copied over once (nothing converted again)."""
        check_format(weight.format, "cuda")
        if weight.format == "int8":
            return cls("int8", xp, xp.asarray(np.ascontiguousarray(weight.data)),
                       upload_array(xp, weight.scales))
        if weight.format == "fp16":
            return cls("fp16", xp, xp.asarray(np.ascontiguousarray(weight.data).view(np.float16)))
        return cls("fp32", xp, upload_array(xp, weight.data))

    @property
    def nbytes(self):
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)

    @property
    def T(self):
        return _DeviceTransposed(self)

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("a DeviceWeight is indexed by a slice of rows only (use rows() for an embedding)")
        return DeviceWeight(self.format, self.xp, self.data[index], None if self.scales is None else self.scales[index])

    def dense(self):
        """float32 [O, D] (the stored array for fp32, else a new dequantised one)."""
        xp = self.xp
        if self.format == "fp32":
            return self.data
        if self.format == "fp16":
            return self.data.astype(F32)
        d = xp.repeat(self.scales, QBLOCK, axis=1)[:, :self.shape[1]]
        return self.data.astype(F32) * d

    def rows(self, ids):
        """float32 rows [n, D] for device integer ids [n] (the embedding lookup)."""
        if self.format == "fp32":
            return self.data[ids]
        if self.format == "fp16":
            return self.data[ids].astype(F32)
        d = self.xp.repeat(self.scales[ids], QBLOCK, axis=1)[:, :self.shape[1]]
        return self.data[ids].astype(F32) * d

    def __repr__(self):
        return f"DeviceWeight({self.format}, {list(self.shape)}, {self.nbytes / 1e6:.1f} MB)"


class _DeviceTransposed:
    """w.T of a DeviceWeight: only `x @ w.T` is defined on it (refimpl.ops.linear's product, on the device)."""

    __array_ufunc__ = None

    def __init__(self, weight):
        self.weight = weight

    def astype(self, dtype, copy=True):
        if np.dtype(dtype) != F32:
            raise TypeError(f"backend='cuda' computes in float32, not {np.dtype(dtype).name}")
        return self

    def __rmatmul__(self, x):
        """x [..., D] -> [..., O]; host in, host out (refimpl's heads), device in, device out."""
        w = self.weight
        host = isinstance(x, np.ndarray)
        x2 = w.xp.asarray(np.ascontiguousarray(x, dtype=F32) if host else x).reshape(-1, x.shape[-1])
        y = linear(x2, w).reshape(*x.shape[:-1], w.shape[0])
        return to_host(y) if host else y


def product(x, w):
    """x [M, D] @ W^T in float32 for a DeviceWeight W (fp32 or fp16).  twin: refimpl.ops.linear without the bias

    fp16 on CuPy: float16 x float16 -> cuBLAS gemmEx with CUBLAS_COMPUTE_32F (float32 accumulation), which is what
    CuPy picks for float16 under its default compute type (cupy/_core/_routines_linalg.pyx, tensordot_core_v11);
    the weight is never widened, the activations are rounded to float16 (relative error <= 2^-11 each) and so is
    the product (<= 2^-11 of |y|, overflowing past 65504), then widened to float32. The bound this gives is stated
    and checked in tests/test_cuda_device.py. On NumPy (the simulator tests) the weight is widened exactly, so those
    tests hold the composition to float32 accuracy.
    """
    xp = w.xp
    if w.format == "fp16" and xp is not np:
        return (x.astype(xp.float16) @ w.data.T).astype(F32)
    return x @ w.dense().T


def linear(x, w, bias=None, out=None, add=False):
    """x [M, D] @ W^T + b; with add, accumulated into out (the residual).  twin: refimpl.ops.linear"""
    xp = w.xp
    if w.format == "int8" and x.shape[0] <= SMALL_M:
        if out is None:
            out = xp.empty((x.shape[0], w.shape[0]), F32)
        b = xp.zeros(0, F32) if bias is None else bias
        return linear_q8(xp.ascontiguousarray(x), w.data, w.scales, b, out, ADD if add else STORE)
    y = product(x, w)
    if bias is not None:
        y += bias
    if add:
        out += y
        return out
    return y
