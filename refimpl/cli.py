"""The `refimpl` command line (also `python -m refimpl`). docs/cli.md describes every command and habit.

    refimpl generate MODEL -p "Once upon a time" [-n 64] [--temp 0.8 --top-k 40 --top-p 0.95 --seed 1] [--greedy]
    refimpl generate MODEL --ids 1,17,42 --verbose-prompt
    refimpl next-token MODEL --ids 1,17,42 [--top-k 5] [--dtype float64]
    refimpl perplexity MODEL FILE|- [-c CTX] [--stride S] [--json FILE|-]
    refimpl bench MODEL [-p 128] [-n 64] [-r 5] [-o md|json] [--backend numba --weights int8 -t 2]
    refimpl inspect PATH
    refimpl convert SRC DST [--max-shard-size 5GB] [--dtype f32|f16|bf16] [--force]
    refimpl golden MODEL (--ids 1,17,42 | --prompt TEXT) -o pack.safetensors [--dtype float64] [--summary] [--compare-dtypes]
    refimpl golden MODEL --prompts prompts.jsonl -o packs/ [--ray [ADDRESS]]   # a batch, on Ray (docs/distributed.md)
    refimpl diff REF.safetensors PORT.safetensors|PORT_LOGITS.bin [--atol A] [--rtol R] [--skip GLOB] [--json FILE]

Every command takes its model as MODEL or -m MODEL, -q/--quiet and -v/--verbose; errors are one line
(`refimpl: error: ...`, exit status 2) naming the flag at fault.
"""
from __future__ import annotations

import inspect as pyinspect
import os
import sys
import time
import warnings

import numpy as np

from . import bench as bench_command
from . import convert as convert_command
from . import inspect as inspect_command
from . import perplexity as perplexity_command
from .cli_common import (BACKENDS, WEIGHT_FORMATS, Parser, accept_model_flag, add_backend_arguments,  # noqa: F401
                         check_sampling_values,
                         add_log_arguments, add_model_argument, announce_compile, cli_message, load_options, log,
                         positive_int, resolve_model, show_warning, start_logging)
from .oracle_cli import add_parsers as add_oracle_parsers
from .errors import InputError, RefimplError
from .ops import softmax

_positive_int = positive_int  # the name accel/cli_options.py and older callers know


