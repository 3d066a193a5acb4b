"""What every model class shares: loading a checkpoint folder into a parameter tree, and the head weights.

A model object holds its config, its parameters (read-only arrays, memory-mapped where possible), its compute
dtype and the two pieces of state transformers keeps on a model: the RoPE frequencies of dynamic NTK scaling and
the problem_type a sequence-classification loss picks on first use. The KV cache is never stored here: it is
passed in and returned.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

from .errors import CheckpointError, ConfigError, InputError
from .inputs import token_labels
from .stored import StoredMatrix, tile_rows
from .weights import HEADS, convert_weights, list_checkpoint, parameter_dtype, read_model_config, rename, take

if TYPE_CHECKING:  # a type hint only (refimpl.generate imports this module)
    from .generate import GenerateDecoderOnlyOutput

SUPPORTED_DTYPES = (np.float32, np.float64)


def compute_dtype(dtype):
    """np.float32 (default) or np.float64 (audit mode) as a NumPy scalar type."""
    try:
        scalar = np.dtype(dtype).type
    except TypeError:
        scalar = None
    if scalar not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype={dtype!r}: refimpl computes in float32, or float64 as an audit mode")
    return scalar


class PreTrainedModel:
    family = ""  # "llama" | "open-llama" | "opt"
    model_type = ""
    head = ""  # "base" | "causal_lm" | "seq_cls" | "qa"

    def __init__(self, config, params, dtype=np.float32):
        self.config = config
        self.params = params
        self.dtype = compute_dtype(dtype)
        self.problem_type = getattr(config, "problem_type", None)
        self.generation_config = generation_defaults_from_config(config)
        self._init_state()

    def _init_state(self):
        pass

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32, weights_dtype=None):
        """A checkpoint folder (or .gguf file) -> this class, computing in `dtype`.

        weights_dtype=None (or "stored") keeps each matrix where and as the file stores it (memory-mapped fp16,
        bf16, fp32, GGUF blocks), widened to `dtype` tile by tile in each product (refimpl.stored): memory stays
        O(one tile) above the activations whatever the model's size. float16/float32/float64 converts every matrix
        at load instead (the whole model in memory).
        """
        dtype = compute_dtype(dtype)
        convert = parameter_dtype(dtype, weights_dtype)
        config = read_model_config(path)
        if config.family != cls.family:
            raise ConfigError(f"{path}: config.json model_type is {config.family!r}, not {cls.model_type!r}: "
                              f"use refimpl.load(path) or the {config.family} class")
        stored = list_checkpoint(path)  # {name: Stored}: headers only, no tensor read yet
        family = "opt" if config.family == "opt" else "llama"
        top, layers = rename(stored, family, config.num_hidden_layers)
        params = cls._parameters(config, top, layers, dtype)
        params.update(cls._head_parameters(config, top, params, dtype))
        _check_all_used(top, layers)
        if convert is not None:
            params = convert_weights(params, convert)
        model = cls(config, params, dtype)
        model.generation_config = read_generation_config(path, config)
        return model

    @classmethod
    def _head_parameters(cls, cfg, top, params, dtype):
        """lm_head / score / qa_outputs, with tying handled: a missing lm_head is the embedding when tied."""
        embed_dim = getattr(cfg, "word_embed_proj_dim", cfg.hidden_size)
        if cls.head == "causal_lm":
            if getattr(cfg, "shared_input_output_embedding", False):
                return {}  # Open-Llama: logits from embed_tokens itself, no lm_head at all
            if cfg.tie_word_embeddings:
                if "lm_head" in top:
                    lm_head = take(top, "lm_head", params["embed_tokens"].shape, dtype)
                    if not same_values(lm_head, params["embed_tokens"]):
                        raise CheckpointError("checkpoint has an lm_head.weight that differs from embed_tokens.weight, "
                                              "but config.json says tie_word_embeddings=true")
                return {"lm_head": params["embed_tokens"]}
            return {"lm_head": take(top, "lm_head", (cfg.vocab_size, embed_dim), dtype)}
        if cls.head == "seq_cls":
            return {"score": take(top, "score", (cfg.num_labels, embed_dim), dtype)}
        if cls.head == "qa":
            return {"qa_outputs": take(top, "qa_outputs", (2, embed_dim), dtype),
                    "qa_outputs_bias": take(top, "qa_outputs_bias", (2,), dtype)}
        return {}

    def generate(self, input_ids, attention_mask=None, **kwargs) -> np.ndarray | GenerateDecoderOnlyOutput:
        """Prompt ids [B, L] -> sequences [B, L + new], transformers' semantics (refimpl.generate.generate: every
        GenerationConfig field as a keyword, plus generation_config=, logits_processor=, stopping_criteria=,
        prefix_allowed_tokens_fn=, tokenizer= (for stop_strings), streamer=, seed= and rng=)."""
        if self.head != "causal_lm":
            raise InputError(f"{type(self).__name__} has no language-model head to generate with")
        from .generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def generation_forward(self, ids, mask, positions, cache, output_attentions=False, output_hidden_states=False):
        """One generate step: (logits of the last position [N, V], the forward's outputs)."""
        out = self(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                   **self.generation_forward_kwargs())
        return out.logits[:, -1], out

    def generation_cache(self, rows, prompt_length, max_length):
        """The cache generate starts from: None (the prompt forward makes one)."""
        return None

    @staticmethod
    def reorder_cache(cache, rows):
        """Beam search's gather: row i of the new cache is row rows[i] of the old (_temporary_reorder_cache)."""
        return tuple((k[rows], v[rows]) for k, v in cache)

    def max_sequence_length(self):
        """The most positions a forward may reach (OPT's learned table), or None when RoPE has no hard limit."""
        return None

    def generation_forward_kwargs(self):
        """Extra forward arguments transformers' generate passes for this class."""
        return {}

    def _labels(self, labels, logits):
        """The causal LM's labels, checked against the logits [B, S, V] they score."""
        return token_labels(labels, logits.shape)

    def __repr__(self):
        c = self.config
        return (f"{type(self).__name__}(layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"vocab={c.vocab_size}, dtype={np.dtype(self.dtype).name})")


def generation_defaults_from_config(config):
    """GenerationConfig.from_model_config: the non-None bos/eos/pad ids of config.json."""
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def read_generation_config(path, config):
    """generation_config.json when the checkpoint has one, else the defaults taken from config.json."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return generation_defaults_from_config(config)
    try:
        with open(file, encoding="utf-8") as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return values


def same_values(a, b) -> bool:
    """Two matrices of one shape (arrays or StoredMatrix) hold the same values, compared one tile at a time."""
    step = tile_rows(a.shape)
    for start in range(0, a.shape[0], step):
        stop = min(start + step, a.shape[0])
        tile = np.array(a.widen(start, stop) if isinstance(a, StoredMatrix) else a[start:stop])  # a copy: b reuses
        other = b.widen(start, stop) if isinstance(b, StoredMatrix) else b[start:stop]  # the same tile buffer
        if not np.array_equal(tile, other):
            return False
    return True


def _check_all_used(top, layers):
    """Every tensor of the checkpoint was consumed, except head weights of another class (transformers ignores those)."""
    leftovers = [name for name in top if name not in HEADS.values()]
    leftovers += [f"layers.{i}.{name}" for i, layer in enumerate(layers) for name in layer]
    if leftovers:
        raise CheckpointError(f"checkpoint tensor {leftovers[0]!r} is not used by this config "
                              f"({len(leftovers)} unused in all); config.json and the weights disagree")


