"""Q4_K and Q6_K blocks from float32 weights, for tests and benchmarks (gguf-py dequantizes K-quants but cannot make
them). A plain round-to-nearest quantizer in NumPy, not llama.cpp's search for the best scales (make_qkx2_quants):
its blocks are valid and decode with gguf.quants.dequantize and llama.cpp alike, with a little more error than
llama.cpp's own (what the tests compare, accel against refimpl on the same blocks, does not depend on that).

Layouts as ggml-common.h block_q4_K / block_q6_K (decoded by ggml-quants.c dequantize_row_q4_K / _q6_K):
  Q4_K  256 weights, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 8 packed 6-bit (scale, min), 128 bytes of nibbles;
        sub-block s of 32: w = d * sc_s * q - dmin * m_s, q in 0..15
  Q6_K  256 weights, 210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), 16 int8 scales, fp16 d;
        group g of 16: w = d * sc_g * (q - 32), q in 0..63
and "Q4_K_M", llama.cpp's mix: Q6_K for attn_v, ffn_down and output, Q4_K for the other matrices.
"""
from __future__ import annotations

import numpy as np

QK = 256


def _blocks(w):
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK:
        raise ValueError(f"K-quants need rows of a multiple of {QK} weights, got shape {w.shape}")
    return w.reshape(w.shape[0], -1, QK)  # [O, nb, 256]


def _fp16(a):
    return a.astype(np.float16)


def quantize_q6_k(w):
    """float32 [O, D] -> uint8 [O, D / 256 * 210]."""
    b = _blocks(w)
    O, nb, _ = b.shape
    g = b.reshape(O, nb, 16, 16)  # groups of 16 weights
    amax = np.abs(g).max(-1)  # [O, nb, 16]
    group_scale = amax / 31.0
    d = _fp16(np.abs(group_scale).max(-1) / 127.0)  # [O, nb]
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[..., None] > 0, np.round(group_scale / d32[..., None]), 0).clip(-128, 127).astype(np.int8)
        step = d32[..., None] * sc.astype(np.float32)  # [O, nb, 16]
        q = np.where(step[..., None] > 0, np.round(g / step[..., None]), 0).clip(-32, 31).astype(np.int32) + 32
    q = q.reshape(O, nb, 2, 128)  # two halves of 128
    out = np.zeros((O, nb, 210), np.uint8)
    for h in range(2):
        qh_half = q[:, :, h]  # [O, nb, 128]: index 32 t + l
        for t in range(4):
            part = qh_half[..., 32 * t:32 * t + 32]  # [O, nb, 32]
            low, high = part & 15, part >> 4
            ql_index = 64 * h + 32 * (t % 2)
            if t < 2:
                out[..., ql_index:ql_index + 32] |= low.astype(np.uint8)
            else:
                out[..., ql_index:ql_index + 32] |= (low << 4).astype(np.uint8)
            out[..., 128 + 32 * h:128 + 32 * h + 32] |= (high << (2 * t)).astype(np.uint8)
    out[..., 192:208] = sc.view(np.uint8)
    out[..., 208:210] = d.reshape(O, nb, 1).view(np.uint8)
    return out.reshape(O, nb * 210)


def quantize_q4_k(w):
    """float32 [O, D] -> uint8 [O, D / 256 * 144]."""
    b = _blocks(w)
    O, nb, _ = b.shape
    s = b.reshape(O, nb, 8, 32)  # sub-blocks of 32
    lo = np.minimum(s.min(-1), 0.0)  # [O, nb, 8]
    scale = (s.max(-1) - lo) / 15.0
    mins = -lo
    d = _fp16(scale.max(-1) / 63.0)
    dmin = _fp16(mins.max(-1) / 63.0)
    d32, m32 = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.round(scale / d32), 0).clip(0, 63).astype(np.int32)
        m = np.where(m32 > 0, np.round(mins / m32), 0).clip(0, 63).astype(np.int32)
        step = (d32 * sc)[..., None]
        q = np.where(step > 0, np.round((s + (m32 * m)[..., None]) / step), 0).clip(0, 15).astype(np.int32)
    out = np.zeros((O, nb, 144), np.uint8)
    out[..., 0:2] = d.reshape(O, nb, 1).view(np.uint8)
    out[..., 2:4] = dmin.reshape(O, nb, 1).view(np.uint8)
    for j in range(4):  # ggml's get_scale_min_k4, inverted
        out[..., 4 + j] = (sc[..., j] & 63) | ((sc[..., j + 4] >> 4) << 6)
        out[..., 8 + j] = (m[..., j] & 63) | ((m[..., j + 4] >> 4) << 6)
        out[..., 12 + j] = (sc[..., j + 4] & 15) | ((m[..., j + 4] & 15) << 4)
    for g in range(4):  # 32 bytes: sub-block 2g in the low nibbles, 2g + 1 in the high ones
        out[..., 16 + 32 * g:16 + 32 * g + 32] = (q[:, :, 2 * g] | (q[:, :, 2 * g + 1] << 4)).astype(np.uint8)
    return out.reshape(O, nb * 144)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}
Q6_IN_Q4_K_M = ("attn_v.weight", "ffn_down.weight", "output.weight")  # llama.cpp's Q4_K_M keeps these in Q6_K


def q4_k_m_type(gguf_name):
    """The block type llama.cpp's Q4_K_M mix gives a matrix (a simplification: it uses Q6_K for half of the
    attn_v / ffn_down layers; here all of them)."""
    return "Q6_K" if gguf_name.endswith(Q6_IN_Q4_K_M) else "Q4_K"
