"""OPT, from token ids to logits (modeling_opt.py of transformers 4.46.3).

NumPy only, eager attention. Learned positions read from the attention mask with an offset of 2; pre-LayerNorm
for most sizes, post-LayerNorm for 350m (which also projects embeddings in and out). Shapes: B batch, S new tokens,
T cached, K = T + S keys, D hidden, E word_embed_proj_dim, H heads, Dh head dim, F ffn_dim, V vocab.

Per layer:  pre-LN:  x = x + Attn(LN1(x));  x = x + FFN(LN2(x))
           post-LN:  x = LN1(x + Attn(x));  x = LN2(x + FFN(x))
"""
from __future__ import annotations

import numpy as np

from .heads import causal_lm_loss, pool_index, problem_type_for, question_answering_loss, sequence_classification_loss
from .inputs import (attention_mask_2d, check_trace, head_mask_2d, learned_positions, past_cache, per_row_integers,
                     position_ids_2d, sequence_labels, token_inputs)
from .ops import ACTIVATIONS, causal_mask, layer_norm, linear, mask_min, softmax
from .outputs import ModelOutput
from .pretrained import PreTrainedModel
from .trace import NO_TRACE
from .weights import take

POSITION_OFFSET = 2  # OPT's position table has 2 extra rows in front (OPTLearnedPositionalEmbedding)


def attention(layer, cfg, x, mask, past_kv, layer_head_mask, trace=NO_TRACE):
    """Multi-head self-attention. x [B, S, D] -> ([B, S, D], probs [B, H, S, K], (k, v))."""
    B, S, _ = x.shape
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    q = linear(x, layer["q_proj"], layer.get("q_proj_bias")) * Dh ** -0.5  # q is scaled after its bias
    k = linear(x, layer["k_proj"], layer.get("k_proj_bias"))  # [B, S, D]
    v = linear(x, layer["v_proj"], layer.get("v_proj_bias"))
    q = q.reshape(B, S, H, Dh).transpose(0, 2, 1, 3)  # -> [B, H, S, Dh]
    k = k.reshape(B, S, H, Dh).transpose(0, 2, 1, 3)
    v = v.reshape(B, S, H, Dh).transpose(0, 2, 1, 3)
    trace("q", q)
    trace("k", k)
    trace("v", v)
    if past_kv is not None:
        k = np.concatenate([past_kv[0], k], axis=2)  # -> [B, H, K, Dh]
        v = np.concatenate([past_kv[1], v], axis=2)
    scores = q @ k.transpose(0, 1, 3, 2) + mask  # [B, H, S, K]
    scores = np.maximum(scores, mask_min(scores.dtype))  # modeling_opt.py:200-203
    trace("scores", scores)
    probs = softmax(scores)
    if layer_head_mask is not None:
        probs = probs * layer_head_mask[None, :, None, None]  # head_mask scales each head's probabilities
    trace("probs", probs)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, S, H * Dh)  # [B, H, S, Dh] -> [B, S, D]
    trace("context", out)
    out = linear(out, layer["out_proj"], layer.get("out_proj_bias"))
    trace("out", out)
    return out, probs, (k, v)


def decoder_layer(layer, cfg, x, mask, past_kv, layer_head_mask, trace=NO_TRACE):
    """One OPTDecoderLayer (modeling_opt.py:523-574); do_layer_norm_before picks pre- or post-LN."""
    pre = cfg.do_layer_norm_before
    ln1 = (layer.get("self_attn_layer_norm"), layer.get("self_attn_layer_norm_bias"))
    ln2 = (layer.get("final_layer_norm"), layer.get("final_layer_norm_bias"))
    trace("in", x)
    h = layer_norm(x, *ln1) if pre else x
    trace("attn_in", h)
    attn_out, probs, new_kv = attention(layer, cfg, h, mask, past_kv, layer_head_mask, trace.scope("attn"))
    x = x + attn_out
    trace("attn_residual", x)
    if not pre:
        x = layer_norm(x, *ln1)  # 350m applies the LayerNorm after the residual
        trace("self_attn_layer_norm", x)
    h = layer_norm(x, *ln2) if pre else x
    trace("ffn_in", h)
    h = linear(h, layer["fc1"], layer.get("fc1_bias"))  # [B, S, D] -> [B, S, F]
    trace("fc1", h)
    h = ACTIVATIONS[cfg.activation_function](h)
    trace("act", h)
    h = linear(h, layer["fc2"], layer.get("fc2_bias"))  # [B, S, F] -> [B, S, D]
    trace("fc2", h)
    x = x + h
    if not pre:
        x = layer_norm(x, *ln2)
        trace("final_layer_norm", x)
    trace("out", x)
    return x, probs, new_kv


