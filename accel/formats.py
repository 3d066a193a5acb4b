"""One home for what every accel backend shares about numbers: storage formats, block sizes, activation and
epilogue codes, and the NumPy conversions that pack a float32 matrix into a format (done once, at load).

Storage formats (compute is float32 whatever the storage):
  fp32  the checkpoint's numbers, 4 bytes a weight
  fp16  IEEE half, 2 bytes (kept as uint16 bit patterns: Numba has no float16), widened exactly to float32
  bf16  bfloat16, 2 bytes, rounded to nearest even as torch's .to(torch.bfloat16)
  int8  Q8_0 as llama.cpp: each block of 32 weights of a row stores q = round(w / d) in int8 and one scale
        d = max|w| / 127 (rounded to fp16, as GGUF stores it); w ~ q * d. 1.125 bytes a weight here (d kept float32)
  gguf  a GGUF file's own tensors, computed on as the file stores them (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K blocks
        dequantized in registers by accel.cpu.gguf_blocks; F32 / F16 / BF16 tensors as fp32 / fp16 / bf16 above);
        numba backend only
"""
from __future__ import annotations

import numpy as np

from refimpl import ConfigError

# storage formats each backend implements (refimpl.load(weights=...))
FORMATS = {"numba": ("fp32", "fp16", "bf16", "int8", "gguf"), "cuda": ("fp32", "fp16", "int8")}
WEIGHT_FORMATS = FORMATS["numba"]  # every format some backend implements
GGUF_BLOCKS = ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K")  # computed on as the file stores them
STORAGE = ("fp32", "fp16", "bf16", "int8") + GGUF_BLOCKS  # what one matrix can be (accel.cpu.linear.Weight)
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.125}  # "gguf": the file's own size
QBLOCK = 32  # weights per Q8_0 block

# transformers' ACT2FN names -> the code the kernels switch on (the same table as refimpl.ops.ACTIVATIONS)
ACT_CODES = {"linear": 0, "silu": 1, "swish": 1, "relu": 2, "gelu": 3, "gelu_new": 4, "gelu_pytorch_tanh": 4,
             "gelu_fast": 5, "quick_gelu": 6, "relu2": 7, "relu6": 8, "mish": 9, "tanh": 10, "sigmoid": 11}

# What a linear kernel does with y = x . w[o] + b[o]  (for GATED, u is the same for row o + F)
STORE, ADD, ACT, GATED = 0, 1, 2, 3  # out = y | out += y (residual) | out = act(y) | out = act(y) * u


def check_format(weights, backend="numba"):
    """weights= must be a format of this backend: ConfigError naming the value and the choices otherwise."""
    if weights not in FORMATS[backend]:
        other = [b for b, formats in FORMATS.items() if b != backend and weights in formats]
        hint = f" ({weights} is the {other[0]} backend's)" if other else ""
        raise ConfigError(f"weights={weights!r}: backend={backend!r} stores {', '.join(FORMATS[backend])}{hint}")


def activation_code(name, backend="numba"):
    """The kernels' code of an activation name (config.hidden_act / activation_function)."""
    if name not in ACT_CODES:
        raise ConfigError(f"activation {name!r}: backend={backend!r} implements {', '.join(ACT_CODES)}")
    return ACT_CODES[name]


# --- conversions (NumPy, once at load) -----------------------------------------------------------------------------

def quantize_q8_0(w):
    """float32 [O, D] -> (q int8 [O, D], d float32 [O, ceil(D/32)]), llama.cpp's quantize_row_q8_0_ref.

    d = amax / 127 per block; q = round-half-away(w / d) using the unrounded d; d is then stored rounded to fp16.
    A last partial block is quantised as if padded with zeros.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    O, D = w.shape
    nb = -(-D // QBLOCK)
    padded = np.zeros((O, nb * QBLOCK), np.float32)
    padded[:, :D] = w
    blocks = padded.reshape(O, nb, QBLOCK)
    d = np.max(np.abs(blocks), axis=-1) / np.float32(127.0)  # [O, nb]
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    scaled = blocks * inv[..., None]
    q = np.trunc(scaled + np.copysign(np.float32(0.5), scaled)).astype(np.int8)  # roundf: half away from zero
    return np.ascontiguousarray(q.reshape(O, -1)[:, :D]), d.astype(np.float16).astype(np.float32)


def dequantize_q8_0(q, d):
    """(q [O, D], d [O, nb]) -> float32 [O, D] = q * d of its block."""
    O, D = q.shape
    return (q.astype(np.float32) * np.repeat(d, QBLOCK, axis=1)[:, :D]).astype(np.float32)


def to_bf16_bits(w):
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def to_fp16_bits(w, name="weight"):
    """float32 -> IEEE half bit patterns (uint16); a weight beyond fp16's range is refused, not turned into inf."""
    with np.errstate(over="ignore"):
        half = np.asarray(w, dtype=np.float32).astype(np.float16)
    if not np.all(np.isfinite(half)):
        raise ConfigError(f"{name} has values beyond fp16's range (|w| > 65504): use weights='bf16' or 'fp32'")
    return np.ascontiguousarray(half).view(np.uint16)


def half_bits_to_f32(bits, bf16):
    """uint16 bit patterns -> float32 (exact)."""
    if bf16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)
