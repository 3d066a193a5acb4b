"""The accelerated models: refimpl's classes with the decoder stack recomposed from accel's kernels.

Each class here subclasses the refimpl class of the same name, so its call signature, argument checks, heads,
losses and outputs are refimpl's own code. Three things change:
  params     packed for speed: q, k, v stacked into one matrix (one product per layer), gate and up stacked (the
             activation is applied as the up projection is written), every matrix a quant.Weight in the chosen
             storage format (fp32, fp16, bf16, int8); norms, biases, position tables and small heads stay float32;
  _decoder   the stack below, in refimpl's step order (refimpl.llama.llama_model, refimpl.opt.opt_model), each
             step the twin kernel of the refimpl function it replaces; the residual adds happen in the output
             projections' epilogues;
  the cache  past_key_values is a kv_cache.KVCache: new keys and values are written into preallocated storage.
One new position per row (decoding) uses the online-softmax kernel over the cache; several (a prompt) use BLAS.
A decode forward of a few rows that records nothing per layer runs all its layers in one compiled call (accel.fused).
Shapes: B batch, S new tokens, M = B*S rows, T cached, K = T + S keys, D hidden, H heads, Hkv kv heads,
R = H / Hkv, NH = H + 2 Hkv, Dh head dim, F intermediate, V vocab.
"""
from __future__ import annotations

import numpy as np

from refimpl import llama as ref_llama
from refimpl import opt as ref_opt
from refimpl.errors import InputError
from refimpl.inputs import (attention_mask_2d, head_mask_2d, learned_positions, past_length, position_ids_2d,
                            token_inputs)
from refimpl.ops import causal_mask, linear as ref_linear
from refimpl.outputs import ModelOutput
from refimpl.trace import NO_TRACE

from . import blas, fused, jit
from .kernels_cpu import (ACT, ACT_CODES, ADD, F32_MIN, GATED, STORE, apply_rotary_, decode_step_, layer_norm,
                          _rms_norm_rows, masked_softmax_, rms_norm)
from .generate import GenerationHooks
from .kv_cache import KVCache, storage_for
from .quant import Weight, linear, linear_into, writable

F32 = np.float32


# --- attention over the cache, shared by both families ------------------------------------------------------------

def attention(qkv4, H, Hkv, storage, layer_index, T, plan, divisor, cos=None, sin=None, layer_head_mask=None):
    """Context [M, H*Dh] (and probs [B, H, S, K] on the general path) for q/k/v in the fused buffer [B, S, NH, Dh].

    RoPE (when cos is given) rotates the q and k heads in place; the new keys and values are written into the cache
    storage (refimpl concatenates them to the past). plan is ("decode", bias [B, K] or None) for one new position
    and no attention maps (one fused kernel), else ("general", mask [B, 1, S, K]) (BLAS).
    """
    B, S, _, Dh = qkv4.shape
    K = T + S
    k_cache, v_cache = storage.data[layer_index, 0], storage.data[layer_index, 1]  # [B, Hkv, C, Dh]
    if plan[0] == "decode":
        out = np.empty((B, H * Dh), F32)
        decode_step_(qkv4.reshape(B, -1, Dh), H, Hkv, cos, sin, k_cache, v_cache, T, plan[1], divisor,
                     out=out.reshape(B, H, Dh))
        return out, None
    if cos is not None:
        apply_rotary_(qkv4, H + Hkv, cos, sin)  # q and k heads, in place
    k_cache[:, :, T:K] = qkv4[:, :, H:H + Hkv].transpose(0, 2, 1, 3)  # [B, S, Hkv, Dh] -> [B, Hkv, S, Dh]
    v_cache[:, :, T:K] = qkv4[:, :, H + Hkv:].transpose(0, 2, 1, 3)
    R = H // Hkv
    q = np.ascontiguousarray(qkv4[:, :, :H].transpose(0, 2, 1, 3))  # -> [B, H, S, Dh]
    # contiguous copies [B, Hkv, K, Dh]: NumPy's matmul leaves BLAS for a stack whose stride is the capacity C
    keys, values = np.ascontiguousarray(k_cache[:, :, :K]), np.ascontiguousarray(v_cache[:, :, :K])
    # query heads of one kv head side by side: [B*Hkv, R*S, Dh] @ [B*Hkv, Dh, K], no repeat_kv copy
    G = B * Hkv
    scores = blas.matmul_batched(q.reshape(G, R * S, Dh), keys.reshape(G, K, Dh), np.empty((G, R * S, K), F32),
                                 transpose_b=True).reshape(B, H, S, K)
    probs = masked_softmax_(scores, plan[1], divisor, blas.shares_numba_threads())  # [B, H, S, K]
    if layer_head_mask is not None:
        probs = probs * layer_head_mask[None, :, None, None]  # OPT's head_mask scales each head's probabilities
    context = blas.matmul_batched(np.ascontiguousarray(probs).reshape(G, R * S, K), values.reshape(G, K, Dh),
                                  np.empty((G, R * S, Dh), F32))  # -> [B*Hkv, R*S, Dh]
    context = context.reshape(B, H, S, Dh).transpose(0, 2, 1, 3).reshape(B * S, H * Dh)  # -> [M, H*Dh]
    return context, probs


