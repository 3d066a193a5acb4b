"""On a real GPU (the kernels op by op are tests/test_backend_ops.py's, on its "cuda" backend), and
refimpl.load(backend="cuda") end to end: every golden case (both families, every head) against transformers' stored
outputs, the device cache, greedy generation against transformers' sequences, seeded sampling against the numba
backend, int8 and fp16 storage. Skipped unless CuPy finds a device (accel.cuda.device.check_cuda). The first GPU
machine validates the backend with:

    pytest tests/ -k cuda -v

(this module plus the simulator modules). Tolerances are those of the simulator tests (fp32 and int8: the golden
ATOL 1e-5, summation order only), except RoPE (a device may fuse a*b + c into an FMA: 2 eps of its terms instead of
bit equality) and fp16, whose products round their activations on the device:

fp16 bound. On CuPy an fp16 product is fl16(sum_j fl16(x_j) w_j): the activations x are rounded to float16
(relative error <= u = 2^-11 each), the products fl16(x_j) w_j are exact in float32 (11 x 11 significant bits) and
summed in float32 by cuBLAS (CUBLAS_COMPUTE_32F: error <= D eps32 sum_j |x_j w_j|, any order), and the result is
rounded to float16 (<= u |y| <= u sum_j |x_j w_j|). Against the float32 product of the same fp16 weights (itself
within D eps32 sum_j |x_j w_j| of exact):
    |y_device - y_ref| <= (2u + 2 D eps32) * (|x| @ |W|^T) + 2^-25 (sum_j |w_j| + 1)
(first order; u = 2^-11, eps32 = 2^-23; the last term is fp16's subnormal range, |v| < 2^-14, where rounding is
absolute, <= 2^-25, for the activations and the result).
test_cuda_device_fp16_products_hold_the_bound checks this on random data, and for every product of real golden
forwards (both families, prompt and decode), with the activations the model produces. Through a whole network the
per-product errors (~1e-3 relative) propagate with the network's sensitivity, which has no useful closed form:
there the check is the formats' quality measure of tests/test_accel_model.py (top-1 agreement with fp32 on the
golden inputs >= 0.99, perplexity within 1%).
"""
import json
import os

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

import refimpl  # noqa: E402
from refimpl import ConfigError  # noqa: E402
from refimpl_accel.cuda import linear as cuda_model  # noqa: E402
from refimpl_accel.cpu.linear import Weight  # noqa: E402
from refimpl_accel.cuda.linear import DeviceWeight  # noqa: E402
from refimpl_accel.kv_cache import KVCache, to_host  # noqa: E402
from refimpl_accel.formats import dequantize_q8_0, quantize_q8_0  # noqa: E402
from golden_cases import ATOL_FP32_CASE, CASES, replay  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "golden", "models")
GEN_DIR = os.path.join(ROOT, "golden", "generation")
GEN_MODELS = sorted(f[:-4] for f in os.listdir(GEN_DIR) if f.endswith(".npz"))
ATOL = 1e-5
U16, EPS32 = 2.0 ** -11, float(np.finfo(np.float32).eps)
dev, host = cupy.asarray, cupy.asnumpy
SEEDS = range(5)
LLAMA_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPT_MATRICES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def load(case, weights="fp32"):
    return refimpl.load(os.path.join(MODELS, case), backend="cuda", weights=weights)


def reference(case):
    return refimpl.load(os.path.join(MODELS, case))


@pytest.mark.parametrize("case", CASES)
def test_cuda_device_golden_case(case):
    """Every stored transformers output of every call, through refimpl.load(backend="cuda"): host float32 outputs,
    the step calls on our KVCache."""
    model = load(case)
    assert isinstance(model, refimpl.ARCHITECTURES[type(model).__name__]) and model.xp is cupy
    checked = 0
    for call, key, expected, actual in replay(case, model=model):
        if key.startswith("past_key_values"):
            assert isinstance(actual, cupy.ndarray)
            actual = to_host(actual)
        assert isinstance(actual, (np.ndarray, np.floating)), f"{case}/{call}/{key}: {type(actual).__name__}"
        actual = np.asarray(actual)
        assert actual.shape == expected.shape, f"{case}/{call}/{key}: shape {actual.shape} != {expected.shape}"
        if np.issubdtype(expected.dtype, np.floating):
            assert actual.dtype == np.float32, f"{case}/{call}/{key}: dtype {actual.dtype}"
        error = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
        assert error <= ATOL_FP32_CASE.get(case, ATOL), f"{case}/{call}/{key}: max abs error {error:.3e}"
        checked += 1
    assert checked > 0


