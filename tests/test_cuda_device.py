"""On a real GPU: every CUDA kernel against its refimpl twin (accel/cuda/checks.py, CuPy arrays), the cuda-backend
forward on golden checkpoints in fp32 and int8, and accel.load(backend="cuda"). Skipped unless CuPy finds a device
(accel.cuda.device.check_cuda). The first GPU machine validates the backend with:

    pytest tests/ -k cuda -v

(this module plus the simulator modules). Tolerances are those of the simulator tests, except RoPE: a device may
fuse a*b + c into an FMA, so it is held to 2 eps of its terms instead of bit equality.
"""
import os

import numpy as np
import pytest

pytest.importorskip("numba", reason="accel's CUDA kernels need Numba")
pytest.importorskip("cupy", reason="the GPU checks need CuPy and a device")
if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    pytest.skip("NUMBA_ENABLE_CUDASIM=1: this module is for a real device", allow_module_level=True)

from accel.cuda.device import check_cuda  # noqa: E402

USABLE, REASON = check_cuda()
if not USABLE:
    pytest.skip(f"no usable GPU backend: {REASON}", allow_module_level=True)

import cupy  # noqa: E402

import refimpl  # noqa: E402
from accel.cuda import checks  # noqa: E402
from accel.cuda.model import CudaLlama  # noqa: E402
from accel.quant import dequantize_q8_0, quantize_q8_0  # noqa: E402

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "models")
ATOL = 1e-5
dev, host = cupy.asarray, cupy.asnumpy
SEEDS = range(5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threads", [32, 128, 256])
def test_cuda_device_norms(seed, threads):
    for d in (1, 31, 256, 4096):
        checks.check_rms_norm(dev, host, seed, 3, d, 1e-6, threads)
        checks.check_layer_norm(dev, host, seed, 3, d, bool(seed % 2), threads)


@pytest.mark.parametrize("seed", SEEDS)
def test_cuda_device_rope(seed):
    for half in (1, 32, 64):
        checks.check_rope(dev, host, seed, 2, 4, 3, half, bool(seed % 2), exact=False)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("heads", [(1, 1), (4, 4), (8, 2), (32, 8)])
def test_cuda_device_attention_decode(seed, heads):
    for head_dim, length in ((8, 1), (64, 300), (128, 1000), (80, 129)):
        checks.check_attention_decode(dev, host, seed, heads, head_dim, length, 2, bool(seed % 2), 3)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_new", "relu"])
def test_cuda_device_activations(act):
    for seed in SEEDS:
        checks.check_gated_act(dev, host, seed, 3, 1000, act)
        checks.check_activation(dev, host, seed, 3, 1000, act)


@pytest.mark.parametrize("seed", SEEDS)
def test_cuda_device_linear_q8(seed):
    for rows, d, o in ((1, 4096, 64), (4, 100, 33), (2, 31, 5)):
        checks.check_linear_q8(dev, host, seed, rows, d, o, bool(seed % 2), bool(seed % 3 == 0))


@pytest.mark.parametrize("case", ["llama_mha", "llama_gqa_bias", "openllama_default", "llama_rope_llama3"])
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_cuda_device_forward_equals_refimpl(case, fmt):
    ref = refimpl.load(os.path.join(MODELS, case))
    if fmt == "int8":  # the reference on the Q8_0 round trip of every matrix
        for layer in ref.params["layers"]:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                layer[name] = dequantize_q8_0(*quantize_q8_0(layer[name]))
        for name in ("embed_tokens", "lm_head"):
            if name in ref.params:
                ref.params[name] = dequantize_q8_0(*quantize_q8_0(ref.params[name]))
    model = CudaLlama(refimpl.load(os.path.join(MODELS, case)), fmt, cupy)
    ids = np.array([[1, 17, 42, 5, 9, 4], [3, 8, 2, 11, 4, 7]])
    cache = model.new_cache(2, 8)
    prompt, step = model(ids[:, :5], cache), model(ids[:, 5:], cache)
    expected = ref(input_ids=ids).logits
    np.testing.assert_allclose(prompt, expected[:, :5], rtol=0, atol=ATOL)
    np.testing.assert_allclose(step, expected[:, 5:], rtol=0, atol=ATOL)


def test_cuda_device_load_and_generate():
    path = os.path.join(MODELS, "llama_mha")
    model = refimpl.load(path, backend="cuda")
    ids = np.array([[1, 17, 42]])
    expected = refimpl.load(path).generate(ids, max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=6), expected)
