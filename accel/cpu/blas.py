"""The prompt path's matrix products, out = x W^T: Intel MKL's sgemm when the `mkl` wheel is installed, else NumPy.

A prompt of S tokens is S rows through every weight matrix, so prompt processing is a handful of float32 GEMMs
(x [M, D] @ W^T [D, O]). NumPy hands them to the OpenBLAS it bundles; on the 2-core AVX-512 bench machine that
reaches ~105-115 GFLOP/s against ~130-140 for MKL, the library torch's CPU wheel links. So when MKL's runtime
(libmkl_rt, from `pip install 'refimpl[mkl]'`) is present, accel calls its cblas_sgemm through ctypes; otherwise, or
with REFIMPL_BLAS=numpy, the product is np.matmul. Both are float32 with float32 accumulation in a blocked order of
their own: results agree to a few ulps of the sums, as any two BLAS do (tests/test_accel_blas.py bounds it).

MKL runs its threads on the GNU OpenMP runtime (libgomp), the one Numba's "omp" threading layer uses too, so the
two share one pool of workers instead of oversubscribing the cores; without libgomp it uses Intel's (libiomp5).
Conditional numerical reproducibility is set to AUTO, so the same call gives the same bits every time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

import numpy as np

# cblas enums
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# mkl_set_threading_layer codes
_LAYER_INTEL, _LAYER_GNU = 0, 3
_CBWR_AUTO = 2

_state = {"lib": None, "tried": False, "reason": "not probed yet"}


def _find_mkl_rt():
    """Path of libmkl_rt.so* in this environment (the wheel puts it in <prefix>/lib), or None."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        hits = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if hits:
            return hits[-1]
    name = ctypes.util.find_library("mkl_rt")
    return name


def _has_gnu_openmp(mkl_dir):
    """MKL's GNU threading layer needs its libmkl_gnu_thread next to libmkl_rt and a loadable libgomp."""
    if not glob.glob(os.path.join(mkl_dir, "libmkl_gnu_thread.so*")):
        return False
    try:
        ctypes.CDLL("libgomp.so.1")
    except OSError:
        return False
    return True


def _load():
    """Open MKL once: (ctypes library or None, reason). Never raises: a missing or broken MKL means NumPy."""
    if _state["tried"]:
        return _state["lib"]
    _state["tried"] = True
    if os.environ.get("REFIMPL_BLAS", "auto").lower() == "numpy":
        _state["reason"] = "REFIMPL_BLAS=numpy"
        return None
    path = _find_mkl_rt()
    if not path:
        _state["reason"] = "MKL not installed (pip install 'refimpl[mkl]')"
        return None
    try:
        lib = ctypes.CDLL(path)
        mkl_dir = os.path.dirname(path)
        if os.path.isabs(path) and _has_gnu_openmp(mkl_dir):
            layer = _LAYER_GNU
        elif os.path.isabs(path) and glob.glob(os.path.join(mkl_dir, "libmkl_intel_thread.so*")):
            layer = _LAYER_INTEL
        else:
            _state["reason"] = f"{path}: no threading layer library beside it"
            return None
        lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
        lib.MKL_Set_Threading_Layer(layer)
        lib.MKL_CBWR_Set.argtypes = [ctypes.c_int]
        lib.MKL_CBWR_Set(_CBWR_AUTO)
        lib.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]
        lib.MKL_Set_Num_Threads_Local.restype = ctypes.c_int
        gemm = lib.cblas_sgemm
        gemm.restype = None
        i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        gemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        strided = lib.cblas_sgemm_batch_strided
        strided.restype = None
        strided.argtypes = [i, i, i, i, i, i, f, p, i, i, p, i, i, f, p, i, i, i]
    except (OSError, AttributeError) as exc:
        _state["reason"] = f"{path}: {exc}"
        return None
    _state["lib"], _state["layer"] = lib, layer
    _state["reason"] = f"MKL ({os.path.basename(path)}, {'GNU' if layer == _LAYER_GNU else 'Intel'} OpenMP)"
    return lib


def provider():
    """Which library computes accel's prompt products: "mkl" or "numpy", and why (for inspect and bench)."""
    lib = _load()
    return ("mkl" if lib is not None else "numpy"), _state["reason"]


def shares_numba_threads():
    """Whether the prompt products' BLAS runs on the OpenMP threads Numba's kernels use (MKL on GNU OpenMP): then
    a Numba parallel region between two products reuses the same warm threads; with NumPy's OpenBLAS (threads of
    its own, spinning after each product) it would fight them, so the kernels between products stay serial."""
    lib = _load()
    return lib is not None and _state.get("layer") == _LAYER_GNU


def set_threads(n):
    """MKL's thread count for calls from this Python thread (NumPy's BLAS is set through threadpoolctl elsewhere)."""
    lib = _load()
    if lib is not None:
        lib.MKL_Set_Num_Threads_Local(int(n))


def _contiguous_f32(*arrays):
    return all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


def _gemm_ok(x, w, out):
    """float32 2-D operands BLAS can take: x and w C-contiguous, out row-major with unit column stride (a band of
    columns of a wider matrix is fine: its row stride becomes ldc)."""
    return (x.dtype == w.dtype == out.dtype == np.float32 and x.ndim == w.ndim == out.ndim == 2
            and x.flags.c_contiguous and w.flags.c_contiguous and out.strides[1] == 4 and out.strides[0] % 4 == 0
            and out.strides[0] // 4 >= out.shape[1]
            and x.shape[1] == w.shape[1] and out.shape == (x.shape[0], w.shape[0]) and min(out.shape) > 0
            and x.shape[1] > 0)


def matmul_nt(x, w, out):
    """out [M, O] <- x [M, D] @ w[O, D]^T, float32; out may be a band of columns of a wider [M, N] matrix.
    twin: refimpl.ops.linear's `x @ weight.T`"""
    lib = _load()
    if lib is None or not _gemm_ok(x, w, out):
        return np.matmul(x, w.T, out=out)
    M, D = x.shape
    O = w.shape[0]
    lib.cblas_sgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, M, O, D, 1.0, x.ctypes.data, D, w.ctypes.data, D, 0.0,
                    out.ctypes.data, out.strides[0] // 4)
    return out


def matmul_batched(a, b, out, transpose_b=False):
    """out [G, M, N] <- a [G, M, K] @ b [G, K, N] (or b [G, N, K] transposed), one GEMM per g.  twin: np.matmul

    Attention's two products (scores = q k^T, context = probs v) over the G = batch x kv-head stack. With MKL they
    go to cblas_sgemm_batch_strided: NumPy's BLAS would wake its own threads, which then spin beside MKL's."""
    lib = _load()
    G, M, Kd = a.shape
    N = b.shape[1] if transpose_b else b.shape[2]
    ok = (lib is not None and _contiguous_f32(a, b, out) and a.ndim == b.ndim == out.ndim == 3
          and b.shape == ((G, N, Kd) if transpose_b else (G, Kd, N)) and out.shape == (G, M, N) and min(G, M, N, Kd) > 0)
    if not ok:
        return np.matmul(a, b.transpose(0, 2, 1) if transpose_b else b, out=out)
    lib.cblas_sgemm_batch_strided(_ROW_MAJOR, _NO_TRANS, _TRANS if transpose_b else _NO_TRANS, M, N, Kd, 1.0,
                                  a.ctypes.data, Kd, M * Kd, b.ctypes.data, Kd if transpose_b else N, N * Kd, 0.0,
                                  out.ctypes.data, N, M * N, G)
    return out
