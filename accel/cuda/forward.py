"""backend="cuda": the decoder stacks composed from accel.cuda's kernels and an array module `xp`.

The functions here are written against `xp` (CuPy on a GPU, NumPy in tests) and the kernel launchers, which take
either (CuPy arrays on a device; NumPy arrays under NUMBA_ENABLE_CUDASIM=1). So tests/test_cuda_model.py runs this
exact code on the golden checkpoints without a GPU (`build(path, weights, numpy)`), and tests/test_cuda_device.py
runs it on one (`refimpl.load(path, backend="cuda")`).

  weights     the packed host tree (accel.packing, the numba backend's) uploaded once (`upload`): each Weight a
              DeviceWeight, norms, biases and OPT's position table float32 on the device, the small heads (score,
              qa_outputs) float32 on the host, where refimpl's head code runs on the host final hidden state;
  kernels     rms_norm, layer_norm (OPT, Open-Llama's embedding norm), apply_rotary_ (q and k heads of the fused
              qkv row, in place), attention_decode, gated_act (Llama's act(gate) * up), activation (OPT's act(fc1));
  cache       past_key_values is an accel.kv_cache.KVCache over a device buffer [L, 2, B, Hkv, C, Dh];
  outputs     host NumPy float32 (accel.models converts): logits, hidden states, attention maps; generate brings
              only the last position's logits (computed on the device) to the host for the processors and sampler.
RoPE tables are refimpl's (refimpl.llama.rotary_tables, every rope_type), computed on the host per call and copied
over. Shapes: B batch, S new tokens, M = B*S rows, T cached, K = T + S keys, D hidden, E OPT's word_embed_proj_dim,
H heads, Hkv kv heads, NH = H + 2 Hkv, Dh head dim, F intermediate, V vocab, C cache capacity.
"""
from __future__ import annotations

import sys

import numpy as np

from refimpl import ConfigError
from refimpl import llama as ref_llama
from refimpl import opt as ref_opt
from refimpl.inputs import attention_mask_2d, head_mask_2d, position_ids_2d, token_inputs

from ..formats import activation_code, check_format
from ..kv_cache import KVCache, storage_for, to_host
from ..models import twin_classes
from ..packing import HEAD_ARRAYS, iter_packed
from ..plan import attention_plan
from . import ops
from .attention import attention
from .linear import DeviceWeight, linear, upload_array
from .ops import MAX_HEAD_DIM

NAME = "cuda"
F32 = np.float32


def layer_norm(x, weight, bias, xp):
    """LayerNorm of x [M, D] into a new array (weight / bias are ones / zeros when not affine).
    twin: refimpl.ops.layer_norm (eps 1e-5)"""
    return ops.layer_norm(x, weight, bias, 1e-5, xp.empty_like(x))


class _Recorded:
    """What one forward collects: hidden states (device copies) and attention maps when asked for."""

    def __init__(self, want_hidden, want_attentions):
        self.want_hidden, self.want_attentions = want_hidden, want_attentions
        self.hidden, self.attentions = [], []

    def layer_input(self, x, shape):
        if self.want_hidden:
            self.hidden.append(x.reshape(shape).copy())

    def probs(self, probs):
        if self.want_attentions:
            self.attentions.append(probs)


# --- uploading the packed tree ------------------------------------------------------------------------------------

def upload(entries, cfg, xp):
    """accel.packing.iter_packed's entries, packed on the host one layer at a time -> the device tree: Weights as
    DeviceWeights (a tied one once), other arrays float32 on the device, the small heads kept on the host; OPT's
    LayerNorms without elementwise affine get ones / zeros (exact: y * 1 + 0), which the kernel takes."""
    def device(leaf):
        return DeviceWeight.from_host(leaf, xp) if hasattr(leaf, "format") else upload_array(xp, leaf)

    top = {}  # ties are between top-level matrices (embed_tokens, lm_head): the same host leaf, one upload
    out = {"layers": [{} for _ in range(cfg.num_hidden_layers)]}
    for name, leaf in entries:
        if name in HEAD_ARRAYS:
            out[name] = np.array(leaf, dtype=F32)  # refimpl's heads run on the host final hidden state
        elif name.startswith("layers."):  # uploaded and let go: the host holds one layer at a time
            _, i, key = name.split(".", 2)
            out["layers"][int(i)][key] = device(leaf)
        else:
            if id(leaf) not in top:  # the host leaf stays referenced here, so its id stays unique
                top[id(leaf)] = (leaf, device(leaf))
            out[name] = top[id(leaf)][1]
    if cfg.family == "opt":
        ones, zeros = xp.ones(cfg.hidden_size, F32), xp.zeros(cfg.hidden_size, F32)
        for layer in out["layers"]:
            for name in ("self_attn_layer_norm", "final_layer_norm"):
                layer.setdefault(name, ones)
                layer.setdefault(name + "_bias", zeros)
        if ref_opt.has_final_layer_norm(cfg):
            out.setdefault("final_layer_norm", ones)
            out.setdefault("final_layer_norm_bias", zeros)
    return out


