"""generate(): greedy, sampling, beam search and beam sampling with transformers 4.46.3's semantics.

One prompt forward fills the KV cache; every further token costs one single-position forward. Positions come
from the attention mask as transformers' prepare_inputs_for_generation makes them (cumsum - 1, pads at 1), so a
left-padded batch generates what each row generates alone. Settings are generation_config.py's (every
GenerationConfig field honoured or rejected); processors and stopping criteria are processors.py's, in
transformers' order. Sampling draws from a NumPy Generator, so runs are reproducible from a seed; torch's random
numbers cannot be reproduced, which is why the tests compare processed scores instead.

The loops are transformers' `_sample` (greedy and sampling) and `_beam_search` with `BeamSearchScorer` and
`BeamHypotheses` (generation/utils.py, beam_search.py). A model takes part through three methods:
generation_forward (one forward: next-token logits and the outputs), generation_cache (the empty cache it
starts from) and reorder_cache (beam search's row gather); accel's models override them, nothing else.

Shapes: B batch, K beams, N = B x K (or B x num_return_sequences) rows, T tokens so far, V vocabulary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import generation_config as gc
from .errors import ConfigError, InputError
from .inputs import attention_mask_2d, integer_array
from .ops import softmax
from .formats.untrusted import summary
from .processors import (apply_criteria, apply_processors, log_softmax, logits_processors, stop_strings_reachable,
                         token_strings)
from .processors import stopping_criteria as criteria_for


@dataclass
class GenerateDecoderOnlyOutput:
    """return_dict_in_generate=True for greedy and sampling: per-step tuples, as transformers' output class."""

    sequences: np.ndarray = None
    scores: tuple | None = None  # processed scores [N, V] per step (output_scores)
    logits: tuple | None = None  # raw logits [N, V] per step (output_logits)
    attentions: tuple | None = None  # per step: per layer [N, H, S, T]
    hidden_states: tuple | None = None  # per step: L + 1 arrays [N, S, D]
    past_key_values: tuple | None = None


@dataclass
class GenerateBeamDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """return_dict_in_generate=True for beam search: adds the final scores and each token's beam."""

    sequences_scores: np.ndarray | None = None  # [B x num_return_sequences] float32 (output_scores)
    beam_indices: np.ndarray | None = None  # [B x num_return_sequences, T - L], -1 after the end (output_scores)


# --- settings ---------------------------------------------------------------------------------------------------

def resolve_settings(model, generation_config=None, **given):
    """Defaults < generation_config.json < generation_config= < arguments, each field checked (InputError)."""
    try:
        gc.layered(getattr(model, "generation_config", None) or {})  # a bad key in the file is a ConfigError
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    if generation_config is not None and not isinstance(generation_config, dict):
        raise InputError(f"generation_config= must be a dict of settings, not {type(generation_config).__name__}")
    s = gc.layered(getattr(model, "generation_config", None) or {}, generation_config, given)
    gc.check_supported(s)
    gc.check_values(s, model.config.vocab_size)
    if s["pad_token_id"] is None and s["eos_token_id"]:
        s["pad_token_id"] = s["eos_token_id"][0]  # transformers: pad := eos[0] (utils.py:1824)
    return s


def check_modes(s, streamer):
    """The combinations transformers rejects (GenerationConfig.validate, generate's checks)."""
    beams, n = s["num_beams"], s["num_return_sequences"]
    if beams == 1 and not s["do_sample"] and n > 1:
        raise InputError(f"num_return_sequences={n} needs sampling (do_sample=True) or beam search (num_beams > 1)")
    if beams > 1 and n > beams:
        raise InputError(f"num_return_sequences={n} is more than num_beams={beams}")
    if beams > 1 and streamer is not None:
        raise InputError("a streamer cannot be used with beam search (transformers does not support it either)")


