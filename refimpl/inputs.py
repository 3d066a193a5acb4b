"""Checks on forward-pass arguments: each bad value gets one InputError that names it, before any maths runs.

Every argument goes through as_array first: a ragged list, more than 64 dimensions, Python objects (None, ints
beyond int64, strings) or a shape too large to index end here, never in a NumPy error deep in the model. Messages
print values with formats.untrusted.summary, whose length is bounded whatever the value's size.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .formats.untrusted import MAX_DIMS, error_text, summary, too_large

IGNORE_INDEX = -100  # the label transformers' cross-entropy skips
INT64_MAX = np.iinfo(np.int64).max


def as_array(value, name):
    """Any array-like -> an ndarray of numbers or strings, or InputError naming `name`."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # ragged, > 64 dims, __array__ failing
        raise InputError(f"{name} could not be read as an array ({error_text(exc)}): {summary(value)}") from None
    if array.dtype == object:
        odd = [x for x in array.flat[:1000] if not _fits_a_numeric_array(x)][:1]
        detail = f"first odd item: {summary(odd[0])}" if odd else "convert it to a numeric dtype"
        raise InputError(f"{name} holds Python objects, not numbers: an object array of shape {list(array.shape)} "
                         f"({detail})")
    if array.ndim > MAX_DIMS or too_large(array.shape):
        raise InputError(f"{name} has shape {summary(list(array.shape))}, too large to index (more than 2**62 bytes)")
    return array


def _fits_a_numeric_array(x) -> bool:
    """A Python scalar that an int64 or float64 array holds (bool included)."""
    if isinstance(x, int):
        return -INT64_MAX - 1 <= x <= INT64_MAX
    return isinstance(x, (float, np.number))


def integer_array(value, name, ndim, allow_bool=False, allow_float=False):
    """A list or array of integers -> int64 array of ndim dims (ndim - 1 gets a batch axis of 1), or InputError.

    Token ids, positions and labels must be integers, as torch's indexing requires: booleans and floats are
    refused unless allowed (an attention mask may be bool, or floats equal to 0 and 1)."""
    array = as_array(value, name)
    kind = array.dtype.kind
    if array.size == 0 and kind in "fb":  # np.asarray([]) is float64: an empty list holds no wrong value
        kind = "i"
    if kind == "b" and not allow_bool:
        raise InputError(f"{name} must hold integers, got booleans (dtype bool)")
    if kind == "f" and not allow_float:
        raise InputError(f"{name} must hold integers, got dtype {array.dtype}")
    if kind not in "biuf":
        raise InputError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.ndim == ndim - 1:
        array = array[None]
    if array.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {list(array.shape)}")
    if kind == "f" and not (np.all(np.isfinite(array)) and np.all(array == np.round(array))):
        bad = array[~np.isfinite(array) | (array != np.round(array))].flat[0]
        raise InputError(f"{name} must hold integers, found {bad!r} (dtype {array.dtype})")
    if kind == "u" and array.dtype.itemsize == 8 and array.size and array.max() > INT64_MAX:
        raise InputError(f"{name} holds {int(array.max())}, beyond int64")
    return array.astype(np.int64)


def per_row_integers(value, name, batch):
    """Integers with one value per row: [B], or [B, 1] as transformers squeezes it -> int64 [B]."""
    array = as_array(value, name)
    if array.dtype.kind not in "iu":
        raise InputError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.shape not in ((batch,), (batch, 1)):
        raise InputError(f"{name} has shape {list(array.shape)}, expected [batch] = [{batch}] (or [{batch}, 1])")
    return integer_array(array.reshape(batch), name, 1)


def float_array(value, name):
    """A floating-point array (float16, float32, float64), or InputError naming its dtype."""
    array = as_array(value, name)
    if array.dtype.kind != "f":
        raise InputError(f"{name} must be floating point (float16, float32 or float64), got dtype {array.dtype}")
    return array


