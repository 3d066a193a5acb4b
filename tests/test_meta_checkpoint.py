"""Meta's original Llama 2 checkpoints (params.json + consolidated.NN.pth), read by refimpl/formats/meta.py.

The test writes them as Meta's code lays them out: from a Hugging Face model, the inverse of transformers' conversion
script (convert_llama_weights_to_hf.py): q/k rows put back in Meta's interleaved RoPE order, every matrix split across
the model-parallel ranks on fairscale's axis (ColumnParallelLinear wq/wk/wv/w1/w3/output by rows, RowParallelLinear
wo/w2 and ParallelEmbedding tok_embeddings by columns, norms replicated), each rank's dict saved with torch.save.

Only llama_mha among the golden cases is a model Meta's format can express: no biases, SiLU, untied lm_head, a
causal-LM head, default RoPE, pretraining_tp 1. Grouped-query attention is covered by a random model checked against
transformers itself. fp32 shards give the golden refimpl outputs bit for bit (the same arithmetic on the same values);
fp16 and bf16 shards give exactly what refimpl computes from the rounded weights, and the golden logits within
test_checkpoint_formats.py's rounding tolerance 4 (L + 1) u max|logit|.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import checkpoint_files as cf
import refimpl
from golden_cases import GOLDEN, load_case, replay
from refimpl import CheckpointError, ConfigError
from refimpl.formats import meta
from refimpl.stored import StoredMatrix
from refimpl.weights import checkpoint_files, list_checkpoint, read_model_config

torch = pytest.importorskip("torch", reason="the test writes Meta's shards with torch.save, as Meta did")

# transformers name (per layer: after "model.layers.N.") -> (Meta name, fairscale split axis: 0 rows, 1 columns,
# None replicated), written from the conversion script's torch.cat calls (llama_version 2).
TO_META_TOP = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}
TO_META_LAYER = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}

# A grouped-query Llama no golden case has: 8 query heads sharing 2 kv heads, Code Llama's rope_theta.
GQA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 192,
    "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 96,
    "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 16384, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}


def interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """transformers' q/k rows -> Meta's: the inverse of the script's permute(), rows (head, 2, Dh/2) -> (head, Dh/2, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def meta_shards(hf: dict, config: dict, shards: int) -> list[dict]:
    """{transformers name: array} -> one {Meta name: array} per model-parallel rank, as Meta's code saved them."""
    heads = {"self_attn.q_proj.weight": config["num_attention_heads"],
             "self_attn.k_proj.weight": config.get("num_key_value_heads") or config["num_attention_heads"]}
    out = [{} for _ in range(shards)]
    for name, array in hf.items():
        if name in TO_META_TOP:
            (meta_name, axis), rest = TO_META_TOP[name], None
        else:
            _, _, index, rest = name.split(".", 3)  # model.layers.N.rest
            meta_name, axis = TO_META_LAYER[rest]
            meta_name = f"layers.{index}.{meta_name}"
        if rest in heads:
            array = interleave(array, heads[rest])
        parts = [array] * shards if axis is None else np.split(array, shards, axis=axis)
        for rank, part in enumerate(parts):
            out[rank][meta_name] = np.ascontiguousarray(part)
    return out


def meta_params(config: dict) -> dict:
    """params.json for a config: Llama 2's fields; multiple_of and ffn_dim_multiplier chosen to give its FFN width."""
    params = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
              "n_heads": config["num_attention_heads"], "multiple_of": config["intermediate_size"],
              "ffn_dim_multiplier": 0.5, "norm_eps": config["rms_norm_eps"], "vocab_size": -1}
    assert int(0.5 * int(8 * config["hidden_size"] / 3)) <= config["intermediate_size"]  # rounds up to it
    if config.get("num_key_value_heads", config["num_attention_heads"]) != config["num_attention_heads"]:
        params["n_kv_heads"] = config["num_key_value_heads"]  # Llama 2 70B writes it; 7B and 13B leave it out
    if config.get("rope_theta", 10000.0) != 10000.0:
        params["rope_theta"] = config["rope_theta"]
    return params


