"""`refimpl golden` and `refimpl diff`: the oracle for porters (docs/oracle.md).

    refimpl golden MODEL (--ids 1,17,42 | --prompt TEXT) -o ref.safetensors [--dtype float64] [--summary]
                   [--layers 0-3,31] [--ops 'attn.*,mlp.down']
    refimpl golden MODEL --ids 1,17,42 --compare-dtypes          # the error budget of fp32 / fp16 / bf16 weights
    refimpl golden MODEL --prompts prompts.jsonl -o packs/ [--ray [ADDRESS]]   # a batch (docs/distributed.md)
    refimpl diff REF.safetensors PORT.safetensors [--atol A] [--rtol R] [--skip 'layers.*.attn.q*']
    refimpl diff REF.safetensors PORT_LOGITS.bin                 # a port's raw float32 logits (llama.cpp layout)

`diff` exits 0 when every op is within tolerance, 1 when one is not, 2 when the packs cannot be compared.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .cli_common import add_ray_arguments
from .diff import PRECISION_ORDER, DiffError, diff_packs, dumps, format_report, precision_rows, raw_logits_pack
from .errors import InputError, RefimplError
from .pack import make_pack, read_pack, run_trace, write_pack
from .safe_write import check_output, write_atomically
from .stored import StoredMatrix
from .trace import selection

RAW_LOGITS_SUFFIXES = (".bin", ".f32")


def parse_ids(text):
    from .cli import parse_ids as parse

    return parse(text)


def prompt_ids(args):
    """--ids, or --prompt encoded by the checkpoint's tokenizer (or --tokenizer's)."""
    if args.ids is not None:
        return parse_ids(args.ids), None
    from . import load_tokenizer

    folder = args.tokenizer or args.model
    try:
        tokenizer = load_tokenizer(folder)
        ids = list(tokenizer.encode(args.prompt))
    except (ValueError, TypeError, OSError, ImportError) as exc:
        raise InputError(f"--prompt needs a tokenizer, and {folder} has none that loads ({exc}); give token ids "
                         "with --ids 1,17,42, or a tokenizer folder with --tokenizer DIR") from None
    if not ids:
        raise InputError(f"--prompt {args.prompt!r} encodes to no tokens")
    return ids, args.prompt


def run_golden(args):
    from . import load

    if args.prompts is not None:
        return run_golden_batch(args)
    for flag, value in (("--ray", args.ray), ("--ray-actors", args.ray_actors), ("--ray-threads", args.ray_threads),
                        ("--resume", args.resume or None)):
        if value is not None:
            raise InputError(f"{flag} applies to a batch of prompts (--prompts FILE -o FOLDER)")
    ids, text = prompt_ids(args)
    keep = selection(parse_layers(args.layers), parse_ops(args.ops))
    if args.compare_dtypes:
        print(precision_report(args.model, ids, keep))
        if args.output is None:
            return 0
    if args.output is None:
        raise InputError("refimpl golden needs -o PACK.safetensors (or --compare-dtypes)")
    check_output(args.output, args.force)  # before the forward pass, which may take minutes on a 7B
    dtype = {"float32": np.float32, "float64": np.float64}[args.dtype]
    model = load(args.model, dtype=dtype)
    tensors, metadata = make_pack(model, [ids], summary=args.summary, model_path=args.model, text=text, keep=keep)
    write_pack(args.output, tensors, metadata)
    stored = len(tensors) - 2
    print(f"wrote {args.output}: {type(model).__name__} ({args.dtype}), {len(ids)} tokens, {stored} trace tensors"
          f"{' as summaries' if args.summary else ''}")
    return 0


def run_golden_batch(args):
    """--prompts FILE -o FOLDER: one pack per prompt and FOLDER/index.json, here or on Ray actors (--ray).
    Exit status 0 when every pack was written, 1 when a prompt failed (named on stderr and in the index)."""
    from . import distributed

    if args.compare_dtypes:
        raise InputError("--compare-dtypes takes one prompt (--ids or --prompt), not --prompts")
    if args.output is None:
        raise InputError("refimpl golden --prompts needs -o FOLDER (the packs are written there)")
    for flag, value in (("--ray-actors", args.ray_actors), ("--ray-threads", args.ray_threads)):
        if value is not None and args.ray is None:
            raise InputError(f"{flag} {value} applies with --ray")
    options = dict(dtype=args.dtype, summary=args.summary, layers=parse_layers(args.layers), ops=parse_ops(args.ops),
                   tokenizer=args.tokenizer, force=args.force, progress=not getattr(args, "quiet", False),
                   resume=args.resume)
    if args.ray is not None:
        result = distributed.map_prompts(args.model, args.prompts, args.output,
                                         ray_address=distributed.check_ray_address(args.ray),
                                         actors=args.ray_actors, threads=args.ray_threads, **options)
    else:
        result = distributed.write_packs(args.model, args.prompts, args.output, **options)
    for name, errors in result.failed.items():
        print(f"refimpl: error: prompt {name!r} failed: {errors[-1]}", file=sys.stderr)
    print(f"wrote {len(result.packs)} packs and {result.index}"
          + (f"; {len(result.failed)} prompt(s) failed: {', '.join(result.failed)}" if result.failed else ""))
    return 0 if result.ok else 1


def parse_layers(text):
    """'0-3,31' -> {0, 1, 2, 3, 31}; None -> None (every layer)."""
    if text is None:
        return None
    layers = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isascii() or not first.isdigit() or (last and (not last.isascii() or not last.isdigit())):
            raise InputError(f"--layers {text!r}: expected layer indices and ranges such as 0,1,31 or 0-3,31")
        start, stop = int(first), int(last or first)
        if stop < start or stop - start > 100_000:
            raise InputError(f"--layers {text!r}: the range {part.strip()!r} is empty or too long")
        layers.update(range(start, stop + 1))
    return layers


def parse_ops(text):
    """'attn.q*,mlp.down' -> ['attn.q*', 'mlp.down']; None -> None (every op)."""
    if text is None:
        return None
    ops = [op.strip() for op in text.split(",") if op.strip()]
    if not ops:
        raise InputError(f"--ops {text!r}: expected globs such as 'attn.q*,mlp.down'")
    return ops


def run_diff(args):
    if args.json:
        check_output(args.json, args.force, "--json")
    try:
        ref = read_pack(args.ref)
        port_path = args.port_logits or args.port
        if port_path is None:
            raise DiffError("give the port's pack (PORT) or its raw logits (--port-logits FILE)")
        if args.port_logits or str(port_path).endswith(RAW_LOGITS_SUFFIXES):
            port = raw_logits_pack(port_path, ref)
        else:
            port = read_pack(port_path)
        report = diff_packs(ref, port, args.atol, args.rtol, args.skip, args.top_k, args.tolerance_dtype)
    except (RefimplError, OSError) as exc:  # DiffError, a malformed pack (InputError, CheckpointError)
        print(f"refimpl diff: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report, ref, port, all_ops=not args.failures_only))
    if args.json:
        text = dumps(report).encode("utf-8")
        write_atomically(args.json, lambda f: f.write(text))
    return 0 if report.ok else 1


def round_to_bfloat16(x):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def round_params(params, rounding):
    """The parameter tree with every float parameter passed through `rounding`: vectors now, matrices lazily, one
    tile at a time inside each product (a StoredMatrix), so no rounded copy of the model is ever held."""
    if isinstance(params, dict):
        return {k: round_params(v, rounding) for k, v in params.items()}
    if isinstance(params, list):
        return [round_params(v, rounding) for v in params]
    if getattr(params, "ndim", 0) == 2:
        matrix = params
        return StoredMatrix(lambda a, b: rounding(np.asarray(matrix[a:b], dtype=np.float32)), matrix.shape,
                            "rounded", np.float32, getattr(matrix, "name", ""))
    return rounding(params) if isinstance(params, np.ndarray) and params.dtype.kind == "f" else params


def round_to_float16(x):
    """float32 -> the nearest float16, kept in float32."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def precision_report(model_path, ids, keep=None):
    """Op-by-op distance of fp32 compute, and of fp16 / bf16 weights (fp32 compute), from float64. One model is
    loaded at a time (memory-mapped), so a 7B checkpoint needs no more memory than one forward pass."""
    from . import load

    reference = run_trace(load(model_path, dtype=np.float64), [ids], keep=keep)
    fp32 = load(model_path, dtype=np.float32)
    traces = {"fp32": run_trace(fp32, [ids], keep=keep)}
    for label, rounding in (("fp16 weights", round_to_float16), ("bf16 weights", round_to_bfloat16)):
        rounded = type(fp32)(fp32.config, round_params(fp32.params, rounding), np.float32)
        traces[label] = run_trace(rounded, [ids], keep=keep)
    rows = precision_rows(reference, traces)
    width = max(len(name) for name, _ in rows)
    out = [f"distance from float64, {type(fp32).__name__} from {model_path}, {len(ids)} tokens "
           "(max rel = max|x - x64| / max|x64|; NMSE = sum (x - x64)^2 / sum x64^2)",
           "fp32: float32 compute and weights; fp16 / bf16 weights: weights rounded, float32 compute "
           "(the weights' share of a half-precision port's error)",
           "",
           f"{'op':<{width}}  " + "  ".join(f"{label + ' max rel':>18} {'NMSE':>9}" for label in traces)]
    for name, cells in rows:
        out.append(f"{name:<{width}}  " + "  ".join(
            f"{cells[label][0]:>18.2e} {cells[label][1]:>9.2e}" if label in cells else f"{'-':>18} {'-':>9}"
            for label in traces))
    for label in traces:
        worst = max(((cells[label][0], name) for name, cells in rows if label in cells), default=(0.0, "-"))
        out.append(f"{label}: largest max rel {worst[0]:.2e} at {worst[1]}")
    return "\n".join(out)


