"""generate() against transformers' generate on the golden models (golden/generation/*.npz), and sampler properties."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refimpl
from refimpl import InputError
from refimpl.generate import generation_positions, prepare_generation, sample
from refimpl.processors import apply_processors, logits_processors, top_k as top_k_filter, top_p as top_p_filter
from golden_cases import GOLDEN

GEN_DIR = os.path.join(GOLDEN, "generation")
# Text-in/text-out goldens (a prompt string per run, make_golden.build_text_generation's format); the trained model's
# comes from golden/make_trained_goldens.py.
TEXT_MODELS = ["llama_text", "opt_text", "llama_trained", "opt_trained"]
GEN_MODELS = sorted(f[:-4] for f in os.listdir(GEN_DIR) if f.endswith(".npz") and f[:-4] not in TEXT_MODELS)


def runs(name):
    data = np.load(os.path.join(GEN_DIR, name + ".npz"))
    for run in json.loads(str(data["meta"]))["runs"]:
        inputs = {k: data[f"{run['name']}.in.{k}"] for k in run["inputs"]}
        scores = data[f"{run['name']}.out.scores"] if f"{run['name']}.out.scores" in data.files else None
        yield run["name"], inputs, run["kwargs"], data[f"{run['name']}.out.sequences"], scores


def model(name):
    return refimpl.load(os.path.join(GOLDEN, "models", name))


@pytest.mark.parametrize("name", GEN_MODELS)
def test_greedy_generation_matches_transformers_token_for_token(name):
    m = model(name)
    checked = 0
    for run, inputs, kwargs, expected, _ in runs(name):
        if kwargs.get("do_sample"):
            continue
        got = m.generate(**inputs, **kwargs)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected, err_msg=f"{name}/{run}")
        checked += 1
    assert checked >= 5


def test_eos_run_stops_one_row_and_pads_it():
    """The golden eos run really stops row 0 early and fills it with pad (= eos for Llama) while row 1 runs on."""
    for run, inputs, kwargs, expected, _ in runs("llama_mha"):
        if run == "greedy_eos":
            prompt = inputs["input_ids"].shape[1]
            row0 = expected[0, prompt:]
            stop = list(row0).index(kwargs["eos_token_id"])
            assert stop < len(row0) - 1 and np.all(row0[stop:] == kwargs["eos_token_id"])
            assert model("llama_mha").generate(**inputs, **kwargs).shape == expected.shape


@pytest.mark.parametrize("name", GEN_MODELS)
def test_processed_scores_match_transformers(name):
    """Replay each stored sequence: our processors on our logits give transformers' output_scores at every step."""
    m = model(name)
    checked = 0
    for run, inputs, kwargs, sequences, scores in runs(name):
        if scores is None:
            continue
        s, ids0, _ = prepare_generation(m, inputs["input_ids"], inputs.get("attention_mask"), **kwargs)
        processors = logits_processors(s, ids0.shape[1])
        prompt = inputs["input_ids"].shape[1]
        mask0 = inputs.get("attention_mask", np.ones_like(inputs["input_ids"]))
        for t in range(scores.shape[0]):
            prefix = sequences[:, :prompt + t]
            mask = np.concatenate([mask0, np.ones((len(prefix), t), dtype=mask0.dtype)], axis=1)
            logits = m(input_ids=prefix, attention_mask=mask, position_ids=generation_positions(mask)).logits[:, -1]
            ours = apply_processors(processors, prefix, logits)
            expected = scores[t]
            np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(expected), err_msg=f"{name}/{run}/{t}")
            finite = np.isfinite(expected)
            np.testing.assert_allclose(ours[finite], expected[finite], atol=1e-5, rtol=0, err_msg=f"{name}/{run}/{t}")
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("name", ["llama_mha", "opt_preln", "openllama_default"])
def test_n_tokens_cost_one_prompt_forward_and_n_minus_1_single_steps(name):
    m = model(name)
    calls = []
    forward = m.__call__

    class Counting(type(m)):
        def __call__(self, **kwargs):
            calls.append(np.shape(kwargs["input_ids"]))
            return forward(**kwargs)

    m.__class__ = Counting
    out = m.generate([[5, 6, 7, 8]], max_new_tokens=9, eos_token_id=[])
    assert out.shape == (1, 13)
    assert calls[0] == (1, 4) and calls[1:] == [(1, 1)] * 8


