"""generate()'s options against transformers' own generate (golden/generation_options/, make_generation_options.py):
beam search, every logits processor, stop strings and the output fields; then properties that need no golden."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refimpl
from refimpl import ConfigError, InputError
from refimpl.generate import generation_positions, prepare_generation
from refimpl.processors import apply_processors, logits_processors, stop_string_match
from golden_cases import GOLDEN

OPT_DIR = os.path.join(GOLDEN, "generation_options")
MODELS = ["llama_mha", "opt_preln", "llama_gqa_bias"]
ATOL = 1e-5  # refimpl fp32 against transformers fp32 (the figure reached is in the closing note of issue 16)


def load_runs(name):
    data = np.load(os.path.join(OPT_DIR, name + ".npz"))
    meta = json.loads(str(data["meta"]))
    out = []
    for run in meta["runs"]:
        kwargs = dict(run["kwargs"])
        if "sequence_bias" in kwargs:
            kwargs["sequence_bias"] = {tuple(entry[:-1][0] if isinstance(entry[0], list) else entry[:-1]): entry[-1]
                                       for entry in kwargs["sequence_bias"]}
        inputs = {k: data[f"{run['name']}.in.{k}"] for k in run["inputs"]}
        outputs = {k[len(run["name"]) + 5:]: data[k] for k in data.files if k.startswith(run["name"] + ".out.")}
        out.append((run["name"], inputs, kwargs, outputs))
    return out


def model(name):
    return refimpl.load(os.path.join(GOLDEN, "models", name))


def close(ours, expected, what):
    """Same -inf pattern, finite values within ATOL."""
    ours = np.asarray(ours)
    assert ours.shape == expected.shape, what
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(expected), err_msg=what)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], atol=ATOL, rtol=0, err_msg=what)


CASES = [(name, run) for name in MODELS for run, *_ in load_runs(name)]


@pytest.fixture(scope="module")
def golden_runs():
    return {name: {run: (inputs, kwargs, outputs) for run, inputs, kwargs, outputs in load_runs(name)}
            for name in MODELS}


@pytest.fixture(scope="module")
def models():
    return {name: model(name) for name in MODELS}


@pytest.mark.parametrize("name, run", [c for c in CASES if not c[1].startswith("sample") and c[1] != "beam_sample"])
def test_deterministic_runs_match_transformers(name, run, golden_runs, models):
    """Greedy and beam runs: the same tokens, and every output field transformers returned, within ATOL."""
    inputs, kwargs, expected = golden_runs[name][run]
    out = models[name].generate(**inputs, **kwargs)
    sequences = out.sequences if kwargs.get("return_dict_in_generate") else out
    assert sequences.dtype == np.int64
    np.testing.assert_array_equal(sequences, expected["sequences"], err_msg=f"{name}/{run}")
    if not kwargs.get("return_dict_in_generate"):
        return
    for field in ("scores", "logits"):
        if field in expected:
            got = np.stack(getattr(out, field))
            assert got.dtype == np.float32
            close(got, expected[field], f"{name}/{run}/{field}")
    if "sequences_scores" in expected:
        assert out.sequences_scores.dtype == np.float32
        # a sum of per-step float32 log-probs times length ** -length_penalty: |score| reaches ~460 with
        # length_penalty=-1.5, where one float32 ulp is 3e-5, so the bound is relative (~8 ulp) beside ATOL
        np.testing.assert_allclose(out.sequences_scores, expected["sequences_scores"], atol=ATOL, rtol=1e-6)
    if "beam_indices" in expected:
        np.testing.assert_array_equal(out.beam_indices, expected["beam_indices"], err_msg=f"{name}/{run}")
    for field in ("attentions", "hidden_states"):
        keys = sorted(k for k in expected if k.startswith(field + "."))
        for key in keys:
            _, t, layer = key.split(".")
            close(getattr(out, field)[int(t)][int(layer)], expected[key], f"{name}/{run}/{key}")
        assert len(keys) == sum(len(step) for step in (getattr(out, field) or ())), f"{name}/{run}/{field}"


@pytest.mark.parametrize("name, run", [c for c in CASES if c[1].startswith("sample")])
def test_sampling_warpers_match_transformers_scores(name, run, golden_runs, models):
    """Replay transformers' sampled rows: our processors on our logits give its processed scores at every step."""
    inputs, kwargs, expected = golden_runs[name][run]
    m = models[name]
    sequences, scores = expected["sequences"], expected["scores"]
    n = kwargs.get("num_return_sequences", 1)
    ids0 = np.repeat(inputs["input_ids"], n, axis=0)
    mask0 = np.repeat(inputs.get("attention_mask", np.ones_like(inputs["input_ids"])), n, axis=0)
    s, _, _ = prepare_generation(m, inputs["input_ids"], inputs.get("attention_mask"), **kwargs)
    processors = logits_processors(s, ids0.shape[1])
    for t in range(scores.shape[0]):
        prefix = sequences[:, :ids0.shape[1] + t]
        mask = np.concatenate([mask0, np.ones((len(prefix), t), dtype=mask0.dtype)], axis=1)
        logits = m(input_ids=prefix, attention_mask=mask, position_ids=generation_positions(mask)).logits[:, -1]
        close(apply_processors(processors, prefix, logits), scores[t], f"{name}/{run}/step {t}")


