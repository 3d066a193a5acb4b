"""Strided perplexity, as the transformers 4.46.3 guide "Perplexity of fixed-length models" computes it.

    refimpl perplexity MODEL FILE|- [--ctx N] [--stride S] [--json FILE|-]

The text is encoded whole (the tokenizer adds bos as `tokenizer(text)` does), then a window of at most `ctx` tokens
slides by `stride` (docs/source/en/perplexity.md at the v4.46.3 tag):

    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc              # the tokens this window scores for the first time
        input_ids = ids[begin_loc:end_loc]; target_ids = input_ids.copy(); target_ids[:-trg_len] = -100
        nlls.append(model(input_ids, labels=target_ids).loss)   # the mean over the window's scored tokens
        prev_end_loc = end_loc
        if end_loc == seq_len: break
    ppl = exp(mean(nlls))

That is the 4.46.3 text: the mean of the windows' mean losses ("windows", the default). The guide's loop has changed
twice: before mid-2023 it summed loss * trg_len and divided by end_loc; after 4.46 (transformers PR #34387, October
2024) it weights each window's loss by the tokens it scores, exp(sum loss_w * n_w / sum n_w), the true per-token
perplexity ("tokens", --average tokens). Both are computed; `--average` picks the one printed, and the JSON holds both.
They agree when every window scores as many tokens; the last window is usually shorter. (The later guide counts
num_valid_tokens - 1 per window; here a window's count is exact: the labels after the model's shift that are not
-100, which is one more than the guide's count in every window whose first label is already -100.)

`tokens` is the number of tokens scored. The model shifts its labels, so the first token of a window is never
scored: with stride < ctx every token after the text's first is scored exactly once (seq_len - 1); with stride = ctx
(no overlap, the default) the first token of each window is not, as in the guide.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from .cli_common import (add_backend_arguments, add_model_argument, add_ray_arguments, announce_compile,
                         check_json_output, load_options, log, positive_int, write_json)
from .errors import InputError

AVERAGES = ("windows", "tokens")


def windows(seq_len, ctx, stride):
    """[(begin_loc, end_loc, trg_len)] of the guide's loop, its early break included."""
    out, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + ctx, seq_len)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return out


def window_loss(model, ids, begin, end, trg_len):
    """(the window's loss as transformers returns it, the number of tokens it averages)."""
    input_ids = np.asarray(ids[begin:end], dtype=np.int64)
    labels = input_ids.copy()
    labels[:-trg_len] = -100  # as torch's target_ids[:, :-trg_len] = -100 (empty when trg_len >= the window)
    out = model(input_ids=input_ids[None], labels=labels[None])
    return float(out.loss), int(np.count_nonzero(labels[1:] != -100))  # the model shifts: labels[0] is never scored


def window_score(model, ids, begin, end, trg_len):
    """One window's share of the result, all a merge needs: (loss, nll, count) with loss the window's mean loss as
    the model returns it (as a Python float, float64), nll = loss * count its sum of token negative
    log-likelihoods in float64, and count the tokens it scores. A window depends on nothing but its own ids, so it
    can be computed anywhere (refimpl/distributed.py computes windows on Ray actors)."""
    loss, count = window_loss(model, ids, begin, end, trg_len)
    return loss, loss * count, count


def check_windows(n_ids, ctx, stride):
    """The guide's windows over n_ids tokens, after checking the three numbers (InputError naming the flag)."""
    if n_ids < 2:
        raise InputError(f"the text encodes to {n_ids} token(s): perplexity needs at least 2")
    if ctx < 2:
        raise InputError(f"--ctx {ctx}: a window needs at least 2 tokens")
    if not 1 <= stride <= ctx:
        raise InputError(f"--stride {stride}: must be between 1 and --ctx ({ctx}); a larger stride skips tokens")
    return windows(n_ids, ctx, stride)


def merge_windows(scores, text_tokens, ctx, stride):
    """window_score() results, in window order -> strided_perplexity's dict. The sums run over the windows in
    window order in float64, so the same scores give the same bits wherever they were computed."""
    losses = [float(loss) for loss, _, _ in scores]
    nlls = [float(nll) for _, nll, _ in scores]
    counts = [int(count) for _, _, count in scores]
    mean_window = sum(losses) / len(losses)
    per_token = sum(nlls) / sum(counts)
    return {"perplexity_windows": math.exp(mean_window), "perplexity_tokens": math.exp(per_token),
            "tokens": sum(counts), "text_tokens": text_tokens, "windows": len(scores), "ctx": ctx, "stride": stride,
            "window_losses": losses, "window_tokens": counts}


def strided_perplexity(model, ids, ctx, stride, progress=None):
    """The guide's strided perplexity of token ids under `model` (a causal LM): a dict with perplexity_windows
    (4.46.3's exp(mean of window losses)), perplexity_tokens (exp(total nll / tokens)), tokens, windows, nll lists.

    progress(done, total, running_ppl) is called after each window."""
    ids = list(ids)
    plan = check_windows(len(ids), ctx, stride)
    scores = []
    for done, (begin, end, trg_len) in enumerate(plan, 1):
        scores.append(window_score(model, ids, begin, end, trg_len))
        if progress is not None:
            progress(done, len(plan), math.exp(sum(s[0] for s in scores) / len(scores)))
    return merge_windows(scores, len(ids), ctx, stride)