def generation_runs(name):
    data = np.load(os.path.join(GEN_DIR, name + ".npz"))
    for run in json.loads(str(data["meta"]))["runs"]:
        inputs = {k: data[f"{run['name']}.in.{k}"] for k in run.get("inputs", ["input_ids"])}
        yield run["name"], inputs, run["kwargs"], data[f"{run['name']}.out.sequences"]


@pytest.mark.parametrize("name", [n for n in GEN_MODELS if not n.endswith("_text")])
def test_cuda_device_generation(name):
    """Greedy runs equal transformers' sequences and refimpl's; sampled runs equal the numba backend's tokens."""
    model, ref = load(name), reference(name)
    numba_model = refimpl.load(os.path.join(MODELS, name), backend="numba")
    for run, inputs, kwargs, expected in generation_runs(name):
        if kwargs.get("do_sample"):
            for seed in (0, 7):
                np.testing.assert_array_equal(model.generate(**inputs, **kwargs, seed=seed),
                                              numba_model.generate(**inputs, **kwargs, seed=seed),
                                              err_msg=f"{name}/{run} seed {seed}")
            continue
        got = model.generate(**inputs, **kwargs)
        np.testing.assert_array_equal(got, expected, err_msg=f"{name}/{run}: transformers")
        np.testing.assert_array_equal(got, ref.generate(**inputs, **kwargs), err_msg=f"{name}/{run}: refimpl")


@pytest.mark.parametrize("case", ["llama_gqa_bias", "openllama_default", "opt_350m_like"])
def test_cuda_device_cache_decodes_one_token_at_a_time(case):
    """The decode kernel over the KVCache (grown from a too-small one) = one prompt forward."""
    model = load(case)
    ids = np.array([[5, 9, 3, 17, 11, 4, 8, 2], [7, 1, 6, 12, 9, 9, 3, 5]])
    full = model(input_ids=ids).logits
    cache, steps = model.new_cache(2, 3), []
    for t in range(ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits[:, -1])
    assert isinstance(cache, KVCache) and cache.length == ids.shape[1]
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=ATOL, rtol=0)


def q8_round_trip(params, names, top):
    for layer in params["layers"]:
        for name in names:
            layer[name] = dequantize_q8_0(*quantize_q8_0(layer[name]))
    for name in top:
        if name in params:
            params[name] = dequantize_q8_0(*quantize_q8_0(params[name]))


@pytest.mark.parametrize("case", ["llama_mha", "llama_gqa_bias", "openllama_default", "llama_rope_llama3",
                                  "opt_preln", "opt_350m_like"])
def test_cuda_device_int8_equals_refimpl_on_the_dequantised_weights(case):
    """Prompt products on the dequantised matrix (cuBLAS), the decode step in accel.cuda.linear.linear_q8: refimpl with every
    matrix replaced by its Q8_0 round trip is the reference, so only summation order differs."""
    ref = reference(case)
    if ref.family == "opt":
        q8_round_trip(ref.params, OPT_MATRICES, ("embed_tokens", "project_in", "project_out"))
        ref.params["lm_head"] = ref.params["embed_tokens"]  # tied
    else:
        q8_round_trip(ref.params, LLAMA_MATRICES, ("embed_tokens", "lm_head"))
    model = load(case, "int8")
    ids = np.array([[1, 17, 42, 5, 9, 4], [3, 8, 2, 11, 4, 7]])
    prompt = model(input_ids=ids[:, :5], use_cache=True)
    step = model(input_ids=ids[:, 5:], past_key_values=prompt.past_key_values)
    expected = ref(input_ids=ids).logits
    np.testing.assert_allclose(prompt.logits, expected[:, :5], rtol=0, atol=ATOL)
    np.testing.assert_allclose(step.logits, expected[:, 5:], rtol=0, atol=ATOL)


