"""Generation settings: every GenerationConfig field of transformers 4.46.3, honoured or rejected by name.

Settings are layered as transformers' `_prepare_generation_config` layers them: the field defaults, then the
checkpoint's generation_config.json (or the ids of config.json when there is none), then a `generation_config=`
dict, then keyword arguments. A keyword given as None sets None, as `GenerationConfig.update` does. A field refimpl
does not implement is accepted only at its default value; any other value raises an InputError naming it, so no
setting is ever silently ignored. docs/generation.md has the table.
"""
from __future__ import annotations

import math
import numbers

from .errors import InputError
from .formats.untrusted import summary

# GenerationConfig() of 4.46.3 (generation/configuration_utils.py:364-461), field by field
DEFAULTS = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None, "early_stopping": False,
    "max_time": None, "stop_strings": None, "do_sample": False, "num_beams": 1, "num_beam_groups": 1,
    "penalty_alpha": None, "dola_layers": None, "use_cache": True, "cache_implementation": None,
    "cache_config": None, "return_legacy_cache": None, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "force_words_ids": None, "renormalize_logits": False,
    "constraints": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_decoder_ids": None, "sequence_bias": None, "token_healing": False, "guidance_scale": None,
    "low_memory": None, "watermarking_config": None, "num_return_sequences": 1, "output_attentions": False,
    "output_hidden_states": False, "output_scores": False, "output_logits": None, "return_dict_in_generate": False,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "encoder_no_repeat_ngram_size": 0,
    "decoder_start_token_id": None, "is_assistant": False, "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4,
    "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None, "generation_kwargs": {},
    "_from_model_config": False, "_commit_hash": None, "transformers_version": None,
}

# Fields that describe the file or the cache object, not the tokens: any value is accepted and changes nothing.
# low_memory splits transformers' beam forwards into sub-batches (same tokens); return_legacy_cache picks the
# cache's Python type (refimpl's is always a tuple of (key, value) pairs).
METADATA = {"transformers_version", "_from_model_config", "_commit_hash", "low_memory", "return_legacy_cache"}

# Fields accepted only at their default: what each would need, for the error message.
NOT_IMPLEMENTED = {
    "num_beam_groups": "group (diverse) beam search", "diversity_penalty": "group (diverse) beam search",
    "penalty_alpha": "contrastive search", "dola_layers": "DoLa decoding",
    "cache_implementation": "transformers' cache classes", "cache_config": "transformers' cache classes",
    "encoder_repetition_penalty": "the encoder repetition penalty",
    "encoder_no_repeat_ngram_size": "encoder n-gram blocking", "force_words_ids": "constrained beam search",
    "constraints": "constrained beam search", "forced_decoder_ids": "forced decoder ids (removed in transformers)",
    "token_healing": "token healing", "guidance_scale": "classifier-free guidance",
    "watermarking_config": "watermarking", "decoder_start_token_id": "encoder-decoder generation",
    "is_assistant": "assisted generation", "num_assistant_tokens": "assisted generation",
    "num_assistant_tokens_schedule": "assisted generation", "assistant_confidence_threshold": "assisted generation",
    "prompt_lookup_num_tokens": "prompt lookup decoding", "max_matching_ngram_size": "prompt lookup decoding",
    "generation_kwargs": "generation_kwargs",
}

IMPLEMENTED = set(DEFAULTS) - METADATA - set(NOT_IMPLEMENTED)


def layered(file_values, config=None, given=None):
    """DEFAULTS < generation_config.json < generation_config= < keyword arguments, unknown names rejected."""
    settings = dict(DEFAULTS)
    for source, values in (("generation_config.json", file_values), ("generation_config", config),
                           ("generate()", given)):
        for name, value in (values or {}).items():
            if name not in DEFAULTS:
                raise InputError(f"{source}: {name!r} is not a generation setting of transformers 4.46.3")
            settings[name] = value
    return settings


def check_supported(s):
    """Every field not implemented must hold its default; a value elsewhere is an error naming the field."""
    for name, what in NOT_IMPLEMENTED.items():
        if s[name] != DEFAULTS[name] and not (name == "diversity_penalty" and s["num_beam_groups"] == 1
                                                and _number(s[name]) and s[name] == 0):
            raise InputError(f"{name}={summary(s[name])} needs {what}, which refimpl does not implement "
                             f"(leave it at {DEFAULTS[name]!r})")


# --- value checks: one InputError naming the field and its value ------------------------------------------------

