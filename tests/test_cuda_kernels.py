"""accel.cuda's numba.cuda kernels against their refimpl twins under Numba's CUDA simulator, over hypothesis shapes.

The simulator must be chosen before Numba is first imported (NUMBA_ENABLE_CUDASIM=1), and a pytest process has
usually imported Numba already (the CPU accel tests). So this module runs in two modes:
  * NUMBA_ENABLE_CUDASIM unset (a plain `pytest`, `pytest -k cuda`): one test, which re-runs this very file in a
    fresh `python -m pytest` subprocess with NUMBA_ENABLE_CUDASIM=1 and fails with its output if it fails;
  * NUMBA_ENABLE_CUDASIM=1 (that subprocess, or you: `NUMBA_ENABLE_CUDASIM=1 pytest tests/test_cuda_kernels.py`):
    the kernel tests themselves, each one of accel/cuda/checks.py's checks on NumPy arrays.
The simulator runs every GPU thread as a Python thread: shapes and example counts are small, and blocks use few
threads (4..64) so that the multi-block and multi-pass paths (rows longer than a block, caches longer than a block
of keys) are exercised. Budget: the subprocess takes ~20-40 s on a 2-core machine.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="accel's CUDA kernels need Numba (pip install 'refimpl[accel]')")

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not SIMULATED:
    def test_cuda_kernels_under_the_simulator():
        """This file's tests in a subprocess with NUMBA_ENABLE_CUDASIM=1 (see the module docstring)."""
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
else:
    import numpy as np
    from hypothesis import given, settings, strategies as st

    from accel.cuda import checks

    SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)
    seeds = st.integers(0, 2**31 - 1)
    threads = st.sampled_from([4, 8, 32])

    def dev(a):
        return np.ascontiguousarray(a)

    host = np.asarray

    @SETTINGS
    @given(seed=seeds, rows=st.integers(1, 3), d=st.integers(1, 70), eps=st.sampled_from([1e-5, 1e-6]), t=threads)
    def test_cuda_rms_norm(seed, rows, d, eps, t):
        checks.check_rms_norm(dev, host, seed, rows, d, eps, t)

    @SETTINGS
    @given(seed=seeds, rows=st.integers(1, 3), d=st.integers(2, 70), affine=st.booleans(), t=threads)
    def test_cuda_layer_norm(seed, rows, d, affine, t):
        checks.check_layer_norm(dev, host, seed, rows, d, affine, t)

    @SETTINGS
    @given(seed=seeds, b=st.integers(1, 2), h=st.integers(1, 3), s=st.integers(1, 3), half=st.integers(1, 8),
           per_row=st.booleans(), t=threads)
    def test_cuda_rope_matches_twin_exactly(seed, b, h, s, half, per_row, t):
        checks.check_rope(dev, host, seed, b, h, s, half, per_row, exact=True, threads=t)

    @settings(max_examples=8, deadline=None, derandomize=True)
    @given(seed=seeds, heads=st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]), head_dim=st.sampled_from([2, 8, 16]),
           length=st.integers(1, 20), batch=st.integers(1, 2), pad=st.booleans(), spare=st.integers(0, 3),
           t=st.sampled_from([4, 8]))
    def test_cuda_attention_decode_gqa_online_softmax(seed, heads, head_dim, length, batch, pad, spare, t):
        checks.check_attention_decode(dev, host, seed, heads, head_dim, length, batch, pad, spare, t)

    @SETTINGS
    @given(seed=seeds, rows=st.integers(1, 3), f=st.integers(1, 40), act=st.sampled_from(["silu", "gelu", "gelu_new",
                                                                                          "relu"]), t=threads)
    def test_cuda_gated_act(seed, rows, f, act, t):
        checks.check_gated_act(dev, host, seed, rows, f, act, t)

    @pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new", "silu"])
    def test_cuda_activation(act):
        checks.check_activation(dev, host, 0, 2, 33, act, 32)

    @SETTINGS
    @given(seed=seeds, rows=st.integers(1, 2), d=st.integers(1, 80), o=st.integers(1, 6), bias=st.booleans(),
           add=st.booleans(), t=threads)
    def test_cuda_linear_q8_dequantises_on_the_fly(seed, rows, d, o, bias, add, t):
        checks.check_linear_q8(dev, host, seed, rows, d, o, bias, add, t)

    def test_cuda_kernels_run_on_the_simulator():
        from numba import cuda
        from numba.cuda import simulator

        assert cuda.jit is simulator.jit  # the simulator, not a device
