"""`refimpl serve MODEL`: an OpenAI-compatible HTTP server for one checkpoint (docs/serve.md).

    refimpl serve golden/models/llama_text --port 8080
    curl http://127.0.0.1:8080/v1/completions -d '{"prompt": "Hello", "max_tokens": 8}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events). Requests wait in a queue: one worker thread runs the model, one request at a time, so the event
loop keeps answering (/health, new connections) while a request generates.

Why Starlette (and uvicorn): it is small (one pure-Python package over anyio), it is ASGI, so uvicorn runs it and
handles SIGINT/SIGTERM gracefully (in-flight answers complete before the process exits), server-sent events are a
StreamingResponse over an async generator, and it needs no pydantic: requests are checked here, by hand, with
OpenAI's error shape {"error": {"message", "type", "param", "code"}}. FastAPI would add pydantic and an OpenAPI
layer that a four-endpoint server does not need; the standard library's http.server has neither streaming
responses that the event loop can interleave nor graceful shutdown.

starlette and uvicorn are imported only when the server is built or run (pip install 'refimpl[serve]').
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import os
import sys
import threading
import time
import uuid

import numpy as np

from .errors import InputError, RefimplError
from .streamers import TextStreamer

try:  # the shared CLI helpers moved to cli_common; older trees keep them in cli
    from .cli_common import add_backend_arguments, add_model_argument, load_options, positive_int
except ImportError:  # pragma: no cover
    from .cli import add_backend_arguments, add_model_argument, load_options, positive_int

log = logging.getLogger("refimpl")

DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # as OpenAI


def require_server_packages():
    """Import starlette and uvicorn, or raise a RefimplError naming the extra that installs them."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise RefimplError(f"refimpl serve needs starlette and uvicorn ({exc.name} is not installed): "
                           "pip install 'refimpl[serve]'") from None


# --- request errors -------------------------------------------------------------------------------------------------

