"""config.json is untrusted: every bad field is one ConfigError naming it, raised before anything is allocated.

One parametrized case per finding of the hardening issue (a family's golden config with one change); the JSON file
itself (size, nesting, NaN, huge integers); the configs of the largest released models, which must fit the limits;
and a hypothesis fuzzer: random values of random types in the fields refimpl reads give a config or a ConfigError,
never another exception, and an accepted config gives finite RoPE frequencies.
"""
import glob
import json
import os
import re
import shutil
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import refimpl
from refimpl import ConfigError, from_hf_config, read_config
from refimpl import config as C
from refimpl.rope import llama_rope_init, llama_rope_state, open_llama_rope_state
from golden_cases import GOLDEN

BASE_CASE = {"llama": "llama_mha", "open-llama": "openllama_default", "opt": "opt_preln"}
DELETE = object()  # a change that removes the field


def golden_config(case):
    with open(os.path.join(GOLDEN, "models", case, "config.json")) as f:
        return json.load(f)


def edited(family, changes):
    """The family's golden config.json dict with `changes` applied (DELETE removes a field)."""
    hf = golden_config(BASE_CASE[family])
    for key, value in changes.items():
        if value is DELETE:
            hf.pop(key, None)
        else:
            hf[key] = value
    return hf


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


LINEAR = {"rope_type": "linear", "factor": 2.0}
YARN = {"rope_type": "yarn", "factor": 4.0}
LONGROPE = {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}  # Dh 16
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # llama_mha: max_position_embeddings 128


def rope(base, **changes):
    """{"rope_scaling": base with changes} (DELETE removes a key)."""
    return {"rope_scaling": {k: v for k, v in {**base, **changes}.items() if v is not DELETE}}