def generation_positions(mask):
    """Positions from the mask: cumsum - 1, and 1 at pads (prepare_inputs_for_generation, generation/utils.py:404-420)."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions)


def prepare_generation(model, input_ids, attention_mask, generation_config=None, streamer=None, **given):
    """(settings, prompt ids [B, L], mask [B, L]) with max_length set, every argument checked before any forward."""
    s = resolve_settings(model, generation_config, **given)
    check_modes(s, streamer)
    ids = integer_array(input_ids, "input_ids", 2)
    B, L = ids.shape
    if L == 0:
        raise InputError("the prompt is empty: generation needs at least one token (e.g. the bos token)")
    if np.any(ids < 0) or np.any(ids >= model.config.vocab_size):
        bad = int(ids[(ids < 0) | (ids >= model.config.vocab_size)][0])
        raise InputError(f"input_ids holds {bad}, outside the vocabulary [0, {model.config.vocab_size})")
    if s["max_new_tokens"] is not None:
        s["max_length"] = s["max_new_tokens"] + L  # _prepare_generated_length: max_new_tokens wins
    if s["min_new_tokens"] is not None:
        s["min_length"] = s["min_new_tokens"] + L
    if s["max_length"] is None:
        raise InputError("max_length=None and max_new_tokens=None: give a length to stop at")
    if L >= s["max_length"]:
        raise InputError(f"the prompt has {L} tokens, max_length={s['max_length']}: nothing to generate "
                         "(use max_new_tokens)")
    limit = model.max_sequence_length()
    if limit is not None and s["max_length"] > limit:
        raise InputError(f"prompt ({L}) + new tokens = {s['max_length']} positions, more than this model allows "
                         f"({limit})")
    if attention_mask is None:
        # transformers infers the mask only when pad occurs in the prompt and pad is not an eos token
        pad = s["pad_token_id"]
        infer = pad is not None and np.any(ids == pad) and pad not in s["eos_token_id"]
        mask = (ids != pad).astype(np.int64) if infer else np.ones_like(ids)
    else:
        mask = attention_mask_2d(attention_mask, B, L)
    return s, ids, mask


def random_generator(seed, rng):
    """The sampler's NumPy Generator: rng as given, else one seeded with seed (None: fresh entropy)."""
    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise InputError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return rng
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InputError(f"seed={summary(seed)} must be an integer >= 0")
    return np.random.default_rng(seed)


