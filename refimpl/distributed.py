"""Batch golden packs and perplexity, in one process or on a Ray cluster (docs/distributed.md).

    refimpl golden MODEL --prompts prompts.jsonl -o packs/ [--ray [ADDRESS]] [--ray-actors N]
    refimpl perplexity MODEL FILE [--ctx N] [--stride S] --ray [ADDRESS] [--ray-actors N]

The work is cut into tasks that depend on nothing but their own input: one prompt (a pack), one window (perplexity).
A pool of Ray actors each loads the model once (memory-mapped, from a path every node sees) and is handed one task
at a time; the results come back to the driver, which writes every pack itself and merges the perplexity windows in
window order with the same function as the single-process path (refimpl.perplexity.merge_windows). A task that
fails (it raised, or its actor died) is run once more; one that fails twice is reported by name.

Ray is imported inside the functions that use it, never at import: `refimpl golden --prompts` without --ray, and
every other command, run without it. Ray is the optional extra `pip install 'refimpl[ray]'`.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import sys
import time

import numpy as np
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, RefimplError

INDEX_FORMAT = "refimpl-golden-index/1"
INDEX_NAME = "index.json"
PACK_SUFFIX = ".safetensors"
ATTEMPTS = 2  # a task is run at most twice: once, and once more if it fails
MAX_NAME = 200  # characters in a prompt's name
RAY_EXTRA = "pip install 'refimpl[ray]'"
DTYPES = {"float32": np.float32, "float64": np.float64}


# --- prompts --------------------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """One line of a prompts file: a name (the pack's file name, less .safetensors) and ids or text."""

    name: str
    ids: list | None = None
    text: str | None = None


def check_name(name, where):
    """A prompt's name as a plain file name: no folder separators, no '..', no leading '.', no control characters."""
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: \"name\" must be a non-empty string, got {name!r}")
    bad = next((c for c in name if c in "/\\" or c == os.sep or (os.altsep and c == os.altsep)
                or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InputError(f"{where}: name {name!r} holds {bad!r}; a name must be a plain file name (no folders)")
    if ".." in name or name.startswith("."):
        raise InputError(f"{where}: name {name!r} must not start with '.' or contain '..' (a plain file name)")
    if len(name) > MAX_NAME:
        raise InputError(f"{where}: name {name[:40]!r}... is {len(name)} characters long (at most {MAX_NAME})")
    return name


def check_ids(ids, where):
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        raise InputError(f"{where}: \"ids\" must be a non-empty list of non-negative integers")
    return ids


def parse_prompt(obj, where):
    """A dict {"name": ..., "ids": [...]} or {"name": ..., "text": ...} -> Prompt (InputError naming `where`)."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object {{\"name\": ..., \"ids\": [...]}} or "
                         f"{{\"name\": ..., \"text\": ...}}")
    unknown = sorted(set(obj) - {"name", "ids", "text"})
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (a prompt has \"name\" and \"ids\" or \"text\")")
    name = check_name(obj.get("name"), where)
    if ("ids" in obj) == ("text" in obj):
        raise InputError(f"{where}: prompt {name!r} needs exactly one of \"ids\" and \"text\"")
    if "ids" in obj:
        return Prompt(name, ids=check_ids(obj["ids"], where))
    if not isinstance(obj["text"], str) or not obj["text"]:
        raise InputError(f"{where}: \"text\" must be a non-empty string")
    return Prompt(name, text=obj["text"])


def read_prompts(path):
    """A JSON-lines prompts file -> [Prompt]; blank lines are skipped, names must be unique."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"--prompts {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"--prompts {path}: is a folder; give a JSON-lines file") from None
    except UnicodeDecodeError:
        raise InputError(f"--prompts {path}: is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"--prompts {path}: {exc.strerror}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts {path} line {number}"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise InputError(f"{where}: not valid JSON") from None
        prompts.append(parse_prompt(obj, where))
    return check_prompts(prompts, f"--prompts {path}")


def check_prompts(prompts, where):
    if not prompts:
        raise InputError(f"{where}: holds no prompts")
    seen = {}
    for prompt in prompts:
        key = prompt.name.casefold()  # two names one case-insensitive file system cannot tell apart
        if key in seen:
            raise InputError(f"{where}: the name {prompt.name!r} is used twice"
                             + (f" ({seen[key]!r} differs only in case)" if seen[key] != prompt.name else ""))
        seen[key] = prompt.name
    return prompts


def as_prompts(prompts):
    """A prompts file path, or a list of Prompt / dicts -> [Prompt], checked."""
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(os.fspath(prompts))
    out = [p if isinstance(p, Prompt) else parse_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]
    for i, p in enumerate(out):
        check_name(p.name, f"prompt {i}")
    return check_prompts(out, "prompts")


def encode_prompts(prompts, tokenizer_folder):
    """[Prompt] -> [(name, ids, text or None)]: text encoded by the tokenizer, as `refimpl golden --prompt` does."""
    tokenizer = None
    out = []
    for prompt in prompts:
        if prompt.ids is not None:
            out.append((prompt.name, list(prompt.ids), None))
            continue
        if tokenizer is None:
            from . import load_tokenizer

            try:
                tokenizer = load_tokenizer(tokenizer_folder)
            except (ValueError, TypeError, OSError, ImportError) as exc:
                raise InputError(f"prompt {prompt.name!r} is text, which needs a tokenizer, and {tokenizer_folder} "
                                 f"has none that loads ({exc}); give ids, or a tokenizer folder with --tokenizer DIR"
                                 ) from None
        ids = list(tokenizer.encode(prompt.text))
        if not ids:
            raise InputError(f"prompt {prompt.name!r}: its text {prompt.text!r} encodes to no tokens")
        out.append((prompt.name, ids, prompt.text))
    return out


# --- BLAS threads: a matrix product's last bits can depend on how many threads OpenBLAS splits it over -------------

def current_blas_threads():
    """The BLAS threads NumPy's matrix products use in this process, or None when threadpoolctl (in the [ray]
    extra) is missing or sees no BLAS."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return max(counts) if counts else None


def pin_blas_threads(threads):
    """Make this process's BLAS use `threads` threads (nothing when None)."""
    if threads is None:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise RefimplError(f"the Ray actors need threadpoolctl to set their BLAS threads: {RAY_EXTRA}") from None
    threadpool_limits(limits=threads, user_api="blas")


# --- the workers: the same class runs in this process or as a Ray actor ----------------------------------------------

class _Worker:
    """A worker whose model does not load keeps the error and raises it from every call: it reaches the driver as
    the task's own exception (InputError, ConfigError...), where an error in an actor's constructor comes back as a
    traceback in text."""

    error = None
    model = None

    def __init__(self, load, blas_threads):
        try:
            pin_blas_threads(blas_threads)
            load()
        except (RefimplError, OSError) as exc:
            self.error = exc

    def ready(self):
        if self.error is not None:
            raise self.error
        return type(self.model).__name__, current_blas_threads()


class PackWorker(_Worker):
    """Loads the model once, then makes one golden pack per call (the tensors and metadata, not the file)."""

    def __init__(self, model_path, dtype="float32", summary=False, layers=None, ops=None, fault=None,
                 blas_threads=None):
        from . import load
        from .pack import checkpoint_sha256

        self.model_path, self.summary, self.layers, self.ops, self.fault = model_path, summary, layers, ops, fault

        def load_model():
            self.model = load(model_path, dtype=DTYPES[dtype])
            self.digests = checkpoint_sha256(model_path)  # once per worker: a 7B's weights hashed once, not per pack

        super().__init__(load_model, blas_threads)

    def run(self, name, ids, text, attempt=1):
        from .pack import make_pack
        from .trace import selection

        self.ready()
        if self.fault is not None:  # tests only: fail (or kill this worker) on purpose
            self.fault(name, attempt)
        return make_pack(self.model, [ids], summary=self.summary, model_path=self.model_path, text=text,
                         keep=selection(self.layers, self.ops), checkpoint_digests=self.digests)


class WindowWorker(_Worker):
    """Loads the model once, then scores one perplexity window per call (refimpl.perplexity.window_score)."""

    def __init__(self, model_path, dtype="float32", backend="numpy", weights=None, threads=None, fault=None,
                 blas_threads=None):
        from . import load

        options = {"backend": backend}
        if weights is not None:
            options["weights"] = weights
        if threads is not None:
            options["threads"] = threads
        self.fault = fault

        def load_model():
            self.model = load(model_path, dtype=DTYPES[dtype], **options)

        super().__init__(load_model, blas_threads)

    def facts(self):
        from .perplexity import model_facts

        self.ready()
        return model_facts(self.model)

    def run(self, name, ids, trg_len, attempt=1):
        from .perplexity import window_score

        self.ready()
        if self.fault is not None:
            self.fault(name, attempt)
        return window_score(self.model, ids, 0, len(ids), trg_len)


# --- packs ------------------------------------------------------------------------------------------------------------

@dataclass
class BatchResult:
    """What a batch wrote: index entries (prompt order) of the packs written, and {name: [error per attempt]}."""

    out_dir: str
    packs: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    index: str | None = None
    seconds: float = 0.0

    @property
    def ok(self):
        return not self.failed


def pack_path(out_dir, name):
    return os.path.join(out_dir, name + PACK_SUFFIX)


def finished_pack(path, ids, digests, summary):
    """Is `path` a complete pack of these ids, from this checkpoint, in this mode? (--resume skips it.) Packs are
    written atomically, so a file that reads back is whole; an interrupted run leaves packs but no index."""
    from .pack import read_pack

    if not os.path.isfile(path):
        return False
    try:
        pack = read_pack(path)
        stored = json.loads(pack.metadata.get("checkpoint_sha256", "null"))
    except (OSError, ValueError):  # RefimplError is a ValueError: an unreadable pack is written again
        return False
    return (np.array_equal(pack.tensors.get("input_ids"), np.asarray([ids], np.int64)) and stored == digests
            and pack.metadata.get("mode") == ("summary" if summary else "full"))


def check_outputs(out_dir, names, force):
    """-o FOLDER: made when its parent exists; every pack and the index checked before any work (as -o is)."""
    from .safe_write import check_output

    out_dir = os.fspath(out_dir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"-o {out_dir}: is a file; with --prompts, -o names a folder for the packs")
    if not os.path.isdir(out_dir):
        parent = os.path.dirname(os.path.abspath(out_dir))
        if not os.path.isdir(parent):
            raise InputError(f"-o {out_dir}: the folder {parent} does not exist")
        os.mkdir(out_dir)
    for name in names:
        check_output(pack_path(out_dir, name), force, "-o")
    check_output(os.path.join(out_dir, INDEX_NAME), force, "-o")
    return out_dir


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_index(out_dir, model_path, entries, failed):
    """index.json, written last and atomically: each pack's name, file, token count and sha256, in prompt order,
    and each prompt that failed with its errors (so a gap is never silent). No times: a rerun writes the same
    bytes."""
    from .safe_write import write_atomically

    index = {"format": INDEX_FORMAT,
             "checkpoint": os.path.basename(os.path.normpath(os.fspath(model_path))),
             "packs": entries,
             "failed": [{"name": name, "errors": errors} for name, errors in failed.items()]}
    data = (json.dumps(index, indent=2) + "\n").encode("utf-8")
    path = os.path.join(out_dir, INDEX_NAME)
    write_atomically(path, lambda f: f.write(data))
    return path


class _Reporter:
    """Progress lines on stderr (or nothing), one per task finished or failed."""

    def __init__(self, enabled, what, total, stream=None):
        self.enabled, self.what, self.total, self.done = enabled, what, total, 0
        self.stream, self.start = stream or sys.stderr, time.perf_counter()

    def line(self, text):
        if self.enabled:
            print(f"refimpl {self.what}: {text}", file=self.stream, flush=True)

    def finished(self, text):
        self.done += 1
        self.line(f"[{self.done}/{self.total}] {text} ({time.perf_counter() - self.start:.1f} s)")


def _batch(model_path, prompts, out_dir, force, tokenizer, progress, execute, resume=False, summary=False):
    from .pack import checkpoint_sha256, write_pack

    start = time.perf_counter()
    model_path = os.fspath(model_path)
    prompts = as_prompts(prompts)
    tasks = encode_prompts(prompts, tokenizer or model_path)
    written, skip = {}, set()
    if resume and os.path.isdir(out_dir):  # finished packs of an earlier run are kept, the rest is done now
        digests = checkpoint_sha256(model_path)
        for i, (name, ids, _) in enumerate(tasks):
            path = pack_path(out_dir, name)
            if finished_pack(path, ids, digests, summary):
                skip.add(i)
                written[i] = {"name": name, "file": os.path.basename(path), "tokens": len(ids),
                              "sha256": file_sha256(path)}
    out_dir = check_outputs(out_dir, [t[0] for i, t in enumerate(tasks) if i not in skip],
                            force or resume and os.path.isdir(out_dir))  # before any model is loaded
    result = BatchResult(out_dir)
    report = _Reporter(progress, "golden", len(tasks) - len(skip))
    if skip:
        report.line(f"resuming: {len(skip)} of {len(tasks)} packs are already written")
    all_tasks, todo = tasks, [i for i in range(len(tasks)) if i not in skip]
    tasks = [all_tasks[i] for i in todo]

    def done(i, value):
        name, ids, _ = tasks[i]
        tensors, metadata = value
        path = pack_path(out_dir, name)
        write_pack(path, tensors, metadata)
        written[todo[i]] = {"name": name, "file": os.path.basename(path), "tokens": len(ids),
                            "sha256": file_sha256(path)}
        report.finished(f"wrote {path}, {len(ids)} tokens")

    failed = execute(tasks, done, report) if tasks else {}
    result.packs = [written[i] for i in sorted(written)]
    result.failed = {tasks[i][0]: errors for i, errors in sorted(failed.items())}
    result.index = write_index(out_dir, model_path, result.packs, result.failed)
    result.seconds = time.perf_counter() - start
    report.line(f"wrote {result.index}: {len(result.packs)} packs"
                + (f", {len(result.failed)} failed ({', '.join(result.failed)})" if result.failed else ""))
    return result


def write_packs(model_path, prompts, out_dir, *, dtype="float32", summary=False, layers=None, ops=None,
                tokenizer=None, force=False, progress=True, resume=False):
    """One golden pack per prompt in this process, the bytes `refimpl golden MODEL --ids ... -o` writes, plus
    out_dir/index.json. prompts: a JSON-lines file or a list of {"name", "ids" | "text"}. A prompt that fails is
    reported by name in the result (result.failed) and in the index; the others are written."""
    def execute(tasks, done, report):
        worker = PackWorker(os.fspath(model_path), dtype, summary, layers, ops)
        worker.ready()  # a model that does not load is one error, not one per prompt
        failed = {}
        for i, (name, ids, text) in enumerate(tasks):
            try:
                value = worker.run(name, ids, text)
            except RefimplError as exc:  # this prompt's fault (an id outside the vocabulary): the others go on
                failed[i] = [f"{type(exc).__name__}: {exc}"]
                report.line(f"{name} failed: {exc}")
                continue
            done(i, value)
        return failed

    return _batch(model_path, prompts, out_dir, force, tokenizer, progress, execute, resume, summary)


def map_prompts(model_path, prompts, out_dir, *, ray_address=None, actors=None, backend="numpy", weights=None,
                threads=None, dtype="float32", summary=False, layers=None, ops=None, tokenizer=None, force=False,
                progress=True, resume=False, _fault=None):
    """write_packs() on a Ray cluster: each prompt a task on a pool of actors that load the model once; the driver
    (this process) writes every pack and the index, so the files are byte for byte the single-process ones.

    ray_address: None starts a local Ray (or uses the one this process already joined); an address joins that
    cluster. actors: how many (default: the cluster's CPUs // threads). Golden packs hold a trace, which only
    backend="numpy" records. threads: each actor's BLAS threads and the CPUs it reserves; by default the BLAS
    threads of this process, so that the packs are those a single-process run here writes (a product's last bits
    can depend on how many threads BLAS splits it over). _fault(name, attempt) runs in the actor before each task
    (tests use it to fail or kill an actor on purpose)."""
    if backend != "numpy" or weights is not None:
        raise InputError(f"golden packs need backend='numpy' (accel's kernels record no trace), not "
                         f"backend={backend!r}" + (f" weights={weights!r}" if weights is not None else ""))
    threads = threads or current_blas_threads()  # by default the actors compute as this process would

    def execute(tasks, done, report):
        def make():
            return (PackWorker, (os.fspath(model_path), dtype, summary, layers, ops, _fault, threads))

        return run_on_ray(ray_address, actors, threads or 1, make, tasks, done, report)

    return _batch(model_path, prompts, out_dir, force, tokenizer, progress, execute, resume, summary)


# --- perplexity -------------------------------------------------------------------------------------------------------

def perplexity(model_path, text_or_ids, ctx=None, stride=None, *, ray_address=None, actors=None, dtype="float32",
               backend="numpy", weights=None, threads=None, progress=None, _fault=None):
    """refimpl.perplexity.strided_perplexity on a Ray cluster: each window a task on a pool of actors that load the
    model once; the windows' (loss, nll, count) come back and are merged in window order by the same function as
    the single-process path, so the result is the same to the last bit (with the same BLAS threads: threads, by
    default this process's; with backend "numba" or "cuda", threads also goes to accel as its threads).
    text_or_ids: a string (encoded by the model's tokenizer, bos included) or token ids. ctx / stride default as in
    `refimpl perplexity`.
    progress(done, total, running_ppl) is called as windows finish. A window that fails twice fails the run
    (RefimplError naming it): a perplexity with a window missing would be another number."""
    from .perplexity import check_windows, merge_windows, settle_ctx

    model_path = os.fspath(model_path)
    if isinstance(text_or_ids, str):
        from .cli import load_tokenizer_for

        tokenizer = load_tokenizer_for(model_path)
        if tokenizer is None:
            raise InputError(f"{model_path} has no tokenizer files (tokenizer.model, tokenizer.json or vocab.json)")
        ids = list(tokenizer.encode(text_or_ids))
    else:
        ids = [int(t) for t in text_or_ids]
    if len(ids) < 2:
        check_windows(len(ids), 2, 1)  # the one-line error for a text too short, before Ray starts

    state = {}
    accel_threads = threads if backend != "numpy" else None
    threads = threads or current_blas_threads()

    def make():
        return (WindowWorker, (model_path, dtype, backend, weights, accel_threads, _fault, threads))

    def plan(facts):
        state["ctx"], state["stride"] = settle_ctx(facts, ctx, stride, model_path)
        state["plan"] = check_windows(len(ids), state["ctx"], state["stride"])
        return [(f"window {k} (tokens {b}-{e})", ids[b:e], trg) for k, (b, e, trg) in enumerate(state["plan"])]

    scores, losses = {}, {}

    def done(i, value):
        scores[i] = value
        losses[i] = value[0]
        if progress is not None:
            progress(len(scores), len(state["plan"]), math.exp(sum(losses.values()) / len(losses)))

    report = _Reporter(False, "perplexity", 0)
    failed = run_on_ray(ray_address, actors, threads or 1, make, plan, done, report)
    if failed:
        first = min(failed)
        raise RefimplError(f"{len(failed)} perplexity window(s) failed twice, so there is no perplexity to report; "
                           f"{plan_name(state, first)}: {failed[first][-1]}")
    return merge_windows([scores[i] for i in range(len(state["plan"]))], len(ids), state["ctx"], state["stride"])


def plan_name(state, i):
    begin, end, _ = state["plan"][i]
    return f"window {i} (tokens {begin}-{end})"


# --- Ray --------------------------------------------------------------------------------------------------------------

def check_ray_address(text):
    """--ray's ADDRESS ('' for none: a local Ray) -> the address for ray.init, or None. A path is refused: it is the
    MODEL (or FILE) that `--ray MODEL ...` took for an address."""
    if not text:
        return None
    if os.path.exists(text):
        raise InputError(f"--ray {text}: is a file or folder, not a Ray address; put --ray after the model and files "
                         "(or write --ray=ADDRESS)")
    return text


def import_ray():
    try:
        import ray
        import threadpoolctl  # noqa: F401  (the actors set their BLAS threads with it)
    except ImportError as exc:
        raise RefimplError(f"--ray needs Ray and threadpoolctl, not installed here ({exc}): {RAY_EXTRA}") from None
    return ray


def start_ray(ray, address):
    """(ray, whether this call started it): join `address`, or start a local Ray, unless this process is in one."""
    if ray.is_initialized():
        return False
    options = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise RefimplError(f"--ray {address}: cannot join a Ray cluster there ({' '.join(str(exc).split())[:300]})"
                               ) from None
    else:
        ray.init(include_dashboard=False, **options)
    return True


def describe(ray, exc):
    """A Ray failure -> one line: the task's own exception (its type and message), or why its actor died."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None and not isinstance(cause, type(exc)):
        return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    if isinstance(exc, ray.exceptions.RayActorError):
        lines = [line.strip() for line in (getattr(exc, "error_msg", None) or str(exc)).splitlines() if line.strip()]
        text = lines[-1] if getattr(exc, "_actor_init_failed", False) and lines else " ".join(lines)
        return f"its actor died ({text[:300]}{'...' if len(text) > 300 else ''})"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def run_on_ray(address, actors, cpus, make, tasks, done, report):
    """Run tasks on a pool of actors, one task per actor at a time, each task at most ATTEMPTS times.

    make() -> (worker class, its arguments); tasks: [(name, *arguments of run)], or a function of the first actor's
    facts() returning them; done(i, value) is called in this process as each task i succeeds. Returns
    {i: [error per attempt]} for the tasks that failed every attempt."""
    ray = import_ray()
    started = start_ray(ray, address)
    try:
        return _run_pool(ray, actors, cpus, make, tasks, done, report)
    finally:
        if started:
            ray.shutdown()


def _run_pool(ray, actors, cpus, make, tasks, done, report):
    cls, arguments = make()
    remote = ray.remote(num_cpus=cpus, max_restarts=0, max_task_retries=0)(cls)
    if actors is not None and actors < 1:
        raise InputError(f"--ray-actors {actors}: must be >= 1")
    pool = [remote.remote(*arguments)]
    try:  # the actors are killed however this ends: in a process that stays in the cluster they would hold its CPUs
        return _run_tasks(ray, actors, cpus, remote, arguments, pool, tasks, done, report)
    finally:
        for actor in pool:
            ray.kill(actor, no_restart=True)


def _run_tasks(ray, actors, cpus, remote, arguments, pool, tasks, done, report):
    if callable(tasks):  # perplexity: the windows depend on the model (its ctx), which the first actor reports
        facts = _get_or_raise(ray, pool[0].facts.remote(), "loading the model on a Ray actor")
        tasks = tasks(facts)
    report.total = len(tasks)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    n = actors if actors is not None else max(1, cluster_cpus // cpus)
    n = max(1, min(n, len(tasks)))
    if n * cpus > cluster_cpus:  # Ray would wait for CPUs that never come
        raise InputError(f"--ray-actors {n} with {cpus} thread(s) each need {n * cpus} CPUs; the Ray cluster has "
                         f"{cluster_cpus} (give fewer actors, or fewer threads with --ray-threads)")
    pool.extend(remote.remote(*arguments) for _ in range(n - 1))
    for ref in [actor.ready.remote() for actor in pool]:
        _, blas = _get_or_raise(ray, ref, "loading the model on a Ray actor")
    report.line(f"{len(tasks)} tasks on {n} Ray actor(s), {cpus} CPU(s) each, BLAS threads {blas}")

    queue = collections.deque((i, 1) for i in range(len(tasks)))
    errors = collections.defaultdict(list)
    failed = {}
    idle = list(range(n))
    pending = {}  # object ref -> (actor slot, task index, attempt)
    while queue or pending:
        while queue and idle:
            slot = idle.pop(0)
            i, attempt = queue.popleft()
            name, *args = tasks[i]
            pending[pool[slot].run.remote(name, *args, attempt=attempt)] = (slot, i, attempt)
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        slot, i, attempt = pending.pop(ref)
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as exc:
            if isinstance(exc, ray.exceptions.RayActorError):  # the actor is gone: a fresh one takes its place
                ray.kill(pool[slot], no_restart=True)
                pool[slot] = remote.remote(*arguments)
            errors[i].append(describe(ray, exc))
            name = tasks[i][0]
            if attempt < ATTEMPTS:
                report.line(f"{name} failed ({errors[i][-1]}); running it once more")
                queue.append((i, attempt + 1))
            else:
                report.line(f"{name} failed twice: {errors[i][-1]}")
                failed[i] = errors[i]
            idle.append(slot)
            continue
        idle.append(slot)
        done(i, value)
    return failed


def _get_or_raise(ray, ref, what):
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, RefimplError):  # the model does not load: the same error as without Ray
            raise type(cause)(str(cause)) from None
        raise RefimplError(f"{what}: {describe(ray, exc)}") from None
