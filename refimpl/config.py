"""Model configurations: frozen dataclasses read from a Hugging Face config.json.

One literal table per family lists every config.json field refimpl reads, with transformers 4.46.3's default
(`REQUIRED` where refimpl refuses to guess). Fields that only matter for training (dropout, init) are ignored;
values refimpl does not implement are refused with a ConfigError naming the field.

config.json is untrusted input: the file is bounded before it is parsed, and every field refimpl reads is checked
against FIELD_RULES (type and range, limits below) before anything is allocated from it.
"""
from __future__ import annotations

import json
import os
import reprlib
from dataclasses import dataclass, field

from .errors import ConfigError

REQUIRED = object()

# Limits. Every released model sits far inside them: Llama 3.1 405B has 126 layers, hidden 16384, FFN 53248,
# 128 heads (8 KV), head_dim 128, vocab 128256, 131072 positions; OPT-175B has 96 layers, hidden 12288, FFN 49152,
# 96 heads; the largest vocabularies are ~256k (Gemma: 262144) and the longest context is 10M (Llama 4 Scout).
MAX_LAYERS = 1024  # num_hidden_layers: 8x the 405B's 126
MAX_HIDDEN = 2**16  # hidden_size, head_dim, word_embed_proj_dim: 4x the 405B's 16384
MAX_FFN = 2**18  # intermediate_size, ffn_dim: 4 * MAX_HIDDEN (the 405B's FFN is 3.25x its hidden size)
MAX_HEADS = 1024  # num_attention_heads, num_key_value_heads, pretraining_tp: 8x the 405B's 128
MAX_VOCAB = 2**22  # vocab_size and num_labels (a score head is no wider than an lm_head): 16x Gemma's 262144
MAX_POSITIONS = 2**24  # max_position_embeddings (16.7M): above the longest released context (10M)
MAX_TOKEN_ID = 2**31 - 1  # pad/bos/eos ids fit int32; -1 is accepted too (early Llama conversions' "no pad")
MAX_EOS_IDS = 1024  # entries of an eos_token_id list (Llama 3 has 3)
MAX_PARAMETERS = 2**40  # weights the sizes imply together (1.1e12): the 405B has 4.1e11, OPT-175B 1.75e11
MIN_RMS_NORM_EPS = 1e-30  # stays above float32's smallest normal (1.2e-38): eps never rounds to 0 (real: 1e-5, 1e-6)
MIN_ROPE_THETA, MAX_ROPE_THETA = 2.0, 1e12  # real: 1e4 (Llama 2), 5e5 (Llama 3), up to 1e8 for long contexts
MAX_ROPE_SCALE = 1024.0  # every rope_scaling number lies in [1/1024, 1024] (real: factor <= 40, long_factor < 100)
MAX_NAME_CHARS = 256  # an architectures entry (class names are < 50 characters)
# The file itself (real config.json files are 1-10 KB; an id2label of ~10k labels still fits).
MAX_CONFIG_BYTES = 2**20
MAX_INT_DIGITS = 1000  # digits of a JSON integer: int() is quadratic in them (Python's own 4300 can be lifted)
MAX_JSON_DEPTH = 32  # nesting of objects and lists (real configs: ~4, e.g. text_config.rope_scaling.long_factor)

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

