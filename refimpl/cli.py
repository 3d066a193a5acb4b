"""The `refimpl` command line (also `python -m refimpl`).

    refimpl next-token MODEL --ids 1,17,42 [--top-k 5] [--dtype float64]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

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
    model = load(args.model, dtype=dtype)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refimpl", description="NumPy reference implementation of Llama 2, "
                                     "Open-Llama and OPT, matching Hugging Face transformers 4.46.3.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("next-token", help="print the most likely next tokens after a prompt of token ids")
    p.add_argument("model", help="a Hugging Face checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--ids", required=True, help="prompt token ids, e.g. 1,17,42")
    p.add_argument("--top-k", type=int, default=5, help="how many candidates to print (default 5)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="compute dtype; float64 is the audit mode")
    p.set_defaults(run=next_token)
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