class ProgressBar:
    """A one-line bar on stderr, redrawn in place: windows done and the running perplexity."""

    def __init__(self, stream=None, width=30):
        self.stream, self.width, self.start = stream or sys.stderr, width, time.perf_counter()

    def __call__(self, done, total, value):
        filled = self.width * done // total
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\rperplexity [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} windows, "
                          f"ppl {value:.4f}, {elapsed:.1f} s")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def read_text(path):
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; give a text file (or - for standard input)") from None
    except FileNotFoundError:
        raise InputError(f"no such file or folder: {path}") from None
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None


def model_facts(model):
    """What run() checks a model against, as plain values (a Ray actor sends them back to the driver)."""
    return {"class": type(model).__name__, "head": model.head, "limit": model.max_sequence_length(),
            "max_position_embeddings": model.config.max_position_embeddings}


def settle_ctx(facts, ctx, stride, model_path):
    """(ctx, stride) with their defaults, checked against the model (InputError naming the flag)."""
    if facts["head"] != "causal_lm":
        raise InputError(f"{model_path} holds a {facts['class']}, which has no language-model head")
    limit = facts["limit"]  # OPT's learned position table; None for RoPE
    ctx = ctx if ctx is not None else facts["max_position_embeddings"]
    if limit is not None and ctx > limit:
        raise InputError(f"--ctx {ctx}: this model has {limit} positions (max_position_embeddings)")
    return ctx, stride if stride is not None else ctx


def run(args) -> int:
    from . import load
    from .cli import load_tokenizer_for

    check_json_output(args.json, args.force)
    for flag, value in (("--ray-actors", args.ray_actors), ("--ray-threads", args.ray_threads)):
        if value is not None and args.ray is None:
            raise InputError(f"{flag} {value} applies with --ray")
    text = read_text(args.file)
    dtype = {"float32": np.float32, "float64": np.float64}[args.dtype]
    options = load_options(args)
    show = not args.quiet and sys.stderr.isatty()
    if args.ray is not None:  # the windows on Ray actors (refimpl/distributed.py); Ray is imported there only
        from .distributed import check_ray_address, perplexity as distributed_perplexity

        tokenizer = load_tokenizer_for(args.model)
        if tokenizer is None:
            raise InputError(f"{args.model} has no tokenizer files (tokenizer.model, tokenizer.json or vocab.json)")
        ids = tokenizer.encode(text)
        log.info("perplexity of %d tokens on Ray", len(ids))
        threads = options.pop("threads", None) or args.ray_threads
        result = distributed_perplexity(args.model, ids, args.ctx, args.stride,
                                        ray_address=check_ray_address(args.ray), actors=args.ray_actors,
                                        threads=threads, dtype=args.dtype, progress=ProgressBar() if show else None,
                                        **options)
        ctx, stride = result["ctx"], result["stride"]
    else:
        announce_compile(args)
        model = load(args.model, dtype=dtype, **options)
        ctx, stride = settle_ctx(model_facts(model), args.ctx, args.stride, args.model)
        tokenizer = load_tokenizer_for(args.model)
        if tokenizer is None:
            raise InputError(f"{args.model} has no tokenizer files (tokenizer.model, tokenizer.json or vocab.json)")
        ids = tokenizer.encode(text)
        log.info("perplexity of %d tokens, ctx %d, stride %d", len(ids), ctx, stride)
        result = strided_perplexity(model, ids, ctx, stride, progress=ProgressBar() if show else None)
    value = result[f"perplexity_{args.average}"]
    out = sys.stderr if args.json == "-" else sys.stdout  # --json -: standard output is the JSON alone
    print(f"perplexity {value:.6f} over {result['tokens']} tokens ({result['text_tokens']} in the text; ctx {ctx}, "
          f"stride {stride}, {result['windows']} windows; "
          f"{'mean window loss, transformers 4.46.3 guide' if args.average == 'windows' else 'per token'})", file=out)
    if args.json:
        write_json(args.json, {"perplexity": value, "tokens": result["tokens"], "average": args.average,
                               "model": args.model, "file": args.file, "backend": args.backend,
                               "dtype": args.dtype, **result})
    return 0


def add_parser(subparsers):
    """Register `refimpl perplexity MODEL FILE|- [-c CTX] [--stride S] [--json FILE|-]`."""
    p = subparsers.add_parser(
        "perplexity", help="strided perplexity of a text, as the transformers 4.46.3 perplexity guide computes it",
        description="Strided perplexity of a text file, as the transformers 4.46.3 guide 'Perplexity of "
                    "fixed-length models' computes it: windows of --ctx tokens moved by --stride, context tokens "
                    "labelled -100, perplexity = exp(mean of the window losses). --average tokens gives the "
                    "per-token value (exp of the total negative log-likelihood over the scored tokens), which the "
                    "guide uses after 4.46 (transformers PR #34387).")
    add_model_argument(p)
    p.add_argument("file", help="a UTF-8 text file, or - for standard input")
    p.add_argument("-c", "--ctx", type=positive_int, default=None,
                   help="window length in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--stride", type=positive_int, default=None, help="tokens the window moves by (default: --ctx)")
    p.add_argument("--average", choices=AVERAGES, default="windows",
                   help="windows: exp(mean of window losses), the 4.46.3 guide (default); tokens: per token")
    p.add_argument("--json", metavar="FILE", help="also write the result as one JSON object (- for stdout)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="compute dtype; float64 is the audit mode")
    add_backend_arguments(p)
    add_ray_arguments(p, "windows")
    p.set_defaults(run=run)
    return p
