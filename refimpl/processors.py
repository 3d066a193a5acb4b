"""Logits processors and stopping criteria, with transformers 4.46.3's semantics and order.

A processor maps (input_ids [N, T], scores [N, V] float32) to new scores; -inf removes a token. N is batch x beams.
`logits_processors(s, ...)` builds the list transformers' `_get_logits_processor` builds for the same settings,
in its order (generation/utils.py:855-1070); `stopping_criteria(s, ...)` the list of `_get_stopping_criteria`
(utils.py:1072-1110). The processors are logits_process.py's; each docstring names its class.
"""
from __future__ import annotations

import time
from functools import partial

import numpy as np

from .ops import softmax


def log_softmax(x):
    """x - logsumexp(x) over the last axis (torch.log_softmax)."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _remove(scores, mask):
    """scores with -inf where mask."""
    return np.where(mask, np.float32(-np.inf), scores).astype(scores.dtype, copy=False)


def _eos_mask(vocab_size, eos_token_ids):
    mask = np.zeros(vocab_size, dtype=bool)
    mask[eos_token_ids] = True
    return mask


# --- processors (always applied) ------------------------------------------------------------------------------

def sequence_bias(input_ids, scores, bias):
    """+bias[ids] on a sequence's last token where the row ends with its other tokens (SequenceBiasLogitsProcessor)."""
    add = np.zeros_like(scores)
    for ids, value in bias.items():
        if len(ids) == 1:
            add[:, ids[-1]] += np.float32(value)
        elif len(ids) <= input_ids.shape[1]:
            match = np.all(input_ids[:, input_ids.shape[1] - len(ids) + 1:] == np.array(ids[:-1]), axis=1)
            add[:, ids[-1]] += np.where(match, np.float32(value), np.float32(0))
    return scores + add


def repetition_penalty(input_ids, scores, penalty):
    """s/p where s > 0, s*p where s < 0, for every id present in input_ids (RepetitionPenaltyLogitsProcessor)."""
    seen = np.take_along_axis(scores, input_ids, axis=-1)  # [N, T]
    penalised = np.where(seen < 0, seen * np.float32(penalty), seen / np.float32(penalty))
    out = scores.copy()
    np.put_along_axis(out, input_ids, penalised.astype(scores.dtype), axis=-1)
    return out


def no_repeat_ngram(input_ids, scores, n):
    """-inf on every token that would repeat an n-gram already in the row (NoRepeatNGramLogitsProcessor)."""
    T = input_ids.shape[1]
    if T + 1 < n:
        return scores
    out = scores.copy()
    for row, ids in enumerate(input_ids.tolist()):
        prefix = tuple(ids[T + 1 - n:])  # the last n-1 tokens
        banned = [ids[i + n - 1] for i in range(T - n + 1) if tuple(ids[i:i + n - 1]) == prefix]
        out[row, banned] = -np.inf
    return out


def min_length(input_ids, scores, length, eos_token_ids):
    """eos removed while the row is shorter than min_length (MinLengthLogitsProcessor)."""
    if input_ids.shape[1] >= length:
        return scores
    return _remove(scores, _eos_mask(scores.shape[-1], eos_token_ids))


def min_new_tokens(input_ids, scores, prompt_length, count, eos_token_ids):
    """eos removed while fewer than count tokens are generated (MinNewTokensLengthLogitsProcessor)."""
    if input_ids.shape[1] - prompt_length >= count:
        return scores
    return _remove(scores, _eos_mask(scores.shape[-1], eos_token_ids))


