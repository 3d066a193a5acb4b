"""Greedy and sampled generation with transformers' semantics (generation/utils.py `_sample`, logits_process.py).

One prompt forward fills the KV cache; every further token costs one single-position forward. Positions come
from the attention mask as transformers' prepare_inputs_for_generation makes them (cumsum - 1, pads at 1), so a
left-padded batch generates what each row generates alone. Finished rows are filled with pad (:= eos when the
checkpoint has no pad). Sampling draws from a NumPy Generator, so runs are reproducible from a seed; torch's
random numbers cannot be reproduced, which is why the tests compare processed scores instead.

Processor order (transformers' _get_logits_processor): repetition penalty, min-new-tokens; then, only when
sampling, temperature, top-k, top-p.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .inputs import attention_mask_2d, integer_array
from .ops import softmax

# GenerationConfig defaults (generation/configuration_utils.py:364-461)
GENERATION_DEFAULTS = {"max_length": 20, "max_new_tokens": None, "min_new_tokens": 0, "do_sample": False,
                       "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
                       "eos_token_id": None, "pad_token_id": None, "bos_token_id": None}


# --- logits processors: scores [B, V] -> scores [B, V]; -inf removes a token -------------------------------------

def repetition_penalty(scores, input_ids, penalty):
    """s/p where s > 0, s*p where s < 0, for every token id present in input_ids, counted once (prompt and pads too)."""
    seen = np.take_along_axis(scores, input_ids, axis=-1)  # [B, L]
    penalised = np.where(seen < 0, seen * penalty, seen / penalty)
    out = scores.copy()
    np.put_along_axis(out, input_ids, penalised, axis=-1)
    return out


def suppress_eos(scores, eos_token_ids):
    """eos scores set to -inf (MinNewTokensLengthLogitsProcessor, while fewer than min_new_tokens are generated)."""
    out = scores.copy()
    out[:, eos_token_ids] = -np.inf
    return out


def temperature_scale(scores, temperature):
    """s / T."""
    return scores / temperature


def top_k_filter(scores, top_k):
    """Keep the k largest scores (ties with the k-th kept), -inf elsewhere (TopKLogitsWarper)."""
    k = min(max(top_k, 1), scores.shape[-1])
    kth = np.sort(scores, axis=-1)[:, -k][:, None]  # [B, 1]
    return np.where(scores < kth, -np.inf, scores)


def top_p_filter(scores, top_p):
    """Keep the smallest set of top tokens whose probability reaches top_p (TopPLogitsWarper, ascending sort)."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(sorted_scores), axis=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[:, -1] = False  # min_tokens_to_keep = 1
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def process_scores(scores, input_ids, new_tokens, settings):
    """Apply the processors transformers would build for these settings, in its order."""
    if settings["repetition_penalty"] != 1.0:
        scores = repetition_penalty(scores, input_ids, settings["repetition_penalty"])
    if new_tokens < settings["min_new_tokens"] and settings["eos_token_id"]:
        scores = suppress_eos(scores, settings["eos_token_id"])
    if settings["do_sample"]:
        if settings["temperature"] != 1.0:
            scores = temperature_scale(scores, settings["temperature"])
        if settings["top_k"]:
            scores = top_k_filter(scores, settings["top_k"])
        if settings["top_p"] < 1.0:
            scores = top_p_filter(scores, settings["top_p"])
    return scores


def sample(scores, rng):
    """One token per row drawn from softmax(scores) by inverse CDF on rng.random() (torch.multinomial's role)."""
    probs = softmax(scores.astype(np.float64))
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((scores.shape[0], 1)) * cdf[:, -1:]
    return np.minimum(np.sum(cdf <= u, axis=-1), scores.shape[-1] - 1)


# --- settings ---------------------------------------------------------------------------------------------------