def has_final_layer_norm(cfg):
    """Pre-LN models end with a LayerNorm unless _remove_final_layer_norm (modeling_opt.py:717-722)."""
    return cfg.do_layer_norm_before and not cfg.remove_final_layer_norm


def positions_from_mask(mask2d, past):
    """OPT positions: cumsum(mask) * mask - 1, so real tokens count 0, 1, ... and pads get -1 (modeling_opt.py:875-881)."""
    positions = np.cumsum(mask2d, axis=1) * mask2d - 1  # [B, K]
    return positions[:, past:]  # [B, S]


def checked_position_ids(cfg, table_rows, mask2d, position_ids, T, B, S):
    """Position ids [B or 1, S]: counted from the mask, or given (-1, a pad's, reads row 1); each + POSITION_OFFSET
    must be a row of the learned table of `table_rows` rows (OPTLearnedPositionalEmbedding, modeling_opt.py:67-92)."""
    if position_ids is None:
        position_ids = positions_from_mask(mask2d, T)
    else:
        position_ids = position_ids_2d(position_ids, B, S, non_negative=False)
    learned_positions(position_ids, POSITION_OFFSET, table_rows, cfg.max_position_embeddings)
    return position_ids


def opt_model(params, cfg, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
              past_key_values=None, head_mask=None, dtype=np.float32, trace=NO_TRACE):
    """The decoder stack (OPTDecoder.forward). Returns (final hidden, hidden states (L+1), attentions, cache)."""
    check_trace(trace)
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.word_embed_proj_dim, dtype)
    past_key_values, T = past_cache(past_key_values, cfg.num_hidden_layers, B, cfg.num_attention_heads, cfg.head_dim,
                                    dtype)  # checked, in the compute dtype
    mask2d = attention_mask_2d(attention_mask, B, T + S)  # None -> all ones: pads then count as tokens
    x = params["embed_tokens"][ids].astype(dtype, copy=False) if ids is not None else embeds  # [B, S, E]
    trace("embed", x)
    position_ids = checked_position_ids(cfg, params["embed_positions"].shape[0], mask2d, position_ids, T, B, S)
    trace("position_ids", position_ids)
    pos_embeds = params["embed_positions"][position_ids + POSITION_OFFSET].astype(dtype, copy=False)  # [B, S, D]
    trace("pos_embed", pos_embeds)
    if "project_in" in params:
        x = linear(x, params["project_in"])  # [B, S, E] -> [B, S, D]
        trace("project_in", x)
    x = x + pos_embeds
    mask = causal_mask(mask2d, T, dtype)  # [B, 1, S, K]
    trace("mask", mask)
    head_mask = head_mask_2d(head_mask, cfg.num_hidden_layers, cfg.num_attention_heads, dtype)  # [L, H] or None

    hidden_states, attentions, cache = [], [], []
    for i, layer in enumerate(params["layers"]):
        hidden_states.append(x)
        past_kv = past_key_values[i] if past_key_values is not None else None
        x, probs, new_kv = decoder_layer(layer, cfg, x, mask, past_kv, None if head_mask is None else head_mask[i],
                                         trace.scope(f"layers.{i}"))
        attentions.append(probs)
        cache.append(new_kv)
    if has_final_layer_norm(cfg):
        x = layer_norm(x, params.get("final_layer_norm"), params.get("final_layer_norm_bias"))
        trace("final_layer_norm", x)
    if "project_out" in params:
        x = linear(x, params["project_out"])  # [B, S, D] -> [B, S, E]
        trace("project_out", x)
    hidden_states.append(x)  # after the final LN and project_out (width E for 350m)
    return x, tuple(hidden_states), tuple(attentions), tuple(cache)


def opt_parameters(cfg, top, layers, dtype):
    """Checkpoint tensors -> the parameter tree, every shape checked against the config."""
    D, E, F, V = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.ffn_dim, cfg.vocab_size
    params = {"embed_tokens": take(top, "embed_tokens", (V, E), dtype),
              "embed_positions": take(top, "embed_positions", (cfg.max_position_embeddings + POSITION_OFFSET, D), dtype)}
    if E != D:
        params["project_in"] = take(top, "project_in", (D, E), dtype)
        params["project_out"] = take(top, "project_out", (E, D), dtype)
    affine = cfg.layer_norm_elementwise_affine
    if has_final_layer_norm(cfg) and affine:
        params["final_layer_norm"] = take(top, "final_layer_norm", (D,), dtype)
        params["final_layer_norm_bias"] = take(top, "final_layer_norm_bias", (D,), dtype)
    shapes = {"q_proj": (D, D), "k_proj": (D, D), "v_proj": (D, D), "out_proj": (D, D), "fc1": (F, D), "fc2": (D, F)}
    if cfg.enable_bias:
        shapes.update(q_proj_bias=(D,), k_proj_bias=(D,), v_proj_bias=(D,), out_proj_bias=(D,), fc1_bias=(F,),
                      fc2_bias=(D,))
    if affine:
        shapes.update(self_attn_layer_norm=(D,), self_attn_layer_norm_bias=(D,), final_layer_norm=(D,),
                      final_layer_norm_bias=(D,))
    params["layers"] = [{name: take(layer, name, shape, dtype, f"layers.{i}.") for name, shape in shapes.items()}
                        for i, layer in enumerate(layers)]
    return params


