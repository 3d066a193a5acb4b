"""Live oracle for generate(): random small models and random generation configs, refimpl against transformers.

Hypothesis draws a family (Llama or OPT), a small model, a left-padded batch and a generation config mixing beam
search (num_beams, length_penalty, early_stopping, num_return_sequences) with the logits processors (repetition
penalty, n-gram blocking, bad words, suppressed tokens, min_new_tokens, eos ids, exponential decay, sequence bias).
Greedy and beam runs must give transformers' tokens and, with output_scores, its processed scores within ATOL.
Sampled runs replay transformers' sampled rows (torch's random draws cannot be reproduced) and compare the
processed scores of every step, so the warpers (temperature, top-k, top-p, min-p, typical, epsilon, eta) are
checked on random distributions too.

Needs torch and transformers (the `golden` extra). REFIMPL_LIVE_EXAMPLES=N runs N random examples (soak mode).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import refimpl  # noqa: E402
from refimpl.generate import generation_positions, prepare_generation  # noqa: E402
from refimpl.processors import apply_processors, logits_processors  # noqa: E402

transformers.logging.set_verbosity_error()

ATOL = 1e-5  # fp32 on both sides; processed scores are log-softmax-sized numbers (|s| < ~30)
SOAK = os.environ.get("REFIMPL_LIVE_EXAMPLES")
V = 96  # a vocabulary large enough that 2 x num_beams candidates are never short of finite scores


def live(examples):
    return settings(max_examples=int(SOAK) if SOAK else examples, derandomize=not SOAK, database=None,
                    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def build(family, seed, folder):
    """A tiny transformers model saved to folder, and the model itself (eager, eval, fp32)."""
    torch.manual_seed(seed)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                        bos_token_id=2, eos_token_id=2, pad_token_id=1, init_std=0.2)
        model = transformers.OPTForCausalLM(config)
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    model.save_pretrained(folder, safe_serialization=True)
    return model


@st.composite
def generation_configs(draw, sample):
    """A random mix of generation settings transformers and refimpl both implement."""
    token = st.integers(3, V - 1)
    g = {"max_new_tokens": draw(st.integers(1, 8))}
    beams = 1 if sample else draw(st.sampled_from([1, 2, 3, 4]))
    if beams > 1:
        g.update(num_beams=beams, length_penalty=draw(st.sampled_from([1.0, 0.5, -1.0, 2.0])),
                 early_stopping=draw(st.sampled_from([False, True, "never"])),
                 num_return_sequences=draw(st.integers(1, beams)))
    if draw(st.booleans()):
        g["eos_token_id"] = draw(st.lists(token, min_size=1, max_size=2, unique=True))
    if draw(st.booleans()):
        g["repetition_penalty"] = draw(st.sampled_from([1.3, 0.8]))
    if draw(st.booleans()):
        g["no_repeat_ngram_size"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        g["bad_words_ids"] = draw(st.lists(st.lists(token, min_size=1, max_size=2), min_size=1, max_size=3))
    if draw(st.booleans()):
        g["suppress_tokens"] = draw(st.lists(token, min_size=1, max_size=3))
    if draw(st.booleans()):
        g["min_new_tokens"] = draw(st.integers(0, 4))
    if draw(st.booleans()) and "eos_token_id" in g:
        g["exponential_decay_length_penalty"] = (draw(st.integers(0, 3)), draw(st.sampled_from([1.2, 1.5])))
    if draw(st.booleans()):
        g["sequence_bias"] = {(draw(token),): draw(st.sampled_from([-2.0, 1.5]))}
    if sample:
        g.update(do_sample=True, temperature=draw(st.sampled_from([1.0, 0.7, 1.4])),
                 top_k=draw(st.sampled_from([0, 5, 40])), top_p=draw(st.sampled_from([1.0, 0.9, 0.5])))
        if draw(st.booleans()):
            g["min_p"] = draw(st.sampled_from([0.05, 0.2]))
        if draw(st.booleans()):
            g["typical_p"] = draw(st.sampled_from([0.8, 0.95]))
        if draw(st.booleans()):
            g[draw(st.sampled_from(["epsilon_cutoff", "eta_cutoff"]))] = draw(st.sampled_from([0.001, 0.01]))
    return g


@st.composite
def batches(draw):
    B = draw(st.integers(1, 3))
    L = draw(st.integers(2, 7))
    pads = [0] + [draw(st.integers(0, L - 1)) for _ in range(B - 1)]
    return draw(st.integers(0, 2**31 - 1)), B, L, pads


def inputs_for(batch, pad_id):
    seed, B, L, pads = batch
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (B, L))
    mask = np.ones((B, L), dtype=np.int64)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = pad_id, 0
    return ids, mask


def run_both(family, seed, batch, g):
    with tempfile.TemporaryDirectory() as folder:
        hf = build(family, seed, folder)
        ours = refimpl.load(folder)
    ids, mask = inputs_for(batch, hf.config.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_scores=True,
                               return_dict_in_generate=True, **g)
    return ours, ids, mask, expected


@pytest.mark.live_oracle
@live(60)
@given(family=st.sampled_from(["llama", "opt"]), seed=st.integers(0, 2**31 - 1), batch=batches(),
       g=generation_configs(sample=False))
def test_greedy_and_beam_configs_match_transformers(family, seed, batch, g):
    ours, ids, mask, expected = run_both(family, seed, batch, g)
    got = ours.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **g)
    context = f"{family} seed={seed} batch={batch} {g}"
    np.testing.assert_array_equal(got.sequences, expected.sequences.numpy(), err_msg=context)
    for t, (a, e) in enumerate(zip(got.scores, expected.scores)):
        e = e.numpy()
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(e), err_msg=f"{context} step {t}")
        finite = np.isfinite(e)
        np.testing.assert_allclose(a[finite], e[finite], atol=ATOL, rtol=0, err_msg=f"{context} step {t}")
    if g.get("num_beams", 1) > 1:
        np.testing.assert_allclose(got.sequences_scores, expected.sequences_scores.numpy(), atol=ATOL, rtol=1e-6,
                                   err_msg=context)


@pytest.mark.live_oracle
@live(40)
@given(family=st.sampled_from(["llama", "opt"]), seed=st.integers(0, 2**31 - 1), batch=batches(),
       g=generation_configs(sample=True))
def test_sampling_configs_give_transformers_processed_scores(family, seed, batch, g):
    ours, ids, mask, expected = run_both(family, seed, batch, g)
    sequences = expected.sequences.numpy()
    s, _, _ = prepare_generation(ours, ids, mask, **g)
    processors = logits_processors(s, ids.shape[1])
    for t, e in enumerate(expected.scores):
        prefix = sequences[:, :ids.shape[1] + t]
        m = np.concatenate([mask, np.ones((len(prefix), t), dtype=mask.dtype)], axis=1)
        logits = ours(input_ids=prefix, attention_mask=m, position_ids=generation_positions(m)).logits[:, -1]
        a, e = apply_processors(processors, prefix, logits), e.numpy()
        context = f"{family} seed={seed} batch={batch} {g} step {t}"
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(e), err_msg=context)
        finite = np.isfinite(e)
        np.testing.assert_allclose(a[finite], e[finite], atol=ATOL, rtol=0, err_msg=context)