def past_cache(past_key_values, num_layers, batch, kv_heads, head_dim, dtype=None):
    """(L pairs (key, value) [B, Hkv, T, Dh] as float arrays, T) after checking the cache's layout, or (None, 0).

    Every layer holds one key and one value of the same shape, with T the same in every layer; floating point of
    any width (float16 caches are widened), NaN allowed. dtype, when given, converts each array to it."""
    if past_key_values is None:
        return None, 0
    if not isinstance(past_key_values, (tuple, list)):
        raise InputError(f"past_key_values must be a tuple of {num_layers} (key, value) pairs, one per layer; got "
                         f"a {type(past_key_values).__name__}")
    if len(past_key_values) != num_layers:
        raise InputError(f"past_key_values must be a tuple of {num_layers} (key, value) pairs, one per layer; got "
                         f"{len(past_key_values)}")
    pairs, expected = [], None
    for i, pair in enumerate(past_key_values):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            kind = f"{len(pair)} items" if isinstance(pair, (tuple, list)) else summary(pair)
            raise InputError(f"past_key_values[{i}] must be a (key, value) pair, got {kind}")
        arrays = []
        for part, value in zip(("key", "value"), pair):
            array = float_array(value, f"past_key_values[{i}] {part}")
            if expected is None:
                if array.ndim != 4:
                    raise InputError(f"past_key_values[0] key has shape {list(array.shape)}, expected [B, Hkv, T, Dh] "
                                     f"= [{batch}, {kv_heads}, T, {head_dim}]")
                expected = (batch, kv_heads, array.shape[2], head_dim)
            if array.shape != expected:
                raise InputError(f"past_key_values[{i}] {part} has shape {list(array.shape)}, expected [B, Hkv, T, Dh] "
                                 f"= {list(expected)} (input batch {batch}; every layer's key and value alike)")
            arrays.append(array if dtype is None else array.astype(dtype, copy=False))
        pairs.append(tuple(arrays))
    return tuple(pairs), expected[2]


def past_length(past_key_values, num_layers, batch, kv_heads, head_dim):
    """T, the number of cached positions, after past_cache's checks (for callers that keep their own cache)."""
    return past_cache(past_key_values, num_layers, batch, kv_heads, head_dim)[1]


def token_inputs(cfg, input_ids, inputs_embeds, embed_dim, dtype):
    """(input_ids [B, S] or None, inputs_embeds [B, S, E] or None, B, S), exactly one of the two given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        ids = integer_array(input_ids, "input_ids", 2)
        if ids.shape[1] == 0:
            raise InputError("input_ids is empty: a forward pass needs at least one token")
        bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
        if bad.size:
            raise InputError(f"input_ids holds token id {int(bad[0])}, outside the vocabulary [0, {cfg.vocab_size})")
        return ids, None, ids.shape[0], ids.shape[1]
    embeds = float_array(inputs_embeds, "inputs_embeds")
    if embeds.ndim == 2:
        embeds = embeds[None]
    if embeds.ndim != 3 or embeds.shape[-1] != embed_dim or embeds.shape[1] == 0:
        raise InputError(f"inputs_embeds has shape {list(embeds.shape)}, expected [B, S, {embed_dim}] with S >= 1")
    return None, embeds.astype(dtype, copy=False), embeds.shape[0], embeds.shape[1]


def attention_mask_2d(attention_mask, batch, keys):
    """The [B, K] 0/1 mask (all ones when None); K = cached + new positions. bool and 0.0/1.0 masks are accepted."""
    if attention_mask is None:
        return np.ones((batch, keys), dtype=np.int64)
    mask = integer_array(attention_mask, "attention_mask", 2, allow_bool=True, allow_float=True)
    if mask.shape != (batch, keys):
        raise InputError(f"attention_mask has shape {list(mask.shape)}, expected [batch, cached + new] = "
                         f"[{batch}, {keys}]")
    if not np.all((mask == 0) | (mask == 1)):
        raise InputError(f"attention_mask must hold only 0 and 1, found {int(mask[(mask != 0) & (mask != 1)][0])}")
    return mask


def position_ids_2d(position_ids, batch, seq_len, non_negative=True):
    """Explicit position_ids -> [B or 1, S] int64 (non-negative unless told otherwise)."""
    pos = integer_array(position_ids, "position_ids", 2)
    if pos.shape[1] != seq_len or pos.shape[0] not in (1, batch):
        raise InputError(f"position_ids has shape {list(pos.shape)}, expected [{batch} or 1, {seq_len}]")
    if non_negative and np.any(pos < 0):
        raise InputError(f"position_ids holds {int(pos.min())}: positions must be >= 0")
    return pos


def learned_positions(position_ids, offset, rows, max_position_embeddings):
    """OPT: every position (given, or counted from the mask) + offset must be a row of the learned table."""
    high, low = int(np.max(position_ids)), int(np.min(position_ids))  # Python ints: + offset cannot wrap
    if high + offset >= rows or low + offset < 0:
        bad = high if high + offset >= rows else low
        raise InputError(f"OPT position {bad} is outside its learned table: max_position_embeddings="
                         f"{max_position_embeddings} positions (0..{rows - offset - 1}; position_ids, given or "
                         f"counted from attention_mask)")


def head_mask_2d(head_mask, num_layers, num_heads, dtype):
    """OPT's head_mask: real numbers [num_hidden_layers, num_attention_heads] (transformers' OPTDecoder takes no
    other shape) -> `dtype`, or None."""
    if head_mask is None:
        return None
    array = as_array(head_mask, "head_mask")
    if array.dtype.kind not in "biuf":
        raise InputError(f"head_mask must hold real numbers, got dtype {array.dtype}")
    if array.shape != (num_layers, num_heads):
        raise InputError(f"head_mask has shape {list(array.shape)}, expected [layers, heads] = "
                         f"[{num_layers}, {num_heads}]")
    return array.astype(dtype)


def token_labels(labels, logits_shape):
    """The causal LM's labels [B, S]: token ids that index a logits column, or IGNORE_INDEX -> int64 [B, S]."""
    batch, seq_len, classes = logits_shape
    labels = integer_array(labels, "labels", 2)
    if labels.shape != (batch, seq_len):
        raise InputError(f"labels have shape {list(labels.shape)}, expected [batch, seq] = [{batch}, {seq_len}]")
    _check_classes(labels, "labels", classes)
    return labels