# (family, changes, text the ConfigError must contain: the field, and the value where it is short)
BAD = [
    # sizes: zero, negative, bool, float, string, null, list, huge, over the limit
    ("llama", {"num_hidden_layers": 10**9}, "num_hidden_layers=1000000000"),
    ("llama", {"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ("llama", {"num_hidden_layers": -2}, "num_hidden_layers=-2"),
    ("llama", {"num_hidden_layers": True}, "num_hidden_layers=True"),
    ("llama", {"num_hidden_layers": 2.0}, "num_hidden_layers=2.0"),
    ("llama", {"num_hidden_layers": C.MAX_LAYERS + 1}, "num_hidden_layers=1025"),
    ("llama", {"vocab_size": 0}, "vocab_size=0"),
    ("llama", {"vocab_size": "192"}, "vocab_size='192'"),
    ("llama", {"vocab_size": 10**400}, "vocab_size=<a 1329-bit integer>"),
    ("llama", {"vocab_size": 2**63}, "vocab_size=9223372036854775808"),
    ("llama", {"vocab_size": C.MAX_VOCAB + 1}, "vocab_size=4194305"),
    ("llama", {"hidden_size": None}, "hidden_size=None"),
    ("llama", {"hidden_size": -4}, "hidden_size=-4"),
    ("llama", {"hidden_size": False}, "hidden_size=False"),
    ("llama", {"hidden_size": C.MAX_HIDDEN + 64}, "hidden_size=65600"),
    ("llama", {"intermediate_size": [96]}, "intermediate_size=[96]"),
    ("llama", {"intermediate_size": 0}, "intermediate_size=0"),
    ("llama", {"intermediate_size": C.MAX_FFN + 1}, "intermediate_size=262145"),
    ("llama", {"num_attention_heads": 0}, "num_attention_heads=0"),
    ("llama", {"num_attention_heads": 4.5}, "num_attention_heads=4.5"),
    ("llama", {"num_attention_heads": C.MAX_HEADS * 2}, "num_attention_heads=2048"),
    ("llama", {"num_key_value_heads": 0}, "num_key_value_heads=0"),
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads=3"),  # does not divide 4 heads
    ("llama", {"num_key_value_heads": 8}, "num_key_value_heads=8"),  # more than the 4 heads
    ("llama", {"max_position_embeddings": 0}, "max_position_embeddings=0"),
    ("llama", {"max_position_embeddings": None}, "max_position_embeddings=None"),
    ("llama", {"max_position_embeddings": C.MAX_POSITIONS + 1}, "max_position_embeddings=16777217"),
    ("llama", {"pretraining_tp": 0}, "pretraining_tp=0"),
    ("llama", {"pretraining_tp": "1"}, "pretraining_tp='1'"),
    # head_dim: explicit or derived, zero, odd, wrong type, too big
    ("llama", {"head_dim": 0}, "head_dim=0"),
    ("llama", {"head_dim": -16}, "head_dim=-16"),
    ("llama", {"head_dim": 15}, "head_dim=15"),
    ("llama", {"head_dim": 16.0}, "head_dim=16.0"),
    ("llama", {"head_dim": True}, "head_dim=True"),
    ("llama", {"head_dim": "16"}, "head_dim='16'"),
    ("llama", {"head_dim": C.MAX_HIDDEN * 2}, "head_dim=131072"),
    ("llama", {"head_dim": None, "hidden_size": 36}, "head_dim=9"),  # 36 // 4 heads, odd
    ("llama", {"head_dim": None, "hidden_size": 2}, "head_dim 0"),
    # floats: NaN, inf, zero, negative, string, bool, out of range
    ("llama", {"rms_norm_eps": float("nan")}, "rms_norm_eps=nan"),
    ("llama", {"rms_norm_eps": float("inf")}, "rms_norm_eps=inf"),
    ("llama", {"rms_norm_eps": 0.0}, "rms_norm_eps=0.0"),
    ("llama", {"rms_norm_eps": -1e-6}, "rms_norm_eps=-1e-06"),
    ("llama", {"rms_norm_eps": 1e-45}, "rms_norm_eps=1e-45"),  # rounds to 0 in float32
    ("llama", {"rms_norm_eps": "1e-6"}, "rms_norm_eps='1e-6'"),
    ("llama", {"rms_norm_eps": True}, "rms_norm_eps=True"),
    ("llama", {"rope_theta": float("nan")}, "rope_theta=nan"),
    ("llama", {"rope_theta": float("-inf")}, "rope_theta=-inf"),
    ("llama", {"rope_theta": 0}, "rope_theta=0"),
    ("llama", {"rope_theta": 1.0}, "rope_theta=1.0"),  # log(base) = 0: yarn divides by it
    ("llama", {"rope_theta": 1e13}, "rope_theta=10000000000000.0"),
    ("llama", {"rope_theta": 10**400}, "rope_theta=<a 1329-bit integer>"),  # float(10**400) would overflow
    # bools, strings, token ids, heads
    ("llama", {"hidden_act": "swiglu"}, "hidden_act='swiglu'"),
    ("llama", {"hidden_act": 5}, "hidden_act=5"),
    ("llama", {"hidden_act": ["silu"]}, "hidden_act=['silu']"),
    ("llama", {"hidden_act": None}, "hidden_act=None"),
    ("llama", {"tie_word_embeddings": "false"}, "tie_word_embeddings='false'"),
    ("llama", {"attention_bias": 1}, "attention_bias=1"),
    ("llama", {"mlp_bias": None}, "mlp_bias=None"),
    ("llama", {"pad_token_id": "0"}, "pad_token_id='0'"),
    ("llama", {"pad_token_id": -2}, "pad_token_id=-2"),
    ("llama", {"bos_token_id": 1.5}, "bos_token_id=1.5"),
    ("llama", {"bos_token_id": 2**31}, "bos_token_id=2147483648"),
    ("llama", {"eos_token_id": True}, "eos_token_id=True"),
    ("llama", {"eos_token_id": [2, "3"]}, "eos_token_id[]='3'"),
    ("llama", {"eos_token_id": [2] * (C.MAX_EOS_IDS + 1)}, "eos_token_id=[2, 2, 2, 2, 2, 2, ...]"),
    ("llama", {"eos_token_id": {"id": 2}}, "eos_token_id={'id': 2}"),
    ("llama", {"architectures": "LlamaForCausalLM"}, "architectures='LlamaForCausalLM'"),
    ("llama", {"architectures": [1]}, "architectures=[1]"),
    ("llama", {"architectures": {"a": 1}}, "architectures={'a': 1}"),
    ("llama", {"architectures": ["L" * 1000]}, "architectures=['LLLLLLLLLLLL...LLLLLLLLLLLLL']"),
    ("llama", {"architectures": 5}, "architectures=5"),
    ("llama", {"architectures": ""}, "architectures=''"),
    ("llama", {"num_labels": 0}, "num_labels=0"),
    ("llama", {"num_labels": 10**9}, "num_labels=1000000000"),
    ("llama", {"num_labels": "3"}, "num_labels='3'"),
    ("llama", {"problem_type": "ranking"}, "problem_type='ranking'"),
    ("llama", {"problem_type": ["regression"]}, "problem_type=['regression']"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("llama", {"partial_rotary_factor": "1.0"}, "partial_rotary_factor='1.0'"),
    ("llama", {"original_max_position_embeddings": 0}, "original_max_position_embeddings=0"),
    ("llama", {"original_max_position_embeddings": "16"}, "original_max_position_embeddings='16'"),
    ("llama", {"model_type": ["llama"]}, "model_type=['llama']"),
    ("llama", {"model_type": "gpt2"}, "model_type='gpt2'"),
    # nesting (a dict passed in directly; read_config's own parse is tested below)
    ("llama", {"quantization_config": nested(C.MAX_JSON_DEPTH)}, "field 'quantization_config' nests"),
    ("llama", rope(LINEAR, extra=nested(40)), "field 'rope_scaling' nests"),
    # rope_scaling: the object and its type
    ("llama", {"rope_scaling": "linear"}, "rope_scaling='linear'"),
    ("llama", {"rope_scaling": [2.0]}, "rope_scaling=[2.0]"),
    ("llama", {"rope_scaling": {}}, "rope_scaling type None"),
    ("llama", {"rope_scaling": {"rope_type": "su", "factor": 2.0}}, "rope_scaling type 'su'"),
    ("llama", {"rope_scaling": {"rope_type": ["linear"], "factor": 2.0}}, "rope_scaling type ['linear']"),
    ("llama", {"rope_scaling": {"type": 7, "factor": 2.0}}, "rope_scaling type 7"),
    # linear / dynamic: factor
    ("llama", rope(LINEAR, factor=DELETE), "missing the key 'factor'"),
    ("llama", rope(LINEAR, factor=None), "missing the key 'factor'"),
    ("llama", rope(LINEAR, factor=0.5), "rope_scaling.factor=0.5"),
    ("llama", rope(LINEAR, factor=0), "rope_scaling.factor=0"),
    ("llama", rope(LINEAR, factor=-2.0), "rope_scaling.factor=-2.0"),
    ("llama", rope(LINEAR, factor=float("nan")), "rope_scaling.factor=nan"),
    ("llama", rope(LINEAR, factor=float("inf")), "rope_scaling.factor=inf"),
    ("llama", rope(LINEAR, factor="2"), "rope_scaling.factor='2'"),
    ("llama", rope(LINEAR, factor=True), "rope_scaling.factor=True"),
    ("llama", rope(LINEAR, factor=1e6), "rope_scaling.factor=1000000.0"),
    ("llama", rope(LINEAR, factor=[2.0]), "rope_scaling.factor=[2.0]"),
    ("llama", rope(LINEAR, rope_type="dynamic", factor=0.9), "rope_scaling.factor=0.9"),
    ("llama", {**rope(LINEAR, rope_type="dynamic"), "head_dim": 2}, "head_dim > 2"),
    # yarn: factor, attention_factor, beta_fast, beta_slow, their order, later transformers' keys
    ("llama", rope(YARN, factor=0.5), "rope_scaling.factor=0.5"),
    ("llama", rope(YARN, attention_factor=0.0), "rope_scaling.attention_factor=0.0"),
    ("llama", rope(YARN, attention_factor=-1.0), "rope_scaling.attention_factor=-1.0"),
    ("llama", rope(YARN, attention_factor=float("nan")), "rope_scaling.attention_factor=nan"),
    ("llama", rope(YARN, attention_factor="1"), "rope_scaling.attention_factor='1'"),
    ("llama", rope(YARN, attention_factor=1e300), "rope_scaling.attention_factor=1e+300"),
    ("llama", rope(YARN, beta_fast=0.0), "rope_scaling.beta_fast=0.0"),
    ("llama", rope(YARN, beta_fast=-32.0), "rope_scaling.beta_fast=-32.0"),
    ("llama", rope(YARN, beta_fast="32"), "rope_scaling.beta_fast='32'"),
    ("llama", rope(YARN, beta_fast=1e308), "rope_scaling.beta_fast=1e+308"),  # mpe / (beta * 2 pi) -> log(0)
    ("llama", rope(YARN, beta_slow=float("inf")), "rope_scaling.beta_slow=inf"),
    ("llama", rope(YARN, beta_slow=5e-324), "rope_scaling.beta_slow=5e-324"),  # log(inf)
    ("llama", rope(YARN, beta_fast=1.0, beta_slow=2.0), "rope_scaling.beta_fast=1.0 must be >= beta_slow=2.0"),
    ("llama", rope(YARN, beta_slow=64.0), "rope_scaling.beta_fast=None must be >= beta_slow=64.0"),
    ("llama", rope(YARN, mscale="1"), "rope_scaling.mscale='1'"),
    ("llama", rope(YARN, mscale=-1.0), "rope_scaling.mscale=-1.0"),
    ("llama", rope(YARN, mscale_all_dim=float("nan")), "rope_scaling.mscale_all_dim=nan"),
    ("llama", rope(YARN, original_max_position_embeddings=0), "rope_scaling.original_max_position_embeddings=0"),
    ("llama", rope(YARN, original_max_position_embeddings=64.5),
     "rope_scaling.original_max_position_embeddings=64.5"),
    # longrope: short_factor / long_factor lists, factor, attention_factor, the original length
    ("llama", rope(LONGROPE, short_factor=[1.0]), "rope_scaling.short_factor must be a list of head_dim/2 = 8"),
    ("llama", rope(LONGROPE, short_factor="1.0"), "rope_scaling.short_factor must be a list"),
    ("llama", rope(LONGROPE, short_factor=[1.0] * 7 + ["x"]), "rope_scaling.short_factor[]='x'"),
    ("llama", rope(LONGROPE, short_factor=[1.0] * 7 + [float("nan")]), "rope_scaling.short_factor[]=nan"),
    ("llama", rope(LONGROPE, short_factor=[1.0] * 7 + [0.0]), "rope_scaling.short_factor[]=0.0"),
    ("llama", rope(LONGROPE, short_factor=[1.0] * 7 + [[1.0]]), "rope_scaling.short_factor[]=[1.0]"),
    ("llama", rope(LONGROPE, long_factor=[2.0] * 9), "rope_scaling.long_factor must be a list of head_dim/2 = 8"),
    ("llama", rope(LONGROPE, long_factor={"0": 2.0}), "rope_scaling.long_factor must be a list"),
    ("llama", rope(LONGROPE, long_factor=[2.0] * 7 + [1e9]), "rope_scaling.long_factor[]=1000000000.0"),
    ("llama", rope(LONGROPE, long_factor=[2.0] * 7 + [-1]), "rope_scaling.long_factor[]=-1"),
    ("llama", rope(LONGROPE, long_factor=DELETE), "missing the key 'long_factor'"),
    ("llama", rope(LONGROPE, factor=DELETE), "needs 'factor'"),
    ("llama", rope(LONGROPE, factor=0.5), "rope_scaling.factor=0.5"),
    ("llama", rope(LONGROPE, attention_factor=0.0), "rope_scaling.attention_factor=0.0"),
    ("llama", {**rope(LONGROPE), "max_position_embeddings": 1}, "max_position_embeddings=1"),
    ("llama", {**rope(LONGROPE), "original_max_position_embeddings": 1}, "original_max_position_embeddings=1"),
    # llama3: low/high frequency factors, original length, factor
    ("llama", rope(LLAMA3, low_freq_factor=DELETE), "missing the key 'low_freq_factor'"),
    ("llama", rope(LLAMA3, low_freq_factor="1"), "rope_scaling.low_freq_factor='1'"),
    ("llama", rope(LLAMA3, low_freq_factor=0.0), "rope_scaling.low_freq_factor=0.0"),
    ("llama", rope(LLAMA3, high_freq_factor=float("nan")), "rope_scaling.high_freq_factor=nan"),
    ("llama", rope(LLAMA3, high_freq_factor=1.0), "rope_scaling.high_freq_factor=1.0 must be > low_freq_factor"),
    ("llama", rope(LLAMA3, high_freq_factor=0.5), "rope_scaling.high_freq_factor=0.5 must be > low_freq_factor"),
    ("llama", rope(LLAMA3, original_max_position_embeddings=DELETE),
     "missing the key 'original_max_position_embeddings'"),
    ("llama", rope(LLAMA3, original_max_position_embeddings=0), "rope_scaling.original_max_position_embeddings=0"),
    ("llama", rope(LLAMA3, original_max_position_embeddings="64"),
     "rope_scaling.original_max_position_embeddings='64'"),
    ("llama", rope(LLAMA3, original_max_position_embeddings=128),
     "rope_scaling.original_max_position_embeddings=128 must be < max_position_embeddings=128"),
    ("llama", rope(LLAMA3, factor=0.5), "rope_scaling.factor=0.5"),
    # Open-Llama
    ("open-llama", {"hidden_size": 66}, "hidden_size=66 must be divisible by num_attention_heads=4"),
    ("open-llama", {"hidden_size": 36}, "head_dim=9"),
    ("open-llama", {"rms_norm_eps": "x"}, "rms_norm_eps='x'"),
    ("open-llama", {"use_stable_embedding": "yes"}, "use_stable_embedding='yes'"),
    ("open-llama", {"shared_input_output_embedding": 0}, "shared_input_output_embedding=0"),
    ("open-llama", {"rope_scaling": {"type": "linear", "factor": 1.0}}, "rope_scaling factor 1.0 must be a float > 1"),
    ("open-llama", {"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling factor 2 must be a float > 1"),
    ("open-llama", {"rope_scaling": {"type": "linear", "factor": float("nan")}}, "rope_scaling factor nan"),
    ("open-llama", {"rope_scaling": {"type": "linear", "factor": float("inf")}}, "rope_scaling factor inf"),
    ("open-llama", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling type 'yarn'"),
    ("open-llama", {"rope_scaling": {"type": ["linear"], "factor": 2.0}}, "rope_scaling type ['linear']"),
    ("open-llama", {"rope_scaling": {"type": "linear", "factor": 2.0, "x": 1}}, "rope_scaling={'factor': 2.0,"),
    ("open-llama", {"rope_scaling": "linear"}, "rope_scaling='linear'"),
    ("open-llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "hidden_size": 8}, "head_dim > 2"),
    # OPT
    ("opt", {"hidden_size": 66}, "hidden_size=66 must be divisible by num_attention_heads=4"),
    ("opt", {"ffn_dim": 0}, "ffn_dim=0"),
    ("opt", {"ffn_dim": 2**30}, "ffn_dim=1073741824"),
    ("opt", {"word_embed_proj_dim": 0}, "word_embed_proj_dim=0"),
    ("opt", {"word_embed_proj_dim": "32"}, "word_embed_proj_dim='32'"),
    ("opt", {"word_embed_proj_dim": C.MAX_HIDDEN * 2}, "word_embed_proj_dim=131072"),
    ("opt", {"max_position_embeddings": -1}, "max_position_embeddings=-1"),
    ("opt", {"do_layer_norm_before": "true"}, "do_layer_norm_before='true'"),
    ("opt", {"_remove_final_layer_norm": 1}, "_remove_final_layer_norm=1"),
    ("opt", {"enable_bias": None}, "enable_bias=None"),
    ("opt", {"layer_norm_elementwise_affine": "no"}, "layer_norm_elementwise_affine='no'"),
    ("opt", {"activation_function": "swiglu"}, "activation_function='swiglu'"),
    ("opt", {"activation_function": 3}, "activation_function=3"),
    ("opt", {"eos_token_id": float("nan")}, "eos_token_id=nan"),
    # sizes each within its limit that together imply more than MAX_PARAMETERS weights
    ("llama", {"num_hidden_layers": 1024, "hidden_size": 2**16, "intermediate_size": 2**18, "num_attention_heads": 512,
               "num_key_value_heads": 512, "head_dim": 128}, "num_hidden_layers=1024"),
    ("llama", {"vocab_size": C.MAX_VOCAB, "hidden_size": 2**16, "num_hidden_layers": 256, "intermediate_size": 2**16,
               "num_attention_heads": 512, "num_key_value_heads": 512, "head_dim": 128}, "vocab_size=4194304"),
    ("opt", {"max_position_embeddings": C.MAX_POSITIONS, "hidden_size": 2**16, "num_attention_heads": 512},
     "max_position_embeddings=16777216"),
]


def case_id(case):
    family, _, message = case
    return f"{family}:{message[:60]}"


@pytest.mark.parametrize("family, changes, message", BAD, ids=[case_id(c) for c in BAD])
def test_bad_field_is_one_config_error_naming_it(family, changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        from_hf_config(edited(family, changes))
    assert len(str(info.value)) < 400, "the message must summarize the value, not print it"


def test_oversized_values_are_summarized_in_the_message():
    """A 100 KB string or list in a field is cut by reprlib: the message stays short and still names the field."""
    for changes in ({"hidden_act": "x" * 100_000}, {"architectures": ["y" * 100_000]},
                    {"eos_token_id": list(range(100_000))}, {"rope_scaling": {"rope_type": "z" * 100_000}},
                    {"model_type": "w" * 100_000}):
        with pytest.raises(ConfigError, match=next(iter(changes))) as info:
            from_hf_config(edited("llama", changes))
        assert len(str(info.value)) < 400


def write_config(folder, text):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(text)
    return folder


def golden_text(changes):
    """llama_mha's config.json text with each field's value replaced by raw JSON text."""
    text = json.dumps(edited("llama", {key: "@" + key for key in changes}))
    for key, raw in changes.items():
        text = text.replace(json.dumps("@" + key), raw)
    return text


# (raw JSON text of one field, text the ConfigError must contain): values JSON itself can spell
BAD_JSON_VALUES = [
    ({"rms_norm_eps": "NaN"}, "rms_norm_eps=nan"),
    ({"rope_theta": "Infinity"}, "rope_theta=inf"),
    ({"rms_norm_eps": "-Infinity"}, "rms_norm_eps=-inf"),
    ({"rms_norm_eps": "1e400"}, "rms_norm_eps=inf"),  # Python's json reads an overflowing float as inf
    ({"num_hidden_layers": "1" + "0" * 400}, "num_hidden_layers=<a 1329-bit integer>"),
    ({"rope_scaling": '{"rope_type": "linear", "factor": NaN}'}, "rope_scaling.factor=nan"),
    ({"rope_scaling": '{"rope_type": "yarn", "factor": 2.0, "beta_fast": -Infinity}'}, "rope_scaling.beta_fast=-inf"),
    ({"vocab_size": "192.0"}, "vocab_size=192.0"),
    ({"tie_word_embeddings": '"false"'}, "tie_word_embeddings='false'"),
]


@pytest.mark.parametrize("changes, message", BAD_JSON_VALUES, ids=[next(iter(c)) + "=" + next(iter(c.values()))[:12]
                                                                     for c, _ in BAD_JSON_VALUES])
def test_bad_json_value_names_the_field(tmp_path, changes, message):
    folder = write_config(tmp_path, golden_text(changes))
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_config(folder)


def test_bad_config_files_name_the_file(tmp_path):
    """What no field can be blamed for: the file's size, encoding, syntax, nesting and digit counts."""
    cases = {
        "huge_integer": (golden_text({"vocab_size": "9" * 5000}), "an integer of 5000 digits"),
        "deep_nesting": (golden_text({"quantization_config": "[" * 100_000 + "]" * 100_000}), "nested too deeply"),
        "oversized": (golden_text({"id2label": json.dumps({str(i): "L" * 100 for i in range(20_000)})}),
                      f"over {C.MAX_CONFIG_BYTES} bytes"),
        "not_utf8": (b'{"model_type": "ll\xe9ama"}', "not valid JSON"),
        "truncated": (golden_text({})[:-10], "not valid JSON"),
        "empty": ("", "not valid JSON"),
        "a_list": ("[1, 2]", "expected a JSON object, got list"),
    }
    for name, (text, message) in cases.items():
        folder = tmp_path / name
        os.makedirs(folder)
        (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            read_config(str(folder))
        assert name in str(info.value), "the message names the file"
    os.makedirs(tmp_path / "dir" / "config.json")  # a folder where the file should be
    with pytest.raises(ConfigError, match="cannot be read"):
        read_config(str(tmp_path / "dir"))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_endless_config_file_is_read_no_further_than_the_limit(tmp_path):
    """A config.json that is a link to /dev/zero: the read stops at MAX_CONFIG_BYTES + 1 bytes."""
    os.symlink("/dev/zero", tmp_path / "config.json")
    with pytest.raises(ConfigError, match=f"over {C.MAX_CONFIG_BYTES} bytes"):
        read_config(str(tmp_path))


@pytest.mark.parametrize("changes", [
    {"num_hidden_layers": 10**9},
    {"vocab_size": 10**12, "hidden_size": 10**6},
    {"num_hidden_layers": 1024, "hidden_size": 2**16, "intermediate_size": 2**18, "num_attention_heads": 512,
     "num_key_value_heads": 512, "head_dim": 128},
], ids=["layers", "vocab_hidden", "all_at_the_limits"])
def test_lying_config_fails_fast_before_allocating(tmp_path, changes):
    """A 1 KB config.json claiming a huge model is refused by refimpl.load in milliseconds, not after allocating."""
    folder = tmp_path / "model"
    shutil.copytree(os.path.join(GOLDEN, "models", "llama_mha"), folder)
    with open(folder / "config.json", "w") as f:
        json.dump(edited("llama", changes), f)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=next(iter(changes))):
        refimpl.load(str(folder))
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(GOLDEN, "models", "*", "config.json"))),
                         ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_every_golden_config_still_loads(path):
    cfg = read_config(path)
    assert cfg.family in ("llama", "open-llama", "opt")


# Real configs (sizes and RoPE settings as published; fields refimpl ignores left out): the limits must admit them.
LLAMA_3_1_405B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 16384,
    "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
REAL_CONFIGS = {
    "llama-3.1-405b": LLAMA_3_1_405B,
    "llama-2-70b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "pretraining_tp": 1,
                    "pad_token_id": 0, "rope_scaling": None},
    "llama-10m-context": {**LLAMA_3_1_405B, "max_position_embeddings": 10485760,
                          "rope_scaling": {**LLAMA_3_1_405B["rope_scaling"], "factor": 16.0}},
    "yarn-llama-2-7b-128k": {  # 4.46 (and so refimpl) ignores original_max_position_embeddings and "finetuned" here
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 32.0, "original_max_position_embeddings": 4096, "type": "yarn", "finetuned": True}},
    "yarn-with-mscale": {  # DeepSeek-style keys of later transformers versions
        "model_type": "llama", "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288,
        "num_hidden_layers": 60, "num_attention_heads": 128, "head_dim": 128, "max_position_embeddings": 163840,
        "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                              "mscale": 1.0, "mscale_all_dim": 1.0,
                                              "original_max_position_embeddings": 4096}},
    "longrope-phi3-mini-like": {
        "model_type": "llama", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "short_factor": [1.05] * 48, "long_factor": [1.0 + i for i in range(48)]}},
    "open-llama-7b": {"model_type": "open-llama", "vocab_size": 100000, "hidden_size": 4096, "intermediate_size": 11008,
                      "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
                      "rms_norm_eps": 1e-06, "use_stable_embedding": False, "shared_input_output_embedding": False},
    "opt-175b": {"model_type": "opt", "vocab_size": 50272, "hidden_size": 12288, "ffn_dim": 49152,
                 "num_hidden_layers": 96, "num_attention_heads": 96, "max_position_embeddings": 2048,
                 "word_embed_proj_dim": 12288, "do_layer_norm_before": True, "activation_function": "relu"},
    "opt-350m": {"model_type": "opt", "vocab_size": 50272, "hidden_size": 1024, "ffn_dim": 4096,
                 "num_hidden_layers": 24, "num_attention_heads": 16, "max_position_embeddings": 2048,
                 "word_embed_proj_dim": 512, "do_layer_norm_before": False, "pad_token_id": 1, "bos_token_id": 2,
                 "eos_token_id": 2},
}


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_model_configs_fit_the_limits(name):
    cfg = from_hf_config(REAL_CONFIGS[name])
    assert C._parameter_count(cfg) <= C.MAX_PARAMETERS


def test_parameter_count_bounds_the_golden_weights():
    """The derived-size check is an upper estimate of what a checkpoint holds (biases and both heads counted)."""
    for case in sorted(os.listdir(os.path.join(GOLDEN, "models"))):
        folder = os.path.join(GOLDEN, "models", case)
        stored = sum(int(np.prod(np.shape(a))) for a in refimpl.weights.read_checkpoint(folder).values())
        assert stored <= C._parameter_count(read_config(folder)) <= 2 * stored, case


def test_every_field_a_family_reads_has_a_rule():
    for table in (C.LLAMA_FIELDS, C.OPEN_LLAMA_FIELDS, C.OPT_FIELDS):
        assert set(table) <= set(C.FIELD_RULES)
    for keys in C.ROPE_REQUIRED_KEYS.values():
        assert set(keys) <= set(C.ROPE_RULES)


# ---------------------------------------------------------------------------------------------------- fuzzing

FIELD_NAMES = sorted(set(C.LLAMA_FIELDS) | set(C.OPEN_LLAMA_FIELDS) | set(C.OPT_FIELDS) | {
    "num_labels", "id2label", "problem_type", "architectures", "partial_rotary_factor",
    "original_max_position_embeddings", "model_type"})
ROPE_KEYS = sorted(C.ROPE_RULES) + ["type", "rope_type"]
NAMES = (*C.KNOWN_ACTIVATIONS, *C.ROPE_REQUIRED_KEYS, "llama", "open-llama", "opt", "LlamaForCausalLM", "regression")
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6), st.sampled_from(NAMES),
    st.sampled_from([0, 1, 2, 3, -1, 4, 8, 16, 2**31, 2**63, 10**400, C.MAX_VOCAB + 1, 0.5, 1.0, 2.0, 1e-6, 1e400]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(ROPE_KEYS) | st.text(max_size=3), inner, max_size=4), max_leaves=10)
