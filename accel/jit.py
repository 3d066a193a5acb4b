"""The one place accel imports Numba: njit with the project's defaults, prange, and the thread count.

Every kernel is compiled with cache=True (the machine code is kept in __pycache__, so only the first process on a
machine pays the compile) and nogil=True. FASTMATH lets LLVM reorder a sum into SIMD lanes, as BLAS does; it keeps
inf and nan (no "nnan"/"ninf"), because masked scores are finfo.min and removed tokens are -inf.
"""
from __future__ import annotations

import os

import numba
from numba import prange  # noqa: F401  (re-exported for the kernel modules)

FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
JIT_DISABLED = bool(int(os.environ.get("NUMBA_DISABLE_JIT", "0") or 0))


def njit(parallel=False, fastmath=False):
    """numba.njit(cache=True, nogil=True, ...): lazy, so a kernel compiles (or loads from the cache) on first use."""
    return numba.njit(cache=True, nogil=True, parallel=parallel, fastmath=fastmath)


def max_threads():
    """The threads Numba started with (NUMBA_NUM_THREADS, all cores by default)."""
    return numba.config.NUMBA_NUM_THREADS


def set_threads(n):
    """Numba's thread count for kernels called from this Python thread (at most max_threads())."""
    numba.set_num_threads(max(1, min(int(n), max_threads())))
