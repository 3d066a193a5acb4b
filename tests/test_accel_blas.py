"""accel.blas: the prompt path's GEMMs (MKL's sgemm through ctypes when the `mkl` wheel is installed, else NumPy).

Tolerance: two float32 sums of the same K products in different orders differ by at most K * eps * sum|a_j b_j|
(tests/test_accel_kernels.py's dot bound); MKL and NumPy's OpenBLAS block the sums differently, so that bound,
per output element, against a float64 reference. Outputs are float32, written into the caller's buffer.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("numba", reason="accel needs Numba (pip install 'refimpl[accel]')")

from refimpl_accel.cpu import blas  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = float(np.finfo(np.float32).eps)
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def within_dot_bound(ours, a, b_t):
    """ours [.., M, N] against a [.., M, K] @ b_t[.., N, K]^T in float64, inside K eps (|a| @ |b_t|^T)."""
    exact = np.matmul(a.astype(np.float64), np.swapaxes(b_t, -1, -2).astype(np.float64))
    bound = a.shape[-1] * EPS * np.matmul(np.abs(a).astype(np.float64), np.abs(np.swapaxes(b_t, -1, -2)))
    return np.all(np.abs(ours - exact) <= bound + 1e-30)


@SETTINGS
@given(seed=st.integers(0, 2**31), m=st.integers(1, 70), k=st.integers(1, 90), n=st.integers(1, 70))
def test_matmul_nt_is_x_times_w_transposed(seed, m, k, n):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, m, k), randn(rng, n, k)
    out = np.full((m, n), np.nan, np.float32)
    result = blas.matmul_nt(x, w, out)
    assert result is out and out.dtype == np.float32
    assert within_dot_bound(out, x, w)


@SETTINGS
@given(seed=st.integers(0, 2**31), g=st.integers(1, 5), m=st.integers(1, 40), k=st.integers(1, 40),
       n=st.integers(1, 40), transpose_b=st.booleans())
def test_matmul_batched_is_one_product_per_stack_entry(seed, g, m, k, n, transpose_b):
    rng = np.random.default_rng(seed)
    a = randn(rng, g, m, k)
    b = randn(rng, g, n, k) if transpose_b else randn(rng, g, k, n)
    out = np.full((g, m, n), np.nan, np.float32)
    result = blas.matmul_batched(a, b, out, transpose_b=transpose_b)
    assert result is out and out.dtype == np.float32
    assert within_dot_bound(out, a, b if transpose_b else np.swapaxes(b, 1, 2))


def test_views_and_other_layouts_fall_back_to_numpy_with_the_same_result():
    rng = np.random.default_rng(3)
    x = randn(rng, 9, 40)[:, ::2]  # not contiguous: MKL's call would read the wrong elements
    w = randn(rng, 7, 20)
    out = np.empty((9, 7), np.float32)
    np.testing.assert_array_equal(blas.matmul_nt(x, w, out), np.matmul(x, w.T))


def test_mkl_is_used_when_installed():
    """When the mkl wheel is installed, the prompt path really runs on it (else this test says why not)."""
    kind, reason = blas.provider()
    if blas._find_mkl_rt() is None:
        assert kind == "numpy" and "not installed" in reason
        pytest.skip("MKL is not installed here (pip install 'refimpl[mkl]')")
    if os.environ.get("REFIMPL_BLAS", "auto").lower() == "numpy":
        pytest.skip("REFIMPL_BLAS=numpy is set")
    assert kind == "mkl", reason


def test_refimpl_blas_numpy_turns_mkl_off():
    code = "from refimpl_accel.cpu import blas; print(blas.provider()[0])"
    env = dict(os.environ, REFIMPL_BLAS="numpy", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "numpy", done.stderr