def write_meta(folder, hf: dict, config: dict, shards: int = 2, kind: str = "fp32", edit=None, params=None) -> str:
    """A Meta checkpoint folder: params.json, consolidated.NN.pth (torch.save of each rank's dict), tokenizer.model.
    edit(list of per-rank {name: torch tensor}) may change the dicts before they are saved."""
    os.makedirs(folder, exist_ok=True)
    dtype = getattr(torch, TORCH_DTYPES[kind])
    ranks = [{name: torch.from_numpy(a).to(dtype) for name, a in shard.items()}
             for shard in meta_shards(hf, config, shards)]
    if edit is not None:
        edit(ranks)
    for rank, state in enumerate(ranks):
        torch.save(state, os.path.join(folder, f"consolidated.{rank:02d}.pth"))
    with open(os.path.join(folder, "params.json"), "w", encoding="utf-8") as f:
        json.dump(meta_params(config) if params is None else params, f)
    shutil.copy(os.path.join(GOLDEN, "models", "llama_text", "tokenizer.model"), folder)
    return str(folder)


def gqa_tensors() -> dict[str, np.ndarray]:
    """Random weights of GQA_CONFIG under transformers' names (norms near 1, matrices ~N(0, 0.1))."""
    rng = np.random.default_rng(7)
    c = GQA_CONFIG
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    Dh = D // c["num_attention_heads"]
    shapes = {"self_attn.q_proj.weight": (D, D), "self_attn.k_proj.weight": (c["num_key_value_heads"] * Dh, D),
              "self_attn.v_proj.weight": (c["num_key_value_heads"] * Dh, D), "self_attn.o_proj.weight": (D, D),
              "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F),
              "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,)}
    tensors = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    tensors.update({f"model.layers.{i}.{n}": s for i in range(c["num_hidden_layers"]) for n, s in shapes.items()})
    return {name: (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.1 * rng.standard_normal(shape))
            .astype(np.float32) for name, shape in tensors.items()}


def gqa_hf_folder(root) -> str:
    folder = os.path.join(root, "gqa-hf")
    os.makedirs(folder, exist_ok=True)
    cf.write_safetensors(os.path.join(folder, "model.safetensors"), gqa_tensors())
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(GQA_CONFIG, f)
    return folder


def golden_meta(root, case="llama_mha", shards=2, kind="fp32", **options) -> str:
    return write_meta(os.path.join(root, f"{case}-meta{shards}-{kind}"), cf.golden_tensors(case), cf.golden_config(case),
                      shards, kind, **options)


def gqa_meta(root, shards=2, kind="fp32", **options) -> str:
    return write_meta(os.path.join(root, f"gqa-meta{shards}-{kind}"), gqa_tensors(), GQA_CONFIG, shards, kind, **options)


def outputs(case, model) -> dict:
    """{'call.key': (golden, ours)} for every stored output of the golden case."""
    return {f"{call}.{key}": (expected, np.asarray(actual)) for call, key, expected, actual in replay(case, model=model)}


def assert_same(replayed: dict, reference: dict) -> None:
    for key, (_, theirs) in reference.items():
        np.testing.assert_array_equal(replayed[key][1], theirs, err_msg=key)


def max_logit_error(replayed: dict) -> float:
    return max(float(np.max(np.abs(ours.astype(np.float64) - golden)))
               for key, (golden, ours) in replayed.items() if "logits" in key)


# --- the numbers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_gives_the_golden_logits(shards, tmp_path):
    """fp32 shards: every output equals refimpl on the golden safetensors bit for bit, and the golden (transformers)
    logits within 1e-5 (the golden tests' float32 bound)."""
    model = refimpl.load(golden_meta(tmp_path, shards=shards))
    assert type(model).__name__ == "LlamaForCausalLM"
    replayed = outputs("llama_mha", model)
    assert_same(replayed, outputs("llama_mha", refimpl.load(os.path.join(GOLDEN, "models", "llama_mha"))))
    assert max_logit_error(replayed) < 1e-5


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_half_precision_meta_shards(kind, tmp_path):
    """fp16 / bf16 shards (Meta ships bf16): kept as stored and widened per product, they give exactly what refimpl
    computes from the golden weights rounded the same way, and the golden logits within 4 (L + 1) u max|logit|."""
    model = refimpl.load(golden_meta(tmp_path, kind=kind))
    q = model.params["layers"][0]["q_proj"]
    assert isinstance(q, StoredMatrix) and q.stored_dtype == {"fp16": "F16", "bf16": "BF16"}[kind]
    rounded_folder = cf.new_folder("llama_mha", tmp_path, "rounded")
    cf.write_safetensors(os.path.join(rounded_folder, "model.safetensors"), cf.rounded_tensors("llama_mha", kind))
    replayed = outputs("llama_mha", model)
    assert_same(replayed, outputs("llama_mha", refimpl.load(rounded_folder)))
    data, _ = load_case("llama_mha")
    largest = max(float(np.max(np.abs(data[k]))) for k in data.files if "logits" in k)
    assert max_logit_error(replayed) < 4 * (2 + 1) * UNIT_ROUNDOFF[kind] * largest


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_gqa_weights_come_back_bit_for_bit_tile_by_tile(kind, tmp_path):
    """Every tensor, whole (load) and in every band of rows (rows: across shard and head boundaries), equals the
    transformers tensor, stored as the shards store it (bf16: the bit patterns)."""
    stored = list_checkpoint(gqa_meta(tmp_path, kind=kind), progress=False)
    expected = gqa_tensors()
    assert sorted(stored) == sorted(expected)
    for name, array in expected.items():
        bits = cf.to_bf16_bits(array) if kind == "bf16" else array
        values = cf.from_bf16_bits(bits) if kind == "bf16" else array
        assert stored[name].shape == array.shape and stored[name].dtype == {"fp32": "F32", "bf16": "BF16"}[kind]
        np.testing.assert_array_equal(stored[name].load(), values, err_msg=name)
        if array.ndim == 2:
            for start, stop in [(0, array.shape[0]), (3, 11), (5, 6), (array.shape[0] // 2 - 3, array.shape[0] // 2 + 5),
                                (7, 7)]:
                np.testing.assert_array_equal(stored[name].rows(start, stop), bits[start:stop],
                                              err_msg=f"{name} rows {start}:{stop}")


def test_gqa_meta_checkpoint_matches_transformers(tmp_path):
    """Grouped-query attention (8 heads, 2 kv heads, 2 shards, rope_theta 1e6): refimpl on the Meta folder equals
    refimpl on the same weights as safetensors bit for bit, and transformers' logits within 1e-5."""
    transformers = pytest.importorskip("transformers")
    ids = np.array([[1, 17, 42, 5, 88, 3, 60, 2, 9]])
    ours = refimpl.load(gqa_meta(tmp_path))(input_ids=ids).logits
    hf_folder = gqa_hf_folder(tmp_path)
    np.testing.assert_array_equal(ours, refimpl.load(hf_folder)(input_ids=ids).logits)
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf_folder, torch_dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids)).logits.numpy()
    assert float(np.max(np.abs(ours - expected))) < 1e-5


