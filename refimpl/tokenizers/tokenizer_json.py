"""tokenizer.json read in pure Python, for when sentencepiece is not installed (Llama) or there is no vocab.json (OPT).

For Llama this reproduces LlamaTokenizerFast, not the slow LlamaTokenizer: tokenizer.json describes the
fast tokenizer's pipeline, and we run exactly the subset that Llama files use (tokenizers 0.20.3):
  added tokens -> normalizer (Prepend "▁", Replace " " by "▁") or pre-tokenizer (Metaspace)
  -> BPE with merge ranks and byte fallback -> decoder (Replace "▁" by " ", ByteFallback, Fuse, Strip).
Any other component type is refused with an error that names it, rather than guessed at.
For OPT only the vocabulary and merges are taken from it; GPT2Tokenizer then runs as usual.
"""

from __future__ import annotations

import heapq
from pathlib import Path

from .added_tokens import build_special_tokens, longest_match_split, special_token_names, tokenizer_json_added_tokens
from .base import Tokenizer
from .errors import TokenizerFileError, UnsupportedTokenizerError
from .files import check_vocab, expect, field, read_json, summary
from .llama import LLAMA_DEFAULTS

NULL = type(None)


def read_bpe_model(data: dict, where: Path, byte_level: bool) -> tuple[dict[str, int], list[tuple[str, str]], dict]:
    """The "model" section: vocab, merges (as "a b" strings or [a, b] pairs) and options, each of its JSON type."""
    model = expect(data.get("model"), (dict,), where, "model")
    if model.get("type") != "BPE":
        kind = summary(model.get("type"))
        raise UnsupportedTokenizerError(f"{where}: model type {kind} is not supported, only 'BPE'")
    dropout = field(model, "dropout", (int, float, NULL), where, prefix="model.")
    if dropout not in (None, 0, 0.0):
        raise UnsupportedTokenizerError(f"{where}: BPE dropout {summary(dropout)} is not supported (random)")
    for option in ("continuing_subword_prefix", "end_of_word_suffix"):
        if field(model, option, (str, NULL), where, prefix="model."):
            raise UnsupportedTokenizerError(f"{where}: BPE option {option}={summary(model[option])} is not supported")
    for option in ("byte_fallback", "fuse_unk", "ignore_merges"):
        field(model, option, (bool, NULL), where, prefix="model.")
    field(model, "unk_token", (str, NULL), where, prefix="model.")
    if byte_level and model.get("byte_fallback"):
        raise UnsupportedTokenizerError(f"{where}: byte_fallback in a byte-level BPE is not supported")
    vocab = check_vocab(field(model, "vocab", (dict,), where, prefix="model."), where, "model.vocab: ")
    pairs = [_merge_pair(merge, vocab, where) for merge in field(model, "merges", (list,), where, prefix="model.")]
    return vocab, pairs, model


def _merge_pair(merge, vocab: dict, where: Path) -> tuple[str, str]:
    """One entry of model.merges: "a b" or ["a", "b"], two tokens whose join is in the vocabulary too."""
    pair = merge.split(" ") if isinstance(merge, str) else merge if isinstance(merge, list) else []
    if len(pair) != 2 or not all(isinstance(p, str) and p in vocab for p in pair) or pair[0] + pair[1] not in vocab:
        raise TokenizerFileError(f"{where}: merge {summary(merge)} is not two tokens whose join is in the vocabulary")
    return pair[0], pair[1]


