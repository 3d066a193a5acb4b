"""What every `refimpl` subcommand shares: the model argument, backend and logging flags, one-line errors, output files.

The habits (docs/cli.md):
  - the model is the first positional argument or -m/--model;
  - a model that is not there is named: a hub id gets "refimpl does not download models", a path "no such file";
  - errors are one line, `refimpl: error: ...`, exit status 2, naming the command-line flag (never a Python keyword);
  - -q/--quiet shows errors only; -v/--verbose adds info lines (-vv debug); library warnings print as one line;
  - --backend / --weights / -t/--threads choose the engine (refimpl itself, or accel's kernels).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys

from .errors import InputError

log = logging.getLogger("refimpl")

BACKENDS = ("numpy", "numba", "cuda")  # as refimpl.load accepts
WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "gguf")  # as accel.formats.WEIGHT_FORMATS (tests/test_cli_tools.py)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")  # "meta-llama/Llama-2-7b-hf"
COMPILE_NOTICE = "refimpl: compiling kernels (first run on this machine, ~20 s)"


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line: `refimpl: error: MESSAGE (see PROG --help)`, exit status 2."""

    def error(self, message):
        self.exit(2, f"refimpl: error: {message} (see {self.prog} --help)\n")


# --- integers -------------------------------------------------------------------------------------------------------

def positive_int(text):
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def nonnegative_int(text):
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


# --- the model ------------------------------------------------------------------------------------------------------

def add_model_argument(parser, help="a Hugging Face checkpoint folder (config.json, weights, tokenizer)", dest="model"):
    """MODEL as the first positional argument, or as -m/--model MODEL (resolve_model() picks the one given)."""
    parser.add_argument(dest, nargs="?", default=None, metavar=dest.upper(), help=help)
    parser.add_argument("-m", "--model", dest=f"{dest}_flag", metavar="MODEL", default=None,
                        help=f"the same as the positional {dest.upper()}")


def accept_model_flag(parser, dest):
    """Give an existing subparser's positional `dest` (golden's MODEL, inspect's PATH) the -m/--model form too."""
    for action in parser._actions:
        if action.dest == dest and not action.option_strings:
            action.nargs, action.required, action.default = "?", False, None
            break
    else:
        raise ValueError(f"{parser.prog} has no positional {dest!r}")
    parser.add_argument("-m", "--model", dest=f"{dest}_flag", metavar="MODEL", default=None,
                        help=f"the same as the positional {dest.upper()}")


def resolve_model(args, dest):
    """args.<dest> from the positional or -m/--model (exactly one), checked to exist."""
    positional, flag = getattr(args, dest), getattr(args, f"{dest}_flag")
    if positional is not None and flag is not None:
        raise InputError(f"the model is given twice ({positional} and -m {flag}): give it once")
    path = positional if positional is not None else flag
    if path is None:
        raise InputError("give a model: refimpl COMMAND MODEL ..., or -m MODEL")
    check_model_path(path)
    setattr(args, dest, path)
    return path


def check_model_path(path):
    if os.path.exists(path):
        return
    text = os.fspath(path)
    if HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        raise InputError(f"{text}: refimpl does not download models; put the files in a folder (config.json, "
                         "weights, tokenizer) and give its path")
    raise InputError(f"no such file or folder: {text}")


# --- backend flags: which engine runs the model (refimpl itself, or accel's kernels) ----------------------------

def add_backend_arguments(parser):
    """Add --backend, --weights and -t/--threads to an argparse parser (or subparser)."""
    group = parser.add_argument_group("backend")
    group.add_argument("--backend", choices=BACKENDS, default="numpy",
                       help="numpy: refimpl itself (default); numba: accel's CPU kernels; cuda: accel's GPU kernels "
                            "(CuPy, NVIDIA)")
    group.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                       help="weight storage for --backend numba or cuda: fp32 (default), fp16, bf16, int8 (Q8_0); "
                            "gguf (numba, a .gguf file): its own blocks (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K) in place")
    group.add_argument("-t", "--threads", type=positive_int, default=None,
                       help="threads for --backend numba (default: the cores this process may use: affinity, cgroup quota)")
    return parser


def add_ray_arguments(parser, what):
    """--ray [ADDRESS] and --ray-actors N (docs/distributed.md); Ray itself is imported only when --ray is given."""
    group = parser.add_argument_group("Ray (pip install 'refimpl[ray]')")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help=f"run the {what} on Ray actors: without ADDRESS a local Ray is started, with one (e.g. "
                            "auto, HOST:6379) that cluster is joined; put --ray after MODEL and FILE, or write "
                            "--ray=ADDRESS")
    group.add_argument("--ray-actors", type=positive_int, default=None, metavar="N",
                       help="how many actors, each loading the model once (default: the cluster's CPUs // threads "
                            "per actor)")
    group.add_argument("--ray-threads", type=positive_int, default=None, metavar="T",
                       help="threads per actor: its BLAS threads and the CPUs it reserves (default: -t if given, else "
                            "the BLAS threads of this process, so the numbers are those a run without --ray here "
                            "gives)")
    return parser


