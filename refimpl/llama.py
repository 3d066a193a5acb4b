"""Llama 2 and Open-Llama, from token ids to logits (modeling_llama.py and modeling_open_llama.py of transformers 4.46.3).

This is the reference: NumPy only, eager attention, one function per step. Open-Llama's few differences are marked
where they happen ("Open-Llama:"). Shapes: B batch, S new tokens, T cached tokens, K = T + S keys, D hidden,
H heads, Hkv key/value heads, Dh head dim, F intermediate size, V vocab.

Per layer (pre-norm):  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x));  after the last layer x = RMSNorm(x).
"""
from __future__ import annotations

import math

import numpy as np

from . import rope
from .heads import causal_lm_loss, pool_index, problem_type_for, sequence_classification_loss
from .inputs import attention_mask_2d, check_trace, past_cache, position_ids_2d, sequence_labels, token_inputs
from .ops import ACTIVATIONS, apply_rotary, causal_mask, layer_norm, linear, mask_min, repeat_kv, rms_norm, softmax
from .errors import InputError
from .outputs import ModelOutput
from .pretrained import PreTrainedModel
from .trace import NO_TRACE
from .weights import take


def linear_tp(x, weight, tp):
    """sum_i x_i W_i^T over tp slices of the input features: pretraining_tp's chunked sum (modeling_llama.py:387-390)."""
    if tp == 1:
        return linear(x, weight)
    n = weight.shape[1] // tp
    parts = [linear(xi, weight[:, i * n:(i + 1) * n]) for i, xi in enumerate(np.split(x, tp, axis=-1))]
    y = parts[0]
    for part in parts[1:]:
        y = y + part  # summed in order, as Python's sum() does in transformers
    return y


