"""refimpl: a readable NumPy reference implementation of Llama 2, Open-Llama and OPT that matches transformers 4.46.3.

    import refimpl
    model = refimpl.load("path/to/checkpoint")          # the class named by config.json
    out = model(input_ids=[[1, 17, 42]])                 # out.logits: [1, 3, vocab] float32

Needs NumPy only (sentencepiece is imported when a Llama tokenizer is loaded).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import DTypeLike

from .config import LlamaConfig, OPTConfig, from_hf_config, read_config
from .errors import CheckpointError, ConfigError, InputError, RefimplError
from .llama import (LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, OpenLlamaForCausalLM,
                    OpenLlamaForSequenceClassification, OpenLlamaModel)
from .opt import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification, OPTModel
from .outputs import ModelOutput
from .streamers import TextIteratorStreamer, TextStreamer
from .weights import read_model_config

from .pretrained import PreTrainedModel

if TYPE_CHECKING:  # the tokenizers load when a tokenizer does (refimpl.load_tokenizer)
    from .tokenizers.base import Tokenizer

__version__ = "0.1.0"

# config.json "architectures"[0] -> class; model_type -> the causal-LM class when architectures is absent.
ARCHITECTURES = {cls.__name__: cls for cls in (
    LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification,
    OpenLlamaModel, OpenLlamaForCausalLM, OpenLlamaForSequenceClassification,
    OPTModel, OPTForCausalLM, OPTForSequenceClassification, OPTForQuestionAnswering,
)}
CAUSAL_LM_FOR_MODEL_TYPE = {"llama": LlamaForCausalLM, "open-llama": OpenLlamaForCausalLM, "opt": OPTForCausalLM}


BACKENDS = ("numpy", "numba", "cuda")
ACCEL = "refimpl_accel"  # the fast backends: the accel/ folder of this repository, installed under this name


def accel_package(backend: str = "numba"):
    """The seam between refimpl and its fast backends: the one place refimpl imports accel (load, and the CLI's
    inspect / bench / compile notice through accel's public functions). accel imports refimpl, never the reverse at
    import time: `import refimpl` needs NumPy alone (tests/test_import.py holds both rules over the import graph)."""
    import importlib

    try:
        return importlib.import_module(ACCEL)
    except ImportError as exc:  # accel's own dependencies are extras
        raise ConfigError(f"backend={backend!r} needs the accel package and its extras "
                          f"(pip install 'refimpl[accel]'): {exc}") from None


def load(path: str | os.PathLike, dtype: DTypeLike = np.float32, backend: str = "numpy",
         weights_dtype: str | None = None, **backend_options) -> PreTrainedModel:
    """A Hugging Face checkpoint folder (or a .gguf file) -> the model class its config names, computing in `dtype`.

    backend="numpy" is this package, the reference. "numba" and "cuda" hand the same checkpoint to accel/, whose
    models have the same call and generate API (backend_options such as weights= or threads= go there).
    weights_dtype="stored" keeps fp16 checkpoints in fp16 (half the memory); see PreTrainedModel.from_pretrained.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend != "numpy":
        if weights_dtype is not None:
            raise ConfigError("weights_dtype applies to backend='numpy'; the accel backends take weights=")
        return accel_package(backend).load(path, dtype=dtype, backend=backend, **backend_options)
    if backend_options:
        raise ConfigError(f"options {sorted(backend_options)} apply to the accel backends, not to backend='numpy'")
    config = read_model_config(path)  # config.json, or the metadata of a .gguf file
    architectures = config.architectures
    if architectures:
        cls = ARCHITECTURES.get(architectures[0])
        if cls is None:
            raise ConfigError(f"config.json architectures[0]={architectures[0]!r} is not a class refimpl implements "
                              f"({', '.join(ARCHITECTURES)})")
    else:
        cls = CAUSAL_LM_FOR_MODEL_TYPE[config.family]
    return cls.from_pretrained(path, dtype=dtype, weights_dtype=weights_dtype)


def load_tokenizer(path: str | os.PathLike, **overrides) -> Tokenizer:
    """A tokenizer folder (tokenizer.model or vocab.json + merges.txt) -> a tokenizer (see refimpl.tokenizers).

    Keyword overrides replace tokenizer_config.json values, e.g. load_tokenizer(path, legacy=False).
    """
    from .tokenizers import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path, **overrides)


__all__ = [
    "load", "load_tokenizer", "LlamaConfig", "OPTConfig", "from_hf_config", "read_config", "ModelOutput",
    "RefimplError", "ConfigError", "CheckpointError", "InputError", "TextStreamer", "TextIteratorStreamer",
    *ARCHITECTURES,
]
