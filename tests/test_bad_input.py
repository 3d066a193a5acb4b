"""Bad input gets one clear refimpl error naming the bad value, never a NumPy traceback or silent wrong numbers."""
import json
import os
import shutil

import numpy as np
import pytest

import refimpl
from refimpl import CheckpointError, ConfigError, InputError
from golden_cases import GOLDEN


def golden(case):
    return refimpl.load(f"{GOLDEN}/models/{case}")


def copy_model(case, tmp_path):
    target = tmp_path / case
    shutil.copytree(f"{GOLDEN}/models/{case}", target)
    return target


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", ["llama_mha", "openllama_default", "opt_preln"])
def test_token_id_outside_vocabulary(case):
    m = golden(case)
    with pytest.raises(InputError, match=rf"token id {m.config.vocab_size}\b"):
        m(input_ids=[[1, 2, m.config.vocab_size]])
    with pytest.raises(InputError, match="token id -1"):
        m(input_ids=[[1, -1]])


@pytest.mark.parametrize("case", ["llama_mha", "openllama_default", "opt_preln"])
def test_attention_mask_of_the_wrong_shape(case):
    m = golden(case)
    with pytest.raises(InputError, match=r"attention_mask has shape \[1, 2\].*\[1, 3\]"):
        m(input_ids=[[5, 6, 7]], attention_mask=[[1, 1]])
    with pytest.raises(InputError, match="only 0 and 1, found 2"):
        m(input_ids=[[5, 6, 7]], attention_mask=[[1, 2, 1]])


def test_attention_mask_must_cover_the_cache():
    m = golden("llama_mha")
    past = m(input_ids=[[5, 6, 7]], use_cache=True).past_key_values
    with pytest.raises(InputError, match=r"\[1, 4\]"):
        m(input_ids=[[8]], past_key_values=past, attention_mask=[[1]])


def test_opt_position_past_its_learned_table():
    m = golden("opt_preln")
    mpe = m.config.max_position_embeddings
    ids = np.full((1, mpe + 1), 5)
    with pytest.raises(InputError, match=rf"OPT position {mpe} is outside its learned table"):
        m(input_ids=ids)
    m(input_ids=ids[:, :mpe])  # exactly the table's length is fine


def test_open_llama_position_past_its_rotary_table():
    m = golden("openllama_default")
    with pytest.raises(InputError, match="position_ids holds 12.*3 rows"):
        m(input_ids=[[5, 6, 7]], position_ids=[[10, 11, 12]])


def test_inputs_both_or_neither():
    m = golden("llama_mha")
    with pytest.raises(InputError, match="exactly one of input_ids and inputs_embeds"):
        m()
    with pytest.raises(InputError, match="exactly one"):
        m(input_ids=[[1]], inputs_embeds=np.zeros((1, 1, m.config.hidden_size), np.float32))
    with pytest.raises(InputError, match=r"inputs_embeds has shape \[1, 1, 3\]"):
        m(inputs_embeds=np.zeros((1, 1, 3), np.float32))
    with pytest.raises(InputError, match="empty"):
        m(input_ids=np.zeros((1, 0), np.int64))
    with pytest.raises(InputError, match="integers"):
        m(input_ids=[[1.5, 2.0]])


def test_labels_out_of_range():
    m = golden("llama_mha")
    with pytest.raises(InputError, match=rf"label {m.config.vocab_size} is outside"):
        m(input_ids=[[5, 6, 7]], labels=[[5, 6, m.config.vocab_size]])


def test_bad_cache_and_head_mask():
    m = golden("opt_preln")
    with pytest.raises(InputError, match="past_key_values must be a tuple of 2"):
        m(input_ids=[[5]], past_key_values=((np.zeros((1, 4, 1, 16)), np.zeros((1, 4, 1, 16))),))
    with pytest.raises(InputError, match=r"head_mask has shape \[1, 4\]"):
        m(input_ids=[[5, 6]], head_mask=np.ones((1, 4)))


def test_sequence_classification_without_pad_refuses_a_batch(tmp_path):
    folder = copy_model("llama_seqcls", tmp_path)
    edit_config(folder, pad_token_id=None)
    m = refimpl.load(folder)
    with pytest.raises(InputError, match="pad_token_id"):
        m(input_ids=[[5, 6], [7, 8]])


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_config_missing_a_required_field(tmp_path, field):
    folder = copy_model("llama_mha", tmp_path)
    edit_config(folder, **{field: None})
    with pytest.raises(ConfigError, match=f"missing the required field '{field}'"):
        refimpl.load(folder)


@pytest.mark.parametrize("changes, message", [
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"hidden_act": "swiglu"}, "hidden_act='swiglu'"),
    ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, "type 'su'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing the key 'low_freq_factor'"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0], "long_factor": [1.0]}},
     "short_factor must be a list"),
    ({"hidden_size": -4}, "hidden_size=-4"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"architectures": ["LlamaForTokenClassification"]}, "LlamaForTokenClassification"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_config_contradictory_or_unsupported(tmp_path, changes, message):
    folder = copy_model("llama_mha", tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=message):
        refimpl.load(folder)


def test_open_llama_rope_scaling_validation(tmp_path):
    folder = copy_model("openllama_default", tmp_path)
    edit_config(folder, rope_scaling={"type": "linear", "factor": 1.0})
    with pytest.raises(ConfigError, match="factor 1.0 must be a float > 1"):
        refimpl.load(folder)


def test_pretraining_tp_with_bias_is_refused(tmp_path):
    folder = copy_model("llama_mha", tmp_path)
    edit_config(folder, pretraining_tp=2, attention_bias=True)
    with pytest.raises(ConfigError, match="pretraining_tp=2 with attention_bias"):
        refimpl.load(folder)


def test_config_disagreeing_with_the_weights(tmp_path):
    folder = copy_model("llama_mha", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    edit_config(folder, intermediate_size=cfg["intermediate_size"] + 1)
    with pytest.raises(CheckpointError, match=r"layers.0.gate_proj has shape .* the config implies"):
        refimpl.load(folder)
    edit_config(folder, intermediate_size=cfg["intermediate_size"], num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="layers.1"):
        refimpl.load(folder)
    edit_config(folder, num_hidden_layers=cfg["num_hidden_layers"], attention_bias=True)
    with pytest.raises(CheckpointError, match="missing the tensor layers.0.q_proj_bias"):
        refimpl.load(folder)


def test_checkpoint_missing_or_broken(tmp_path):
    folder = copy_model("opt_preln", tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not fit the file"):
        refimpl.load(folder)
    weights.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="header length"):
        refimpl.load(folder)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        refimpl.load(folder)
    with pytest.raises(ConfigError, match="no config.json"):
        refimpl.load(tmp_path / "nowhere")


def test_unsupported_dtype():
    with pytest.raises(ConfigError, match="float16"):
        refimpl.load(f"{GOLDEN}/models/llama_mha", dtype=np.float16)


def test_class_of_another_family():
    with pytest.raises(ConfigError, match="model_type is 'opt'"):
        refimpl.LlamaForCausalLM.from_pretrained(f"{GOLDEN}/models/opt_preln")
