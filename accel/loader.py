"""accel.load's work: pick the class as refimpl.load does, get packed weights (converted now or from cache_dir),
set the threads."""
from __future__ import annotations

import os
import sys

import numpy as np

import refimpl
from refimpl.formats.common import human_bytes
from refimpl.pretrained import read_generation_config
from refimpl.weights import read_model_config

from . import convert
from .cpu import jit
from .cpu.forward import ACCEL_CLASSES
from .formats import BYTES_PER_WEIGHT
from .packing import iter_packed, parameter_leaves


def refimpl_class(config):
    """The refimpl class refimpl.load would build for this config (architectures[0], else the causal LM)."""
    if config.architectures:
        cls = refimpl.ARCHITECTURES.get(config.architectures[0])
        if cls is None:
            raise refimpl.ConfigError(f"config.json architectures[0]={config.architectures[0]!r} is not a class "
                                      f"refimpl implements ({', '.join(refimpl.ARCHITECTURES)})")
        return cls
    return refimpl.CAUSAL_LM_FOR_MODEL_TYPE[config.family]


def set_threads(threads):
    """Numba threads for this Python thread; with threads given, BLAS threads too when threadpoolctl is installed
    (process-wide). threads=None leaves BLAS as the environment set it (OPENBLAS_NUM_THREADS, ...)."""
    jit.set_threads(threads or jit.default_threads())
    if threads is None:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=threads, user_api="blas")


IN_MEMORY_LIMIT = 1 << 30  # packed weights up to 1 GiB stay in memory when no cache_dir is given


def default_cache_dir():
    """$REFIMPL_CACHE, else $XDG_CACHE_HOME/refimpl, else ~/.cache/refimpl (transformers users know ~/.cache)."""
    if os.environ.get("REFIMPL_CACHE"):
        return os.environ["REFIMPL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "refimpl", "accel")


def packed_bytes(reference, fmt):
    """Bytes the packed matrices will take: parameters of the matrices x bytes per weight of the format."""
    count = sum(leaf.shape[0] * leaf.shape[1] for leaf in parameter_leaves(reference.params)
                if getattr(leaf, "ndim", 0) == 2)
    return int(count * BYTES_PER_WEIGHT[fmt])


def load_model(path, fmt, threads, cache_dir):
    """Packed weights from cache_dir when converted before (and the folder passes convert.load's checks); else
    refimpl's model (memory-mapped, nothing converted) packed layer by layer: straight into the cache folder when
    there is one (or when the packed weights exceed IN_MEMORY_LIMIT, into default_cache_dir()), then memory-mapped
    from it; in memory for small models. A cache folder that fails its check is converted again and replaced."""
    config = read_model_config(path)
    cls = ACCEL_CLASSES[refimpl_class(config)]
    if fmt == "gguf":
        return finish(cls, config, *gguf_params(path), fmt, threads)
    layout = convert.expected_layout(config, cls.head, fmt)
    key = convert.fingerprint(path, fmt) if cache_dir is not None else None
    folder = convert.folder_for(cache_dir, path, fmt, key) if cache_dir is not None else None
    params, problem = from_cache(folder, layout, key, fmt)
    if params is not None:
        generation_config = read_generation_config(path, config)
    else:
        reference = refimpl.load(path, dtype=np.float32)  # memory-mapped: matrices are widened when packed
        generation_config = reference.generation_config
        family = "opt" if config.family == "opt" else "llama"
        size = packed_bytes(reference, fmt)
        if folder is None and size > IN_MEMORY_LIMIT:
            key = convert.fingerprint(path, fmt)
            folder = convert.folder_for(default_cache_dir(), path, fmt, key)
            params, problem = from_cache(folder, layout, key, fmt)
        if params is None and folder is not None:
            params = convert_into(reference, family, fmt, folder, layout, key, size, problem)
        elif params is None:
            params = dict(iter_packed(reference.params, family, fmt, nested=True))
        del reference
    return finish(cls, config, params, generation_config, fmt, threads)


def finish(cls, config, params, generation_config, fmt, threads):
    model = cls(config, params, np.float32)
    model.generation_config = generation_config
    model.weights = fmt
    model.threads = threads
    set_threads(threads)
    return model


def gguf_params(path):
    """weights="gguf": the packed tree straight from the memory-mapped GGUF file, each matrix as the file stores it
    (nothing converted, so nothing cached; Q/K rows are gathered into the model's order, a copy of those two)."""
    if not (os.path.isfile(path) and str(path).endswith(".gguf")):
        raise refimpl.ConfigError(f"weights='gguf' computes on a GGUF file's own blocks, and {path} is not a .gguf "
                                  "file: use fp32, fp16, bf16 or int8")
    reference = refimpl.load(path, dtype=np.float32)  # memory-mapped: nothing dequantized here
    family = "opt" if reference.config.family == "opt" else "llama"
    return dict(iter_packed(reference.params, family, "gguf", nested=True)), reference.generation_config


def from_cache(folder, layout, key, fmt):
    """(packed tree, None) from a cache folder that passes its checks; (None, None) when there is no folder;
    (None, the CheckpointError) when it fails them."""
    if folder is None:
        return None, None
    try:
        return convert.load(folder, layout, key, fmt), None
    except refimpl.CheckpointError as exc:
        return None, exc


def convert_into(reference, family, fmt, folder, layout, key, size, problem):
    """Pack refimpl's model into the cache folder (replacing it atomically when it failed its check: `problem`) and
    memory-map it back, checked: a conversion that does not pass raises CheckpointError, it never runs."""
    if problem is not None:
        print(f"refimpl: the weight cache failed its check ({problem}); converting again", file=sys.stderr,
              flush=True)
    print(f"refimpl: converting the weights to {fmt} into {folder} ({human_bytes(size)}, once; later loads "
          "memory-map it)", file=sys.stderr, flush=True)
    convert.save_entries(iter_packed(reference.params, family, fmt), folder, key, fmt,
                         progress=sys.stderr.isatty(), replace=problem is not None)
    params = convert.load(folder, layout, key, fmt)
    if params is None:  # another process renamed it aside this very moment
        raise refimpl.CheckpointError(f"{folder}: the converted weights vanished as they were written; load again")
    return params
