"""Attention on the CPU: the decode kernels over the KV cache, and the layer's attention step for any plan.

twin: the attention part of refimpl.llama.attention and refimpl.opt.attention (scores, mask, clamp, softmax,
probs @ v, GQA), after the projections. One new position per row (the "decode" plan) runs `decode_step_`: RoPE,
the cache append and an online softmax over the cache in one parallel kernel; several positions (a prompt, or when
attention maps are asked for) use BLAS for the two products and accel.cpu.ops.masked_softmax_ between them.

Shapes: B batch, S new tokens, T cached, K = T + S keys, H query heads, Hkv key/value heads, R = H / Hkv,
NH = H + 2 Hkv heads in a fused qkv row, Dh head dim, C cache capacity.
"""
from __future__ import annotations

import numpy as np

from . import blas
from .jit import njit, prange
from .ops import F32_MIN, NEG_INF, _dot, _rotate_head, apply_rotary_, masked_softmax_

F32 = np.float32

ATTENTION_BLOCK = 64  # keys scored per block of the online softmax


@njit()
def _attend_group(q, b, g, R, k_cache, v_cache, length, bias, divisor, out):
    """Query heads g*R .. g*R+R-1 of row b (q [B, >= H, Dh]) against kv head g's first `length` cached positions.

    Online softmax over blocks of keys: scores of a block, its max, rescale the running sum and context, add.
    """
    Dh = q.shape[2]
    has_bias = bias.shape[1] > 0
    running_max = np.full(R, NEG_INF, np.float32)
    running_sum = np.zeros(R, np.float32)
    acc = np.zeros((R, Dh), np.float32)
    block = np.empty((R, ATTENTION_BLOCK), np.float32)
    for start in range(0, length, ATTENTION_BLOCK):
        stop = min(start + ATTENTION_BLOCK, length)
        for r in range(R):
            h = g * R + r
            block_max = NEG_INF
            for t in range(start, stop):
                s = _dot(q[b, h], k_cache[b, g, t]) / divisor
                if has_bias:
                    s = s + bias[b, t]
                s = max(s, F32_MIN)
                block[r, t - start] = s
                block_max = max(block_max, s)
            new_max = max(running_max[r], block_max)
            rescale = np.exp(running_max[r] - new_max)  # exp(-inf) = 0 on the first block
            running_sum[r] *= rescale
            for d in range(Dh):
                acc[r, d] *= rescale
            for t in range(start, stop):
                p = np.exp(block[r, t - start] - new_max)
                running_sum[r] += p
                for d in range(Dh):
                    acc[r, d] += p * v_cache[b, g, t, d]
            running_max[r] = new_max
    for r in range(R):
        for d in range(Dh):
            out[b, g * R + r, d] = acc[r, d] / running_sum[r]


