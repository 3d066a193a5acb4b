"""accel on the CPU: Numba kernels (the twins of refimpl/ops.py and the stacks of refimpl/llama.py, refimpl/opt.py)."""