def _number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _integer(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def need(ok, name, value, rule):
    if not ok:
        raise InputError(f"{name}={summary(value)} {rule}")


def check_int(s, name, low, optional=False):
    v = s[name]
    if v is None and optional:
        return
    need(_integer(v) and v >= low, name, v, f"must be an integer >= {low}")
    s[name] = int(v)


def check_float(s, name, ok, rule, optional=False):
    v = s[name]
    if v is None and optional:
        return
    need(_number(v) and math.isfinite(v) and ok(float(v)), name, v, rule)
    s[name] = float(v)


def token_id_list(value, name, vocab_size):
    """An id or a list of ids -> [ids], each in [0, vocab_size)."""
    ids = [value] if _integer(value) else value
    need(isinstance(ids, (list, tuple)) and len(ids) <= vocab_size, name, value, "must be a token id or a list of ids")
    for i in ids:
        need(_integer(i) and 0 <= i < vocab_size, name, value, f"must hold token ids in [0, {vocab_size})")
    return [int(i) for i in ids]


def id_sequences(value, name, vocab_size):
    """A non-empty list of non-empty lists of token ids (bad_words_ids' shape)."""
    need(isinstance(value, (list, tuple)) and 0 < len(value) <= 1 << 16, name, value,
         "must be a non-empty list of lists of token ids")
    return [token_id_list(seq, name, vocab_size) if isinstance(seq, (list, tuple)) and seq else
            need(False, name, value, "must be a non-empty list of non-empty lists of token ids") for seq in value]


def check_values(s, vocab_size):
    """Type and range of every implemented field (transformers' GenerationConfig.validate and processor checks)."""
    for name in ("do_sample", "use_cache", "renormalize_logits", "remove_invalid_values", "output_attentions",
                 "output_hidden_states", "output_scores", "return_dict_in_generate"):
        need(isinstance(s[name], bool), name, s[name], "must be true or false")
    need(s["output_logits"] is None or isinstance(s["output_logits"], bool), "output_logits", s["output_logits"],
         "must be true, false or None")
    check_int(s, "max_length", 1, optional=True)
    check_int(s, "max_new_tokens", 1, optional=True)
    check_int(s, "min_length", 0)
    check_int(s, "min_new_tokens", 0, optional=True)
    check_int(s, "num_beams", 1)
    check_int(s, "num_return_sequences", 1)
    check_int(s, "no_repeat_ngram_size", 0)
    need(s["early_stopping"] in (True, False, "never"), "early_stopping", s["early_stopping"],
         'must be true, false or "never"')
    check_float(s, "max_time", lambda v: v > 0, "must be a number of seconds > 0", optional=True)
    if s["do_sample"]:  # the warpers exist only when sampling; greedy ignores them, as transformers does
        check_float(s, "temperature", lambda v: v > 0, "must be > 0 when sampling (use do_sample=False for greedy)")
        check_int(s, "top_k", 0, optional=True)
        check_float(s, "top_p", lambda v: 0 < v <= 1, "must be in (0, 1]", optional=True)
        check_float(s, "min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]", optional=True)
        check_float(s, "typical_p", lambda v: 0 < v <= 1, "must be in (0, 1]", optional=True)
        check_float(s, "epsilon_cutoff", lambda v: 0 <= v < 1, "must be in [0, 1)")
        check_float(s, "eta_cutoff", lambda v: 0 <= v < 1, "must be in [0, 1)")
    check_float(s, "repetition_penalty", lambda v: v > 0, "must be > 0")
    check_float(s, "length_penalty", lambda v: True, "must be a finite number")
    for name in ("eos_token_id",):
        s[name] = [] if s[name] is None else token_id_list(s[name], name, vocab_size)
    for name in ("pad_token_id", "bos_token_id", "forced_bos_token_id"):
        if s[name] is not None:
            need(_integer(s[name]) and 0 <= s[name] < vocab_size, name, s[name],
                 f"must be a token id in [0, {vocab_size})")
            s[name] = int(s[name])
    if s["forced_eos_token_id"] is not None:
        s["forced_eos_token_id"] = token_id_list(s["forced_eos_token_id"], "forced_eos_token_id", vocab_size)
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if s[name] is not None:
            s[name] = token_id_list(s[name], name, vocab_size)
    if s["bad_words_ids"] is not None:
        s["bad_words_ids"] = id_sequences(s["bad_words_ids"], "bad_words_ids", vocab_size)
    if s["sequence_bias"] is not None:
        s["sequence_bias"] = sequence_bias_dict(s["sequence_bias"], vocab_size)
    decay = s["exponential_decay_length_penalty"]
    if decay is not None:
        need(isinstance(decay, (list, tuple)) and len(decay) == 2 and _integer(decay[0]) and decay[0] >= 0
             and _number(decay[1]) and math.isfinite(decay[1]) and decay[1] >= 1, "exponential_decay_length_penalty",
             decay, "must be (start index >= 0, decay factor >= 1)")
        s["exponential_decay_length_penalty"] = (int(decay[0]), float(decay[1]))
    stops = s["stop_strings"]
    if stops is not None:
        stops = [stops] if isinstance(stops, str) else stops
        need(isinstance(stops, (list, tuple)) and 0 < len(stops) <= 1024 and
             all(isinstance(t, str) and 0 < len(t) <= 1024 for t in stops), "stop_strings", s["stop_strings"],
             "must be a string or a list of non-empty strings")
        s["stop_strings"] = list(stops)


def sequence_bias_dict(value, vocab_size):
    """{(ids...): bias} from a dict with tuple keys or a list of [ids, bias] pairs (SequenceBiasLogitsProcessor)."""
    pairs = value.items() if isinstance(value, dict) else value
    need(isinstance(pairs, (list, tuple)) or isinstance(value, dict), "sequence_bias", value,
         "must be a dict {(ids...): bias} or a list of [ids, bias]")
    out = {}
    for pair in pairs:
        need(isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], (list, tuple)) and pair[0]
             and _number(pair[1]), "sequence_bias", value, "entries must be ([token ids], bias)")
        out[tuple(token_id_list(list(pair[0]), "sequence_bias", vocab_size))] = float(pair[1])
    need(len(out) > 0, "sequence_bias", value, "must not be empty")
    return out
