"""Llama 2 / Open-Llama tokenizer: transformers' slow LlamaTokenizer around a sentencepiece model.

sentencepiece does the BPE itself (it is imported here, lazily, only when a tokenizer.model is loaded).
What this file adds is everything transformers does around it, with each quirk where it happens:
  - added tokens (<s>, </s>, <unk>, ...) are cut out first and every other chunk is encoded separately;
  - legacy=True (the default): each chunk gets sentencepiece's dummy-prefix "▁", also after a special token;
  - legacy=False: one "▁" for the whole text, none after a special token (tokenization_llama.py:233-268);
  - decode strips the first token's "▁", and legacy decode puts a space before a special token (:279-302);
  - byte fallback: an invalid byte decodes to one U+FFFD per byte (sentencepiece's rule, not Python's).
"""

from __future__ import annotations

from pathlib import Path

from .added_tokens import build_special_tokens, declared_added_tokens, special_token_names, split_on_added_tokens
from .base import Tokenizer
from .errors import TokenizerFileError, UnsupportedTokenizerError

SPIECE_UNDERLINE = "▁"  # sentencepiece's visible space, U+2581
LLAMA_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}


def without_dummy_prefix(model: bytes) -> bytes:
    """tokenizer.model with normalizer_spec.add_dummy_prefix = false, as LlamaTokenizer(legacy=False) loads it.

    transformers parses the ModelProto with protobuf and merges NormalizerSpec(add_dummy_prefix=False) into
    it (tokenization_llama.py:192-207). In protobuf's wire format a message field that appears twice is
    merged, the last value of a scalar winning, so appending that one field does the same without protobuf.
    """
    normalizer_spec = bytes([0x18, 0x00])  # field 3 (add_dummy_prefix), varint 0
    return model + bytes([0x1A, len(normalizer_spec)]) + normalizer_spec  # ModelProto field 3 (normalizer_spec)


def load_sentencepiece(spm, model: bytes, where: Path):
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model)
    except Exception as e:  # sentencepiece raises RuntimeError or OSError with a C++ message
        raise TokenizerFileError(f"{where}: not a sentencepiece model ({type(e).__name__}: {e})") from None
    return processor