def sequence_labels(labels, batch, num_labels, problem_type, choose):
    """Sequence classification labels -> (labels as the loss reads them, problem_type).

    problem_type None is chosen by `choose(num_labels, labels)` (transformers' rule, heads.problem_type_for) and
    returned, so that a refused label never sets it. regression: floats [B] (or [B, 1]) when num_labels == 1, else
    [B, num_labels]; single_label_classification: class ids [B] (or [B, 1]) in [0, num_labels) or -100;
    multi_label_classification: targets [B, num_labels]."""
    array = as_array(labels, "labels")
    if array.dtype.kind not in "iuf":
        raise InputError(f"labels must hold numbers (class ids, or float targets), got dtype {array.dtype}")
    problem_type = problem_type or choose(num_labels, array)
    per_row = ((batch,), (batch, 1))
    if problem_type == "single_label_classification":
        if array.dtype.kind == "f":
            raise InputError(f"labels must hold integer class ids for single_label_classification, got dtype "
                             f"{array.dtype}")
        if array.shape not in per_row:
            raise InputError(f"labels has shape {list(array.shape)}, expected [batch] = [{batch}] class ids")
        array = integer_array(array.reshape(batch), "labels", 1)
        _check_classes(array, "labels", num_labels)
        return array, problem_type
    expected = per_row if problem_type == "regression" and num_labels == 1 else ((batch, num_labels),)
    if array.shape not in expected:
        raise InputError(f"labels has shape {list(array.shape)}, expected {list(expected[0])} for {problem_type} "
                         f"with num_labels={num_labels}")
    return array, problem_type


def _check_classes(labels, name, classes):
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= classes))]
    if bad.size:
        raise InputError(f"{name}: label {int(bad[0])} is outside [0, {classes}) and is not the ignore index "
                         f"{IGNORE_INDEX}")


def check_trace(trace):
    """The trace argument must be a recorder: refimpl.trace.Trace, NO_TRACE, or an object with the same two calls."""
    if not (callable(trace) and callable(getattr(trace, "scope", None))):
        raise InputError(f"trace={summary(trace)} ({type(trace).__name__}): expected a refimpl.trace.Trace, or no "
                         f"trace argument")