def load_options(args):
    """Keyword arguments for refimpl.load from parsed args: {'backend': ...} plus weights/threads when given.

    Flags that do not apply to the backend are refused here, by their flag names (InputError)."""
    options = {"backend": args.backend}
    weights, threads = getattr(args, "weights", None), getattr(args, "threads", None)
    if args.backend == "numpy":
        for flag, value in (("--weights", weights), ("--threads", threads)):
            if value is not None:
                raise InputError(f"{flag} {value} applies to --backend numba or cuda, not to --backend numpy "
                                 "(refimpl itself computes in --dtype from the weights as stored)")
    elif getattr(args, "dtype", "float32") != "float32":
        raise InputError(f"--dtype {args.dtype} needs --backend numpy: accel computes in float32")
    if weights is not None:
        options["weights"] = weights
    if threads is not None:
        options["threads"] = threads
    return options


def announce_compile(args):
    """Before loading for --backend numba: True, and one line on stderr, when Numba has no compiled kernels cached."""
    if getattr(args, "backend", None) != "numba":
        return False
    from . import ConfigError, accel_package

    try:
        cached = accel_package().kernels_cached()
    except (ConfigError, ImportError):  # no accel or no Numba: refimpl.load says so
        return False
    if cached:
        return False
    if not args.quiet:
        print(COMPILE_NOTICE, file=sys.stderr, flush=True)
    return True


# --- messages -------------------------------------------------------------------------------------------------------

# Python keywords of refimpl.load and generate() -> the flags that set them, for errors raised below the CLI.
FLAG_FOR_KEYWORD = {"backend": "--backend", "weights": "--weights", "threads": "--threads", "dtype": "--dtype",
                    "max_new_tokens": "--max-new-tokens", "min_new_tokens": "--min-new-tokens",
                    "temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                    "repetition_penalty": "--repetition-penalty", "do_sample=False": "--greedy"}
_KEYWORD = re.compile(r"\b(do_sample=False|(?:" + "|".join(k for k in FLAG_FOR_KEYWORD if "=" not in k)
                      + r")=)'?([^'\s,:;)]*)'?")


def cli_message(text):
    """An error message with Python keywords (weights='int8') rewritten as flags (--weights int8), on one line."""
    def flag(match):
        if match.group(1) == "do_sample=False":
            return "--greedy" + match.group(2)
        return f"{FLAG_FOR_KEYWORD[match.group(1)[:-1]]} {match.group(2)}"

    return " ".join(_KEYWORD.sub(flag, str(text)).split())


class _Formatter(logging.Formatter):
    def format(self, record):
        return f"refimpl: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


def add_log_arguments(parser):
    """-q/--quiet and -v/--verbose on a subparser (a --quiet it already has gains -q). Unset flags leave the
    top-level parser's values alone (default SUPPRESS)."""
    if "--quiet" in parser._option_string_actions:
        if "-q" not in parser._option_string_actions:
            parser.add_argument("-q", dest="quiet", action="store_true", default=argparse.SUPPRESS,
                                help="the same as --quiet")
    else:
        parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                            help="errors only: no progress, notes or warnings on stderr")
    if "--verbose" not in parser._option_string_actions:
        parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                            help="more detail on stderr (-vv: debug)")


def start_logging(quiet, verbose):
    """The `refimpl` logger on stderr at the level the flags ask for; returns a function that undoes it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    level = logging.ERROR if quiet else logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False

    def stop():
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
    return stop


def show_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the CLI: `refimpl: warning: message`, one line, no source line."""
    log.warning("%s", message)


# --- output files ---------------------------------------------------------------------------------------------------

def check_json_output(path, force=False, flag="--json"):
    """--json FILE checked before any work (- is standard output)."""
    if path is None or path == "-":
        return
    from .safe_write import check_output

    check_output(path, force, flag)


def write_json(path, obj):
    """One JSON object to FILE (atomically, refimpl/safe_write.py) or to standard output for -."""
    text = json.dumps(obj, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from .safe_write import write_atomically

    data = text.encode("utf-8")
    write_atomically(path, lambda f: f.write(data))


def check_sampling_values(args):
    """Each generation flag's value (those the command has), checked before the model loads so that the error
    names the flag: generate and chat share it."""
    value = lambda name: getattr(args, name, None)  # noqa: E731  (chat has no --min-p, --min-new-tokens, ...)
    t, k, p, min_p, penalty = (value(n) for n in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"))
    if t is not None and (not math.isfinite(t) or t <= 0):
        raise InputError(f"--temp {t}: must be > 0 (for greedy decoding use --greedy)")
    if k is not None and k < 0:
        raise InputError(f"--top-k {k}: must be >= 0 (0 disables top-k)")
    if p is not None and not 0 < p <= 1:
        raise InputError(f"--top-p {p}: must be in (0, 1]")
    if min_p is not None and not 0 <= min_p <= 1:
        raise InputError(f"--min-p {min_p}: must be in [0, 1]")
    if penalty is not None and (not math.isfinite(penalty) or penalty <= 0):
        raise InputError(f"--repetition-penalty {penalty}: must be > 0")
    if value("max_new_tokens") is not None and args.max_new_tokens < 1:
        raise InputError(f"-n/--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if value("min_new_tokens") is not None and args.min_new_tokens < 0:
        raise InputError(f"--min-new-tokens {args.min_new_tokens}: must be >= 0")