# --- Llama and Open-Llama -----------------------------------------------------------------------------------------

def llama_embed(dparams, cfg, ids, embeds, xp):
    """The first hidden state [M, D] (a new device array): token rows, Open-Llama's embedding LayerNorm on token
    ids only, or the given inputs_embeds.  twin: the embedding lines of refimpl.llama.llama_model"""
    if ids is None:
        return upload_array(xp, embeds.reshape(-1, embeds.shape[-1]))
    x = xp.ascontiguousarray(dparams["embed_tokens"].rows(xp.asarray(ids.reshape(-1))), dtype=F32)
    if cfg.use_stable_embedding:
        x = layer_norm(x, dparams["embed_layer_norm"], dparams["embed_layer_norm_bias"], xp)
    return x


def llama_model(dparams, cfg, rope_state, input_ids=None, inputs_embeds=None, attention_mask=None,
                position_ids=None, past_key_values=None, want_attentions=False, want_hidden=False, xp=np):
    """The decoder stack on the device, refimpl.llama.llama_model's steps (decoder_layer, attention, mlp).

    Returns (final hidden [B, S, D] on the device, hidden states, attentions (device arrays), KVCache,
    new RoPE state). The argument checks are refimpl's (refimpl.inputs, rotary_tables), made before any kernel runs.
    """
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.hidden_size, F32)
    H, Hkv, Dh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    storage, T = storage_for(past_key_values, cfg.num_hidden_layers, B, Hkv, Dh, S, xp)
    mask2d = attention_mask_2d(attention_mask, B, T + S)
    position_ids = np.arange(T, T + S)[None] if position_ids is None else position_ids_2d(position_ids, B, S)
    cos, sin, rope_state = ref_llama.rotary_tables(cfg, rope_state, position_ids, T + S, F32)  # [B or 1, S, Dh]
    cos, sin = upload_array(xp, cos), upload_array(xp, sin)
    x = llama_embed(dparams, cfg, ids, embeds, xp)  # [M, D], our own copy: residuals add into it
    plan = attention_plan(mask2d, T, S, want_attentions, xp)
    divisor = F32(np.sqrt(F32(Dh)))  # scores are divided by sqrt(Dh) after the product
    clamp = cfg.family == "open-llama"
    tp = cfg.pretraining_tp > 1  # refimpl's linear_tp path adds no o_proj / down_proj bias
    eps, act = float(cfg.rms_norm_eps), activation_code(cfg.hidden_act, NAME)
    h = xp.empty((B * S, D), F32)
    gated = xp.empty((B * S, cfg.intermediate_size), F32)
    recorded = _Recorded(want_hidden, want_attentions)
    for i, layer in enumerate(dparams["layers"]):
        recorded.layer_input(x, (B, S, D))
        ops.rms_norm(x, layer["input_layernorm"], eps, h)
        qkv4 = xp.ascontiguousarray(linear(h, layer["qkv"], layer.get("qkv_bias"))).reshape(B, S, H + 2 * Hkv, Dh)
        ops.apply_rotary_(qkv4, H + Hkv, cos, sin)  # q and k heads, in place
        context, probs = attention(qkv4, H, Hkv, storage, i, T, plan, divisor, clamp, xp)
        recorded.probs(probs)
        linear(context, layer["o_proj"], None if tp else layer.get("o_proj_bias"), out=x, add=True)  # x += o(ctx)
        ops.rms_norm(x, layer["post_attention_layernorm"], eps, h)
        ops.gated_act(xp.ascontiguousarray(linear(h, layer["gate_up"], layer.get("gate_up_bias"))), act, gated)
        linear(gated, layer["down_proj"], None if tp else layer.get("down_proj_bias"), out=x, add=True)
    storage.filled = T + S
    x = ops.rms_norm(x, dparams["norm"], eps, xp.empty_like(x)).reshape(B, S, D)
    recorded.hidden.append(x)  # the last entry is after the final norm
    return x, tuple(recorded.hidden), tuple(recorded.attentions), KVCache(storage, T + S), rope_state


