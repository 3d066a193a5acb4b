"""Model configurations: frozen dataclasses read from a Hugging Face config.json.

One literal table per family lists every config.json field refimpl reads, with transformers 4.46.3's default
(`REQUIRED` where refimpl refuses to guess). Fields that only matter for training (dropout, init) are ignored;
values refimpl does not implement are refused with a ConfigError naming the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from .errors import ConfigError

REQUIRED = object()

# Activation names of transformers' ACT2FN that refimpl implements (refimpl.ops.ACTIVATIONS).
KNOWN_ACTIVATIONS = (
    "silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu",
    "relu2", "relu6", "mish", "tanh", "sigmoid", "linear",
)

# config.json field -> default, as in configuration_llama.py:145-206 (sizes are required: no silent 7B defaults).
LLAMA_FIELDS = {
    "vocab_size": REQUIRED,
    "hidden_size": REQUIRED,
    "intermediate_size": REQUIRED,
    "num_hidden_layers": REQUIRED,
    "num_attention_heads": REQUIRED,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# configuration_open_llama.py:95-166
OPEN_LLAMA_FIELDS = {
    "vocab_size": REQUIRED,
    "hidden_size": REQUIRED,
    "intermediate_size": REQUIRED,
    "num_hidden_layers": REQUIRED,
    "num_attention_heads": REQUIRED,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "use_stable_embedding": True,
    "shared_input_output_embedding": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# configuration_opt.py:92-143
OPT_FIELDS = {
    "vocab_size": REQUIRED,
    "hidden_size": REQUIRED,
    "ffn_dim": REQUIRED,
    "num_hidden_layers": REQUIRED,
    "num_attention_heads": REQUIRED,
    "max_position_embeddings": 2048,
    "do_layer_norm_before": True,
    "_remove_final_layer_norm": False,
    "word_embed_proj_dim": None,
    "activation_function": "relu",
    "enable_bias": True,
    "layer_norm_elementwise_affine": True,
    "tie_word_embeddings": True,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
}

# Every rope_scaling type of transformers 4.46 (modeling_rope_utils.py ROPE_INIT_FUNCTIONS) and the keys each needs.
ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class LlamaConfig:
    """Llama 2 and Open-Llama (`family` says which; Open-Llama's extra switches are off for Llama)."""

    family: str  # "llama" | "open-llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    original_max_position_embeddings: int | None = None  # longrope reads this config *attribute*
    pretraining_tp: int = 1
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    use_stable_embedding: bool = False  # Open-Llama: LayerNorm after the token embedding
    shared_input_output_embedding: bool = False  # Open-Llama: logits = h @ embed_tokens.T, no lm_head
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = field(default=2, hash=False)
    num_labels: int = 2
    problem_type: str | None = None
    architectures: tuple = ()

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))


