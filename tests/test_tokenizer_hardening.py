"""Hardening of refimpl.tokenizers: streaming with clean_up_tokenization_spaces, and a cleanup that may not reach back.

- streaming decode concatenates to the full decode for any ids and any decode flags, cleanup included,
  and raises nothing but a RefimplError (before: AssertionError on OPT with "x n't", "hello .");
- GPT-2 BPE on one long word is O(n log n) (a 50,000-character word: 24 s before, 0.2 s after) and merges
  exactly as the loop it replaced, which is kept here as bpe_reference;
- tokenizer files of the wrong structure or with wrong-typed fields raise TokenizerFileError (a RefimplError)
  naming the file, the field and a bounded summary of the bad value, while loading.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from refimpl.errors import RefimplError
from refimpl.tokenizers import (
    InvalidTokenIdError,
    LlamaJsonTokenizer,
    TokenizerFileError,
    TokenizerUsageError,
    load_tokenizer,
)
from refimpl.tokenizers.cleanup import clean_up_tokenization, stable_length
from refimpl.tokenizers.gpt2_bpe import bpe
from refimpl.tokenizers.tokenizer_json import bpe_merge

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "tokenizers"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# name -> (folder, load through tokenizer.json without sentencepiece)
TOKENIZERS = {
    "opt": ("opt", False),
    "llama_legacy": ("llama", False),
    "llama_nonlegacy": ("llama-nonlegacy", False),
    "llama_extra": ("llama-extra", False),
    "json_legacy": ("llama", True),
    "json_nonlegacy": ("llama-nonlegacy", True),
    "json_extra": ("llama-extra", True),
}


def load_json_tokenizer(folder: Path, **overrides):
    """The pure-Python tokenizer.json reader, as on a machine without sentencepiece."""
    saved = sys.modules.get("sentencepiece")
    sys.modules["sentencepiece"] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = load_tokenizer(folder, **overrides)
    finally:
        if saved is None:
            del sys.modules["sentencepiece"]
        else:
            sys.modules["sentencepiece"] = saved
    assert isinstance(tok, LlamaJsonTokenizer)
    return tok


@functools.cache
def tokenizer(name: str, clean_up: bool = False):
    folder, from_json = TOKENIZERS[name]
    load = load_json_tokenizer if from_json else load_tokenizer
    return load(GOLDEN / folder, clean_up_tokenization_spaces=clean_up)


def stream(tok, ids, **kwargs) -> list[str]:
    decoder = tok.stream_decoder(**kwargs)
    return [decoder.push(i) for i in ids] + [decoder.finish()]


# ---------------------------------------------------------------------------------------------------------------
# 1. Streaming decode with clean_up_tokenization_spaces
# ---------------------------------------------------------------------------------------------------------------
# Texts whose cleanup glues onto text a stream would already have shown, and pieces to build more from
CLEANUP_TEXTS = ["x n't", "hello .", "a ' b", "I 'm here , ok ? yes !", "they 're , we 've", "it 's  .", "n n n't"]
CLEANUP_PIECES = [" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're", "n't", "'", " ", "  ", "n",
                  "'t", "x", "hello", "v", "r", "e", "é", "中", "😀", " <s>", "</s>", "\n"]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("text", CLEANUP_TEXTS)
def test_streaming_with_cleanup_equals_full_decode(name, text):
    tok = tokenizer(name, clean_up=True)
    ids = tok.encode(text)
    for skip in (False, True):
        assert "".join(stream(tok, ids, skip_special_tokens=skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_streaming_with_cleanup_holds_back_only_what_can_change():
    tok = tokenizer("opt", clean_up=True)
    ids = tok.encode("x n't go . done", add_special_tokens=False)
    chunks = stream(tok, ids)
    assert "".join(chunks) == "xn't go. done"
    emitted = [chunk for chunk in chunks[:-1] if chunk]
    assert emitted[:1] == ["x"]  # "x" is final at once: no replacement can reach back across it
    assert "".join(emitted).startswith("xn't go.")  # shown before finish(), each piece once it could not change


def cleanup_ids(tok):
    """Id sequences weighted towards cleanup's patterns, special tokens and byte tokens."""
    pieces = {i for p in CLEANUP_PIECES for i in tok.encode(p, add_special_tokens=False)}
    pool = sorted(pieces | set(tok.specials.by_id))
    any_id = st.integers(0, len(tok) - 1)
    return st.lists(st.one_of(st.sampled_from(pool), st.sampled_from(pool), any_id), max_size=30)


