"""GPT-2 byte-level BPE, as transformers' slow GPT2Tokenizer runs it; OPT uses it with bos "</s>" prepended.

Encode: cut out added tokens, split each remaining piece with GPT-2's pre-tokenization pattern, write
each part's UTF-8 bytes as printable characters (bytes_to_unicode), then merge adjacent symbols by
merges.txt rank. Decode: join the tokens, map the characters back to bytes, decode UTF-8 with
errors="replace". Source: models/gpt2/tokenization_gpt2.py (transformers 4.46.3).
The pattern is run with the standard library's re: only the regex module knows \\p{L}, so the letter
and number classes are built from unicodedata (see pretokenize_pattern).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import re
import sys
import unicodedata
from pathlib import Path

from .added_tokens import build_special_tokens, declared_added_tokens, special_token_names, split_on_added_tokens
from .base import Tokenizer
from .errors import InvalidTokenIdError, TokenizerFileError
from .files import check_vocab, read_json, summary

# GPT2Tokenizer's class defaults; OPT's tokenizer_config.json overrides them.
GPT2_DEFAULTS = {
    "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": None,
}

# The errors= values bytes.decode takes (codecs' decoding error handlers)
DECODE_ERRORS = ("replace", "strict", "ignore", "backslashreplace", "surrogateescape")

# What the regex module's \s matches: Unicode's White_Space property. Python's re \s (str.isspace) also
# matches \x1c-\x1f, so "\s" cannot be used here. U+180E stopped being whitespace in Unicode 6.3.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character (tokenization_gpt2.py:36-58). Printable Latin-1 bytes map to themselves;
    the other 68 bytes, in order, to chr(256), chr(257), ...: so space 0x20 is "Ġ" and newline 0x0A is "Ċ"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


@functools.cache
def pretokenize_pattern() -> re.Pattern:
    r"""GPT2Tokenizer's pattern, 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+,
    in re syntax: \p{L} and \p{N} spelled out as the code points of categories L* and N*, \s as White_Space.

    The classes come from this Python's unicodedata (3.11: Unicode 14.0); the regex module transformers uses
    may know a newer Unicode, so a letter assigned since then splits differently. Built once, ~0.4 s.
    """
    all_chars = "".join(map(chr, range(sys.maxunicode + 1)))
    categories = list(map(unicodedata.category, all_chars))
    letters = _char_class(cp for cp, cat in enumerate(categories) if cat[0] == "L")
    numbers = _char_class(cp for cp, cat in enumerate(categories) if cat[0] == "N")
    ws = WHITESPACE
    return re.compile(
        r"'s|'t|'re|'ve|'m|'ll|'d"
        rf"| ?[{letters}]+| ?[{numbers}]+| ?[^{ws}{letters}{numbers}]+"
        rf"|[{ws}]+(?![^{ws}])|[{ws}]+"
    )


def _char_class(code_points) -> str:
    """Code points -> the body of an re character class, as ranges: "a-zA-Z..."."""
    parts = []
    for _, run in itertools.groupby(enumerate(code_points), key=lambda x: x[1] - x[0]):
        run = [cp for _, cp in run]
        first, last = re.escape(chr(run[0])), re.escape(chr(run[-1]))
        parts.append(first if len(run) == 1 else f"{first}-{last}")
    return "".join(parts)


def pretokenize(text: str) -> list[str]:
    """Letters with letters, digits with digits, other symbols together, one leading space attached to the
    word after it; a whitespace run gives its last space to the next word (the \\s+(?!\\S) alternative)."""
    return pretokenize_pattern().findall(text)


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """GPT2Tokenizer.bpe (tokenization_gpt2.py:187-227): take the adjacent pair with the lowest merge rank,
    merge all its occurrences left to right, repeat until no adjacent pair has a rank.

    transformers rescans the whole word for every merge, O(n) per pass; a 50,000-character word without a
    space took minutes. Here a heap of (rank, position) over a linked list of symbols makes it O(n log n)
    with the same merges: one pass is every heap entry of the lowest rank, taken leftmost first; the pairs
    its merges create wait for the next pass, even those of a lower rank, as they do in transformers.
    """
    symbols: list[str | None] = list(word)  # symbols[i] is None once merged into its left neighbour
    nxt = list(range(1, len(symbols))) + [-1]  # a linked list over positions; -1 ends it
    prv = list(range(-1, len(symbols) - 1))
    heap = [(ranks[pair], i) for i, pair in enumerate(zip(word, word[1:])) if pair in ranks]
    heapq.heapify(heap)
    while heap:
        rank, starts = heap[0][0], []
        while heap and heap[0][0] == rank:  # one pass: positions come out in increasing order
            starts.append(heapq.heappop(heap)[1])
        merged = [i for i in starts if _merge_pair(i, rank, symbols, nxt, prv, ranks)]
        for i in {prv[i] for i in merged} | set(merged):  # the pairs that changed: left of and at each merge
            if i != -1 and nxt[i] != -1 and (symbols[i], symbols[nxt[i]]) in ranks:
                heapq.heappush(heap, (ranks[symbols[i], symbols[nxt[i]]], i))
    return [s for s in symbols if s is not None]


def _merge_pair(i: int, rank: int, symbols: list, nxt: list[int], prv: list[int], ranks: dict) -> bool:
    """Merge the symbol at position i with the next one if they still form the pair of this rank. A heap
    entry goes stale when an earlier merge in the pass took its left symbol, or its right one grew."""
    j = nxt[i]
    if symbols[i] is None or j == -1 or ranks.get((symbols[i], symbols[j])) != rank:
        return False
    symbols[i], symbols[j] = symbols[i] + symbols[j], None
    nxt[i] = nxt[j]
    if nxt[j] != -1:
        prv[nxt[j]] = i
    return True


def read_vocab(path: Path) -> dict[str, int]:
    """vocab.json: an object of token -> id, every id a non-negative integer."""
    return check_vocab(read_json(path), path)


def read_merges(path: Path) -> list[tuple[str, ...]]:
    """merges.txt as GPT2Tokenizer reads it: read().split("\\n")[1:-1] (tokenization_gpt2.py:159-162).
    That drops the "#version" line and also the last line, so a file without a final newline loses its
    last merge; we reproduce that."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")[1:-1]
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{path}: cannot read it as UTF-8 text ({str(e)[:200]})") from None
    merges = [tuple(line.split()) for line in lines]
    for number, merge in enumerate(merges, start=2):
        if len(merge) not in (0, 2):  # transformers would keep it as a merge that never matches; a blank line is one
            raise TokenizerFileError(f"{path}: line {number} is {summary(lines[number - 2])}, not two tokens")
    return merges