@pytest.mark.parametrize("name", MODELS)
def test_beam_sampling_keeps_transformers_shapes_and_is_seeded(name, golden_runs, models):
    """torch's draws cannot be replayed: the beam-sample run gives transformers' shapes, reproducibly per seed."""
    inputs, kwargs, expected = golden_runs[name]["beam_sample"]
    a = models[name].generate(**inputs, **kwargs, seed=5)
    b = models[name].generate(**inputs, **kwargs, seed=5)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert a.sequences.shape[0] == expected["sequences"].shape[0]
    assert len(a.scores) <= kwargs["max_new_tokens"] and a.scores[0].shape == expected["scores"][0].shape


TEXT = ["llama_text", "opt_text"]


@pytest.mark.parametrize("name", TEXT)
def test_stop_strings_stop_where_transformers_stops(name):
    from refimpl.tokenizers import load_tokenizer

    folder = os.path.join(GOLDEN, "models", name)
    m, tok = refimpl.load(folder), load_tokenizer(folder)
    stopped_early = 0
    for run, inputs, kwargs, expected in load_runs(name):
        got = m.generate(**inputs, **kwargs, tokenizer=tok)
        np.testing.assert_array_equal(got, expected["sequences"], err_msg=f"{name}/{run}")
        stopped_early += expected["sequences"].shape[1] < inputs["input_ids"].shape[1] + kwargs["max_new_tokens"]
    assert stopped_early >= 3  # the goldens do exercise a stop


def test_stop_strings_need_a_tokenizer_and_a_reachable_string():
    from refimpl.tokenizers import load_tokenizer

    folder = os.path.join(GOLDEN, "models", "opt_text")
    m = refimpl.load(folder)
    with pytest.raises(InputError, match="tokenizer="):
        m.generate([[5, 6]], stop_strings=["x"], max_new_tokens=3)
    with pytest.raises(InputError, match="no token"):
        m.generate([[5, 6]], stop_strings=["\u2603\u2603"], max_new_tokens=3, tokenizer=load_tokenizer(folder))


@pytest.mark.parametrize("pieces, stop, expected", [
    (["st", "op"], "stop", True), (["stop"], "stop", True), (["st", "opera"], "stop", True),
    (["sto", "pper"], "stop", True), (["las", "topper"], "stop", True), (["s", "to", "pped"], "stop", True),
    (["stop", "at"], "stop", False), (["st", "op", "at"], "stop", False), (["st", "opera", "tion"], "stop", False),
    (["s", "", "top"], "stop", False), (["x", "stopx"], "stop", True),
])
def test_stop_string_examples_from_transformers_docstring(pieces, stop, expected):
    """The positive and negative examples of StopStringCriteria's docstring, plus an empty token breaking a chain."""
    assert stop_string_match(list(range(len(pieces))), pieces, stop) is expected


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), beams=st.integers(2, 4))
def test_beam_search_with_one_beam_is_greedy_and_scores_are_log_softmax_consistent(seed, beams):
    rng = np.random.default_rng(seed)
    m = MODEL_CACHE.setdefault("llama_mha", model("llama_mha"))
    ids = rng.integers(3, m.config.vocab_size, (1, 5))
    greedy = m.generate(ids, max_new_tokens=6, eos_token_id=[])
    one = m.generate(ids, max_new_tokens=6, num_beams=1, eos_token_id=[])
    np.testing.assert_array_equal(one, greedy)
    out = m.generate(ids, max_new_tokens=6, num_beams=beams, eos_token_id=[], return_dict_in_generate=True,
                     output_scores=True)
    # the beam's score is its summed log-softmax over the 6 new tokens / 6 ** length_penalty (1.0)
    np.testing.assert_allclose(out.sequences_scores[0] * 6, sequence_log_prob(m, out.sequences, 5), atol=1e-4)


