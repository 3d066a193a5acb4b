"""Every bad forward argument ends in one refimpl error class whose message names the argument (issue 15, point 8).

Each case asserts the exact class (InputError, CheckpointError, DiffError: never a NumPy or Python error) and the
argument's name in the message; the valid edge cases beside them (float16 caches, labels of -100, a head_mask of
ones, bool masks) must keep working.
"""
import functools
import json
import os
import struct

import numpy as np
import pytest

import refimpl
from golden_cases import GOLDEN
from refimpl import CheckpointError, InputError, RefimplError
from refimpl.diff import DiffError, diff_packs, raw_logits_pack
from refimpl.pack import make_pack, read_pack, write_safetensors
from refimpl.trace import Trace


@functools.lru_cache(maxsize=None)
def model(case):
    return refimpl.load(os.path.join(GOLDEN, "models", case))


def refused(cls, name, call):
    """call() raises exactly `cls` (not a subclass, not a NumPy error) and the message names `name`."""
    with pytest.raises(RefimplError) as info:
        call()
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert name in str(info.value), str(info.value)
    assert len(str(info.value)) < 1000  # a bounded summary, never the value printed whole
    return str(info.value)


def nested(depth, leaf):
    """A list nested `depth` deep: NumPy stops at 64 dimensions."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def huge(dtype, shape):
    """A read-only array of `shape` that takes no memory (NumPy indexes at most 2**63 bytes)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


# --- past_key_values ----------------------------------------------------------------------------------------------

CACHE_CASES = ["llama_gqa_bias", "opt_preln"]


def cache(case, ids=((5, 6, 7),)):
    return model(case)(input_ids=[list(r) for r in ids], use_cache=True).past_key_values


def with_layer(past, i, pair):
    return tuple(pair if j == i else p for j, p in enumerate(past))


BAD_CACHES = {
    "ragged layers": lambda p: with_layer(p, 1, (p[1][0][:, :, :2], p[1][1][:, :, :2])),
    "key and value differ": lambda p: with_layer(p, 0, (p[0][0], p[0][1][:, :, :2])),
    "one layer too few": lambda p: p[:-1],
    "one layer too many": lambda p: p + p[:1],
    "head count": lambda p: tuple((k[:, :1], v[:, :1]) for k, v in p),
    "head dim": lambda p: tuple((k[..., :4], v[..., :4]) for k, v in p),
    "3-D key": lambda p: tuple((k[0], v[0]) for k, v in p),
    "not a tuple": lambda p: {"layers": p},
    "an array": lambda p: np.stack([np.stack(pair) for pair in p]),
    "a layer is not a pair": lambda p: with_layer(p, 0, 7),
    "a layer is a triple": lambda p: with_layer(p, 0, (p[0][0], p[0][1], p[0][1])),
    "a ragged nested list": lambda p: with_layer(p, 0, ([[1.0], [1.0, 2.0]], p[0][1])),
    "complex": lambda p: tuple((k.astype(np.complex64), v.astype(np.complex64)) for k, v in p),
    "integer": lambda p: tuple((k.astype(np.int64), v.astype(np.int64)) for k, v in p),
    "bool": lambda p: tuple((k > 0, v > 0) for k, v in p),
    "object": lambda p: tuple((k.astype(object), v.astype(object)) for k, v in p),
    "strings": lambda p: tuple((k.astype(str), v.astype(str)) for k, v in p),
}


@pytest.mark.parametrize("case", CACHE_CASES)
@pytest.mark.parametrize("bad", list(BAD_CACHES))
def test_bad_past_key_values(case, bad):
    past = BAD_CACHES[bad](cache(case))
    refused(InputError, "past_key_values", lambda: model(case)(input_ids=[[8]], past_key_values=past))


@pytest.mark.parametrize("case", CACHE_CASES)
def test_cache_batch_must_match_input_ids(case):
    past = cache(case)
    message = refused(InputError, "past_key_values", lambda: model(case)(input_ids=[[8], [9]], past_key_values=past))
    assert "input batch 2" in message


