"""support.cuda_sampling (top-k / top-p sampling on the device) against its host twin support.numba_sampling.sample_row, under
Numba's CUDA simulator, token for token on the same u.

Two modes, as tests/test_backend_ops.py (see its docstring): without NUMBA_ENABLE_CUDASIM one test re-runs this
file in a subprocess with NUMBA_ENABLE_CUDASIM=1; with it, the tests below run tests/support/cuda_sampling_checks.py's
checks on NumPy arrays. The simulator runs every GPU thread as a Python thread and its block manager polls them
while holding the GIL: the simulated mode lowers the interpreter's switch interval (sys.setswitchinterval, this
subprocess only), which makes a launch ~5x faster, and blocks use 1..8 threads (the multi-thread reductions, scan
and chunked draw with rows longer than a block). Budget: the subprocess takes ~20-30 s on a 2-core machine.

The simulator creates a block's shared array when the first thread reaches cuda.shared.array(): it looks the call
site up in a dict and stores a new array there when missing, without a lock. Two simulated threads between the
look-up and the store each get an array of their own, and the block's reductions disagree between threads (forced by
widening that window: a wrong token on every launch). Before the lock, about one run in 15 hung with one thread
left alone in a bisection loop, the others gone (the kernel's loops are bounded since, so it would now be a wrong
token instead). The simulated mode installs a locked version of that one method (_lock_simulator_shared_arrays),
which is also faster (it reads the caller's frame instead of extracting the whole stack); real devices have no
such step.
"""
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("numba", reason="accel's CUDA kernels need Numba (pip install 'refimpl[accel]')")

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not SIMULATED:
    def test_cuda_sampling_under_the_simulator():
        """This file's tests in a subprocess with NUMBA_ENABLE_CUDASIM=1 (see the module docstring)."""
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "faulthandler_timeout=240",
                   os.path.abspath(__file__)]  # a hang prints every thread's stack
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        print(f"simulated sampling tests: {seconds:.1f} s")
else:
    def _lock_simulator_shared_arrays():
        """Numba's simulator FakeCUDAShared.array (one array per call site and launch), with the look-up and the
        store under one lock (see the module docstring). The key is the caller's (file, line), as the original's."""
        import threading

        import numpy as np
        from numba.core import types
        from numba.cuda.simulator import kernelapi
        from numba.np import numpy_support

        original = kernelapi.FakeCUDAShared.array
        if "_allocations" not in vars(kernelapi.FakeCUDAShared(0)):
            return  # another simulator layout: leave it alone
        lock = threading.Lock()

        def array(self, shape, dtype):
            if shape == 0:  # dynamic shared memory: one buffer, no per-site allocation
                return original(self, shape, dtype)
            caller = sys._getframe(1)
            site = (caller.f_code.co_filename, caller.f_lineno)
            with lock:
                found = self._allocations.get(site)
                if found is None:
                    found = np.empty(shape, numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype)
                    self._allocations[site] = found
            return found

        kernelapi.FakeCUDAShared.array = array

    _lock_simulator_shared_arrays()
    sys.setswitchinterval(1e-4)

    import numpy as np
    from hypothesis import Phase, given, settings, strategies as st

    from support import cuda_sampling as S
    from support import cuda_sampling_checks as checks
    from refimpl import ConfigError

    seeds = st.integers(0, 2**31 - 1)
    threads = st.sampled_from([1, 2, 4, 8])

    def dev(a):
        return np.ascontiguousarray(a)

    host = np.asarray

    # no shrinking: a simulated launch takes ~0.1 s and a failure's message already prints the row
    @settings(max_examples=150, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate))
    @given(seed=seeds, rows=st.integers(1, 3), vocab=st.one_of(st.integers(1, 12), st.integers(13, 300)),
           top_k=st.sampled_from([0, 1, 2, "over"]), top_p=st.sampled_from([1.0, 0.9, 0.5, 1e-3]),
           kind=st.sampled_from(checks.KINDS), edge_u=st.booleans(), t=threads)
    def test_cuda_sample_equals_host_twin(seed, rows, vocab, top_k, top_p, kind, edge_u, t):
        k = vocab + 3 if top_k == "over" else top_k
        checks.check_random(dev, host, seed, rows, vocab, k, top_p, kind, t, edge_u)

    @pytest.mark.parametrize("t", [1, 4])
    def test_cuda_sample_ties_on_the_top_k_and_top_p_boundaries(t):
        paths = checks.check_boundary_ties(dev, host, t)
        # the flat rows put u * total exactly on a prefix sum: both draw paths are exercised, and agree with the host
        assert {S.PARALLEL, S.SERIAL} <= set(int(p) for p in paths)

    def test_cuda_sample_edges():
        checks.check_edges(dev, host, 2)

    def test_cuda_sample_u_on_a_boundary_takes_the_serial_draw():
        """Four equal weights, u = 0.5: u * total = 2.0 is exactly the prefix sum after token 1, where a parallel
        sum cannot tell > from = within its rounding bound; the serial loop (the host's) says token 2."""
        scores = np.zeros((3, 4), np.float32)
        tokens, path = checks.check_sample(dev, host, scores, 0, 1.0, np.array([0.5, 0.3, 0.0]), 4)
        assert tokens.tolist() == [2, 1, 0]
        assert path.tolist() == [S.SERIAL, S.PARALLEL, S.SERIAL]  # u = 0: target 0, on the prefix before token 0

    @pytest.mark.parametrize("seed", range(3))
    def test_cuda_sample_parallel_rounding_falls_back_to_the_serial_draw(seed):
        """A row and u where the kernel's parallel prefix sums, taken at face value, would pick another token than
        the host's sequential ones (u * total between the two roundings of a prefix): the margin check sends the
        row to the serial draw, which picks the host's token."""
        scores, u = checks.rounding_case(seed, vocab=16, threads=4)
        tokens, path = checks.check_sample(dev, host, scores, 0, 1.0, u, 4)
        assert path.tolist() == [S.SERIAL]

    def test_cuda_sample_rng_consumes_the_generator_as_the_host():
        """sample_rng draws u as support.numba_sampling.sample (rng.random((B, 1))): the same seed gives the same tokens,
        step after step."""
        from support.numba_sampling import sample as host_sample

        rng = np.random.default_rng(11)
        ours, theirs = np.random.default_rng(7), np.random.default_rng(7)
        for step in range(3):
            scores = checks.make_scores(rng, "normal", 2, 40 + step)
            got = S.sample_rng(scores, 5, 0.9, ours, np, threads=4)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, host_sample(scores, 5, 0.9, theirs))
        assert ours.random() == theirs.random()

    def test_cuda_sample_launcher_contract():
        scores = np.zeros((2, 3), np.float32)
        out = np.full(2, -1, np.int64)
        assert S.sample(scores, 0, 1.0, np.array([[0.1], [0.9]]), out=out, threads=2) is out  # u [B, 1] accepted
        assert out.tolist() == [0, 2]
        assert S.sample(np.zeros((0, 3), np.float32), 0, 1.0, np.zeros(0)).shape == (0,)
        strided = np.zeros((2, 3, 4), np.float32)[:, 1]  # a [B, V] view of [B, S, V] logits
        assert S.sample(strided, 0, 1.0, np.array([0.99, 0.0]), threads=2).tolist() == [3, 0]
        with pytest.raises(ConfigError):
            S.sample(scores.astype(np.float64), 0, 1.0, np.zeros(2))
        with pytest.raises(ConfigError):
            S.sample(np.zeros((2, 0), np.float32), 0, 1.0, np.zeros(2))
        with pytest.raises(ConfigError):
            S.sample(scores, 0, 1.0, np.zeros(3))
        with pytest.raises(ConfigError):
            S.sample(scores, 0, 1.0, np.zeros(2), threads=3)
        with pytest.raises(TypeError):
            S.sample(scores.tolist(), 0, 1.0, np.zeros(2))

    def test_cuda_sampling_runs_on_the_simulator():
        from numba import cuda
        from numba.cuda import simulator

        assert cuda.jit is simulator.jit