DECODE_FLAGS = st.fixed_dictionaries({
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "clean_up_tokenization_spaces": st.sampled_from([None, False, True]),
})


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("clean_up_default", [False, True])
@SETTINGS
@given(data=st.data())
def test_streaming_any_ids_concatenates_to_full_decode(name, clean_up_default, data):
    """For any ids and flags: no exception, and the streamed pieces joined are exactly decode(ids, **flags)."""
    tok = tokenizer(name, clean_up=clean_up_default)
    ids = data.draw(cleanup_ids(tok), label="ids")
    kwargs = data.draw(DECODE_FLAGS, label="flags")
    assert "".join(stream(tok, ids, **kwargs)) == tok.decode(ids, **kwargs)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=" .?!,'ntmsvrex", max_size=16), st.text(alphabet=" .?!,'ntmsvrex", max_size=8))
@example("x n", "'t")
@example("a '", " b")
@example("hello ", ".")
def test_cleanup_never_reaches_back_over_the_stable_prefix(text, more):
    """What a stream shows of text, clean_up(text[:stable_length(text)]), starts clean_up of any longer text."""
    shown = clean_up_tokenization(text[: stable_length(text)])
    assert clean_up_tokenization(text + more).startswith(shown)


def test_stable_length_holds_back_only_a_tail_a_pattern_could_start():
    assert stable_length("hello world") == len("hello world")
    assert stable_length("x n") == 1 and stable_length("hello ") == 5 and stable_length("a '") == 1
    assert stable_length("it's") == 4  # "s" ends " 's": a match can end on it, but never continue past it