# What each field may hold. (int, low, high): a JSON integer (not 2.0, not true) with low <= value <= high.
# (float, low, high): a JSON number in [low, high] (NaN and Infinity fail). bool: true or false. A tuple of
# strings: one of them. dict: an object, checked key by key below. null passes where the default is None.
FIELD_RULES = {
    "vocab_size": (int, 1, MAX_VOCAB),
    "hidden_size": (int, 1, MAX_HIDDEN),
    "intermediate_size": (int, 1, MAX_FFN),
    "ffn_dim": (int, 1, MAX_FFN),
    "num_hidden_layers": (int, 1, MAX_LAYERS),
    "num_attention_heads": (int, 1, MAX_HEADS),
    "num_key_value_heads": (int, 1, MAX_HEADS),
    "head_dim": (int, 1, MAX_HIDDEN),
    "max_position_embeddings": (int, 1, MAX_POSITIONS),
    "original_max_position_embeddings": (int, 1, MAX_POSITIONS),
    "pretraining_tp": (int, 1, MAX_HEADS),
    "word_embed_proj_dim": (int, 1, MAX_HIDDEN),
    "num_labels": (int, 1, MAX_VOCAB),
    "pad_token_id": (int, -1, MAX_TOKEN_ID),
    "bos_token_id": (int, -1, MAX_TOKEN_ID),
    "eos_token_id": (int, -1, MAX_TOKEN_ID),  # or a list of such ids (Llama 3)
    "rms_norm_eps": (float, MIN_RMS_NORM_EPS, 1.0),
    "rope_theta": (float, MIN_ROPE_THETA, MAX_ROPE_THETA),
    "hidden_act": KNOWN_ACTIVATIONS,
    "activation_function": KNOWN_ACTIVATIONS,
    "rope_scaling": dict,
    "tie_word_embeddings": bool,
    "attention_bias": bool,
    "mlp_bias": bool,
    "use_stable_embedding": bool,
    "shared_input_output_embedding": bool,
    "do_layer_norm_before": bool,
    "_remove_final_layer_norm": bool,
    "enable_bias": bool,
    "layer_norm_elementwise_affine": bool,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")  # PretrainedConfig defaults them all to None

# Every rope_scaling type of transformers 4.46 (modeling_rope_utils.py ROPE_INIT_FUNCTIONS) and the keys each needs.
ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# rope_scaling key -> FIELD_RULES-style rule, after modeling_rope_utils.py's _validate_* functions: refimpl refuses
# what they warn about, except a JSON integer where they ask for a float (transformers computes the same with it).
ROPE_SCALE = (float, 1 / MAX_ROPE_SCALE, MAX_ROPE_SCALE)
ROPE_RULES = {
    "factor": (float, 1.0, MAX_ROPE_SCALE),  # "must be a float >= 1"
    "attention_factor": ROPE_SCALE,  # "must be a float greater than 0": 0 would zero cos and sin
    "beta_fast": ROPE_SCALE,  # 0 would silently read as the default 32 (`or 32`)
    "beta_slow": ROPE_SCALE,
    "low_freq_factor": ROPE_SCALE,
    "high_freq_factor": ROPE_SCALE,
    "short_factor": ROPE_SCALE,  # each entry of the list
    "long_factor": ROPE_SCALE,
    "original_max_position_embeddings": (int, 1, MAX_POSITIONS),  # llama3 reads it; 4.46's yarn and dynamic ignore it
    "mscale": (float, 0.0, MAX_ROPE_SCALE),  # yarn keys of later transformers, ignored by 4.46 (and so by refimpl)
    "mscale_all_dim": (float, 0.0, MAX_ROPE_SCALE),
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
    """config.json of a checkpoint folder (or the file itself) -> a config dataclass; the file is bounded first."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"no config.json in {path!r}: refimpl needs a Hugging Face checkpoint folder")
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # never more, whatever the file claims to be
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{file}: over {MAX_CONFIG_BYTES} bytes; a config.json is a few KB")
    try:
        hf = json.loads(data.decode("utf-8"), parse_int=_parse_int)  # NaN/Infinity parse; FIELD_RULES refuse them
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{file}: nested too deeply to parse (refimpl reads {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{file}: not valid JSON ({_show(str(exc))})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    return from_hf_config(hf)


def _parse_int(text: str) -> int:
    """json's integer hook: refuse an absurd digit count before int(), which is quadratic in it, runs."""
    if len(text) > MAX_INT_DIGITS:
        raise ConfigError(f"holds an integer of {len(text)} digits (refimpl reads at most {MAX_INT_DIGITS})")
    return int(text)


def from_hf_config(hf: dict) -> LlamaConfig | OPTConfig:
    """A config.json dict -> LlamaConfig (model_type llama / open-llama) or OPTConfig (opt), every field checked."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json must be a JSON object, got {type(hf).__name__}")
    _check_depth(hf)
    model_type = hf.get("model_type")
    if model_type == "llama":
        config = _llama_config(hf)
    elif model_type in ("open-llama", "open_llama"):
        config = _open_llama_config(hf)
    elif model_type == "opt":
        config = _opt_config(hf)
    else:
        raise ConfigError(f"config.json model_type={_show(model_type)}: refimpl supports 'llama', 'open-llama' and "
                          "'opt'")
    _check_parameter_count(config)
    return config


# ------------------------------------------------------------------------------------------------------ checks

class _BoundedRepr(reprlib.Repr):
    """reprlib's cut-down repr, which also survives integers too long for repr() (Python's 4300-digit limit)."""

    def repr_int(self, x, level):
        return f"<a {x.bit_length()}-bit integer>" if x.bit_length() > 128 else super().repr_int(x, level)


_show = _BoundedRepr().repr  # a bounded summary of an untrusted value: never str() or repr() of the whole


def _bad(name: str, value, why: str) -> ConfigError:
    """ConfigError "config.json field name=<bounded value> why"."""
    return ConfigError(f"config.json field {name}={_show(value)} {why}")


def _check(name: str, value, rule):
    """value if it obeys rule (a FIELD_RULES or ROPE_RULES row), else a ConfigError naming the field."""
    if rule is bool:
        if not isinstance(value, bool):
            raise _bad(name, value, "must be true or false")
    elif rule is dict:
        if not isinstance(value, dict):
            raise _bad(name, value, "must be an object or null")
    elif rule[0] in (int, float):
        kind, low, high = rule
        allowed = int if kind is int else (int, float)  # bool is an int in Python, not in JSON
        if isinstance(value, bool) or not isinstance(value, allowed) or not low <= value <= high:
            # `low <= value <= high` is False for NaN and exact for huge integers (no float conversion)
            want = f"an integer in [{low}, {high}]" if kind is int else f"a number in [{low:g}, {high:g}]"
            raise _bad(name, value, f"must be {want}")
    elif not isinstance(value, str) or value not in rule:
        raise _bad(name, value, f"is not one refimpl implements ({', '.join(rule)})")
    return value


def _check_depth(hf: dict) -> None:
    """Refuse objects and lists nested deeper than MAX_JSON_DEPTH (walked with a stack, so never a RecursionError)."""
    for name, value in hf.items():
        stack = [(value, 2)]  # (a value, its depth): the config object itself is level 1
        while stack:
            node, depth = stack.pop()
            if isinstance(node, dict):
                node = node.values()
            elif not isinstance(node, (list, tuple)):
                continue
            if depth > MAX_JSON_DEPTH:
                raise ConfigError(f"config.json field {_show(name)} nests objects/lists deeper than "
                                  f"{MAX_JSON_DEPTH} levels")
            stack.extend((item, depth + 1) for item in node)


def _read_fields(hf: dict, table: dict, family: str) -> dict:
    """The table's fields (defaults filled in), each checked against its FIELD_RULES row."""
    out = {}
    for name, default in table.items():
        value = hf.get(name, default)
        if value is REQUIRED:
            raise ConfigError(f"config.json ({family}) is missing the required field {name!r}")
        if value is None and (default is None or name in TOKEN_IDS):
            pass
        elif name == "eos_token_id" and isinstance(value, list):
            if len(value) > MAX_EOS_IDS:
                raise _bad(name, value, f"lists more than {MAX_EOS_IDS} ids")
            for item in value:
                _check(f"{name}[]", item, FIELD_RULES[name])
        else:
            _check(name, value, FIELD_RULES[name])
        out[name] = value
    return out


def _parameter_count(c: LlamaConfig | OPTConfig) -> int:
    """The weights the sizes imply: embeddings, output and score heads, and every layer's matrices and vectors."""
    d, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    if c.family == "opt":
        e = c.word_embed_proj_dim
        layer = 4 * d * d + 2 * d * c.ffn_dim + 10 * d + c.ffn_dim  # q k v o, fc1 fc2, biases and LayerNorms
        outside = 2 * c.vocab_size * e + (c.max_position_embeddings + 2) * d + 2 * d * e + 2 * d
    else:
        attention = d * c.head_dim * (2 * heads + 2 * c.num_key_value_heads)  # q and o, k and v
        vectors = 4 * d + (heads + 2 * c.num_key_value_heads) * c.head_dim + 2 * c.intermediate_size  # norms, biases
        layer = attention + 3 * d * c.intermediate_size + vectors  # + gate, up, down
        outside = 2 * c.vocab_size * d + 3 * d  # embeddings, lm_head, final and stable-embedding norms
    return layers * layer + outside + c.num_labels * d


def _check_parameter_count(c: LlamaConfig | OPTConfig) -> None:
    """Refuse sizes that together imply more than MAX_PARAMETERS weights: nothing is allocated from a lying config."""
    count = _parameter_count(c)
    if count > MAX_PARAMETERS:
        names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_labels") + (
            ("ffn_dim", "word_embed_proj_dim", "max_position_embeddings") if c.family == "opt"
            else ("intermediate_size", "num_key_value_heads", "head_dim"))
        sizes = ", ".join(f"{name}={getattr(c, name)}" for name in names)
        raise ConfigError(f"config.json sizes imply {count:.3g} weights, over refimpl's limit of "
                          f"{MAX_PARAMETERS:.3g} ({sizes})")


