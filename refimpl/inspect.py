"""`refimpl inspect PATH`: what a checkpoint holds and what loading it will cost, without loading it.

Reads the config (config.json, or a GGUF file's metadata) and the tensor headers only, then prints one table:
family, class, config summary, parameter count, dtypes and bytes on disk, the memory the parameters take at each
compute dtype, and how the output embedding is tied. The tensor names get the loader's checks (weights.rename):
a checkpoint inspect describes is one whose names load.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from .formats.common import NUMPY_DTYPES, element_count, human_bytes
from .weights import HEADS, IGNORED_LAYER, checkpoint_files, list_checkpoint, read_model_config, rename, strip_prefix

DEFAULT_CLASS = {"llama": "LlamaForCausalLM", "open-llama": "OpenLlamaForCausalLM", "opt": "OPTForCausalLM"}
FORMATS = {".safetensors": "safetensors", ".bin": "PyTorch zip (.bin)", ".gguf": "GGUF",
           ".pth": "Meta consolidated.NN.pth (model-parallel shards)"}


def add_parser(subparsers):
    """Register `refimpl inspect PATH [--quiet]` on the CLI's subparsers."""
    p = subparsers.add_parser("inspect", help="describe a checkpoint: family, config, parameters, dtypes, memory")
    p.add_argument("path", help="a checkpoint folder (Hugging Face, or Meta's params.json + consolidated.NN.pth), "
                   "or a .safetensors / .bin / .gguf file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    print(describe(args.path, progress=False if args.quiet else None))
    return 0


def describe(path, progress=None) -> str:
    """The inspect table for a checkpoint folder or file, as text."""
    path = os.fspath(path)
    single_file = os.path.isfile(path) and not path.endswith(".gguf")
    config = read_model_config((os.path.dirname(path) or ".") if single_file else path)  # config.json beside it
    files, _, _ = checkpoint_files(path)
    stored = list_checkpoint(path, progress)
    family = "opt" if config.family == "opt" else "llama"
    rename(stored, family, config.num_hidden_layers)  # the loader's name checks: an alias or unknown name is refused
    used = {name: t for name, t in stored.items() if not _ignored(strip_prefix(name, family))}
    tied = _tie(config, {strip_prefix(name, family) for name in used})
    if tied.startswith("tied") and any(strip_prefix(n, family) == "lm_head.weight" for n in used):
        used = {n: t for n, t in used.items() if strip_prefix(n, family) != "lm_head.weight"}  # counted once
    count = sum(_numel(t.shape) for t in used.values())
    stored_bytes = sum(_numel(t.shape) * _stored_itemsize(t.dtype) for t in used.values())
    suffix = next((s for s in FORMATS if files[0].endswith(s)), "")
    rows = [
        ("path", path),
        ("format", f"{FORMATS.get(suffix, suffix)}, {len(files)} file{'s' * (len(files) > 1)}, "
                   f"{human_bytes(sum(os.path.getsize(f) for f in files))} on disk"),
        ("family", config.family),
        ("class", config.architectures[0] if config.architectures else DEFAULT_CLASS[config.family]),
        ("config", _config_summary(config)),
        ("parameters", f"{count:,} in {len(used)} tensors"),
        *[("dtypes" if i == 0 else "", line) for i, line in enumerate(_dtype_lines(stored))],
        ("memory", f"parameters at float32 {human_bytes(4 * count)}, float64 {human_bytes(8 * count)}, "
                   f"weights kept as stored {human_bytes(stored_bytes)}"),
        ("embeddings", tied),
        ("cpu", cpu_backend_status()),  # can backend="numba" run here, and on which BLAS
        ("gpu", gpu_backend_status()),  # can backend="cuda" run here
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _ignored(name: str) -> bool:
    return name.startswith("layers.") and name.split(".", 2)[-1] in IGNORED_LAYER


def _numel(shape) -> int:
    """Values in a tensor, as a Python int (np.prod would wrap around at 2**63)."""
    return element_count(shape)


def _stored_itemsize(dtype: str) -> int:
    """Bytes per value once loaded with weights kept as stored: BF16 and GGUF blocks become float32."""
    if dtype in ("F16", "F64", "F32"):
        return np.dtype(NUMPY_DTYPES[dtype]).itemsize
    return 4


def _dtype_lines(stored: dict) -> list[str]:
    by_dtype = {}
    for t in stored.values():
        tensors, values, nbytes = by_dtype.get(t.dtype, (0, 0, 0))
        by_dtype[t.dtype] = (tensors + 1, values + _numel(t.shape), nbytes + t.nbytes)
    return [f"{dtype}: {n} tensors, {values:,} values, {human_bytes(nbytes)}"
            for dtype, (n, values, nbytes) in sorted(by_dtype.items())]


def _config_summary(c) -> str:
    if c.family == "opt":
        ln = "pre-LN" if c.do_layer_norm_before else "post-LN"
        proj = f", word_embed_proj_dim {c.word_embed_proj_dim}" if c.word_embed_proj_dim != c.hidden_size else ""
        return (f"{_layers(c)}, hidden {c.hidden_size}, {c.num_attention_heads} heads, ffn {c.ffn_dim}, "
                f"vocab {c.vocab_size}, context {c.max_position_embeddings}, {c.activation_function}, {ln}{proj}")
    return (f"{_layers(c)}, hidden {c.hidden_size}, {c.num_attention_heads} heads "
            f"({c.num_key_value_heads} kv, head_dim {c.head_dim}), intermediate {c.intermediate_size}, "
            f"vocab {c.vocab_size}, context {c.max_position_embeddings}, {c.hidden_act}, "
            f"rope {c.rope_type} (theta {c.rope_theta:g})")


def _layers(c) -> str:
    return f"{c.num_hidden_layers} layer{'s' * (c.num_hidden_layers != 1)}"


def _tie(c, names: set) -> str:
    head_class = c.architectures[0] if c.architectures else DEFAULT_CLASS[c.family]
    if not head_class.endswith("ForCausalLM"):
        heads = sorted(n for n in names if n in HEADS)
        return f"no LM head ({head_class}; head tensors: {', '.join(heads) or 'none'})"
    if getattr(c, "shared_input_output_embedding", False):
        return "shared: logits = h @ embed_tokens.T (Open-Llama shared_input_output_embedding), no lm_head"
    if c.tie_word_embeddings:
        extra = "; the file also stores lm_head.weight, which must equal it" if "lm_head.weight" in names else ""
        return f"tied: lm_head is embed_tokens (tie_word_embeddings){extra}"
    return "untied: lm_head.weight is its own tensor"


def cpu_backend_status() -> str:
    """Whether backend="numba" can run here, and which library computes its prompt GEMMs (asked of accel lazily)."""
    from . import ACCEL, accel_package

    if importlib.util.find_spec(ACCEL) is None:
        return "backend='numba' not usable: the accel package is not installed"
    accel = accel_package()
    ok, detail = accel.numba_available()
    if not ok:
        return f"backend='numba' not usable: Numba is missing (pip install 'refimpl[accel]'): {detail}"
    kind, reason = accel.blas_provider()
    gemm = reason if kind == "mkl" else f"NumPy's BLAS ({reason})"
    return f"backend='numba' usable (Numba {detail}); prompt GEMMs on {gemm}"


def gpu_backend_status() -> str:
    """Whether backend="cuda" can run here, and if not, what is missing (asked of accel lazily)."""
    from . import ACCEL, accel_package

    if importlib.util.find_spec(ACCEL) is None:
        return "not usable: the accel package is not installed"
    usable, reason = accel_package("cuda").check_cuda()
    return ("usable: " if usable else "not usable: ") + reason
