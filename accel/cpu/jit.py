"""The one place accel imports Numba: njit with the project's defaults, prange, and the thread count.

Every kernel is compiled with cache=True (the machine code is kept in __pycache__, so only the first process on a
machine pays the compile) and nogil=True. FASTMATH lets LLVM reorder a sum into SIMD lanes, as BLAS does; it keeps
inf and nan (no "nnan"/"ninf"), because masked scores are finfo.min and removed tokens are -inf.
"""
from __future__ import annotations

import hashlib
import os

# OpenMP threads that finish a parallel region sleep at once (PASSIVE) instead of spinning first (GNU OpenMP spins
# ~300k iterations by default). A spinning thread holds a core that another process, or the other half of the next
# parallel region, needs: with one of two cores busy, 110M-shape decode was barely faster than one thread and the
# 15M shape fell from 151 tok/s (one thread) to 10 (bench/bench_decode.py, docs/accel.md "A busy machine").
# It must be set before libgomp loads (Numba's omp threading layer, MKL's GNU layer); a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import prange  # noqa: E402, F401  (re-exported for the kernel modules)

FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
JIT_DISABLED = bool(int(os.environ.get("NUMBA_DISABLE_JIT", "0") or 0))


def drop_stale_cache(here=None):
    """Numba keys a cached function on its own file only: forward.py's cached machine code keeps an old copy of a
    kernel of linear.py after linear.py changes (a 7B fp16 decode kept running the old kernel, 2x slower). So when
    any file of accel/cpu/ changes, every cached entry of it is dropped and compiled anew."""
    here = here or os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(here) if n.endswith(".py")):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    cache, stamp = os.path.join(here, "__pycache__"), digest.hexdigest()
    marker = os.path.join(cache, "kernels.sha256")
    try:
        with open(marker, encoding="ascii") as f:
            if f.read() == stamp:
                return
    except OSError:
        pass
    try:
        os.makedirs(cache, exist_ok=True)
        for name in os.listdir(cache):
            if name.endswith((".nbi", ".nbc")):
                os.unlink(os.path.join(cache, name))
        with open(marker, "w", encoding="ascii") as f:
            f.write(stamp)
    except OSError:  # a read-only install: Numba then caches elsewhere or not at all
        pass


drop_stale_cache()


def kernel_cache_dir():
    """The folder where Numba keeps accel's compiled kernels: accel/cpu/__pycache__, or where NUMBA_CACHE_DIR or a
    read-only install sends them (Numba's own locator decides, as for every kernel). None under NUMBA_DISABLE_JIT."""
    if JIT_DISABLED:
        return None

    def probe():  # never compiled: a cached dispatcher locates its cache folder when it is made
        return 0

    return njit()(probe)._cache.cache_path


def kernels_cached():
    """True when Numba's on-disk cache already holds compiled accel kernels, so a load runs without the ~20 s
    compile of a first run on this machine (the CLI says so before a cold one). Call after import (drop_stale_cache
    has then emptied a stale cache). True under NUMBA_DISABLE_JIT (nothing compiles)."""
    try:
        folder = kernel_cache_dir()
    except (OSError, RuntimeError):  # no folder Numba may cache in: every run compiles
        return False
    if folder is None:
        return True
    try:
        return any(name.endswith(".nbi") for name in os.listdir(folder))
    except OSError:
        return False


def njit(parallel=False, fastmath=False, inline="never"):
    """numba.njit(cache=True, nogil=True, error_model="numpy", ...): lazy, so a kernel compiles (or loads from the
    cache) on first use. error_model="numpy": a float division by zero gives inf or nan, as in the NumPy twin, instead
    of raising ZeroDivisionError; it also drops the zero check that kept LLVM from vectorising loops that divide.
    inline="always" splices a helper into its caller in Numba's IR (LLVM inlines small helpers anyway)."""
    return numba.njit(cache=True, nogil=True, error_model="numpy", parallel=parallel, fastmath=fastmath,
                      inline=inline)


def max_threads():
    """The threads Numba started with (NUMBA_NUM_THREADS, all cores by default)."""
    return numba.config.NUMBA_NUM_THREADS


def cgroup_cpu_limit(root="/sys/fs/cgroup"):
    """The CPU quota of this process's cgroup in cores (a container's --cpus), or None when there is none."""
    try:  # cgroup v2: "quota period" or "max period"
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: quota -1 means none
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores():
    """The cores this process may run on: its CPU affinity (taskset, numactl), capped by a cgroup quota, >= 1.
    os.cpu_count() counts the machine's cores, which a container or a pinned process may not have."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, int(limit + 0.999)))
    return max(1, cores)


def default_threads():
    """Threads when the caller gives none: the cores this process may use (at most Numba's pool)."""
    return min(max_threads(), available_cores())


def set_threads(n):
    """Numba's thread count for kernels called from this Python thread (at most max_threads())."""
    numba.set_num_threads(max(1, min(int(n), max_threads())))


if JIT_DISABLED:
    def f32_from_bits(bits):
        """The float32 whose bit pattern is the int32 `bits` (plain Python under NUMBA_DISABLE_JIT=1)."""
        return np.array(bits, np.int32).view(np.float32)[()]

    def f32_from_half_bits(bits):
        """The float32 value of the IEEE half whose bit pattern is `bits` (plain Python under NUMBA_DISABLE_JIT=1)."""
        return np.float32(np.array(bits, np.uint16).view(np.float16)[()])
else:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def f32_from_bits(typingctx, bits):
        """The float32 whose bit pattern is the int32 `bits` (an integer argument is cast to int32 first): one
        bitcast, which LLVM vectorises (NumPy's .view(np.float32) for a scalar, inside a kernel)."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.int32), codegen

    @intrinsic
    def f32_from_half_bits(typingctx, bits):
        """The float32 value of the IEEE half whose bit pattern is the uint16 `bits`, exactly (subnormals, inf and
        NaN included): LLVM's fpext from half, which is one vcvtph2ps for 8 or 16 lanes on x86 with F16C. Numba
        has no float16 type; the bit-arithmetic widening it replaces was the bottleneck of fp16 decode."""
        if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
            return None

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(bits), codegen
