"""Golden tests for refimpl.tokenizers: every corpus string against transformers 4.46.3's recorded outputs.

golden/make_tokenizers.py wrote the tokenizer folders and, for each variant, what transformers returned:
ids with and without special tokens, decode with and without skip_special_tokens, decode of random id
sequences, padded batches. Nothing here needs transformers; equality is exact.
Variants: slow LlamaTokenizer legacy=True / legacy=False (also via a keyword override), a Llama with added
tokens and add_eos_token, slow GPT2Tokenizer with OPT's config; and the pure-Python tokenizer.json
fallback (sentencepiece hidden) against the *fast* LlamaTokenizerFast outputs.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from refimpl.tokenizers import (
    InputTypeError,
    InvalidTextError,
    InvalidTokenIdError,
    LlamaJsonTokenizer,
    TokenizerFileError,
    UnsupportedTokenizerError,
    load_tokenizer,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "tokenizers"

# variant name -> (expected file, folder, load_tokenizer overrides)
SLOW = {
    "llama_slow_legacy": ("llama_slow_legacy", "llama", {}),
    "llama_slow_nonlegacy": ("llama_slow_nonlegacy", "llama-nonlegacy", {}),
    "llama_legacy_false_override": ("llama_slow_nonlegacy", "llama", {"legacy": False}),
    "llama_extra_slow": ("llama_extra_slow", "llama-extra", {}),
    "opt_slow": ("opt_slow", "opt", {}),
}
# the tokenizer.json fallback reproduces the fast tokenizer
FALLBACK = {
    "llama_fast_legacy": ("llama_fast_legacy", "llama", {}),
    "llama_fast_nonlegacy": ("llama_fast_nonlegacy", "llama-nonlegacy", {}),
    "llama_extra_fast": ("llama_extra_fast", "llama-extra", {}),
}


@functools.cache
def corpus() -> list[str]:
    return json.loads((GOLDEN / "corpus.json").read_text(encoding="utf-8"))


@functools.cache
def expected(name: str) -> dict:
    return json.loads((GOLDEN / "expected" / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture
def no_sentencepiece(monkeypatch):
    """Make `import sentencepiece` fail, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "sentencepiece", None)


