"""Streamers: text while model.generate(..., streamer=...) runs, with transformers' streamer protocol.

generate calls streamer.put(prompt ids) once ([1, L] or [L]), then streamer.put(new ids) after every step, then
streamer.end(). TextStreamer prints the text; TextIteratorStreamer hands it to another thread through a queue:

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    threading.Thread(target=model.generate, args=(ids,), kwargs={"max_new_tokens": 20, "streamer": streamer}).start()
    for piece in streamer:
        print(piece, end="")

transformers (generation/streamers.py) decodes a growing cache of ids and prints up to the last space or newline.
Here the ids go through the tokenizer's StreamDecoder instead (refimpl/tokenizers/streaming.py), which emits only
text no later id can change: never half of a UTF-8 character split over byte tokens, and the pieces, joined,
equal tokenizer.decode(ids, **decode_kwargs) exactly, where ids are the prompt and the new ids (only the new ids
with skip_prompt=True). Pieces can therefore end in other places than transformers' do. One sequence only: a
batch of more than one row is an InputError (transformers raises ValueError).

Imports the standard library and NumPy only.
"""

from __future__ import annotations

import queue
import sys

import numpy as np

from .errors import InputError


class TextStreamer:
    """Prints the text of the ids generate produces, as soon as it is final (transformers' TextStreamer protocol).

    skip_prompt: leave out the prompt (the first put). decode_kwargs go to the tokenizer's decode, e.g.
    skip_special_tokens=True. Subclass and override on_finalized_text to send the text elsewhere.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        if not hasattr(tokenizer, "stream_decoder"):
            raise InputError(f"the streamer needs a refimpl tokenizer (one with stream_decoder()), "
                             f"got {type(tokenizer).__name__}")
        try:
            tokenizer.decode([], **decode_kwargs)  # a bad decode argument fails now, not in the middle of generate
        except TypeError as e:
            raise InputError(f"decode_kwargs {sorted(decode_kwargs)} are not arguments of decode: {e}") from None
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.decoder = tokenizer.stream_decoder(**decode_kwargs)
        self.next_tokens_are_prompt = True

    def put(self, value):
        """Ids for one sequence: [1, n] or [n] (the prompt first, then each step's new id)."""
        ids = np.asarray(value)
        if ids.ndim > 2 or (ids.ndim == 2 and ids.shape[0] != 1):
            raise InputError(f"{type(self).__name__} streams one sequence: got ids of shape {ids.shape} "
                             "(generate a batch without a streamer, or one prompt at a time)")
        ids = ids.reshape(-1)
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.on_finalized_text("".join(self.decoder.push(i) for i in ids.tolist()))

    def end(self):
        """The text still held back, with stream_end=True; the streamer is then ready for another generate."""
        text = self.decoder.finish()
        self.decoder = self.tokenizer.stream_decoder(**self.decode_kwargs)
        self.next_tokens_are_prompt = True
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        """Print text (a newline after the last piece), as transformers' TextStreamer does."""
        print(text, flush=True, end="" if not stream_end else None, file=sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """The text as an iterator, for a consumer in another thread (transformers' TextIteratorStreamer).

    Each put's text (possibly "") is put on a queue; iteration stops after end(). timeout: seconds a put or a next()
    may wait on the queue; past it, queue.Empty (or queue.Full) is raised, as in transformers.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue = queue.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration()
        return value