NUMBERS = st.one_of(  # mostly plausible sizes and factors, sometimes anything a float or an int can be
    st.integers(-2, 200), st.floats(0, 64), st.floats(), st.integers(),
    st.sampled_from([0.0, 1.0, 1 / 1024, 1024.0, 1024.5, 5e-324, 1e308, float("nan"), float("inf"), 2**24, 2**31]))
ROPE_TYPES = st.sampled_from([*C.ROPE_REQUIRED_KEYS, "su"])
GOLDEN_CONFIGS = [golden_config(os.path.basename(os.path.dirname(p)))
                  for p in sorted(glob.glob(os.path.join(GOLDEN, "models", "*", "config.json")))]


@st.composite
def rope_dicts(draw):
    """A rope_scaling whose keys (required ones always, the others at random) hold numbers, lists or anything."""
    rope_type = draw(ROPE_TYPES)
    rs = {draw(st.sampled_from(["rope_type", "type"])): rope_type}
    for key in C.ROPE_RULES:
        if key in C.ROPE_REQUIRED_KEYS.get(rope_type, ()) or draw(st.booleans()):
            lengths = st.sampled_from([8, 16]) if key in ("short_factor", "long_factor") else st.just(None)
            length = draw(lengths)  # head_dim / 2 of the golden models is 8 or 16
            plausible = NUMBERS if length is None else st.lists(NUMBERS, min_size=length, max_size=length)
            rs[key] = draw(st.one_of(plausible, plausible, VALUES))
    return rs


