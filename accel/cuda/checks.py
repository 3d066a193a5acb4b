"""Each CUDA kernel against its refimpl twin: the checks tests/test_cuda_kernels.py runs under Numba's CUDA
simulator (NumPy arrays) and tests/test_cuda_device.py runs on a real GPU (CuPy arrays), with the same tolerances.

A check takes `dev`, which moves a NumPy array to where the kernels run (identity under the simulator, cupy.asarray
on a device), and `host`, which brings one back. Tolerances come from the arithmetic, as in
tests/test_accel_kernels.py: two float32 sums of the same n terms in different orders differ by at most
n * eps * sum|terms|; elementwise kernels evaluate the twin's float32 expression (a device may fuse a*b + c into
one FMA, hence `exact=False` there: 2 eps of the terms' magnitudes).
"""
from __future__ import annotations

import numpy as np

from refimpl import ops

from . import kernels as K

EPS = float(np.finfo(np.float32).eps)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _f32(a):
    a = np.asarray(a)
    assert a.dtype == np.float32, f"dtype {a.dtype}, expected float32"
    return a


def check_rms_norm(dev, host, seed, rows, d, eps, threads=None):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, rows, d, scale=3.0), randn(rng, d)
    out = dev(np.zeros((rows, d), np.float32))
    ours = _f32(host(K.rms_norm(dev(x), dev(w), eps, out, threads)))
    # only mean(x^2) is summed in another order (a tree): relative error of the scale <= d*eps (+ sqrt, divide)
    np.testing.assert_allclose(ours, ops.rms_norm(x, w, eps), rtol=(d + 4) * EPS, atol=1e-30)


def check_layer_norm(dev, host, seed, rows, d, affine, threads=None):
    rng = np.random.default_rng(seed)
    x = randn(rng, rows, d, scale=2.0) + np.float32(1.5)
    w, b = (randn(rng, d), randn(rng, d)) if affine else (None, None)
    wk = w if affine else np.ones(d, np.float32)
    bk = b if affine else np.zeros(d, np.float32)
    out = dev(np.zeros((rows, d), np.float32))
    ours = _f32(host(K.layer_norm(dev(x), dev(wk), dev(bk), 1e-5, out, threads)))
    ref = ops.layer_norm(x, w, b, eps=1e-5)
    # mean and variance are sums in another order: each output moves by <= (2d+4) eps of its normalised size
    scale = np.abs(ops.layer_norm(x, None, None, 1e-5)) * (1.0 if w is None else np.abs(w)) + 1.0
    assert np.all(np.abs(ours - ref) <= (2 * d + 4) * EPS * scale)


def check_rope(dev, host, seed, b, h, s, half, per_row, exact=True, threads=None):
    """RoPE in place on the q and k heads of a fused [B, S, NH, Dh] row = refimpl.ops.apply_rotary on [B, H, S, Dh]."""
    rng = np.random.default_rng(seed)
    Dh = 2 * half
    nh = h + 1  # one extra head (a v head) that must stay untouched
    x = randn(rng, b, s, nh, Dh)
    angles = rng.uniform(0, 50, (b if per_row else 1, s, half))
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(np.float32)
    buf = dev(x.copy())
    K.rope_(buf, h, dev(cos), dev(sin), threads)
    ours = _f32(host(buf))
    q = x[:, :, :h].transpose(0, 2, 1, 3)  # [B, H, S, Dh]
    full_cos, full_sin = np.broadcast_to(cos, (b, s, Dh)), np.broadcast_to(sin, (b, s, Dh))
    ref = ops.apply_rotary(q, full_cos, full_sin).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(ours[:, :, h:], x[:, :, h:])
    if exact:
        np.testing.assert_array_equal(ours[:, :, :h], ref)
    else:
        mag = np.abs(q) * np.abs(cos[:, None]) + np.abs(ops.rotate_half(q)) * np.abs(sin[:, None])
        mag = mag.transpose(0, 2, 1, 3)
        assert np.all(np.abs(ours[:, :, :h] - ref) <= 2 * EPS * mag + 1e-30)


