"""refimpl.streamers: TextStreamer and TextIteratorStreamer with model.generate(..., streamer=...).

The golden text models (llama_text, opt_text) carry their tokenizers. Whatever is streamed, joined, must be
tokenizer.decode of the generated ids (the prompt too unless skip_prompt), with the same decode arguments; a
character split over byte tokens must never show as U+FFFD on the way; a batch of two is an InputError.
"""

from __future__ import annotations

import os
import queue
import threading

import numpy as np
import pytest

import refimpl
from refimpl.errors import InputError
from refimpl.streamers import TextIteratorStreamer, TextStreamer

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
MODELS = ["llama_text", "opt_text"]
PROMPT = "Hello world, this is"


def model_and_tokenizer(name):
    path = os.path.join(GOLDEN, "models", name)
    return refimpl.load(path), refimpl.load_tokenizer(path)


class Recorder(TextStreamer):
    """A TextStreamer that keeps its pieces instead of printing them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pieces, self.ends = [], 0

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)
        self.ends += stream_end


def expected_text(tok, prompt_ids, sequence, skip_prompt, **decode_kwargs):
    ids = sequence[len(prompt_ids):] if skip_prompt else sequence
    return tok.decode(list(ids), **decode_kwargs)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("skip_prompt", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_streamed_text_is_the_decode(name, skip_prompt, skip_special_tokens):
    model, tok = model_and_tokenizer(name)
    ids = tok.encode(PROMPT)
    streamer = Recorder(tok, skip_prompt=skip_prompt, skip_special_tokens=skip_special_tokens)
    out = model.generate([ids], max_new_tokens=12, streamer=streamer)[0].tolist()
    assert len(out) > len(ids)
    want = expected_text(tok, ids, out, skip_prompt, skip_special_tokens=skip_special_tokens)
    assert "".join(streamer.pieces) == want
    assert streamer.ends == 1
    # one piece per put: the prompt (unless skipped), each new token, and end's
    assert len(streamer.pieces) == (len(out) - len(ids)) + (0 if skip_prompt else 1) + 1
    if skip_special_tokens and name == "llama_text":  # text arrives while generating, not only at the end
        assert sum(1 for piece in streamer.pieces[:-1] if piece) >= 2  # (opt_text repeats a token whose last
        # byte starts a character the next token never completes: all of it waits for the end, rightly)


@pytest.mark.parametrize("name", MODELS)
def test_text_streamer_prints_and_can_be_reused(name, capsys):
    model, tok = model_and_tokenizer(name)
    ids = tok.encode(PROMPT)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    texts = []
    for _ in range(2):  # end() resets the streamer for the next generate
        out = model.generate([ids], max_new_tokens=8, streamer=streamer)[0].tolist()
        texts.append(expected_text(tok, ids, out, True, skip_special_tokens=True))
    assert capsys.readouterr().out == "".join(text + "\n" for text in texts)


@pytest.mark.parametrize("name", MODELS)
def test_iterator_streamer_from_a_thread(name):
    model, tok = model_and_tokenizer(name)
    ids = tok.encode(PROMPT)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60, skip_special_tokens=True)
    result = {}

    def run():
        result["out"] = model.generate([ids], max_new_tokens=12, streamer=streamer)[0].tolist()

    thread = threading.Thread(target=run)
    thread.start()
    pieces = list(streamer)  # the main thread consumes while the other one generates
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert "".join(pieces) == expected_text(tok, ids, result["out"], True, skip_special_tokens=True)


def test_iterator_timeout_raises_queue_empty():
    tok = refimpl.load_tokenizer(os.path.join(GOLDEN, "models", "opt_text"))
    streamer = TextIteratorStreamer(tok, timeout=0.01)
    with pytest.raises(queue.Empty):
        next(streamer)


def scripted(name, script):
    """The golden model, made to generate `script`: after its own forward, the last position's logits are replaced
    so that greedy search picks script[k] at step k. generate itself is the real one."""
    model, tok = model_and_tokenizer(name)
    base = type(model)

    class Scripted(base):
        def __call__(self, *args, **kwargs):
            out = base.__call__(self, *args, **kwargs)
            logits = np.full_like(out.logits, -1e4)
            logits[:, -1, script[min(self.step, len(script) - 1)]] = 1e4
            out.logits, self.step = logits, self.step + 1
            return out

    model.__class__, model.step = Scripted, 0
    return model, tok


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("iterator", [False, True])
def test_multibyte_characters_never_show_as_replacement(name, iterator):
    """The ids of "a🦙é ꙮ中 ok" come out of generate one at a time: characters split over byte tokens
    (decoded alone, they are U+FFFD), yet no streamed piece holds a U+FFFD."""
    tok = refimpl.load_tokenizer(os.path.join(GOLDEN, "models", name))
    script = tok.encode("a🦙é ꙮ中 ok", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in script), "the text must have characters split over tokens"
    prompt = tok.encode("Hi")
    model, tok = scripted(name, script)
    cls = TextIteratorStreamer if iterator else Recorder
    # skip_special_tokens: legacy Llama holds text back until a special token ends it, or the end (streaming.py)
    streamer = cls(tok, timeout=60, skip_special_tokens=True) if iterator else cls(tok, skip_special_tokens=True)
    out = model.generate([prompt], max_new_tokens=len(script), streamer=streamer)[0].tolist()
    assert out == prompt + script
    pieces = list(streamer) if iterator else streamer.pieces
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tok.decode(out, skip_special_tokens=True)
    assert "🦙" in "".join(pieces) and "ꙮ" in "".join(pieces)
    assert sum(1 for piece in pieces[:-1] if piece) >= 3  # streamed as it came, not all at the end


@pytest.mark.parametrize("cls", [TextStreamer, TextIteratorStreamer])
def test_batch_of_two_is_an_input_error(cls):
    model, tok = model_and_tokenizer("opt_text")
    ids = tok.encode(PROMPT)
    with pytest.raises(InputError, match="one sequence"):
        model.generate([ids, ids], max_new_tokens=2, streamer=cls(tok))
    with pytest.raises(InputError, match="one sequence"):
        cls(tok).put(np.zeros((2, 3), dtype=np.int64))


def test_bad_tokenizer_or_decode_arguments():
    tok = refimpl.load_tokenizer(os.path.join(GOLDEN, "models", "opt_text"))
    with pytest.raises(InputError, match="refimpl tokenizer"):
        TextStreamer(object())
    with pytest.raises(InputError, match="not arguments of decode"):
        TextStreamer(tok, skip_special_token=True)


def test_exported_from_refimpl():
    assert refimpl.TextStreamer is TextStreamer and refimpl.TextIteratorStreamer is TextIteratorStreamer
    assert {"TextStreamer", "TextIteratorStreamer"} <= set(refimpl.__all__)
