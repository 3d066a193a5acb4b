"""numba.cuda twins of refimpl/ops.py: norms, rotary embedding, activations (each docstring names its twin).

They take device arrays through the CUDA array interface (CuPy arrays on a GPU) and also run under Numba's CUDA
simulator (NUMBA_ENABLE_CUDASIM=1, set before Numba is imported), where they take NumPy arrays: that is how
tests/test_backend_ops.py checks every one of them against its twin on a machine without a GPU.

Each public function is a launcher named as its refimpl twin: it checks shapes, picks the grid and calls the
kernel; outputs are written into arrays the caller allocated (`out=`) or in place (a trailing underscore);
elementwise kernels stride over their rows with at most MAX_GRID blocks (the simulator tests launch few). All maths
is float32. Reductions (norm means, dot products, softmax sums) run in a shared-memory tree over the threads of a
block, so they are summed in another order than NumPy's: results differ from the twin's in the last bits, bounded
as the tests state. Elementwise maths (RoPE, activations) is the twin's float32 expression; a GPU compiler may
contract a*b + c into one FMA, so on a device it matches within a few ulp, and under the simulator exactly (up to
exp/erf/tanh's ulp).

Shapes: M rows, D features, F intermediate, B batch, S positions, NH heads in a fused qkv row, Dh head dim.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from refimpl import ConfigError

THREADS = 128  # default threads per block for the reductions (a power of two, <= MAX_THREADS)


MAX_THREADS = 256  # size of the shared scratch arrays


MAX_HEAD_DIM = 256  # decode attention keeps one head's context in shared memory


F32_MIN = np.float32(np.finfo(np.float32).min)


NEG_INF = np.float32(-np.inf)


ZERO, HALF, ONE = np.float32(0.0), np.float32(0.5), np.float32(1.0)


SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))


SQRT_2 = np.float32(math.sqrt(2.0))


MAX_GRID = 1024  # most blocks an elementwise (grid-stride) launch uses; any value >= 1 gives the same result


LOG_2 = np.float32(math.log(2.0))


def _threads(threads):
    t = THREADS if threads is None else int(threads)
    if t < 1 or t > MAX_THREADS or t & (t - 1):
        raise ConfigError(f"threads={t}: a power of two up to {MAX_THREADS}")
    return t


@cuda.jit(device=True)
def _min(a, b):
    """min(a, b) with Python's semantics (a unless b < a). Not the builtin: Numba 0.66-0.68's CUDA target fails to
    compile a two-argument min / max ("Signature mismatch", numba/numba#10753); the simulator does not see it."""
    return b if b < a else a


@cuda.jit(device=True)
def _max(a, b):
    """max(a, b) with Python's semantics (a unless b > a), as _min."""
    return b if b > a else a


@cuda.jit(device=True)
def _block_sum(scratch, value):
    """Sum of `value` over the block's threads (blockDim a power of two), by a tree in shared memory."""
    tid = cuda.threadIdx.x
    scratch[tid] = value
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            scratch[tid] += scratch[tid + step]
        cuda.syncthreads()
        step //= 2
    total = scratch[0]
    cuda.syncthreads()  # everyone has read scratch[0] before it is reused
    return total


# --- norms ---------------------------------------------------------------------------------------------------------

@cuda.jit
def _rms_norm_kernel(x, weight, eps, out):
    scratch = cuda.shared.array(MAX_THREADS, np.float32)
    m = cuda.blockIdx.x
    D = x.shape[1]
    s = ZERO
    for j in range(cuda.threadIdx.x, D, cuda.blockDim.x):
        v = x[m, j]
        s += v * v
    variance = _block_sum(scratch, s) / np.float32(D)
    inv = ONE / math.sqrt(variance + eps)
    for j in range(cuda.threadIdx.x, D, cuda.blockDim.x):
        out[m, j] = weight[j] * (x[m, j] * inv)


def rms_norm(x, weight, eps, out, threads=None):
    """out [M, D] <- w * (x * (1 / sqrt(mean(x^2) + eps))), one block per row.  twin: refimpl.ops.rms_norm"""
    M = x.shape[0]
    if M:
        _rms_norm_kernel[M, _threads(threads)](x, weight, np.float32(eps), out)
    return out


@cuda.jit
def _layer_norm_kernel(x, weight, bias, eps, out):
    scratch = cuda.shared.array(MAX_THREADS, np.float32)
    m = cuda.blockIdx.x
    D = x.shape[1]
    n = np.float32(D)
    s = ZERO
    for j in range(cuda.threadIdx.x, D, cuda.blockDim.x):
        s += x[m, j]
    mean = _block_sum(scratch, s) / n
    s = ZERO
    for j in range(cuda.threadIdx.x, D, cuda.blockDim.x):
        c = x[m, j] - mean
        s += c * c
    root = math.sqrt(_block_sum(scratch, s) / n + eps)
    for j in range(cuda.threadIdx.x, D, cuda.blockDim.x):
        out[m, j] = (x[m, j] - mean) / root * weight[j] + bias[j]


def layer_norm(x, weight, bias, eps, out, threads=None):
    """out [M, D] <- (x - mean) / sqrt(var + eps) * w + b, one block per row.  twin: refimpl.ops.layer_norm

    A norm without weight or bias is passed ones / zeros (exact: y * 1, y + 0), as accel.cpu.ops.layer_norm does.
    """
    M = x.shape[0]
    if M:
        _layer_norm_kernel[M, _threads(threads)](x, weight, bias, np.float32(eps), out)
    return out


# --- rotary position embedding -------------------------------------------------------------------------------------

@cuda.jit
def _rope_kernel(x, n_heads, cos, sin):
    b = cuda.blockIdx.x
    s = cuda.blockIdx.y
    cb = b if cos.shape[0] > 1 else 0
    half = x.shape[3] // 2
    for i in range(cuda.threadIdx.x, n_heads * half, cuda.blockDim.x):
        h = i // half
        j = i % half
        x1 = x[b, s, h, j]
        x2 = x[b, s, h, j + half]
        x[b, s, h, j] = x1 * cos[cb, s, j] + (-x2) * sin[cb, s, j]
        x[b, s, h, j + half] = x2 * cos[cb, s, j + half] + x1 * sin[cb, s, j + half]


def apply_rotary_(x, n_heads, cos, sin, threads=None):
    """RoPE in place on heads 0..n_heads-1 of x [B, S, NH, Dh] (the q then k heads of a fused qkv row), half-split
    pairing (j, j + Dh/2); cos, sin [1 or B, S, Dh].  twin: refimpl.ops.apply_rotary (x * cos + rotate_half(x) * sin),
    on the layout before the head transpose (as accel.cpu.ops.apply_rotary_)."""
    B, S = x.shape[0], x.shape[1]
    if B and S and n_heads:
        _rope_kernel[(B, S), _threads(threads)](x, int(n_heads), cos, sin)
    return x


# --- activations and the gated MLP ---------------------------------------------------------------------------------

@cuda.jit(device=True)
def _act(x, code):
    """refimpl.ops.ACTIVATIONS[name] for the codes of accel.formats.ACT_CODES, the same float32 expression (as accel.cpu.ops._act)."""
    if code == 1:  # silu: x / (1 + exp(-x))
        return x / (ONE + math.exp(-x))
    if code == 2:  # relu
        return _max(x, ZERO)
    if code == 3:  # exact gelu: 0.5 x (1 + erf(x / sqrt 2))
        return HALF * x * (ONE + math.erf(x / SQRT_2))
    if code == 4:  # gelu_new (tanh approximation)
        return HALF * x * (ONE + math.tanh(SQRT_2_OVER_PI * (x + np.float32(0.044715) * (x * x * x))))
    if code == 5:  # gelu_fast
        return HALF * x * (ONE + math.tanh(x * np.float32(0.7978845608) * (ONE + np.float32(0.044715) * x * x)))
    if code == 6:  # quick_gelu: x sigmoid(1.702 x)
        return x * (ONE / (ONE + math.exp(-(np.float32(1.702) * x))))
    if code == 7:  # relu2
        r = _max(x, ZERO)
        return r * r
    if code == 8:  # relu6
        return _min(_max(x, ZERO), np.float32(6.0))
    if code == 9:  # mish: x tanh(softplus(x)), softplus as NumPy's logaddexp(x, 0)
        if x == ZERO:
            softplus = LOG_2
        elif x > ZERO:
            softplus = x + math.log1p(math.exp(-x))
        else:
            softplus = math.log1p(math.exp(x))
        return x * math.tanh(softplus)
    if code == 10:
        return math.tanh(x)
    if code == 11:  # sigmoid
        return ONE / (ONE + math.exp(-x))
    return x


@cuda.jit
def _gate_kernel(y, act, out):
    M, F = out.shape
    for i in range(cuda.grid(1), M * F, cuda.gridsize(1)):
        m = i // F
        f = i % F
        out[m, f] = _act(y[m, f], act) * y[m, F + f]


def gated_act(y, act, out, threads=None):
    """out [M, F] <- act(gate) * up for y = [gate | up] [M, 2F] (the stacked gate_up projection's output).

    twin: refimpl.llama.mlp's `act(gate) * up` (SiLU for Llama: silu(x) = x / (1 + exp(-x)), refimpl.ops.silu);
    act is an ACT_CODES code. With up = ones it is the plain activation (OPT's act(fc1)): see `activation`.
    """
    M, F = out.shape
    if M * F:
        t = _threads(threads)
        _gate_kernel[min(-(-M * F // t), MAX_GRID), t](y, int(act), out)
    return out


@cuda.jit
def _act_kernel(y, act, out):
    M, F = out.shape
    for i in range(cuda.grid(1), M * F, cuda.gridsize(1)):
        out[i // F, i % F] = _act(y[i // F, i % F], act)


def activation(y, act, out, threads=None):
    """out [M, F] <- act(y) elementwise (OPT's act(fc1(h))).  twin: refimpl.ops.ACTIVATIONS[name], every name of
    ACT_CODES (relu, gelu, gelu_new, silu, gelu_fast, quick_gelu, relu2, relu6, mish, tanh, sigmoid, linear)"""
    M, F = out.shape
    if M * F:
        t = _threads(threads)
        _act_kernel[min(-(-M * F // t), MAX_GRID), t](y, int(act), out)
    return out
