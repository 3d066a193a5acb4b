#!/usr/bin/env python
"""Golden-data generator for refimpl.

This is the ONLY file in the project that imports torch / transformers.  It builds tiny,
seeded Llama / Open-Llama / OPT models with transformers 4.46.3 (eager attention, fp32,
eval, no_grad), saves them with ``save_pretrained`` under ``golden/models/<case>/`` and runs
a fixed sequence of forward calls whose inputs and outputs are stored in
``golden/cases/<case>.npz``.  See golden/README.md for the key scheme.

Usage:
    python golden/make_golden.py               # rebuild everything
    python golden/make_golden.py --case NAME   # rebuild one case (+ manifest)
    python golden/make_golden.py --check       # rebuild into a temp dir, compare with stored
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import safetensors
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    OpenLlamaConfig,
    OpenLlamaForCausalLM,
    OpenLlamaForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
    OPTForQuestionAnswering,
    OPTForSequenceClassification,
    OPTModel,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import logging as hf_logging

GOLDEN = Path(__file__).resolve().parent
ATTN = "eager"
B, S = 2, 66            # standard batch / sequence length
N_LEFT_PAD = 6          # row 1 of the standard batch is left-padded with this many pads
N_RIGHT_PAD = 4         # row 0 of the classification batches is right-padded
SHORT = 16              # length of the single unpadded `short` row
NORM_NOISE = 0.02       # added to every norm weight/bias and every Linear bias
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------------------
# Case registry
# ----------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    family: str                 # "llama" | "open_llama" | "opt"
    cls: type
    seed: int
    description: str
    config: dict                # kwargs given to the config class (also the manifest summary)
    calls: str = "causal"       # "causal" | "base" | "seqcls" | "qa"
    extras: tuple = ()          # names of extra calls, see build_calls
    embed_scale: float = 1.75   # multiply the token embedding (and an untied lm_head) by this
    labels: bool = True         # pass labels in the causal-LM `full` call


CONFIG_CLS = {"llama": LlamaConfig, "open_llama": OpenLlamaConfig, "opt": OPTConfig}

LLAMA = dict(vocab_size=192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=128, initializer_range=0.1)
OLLAMA = dict(vocab_size=192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=128, initializer_range=0.1)
OPT = dict(vocab_size=192, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
           max_position_embeddings=128, init_std=0.1, activation_function="relu",
           pad_token_id=1, bos_token_id=2, eos_token_id=2)

DYN_EXTRAS = ("full_again", "prefix_long", "step_long")
LONG_SHORT = [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5]
LONG_LONG = [1.1, 1.4, 1.9, 2.2, 2.7, 3.1, 3.6, 4.0]

CASES: list[Case] = [
    # ---------------- Llama ----------------
    Case("llama_mha", "llama", LlamaForCausalLM, 1001,
         "MHA 4 heads, silu, eps 1e-5, theta 1e4; extra calls: inputs_embeds, explicit position_ids, "
         "no attention_mask, num_logits_to_keep=1",
         {**LLAMA, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
         extras=("embeds", "positions", "no_mask", "keep1")),
    Case("llama_gqa_bias", "llama", LlamaForCausalLM, 1002,
         "GQA 8 q / 2 kv heads, head_dim 16 (heads*head_dim=128 != hidden 64), attention_bias (q,k,v,o) "
         "and mlp_bias, gelu (erf), theta 5e5",
         {**LLAMA, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8,
          "num_key_value_heads": 2, "head_dim": 16, "attention_bias": True, "mlp_bias": True,
          "hidden_act": "gelu", "rope_theta": 500000.0}),
    Case("llama_rope_linear", "llama", LlamaForCausalLM, 1003,
         "linear RoPE scaling factor 3 (inv_freq / factor)",
         {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 3.0}}),
    Case("llama_rope_dynamic", "llama", LlamaForCausalLM, 1004,
         "dynamic NTK RoPE factor 2, mpe 32: stateful grow (full/prefix/step), reset (short), regrow "
         "(full_again), cached decode past the grown length (prefix_long 80 tokens + step_long)",
         {**LLAMA, "max_position_embeddings": 32, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
         extras=DYN_EXTRAS),
    Case("llama_rope_yarn", "llama", LlamaForCausalLM, 1005,
         "YaRN factor 4, mpe 32, default beta_fast/beta_slow/attention_factor; head_dim 32",
         {**LLAMA, "hidden_size": 64, "max_position_embeddings": 32,
          "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    Case("llama_rope_yarn_attn", "llama", LlamaForCausalLM, 1006,
         "YaRN factor 4, mpe 32, explicit attention_factor 0.8, beta_fast 16, beta_slow 2; head_dim 32",
         {**LLAMA, "hidden_size": 64, "max_position_embeddings": 32,
          "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8,
                           "beta_fast": 16.0, "beta_slow": 2.0}}),
    Case("llama_rope_longrope", "llama", LlamaForCausalLM, 1007,
         "LongRoPE factor 4, mpe 64, head_dim 16 (8 short/long factors); no original_max_position_embeddings "
         "attribute -> long_factor, attention_factor sqrt(1+ln4/ln64)",
         {**LLAMA, "max_position_embeddings": 64,
          "rope_scaling": {"rope_type": "longrope", "factor": 4.0,
                           "short_factor": LONG_SHORT, "long_factor": LONG_LONG}}),
    Case("llama_rope_longrope_ompe", "llama", LlamaForCausalLM, 1008,
         "LongRoPE as llama_rope_longrope plus config attribute original_max_position_embeddings=16 "
         "(factor becomes mpe/ompe=4, attention_factor uses ln(16))",
         {**LLAMA, "max_position_embeddings": 64, "original_max_position_embeddings": 16,
          "rope_scaling": {"rope_type": "longrope", "factor": 4.0,
                           "short_factor": LONG_SHORT, "long_factor": LONG_LONG}}),
    Case("llama_rope_llama3", "llama", LlamaForCausalLM, 1009,
         "Llama-3 RoPE factor 8, low/high freq factor 1/4, original_max_position_embeddings 128, theta 5e5, "
         "head_dim 32: high/medium/low wavelength bands all populated (mpe 256 > original 128 to satisfy the validator)",
         {**LLAMA, "hidden_size": 64, "rope_theta": 500000.0, "max_position_embeddings": 256,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128}}),
    Case("llama_tp2", "llama", LlamaForCausalLM, 1010,
         "pretraining_tp=2 (chunked o_proj/down_proj sums, sliced lm_head); odd vocab 255 -> logits "
         "truncated to 254 columns; ids < 254; no labels (the loss raises: view(-1, 255) of 254 columns)",
         {**LLAMA, "vocab_size": 255, "pretraining_tp": 2}, labels=False),
    Case("llama_tied", "llama", LlamaForCausalLM, 1011,
         "tie_word_embeddings=True (lm_head.weight absent from the safetensors file)",
         {**LLAMA, "tie_word_embeddings": True}),
    Case("llama_base", "llama", LlamaModel, 1012,
         "LlamaModel base class: last_hidden_state (post final norm), hidden_states, attentions, cache",
         dict(LLAMA), calls="base"),
    Case("llama_seqcls", "llama", LlamaForSequenceClassification, 1013,
         "sequence classification, 3 labels, pad 0, 1 layer; row 0 right-padded (pools before first pad), "
         "int labels -> single_label_classification CE; embeds call (batch 1, pools index -1)",
         {**LLAMA, "num_hidden_layers": 1, "num_labels": 3, "pad_token_id": 0},
         calls="seqcls", extras=("embeds",)),
    # ---------------- Open-Llama ----------------
    Case("openllama_default", "open_llama", OpenLlamaForCausalLM, 2001,
         "defaults: stable-embedding LayerNorm (eps 1e-5, w+b) and shared input/output embedding (einsum); "
         "embeds call skips the stable LayerNorm",
         {**OLLAMA, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4},
         extras=("embeds",)),
    Case("openllama_flags_off", "open_llama", OpenLlamaForCausalLM, 2002,
         "use_stable_embedding=False, shared_input_output_embedding=False, tie_word_embeddings=False "
         "(separate lm_head)",
         {**OLLAMA, "use_stable_embedding": False, "shared_input_output_embedding": False,
          "tie_word_embeddings": False}),
    Case("openllama_rope_linear", "open_llama", OpenLlamaForCausalLM, 2003,
         "Open-Llama linear RoPE factor 3 (positions / factor, unlike Llama)",
         {**OLLAMA, "rope_scaling": {"type": "linear", "factor": 3.0}}),
    Case("openllama_rope_dynamic", "open_llama", OpenLlamaForCausalLM, 2004,
         "Open-Llama dynamic RoPE factor 2, mpe 32: per-layer state keyed on kv length, never resets",
         {**OLLAMA, "max_position_embeddings": 32, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
         extras=DYN_EXTRAS),
    Case("openllama_seqcls", "open_llama", OpenLlamaForSequenceClassification, 2005,
         "sequence classification, 3 labels, problem_type multi_label_classification (BCE), float 0/1 "
         "labels; pad 0, row 0 right-padded; 1 layer",
         {**OLLAMA, "num_hidden_layers": 1, "num_labels": 3,
          "problem_type": "multi_label_classification"},
         calls="seqcls"),
    # ---------------- OPT ----------------
    Case("opt_preln", "opt", OPTForCausalLM, 3001,
         "pre-LN OPT, relu, learned positions from the mask (offset 2); extra calls: head_mask (0/1/0.5), "
         "no attention_mask (pads become tokens), inputs_embeds",
         {**OPT, "hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4},
         extras=("head_mask", "no_mask", "embeds")),
    Case("opt_350m_like", "opt", OPTForCausalLM, 3002,
         "OPT-350m layout: post-LN (do_layer_norm_before=False, no final LN), word_embed_proj_dim 32 with "
         "hidden 64 (project_in/out), relu; last hidden_states entry has width 32",
         {**OPT, "hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4,
          "do_layer_norm_before": False, "word_embed_proj_dim": 32}),
    Case("opt_nobias_noaffine", "opt", OPTForCausalLM, 3003,
         "enable_bias=False, layer_norm_elementwise_affine=False, gelu (erf)",
         {**OPT, "enable_bias": False, "layer_norm_elementwise_affine": False, "activation_function": "gelu"}),
    Case("opt_remove_final_ln", "opt", OPTForCausalLM, 3004,
         "_remove_final_layer_norm=True (pre-LN without the decoder final LN), gelu_new (tanh)",
         {**OPT, "_remove_final_layer_norm": True, "activation_function": "gelu_new"}),
    Case("opt_silu_wepd", "opt", OPTForCausalLM, 3005,
         "pre-LN with projections: word_embed_proj_dim 48, hidden 64, silu",
         {**OPT, "hidden_size": 64, "ffn_dim": 96, "num_attention_heads": 4, "word_embed_proj_dim": 48,
          "activation_function": "silu", "do_layer_norm_before": True}),
    Case("opt_base", "opt", OPTModel, 3006,
         "OPTModel base class: last_hidden_state, hidden_states, attentions, cache",
         dict(OPT), calls="base"),
    Case("opt_seqcls", "opt", OPTForSequenceClassification, 3007,
         "sequence classification num_labels 1 -> regression (MSE), float labels (2,), pad 1, row 0 "
         "right-padded, 1 layer",
         {**OPT, "num_hidden_layers": 1, "num_labels": 1}, calls="seqcls"),
    Case("opt_qa", "opt", OPTForQuestionAnswering, 3008,
         "question answering (qa_outputs with bias), 1 layer; start/end positions with one out-of-range "
         "value each (100 > S: clamped to S and ignored) and one in range",
         {**OPT, "num_hidden_layers": 1}, calls="qa"),
]
CASE_BY_NAME = {c.name: c for c in CASES}
assert len(CASE_BY_NAME) == len(CASES)


# ----------------------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------------------
def make_config(case: Case):
    return CONFIG_CLS[case.family](**case.config, attn_implementation=ATTN)


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")


@torch.no_grad()
def build_model(case: Case):
    config = make_config(case)
    torch.manual_seed(case.seed)
    model = case.cls(config).to(torch.float32)
    assert model.config._attn_implementation == ATTN, model.config._attn_implementation
    # Perturb parameters that random init leaves at trivial values (norm weights 1, biases 0,
    # padding_idx embedding rows 0).  Iteration order of named_modules is deterministic.
    for _, m in model.named_modules():
        if is_norm(m):
            if getattr(m, "weight", None) is not None:
                m.weight.add_(NORM_NOISE * torch.randn_like(m.weight))
            if getattr(m, "bias", None) is not None:
                m.bias.add_(NORM_NOISE * torch.randn_like(m.bias))
        elif isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.add_(NORM_NOISE * torch.randn_like(m.bias))
        elif isinstance(m, nn.Embedding) and m.padding_idx is not None:
            w = m.weight
            w[m.padding_idx] = torch.randn(w.shape[1]) * w.std()
    if case.embed_scale != 1.0:
        emb = model.get_input_embeddings().weight
        emb.mul_(case.embed_scale)
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight.mul_(case.embed_scale)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------
# Calls
# ----------------------------------------------------------------------------------------
@dataclass
class Call:
    name: str
    inputs: dict
    kwargs: dict
    past_from: str | None = None
    outputs: list = field(default_factory=list)


def flags(cache, hidden=False, attn=False, **extra):
    return {"use_cache": cache, "output_hidden_states": hidden, "output_attentions": attn, **extra}


def pad_id_of(config) -> int:
    return config.pad_token_id if config.pad_token_id is not None else 0


def n_logit_cols(case: Case, config) -> int:
    v = config.vocab_size
    tp = getattr(config, "pretraining_tp", 1) if case.family == "llama" else 1
    if tp > 1:
        v = tp * (v // tp)   # lm_head.weight.split(vocab // tp) and only the first tp chunks are used
    return v


def build_calls(case: Case, model, config) -> list[Call]:
    g = torch.Generator().manual_seed(case.seed + 7)
    pad = pad_id_of(config)
    hi = n_logit_cols(case, config)   # ids (and so labels) must index a logits column

    def rand_ids(*shape):
        return torch.randint(3, hi, shape, generator=g, dtype=torch.int64)

    def embed(ids):
        e = model.get_input_embeddings()(ids)
        return (e + 0.01 * torch.randn(e.shape, generator=g)).contiguous()

    ids = rand_ids(B, S)
    mask = torch.ones(B, S, dtype=torch.int64)
    calls: list[Call] = []

    if case.calls in ("causal", "base"):
        ids[1, :N_LEFT_PAD] = pad
        mask[1, :N_LEFT_PAD] = 0
        full_in = {"input_ids": ids, "attention_mask": mask}
        if case.calls == "causal" and case.labels:
            labels = ids.masked_fill(mask == 0, -100)
            full_in["labels"] = labels
        calls.append(Call("full", full_in, flags(True, True, True)))
        calls.append(Call("prefix", {"input_ids": ids[:, :-1].contiguous(),
                                     "attention_mask": mask[:, :-1].contiguous()}, flags(True)))
        calls.append(Call("step", {"input_ids": ids[:, -1:].contiguous(), "attention_mask": mask},
                          flags(True), past_from="prefix"))
        calls.append(Call("short", {"input_ids": rand_ids(1, SHORT)}, flags(False)))
        for x in case.extras:
            if x == "embeds":
                calls.append(Call("embeds", {"inputs_embeds": embed(ids), "attention_mask": mask}, flags(False)))
            elif x == "positions":
                pos = (torch.arange(S, dtype=torch.int64) + 5).expand(B, S).contiguous()
                calls.append(Call("positions", {"input_ids": ids, "attention_mask": mask, "position_ids": pos},
                                  flags(False)))
            elif x == "no_mask":
                calls.append(Call("no_mask", {"input_ids": ids}, flags(False)))
            elif x == "keep1":
                calls.append(Call("keep1", {"input_ids": ids, "attention_mask": mask},
                                  flags(False, num_logits_to_keep=1)))
            elif x == "full_again":
                calls.append(Call("full_again", dict(full_in), flags(False)))
            elif x == "prefix_long":
                long_ids = rand_ids(1, 81)
                calls.append(Call("prefix_long", {"input_ids": long_ids[:, :80].contiguous()}, flags(True)))
                calls.append(Call("step_long", {"input_ids": long_ids[:, 80:].contiguous()}, flags(True),
                                  past_from="prefix_long"))
            elif x == "step_long":
                pass  # emitted together with prefix_long
            elif x == "head_mask":
                L, H = config.num_hidden_layers, config.num_attention_heads
                pattern = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.5, 1.0, 1.0, 0.0])
                hm = pattern.repeat(L * H // 8 + 1)[: L * H].reshape(L, H).contiguous()
                calls.append(Call("head_mask", {"input_ids": ids, "attention_mask": mask, "head_mask": hm},
                                  flags(False, attn=True)))
            else:
                raise ValueError(x)
    elif case.calls == "seqcls":
        ids[0, S - N_RIGHT_PAD:] = pad
        mask[0, S - N_RIGHT_PAD:] = 0
        n = config.num_labels
        if n == 1:
            labels = torch.randn(B, generator=g)
        elif config.problem_type == "multi_label_classification":
            labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])[:, :n]
        else:
            labels = torch.tensor([2, 0], dtype=torch.int64) % n
        calls.append(Call("full", {"input_ids": ids, "attention_mask": mask, "labels": labels},
                          flags(False, hidden=True)))
        for x in case.extras:
            if x == "embeds":
                calls.append(Call("embeds", {"inputs_embeds": embed(ids[1:])}, flags(False)))
            else:
                raise ValueError(x)
    elif case.calls == "qa":
        ids[1, :N_LEFT_PAD] = pad
        mask[1, :N_LEFT_PAD] = 0
        start = torch.tensor([10, 100], dtype=torch.int64)
        end = torch.tensor([100, 40], dtype=torch.int64)
        calls.append(Call("full", {"input_ids": ids, "attention_mask": mask, "start_positions": start,
                                   "end_positions": end}, flags(False, hidden=True)))
    else:
        raise ValueError(case.calls)
    return calls


def to_np(t) -> np.ndarray:
    a = t.detach().cpu().numpy()
    if a.dtype.kind == "f":
        assert a.dtype == np.float32, a.dtype
    elif a.dtype.kind in "iub":
        a = a.astype(np.int64)
    return np.array(a, copy=True, order="C")   # keeps 0-d arrays 0-d (loss)


def legacy_past(p):
    if isinstance(p, Cache):
        p = p.to_legacy_cache()
    return tuple((k.detach().clone(), v.detach().clone()) for k, v in p)


@torch.no_grad()
def run_calls(case: Case, model, calls: list[Call]) -> dict:
    arrays: dict[str, np.ndarray] = {}
    pasts = {}
    for c in calls:
        kw = dict(c.kwargs)
        if c.past_from is not None:
            p = pasts[c.past_from]
            kw["past_key_values"] = DynamicCache.from_legacy_cache(p) if case.family == "llama" else p
        for n, t in c.inputs.items():
            arrays[f"{c.name}.in.{n}"] = to_np(t)
        out = model(**c.inputs, **kw, return_dict=True)
        for k, v in out.items():
            if v is None:
                continue
            if k == "past_key_values":
                p = legacy_past(v)
                pasts[c.name] = p
                for j, (kk, vv) in enumerate(p):
                    arrays[f"{c.name}.out.past_key_values.{j}.key"] = to_np(kk)
                    arrays[f"{c.name}.out.past_key_values.{j}.value"] = to_np(vv)
                c.outputs.append(k)
            elif k in ("hidden_states", "attentions"):
                for j, t in enumerate(v):
                    arrays[f"{c.name}.out.{k}.{j}"] = to_np(t)
                c.outputs.append(k)
            else:
                arrays[f"{c.name}.out.{k}"] = to_np(v)
                c.outputs.append(k)
    return arrays


# ----------------------------------------------------------------------------------------
# Deterministic serialisation
# ----------------------------------------------------------------------------------------
def write_npz(path: Path, arrays: dict):
    """Like np.savez_compressed but with fixed zip timestamps/attributes (byte-deterministic)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            zi = zipfile.ZipInfo(key + ".npy", date_time=ZIP_DATE)
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o644 << 16
            zi.create_system = 3
            zf.writestr(zi, buf.getvalue(), compresslevel=9)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def meta_dict(case: Case, calls: list[Call]) -> dict:
    return {
        "case": case.name,
        "class": case.cls.__name__,
        "seed": case.seed,
        "attn_implementation": ATTN,
        "description": case.description,
        "calls": [{"name": c.name, "inputs": list(c.inputs), "kwargs": c.kwargs, "past_from": c.past_from,
                   "outputs": c.outputs} for c in calls],
    }