def callables(value, name):
    """A user processor or criterion list: callables taking (input_ids, scores)."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not callable(item):
            raise InputError(f"{name} must be a list of callables (input_ids, scores), got {type(item).__name__}")
    return items


# --- one step ---------------------------------------------------------------------------------------------------

def cache_length(cache):
    """Positions a cache holds (0 for None or an empty cache)."""
    return 0 if cache is None or len(cache) == 0 else int(np.shape(cache[0][0])[2])


def next_logits(model, s, ids, mask, cache):
    """The forward for the tokens the cache lacks -> (next-token logits [N, V], at least float32; outputs)."""
    new = ids[:, cache_length(cache):] if s["use_cache"] else ids
    positions = generation_positions(mask)[:, -new.shape[1]:]
    logits, out = model.generation_forward(new, mask, positions, cache if s["use_cache"] else None,
                                           s["output_attentions"], s["output_hidden_states"])
    return logits.astype(np.promote_types(logits.dtype, np.float32)), out


class Recorder:
    """The per-step tuples return_dict_in_generate asks for."""

    def __init__(self, s):
        on = s["return_dict_in_generate"]
        self.scores = [] if on and s["output_scores"] else None
        self.logits = [] if on and s["output_logits"] else None
        self.attentions = [] if on and s["output_attentions"] else None
        self.hidden_states = [] if on and s["output_hidden_states"] else None

    def add(self, scores, logits, out):
        for store, value in ((self.scores, scores), (self.logits, logits), (self.attentions, out.attentions),
                             (self.hidden_states, out.hidden_states)):
            if store is not None:
                store.append(value)

    def fields(self):
        as_tuple = lambda v: None if v is None else tuple(v)  # noqa: E731
        return dict(scores=as_tuple(self.scores), logits=as_tuple(self.logits),
                    attentions=as_tuple(self.attentions), hidden_states=as_tuple(self.hidden_states))


def sample(scores, rng):
    """One token per row drawn from softmax(scores) by inverse CDF on rng.random() (torch.multinomial's role)."""
    probs = softmax(scores.astype(np.float64))
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((scores.shape[0], 1)) * cdf[:, -1:]
    return np.minimum(np.sum(cdf <= u, axis=-1), scores.shape[-1] - 1)


# --- greedy and sampling (GenerationMixin._sample) ------------------------------------------------------------

def sample_loop(model, s, ids, mask, processors, criteria, rng, streamer, record):
    """Pick a token per row until every row is done -> (sequences [N, T], last cache)."""
    N = ids.shape[0]
    unfinished = np.ones(N, dtype=bool)
    cache = model.generation_cache(N, ids.shape[1], s["max_length"]) if s["use_cache"] else None
    while True:
        logits, out = next_logits(model, s, ids, mask, cache)
        cache = out.past_key_values
        scores = apply_processors(processors, ids, logits)
        record.add(scores, logits, out)
        next_tokens = sample(scores, rng) if s["do_sample"] else np.argmax(scores, axis=-1)
        if s["eos_token_id"]:
            next_tokens = np.where(unfinished, next_tokens, s["pad_token_id"])  # finished rows get pad
        ids = np.concatenate([ids, next_tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((N, 1), dtype=mask.dtype)], axis=1)
        if streamer is not None:
            streamer.put(next_tokens)
        unfinished &= ~apply_criteria(criteria, ids, None if record.scores is None else tuple(record.scores))
        if not unfinished.any():
            return ids, cache


# --- beam search (GenerationMixin._beam_search, BeamSearchScorer, BeamHypotheses) ------------------------------

class Hypotheses:
    """The n best finished beams of one prompt, scored sum_logprobs / generated_len ** length_penalty."""

    def __init__(self, num_beams, length_penalty, early_stopping, max_length):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.early_stopping, self.max_length = early_stopping, max_length
        self.beams = []  # (score, ids, beam_indices)
        self.worst_score = 1e9

    def add(self, ids, sum_logprobs, beam_indices, generated_len):
        score = sum_logprobs / (generated_len ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, ids, beam_indices))
            if len(self.beams) > self.num_beams:
                ranked = sorted([(s, i) for i, (s, _, _) in enumerate(self.beams)])
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len, prompt_len):
        """No running beam can still beat the worst kept one (early_stopping True / False / "never")."""
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best = best_sum_logprobs / (self.max_length - prompt_len) ** self.length_penalty
        else:
            best = best_sum_logprobs / (cur_len - prompt_len) ** self.length_penalty
        return self.worst_score >= best


