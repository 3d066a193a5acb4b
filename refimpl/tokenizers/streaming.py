"""Streaming decode: text for a growing list of ids, never showing half a character or text that may change.

During generation, ids arrive one at a time. Printing decode(new_id) per id is wrong twice over: a
character split over several byte tokens comes out as U+FFFD, and decode is not additive (Llama's
decoders strip a leading space, legacy Llama decode puts a space before a run that ends in a special
token). StreamDecoder emits only text that no later id can change, so the pieces it returns, joined,
always equal tokenizer.decode(all ids) exactly. Each tokenizer says up to which id that is safe
(_stream_cut); with clean_up_tokenization_spaces, the cleanup is held back further where a later " n't"
or " ." could still glue on (cleanup.stable_length). finish() is the full decode.
It re-decodes the prefix on every push: quadratic, and readable; a reference does not need more.
"""

from __future__ import annotations

import codecs
import reprlib

from .cleanup import clean_up_tokenization, stable_length
from .errors import StreamDecodeError, TokenizerUsageError


def incomplete_utf8_tail(data: bytes) -> int:
    """How many bytes at the end of data are the valid start of a character that is not complete yet.

    Those are the only bytes whose decoding can still change when more bytes arrive: anything before
    them decodes the same way (as characters or as U+FFFD) whatever follows.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    pending, _ = decoder.getstate()  # the incremental decoder holds back exactly such a tail
    return len(pending)


class StreamDecoder:
    """Feed ids with push(); each call returns the new stable text. finish() returns the rest.

    "".join(pushes) + finish() == tokenizer.decode(ids, **decode_kwargs), for any id sequence.
    """

    def __init__(self, tokenizer, **decode_kwargs):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.ids: list[int] = []
        self._cut = 0  # ids[:_cut] have been decoded for emitting ...
        self._text = ""  # ... and this is the text emitted so far, a prefix of every later decode
        self._finished = False

    def push(self, token_id) -> str:
        """Add one id; return the text that became final because of it (often "")."""
        if self._finished:
            raise TokenizerUsageError("this StreamDecoder has finished; start another with tokenizer.stream_decoder()")
        (token_id,) = self.tokenizer._check_ids([token_id])
        self.ids.append(token_id)
        cut = self.tokenizer._stream_cut(self.ids, self.decode_kwargs.get("skip_special_tokens", False))
        if cut <= self._cut:
            return ""
        self._cut = cut
        return self._emit(self._stable_text(self.ids[:cut]))

    def finish(self) -> str:
        """The text still held back: bytes of an unfinished character, text a later special token would change,
        or a space that cleanup could still remove."""
        self._finished = True
        return self._emit(self.tokenizer.decode(self.ids, **self.decode_kwargs))

    def _stable_text(self, ids: list[int]) -> str:
        """decode(ids), cut back where a later cleanup replacement could reach into it (decode(ids) without
        cleanup starts every later decode without cleanup: _stream_cut chose ids so)."""
        text = self.tokenizer.decode(ids, **{**self.decode_kwargs, "clean_up_tokenization_spaces": False})
        if not self.tokenizer._cleans_up(self.decode_kwargs.get("clean_up_tokenization_spaces")):
            return text
        return clean_up_tokenization(text[: stable_length(text)])

    def _emit(self, text: str) -> str:
        """The part of text not emitted yet. text is always an extension of what was emitted, or a prefix of it."""
        if not text.startswith(self._text):
            if self._text.startswith(text):
                return ""  # cut back further than last time: nothing new is final
            raise StreamDecodeError(
                f"streaming decode of {reprlib.repr(self.ids)} would change text already emitted "
                f"({reprlib.repr(self._text)} -> {reprlib.repr(text)}); this is a bug in refimpl, please report it"
            )
        new, self._text = text[len(self._text) :], text
        return new
