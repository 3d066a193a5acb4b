"""Rotary position embeddings: the inverse frequencies of every rope_scaling type, and cos/sin tables.

Llama (modeling_rope_utils.py, LlamaRotaryEmbedding) and Open-Llama (OpenLlamaRotaryEmbedding and its Linear /
DynamicNTK subclasses) compute the same rotation with different orderings and different dynamic state machines;
each is written out here. Dynamic NTK scaling is the one piece of state in a model: `RopeState` is passed in and a
new one returned, and the model object keeps the latest, exactly as the torch module keeps its buffers.

Arithmetic is done in the compute dtype (float32, as transformers forces, or float64 in audit mode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RopeState:
    """inv_freq [Dh/2], the cos/sin multiplier, and the longest sequence the frequencies were built for."""

    inv_freq: np.ndarray
    attention_scaling: float
    max_seq_len_cached: int


def default_inv_freq(base, dim, dtype):
    """inv_freq_j = 1 / base^(2j/dim), j < dim/2  (_compute_default_rope_parameters)."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(dtype) / dtype(dim)
    return (1.0 / (dtype(base) ** exponent)).astype(dtype)


def llama_rope_init(cfg, dtype, seq_len=None) -> tuple[np.ndarray, float]:
    """(inv_freq, attention_scaling) for cfg.rope_type at init or, for dynamic, at seq_len (ROPE_INIT_FUNCTIONS)."""
    rs = cfg.rope_scaling or {}
    dim, base, mpe = cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings
    rope_type = cfg.rope_type
    if rope_type == "default":
        return default_inv_freq(base, dim, dtype), 1.0
    if rope_type == "linear":
        # scaling the frequencies, not the positions (Open-Llama does the latter)
        return (default_inv_freq(base, dim, dtype) / dtype(rs["factor"])).astype(dtype), 1.0
    if rope_type == "dynamic":
        return dynamic_ntk_inv_freq(base, dim, mpe, rs["factor"], seq_len, dtype), 1.0
    if rope_type == "yarn":
        return yarn_inv_freq(base, dim, mpe, rs, dtype)
    if rope_type == "longrope":
        return longrope_inv_freq(base, dim, mpe, rs, cfg.original_max_position_embeddings, dtype)
    if rope_type == "llama3":
        return llama3_inv_freq(default_inv_freq(base, dim, dtype), rs), 1.0
    raise AssertionError(rope_type)  # config.py refuses every other type


def dynamic_ntk_inv_freq(base, dim, mpe, factor, seq_len, dtype):
    """base' = base * (factor*L/mpe - (factor-1))^(dim/(dim-2)) with L = max(seq_len, mpe)  (_compute_dynamic_ntk_parameters).

    At init L = mpe (Python ints, so base' = base exactly). At run time L is a torch tensor, so transformers does
    this arithmetic in the compute dtype; so do we.
    """
    if seq_len is None or seq_len <= mpe:
        return default_inv_freq(base, dim, dtype)
    length = dtype(seq_len)
    new_base = dtype(base) * ((dtype(factor) * length / dtype(mpe)) - dtype(factor - 1)) ** dtype(dim / (dim - 2))
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(dtype) / dtype(dim)
    return (1.0 / (new_base ** exponent)).astype(dtype)