def parse_ids(text: str) -> list[int]:
    """'1,17,42' or '1 17 42' -> [1, 17, 42]."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--ids {text!r}: expected integers separated by commas, e.g. 1,17,42") from None
    if not ids:
        raise InputError("--ids is empty: give at least one token id")
    return ids


def next_token(args) -> int:
    from . import load

    if args.top_k < 1:
        raise InputError(f"--top-k {args.top_k}: must be >= 1 (how many candidates to print)")
    ids = parse_ids(args.ids)
    dtype = {"float32": np.float32, "float64": np.float64}[args.dtype]
    options = load_options(args)
    announce_compile(args)
    model = load(args.model, dtype=dtype, **options)
    if model.head != "causal_lm":
        raise InputError(f"{args.model} holds a {type(model).__name__}, which has no language-model head")
    logits = model(input_ids=[ids]).logits[0, -1]  # [V] at the last position
    probs = softmax(logits.astype(np.float64))
    k = min(args.top_k, logits.shape[-1])
    top = np.argsort(-logits, kind="stable")[:k]
    print(f"model: {type(model).__name__} from {args.model} ({args.dtype})")
    print(f"prompt ids: {ids}")
    print(f"next-token top-{k}:")
    print(f"  {'rank':>4}  {'id':>6}  {'logit':>10}  {'prob':>8}")
    for rank, token in enumerate(top, 1):
        print(f"  {rank:>4}  {int(token):>6}  {float(logits[token]):>10.4f}  {float(probs[token]):>8.4f}")
    return 0


def read_prompt(args):
    """The prompt text from --prompt, or from --prompt-file (a path, or - for standard input)."""
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return sys.stdin.read()
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise InputError(f"--prompt-file {args.prompt_file!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise InputError(f"--prompt-file {args.prompt_file!r} is not UTF-8 text") from None
    return args.prompt


def load_tokenizer_for(path):
    """The tokenizer stored beside the weights, or None when the folder has no tokenizer files."""
    names = ("tokenizer.model", "tokenizer.json", "vocab.json")
    if not any(os.path.exists(os.path.join(path, name)) for name in names):
        return None
    from .tokenizers import load_tokenizer

    return load_tokenizer(path)


class PrintStreamer:
    """transformers' streamer protocol: put(prompt ids), put(new ids) per step, end(). Prints text as it becomes final.

    token_times[i] is when new token i arrived (perf_counter), for the stats line."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout  # looked up now, not at import
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True) if tokenizer is not None else None
        self.prompt_seen = False
        self.new_tokens = 0
        self.token_times = []

    @property
    def first_token_time(self):
        return self.token_times[0] if self.token_times else None

    def put(self, ids):
        if not self.prompt_seen:  # the prompt is printed too, so the text reads on (and spaces join as in decode)
            self.prompt_seen = True
            for token in np.asarray(ids).reshape(-1):
                self._write(self.decoder.push(int(token)) if self.decoder else f"{int(token)} ")
            return
        self.new_tokens += 1
        self.token_times.append(time.perf_counter())
        token = int(np.asarray(ids).reshape(-1)[0])
        self._write(self.decoder.push(token) if self.decoder else f"{token} ")

    def end(self):
        if self.decoder is not None:
            self._write(self.decoder.finish())
        self._write("\n")

    def _write(self, text):
        if text:
            self.out.write(text)
            self.out.flush()


# Flags that turn sampling on in `generate` (unless --greedy), as llama.cpp's sampling flags do.
SAMPLING_FLAGS = (("--temp", "temperature"), ("--top-k", "top_k"), ("--top-p", "top_p"), ("--min-p", "min_p"),
                  ("--seed", "seed"))


def sampling_settings(args, model):
    """(whether generate will sample, the keyword arguments for model.generate), only flags given passed on.

    --do-sample / --greedy decide when given; otherwise any of --temp, --top-k, --top-p, --min-p, --seed turns
    sampling on; with none of them, do_sample is left to generation_config.json (greedy when it has none)."""
    given = [flag for flag, name in SAMPLING_FLAGS if getattr(args, name) is not None]
    if args.do_sample is False and given:
        warnings.warn(f"{', '.join(given)} ignored: --greedy decodes greedily")
    do_sample = args.do_sample if args.do_sample is not None else (True if given else None)
    sampling = do_sample if do_sample is not None else bool((getattr(model, "generation_config", None) or {})
                                                            .get("do_sample"))
    kwargs = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
              "repetition_penalty": args.repetition_penalty, "do_sample": do_sample}
    if sampling:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
        if args.min_p is not None and not accepts_keyword(model.generate, "min_p"):
            raise InputError("--min-p: this version of refimpl's generate() has no min-p sampling")
    return sampling, {name: value for name, value in kwargs.items() if value is not None}


