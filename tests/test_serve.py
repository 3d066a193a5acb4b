"""`refimpl serve` (refimpl/serve.py): the OpenAI-compatible server, driven by the official openai client.

The server runs in a subprocess (python -m refimpl.serve MODEL --port P) on a free loopback port, serving
golden/models/llama_text (a tiny random Llama with tokenizer files; chat uses the built-in llama-2 template).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("jinja2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "golden", "models", "llama_text")
CHAT = [{"role": "user", "content": "Hello there"}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, *extra, step_delay=None):
    """The server in a subprocess; step_delay (seconds) slows every generated token, to catch a request mid-way."""
    argv = [MODEL, "--port", str(port), "-q", *extra]
    if step_delay is None:
        cmd = [sys.executable, "-m", "refimpl.serve", *argv]
    else:
        cmd = [sys.executable, "-c",
               "import sys, time, refimpl.generate as g, refimpl.serve as s\n"
               "step = g.next_logits\n"
               f"g.next_logits = lambda *a: (time.sleep({step_delay}), step(*a))[1]\n"
               f"sys.exit(s.main({argv!r}))\n"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 60 s")


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = start_server(port)
    yield port
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    import refimpl

    with _quiet():
        model = refimpl.load(MODEL)
        tok = refimpl.load_tokenizer(MODEL)
    return model, tok


class _quiet:
    def __enter__(self):
        import warnings

        self.ctx = warnings.catch_warnings()
        self.ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def greedy_text(reference, ids, n):
    model, tok = reference
    out = model.generate([ids], max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_models_and_health(server, client):
    assert httpx.get(f"http://127.0.0.1:{server}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["llama_text"]


def test_greedy_completion_equals_refimpl_generate(client, reference):
    r = client.completions.create(model="llama_text", prompt="Hello world", max_tokens=12, temperature=0)
    ids = reference[1].encode("Hello world")
    assert r.object == "text_completion"
    assert r.choices[0].text == greedy_text(reference, ids, 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_completion_from_token_ids(client, reference):
    ids = [1, 17, 42, 99]
    r = client.completions.create(model="llama_text", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy_text(reference, ids, 6)
    assert r.usage.prompt_tokens == 4


def test_stop_string_ends_the_text_before_it(client, reference):
    full = client.completions.create(model="llama_text", prompt="Hello", max_tokens=20, temperature=0)
    text = full.choices[0].text
    stop = text[5:7]  # two characters from the middle of the greedy answer
    assert len(stop) == 2 and text.find(stop) > 0
    r = client.completions.create(model="llama_text", prompt="Hello", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="llama_text", prompt="Hello", max_tokens=20, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.find(stop)]


def test_sampling_with_a_seed_repeats(client):
    kw = dict(model="llama_text", prompt="Hello", max_tokens=10, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"top_k": 50})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_chat(client, reference):
    model, tok = reference
    r = client.chat.completions.create(model="llama_text", messages=CHAT, max_tokens=10, temperature=0)
    ids = [int(i) for i in tok.apply_chat_template(CHAT, add_generation_prompt=True)]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy_text(reference, ids, 10)
    assert r.usage.prompt_tokens == len(ids)


def test_streaming_chat_joins_to_the_plain_answer(client):
    plain = client.chat.completions.create(model="llama_text", messages=CHAT, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="llama_text", messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len(chunks) > 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason == "length"


def test_stream_ends_with_done(server):
    body = {"messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("call, param", [
    (lambda c: c.completions.create(model="llama_text", prompt="Hi", max_tokens=-1), "max_tokens"),
    (lambda c: c.completions.create(model="llama_text", prompt="Hi", max_tokens=10**6), "max_tokens"),
    (lambda c: c.chat.completions.create(model="llama_text", messages=CHAT, max_tokens=120), "max_tokens"),
    (lambda c: c.completions.create(model="llama_text", prompt="Hi", temperature=5), "temperature"),
    (lambda c: c.completions.create(model="llama_text", prompt="Hi", n=2), "n"),
    (lambda c: c.completions.create(model="llama_text", prompt="word " * 200), "prompt"),
    (lambda c: c.chat.completions.create(model="llama_text", messages=[{"role": "user", "content": 3}]),
     "messages[0].content"),
])
def test_bad_requests_get_4xx_with_openai_error_shape(client, call, param):
    with pytest.raises(openai.BadRequestError) as e:
        call(client)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"]


def test_missing_fields_bad_json_and_oversized_body(server):
    url = f"http://127.0.0.1:{server}/v1"
    r = httpx.post(f"{url}/chat/completions", json={"model": "llama_text"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{url}/completions", json={"max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{url}/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{url}/completions", json={"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{url}/completions", json={"prompt": [5, 99999]})
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/nothing").status_code == 404


def test_four_concurrent_clients_are_all_answered(server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="x", max_retries=0, timeout=30)
    answers, errors = [None] * 4, []

    def ask(i):
        try:
            answers[i] = client.chat.completions.create(
                model="llama_text", messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=30,
                temperature=0).choices[0].message.content
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert time.time() - start < 30  # each takes well under a second; a lost or stuck request times out
    assert not errors and all(isinstance(a, str) for a in answers)


def test_health_answers_while_a_request_generates():
    port = free_port()
    proc = start_server(port, step_delay=0.05)
    try:
        body = {"prompt": "Hello", "max_tokens": 60, "temperature": 0}
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)))
        t.start()
        time.sleep(0.5)  # the answer takes 60 x 0.05 s = 3 s
        start = time.time()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        assert time.time() - start < 1.0
        assert "r" not in result  # still generating
        t.join(timeout=60)
        assert result["r"].status_code == 200
    finally:
        stop_server(proc)


def test_sigterm_during_a_stream_still_delivers_the_whole_answer(reference):
    port = free_port()
    proc = start_server(port, step_delay=0.05)
    try:
        body = {"messages": CHAT, "max_tokens": 40, "temperature": 0, "stream": True}
        pieces = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:]))
                    if len(pieces) == 3:
                        break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert proc.poll() is None  # still answering
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        pieces += [json.loads(line[6:]) for line in rest[:-1]]
        assert pieces[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in pieces)
        model, tok = reference
        ids = [int(i) for i in tok.apply_chat_template(CHAT, add_generation_prompt=True)]
        assert text == greedy_text(reference, ids, 40)
        proc.wait(timeout=20)  # and then the server exits
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        stop_server(proc)


def test_missing_packages_name_the_extra(monkeypatch):
    import builtins

    from refimpl import serve
    from refimpl.errors import RefimplError

    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ImportError("no uvicorn", name="uvicorn")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    with pytest.raises(RefimplError, match=r"pip install 'refimpl\[serve\]'"):
        serve.require_server_packages()


def test_cli_flags_parse():
    import argparse

    from refimpl import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "-m", MODEL, "--port", "9", "--max-tokens-limit", "5"])
    assert (args.model_flag, args.host, args.port, args.max_tokens_limit) == (MODEL, "127.0.0.1", 9, 5)
    assert args.run is serve.serve_cmd


def test_a_client_that_leaves_a_stream_stops_its_generation():
    port = free_port()
    proc = start_server(port, step_delay=0.05)
    try:
        body = {"prompt": "Hello", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))
        start = time.time()  # the stream would need 100 x 0.05 s = 5 s more; the next request waits for the worker
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        assert time.time() - start < 2.5
    finally:
        stop_server(proc)