# ----------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------
def rope_info(case: Case, model, config) -> str:
    rs = getattr(config, "rope_scaling", None) or {}
    if case.family != "llama":
        return ""
    rot = getattr(model, "model", model).rotary_emb
    s = f" rope={rot.rope_type} scaling={rot.attention_scaling:.4f}"
    if rs.get("rope_type") == "llama3":
        # bands computed from the *default* inv_freq, as transformers does
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base_inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).double() / hd))
        wl = 2 * math.pi / base_inv
        old = rs["original_max_position_embeddings"]
        lw, hw = old / rs["low_freq_factor"], old / rs["high_freq_factor"]
        high = int((wl < hw).sum()); low = int((wl > lw).sum()); med = len(wl) - high - low
        assert high and med and low, (high, med, low)
        s += f" llama3 bands high/medium/low={high}/{med}/{low}"
    return s


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------
def build_case(case: Case, root: Path) -> dict:
    model_dir = root / "models" / case.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    (root / "cases").mkdir(parents=True, exist_ok=True)
    model = build_model(case)
    config = model.config
    model.save_pretrained(model_dir, safe_serialization=True)
    info = rope_info(case, model, config)
    calls = build_calls(case, model, config)
    arrays = run_calls(case, model, calls)
    meta = meta_dict(case, calls)
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=False))
    npz = root / "cases" / f"{case.name}.npz"
    write_npz(npz, arrays)
    lg = arrays.get("full.out.logits")
    stat = f" logits std={lg.std():.3f}" if lg is not None else ""
    msize = sum(f.stat().st_size for f in model_dir.iterdir())
    print(f"{case.name:26s} model {msize/1e3:7.1f} kB  npz {npz.stat().st_size/1e3:7.1f} kB"
          f"  ({len(arrays)} arrays){stat}{info}", flush=True)
    return meta


