"""`refimpl bench MODEL`: llama-bench's table for refimpl and accel.

    refimpl bench MODEL [-p 128] [-n 64] [-r 5] [-o md|json] [--backend numpy|numba] [--weights int8] [-t 2]

As llama-bench runs them: `pp128` is one forward of a 128-token prompt into an empty cache, `tg64` is 64
single-token forwards into a growing cache, starting empty; the tokens are random (the first is bos). Each test runs
-r times after one warm-up run that is timed on its own (the warm-up is where Numba compiles, ~20 s the first time
on a machine, or loads its cached kernels); t/s is the mean ± the sample standard deviation over the runs of
tokens / seconds, as llama-bench reports it. Only the forwards are timed: no sampling, no tokenizer.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np

from .cli_common import (add_backend_arguments, add_model_argument, announce_compile, load_options, log,
                         nonnegative_int, positive_int)
from .errors import InputError

FORMATS = ("md", "json")


def run_tests(model, n_prompt, n_gen, repetitions, ctx=None, seed=0):
    """{"warmup_s": seconds, "tests": [{"test": "pp128", "n_prompt", "n_gen", "samples_ns", "samples_ts",
    "avg_ts", "stddev_ts"}, ...]} for a loaded causal LM."""
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    bos = getattr(model.config, "bos_token_id", None)
    capacity = ctx or max(n_prompt, n_gen, 1)

    def tokens(n):
        ids = rng.integers(0, vocab, size=n).astype(np.int64)
        if n and isinstance(bos, int) and 0 <= bos < vocab:
            ids[0] = bos
        return ids

    def prompt(n):  # one forward of n tokens, last position's logits only where the class allows (llama-bench's)
        ids = tokens(n)[None]
        start = time.perf_counter()
        model(input_ids=ids, past_key_values=new_cache(model, capacity), use_cache=True,
              **model.generation_forward_kwargs())
        return time.perf_counter() - start

    def generation(n):  # n single-token forwards, each into the cache the previous one returned
        ids = tokens(n)
        past = new_cache(model, capacity)
        start = time.perf_counter()
        for i in range(n):
            mask = np.ones((1, i + 1), dtype=np.int64)
            out = model(input_ids=ids[None, i:i + 1], attention_mask=mask, past_key_values=past, use_cache=True,
                        **model.generation_forward_kwargs())
            past = out.past_key_values
        return time.perf_counter() - start

    start = time.perf_counter()  # the warm-up: every code path once (Numba compiles or loads its kernels here)
    if n_prompt:
        prompt(n_prompt)
    if n_gen:
        generation(min(n_gen, 2))
    warmup = time.perf_counter() - start
    tests = []
    for name, n, timed in (("pp", n_prompt, prompt), ("tg", n_gen, generation)):
        if not n:
            continue
        seconds = [timed(n) for _ in range(repetitions)]
        rates = [n / s for s in seconds]
        tests.append({"test": f"{name}{n}", "n_prompt": n if name == "pp" else 0, "n_gen": n if name == "tg" else 0,
                      "samples_ns": [round(s * 1e9) for s in seconds], "samples_ts": rates,
                      "avg_ts": statistics.fmean(rates),
                      "stddev_ts": statistics.stdev(rates) if len(rates) > 1 else 0.0})
    return {"warmup_s": warmup, "tests": tests}


def new_cache(model, capacity):
    """accel's preallocated KV cache (room for `capacity` positions), or None: refimpl grows its cache itself."""
    if hasattr(model, "new_cache"):
        return model.new_cache(1, capacity)
    return None


def parameter_count(params):
    """Parameters in a model's tree (arrays and stored matrices), each array counted once (a tied embedding too)."""
    seen, total, stack = set(), 0, [params]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif hasattr(node, "shape") and id(node) not in seen:
            seen.add(id(node))
            total += int(np.prod(node.shape))
    return total


def human_count(n):
    """7_000_000_000 -> '7.0B', 125_000_000 -> '125.0M', 94_528 -> '94.5K' (llama-bench's model column style)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def weights_label(model, args):
    """The weights column: accel's storage format, or for refimpl the dtype the checkpoint stores its matrices in."""
    if args.backend != "numpy":
        return getattr(model, "weights", None) or args.weights or "fp32"
    for node in _leaves(model.params):
        stored = getattr(node, "stored_dtype", None)
        if stored is not None:
            return str(stored).lower()
        if getattr(node, "ndim", 0) == 2:
            return {"float32": "f32", "float16": "f16", "float64": "f64"}.get(str(node.dtype), str(node.dtype))
    return "-"


