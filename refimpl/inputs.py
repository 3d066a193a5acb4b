"""Checks on forward-pass arguments: each bad value gets one InputError that names it, before any maths runs."""
from __future__ import annotations

import numpy as np

from .errors import InputError


def integer_array(value, name, ndim):
    """A list or array of integers -> int64 array of ndim dims, or InputError."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{name} could not be read as an array of integers ({exc})") from None
    if array.dtype == bool:
        array = array.astype(np.int64)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise InputError(f"{name} must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.ndim == ndim - 1:
        array = array[None]
    if array.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {list(array.shape)}")
    return array


def past_length(past_key_values, num_layers, batch, kv_heads, head_dim):
    """T, the number of cached positions, after checking the cache's layout: L pairs of [B, Hkv, T, Dh]."""
    if past_key_values is None:
        return 0
    if not isinstance(past_key_values, (tuple, list)) or len(past_key_values) != num_layers:
        raise InputError(f"past_key_values must be a tuple of {num_layers} (key, value) pairs, one per layer")
    first = np.shape(past_key_values[0][0])
    if len(first) != 4:
        raise InputError(f"past_key_values[0] key has shape {list(first)}, expected [B, Hkv, T, Dh]")
    expected = (batch, kv_heads, first[2], head_dim)
    for i, pair in enumerate(past_key_values):
        if len(pair) != 2 or np.shape(pair[0]) != expected or np.shape(pair[1]) != expected:
            raise InputError(f"past_key_values[{i}] must be (key, value) of shape {list(expected)}, got "
                             f"{[list(np.shape(t)) for t in pair]}")
    return first[2]


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
    embeds = np.asarray(inputs_embeds)
    if embeds.ndim == 2:
        embeds = embeds[None]
    if embeds.ndim != 3 or embeds.shape[-1] != embed_dim or embeds.shape[1] == 0:
        raise InputError(f"inputs_embeds has shape {list(embeds.shape)}, expected [B, S, {embed_dim}] with S >= 1")
    if not np.issubdtype(embeds.dtype, np.floating):
        raise InputError(f"inputs_embeds must be floating point, got {embeds.dtype}")
    return None, embeds.astype(dtype, copy=False), embeds.shape[0], embeds.shape[1]


def attention_mask_2d(attention_mask, batch, keys):
    """The [B, K] 0/1 mask (all ones when None); K = cached + new positions."""
    if attention_mask is None:
        return np.ones((batch, keys), dtype=np.int64)
    mask = integer_array(attention_mask, "attention_mask", 2)
    if mask.shape != (batch, keys):
        raise InputError(f"attention_mask has shape {list(mask.shape)}, expected [batch, cached + new] = "
                         f"[{batch}, {keys}]")
    if not np.all((mask == 0) | (mask == 1)):
        raise InputError(f"attention_mask must hold only 0 and 1, found {int(mask[(mask != 0) & (mask != 1)][0])}")
    return mask


def position_ids_2d(position_ids, batch, seq_len):
    """Explicit position_ids -> [B or 1, S] int64, non-negative."""
    pos = integer_array(position_ids, "position_ids", 2)
    if pos.shape[1] != seq_len or pos.shape[0] not in (1, batch):
        raise InputError(f"position_ids has shape {list(pos.shape)}, expected [{batch} or 1, {seq_len}]")
    if np.any(pos < 0):
        raise InputError(f"position_ids holds {int(pos.min())}: positions must be >= 0")
    return pos
