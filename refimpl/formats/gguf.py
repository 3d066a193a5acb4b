"""GGUF files (llama.cpp) of the Llama family, read through the `gguf` package (the optional extra refimpl[gguf]).

A GGUF file carries its own config (llama.* metadata), a tokenizer, and the tensors under llama.cpp's names, as F32,
F16 or quantized blocks (Q8_0, Q4_K, ...: whatever gguf.quants can dequantize). This reader maps the config and the
names back to transformers' spelling, so that an auditor can ask whether a GGUF conversion gives the logits of the
original checkpoint. The one quirk: convert_hf_to_gguf.py permutes the rows of q_proj and k_proj
(LlamaModel.permute) because llama.cpp rotates adjacent pairs where transformers rotates halves; `unpermute`
undoes it exactly.
"""
from __future__ import annotations

import numpy as np

from ..errors import CheckpointError
from .common import Stored, check_ranges

# GGUF metadata key -> config.json field (convert_hf_to_gguf.py writes them from config.json).
GGUF_CONFIG = {
    "llama.vocab_size": "vocab_size",
    "llama.context_length": "max_position_embeddings",
    "llama.embedding_length": "hidden_size",
    "llama.feed_forward_length": "intermediate_size",
    "llama.block_count": "num_hidden_layers",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.key_length": "head_dim",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.rope.freq_base": "rope_theta",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")
ROPE_KEYS = ("llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
             "llama.rope.scale_linear", "llama.rope.dimension_count")

# llama.cpp tensor name -> transformers name; per block, "blk.N." -> "model.layers.N.".
GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
# Tensors whose rows convert_hf_to_gguf.py permuted, and the config field that gives the head count it used.
PERMUTED = {"attn_q.weight": "num_attention_heads", "attn_q.bias": "num_attention_heads",
            "attn_k.weight": "num_key_value_heads", "attn_k.bias": "num_key_value_heads"}
DIRECT = ("F32", "F16", "F64")  # memory-mapped as they are; every other type goes through gguf.quants.dequantize


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a .gguf file needs the gguf package: pip install 'refimpl[gguf]'") from None
    return gguf


def read_gguf_file(path: str) -> tuple[dict, dict[str, Stored]]:
    """A Llama GGUF file -> (config.json-style dict, {transformers name: Stored})."""
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path, "r")
        wanted = (*GGUF_CONFIG, *ROPE_KEYS, "general.architecture")
        fields = {key: reader.fields[key].contents() for key in wanted if key in reader.fields}
        tensors = list(reader.tensors)
        size = int(reader.data.shape[0])
    except Exception as exc:  # gguf raises ValueError, IndexError, KeyError, ... on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:200]})") from None
    check_ranges(path, [(t.data_offset, t.data_offset + int(t.n_bytes), t.name) for t in tensors], size, what="file")
    names = {t.name for t in tensors}
    config = gguf_config(path, fields, names, tensors)
    stored = {}
    for t in tensors:
        hf_name, rest = _hf_name(path, t.name)
        stored[hf_name] = _stored(path, gguf, t, config[PERMUTED[rest]] if rest in PERMUTED else None)
    return config, stored


def gguf_config(path: str, fields: dict, tensor_names: set, tensors: list) -> dict:
    """GGUF metadata -> a dict that refimpl.config.from_hf_config reads (model_type llama)."""
    architecture = fields.get("general.architecture")
    if architecture != "llama":
        raise CheckpointError(f"{path}: GGUF general.architecture is {str(architecture)[:40]!r}; refimpl reads "
                              "'llama' GGUF files only")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path}: the GGUF holds rope_freqs.weight (llama3-style RoPE factors baked into a "
                              "tensor), which cannot be mapped back to a rope_scaling config")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_act": "silu"}  # llama.cpp's llama graph hard-codes SiLU: the file does not say
    for key, name in GGUF_CONFIG.items():
        if key in fields:
            config[name] = _number(path, key, fields[key], float if name in FLOAT_FIELDS else int)
    if "head_dim" not in config and "llama.rope.dimension_count" in fields:
        # Llama rotates the whole head, so llama.cpp's rotary dimension count is the head dim
        config["head_dim"] = _number(path, "llama.rope.dimension_count", fields["llama.rope.dimension_count"], int)
    embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if "vocab_size" not in config and embed is not None and len(embed.shape) == 2:
        config["vocab_size"] = int(embed.shape[-1])  # ggml order: (hidden, vocab)
    config["tie_word_embeddings"] = "output.weight" not in tensor_names  # llama.cpp reuses token_embd when absent
    config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config["mlp_bias"] = "blk.0.ffn_gate.bias" in tensor_names
    config["rope_scaling"] = _rope_scaling(path, fields)
    for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if name not in config:
            raise CheckpointError(f"{path}: the GGUF metadata has no {name} (llama.* key missing)")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    return config


