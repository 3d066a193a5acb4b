"""generate() for accel's models: refimpl.generate's loop, with the cache allocated once and a sort-free sampler.

The same settings (refimpl.generate.resolve_settings), positions, processors and stopping rules as refimpl, step
for step, so greedy decoding gives refimpl's tokens and a seed gives refimpl's samples. What differs:
  - a KVCache with room for every position is allocated before the prompt (no copy per token);
  - each forward computes the last position's logits only (refimpl computes OPT's for every position);
  - top-k / top-p use accel.sampling (a partition, not a sort of the vocabulary).
"""
from __future__ import annotations

import numpy as np

from refimpl import generate as ref

from .sampling import sample


def next_token_scores(model, ids, mask, cache):
    """One forward of ids [B, S] (positions from the mask) -> (logits of the last position [B, V] float32, cache)."""
    h, out = model._decoder_call(ids, mask, ref.generation_positions(mask)[:, -ids.shape[1]:], cache)
    return model._last_logits(h), out.past_key_values


def generate(model, input_ids, attention_mask=None, max_new_tokens=None, max_length=None, min_new_tokens=None,
             do_sample=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None, eos_token_id=None,
             pad_token_id=None, seed=None, streamer=None, rng=None):
    """Prompt [B, L] -> sequences [B, L + new], as refimpl.generate.generate (same arguments and checks)."""
    s, ids, mask, max_len = ref.prepare_generation(
        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, max_length=max_length,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    B, L = ids.shape
    if s["do_sample"] and rng is None:
        rng = np.random.default_rng(seed)

    all_mask = np.ones((B, max_len), dtype=np.int64)  # the mask grows by one column a step: views, no concatenation
    all_mask[:, :L] = mask
    sequences = np.zeros((B, max_len), dtype=np.int64)
    sequences[:, :L] = ids
    unfinished = np.ones(B, dtype=bool)
    if streamer is not None:
        streamer.put(ids)
    cache = model.new_cache(B, max_len)
    logits, cache = next_token_scores(model, ids, mask, cache)
    length = L
    while True:
        scores = logits.astype(np.promote_types(logits.dtype, np.float32))  # [B, V]
        ids = sequences[:, :length]
        if s["repetition_penalty"] != 1.0:
            scores = ref.repetition_penalty(scores, ids, s["repetition_penalty"])
        if length - L < s["min_new_tokens"] and s["eos_token_id"]:
            scores = ref.suppress_eos(scores, s["eos_token_id"])
        if s["do_sample"]:
            if s["temperature"] != 1.0:
                scores = ref.temperature_scale(scores, s["temperature"])
            next_tokens = sample(scores, s["top_k"], s["top_p"], rng)
        else:
            next_tokens = np.argmax(scores, axis=-1)
        if s["eos_token_id"]:
            next_tokens = np.where(unfinished, next_tokens, s["pad_token_id"])
        sequences[:, length] = next_tokens
        length += 1
        if streamer is not None:
            streamer.put(next_tokens)
        unfinished &= ~np.isin(next_tokens, s["eos_token_id"])
        if length >= max_len or not unfinished.any():
            break
        logits, cache = next_token_scores(model, sequences[:, length - 1:length], all_mask[:, :length], cache)
    if streamer is not None:
        streamer.end()
    return sequences[:, :length]