def resolve_settings(model, **given):
    """Call arguments over generation_config.json over GenerationConfig defaults, checked (one InputError each)."""
    settings = dict(GENERATION_DEFAULTS)
    settings.update({k: v for k, v in getattr(model, "generation_config", {}).items() if k in GENERATION_DEFAULTS})
    settings.update({k: v for k, v in given.items() if v is not None})
    eos = settings["eos_token_id"]
    settings["eos_token_id"] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if settings["pad_token_id"] is None and settings["eos_token_id"]:
        settings["pad_token_id"] = settings["eos_token_id"][0]  # transformers: pad := eos[0]
    for name in ("max_new_tokens", "max_length"):
        value = settings[name]
        if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
            raise InputError(f"{name}={value!r} must be a positive integer")
    if not isinstance(settings["min_new_tokens"], (int, np.integer)) or settings["min_new_tokens"] < 0:
        raise InputError(f"min_new_tokens={settings['min_new_tokens']!r} must be an integer >= 0")
    if settings["do_sample"]:
        t = settings["temperature"]
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InputError(f"temperature={t!r} must be > 0 when sampling (use do_sample=False for greedy)")
        p = settings["top_p"]
        if not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise InputError(f"top_p={p!r} must be in (0, 1]")
        k = settings["top_k"]
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise InputError(f"top_k={k!r} must be an integer >= 0 (0 disables it)")
    r = settings["repetition_penalty"]
    if not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
        raise InputError(f"repetition_penalty={r!r} must be > 0")
    return settings


def generation_positions(mask):
    """Positions from the mask: cumsum - 1, and 1 at pads (prepare_inputs_for_generation, generation/utils.py:404-420)."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions)


# --- the loop ---------------------------------------------------------------------------------------------------

def prepare_generation(model, input_ids, attention_mask, **given):
    """(settings, prompt ids [B, L], mask [B, L], max total length), every argument checked before any forward."""
    s = resolve_settings(model, **given)
    ids = integer_array(input_ids, "input_ids", 2)
    B, L = ids.shape
    if L == 0:
        raise InputError("the prompt is empty: generation needs at least one token (e.g. the bos token)")
    max_len = s["max_new_tokens"] + L if s["max_new_tokens"] is not None else s["max_length"]
    if L >= max_len:
        raise InputError(f"the prompt has {L} tokens, max_length={max_len}: nothing to generate "
                         "(use max_new_tokens)")
    limit = model.max_sequence_length()
    if limit is not None and max_len > limit:
        raise InputError(f"prompt ({L}) + new tokens = {max_len} positions, more than this model allows ({limit})")
    if attention_mask is None:
        # transformers infers the mask only when pad occurs in the prompt and pad is not an eos token
        pad = s["pad_token_id"]
        infer = pad is not None and np.any(ids == pad) and pad not in s["eos_token_id"]
        mask = (ids != pad).astype(np.int64) if infer else np.ones_like(ids)
    else:
        mask = attention_mask_2d(attention_mask, B, L)
    return s, ids, mask, max_len


def generate(model, input_ids, attention_mask=None, max_new_tokens=None, max_length=None, min_new_tokens=None,
             do_sample=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None, eos_token_id=None,
             pad_token_id=None, seed=None, streamer=None, rng=None):
    """Prompt [B, L] -> sequences [B, L + new] (prompt then new tokens), as transformers' generate returns."""
    s, ids, mask, max_len = prepare_generation(
        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, max_length=max_length,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    B, L = ids.shape
    if s["do_sample"] and rng is None:
        rng = np.random.default_rng(seed)

    unfinished = np.ones(B, dtype=bool)
    if streamer is not None:
        streamer.put(ids)
    out = model(input_ids=ids, attention_mask=mask, position_ids=generation_positions(mask), use_cache=True,
                **model.generation_forward_kwargs())
    while True:
        scores = out.logits[:, -1, :].astype(np.promote_types(out.logits.dtype, np.float32))  # [B, V]
        scores = process_scores(scores, ids, ids.shape[1] - L, s)
        next_tokens = sample(scores, rng) if s["do_sample"] else np.argmax(scores, axis=-1)
        if s["eos_token_id"]:
            next_tokens = np.where(unfinished, next_tokens, s["pad_token_id"])  # finished rows get pad
        ids = np.concatenate([ids, next_tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((B, 1), dtype=mask.dtype)], axis=1)
        if streamer is not None:
            streamer.put(next_tokens)
        unfinished &= ~np.isin(next_tokens, s["eos_token_id"])
        if ids.shape[1] >= max_len or not unfinished.any():
            break
        out = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=generation_positions(mask)[:, -1:],
                    past_key_values=out.past_key_values, use_cache=True, **model.generation_forward_kwargs())
    if streamer is not None:
        streamer.end()
    return ids
