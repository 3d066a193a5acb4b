"""Added and special tokens: which ones a tokenizer folder declares, which ids they get, how text is cut on them.

Added tokens (<s>, </s>, <unk>, a pad token, anything from add_tokens) are cut out of the text before
the model's own algorithm sees it, so "Hello<s>" never reaches sentencepiece or BPE as one string.
This reproduces transformers 4.46.3's slow tokenizers: the splitting of PreTrainedTokenizer.tokenize
(tokenization_utils.py:622-700, Trie.split :80-245) and the way from_pretrained and
PreTrainedTokenizer.__init__ resolve special tokens from the files (tokenization_utils_base.py:2352-2440,
tokenization_utils.py:424-441).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .errors import TokenizerFileError
from .files import expect, read_json, summary, token_id

# The order in which transformers adds special tokens that are not yet in the vocabulary (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class AddedToken:
    """One added token, with the flags transformers stores for it (tokenizers.AddedToken)."""

    content: str
    special: bool = False
    lstrip: bool = False  # eat the whitespace on its left when splitting
    rstrip: bool = False  # eat the whitespace on its right
    single_word: bool = False  # only match as a whole word
    normalized: bool = True  # fast tokenizers: match in the normalized text instead of the raw text


FLAGS = ("lstrip", "rstrip", "single_word", "normalized", "special")


def added_token_from_json(value, where: str, special: bool | None = None) -> AddedToken:
    """A token as config files store it: a plain string or {"content": ..., "lstrip": ..., ...}, flags true/false."""
    if isinstance(value, str):
        return AddedToken(value, special=bool(special))
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise TokenizerFileError(
            f"{where}: expected a token string or an object with a 'content' string, got {summary(value)}"
        )
    flags = {k: expect(value[k], (bool,), where, k) for k in FLAGS if k in value}
    if special is not None:
        flags["special"] = special
    return AddedToken(value["content"], **flags)


# ---------------------------------------------------------------------------------------------------------------
# Which tokens are added and special, with which ids
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SpecialTokens:
    """The added-token table of one tokenizer, after from_pretrained and __init__ have run."""

    by_id: dict[int, AddedToken]
    named: dict[str, str | None]  # "bos_token" -> "<s>", ...
    additional: list[str] = field(default_factory=list)  # additional_special_tokens

    def __post_init__(self):
        self.by_content = {tok.content: i for i, tok in self.by_id.items()}

    def id_of(self, name: str) -> int | None:
        content = self.named.get(name)
        return None if content is None else self.by_content[content]

    @functools.cached_property
    def all_special_tokens(self) -> list[str]:
        """Contents of bos, eos, unk, sep, pad, cls, mask and the additional ones, in that order, deduplicated."""
        tokens = [t for t in (self.named.get(n) for n in SPECIAL_TOKEN_NAMES) if t is not None] + self.additional
        return list(dict.fromkeys(tokens))

    @functools.cached_property
    def all_special_ids(self) -> set[int]:
        return {self.by_content[t] for t in self.all_special_tokens}


def declared_added_tokens(folder: Path, config: dict, special_names: dict) -> dict[int, AddedToken]:
    """The added tokens a slow tokenizer folder declares (from_pretrained, tokenization_utils_base.py:2373-2431).

    Current files list them in tokenizer_config.json's added_tokens_decoder. Older ones keep them in
    added_tokens.json (special if named as a special token) or, failing that, in tokenizer.json.
    """
    where = folder / "tokenizer_config.json"
    if "added_tokens_decoder" in config:
        table = config["added_tokens_decoder"]
        if not isinstance(table, dict):
            raise TokenizerFileError(f"{where}: added_tokens_decoder must be an object, got {summary(table)}")
        return {token_id(i, where, "added_tokens_decoder key", as_key=True): _decoder_entry(i, v, where)
                for i, v in table.items()}
    declared = {}
    if (folder / "added_tokens.json").is_file():
        specials = {_content(v) for v in special_names.values() if isinstance(v, (str, dict))}
        specials |= {_content(v) for v in special_names.get("additional_special_tokens") or []}
        for content, i in read_json(folder / "added_tokens.json").items():
            special = content in specials
            token = AddedToken(content, special=special, normalized=not special)
            declared[token_id(i, folder / "added_tokens.json", f"the id of {summary(content)}")] = token
    elif (folder / "tokenizer.json").is_file():
        declared = tokenizer_json_added_tokens(read_json(folder / "tokenizer.json"), folder / "tokenizer.json")
    return declared


def _decoder_entry(key: str, value, where) -> AddedToken:
    """One added_tokens_decoder value: an object, as transformers requires there (not a plain string)."""
    name = f"added_tokens_decoder[{summary(key)}]"
    return added_token_from_json(expect(value, (dict,), where, name), f"{where}: {name}")


def tokenizer_json_added_tokens(data: dict, where: Path) -> dict[int, AddedToken]:
    out = {}
    for entry in expect(data.get("added_tokens", []), (list,), where, "added_tokens"):
        if not isinstance(entry, dict) or "id" not in entry:
            raise TokenizerFileError(f"{where}: an added token needs an 'id' and a 'content', got {summary(entry)}")
        out[token_id(entry["id"], where, "added_tokens id")] = added_token_from_json(entry, f"{where}: added_tokens")
    return out


def special_token_names(folder: Path, config: dict, defaults: dict, overrides: dict) -> dict:
    """bos_token, eos_token, ... as from_pretrained resolves them: class default < tokenizer_config.json <
    special_tokens_map.json (only for folders without added_tokens_decoder) < keyword overrides."""
    names = {k: v for k, v in defaults.items()}
    names.update({k: config[k] for k in (*SPECIAL_TOKEN_NAMES, "additional_special_tokens") if k in config})
    special_map = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and special_map.is_file():
        for k, v in read_json(special_map).items():
            if k in (*SPECIAL_TOKEN_NAMES, "additional_special_tokens") and not overrides.get(k):
                names[k] = check_special_token(k, v, special_map)
    names.update({k: v for k, v in overrides.items() if k in (*SPECIAL_TOKEN_NAMES, "additional_special_tokens")})
    return names


def build_special_tokens(
    declared: dict[int, AddedToken], names: dict, base_id: Callable[[str], int | None], base_size: int
) -> SpecialTokens:
    """Add every named special token that is not declared yet, as PreTrainedTokenizer.__init__ does.

    A token already in the model's vocabulary keeps that id (Llama's <s> is piece 1); a new one gets the next
    free id after the vocabulary and the declared added tokens (tokenization_utils.py:_add_tokens).
    """
    by_id = dict(declared)
    by_content = {tok.content: i for i, tok in by_id.items()}
    named = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = names.get(name)
        named[name] = None if value is None else added_token_from_json(value, name).content
    additional = [added_token_from_json(v, "additional_special_tokens").content
                  for v in names.get("additional_special_tokens") or []]
    # from_pretrained gives a named special token the flags it has in added_tokens_decoder, if it is there
    wanted = list(dict.fromkeys([t for t in named.values() if t is not None] + additional))
    next_id = base_size + sum(1 for i in by_id if i >= base_size)
    for content in wanted:
        if content in by_content:
            tok = by_id[by_content[content]]
            if not tok.special:  # _add_tokens(special_tokens=True) marks it special
                by_id[by_content[content]] = AddedToken(**{**tok.__dict__, "special": True})
            continue
        i = base_id(content)
        if i is None:
            i, next_id = next_id, next_id + 1
        by_id[i] = AddedToken(content, special=True, normalized=False)
        by_content[content] = i
    return SpecialTokens(by_id=by_id, named=named, additional=additional)


def check_special_token(name: str, value, where):
    """value of bos_token, ..., or additional_special_tokens as a file gives it: a token (string or object) or
    null; for additional_special_tokens a list of tokens, or null."""
    if name != "additional_special_tokens":
        if value is not None:
            added_token_from_json(value, f"{where}: {name}")  # raises if it is not a token
        return value
    for i, item in enumerate(expect(value, (list, type(None)), where, name) or []):
        added_token_from_json(item, f"{where}: {name}[{i}]")
    return value


def _content(value) -> str:
    return value if isinstance(value, str) else value.get("content", "")


# ---------------------------------------------------------------------------------------------------------------
# Cutting text on added tokens
# ---------------------------------------------------------------------------------------------------------------
def longest_match_split(text: str, tokens: Mapping[str, object]) -> list[str]:
    """Split text around the tokens: at each position the longest token that starts there, leftmost first.

    transformers' Trie.split and tokenizers' aho-corasick (LeftmostLongest) both behave like this; an re
    alternation tried longest-first does the same.
    """
    if not text:
        return []
    if not tokens:
        return [text]
    return [piece for piece in _alternation(tuple(tokens)).split(text) if piece]


@functools.lru_cache(maxsize=64)
def _alternation(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(filter(None, tokens), key=len, reverse=True)) + ")")


def split_on_added_tokens(text: str, added: Mapping[str, AddedToken]) -> list[tuple[str, bool]]:
    """(piece, is_added_token) pairs, with the lstrip/rstrip/single_word rules of PreTrainedTokenizer.tokenize."""
    pieces = longest_match_split(text, added)
    for i, piece in enumerate(pieces):
        tok = added.get(piece)
        if tok is None:
            continue
        left = pieces[i - 1] if i > 0 else None
        right = pieces[i + 1] if i < len(pieces) - 1 else None
        if tok.rstrip and right:
            pieces[i + 1] = right.lstrip()  # rstrip eats the whitespace to the token's right
        if tok.lstrip and left:
            pieces[i - 1] = left.rstrip()
        if tok.single_word and left and left[-1] != " ":
            pieces[i - 1] += piece  # not a word on its own: glued back to its neighbour and tokenized as text
            pieces[i] = ""
        elif tok.single_word and right and right[0] != " ":
            pieces[i + 1] = piece + pieces[i + 1]
            pieces[i] = ""
    return [(p, p in added) for p in pieces if p]
