"""accel: fast kernels for refimpl (Numba on CPU, CuPy/Numba-CUDA on GPU).

Empty for now: the accelerated paths are issues of their own. accel imports refimpl, never the reverse.
"""
