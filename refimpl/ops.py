"""The primitives every family shares: linear, norms, softmax, activations, RoPE rotation, masks.

Each function is pure and keeps the dtype of its input (float32, or float64 in audit mode): scalars are Python
floats, which NumPy never lets promote an array. Shape letters: B batch, S new tokens, K keys (cached + new),
H heads, Dh head dim.
"""
from __future__ import annotations

import math

import numpy as np


def linear(x, weight, bias=None):
    """y = x W^T + b, with W stored (out, in) as in torch.nn.Linear."""
    y = x @ weight.T.astype(x.dtype, copy=False)  # weights kept in fp16 are widened to the compute dtype
    return y if bias is None else y + bias


def rms_norm(x, weight, eps):
    """y = w * x / sqrt(mean(x^2) + eps)  (LlamaRMSNorm, modeling_llama.py:69-74: eps inside the root, weight last)."""
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return weight * (x * (1.0 / np.sqrt(variance + eps)))


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * w + b, biased variance (torch.nn.LayerNorm; no w, b when not affine)."""
    mean = np.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    y = centered / np.sqrt(variance + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def softmax(x):
    """softmax over the last axis, max-subtracted. A row of equal values (a fully masked row) gives uniform weights."""
    shifted = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=-1, keepdims=True)


def log_softmax(x):
    """log softmax over the last axis: x - max - log(sum(exp(x - max)))."""
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def sigmoid(x):
    """1 / (1 + exp(-x)); exp may overflow to inf for very negative x, giving the right limit 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    """x * sigmoid(x), computed as x / (1 + exp(-x)) like torch's kernel."""
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    """0.5 x (1 + erf(x / sqrt 2)): the exact GELU (transformers "gelu" = torch F.gelu). erf from math, elementwise."""
    erf = _erf(x.astype(np.float64) / math.sqrt(2.0)).astype(x.dtype)  # NumPy has no erf; math.erf is exact
    return 0.5 * x * (1.0 + erf)


def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): "gelu_new" / "gelu_pytorch_tanh" (activations.py)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def gelu_fast(x):
    """0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2))) (transformers FastGELUActivation)."""
    return 0.5 * x * (1.0 + np.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x):
    """x * sigmoid(1.702 x) (transformers QuickGELUActivation)."""
    return x * sigmoid(1.702 * x)


def relu(x):
    """max(x, 0)."""
    return np.maximum(x, 0)


def mish(x):
    """x * tanh(softplus(x)), softplus(x) = log(1 + e^x) computed stably."""
    softplus = np.logaddexp(x, 0)
    return x * np.tanh(softplus)


# transformers' ACT2FN names -> functions (activations.py:ACT2CLS).
ACTIVATIONS = {
    "silu": silu,
    "swish": silu,
    "relu": relu,
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_fast,
    "quick_gelu": quick_gelu,
    "relu2": lambda x: np.square(relu(x)),
    "relu6": lambda x: np.clip(x, 0, 6),
    "mish": mish,
    "tanh": np.tanh,
    "sigmoid": sigmoid,
    "linear": lambda x: x,
}


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis: the half-split (GPT-NeoX) RoPE pairing that HF checkpoints use."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """x * cos + rotate_half(x) * sin  (modeling_llama.py:202-226). x [B, H, S, Dh], cos/sin [B, S, Dh]."""
    cos = cos[:, None]  # [B, S, Dh] -> [B, 1, S, Dh], shared by every head
    sin = sin[:, None]
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep):
    """[B, Hkv, K, Dh] -> [B, Hkv*n_rep, K, Dh]: each kv head repeated n_rep times in place (q head j uses j // n_rep)."""
    return x if n_rep == 1 else np.repeat(x, n_rep, axis=1)


def mask_min(dtype):
    """The additive mask value transformers uses: torch.finfo(dtype).min (not -inf, so softmax never sees NaN)."""
    return np.finfo(dtype).min


def causal_mask(attention_mask, past_length, dtype):
    """Additive mask [B, 1, S, K]: 0 where query s may see key k (k <= past+s and mask[k] == 1), finfo.min elsewhere.

    attention_mask is [B, K] of 0/1 with K = past + S. This is what Llama's
    _prepare_4d_causal_attention_mask_with_cache_position and OPT/Open-Llama's _prepare_4d_causal_attention_mask
    both build (each entry is either 0 or min, never a sum of two mins).
    """
    batch, keys = attention_mask.shape
    new = keys - past_length
    query_position = past_length + np.arange(new)  # [S]
    future = np.arange(keys)[None, :] > query_position[:, None]  # [S, K]
    padding = attention_mask[:, None, :] == 0  # [B, 1, K]
    blocked = future[None] | padding  # [B, S, K]
    return np.where(blocked, mask_min(dtype), 0).astype(dtype)[:, None]  # [B, 1, S, K]