def _head_fields(hf: dict) -> dict:
    """num_labels, problem_type and architectures, which every family reads the same way (PretrainedConfig)."""
    if "num_labels" in hf:
        num_labels = hf["num_labels"]
    elif isinstance(hf.get("id2label"), dict):
        num_labels = len(hf["id2label"])
    else:
        num_labels = 2  # PretrainedConfig's default
    _check("num_labels", num_labels, FIELD_RULES["num_labels"])
    problem_type = hf.get("problem_type")
    if problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
        raise _bad("problem_type", problem_type, "is not one of transformers' three")
    architectures = hf.get("architectures")
    architectures = () if architectures is None else architectures
    if not isinstance(architectures, (list, tuple)) or not all(
            isinstance(name, str) and len(name) <= MAX_NAME_CHARS for name in architectures):
        raise _bad("architectures", architectures, "must be a list of class names")
    return {"num_labels": num_labels, "problem_type": problem_type, "architectures": tuple(architectures)}


def _even_head_dim(head_dim: int) -> None:
    """RoPE rotates pairs: rotate_half splits the head in two halves, so an odd head_dim fails in transformers too."""
    if head_dim % 2:
        raise _bad("head_dim", head_dim, "must be even: RoPE rotates pairs of dimensions")


# ------------------------------------------------------------------------------------------------------ families