def yarn_inv_freq(base, dim, mpe, rs, dtype):
    """YaRN: blend interpolated and extrapolated frequencies with a linear ramp over [low, high]  (_compute_yarn_parameters).

    4.46 uses config.max_position_embeddings here and ignores rope_scaling.original_max_position_embeddings.
    """
    factor = rs["factor"]
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(mpe / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # prevent a division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=dtype) - dtype(low)) / dtype(high - low), 0, 1)
    pos_freqs = dtype(base) ** (np.arange(0, dim, 2).astype(dtype) / dtype(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (dtype(factor) * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(dtype), float(attention_factor)


def longrope_inv_freq(base, dim, mpe, rs, original_mpe, dtype):
    """LongRoPE: inv_freq_j = 1 / (ext_j * base^(2j/dim)), ext = long or short factors  (_compute_longrope_parameters).

    Llama calls it at init only (no seq_len), so the long/short choice is static.
    """
    factor = rs.get("factor")
    attention_factor = rs.get("attention_factor")
    if original_mpe is not None:  # a config *attribute*, not a rope_scaling key
        expanded = mpe
        used_mpe = original_mpe
        factor = expanded / used_mpe
    else:
        used_mpe = mpe
        expanded = mpe * factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(used_mpe))
    ext = np.asarray(rs["long_factor"] if expanded > used_mpe else rs["short_factor"], dtype=dtype)
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(dtype) / dtype(dim)
    return (1.0 / (ext * dtype(base) ** exponent)).astype(dtype), float(attention_factor)


def llama3_inv_freq(inv_freq, rs):
    """Llama 3.1: low frequencies divided by factor, high kept, the band between smoothly blended  (_compute_llama3_parameters)."""
    factor, low_ff, high_ff = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_context = rs["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_ff
    high_freq_wavelen = old_context / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(inv_freq.dtype)


def llama_rope_state(cfg, dtype) -> RopeState:
    """The state LlamaRotaryEmbedding.__init__ builds."""
    inv_freq, scaling = llama_rope_init(cfg, dtype)
    return RopeState(inv_freq, scaling, cfg.max_position_embeddings)


def llama_dynamic_update(state: RopeState, cfg, position_ids, dtype) -> RopeState:
    """Dynamic NTK state machine, run on every forward (_dynamic_frequency_update, modeling_llama.py:128-144).

    L = max(position_ids) + 1 over the whole batch. Grow when L > cached; go back to the original frequencies when
    L < mpe after having grown.
    """
    if cfg.rope_type != "dynamic":
        return state
    seq_len = int(np.max(position_ids)) + 1
    mpe = cfg.max_position_embeddings
    if seq_len > state.max_seq_len_cached:
        inv_freq, scaling = llama_rope_init(cfg, dtype, seq_len=seq_len)
        state = RopeState(inv_freq, scaling, seq_len)
    if seq_len < mpe and state.max_seq_len_cached > mpe:
        inv_freq, scaling = llama_rope_init(cfg, dtype)
        state = RopeState(inv_freq, scaling, mpe)
    return state


def llama_cos_sin(state: RopeState, position_ids, dtype):
    """cos, sin [B, S, Dh] of angle position * inv_freq, both halves equal (LlamaRotaryEmbedding.forward)."""
    freqs = position_ids.astype(dtype)[:, :, None] * state.inv_freq[None, None, :]  # [B, S, Dh/2]
    angles = np.concatenate([freqs, freqs], axis=-1)  # [B, S, Dh]
    return np.cos(angles) * dtype(state.attention_scaling), np.sin(angles) * dtype(state.attention_scaling)


def open_llama_rope_state(cfg, dtype) -> RopeState:
    """OpenLlamaRotaryEmbedding.__init__: default frequencies, table built for max_position_embeddings."""
    return RopeState(default_inv_freq(cfg.rope_theta, cfg.head_dim, dtype), 1.0, cfg.max_position_embeddings)


def open_llama_dynamic_update(state: RopeState, cfg, kv_length, dtype) -> RopeState:
    """Open-Llama's table grows when the total length K = past + S exceeds it, and never shrinks (modeling_open_llama.py:124-147).

    The dynamic variant rebuilds the frequencies from K with Python floats: base' = base * (f*K/mpe - (f-1))^(d/(d-2)).
    """
    if kv_length <= state.max_seq_len_cached:
        return state
    inv_freq = state.inv_freq
    if cfg.rope_type == "dynamic" and kv_length > cfg.max_position_embeddings:
        factor, dim = cfg.rope_scaling["factor"], cfg.head_dim
        base = cfg.rope_theta * ((factor * kv_length / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = default_inv_freq(base, dim, dtype)
    return RopeState(inv_freq, 1.0, kv_length)


def open_llama_cos_sin(state: RopeState, cfg, position_ids, dtype):
    """cos, sin [B, S, Dh] of angle t * inv_freq, where linear scaling divides the *position*: t = p / factor."""
    t = position_ids.astype(dtype)
    if cfg.rope_type == "linear":
        t = t / dtype(cfg.rope_scaling["factor"])  # Open-Llama scales t (Llama scales inv_freq): differs past 1e-6
    freqs = t[:, :, None] * state.inv_freq[None, None, :]  # [B, S, Dh/2]
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles), np.sin(angles)
