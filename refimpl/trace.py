"""Named intermediate values of a forward pass: the recorder the model code calls, and the table of names.

    t = Trace()
    model(input_ids=[[1, 17, 42]], trace=t)
    t["layers.0.attn.q_rope"]            # [B, H, S, Dh], a copy taken when the value was computed
    list(t)                              # every name, in the order the forward pass computed them

The model code records with one line per point, `trace("attn.q_rope", q)`; `trace.scope("layers.3")` gives a
recorder that prefixes names with "layers.3.". The default is NO_TRACE, which records nothing, so the model code
has no `if trace:` branches. The names are a stable interface (golden packs store tensors under them, ports
write them): LLAMA_TRACE and OPT_TRACE below list every one, in graph order, with its shape, its meaning, the
transformers module or variable it corresponds to, and the GGUF tensor / llama.cpp graph node where there is one.
"""
from __future__ import annotations

import fnmatch
import re

import numpy as np


class Trace:
    """Records np.array(value, copy=True) under prefix + name. One Trace records one forward pass.

    keep(name) -> bool, when given, picks the names to record (a 7B model has 32 layers of them); transform(name,
    value), when given, stores what it returns instead of a copy (e.g. a summary), so a trace's memory is bounded
    by what it keeps. `shapes` holds every recorded name's shape either way.
    """

    def __init__(self, prefix="", values=None, keep=None, transform=None, shapes=None):
        self.prefix = prefix
        self.values = {} if values is None else values  # shared by a trace and its scopes; insertion = graph order
        self.shapes = {} if shapes is None else shapes
        self.keep = keep
        self.transform = transform

    def __call__(self, name, value):
        key = self.prefix + name
        if key in self.values:
            raise ValueError(f"trace name {key!r} recorded twice: use a new Trace for each forward call")
        if self.keep is not None and not self.keep(key):
            return
        self.shapes[key] = tuple(np.shape(value))
        self.values[key] = np.array(value, copy=True) if self.transform is None else self.transform(key, value)

    def scope(self, name):
        """A recorder writing into the same trace under "name." (e.g. scope("layers.3") then scope("attn"))."""
        return Trace(f"{self.prefix}{name}.", self.values, self.keep, self.transform, self.shapes)

    def __getitem__(self, name):
        return self.values[name]

    def __contains__(self, name):
        return name in self.values

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)

    def items(self):
        return self.values.items()

    def __repr__(self):
        return f"Trace({len(self.values)} values)"


class _NoTrace:
    """The default recorder: records nothing, costs one Python call per point."""

    def __call__(self, name, value):
        pass

    def scope(self, name):
        return self

    def __repr__(self):
        return "NO_TRACE"


NO_TRACE = _NoTrace()


