"""On a real GPU: support.cuda_sampling against its host twin support.numba_sampling.sample_row (tests/support/cuda_sampling_checks.py
with CuPy arrays), at real vocabulary sizes and block sizes, plus a timing. Skipped unless CuPy finds a device
(accel.cuda.device.check_cuda), as tests/test_cuda_device.py. Run with the other device tests:

    pytest tests/ -k cuda -v

Token-for-token equality is expected here too: the draw's margin check covers a device exp() that differs from the
host's libm by an ulp. What can legitimately differ (tests/support/cuda_sampling.py's docstring: a top-p cumulative mass
within float64 rounding of 1 - top_p) has a chance of order 1e-11 per row at these sizes.
"""
import os
import time

import numpy as np
import pytest

pytest.importorskip("numba", reason="accel's CUDA kernels need Numba")
pytest.importorskip("cupy", reason="the GPU checks need CuPy and a device")
if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    pytest.skip("NUMBA_ENABLE_CUDASIM=1: this module is for a real device", allow_module_level=True)

from refimpl_accel.cuda.device import check_cuda  # noqa: E402

USABLE, REASON = check_cuda()
if not USABLE:
    pytest.skip(f"no usable GPU backend: {REASON}", allow_module_level=True)

import cupy  # noqa: E402

from support import cuda_sampling as S  # noqa: E402
from support import cuda_sampling_checks as checks  # noqa: E402
from support.numba_sampling import sample as host_sample  # noqa: E402

dev, host = cupy.asarray, cupy.asnumpy
VOCABS = (32000, 50272, 128256)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("threads", [32, 128, 256])
@pytest.mark.parametrize("kind", checks.KINDS)
def test_cuda_device_sample_equals_host_twin(vocab, threads, kind):
    for seed, (top_k, top_p) in enumerate([(0, 1.0), (50, 1.0), (0, 0.9), (40, 0.95), (1, 0.5), (vocab + 1, 1e-3),
                                           (0, 0.5)]):
        for edge_u in (False, True):
            checks.check_random(dev, host, seed, 4, vocab, top_k, top_p, kind, threads, edge_u)


@pytest.mark.parametrize("threads", [1, 32, 256])
def test_cuda_device_sample_boundaries_and_edges(threads):
    paths = checks.check_boundary_ties(dev, host, threads)
    assert {S.PARALLEL, S.SERIAL} <= set(int(p) for p in paths)
    checks.check_edges(dev, host, threads)


@pytest.mark.parametrize("seed", range(3))
def test_cuda_device_sample_parallel_rounding_falls_back_to_the_serial_draw(seed):
    """u * total within a few ulps of a prefix sum: the serial draw. Its token is the host's when the device's
    exp() gave the host's weights bit for bit (CUDA's exp is within 1 ulp, not always correctly rounded): the one
    case the module docstring names where a device may differ, so it is only asserted then."""
    from support.numba_sampling import _weights

    scores, u = checks.rounding_case(seed, vocab=16, threads=4)
    weight, path = cupy.empty((1, 16), np.float64), cupy.empty(1, np.int8)
    tokens = S.sample(dev(scores), 0, 1.0, dev(u), threads=4, path=path, weight=weight)
    assert int(host(path)[0]) == S.SERIAL
    expected_weight = np.empty(16)
    _weights(scores[0], np.float32(-np.inf), expected_weight)
    if not np.array_equal(host(weight)[0], expected_weight):
        pytest.skip("this device's exp() differs from the host's in the last bit for this row")
    np.testing.assert_array_equal(host(tokens), checks.reference(scores, 0, 1.0, u))


def test_cuda_device_sample_rng_is_the_host_stream():
    rng = np.random.default_rng(3)
    ours, theirs = np.random.default_rng(9), np.random.default_rng(9)
    for step in range(5):
        scores = checks.make_scores(rng, "normal", 3, 32000)
        got = S.sample_rng(dev(scores), 40, 0.9, ours, cupy)
        np.testing.assert_array_equal(got, host_sample(scores, 40, 0.9, theirs))


def test_cuda_device_sample_timing():
    """Microseconds per launch at B = 1 and 8, V = 128256 (Llama 3), for the record (-s prints them)."""
    rng = np.random.default_rng(0)
    for rows in (1, 8):
        scores = dev(checks.make_scores(rng, "normal", rows, 128256))
        u = dev(rng.random(rows))
        out, weight = cupy.empty(rows, np.int64), cupy.empty((rows, 128256), np.float64)
        for top_k, top_p in ((0, 1.0), (50, 1.0), (0, 0.9), (50, 0.9)):
            S.sample(scores, top_k, top_p, u, out=out, weight=weight)  # compile
            cupy.cuda.Device().synchronize()
            start = time.perf_counter()
            for _ in range(20):
                S.sample(scores, top_k, top_p, u, out=out, weight=weight)
            cupy.cuda.Device().synchronize()
            print(f"B={rows} top_k={top_k} top_p={top_p}: {(time.perf_counter() - start) / 20 * 1e6:.0f} us")
