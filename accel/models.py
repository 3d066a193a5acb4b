"""The accelerated classes: refimpl's classes with the decoder stack of a backend, made by one factory.

For every class of refimpl's table (refimpl.ARCHITECTURES) and every backend, `twin_classes` makes a subclass of
the refimpl class, so its call signature, argument checks, heads, losses and outputs are refimpl's own code. Three
things change: `params` is the packed tree (accel.packing), `_decoder` runs the backend's stack, and
past_key_values is an accel.kv_cache.KVCache appended in place; generate's hooks come from accel.generate.

A backend is a module (accel/cpu/forward.py, accel/cuda/forward.py) with the same names: NAME, enter(model),
llama_model, opt_model, llama_last_logits, opt_last_logits, to_host.
"""
from __future__ import annotations

import numpy as np

import refimpl
from refimpl.errors import InputError
from refimpl.outputs import ModelOutput
from refimpl.trace import NO_TRACE

from .generate import GenerationHooks
from .kv_cache import KVCache, to_host
from .packing import parameter_leaves


def no_trace(trace, backend):
    if trace is not None and trace is not NO_TRACE:
        raise InputError(f"backend={backend!r} does not record traces (its kernels are fused): load with "
                         "backend='numpy' to trace")


class AccelModel(GenerationHooks):
    """What every accelerated class adds to its refimpl class: the backend, weights format, threads, the cache."""

    engine = None  # the backend's forward module
    weights = "fp32"
    threads = None
    xp = np  # the array module of the parameters and the cache

    def new_cache(self, batch, capacity):
        """An empty KVCache with room for `capacity` positions (pass it as past_key_values)."""
        c = self.config
        heads = c.num_attention_heads if self.family == "opt" else c.num_key_value_heads
        return KVCache.allocate(c.num_hidden_layers, batch, heads, capacity, c.head_dim, self.xp)

    def weight_bytes(self):
        """Bytes of all parameters as stored (a tied embedding counted once)."""
        return sum(leaf.nbytes for leaf in parameter_leaves(self.params))

    def _decoder(self, *args, **kwargs):
        """refimpl's _decoder: (final hidden [B, S, D or E] on the host, ModelOutput)."""
        h, out = self._device_decoder(*args, **kwargs)
        return to_host(h), out

    def _output(self, cache, hidden, attentions, use_cache, output_hidden_states, output_attentions):
        """refimpl's ModelOutput: host float32 hidden states and attention maps, the KVCache as the past."""
        return ModelOutput(past_key_values=cache if use_cache else None,
                           hidden_states=tuple(map(to_host, hidden)) if output_hidden_states else None,
                           attentions=tuple(map(to_host, attentions)) if output_attentions else None)

    def __repr__(self):
        return f"accel[{self.engine.NAME}].{super().__repr__()[:-1]}, weights={self.weights})"


class LlamaTwin(AccelModel):
    def _device_decoder(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                        output_attentions, output_hidden_states, trace=None):
        no_trace(trace, self.engine.NAME)
        self.engine.enter(self)
        h, hidden, attn, cache, self.rope_state = self.engine.llama_model(
            self.params, self.config, self.rope_state, input_ids, inputs_embeds, attention_mask, position_ids,
            past_key_values, output_attentions, output_hidden_states, xp=self.xp)
        return h, self._output(cache, hidden, attn, use_cache, output_hidden_states, output_attentions)

    def _decoder_call(self, ids, mask, positions, cache, output_attentions=False, output_hidden_states=False):
        """One forward for generate: (final hidden in the backend's array module, ModelOutput with the KVCache)."""
        return self._device_decoder(ids, mask, positions, cache, None, True, output_attentions, output_hidden_states)

    def _last_logits(self, h):
        """Logits [B, V] of the last position only, host float32 (what generate needs)."""
        return self.engine.llama_last_logits(self.params, self.config, h)


class OPTTwin(AccelModel):
    def _device_decoder(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, head_mask,
                        use_cache, output_attentions, output_hidden_states, trace=None):
        no_trace(trace, self.engine.NAME)
        self.engine.enter(self)
        h, hidden, attn, cache = self.engine.opt_model(
            self.params, self.config, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values,
            head_mask, output_attentions, output_hidden_states, xp=self.xp)
        return h, self._output(cache, hidden, attn, use_cache, output_hidden_states, output_attentions)

    def _decoder_call(self, ids, mask, positions, cache, output_attentions=False, output_hidden_states=False):
        return self._device_decoder(ids, mask, positions, cache, None, None, True, output_attentions,
                                    output_hidden_states)

    def _last_logits(self, h):
        return self.engine.opt_last_logits(self.params, self.config, h)


def twin_classes(engine):
    """refimpl class -> its twin on the backend `engine`, for every class of refimpl.ARCHITECTURES."""
    twins = {}
    for ref_cls in refimpl.ARCHITECTURES.values():
        mixin = OPTTwin if ref_cls.family == "opt" else LlamaTwin
        twins[ref_cls] = type(ref_cls.__name__, (mixin, ref_cls), {
            "__doc__": f"refimpl.{ref_cls.__name__} on the {engine.NAME} backend.",
            "__module__": engine.__name__, "__qualname__": ref_cls.__name__, "engine": engine})
    return twins
