"""Weight matrices left as the checkpoint stores them, widened to the compute dtype inside each product.

A Llama-2-7B checkpoint is 13.5 GB of float16; converted to float32 at load it would take 27 GB, more than a 24 GB
machine has. So refimpl keeps each matrix as the file holds it (a memory map of fp16, of bfloat16 bits, of fp32, or
the rows of a quantized GGUF tensor) and widens it inside `x @ W.T` and the embedding lookup `W[ids]`, one tile of
rows at a time into a reused buffer. Widening is exact (fp16 and bf16 values are float32 values, float32 values are
float64 values), so a product equals the one on a matrix converted at load: bit for bit when the matrix fits in one
tile (every golden model), and up to BLAS's own summation grouping over output rows otherwise.

Memory: one tile buffer per thread (TILE_ELEMENTS of the compute dtype) beyond the activations. The file's pages are
read on every pass and left to the operating system's page cache to keep or evict, so a checkpoint larger than RAM
streams from disk. Widening runs on WIDEN_THREADS threads (NumPy's casts release the GIL); that is the one place in
refimpl/ that spends code on speed, because without it a 7B decode step would be three times slower.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

TILE_ELEMENTS = 1 << 21  # 2M elements (8 MiB of float32): a tile stays in the last-level cache for its product
WIDEN_THREADS = max(1, min(4, os.cpu_count() or 1))
PARALLEL_ELEMENTS = 1 << 16  # below this a tile is widened on the calling thread (a hand-over costs ~20 us)
FEW_ROWS = 4  # products with at most this many rows of x (decode steps) widen and multiply band by band


class StoredMatrix:
    """A matrix [O, D] as the file stores it; `x @ W.T`, `W[ids]` and `W[a:b]` give compute-dtype results.

    rows(start, stop) returns the stored rows [stop - start, D]: float16, float32 or float64 values, or bfloat16
    bit patterns as uint16 (NumPy has no bfloat16), or quantized blocks already dequantized to float32.
    """

    __array_ufunc__ = None  # `x @ W.T` defers to W.T.__rmatmul__ instead of converting W to an array
    ndim = 2

    def __init__(self, rows, shape, stored_dtype, dtype, name="", blocks=None):
        self.rows = rows
        self.shape = tuple(shape)
        self.stored_dtype = stored_dtype  # the file's element type: "F16", "BF16", "F32", "F64", "Q4_K", ...
        self.dtype = np.dtype(dtype)  # what products and lookups give
        self.name = name
        self.blocks = blocks  # GGUF quantized: () -> (the file's block rows, row order or None); see formats.common

    @property
    def T(self):
        return _Transposed(self)

    def matmul_t(self, x):
        """x [..., D] @ W^T -> [..., O], W widened tile by tile (the product of refimpl.ops.linear)."""
        O = self.shape[0]
        step = tile_rows(self.shape)
        if step >= O:
            return x @ self.widen(0, O).T  # one tile: the very product of an eagerly converted matrix
        y = np.empty((*x.shape[:-1], O), self.dtype)  # [..., O]
        bands = [(start, min(start + step, O)) for start in range(0, O, step)]
        if x.size // max(x.shape[-1], 1) <= FEW_ROWS:  # decode: widening dominates, see _band_product
            _map(lambda band: self._band_product(x, *band, y), bands)
        else:  # a prompt: the widening is amortised over the rows of one BLAS product per tile
            for start, stop in bands:
                y[..., start:stop] = x @ self.widen(start, stop).T
        return y

    def _band_product(self, x, start, stop, y):
        """y[..., start:stop] = x @ W[start:stop]^T on the calling thread, widened there, multiplied by einsum.

        Not BLAS: OpenBLAS wakes its threads for every tile and leaves them spinning after it, on the cores the
        widening runs on (an 11008 x 4096 fp16 matrix took 130 ms a product against 31 ms with one BLAS thread)."""
        tile = _tile_buffer(stop - start, self.shape[1], self.dtype)
        widen_into(self.rows(start, stop), tile, parallel=False)
        y[..., start:stop] = np.einsum("...d,od->...o", x, tile)

    def widen(self, start, stop):
        """Rows [start, stop) in the compute dtype, in this thread's reused tile buffer (valid until the next call)."""
        out = _tile_buffer(stop - start, self.shape[1], self.dtype)
        widen_into(self.rows(start, stop), out)
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):  # a band of rows, e.g. pretraining_tp's vocab chunks of lm_head
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                raise IndexError("StoredMatrix supports contiguous row bands only")
            return StoredMatrix(lambda a, b: self.rows(start + a, start + b), (stop - start, self.shape[1]),
                                self.stored_dtype, self.dtype, self.name)
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], slice):
            lo, hi, step = index[1].indices(self.shape[1])  # a band of columns: pretraining_tp's input slices
            if step != 1:
                raise IndexError("StoredMatrix supports contiguous column bands only")
            return StoredMatrix(lambda a, b: self.rows(a, b)[:, lo:hi], (self.shape[0], hi - lo),
                                self.stored_dtype, self.dtype, self.name)
        ids = np.asarray(index)  # an embedding lookup: [...] integer ids -> [..., D]
        flat = ids.reshape(-1)
        out = np.empty((flat.shape[0], self.shape[1]), self.dtype)
        for n, i in enumerate(flat):
            i = int(i)
            widen_into(self.rows(i, i + 1), out[n:n + 1])
        return out.reshape(*ids.shape, self.shape[1])

    def __array__(self, dtype=None, copy=None):
        """The whole matrix widened: only when asked for explicitly (np.asarray(W)), never by the forward pass."""
        out = np.empty(self.shape, self.dtype)
        step = tile_rows(self.shape)
        for start in range(0, self.shape[0], step):
            stop = min(start + step, self.shape[0])
            widen_into(self.rows(start, stop), out[start:stop])
        return out if dtype is None else out.astype(dtype, copy=False)

    @property
    def nbytes(self):
        """Bytes of the compute-dtype matrix this stands for (what converting it at load would have cost)."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def __repr__(self):
        return f"StoredMatrix({self.name or '?'}, {list(self.shape)}, {self.stored_dtype} -> {self.dtype.name})"


class _Transposed:
    """W.T of a StoredMatrix: only `x @ W.T` is defined on it."""

    __array_ufunc__ = None

    def __init__(self, matrix):
        self.matrix = matrix

    def astype(self, dtype, copy=True):  # refimpl.ops.linear widens plain fp16 arrays; this one widens itself
        if np.dtype(dtype) != self.matrix.dtype:
            raise TypeError(f"{self.matrix!r} computes in {self.matrix.dtype.name}, not {np.dtype(dtype).name}")
        return self

    def __rmatmul__(self, x):
        return self.matrix.matmul_t(x)


def tile_rows(shape):
    """Rows per tile: as many as fit TILE_ELEMENTS (at least one), a multiple of 16 when there are several tiles."""
    O, D = shape
    rows = max(1, TILE_ELEMENTS // max(D, 1))
    return O if rows >= O else max(16, rows - rows % 16)


def widen_into(block, out, parallel=True):
    """out[...] = block exactly, for stored float16/32/64 values or bfloat16 bits (uint16): a bfloat16 is the top
    half of a float32, so its bits shifted left by 16 are the float32; float16 -> float32 by half_to_single.
    parallel=False widens on the calling thread alone (a pool thread must not wait on the pool)."""
    _parallel = _split if parallel else (lambda widen, out: widen(0, out.shape[0]))
    if block.dtype == np.uint16 and out.dtype == np.float32:
        _parallel(lambda a, b: np.left_shift(block[a:b], 16, out=out[a:b].view(np.uint32), dtype=np.uint32), out)
    elif block.dtype == np.uint16:  # bfloat16 -> float64: through float32, both steps exact
        out[...] = (block.astype(np.uint32) << 16).view(np.float32)
    elif block.dtype == np.float16 and out.dtype == np.float32:
        _parallel(lambda a, b: half_to_single(block[a:b], out[a:b]), out)
    else:
        _parallel(lambda a, b: np.copyto(out[a:b], block[a:b], casting="unsafe"), out)


SIGN_AND_LOW_BITS = np.int32(-0x70000001)  # 0x8FFFFFFF: bit 31 and bits 0-27
HALF_TO_SINGLE_SCALE = np.float32(2.0**112)  # 2^(127 - 15): float32's exponent bias minus float16's


def half_to_single(half, out):
    """float16 -> float32 exactly, in three NumPy passes (about 1.7x faster than NumPy's own cast here).

    The 15 bits below the sign, shifted left by 13, are a float32 whose exponent is float16's unbiased by 127
    instead of 15: multiplying by 2^112 re-biases it, exactly, for normals, subnormals and zeros alike. The sign,
    sign-extended by the int16 -> int32 shift, is kept on bit 31 by the mask. Exponent 31 (inf, NaN) would come out
    as a finite 2^16 * (1 + m): when the band holds one, NumPy's cast does the band instead."""
    bits = out.view(np.int32)
    np.left_shift(half.view(np.int16), 13, out=bits, dtype=np.int32)
    np.bitwise_and(bits, SIGN_AND_LOW_BITS, out=bits)
    np.multiply(out, HALF_TO_SINGLE_SCALE, out=out)
    if out.max() >= 65536.0 or out.min() <= -65536.0:
        np.copyto(out, half, casting="unsafe")


def _split(widen, out):
    """widen(a, b) over bands of rows of out, on the shared pool when out is large enough to repay the hand-over."""
    rows = out.shape[0]
    if WIDEN_THREADS == 1 or out.size < PARALLEL_ELEMENTS or rows < 2:
        widen(0, rows)
        return
    bounds = np.linspace(0, rows, min(WIDEN_THREADS, rows) + 1).astype(int)
    _map(lambda ab: widen(*ab), list(zip(bounds[:-1], bounds[1:])))


def _map(work, items):
    """work(item) for every item, on the shared pool of WIDEN_THREADS threads (in the calling thread when 1)."""
    if WIDEN_THREADS == 1 or len(items) == 1:
        for item in items:
            work(item)
        return
    list(_pool().map(work, items))


_local = threading.local()
_pool_lock = threading.Lock()
_shared_pool = None


def _pool():
    global _shared_pool
    with _pool_lock:
        if _shared_pool is None:
            _shared_pool = ThreadPoolExecutor(WIDEN_THREADS, thread_name_prefix="refimpl-widen")
        return _shared_pool


def _tile_buffer(rows, cols, dtype):
    """This thread's reused buffer [rows, cols] of `dtype` (one per dtype, grown when a tile needs more)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    size = rows * cols
    flat = buffers.get(dtype)
    if flat is None or flat.size < size:
        flat = buffers[dtype] = np.empty(max(size, 1), dtype)
    return flat[:size].reshape(rows, cols)