def attention_plan(mask2d, T, S, general):
    """("decode", bias) when one new position per row can use the cache kernel, else ("general", 4-D mask)."""
    if S == 1 and not general:
        if np.all(mask2d == 1):
            return "decode", None
        return "decode", np.where(mask2d == 0, F32_MIN, F32(0)).astype(F32)  # [B, K]: what causal_mask gives
    return "general", causal_mask(mask2d, T, F32)  # [B, 1, S, K]


FUSED_DECODE = True  # False: decode through the per-layer loops below too (tests compare the two)


def fused_stack(params, family, plan, rows, unfused_steps, tp=False):
    """accel.fused's per-layer lists when this forward can run its layers in one fused call (the "decode" plan,
    few rows, nothing recorded between layers: unfused_steps False), else None (the per-layer loop)."""
    if not FUSED_DECODE or plan[0] != "decode" or unfused_steps or not fused.fits(rows):
        return None
    return fused.stack_for(params, family, tp)


def decode_bias(plan, B):
    """The decode plan's mask bias [B, K], or [B, 0] for none (what kernels_cpu.decode_step_ passes)."""
    return np.zeros((B, 0), F32) if plan[1] is None else plan[1]


# --- Llama and Open-Llama -----------------------------------------------------------------------------------------

def llama_model(params, cfg, rope_state, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, want_attentions=False, want_hidden=False):
    """The decoder stack, refimpl.llama.llama_model's steps. Returns (final hidden [B, S, D], hidden states,
    attentions, KVCache, new RoPE state)."""
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.hidden_size, F32)
    L, H, Hkv, Dh, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    T = past_length(past_key_values, L, B, Hkv, Dh)
    if ids is not None:
        x = params["embed_tokens"][ids]  # [B, S] -> [B, S, D]
        if cfg.use_stable_embedding:  # Open-Llama: LayerNorm (eps 1e-5) on token embeddings only
            x = layer_norm(x, params["embed_layer_norm"], params["embed_layer_norm_bias"], eps=1e-5)
    else:
        x = embeds
    x = np.array(x, dtype=F32, order="C").reshape(B * S, D)  # [M, D], our own copy: residuals add into it
    mask2d = attention_mask_2d(attention_mask, B, T + S)
    if position_ids is None:
        position_ids = np.arange(T, T + S)[None]
    else:
        position_ids = position_ids_2d(position_ids, B, S)
    cos, sin, rope_state = ref_llama.rotary_tables(cfg, rope_state, position_ids, T + S, F32)  # [B or 1, S, Dh]
    cos, sin = np.ascontiguousarray(cos, dtype=F32), np.ascontiguousarray(sin, dtype=F32)
    storage, T = storage_for(past_key_values, L, B, Hkv, Dh, S)
    plan = attention_plan(mask2d, T, S, want_attentions)
    divisor = np.sqrt(F32(Dh))  # scores are divided by sqrt(Dh) after the product, in float32
    act = ACT_CODES[cfg.hidden_act]
    tp = cfg.pretraining_tp > 1  # refimpl's linear_tp path adds no o_proj / down_proj bias
    eps = float(cfg.rms_norm_eps)

    layers = params["layers"]
    stack = fused_stack(params, "llama", plan, B, want_hidden, tp=tp)
    if stack is not None:  # one new position per row: all layers in one compiled call
        fused.llama_decode_stack(x, stack, H, Hkv, eps, act, cos, sin, storage.data, T, decode_bias(plan, B), divisor)
        layers = []  # done: the loop below has nothing left to run
    h = np.empty((B * S, D), F32)
    qkv = np.empty((B * S, (H + 2 * Hkv) * Dh), F32)
    gated = np.empty((B * S, cfg.intermediate_size), F32)
    hidden_states, attentions = [], []
    for i, layer in enumerate(layers):
        if want_hidden:
            hidden_states.append(x.reshape(B, S, D).copy())
        _rms_norm_rows(x, layer["input_layernorm"], eps, h)  # kernels_cpu.rms_norm without its wrapper
        linear_into(h, layer["qkv"], layer.get("qkv_bias"), 0, STORE, qkv)  # [M, D] -> [M, NH*Dh]
        qkv4 = qkv.reshape(B, S, H + 2 * Hkv, Dh)
        context, probs = attention(qkv4, H, Hkv, storage, i, T, plan, divisor, cos, sin)  # RoPE, cache, attention
        attentions.append(probs)
        linear_into(context, layer["o_proj"], None if tp else layer.get("o_proj_bias"), 0, ADD, x)  # x += o(ctx)
        _rms_norm_rows(x, layer["post_attention_layernorm"], eps, h)
        linear_into(h, layer["gate_up"], layer.get("gate_up_bias"), act, GATED, gated)  # act(gate) * up [M, F]
        linear_into(gated, layer["down_proj"], None if tp else layer.get("down_proj_bias"), 0, ADD, x)  # x += down
    storage.filled = T + S
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps).reshape(B, S, D)
    hidden_states.append(x)
    return x, tuple(hidden_states), tuple(attentions), KVCache(storage, T + S), rope_state


