"""backend="cuda"'s forward (accel/cuda/model.py) on golden checkpoints, with NumPy as the array module and the
numba.cuda kernels on Numba's CUDA simulator; and the clear error when backend="cuda" cannot run here.

As tests/test_cuda_kernels.py: without NUMBA_ENABLE_CUDASIM set, one test re-runs this file in a subprocess with
NUMBA_ENABLE_CUDASIM=1 (the simulator must be chosen before Numba is imported); the error tests run in both.
Kernels launch with 8 threads a block here (kernels.THREADS) to keep the simulator's Python threads few.

Tolerance: ATOL = 1e-5 on logits, refimpl's golden tolerance. The composition is refimpl's step order in float32;
only sums are taken in another order (tree reductions in the norms, the int8 matvec; blockwise online softmax;
BLAS vs NumPy matmul), each a few float32 ulps of the tiny golden models' activations (observed ~1e-6).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import refimpl
from refimpl import ConfigError

pytest.importorskip("numba", reason="accel's CUDA kernels need Numba (pip install 'refimpl[accel]')")

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "golden", "models")
ATOL = 1e-5


def test_cuda_check_names_what_is_missing():
    from accel.cuda.device import check_cuda

    ok, reason = check_cuda()
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert not ok and "CuPy is not installed" in reason
        return
    if SIMULATED:
        assert not ok and "NUMBA_ENABLE_CUDASIM" in reason


def test_cuda_backend_raises_config_error_with_the_reason_when_unusable():
    from accel.cuda.device import check_cuda

    ok, reason = check_cuda()
    if ok:
        pytest.skip("a GPU backend is usable here: tests/test_cuda_device.py covers it")
    with pytest.raises(ConfigError, match="backend='cuda' is not usable here") as info:
        refimpl.load(os.path.join(MODELS, "llama_mha"), backend="cuda")
    assert reason in str(info.value)


if not SIMULATED:
    def test_cuda_model_under_the_simulator():
        """This file's tests in a subprocess with NUMBA_ENABLE_CUDASIM=1 (see the module docstring)."""
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
else:
    from accel.cuda import kernels
    from accel.cuda.model import CudaLlama
    from accel.quant import dequantize_q8_0, quantize_q8_0

    kernels.THREADS = 2

    def reference(case):
        return refimpl.load(os.path.join(MODELS, case))

    @pytest.mark.parametrize("case", ["llama_mha", "llama_gqa_bias", "openllama_default"])
    def test_cuda_forward_prompt_then_decode_equals_refimpl(case):
        """A 4-token prompt (xp attention), then one decode step (the cache kernel) = refimpl's logits for all 5."""
        ref = reference(case)
        model = CudaLlama(reference(case), "fp32", np)
        ids = np.array([[1, 17, 42, 5, 9], [3, 8, 2, 11, 4]])
        cache = model.new_cache(2, 6)
        prompt, step = model(ids[:, :4], cache), model(ids[:, 4:], cache)
        expected = ref(input_ids=ids).logits
        assert prompt.dtype == np.float32 and step.dtype == np.float32
        np.testing.assert_allclose(prompt, expected[:, :4], rtol=0, atol=ATOL)
        np.testing.assert_allclose(step, expected[:, 4:], rtol=0, atol=ATOL)

    @pytest.mark.skipif(os.environ.get("REFIMPL_CUDASIM_SLOW", "0") in ("", "0"),
                        reason="~45 s on the simulator (one block per output row): REFIMPL_CUDASIM_SLOW=1 runs it; "
                               "tests/test_cuda_device.py runs it on a GPU; test_cuda_kernels checks the kernel")
    def test_cuda_int8_decode_equals_refimpl_on_the_dequantised_weights():
        """int8 storage: the decode step's products run in the on-the-fly Q8_0 kernel; the reference is refimpl
        with every matrix replaced by its Q8_0 round trip (so only summation order differs)."""
        ref = reference("llama_mha")
        for layer in ref.params["layers"]:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                layer[name] = dequantize_q8_0(*quantize_q8_0(layer[name]))
        for name in ("embed_tokens", "lm_head"):
            if name in ref.params:
                ref.params[name] = dequantize_q8_0(*quantize_q8_0(ref.params[name]))
        model = CudaLlama(reference("llama_mha"), "int8", np)
        ids = np.array([[1, 17, 42, 5, 9, 4]])  # a 5-token prompt: > SMALL_M rows, dequantised on the device
        cache = model.new_cache(1, 6)
        prompt = model(ids[:, :5], cache)
        step = model(ids[:, 5:], cache)  # one row: kernels.linear_q8 (the simulator's slowest part: ~1 block a row)
        expected = ref(input_ids=ids).logits
        np.testing.assert_allclose(prompt, expected[:, :5], rtol=0, atol=ATOL)
        np.testing.assert_allclose(step, expected[:, 5:], rtol=0, atol=ATOL)

    def test_cuda_greedy_generation_equals_refimpl():
        ref = reference("llama_mha")
        model = CudaLlama(reference("llama_mha"), "fp32", np)
        ids = np.array([[1, 17, 42]])
        expected = ref.generate(ids, max_new_tokens=4, do_sample=False)
        np.testing.assert_array_equal(model.generate(ids, max_new_tokens=4), expected)