def pick_candidates(scores, n, do_sample, rng):
    """(scores, flat ids) of n candidates per prompt from [B, K x V]: the top n, or n drawn without replacement."""
    if not do_sample:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :n]  # torch.topk(sorted=True)
        return np.take_along_axis(scores, top, axis=1), top
    probs = softmax(scores.astype(np.float64))
    drawn = np.stack([rng.choice(scores.shape[1], size=n, replace=False, p=row / row.sum()) for row in probs])
    picked = np.take_along_axis(scores, drawn, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(picked, order, axis=1), np.take_along_axis(drawn, order, axis=1)


def beam_step(hyps, done, ids, cand_scores, cand_tokens, cand_beams, s, prompt_len, beam_indices):
    """BeamSearchScorer.process: the K best non-eos continuations per prompt; eos continuations become hypotheses.
    -> (beam scores [N], next tokens [N], source rows [N])."""
    B, K = len(hyps), s["num_beams"]
    eos = s["eos_token_id"]
    cur_len = ids.shape[1] + 1
    scores = np.zeros((B, K), np.float32)
    tokens = np.zeros((B, K), np.int64)
    rows = np.zeros((B, K), np.int64)
    for b in range(B):
        if done[b]:
            scores[b], tokens[b], rows[b] = 0, s["pad_token_id"], 0  # transformers' filler for a finished prompt
            continue
        kept = 0
        for rank, (token, score, beam) in enumerate(zip(cand_tokens[b], cand_scores[b], cand_beams[b])):
            row = b * K + int(beam)
            if eos and int(token) in eos:
                if rank >= K:
                    continue
                index = beam_indices[row] + (row,) if beam_indices is not None else None
                hyps[b].add(ids[row].copy(), float(score), index, cur_len - prompt_len)
            else:
                scores[b, kept], tokens[b, kept], rows[b, kept] = score, token, row
                kept += 1
            if kept == K:
                break
        if kept < K:
            raise InputError(f"beam search found fewer than {K} non-eos candidates for prompt {b}: the eos ids "
                             f"{eos} cover too many of the top {len(cand_tokens[b])}")
        done[b] = done[b] or hyps[b].is_done(float(cand_scores[b].max()), cur_len, prompt_len)
    return scores.reshape(-1), tokens.reshape(-1), rows.reshape(-1)


def beam_finalize(hyps, done, ids, beam_scores, s, prompt_len, beam_indices):
    """BeamSearchScorer.finalize: running beams join the hypotheses; the best num_return_sequences per prompt,
    padded (and eos-terminated where shorter) -> (sequences, sequence scores float32, beam indices or None)."""
    K, n = s["num_beams"], s["num_return_sequences"]
    for b, hyp in enumerate(hyps):
        if done[b]:
            continue
        for k in range(K):
            row = b * K + k
            index = beam_indices[row] if beam_indices is not None else None
            hyp.add(ids[row], float(beam_scores[row]), index, ids.shape[1] - prompt_len)
    best, best_scores = [], []
    for hyp in hyps:
        ranked = sorted(hyp.beams, key=lambda x: x[0])
        for _ in range(n):
            score, seq, index = ranked.pop()
            best.append((seq, index))
            best_scores.append(score)
    lengths = [len(seq) for seq, _ in best]
    width = min(max(lengths) + 1, s["max_length"])
    if min(lengths) != max(lengths) and s["pad_token_id"] is None:
        raise InputError("beam search ended with sequences of different lengths: set pad_token_id to pad them")
    sequences = np.full((len(best), width), s["pad_token_id"] if min(lengths) != max(lengths) else 0, np.int64)
    indices = np.full((len(best), width), -1, np.int64) if beam_indices is not None else None
    for i, (seq, index) in enumerate(best):
        sequences[i, :len(seq)] = seq
        if indices is not None:
            indices[i, :len(index)] = index
        if len(seq) < width:
            sequences[i, len(seq)] = s["eos_token_id"][0]
    return sequences, np.array(best_scores, np.float32), indices


def beam_search(model, s, ids, mask, processors, criteria, rng, record):
    """K beams per prompt scored by summed log-probabilities -> (sequences, scores, beam indices, last cache)."""
    B, L = ids.shape
    K = s["num_beams"]
    ids, mask = np.repeat(ids, K, axis=0), np.repeat(mask, K, axis=0)  # [N, L], rows b*K .. b*K+K-1
    beam_scores = np.zeros((B, K), np.float32)
    beam_scores[:, 1:] = -1e9  # only the first beam's tokens count at the first step (all beams are equal)
    beam_scores = beam_scores.reshape(-1)
    hyps = [Hypotheses(K, s["length_penalty"], s["early_stopping"], s["max_length"]) for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    beam_indices = tuple(() for _ in range(B * K)) if record.scores is not None else None
    n_candidates = max(2, 1 + len(s["eos_token_id"])) * K
    cache = model.generation_cache(B * K, L, s["max_length"]) if s["use_cache"] else None
    while True:
        logits, out = next_logits(model, s, ids, mask, cache)
        processed = apply_processors(processors, ids, log_softmax(logits))
        record.add(processed, logits, out)
        V = processed.shape[-1]
        totals = (processed + beam_scores[:, None]).reshape(B, K * V)
        cand_scores, cand = pick_candidates(totals, n_candidates, s["do_sample"], rng)
        beam_scores, tokens, rows = beam_step(hyps, done, ids, cand_scores, cand % V, cand // V, s, L, beam_indices)
        ids = np.concatenate([ids[rows], tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((B * K, 1), dtype=mask.dtype)], axis=1)
        cache = model.reorder_cache(out.past_key_values, rows) if s["use_cache"] else None
        if beam_indices is not None:
            beam_indices = tuple(beam_indices[r] + (int(r),) for r in rows)
        if done.all() or apply_criteria(criteria, ids, None if record.scores is None else tuple(record.scores)).all():
            break
    sequences, scores, indices = beam_finalize(hyps, done, ids, beam_scores, s, L, beam_indices)
    return sequences, scores, indices, cache


# --- the entry point --------------------------------------------------------------------------------------------

def generate(model, input_ids, attention_mask=None, *, generation_config=None, logits_processor=None,
             stopping_criteria=None, prefix_allowed_tokens_fn=None, tokenizer=None, streamer=None, seed=None,
             rng=None, **kwargs):
    """Prompt [B, L] -> sequences [B x num_return_sequences, L + new] (or an output object with
    return_dict_in_generate=True), as transformers' generate. kwargs are GenerationConfig fields."""
    s, ids, mask = prepare_generation(model, input_ids, attention_mask, generation_config, streamer, **kwargs)
    B, L = ids.shape
    user_processors = callables(logits_processor, "logits_processor")
    user_criteria = callables(stopping_criteria, "stopping_criteria")
    strings = None
    if s["stop_strings"] is not None:
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise InputError("stop_strings need the model's tokenizer: pass tokenizer= (refimpl.load_tokenizer)")
        strings = token_strings(tokenizer, model.config.vocab_size)
        if not stop_strings_reachable(strings, s["stop_strings"]):
            raise InputError(f"stop_strings={summary(s['stop_strings'])}: no token of this vocabulary can end them")
    if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
        raise InputError("prefix_allowed_tokens_fn must be a callable (batch index, ids) -> allowed ids")
    rng = random_generator(seed, rng) if s["do_sample"] else None
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise InputError(f"streamer must have put(ids) and end() (transformers' protocol), got {type(streamer).__name__}")
    processors = logits_processors(s, L, user_processors, prefix_allowed_tokens_fn)
    criteria = criteria_for(s, time.time(), strings, user_criteria)
    record = Recorder(s)
    if streamer is not None:
        streamer.put(ids)
    if s["num_beams"] > 1:
        sequences, seq_scores, indices, cache = beam_search(model, s, ids, mask, processors, criteria, rng, record)
        if not s["return_dict_in_generate"]:
            return sequences
        return GenerateBeamDecoderOnlyOutput(sequences=sequences, past_key_values=cache, **record.fields(),
                                             sequences_scores=seq_scores if s["output_scores"] else None,
                                             beam_indices=indices)
    n = s["num_return_sequences"]
    if n > 1:
        ids, mask = np.repeat(ids, n, axis=0), np.repeat(mask, n, axis=0)  # _expand_inputs_for_generation
    sequences, cache = sample_loop(model, s, ids, mask, processors, criteria, rng, streamer, record)
    if streamer is not None:
        streamer.end()
    if not s["return_dict_in_generate"]:
        return sequences
    return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=cache, **record.fields())
