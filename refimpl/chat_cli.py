"""`refimpl chat MODEL`: an interactive chat loop (docs/cli.md, "Chat").

    refimpl chat golden/models/llama_text [--system "Be brief."] [-n 256] [--temp 0.8 --top-p 0.95 --seed 1]

Each line read from standard input is a user message. The conversation so far (the --system message first) goes
through the tokenizer's chat template (tokenizer.apply_chat_template(history, add_generation_prompt=True), the
llama-2 template built in for Llama tokenizers), model.generate streams the answer with a TextStreamer, and the
answer, decoded without special tokens, joins the conversation as an assistant message.

    /reset   forget the conversation (the --system message stays)
    /exit    quit (so does end of input, Ctrl-D)

Ctrl-C during an answer stops that answer (the text so far stays in the conversation); Ctrl-C at the prompt quits.
An error in one turn (the conversation has grown past the model's positions, say) is printed as one line and the
session goes on; the message that failed is dropped from the conversation.
"""
from __future__ import annotations

import os
import sys
import warnings

from .cli_common import add_backend_arguments, add_model_argument, check_sampling_values, cli_message, load_options
from .errors import InputError, RefimplError
from .streamers import TextStreamer

COMMANDS = ("/reset", "/exit")


def add_parser(sub):
    """Add the `chat` subcommand to an argparse subparsers object; returns the subparser."""
    c = sub.add_parser(
        "chat", help="chat with a model: each line of input is a message, each answer is streamed",
        description="An interactive chat: each line read from standard input is a user message; the conversation "
                    "goes through the tokenizer's chat template and the answer is streamed. /reset forgets the "
                    "conversation (the --system message stays); /exit or end of input quits. Ctrl-C stops an "
                    "answer; at the prompt it quits. Greedy or sampled as `refimpl generate`: --greedy decides "
                    "when given, otherwise a sampling flag turns sampling on, otherwise generation_config.json "
                    "decides.")
    add_model_argument(c, help="a Hugging Face checkpoint folder (config.json, weights, tokenizer)")
    c.add_argument("--system", default=None, metavar="TEXT", help="a system message, first in the conversation")
    c.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                   help="the chat template: a file holding a Jinja template, or the name of one (llama-2, or one "
                        "named in tokenizer_config.json); default: the tokenizer's")
    c.add_argument("-n", "--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=256,
                   help="the most tokens per answer (default 256)")
    c.add_argument("--greedy", action="store_true",
                   help="greedy decoding, whatever generation_config.json says; sampling flags are ignored")
    c.add_argument("--temp", "--temperature", dest="temperature", type=float, default=None,
                   help="sampling temperature > 0; turns sampling on")
    c.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 disables); "
                   "turns sampling on")
    c.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; turns sampling on")
    c.add_argument("--seed", "-s", type=int, default=None, help="random seed for sampling; turns sampling on")
    add_backend_arguments(c)
    c.set_defaults(run=chat_cmd)
    return c


# --- settings -------------------------------------------------------------------------------------------------------

SAMPLING_FLAGS = (("--temp", "temperature"), ("--top-k", "top_k"), ("--top-p", "top_p"), ("--seed", "seed"))


def check_values(args):
    """Each flag's value, checked before the model loads so that the error names the flag."""
    if args.max_new_tokens < 1:
        raise InputError(f"-n/--max-tokens {args.max_new_tokens}: must be >= 1")
    check_sampling_values(args)  # --temp, --top-k, --top-p: the same rules as refimpl generate


