#!/usr/bin/env python
"""Goldens for generate()'s options: beam search, every logits processor, stop strings, output fields.

transformers 4.46.3's own generate() on the saved golden models (golden/models/, made by make_golden.py), written
to golden/generation_options/<model>.npz: per run `<run>.in.<name>` inputs, `<run>.out.<field>` outputs
(sequences; scores, logits, sequences_scores, beam_indices stacked per step where asked) and a JSON `meta` with
each run's kwargs. Sampling runs keep only their processed scores (torch's random numbers cannot be reproduced):
the tests replay the sampled sequence and compare the scores.

Usage: python golden/make_generation_options.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import GOLDEN, load_saved, to_np, write_npz  # noqa: E402

OUT = GOLDEN / "generation_options"
MODELS = ["llama_mha", "opt_preln", "llama_gqa_bias"]
TEXT_MODELS = ["llama_text", "opt_text"]
SEED = 11


def model_runs(model, name):
    """(run, inputs, kwargs) for one model; token choices come from a plain greedy run of the same model."""
    g = torch.Generator().manual_seed(SEED + sum(map(ord, name)))
    V = model.config.vocab_size
    ids = lambda *shape: torch.randint(3, V - 1, shape, generator=g)  # noqa: E731
    one, two, single = ids(1, 6), ids(2, 6), ids(1, 1)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    padded = two.clone()
    padded[1, :2] = pad
    mask = torch.ones_like(padded)
    mask[1, :2] = 0
    plain = model.generate(two, attention_mask=torch.ones_like(two), max_new_tokens=12, do_sample=False)
    new = plain[:, 6:]
    t0, t1, t2 = int(new[0, 0]), int(new[0, 1]), int(new[0, 2])
    scored = {"output_scores": True, "return_dict_in_generate": True}
    both = {"input_ids": two, "attention_mask": torch.ones_like(two)}
    left = {"input_ids": padded, "attention_mask": mask}
    runs = [
        ("beam2", both, {"max_new_tokens": 8, "num_beams": 2}),
        ("beam4_ret3", both, {"max_new_tokens": 10, "num_beams": 4, "num_return_sequences": 3, **scored}),
        ("beam3_lp_half", left, {"max_new_tokens": 9, "num_beams": 3, "length_penalty": 0.5, **scored}),
        ("beam3_lp_neg", both, {"max_new_tokens": 9, "num_beams": 3, "length_penalty": -1.5, **scored}),
        ("beam3_eos", both, {"max_new_tokens": 12, "num_beams": 3, "eos_token_id": t2, "num_return_sequences": 2,
                             **scored}),
        ("beam3_eos_early", both, {"max_new_tokens": 12, "num_beams": 3, "eos_token_id": t1, "early_stopping": True,
                                   **scored}),
        ("beam3_eos_never", both, {"max_new_tokens": 12, "num_beams": 3, "eos_token_id": t1,
                                   "early_stopping": "never", **scored}),
        ("beam3_eos_never_neg", both, {"max_new_tokens": 10, "num_beams": 3, "eos_token_id": [t1, t2],
                                       "early_stopping": "never", "length_penalty": -0.5, **scored}),
        ("beam4_ngram", left, {"max_new_tokens": 10, "num_beams": 4, "no_repeat_ngram_size": 2, **scored}),
        ("beam2_max_length", {"input_ids": one}, {"max_length": 11, "num_beams": 2, "min_new_tokens": 3, "eos_token_id": t0,
                                   **scored}),
        ("ngram2", both, {"max_new_tokens": 12, "no_repeat_ngram_size": 2, **scored}),
        ("ngram3", left, {"max_new_tokens": 12, "no_repeat_ngram_size": 3, **scored}),
        ("bad_words", both, {"max_new_tokens": 10, "bad_words_ids": [[t0], [t1, t2], [t2, t0, t1]], **scored}),
        ("sequence_bias", both, {"max_new_tokens": 10, "sequence_bias": {(t0,): -4.0, (t1, t2): 3.0}, **scored}),
        ("forced_bos_eos", {"input_ids": single}, {"max_new_tokens": 7, "forced_bos_token_id": t1,
                                                    "forced_eos_token_id": t0, "eos_token_id": t0, **scored}),
        ("suppress", both, {"max_new_tokens": 8, "suppress_tokens": [t0, t1], "begin_suppress_tokens": [t2],
                            **scored}),
        ("begin_suppress_single", {"input_ids": single}, {"max_new_tokens": 6, "begin_suppress_tokens": [t0, t1],
                                                          "forced_bos_token_id": t2, **scored}),
        ("decay_min_length", both, {"max_new_tokens": 12, "eos_token_id": t1, "min_length": 9,
                                    "exponential_decay_length_penalty": (2, 1.6), **scored}),
        ("renormalize_invalid", both, {"max_new_tokens": 6, "remove_invalid_values": True,
                                       "renormalize_logits": True, "repetition_penalty": 1.3, **scored}),
        ("outputs_all", left, {"max_new_tokens": 4, "output_logits": True, "output_attentions": True,
                               "output_hidden_states": True, **scored}),
        ("beam_outputs_all", both, {"max_new_tokens": 3, "num_beams": 2, "output_logits": True,
                                    "output_attentions": True, "output_hidden_states": True, **scored}),
        ("sample_typical", left, {"max_new_tokens": 6, "do_sample": True, "typical_p": 0.7, "top_k": 0, **scored}),
        ("sample_epsilon", both, {"max_new_tokens": 6, "do_sample": True, "epsilon_cutoff": 0.004, "top_k": 0,
                                  **scored}),
        ("sample_eta", both, {"max_new_tokens": 6, "do_sample": True, "eta_cutoff": 0.01, "top_k": 0, **scored}),
        ("sample_min_p", left, {"max_new_tokens": 6, "do_sample": True, "min_p": 0.2, "temperature": 0.8,
                                **scored}),
        ("sample_all_warpers", both, {"max_new_tokens": 6, "do_sample": True, "temperature": 1.3, "top_k": 30,
                                      "top_p": 0.9, "min_p": 0.05, "typical_p": 0.95, "epsilon_cutoff": 0.001,
                                      "eta_cutoff": 0.002, **scored}),
        ("sample_return3", {"input_ids": one}, {"max_new_tokens": 5, "do_sample": True, "num_return_sequences": 3, "top_k": 20,
                                 **scored}),
        ("beam_sample", both, {"max_new_tokens": 6, "do_sample": True, "num_beams": 3, "top_k": 10,
                               "eos_token_id": t1, **scored}),
    ]
    return runs


def text_runs(model, tok):
    """Stop strings chosen inside each prompt's greedy continuation, across token boundaries."""
    runs = []
    for i, prompt in enumerate(["Once upon a time", "The capital of France is", "def hello():\n    return"]):
        ids = torch.tensor([tok.encode(prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        cut = len(tok.decode(new[:4], skip_special_tokens=True))
        text = tok.decode(new, skip_special_tokens=True)
        stop = text[max(cut - 2, 0):cut + 1]  # ends one character into the fifth new token's text
        kwargs = {"max_new_tokens": 16, "stop_strings": [stop] if stop.strip() else ["zz"]}
        runs.append((f"stop{i}", {"input_ids": ids}, kwargs))
        runs.append((f"stop{i}_list", {"input_ids": ids},
                     {"max_new_tokens": 16, "stop_strings": ["qqqq", text[cut + 1:cut + 3] or "zz", text[:2] or "zz"]}))
        runs.append((f"stop{i}_never", {"input_ids": ids}, {"max_new_tokens": 10, "stop_strings": "zqxzqx"}))
    return runs


def store(arrays, meta, run, inputs, kwargs, out):
    sequences = out.sequences if hasattr(out, "sequences") else out
    for k, v in inputs.items():
        arrays[f"{run}.in.{k}"] = to_np(v)
    arrays[f"{run}.out.sequences"] = to_np(sequences)
    for field in ("scores", "logits"):
        if getattr(out, field, None) is not None:
            arrays[f"{run}.out.{field}"] = np.stack([to_np(t) for t in getattr(out, field)])  # [steps, N, V]
    for field in ("sequences_scores", "beam_indices"):
        if getattr(out, field, None) is not None:
            arrays[f"{run}.out.{field}"] = to_np(getattr(out, field))
    if getattr(out, "attentions", None) is not None:  # per step, per layer [N, H, S, T]
        for t, step in enumerate(out.attentions):
            for layer, a in enumerate(step):
                arrays[f"{run}.out.attentions.{t}.{layer}"] = to_np(a)
    if getattr(out, "hidden_states", None) is not None:
        for t, step in enumerate(out.hidden_states):
            for layer, h in enumerate(step):
                arrays[f"{run}.out.hidden_states.{t}.{layer}"] = to_np(h)
    jsonable = {k: ([list(key) + [v] for key, v in kwargs[k].items()] if k == "sequence_bias" else v)
                for k, v in kwargs.items()}
    meta["runs"].append({"name": run, "inputs": list(inputs), "kwargs": jsonable})


@torch.no_grad()
def build(name):
    model = load_saved(GOLDEN, name)
    arrays, meta = {}, {"model": name, "seed": SEED, "transformers": transformers.__version__, "runs": []}
    if name in TEXT_MODELS:
        tok = transformers.AutoTokenizer.from_pretrained(GOLDEN / "models" / name)
        runs = text_runs(model, tok)
        meta["tokenizer"] = type(tok).__name__
    else:
        tok, runs = None, model_runs(model, name)
    for run, inputs, kwargs in runs:
        torch.manual_seed(SEED)
        out = model.generate(**inputs, **kwargs, **({"tokenizer": tok} if tok is not None else {}))
        store(arrays, meta, run, inputs, kwargs, out)
    arrays["meta"] = np.array(json.dumps(meta, ensure_ascii=False))
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.npz"
    write_npz(path, arrays)
    print(f"generation_options/{name}.npz {path.stat().st_size / 1e3:.1f} kB ({len(meta['runs'])} runs)", flush=True)


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.set_verbosity_error()
    for name in MODELS + TEXT_MODELS:
        build(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