def llama_lm_weight(dparams, cfg):
    """The DeviceWeight of the logits: lm_head, or the embedding when shared; the first tp * (V // tp) rows under
    pretraining_tp (refimpl.llama.lm_logits' vocab chunks, concatenated)."""
    weight = dparams["embed_tokens"] if cfg.shared_input_output_embedding else dparams["lm_head"]
    tp = cfg.pretraining_tp
    return weight[:tp * (cfg.vocab_size // tp)] if tp > 1 else weight


# --- OPT ----------------------------------------------------------------------------------------------------------

def opt_embed(dparams, ids, embeds, positions, B, S, D, xp):
    """token rows (or inputs_embeds), project_in, + learned positions -> [M, D], a new device array.
    twin: the embedding lines of refimpl.opt.opt_model"""
    if ids is None:
        x = upload_array(xp, embeds.reshape(B * S, -1))
    else:
        x = dparams["embed_tokens"].rows(xp.asarray(ids.reshape(-1)))  # [M, E]
    if "project_in" in dparams:
        x = linear(xp.ascontiguousarray(x, dtype=F32), dparams["project_in"])  # [M, E] -> [M, D]
    pos_embeds = dparams["embed_positions"][xp.asarray(positions + ref_opt.POSITION_OFFSET)]  # [B or 1, S, D]
    return xp.ascontiguousarray(x.reshape(B, S, D) + pos_embeds, dtype=F32).reshape(B * S, D)


def opt_model(dparams, cfg, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
              past_key_values=None, head_mask=None, want_attentions=False, want_hidden=False, xp=np):
    """The decoder stack on the device, refimpl.opt.opt_model's steps (decoder_layer, attention): learned positions
    (offset 2, from the mask), project_in / project_out, pre-LN or post-LN (do_layer_norm_before False: 350m), q
    scaled after its bias, head_mask, the final LayerNorm when refimpl.opt.has_final_layer_norm.

    Returns (final hidden [B, S, E] on the device, hidden states, attentions, KVCache).
    """
    ids, embeds, B, S = token_inputs(cfg, input_ids, inputs_embeds, cfg.word_embed_proj_dim, F32)
    H, Dh, D = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    storage, T = storage_for(past_key_values, cfg.num_hidden_layers, B, H, Dh, S, xp)
    mask2d = attention_mask_2d(attention_mask, B, T + S)
    positions = ref_opt.checked_position_ids(cfg, dparams["embed_positions"].shape[0], mask2d, position_ids, T, B, S)
    head_mask = head_mask_2d(head_mask, cfg.num_hidden_layers, H, F32)  # [L, H] or None, refimpl's checks
    head_mask = None if head_mask is None else upload_array(xp, head_mask)
    x = opt_embed(dparams, ids, embeds, positions, B, S, D, xp)  # [M, D]
    plan = attention_plan(mask2d, T, S, want_attentions or head_mask is not None, xp)
    pre, act = cfg.do_layer_norm_before, activation_code(cfg.activation_function, NAME)
    q_scale = F32(Dh ** -0.5)
    ffn = xp.empty((B * S, cfg.ffn_dim), F32)
    recorded = _Recorded(want_hidden, want_attentions)
    for i, layer in enumerate(dparams["layers"]):
        recorded.layer_input(x, (B, S, D))
        ln1 = (layer["self_attn_layer_norm"], layer["self_attn_layer_norm_bias"], xp)
        ln2 = (layer["final_layer_norm"], layer["final_layer_norm_bias"], xp)
        h = layer_norm(x, *ln1) if pre else x
        qkv = xp.ascontiguousarray(linear(h, layer["qkv"], layer.get("qkv_bias")))  # [M, 3D]
        qkv[:, :D] *= q_scale  # q is scaled after its bias
        context, probs = attention(qkv.reshape(B, S, 3 * H, Dh), H, H, storage, i, T, plan, F32(1.0), True, xp,
                                   None if head_mask is None else head_mask[i])
        recorded.probs(probs)
        linear(context, layer["out_proj"], layer.get("out_proj_bias"), out=x, add=True)  # x += out_proj(ctx)
        if not pre:
            x = layer_norm(x, *ln1)  # 350m: LayerNorm after the residual
        h = layer_norm(x, *ln2) if pre else x
        ops.activation(xp.ascontiguousarray(linear(h, layer["fc1"], layer.get("fc1_bias"))), act, ffn)
        linear(ffn, layer["fc2"], layer.get("fc2_bias"), out=x, add=True)  # x += fc2(act(fc1(h)))
        if not pre:
            x = layer_norm(x, *ln2)
    storage.filled = T + S
    if ref_opt.has_final_layer_norm(cfg):
        x = layer_norm(x, dparams["final_layer_norm"], dparams["final_layer_norm_bias"], xp)
    if "project_out" in dparams:
        x = linear(x, dparams["project_out"])  # [M, D] -> [M, E]
    x = x.reshape(B, S, -1)
    recorded.hidden.append(x)  # after the final LN and project_out
    return x, tuple(recorded.hidden), tuple(recorded.attentions), KVCache(storage, T + S)


# --- what the model classes call (accel.models): the same five names in accel/cpu/forward.py ----------------------

def enter(model):
    """Nothing to set per call (threads are the numba backend's)."""


def llama_last_logits(params, cfg, h):
    """Logits [B, V] of the last position, computed on the device, as host float32 (what generate needs)."""
    return to_host(linear(h[:, -1].copy(), llama_lm_weight(params, cfg)))


def opt_last_logits(params, cfg, h):
    return to_host(linear(h[:, -1].copy(), params["lm_head"]))


CUDA_CLASSES = twin_classes(sys.modules[__name__])  # refimpl class -> its twin on this backend


# --- loading ------------------------------------------------------------------------------------------------------

def from_reference(reference, weights, xp):
    """A loaded refimpl model (float32) -> its CUDA twin with the parameters uploaded through `xp`."""
    check_format(weights, NAME)
    cfg = reference.config
    if cfg.head_dim > MAX_HEAD_DIM:
        raise ConfigError(f"head_dim={cfg.head_dim}: the CUDA decode kernel handles heads up to {MAX_HEAD_DIM} "
                          "(use backend='numba')")
    activation_code(cfg.activation_function if cfg.family == "opt" else cfg.hidden_act, NAME)
    family = "opt" if cfg.family == "opt" else "llama"
    params = upload(iter_packed(reference.params, family, weights), cfg, xp)  # packed and uploaded layer by layer
    model = CUDA_CLASSES[type(reference)](cfg, params, np.float32)
    model.generation_config = reference.generation_config
    model.problem_type = reference.problem_type
    model.weights, model.xp = weights, xp
    return model


def build(path, weights="fp32", xp=np):
    """refimpl loads and checks the checkpoint (class, shapes), then the weights are uploaded through `xp`:
    cupy on a GPU (load_cuda), numpy under the CUDA simulator (the tests)."""
    import refimpl

    check_format(weights, NAME)
    return from_reference(refimpl.load(path, dtype=np.float32), weights, xp)


def load_cuda(path, dtype, weights, cache_dir=None, threads=None):
    """accel.load(backend="cuda") once accel.cuda.device.check_cuda() has said the backend is usable here."""
    if np.dtype(dtype) != np.float32:
        raise ConfigError(f"dtype={np.dtype(dtype).name}: backend='cuda' computes in float32 (float64 audit mode is "
                          "refimpl's: backend='numpy')")
    check_format(weights, NAME)
    if cache_dir is not None:
        raise ConfigError("cache_dir applies to backend='numba': backend='cuda' converts the weights as it uploads "
                          "them")
    if threads is not None:
        raise ConfigError("threads applies to backend='numba' (CPU threads), not to backend='cuda'")
    import cupy

    return build(path, weights, cupy)