class _OPTBase(PreTrainedModel):
    family = "opt"
    model_type = "opt"

    @classmethod
    def _parameters(cls, cfg, top, layers, dtype):
        return opt_parameters(cfg, top, layers, dtype)

    def _decoder(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, head_mask,
                 use_cache, output_attentions, output_hidden_states, trace=NO_TRACE):
        h, hidden, attn, cache = opt_model(self.params, self.config, input_ids, inputs_embeds, attention_mask,
                                           position_ids, past_key_values, head_mask, self.dtype, trace)
        return h, ModelOutput(past_key_values=cache if use_cache else None,
                              hidden_states=hidden if output_hidden_states else None,
                              attentions=attn if output_attentions else None)


    def max_sequence_length(self):
        return self.config.max_position_embeddings  # the learned position table ends there


class OPTModel(_OPTBase):
    """The bare decoder: last_hidden_state [B, S, E] (after the final LayerNorm and project_out)."""

    head = "base"

    def __call__(self, input_ids=None, attention_mask=None, head_mask=None, past_key_values=None,
                 inputs_embeds=None, use_cache=False, output_attentions=False, output_hidden_states=False,
                 position_ids=None, trace=NO_TRACE) -> ModelOutput:
        h, out = self._decoder(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, head_mask,
                               use_cache, output_attentions, output_hidden_states, trace)
        out.last_hidden_state = h
        return out


class OPTForCausalLM(_OPTBase):
    """Decoder + lm_head (tied to the token embedding by default): logits [B, S, V] for every position."""

    head = "causal_lm"

    def __call__(self, input_ids=None, attention_mask=None, head_mask=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=False, output_attentions=False,
                 output_hidden_states=False, position_ids=None, trace=NO_TRACE) -> ModelOutput:
        h, out = self._decoder(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, head_mask,
                               use_cache, output_attentions, output_hidden_states, trace)
        out.logits = linear(h, self.params["lm_head"])  # [B, S, E] -> [B, S, V]
        trace("logits", out.logits)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, self._labels(labels, out.logits))
        return out


class OPTForSequenceClassification(_OPTBase):
    """Decoder + score (no bias), pooled at the token before the first pad (the last token when pad is unset)."""

    head = "seq_cls"

    def __call__(self, input_ids=None, attention_mask=None, head_mask=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=False, output_attentions=False,
                 output_hidden_states=False, position_ids=None, trace=NO_TRACE) -> ModelOutput:
        h, out = self._decoder(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, head_mask,
                               use_cache, output_attentions, output_hidden_states, trace)
        logits = linear(h, self.params["score"])  # [B, S, num_labels]
        B, S = logits.shape[:2]
        ids = None if input_ids is None else np.asarray(input_ids).reshape(B, S)
        out.logits = logits[np.arange(B), pool_index(ids, self.config.pad_token_id, B, S, self.family)]
        trace("logits", out.logits)
        if labels is not None:  # problem_type is set on the first loss and kept, as transformers mutates its config
            labels, self.problem_type = sequence_labels(labels, B, self.config.num_labels, self.problem_type,
                                                        problem_type_for)
            out.loss = sequence_classification_loss(out.logits, labels, self.config.num_labels, self.problem_type)
        return out


class OPTForQuestionAnswering(_OPTBase):
    """Decoder + qa_outputs (with bias): start_logits and end_logits [B, S]; loss averages the two cross-entropies."""

    head = "qa"

    def __call__(self, input_ids=None, attention_mask=None, head_mask=None, past_key_values=None,
                 inputs_embeds=None, start_positions=None, end_positions=None, use_cache=False,
                 output_attentions=False, output_hidden_states=False, position_ids=None, trace=NO_TRACE) -> ModelOutput:
        h, out = self._decoder(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, head_mask,
                               use_cache, output_attentions, output_hidden_states, trace)
        logits = linear(h, self.params["qa_outputs"], self.params["qa_outputs_bias"])  # [B, S, 2]
        trace("logits", logits)
        out.start_logits, out.end_logits = logits[..., 0], logits[..., 1]
        if start_positions is not None and end_positions is not None:  # one alone: no loss, as in transformers
            B = logits.shape[0]
            out.loss = question_answering_loss(out.start_logits, out.end_logits,
                                               per_row_integers(start_positions, "start_positions", B),
                                               per_row_integers(end_positions, "end_positions", B))
        return out
