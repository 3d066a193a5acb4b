"""Property tests for refimpl.tokenizers (hypothesis; transformers is not needed).

- decode(encode(s)) == s wherever transformers itself gives the text back:
    OPT: every string (lone surrogates are an error); with skip_special_tokens, strings without "</s>"/"<pad>".
    slow Llama (legacy and not): strings that do not start with " ", contain no "▁" and no special-token
      text. Outside that domain transformers does not give the text back either (a leading space is eaten,
      "▁" becomes " ", specials gain spaces); test_tokenizer_live.py compares those cases with transformers.
    tokenizer.json fallback (LlamaTokenizerFast): no "▁", no special-token text, and for the non-legacy
      file (Metaspace "first") no leading " ".
- streaming decode of any id sequence concatenates to the full decode;
- GPT-2's pre-tokenization with re equals the regex module's (where both know the same Unicode version).
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.tokenizers import load_tokenizer
from refimpl.tokenizers.gpt2_bpe import WHITESPACE, pretokenize

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "tokenizers"
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FOLDERS = {
    "opt": "opt",
    "llama_legacy": "llama",
    "llama_nonlegacy": "llama-nonlegacy",
    "llama_extra": "llama-extra",
    "json_legacy": "llama",
    "json_nonlegacy": "llama-nonlegacy",
    "json_extra": "llama-extra",
}


@functools.cache
def tokenizer(name: str):
    if not name.startswith("json"):
        return load_tokenizer(GOLDEN / FOLDERS[name])
    saved = sys.modules.get("sentencepiece")
    sys.modules["sentencepiece"] = None  # hide it: load the pure-Python tokenizer.json reader
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_tokenizer(GOLDEN / FOLDERS[name])
    finally:
        if saved is None:
            del sys.modules["sentencepiece"]
        else:
            sys.modules["sentencepiece"] = saved


# Text: any UTF-8-encodable characters, mixed with the pieces where tokenizers have quirks.
PIECES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "<s>", "</s>", "<unk>", "<pad>", "<extra>", "<sep>", "▁",
          "'s", "'ll", "'T", "😀", "🦩", "中文", "鑫", "\u3000", "\x85", "\u2028", "\x1c", "\u180e", "é", "e\u0301",
          "12", "½"]
texts = st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from(PIECES)), max_size=24).map("".join)


def special_texts(tok) -> list[str]:
    return list(tok.specials.by_content)


def in_llama_domain(text: str, tok, leading_space_ok: bool = False) -> bool:
    has_special = any(s in text for s in special_texts(tok))
    return "▁" not in text and not has_special and (leading_space_ok or not text.startswith(" "))


@SETTINGS
@given(texts)
def test_opt_round_trip(text):
    tok = tokenizer("opt")
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok.encode(text)) == "</s>" + text  # the bos OPT puts in front
    if "</s>" not in text and "<pad>" not in text:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


@pytest.mark.parametrize("name", ["llama_legacy", "llama_nonlegacy", "llama_extra", "json_legacy", "json_extra"])
@SETTINGS
@given(text=texts)
def test_llama_round_trip(name, text):
    tok = tokenizer(name)
    leading_space_ok = name in ("json_legacy", "json_extra")  # the fast decoder strips exactly the "▁" it added
    if in_llama_domain(text, tok, leading_space_ok):
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


@SETTINGS
@given(text=texts)
def test_json_nonlegacy_round_trip(text):
    tok = tokenizer("json_nonlegacy")
    if in_llama_domain(text, tok):
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def id_sequences(tok):
    """Ids a model could emit, weighted towards the interesting ones: specials, added tokens, byte tokens."""
    specials = sorted(tok.specials.by_id)
    if hasattr(tok, "sp") or hasattr(tok, "byte_fallback"):
        bytes_ = st.integers(3, 258)  # Llama's <0x00>..<0xFF>
    else:
        bytes_ = st.integers(0, tok.vocab_size - 1).filter(lambda i: len(tok.decoder[i]) == 1)  # single-byte BPE tokens
    one = st.one_of(st.sampled_from(specials), bytes_, bytes_, st.integers(0, len(tok) - 1))
    return st.lists(one, max_size=24)


@pytest.mark.parametrize("name", sorted(FOLDERS))
@SETTINGS
@given(data=st.data())
def test_streaming_concatenates_to_full_decode(name, data):
    tok = tokenizer(name)
    ids = data.draw(id_sequences(tok))
    flags = {"skip_special_tokens": st.booleans(), "spaces_between_special_tokens": st.booleans()}
    kwargs = data.draw(st.fixed_dictionaries(flags))
    stream = tok.stream_decoder(**kwargs)
    chunks = [stream.push(i) for i in ids]
    assert "".join(chunks) + stream.finish() == tok.decode(ids, **kwargs)


@pytest.mark.parametrize("name", ["opt", "llama_legacy", "llama_nonlegacy", "json_legacy"])
@SETTINGS
@given(text=texts)
def test_streaming_never_splits_a_character(name, text):
    """Streaming the ids of valid text never shows U+FFFD (unless the text has one) and gives the text back."""
    tok = tokenizer(name)
    ids = tok.encode(text, add_special_tokens=False)
    stream = tok.stream_decoder()
    chunks = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(chunks) == tok.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in c for c in chunks)


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 pre-tokenization without the regex module
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("char", list("\t\n\x0b\x0c\r\x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"))
def test_unicode_whitespace_is_whitespace(char):
    # the run " c" before "b": \s+(?!\S) takes " ", then \s+ takes c alone (only a " " joins the next word)
    assert pretokenize(f"a {char}b") == ["a", " ", char, "b"]
    assert pretokenize(f"a{char}{char}") == ["a", char + char]


@pytest.mark.parametrize("char", ["\x1c", "\x1d", "\x1e", "\x1f", "\u180e", "\u200b", "\ufeff"])
def test_characters_python_or_old_unicode_call_whitespace_are_not(char):
    # \x1c-\x1f: str.isspace() is True, but not for the regex module's \s; U+180E left White_Space in Unicode 6.3
    assert char.isspace() == (char in "\x1c\x1d\x1e\x1f")
    assert pretokenize(f"a {char}b") == ["a", f" {char}", "b"]


def test_pretokenize_examples():
    assert pretokenize("Hello  world's 123 ½x") == ["Hello", " ", " world", "'s", " 123", " ½", "x"]
    assert pretokenize("I'LL  \n\n x") == ["I", "'", "LL", "  \n\n", " x"]  # case-sensitive contractions
    assert pretokenize("中文 😀😀!!") == ["中文", " 😀😀!!"]
    assert pretokenize("  ") == ["  "] and pretokenize("") == []


def test_whitespace_class_equals_regex_module():
    regex = pytest.importorskip("regex")
    everything = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)
    assert set(re.findall(f"[{WHITESPACE}]", everything)) == set(regex.findall(r"\s", everything))


@functools.cache
def same_classes_in_regex(char: str) -> bool:
    """True if the regex module and this Python's unicodedata agree on whether char is a letter / a number."""
    import regex

    cat = unicodedata.category(char)
    letter, number = regex.match(r"\p{L}", char) is not None, regex.match(r"\p{N}", char) is not None
    return letter == (cat[0] == "L") and number == (cat[0] == "N")


@SETTINGS
@given(texts)
def test_pretokenize_equals_regex_module(text):
    regex = pytest.importorskip("regex")
    if all(same_classes_in_regex(c) for c in text):
        pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        assert pretokenize(text) == regex.findall(pattern, text)


def test_import_needs_numpy_and_standard_library_only():
    code = (
        "import sys, refimpl.tokenizers; "
        "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'numpy', 'refimpl'}))"
    )
    root = GOLDEN.parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    third_party = [m for m in eval(out.stdout) if not m.startswith("_")]  # private C helpers of numpy/stdlib
    assert third_party == [], third_party