class GPT2Tokenizer(Tokenizer):
    """transformers' GPT2Tokenizer (slow). With OPT's tokenizer_config.json, every encode starts with </s>."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, ...]], folder: Path, config: dict,
                 overrides: dict):
        self.source = str(folder)
        settings = {**config, **overrides}
        self.encoder = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # a repeated pair keeps its last rank
        self.vocab_size = len(vocab)
        # OPT: add_bos_token=True with bos "</s>", so "A photo" encodes as [2, ...] (tokenization_gpt2.py:229-240)
        self.add_bos_token = bool(settings.get("add_bos_token", False))
        self.add_prefix_space = bool(settings.get("add_prefix_space", False))
        self.errors = settings.get("errors", "replace")  # bytes.decode's errors=, with which decode turns bytes to text
        if self.errors not in DECODE_ERRORS:
            raise TokenizerFileError(f"{folder / 'tokenizer_config.json'}: errors must be one of {DECODE_ERRORS}, "
                                     f"got {summary(self.errors)}")
        self.padding_side = settings.get("padding_side", "right")
        self.clean_up_tokenization_spaces = bool(settings.get("clean_up_tokenization_spaces", False))
        names = special_token_names(folder, config, GPT2_DEFAULTS, overrides)
        self.specials = build_special_tokens(declared_added_tokens(folder, config, names), names, vocab.get, len(vocab))
        self._added = {t.content: t for t in self.specials.by_id.values()}
        self._byte_to_char = bytes_to_unicode()
        self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
        self._cache: dict[str, list[int]] = {}
        unk = self.specials.named.get("unk_token")
        self._unk_id = self.specials.by_content.get(unk, vocab.get(unk))

    def _encode_text(self, text: str) -> list[int]:
        if self.add_prefix_space:  # prepare_for_tokenization; False for OPT
            text = " " + text
        ids = []
        for piece, is_added in split_on_added_tokens(text, self._added):
            if is_added:
                ids.append(self.specials.by_content[piece])
                continue
            for word in pretokenize(piece):
                ids.extend(self._word_ids(word))
        return ids

    def _word_ids(self, word: str) -> list[int]:
        """One pre-tokenized word -> ids: its UTF-8 bytes as characters, BPE-merged. Cached, like GPT2Tokenizer.bpe."""
        if word not in self._cache:
            chars = "".join(self._byte_to_char[b] for b in word.encode("utf-8"))
            self._cache[word] = [self._token_to_id(t) for t in bpe(chars, self.ranks)]
        return self._cache[word]

    def _token_to_id(self, token: str) -> int:
        if token in self.specials.by_content:  # convert_tokens_to_ids looks at added tokens first
            return self.specials.by_content[token]
        return self.encoder.get(token, self._unk_id)

    def _add_special_tokens(self, ids: list[int]) -> list[int]:
        return [self.bos_token_id] + ids if self.add_bos_token else ids

    def _known_id(self, i: int) -> bool:
        return i in self.decoder or i in self.specials.by_id

    def _id_to_token(self, i: int) -> str:
        tok = self.specials.by_id.get(i)
        return tok.content if tok is not None else self.decoder[i]

    def _tokens_to_string(self, tokens: list[str]) -> str:
        data = self._bytes_of("".join(tokens))
        try:
            return data.decode("utf-8", errors=self.errors)
        except UnicodeDecodeError as e:  # only with errors="strict"
            raise InvalidTokenIdError(f"the ids decode to bytes that are not UTF-8 ({summary(data[e.start:e.end])} at "
                                      f"byte {e.start}), and this tokenizer has errors='strict'") from None

    def _token_bytes(self, i: int) -> bytes | None:
        token = self._id_to_token(i)
        return None if token in self._separately_decoded else self._bytes_of(token)

    def _bytes_of(self, chars: str) -> bytes:
        try:
            return bytes(self._char_to_byte[c] for c in chars)
        except KeyError as e:
            raise TokenizerFileError(
                f"{self.source}: token text {summary(chars)} has {e.args[0]!r}, which is not in GPT-2's byte alphabet"
            ) from None