def reference_attention(q, keys, values, mask, divisor):
    """refimpl.llama.attention's lines for q [B, H, S, Dh], keys/values [B, Hkv, K, Dh], mask [B, 1, S, K]."""
    H, Hkv = q.shape[1], keys.shape[1]
    keys, values = ops.repeat_kv(keys, H // Hkv), ops.repeat_kv(values, H // Hkv)
    scores = (q @ keys.transpose(0, 1, 3, 2)) / divisor + mask
    scores = np.maximum(scores, ops.mask_min(scores.dtype))
    probs = ops.softmax(scores)
    return probs @ values, probs, values


def check_attention_decode(dev, host, seed, heads, head_dim, length, batch, pad, spare, threads=None):
    H, Hkv = heads
    rng = np.random.default_rng(seed)
    q = randn(rng, batch, H, head_dim)
    capacity = length + spare  # the cache has room beyond the valid positions
    k_cache, v_cache = randn(rng, batch, Hkv, capacity, head_dim), randn(rng, batch, Hkv, capacity, head_dim)
    mask2d = np.ones((batch, length), np.int64)
    if pad and length > 1:
        mask2d[0, : rng.integers(1, length)] = 0  # left padding in row 0
    bias = np.where(mask2d == 0, ops.mask_min(np.float32), np.float32(0)).astype(np.float32)
    divisor = np.sqrt(np.float32(head_dim))
    out = dev(np.zeros((batch, H, head_dim), np.float32))
    ours = _f32(host(K.attention_decode(dev(q), dev(k_cache), dev(v_cache), length,
                                        dev(bias if pad else np.zeros((batch, 0), np.float32)), divisor, out, threads)))
    mask = ops.causal_mask(mask2d, length - 1, np.float32)  # [B, 1, 1, K]
    ref, probs, values = reference_attention(q[:, :, None], k_cache[:, :, :length], v_cache[:, :, :length], mask,
                                             divisor)
    ref = ref[:, :, 0]
    # scores: dot bound of Dh terms; softmax: K-term sum; context: K-term weighted sum, all relative to probs@|v|
    scale = (probs[:, :, 0, :, None] * np.abs(values)).sum(-2)
    np.testing.assert_array_less(np.abs(ours - ref), (length + head_dim + 8) * EPS * (scale + np.abs(ref)) + 1e-30)


def act_bound(x, ref):
    """The same float32 expression, but exp / erf / tanh may differ in their last bits (4 ulp of the result), and
    GELU's 1 + erf (1 + tanh) cancels for negative x: there an ulp of erf (of 1) is 0.5 |x| eps absolute."""
    return 8 * EPS * np.abs(ref) + 4 * EPS * np.abs(x)


def check_gated_act(dev, host, seed, rows, f, act, threads=None):
    rng = np.random.default_rng(seed)
    y = randn(rng, rows, 2 * f, scale=4.0)
    out = dev(np.zeros((rows, f), np.float32))
    ours = _f32(host(K.gated_act(dev(y), K.ACT_CODES[act], out, threads)))
    ref = ops.ACTIVATIONS[act](y[:, :f]) * y[:, f:]
    assert np.all(np.abs(ours - ref) <= act_bound(y[:, :f], ref) * np.abs(y[:, f:]) + 8 * EPS * np.abs(ref) + 1e-30)


def check_activation(dev, host, seed, rows, f, act, threads=None):
    rng = np.random.default_rng(seed)
    y = randn(rng, rows, f, scale=4.0)
    out = dev(np.zeros((rows, f), np.float32))
    ours = _f32(host(K.activation(dev(y), K.ACT_CODES[act], out, threads)))
    ref = ops.ACTIVATIONS[act](y)
    assert np.all(np.abs(ours - ref) <= act_bound(y, ref) + 1e-30)


def check_linear_q8(dev, host, seed, rows, d, o, bias, add, threads=None):
    from accel.quant import dequantize_q8_0, quantize_q8_0

    rng = np.random.default_rng(seed)
    x, w = randn(rng, rows, d), randn(rng, o, d)
    q, scales = quantize_q8_0(w)
    dense = dequantize_q8_0(q, scales)
    b = randn(rng, o) if bias else np.zeros(0, np.float32)
    start = randn(rng, rows, o) if add else np.zeros((rows, o), np.float32)
    out = dev(start.copy())
    ours = _f32(host(K.linear_q8(dev(x), dev(q), dev(scales), dev(b), out, K.ADD if add else K.STORE, threads)))
    ref = ops.linear(x, dense, b if bias else None)
    if add:
        ref = start + ref
    bound = d * EPS * (np.abs(x.astype(np.float64)) @ np.abs(dense.astype(np.float64)).T)  # dot bound
    bound += (np.abs(ref) + np.abs(start)) * 2 * EPS + 1e-30  # the bias and residual adds
    assert np.all(np.abs(ours - ref) <= bound)
