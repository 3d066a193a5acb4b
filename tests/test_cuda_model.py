"""backend="cuda"'s models (accel/cuda/forward.py) on golden checkpoints, with NumPy as the array module and the
numba.cuda kernels on Numba's CUDA simulator; and the clear error when backend="cuda" cannot run here.

As tests/test_backend_ops.py: without NUMBA_ENABLE_CUDASIM set, one test re-runs this file in a subprocess with
NUMBA_ENABLE_CUDASIM=1 (the simulator must be chosen before Numba is imported); the error tests run in both.
The models are built by accel.cuda.forward.build(path, weights, numpy): the classes, uploads and forwards that
refimpl.load(path, backend="cuda") gives on a GPU (with cupy as xp), without CuPy.

What is checked: the stored transformers outputs (tests/golden_cases.py) of the golden cases through the CUDA classes
(logits, losses, last hidden states, QA logits, hidden states, attention maps, past_key_values and the decode steps
that use them), greedy generation token for token against transformers' stored sequences and refimpl's generate,
seeded sampling against the numba backend's tokens, the device cache, fp16 and int8 storage, output dtypes, and the
argument / option errors.

Tolerance: ATOL = 1e-5, refimpl's golden tolerance. The composition is refimpl's step order in float32; only sums
are taken in another order (tree reductions in the norms, blockwise online softmax, stacked qkv products), each a
few float32 ulps of the tiny golden models' activations (observed <= 5e-6).

Simulator budget: every GPU thread is a Python thread, so the cost is the array elements the kernels touch (a few
us each). Kernels launch with 1 thread a block (accel/cuda/ops.py THREADS; tests/test_backend_ops.py covers multi-thread
blocks) and elementwise launches with 2 blocks (ops.MAX_GRID); the simulator's polling loop is made to yield
the GIL (`_let_blocks_run`). The subprocess runs the module in two halves side by side (HALF): ~1 min on this
2-core machine (when nothing else runs on it).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import refimpl
from refimpl import ConfigError, InputError

pytest.importorskip("numba", reason="accel's CUDA kernels need Numba (pip install 'refimpl[accel]')")

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
ALL_CASES = os.environ.get("REFIMPL_CUDASIM_ALL", "0") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "golden", "models")
GEN_DIR = os.path.join(ROOT, "golden", "generation")
ATOL = 1e-5


def test_cuda_check_names_what_is_missing():
    from refimpl_accel.cuda.device import check_cuda

    ok, reason = check_cuda()
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert not ok and "CuPy is not installed" in reason
        return
    if SIMULATED:
        assert not ok and "NUMBA_ENABLE_CUDASIM" in reason


def test_cuda_backend_raises_config_error_with_the_reason_when_unusable():
    from refimpl_accel.cuda.device import check_cuda

    ok, reason = check_cuda()
    if ok:
        pytest.skip("a GPU backend is usable here: tests/test_cuda_device.py covers it")
    with pytest.raises(ConfigError, match="backend='cuda' is not usable here") as info:
        refimpl.load(os.path.join(MODELS, "llama_mha"), backend="cuda")
    assert reason in str(info.value)


# The subprocess runs in two halves side by side (the simulator holds one core: the GIL), split by -k into about
# equal times: the largest golden cases and the greedy runs, then the rest.
HALF = "(golden_case and (llama_mha or opt_preln or openllama_default or rope_dynamic)) or greedy"

if not SIMULATED:
    def test_cuda_model_under_the_simulator():
        """This file's tests in subprocesses with NUMBA_ENABLE_CUDASIM=1 (see the module docstring)."""
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__), "-k"]
        runs = [subprocess.Popen(command + [k], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for k in (HALF, f"not ({HALF})")]
        try:
            outputs = [run.communicate(timeout=900)[0] for run in runs]
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
        for run, output in zip(runs, outputs):
            assert run.returncode == 0, output[-8000:]
else:
    from refimpl_accel.cuda import ops as kernels
    from refimpl_accel.formats import ACT_CODES
    from refimpl_accel.cuda.forward import CUDA_CLASSES, build, load_cuda
    from refimpl_accel.kv_cache import KVCache, to_host
    from refimpl_accel.formats import dequantize_q8_0, quantize_q8_0
    from golden_cases import ATOL_FP32_CASE, CASES, replay

    kernels.THREADS = 1
    kernels.MAX_GRID = 2

    def _let_blocks_run():
        """Numba's simulator runs a block's threads while the launching thread polls them in a busy loop, holding
        the GIL half the time; a zero sleep in that poll (BlockThread.is_alive) hands the GIL to the block. Speed
        only (~3x here): what the kernels compute is unchanged. A Numba without BlockThread is left as it is."""
        from numba.cuda.simulator import kernel as simulator

        block_thread = getattr(simulator, "BlockThread", None)
        if block_thread is None or getattr(block_thread, "_yields", False):
            return
        alive = block_thread.is_alive

        def is_alive(self):
            time.sleep(0)
            return alive(self)

        block_thread.is_alive, block_thread._yields = is_alive, True

    _let_blocks_run()

    def cuda(case, weights="fp32"):
        return build(os.path.join(MODELS, case), weights, np)

    def reference(case):
        return refimpl.load(os.path.join(MODELS, case))

    def generation_runs(name):
        data = np.load(os.path.join(GEN_DIR, name + ".npz"))
        for run in json.loads(str(data["meta"]))["runs"]:
            inputs = {k: data[f"{run['name']}.in.{k}"] for k in run.get("inputs", ["input_ids"])}
            yield run["name"], inputs, run["kwargs"], data[f"{run['name']}.out.sequences"]

    def test_the_golden_cases_cover_every_class():
        classes = {type(cuda(case)).__name__ for case in CASES}
        assert {"LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification", "OpenLlamaForCausalLM",
                "OpenLlamaForSequenceClassification", "OPTModel", "OPTForCausalLM", "OPTForSequenceClassification",
                "OPTForQuestionAnswering"} <= classes

    # The RoPE-scaling variants with static tables differ only in refimpl.llama.rotary_tables, host code the CUDA
    # path calls as it is: one of them (yarn with attention_factor, which scales cos and sin) stands for the rest
    # here; tests/test_cuda_device.py replays them all, and so does REFIMPL_CUDASIM_ALL=1 here (+25 s).
    STATIC_ROPE = {"llama_rope_linear", "llama_rope_llama3", "llama_rope_longrope", "llama_rope_longrope_ompe",
                   "llama_rope_yarn", "openllama_rope_linear"}
    GOLDEN_CASES = CASES if ALL_CASES else [case for case in CASES if case not in STATIC_ROPE]

    @pytest.mark.parametrize("case", GOLDEN_CASES)
    def test_golden_case_through_the_cuda_classes(case):
        """Every stored output of every call (the step calls reuse our KVCache) within ATOL of transformers,
        as host float32 arrays."""
        model = cuda(case)
        assert isinstance(model, refimpl.ARCHITECTURES[type(model).__name__])  # refimpl's class, on the device
        checked = 0
        for call, key, expected, actual in replay(case, model=model):
            if key.startswith("past_key_values"):
                actual = to_host(actual)  # the cache stays on the device; everything else is host NumPy
            assert isinstance(actual, (np.ndarray, np.floating)), f"{case}/{call}/{key}: {type(actual).__name__}"
            actual = np.asarray(actual)
            assert actual.shape == expected.shape, f"{case}/{call}/{key}: shape {actual.shape} != {expected.shape}"
            if np.issubdtype(expected.dtype, np.floating):
                assert actual.dtype == np.float32, f"{case}/{call}/{key}: dtype {actual.dtype}"
            error = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
            atol = ATOL_FP32_CASE.get(case, ATOL)  # the trained model's larger logits (tests/golden_cases.py)
            assert error <= atol, f"{case}/{call}/{key}: max abs error {error:.3e}"
            checked += 1
        assert checked > 0

    @pytest.mark.parametrize("name, runs", [
        ("llama_mha", ["greedy", "greedy_leftpad", "greedy_processors"]),
        ("opt_preln", ["max_length", "greedy_leftpad", "greedy_eos"]),
        ("opt_350m_like", ["greedy_leftpad"]),
        ("openllama_default", ["greedy_leftpad"])])
    def test_greedy_generation_equals_transformers_and_refimpl(name, runs):
        model, ref = cuda(name), reference(name)
        done = 0
        for run, inputs, kwargs, expected in generation_runs(name):
            if run in runs:
                got = model.generate(**inputs, **kwargs)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, expected, err_msg=f"{name}/{run}: transformers")
                np.testing.assert_array_equal(got, ref.generate(**inputs, **kwargs), err_msg=f"{name}/{run}")
                done += 1
        assert done == len(runs)

    @pytest.mark.parametrize("name", ["llama_mha", "opt_preln"])
    def test_sampling_with_a_seed_equals_the_numba_backend(name):
        model, numba_model = cuda(name), refimpl.load(os.path.join(MODELS, name), backend="numba")
        sampled = 0
        for run, inputs, kwargs, _ in generation_runs(name):
            if kwargs.get("do_sample"):
                for seed in (0, 7):
                    np.testing.assert_array_equal(model.generate(**inputs, **kwargs, seed=seed),
                                                  numba_model.generate(**inputs, **kwargs, seed=seed),
                                                  err_msg=f"{name}/{run} seed {seed}")
                    sampled += 1
        assert sampled >= 2

    def test_every_output_is_host_float32():
        model = cuda("opt_preln")
        out = model(input_ids=[[5, 9, 3]], labels=[[5, 9, 3]], use_cache=True, output_hidden_states=True,
                    output_attentions=True)
        arrays = [out.logits, out.loss, *out.hidden_states, *out.attentions]
        assert all(type(np.asarray(a)) is np.ndarray and np.asarray(a).dtype == np.float32 for a in arrays)
        assert isinstance(out.past_key_values, KVCache) and out.past_key_values.length == 3
        last = model._last_logits(model._decoder_call(np.array([[4]]), np.ones((1, 4), np.int64), np.array([[3]]),
                                                      out.past_key_values)[0])
        assert last.dtype == np.float32 and last.shape == (1, model.config.vocab_size)

    @pytest.mark.parametrize("case", ["llama_gqa_bias", "opt_350m_like"])
    def test_past_key_values_device_cache_host_tuples_and_branches(case):
        """The KVCache appends in place, a branch from an older cache copies first (the older cache keeps
        its values), and refimpl's tuples of host arrays are accepted (uploaded), as accel.kv_cache does."""
        model, ref = cuda(case), reference(case)
        ids = np.array([[3, 4, 5, 6, 7]])
        expected = ref(input_ids=ids).logits
        cache = model.new_cache(1, 8)
        prompt = model(input_ids=ids[:, :3], past_key_values=cache, use_cache=True)
        kept = prompt.past_key_values.to_host()
        a = model(input_ids=ids[:, 3:4], past_key_values=prompt.past_key_values, use_cache=True)
        assert a.past_key_values.storage is cache.storage  # appended in place
        b = model(input_ids=[[9]], past_key_values=prompt.past_key_values, use_cache=True)  # a branch: copied
        assert b.past_key_values.storage is not cache.storage
        for (k, v), (k0, v0) in zip(prompt.past_key_values.to_host(), kept):
            np.testing.assert_array_equal(k, k0)
            np.testing.assert_array_equal(v, v0)
        c = model(input_ids=ids[:, 4:], past_key_values=a.past_key_values)
        np.testing.assert_allclose(np.concatenate([prompt.logits, a.logits, c.logits], 1), expected, atol=ATOL,
                                   rtol=0)
        ref_past = ref(input_ids=ids[:, :4], use_cache=True).past_key_values  # refimpl's host tuples
        np.testing.assert_allclose(model(input_ids=ids[:, 4:], past_key_values=ref_past).logits, expected[:, 4:],
                                   atol=ATOL, rtol=0)
        np.testing.assert_allclose(b.logits, ref(input_ids=[[9]], past_key_values=kept).logits, atol=ATOL, rtol=0)

    def test_fp16_storage_on_numpy_is_refimpl_on_the_rounded_weights():
        """On NumPy the fp16 weights are widened exactly: refimpl on the fp16 round trip of every matrix is the
        reference, at the fp32 tolerance (the device path and its bound: tests/test_cuda_device.py)."""
        ref = reference("opt_350m_like")
        for layer in ref.params["layers"]:
            for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
                layer[name] = layer[name].astype(np.float16).astype(np.float32)
        for name in ("embed_tokens", "project_in", "project_out"):
            ref.params[name] = ref.params[name].astype(np.float16).astype(np.float32)
        ref.params["lm_head"] = ref.params["embed_tokens"]
        model = cuda("opt_350m_like", "fp16")
        assert model.params["layers"][0]["qkv"].data.dtype == np.float16
        ids = [[2, 40, 17, 99, 5]]
        np.testing.assert_allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=ATOL, rtol=0)
        assert model.weight_bytes() < 0.6 * cuda("opt_350m_like").weight_bytes()

    @pytest.mark.parametrize("act", sorted(ACT_CODES))
    def test_every_refimpl_activation_has_a_kernel_code(act):
        """Each name of refimpl.ops.ACTIVATIONS has a kernel code (tests/test_backend_ops.py runs each on every
        backend, the simulator included)."""
        assert set(ACT_CODES) == set(refimpl.ops.ACTIVATIONS)

    def test_bad_inputs_raise_refimpls_input_errors():
        opt = cuda("opt_qa")
        rows = opt.config.max_position_embeddings
        with pytest.raises(InputError, match="outside its learned table"):
            opt(input_ids=np.ones((1, rows + 1), np.int64))
        with pytest.raises(InputError, match="outside its learned table"):
            opt(input_ids=[[5, 6]], position_ids=[[rows, rows + 1]])
        with pytest.raises(InputError, match="head_mask has shape"):
            opt(input_ids=[[5, 6]], head_mask=np.ones((3, 3)))
        with pytest.raises(InputError, match="no language-model head"):
            opt.generate([[5, 6]])
        llama = cuda("llama_gqa_bias")
        with pytest.raises(InputError, match="outside the vocabulary"):
            llama(input_ids=[[llama.config.vocab_size]])
        with pytest.raises(InputError, match="attention_mask has shape"):
            llama(input_ids=[[1, 2]], attention_mask=[[1, 1, 1]])
        with pytest.raises(InputError, match="past_key_values"):
            llama(input_ids=[[1]], past_key_values=((np.zeros((1, 1, 2, 3)),) * 2,))
        with pytest.raises(InputError, match="past_key_values must be a tuple of 2"):  # refimpl's check (xp = numpy)
            llama(input_ids=[[1]], past_key_values=cuda("opt_seqcls").new_cache(1, 4))
        with pytest.raises(InputError, match="max_new_tokens=0"):
            llama.generate([[5, 6]], max_new_tokens=0)
        from refimpl.trace import Trace

        with pytest.raises(InputError, match="does not record traces"):
            llama(input_ids=[[1, 2]], trace=Trace())

    def test_bad_options_raise_config_errors_naming_the_choices():
        path = os.path.join(MODELS, "llama_mha")
        with pytest.raises(ConfigError, match="weights='bf16'.*fp32, fp16, int8"):
            build(path, "bf16", np)
        with pytest.raises(ConfigError, match="float32"):
            load_cuda(path, np.float64, "fp32")
        with pytest.raises(ConfigError, match="cache_dir applies to backend='numba'"):
            load_cuda(path, np.float32, "fp32", cache_dir="/tmp")
        with pytest.raises(ConfigError, match="threads applies to backend='numba'"):
            load_cuda(path, np.float32, "fp32", threads=2)
        assert set(CUDA_CLASSES) == set(refimpl.ARCHITECTURES.values())

    def test_cuda_int8_decode_equals_refimpl_on_the_dequantised_weights():
        """int8 storage: the decode step's products run in the on-the-fly Q8_0 kernel; the reference is refimpl
        with every matrix replaced by its Q8_0 round trip (so only summation order differs)."""
        ref = reference("llama_mha")
        for layer in ref.params["layers"]:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                layer[name] = dequantize_q8_0(*quantize_q8_0(layer[name]))
        for name in ("embed_tokens", "lm_head"):
            ref.params[name] = dequantize_q8_0(*quantize_q8_0(ref.params[name]))
        model = cuda("llama_mha", "int8")
        ids = np.array([[1, 17, 42, 5, 9, 4]])  # a 5-token prompt: > SMALL_M rows, dequantised on the device
        prompt = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:], past_key_values=prompt.past_key_values)  # one row: accel.cuda.linear.linear_q8
        expected = ref(input_ids=ids).logits
        np.testing.assert_allclose(prompt.logits, expected[:, :5], rtol=0, atol=ATOL)
        np.testing.assert_allclose(step.logits, expected[:, 5:], rtol=0, atol=ATOL)