def attention(layer, cfg, x, cos, sin, mask, past_kv, trace=NO_TRACE):
    """Multi-head (grouped-query) self-attention with RoPE. x [B, S, D] -> ([B, S, D], probs [B, H, S, K], (k, v))."""
    B, S, _ = x.shape
    H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = linear(x, layer["q_proj"], layer.get("q_proj_bias"))  # [B, S, D] -> [B, S, H*Dh]
    k = linear(x, layer["k_proj"], layer.get("k_proj_bias"))  # [B, S, D] -> [B, S, Hkv*Dh]
    v = linear(x, layer["v_proj"], layer.get("v_proj_bias"))
    q = q.reshape(B, S, H, Dh).transpose(0, 2, 1, 3)  # -> [B, H, S, Dh]
    k = k.reshape(B, S, Hkv, Dh).transpose(0, 2, 1, 3)  # -> [B, Hkv, S, Dh]
    v = v.reshape(B, S, Hkv, Dh).transpose(0, 2, 1, 3)
    trace("q", q)
    trace("k", k)
    trace("v", v)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    trace("q_rope", q)
    trace("k_rope", k)
    if past_kv is not None:  # the cache holds keys after RoPE, before repeat_kv
        k = np.concatenate([past_kv[0], k], axis=2)  # -> [B, Hkv, K, Dh]
        v = np.concatenate([past_kv[1], v], axis=2)
    new_kv = (k, v)
    k = repeat_kv(k, H // Hkv)  # -> [B, H, K, Dh]
    v = repeat_kv(v, H // Hkv)
    trace("k_repeat", k)
    trace("v_repeat", v)
    scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(Dh)  # [B, H, S, K]; divided after the product
    scores = scores + mask
    if cfg.family == "open-llama":
        scores = np.maximum(scores, mask_min(scores.dtype))  # Open-Llama clamps (modeling_open_llama.py:310-313)
    trace("scores", scores)
    probs = softmax(scores)  # [B, H, S, K]
    trace("probs", probs)
    out = probs @ v  # [B, H, S, Dh]
    out = out.transpose(0, 2, 1, 3).reshape(B, S, H * Dh)  # -> [B, S, H*Dh]
    trace("context", out)
    if cfg.pretraining_tp > 1:
        out = linear_tp(out, layer["o_proj"], cfg.pretraining_tp)
    else:
        out = linear(out, layer["o_proj"], layer.get("o_proj_bias"))  # -> [B, S, D]
    trace("out", out)
    return out, probs, new_kv


def mlp(layer, cfg, x, trace=NO_TRACE):
    """down(act(gate(x)) * up(x)): the gated MLP. [B, S, D] -> [B, S, F] -> [B, S, D]."""
    act = ACTIVATIONS[cfg.hidden_act]
    gate = linear(x, layer["gate_proj"], layer.get("gate_proj_bias"))
    up = linear(x, layer["up_proj"], layer.get("up_proj_bias"))
    trace("gate", gate)
    trace("up", up)
    h = act(gate) * up  # [B, S, F]
    trace("act", h)
    if cfg.pretraining_tp > 1:
        down = linear_tp(h, layer["down_proj"], cfg.pretraining_tp)
    else:
        down = linear(h, layer["down_proj"], layer.get("down_proj_bias"))
    trace("down", down)
    return down


def decoder_layer(layer, cfg, x, cos, sin, mask, past_kv, trace=NO_TRACE):
    """x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)) (LlamaDecoderLayer, modeling_llama.py:671-693)."""
    trace("in", x)
    h = rms_norm(x, layer["input_layernorm"], cfg.rms_norm_eps)
    trace("input_norm", h)
    attn_out, probs, new_kv = attention(layer, cfg, h, cos, sin, mask, past_kv, trace.scope("attn"))
    x = x + attn_out
    trace("attn_residual", x)
    h = rms_norm(x, layer["post_attention_layernorm"], cfg.rms_norm_eps)
    trace("post_attn_norm", h)
    x = x + mlp(layer, cfg, h, trace.scope("mlp"))
    trace("out", x)
    return x, probs, new_kv


def rotary_tables(cfg, rope_state, position_ids, kv_length, dtype):
    """cos, sin [B or 1, S, Dh] and the next RoPE state, per family."""
    if cfg.family == "open-llama":
        # Open-Llama slices its cos/sin table to K rows and gathers by position: larger positions fail there
        if np.max(position_ids) >= kv_length:
            raise InputError(f"position_ids holds {int(np.max(position_ids))}, but Open-Llama's rotary table has "
                             f"only past + new = {kv_length} rows (transformers raises IndexError)")
        rope_state = rope.open_llama_dynamic_update(rope_state, cfg, kv_length, dtype)
        cos, sin = rope.open_llama_cos_sin(rope_state, cfg, position_ids, dtype)
    else:
        rope_state = rope.llama_dynamic_update(rope_state, cfg, position_ids, dtype)
        cos, sin = rope.llama_cos_sin(rope_state, position_ids, dtype)
    return cos, sin, rope_state


def llama_model(params, cfg, rope_state, input_ids=None, inputs_embeds=None, attention_mask=None,
                position_ids=None, past_key_values=None, dtype=np.float32, trace=NO_TRACE):
    """The decoder stack (LlamaModel.forward, modeling_llama.py:861-981).

    Returns (final hidden [B, S, D], hidden states (L+1), attentions (L), new cache (L pairs), new RoPE state).
    """
    check_trace(trace)
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.hidden_size, dtype)
    past_key_values, T = past_cache(past_key_values, cfg.num_hidden_layers, B, cfg.num_key_value_heads, cfg.head_dim,
                                    dtype)  # checked, in the compute dtype
    if ids is not None:
        x = params["embed_tokens"][ids].astype(dtype, copy=False)  # [B, S] -> [B, S, D] (weights may be fp16)
        trace("embed_tokens", x)
        if cfg.use_stable_embedding:  # Open-Llama: LayerNorm (eps 1e-5) on token embeddings, not on inputs_embeds
            x = layer_norm(x, params["embed_layer_norm"], params["embed_layer_norm_bias"], eps=1e-5)
    else:
        x = embeds
    trace("embed", x)
    mask = causal_mask(attention_mask_2d(attention_mask, B, T + S), T, dtype)  # [B, 1, S, K]
    trace("mask", mask)
    if position_ids is None:
        position_ids = np.arange(T, T + S)[None]  # [1, S]: positions never come from the mask here
    else:
        position_ids = position_ids_2d(position_ids, B, S)
    trace("position_ids", position_ids)
    cos, sin, rope_state = rotary_tables(cfg, rope_state, position_ids, T + S, dtype)
    trace("rope.cos", cos)
    trace("rope.sin", sin)

    hidden_states, attentions, cache = [], [], []
    for i, layer in enumerate(params["layers"]):
        hidden_states.append(x)
        past_kv = past_key_values[i] if past_key_values is not None else None
        x, probs, new_kv = decoder_layer(layer, cfg, x, cos, sin, mask, past_kv, trace.scope(f"layers.{i}"))
        attentions.append(probs)
        cache.append(new_kv)
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    trace("final_norm", x)
    hidden_states.append(x)  # the last entry is after the final norm
    return x, tuple(hidden_states), tuple(attentions), tuple(cache), rope_state


def lm_logits(params, cfg, h, num_logits_to_keep=0):
    """logits = h W^T with W = lm_head, or the token embedding when shared or tied. [B, S, D] -> [B, S, V]."""
    weight = params["embed_tokens"] if cfg.shared_input_output_embedding else params["lm_head"]
    if cfg.pretraining_tp > 1:
        # transformers splits the vocab into chunks of V // tp rows and uses tp of them: V % tp columns are dropped
        # and num_logits_to_keep is ignored (modeling_llama.py:1204-1207)
        rows = cfg.vocab_size // cfg.pretraining_tp
        return np.concatenate([linear(h, weight[i * rows:(i + 1) * rows]) for i in range(cfg.pretraining_tp)], -1)
    if num_logits_to_keep:
        h = h[:, -num_logits_to_keep:]
    return linear(h, weight)


def llama_parameters(cfg, top, layers, dtype):
    """Checkpoint tensors -> the parameter tree, every shape checked against the config."""
    D, V, F = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    Hq, Hkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    params = {"embed_tokens": take(top, "embed_tokens", (V, D), dtype)}
    if cfg.use_stable_embedding:
        params["embed_layer_norm"] = take(top, "embed_layer_norm", (D,), dtype)
        params["embed_layer_norm_bias"] = take(top, "embed_layer_norm_bias", (D,), dtype)
    params["norm"] = take(top, "norm", (D,), dtype)
    shapes = {"input_layernorm": (D,), "q_proj": (Hq, D), "k_proj": (Hkv, D), "v_proj": (Hkv, D),
              "o_proj": (D, Hq), "post_attention_layernorm": (D,), "gate_proj": (F, D), "up_proj": (F, D),
              "down_proj": (D, F)}
    if cfg.attention_bias:
        shapes.update(q_proj_bias=(Hq,), k_proj_bias=(Hkv,), v_proj_bias=(Hkv,), o_proj_bias=(D,))
    if cfg.mlp_bias:
        shapes.update(gate_proj_bias=(F,), up_proj_bias=(F,), down_proj_bias=(D,))
    params["layers"] = [{name: take(layer, name, shape, dtype, f"layers.{i}.") for name, shape in shapes.items()}
                        for i, layer in enumerate(layers)]
    return params


class _LlamaBase(PreTrainedModel):
    family = "llama"
    model_type = "llama"

    def _init_state(self):
        if self.config.family == "open-llama":
            self.rope_state = rope.open_llama_rope_state(self.config, self.dtype)
        else:
            self.rope_state = rope.llama_rope_state(self.config, self.dtype)

    @classmethod
    def _parameters(cls, cfg, top, layers, dtype):
        return llama_parameters(cfg, top, layers, dtype)

    def _decoder(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                 output_attentions, output_hidden_states, trace=NO_TRACE):
        h, hidden, attn, cache, self.rope_state = llama_model(
            self.params, self.config, self.rope_state, input_ids, inputs_embeds, attention_mask, position_ids,
            past_key_values, self.dtype, trace)
        return h, ModelOutput(past_key_values=cache if use_cache else None,
                              hidden_states=hidden if output_hidden_states else None,
                              attentions=attn if output_attentions else None)


class LlamaModel(_LlamaBase):
    """The bare decoder: last_hidden_state [B, S, D] (after the final RMSNorm)."""

    head = "base"

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, use_cache=False, output_attentions=False, output_hidden_states=False,
                 trace=NO_TRACE) -> ModelOutput:
        h, out = self._decoder(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                               output_attentions, output_hidden_states, trace)
        out.last_hidden_state = h
        return out