MODEL_CACHE = {}


def sequence_log_prob(m, sequences, prompt):
    from refimpl.processors import log_softmax

    logits = m(input_ids=sequences).logits[0, prompt - 1:-1]  # [new, V]
    return float(np.sum(np.take_along_axis(log_softmax(logits), sequences[0, prompt:, None], axis=1)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), banned=st.lists(st.integers(3, 255), min_size=1, max_size=8))
def test_a_banned_token_is_never_emitted(seed, banned):
    m = MODEL_CACHE.setdefault("llama_mha", model("llama_mha"))
    banned = [b % m.config.vocab_size for b in banned]
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, m.config.vocab_size, (2, 4))
    for kwargs in ({"suppress_tokens": banned}, {"bad_words_ids": [[b] for b in banned]},
                   {"suppress_tokens": banned, "num_beams": 3}, {"suppress_tokens": banned, "do_sample": True,
                                                                 "seed": seed}):
        new = m.generate(ids, max_new_tokens=5, eos_token_id=[], **kwargs)[:, 4:]
        assert not np.isin(new, banned).any(), kwargs


def test_user_processor_and_criterion_use_transformers_signatures():
    m = model("llama_mha")
    seen = []

    def ban_seven(input_ids, scores):
        seen.append((input_ids.shape, scores.shape))
        scores = scores.copy()
        scores[:, 7] = -np.inf
        return scores

    def stop_after_three(input_ids, scores):
        return np.full(input_ids.shape[0], input_ids.shape[1] >= 7)

    out = m.generate([[5, 6, 8, 9]], max_new_tokens=10, eos_token_id=[], logits_processor=[ban_seven],
                     stopping_criteria=[stop_after_three])
    assert out.shape == (1, 7) and 7 not in out[0, 4:]
    assert seen[0] == ((1, 4), (1, m.config.vocab_size))
    with pytest.raises(InputError, match="booleans"):
        m.generate([[5, 6]], max_new_tokens=3, stopping_criteria=[lambda ids, scores: "yes"])


def test_max_time_stops_generation():
    m = model("llama_mha")
    out = m.generate([[5, 6]], max_new_tokens=500, max_time=1e-9, eos_token_id=[])
    assert out.shape == (1, 3)  # the first token is made before the clock is read


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 2, "num_beam_groups": 2, "diversity_penalty": 0.5}, "num_beam_groups"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha"),
    ({"guidance_scale": 1.5}, "guidance_scale"),
    ({"constraints": ["x"]}, "constraints"),
    ({"not_a_setting": 1}, "not_a_setting"),
    ({"num_return_sequences": 2}, "num_return_sequences=2"),
    ({"num_beams": 2, "num_return_sequences": 3}, "more than num_beams"),
    ({"num_beams": 0}, "num_beams=0"),
    ({"early_stopping": "sometimes", "num_beams": 2}, "early_stopping"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size=-1"),
    ({"bad_words_ids": [[]]}, "bad_words_ids"),
    ({"bad_words_ids": [[10**9]]}, "bad_words_ids"),
    ({"suppress_tokens": [-1]}, "suppress_tokens"),
    ({"eos_token_id": 10**9}, "eos_token_id"),
    ({"pad_token_id": 10**9}, "pad_token_id"),
    ({"exponential_decay_length_penalty": (1, 0.5)}, "exponential_decay_length_penalty"),
    ({"do_sample": True, "typical_p": 0.0}, "typical_p"),
    ({"do_sample": "yes"}, "do_sample"),
    ({"max_time": -1}, "max_time"),
    ({"generation_config": "greedy"}, "generation_config"),
    ({"logits_processor": [3]}, "logits_processor"),
    ({"num_beams": 2, "streamer": object()}, "streamer"),
    ({"streamer": 5}, "streamer"),
    ({"do_sample": True, "seed": "x"}, "seed"),
    ({"do_sample": True, "seed": -1}, "seed=-1"),
    ({"do_sample": True, "rng": 5}, "rng"),
    ({"stop_strings": ["a"], "tokenizer": 5}, "tokenizer="),
    ({"prefix_allowed_tokens_fn": lambda b, ids: [10**9]}, "prefix_allowed_tokens_fn"),
])
def test_unsupported_or_bad_settings_raise_naming_the_setting(kwargs, message):
    with pytest.raises(InputError, match=message):
        model("llama_mha").generate([[5, 6]], max_new_tokens=3, **kwargs)