# --- the config -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_config_is_what_the_conversion_script_writes(which, tmp_path):
    """read_meta_config == the LlamaConfig write_model builds (llama_version 2): its intermediate_size formula, 4096
    positions (16384 when rope_theta > 10000: Code Llama), vocab from the embedding, n_kv_heads, untied, ids 1 / 2."""
    transformers = pytest.importorskip("transformers")
    script = pytest.importorskip("transformers.models.llama.convert_llama_weights_to_hf")
    folder = golden_meta(tmp_path) if which == "mha" else gqa_meta(tmp_path)
    with open(os.path.join(folder, "params.json"), encoding="utf-8") as f:
        params = json.load(f)
    theta = params.get("rope_theta", 10000.0)
    expected = transformers.LlamaConfig(
        hidden_size=params["dim"], num_attention_heads=params["n_heads"], num_hidden_layers=params["n_layers"],
        intermediate_size=script.compute_intermediate_size(params["dim"], params["ffn_dim_multiplier"],
                                                           params["multiple_of"]),
        rms_norm_eps=params["norm_eps"], num_key_value_heads=params.get("n_kv_heads", params["n_heads"]),
        vocab_size=192 if which == "mha" else 96, rope_theta=theta, rope_scaling=None,
        max_position_embeddings=16384 if theta > 10000.0 else script.CONTEXT_LENGTH_FOR_VERSION["2"],
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    expected = json.loads(expected.to_json_string())  # what save_pretrained writes into config.json
    expected.pop("transformers_version")
    assert meta.read_meta_config(folder) == expected
    ours = meta.read_meta_config(folder)
    assert read_model_config(folder) == refimpl.from_hf_config(ours)


def test_the_embedding_gives_the_vocab_size_and_the_config_is_checked_against_the_shapes(tmp_path):
    hf, config = cf.golden_tensors("llama_mha"), cf.golden_config("llama_mha")
    params = meta_params(config)
    assert meta.read_meta_config(golden_meta(tmp_path))["vocab_size"] == 192  # params.json says -1
    folder = write_meta(tmp_path / "v192", hf, config, params={**params, "vocab_size": 192})
    assert meta.read_meta_config(folder)["vocab_size"] == 192
    with pytest.raises(CheckpointError, match="vocab_size=100, but tok_embeddings.weight has 192 rows"):
        meta.read_meta_config(write_meta(tmp_path / "v100", hf, config, params={**params, "vocab_size": 100}))
    with pytest.raises(CheckpointError, match=r"feed_forward.w2.weight joined from 2 shard\(s\) has shape \[64, 96\], "
                                              r"params.json implies \[64, 192\]"):
        meta.read_meta_config(write_meta(tmp_path / "ffn", hf, config, params={**params, "ffn_dim_multiplier": 1}))


# --- laziness -------------------------------------------------------------------------------------------------------

def test_listing_reads_no_tensor_data_and_a_tile_reads_only_its_rows(tmp_path, monkeypatch):
    """Listing and the config touch no tensor bytes; a tile of rows reads only the stored rows it needs: a row split
    from the shard holding them, a column split the same rows of every shard, q/k the band of whole heads."""
    folder = gqa_meta(tmp_path)
    reads = []
    real = meta.list_torch_bin

    def recording(file):
        def wrap(name, tensor):
            def rows(a, b):
                reads.append((os.path.basename(file)[-6:-4], name, a, b))  # ("01", name, a, b)
                return tensor.rows(a, b)

            def load():
                reads.append((os.path.basename(file)[-6:-4], name, "load"))
                return tensor.load()
            return tensor._replace(rows=rows, load=load)
        return {name: wrap(name, tensor) for name, tensor in real(file).items()}

    monkeypatch.setattr(meta, "list_torch_bin", recording)
    stored = list_checkpoint(folder, progress=False)
    read_model_config(folder)
    assert reads == []
    stored["model.layers.1.mlp.gate_proj.weight"].rows(100, 104)  # rows 96.. are shard 1's rows 0..
    assert reads == [("01", "layers.1.feed_forward.w1.weight", 4, 8)]
    reads.clear()
    stored["model.layers.0.self_attn.o_proj.weight"].rows(3, 5)
    assert reads == [("00", "layers.0.attention.wo.weight", 3, 5), ("01", "layers.0.attention.wo.weight", 3, 5)]
    reads.clear()
    stored["model.layers.0.self_attn.q_proj.weight"].rows(41, 43)  # query head 5 (rows 40..47) is shard 1's head 1
    assert reads == [("01", "layers.0.attention.wq.weight", 8, 16)]
    reads.clear()
    stored["model.layers.0.self_attn.k_proj.weight"].rows(6, 10)  # kv heads 0 and 1: one per shard
    assert reads == [("00", "layers.0.attention.wk.weight", 0, 8), ("01", "layers.0.attention.wk.weight", 0, 8)]


# --- finding the folder ---------------------------------------------------------------------------------------------

def test_a_meta_folder_is_found_and_inspected(tmp_path, capsys):
    from refimpl.cli import main

    folder = golden_meta(tmp_path, kind="bf16")
    assert meta.is_meta_folder(folder)
    files, _, _ = checkpoint_files(folder)
    assert [os.path.basename(f) for f in files] == ["consolidated.00.pth", "consolidated.01.pth"]
    assert main(["inspect", folder, "--quiet"]) == 0
    out = capsys.readouterr().out
    for expected in ("Meta consolidated.NN.pth (model-parallel shards), 2 files", "class       LlamaForCausalLM",
                     "4 heads (4 kv, head_dim 16), intermediate 96, vocab 192, context 4096",
                     "parameters  94,528 in 21 tensors", "BF16: 21 tensors", "untied"):
        assert expected in out, expected
    shutil.copy(os.path.join(GOLDEN, "models", "llama_mha", "config.json"), folder)
    assert not meta.is_meta_folder(folder)  # a config.json makes it a Hugging Face folder, as transformers reads it
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        list_checkpoint(folder)


# --- hostile folders ------------------------------------------------------------------------------------------------

def _rename(old, new):
    return lambda folder: os.rename(os.path.join(folder, old), os.path.join(folder, new))


def _copy(old, new):
    return lambda folder: shutil.copy(os.path.join(folder, old), os.path.join(folder, new))


def _copies(*pairs):
    return lambda folder: [_copy(old, new)(folder) for old, new in pairs]


def _params(**changes):
    def change(folder):
        file = os.path.join(folder, "params.json")
        with open(file, encoding="utf-8") as f:
            params = json.load(f)
        params.update(changes)
        with open(file, "w", encoding="utf-8") as f:
            json.dump(params, f)
    return change


def _write(text):
    def write(folder):
        with open(os.path.join(folder, "params.json"), "w", encoding="utf-8") as f:
            f.write(text)
    return write


FOLDER_DAMAGE = {
    "missing shard": (_rename("consolidated.01.pth", "consolidated.02.pth"), CheckpointError,
                      r"consolidated.01.pth is missing \(found 2 shards, the last numbered 02\)"),
    "extra shard": (_copy("consolidated.01.pth", "consolidated.02.pth"), CheckpointError,
                    "3 model-parallel shards cannot each hold whole heads"),
    "two extra shards": (_copies(("consolidated.00.pth", "consolidated.02.pth"),
                                 ("consolidated.01.pth", "consolidated.03.pth")), CheckpointError,
                         r"joined from 4 shard\(s\) has shape \[(384, 64|192, 128)\]"),
    "stray .pth": (_copy("consolidated.01.pth", "backup.pth"), CheckpointError,
                   "'backup.pth' is not a consolidated.NN.pth shard"),
    "rank twice": (_copy("consolidated.01.pth", "consolidated.001.pth"), CheckpointError,
                   "are both model-parallel rank 1"),
    "no shard": (lambda f: [os.remove(os.path.join(f, n)) for n in os.listdir(f) if n.endswith(".pth")]
                 and open(os.path.join(f, "consolidated.x.pth"), "wb").close(), CheckpointError,
                 "'consolidated.x.pth' is not a consolidated.NN.pth shard"),
    "dim a string": (_params(dim="64"), ConfigError, "dim is '64', expected an integer"),
    "n_layers a float": (_params(n_layers=2.0), ConfigError, "n_layers is 2.0, expected an integer"),
    "n_heads zero": (_params(n_heads=0), ConfigError, "n_heads is 0"),
    "norm_eps a bool": (_params(norm_eps=True), ConfigError, "norm_eps is True, expected a finite number > 0"),
    "norm_eps negative": (_params(norm_eps=-1e-5), ConfigError, "norm_eps is -1e-05"),
    "long value": (_params(multiple_of="x" * 10000), ConfigError, r"multiple_of is 'xxxx.*\.\.\., expected"),
    "huge file": (_params(multiple_of="x" * 100000), ConfigError, "over 65536 bytes"),
    "huge integer": (_write('{"dim": 1' + "0" * 5000 + "}"), ConfigError, "not valid JSON"),
    "vocab_size -2": (_params(vocab_size=-2), ConfigError, "vocab_size is -2, expected an integer in .* or -1"),
    "unknown field": (_params(use_scaled_rope=True), ConfigError, "field 'use_scaled_rope' is not one of Llama 2's"),
    "missing field": (_write('{"dim": 64, "n_layers": 2, "n_heads": 4}'), ConfigError, "'norm_eps' is missing"),
    "not an object": (_write("[1, 2]"), ConfigError, "expected a JSON object, got list"),
    "not JSON": (_write("{dim: 64"), ConfigError, "not valid JSON"),
    "heads do not divide": (_params(n_heads=3), ConfigError, "dim must be a multiple of n_heads"),
    "kv heads do not divide": (_params(n_kv_heads=3), ConfigError, "n_heads a multiple of n_kv_heads"),
    "fewer layers": (_params(n_layers=1), CheckpointError, r"'layers\.1\.[a-z_.0-9]+' is past the last layer"),
    "more layers": (_params(n_layers=3), CheckpointError, "no shard holds layers.2.attention.wq.weight"),
}


@pytest.mark.parametrize("damage", FOLDER_DAMAGE)
def test_damaged_folders_are_refused_by_name(damage, tmp_path):
    change, error, message = FOLDER_DAMAGE[damage]
    folder = golden_meta(tmp_path)
    change(folder)
    with pytest.raises(error, match=message) as caught:
        refimpl.load(folder)
    assert len(str(caught.value)) < 400  # bounded, whatever the file holds


def _drop(rank, name):
    return lambda ranks: ranks[rank].pop(name)


def _add(name, shape):
    return lambda ranks: [r.__setitem__(name, torch.zeros(shape)) for r in ranks]


def _set(rank, name, value):
    return lambda ranks: ranks[rank].__setitem__(name, value)


SHARD_DAMAGE = {
    "in one shard only": (_drop(1, "layers.0.feed_forward.w2.weight"),
                          "'layers.0.feed_forward.w2.weight' is in one shard and not in the other"),
    "in no shard": (lambda ranks: [r.pop("layers.1.ffn_norm.weight") for r in ranks],
                    "no shard holds layers.1.ffn_norm.weight"),
    "unknown tensor": (_add("layers.0.attention.wx.weight", (8, 64)),
                       "'layers.0.attention.wx.weight' is not a parameter of a Llama 2 model"),
    "leading zero layer": (_add("layers.01.attention.wq.weight", (32, 64)), "'layers.01.attention.wq.weight' is not"),
    "shapes differ": (_set(1, "layers.0.feed_forward.w1.weight", torch.zeros(40, 64)),
                      r"layers.0.feed_forward.w1.weight is F32 \[40, 64\] in shard 1 but F32 \[48, 64\] in shard 0"),
    "dtypes differ": (_set(1, "layers.0.attention.wv.weight", torch.zeros(32, 64, dtype=torch.float16)),
                      r"layers.0.attention.wv.weight is F16 \[32, 64\] in shard 1 but F32"),
    "replicated norm differs": (_set(1, "norm.weight", torch.zeros(32)), r"norm.weight is F32 \[32\] in shard 1"),
    "embedding not 2-D": (lambda ranks: [r.__setitem__("tok_embeddings.weight", torch.zeros(192 * 32)) for r in ranks],
                          r"tok_embeddings.weight has shape \[6144\], not 2-D"),
    "wrong non-split axis": (lambda ranks: [r.__setitem__("layers.0.attention.wo.weight", torch.zeros(60, 32))
                                            for r in ranks], r"attention.wo.weight joined from 2 shard\(s\) has shape"),
}


@pytest.mark.parametrize("damage", SHARD_DAMAGE)
def test_damaged_shards_are_refused_by_name(damage, tmp_path):
    edit, message = SHARD_DAMAGE[damage]
    folder = golden_meta(tmp_path, edit=edit)
    with pytest.raises(CheckpointError, match=message):
        refimpl.load(folder)


def test_rope_freqs_of_llama_1_is_skipped(tmp_path):
    folder = golden_meta(tmp_path, edit=lambda ranks: [r.__setitem__("rope.freqs", torch.ones(8)) for r in ranks])
    assert "rope.freqs" not in list_checkpoint(folder, progress=False)
    assert refimpl.load(folder).config.vocab_size == 192