class RequestError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, message, param=None, code=None, status=400, type="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _get(body, name, kind, check=None, default=None):
    """body[name] if present and not null, checked: kind "int", "number", "bool" or "str"; check(value) -> problem."""
    value = body.get(name)
    if value is None:
        return default
    ok = {"int": _is_int, "number": _is_number, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[kind]
    if not ok(value):
        article = "an" if kind == "int" else "a"
        raise RequestError(f"{name} must be {article} {'integer' if kind == 'int' else kind}, got {json.dumps(value)}",
                           param=name, code="invalid_type")
    problem = check(value) if check else None
    if problem:
        raise RequestError(f"{name}={json.dumps(value)}: {problem}", param=name, code="invalid_value")
    return value


# --- the model, behind one worker thread -----------------------------------------------------------------------

class Engine:
    """The model and tokenizer, with the request checks that need them and the one worker thread that runs them."""

    def __init__(self, model, tokenizer, name, max_tokens_limit=DEFAULT_MAX_TOKENS_LIMIT):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_tokens_limit = max_tokens_limit
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.created = int(time.time())
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="refimpl-serve")

    # -- parsing a request into (prompt ids, generate keywords, stop strings, max_tokens) --

    def settings(self, body, default_max_tokens):
        """The generation fields of a request -> (generate keywords, stop strings, max_tokens or None)."""
        n = _get(body, "n", "int")
        if n is not None and n != 1:
            raise RequestError(f"n={n}: this server returns one choice (n=1)", param="n", code="unsupported_value")
        if body.get("best_of") not in (None, 1):
            raise RequestError("best_of is not supported by this server", param="best_of", code="unsupported_value")
        if body.get("logprobs") not in (None, False):
            raise RequestError("logprobs are not supported by this server", param="logprobs",
                               code="unsupported_value")
        max_tokens = _get(body, "max_tokens", "int", lambda v: "must be >= 1" if v < 1 else (
            f"above this server's limit of {self.max_tokens_limit} (--max-tokens-limit)"
            if v > self.max_tokens_limit else None))
        if max_tokens is None and "max_completion_tokens" in body:
            max_tokens = _get(body, "max_completion_tokens", "int", lambda v: "must be >= 1" if v < 1 else (
                f"above this server's limit of {self.max_tokens_limit} (--max-tokens-limit)"
                if v > self.max_tokens_limit else None))
        temperature = _get(body, "temperature", "number", lambda v: "must be in [0, 2]" if not 0 <= v <= 2 else None)
        top_p = _get(body, "top_p", "number", lambda v: "must be in (0, 1]" if not 0 < v <= 1 else None)
        top_k = _get(body, "top_k", "int", lambda v: "must be >= 0" if v < 0 else None)
        seed = _get(body, "seed", "int", lambda v: "must be in [0, 2**63)" if not 0 <= v < 2**63 else None)
        stop = body.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
                    or len(stop) > MAX_STOP_SEQUENCES):
                raise RequestError(f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} strings",
                                   param="stop", code="invalid_type")
            if any(s == "" for s in stop):
                raise RequestError("stop strings must not be empty", param="stop", code="invalid_value")
            stop = stop or None
        kwargs = {}
        if temperature is not None:
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature))
            else:
                kwargs["do_sample"] = False
        if top_p is not None:
            kwargs["top_p"] = float(top_p)
        if top_k is not None:
            kwargs["top_k"] = top_k
        if seed is not None:
            kwargs["seed"] = seed
        if stop:
            kwargs["stop_strings"] = stop
        return kwargs, stop, max_tokens if max_tokens is not None else default_max_tokens

    def check_length(self, ids, max_tokens, param):
        """Fill in max_tokens (None: the rest of the context, up to the limit) and check prompt + answer fit."""
        if self.context is not None and len(ids) >= self.context:
            raise RequestError(f"the prompt is {len(ids)} tokens; this model's context is {self.context} tokens",
                               param=param, code="context_length_exceeded")
        if max_tokens is None:
            room = self.context - len(ids) if self.context is not None else self.max_tokens_limit
            return min(room, self.max_tokens_limit)
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is more than this "
                               f"model's context of {self.context} tokens", param="max_tokens",
                               code="context_length_exceeded")
        return max_tokens

    def completion_prompt(self, body):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer files: give the prompt as a list of token ids",
                                   param="prompt", code="invalid_type")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
            vocab = self.model.config.vocab_size
            bad = [i for i in prompt if not 0 <= i < vocab]
            if bad:
                raise RequestError(f"prompt token id {bad[0]} is out of range [0, {vocab})", param="prompt",
                                   code="invalid_value")
            ids = list(prompt)
        elif prompt is None:
            raise RequestError("missing required field: prompt", param="prompt", code="missing_required_parameter")
        else:
            raise RequestError("prompt must be a string or a non-empty list of token ids (one prompt: n=1)",
                               param="prompt", code="invalid_type")
        if not ids:
            raise RequestError("the prompt encodes to no tokens", param="prompt", code="invalid_value")
        return ids

    def chat_prompt(self, body):
        messages = body.get("messages")
        if messages is None:
            raise RequestError("missing required field: messages", param="messages",
                               code="missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages",
                               code="invalid_type")
        conversation = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise RequestError(f"{where} must be an object with a string role", param=where, code="invalid_type")
            content = message.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise RequestError(f"{where}.content: only text parts are supported", param=f"{where}.content",
                                       code="invalid_value")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise RequestError(f"{where}.content must be a string", param=f"{where}.content", code="invalid_type")
            conversation.append({"role": message["role"], "content": content})
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer files, which chat needs", param="messages",
                               code="unsupported_value")
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        return [int(i) for i in np.asarray(ids).reshape(-1)]

    # -- running --

    def submit(self, ids, max_tokens, kwargs, streamer=None, cancelled=None):
        """Queue one generation on the worker thread -> a concurrent.futures.Future of the new ids."""
        return self.worker.submit(self._generate, ids, max_tokens, kwargs, streamer, cancelled)

    def _generate(self, ids, max_tokens, kwargs, streamer, cancelled):
        if cancelled is not None and cancelled.is_set():  # the client left while the request waited
            if streamer is not None:
                streamer.fail(RequestError("cancelled", status=499))
            return []
        extra = {}
        if cancelled is not None:
            extra["stopping_criteria"] = [lambda input_ids, scores: np.full(input_ids.shape[0], cancelled.is_set())]
        if "stop_strings" in kwargs:
            extra["tokenizer"] = self.tokenizer
        try:
            sequences = self.model.generate([ids], max_new_tokens=max_tokens, streamer=streamer, **kwargs, **extra)
        except BaseException as exc:
            if streamer is not None:
                streamer.fail(exc)
            raise
        return np.asarray(sequences)[0, len(ids):].tolist()

    def decode(self, new_ids):
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(new_ids, skip_special_tokens=True)

    def eos_ids(self):
        eos = (getattr(self.model, "generation_config", None) or {}).get("eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        eos = [] if eos is None else [eos] if _is_int(eos) else list(eos)
        return set(eos)

    def finish_reason(self, new_ids, max_tokens, stopped_by_string):
        if stopped_by_string or (new_ids and new_ids[-1] in self.eos_ids()):
            return "stop"
        return "length" if len(new_ids) >= max_tokens else "stop"


def cut_at_stop(text, stop):
    """text up to the first stop string (OpenAI leaves the stop sequence out) -> (text, found)."""
    if not stop:
        return text, False
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class QueueStreamer(TextStreamer):
    """refimpl's TextStreamer (UTF-8-safe pieces via the tokenizer's stream_decoder) into an asyncio queue.

    Events: ("start",) once generate has accepted the settings, ("text", piece), ("end",) or ("error", exc)."""

    def __init__(self, tokenizer, loop):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop, self.queue, self.started = loop, asyncio.Queue(), False

    def _send(self, event):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def put(self, value):
        if not self.started:
            self.started = True
            self._send(("start",))
        super().put(value)

    def on_finalized_text(self, text, stream_end=False):
        if text:
            self._send(("text", text))
        if stream_end:
            self._send(("end",))

    def fail(self, exc):
        self._send(("error", exc))


class StopHoldback:
    """Streamed text with OpenAI's stop semantics: text that might begin a stop string is held back until it is
    known not to; at a stop string the text ends before it."""

    def __init__(self, stop):
        self.stop, self.buffer, self.done = stop or [], "", False
        self.keep = max((len(s) for s in self.stop), default=1) - 1

    def push(self, text):
        if self.done:
            return ""
        self.buffer += text
        cut, found = cut_at_stop(self.buffer, self.stop)
        if found:
            self.done, self.buffer = True, ""
            return cut
        ready = len(self.buffer) - self.keep
        if ready <= 0:
            return ""
        out, self.buffer = self.buffer[:ready], self.buffer[ready:]
        return out

    def finish(self):
        out, self.buffer = ("" if self.done else self.buffer), ""
        return out


# --- the app ------------------------------------------------------------------------------------------------------

def error_response(err):
    from starlette.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status)


