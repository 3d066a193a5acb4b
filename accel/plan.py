"""Which attention path a forward takes, the same rule on every backend."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from refimpl.ops import causal_mask, mask_min

F32 = np.float32


class AttentionPlan(NamedTuple):
    """kind "decode": one new position per row and no attention maps: the cache kernel, with `mask` the additive
    bias [B, K] (0 or finfo.min) or [B, 0] for none; kind "general": the products and softmax over all new
    positions, with `mask` refimpl's 4-D additive mask [B, 1, S, K]. Arrays are in the backend's array module."""

    kind: str
    mask: Any


def attention_plan(mask2d, T, S, general, xp=np):
    """The plan for S new positions after T cached ones; `general` forces the general path (attention maps asked
    for, OPT's head_mask)."""
    if S == 1 and not general:
        if np.all(mask2d == 1):
            return AttentionPlan("decode", xp.zeros((mask2d.shape[0], 0), F32))
        return AttentionPlan("decode", xp.asarray(np.where(mask2d == 0, mask_min(F32), F32(0)).astype(F32)))
    return AttentionPlan("general", xp.asarray(causal_mask(mask2d, T, F32)))  # [B, 1, S, K]