@dataclass(frozen=True)
class OPTConfig:
    """OPT (all sizes; 350m is the post-LayerNorm one with project_in/project_out)."""

    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    word_embed_proj_dim: int = 0
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list | None = field(default=2, hash=False)
    num_labels: int = 2
    problem_type: str | None = None
    architectures: tuple = ()
    family: str = "opt"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def read_config(path: str) -> LlamaConfig | OPTConfig:
    """config.json of a checkpoint folder (or the file itself) -> a config dataclass."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"no config.json in {path!r}: refimpl needs a Hugging Face checkpoint folder")
    try:
        with open(file, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    return from_hf_config(hf)


def from_hf_config(hf: dict) -> LlamaConfig | OPTConfig:
    """A config.json dict -> LlamaConfig (model_type llama / open-llama) or OPTConfig (opt)."""
    model_type = hf.get("model_type")
    if model_type == "llama":
        return _llama_config(hf)
    if model_type in ("open-llama", "open_llama"):
        return _open_llama_config(hf)
    if model_type == "opt":
        return _opt_config(hf)
    raise ConfigError(f"config.json model_type={model_type!r}: refimpl supports 'llama', 'open-llama' and 'opt'")


def _read_fields(hf: dict, table: dict, family: str) -> dict:
    out = {}
    for name, default in table.items():
        value = hf.get(name, default)
        if value is REQUIRED:
            raise ConfigError(f"config.json ({family}) is missing the required field {name!r}")
        out[name] = value
    for name in ("vocab_size", "hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "pretraining_tp", "word_embed_proj_dim"):
        if name in out and out[name] is not None:
            _positive_int(name, out[name])
    for name in ("pad_token_id", "bos_token_id"):
        if name in out and out[name] is not None and (not isinstance(out[name], int) or isinstance(out[name], bool)):
            raise ConfigError(f"config.json field {name}={out[name]!r} must be an integer or null")
    return out


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.json field {name}={value!r} must be a positive integer")


def _positive_float(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config.json field {name}={value!r} must be a positive number")


def _activation(name, value):
    if value not in KNOWN_ACTIVATIONS:
        raise ConfigError(f"config.json field {name}={value!r} is not an activation refimpl implements "
                          f"({', '.join(KNOWN_ACTIVATIONS)})")


def _head_fields(hf: dict) -> dict:
    if "num_labels" in hf:
        num_labels = hf["num_labels"]
    elif isinstance(hf.get("id2label"), dict):
        num_labels = len(hf["id2label"])
    else:
        num_labels = 2  # PretrainedConfig's default
    _positive_int("num_labels", num_labels)
    problem_type = hf.get("problem_type")
    if problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
        raise ConfigError(f"config.json field problem_type={problem_type!r} is not one of transformers' three")
    return {"num_labels": num_labels, "problem_type": problem_type,
            "architectures": tuple(hf.get("architectures") or ())}


def _llama_config(hf: dict) -> LlamaConfig:
    f = _read_fields(hf, LLAMA_FIELDS, "llama")
    heads = f["num_attention_heads"]
    kv_heads = f["num_key_value_heads"] or heads  # None -> MHA (configuration_llama.py:179-182)
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = f["head_dim"] or f["hidden_size"] // heads
    if not head_dim:
        raise ConfigError(f"config.json: hidden_size={f['hidden_size']} < num_attention_heads={heads} gives head_dim 0")
    _activation("hidden_act", f["hidden_act"])
    _positive_float("rms_norm_eps", f["rms_norm_eps"])
    _positive_float("rope_theta", f["rope_theta"])
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"config.json field partial_rotary_factor={hf['partial_rotary_factor']!r}: "
                          "Llama rotates the whole head; refimpl supports only 1.0")
    ompe = hf.get("original_max_position_embeddings")
    if ompe is not None:
        _positive_int("original_max_position_embeddings", ompe)
    rope_scaling = _llama_rope_scaling(f["rope_scaling"], head_dim, ompe)
    if rope_scaling and rope_scaling["rope_type"] == "dynamic" and head_dim <= 2:
        raise ConfigError(f"dynamic RoPE needs head_dim > 2 (it divides by head_dim - 2), got {head_dim}")
    tp = f["pretraining_tp"]
    if tp > 1:
        # transformers' eager tp path drops every bias and splits by hidden_size: refuse what it gets wrong.
        if f["attention_bias"] or f["mlp_bias"]:
            raise ConfigError(f"pretraining_tp={tp} with attention_bias/mlp_bias: transformers silently drops the "
                              "biases on that path; refimpl refuses the combination")
        if heads * head_dim != f["hidden_size"] or f["hidden_size"] % tp or f["intermediate_size"] % tp \
                or (kv_heads * head_dim) % tp:
            raise ConfigError(f"pretraining_tp={tp} needs hidden_size, intermediate_size and the k/v width divisible "
                              f"by it and num_attention_heads*head_dim == hidden_size")
    return LlamaConfig(
        family="llama",
        vocab_size=f["vocab_size"], hidden_size=f["hidden_size"], intermediate_size=f["intermediate_size"],
        num_hidden_layers=f["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, hidden_act=f["hidden_act"], max_position_embeddings=f["max_position_embeddings"],
        rms_norm_eps=float(f["rms_norm_eps"]), rope_theta=float(f["rope_theta"]), rope_scaling=rope_scaling,
        original_max_position_embeddings=ompe, pretraining_tp=tp, attention_bias=bool(f["attention_bias"]),
        mlp_bias=bool(f["mlp_bias"]), tie_word_embeddings=bool(f["tie_word_embeddings"]),
        pad_token_id=f["pad_token_id"], bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
        **_head_fields(hf),
    )


def _llama_rope_scaling(rs, head_dim: int, ompe) -> dict | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"config.json field rope_scaling={rs!r} must be an object or null")
    rs = dict(rs)
    rope_type = rs.get("rope_type", rs.get("type"))  # BC: "type" was the old key (configuration_llama.py:196-197)
    if rope_type not in ROPE_REQUIRED_KEYS:
        raise ConfigError(f"config.json rope_scaling type {rope_type!r} is not one of transformers 4.46's "
                          f"{', '.join(ROPE_REQUIRED_KEYS)}")
    rs["rope_type"] = rope_type
    for key in ROPE_REQUIRED_KEYS[rope_type]:
        if key not in rs:
            raise ConfigError(f"config.json rope_scaling of type {rope_type!r} is missing the key {key!r}")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow"):
        if rs.get(key) is not None:
            _positive_float(f"rope_scaling.{key}", rs[key])
    if rope_type == "longrope":
        if rs.get("factor") is None and ompe is None:
            raise ConfigError("config.json rope_scaling of type 'longrope' needs 'factor' "
                              "(or a config field original_max_position_embeddings)")
        for key in ("short_factor", "long_factor"):
            values = rs[key]
            if not isinstance(values, list) or len(values) != head_dim // 2:
                raise ConfigError(f"config.json rope_scaling.{key} must be a list of head_dim/2 = {head_dim // 2} "
                                  f"numbers, got {values!r}")
            for v in values:
                _positive_float(f"rope_scaling.{key}[]", v)
    if rope_type == "llama3":
        _positive_int("rope_scaling.original_max_position_embeddings", rs["original_max_position_embeddings"])
        if rs["high_freq_factor"] == rs["low_freq_factor"]:
            raise ConfigError("config.json rope_scaling llama3: high_freq_factor equals low_freq_factor "
                              "(the smoothing divides by their difference)")
    return rs


def _open_llama_config(hf: dict) -> LlamaConfig:
    f = _read_fields(hf, OPEN_LLAMA_FIELDS, "open-llama")
    heads, hidden = f["num_attention_heads"], f["hidden_size"]
    if hidden % heads:  # modeling_open_llama.py:213-222 raises too
        raise ConfigError(f"config.json: hidden_size={hidden} must be divisible by num_attention_heads={heads}")
    _activation("hidden_act", f["hidden_act"])
    _positive_float("rms_norm_eps", f["rms_norm_eps"])
    _positive_float("rope_theta", f["rope_theta"])
    rs = f["rope_scaling"]
    if rs is not None:
        # configuration_open_llama.py:148-166: exactly {"type", "factor"}, type linear|dynamic, factor > 1
        if not isinstance(rs, dict) or set(rs) != {"type", "factor"}:
            raise ConfigError(f"config.json Open-Llama rope_scaling={rs!r} must have exactly the keys 'type' and 'factor'")
        if rs["type"] not in ("linear", "dynamic"):
            raise ConfigError(f"config.json Open-Llama rope_scaling type {rs['type']!r} must be 'linear' or 'dynamic'")
        if not isinstance(rs["factor"], float) or rs["factor"] <= 1.0:
            raise ConfigError(f"config.json Open-Llama rope_scaling factor {rs['factor']!r} must be a float > 1")
        rs = dict(rs, rope_type=rs["type"])
    return LlamaConfig(
        family="open-llama",
        vocab_size=f["vocab_size"], hidden_size=hidden, intermediate_size=f["intermediate_size"],
        num_hidden_layers=f["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden // heads, hidden_act=f["hidden_act"], max_position_embeddings=f["max_position_embeddings"],
        rms_norm_eps=float(f["rms_norm_eps"]), rope_theta=float(f["rope_theta"]), rope_scaling=rs,
        tie_word_embeddings=bool(f["tie_word_embeddings"]), use_stable_embedding=bool(f["use_stable_embedding"]),
        shared_input_output_embedding=bool(f["shared_input_output_embedding"]),
        pad_token_id=f["pad_token_id"], bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
        **_head_fields(hf),
    )


def _opt_config(hf: dict) -> OPTConfig:
    f = _read_fields(hf, OPT_FIELDS, "opt")
    heads, hidden = f["num_attention_heads"], f["hidden_size"]
    if hidden % heads:
        raise ConfigError(f"config.json: hidden_size={hidden} must be divisible by num_attention_heads={heads}")
    _activation("activation_function", f["activation_function"])
    return OPTConfig(
        vocab_size=f["vocab_size"], hidden_size=hidden, ffn_dim=f["ffn_dim"], num_hidden_layers=f["num_hidden_layers"],
        num_attention_heads=heads, max_position_embeddings=f["max_position_embeddings"],
        do_layer_norm_before=bool(f["do_layer_norm_before"]),
        remove_final_layer_norm=bool(f["_remove_final_layer_norm"]),
        word_embed_proj_dim=f["word_embed_proj_dim"] or hidden, activation_function=f["activation_function"],
        enable_bias=bool(f["enable_bias"]), layer_norm_elementwise_affine=bool(f["layer_norm_elementwise_affine"]),
        tie_word_embeddings=bool(f["tie_word_embeddings"]),
        pad_token_id=f["pad_token_id"], bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
        **_head_fields(hf),
    )