def test_generation_config_file_is_honoured_and_arguments_override_it(tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(os.path.join(GOLDEN, "models", "llama_mha"), folder)
    plain = model("llama_mha").generate([[5, 6, 7]], max_new_tokens=6, num_beams=3)
    (folder / "generation_config.json").write_text(json.dumps({"num_beams": 3, "max_new_tokens": 6,
                                                               "transformers_version": "4.46.3"}))
    m = refimpl.load(str(folder))
    np.testing.assert_array_equal(m.generate([[5, 6, 7]]), plain)
    greedy = model("llama_mha").generate([[5, 6, 7]], max_new_tokens=6)
    np.testing.assert_array_equal(m.generate([[5, 6, 7]], num_beams=1), greedy)
    (folder / "generation_config.json").write_text(json.dumps({"penalty_alpha": 0.5}))
    with pytest.raises(InputError, match="penalty_alpha"):
        refimpl.load(str(folder)).generate([[5, 6, 7]])
    (folder / "generation_config.json").write_text(json.dumps({"numbeams": 3}))
    with pytest.raises(ConfigError, match="numbeams"):
        refimpl.load(str(folder)).generate([[5, 6, 7]])


def test_docs_table_lists_every_generation_config_field():
    from refimpl import generation_config as gc

    text = open(os.path.join(os.path.dirname(GOLDEN), "docs", "generation.md"), encoding="utf-8").read()
    table = text[text.index("## Every GenerationConfig field"):]
    for name in gc.DEFAULTS:
        assert f"`{name}`" in table, name
    assert gc.IMPLEMENTED | gc.METADATA | set(gc.NOT_IMPLEMENTED) == set(gc.DEFAULTS)


def test_use_cache_false_recomputes_and_gives_the_same_tokens():
    m = model("opt_preln")
    ids = [[5, 6, 7, 8]]
    np.testing.assert_array_equal(m.generate(ids, max_new_tokens=6, use_cache=False),
                                  m.generate(ids, max_new_tokens=6))
    np.testing.assert_array_equal(m.generate(ids, max_new_tokens=6, num_beams=3, use_cache=False),
                                  m.generate(ids, max_new_tokens=6, num_beams=3))


@pytest.mark.parametrize("name", ["llama_mha", "opt_preln"])
def test_accel_generates_through_the_same_code_path(name):
    """accel supplies three hooks only: beam search, processors and stop rules give refimpl's tokens."""
    accel = pytest.importorskip("refimpl_accel")
    pytest.importorskip("numba")
    ref, fast = model(name), accel.load(os.path.join(GOLDEN, "models", name))
    inputs, kwargs, expected = {r: (i, k, o) for r, i, k, o in load_runs(name)}["beam4_ngram"]
    out = fast.generate(**inputs, **kwargs)
    np.testing.assert_array_equal(out.sequences, expected["sequences"])
    close(np.stack(out.scores), expected["scores"], f"accel {name} beam4_ngram")
    for kwargs in ({"do_sample": True, "seed": 3, "top_k": 7, "no_repeat_ngram_size": 2},
                   {"num_beams": 2, "do_sample": True, "seed": 4, "num_return_sequences": 2}):
        np.testing.assert_array_equal(fast.generate([[5, 6, 7]], max_new_tokens=6, **kwargs),
                                      ref.generate([[5, 6, 7]], max_new_tokens=6, **kwargs))


def test_accel_cache_grows_in_chunks_not_to_max_new_tokens():
    """max_new_tokens=10**9 used to allocate storage for 10**9 positions up front (47 GiB on a 7B shape)."""
    accel = pytest.importorskip("refimpl_accel")
    pytest.importorskip("numba")
    from refimpl_accel.generate import GENERATION_CHUNK

    fast = accel.load(os.path.join(GOLDEN, "models", "llama_mha"))
    seen = []

    def stop_after_four(input_ids, scores):
        return np.full(input_ids.shape[0], input_ids.shape[1] >= 7)

    out = fast.generate([[5, 6, 7]], max_new_tokens=10**9, eos_token_id=[], stopping_criteria=[stop_after_four],
                        return_dict_in_generate=True)
    assert out.sequences.shape == (1, 7)
    assert out.past_key_values.capacity == 3 + GENERATION_CHUNK
    long = fast.generate([[5, 6, 7]], max_new_tokens=GENERATION_CHUNK + 40, eos_token_id=[],
                         return_dict_in_generate=True)
    np.testing.assert_array_equal(long.sequences, model("llama_mha").generate(
        [[5, 6, 7]], max_new_tokens=GENERATION_CHUNK + 40, eos_token_id=[]))
    assert long.past_key_values.capacity < 3 + 2 * GENERATION_CHUNK + 40