# ----------------------------------------------------------------------------------------
# Generation goldens: transformers' generate() on the saved golden models
# ----------------------------------------------------------------------------------------
GENERATION_MODELS = ["llama_mha", "llama_gqa_bias", "llama_rope_dynamic", "openllama_default", "opt_preln",
                     "opt_350m_like"]
GEN_SEED = 7


# Models whose vocabulary is a golden tokenizer's, saved with its files: text in, text out.
TEXT_CASES = [
    Case("llama_text", "llama", LlamaForCausalLM, 2001,
         "Llama with the golden sentencepiece tokenizer (vocab 1500) in its folder, for text generation",
         {**LLAMA, "vocab_size": 1500}),
    Case("opt_text", "opt", OPTForCausalLM, 2002,
         "OPT with the golden byte-level BPE tokenizer (vocab 2000) in its folder, for text generation",
         {**OPT, "vocab_size": 2000}),
]
# Trained models (golden/train.py) and their goldens (golden/make_trained_goldens.py): made by those scripts, so
# this one leaves them as they are (never removed as stale; copied into --check's temp dir before comparing).
TRAINED_MODELS = ("llama_trained", "opt_trained")
TEXT_TOKENIZERS = {"llama_text": ("llama", "LlamaTokenizer"), "opt_text": ("opt", "GPT2Tokenizer")}
TEXT_PROMPTS = ["Once upon a time", "The capital of France is", "你好，世界。", "def hello():\n    return",
                "Emoji 🙂 and spaces   here"]