def _number(path, key, value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)) \
            or value < 0:
        raise CheckpointError(f"{path}: GGUF metadata {key} is {str(value)[:40]!r}, expected one {kind.__name__} >= 0")
    if kind is float:
        # GGUF stores float32; the shortest decimal that round-trips it is the config.json value it came from (1e-05)
        return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))
    return value


def _rope_scaling(path, fields):
    kind = fields.get("llama.rope.scaling.type", "none")
    factor = fields.get("llama.rope.scaling.factor", fields.get("llama.rope.scale_linear"))
    if kind == "none" and "llama.rope.scale_linear" in fields:
        kind = "linear"  # older GGUF files spell linear scaling as llama.rope.scale_linear
    if kind == "none":
        return None
    factor = _number(path, "llama.rope.scaling.factor", factor, float)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = _number(path, "llama.rope.scaling.original_context_length",
                           fields.get("llama.rope.scaling.original_context_length"), int)
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise CheckpointError(f"{path}: GGUF rope scaling type {str(kind)[:40]!r} is not one refimpl maps back "
                          "(none, linear, yarn)")


def _hf_name(path: str, name: str) -> tuple[str, str]:
    """'blk.3.attn_q.weight' -> ('model.layers.3.self_attn.q_proj.weight', 'attn_q.weight')."""
    if name in GGUF_TOP:
        return GGUF_TOP[name], name
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_LAYER:
        return f"model.layers.{int(parts[1])}.{GGUF_LAYER[parts[2]]}", parts[2]
    raise CheckpointError(f"{path}: GGUF tensor {name!r} is not a parameter of a Llama model")


def _stored(path, gguf, tensor, heads) -> Stored:
    kind = tensor.tensor_type.name
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml lists dims fastest first
    data, qtype = tensor.data, tensor.tensor_type

    def values(block, rows):
        if kind in DIRECT:
            return block.reshape(rows)
        try:
            return gguf.quants.dequantize(block, qtype).reshape(rows)
        except Exception as exc:  # NotImplementedError for a type gguf cannot dequantize, ValueError for junk
            raise CheckpointError(f"{path}: cannot dequantize {tensor.name} ({kind}): {str(exc)[:120]}") from None

    def load():
        full = values(data, shape)
        return full if heads is None else unpermute(path, tensor.name, full, heads)

    order = None  # for q/k: the stored row of each transformers row, so a tile is un-permuted as it is gathered

    def rows(start, stop):
        nonlocal order
        if heads is not None and order is None:
            order = unpermute(path, tensor.name, np.arange(shape[0]), heads)
        block = data[start:stop] if order is None else data[order[start:stop]]
        return values(block, (stop - start, *shape[1:]))

    return Stored(kind, shape, int(tensor.n_bytes), load, rows)


def unpermute(path: str, name: str, w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py LlamaModel.permute, whose rows go (head, 2, Dh/2) -> (head, Dh/2, 2).

    permute:   w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    inverse:   w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    """
    rows = w.shape[0] if w.ndim else 0
    if n_head <= 0 or not rows or rows % (2 * n_head):
        raise CheckpointError(f"{path}: GGUF tensor {name} has {rows} rows, not a multiple of 2 x {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