@njit(parallel=True)
def _attention_decode(q, k_cache, v_cache, length, bias, divisor, out):
    """q [B, H, Dh] against the cache [B, Hkv, C, Dh]; bias [B, length] additive (or [B, 0]: none); out [B, H, Dh].

    Work is split over (batch row, kv head); the R query heads of a kv head share each key and value load.
    """
    B, H = q.shape[0], q.shape[1]
    Hkv = k_cache.shape[1]
    for task in prange(B * Hkv):
        _attend_group(q, task // Hkv, task % Hkv, H // Hkv, k_cache, v_cache, length, bias, divisor, out)


@njit(parallel=True)
def _decode_step(qkv, H, Hkv, rotate, cos, sin, k_cache, v_cache, T, bias, divisor, out):
    """One new position per row, fused: RoPE on its q and k heads (when rotate), k and v written into the cache at
    position T, then attention over T + 1 keys. qkv [B, NH, Dh] (q heads, k heads, v heads), cos/sin [1 or B, 1, Dh].
    """
    B = qkv.shape[0]
    R = H // Hkv
    for task in prange(B * Hkv):
        b = task // Hkv
        g = task % Hkv
        cb = b if cos.shape[0] > 1 else 0
        if rotate:
            for h in range(g * R, g * R + R):
                _rotate_head(qkv[b, h], cos[cb, 0], sin[cb, 0])
            _rotate_head(qkv[b, H + g], cos[cb, 0], sin[cb, 0])
        k_cache[b, g, T] = qkv[b, H + g]
        v_cache[b, g, T] = qkv[b, H + Hkv + g]
        _attend_group(qkv, b, g, R, k_cache, v_cache, T + 1, bias, divisor, out)


def attention_decode(q, k_cache, v_cache, length, bias=None, divisor=1.0, out=None):
    """softmax(q k^T / divisor + bias) v for one new position per row, read straight from the KV cache.

    q [B, H, Dh]; k_cache, v_cache [B, Hkv, C, Dh] of which the first `length` positions are valid; bias [B, length]
    (0 or finfo.min, from the attention mask) or None. Returns [B, H, Dh].
    twin: refimpl.llama.attention from `scores = ...` to `probs @ v` for S = 1 (repeat_kv, the divide after the
    product, the mask, Open-Llama/OPT's clamp, softmax), and refimpl.opt.attention with divisor 1.
    Differs in rounding only: the softmax is accumulated block by block (online) instead of over the whole row.
    """
    B = q.shape[0]
    bias = np.zeros((B, 0), np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    result = np.empty(q.shape, np.float32) if out is None else out
    _attention_decode(q, k_cache, v_cache, int(length), bias, np.float32(divisor), result)
    return result


NO_ROTATION = np.zeros((1, 1, 1), np.float32)


def decode_step_(qkv, H, Hkv, cos, sin, k_cache, v_cache, T, bias=None, divisor=1.0, out=None):
    """RoPE, cache append and attention for one new position per row, in one parallel kernel (the decode path).

    qkv [B, NH, Dh] holds the row's q, k and v heads (k and v rotated/written in place); cos, sin [1 or B, 1, Dh] or
    None (OPT: no rotation); k_cache, v_cache [B, Hkv, C, Dh] with T positions written. Returns context [B, H, Dh].
    twin: refimpl.llama.attention for S = 1 from apply_rotary on (the other lines as attention_decode).
    """
    B = qkv.shape[0]
    bias = np.zeros((B, 0), np.float32) if bias is None else bias
    result = np.empty((B, H, qkv.shape[2]), np.float32) if out is None else out
    rotate = cos is not None
    _decode_step(qkv, int(H), int(Hkv), rotate, cos if rotate else NO_ROTATION, sin if rotate else NO_ROTATION,
                 k_cache, v_cache, int(T), bias, np.float32(divisor), result)
    return result


# --- one layer's attention step, for any plan ----------------------------------------------------------------------

def attention(qkv4, H, Hkv, storage, layer_index, T, plan, divisor, cos=None, sin=None, layer_head_mask=None):
    """Context [M, H*Dh] (and probs [B, H, S, K] on the general path) for q/k/v in the fused buffer [B, S, NH, Dh].

    RoPE (when cos is given) rotates the q and k heads in place; the new keys and values are written into the cache
    storage (refimpl concatenates them to the past). plan is an accel.plan.AttentionPlan: "decode" (one new
    position, no attention maps: one fused kernel) or "general" (BLAS).
    """
    B, S, _, Dh = qkv4.shape
    K = T + S
    k_cache, v_cache = storage.data[layer_index, 0], storage.data[layer_index, 1]  # [B, Hkv, C, Dh]
    if plan.kind == "decode":
        out = np.empty((B, H * Dh), F32)
        decode_step_(qkv4.reshape(B, -1, Dh), H, Hkv, cos, sin, k_cache, v_cache, T, plan.mask, divisor,
                     out=out.reshape(B, H, Dh))
        return out, None
    if cos is not None:
        apply_rotary_(qkv4, H + Hkv, cos, sin)  # q and k heads, in place
    k_cache[:, :, T:K] = qkv4[:, :, H:H + Hkv].transpose(0, 2, 1, 3)  # [B, S, Hkv, Dh] -> [B, Hkv, S, Dh]
    v_cache[:, :, T:K] = qkv4[:, :, H + Hkv:].transpose(0, 2, 1, 3)
    R = H // Hkv
    q = np.ascontiguousarray(qkv4[:, :, :H].transpose(0, 2, 1, 3))  # -> [B, H, S, Dh]
    # contiguous copies [B, Hkv, K, Dh]: NumPy's matmul leaves BLAS for a stack whose stride is the capacity C
    keys, values = np.ascontiguousarray(k_cache[:, :, :K]), np.ascontiguousarray(v_cache[:, :, :K])
    # query heads of one kv head side by side: [B*Hkv, R*S, Dh] @ [B*Hkv, Dh, K], no repeat_kv copy
    G = B * Hkv
    scores = blas.matmul_batched(q.reshape(G, R * S, Dh), keys.reshape(G, K, Dh), np.empty((G, R * S, K), F32),
                                 transpose_b=True).reshape(B, H, S, K)
    probs = masked_softmax_(scores, plan.mask, divisor, blas.shares_numba_threads())  # [B, H, S, K]
    if layer_head_mask is not None:
        probs = probs * layer_head_mask[None, :, None, None]  # OPT's head_mask scales each head's probabilities
    context = blas.matmul_batched(np.ascontiguousarray(probs).reshape(G, R * S, K), values.reshape(G, K, Dh),
                                  np.empty((G, R * S, Dh), F32))  # -> [B*Hkv, R*S, Dh]
    context = context.reshape(B, H, S, Dh).transpose(0, 2, 1, 3).reshape(B * S, H * Dh)  # -> [M, H*Dh]
    return context, probs
