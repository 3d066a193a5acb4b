"""accel: refimpl's maths, fast. Numba CPU kernels, int8 / fp16 / bf16 weight storage, a preallocated KV cache.

    import refimpl
    model = refimpl.load("path", backend="numba", weights="int8", threads=2)   # or accel.load(...)
    model(input_ids=[[1, 17, 42]]).logits          # the same call, outputs and generate() as refimpl's model

accel imports refimpl; refimpl imports accel only to hand over (refimpl.load(backend="numba") -> accel.load).
Each kernel in kernels_cpu.py, quant.py and sampling.py names the refimpl function it reproduces and is tested
against it. Importing this package needs NumPy only; Numba is imported when a model is loaded (the `accel` extra).
"""
from __future__ import annotations

import numpy as np

from refimpl import ConfigError

BACKENDS = ("numba", "cuda")
WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8")


def numba_available():
    """(True, version) when Numba imports, else (False, the reason)."""
    try:
        import numba
    except ImportError as exc:
        return False, str(exc)
    return True, numba.__version__


def load(path, dtype=np.float32, backend="numba", weights="fp32", threads=None, cache_dir=None):
    """A checkpoint folder -> refimpl's class for it, computing on accel's kernels.

    weights: storage of the matrices: "fp32" (as loaded), "fp16", "bf16", or "int8" (Q8_0 blocks of 32), converted
      once here; compute and outputs are float32 whatever the storage.
    threads: Numba's (and, with threadpoolctl installed, BLAS's) thread count; None = the cores this process may
        use (its CPU affinity, capped by a cgroup CPU quota).
    cache_dir: where converted weights are saved; a later load of the same checkpoint and format memory-maps them.
    """
    if backend == "cuda":
        from .cuda.device import check_cuda

        ok, reason = check_cuda()
        if not ok:
            raise ConfigError(f"backend='cuda' is not usable here: {reason}")
        from .cuda.model import load_cuda

        return load_cuda(path, dtype, weights, cache_dir, threads)
    if backend != "numba":
        raise ConfigError(f"backend={backend!r}: accel provides {', '.join(BACKENDS)}")
    if np.dtype(dtype) != np.float32:
        raise ConfigError(f"dtype={np.dtype(dtype).name}: accel computes in float32 (float64 audit mode is refimpl's: "
                          "backend='numpy')")
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weights={weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be a positive integer (or None for the cores this process may use)")
    ok, reason = numba_available()
    if not ok:
        raise ConfigError(f"backend='numba' needs Numba (pip install 'refimpl[accel]'): {reason}")
    from .loader import load_model

    return load_model(path, weights, threads, cache_dir)


__all__ = ["load", "numba_available", "BACKENDS", "WEIGHT_FORMATS"]