# --- OPT ----------------------------------------------------------------------------------------------------------

def opt_positions(params, cfg, mask2d, position_ids, T, B, S):
    """Learned-position rows [B or 1, S, D], with refimpl.opt.opt_model's checks."""
    if position_ids is None:
        position_ids = ref_opt.positions_from_mask(mask2d, T)
    else:
        position_ids = position_ids_2d(position_ids, B, S, non_negative=False)
    offset = ref_opt.POSITION_OFFSET
    learned_positions(position_ids, offset, params["embed_positions"].shape[0], cfg.max_position_embeddings)
    return params["embed_positions"][position_ids + offset]


def opt_model(params, cfg, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
              past_key_values=None, head_mask=None, want_attentions=False, want_hidden=False):
    """The decoder stack, refimpl.opt.opt_model's steps (pre- and post-LN). Returns (final hidden, hidden states,
    attentions, KVCache)."""
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.word_embed_proj_dim, F32)
    L, H, Dh, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    T = past_length(past_key_values, L, B, H, Dh)
    mask2d = attention_mask_2d(attention_mask, B, T + S)
    x = params["embed_tokens"][ids] if ids is not None else embeds  # [B, S, E]
    pos_embeds = opt_positions(params, cfg, mask2d, position_ids, T, B, S)  # [B or 1, S, D]
    if "project_in" in params:
        x = linear(x, params["project_in"])  # [B, S, E] -> [B, S, D]
    x = np.ascontiguousarray(x + pos_embeds, dtype=F32).reshape(B * S, D)  # [M, D], a new array
    head_mask = head_mask_2d(head_mask, L, H, F32)  # [L, H] or None
    storage, T = storage_for(past_key_values, L, B, H, Dh, S)
    plan = attention_plan(mask2d, T, S, want_attentions or head_mask is not None)
    pre = cfg.do_layer_norm_before
    act = ACT_CODES[cfg.activation_function]
    q_scale = F32(Dh ** -0.5)

    layers = params["layers"]
    stack = fused_stack(params, "opt", plan, B, want_hidden or not pre)
    if stack is not None:  # one new position per row, pre-LN: all layers in one compiled call
        fused.opt_decode_stack(x, stack, H, q_scale, act, storage.data, T, decode_bias(plan, B))
        layers = []  # done: the loop below has nothing left to run
    qkv = np.empty((B * S, 3 * D), F32)
    ffn = np.empty((B * S, cfg.ffn_dim), F32)
    hidden_states, attentions = [], []
    for i, layer in enumerate(layers):
        if want_hidden:
            hidden_states.append(x.reshape(B, S, D).copy())
        ln1 = (layer.get("self_attn_layer_norm"), layer.get("self_attn_layer_norm_bias"))
        ln2 = (layer.get("final_layer_norm"), layer.get("final_layer_norm_bias"))
        h = layer_norm(x, *ln1) if pre else x
        linear_into(h, layer["qkv"], layer.get("qkv_bias"), 0, STORE, qkv)  # [M, D] -> [M, 3D]
        qkv[:, :D] *= q_scale  # q is scaled after its bias
        context, probs = attention(qkv.reshape(B, S, 3 * H, Dh), H, H, storage, i, T, plan, F32(1.0),
                                   layer_head_mask=None if head_mask is None else head_mask[i])
        attentions.append(probs)
        linear_into(context, layer["out_proj"], layer.get("out_proj_bias"), 0, ADD, x)  # x += out_proj(ctx)
        if not pre:
            x = layer_norm(x, *ln1)  # 350m: LayerNorm after the residual
        h = layer_norm(x, *ln2) if pre else x
        linear_into(h, layer["fc1"], layer.get("fc1_bias"), act, ACT, ffn)  # act(fc1(h)) [M, F]
        linear_into(ffn, layer["fc2"], layer.get("fc2_bias"), 0, ADD, x)  # x += fc2(...)
        if not pre:
            x = layer_norm(x, *ln2)
    storage.filled = T + S
    x = x.reshape(B, S, D)
    if ref_opt.has_final_layer_norm(cfg):
        x = layer_norm(x, params.get("final_layer_norm"), params.get("final_layer_norm_bias"))
    if "project_out" in params:
        x = linear(x, params["project_out"])  # [B, S, D] -> [B, S, E]
    hidden_states.append(x)
    return x, tuple(hidden_states), tuple(attentions), KVCache(storage, T + S)


