"""Quality of each weight format on real text: the trained Llama on its held-out docstrings.

    python bench/quality.py [--model golden/models/llama_trained] [--text golden/trained/heldout.txt] [--limit N]

Every held-out docstring is one sequence, `<s> text </s>`, cut to the model's context (the protocol of
golden/train.py's held-out perplexity, which transformers computed). For each way of loading the model it prints
per-token perplexity, top-1 agreement with the reference (refimpl NumPy, float32 compute, weights as stored) over
every position, and the largest |logit difference|, as a markdown table. The checkpoint stores float16, so
"fp32" means those fp16 values widened exactly: the fp32/fp16 rows differ from the reference only in summation
order; bf16 and int8 round the weights again.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import refimpl  # noqa: E402

VARIANTS = [  # (label, refimpl.load keyword arguments)
    ("refimpl numpy, weights as stored, fp32 compute (reference)", {}),
    ("refimpl numpy, weights_dtype=float32", {"weights_dtype": "float32"}),
    ("refimpl numpy, weights_dtype=float16", {"weights_dtype": "float16"}),
    ("refimpl numpy, float64 compute", {"dtype": np.float64}),
    ("accel numba fp32", {"backend": "numba", "weights": "fp32"}),
    ("accel numba fp16", {"backend": "numba", "weights": "fp16"}),
    ("accel numba bf16", {"backend": "numba", "weights": "bf16"}),
    ("accel numba int8 (Q8_0)", {"backend": "numba", "weights": "int8"}),
]


GGUF_TYPES = ["Q8_0", "Q5_0", "Q4_0"]  # the K-quants (Q4_K, Q6_K) need rows of 256 weights: this model's are 192


def write_ggufs(folder, root, qtypes):
    """The checkpoint as llama.cpp's converter writes it, once per type -> {qtype: path} (bench_decode.write_gguf)."""
    import json

    from bench_decode import write_gguf
    from refimpl.weights import read_safetensors

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    tensors = {name: np.asarray(a, np.float32) for name, a in read_safetensors(os.path.join(folder, "model.safetensors")).items()}
    paths = {}
    for qtype in qtypes:
        paths[qtype] = os.path.join(root, f"trained-{qtype}.gguf")
        write_gguf(paths[qtype], cfg, tensors, qtype)
    return paths


def sequences(folder, text, limit=None):
    tok = refimpl.load_tokenizer(folder)
    n_ctx = refimpl.read_config(folder).max_position_embeddings
    out = []
    with open(text, encoding="utf-8") as f:
        for line in f.read().splitlines()[:limit]:
            ids = tok.encode(line) + [tok.eos_token_id]   # encode adds <s> (add_bos_token)
            out.append(np.array([ids[:n_ctx]], np.int64))
    return out


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def evaluate(model, seqs):
    """[(logits float64 (S, V)) per sequence], total nll, token count."""
    logits, nll, count = [], 0.0, 0
    for ids in seqs:
        lg = np.asarray(model(input_ids=ids).logits[0], np.float64)
        lp = log_softmax(lg[:-1])
        nll -= float(np.take_along_axis(lp, ids[0, 1:, None], -1).sum())
        count += ids.shape[1] - 1
        logits.append(lg)
    return logits, nll, count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "golden", "models", "llama_trained"))
    ap.add_argument("--text", default=os.path.join(ROOT, "golden", "trained", "heldout.txt"))
    ap.add_argument("--limit", type=int, default=None, help="first N lines only")
    ap.add_argument("--gguf", default=",".join(GGUF_TYPES), help="GGUF types to add (comma list; '' for none)")
    args = ap.parse_args(argv)
    seqs = sequences(args.model, args.text, args.limit)
    reference = None
    rows = []
    import tempfile

    tmp = tempfile.TemporaryDirectory()
    ggufs = write_ggufs(args.model, tmp.name, [t for t in args.gguf.split(",") if t]) if args.gguf else {}
    variants = [(label, args.model, kwargs) for label, kwargs in VARIANTS]
    for qtype, path in ggufs.items():
        variants += [(f"refimpl numpy, GGUF {qtype}", path, {}),
                     (f"accel numba, GGUF {qtype} (repacked fp32)", path, {"backend": "numba", "weights": "fp32"}),
                     (f"accel numba, GGUF {qtype} (its blocks: weights=gguf)", path,
                      {"backend": "numba", "weights": "gguf"})]
    for label, path, kwargs in variants:
        t0 = time.perf_counter()
        try:
            model = refimpl.load(path, **kwargs)
        except Exception as e:  # e.g. numba not installed
            rows.append(f"| {label} | skipped: {type(e).__name__}: {e} | | | |")
            continue
        logits, nll, count = evaluate(model, seqs)
        secs = time.perf_counter() - t0
        if reference is None:
            reference = logits
        agree = sum(int(np.sum(a.argmax(-1) == b.argmax(-1))) for a, b in zip(logits, reference))
        positions = sum(len(a) for a in logits)
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(logits, reference))
        rows.append(f"| {label} | {np.exp(nll / count):.4f} | {agree / positions:.4f} | {worst:.2e} | {secs:.0f} s |")
        print(f"{label}: done in {secs:.0f} s", file=sys.stderr, flush=True)
    print(f"{len(seqs)} held-out docstrings, {count} predicted tokens, {positions} positions "
          f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"`python bench/quality.py{' --limit %d' % args.limit if args.limit else ''}`)\n")
    print("| model, weights | perplexity | top-1 agreement | max abs dlogit | time |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
