"""Attention on the device: the decode kernel over the KV cache, and the layer's attention step for any plan.

twin: the attention part of refimpl.llama.attention and refimpl.opt.attention, after the projections (as
accel/cpu/attention.py). One new position per row (the "decode" plan): attention_decode, an online softmax over the
device cache with GQA by index; several positions (a prompt, or when attention maps or OPT's head_mask are asked
for): refimpl's lines in xp (scores matmul, mask, clamp, softmax).

Shapes: B batch, S new tokens, T cached, K = T + S keys, H query heads, Hkv kv heads, R = H / Hkv, NH heads in a
fused qkv row, Dh head dim, C cache capacity.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from refimpl import ConfigError
from refimpl.ops import mask_min

from .ops import MAX_HEAD_DIM, MAX_THREADS, NEG_INF, ZERO, _max, _min, _threads

F32 = np.float32
F32_MIN = mask_min(F32)

@cuda.jit
def _attention_decode_kernel(q, k_cache, v_cache, length, bias, divisor, out):
    """Block (b, h): query head h of row b against kv head h // R, blocks of blockDim keys at a time.

    A block of keys: thread i scores key start+i (a full dot over Dh) into shared memory; every thread then takes the
    block's max and sum from shared memory (the same numbers in every thread), rescales the running context by
    exp(old max - new max), and threads split the head dims to add sum_t p_t v_t.
    """
    scores = cuda.shared.array(MAX_THREADS, np.float32)
    acc = cuda.shared.array(MAX_HEAD_DIM, np.float32)
    b = cuda.blockIdx.x
    h = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    H = q.shape[1]
    Dh = q.shape[2]
    g = h // (H // k_cache.shape[1])  # GQA: query head h reads kv head h // n_rep (refimpl.ops.repeat_kv)
    has_bias = bias.shape[1] > 0
    for d in range(tid, Dh, nt):
        acc[d] = ZERO
    running_max = NEG_INF
    running_sum = ZERO
    cuda.syncthreads()
    for start in range(0, length, nt):
        stop = _min(start + nt, length)
        t = start + tid
        if t < stop:
            s = ZERO
            for d in range(Dh):
                s += q[b, h, d] * k_cache[b, g, t, d]
            s = s / divisor
            if has_bias:
                s = s + bias[b, t]
            scores[tid] = _max(s, F32_MIN)  # Open-Llama / OPT clamp (a no-op for Llama unless a score is -inf)
        cuda.syncthreads()
        block_max = NEG_INF
        for i in range(stop - start):
            block_max = _max(block_max, scores[i])
        new_max = _max(running_max, block_max)
        rescale = math.exp(running_max - new_max)  # 0 on the first block
        block_sum = ZERO
        for i in range(stop - start):
            block_sum += math.exp(scores[i] - new_max)
        running_sum = running_sum * rescale + block_sum
        for d in range(tid, Dh, nt):
            a = acc[d] * rescale
            for i in range(stop - start):
                a += math.exp(scores[i] - new_max) * v_cache[b, g, start + i, d]
            acc[d] = a
        running_max = new_max
        cuda.syncthreads()  # scores are read by all before the next block overwrites them
    for d in range(tid, Dh, nt):
        out[b, h, d] = acc[d] / running_sum


def attention_decode(q, k_cache, v_cache, length, bias, divisor, out, threads=None):
    """out [B, H, Dh] <- softmax(max(q k^T / divisor + bias, finfo.min)) v for one new position per row, read
    straight from the cache (k_cache, v_cache [B, Hkv, C, Dh], the first `length` positions valid; bias [B, length]
    additive from the attention mask, or [B, 0] for none). Online softmax, GQA by index (no repeat_kv copy).

    twin: refimpl.llama.attention from `scores = ...` to `probs @ v` for S = 1 (repeat_kv, the divide after the
    product, the mask, Open-Llama's clamp, softmax); refimpl.opt.attention with divisor 1 (its q is pre-scaled).
    """
    B, H, Dh = q.shape
    if Dh > MAX_HEAD_DIM:
        raise ConfigError(f"head_dim={Dh}: the CUDA decode kernel handles up to {MAX_HEAD_DIM}")
    if H % k_cache.shape[1]:
        raise ConfigError(f"{H} query heads are not a multiple of {k_cache.shape[1]} kv heads")
    if B and H:
        _attention_decode_kernel[(B, H), _threads(threads)](q, k_cache, v_cache, int(length), bias,
                                                           np.float32(divisor), out)
    return out


# --- one layer's attention step, for any plan ----------------------------------------------------------------------

def general_attention(q, keys, values, mask, divisor, clamp, xp, layer_head_mask=None):
    """refimpl.llama.attention's (refimpl.opt.attention's) lines for several new positions, in xp: q [B, H, S, Dh],
    keys/values [B, Hkv, K, Dh] (GQA by a reshape: the R query heads of a kv head side by side, no repeat_kv copy).
    Returns (context [M, H*Dh], probs [B, H, S, K] after OPT's head_mask)."""
    B, H, S, Dh = q.shape
    Hkv, Kn = keys.shape[1], keys.shape[2]
    R = H // Hkv
    scores = (q.reshape(B, Hkv, R * S, Dh) @ keys.transpose(0, 1, 3, 2)).reshape(B, H, S, Kn)
    scores = scores / divisor + mask
    if clamp:
        scores = xp.maximum(scores, F32_MIN)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    if layer_head_mask is not None:
        probs = probs * layer_head_mask[None, :, None, None]
    context = probs.reshape(B, Hkv, R * S, Kn) @ values
    return context.reshape(B, H, S, Dh).transpose(0, 2, 1, 3).reshape(B * S, H * Dh), probs


def attention(qkv4, H, Hkv, storage, i, T, plan, divisor, clamp, xp, layer_head_mask=None):
    """Context [M, H*Dh] and probs (general path) or None for q/k/v in the fused buffer [B, S, NH, Dh] (RoPE already
    applied): the new keys and values are written into the cache at T..T+S (refimpl concatenates them to the
    past), then attention_decode reads the cache, or the xp lines do.  twin: the attention part of
    refimpl.llama.attention / refimpl.opt.attention (as accel.cpu.attention.attention)."""
    B, S, _, Dh = qkv4.shape
    k_cache, v_cache = storage.data[i, 0], storage.data[i, 1]  # [B, Hkv, C, Dh]
    k_cache[:, :, T:T + S] = qkv4[:, :, H:H + Hkv].transpose(0, 2, 1, 3)
    v_cache[:, :, T:T + S] = qkv4[:, :, H + Hkv:].transpose(0, 2, 1, 3)
    if plan.kind == "decode":
        context = xp.empty((B, H, Dh), F32)
        attention_decode(xp.ascontiguousarray(qkv4[:, 0, :H]), k_cache, v_cache, T + 1, plan.mask, divisor, context)
        return context.reshape(B, H * Dh), None
    q = qkv4[:, :, :H].transpose(0, 2, 1, 3)
    return general_attention(q, k_cache[:, :, :T + S], v_cache[:, :, :T + S], plan.mask, divisor, clamp, xp,
                             layer_head_mask)