# --- packing refimpl's parameters ---------------------------------------------------------------------------------

class _Packer:
    """float32 arrays -> Weight in one format; the same array (tied embeddings) becomes the same Weight."""

    def __init__(self, fmt):
        self.fmt = fmt
        self.done = {}

    def __call__(self, array, name):
        key = id(array)
        if key not in self.done:
            self.done[key] = (array, Weight.from_array(array, self.fmt, name))  # keep array alive: id stays unique
        return self.done[key][1]


def _stack(layer, names):
    """Matrices stacked along their rows in float32 (a StoredMatrix widens here, one layer's matrices at a time)."""
    arrays = [np.asarray(layer.pop(n), dtype=F32) for n in names]
    return np.concatenate(arrays, axis=0)


def _stack_bias(layer, names):
    if names[0] not in layer:
        return None
    return np.ascontiguousarray(np.concatenate([layer.pop(n) for n in names]), dtype=F32)


HEAD_ARRAYS = ("score", "qa_outputs", "qa_outputs_bias")  # small heads stay float32 arrays


def pack_llama(params, fmt):
    """refimpl.llama parameter tree -> accel's: qkv and gate_up stacked, matrices as Weight."""
    return dict(iter_packed(params, "llama", fmt, nested=True))


def pack_opt(params, fmt):
    """refimpl.opt parameter tree -> accel's: qkv stacked, matrices as Weight."""
    return dict(iter_packed(params, "opt", fmt, nested=True))


def iter_packed(params, family, fmt, nested=False):
    """refimpl's parameter tree -> accel's packed entries, one at a time: (name, leaf) for the top level, then each
    layer packed only when it is reached, so a caller that writes entries out (accel.convert) holds one layer.
    nested=True yields ("layers", [per-layer dicts]) at the end instead of "layers.N.name" entries."""
    pack = _Packer(fmt)
    top = _pack_llama_top if family != "opt" else _pack_opt_top
    yield from top(params, pack)
    layer_packer = _pack_llama_layer if family != "opt" else _pack_opt_layer
    layers = (layer_packer(layer, i, fmt) for i, layer in enumerate(params["layers"]))
    if nested:
        yield "layers", list(layers)
        return
    for i, layer in enumerate(layers):
        for name, leaf in layer.items():
            yield f"layers.{i}.{name}", leaf


