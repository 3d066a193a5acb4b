"""Live comparison of refimpl.tokenizers with transformers on hypothesis-drawn strings and ids.

Skipped where transformers (or sentencepiece) is not installed; the golden tests cover the same ground
without them. Here the domain is everything: strings where decode(encode(s)) != s included, since the
claim is "the same as transformers", not "the text back".
"""

from __future__ import annotations

import functools
import shutil
import sys
import warnings
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from refimpl.tokenizers import InvalidTextError, load_tokenizer  # noqa: E402
from refimpl.tokenizers.added_tokens import longest_match_split  # noqa: E402

pytestmark = pytest.mark.live_oracle
transformers.logging.set_verbosity_error()
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "tokenizers"
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# name -> (folder, transformers class name, ours is the tokenizer.json fallback)
PAIRS = {
    "llama_legacy": ("llama", "LlamaTokenizer", False),
    "llama_nonlegacy": ("llama-nonlegacy", "LlamaTokenizer", False),
    "llama_extra": ("llama-extra", "LlamaTokenizer", False),
    "opt": ("opt", "GPT2Tokenizer", False),
    "json_legacy": ("llama", "LlamaTokenizerFast", True),
    "json_nonlegacy": ("llama-nonlegacy", "LlamaTokenizerFast", True),
    "json_extra": ("llama-extra", "LlamaTokenizerFast", True),
}


@functools.cache
def pair(name: str):
    folder, cls, fallback = PAIRS[name]
    theirs = getattr(transformers, cls).from_pretrained(str(GOLDEN / folder))
    if not fallback:
        return load_tokenizer(GOLDEN / folder), theirs
    saved = sys.modules.get("sentencepiece")
    sys.modules["sentencepiece"] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_tokenizer(GOLDEN / folder), theirs
    finally:
        if saved is None:
            del sys.modules["sentencepiece"]
        else:
            sys.modules["sentencepiece"] = saved


PIECES = [" ", "  ", "   ", "\t", "\n", " \n", "<s>", "</s>", "<unk>", "<pad>", "<extra>", "<sep>", " <extra> ",
          "▁", "▁▁", "'s", "'LL", "😀", "中文", "鑫", "\u3000", "\x85", "\x1c", "\u180e", "e\u0301", "12", "½",
          "\ud800", "\udc00"]
texts = st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from(PIECES)), max_size=20).map("".join)


@pytest.mark.parametrize("name", sorted(PAIRS))
@SETTINGS
@given(text=texts)
def test_encode_and_decode_match_transformers(name, text):
    ours, theirs = pair(name)
    try:
        expected = theirs.encode(text)
    except Exception:  # lone surrogates: sentencepiece, tokenizers and GPT2Tokenizer each raise something
        with pytest.raises(InvalidTextError):
            ours.encode(text)
        return
    assert ours.encode(text) == expected
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    for kwargs in ({}, {"skip_special_tokens": True}, {"spaces_between_special_tokens": False}):
        assert ours.decode(expected, **kwargs) == theirs.decode(expected, **kwargs)


def ids_for(ours):
    extra = sorted(ours.specials.by_id)
    low = st.integers(0, min(len(ours) - 1, 300))  # Llama's specials and byte pieces, OPT's single bytes
    return st.lists(st.one_of(st.sampled_from(extra), low, st.integers(0, len(ours) - 1)), max_size=20)


@pytest.mark.parametrize("name", sorted(PAIRS))
@SETTINGS
@given(data=st.data())
def test_decode_of_any_ids_matches_transformers(name, data):
    ours, theirs = pair(name)
    ids = data.draw(ids_for(ours))
    for kwargs in ({}, {"skip_special_tokens": True}, {"spaces_between_special_tokens": False}):
        assert ours.decode(ids, **kwargs) == theirs.decode(ids, **kwargs)


@SETTINGS
@given(st.lists(st.sampled_from(["<", "s", ">", "/", "a", "b", "c", "d", "x", " "]), max_size=30).map("".join))
def test_added_token_split_matches_transformers_trie(text):
    from transformers.tokenization_utils import Trie

    tokens = ["<s>", "</s>", "<s", "<sab>", "ab", "abc", "d"]  # some tokens are prefixes of others
    trie = Trie()
    for t in tokens:
        trie.add(t)
    assert longest_match_split(text, dict.fromkeys(tokens)) == [p for p in trie.split(text) if p]


def test_trie_difference_when_a_token_sits_inside_another():
    """Deliberate difference: with added tokens "bcd" and "c", transformers' Trie.split("bc<d") looks ahead from
    the wrong character, "matches" bcd across the "<", and so does not split at all. We split out "c"
    (leftmost-longest, as the fast tokenizer does). Real Llama/OPT special tokens never sit inside one another."""
    from transformers.tokenization_utils import Trie

    trie = Trie()
    for t in ("bcd", "c"):
        trie.add(t)
    assert trie.split("bc<d") == ["bc<d"]
    assert longest_match_split("bc<d", dict.fromkeys(["bcd", "c"])) == ["b", "c", "<d"]


def test_non_legacy_model_equals_transformers_protobuf_edit():
    ours, theirs = pair("llama_nonlegacy")
    assert ours.sp.serialized_model_proto() == theirs.sp_model.serialized_model_proto()


def test_merges_without_final_newline_matches_transformers(tmp_path):
    for name in ("vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(GOLDEN / "opt" / name, tmp_path / name)
    merges = (GOLDEN / "opt" / "merges.txt").read_text(encoding="utf-8").rstrip("\n")
    (tmp_path / "merges.txt").write_text(merges, encoding="utf-8")
    last = "".join(merges.split("\n")[-1].split()).replace("Ġ", " ")
    ours, theirs = load_tokenizer(tmp_path), transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))
    for text in (last, f"a {last}", f"{last}{last}"):
        assert ours.encode(text) == theirs.encode(text)