# Shape letters: B batch, S new tokens, T cached tokens, K = T + S keys, D hidden, E word_embed_proj_dim (OPT),
# H heads, Hkv key/value heads, Dh head dim, F intermediate / ffn size, V vocab; "B|1" is B or 1.
# (name, shape, meaning, transformers module or variable, GGUF tensor / llama.cpp graph node). "{i}" is the layer.
LLAMA_TRACE = (
    ("embed_tokens", "B S D", "embed_tokens[input_ids] (not recorded for inputs_embeds)",
     "model.embed_tokens", "token_embd / inp_embd"),
    ("embed", "B S D", "the first residual stream: embed_tokens, after Open-Llama's stable-embedding LayerNorm "
     "(eps 1e-5), or inputs_embeds", "model.embed_tokens (+ model.embed_layer_norm)", "- / inp_embd"),
    ("mask", "B 1 S K", "additive attention mask: 0 where a query may see a key, finfo(dtype).min elsewhere",
     "causal_mask in LlamaModel.forward", "- / KQ_mask"),
    ("position_ids", "B|1 S", "positions of the new tokens: arange(T, T + S) unless given",
     "position_ids", "- / inp_pos"),
    ("rope.cos", "B|1 S Dh", "cos of the rotary angles, half-split layout [cos(p f), cos(p f)], times "
     "attention_scaling", "model.rotary_emb -> cos", "rope_freqs (llama3 factors) / -"),
    ("rope.sin", "B|1 S Dh", "sin of the rotary angles, same layout", "model.rotary_emb -> sin", "- / -"),
    ("layers.{i}.in", "B S D", "residual stream entering layer i (= hidden_states[i])",
     "model.layers.{i} input", "- / l_out-{i-1}"),
    ("layers.{i}.input_norm", "B S D", "rms_norm(in) * input_layernorm", "model.layers.{i}.input_layernorm",
     "blk.{i}.attn_norm / attn_norm-{i}"),
    ("layers.{i}.attn.q", "B H S Dh", "q_proj(input_norm) split into heads, before RoPE",
     "model.layers.{i}.self_attn.q_proj", "blk.{i}.attn_q / Qcur-{i} (rows permuted, see docs/oracle.md)"),
    ("layers.{i}.attn.k", "B Hkv S Dh", "k_proj(input_norm) split into kv heads, before RoPE (new tokens only)",
     "model.layers.{i}.self_attn.k_proj", "blk.{i}.attn_k / Kcur-{i} (rows permuted)"),
    ("layers.{i}.attn.v", "B Hkv S Dh", "v_proj(input_norm) split into kv heads (new tokens only)",
     "model.layers.{i}.self_attn.v_proj", "blk.{i}.attn_v / Vcur-{i}"),
    ("layers.{i}.attn.q_rope", "B H S Dh", "q * cos + rotate_half(q) * sin (half-split pairs j, j + Dh/2)",
     "apply_rotary_pos_emb -> query_states", "- / Qcur-{i} after ggml_rope_ext"),
    ("layers.{i}.attn.k_rope", "B Hkv S Dh", "k after RoPE: what the cache stores (new tokens only)",
     "apply_rotary_pos_emb -> key_states", "- / Kcur-{i} after ggml_rope_ext"),
    ("layers.{i}.attn.k_repeat", "B H K Dh", "cached + new keys, each kv head repeated H/Hkv times in place "
     "(q head j uses kv head j // (H/Hkv))", "repeat_kv(key_states)", "- / k-{i} (cache view)"),
    ("layers.{i}.attn.v_repeat", "B H K Dh", "cached + new values, repeated like the keys",
     "repeat_kv(value_states)", "- / v-{i} (cache view)"),
    ("layers.{i}.attn.scores", "B H S K", "q_rope k^T / sqrt(Dh) + mask (Open-Llama: clamped at finfo.min)",
     "attn_weights before softmax", "- / kq-{i} (before scale and mask)"),
    ("layers.{i}.attn.probs", "B H S K", "softmax(scores) over keys (= attentions[i])",
     "attn_weights after softmax", "- / kq_soft_max_ext-{i}"),
    ("layers.{i}.attn.context", "B S H*Dh", "probs v, heads merged, before o_proj", "attn_output before o_proj",
     "- / kqv_merged_cont-{i}"),
    ("layers.{i}.attn.out", "B S D", "o_proj(context)", "model.layers.{i}.self_attn.o_proj",
     "blk.{i}.attn_output / kqv_out-{i}"),
    ("layers.{i}.attn_residual", "B S D", "in + attn.out", "residual + hidden_states in LlamaDecoderLayer",
     "- / ffn_inp-{i}"),
    ("layers.{i}.post_attn_norm", "B S D", "rms_norm(attn_residual) * post_attention_layernorm",
     "model.layers.{i}.post_attention_layernorm", "blk.{i}.ffn_norm / ffn_norm-{i}"),
    ("layers.{i}.mlp.gate", "B S F", "gate_proj(post_attn_norm)", "model.layers.{i}.mlp.gate_proj",
     "blk.{i}.ffn_gate / ffn_gate-{i}"),
    ("layers.{i}.mlp.up", "B S F", "up_proj(post_attn_norm)", "model.layers.{i}.mlp.up_proj",
     "blk.{i}.ffn_up / ffn_up-{i}"),
    ("layers.{i}.mlp.act", "B S F", "act(gate) * up: the input of down_proj", "act_fn(gate_proj(x)) * up_proj(x)",
     "- / ffn_gate_par-{i}"),
    ("layers.{i}.mlp.down", "B S D", "down_proj(act)", "model.layers.{i}.mlp.down_proj",
     "blk.{i}.ffn_down / ffn_out-{i}"),
    ("layers.{i}.out", "B S D", "attn_residual + mlp.down (= hidden_states[i + 1] except after the last layer)",
     "model.layers.{i} output", "- / l_out-{i}"),
    ("final_norm", "B S D", "rms_norm(last layer's out) * norm (= hidden_states[L])", "model.norm",
     "output_norm / result_norm"),
    ("logits", "B S V", "lm_head(final_norm) (Open-Llama shared: embed_tokens); sequence classification: the "
     "pooled score [B, num_labels]", "lm_head / score", "output / result_output"),
)