def generate_settings(args):
    """Keyword arguments for model.generate: only what the flags set (a None would override
    generation_config.json)."""
    given = [flag for flag, name in SAMPLING_FLAGS if getattr(args, name) is not None]
    if args.greedy:
        if given:
            warnings.warn(f"{', '.join(given)} ignored: --greedy decodes greedily")
        return {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    kwargs = {"max_new_tokens": args.max_new_tokens}
    if given:
        kwargs["do_sample"] = True
    for _, name in SAMPLING_FLAGS:
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def eos_ids(model, tokenizer):
    """generation_config.json's eos ids, plus the tokenizer's eos (the chat template ends each answer with it)."""
    config = getattr(model, "generation_config", None) or {}
    eos = config.get("eos_token_id")
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids or None


def read_template(value):
    """--chat-template: the text of a file, or a name passed on as it is."""
    if value is not None and os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--chat-template {value!r}: cannot read it as UTF-8 text ({exc})") from None
    return value


# --- the loop -------------------------------------------------------------------------------------------------------

class ChatStreamer(TextStreamer):
    """TextStreamer that also keeps the text it printed, so an interrupted answer can join the conversation."""

    def __init__(self, tokenizer, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.pieces = []

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)
        super().on_finalized_text(text, stream_end)

    def interrupted(self):
        """After a KeyboardInterrupt in generate: print what the decoder still holds, and a newline."""
        text = self.decoder.finish()
        self.decoder = self.tokenizer.stream_decoder(**self.decode_kwargs)
        self.next_tokens_are_prompt = True
        self.on_finalized_text(text, stream_end=True)

    def take(self):
        text, self.pieces = "".join(self.pieces), []
        return text


def read_line(interactive):
    """The next line of input without its newline, or None at end of input. A prompt on a terminal only."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stdout, flush=True)
            return None
    line = sys.stdin.readline()
    if not line:
        return None
    return line.rstrip("\r\n")


def chat_cmd(args) -> int:
    from . import load, load_tokenizer

    check_values(args)
    sampling = generate_settings(args)
    options = load_options(args)
    template = read_template(args.chat_template)
    tokenizer = load_tokenizer(args.model)
    start = [{"role": "system", "content": args.system}] if args.system is not None else []
    try:  # a missing template or jinja2 is found now, not at the first message
        tokenizer.apply_chat_template(start + [{"role": "user", "content": "hi"}], chat_template=template,
                                      add_generation_prompt=True, tokenize=False)
    except RefimplError as exc:
        text = str(exc).replace("pass chat_template=", "give --chat-template")
        raise InputError(text if "--chat-template" in text else f"{text} (give --chat-template NAME or FILE)") from None
    model = load(args.model, **options)
    if model.head != "causal_lm":
        raise InputError(f"{args.model} holds a {type(model).__name__}, which has no language-model head")
    eos = eos_ids(model, tokenizer)
    streamer = ChatStreamer(tokenizer, skip_special_tokens=True)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    history = list(start)
    while True:
        try:
            line = read_line(interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave
            print(file=sys.stdout, flush=True)
            return 0
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(start)
            print("[conversation reset]", file=sys.stderr, flush=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = None
        try:
            ids = tokenizer.apply_chat_template(history, chat_template=template, add_generation_prompt=True)
            model.generate([ids], streamer=streamer, eos_token_id=eos, **sampling)
        except KeyboardInterrupt:  # Ctrl-C during the answer: stop it, keep what was said
            streamer.interrupted()
        except RefimplError as exc:
            history.pop()  # the message that failed leaves the conversation
            streamer.take()
            streamer.decoder = tokenizer.stream_decoder(**streamer.decode_kwargs)
            streamer.next_tokens_are_prompt = True
            limit = model.max_sequence_length()
            too_long = ids is not None and limit is not None and len(ids) + args.max_new_tokens > limit
            hint = ": /reset to start over, or give a smaller -n/--max-tokens" if too_long else ""
            print(f"refimpl: error: {cli_message(exc)}{hint}", file=sys.stderr, flush=True)
            continue
        history.append({"role": "assistant", "content": streamer.take()})


# --- standalone ------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    """`refimpl chat` on its own: main(["MODEL", "--system", ...]) (the "chat" word is optional); refimpl.cli.main
    runs it, so logging, warnings and errors are the command line's own."""
    from .cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "chat":
        argv.insert(0, "chat")
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