def accepts_keyword(function, name):
    parameters = pyinspect.signature(function).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def generate_cmd(args) -> int:
    from . import load

    check_sampling_values(args)
    ids = parse_ids(args.ids) if args.ids is not None else None
    text = read_prompt(args) if ids is None else None
    if ids is None and text is None:
        raise InputError("give a prompt: -p TEXT, -f FILE (- for stdin) or --ids 1,17,42")
    dtype = {"float32": np.float32, "float64": np.float64}[args.dtype]
    options = load_options(args)
    compiling = announce_compile(args)
    start = time.perf_counter()
    model = load(args.model, dtype=dtype, **options)
    log.info("loaded %s (%s) in %.2f s", args.model, type(model).__name__, time.perf_counter() - start)
    if model.head != "causal_lm":
        raise InputError(f"{args.model} holds a {type(model).__name__}, which has no language-model head")
    tokenizer = load_tokenizer_for(args.model)
    if ids is None:
        if tokenizer is None:
            raise InputError(f"{args.model} has no tokenizer files (tokenizer.model, tokenizer.json or vocab.json): "
                             "give token ids with --ids instead")
        ids = tokenizer.encode(text)
        if not ids:
            raise InputError("the prompt encodes to no tokens: give some text, or --ids")
    if args.verbose_prompt:
        print(f"prompt: {len(ids)} tokens", file=sys.stderr)
        for token in ids:
            piece = repr(tokenizer.decode([token])) if tokenizer is not None else ""
            print(f"  {token:>6} {piece}", file=sys.stderr)
    sampling, kwargs = sampling_settings(args, model)
    seed = args.seed
    if sampling and seed is None:
        seed = int.from_bytes(os.urandom(4), "little")  # reported at the end so the run can be repeated
    streamer = PrintStreamer(tokenizer)
    start = time.perf_counter()
    interrupted = False
    try:
        model.generate([ids], streamer=streamer, **({"seed": seed} if sampling else {}), **kwargs)
    except KeyboardInterrupt:
        interrupted = True
        if streamer.decoder is not None:
            streamer._write(streamer.decoder.finish())
        streamer._write("\n")
    end = time.perf_counter()
    if not args.quiet:
        print(stats_line(len(ids), start, end, streamer.token_times, interrupted, compiling,
                         seed if sampling else None), file=sys.stderr)
    return 130 if interrupted else 0


def stats_line(prompt_tokens, start, end, times, interrupted=False, compiling=False, seed=None):
    """[prompt L tokens in A s, N new tokens, first step B s, generation R tokens/s, seed S] for stderr.

    The first step (the first single-token forward) is timed on its own and left out of the rate: on a cold Numba
    cache it holds the compile of the decode kernels (the prompt's time holds the prompt kernels')."""
    first = times[0] if times else end
    parts = [f"prompt {prompt_tokens} tokens in {first - start:.2f} s", f"{len(times)} new tokens"]
    if len(times) >= 2:
        parts.append(f"first step {times[1] - times[0]:.2f} s")
    steps = len(times) - 2
    rate = f"{steps / (times[-1] - times[1]):.1f} tokens/s" if steps > 0 and times[-1] > times[1] else "n/a"
    parts.append(f"generation {rate}")
    if compiling:
        parts.append("prompt and first step include compiling kernels")
    if seed is not None:
        parts.append(f"seed {seed}")
    return f"[{'interrupted, ' if interrupted else ''}{', '.join(parts)}]"