def read_gpt2_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], bool]:
    """vocab, merges and add_prefix_space of a GPT-2 style byte-level BPE tokenizer.json."""
    data = read_json(path)
    vocab, merges, _ = read_bpe_model(data, path, byte_level=True)
    pre = field(data, "pre_tokenizer", (dict, NULL), path) or {}
    if pre.get("type") != "ByteLevel" or not field(pre, "use_regex", (bool,), path, True, "pre_tokenizer."):
        raise UnsupportedTokenizerError(f"{path}: pre_tokenizer {summary(pre.get('type'))} is not GPT-2's ByteLevel")
    normalizer = field(data, "normalizer", (dict, NULL), path)
    if normalizer is not None:
        raise UnsupportedTokenizerError(f"{path}: normalizer {summary(normalizer.get('type'))} is not supported here")
    decoder = field(data, "decoder", (dict, NULL), path) or {}
    if decoder.get("type") != "ByteLevel":
        raise UnsupportedTokenizerError(f"{path}: decoder {summary(decoder.get('type'))} is not GPT-2's ByteLevel")
    return vocab, merges, field(pre, "add_prefix_space", (bool,), path, False, "pre_tokenizer.")


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """tokenizers' Word::merge_all: merge the adjacent pair with the lowest rank, the leftmost one first, and
    repeat. A heap keeps it O(n log n): Llama's tokenizer.json has no pre-tokenizer, so a word is a whole text."""
    symbols = list(symbols)
    nxt = list(range(1, len(symbols))) + [-1]  # linked list over positions; a merged symbol keeps the left position
    prv = list(range(-1, len(symbols) - 1))
    heap = [(ranks[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in ranks]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        if symbols[i] is None or j == -1 or ranks.get((symbols[i], symbols[j])) != rank:
            continue  # stale: one of the two symbols was merged into something else since
        symbols[i], symbols[j] = symbols[i] + symbols[j], None
        nxt[i] = nxt[j]
        if nxt[j] != -1:
            prv[nxt[j]] = i
        for left, right in ((prv[i], i), (i, nxt[i])):
            if left != -1 and right != -1 and (symbols[left], symbols[right]) in ranks:
                heapq.heappush(heap, (ranks[symbols[left], symbols[right]], left))
    return [s for s in symbols if s is not None]


class LlamaJsonTokenizer(Tokenizer):
    """LlamaTokenizerFast, from tokenizer.json and tokenizer_config.json, without sentencepiece or tokenizers."""

    default_chat_template = "llama-2"  # refimpl's default without a chat_template (chat.py)

    def __init__(self, folder: Path, config: dict, overrides: dict):
        path = folder / "tokenizer.json"
        self.source = str(path)
        data = read_json(path)
        settings = {**config, **overrides}
        self.vocab, merges, model = read_bpe_model(data, path, byte_level=False)
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # a repeated pair keeps its last rank
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.byte_fallback = bool(model.get("byte_fallback", False))  # read_bpe_model checked their types
        self.fuse_unk = bool(model.get("fuse_unk", False))
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.unk_token = model.get("unk_token")
        self.vocab_size = len(self.vocab)
        self.normalizers = _read_normalizers(data.get("normalizer"), path)
        self.prepend_scheme = _read_pre_tokenizer(data.get("pre_tokenizer"), path)
        self.decoders = _read_decoders(data.get("decoder"), path)
        self._decoders_stream = _decoders_stream(self.decoders)
        # LlamaTokenizerFast rebuilds the post-processor from add_bos_token/add_eos_token (update_post_processor),
        # so tokenizer.json's own post_processor is not used.
        self.add_bos_token = bool(settings.get("add_bos_token", True))
        self.add_eos_token = bool(settings.get("add_eos_token", False))
        self.padding_side = settings.get("padding_side", "left")  # LlamaTokenizerFast's class default
        self.clean_up_tokenization_spaces = bool(settings.get("clean_up_tokenization_spaces", False))

        declared = tokenizer_json_added_tokens(data, path)
        for tok in declared.values():
            if tok.lstrip or tok.rstrip or tok.single_word:
                raise UnsupportedTokenizerError(f"{path}: added token {summary(tok.content)} uses lstrip/rstrip/"
                                                "single_word")
        names = special_token_names(folder, config, LLAMA_DEFAULTS, overrides)
        self.specials = build_special_tokens(declared, names, self.vocab.get, self.vocab_size)
        self._raw_added = {t.content: i for i, t in self.specials.by_id.items() if not t.normalized}
        # tokenizers normalizes a normalized added token's own text too: with Prepend("▁"), "<extra>" is looked
        # for as "▁<extra>", so it is found after a space or at the start, but not inside "a<extra>b"
        self._normalized_added = {self._normalize(t.content): i for i, t in self.specials.by_id.items() if t.normalized}
        self._skipped_ids = {i for i, t in self.specials.by_id.items() if t.special}
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------------------------------------
    # encode: tokenizers' TokenizerImpl::encode_single_sequence
    # ----------------------------------------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        ids, offset = [], 0
        for piece in longest_match_split(text, self._raw_added):  # 1. added tokens matched in the raw text
            at_start, offset = offset == 0, offset + len(piece)
            if piece in self._raw_added:
                ids.append(self._raw_added[piece])
                continue
            normalized = self._normalize(piece)  # 2. each remaining piece is normalized on its own ...
            for k, sub in enumerate(longest_match_split(normalized, self._normalized_added)):  # ... then split again
                if sub in self._normalized_added:
                    ids.append(self._normalized_added[sub])
                else:
                    ids.extend(self._bpe(self._pre_tokenize(sub, at_start and k == 0)))
        return ids

    def _normalize(self, text: str) -> str:
        for kind, a, b in self.normalizers:
            if kind == "Prepend":
                text = a + text if text else text  # Prepend leaves an empty string alone
            else:  # Replace
                text = text.replace(a, b)
        return text

    def _pre_tokenize(self, text: str, at_start_of_input: bool) -> str:
        """Metaspace(split=False): spaces become "▁", and "▁" is put in front: always, never, or ("first") only
        for the piece that starts the input text, so not for text right after a special token."""
        if self.prepend_scheme is None:
            return text
        text = text.replace(" ", "▁")
        prepend = self.prepend_scheme == "always" or (self.prepend_scheme == "first" and at_start_of_input)
        return "▁" + text if prepend and not text.startswith("▁") else text

    def _bpe(self, word: str) -> list[int]:
        if word not in self._cache:
            if self.ignore_merges and word in self.vocab:
                self._cache[word] = [self.vocab[word]]
            else:
                self._cache[word] = [self.vocab[s] for s in bpe_merge(self._initial_symbols(word), self.ranks)]
        return self._cache[word]

    def _initial_symbols(self, word: str) -> list[str]:
        """BPE::merge_word: one symbol per character; a character not in the vocabulary becomes its UTF-8 bytes
        as <0xXX> tokens (byte_fallback), else the unk token, consecutive unks fused into one (fuse_unk)."""
        symbols, unk_run = [], False
        for ch in word:
            if ch in self.vocab:
                symbols.append(ch)
                unk_run = False
                continue
            byte_tokens = [f"<0x{b:02X}>" for b in ch.encode("utf-8")]
            if self.byte_fallback and all(t in self.vocab for t in byte_tokens):
                symbols.extend(byte_tokens)
                unk_run = False
            elif self.unk_token is not None:
                if self.unk_token not in self.vocab:
                    raise TokenizerFileError(f"{self.source}: unk_token {summary(self.unk_token)} is not in the "
                                             "vocabulary")
                if not (unk_run and self.fuse_unk):
                    symbols.append(self.unk_token)
                unk_run = True
            # else: tokenizers drops the character
        return symbols

    def _add_special_tokens(self, ids: list[int]) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + ids + eos

    # ----------------------------------------------------------------------------------------------------------
    # decode: tokenizers' TokenizerImpl::decode and the decoder chain
    # ----------------------------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens=False, spaces_between_special_tokens=True,
               clean_up_tokenization_spaces=None) -> str:
        """As LlamaTokenizerFast.decode. spaces_between_special_tokens is accepted and ignored, as there."""
        ids = self._check_ids(ids)
        tokens = [self._id_to_token(i) for i in ids if not (skip_special_tokens and i in self._skipped_ids)]
        for step, arg in self.decoders:
            tokens = step(tokens, *arg)
        return self._clean_up("".join(tokens), clean_up_tokenization_spaces)

    def _id_to_token(self, i: int) -> str:
        tok = self.specials.by_id.get(i)
        return tok.content if tok is not None else self.id_to_token[i]

    def _known_id(self, i: int) -> bool:
        return i in self.id_to_token or i in self.specials.by_id

    def _stream_cut(self, ids: list[int], skip_special_tokens: bool) -> int:
        """ByteFallback turns a whole run of byte tokens into U+FFFDs if any byte is bad (one per byte), so a
        valid "é" can still become "���" when a third byte arrives: hold back every trailing byte token."""
        if not self._decoders_stream:
            return 0  # a whole-text step after Fuse could change text already decoded: all waits for finish()
        cut = len(ids)
        for k in range(len(ids) - 1, -1, -1):
            if skip_special_tokens and ids[k] in self._skipped_ids:
                continue
            if _byte_value(self._id_to_token(ids[k])) is None:
                break
            cut = k
        return cut


# ---------------------------------------------------------------------------------------------------------------
# Pipeline components: the ones Llama's tokenizer.json uses, and nothing else
# ---------------------------------------------------------------------------------------------------------------
def _read_normalizers(spec, where: Path) -> list[tuple[str, str, str]]:
    if expect(spec, (dict, NULL), where, "normalizer") is None:
        return []
    out = []
    for name, step in _steps(spec, "normalizer", "normalizers", where):
        kind, replace = step.get("type"), _replace_args(step, where, name)
        if kind == "Prepend":
            out.append(("Prepend", field(step, "prepend", (str,), where, prefix=name + "."), ""))
        elif kind == "Replace" and replace is not None:
            out.append(("Replace", *replace))
        else:
            detail = " with a regex pattern" if kind == "Replace" else ""
            raise UnsupportedTokenizerError(f"{where}: normalizer {summary(kind)}{detail} is not supported "
                                            "(only Prepend, Replace)")
    return out


def _read_pre_tokenizer(spec, where: Path) -> str | None:
    """None (no pre-tokenizer) or Metaspace's prepend_scheme."""
    if expect(spec, (dict, NULL), where, "pre_tokenizer") is None:
        return None
    kind, split = spec.get("type"), field(spec, "split", (bool,), where, True, "pre_tokenizer.")
    if kind != "Metaspace" or split or spec.get("replacement") != "▁":
        detail = f" with split={split!r}" if kind == "Metaspace" else ""
        raise UnsupportedTokenizerError(f"{where}: pre_tokenizer {summary(kind)}{detail} is not supported "
                                        "(only Metaspace, split=False)")
    add_prefix_space = field(spec, "add_prefix_space", (bool,), where, True, "pre_tokenizer.")
    default = "always" if add_prefix_space else "never"
    scheme = field(spec, "prepend_scheme", (str,), where, default, "pre_tokenizer.")
    if scheme not in ("always", "first", "never"):
        raise UnsupportedTokenizerError(f"{where}: Metaspace prepend_scheme {summary(scheme)} is not supported")
    return scheme


def _read_decoders(spec, where: Path) -> list:
    if expect(spec, (dict, NULL), where, "decoder") is None:
        raise UnsupportedTokenizerError(f"{where}: no decoder: joining tokens with spaces is not supported")
    out = []
    for name, step in _steps(spec, "decoder", "decoders", where):
        kind, replace = step.get("type"), _replace_args(step, where, name)
        if kind == "Replace" and replace is not None:
            out.append((_decode_replace, replace))
        elif kind == "ByteFallback":
            out.append((_decode_byte_fallback, ()))
        elif kind == "Fuse":
            out.append((_decode_fuse, ()))
        elif kind == "Strip":
            content = field(step, "content", (str,), where, prefix=name + ".")
            start, stop = (field(step, end, (int,), where, 0, name + ".") for end in ("start", "stop"))
            out.append((_decode_strip, (content, start, stop)))
        else:
            raise UnsupportedTokenizerError(f"{where}: decoder {summary(kind)} is not supported "
                                            "(only Replace with a string, ByteFallback, Fuse, Strip)")
    return out


def _steps(spec: dict, section: str, key: str, where: Path) -> list[tuple[str, dict]]:
    """(name in the file, object) of each step of a normalizer or decoder: the one, or those of a Sequence."""
    if spec.get("type") != "Sequence":
        return [(section, spec)]
    steps = field(spec, key, (list,), where, [], f"{section}.")
    return [(f"{section}.{key}[{n}]", expect(step, (dict,), where, f"{section}.{key}[{n}]"))
            for n, step in enumerate(steps)]


def _replace_args(step: dict, where: Path, name: str) -> tuple[str, str] | None:
    """(pattern, content) of a Replace step with a string pattern; None for a regex pattern (or any other step)."""
    if step.get("type") != "Replace":
        return None
    pattern = field(step, "pattern", (dict,), where, prefix=name + ".")
    if set(pattern) != {"String"}:
        return None
    return (field(pattern, "String", (str,), where, prefix=name + ".pattern."),
            field(step, "content", (str,), where, prefix=name + "."))


def _decoders_stream(decoders: list) -> bool:
    """Whether decode(ids) starts decode(ids + more) once trailing byte tokens are held back. Before Fuse every
    step works per token. After it, on the whole text: Strip and a one-character Replace keep a text's result
    a prefix of a longer text's result; a longer Replace ("ab" -> "X") or ByteFallback ("<0x4" + "1>") do not."""
    fused = False
    for step, args in decoders:
        if step is _decode_fuse:
            fused = True
        elif fused and not (step is _decode_strip or (step is _decode_replace and len(args[0]) == 1)):
            return False
    return True


def _decode_fuse(tokens: list[str]) -> list[str]:
    return ["".join(tokens)]


def _decode_replace(tokens: list[str], pattern: str, content: str) -> list[str]:
    return [t.replace(pattern, content) for t in tokens]


def _byte_value(token: str) -> int | None:
    """"<0xE4>" -> 0xE4, anything else -> None (tokenizers' ByteFallback test)."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def _decode_byte_fallback(tokens: list[str]) -> list[str]:
    """Runs of <0xXX> tokens become their UTF-8 text; if the run is not valid UTF-8, *every* byte of the run
    becomes U+FFFD, valid characters included (sentencepiece, used by the slow tokenizer, replaces only bad bytes)."""
    out, run = [], []

    def flush():
        if run:
            try:
                out.append(bytes(run).decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" for _ in run)
            run.clear()

    for token in tokens:
        value = _byte_value(token)
        if value is None:
            flush()
            out.append(token)
        else:
            run.append(value)
    flush()
    return out


def _decode_strip(tokens: list[str], content: str, start: int, stop: int) -> list[str]:
    """Strip up to `start` leading and `stop` trailing `content` characters from each token."""
    out = []
    for token in tokens:
        begin = 0
        while begin < min(start, len(token)) and token[begin] == content:
            begin += 1
        end = len(token)
        while len(token) - end < min(stop, len(token) - begin) and token[end - 1] == content:
            end -= 1
        out.append(token[begin:end])
    return out
