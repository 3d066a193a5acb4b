"""accel: refimpl's maths, fast. Numba CPU kernels (accel/cpu/), numba.cuda + CuPy kernels (accel/cuda/), weight
storage formats (fp16, bf16, int8 as Q8_0 blocks), a preallocated KV cache.

    import refimpl
    model = refimpl.load("path", backend="numba", weights="int8", threads=2)
    model(input_ids=[[1, 17, 42]]).logits          # the same call, outputs and generate() as refimpl's model

The seam: refimpl reaches accel only through refimpl.accel_package(), which load(backend="numba" | "cuda") and the
CLI's inspect / bench use, and only through the functions below. accel imports refimpl (its classes, argument
checks, heads and generate loop are refimpl's own code). The layout mirrors refimpl op for op:

    refimpl/ops.py                 accel/cpu/ops.py         accel/cuda/ops.py         (norms, RoPE, activations)
    refimpl.ops.linear             accel/cpu/linear.py      accel/cuda/linear.py      (weights, products)
    refimpl.llama.attention        accel/cpu/attention.py   accel/cuda/attention.py   (decode kernel, any plan)
    refimpl.llama.llama_model ...  accel/cpu/forward.py     accel/cuda/forward.py     (the stacks)
and, shared by both backends: formats.py (formats, codes, conversions), packing.py (the one packer), kv_cache.py,
plan.py (which attention path), models.py (the classes, made by one factory), generate.py (generate's hooks),
convert.py and loader.py (the numba backend's weight cache). Importing this package needs NumPy only; Numba is
imported when a model is loaded (the `accel` extra).
"""
from __future__ import annotations

import numpy as np

from refimpl import ConfigError

from .formats import FORMATS, WEIGHT_FORMATS, check_format

BACKENDS = tuple(FORMATS)


def numba_available():
    """(True, version) when Numba imports, else (False, the reason)."""
    try:
        import numba
    except ImportError as exc:
        return False, str(exc)
    return True, numba.__version__


def load(path, dtype=np.float32, backend="numba", weights="fp32", threads=None, cache_dir=None):
    """A checkpoint folder -> refimpl's class for it, computing on accel's kernels.

    weights: storage of the matrices (accel.formats.FORMATS[backend]): "fp32" (as loaded), "fp16", "bf16", or
      "int8" (Q8_0 blocks of 32), converted once here; or "gguf" (numba, a .gguf file): each matrix as the file stores
      it (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K blocks computed on in place). Compute and outputs are float32.
    threads: Numba's (and, with threadpoolctl installed, BLAS's) thread count; None = the cores this process may
        use (its CPU affinity, capped by a cgroup CPU quota).
    cache_dir: where converted weights are saved; a later load of the same checkpoint and format memory-maps them.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r}: accel provides {', '.join(BACKENDS)}")
    check_format(weights, backend)
    if backend == "cuda":
        from .cuda.device import check_cuda

        ok, reason = check_cuda()
        if not ok:
            raise ConfigError(f"backend='cuda' is not usable here: {reason}")
        from .cuda.forward import load_cuda

        return load_cuda(path, dtype, weights, cache_dir, threads)
    if np.dtype(dtype) != np.float32:
        raise ConfigError(f"dtype={np.dtype(dtype).name}: accel computes in float32 (float64 audit mode is refimpl's: "
                          "backend='numpy')")
    check_format(weights, backend)
    if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be a positive integer (or None for the cores this process may use)")
    ok, reason = numba_available()
    if not ok:
        raise ConfigError(f"backend='numba' needs Numba (pip install 'refimpl[accel]'): {reason}")
    from .loader import load_model

    return load_model(path, weights, threads, cache_dir)


# --- what refimpl's CLI asks of accel (refimpl.inspect, refimpl.bench, refimpl.cli_common) -------------------------

def default_threads():
    """The numba backend's thread count when none is given: the cores this process may use."""
    from .cpu.jit import default_threads as threads

    return threads()


def kernels_cached():
    """Whether Numba has compiled kernels of accel/cpu/ cached (else the first load compiles, ~1 minute)."""
    from .cpu.jit import kernels_cached as cached

    return cached()


def blas_provider():
    """(kind, reason): which library computes the numba backend's prompt GEMMs ("mkl" or NumPy's BLAS)."""
    from .cpu.blas import provider

    return provider()


def check_cuda():
    """(usable, reason) for backend="cuda" on this machine."""
    from .cuda.device import check_cuda as check

    return check()


__all__ = ["load", "numba_available", "default_threads", "kernels_cached", "blas_provider", "check_cuda", "BACKENDS",
           "WEIGHT_FORMATS", "FORMATS"]
