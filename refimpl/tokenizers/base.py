"""What every refimpl tokenizer shares: the public API, input checks, batching, and slow decode's outer loop.

A subclass supplies the model-specific parts: _encode_text (text -> ids, added tokens included),
_add_special_tokens, _id_to_token, _tokens_to_string (a run of ordinary tokens -> text) and
_token_bytes (for streaming). decode() here is transformers' PreTrainedTokenizer._decode
(tokenization_utils.py:1081-1134), the loop both slow tokenizers we reproduce inherit.
"""

from __future__ import annotations

import functools
import operator

import numpy as np

from .added_tokens import SpecialTokens
from .cleanup import clean_up_tokenization
from .errors import InputTypeError, InvalidTextError, InvalidTokenIdError, TokenizerUsageError
from .files import summary
from .streaming import StreamDecoder, incomplete_utf8_tail


class Tokenizer:
    """Base class. Attributes set by subclasses: specials, vocab_size, padding_side, clean_up_tokenization_spaces."""

    specials: SpecialTokens
    vocab_size: int  # the model's own vocabulary, without added tokens (transformers' tokenizer.vocab_size)
    padding_side: str = "right"
    clean_up_tokenization_spaces: bool = False
    chat_template: str | dict | None = None  # tokenizer_config.json's chat_template (named templates: a dict)
    default_chat_template: str | None = None  # the built-in template used when there is none ("llama-2" for Llama)

    # ----------------------------------------------------------------------------------------------------------
    # ids of the special tokens
    # ----------------------------------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self.specials.id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.specials.id_of("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.specials.id_of("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self.specials.id_of("unk_token")

    @property
    def all_special_ids(self) -> set[int]:
        return self.specials.all_special_ids

    def __len__(self) -> int:
        """Vocabulary plus added tokens beyond it, as len(transformers tokenizer)."""
        return self.vocab_size + sum(1 for i in self.specials.by_id if i >= self.vocab_size)

    # ----------------------------------------------------------------------------------------------------------
    # encode
    # ----------------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; with add_special_tokens, the model's bos/eos are added as transformers does."""
        ids = self._encode_text(check_text(text))
        return self._add_special_tokens(ids) if add_special_tokens else ids

    def __call__(self, texts, padding=False, max_length=None, padding_side=None, add_special_tokens=True,
                 return_tensors="np"):
        """Encode one text or a batch. Returns {"input_ids", "attention_mask"} like transformers' tokenizer(...).

        padding: False / "do_not_pad", True / "longest", or "max_length" (with max_length). padding_side
        defaults to the tokenizer's ("right" for slow Llama and OPT). return_tensors: "np" (int64 arrays,
        a single text gives shape [1, T]) or None (lists; a single text gives a flat list).
        """
        single = isinstance(texts, str)
        if not single and not isinstance(texts, (list, tuple)):
            raise InputTypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in ([texts] if single else texts)]
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise TokenizerUsageError(f"padding_side must be 'left' or 'right', got {summary(side)}")
        target = _padded_length(rows, padding, max_length)
        if target is not None:
            if self.pad_token_id is None:
                raise TokenizerUsageError("asked to pad, but this tokenizer has no pad token "
                                          "(pass pad_token=... to load_tokenizer)")
            rows, masks = zip(*(_pad(row, target, self.pad_token_id, side) for row in rows)) if rows else ((), ())
        else:
            masks = [[1] * len(row) for row in rows]
        out = {"input_ids": [list(r) for r in rows], "attention_mask": [list(m) for m in masks]}
        if return_tensors is None:
            return {k: v[0] for k, v in out.items()} if single else out
        if return_tensors != "np":
            raise TokenizerUsageError(f"return_tensors must be 'np' or None, got {summary(return_tensors)}")
        if len({len(r) for r in rows}) > 1:
            raise TokenizerUsageError("rows have different lengths; pass padding=True to make an array")
        return {k: np.array(v, dtype=np.int64).reshape(len(v), -1) for k, v in out.items()}

    # ----------------------------------------------------------------------------------------------------------
    # decode
    # ----------------------------------------------------------------------------------------------------------
    def decode(
        self, ids, skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True,
        clean_up_tokenization_spaces=None,
    ) -> str:
        """Ids -> text, as the slow transformers tokenizer decodes them.

        spaces_between_special_tokens defaults to True here, as in transformers' _decode: the config value
        of the same name is stored but never read (tokenization_utils.py:1086). It only puts spaces around
        added tokens that are not special.
        """
        ids = self._check_ids(ids)
        tokens = [self._id_to_token(i) for i in ids if not (skip_special_tokens and i in self.all_special_ids)]
        special = set(self.specials.all_special_tokens)
        separate = self._separately_decoded
        sub_texts, run = [], []
        for token in tokens:
            if skip_special_tokens and token in special:
                continue
            if token in separate:  # added tokens are not decoded by the model, and split the text into parts
                if run:
                    text = self._tokens_to_string(run)
                    if text:
                        sub_texts.append(text)
                    run = []
                sub_texts.append(token)
            else:
                run.append(token)
        if run:
            sub_texts.append(self._tokens_to_string(run))  # the last part is kept even when it is ""
        text = (" " if spaces_between_special_tokens else "").join(sub_texts)
        return self._clean_up(text, clean_up_tokenization_spaces)

    def batch_decode(self, rows, **decode_kwargs) -> list[str]:
        return [self.decode(row, **decode_kwargs) for row in rows]

    def stream_decoder(self, **decode_kwargs) -> StreamDecoder:
        """A StreamDecoder: push ids one at a time, get text that never splits a UTF-8 character."""
        return StreamDecoder(self, **decode_kwargs)

    @functools.cached_property
    def _separately_decoded(self) -> set[str]:
        """transformers' legacy_added_tokens: added tokens that are not special, and additional special tokens
        beyond the vocabulary. decode emits them verbatim, between separately decoded runs."""
        specials = self.specials
        not_special = set(specials.by_content) - set(specials.all_special_tokens)
        beyond = {t for t in specials.additional if specials.by_content[t] >= self.vocab_size}
        return not_special | beyond

    def _clean_up(self, text: str, clean_up) -> str:
        """clean_up_tokenization (tokenization_utils_base.py:4052-4074): glue punctuation and contractions back."""
        return clean_up_tokenization(text) if self._cleans_up(clean_up) else text

    def _cleans_up(self, clean_up) -> bool:
        """decode's clean_up_tokenization_spaces argument, None meaning the tokenizer's own setting."""
        return bool(self.clean_up_tokenization_spaces if clean_up is None else clean_up)

    # ----------------------------------------------------------------------------------------------------------
    # chat templates (chat.py; jinja2 is imported only here)
    # ----------------------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template=None,
                            add_generation_prompt=False, continue_final_message=False, tokenize=True, padding=False,
                            truncation=False, max_length=None, return_tensors=None, return_dict=False,
                            return_assistant_tokens_mask=False, tokenizer_kwargs=None, **kwargs):
        """A conversation [{"role": ..., "content": ...}, ...] (or a list of them) -> the model's prompt, as
        transformers' apply_chat_template: ids (encoded without adding special tokens: the template writes them),
        the text with tokenize=False, or {"input_ids", "attention_mask"} with return_dict=True.

        chat_template: a Jinja template, the name of one in tokenizer_config.json, or "llama-2" (built in); by
        default the config's, else for Llama tokenizers "llama-2". add_generation_prompt: end with the header of an
        assistant reply (if the template has one). continue_final_message: end inside the last message, so the model
        continues it. Other keyword arguments become template variables, next to messages, tools, documents,
        add_generation_prompt and the special tokens (bos_token, eos_token, ... as strings). Needs jinja2
        (pip install 'refimpl[chat]'). Errors: ChatTemplateError, InputTypeError, TokenizerUsageError.
        """
        from .chat import apply_chat_template

        return apply_chat_template(
            self, conversation, tools=tools, documents=documents, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=tokenize, padding=padding, truncation=truncation, max_length=max_length,
            return_tensors=return_tensors, return_dict=return_dict,
            return_assistant_tokens_mask=return_assistant_tokens_mask, tokenizer_kwargs=tokenizer_kwargs, **kwargs)

    def get_chat_template(self, chat_template=None, tools=None) -> str:
        """The template text apply_chat_template would use (see chat.get_chat_template)."""
        from .chat import get_chat_template

        return get_chat_template(self, chat_template, tools)

    # ----------------------------------------------------------------------------------------------------------
    # streaming
    # ----------------------------------------------------------------------------------------------------------
    def _stream_cut(self, ids: list[int], skip_special_tokens: bool) -> int:
        """The largest c such that decode(ids[:c]) starts every decode(ids + more). Subclasses narrow it."""
        cut = self._structural_cut(ids, skip_special_tokens)
        while cut > 0 and incomplete_utf8_tail(self._tail_bytes(ids[:cut], skip_special_tokens)):
            cut -= 1  # hold back the token(s) carrying the start of an unfinished character
        return cut

    def _structural_cut(self, ids: list[int], skip_special_tokens: bool) -> int:
        return len(ids)

    def _tail_bytes(self, ids: list[int], skip_special_tokens: bool) -> bytes:
        """The last bytes that decode turns into text together: at least 4, or back to a token that ends a run."""
        chunks, size = [], 0
        for i in reversed(ids):
            if skip_special_tokens and i in self.all_special_ids:
                continue
            data = self._token_bytes(i)
            if data is None:
                break
            chunks.append(data)
            size += len(data)
            if size >= 4:
                break
        return b"".join(reversed(chunks))

    def _token_bytes(self, token_id: int) -> bytes | None:
        """The bytes this token adds to the current run, or None if it ends the run (its text is final)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------------
    # checks
    # ----------------------------------------------------------------------------------------------------------
    def _check_ids(self, ids) -> list[int]:
        """A flat list of known ids, or a clear error naming the bad one."""
        if isinstance(ids, np.ndarray):
            if ids.ndim > 1:
                raise InputTypeError(f"decode takes one sequence of ids, got an array of shape {ids.shape}")
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, (str, bytes)):
            raise InputTypeError(f"decode takes token ids, not {type(ids).__name__} {summary(ids)}")
        elif not isinstance(ids, (list, tuple, range)):
            ids = [ids]  # a single id, as transformers allows
        out = []
        for i in ids:
            if isinstance(i, (bool, np.bool_)) or not hasattr(i, "__index__"):
                raise InputTypeError(f"token ids must be integers, got {summary(i)} ({type(i).__name__})")
            i = operator.index(i)
            if not self._known_id(i):
                raise InvalidTokenIdError(f"token id {i} is out of range: this vocabulary has ids 0..{len(self) - 1}")
            out.append(i)
        return out

    def _known_id(self, i: int) -> bool:
        return 0 <= i < self.vocab_size or i in self.specials.by_id


def check_text(text) -> str:
    """Text must be a str that can be written as UTF-8 (no lone surrogates)."""
    if not isinstance(text, str):
        raise InputTypeError(f"text must be a str, got {type(text).__name__}: {summary(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidTextError(
            f"text has a lone surrogate U+{ord(text[e.start]):04X} at index {e.start}, which has no UTF-8 form"
        ) from None
    return text


def _padded_length(rows: list[list[int]], padding, max_length) -> int | None:
    if padding in (False, None, "do_not_pad"):
        return None
    if padding in (True, "longest"):
        return max((len(r) for r in rows), default=0)
    if padding == "max_length":
        if not isinstance(max_length, int) or max_length < 0:
            raise TokenizerUsageError(f"padding='max_length' needs a max_length >= 0, got {summary(max_length)}")
        too_long = [len(r) for r in rows if len(r) > max_length]
        if too_long:
            raise TokenizerUsageError(f"a row has {too_long[0]} ids, more than max_length={max_length} "
                                      "(there is no truncation)")
        return max_length
    raise TokenizerUsageError(
        f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {summary(padding)}"
    )


def _pad(row: list[int], length: int, pad_id: int, side: str) -> tuple[list[int], list[int]]:
    n = length - len(row)
    if side == "left":  # generation wants the real tokens last
        return [pad_id] * n + row, [0] * n + [1] * len(row)
    return row + [pad_id] * n, [1] * len(row) + [0] * n