@pytest.mark.parametrize("case", CACHE_CASES)
def test_float_caches_of_any_width_are_read_in_the_compute_dtype(case):
    past = cache(case)
    expected = model(case)(input_ids=[[8]], past_key_values=past).logits
    for dtype, atol in ((np.float64, 0.0), (np.float16, 1e-2)):
        wide = tuple((k.astype(dtype), v.astype(dtype)) for k, v in past)
        out = model(case)(input_ids=[[8]], past_key_values=wide, use_cache=True)
        assert out.logits.dtype == np.float32 and out.past_key_values[0][0].dtype == np.float32  # never promoted
        np.testing.assert_allclose(out.logits, expected, atol=atol, rtol=0)
    as_lists = tuple((k.tolist(), v.tolist()) for k, v in past)  # nested lists are arrays too
    np.testing.assert_array_equal(model(case)(input_ids=[[8]], past_key_values=as_lists).logits, expected)


@pytest.mark.parametrize("case", CACHE_CASES)
def test_nan_in_the_cache_is_data(case):
    past = tuple((np.full_like(k, np.nan), v) for k, v in cache(case))
    assert np.isnan(model(case)(input_ids=[[8]], past_key_values=past).logits).all()


# --- head_mask (OPT: [num_hidden_layers, num_attention_heads], as transformers' OPTDecoder) -----------------------

BAD_HEAD_MASKS = {
    "[H]": np.ones(4),
    "[L]": np.ones(2),
    "[L, H, 1]": np.ones((2, 4, 1)),
    "[H, L]": np.ones((4, 2)),
    "strings": [["1"] * 4] * 2,
    "complex": np.ones((2, 4), np.complex64),
    "object": np.array([[None] * 4] * 2),
    "ragged": [[1, 1, 1, 1], [1]],
    "too deep": nested(65, 1.0),
}


@pytest.mark.parametrize("bad", list(BAD_HEAD_MASKS))
def test_bad_head_mask(bad):
    refused(InputError, "head_mask", lambda: model("opt_preln")(input_ids=[[5, 6]], head_mask=BAD_HEAD_MASKS[bad]))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, bool])
def test_head_mask_of_ones_changes_nothing(dtype):
    m = model("opt_preln")
    plain = m(input_ids=[[5, 6, 7]], output_attentions=True)
    ones = m(input_ids=[[5, 6, 7]], output_attentions=True, head_mask=np.ones((2, 4), dtype))
    np.testing.assert_array_equal(ones.logits, plain.logits)
    half = m(input_ids=[[5, 6, 7]], output_attentions=True, head_mask=np.full((2, 4), 0.5))
    np.testing.assert_allclose(half.attentions[0], plain.attentions[0] * 0.5, rtol=1e-6)


# --- labels: causal LM ----------------------------------------------------------------------------------------------

BAD_LM_LABELS = {
    "shorter than the input": [[5, 6]],
    "another batch": [[5, 6, 7], [5, 6, 7]],
    "3-D": [[[5, 6, 7]]],
    "floats": [[5.0, 6.0, 7.0]],
    "strings": [["5", "6", "7"]],
    "bools": [[True, False, True]],
    "complex": np.array([[5, 6, 7]], np.complex64),
    "the vocab size": [[5, 6, 192]],
    "negative, not -100": [[5, -5, 7]],
    "beyond int64": [[5, 6, 2**70]],
    "uint64 beyond int64": np.array([[5, 6, 2**63 + 1]], np.uint64),
    "ragged": [[5, 6, 7], [5]],
    "None": [[5, None, 7]],
}


@pytest.mark.parametrize("case", ["llama_mha", "opt_preln"])
@pytest.mark.parametrize("bad", list(BAD_LM_LABELS))
def test_bad_causal_lm_labels(case, bad):
    refused(InputError, "labels", lambda: model(case)(input_ids=[[5, 6, 7]], labels=BAD_LM_LABELS[bad]))


@pytest.mark.parametrize("case", ["llama_mha", "opt_preln"])
def test_labels_of_minus_100_are_ignored(case):
    m = model(case)
    full = m(input_ids=[[5, 6, 7]], labels=[[5, 6, 7]])
    assert np.isfinite(full.loss)
    first = m(input_ids=[[5, 6, 7]], labels=[[-100, 6, -100]])  # only the target 6 (predicted at position 0) counts
    logits = full.logits[0, 0].astype(np.float64)
    expected = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[6]
    assert float(first.loss) == pytest.approx(expected, abs=1e-5)
    with np.errstate(invalid="ignore"):
        assert np.isnan(m(input_ids=[[5, 6, 7]], labels=[[-100, -100, -100]]).loss)  # 0 / 0, as torch