def build_parser() -> Parser:
    from importlib import metadata

    try:
        version = metadata.version("refimpl")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        from . import __version__ as version
    parser = Parser(prog="refimpl", description="NumPy reference implementation of Llama 2, Open-Llama and OPT, "
                    "matching Hugging Face transformers 4.46.3. Every command takes its model as MODEL or -m MODEL; "
                    "see docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"refimpl {version}")
    parser.add_argument("-q", "--quiet", dest="quiet_all", action="store_true",
                        help="errors only: no progress, notes or warnings on stderr")
    parser.add_argument("-v", "--verbose", dest="verbose_all", action="count", default=0,
                        help="more detail on stderr (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect_command.add_parser(sub)
    accept_model_flag(sub.choices["inspect"], "path")
    convert_command.add_parser(sub)  # refimpl convert: any checkpoint -> a Hugging Face safetensors folder
    g = sub.add_parser(
        "generate", help="generate text (or token ids) from a prompt, streaming it as it comes",
        description="Generate text from a prompt, streaming it as it comes; stats on stderr. Greedy or sampled: "
                    "--do-sample or --greedy decide when given; otherwise any sampling flag (--temp, --top-k, "
                    "--top-p, --min-p, --seed) turns sampling on; with none of these, generation_config.json "
                    "decides (its do_sample, greedy when it has none), as transformers' generate() does.")
    add_model_argument(g, help="a Hugging Face checkpoint folder (config.json + model.safetensors + tokenizer)")
    source = g.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", help="the prompt text")
    source.add_argument("-f", "--prompt-file", help="read the prompt from this file (- for standard input)")
    source.add_argument("--ids", help="the prompt as token ids, e.g. 1,17,42 (no tokenizer needed)")
    g.add_argument("-n", "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=None,
                   help="tokens to generate (default: generation_config.json, else up to 20 in all)")
    g.add_argument("--min-new-tokens", type=int, default=None, help="suppress eos until this many are generated")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_const", const=True, default=None,
                      help="sample (default: sample when a sampling flag is given, else as generation_config.json)")
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False,
                      help="greedy decoding, whatever generation_config.json says; sampling flags are ignored")
    g.add_argument("--temperature", "--temp", type=float, default=None,
                   help="sampling temperature > 0 (default 1.0); turns sampling on")
    g.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens (default 50; 0 disables); turns sampling on")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass in (0, 1] (default 1.0); turns sampling on")
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below min-p times the top probability, in [0, 1]; turns sampling on")
    g.add_argument("--repetition-penalty", "--repeat-penalty", type=float, default=None,
                   help="divide (multiply if negative) the scores of tokens already present (default 1.0)")
    g.add_argument("--seed", "-s", type=int, default=None,
                   help="random seed for sampling (printed when not given); turns sampling on")
    g.add_argument("--verbose-prompt", action="store_true", help="print the prompt's token ids on stderr")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    add_backend_arguments(g)
    g.set_defaults(run=generate_cmd)
    p = sub.add_parser("next-token", help="print the most likely next tokens after a prompt of token ids")
    add_model_argument(p, help="a Hugging Face checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--ids", required=True, help="prompt token ids, e.g. 1,17,42")
    p.add_argument("--top-k", type=int, default=5, help="how many candidates to print (default 5; >= 1)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="compute dtype; float64 is the audit mode")
    add_backend_arguments(p)
    p.set_defaults(run=next_token)
    perplexity_command.add_parser(sub)
    bench_command.add_parser(sub)
    from . import chat_cli, serve  # their heavy imports (jinja2, starlette, uvicorn) wait until they run

    chat_cli.add_parser(sub)  # refimpl chat (docs/cli.md)
    serve.add_parser(sub)  # refimpl serve (docs/serve.md)
    add_oracle_parsers(sub)  # refimpl golden / refimpl diff (docs/oracle.md)
    accept_model_flag(sub.choices["golden"], "model")
    for subparser in sub.choices.values():
        add_log_arguments(subparser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = bool(getattr(args, "quiet", False) or args.quiet_all)
    verbose = getattr(args, "verbose", 0) + args.verbose_all
    stop_logging = start_logging(args.quiet, verbose)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if args.quiet else "default")
            warnings.showwarning = show_warning  # one line, `refimpl: warning: ...`, no source line
            for dest in ("model", "path"):  # the commands that take a model (MODEL or -m MODEL)
                if hasattr(args, f"{dest}_flag"):
                    resolve_model(args, dest)
            if args.command == "convert":  # DST is made, but not inside a folder that is not there (a typo)
                parent = os.path.dirname(os.path.abspath(args.dst))
                if not os.path.isdir(parent):
                    raise InputError(f"{args.dst}: the folder {parent} does not exist")
            return args.run(args)
    except RefimplError as exc:
        print(f"refimpl: error: {cli_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refimpl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # refimpl ... | head: the reader left
        sys.stderr.close()
        return 141
    except OSError as exc:  # a full disk, a file we may not read or write
        print(f"refimpl: error: {cli_message(exc)}", file=sys.stderr)
        return 2
    finally:
        stop_logging()


if __name__ == "__main__":
    sys.exit(main())
