"""accel.load's work: pick the class as refimpl.load does, get packed weights (converted now or from cache_dir),
set the threads."""
from __future__ import annotations

import numpy as np

import refimpl
from refimpl.pretrained import read_generation_config

from . import convert, jit
from .model import ACCEL_CLASSES, pack_llama, pack_opt


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


def load_model(path, fmt, threads, cache_dir):
    config = refimpl.read_config(path)
    cls = ACCEL_CLASSES[refimpl_class(config)]
    folder = convert.folder_for(cache_dir, path, fmt) if cache_dir is not None else None
    params = convert.load(folder) if folder is not None else None
    if params is not None:
        generation_config = read_generation_config(path, config)
    else:
        reference = refimpl.load(path, dtype=np.float32)
        pack = pack_opt if config.family == "opt" else pack_llama
        params = pack(reference.params, fmt)
        generation_config = reference.generation_config
        del reference
        if folder is not None:
            convert.save(params, folder)
    model = cls(config, params, np.float32)
    model.generation_config = generation_config
    model.weights = fmt
    model.threads = threads
    set_threads(threads)
    return model