# --- labels: sequence classification ------------------------------------------------------------------------------

BAD_SEQ_LABELS = [  # (case: llama_seqcls single-label 3 classes, opt_seqcls regression, openllama_seqcls multi-label)
    ("llama_seqcls", "[2] for a batch of 1", [1, 2]),
    ("llama_seqcls", "[1, 2]", [[1, 2]]),
    ("llama_seqcls", "class 3 of 3", [3]),
    ("llama_seqcls", "class -1", [-1]),
    ("llama_seqcls", "strings", ["a"]),
    ("llama_seqcls", "complex", [1j]),
    ("llama_seqcls", "None", [None]),
    ("llama_seqcls", "bools", [True]),
    ("llama_seqcls", "floats: multi-label, needs [B, 3]", [0.5]),
    ("llama_seqcls", "too deep", nested(65, 1)),
    ("opt_seqcls", "regression [3] for a batch of 1", [1.0, 2.0, 3.0]),
    ("opt_seqcls", "regression strings", ["x"]),
    ("opt_seqcls", "regression [1, 2]", [[1.0, 2.0]]),
    ("openllama_seqcls", "multi-label [1, 1]", [[1.0]]),
    ("openllama_seqcls", "multi-label [3]", [1.0, 0.0, 1.0]),
    ("openllama_seqcls", "multi-label strings", [["a", "b", "c"]]),
]


@pytest.mark.parametrize("case, bad, labels", BAD_SEQ_LABELS, ids=[f"{c}-{b}" for c, b, _ in BAD_SEQ_LABELS])
def test_bad_sequence_classification_labels(case, bad, labels):
    m = refimpl.load(os.path.join(GOLDEN, "models", case))  # a fresh model: problem_type is still the config's
    before = m.problem_type
    refused(InputError, "labels", lambda: m(input_ids=[[5, 6, 7]], labels=labels))
    assert m.problem_type == before  # a refused label never picks the problem type


def test_single_label_from_config_refuses_float_labels():
    m = refimpl.load(os.path.join(GOLDEN, "models", "llama_seqcls"))
    m.problem_type = "single_label_classification"
    refused(InputError, "labels", lambda: m(input_ids=[[5, 6, 7]], labels=[1.0]))  # not truncated to class 1