class LlamaForCausalLM(_LlamaBase):
    """Decoder + lm_head: logits [B, S, V]; loss is the shifted next-token cross-entropy when labels are given."""

    head = "causal_lm"

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=False, output_attentions=False,
                 output_hidden_states=False, num_logits_to_keep=0, trace=NO_TRACE) -> ModelOutput:
        if not isinstance(num_logits_to_keep, int) or num_logits_to_keep < 0:
            raise InputError(f"num_logits_to_keep={num_logits_to_keep!r} must be an integer >= 0")
        h, out = self._decoder(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                               output_attentions, output_hidden_states, trace)
        out.logits = lm_logits(self.params, self.config, h, num_logits_to_keep)
        trace("logits", out.logits)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, self._labels(labels, out.logits))
        return out


    def generation_forward_kwargs(self):
        # transformers' generate asks Llama for the last position's logits only (generation/utils.py:2066)
        return {"num_logits_to_keep": 1} if self.family == "llama" else {}


class LlamaForSequenceClassification(_LlamaBase):
    """Decoder + score (no bias) on every position, pooled at the token before the first pad: logits [B, num_labels]."""

    head = "seq_cls"

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=False, output_attentions=False,
                 output_hidden_states=False, trace=NO_TRACE) -> ModelOutput:
        h, out = self._decoder(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                               output_attentions, output_hidden_states, trace)
        logits = linear(h, self.params["score"])  # [B, S, D] -> [B, S, num_labels]
        B, S = logits.shape[:2]
        ids = None if input_ids is None else np.asarray(input_ids).reshape(B, S)
        index = pool_index(ids, self.config.pad_token_id, B, S, self.family)
        out.logits = logits[np.arange(B), index]  # [B, num_labels]
        trace("logits", out.logits)
        if labels is not None:  # transformers sets config.problem_type on the first loss: it persists
            labels, self.problem_type = sequence_labels(labels, B, self.config.num_labels, self.problem_type,
                                                        problem_type_for)
            out.loss = sequence_classification_loss(out.logits, labels, self.config.num_labels, self.problem_type)
        return out


class OpenLlamaModel(LlamaModel):
    """Open-Llama's bare decoder (stable embedding LayerNorm, Open-Llama RoPE tables)."""

    family = "open-llama"
    model_type = "open-llama"


class OpenLlamaForCausalLM(LlamaForCausalLM):
    """Open-Llama with its head: logits from the shared input/output embedding by default."""

    family = "open-llama"
    model_type = "open-llama"

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=False, output_attentions=False,
                 output_hidden_states=False, trace=NO_TRACE) -> ModelOutput:
        # Open-Llama has no num_logits_to_keep
        return super().__call__(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels,
                                use_cache, output_attentions, output_hidden_states, trace=trace)


class OpenLlamaForSequenceClassification(LlamaForSequenceClassification):
    """Open-Llama with a sequence-classification head (same pooling and losses as Llama)."""

    family = "open-llama"
    model_type = "open-llama"