def _pack_llama_top(params, pack):
    yield "embed_tokens", pack(params["embed_tokens"], "embed_tokens")
    yield "norm", writable(params["norm"])
    for name in ("embed_layer_norm", "embed_layer_norm_bias", *HEAD_ARRAYS):
        if name in params:
            yield name, writable(params[name])
    if "lm_head" in params:
        yield "lm_head", pack(params["lm_head"], "lm_head")  # the embedding's Weight when tied


def _pack_llama_layer(ref_layer, i, fmt):
    layer = dict(ref_layer)
    out = {"input_layernorm": writable(layer.pop("input_layernorm")),
           "post_attention_layernorm": writable(layer.pop("post_attention_layernorm")),
           "qkv_bias": _stack_bias(layer, ("q_proj_bias", "k_proj_bias", "v_proj_bias")),
           "gate_up_bias": _stack_bias(layer, ("gate_proj_bias", "up_proj_bias"))}
    out["qkv"] = Weight.from_array(_stack(layer, ("q_proj", "k_proj", "v_proj")), fmt, f"layers.{i}.qkv")
    out["gate_up"] = Weight.from_array(_stack(layer, ("gate_proj", "up_proj")), fmt, f"layers.{i}.gate_up")
    out["o_proj"] = Weight.from_array(layer.pop("o_proj"), fmt, f"layers.{i}.o_proj")
    out["down_proj"] = Weight.from_array(layer.pop("down_proj"), fmt, f"layers.{i}.down_proj")
    out.update({name: writable(a) for name, a in layer.items()})  # o_proj_bias, down_proj_bias
    return {k: v for k, v in out.items() if v is not None}


def _pack_opt_top(params, pack):
    yield "embed_tokens", pack(params["embed_tokens"], "embed_tokens")
    yield "embed_positions", writable(params["embed_positions"])
    for name in ("project_in", "project_out"):
        if name in params:
            yield name, pack(params[name], name)
    for name in ("final_layer_norm", "final_layer_norm_bias", *HEAD_ARRAYS):
        if name in params:
            yield name, writable(params[name])
    if "lm_head" in params:
        yield "lm_head", pack(params["lm_head"], "lm_head")


def _pack_opt_layer(ref_layer, i, fmt):
    layer = dict(ref_layer)
    out = {"qkv_bias": _stack_bias(layer, ("q_proj_bias", "k_proj_bias", "v_proj_bias")),
           "qkv": Weight.from_array(_stack(layer, ("q_proj", "k_proj", "v_proj")), fmt, f"layers.{i}.qkv")}
    for name in ("out_proj", "fc1", "fc2"):
        out[name] = Weight.from_array(layer.pop(name), fmt, f"layers.{i}.{name}")
    out.update({name: writable(a) for name, a in layer.items()})  # biases and LayerNorms
    return {k: v for k, v in out.items() if v is not None}


def parameter_leaves(params):
    """Every leaf of a parameter tree (dicts and lists of arrays / Weights), a shared one (tied embeddings) once."""
    seen, stack = set(), [params]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif id(node) not in seen:
            seen.add(id(node))
            yield node


# --- the classes --------------------------------------------------------------------------------------------------

def _no_trace(trace):
    if trace is not None and trace is not NO_TRACE:
        raise InputError("accel's fused kernels do not record traces: load with backend='numpy' to trace")


class AccelModel(GenerationHooks):
    """What every accelerated class adds to its refimpl class: weights format, threads, generate's hooks."""

    weights = "fp32"
    threads = None

    def _enter(self):
        threads = self.threads or jit.default_threads()
        jit.set_threads(threads)  # Numba's count is per Python thread: set it each call
        blas.set_threads(threads)  # so is MKL's (a no-op without MKL)

    def new_cache(self, batch, capacity):
        """An empty KVCache with room for `capacity` positions (pass it as past_key_values)."""
        c = self.config
        heads = c.num_attention_heads if self.family == "opt" else c.num_key_value_heads
        return KVCache.allocate(c.num_hidden_layers, batch, heads, capacity, c.head_dim)

    def weight_bytes(self):
        """Bytes of all parameters as stored (a tied embedding counted once)."""
        total = 0
        for leaf in parameter_leaves(self.params):
            total += leaf.nbytes
        return total

    def __repr__(self):
        return f"accel.{super().__repr__()[:-1]}, weights={self.weights})"