def _llama_config(hf: dict) -> LlamaConfig:
    f = _read_fields(hf, LLAMA_FIELDS, "llama")
    heads = f["num_attention_heads"]
    kv_heads = f["num_key_value_heads"] or heads  # None -> MHA (configuration_llama.py:179-182)
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = f["head_dim"] or f["hidden_size"] // heads  # 4.46 does not need heads to divide hidden_size
    if not head_dim:
        raise ConfigError(f"config.json: hidden_size={f['hidden_size']} < num_attention_heads={heads} gives head_dim 0")
    _even_head_dim(head_dim)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _bad("partial_rotary_factor", hf["partial_rotary_factor"],
                   "is not supported: Llama rotates the whole head; refimpl supports only 1.0")
    ompe = hf.get("original_max_position_embeddings")
    if ompe is not None:
        _check("original_max_position_embeddings", ompe, FIELD_RULES["original_max_position_embeddings"])
    rope_scaling = _llama_rope_scaling(f["rope_scaling"], head_dim, f["max_position_embeddings"], ompe)
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
        original_max_position_embeddings=ompe, pretraining_tp=tp, attention_bias=f["attention_bias"],
        mlp_bias=f["mlp_bias"], tie_word_embeddings=f["tie_word_embeddings"],
        pad_token_id=f["pad_token_id"], bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
        **_head_fields(hf),
    )


def _llama_rope_scaling(rs, head_dim: int, mpe: int, ompe) -> dict | None:
    """rope_scaling checked key by key (ROPE_RULES), then as the type's _validate_* function in 4.46 checks it."""
    if rs is None:
        return None
    rs = dict(rs)
    rope_type = rs.get("rope_type", rs.get("type"))  # BC: "type" was the old key (configuration_llama.py:196-197)
    if not isinstance(rope_type, str) or rope_type not in ROPE_REQUIRED_KEYS:
        raise ConfigError(f"config.json rope_scaling type {_show(rope_type)} is not one of transformers 4.46's "
                          f"{', '.join(ROPE_REQUIRED_KEYS)}")
    rs["rope_type"] = rope_type
    for key in ROPE_REQUIRED_KEYS[rope_type]:
        if rs.get(key) is None:
            raise ConfigError(f"config.json rope_scaling of type {rope_type!r} is missing the key {key!r}")
    for key, rule in ROPE_RULES.items():
        if rs.get(key) is not None and key not in ("short_factor", "long_factor"):  # the lists: see longrope below
            _check(f"rope_scaling.{key}", rs[key], rule)
    if rope_type == "yarn" and (rs.get("beta_fast") or 32) < (rs.get("beta_slow") or 1):
        # the ramp between the two correction dimensions would run backwards (_validate_yarn_parameters warns)
        raise _bad("rope_scaling.beta_fast", rs.get("beta_fast"), f"must be >= beta_slow={_show(rs.get('beta_slow'))} "
                   "(defaults 32 and 1)")
    if rope_type == "longrope":
        if rs.get("factor") is None and ompe is None:
            raise ConfigError("config.json rope_scaling of type 'longrope' needs 'factor' "
                              "(or a config field original_max_position_embeddings)")
        if (ompe or mpe) < 2:  # the default attention_factor divides by log(original length)
            raise _bad("original_max_position_embeddings" if ompe else "max_position_embeddings", ompe or mpe,
                       "must be >= 2 for longrope (its attention factor divides by log of it)")
        for key in ("short_factor", "long_factor"):
            values = rs[key]
            if not isinstance(values, list) or len(values) != head_dim // 2:
                raise ConfigError(f"config.json rope_scaling.{key} must be a list of head_dim/2 = {head_dim // 2} "
                                  f"numbers, got {_show(values)}")
            for v in values:
                _check(f"rope_scaling.{key}[]", v, ROPE_RULES[key])
    if rope_type == "llama3":
        if rs["high_freq_factor"] <= rs["low_freq_factor"]:
            raise _bad("rope_scaling.high_freq_factor", rs["high_freq_factor"],
                       f"must be > low_freq_factor={_show(rs['low_freq_factor'])} (the smoothing divides by the gap)")
        if rs["original_max_position_embeddings"] >= mpe:
            raise _bad("rope_scaling.original_max_position_embeddings", rs["original_max_position_embeddings"],
                       f"must be < max_position_embeddings={mpe} (_validate_llama3_parameters)")
    return rs