# OPT has no GGUF mapping (llama.cpp does not implement OPT).
OPT_TRACE = (
    ("embed", "B S E", "embed_tokens[input_ids], or inputs_embeds", "model.decoder.embed_tokens", "-"),
    ("position_ids", "B S", "cumsum(mask) * mask - 1 for the new tokens (pads -1); the table row is this + 2",
     "position_ids in OPTDecoder.forward", "-"),
    ("pos_embed", "B S D", "embed_positions[position_ids + 2]", "model.decoder.embed_positions", "-"),
    ("project_in", "B S D", "project_in(embed), when word_embed_proj_dim != hidden_size",
     "model.decoder.project_in", "-"),
    ("mask", "B 1 S K", "additive attention mask: 0 where a query may see a key, finfo(dtype).min elsewhere",
     "causal_attention_mask in OPTDecoder.forward", "-"),
    ("layers.{i}.in", "B S D", "residual stream entering layer i (= hidden_states[i]; layer 0: embed or "
     "project_in, plus pos_embed)", "model.decoder.layers.{i} input", "-"),
    ("layers.{i}.attn_in", "B S D", "the attention's input: self_attn_layer_norm(in) for pre-LN, in itself for "
     "post-LN (350m)", "model.decoder.layers.{i}.self_attn_layer_norm (pre-LN)", "-"),
    ("layers.{i}.attn.q", "B H S Dh", "q_proj(attn_in) * Dh^-0.5 (scaled after its bias), split into heads",
     "model.decoder.layers.{i}.self_attn.q_proj * scaling", "-"),
    ("layers.{i}.attn.k", "B H S Dh", "k_proj(attn_in) split into heads (new tokens only)",
     "model.decoder.layers.{i}.self_attn.k_proj", "-"),
    ("layers.{i}.attn.v", "B H S Dh", "v_proj(attn_in) split into heads (new tokens only)",
     "model.decoder.layers.{i}.self_attn.v_proj", "-"),
    ("layers.{i}.attn.scores", "B H S K", "q k^T + mask, clamped at finfo.min", "attn_weights before softmax", "-"),
    ("layers.{i}.attn.probs", "B H S K", "softmax(scores), times head_mask[i] when given (= attentions[i])",
     "attn_weights after softmax", "-"),
    ("layers.{i}.attn.context", "B S D", "probs v, heads merged, before out_proj", "attn_output before out_proj",
     "-"),
    ("layers.{i}.attn.out", "B S D", "out_proj(context)", "model.decoder.layers.{i}.self_attn.out_proj", "-"),
    ("layers.{i}.attn_residual", "B S D", "in + attn.out", "residual + hidden_states in OPTDecoderLayer", "-"),
    ("layers.{i}.self_attn_layer_norm", "B S D", "post-LN only: self_attn_layer_norm(attn_residual)",
     "model.decoder.layers.{i}.self_attn_layer_norm (post-LN)", "-"),
    ("layers.{i}.ffn_in", "B S D", "the FFN's input: final_layer_norm(attn_residual) for pre-LN, "
     "self_attn_layer_norm for post-LN", "model.decoder.layers.{i}.final_layer_norm (pre-LN)", "-"),
    ("layers.{i}.fc1", "B S F", "fc1(ffn_in)", "model.decoder.layers.{i}.fc1", "-"),
    ("layers.{i}.act", "B S F", "activation_function(fc1)", "model.decoder.layers.{i}.activation_fn", "-"),
    ("layers.{i}.fc2", "B S D", "fc2(act)", "model.decoder.layers.{i}.fc2", "-"),
    ("layers.{i}.final_layer_norm", "B S D", "post-LN only: final_layer_norm(attn + FFN residual)",
     "model.decoder.layers.{i}.final_layer_norm (post-LN)", "-"),
    ("layers.{i}.out", "B S D", "layer output (= hidden_states[i + 1] except after the last layer)",
     "model.decoder.layers.{i} output", "-"),
    ("final_layer_norm", "B S D", "the decoder's final LayerNorm (pre-LN models without _remove_final_layer_norm)",
     "model.decoder.final_layer_norm", "-"),
    ("project_out", "B S E", "project_out(...), when word_embed_proj_dim != hidden_size",
     "model.decoder.project_out", "-"),
    ("logits", "B S V", "lm_head(...) (tied to embed_tokens); sequence classification: pooled score "
     "[B, num_labels]; question answering: qa_outputs [B, S, 2]", "lm_head / score / qa_outputs", "-"),
)