class _LlamaStack(AccelModel):
    def _decoder(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                 output_attentions, output_hidden_states, trace=None):
        _no_trace(trace)
        self._enter()
        h, hidden, attn, cache, self.rope_state = llama_model(
            self.params, self.config, self.rope_state, input_ids, inputs_embeds, attention_mask, position_ids,
            past_key_values, output_attentions, output_hidden_states)
        return h, ModelOutput(past_key_values=cache if use_cache else None,
                              hidden_states=hidden if output_hidden_states else None,
                              attentions=attn if output_attentions else None)

    def _decoder_call(self, ids, mask, positions, cache, output_attentions=False, output_hidden_states=False):
        return self._decoder(ids, mask, positions, cache, None, True, output_attentions, output_hidden_states)

    def _last_logits(self, h):
        """Logits [B, V] of the last position only (what generate needs)."""
        return ref_llama.lm_logits(self.params, self.config, h[:, -1:])[:, -1]


class _OPTStack(AccelModel):
    def _decoder(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, head_mask,
                 use_cache, output_attentions, output_hidden_states, trace=None):
        _no_trace(trace)
        self._enter()
        h, hidden, attn, cache = opt_model(self.params, self.config, input_ids, inputs_embeds, attention_mask,
                                           position_ids, past_key_values, head_mask, output_attentions,
                                           output_hidden_states)
        return h, ModelOutput(past_key_values=cache if use_cache else None,
                              hidden_states=hidden if output_hidden_states else None,
                              attentions=attn if output_attentions else None)

    def _decoder_call(self, ids, mask, positions, cache, output_attentions=False, output_hidden_states=False):
        return self._decoder(ids, mask, positions, cache, None, None, True, output_attentions, output_hidden_states)

    def _last_logits(self, h):
        return ref_linear(h[:, -1], self.params["lm_head"])  # [B, E] -> [B, V]


class LlamaModel(_LlamaStack, ref_llama.LlamaModel):
    """refimpl.LlamaModel on accel's kernels."""


class LlamaForCausalLM(_LlamaStack, ref_llama.LlamaForCausalLM):
    """refimpl.LlamaForCausalLM on accel's kernels."""


class LlamaForSequenceClassification(_LlamaStack, ref_llama.LlamaForSequenceClassification):
    """refimpl.LlamaForSequenceClassification on accel's kernels."""


class OpenLlamaModel(_LlamaStack, ref_llama.OpenLlamaModel):
    """refimpl.OpenLlamaModel on accel's kernels."""


class OpenLlamaForCausalLM(_LlamaStack, ref_llama.OpenLlamaForCausalLM):
    """refimpl.OpenLlamaForCausalLM on accel's kernels."""


class OpenLlamaForSequenceClassification(_LlamaStack, ref_llama.OpenLlamaForSequenceClassification):
    """refimpl.OpenLlamaForSequenceClassification on accel's kernels."""


class OPTModel(_OPTStack, ref_opt.OPTModel):
    """refimpl.OPTModel on accel's kernels."""


class OPTForCausalLM(_OPTStack, ref_opt.OPTForCausalLM):
    """refimpl.OPTForCausalLM on accel's kernels."""


class OPTForSequenceClassification(_OPTStack, ref_opt.OPTForSequenceClassification):
    """refimpl.OPTForSequenceClassification on accel's kernels."""


class OPTForQuestionAnswering(_OPTStack, ref_opt.OPTForQuestionAnswering):
    """refimpl.OPTForQuestionAnswering on accel's kernels."""


# refimpl class -> its accelerated twin
ACCEL_CLASSES = {cls.__bases__[1]: cls for cls in (
    LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification, OpenLlamaModel, OpenLlamaForCausalLM,
    OpenLlamaForSequenceClassification, OPTModel, OPTForCausalLM, OPTForSequenceClassification,
    OPTForQuestionAnswering)}
