"""Encode throughput of refimpl's OPT tokenizer (GPT-2 byte-level BPE in Python) against transformers'.

    python bench/bench_tokenizers.py [--repeat 5] [--copies 4]

Text: golden/tokenizers/train_text.txt plus corpus.json (English, Chinese, code, emoji), `copies` times.
Tokenizer: the golden OPT tokenizer (golden/tokenizers/opt). Each run builds a fresh tokenizer, so
"cold" includes filling the BPE cache, then encodes the same text again ("warm", cache full).
MB/s = UTF-8 megabytes (1e6 bytes) per second, median of `repeat` runs. transformers' slow
GPT2Tokenizer is the reference; its fast (Rust) tokenizer is listed for information.
The ids of all three are checked to be equal first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refimpl.tokenizers import load_tokenizer  # noqa: E402

FOLDER = ROOT / "golden" / "tokenizers" / "opt"


def bench_text(copies: int) -> str:
    train = (ROOT / "golden" / "tokenizers" / "train_text.txt").read_text(encoding="utf-8")
    corpus = json.loads((ROOT / "golden" / "tokenizers" / "corpus.json").read_text(encoding="utf-8"))
    corpus = [s for s in corpus if not any("\ud800" <= c <= "\udfff" for c in s)]  # lone surrogates cannot be encoded
    return "\n".join([train, *corpus] * copies)


def measure(make, text: str, repeat: int) -> tuple[float, float, list[int]]:
    """(cold MB/s, warm MB/s, ids): medians over `repeat` fresh tokenizers."""
    size = len(text.encode("utf-8")) / 1e6
    cold, warm = [], []
    for _ in range(repeat):
        tok = make()
        t0 = time.perf_counter()
        ids = tok.encode(text, add_special_tokens=False)
        t1 = time.perf_counter()
        tok.encode(text, add_special_tokens=False)
        t2 = time.perf_counter()
        cold.append(size / (t1 - t0))
        warm.append(size / (t2 - t1))
    return statistics.median(cold), statistics.median(warm), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--copies", type=int, default=4)
    args = parser.parse_args()
    text = bench_text(args.copies)

    rows = [("refimpl OPT (Python BPE)", lambda: load_tokenizer(FOLDER))]
    try:
        import transformers
        from transformers import GPT2Tokenizer, GPT2TokenizerFast

        transformers.logging.set_verbosity_error()
        rows += [
            ("transformers GPT2Tokenizer (slow)", lambda: GPT2Tokenizer.from_pretrained(str(FOLDER))),
            ("transformers GPT2TokenizerFast (Rust, info)", lambda: GPT2TokenizerFast.from_pretrained(str(FOLDER))),
        ]
    except ImportError:
        print("transformers is not installed: only refimpl is measured")

    results = [(name, *measure(make, text, args.repeat)) for name, make in rows]
    reference_ids = results[0][3]
    for name, _, _, ids in results[1:]:
        if ids != reference_ids:
            raise SystemExit(f"{name} gives different ids than refimpl: the benchmark compares different work")

    mb = len(text.encode("utf-8")) / 1e6
    print(f"text: {mb:.2f} MB ({len(reference_ids)} tokens), median of {args.repeat} runs, "
          f"python {sys.version.split()[0]}")
    slow = results[1][1:3] if len(results) > 1 else None
    print(f"{'tokenizer':<46} {'cold MB/s':>10} {'warm MB/s':>10} {'cold ratio':>11} {'warm ratio':>11}")
    for name, cold, warm, _ in results:
        ratios = f"{cold / slow[0]:>10.2f}x {warm / slow[1]:>10.2f}x" if slow else ""
        print(f"{name:<46} {cold:>10.2f} {warm:>10.2f} {ratios}")
    if slow:
        print("ratio = throughput / transformers' slow GPT2Tokenizer throughput (above 1: faster than it)")


if __name__ == "__main__":
    main()