class LlamaTokenizer(Tokenizer):
    """transformers' LlamaTokenizer (slow), configured from tokenizer_config.json and keyword overrides."""

    default_chat_template = "llama-2"  # refimpl's default without a chat_template (chat.py)

    def __init__(self, folder: Path, config: dict, overrides: dict):
        import sentencepiece as spm  # lazily: `import refimpl` needs numpy and the standard library only

        self.source = str(folder)
        settings = {**config, **overrides}
        if settings.get("sp_model_kwargs"):
            raise UnsupportedTokenizerError(
                f"{folder}: sp_model_kwargs {settings['sp_model_kwargs']!r} (e.g. subword sampling) is not supported"
            )
        model_file = folder / "tokenizer.model"
        try:
            model = model_file.read_bytes()
        except OSError as e:
            raise TokenizerFileError(f"{model_file}: cannot read it ({e})") from None
        # legacy=None means True in transformers (with a warning): the behaviour of the first Llama releases
        self.legacy = settings.get("legacy") is None or bool(settings.get("legacy"))
        self.add_prefix_space = bool(settings.get("add_prefix_space", True))
        self.add_bos_token = bool(settings.get("add_bos_token", True))
        self.add_eos_token = bool(settings.get("add_eos_token", False))
        self.padding_side = settings.get("padding_side", "right")
        self.clean_up_tokenization_spaces = bool(settings.get("clean_up_tokenization_spaces", False))
        self.sp = load_sentencepiece(spm, model if self.legacy else without_dummy_prefix(model), model_file)
        self.vocab_size = self.sp.get_piece_size()

        names = special_token_names(folder, config, LLAMA_DEFAULTS, overrides)
        declared = declared_added_tokens(folder, config, names)
        self.specials = build_special_tokens(declared, names, self._piece_id, self.vocab_size)
        self._added = {t.content: t for t in self.specials.by_id.values()}
        self._special_tokens = set(self.specials.all_special_tokens)
        unk = self.specials.named["unk_token"]
        self._unk_length = len(self.sp.encode(str(unk))) if unk else 0  # unk_token_length (:187-189)

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    # ----------------------------------------------------------------------------------------------------------
    # encode
    # ----------------------------------------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        by_content = self.specials.by_content
        return [by_content[p] if p in by_content else self.sp.piece_to_id(p) for p in self.tokenize(text)]

    def tokenize(self, text: str) -> list[str]:
        """Text -> pieces (LlamaTokenizer.tokenize)."""
        if self.legacy or not text:
            return self._split_and_encode(text, self._encode_chunk_legacy)
        # legacy=False: a literal "▁" means a space; one "▁" is put in front of the whole text
        text = text.replace(SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = SPIECE_UNDERLINE + text
        tokens = self._split_and_encode(text, self._encode_chunk)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._special_tokens:
            tokens = tokens[1:]  # "<s>Hello": the "▁" put in front stood alone before a special token: drop it
        return tokens

    def _split_and_encode(self, text: str, encode_chunk) -> list[str]:
        """PreTrainedTokenizer.tokenize: added tokens are cut out, every other chunk is encoded on its own."""
        pieces = []
        for chunk, is_added in split_on_added_tokens(text, self._added):
            pieces.extend([chunk] if is_added else encode_chunk(chunk))
        return pieces

    def _encode_chunk_legacy(self, chunk: str) -> list[str]:
        # sentencepiece adds its dummy prefix to every chunk, so "Hello <s>." encodes "." as "▁." (legacy quirk)
        return self.sp.encode(chunk, out_type=str)

    def _encode_chunk(self, chunk: str) -> list[str]:
        """legacy=False _tokenize (:270-285). The model has no dummy prefix now, and sentencepiece would drop
        the text's leading "▁"; so a chunk that starts with one is encoded after "<unk>", whose pieces are cut
        off again."""
        if not chunk.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(chunk, out_type=str)
        tokens = self.sp.encode(self.specials.named["unk_token"] + chunk, out_type=str)
        return tokens[self._unk_length :] if len(tokens) >= self._unk_length else tokens

    def _add_special_tokens(self, ids: list[int]) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + ids + eos

    # ----------------------------------------------------------------------------------------------------------
    # decode
    # ----------------------------------------------------------------------------------------------------------
    def _id_to_token(self, i: int) -> str:
        tok = self.specials.by_id.get(i)
        return tok.content if tok is not None else self.sp.id_to_piece(i)

    def _tokens_to_string(self, tokens: list[str]) -> str:
        """LlamaTokenizer.convert_tokens_to_string (:279-302); runs of ordinary pieces go to sentencepiece."""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]  # the "▁" that encode put in front of the text
        out, run, prev_is_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self._special_tokens:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "  # legacy quirk: a space before a special token that follows text, e.g. " Hello</s>"
                out += self.sp.decode(run) + token
                run, prev_is_special = [], True
            else:
                if prev_is_special and i == 1 and self.add_prefix_space and not token.startswith(SPIECE_UNDERLINE):
                    out += " "  # after a leading special token, text that did not start with "▁" gets a space
                run.append(token)
                prev_is_special = False
        return out + self.sp.decode(run)

    # ----------------------------------------------------------------------------------------------------------
    # streaming
    # ----------------------------------------------------------------------------------------------------------
    def _structural_cut(self, ids: list[int], skip_special_tokens: bool) -> int:
        if not self.legacy or skip_special_tokens:
            return len(ids)
        # legacy decode writes " " *before* a run of pieces that a special token ends (" Hello</s>"), so a run's
        # text is final only after the special token (or added token) that ends it
        ends_run = self.all_special_ids | {self.specials.by_content[t] for t in self._separately_decoded}
        return next((k + 1 for k in range(len(ids) - 1, -1, -1) if ids[k] in ends_run), 0)

    def _token_bytes(self, i: int) -> bytes | None:
        if i in self.specials.by_id or not self.sp.is_byte(i):
            return None  # a byte run ends here; sentencepiece has decoded it for good
        return bytes([int(self.sp.id_to_piece(i)[3:5], 16)])  # "<0xE4>" -> 0xE4