def test_valid_sequence_classification_labels():
    single = refimpl.load(os.path.join(GOLDEN, "models", "llama_seqcls"))
    ids = [[5, 6, 7], [8, 9, 10]]
    loss = single(input_ids=ids, labels=[2, 0]).loss
    assert single.problem_type == "single_label_classification"
    assert single(input_ids=ids, labels=[[2], [0]]).loss == loss  # [B, 1], as transformers' view(-1)
    assert single(input_ids=ids, labels=[2, -100]).loss == single(input_ids=ids[:1], labels=[2]).loss
    regression = refimpl.load(os.path.join(GOLDEN, "models", "opt_seqcls"))
    assert np.isfinite(regression(input_ids=ids, labels=[0.5, -1.0]).loss)
    assert np.isfinite(regression(input_ids=ids, labels=[[0.5], [-1.0]]).loss)
    multi = refimpl.load(os.path.join(GOLDEN, "models", "openllama_seqcls"))
    assert np.isfinite(multi(input_ids=ids, labels=[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).loss)


# --- question answering: start_positions / end_positions ----------------------------------------------------------

BAD_POSITIONS = {
    "[2] for a batch of 1": [1, 2],
    "[1, 2]": [[1, 2]],
    "a scalar": 1,
    "a string": "1",
    "floats": [1.5],
    "bools": [True],
    "None": [None],
    "beyond int64": [2**70],
    "ragged": [[1], [1, 2]],
}


@pytest.mark.parametrize("which", ["start_positions", "end_positions"])
@pytest.mark.parametrize("bad", list(BAD_POSITIONS))
def test_bad_question_answering_positions(which, bad):
    kwargs = {"start_positions": [1], "end_positions": [2], which: BAD_POSITIONS[bad]}
    refused(InputError, which, lambda: model("opt_qa")(input_ids=[[5, 6, 7]], **kwargs))


def test_valid_question_answering_positions():
    m = model("opt_qa")
    loss = m(input_ids=[[5, 6, 7]], start_positions=[1], end_positions=[2]).loss
    assert m(input_ids=[[5, 6, 7]], start_positions=[[1]], end_positions=[[2]]).loss == loss  # [B, 1] squeezed
    clamped = m(input_ids=[[5, 6, 7]], start_positions=[-5], end_positions=[2]).loss  # -5 -> 0
    assert clamped == m(input_ids=[[5, 6, 7]], start_positions=[0], end_positions=[2]).loss
    with np.errstate(invalid="ignore"):  # 10**9 -> S, the ignored index: no start term left, NaN as in torch
        assert np.isnan(m(input_ids=[[5, 6, 7]], start_positions=[10**9], end_positions=[2]).loss)


# --- input_ids, inputs_embeds, attention_mask, position_ids -------------------------------------------------------

BAD_TOKEN_ARGUMENTS = [  # (argument, what, value); the other arguments are a valid [[5, 6]] call
    ("input_ids", "65 dims", nested(65, 5)),
    ("input_ids", "shape beyond 2**62 bytes", huge(np.int8, (1, 2**61))),
    ("input_ids", "object array", np.array([[5, 6]], dtype=object)),
    ("input_ids", "None inside", [[5, None]]),
    ("input_ids", "string", "hello"),
    ("input_ids", "strings", [["5", "6"]]),
    ("input_ids", "bytes", b"56"),
    ("input_ids", "bools", [[True, False]]),
    ("input_ids", "floats", [[5.0, 6.0]]),
    ("input_ids", "NaN", [[5.0, np.nan]]),
    ("input_ids", "ragged", [[5, 6], [7]]),
    ("input_ids", "beyond int64", [[5, 2**70]]),
    ("input_ids", "uint64 beyond int64", np.array([[5, 2**63 + 5]], np.uint64)),
    ("input_ids", "a dict", {"ids": [5, 6]}),
    ("inputs_embeds", "65 dims", nested(65, 0.0)),
    ("inputs_embeds", "shape beyond 2**62 bytes", huge(np.float16, (2**31, 2**24, 64))),
    ("inputs_embeds", "object array", np.zeros((1, 2, 64), object)),
    ("inputs_embeds", "string", "abc"),
    ("inputs_embeds", "bools", np.zeros((1, 2, 64), bool)),
    ("inputs_embeds", "ints", np.zeros((1, 2, 64), np.int64)),
    ("inputs_embeds", "complex", np.zeros((1, 2, 64), np.complex64)),
    ("inputs_embeds", "ragged", [[[0.0] * 64, [0.0]]]),
    ("attention_mask", "65 dims", nested(65, 1)),
    ("attention_mask", "shape beyond 2**62 bytes", huge(np.int8, (2**31, 2**31))),
    ("attention_mask", "object array", np.array([[1, None]], dtype=object)),
    ("attention_mask", "strings", [["1", "1"]]),
    ("attention_mask", "ragged", [[1, 1], [1]]),
    ("attention_mask", "complex", np.ones((1, 2), np.complex64)),
    ("attention_mask", "0.5", [[1.0, 0.5]]),
    ("position_ids", "65 dims", nested(65, 0)),
    ("position_ids", "shape beyond 2**62 bytes", huge(np.int8, (1, 2**61))),
    ("position_ids", "object array", np.array([[0, None]], dtype=object)),
    ("position_ids", "strings", [["0", "1"]]),
    ("position_ids", "bools", [[False, True]]),
    ("position_ids", "floats", [[0.0, 1.0]]),
    ("position_ids", "ragged", [[0, 1], [2]]),
    ("position_ids", "beyond int64", [[0, 2**70]]),
]


@pytest.mark.parametrize("case", ["llama_mha", "opt_preln"])
@pytest.mark.parametrize("name, what, value", BAD_TOKEN_ARGUMENTS, ids=[f"{n}-{w}" for n, w, _ in BAD_TOKEN_ARGUMENTS])
def test_bad_token_arguments(case, name, what, value):
    kwargs = {name: value} if name in ("input_ids", "inputs_embeds") else {"input_ids": [[5, 6]], name: value}
    refused(InputError, name, lambda: model(case)(**kwargs))


def test_opt_position_ids_near_int64_limits():
    """max + 2 and min + 2 would wrap around in int64: the position itself is named."""
    m = model("opt_preln")
    top, bottom = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    assert str(top) in refused(InputError, "OPT position", lambda: m(input_ids=[[5, 6]], position_ids=[[0, top]]))
    assert str(bottom) in refused(InputError, "OPT position",
                                  lambda: m(input_ids=[[5, 6]], position_ids=[[bottom, 0]]))
    m(input_ids=[[5, 6]], position_ids=[[-1, 0]])  # -1 is what a pad gets: row 1 of the table


@pytest.mark.parametrize("case", ["llama_mha", "opt_preln"])
def test_valid_edge_inputs_still_work(case):
    m = model(case)
    expected = m(input_ids=[[5, 6]]).logits
    for mask in ([[True, True]], [[1.0, 1.0]], np.ones((1, 2), np.uint8)):
        np.testing.assert_array_equal(m(input_ids=[[5, 6]], attention_mask=mask).logits, expected)
    for ids in ([5, 6], np.array([[5, 6]], np.int32), np.array([[5, 6]], np.uint64)):
        np.testing.assert_array_equal(m(input_ids=ids).logits, expected)
    width = m.config.word_embed_proj_dim if case.startswith("opt") else m.config.hidden_size
    assert m(inputs_embeds=np.zeros((1, 2, width), np.float16)).logits.dtype == np.float32


# --- trace ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama_mha", "opt_preln", "llama_seqcls", "opt_qa"])
@pytest.mark.parametrize("bad", [5, "abc", None, {}, print, [Trace()]], ids=["int", "str", "None", "dict", "function",
                                                                             "list"])
def test_bad_trace_argument(case, bad):
    refused(InputError, "trace", lambda: model(case)(input_ids=[[5, 6]], trace=bad))


def test_a_trace_still_records():
    trace = Trace()
    model("llama_mha")(input_ids=[[5, 6]], trace=trace)
    assert "logits" in trace and "layers.1.attn.probs" in trace


# --- golden packs read by `refimpl diff` --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packs")
    case = os.path.join(GOLDEN, "models", "llama_mha")
    tensors, metadata = make_pack(model("llama_mha"), [[1, 17, 42]], model_path=case)
    path = folder / "ref.safetensors"
    write_safetensors(path, tensors, metadata)
    summary = make_pack(model("llama_mha"), [[1, 17, 42]], summary=True)
    return folder, path, tensors, metadata, summary


def pack_with(reference, name, tensors=None, **changes):
    folder, _, full, metadata, _ = reference
    metadata = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
    path = folder / f"{name}.safetensors"
    write_safetensors(path, full if tensors is None else tensors, metadata)
    return path


def raw_pack(reference, name, header):
    path = reference[0] / f"{name}.safetensors"
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    return path


BAD_PACKS = {  # name -> (the key the message names, pack maker)
    "trace_order not JSON": ("trace_order", lambda r: pack_with(r, "a", trace_order="[oops")),
    "trace_order a number": ("trace_order", lambda r: pack_with(r, "b", trace_order="5")),
    "trace_order of lists": ("trace_order", lambda r: pack_with(r, "c", trace_order='[["x"]]')),
    "trace_order with a 5000-digit int": ("trace_order", lambda r: pack_with(r, "d",
                                                                             trace_order="[" + "9" * 5000 + "]")),
    "config a list": ("config", lambda r: pack_with(r, "e", config="[1, 2]")),
    "config not JSON": ("config", lambda r: pack_with(r, "f", config="{")),
    "mode unknown": ("mode", lambda r: pack_with(r, "g", mode="bogus")),
    "summary mode, full tensors": ("summary pack", lambda r: pack_with(r, "h", mode="summary")),
    "summary_fields of another version": ("summary_fields", lambda r: pack_with(
        r, "i", tensors=r[4][0], mode="summary", summary_fields='["a"]')),
    "summary_shapes a string": ("summary_shapes", lambda r: pack_with(r, "j", summary_shapes='"x"')),
    "checkpoint_sha256 a list": ("checkpoint_sha256", lambda r: pack_with(r, "k", checkpoint_sha256="[1]")),
    "raw_logits unknown": ("raw_logits", lambda r: pack_with(r, "l", raw_logits="most")),
    "dtype a megabyte long": ("dtype", lambda r: pack_with(r, "m", dtype="x" * 10**6)),
    "__metadata__ a list": ("__metadata__", lambda r: raw_pack(r, "n", {"__metadata__": [1, 2]})),
    "__metadata__ value a number": ("__metadata__", lambda r: raw_pack(r, "o", {"__metadata__": {"mode": 5}})),
    "entry shape a number": ("tensor 'x'", lambda r: raw_pack(
        r, "p", {"x": {"dtype": "F32", "shape": 5, "data_offsets": [0, 0]}})),
    "header nested 100000 deep": ("header", lambda r: raw_pack(r, "q", b"[" * 100000 + b"]" * 100000)),
}


@pytest.mark.parametrize("bad", list(BAD_PACKS))
def test_malformed_pack_metadata(reference, bad):
    key, make = BAD_PACKS[bad]
    path = make(reference)
    refused(InputError, key, lambda: diff_packs(read_pack(path), read_pack(reference[1])))


def test_pack_without_any_metadata_is_fine(reference):
    path = pack_with(reference, "bare", **{k: None for k in reference[3]})
    assert diff_packs(read_pack(path), read_pack(reference[1])).ok


def test_raw_logits_against_a_scalar_reference_logits(reference, tmp_path):
    tensors = {**reference[2], "logits": np.float32(1.0)}
    raw = tmp_path / "raw.bin"
    np.zeros(3, np.float32).tofile(raw)
    ref = read_pack(pack_with(reference, "scalar_logits", tensors=tensors))
    refused(DiffError, "logits", lambda: raw_logits_pack(raw, ref))


def test_diff_cli_reports_a_malformed_pack(reference, capsys):
    from refimpl import oracle_cli

    assert oracle_cli.main(["diff", str(pack_with(reference, "cli", trace_order="5")), str(reference[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refimpl diff: error:") and "trace_order" in err and "Traceback" not in err


# --- refimpl inspect refuses the names the loader refuses ---------------------------------------------------------

def renamed_checkpoint(tmp_path, change):
    from refimpl.weights import read_safetensors

    source = os.path.join(GOLDEN, "models", "llama_mha")
    tensors = {name: np.array(t) for name, t in read_safetensors(os.path.join(source, "model.safetensors")).items()}
    change(tensors)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(open(os.path.join(source, "config.json")).read())
    write_safetensors(tmp_path / "model.safetensors", tensors)
    return tmp_path


def alias_norm(t):
    t["norm.weight"] = t["model.norm.weight"]


def leading_zero(t):
    t["model.layers.00.input_layernorm.weight"] = t.pop("model.layers.0.input_layernorm.weight")


def arabic_indic_digit(t):
    t["model.layers.\u0660.input_layernorm.weight"] = t.pop("model.layers.0.input_layernorm.weight")


def unknown_name(t):
    t["model.foo.weight"] = t["model.norm.weight"]


@pytest.mark.parametrize("change", [alias_norm, leading_zero, arabic_indic_digit, unknown_name])
def test_inspect_refuses_what_the_loader_refuses(tmp_path, change):
    from refimpl.inspect import describe

    folder = renamed_checkpoint(tmp_path / "ckpt", change)
    loader = refused(CheckpointError, "checkpoint tensor", lambda: refimpl.load(folder))
    assert refused(CheckpointError, "checkpoint tensor", lambda: describe(folder, progress=False)) == loader


def test_inspect_still_describes_a_good_checkpoint():
    from refimpl.inspect import describe

    assert "llama" in describe(os.path.join(GOLDEN, "models", "llama_mha"), progress=False)