def rewrite_decoder(tmp_path: Path, step: dict) -> Path:
    """A copy of the golden Llama folder whose tokenizer.json decoder gets one more step at the end."""
    data = json.loads((GOLDEN / "llama" / "tokenizer.json").read_text(encoding="utf-8"))
    data["decoder"]["decoders"].append(step)
    shutil.copy(GOLDEN / "llama" / "tokenizer_config.json", tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return tmp_path


THE = ("▁t", "h", "e", "▁", "▁")  # "the" spelt in three tokens, then two spaces


def test_streaming_json_waits_for_a_replace_after_fuse(tmp_path):
    """A Replace of two characters after Fuse joins two tokens' text ("h" + "e" -> "HE"): nothing is final early."""
    step = {"type": "Replace", "pattern": {"String": "he"}, "content": "HE"}
    tok = load_json_tokenizer(rewrite_decoder(tmp_path, step))
    ids = [tok.vocab[t] for t in THE]
    for n in range(len(ids) + 1):
        assert "".join(stream(tok, ids[:n])) == tok.decode(ids[:n])
    assert tok.decode(ids) == "tHE  "


def test_streaming_json_streams_through_a_trailing_strip(tmp_path):
    """Strip after Fuse (here of trailing spaces) keeps each decode a prefix of the next, so text still streams."""
    step = {"type": "Strip", "content": " ", "start": 0, "stop": 1}
    tok = load_json_tokenizer(rewrite_decoder(tmp_path, step))
    ids = [tok.vocab[t] for t in THE]
    for n in range(len(ids) + 1):
        chunks = stream(tok, ids[:n])
        assert "".join(chunks) == tok.decode(ids[:n])
    assert tok.decode(ids) == "the " and "".join(chunks[:-1]) == "the "


# ---------------------------------------------------------------------------------------------------------------
# 2. GPT-2 BPE: a heap instead of a rescan per merge
# ---------------------------------------------------------------------------------------------------------------
def bpe_reference(word: str, ranks: dict) -> list[str]:
    """gpt2_bpe.bpe before the heap, line for line transformers' GPT2Tokenizer.bpe: one O(n) rescan per merge."""
    parts = list(word)
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


@st.composite
def merge_ranks(draw) -> dict:
    """Merges over "abc": each joins two symbols that exist by then (a letter or an earlier merge's result).
    Half the time the ranks are shuffled, so a merge can rank below the merges that make its parts."""
    symbols, pairs = ["a", "b", "c"], []
    for _ in range(draw(st.integers(0, 14))):
        pair = (draw(st.sampled_from(symbols)), draw(st.sampled_from(symbols)))
        pairs.append(pair)
        symbols.append("".join(pair))
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    return {pair: rank for rank, pair in enumerate(pairs)}  # a repeated pair keeps its last rank, as in GPT2Tokenizer


# "bcbc": one pass merges both "b c"; the "bc b" it creates ranks lower, but waits for the next pass (and then
# is gone). tokenizers' BPE, which takes each new pair at once, gives ["bcb", "c"] instead.
@settings(max_examples=1000, deadline=None)
@given(word=st.text(alphabet="abc", max_size=40), ranks=merge_ranks())
@example(word="bcbc", ranks={("bc", "b"): 0, ("b", "c"): 1})
@example(word="aaaaa", ranks={("a", "a"): 0, ("aa", "a"): 1, ("aa", "aa"): 2})
def test_bpe_heap_merges_as_the_rescan_loop(word, ranks):
    assert bpe(word, ranks) == bpe_reference(word, ranks)


def test_gpt2_and_tokenizers_bpe_differ_on_a_pair_made_mid_pass():
    ranks = {("bc", "b"): 0, ("b", "c"): 1}
    assert bpe("bcbc", ranks) == ["bc", "bc"]  # GPT2Tokenizer (checked against transformers below)
    assert bpe_merge(list("bcbc"), ranks) == ["bcb", "c"]  # tokenizers' Word::merge_all, for tokenizer.json


def test_bpe_pass_semantics_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = {"<|endoftext|>": 0, "b": 1, "c": 2, "bc": 3, "bcb": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nbc b\nb c\n", encoding="utf-8")
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert load_tokenizer(tmp_path).encode("bcbc") == theirs.encode("bcbc") == [3, 3]


def long_word(n: int) -> str:
    """n letters of the golden training text, without anything else: one pre-tokenized word that needs
    many different merges (Latin and Chinese letters)."""
    letters = "".join(c for c in (GOLDEN / "train_text.txt").read_text(encoding="utf-8") if c.isalpha())
    return (letters * (n // len(letters) + 1))[:n]


def test_bpe_of_a_50k_character_word_is_fast():
    tok = tokenizer("opt")
    tok.encode("warm up")  # builds the pre-tokenization pattern (~0.4 s) outside the timing
    word = long_word(50_000)
    start = time.perf_counter()
    ids = tok.encode(word, add_special_tokens=False)
    elapsed = time.perf_counter() - start
    # 24 s with the rescan loop, 0.2 s with the heap; 10 s leaves room for a busy shared machine
    assert elapsed < 10.0, f"encoding a 50,000-character word took {elapsed:.1f} s"
    assert tok.decode(ids) == word
    transformers = pytest.importorskip("transformers")
    fast = transformers.GPT2TokenizerFast.from_pretrained(str(GOLDEN / "opt"))
    assert ids == fast.encode(word, add_special_tokens=False)


def test_bpe_of_a_long_word_equals_the_rescan_loop():
    tok = tokenizer("opt")
    chars = "".join(tok._byte_to_char[b] for b in long_word(3000).encode("utf-8"))
    assert bpe(chars, tok.ranks) == bpe_reference(chars, tok.ranks)


def test_tokenizer_json_bpe_of_a_50k_character_text_is_fast():
    """Llama's tokenizer.json has no pre-tokenizer, so a whole text is one BPE word. bpe_merge already used a heap
    (0.1 s here); one rescan per merge, the quadratic way to write it, took 15 s on this text."""
    tok = tokenizer("json_legacy")
    text = (GOLDEN / "train_text.txt").read_text(encoding="utf-8")
    text = (text * (50_000 // len(text) + 1))[:50_000]
    start = time.perf_counter()
    ids = tok.encode(text, add_special_tokens=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"encoding a 50,000-character text took {elapsed:.1f} s"
    transformers = pytest.importorskip("transformers")
    fast = transformers.LlamaTokenizerFast.from_pretrained(str(GOLDEN / "llama"))
    assert ids == fast.encode(text, add_special_tokens=False)  # (the text holds "<s>": no round trip to compare)


# ---------------------------------------------------------------------------------------------------------------
# 3. Tokenizer files of the wrong structure
# ---------------------------------------------------------------------------------------------------------------
def make_folder(tmp_path: Path, source: str) -> Path:
    """A copy of a golden folder. "opt-tokenizer-json": OPT with tokenizer.json only. "...-old": a folder from
    before added_tokens_decoder, whose special_tokens_map.json and added_tokens.json are read instead."""
    name = source.removesuffix("-old").removesuffix("-tokenizer-json")
    folder = tmp_path / source
    shutil.copytree(GOLDEN / name, folder)
    if source.endswith("-tokenizer-json"):
        (folder / "vocab.json").unlink()
        (folder / "merges.txt").unlink()
    if source.endswith("-old"):
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        del config["added_tokens_decoder"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        (folder / "added_tokens.json").write_text('{"<new>": 2000}', encoding="utf-8")
    return folder


def set_at(path: tuple, value):
    """An edit of a JSON document: put value at path (keys and list indices); () replaces the whole document."""
    def edit(data):
        if not path:
            return value
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return data
    return edit


def load(folder: Path, without_sentencepiece: bool):
    return load_json_tokenizer(folder) if without_sentencepiece else load_tokenizer(folder)


ADDED = {"content": "<pad>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
         "special": True}

# (golden folder, file, edit, load without sentencepiece, what the message must say after the file name)
BAD_FILES = [
    ("opt", "vocab.json", set_at((), ["a", "b"]), False, "expected a JSON object, got list"),
    ("opt", "vocab.json", set_at(("Ġt",), "zero"), False, "the id of 'Ġt' is 'zero', not a non-negative integer"),
    ("opt", "vocab.json", set_at(("Ġt",), -1), False, "the id of 'Ġt' is -1, not a non-negative"),
    ("opt", "vocab.json", set_at(("Ġt",), True), False, "the id of 'Ġt' is True, not a non-negative"),
    ("opt", "vocab.json", set_at(("Ġt",), 1.5), False, "the id of 'Ġt' is 1.5, not a non-negative"),
    ("opt", "tokenizer_config.json", set_at((), [1]), False, "expected a JSON object, got list"),
    ("opt", "tokenizer_config.json", set_at(("add_bos_token",), "false"), False,
     "add_bos_token must be true or false or null, got 'false'"),
    ("opt", "tokenizer_config.json", set_at(("tokenizer_class",), ["GPT2Tokenizer"]), False,
     r"tokenizer_class must be a string or null, got \['GPT2Tokenizer'\]"),
    ("opt", "tokenizer_config.json", set_at(("padding_side",), "middle"), False,
     "padding_side must be 'left' or 'right', got 'middle'"),
    ("opt", "tokenizer_config.json", set_at(("padding_side",), None), False, "padding_side must be a string, got None"),
    ("opt", "tokenizer_config.json", set_at(("errors",), 5), False, "errors must be a string, got 5"),
    ("opt", "tokenizer_config.json", set_at(("errors",), "loudly"), False, "errors must be one of .*, got 'loudly'"),
    ("opt", "tokenizer_config.json", set_at(("bos_token",), 7), False,
     "bos_token: expected a token string or an object with a 'content' string, got 7"),
    ("opt", "tokenizer_config.json", set_at(("eos_token",), {"content": None}), False,
     "eos_token: expected a token string or an object with a 'content' string, got {'content': None}"),
    ("opt", "tokenizer_config.json", set_at(("additional_special_tokens",), "<sep>"), False,
     "additional_special_tokens must be a list or null, got '<sep>'"),
    ("opt", "tokenizer_config.json", set_at(("additional_special_tokens",), ["<sep>", 3]), False,
     r"additional_special_tokens\[1\]: expected a token string .*, got 3"),
    ("opt", "tokenizer_config.json", set_at(("added_tokens_decoder",), []), False,
     "added_tokens_decoder must be an object, got \\[\\]"),
    ("opt", "tokenizer_config.json", set_at(("added_tokens_decoder", "1"), "<pad>"), False,
     r"added_tokens_decoder\['1'\] must be an object, got '<pad>'"),
    ("opt", "tokenizer_config.json", set_at(("added_tokens_decoder",), {"one": ADDED}), False,
     "added_tokens_decoder key is 'one', not a non-negative integer"),
    ("opt", "tokenizer_config.json", set_at(("added_tokens_decoder", "1", "special"), "yes"), False,
     "special must be true or false, got 'yes'"),
    ("llama", "tokenizer_config.json", set_at(("legacy",), "no"), False,
     "legacy must be true or false or null, got 'no'"),
    ("llama", "tokenizer_config.json", set_at(("sp_model_kwargs",), "sample"), False,
     "sp_model_kwargs must be an object or null, got 'sample'"),
    ("opt-old", "special_tokens_map.json", set_at(("pad_token",), 1), False,
     "pad_token: expected a token string or an object with a 'content' string, got 1"),
    ("opt-old", "special_tokens_map.json", set_at(("eos_token", "lstrip"), "no"), False,
     "lstrip must be true or false, got 'no'"),
    ("opt-old", "added_tokens.json", set_at(("<new>",), "2000"), False, "the id of '<new>' is '2000', not a non-neg"),
    ("opt-old", "added_tokens.json", set_at((), ["<new>"]), False, "expected a JSON object, got list"),
    ("llama", "tokenizer.json", set_at((), []), True, "expected a JSON object, got list"),
    ("llama", "tokenizer.json", set_at(("model",), "BPE"), True, "model must be an object, got 'BPE'"),
    ("llama", "tokenizer.json", set_at(("model", "vocab"), ["<unk>"]), True,
     r"model.vocab must be an object, got \['<unk>'\]"),
    ("llama", "tokenizer.json", set_at(("model", "vocab", "<s>"), "1"), True,
     "model.vocab: the id of '<s>' is '1', not a non-negative integer"),
    ("llama", "tokenizer.json", set_at(("model", "merges"), "▁ t"), True, "model.merges must be a list, got '▁ t'"),
    ("llama", "tokenizer.json", set_at(("model", "merges", 0), [1, 2]), True,
     r"merge \[1, 2\] is not two tokens whose join is in the vocabulary"),
    ("llama", "tokenizer.json", set_at(("model", "merges", 0), ["▁", "t", "h"]), True, "merge .* is not two tokens"),
    ("llama", "tokenizer.json", set_at(("model", "byte_fallback"), "yes"), True,
     "model.byte_fallback must be true or false or null, got 'yes'"),
    ("llama", "tokenizer.json", set_at(("model", "unk_token"), 0), True,
     "model.unk_token must be a string or null, got 0"),
    ("llama", "tokenizer.json", set_at(("normalizer",), "Prepend"), True,
     "normalizer must be an object or null, got 'Prepend'"),
    ("llama", "tokenizer.json", set_at(("normalizer", "normalizers"), {}), True,
     "normalizer.normalizers must be a list, got {}"),
    ("llama", "tokenizer.json", set_at(("normalizer", "normalizers", 0, "prepend"), 5), True,
     r"normalizer.normalizers\[0\].prepend must be a string, got 5"),
    ("llama", "tokenizer.json", set_at(("normalizer", "normalizers", 1, "pattern"), "String"), True,
     r"normalizer.normalizers\[1\].pattern must be an object, got 'String'"),
    ("llama", "tokenizer.json", set_at(("decoder", "decoders", 0), "Fuse"), True,
     r"decoder.decoders\[0\] must be an object, got 'Fuse'"),
    ("llama", "tokenizer.json", set_at(("decoder", "decoders", 0, "content"), None), True,
     r"decoder.decoders\[0\].content must be a string, got None"),
    ("llama", "tokenizer.json", set_at(("decoder", "decoders", 3, "start"), "1"), True,
     r"decoder.decoders\[3\].start must be an integer, got '1'"),
    ("llama-nonlegacy", "tokenizer.json", set_at(("pre_tokenizer",), 7), True,
     "pre_tokenizer must be an object or null, got 7"),
    ("llama-nonlegacy", "tokenizer.json", set_at(("pre_tokenizer", "prepend_scheme"), 1), True,
     "pre_tokenizer.prepend_scheme must be a string, got 1"),
    ("llama", "tokenizer.json", set_at(("added_tokens",), {}), True, "added_tokens must be a list, got {}"),
    ("llama", "tokenizer.json", set_at(("added_tokens", 0, "id"), "0"), True, "added_tokens id is '0', not a non-neg"),
    ("llama", "tokenizer.json", set_at(("added_tokens", 0, "lstrip"), "no"), True,
     "lstrip must be true or false, got 'no'"),
    ("opt-tokenizer-json", "tokenizer.json", set_at(("pre_tokenizer",), "ByteLevel"), False,
     "pre_tokenizer must be an object or null, got 'ByteLevel'"),
    ("opt-tokenizer-json", "tokenizer.json", set_at(("decoder",), []), False,
     r"decoder must be an object or null, got \[\]"),
    ("opt-tokenizer-json", "tokenizer.json", set_at(("pre_tokenizer", "add_prefix_space"), "no"), False,
     "pre_tokenizer.add_prefix_space must be true or false, got 'no'"),
]


@pytest.mark.parametrize("source, name, edit, without_sentencepiece, message", BAD_FILES,
                         ids=[f"{case[1]}-{case[4][:40]}" for case in BAD_FILES])
def test_wrong_structure_is_a_file_error_naming_file_and_value(tmp_path, source, name, edit, without_sentencepiece,
                                                               message):
    folder = make_folder(tmp_path, source)
    path = folder / name
    path.write_text(json.dumps(edit(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=f"{name}: .*{message}") as info:
        load(folder, without_sentencepiece)
    assert isinstance(info.value, RefimplError) and str(path) in str(info.value)


@pytest.mark.parametrize("line", ["Ġ t h", "Ġt", "a b c d"])
def test_merges_line_that_is_not_two_tokens(tmp_path, line):
    folder = make_folder(tmp_path, "opt")
    merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges[2] = line  # line 3 of the file
    (folder / "merges.txt").write_text("\n".join(merges), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=f"merges.txt: line 3 is '{line}', not two tokens"):
        load_tokenizer(folder)


def test_a_blank_merges_line_is_still_allowed(tmp_path):
    """transformers keeps a blank line as a merge that never matches; so do we (a file may end with two newlines)."""
    folder = make_folder(tmp_path, "opt")
    (folder / "merges.txt").write_text((GOLDEN / "opt" / "merges.txt").read_text(encoding="utf-8") + "\n")
    assert load_tokenizer(folder).encode("Hello world") == tokenizer("opt").encode("Hello world")


@pytest.mark.parametrize("bad", ["x" * 1_000_000, ["y"] * 100_000, {str(i): i for i in range(100_000)}])
def test_a_huge_bad_value_is_summarised(tmp_path, bad):
    folder = make_folder(tmp_path, "opt")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["Ġt"] = bad
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="the id of 'Ġt' is ") as info:
        load_tokenizer(folder)
    assert len(str(info.value)) < len(str(folder)) + 300


def test_a_huge_bad_key_is_summarised(tmp_path):
    folder = make_folder(tmp_path, "opt")
    (folder / "vocab.json").write_text(json.dumps({"k" * 1_000_000: "v"}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="the id of 'kkkk") as info:
        load_tokenizer(folder)
    assert len(str(info.value)) < len(str(folder)) + 300


def test_a_number_too_long_for_python_is_a_file_error(tmp_path):
    folder = make_folder(tmp_path, "opt")
    (folder / "vocab.json").write_text('{"a": ' + "9" * 5000 + "}", encoding="utf-8")  # int() refuses > 4300 digits
    with pytest.raises(TokenizerFileError, match="vocab.json: cannot read it as JSON"):
        load_tokenizer(folder)


@pytest.mark.parametrize("override, value, message", [
    ("add_bos_token", "yes", "add_bos_token must be true or false or null, got 'yes'"),
    ("padding_side", "up", "padding_side must be 'left' or 'right', got 'up'"),
    ("pad_token", 1, "pad_token: expected a token string"),
    ("additional_special_tokens", "<sep>", "additional_special_tokens must be a list or null"),
])
def test_wrong_typed_override(override, value, message):
    with pytest.raises(TokenizerUsageError, match=f"load_tokenizer\\(\\): {message}"):
        load_tokenizer(GOLDEN / "opt", **{override: value})


def test_strict_decode_errors_are_refimpl_errors(tmp_path):
    """errors="strict" (as bytes.decode takes it) makes bad bytes an error: a RefimplError, not UnicodeDecodeError."""
    folder = make_folder(tmp_path, "opt")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "errors": "strict"}), encoding="utf-8")
    tok = load_tokenizer(folder)
    byte_ff = tok.encoder[tok._byte_to_char[0xFF]]
    assert tok.decode(tok.encode("é中")) == "</s>é中"
    with pytest.raises(InvalidTokenIdError, match="not UTF-8.*errors='strict'"):
        tok.decode([byte_ff])
    decoder = tok.stream_decoder()
    decoder.push(tok.encoder[tok._byte_to_char[0xC3]])  # the first byte of "é": held back, no error yet
    with pytest.raises(InvalidTokenIdError, match="not UTF-8"):
        decoder.push(byte_ff)