async def read_json(request, max_body_bytes):
    """The request body as a JSON object, refusing more than max_body_bytes (413) and bad JSON (400)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
        raise RequestError(f"the request body is {length} bytes; this server takes at most {max_body_bytes} "
                           "(--max-body-bytes)", status=413, code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise RequestError(f"the request body is over {max_body_bytes} bytes (--max-body-bytes)", status=413,
                               code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def build_app(engine, max_body_bytes=DEFAULT_MAX_BODY_BYTES):
    """The Starlette app serving `engine` (an Engine)."""
    require_server_packages()
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "refimpl"}]})

    async def handle(request, chat):
        try:
            body = await read_json(request, max_body_bytes)
            kwargs, stop, max_tokens = engine.settings(body, None if chat else COMPLETION_DEFAULT_MAX_TOKENS)
            stream = _get(body, "stream", "bool", default=False)
            ids = engine.chat_prompt(body) if chat else engine.completion_prompt(body)
            max_tokens = engine.check_length(ids, max_tokens, "messages" if chat else "prompt")
            if stream and engine.tokenizer is None:
                raise RequestError("streaming needs the model's tokenizer files", param="stream",
                                   code="unsupported_value")
            if stream:
                return await start_stream(ids, max_tokens, kwargs, stop, chat)
            new_ids = await asyncio.wrap_future(engine.submit(ids, max_tokens, kwargs))
        except RequestError as err:
            return error_response(err)
        except RefimplError as exc:
            return error_response(RequestError(str(exc)))
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("request failed")
            return error_response(RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                               type="server_error"))
        text, stopped = cut_at_stop(engine.decode(new_ids), stop)
        reason = engine.finish_reason(new_ids, max_tokens, stopped)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": engine.name}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return JSONResponse({**head, "choices": [choice], "usage": usage(len(ids), len(new_ids))})

    async def start_stream(ids, max_tokens, kwargs, stop, chat):
        loop = asyncio.get_running_loop()
        streamer = QueueStreamer(engine.tokenizer, loop)
        cancelled = threading.Event()
        future = engine.submit(ids, max_tokens, kwargs, streamer, cancelled)
        first = await streamer.queue.get()  # generate checks its settings before the first put
        if first[0] == "error":
            cancelled.set()
            raise first[1] if isinstance(first[1], (RefimplError, RequestError)) else RuntimeError(str(first[1]))
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, reason=None, role=False, extra=None):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            event = {"id": cid, "object": kind, "created": created, "model": engine.name, "choices": [choice]}
            if extra:
                event.update(extra)
            return f"data: {json.dumps(event)}\n\n"

        async def events():
            holdback = StopHoldback(stop)
            try:
                if chat:
                    yield chunk("", role=True)
                while True:
                    event = await streamer.queue.get()
                    if event[0] == "text":
                        text = holdback.push(event[1])
                        if text:
                            yield chunk(text)
                    elif event[0] == "end":
                        break
                    elif event[0] == "error":
                        err = event[1]
                        message = str(err) if isinstance(err, RefimplError) else f"internal error: {err}"
                        yield f"data: {json.dumps(RequestError(message, type='server_error').body())}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                rest = holdback.finish()
                if rest:
                    yield chunk(rest)
                new_ids = await asyncio.wrap_future(future)
                reason = engine.finish_reason(new_ids, max_tokens, holdback.done)
                yield chunk(None if chat else "", reason=reason, extra={"usage": usage(len(ids), len(new_ids))})
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # the client left (or the answer is complete): stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request):
        return await handle(request, chat=False)

    async def chat_completions(request):
        return await handle(request, chat=True)

    async def not_found(request, exc):
        return error_response(RequestError(f"{request.method} {request.url.path}: no such endpoint", status=404,
                                           code="not_found"))

    async def bad_method(request, exc):
        return error_response(RequestError(f"{request.method} {request.url.path}: method not allowed", status=405,
                                           code="method_not_allowed"))

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})


# --- the command ----------------------------------------------------------------------------------------------------

def add_parser(sub):
    """Register `refimpl serve MODEL [--host H] [--port P] [--max-tokens-limit N] [--max-body-bytes N]`."""
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
        description="Serve one checkpoint over HTTP with OpenAI's API: GET /health, GET /v1/models, POST "
                    "/v1/completions, POST /v1/chat/completions (\"stream\": true for server-sent events). One "
                    "request generates at a time; the others wait in a queue. Needs pip install 'refimpl[serve]'. "
                    "See docs/serve.md.")
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080)")
    p.add_argument("--max-tokens-limit", type=positive_int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help=f"the largest max_tokens a request may ask for (default: {DEFAULT_MAX_TOKENS_LIMIT})")
    p.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"larger request bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--model-name", default=None,
                   help="the model id /v1/models reports and answers carry (default: the folder's name)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="compute dtype")
    add_backend_arguments(p)
    p.set_defaults(run=serve_cmd)
    return p


def load_engine(args):
    from . import load

    model = load(args.model, dtype={"float32": np.float32, "float64": np.float64}[args.dtype], **load_options(args))
    if model.head != "causal_lm":
        raise InputError(f"{args.model} holds a {type(model).__name__}, which has no language-model head")
    tokenizer = None
    if any(os.path.exists(os.path.join(args.model, f)) for f in ("tokenizer.model", "tokenizer.json", "vocab.json")):
        from .tokenizers import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    return Engine(model, tokenizer, name, args.max_tokens_limit)


def serve_cmd(args) -> int:
    require_server_packages()
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: must be in [0, 65535]")
    engine = load_engine(args)
    app = build_app(engine, args.max_body_bytes)
    quiet = getattr(args, "quiet", False)
    if not quiet:
        print(f"refimpl: serving {engine.name} on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning" if quiet else "info",
                            access_log=not quiet)
    uvicorn.Server(config).run()  # SIGINT/SIGTERM: stop accepting, finish the answers in flight, then return
    engine.worker.shutdown(wait=True)
    return 0


def main(argv=None) -> int:
    """`python -m refimpl.serve MODEL ...`: the serve command on its own, run by refimpl.cli.main (the same as
    `refimpl serve`)."""
    from .cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