# --- fp16: the bound of the module docstring ---------------------------------------------------------------------

def check_fp16_product(x, weight, y):
    """y = cuda_model.product(x, weight) for an fp16 DeviceWeight, against the float32 product of the same
    weights, within the module docstring's bound."""
    x64 = host(x).astype(np.float64)
    w64 = host(weight.data).astype(np.float64)
    ref = host(x @ weight.dense().T).astype(np.float64)
    bound = (2 * U16 + 2 * x64.shape[1] * EPS32) * (np.abs(x64) @ np.abs(w64).T)
    bound += 2.0 ** -25 * (np.abs(w64).sum(1) + 1)  # fp16 subnormals round absolutely
    y = host(y)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    assert np.all(np.abs(y - ref) <= bound + 1e-30), float(np.max(np.abs(y - ref) - bound))


def test_cuda_device_fp16_products_hold_the_bound(monkeypatch):
    rng = np.random.default_rng(0)
    for rows, d, o in ((1, 4096, 64), (7, 768, 300), (128, 64, 192)):
        x = (rng.standard_normal((rows, d)) * 3).astype(np.float32)
        w = DeviceWeight.from_host(Weight.from_array((rng.standard_normal((o, d)) * 0.05).astype(np.float32), "fp16"), cupy)
        assert w.data.dtype == np.float16
        xd = dev(x)
        check_fp16_product(xd, w, cuda_model.product(xd, w))

    original, seen = cuda_model.product, []

    def checked(x, weight):  # every product of real forwards, with the activations the models produce
        y = original(x, weight)
        check_fp16_product(x, weight, y)
        seen.append(weight.shape)
        return y

    monkeypatch.setattr(cuda_model, "product", checked)
    ids = np.array([[2, 40, 17, 99, 5, 61], [7, 3, 150, 8, 22, 9]])
    for case in ("llama_gqa_bias", "opt_350m_like"):
        model = load(case, "fp16")
        out = model(input_ids=ids[:, :5], use_cache=True)
        model(input_ids=ids[:, 5:], past_key_values=out.past_key_values)
    assert len(seen) > 20


def test_cuda_device_fp16_quality_against_fp32():
    """The whole network: top-1 agreement with fp32 >= 0.99 and perplexity within 1% on golden-sized inputs, the
    measure tests/test_accel_model.py holds the numba backend's formats to."""
    agree = total = 0
    nll = {"fp32": 0.0, "fp16": 0.0}
    for case in ("llama_mha", "llama_gqa_bias", "openllama_default", "opt_preln", "opt_350m_like"):
        models = {fmt: load(case, fmt) for fmt in nll}
        ids = np.random.default_rng(len(case)).integers(3, models["fp32"].config.vocab_size, (2, 24))
        logits = {}
        for fmt, model in models.items():
            out = model(input_ids=ids)
            assert out.logits.dtype == np.float32
            logits[fmt] = out.logits.astype(np.float64)
            logp = logits[fmt] - np.log(np.exp(logits[fmt]).sum(-1, keepdims=True))
            nll[fmt] -= np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1).sum()
        agree += int((logits["fp32"].argmax(-1) == logits["fp16"].argmax(-1)).sum())
        total += ids.size
    assert agree / total >= 0.99, f"fp16: top-1 agreement {agree / total:.3f}"
    assert abs(nll["fp16"] / nll["fp32"] - 1) < 0.01


def test_cuda_device_load_options():
    path = os.path.join(MODELS, "llama_mha")
    with pytest.raises(ConfigError, match="weights='bf16'"):
        refimpl.load(path, backend="cuda", weights="bf16")
    with pytest.raises(ConfigError, match="float32"):
        refimpl.load(path, backend="cuda", dtype=np.float64)
    int8, fp32 = load("llama_mha", "int8"), load("llama_mha")
    assert int8.weight_bytes() < 0.3 * fp32.weight_bytes()
