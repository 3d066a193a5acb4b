"""The `refimpl` command line (also `python -m refimpl`).

    refimpl generate MODEL -p "Once upon a time" [-n 64] [--do-sample --temp 0.8 --top-k 40 --top-p 0.95 --seed 1]
    refimpl generate MODEL --ids 1,17,42 --verbose-prompt
    refimpl next-token MODEL --ids 1,17,42 [--top-k 5] [--dtype float64]
    refimpl inspect PATH
    refimpl convert SRC DST [--max-shard-size 5GB] [--dtype f32|f16|bf16] [--force]
    refimpl golden MODEL (--ids 1,17,42 | --prompt TEXT) -o pack.safetensors [--dtype float64] [--summary] [--compare-dtypes]
    refimpl diff REF.safetensors PORT.safetensors|PORT_LOGITS.bin [--atol A] [--rtol R] [--skip GLOB] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from . import convert as convert_command
from . import inspect as inspect_command
from .oracle_cli import add_parsers as add_oracle_parsers
from .errors import InputError, RefimplError
from .ops import softmax


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

    dtype = {"float32": np.float32, "float64": np.float64}[args.dtype]
    model = load(args.model, dtype=dtype, **load_options(args))
    if model.head != "causal_lm":
        raise InputError(f"{args.model} holds a {type(model).__name__}, which has no language-model head")
    ids = parse_ids(args.ids)
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
    """transformers' streamer protocol: put(prompt ids), put(new ids) per step, end(). Prints text as it becomes final."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout  # looked up now, not at import
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True) if tokenizer is not None else None
        self.prompt_seen = False
        self.new_tokens = 0
        self.first_token_time = None

    def put(self, ids):
        if not self.prompt_seen:  # the prompt is printed too, so the text reads on (and spaces join as in decode)
            self.prompt_seen = True
            for token in np.asarray(ids).reshape(-1):
                self._write(self.decoder.push(int(token)) if self.decoder else f"{int(token)} ")
            return
        self.new_tokens += 1
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
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


def generate_cmd(args) -> int:
    from . import load

    dtype = {"float32": np.float32, "float64": np.float64}[args.dtype]
    model = load(args.model, dtype=dtype, **load_options(args))
    if model.head != "causal_lm":
        raise InputError(f"{args.model} holds a {type(model).__name__}, which has no language-model head")
    tokenizer = load_tokenizer_for(args.model)
    if args.ids is not None:
        ids = parse_ids(args.ids)
    else:
        text = read_prompt(args)
        if text is None:
            raise InputError("give a prompt: --prompt TEXT, --prompt-file FILE (- for stdin) or --ids 1,17,42")
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
    seed = args.seed
    if args.do_sample and seed is None:
        seed = int.from_bytes(os.urandom(4), "little")  # reported at the end so the run can be repeated
    streamer = PrintStreamer(tokenizer)
    start = time.perf_counter()
    interrupted = False
    try:
        model.generate([ids], max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                       do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, seed=seed, streamer=streamer)
    except KeyboardInterrupt:
        interrupted = True
        if streamer.decoder is not None:
            streamer._write(streamer.decoder.finish())
        streamer._write("\n")
    end = time.perf_counter()
    first = streamer.first_token_time or end
    steps = max(streamer.new_tokens - 1, 0)
    rate = f"{steps / (end - first):.1f} tokens/s" if steps and end > first else "n/a"
    print(f"[{'interrupted, ' if interrupted else ''}prompt {len(ids)} tokens in {first - start:.2f} s, "
          f"{streamer.new_tokens} new tokens, generation {rate}"
          f"{f', seed {seed}' if args.do_sample else ''}]", file=sys.stderr)
    return 130 if interrupted else 0


# --- backend flags: which engine runs the model (refimpl itself, or accel's kernels) ----------------------------

BACKENDS = ("numpy", "numba", "cuda")  # as refimpl.load accepts
WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8")


def add_backend_arguments(parser):
    """Add --backend, --weights and --threads to an argparse parser (or subparser)."""
    group = parser.add_argument_group("backend")
    group.add_argument("--backend", choices=BACKENDS, default="numpy",
                       help="numpy: refimpl itself (default); numba: accel's CPU kernels; cuda: accel's GPU kernels (CuPy, NVIDIA)")
    group.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                       help="weight storage for --backend numba: fp32 (default), fp16, bf16, int8 (Q8_0 blocks)")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help="threads for --backend numba (default: all cores)")
    return parser


def load_options(args):
    """Keyword arguments for refimpl.load from parsed args: {'backend': ...} plus weights/threads when given.

    --weights and --threads with --backend numpy raise refimpl's ConfigError in refimpl.load, naming them.
    """
    options = {"backend": args.backend}
    if getattr(args, "weights", None) is not None:
        options["weights"] = args.weights
    if getattr(args, "threads", None) is not None:
        options["threads"] = args.threads
    return options


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refimpl", description="NumPy reference implementation of Llama 2, "
                                     "Open-Llama and OPT, matching Hugging Face transformers 4.46.3.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect_command.add_parser(sub)
    convert_command.add_parser(sub)  # refimpl convert: any checkpoint -> a Hugging Face safetensors folder
    g = sub.add_parser("generate", help="generate text (or token ids) from a prompt, streaming it as it comes")
    g.add_argument("model", help="a Hugging Face checkpoint folder (config.json + model.safetensors + tokenizer)")
    source = g.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", help="the prompt text")
    source.add_argument("-f", "--prompt-file", help="read the prompt from this file (- for standard input)")
    source.add_argument("--ids", help="the prompt as token ids, e.g. 1,17,42 (no tokenizer needed)")
    g.add_argument("-n", "--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: generation_config.json, else up to 20 in all)")
    g.add_argument("--min-new-tokens", type=int, default=None, help="suppress eos until this many are generated")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", "--temp", type=float, default=None, help="sampling temperature (default 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 50; 0 disables)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1.0)")
    g.add_argument("--repetition-penalty", "--repeat-penalty", type=float, default=None,
                   help="divide (multiply if negative) the scores of tokens already present (default 1.0)")
    g.add_argument("--seed", "-s", type=int, default=None, help="random seed for sampling (printed when not given)")
    g.add_argument("--verbose-prompt", action="store_true", help="print the prompt's token ids on stderr")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    add_backend_arguments(g)
    g.set_defaults(run=generate_cmd)
    p = sub.add_parser("next-token", help="print the most likely next tokens after a prompt of token ids")
    p.add_argument("model", help="a Hugging Face checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--ids", required=True, help="prompt token ids, e.g. 1,17,42")
    p.add_argument("--top-k", type=int, default=5, help="how many candidates to print (default 5)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="compute dtype; float64 is the audit mode")
    add_backend_arguments(p)
    p.set_defaults(run=next_token)
    add_oracle_parsers(sub)  # refimpl golden / refimpl diff (docs/oracle.md)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RefimplError as exc:
        print(f"refimpl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