def build_text_model(root: Path, case: Case):
    model_dir = root / "models" / case.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model = build_model(case)
    model.save_pretrained(model_dir, safe_serialization=True)
    folder, _ = TEXT_TOKENIZERS[case.name]
    for f in sorted((GOLDEN / "tokenizers" / folder).iterdir()):
        shutil.copyfile(f, model_dir / f.name)


def slow_tokenizer(model_dir: Path, name: str):
    _, cls = TEXT_TOKENIZERS[name]
    return getattr(transformers, cls).from_pretrained(model_dir)


@torch.no_grad()
def build_text_generation(root: Path, name: str):
    """Three levels, as minGPT's import test: prompt ids from the slow tokenizer, greedy ids, decoded text."""
    model_dir = root / "models" / name
    model = load_saved(root, name)
    tok = slow_tokenizer(model_dir, name)
    arrays, meta = {}, {"model": name, "tokenizer": type(tok).__name__, "runs": []}
    for i, prompt in enumerate(TEXT_PROMPTS):
        ids = torch.tensor([tok.encode(prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        arrays[f"prompt{i}.in.input_ids"] = to_np(ids)
        arrays[f"prompt{i}.out.sequences"] = to_np(out)
        meta["runs"].append({"name": f"prompt{i}", "prompt": prompt, "kwargs": {"max_new_tokens": 16},
                             "text": tok.decode(out[0], skip_special_tokens=True)})
    if tok.pad_token_id is not None:  # a left-padded batch of all prompts, as the generate docs recommend
        tok.padding_side = "left"
        batch = tok(TEXT_PROMPTS, padding=True, return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        arrays["batch.in.input_ids"] = to_np(batch["input_ids"])
        arrays["batch.in.attention_mask"] = to_np(batch["attention_mask"])
        arrays["batch.out.sequences"] = to_np(out)
        meta["runs"].append({"name": "batch", "prompts": TEXT_PROMPTS, "kwargs": {"max_new_tokens": 12},
                             "texts": tok.batch_decode(out, skip_special_tokens=True)})
    arrays["meta"] = np.array(json.dumps(meta, ensure_ascii=False))
    (root / "generation").mkdir(exist_ok=True)
    path = root / "generation" / f"{name}.npz"
    write_npz(path, arrays)
    print(f"generation/{name}.npz {path.stat().st_size/1e3:.1f} kB ({len(meta['runs'])} text runs)", flush=True)


def load_saved(root: Path, name: str):
    case = CASE_BY_NAME.get(name) or {c.name: c for c in TEXT_CASES}[name]
    model = case.cls.from_pretrained(root / "models" / name, attn_implementation=ATTN)
    return model.eval()


def generation_runs(model, name: str):
    """(run name, inputs, kwargs) for one model; eos-dependent runs look at a plain greedy run first."""
    config = model.config
    g = torch.Generator().manual_seed(GEN_SEED + sum(map(ord, name)))
    low, high = 3, config.vocab_size - 1

    def ids(*shape):
        return torch.randint(low, high, shape, generator=g)

    one = ids(1, 8)
    two = ids(2, 8)
    pad_fill = config.pad_token_id if config.pad_token_id is not None else 0
    padded = two.clone()
    padded[1, :3] = pad_fill
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    runs = [("greedy", {"input_ids": one}, {"max_new_tokens": 24}),
            ("max_length", {"input_ids": one}, {"max_length": 12}),
            ("greedy_leftpad", {"input_ids": padded, "attention_mask": mask}, {"max_new_tokens": 12})]
    with torch.no_grad():
        plain = model.generate(two, attention_mask=torch.ones_like(two), max_new_tokens=16, do_sample=False)
    stop = int(plain[0, 8 + 3])  # row 0's 4th new token: row 0 stops there, row 1 runs on (pad-filled rows)
    runs.append(("greedy_eos", {"input_ids": two, "attention_mask": torch.ones_like(two)},
                 {"max_new_tokens": 16, "eos_token_id": stop}))
    first = int(plain[0, 8])
    runs.append(("greedy_processors", {"input_ids": two, "attention_mask": torch.ones_like(two)},
                 {"max_new_tokens": 10, "repetition_penalty": 1.5, "min_new_tokens": 6, "eos_token_id": first,
                  "output_scores": True, "return_dict_in_generate": True}))
    runs.append(("sample_scores", {"input_ids": padded, "attention_mask": mask},
                 {"max_new_tokens": 6, "do_sample": True, "temperature": 0.7, "top_k": 10, "top_p": 0.8,
                  "repetition_penalty": 1.2, "output_scores": True, "return_dict_in_generate": True}))
    runs.append(("sample_default_topk", {"input_ids": one},
                 {"max_new_tokens": 4, "do_sample": True, "output_scores": True, "return_dict_in_generate": True}))
    return runs


@torch.no_grad()
def build_generation(root: Path, name: str):
    model = load_saved(root, name)
    arrays, meta = {}, {"model": name, "class": CASE_BY_NAME[name].cls.__name__, "seed": GEN_SEED, "runs": []}
    for run, inputs, kwargs in generation_runs(model, name):
        torch.manual_seed(GEN_SEED)
        out = model.generate(**inputs, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        for k, v in inputs.items():
            arrays[f"{run}.in.{k}"] = to_np(v)
        arrays[f"{run}.out.sequences"] = to_np(sequences)
        if getattr(out, "scores", None) is not None:
            arrays[f"{run}.out.scores"] = np.stack([to_np(t) for t in out.scores])  # [steps, B, V]
        settings = {k: v for k, v in kwargs.items() if k not in ("output_scores", "return_dict_in_generate")}
        meta["runs"].append({"name": run, "inputs": list(inputs), "kwargs": settings})
    arrays["meta"] = np.array(json.dumps(meta))
    (root / "generation").mkdir(exist_ok=True)
    path = root / "generation" / f"{name}.npz"
    write_npz(path, arrays)
    print(f"generation/{name}.npz {path.stat().st_size/1e3:.1f} kB ({len(meta['runs'])} runs)", flush=True)


def versions() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__}


def write_manifest(root: Path):
    cases = {}
    for c in CASES:
        npz = root / "cases" / f"{c.name}.npz"
        calls = None
        if npz.exists():
            with np.load(npz) as z:
                calls = json.loads(str(z["meta"]))["calls"]
        cases[c.name] = {"class": c.cls.__name__, "family": c.family, "seed": c.seed,
                         "description": c.description, "config": c.config,
                         "calls": calls}
    files = {}
    for sub in ("models", "cases", "generation"):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                files[p.relative_to(root).as_posix()] = sha256(p)
    manifest = {"versions": versions(), "attn_implementation": ATTN, "dtype": "float32",
                "generation_models": GENERATION_MODELS, "generation_seed": GEN_SEED,
                "torch_num_threads": torch.get_num_threads(), "cases": cases, "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def build(root: Path, names: list[str]):
    for n in names:
        build_case(CASE_BY_NAME[n], root)
    # stale cases (renamed/removed) must not linger
    known = {c.name for c in CASES} | set(TRAINED_MODELS)
    for p in (root / "cases").glob("*.npz"):
        if p.stem not in known:
            p.unlink()
    for p in (root / "models").iterdir():
        if p.is_dir() and p.name not in known | {c.name for c in TEXT_CASES}:
            shutil.rmtree(p)
    for n in GENERATION_MODELS:
        if n in names:
            build_generation(root, n)
    for case in TEXT_CASES:
        build_text_model(root, case)
        build_text_generation(root, case.name)
    write_manifest(root)
    m, c = dir_size(root / "models"), dir_size(root / "cases")
    print(f"total: models {m/1e6:.2f} MB, cases {c/1e6:.2f} MB, models+cases {(m+c)/1e6:.2f} MB; "
          f"golden/ total {dir_size(root)/1e6:.2f} MB")


def compare(ref: Path, new: Path) -> bool:
    ok = True
    for c in CASES:
        a, b = ref / "cases" / f"{c.name}.npz", new / "cases" / f"{c.name}.npz"
        if not a.exists():
            print(f"{c.name}: MISSING stored npz"); ok = False; continue
        with np.load(a) as za, np.load(b) as zb:
            ka, kb = list(za.keys()), list(zb.keys())
            bad = [] if ka == kb else ["<key list differs>"]
            for k in ka:
                if k in zb:
                    x, y = za[k], zb[k]
                    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                        bad.append(k)
        if bad:
            ok = False
            print(f"{c.name}: ARRAYS DIFFER: {bad[:8]}{' ...' if len(bad) > 8 else ''}")
        else:
            print(f"{c.name}: arrays equal ({len(ka)})")
    def hashes(root: Path) -> dict:   # hash the files actually on disk, not what a manifest claims
        return {p.relative_to(root).as_posix(): sha256(p)
                for sub in ("models", "cases", "generation") for p in sorted((root / sub).rglob("*")) if p.is_file()}
    fa, fb = hashes(ref), hashes(new)
    diff = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    if diff:
        ok = False
        print(f"FILE BYTES DIFFER ({len(diff)}): {diff[:10]}")
    else:
        print(f"all {len(fb)} files byte-identical (sha256)")
    if (ref / "manifest.json").exists() and (ref / "manifest.json").read_bytes() != (new / "manifest.json").read_bytes():
        ok = False
        print("manifest.json differs")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="rebuild only this case (repeatable)")
    ap.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with stored files")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)        # fixed reduction order regardless of the machine's core count
    torch.use_deterministic_algorithms(True)

    names = args.case or [c.name for c in CASES]
    for n in names:
        if n not in CASE_BY_NAME:
            ap.error(f"unknown case {n!r}; known: {', '.join(CASE_BY_NAME)}")

    if args.check:
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td)
            if args.case:   # start from a copy so the manifest covers every case
                for sub in ("models", "cases", "generation"):
                    if (GOLDEN / sub).exists():
                        shutil.copytree(GOLDEN / sub, tmp / sub)
            else:           # the trained models' files are made by other scripts: take them as stored
                for name in TRAINED_MODELS:
                    for src in [GOLDEN / "models" / name, GOLDEN / "cases" / f"{name}.npz",
                                GOLDEN / "generation" / f"{name}.npz"]:
                        dst = tmp / src.relative_to(GOLDEN)
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        if src.is_dir():
                            shutil.copytree(src, dst)
                        elif src.exists():
                            shutil.copyfile(src, dst)
            (tmp / "models").mkdir(exist_ok=True)
            (tmp / "cases").mkdir(exist_ok=True)
            build(tmp, names)
            ok = compare(GOLDEN, tmp)
        print("CHECK PASSED" if ok else "CHECK FAILED")
        return 0 if ok else 1

    (GOLDEN / "models").mkdir(exist_ok=True)
    (GOLDEN / "cases").mkdir(exist_ok=True)
    build(GOLDEN, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