def prefix_allowed(input_ids, scores, allowed_tokens, num_beams):
    """-inf outside allowed_tokens(batch index, row ids) (PrefixConstrainedLogitsProcessor)."""
    from .errors import InputError

    mask = np.full_like(scores, -np.inf)
    for row, ids in enumerate(input_ids):
        allowed = list(allowed_tokens(row // num_beams, ids))
        if not allowed:
            raise InputError(f"prefix_allowed_tokens_fn returned no tokens for batch index {row // num_beams}")
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < scores.shape[-1] for t in allowed):
            raise InputError(f"prefix_allowed_tokens_fn returned {allowed[:8]}...: expected token ids in "
                             f"[0, {scores.shape[-1]})")
        mask[row, allowed] = 0
    return scores + mask


def forced_bos(input_ids, scores, token):
    """Only `token` allowed at length 1 (ForcedBOSTokenLogitsProcessor)."""
    if input_ids.shape[1] != 1:
        return scores
    out = np.full_like(scores, -np.inf)
    out[:, token] = 0
    return out


def forced_eos(input_ids, scores, max_length, eos_token_ids):
    """Only eos allowed at length max_length - 1 (ForcedEOSTokenLogitsProcessor)."""
    if input_ids.shape[1] != max_length - 1:
        return scores
    out = np.full_like(scores, -np.inf)
    out[:, eos_token_ids] = 0
    return out


def remove_invalid(input_ids, scores):
    """NaN -> 0, +-inf -> the dtype's largest finite values (InfNanRemoveLogitsProcessor)."""
    info = np.finfo(scores.dtype)
    out = np.where(np.isnan(scores), 0, scores)
    out = np.where(scores == np.inf, info.max, out)
    return np.where(scores == -np.inf, info.min, out).astype(scores.dtype)


def exponential_decay(input_ids, scores, start, factor, eos_token_ids):
    """eos scores += |s| (factor^(T - start) - 1) once T > start (ExponentialDecayLengthPenalty)."""
    T = input_ids.shape[1]
    if T <= start:
        return scores
    out = scores.copy()
    out[:, eos_token_ids] += np.abs(scores[:, eos_token_ids]) * np.float32(factor ** (T - start) - 1)
    return out


def suppress(input_ids, scores, tokens):
    """-inf on the tokens, always (SuppressTokensLogitsProcessor)."""
    return _remove(scores, np.isin(np.arange(scores.shape[-1]), tokens))


def suppress_at_begin(input_ids, scores, tokens, begin_index):
    """-inf on the tokens at the first generated position (SuppressTokensAtBeginLogitsProcessor)."""
    if input_ids.shape[1] != begin_index:
        return scores
    return suppress(input_ids, scores, tokens)


# --- warpers (only when sampling) ------------------------------------------------------------------------------

def temperature(input_ids, scores, t):
    """s / T (TemperatureLogitsWarper)."""
    return scores / np.float32(t)


def top_k(input_ids, scores, k, keep=1):
    """Keep the k largest scores, ties with the k-th kept (TopKLogitsWarper)."""
    k = min(max(k, keep), scores.shape[-1])
    kth = np.sort(scores, axis=-1)[:, -k][:, None]  # [N, 1]
    return _remove(scores, scores < kth)


def top_p(input_ids, scores, p, keep=1):
    """Keep the smallest set of top tokens whose probability reaches p (TopPLogitsWarper, ascending sort)."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending
    cumulative = np.cumsum(softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -keep:] = False
    return _remove(scores, _unsort(remove_sorted, order))


def min_p(input_ids, scores, p, keep=1):
    """Remove tokens with prob < p * (top prob), keeping the `keep` best (MinPLogitsWarper)."""
    probs = softmax(scores)
    remove = probs < p * np.max(probs, axis=-1, keepdims=True)
    order = np.argsort(-scores, axis=-1, kind="stable")  # descending
    remove_sorted = np.take_along_axis(remove, order, axis=-1)
    remove_sorted[:, :keep] = False
    return _remove(scores, _unsort(remove_sorted, order))


def typical(input_ids, scores, mass, keep=1):
    """Keep the tokens whose -log p is closest to the entropy, up to `mass` (TypicalLogitsWarper)."""
    logp = log_softmax(scores)
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):  # -inf * 0 = nan at removed tokens, dropped by nansum as in transformers
        entropy = -np.nansum(logp * p, axis=-1, keepdims=True)
    shifted = np.abs(-logp - entropy)
    order = np.argsort(shifted, axis=-1, kind="stable")
    sorted_shifted = np.take_along_axis(shifted, order, axis=-1)
    cumulative = np.cumsum(softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1)
    last = np.minimum(np.sum(cumulative < mass, axis=1), scores.shape[-1] - 1)
    remove_sorted = sorted_shifted > np.take_along_axis(sorted_shifted, last[:, None], axis=1)
    remove_sorted[:, :keep] = False
    return _remove(scores, _unsort(remove_sorted, order))


def epsilon(input_ids, scores, eps, keep=1):
    """Remove tokens with prob < eps, keeping the `keep` best (EpsilonLogitsWarper)."""
    remove = softmax(scores) < np.float32(eps)
    kth = np.sort(scores, axis=-1)[:, -min(keep, scores.shape[-1])][:, None]
    return _remove(scores, remove & (scores < kth))


def eta(input_ids, scores, eps, keep=1):
    """Remove tokens with prob < min(eps, sqrt(eps) exp(-entropy)) (EtaLogitsWarper)."""
    probs = softmax(scores)
    logp = log_softmax(scores)
    entropy = -np.sum(probs * np.where(probs > 0, logp, 0), axis=-1, keepdims=True)  # 0 log 0 = 0
    eps = np.float32(eps)
    threshold = np.minimum(eps, np.sqrt(eps) * np.exp(-entropy))
    kth = np.sort(scores, axis=-1)[:, -min(keep, scores.shape[-1])][:, None]
    return _remove(scores, (probs < threshold) & (scores < kth))


def renormalize(input_ids, scores):
    """log_softmax(scores), always last (LogitNormalization)."""
    return log_softmax(scores)


def _unsort(sorted_mask, order):
    """A mask in sorted order -> the same mask in vocabulary order."""
    mask = np.zeros_like(sorted_mask)
    np.put_along_axis(mask, order, sorted_mask, axis=-1)
    return mask


# --- the lists transformers builds ----------------------------------------------------------------------------

def logits_processors(s, prompt_length, user=(), prefix_allowed_tokens_fn=None):
    """[processor(input_ids, scores)] for settings s, in transformers' order; user processors before the warpers."""
    eos = s["eos_token_id"]
    p = []
    if s["sequence_bias"] is not None:
        p.append(partial(sequence_bias, bias=s["sequence_bias"]))
    if s["repetition_penalty"] != 1.0:
        p.append(partial(repetition_penalty, penalty=s["repetition_penalty"]))
    if s["no_repeat_ngram_size"] > 0:
        p.append(partial(no_repeat_ngram, n=s["no_repeat_ngram_size"]))
    if s["bad_words_ids"] is not None:
        bad = {tuple(ids): float("-inf") for ids in s["bad_words_ids"] if not (len(ids) == 1 and ids[0] in eos)}
        if bad:
            p.append(partial(sequence_bias, bias=bad))  # NoBadWordsLogitsProcessor: a bias of -inf, eos exempt
    if s["min_length"] > 0 and eos:
        p.append(partial(min_length, length=s["min_length"], eos_token_ids=eos))
    if s["min_new_tokens"] is not None and s["min_new_tokens"] > 0 and eos:
        p.append(partial(min_new_tokens, prompt_length=prompt_length, count=s["min_new_tokens"], eos_token_ids=eos))
    if prefix_allowed_tokens_fn is not None:
        p.append(partial(prefix_allowed, allowed_tokens=prefix_allowed_tokens_fn, num_beams=s["num_beams"]))
    if s["forced_bos_token_id"] is not None:
        p.append(partial(forced_bos, token=s["forced_bos_token_id"]))
    if s["forced_eos_token_id"] is not None:
        p.append(partial(forced_eos, max_length=s["max_length"], eos_token_ids=s["forced_eos_token_id"]))
    if s["remove_invalid_values"]:
        p.append(remove_invalid)
    if s["exponential_decay_length_penalty"] is not None:
        start, factor = s["exponential_decay_length_penalty"]
        p.append(partial(exponential_decay, start=start + prompt_length, factor=factor, eos_token_ids=eos))
    if s["suppress_tokens"] is not None:
        p.append(partial(suppress, tokens=s["suppress_tokens"]))
    if s["begin_suppress_tokens"] is not None:
        begin = prompt_length + (1 if prompt_length == 1 and s["forced_bos_token_id"] is not None else 0)
        p.append(partial(suppress_at_begin, tokens=s["begin_suppress_tokens"], begin_index=begin))
    p.extend(user)
    if s["do_sample"]:
        # beams keep one token more than there are eos tokens, so every beam can continue (utils.py:1023)
        keep = len(eos) + 1 if s["num_beams"] > 1 and eos else 2 if s["num_beams"] > 1 else 1
        if s["temperature"] != 1.0:
            p.append(partial(temperature, t=s["temperature"]))
        if s["top_k"] is not None and s["top_k"] != 0:
            p.append(partial(top_k, k=s["top_k"], keep=keep))
        if s["top_p"] is not None and s["top_p"] < 1.0:
            p.append(partial(top_p, p=s["top_p"], keep=keep))
        if s["min_p"] is not None:
            p.append(partial(min_p, p=s["min_p"], keep=keep))
        if s["typical_p"] is not None and s["typical_p"] < 1.0:
            p.append(partial(typical, mass=s["typical_p"], keep=keep))
        if s["epsilon_cutoff"] is not None and 0.0 < s["epsilon_cutoff"] < 1.0:
            p.append(partial(epsilon, eps=s["epsilon_cutoff"], keep=keep))
        if s["eta_cutoff"] is not None and 0.0 < s["eta_cutoff"] < 1.0:
            p.append(partial(eta, eps=s["eta_cutoff"], keep=keep))
    if s["renormalize_logits"]:
        p.append(renormalize)
    return p


def apply_processors(processors, input_ids, scores):
    for process in processors:
        scores = process(input_ids, scores)
    return scores


# --- stopping criteria: (input_ids [N, T], scores) -> done [N] ------------------------------------------------

def max_length_reached(input_ids, scores, max_length):
    """T >= max_length (MaxLengthCriteria)."""
    return np.full(input_ids.shape[0], input_ids.shape[1] >= max_length)


def time_is_up(input_ids, scores, start, max_time):
    """More than max_time seconds since generate began (MaxTimeCriteria)."""
    return np.full(input_ids.shape[0], time.time() - start > max_time)


def ends_with_eos(input_ids, scores, eos_token_ids):
    """The last token is an eos (EosTokenCriteria)."""
    return np.isin(input_ids[:, -1], eos_token_ids)


def token_strings(tokenizer, model_vocab_size):
    """Each id's text as it reads after other text: decode(prefix + [id]) minus decode(prefix).

    StopStringCriteria.clean_tokenizer_vocab does the same with convert_tokens_to_string and the prefix "abcdef",
    so a token's leading space (Llama's "\u2581", GPT-2's "\u0120") is kept. Ids the tokenizer does not know
    (a model vocabulary padded past the tokenizer's) read as "".
    """
    prefix = tokenizer.encode("abcdef", add_special_tokens=False)
    base = tokenizer.decode(prefix, clean_up_tokenization_spaces=False)
    strings = []
    for token in range(model_vocab_size):
        if not tokenizer._known_id(token):
            strings.append("")
            continue
        text = tokenizer.decode(prefix + [token], clean_up_tokenization_spaces=False)
        strings.append(text[len(base):] if text.startswith(base) else "")
    return strings


def stop_string_match(ids, strings, stop):
    """Does `stop` end inside the last token's text, the tokens before it spelling the rest (StopStringCriteria)?

    Text may overhang past the stop string's end (in the last token) and before its start (in the first token
    used); an empty token breaks the chain, as in transformers' position tables. At most len(stop) tokens matter.
    """
    pieces = []
    for token in reversed(ids[-len(stop):]):
        if not strings[token]:
            break
        pieces.insert(0, strings[token])
    if not pieces:
        return False
    text = "".join(pieces)
    tail = len(text) - len(pieces[-1])  # where the last token's text begins
    return any(text[end - len(stop):end] == stop for end in range(max(tail + 1, len(stop)), len(text) + 1))


def stop_strings_reachable(strings, stops):
    """Can any token end any stop string (a suffix of the stop string ending inside it)? transformers raises if not."""
    for stop in stops:
        for piece in strings:
            for k in range(1, len(piece) + 1):
                m = min(k, len(stop))
                if piece[k - m:k] == stop[len(stop) - m:]:
                    return True
    return False


def stop_strings_found(input_ids, scores, strings, stops):
    """Per row: some stop string ends in the last token (StopStringCriteria)."""
    return np.array([any(stop_string_match(row.tolist(), strings, stop) for stop in stops) for row in input_ids])


def stopping_criteria(s, start_time, tokenizer_strings=None, user=()):
    """[criterion(input_ids, scores) -> done [N]] in transformers' order; user criteria last."""
    c = []
    if s["max_length"] is not None:
        c.append(partial(max_length_reached, max_length=s["max_length"]))
    if s["max_time"] is not None:
        c.append(partial(time_is_up, start=start_time, max_time=s["max_time"]))
    if s["stop_strings"] is not None:
        c.append(partial(stop_strings_found, strings=tokenizer_strings, stops=s["stop_strings"]))
    if s["eos_token_id"]:
        c.append(partial(ends_with_eos, eos_token_ids=s["eos_token_id"]))
    c.extend(user)
    return c


def apply_criteria(criteria, input_ids, scores):
    """done [N]: any criterion true for the row (StoppingCriteriaList)."""
    from .errors import InputError

    done = np.zeros(input_ids.shape[0], dtype=bool)
    for criterion in criteria:
        result = np.asarray(criterion(input_ids, scores))
        if result.dtype != bool or result.ndim > 1 or result.size not in (1, input_ids.shape[0]):
            raise InputError(f"stopping criterion {criterion!r} returned {result.dtype} {result.shape}: expected "
                             f"booleans, one per row ({input_ids.shape[0]}) or one for all")
        done |= result
    return done