def load(folder: str, overrides: dict, fallback: bool = False):
    if not fallback:
        return load_tokenizer(GOLDEN / folder, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = load_tokenizer(GOLDEN / folder, **overrides)
    assert isinstance(tok, LlamaJsonTokenizer)
    return tok


def encode_mismatches(tok, records) -> list:
    bad = []
    for text, rec in zip(corpus(), records):
        if "error" in rec:  # lone surrogates: transformers raised, so must we (with a clear error)
            try:
                tok.encode(text)
                bad.append((text, "no error", rec["error"]))
            except InvalidTextError:
                pass
            continue
        for key, kwargs in (("ids", {}), ("ids_no_special", {"add_special_tokens": False})):
            got = tok.encode(text, **kwargs)
            if got != rec[key]:
                bad.append((text, key, got, rec[key]))
    return bad


def decode_mismatches(tok, records) -> list:
    bad = []
    for rec in records:
        if "error" in rec:
            continue
        for key, kwargs in (
            ("decode", {}),
            ("decode_skip", {"skip_special_tokens": True}),
            ("decode_no_spaces_between", {"spaces_between_special_tokens": False}),
        ):
            if key in rec:
                got = tok.decode(rec["ids"], **kwargs)
                if got != rec[key]:
                    bad.append((rec["ids"], key, got, rec[key]))
    return bad


def check_variant(tok, name):
    exp = expected(name)
    assert len(exp["encode"]) == len(corpus()) >= 300
    bad = encode_mismatches(tok, exp["encode"])
    assert not bad, f"{len(bad)} encode mismatches, first: {bad[:3]}"
    bad = decode_mismatches(tok, exp["encode"])
    assert not bad, f"{len(bad)} decode mismatches, first: {bad[:3]}"
    bad = decode_mismatches(tok, exp["decode_ids"])
    assert not bad, f"{len(bad)} decode mismatches on id sequences, first: {bad[:3]}"
    for b in exp["batches"]:
        out = tok(b["texts"], padding=b["padding"], max_length=b["max_length"], padding_side=b["padding_side"])
        assert out["input_ids"].dtype == np.int64
        assert out["input_ids"].tolist() == b["input_ids"], b
        assert out["attention_mask"].tolist() == b["attention_mask"], b
    meta = exp["meta"]
    assert (tok.vocab_size, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (
        meta["vocab_size"], meta["len"], meta["bos_token_id"], meta["eos_token_id"], meta["pad_token_id"],
        meta["padding_side"],
    )


@pytest.mark.parametrize("variant", sorted(SLOW))
def test_slow_tokenizers_match_transformers(variant):
    name, folder, overrides = SLOW[variant]
    check_variant(load(folder, overrides), name)


@pytest.mark.parametrize("variant", sorted(FALLBACK))
def test_tokenizer_json_fallback_matches_fast_tokenizer(variant, no_sentencepiece):
    name, folder, overrides = FALLBACK[variant]
    check_variant(load(folder, overrides, fallback=True), name)


def test_fallback_says_so(no_sentencepiece):
    with pytest.warns(UserWarning, match="sentencepiece is not installed.*tokenizer.json.*LlamaTokenizerFast"):
        load_tokenizer(GOLDEN / "llama")


def test_opt_from_tokenizer_json_only(tmp_path):
    """A folder with tokenizer.json and no vocab.json/merges.txt: the same ids and text as the slow tokenizer."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(GOLDEN / "opt" / name, tmp_path / name)
    check_variant(load_tokenizer(tmp_path), "opt_slow")
    # the fast tokenizer agrees with the slow one on every corpus string (errors aside)
    diff = json.loads((GOLDEN / "expected" / "differences.json").read_text())["opt_slow vs opt_fast"]
    assert set(diff) == {"encode.error"}


def test_opt_without_tokenizer_class(tmp_path):
    """facebook/opt-* name no tokenizer_class: config.json's model_type, or else the files, decide."""
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(GOLDEN / "opt" / name, tmp_path / name)
    config = json.loads((GOLDEN / "opt" / "tokenizer_config.json").read_text())
    del config["tokenizer_class"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Hello world") == expected("opt_slow")["encode"][corpus().index("Hello world")]["ids"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    assert load_tokenizer(tmp_path).encode("Hello world") == tok.encode("Hello world")


# ---------------------------------------------------------------------------------------------------------------
# The quirks, spelled out (values checked against transformers 4.46.3; the golden files hold the same cases)
# ---------------------------------------------------------------------------------------------------------------
def test_llama_legacy_quirks():
    legacy, new = load_tokenizer(GOLDEN / "llama"), load_tokenizer(GOLDEN / "llama", legacy=False)
    # legacy: the chunk after a special token gets sentencepiece's dummy prefix: "." becomes "▁", "."
    assert legacy.tokenize("Hello <s>.") == ["▁H", "ello", "▁", "<s>", "▁", "."]
    assert new.tokenize("Hello <s>.") == ["▁H", "ello", "▁", "<s>", "."]
    assert new.tokenize("<s>Hello") == ["<s>", "H", "ello"]  # the lone "▁" before a special token is dropped
    # decode: legacy puts a space before a special token that follows text; the first "▁" is stripped
    assert legacy.decode([397, 511, 2, 367, 390]) == " Hello</s>world"
    assert new.decode([397, 511, 2, 367, 390]) == "Hello</s> world"
    assert legacy.decode([1, 1, 397, 511]) == "<s><s>Hello"
    assert new.decode([1, 1, 397, 511]) == "<s><s> Hello"


def test_fast_byte_fallback_replaces_the_whole_byte_run(no_sentencepiece):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = load_tokenizer(GOLDEN / "llama")
    byte = lambda b: 3 + b  # <0x00> is id 3  # noqa: E731
    assert fast.decode([byte(0xE2), byte(0x98), byte(ord("A"))]) == "\ufffd\ufffd\ufffd"  # "A" too
    assert fast.decode([byte(0xE2), byte(0x98), byte(0x83)]) == "☃"


def test_llama_sentencepiece_byte_fallback():
    tok = load_tokenizer(GOLDEN / "llama")
    byte = lambda b: 3 + b  # noqa: E731
    assert tok.decode([byte(0xE2), byte(0x98)]) == "\ufffd\ufffd"  # one U+FFFD per byte, not per sequence
    assert tok.decode([byte(0xE2), byte(0x98), byte(ord("A"))]) == "\ufffd\ufffdA"
    assert b"\xe2\x98A".decode("utf-8", errors="replace") == "\ufffdA"  # (Python's rule would give one)
    assert tok.decode(tok.encode("鑫龘 🦩")) == "<s>鑫龘 🦩"  # characters not in the vocabulary round-trip


def test_opt_quirks():
    tok = load_tokenizer(GOLDEN / "opt")
    assert tok.encode("A photo of a cat")[0] == 2  # </s> (bos = eos) in front of every text
    assert tok.encode("<s> x") == [2, 31, 86, 33, 667]  # "<s>" is not special for OPT: plain BPE
    assert tok.decode([0, 3, 2, 1, 50], skip_special_tokens=True) == "<s><unk>O"  # ids 0 and 3 are not skipped
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 2, 1, 2)


def test_merges_file_without_final_newline_loses_its_last_merge(tmp_path):
    for name in ("vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(GOLDEN / "opt" / name, tmp_path / name)
    merges = (GOLDEN / "opt" / "merges.txt").read_text(encoding="utf-8")
    (tmp_path / "merges.txt").write_text(merges.rstrip("\n"), encoding="utf-8")
    full, cut = load_tokenizer(GOLDEN / "opt"), load_tokenizer(tmp_path)
    last = tuple(merges.rstrip("\n").split("\n")[-1].split())
    assert last in full.ranks and last not in cut.ranks and len(cut.ranks) == len(full.ranks) - 1


def test_llama_padding_needs_a_pad_token():
    tok = load_tokenizer(GOLDEN / "llama")
    assert tok.pad_token_id is None
    with pytest.raises(ValueError, match="no pad token"):
        tok(["a", "bb"], padding=True)
    out = load_tokenizer(GOLDEN / "llama", pad_token="<unk>")(["a", "b c"], padding=True, padding_side="left")
    assert out["attention_mask"].tolist()[0][0] == 0 and out["input_ids"][0, 0] == 0
    single = tok("Hello world")
    assert single["input_ids"].shape == (1, 5)
    assert tok("Hello world", return_tensors=None)["input_ids"] == [1, 397, 511, 367, 390]


def test_streaming_decode_does_not_split_characters():
    tok = load_tokenizer(GOLDEN / "opt")
    text = "emoji 🦩🦚 and 鑫龘 are spelled in bytes"
    stream = tok.stream_decoder(skip_special_tokens=True)
    chunks = [stream.push(i) for i in tok.encode(text)] + [stream.finish()]
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)
    assert sum(1 for c in chunks if c) > 5  # it does stream
    with pytest.raises(ValueError, match="finished"):
        stream.push(5)


def test_streaming_holds_back_legacy_llama_runs():
    """Legacy Llama decode puts a space before a run that a special token ends: held back until then."""
    tok = load_tokenizer(GOLDEN / "llama")
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in [397, 511]] == ["", ""]
    assert stream.push(2) == " Hello</s>"
    skipping = tok.stream_decoder(skip_special_tokens=True)
    assert [skipping.push(i) for i in [397, 511, 2]] == ["H", "ello", ""]  # "▁H" "ello" </s>


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, ValueError/TypeError subclasses, naming the value or the file
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def opt():
    return load_tokenizer(GOLDEN / "opt")


@pytest.fixture(scope="module")
def llama():
    return load_tokenizer(GOLDEN / "llama")


@pytest.mark.parametrize("which", ["opt", "llama"])
def test_bad_ids_and_text(which, request):
    tok = request.getfixturevalue(which)
    n = len(tok)
    for bad in ([n], [-1], [5, n + 1000]):
        with pytest.raises(InvalidTokenIdError, match=str(bad[-1])):
            tok.decode(bad)
    for bad in (["a"], [1.5], [None], "hello", [True]):
        with pytest.raises(InputTypeError):
            tok.decode(bad)
    with pytest.raises(InputTypeError, match="shape"):
        tok.decode(np.zeros((2, 3), dtype=np.int64))
    assert tok.decode(np.array([5, 6])) == tok.decode([5, 6]) == tok.decode([np.int64(5), 6])
    for bad in (None, 3, b"bytes", ["a list"]):
        with pytest.raises(InputTypeError, match="str"):
            tok.encode(bad)
    with pytest.raises(InvalidTextError, match="U\\+D800 at index 3"):
        tok.encode("abc\ud800")
    with pytest.raises(InputTypeError):
        tok(3)
    with pytest.raises(ValueError, match="padding"):
        tok(["a"], padding="sideways")
    with pytest.raises(InvalidTokenIdError):
        tok.stream_decoder().push(n)


def test_bad_files(tmp_path, no_sentencepiece):
    with pytest.raises(TokenizerFileError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerFileError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    with pytest.raises(UnsupportedTokenizerError, match="BertTokenizer"):
        load_tokenizer(tmp_path)
    # a Llama folder with tokenizer.model but no sentencepiece and no tokenizer.json
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    shutil.copy(GOLDEN / "llama" / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerFileError, match="pip install sentencepiece"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(TokenizerFileError, match="tokenizer.model: not a sentencepiece model") as info:
        load_tokenizer(tmp_path)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_corrupt_opt_files(tmp_path):
    shutil.copy(GOLDEN / "opt" / "tokenizer_config.json", tmp_path)
    shutil.copy(GOLDEN / "opt" / "merges.txt", tmp_path)
    with pytest.raises(TokenizerFileError, match="vocab.json: file not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text('["a", "b"]')
    with pytest.raises(TokenizerFileError, match="vocab.json: expected a JSON object"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": "zero"}')
    with pytest.raises(TokenizerFileError, match="'a' is 'zero'"):
        load_tokenizer(tmp_path)
    shutil.copy(GOLDEN / "opt" / "vocab.json", tmp_path)
    (tmp_path / "merges.txt").write_bytes(b"#version\n\xff\xfe\n")
    with pytest.raises(TokenizerFileError, match="merges.txt: cannot read it as UTF-8"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "section, value, message",
    [
        ("model", {"type": "Unigram", "vocab": []}, "model type 'Unigram'"),
        ("normalizer", {"type": "NFKC"}, "normalizer 'NFKC'"),
        ("pre_tokenizer", {"type": "ByteLevel"}, "pre_tokenizer 'ByteLevel'"),
        ("pre_tokenizer", {"type": "Metaspace", "replacement": "▁", "split": True}, "split=True"),
        ("decoder", {"type": "Metaspace"}, "decoder 'Metaspace'"),
        ("normalizer", {"type": "Replace", "pattern": {"Regex": " +"}, "content": "▁"}, "regex pattern"),
    ],
)
def test_tokenizer_json_refuses_what_it_does_not_implement(tmp_path, no_sentencepiece, section, value, message):
    data = json.loads((GOLDEN / "llama" / "tokenizer.json").read_text(encoding="utf-8"))
    data[section] = value
    shutil.copy(GOLDEN / "llama" / "tokenizer_config.json", tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedTokenizerError, match=message):
            load_tokenizer(tmp_path)
    with pytest.raises(UnsupportedTokenizerError, match="legacy"):
        load_tokenizer(GOLDEN / "llama", legacy=False)  # tokenizer.json fixes the behaviour


def test_unknown_override():
    with pytest.raises(TypeError, match="legasy"):
        load_tokenizer(GOLDEN / "llama", legasy=False)