def _leaves(params):
    stack = [params]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        else:
            yield node


def threads_label(args):
    """The threads column: -t, accel's default (the cores this process may use), or the BLAS threads NumPy uses."""
    if args.threads is not None:
        return args.threads
    if args.backend == "numba":
        from . import accel_package

        return accel_package().default_threads()
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return os.cpu_count() or 1
    counts = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return max(counts) if counts else 1


def markdown(rows):
    """llama-bench's markdown table: text columns left, numbers right, t/s as 'mean ± std' with 2 decimals."""
    header = ["model", "backend", "weights", "threads", "test", "t/s"]
    right = {"threads", "test", "t/s"}
    cells = [[str(row["model"]), row["backend"], row["weights"], str(row["threads"]), row["test"],
              f"{row['avg_ts']:.2f} ± {row['stddev_ts']:.2f}"] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if h in right else v.ljust(w)
                                 for v, w, h in zip(values, widths, header)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if h in right else ("-" * (w + 2))
                          for w, h in zip(widths, header)) + "|"
    return "\n".join([line(header), rule] + [line(c) for c in cells])


def run(args) -> int:
    from . import load

    limit_checks(args)
    options = load_options(args)
    announce_compile(args)
    start = time.perf_counter()
    model = load(args.model, **options)
    log.info("loaded %s (%s) in %.2f s", args.model, type(model).__name__, time.perf_counter() - start)
    if model.head != "causal_lm":
        raise InputError(f"{args.model} holds a {type(model).__name__}; bench times causal language models")
    limit = model.max_sequence_length()
    ctx = args.ctx or max(args.n_prompt, args.n_gen)
    if limit is not None and ctx > limit:
        raise InputError(f"{'-c/--ctx' if args.ctx else '-p/-n'} {ctx}: this model has {limit} positions "
                         "(max_position_embeddings)")
    result = run_tests(model, args.n_prompt, args.n_gen, args.repetitions, ctx)
    if not args.quiet:
        print(f"warm-up: {result['warmup_s']:.2f} s (first run: compiling or loading kernels, allocating; not in t/s)",
              file=sys.stderr)
    common = {"model": f"{model.model_type} {human_count(parameter_count(model.params))}", "backend": args.backend,
              "weights": weights_label(model, args), "threads": threads_label(args)}
    rows = [{**common, **test} for test in result["tests"]]
    if args.output == "json":
        print(json.dumps([{**row, "model_path": args.model, "warmup_s": result["warmup_s"],
                           "repetitions": args.repetitions} for row in rows], indent=2))
    else:
        print(markdown(rows))
    return 0


def limit_checks(args):
    if not args.n_prompt and not args.n_gen:
        raise InputError("-p 0 and -n 0: nothing to time")
    if args.ctx is not None and max(args.n_prompt, args.n_gen) > args.ctx:
        raise InputError(f"-p {args.n_prompt} / -n {args.n_gen}: more tokens than -c/--ctx {args.ctx}")


def add_parser(subparsers):
    """Register `refimpl bench MODEL [-p N] [-n N] [-r N] [-o md|json] [backend flags]`."""
    p = subparsers.add_parser(
        "bench", help="time prompt processing and token generation, as llama-bench prints them",
        description="llama-bench's table: ppN is one forward of an N-token prompt into an empty cache, tgN is N "
                    "single-token forwards from an empty cache; t/s = mean ± sample std over -r runs, after one "
                    "warm-up run (Numba's compile) that is reported on its own line on stderr.")
    add_model_argument(p)
    p.add_argument("-p", "--n-prompt", type=nonnegative_int, default=128, help="prompt tokens (default 128; 0 skips)")
    p.add_argument("-n", "--n-gen", type=nonnegative_int, default=64, help="generated tokens (default 64; 0 skips)")
    p.add_argument("-r", "--repetitions", type=positive_int, default=5, help="timed runs of each test (default 5)")
    p.add_argument("-o", "--output", choices=FORMATS, default="md", help="md: a markdown table (default); json")
    p.add_argument("-c", "--ctx", type=positive_int, default=None,
                   help="KV cache capacity in positions (default: the larger of -p and -n)")
    add_backend_arguments(p)
    p.set_defaults(run=run)
    return p