def add_parsers(subparsers):
    """Register `golden` and `diff` on an argparse subparsers object; each sets args.run -> exit status."""
    p = subparsers.add_parser("golden", help="write a golden pack: inputs, logits and every traced intermediate")
    p.add_argument("model", help="a Hugging Face checkpoint folder (config.json + weights)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ids", help="prompt token ids, e.g. 1,17,42")
    source.add_argument("--prompt", help="prompt text, encoded with the checkpoint's tokenizer")
    source.add_argument("--prompts", metavar="FILE", help="a batch: JSON lines {\"name\": ..., \"ids\": [...]} or "
                        "{\"name\": ..., \"text\": ...}; -o FOLDER gets NAME.safetensors per prompt and index.json "
                        "(docs/distributed.md)")
    p.add_argument("--tokenizer", help="folder holding the tokenizer files (default: MODEL)")
    p.add_argument("-o", "--output", help="the pack to write (.safetensors), or with --prompts the folder for the "
                   "packs; never over an existing file")
    p.add_argument("--force", action="store_true", help="replace an existing -o file (never a checkpoint's own)")
    p.add_argument("--resume", action="store_true",
                   help="with --prompts: keep the packs an earlier run finished (same ids, checkpoint and mode; the "
                        "same --layers/--ops/--dtype are assumed) and write only the others")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="compute dtype; float64 is the audit mode")
    p.add_argument("--summary", action="store_true",
                   help="store per-tensor summaries (sum, mean, absmax, NaN/inf counts, first/last values) "
                        "instead of full intermediates; inputs and logits stay full")
    p.add_argument("--layers", metavar="LIST", help="trace only these layers, e.g. 0,1,31 or 0-3,31 (default: all)")
    p.add_argument("--ops", metavar="GLOBS", help="trace only these ops within a layer, e.g. 'attn.q*,mlp.down' "
                   "(default: all; names as in docs/oracle.md)")
    p.add_argument("--compare-dtypes", action="store_true",
                   help="print how far fp32 (and fp16 / bf16 weights) land from float64, op by op")
    add_ray_arguments(p, "prompts of --prompts")
    p.set_defaults(run=run_golden)

    d = subparsers.add_parser("diff", help="compare a port's pack (or raw logits) with a reference pack, op by op")
    d.add_argument("ref", help="the reference pack (refimpl golden -o ...)")
    d.add_argument("port", nargs="?", help="the port's pack (.safetensors), or raw float32 logits (.bin / .f32)")
    d.add_argument("--port-logits", metavar="FILE", help="the port's raw float32 logits, [n_tokens, vocab] or [vocab]")
    d.add_argument("--atol", type=float, help="absolute tolerance (default: by dtype, see refimpl/diff.py)")
    d.add_argument("--rtol", type=float, help="tolerance relative to the op's max |ref| (default: by dtype)")
    d.add_argument("--tolerance-dtype", choices=PRECISION_ORDER,
                   help="use this dtype's default tolerances (default: the less precise of the two packs)")
    d.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="leave out trace names matching this glob, e.g. 'layers.*.attn.[qk]*' (repeatable)")
    d.add_argument("--top-k", type=int, default=5, help="k of the final-logit top-k overlap (default 5)")
    d.add_argument("--failures-only", action="store_true", help="list only the ops over tolerance")
    d.add_argument("--json", metavar="FILE", help="also write the report as JSON (never over an existing file)")
    d.add_argument("--force", action="store_true", help="replace an existing --json file")
    d.set_defaults(run=run_diff)


def main(argv=None):
    """The two subcommands on their own (python -m refimpl.oracle_cli golden|diff ...)."""
    parser = argparse.ArgumentParser(prog="refimpl")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RefimplError as exc:
        print(f"refimpl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