TABLES = {"llama": LLAMA_TRACE, "open-llama": LLAMA_TRACE, "opt": OPT_TRACE}
_LAYER = re.compile(r"^layers\.(\d+)\.")


def generic_name(name):
    """'layers.3.attn.q' -> ('layers.{i}.attn.q', 3); 'logits' -> ('logits', None)."""
    match = _LAYER.match(name)
    if match is None:
        return name, None
    return "layers.{i}." + name[match.end():], int(match.group(1))


def entry(name, family):
    """The table row (name, shape, meaning, transformers, gguf) of a concrete trace name, or None."""
    generic, layer = generic_name(name)
    for row in TABLES[family]:
        if row[0] == generic:
            if layer is None:
                return row
            return tuple(field.replace("{i-1}", str(layer - 1)).replace("{i}", str(layer)) for field in row)
    return None


def graph_order(names, family):
    """Trace names sorted as the forward pass computes them (table order, layer by layer); unknown names last."""
    table = [row[0] for row in TABLES[family]]
    first_layer_row = next(k for k, row in enumerate(table) if row.startswith("layers."))

    def key(item):
        position, name = item
        generic, layer = generic_name(name)
        if generic not in table:
            return (3, 0, position)
        k = table.index(generic)
        if layer is not None:
            return (1, layer, k)
        return (0 if k < first_layer_row else 2, 0, k)

    return [name for _, name in sorted(enumerate(names), key=key)]


def select(names, patterns):
    """The names matching none of the fnmatch patterns (e.g. 'layers.*.attn.q*')."""
    return [name for name in names if not any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def format_table(family):
    """The name table as Markdown (used in docs/oracle.md)."""
    lines = ["| name | shape | value | transformers | GGUF / llama.cpp |", "|---|---|---|---|---|"]
    for name, shape, meaning, hf, gguf in TABLES[family]:
        lines.append(f"| `{name}` | {shape} | {meaning} | `{hf}` | {gguf} |")
    return "\n".join(lines)


def selection(layers=None, ops=None):
    """keep(name) for Trace: only layers in `layers` (a set of indices) and, within a layer, only ops matching one
    of the globs in `ops` (e.g. "attn.q*", "mlp.*"); names outside the layers (embeddings, logits) are always kept.
    None for both keeps everything."""
    if layers is None and not ops:
        return None

    def keep(name):
        match = re.match(r"layers\.(\d+)\.(.*)$", name)
        if match is None:
            return True
        if layers is not None and int(match.group(1)) not in layers:
            return False
        return not ops or any(fnmatch.fnmatchcase(match.group(2), pattern) for pattern in ops)

    return keep