def test_sampling_is_reproducible_from_a_seed_or_generator():
    m = model("llama_mha")
    a = m.generate([[5, 6, 7]], max_new_tokens=12, do_sample=True, seed=3)
    b = m.generate([[5, 6, 7]], max_new_tokens=12, do_sample=True, seed=3)
    c = m.generate([[5, 6, 7]], max_new_tokens=12, do_sample=True, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    d = m.generate([[5, 6, 7]], max_new_tokens=12, do_sample=True, seed=4)
    assert not np.array_equal(a, d)


scores_strategy = st.integers(2, 40).flatmap(lambda v: st.lists(
    st.floats(-20, 20, allow_nan=False, width=32), min_size=v, max_size=v))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(values=scores_strategy, k=st.integers(1, 45), seed=st.integers(0, 2**32 - 1))
def test_top_k_never_emits_a_token_outside_the_top_k(values, k, seed):
    scores = np.array([values], dtype=np.float32)
    kept = top_k_filter(None, scores, k)
    kth = np.sort(scores[0])[::-1][min(k, len(values)) - 1]
    assert np.all(np.isfinite(kept[0]) == (scores[0] >= kth))
    token = sample(kept, np.random.default_rng(seed))[0]
    assert scores[0, token] >= kth


@settings(max_examples=60, deadline=None, derandomize=True)
@given(values=scores_strategy, p=st.floats(0.01, 1.0), seed=st.integers(0, 2**32 - 1))
def test_top_p_keeps_the_smallest_set_reaching_p(values, p, seed):
    scores = np.array([values], dtype=np.float64)
    kept = np.isfinite(top_p_filter(None, scores, p)[0])
    probs = np.exp(scores[0] - scores[0].max())
    probs /= probs.sum()
    assert kept.any()
    # kept tokens are the most likely ones, and removing the least likely kept token drops the mass below p
    assert probs[kept].min() >= probs[~kept].max(initial=0) - 1e-12
    assert probs[kept].sum() >= p - 1e-9 or kept.sum() == 1
    token = sample(np.where(kept, scores, -np.inf), np.random.default_rng(seed))[0]
    assert kept[token]


def test_sampler_distribution_follows_softmax():
    scores = np.log(np.array([[0.5, 0.3, 0.2]]))
    rng = np.random.default_rng(0)
    draws = np.array([sample(scores, rng)[0] for _ in range(20000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.015)  # 20000 draws: 3 sigma ~ 0.011


@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": np.zeros((1, 0), np.int64)}, "prompt is empty"),
    ({"input_ids": [[5, 6]], "max_new_tokens": 0}, "max_new_tokens=0"),
    ({"input_ids": [[5, 6]], "max_new_tokens": -3}, "max_new_tokens=-3"),
    ({"input_ids": [[5, 6]], "do_sample": True, "temperature": 0.0}, "temperature=0.0"),
    ({"input_ids": [[5, 6]], "do_sample": True, "top_p": 1.5}, "top_p=1.5"),
    ({"input_ids": [[5, 6]], "do_sample": True, "top_p": 0.0}, "top_p=0.0"),
    ({"input_ids": [[5, 6]], "max_length": 2}, "nothing to generate"),
])
def test_bad_generation_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        model("llama_mha").generate(**kwargs)


def test_prompt_longer_than_opt_allows():
    m = model("opt_preln")
    mpe = m.config.max_position_embeddings
    with pytest.raises(InputError, match=f"more than this model allows \\({mpe}\\)"):
        m.generate(np.full((1, mpe - 2), 5), max_new_tokens=5)


def test_generate_needs_a_language_model_head():
    with pytest.raises(InputError, match="no language-model head"):
        model("opt_qa").generate([[5, 6]])


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_text_in_text_out_matches_transformers(name):
    """Three levels, as minGPT's import test: prompt ids, greedy ids and decoded text all equal transformers'."""
    data = np.load(os.path.join(GEN_DIR, name + ".npz"))
    meta = json.loads(str(data["meta"]))
    m = model(name)
    tok = refimpl.load_tokenizer(os.path.join(GOLDEN, "models", name))
    checked = 0
    for run in meta["runs"]:
        expected = data[f"{run['name']}.out.sequences"]
        if "prompt" in run:
            ids = tok.encode(run["prompt"])
            assert ids == data[f"{run['name']}.in.input_ids"][0].tolist(), run["prompt"]
            got = m.generate([ids], **run["kwargs"])
            np.testing.assert_array_equal(got, expected, err_msg=run["prompt"])
            assert tok.decode(got[0].tolist(), skip_special_tokens=True) == run["text"]
        else:  # the left-padded batch made by the tokenizer
            batch = tok(run["prompts"], padding=True, padding_side="left")
            np.testing.assert_array_equal(batch["input_ids"], data["batch.in.input_ids"])
            np.testing.assert_array_equal(batch["attention_mask"], data["batch.in.attention_mask"])
            got = m.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **run["kwargs"])
            np.testing.assert_array_equal(got, expected)
            assert tok.batch_decode(got.tolist(), skip_special_tokens=True) == run["texts"]
        checked += 1
    assert checked >= 5


def test_cli_streams_the_same_text_as_decode(capsys):
    from refimpl.cli import main

    data = np.load(os.path.join(GEN_DIR, "opt_text.npz"))
    run = json.loads(str(data["meta"]))["runs"][0]
    assert main(["generate", os.path.join(GOLDEN, "models", "opt_text"), "-p", run["prompt"], "-n", "16"]) == 0
    out = capsys.readouterr()
    assert out.out == run["text"] + "\n"
    assert "16 new tokens" in out.err