@st.composite
def mutated_configs(draw):
    """A golden config.json dict with 1-4 fields replaced by numbers or random JSON-ish values, or removed."""
    hf = dict(draw(st.sampled_from(GOLDEN_CONFIGS)))
    names = draw(st.lists(st.sampled_from(FIELD_NAMES), min_size=1, max_size=4, unique=True))
    if draw(st.booleans()) and "rope_scaling" not in names:
        names.append("rope_scaling")
    for name in names:
        kind = draw(st.sampled_from(["remove", "number", "number", "anything"]))
        if kind == "remove":
            hf.pop(name, None)
        elif name == "rope_scaling":
            hf[name] = draw(rope_dicts()) if kind == "number" else draw(VALUES)
        else:
            hf[name] = draw(NUMBERS if kind == "number" else VALUES)
    return hf


def outcome(read):
    try:
        return read()
    except ConfigError as exc:
        return exc


SOAK_EXAMPLES = os.environ.get("REFIMPL_CONFIG_EXAMPLES")  # e.g. 5000: that many *random* examples instead


@settings(max_examples=int(SOAK_EXAMPLES) if SOAK_EXAMPLES else 400, derandomize=not SOAK_EXAMPLES, database=None,
          deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hf=mutated_configs())
def test_random_fields_give_a_config_or_a_config_error(hf):
    """Never TypeError, OverflowError, ZeroDivisionError, ...; the same verdict from the dict and from its file;
    an accepted config gives finite, positive RoPE frequencies and scaling (also past max_position_embeddings)."""
    result = outcome(lambda: from_hf_config(hf))
    with tempfile.TemporaryDirectory() as folder:
        write_config(folder, json.dumps(hf))
        from_file = outcome(lambda: read_config(folder))
    assert isinstance(result, ConfigError) == isinstance(from_file, ConfigError), (result, from_file)
    event("refused" if isinstance(result, ConfigError) else f"accepted: {getattr(result, 'rope_type', 'opt')}")
    if isinstance(result, ConfigError) or result.family == "opt":
        return
    if result.family == "llama":
        state = llama_rope_state(result, np.float32)
        states = [(state.inv_freq, state.attention_scaling),
                  llama_rope_init(result, np.float32, seq_len=2 * result.max_position_embeddings)]
    else:
        state = open_llama_rope_state(result, np.float32)
        states = [(state.inv_freq, state.attention_scaling)]
    for inv_freq, scaling in states:
        assert inv_freq.shape == (result.head_dim // 2,)
        assert np.all(np.isfinite(inv_freq)) and np.all(inv_freq > 0) and np.isfinite(scaling) and scaling > 0
