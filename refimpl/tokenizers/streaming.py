"""Streaming decode: text for a growing list of ids, never showing half a character or text that may change.

During generation, ids arrive one at a time. Printing decode(new_id) per id is wrong twice over: a
character split over several byte tokens comes out as U+FFFD, and decode is not additive (Llama's
decoders strip a leading space, legacy Llama decode puts a space before a run that ends in a special
token). StreamDecoder emits only text that no later id can change, so the pieces it returns, joined,
always equal tokenizer.decode(all ids) exactly. Each tokenizer says where that is safe (_stream_cut).
It re-decodes the prefix on every push: quadratic, and readable; a reference does not need more.
"""

from __future__ import annotations

import codecs

from .errors import TokenizerUsageError


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
        self._cut = 0  # ids[:_cut] have been emitted as text ...
        self._text = ""  # ... and this is decode(ids[:_cut])
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
        return self._advance(cut)

    def finish(self) -> str:
        """The text still held back: bytes of an unfinished character, or text a later special token would change."""
        self._finished = True
        return self._advance(len(self.ids))

    def _advance(self, cut: int) -> str:
        text = self.tokenizer.decode(self.ids[:cut], **self.decode_kwargs)
        if not text.startswith(self._text):  # _stream_cut promised that this cannot happen
            raise AssertionError(f"streaming decode of {self.ids[:cut]} changed text already emitted: {self._text!r}")
        new, self._text, self._cut = text[len(self._text) :], text, cut
        return new
