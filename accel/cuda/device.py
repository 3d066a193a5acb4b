"""Whether backend="cuda" can run here, and why not: CuPy (device arrays, cuBLAS), Numba's CUDA target, a device.

Nothing here raises: check_cuda() returns (usable, reason) so that accel.load can raise refimpl.ConfigError with
the reason, and `refimpl inspect` can print it.
"""
from __future__ import annotations

import os


def check_cuda():
    """(True, "<device name>, compute capability X.Y, N MiB") when backend="cuda" is usable, else (False, reason)
    naming what is missing: CuPy not installed, Numba not installed, no CUDA device (or driver), or Numba running
    its CUDA simulator (NUMBA_ENABLE_CUDASIM=1: kernels would run as Python, for tests only)."""
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed (pip install cupy-cuda12x): {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy raises CUDARuntimeError without a driver
        return False, f"no CUDA device: CuPy found no driver or device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "no CUDA device: CuPy sees 0 devices"
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        return False, f"Numba is not installed (pip install 'refimpl[accel]'): {exc}"
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return False, "NUMBA_ENABLE_CUDASIM=1: Numba's CUDA kernels would run on the simulator, not the device"
    try:
        from numba import cuda

        if not cuda.is_available():
            return False, "no CUDA device: Numba's CUDA target finds no usable device or driver (see numba -s)"
    except Exception as exc:
        return False, f"Numba's CUDA target failed to start: {type(exc).__name__}: {exc}"
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return True, (f"{name}, compute capability {props['major']}.{props['minor']}, "
                  f"{props['totalGlobalMem'] // 2**20} MiB")


def bandwidth_limit(props):
    """Peak DRAM bandwidth in bytes/s from cupy.cuda.runtime.getDeviceProperties(): 2 (double data rate) x memory
    clock (kHz) x bus width (bits) / 8. The ceiling a decode step (reading every weight once) cannot beat."""
    return 2.0 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8.0
