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

from . import convert, jit
from .model import ACCEL_CLASSES, iter_packed, parameter_leaves


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
    jit.set_threads(threads or jit.max_threads())
    if threads is None:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=threads, user_api="blas")


IN_MEMORY_LIMIT = 1 << 30  # packed weights up to 1 GiB stay in memory when no cache_dir is given
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.125}


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
    """Packed weights from cache_dir when converted before; else refimpl's model (memory-mapped, nothing converted)
    packed layer by layer: straight into the cache folder when there is one (or when the packed weights exceed
    IN_MEMORY_LIMIT, into default_cache_dir()), then memory-mapped from it; in memory for small models."""
    config = read_model_config(path)
    cls = ACCEL_CLASSES[refimpl_class(config)]
    folder = convert.folder_for(cache_dir, path, fmt) if cache_dir is not None else None
    params = convert.load(folder) if folder is not None else None
    if params is not None:
        generation_config = read_generation_config(path, config)
    else:
        reference = refimpl.load(path, dtype=np.float32)  # memory-mapped: matrices are widened when packed
        generation_config = reference.generation_config
        family = "opt" if config.family == "opt" else "llama"
        size = packed_bytes(reference, fmt)
        if folder is None and size > IN_MEMORY_LIMIT:
            folder = convert.folder_for(default_cache_dir(), path, fmt)
            params = convert.load(folder)
        if params is None and folder is not None:
            print(f"refimpl: converting the weights to {fmt} into {folder} ({human_bytes(size)}, once; later loads "
                  "memory-map it)", file=sys.stderr, flush=True)
            convert.save_entries(iter_packed(reference.params, family, fmt), folder, progress=sys.stderr.isatty())
            params = convert.load(folder)
        elif params is None:
            params = dict(iter_packed(reference.params, family, fmt, nested=True))
        del reference
    model = cls(config, params, np.float32)
    model.generation_config = generation_config
    model.weights = fmt
    model.threads = threads
    set_threads(threads)
    return model