def _open_llama_config(hf: dict) -> LlamaConfig:
    f = _read_fields(hf, OPEN_LLAMA_FIELDS, "open-llama")
    heads, hidden = f["num_attention_heads"], f["hidden_size"]
    if hidden % heads:  # modeling_open_llama.py:213-222 raises too
        raise ConfigError(f"config.json: hidden_size={hidden} must be divisible by num_attention_heads={heads}")
    _even_head_dim(hidden // heads)
    rs = f["rope_scaling"]
    if rs is not None:
        # configuration_open_llama.py:148-166: exactly {"type", "factor"}, type linear|dynamic, factor > 1
        if set(rs) != {"type", "factor"}:
            raise _bad("rope_scaling", rs, "must have exactly the keys 'type' and 'factor' (Open-Llama)")
        if rs["type"] not in ("linear", "dynamic"):
            raise ConfigError(f"config.json Open-Llama rope_scaling type {_show(rs['type'])} must be 'linear' or "
                              "'dynamic'")
        factor = rs["factor"]
        if not isinstance(factor, float) or not 1.0 < factor <= MAX_ROPE_SCALE:
            raise ConfigError(f"config.json Open-Llama rope_scaling factor {_show(factor)} must be a float > 1 "
                              f"(and <= {MAX_ROPE_SCALE})")
        if rs["type"] == "dynamic" and hidden // heads <= 2:
            raise ConfigError(f"dynamic RoPE needs head_dim > 2 (it divides by head_dim - 2), got {hidden // heads}")
        rs = dict(rs, rope_type=rs["type"])
    return LlamaConfig(
        family="open-llama",
        vocab_size=f["vocab_size"], hidden_size=hidden, intermediate_size=f["intermediate_size"],
        num_hidden_layers=f["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden // heads, hidden_act=f["hidden_act"], max_position_embeddings=f["max_position_embeddings"],
        rms_norm_eps=float(f["rms_norm_eps"]), rope_theta=float(f["rope_theta"]), rope_scaling=rs,
        tie_word_embeddings=f["tie_word_embeddings"], use_stable_embedding=f["use_stable_embedding"],
        shared_input_output_embedding=f["shared_input_output_embedding"],
        pad_token_id=f["pad_token_id"], bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
        **_head_fields(hf),
    )


def _opt_config(hf: dict) -> OPTConfig:
    f = _read_fields(hf, OPT_FIELDS, "opt")
    heads, hidden = f["num_attention_heads"], f["hidden_size"]
    if hidden % heads:  # OPTAttention raises too (modeling_opt.py:114-118)
        raise ConfigError(f"config.json: hidden_size={hidden} must be divisible by num_attention_heads={heads}")
    return OPTConfig(
        vocab_size=f["vocab_size"], hidden_size=hidden, ffn_dim=f["ffn_dim"], num_hidden_layers=f["num_hidden_layers"],
        num_attention_heads=heads, max_position_embeddings=f["max_position_embeddings"],
        do_layer_norm_before=f["do_layer_norm_before"], remove_final_layer_norm=f["_remove_final_layer_norm"],
        word_embed_proj_dim=f["word_embed_proj_dim"] or hidden, activation_function=f["activation_function"],
        enable_bias=f["enable_bias"], layer_norm_elementwise_affine=f["layer_norm_elementwise_affine"],
        tie_word_embeddings=f["tie_word_embeddings"],
        pad_token_id=f["pad_token_id"], bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
        **_head_fields(hf),
    )
