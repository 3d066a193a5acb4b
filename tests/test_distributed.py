"""Batch golden packs and perplexity on Ray (docs/distributed.md, refimpl/distributed.py).

One local Ray cluster (2 CPUs, no dashboard) serves every Ray test of this module; the tests that need no Ray (the
prompts file, the no-import check, the missing-extra message) run without it. The actors are given 1 BLAS thread
and the single-process references are computed with 1 BLAS thread too: the last bits of a matrix product can depend
on how many threads OpenBLAS splits it over, and the claim is "the same bits with the same threads".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys

import pytest

from golden_cases import GOLDEN, ROOT

try:
    import ray
except ImportError:  # the [ray] extra is not installed: only the tests that need no Ray run
    ray = None

OPT = os.path.join(GOLDEN, "models", "opt_text")
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'refimpl[ray]')")
PROMPTS = [{"name": "ids_short", "ids": [2, 17, 42]},
           {"name": "text_fox", "text": "the quick brown fox jumps over the lazy dog"},
           {"name": "ids_long", "ids": [2] + list(range(100, 140))},
           {"name": "text_rivers", "text": "seven wizards quietly hum old songs about rivers and mountains"},
           {"name": "ids_mid", "ids": [2, 5, 6, 7, 8, 9, 10, 11, 1999]}]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs about rivers and "
         "mountains").split()


def text_of(n_words, seed=3):
    import numpy as np

    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def one_blas_thread():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    return path


def reference_packs(folder, prompts):
    """Each prompt through `refimpl golden MODEL --ids ... -o` / `--prompt ...` (one BLAS thread) -> {name: bytes}."""
    from refimpl.cli import main

    folder.mkdir()
    out = {}
    with one_blas_thread():
        for p in prompts:
            source = ["--ids", ",".join(map(str, p["ids"]))] if "ids" in p else ["--prompt", p["text"]]
            path = folder / f"{p['name']}.safetensors"
            assert main(["golden", OPT, *source, "-o", str(path)]) == 0
            out[p["name"]] = path.read_bytes()
    return out


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "refimpl", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cluster():
    """A local Ray for this module: 2 CPUs, no dashboard; -> its address, for a second driver to join."""
    if ray is None:
        pytest.skip("Ray is not installed (pip install 'refimpl[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return reference_packs(tmp_path_factory.mktemp("references") / "packs", PROMPTS)


# --- on Ray -----------------------------------------------------------------------------------------------------------

@needs_ray
def test_batch_packs_on_ray_are_the_single_process_bytes(cluster, references, tmp_path):
    from refimpl import distributed

    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    with one_blas_thread():
        local = distributed.write_packs(OPT, prompts, tmp_path / "local", progress=False)
    result = distributed.map_prompts(OPT, prompts, tmp_path / "ray", actors=2, threads=1, progress=False)
    assert result.ok and local.ok
    for p in PROMPTS:
        name = f"{p['name']}.safetensors"
        assert (tmp_path / "local" / name).read_bytes() == references[p["name"]], name
        assert (tmp_path / "ray" / name).read_bytes() == references[p["name"]], name
    assert (tmp_path / "ray" / "index.json").read_bytes() == (tmp_path / "local" / "index.json").read_bytes()
    index = json.loads((tmp_path / "ray" / "index.json").read_text())
    assert [e["name"] for e in index["packs"]] == [p["name"] for p in PROMPTS] and index["failed"] == []
    for entry, p in zip(index["packs"], PROMPTS):
        assert entry["sha256"] == hashlib.sha256(references[p["name"]]).hexdigest()
        if "ids" in p:
            assert entry["tokens"] == len(p["ids"])
    assert sorted(os.listdir(tmp_path / "ray")) == sorted([f"{p['name']}.safetensors" for p in PROMPTS]
                                                         + ["index.json"])  # no temporary file left behind


@needs_ray
def test_perplexity_on_ray_equals_the_single_process_number_to_the_bit(cluster):
    import refimpl
    from refimpl import distributed
    from refimpl.errors import ConfigError, RefimplError
    from refimpl.perplexity import strided_perplexity

    text = text_of(120)
    ids = refimpl.load_tokenizer(OPT).encode(text)
    with one_blas_thread():
        single = strided_perplexity(refimpl.load(OPT), ids, 32, 16)
    assert single["windows"] > 4

    def fail_first_try(name, attempt):  # window 3's first try fails: its retry must give the same bits
        if name.startswith("window 3 ") and attempt == 1:
            raise RuntimeError("a transient failure, on purpose")

    on_ray = distributed.perplexity(OPT, text, 32, 16, actors=2, threads=1, _fault=fail_first_try)
    assert on_ray == single  # every window loss and count, both perplexities: float == float, so every bit
    assert on_ray["perplexity_windows"].hex() == single["perplexity_windows"].hex()
    assert on_ray["perplexity_tokens"].hex() == single["perplexity_tokens"].hex()

    def always_fail(name, attempt):
        if name.startswith("window 2 "):
            raise RuntimeError(f"broken on purpose, try {attempt}")

    with pytest.raises(RefimplError, match=r"window 2 \(tokens 32-64\).*try 2"):
        distributed.perplexity(OPT, ids, 32, 16, actors=2, threads=1, _fault=always_fail)
    with pytest.raises(ConfigError, match="no config.json"):  # an actor's load error, as it is without Ray
        distributed.perplexity(os.path.dirname(OPT), ids, 32, 16, actors=1, threads=1)


@needs_ray
def test_a_failed_prompt_is_retried_once_then_named_and_the_others_written(cluster, references, tmp_path):
    from refimpl import distributed

    prompts = PROMPTS[:2] + [{"name": "bad", "ids": [2, 99999]}] + PROMPTS[2:]
    result = distributed.map_prompts(OPT, prompts, tmp_path / "out", actors=2, threads=1, progress=False)
    assert not result.ok and list(result.failed) == ["bad"]
    assert len(result.failed["bad"]) == 2  # the first try, and the one retry
    assert all("99999" in error and "InputError" in error for error in result.failed["bad"])
    for p in PROMPTS:
        assert (tmp_path / "out" / f"{p['name']}.safetensors").read_bytes() == references[p["name"]]
    assert not (tmp_path / "out" / "bad.safetensors").exists()
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [e["name"] for e in index["packs"]] == [p["name"] for p in PROMPTS]
    assert [f["name"] for f in index["failed"]] == ["bad"] and len(index["failed"][0]["errors"]) == 2


@needs_ray
def test_an_actor_killed_mid_run_is_replaced_and_every_pack_written(cluster, references, tmp_path):
    from refimpl import distributed

    def kill_my_actor(name, attempt):  # the actor running text_rivers dies on its first try
        if name == "text_rivers" and attempt == 1:
            os._exit(1)

    result = distributed.map_prompts(OPT, write_prompts(tmp_path / "p.jsonl", PROMPTS), tmp_path / "out",
                                     actors=2, threads=1, progress=False, _fault=kill_my_actor)
    assert result.ok, result.failed
    for p in PROMPTS:
        assert (tmp_path / "out" / f"{p['name']}.safetensors").read_bytes() == references[p["name"]]


@needs_ray
def test_a_resumed_run_skips_the_finished_packs(cluster, references, tmp_path):
    """An interrupted run leaves packs but no index: --resume keeps the packs that read back whole for these ids and
    this checkpoint, runs only the rest (a fault hook fails any finished name that is run again), and the index
    is the one a full run writes."""
    from refimpl import distributed

    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    out.mkdir()
    for p in PROMPTS[:3]:  # the first run finished three packs, then stopped
        (out / f"{p['name']}.safetensors").write_bytes(references[p["name"]])
    (out / "ids_mid.safetensors").write_bytes(references["ids_short"])  # a pack of other ids: not finished
    finished = {p["name"] for p in PROMPTS[:3]}

    def no_rerun(name, attempt):
        if name in finished:
            raise RuntimeError(f"{name} was finished and ran again")

    with pytest.raises(distributed.InputError, match="exists"):  # without --resume the packs are not replaced
        distributed.map_prompts(OPT, prompts, out, actors=2, threads=1, progress=False)
    result = distributed.map_prompts(OPT, prompts, out, actors=2, threads=1, progress=False, resume=True,
                                     _fault=no_rerun)
    assert result.ok, result.failed
    for p in PROMPTS:
        assert (out / f"{p['name']}.safetensors").read_bytes() == references[p["name"]], p["name"]
    with one_blas_thread():
        full = distributed.write_packs(OPT, prompts, tmp_path / "full", progress=False)
    assert (out / "index.json").read_bytes() == (tmp_path / "full" / "index.json").read_bytes()
    again = distributed.write_packs(OPT, prompts, out, progress=False, resume=True)  # nothing left to do
    assert again.ok and (out / "index.json").read_bytes() == (tmp_path / "full" / "index.json").read_bytes()
    assert full.ok


@needs_ray
def test_golden_prompts_on_ray_from_the_command_line(cluster, references, tmp_path):
    """A second driver joins the module's cluster by its address, as `--ray HOST:PORT` joins a real one."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:3] + [{"name": "bad", "ids": [2, 99999]}])
    result = run_cli("golden", OPT, "--prompts", prompts, "-o", tmp_path / "packs", "--ray", cluster,
                     "--ray-actors", "2", "--ray-threads", "1")
    assert result.returncode == 1, result.stderr
    assert "prompt 'bad' failed" in result.stderr and "99999" in result.stderr
    assert "[3/3]" in result.stderr or "[3/4]" in result.stderr  # progress on stderr
    assert "wrote 3 packs" in result.stdout and "bad" in result.stdout
    for p in PROMPTS[:3]:
        assert (tmp_path / "packs" / f"{p['name']}.safetensors").read_bytes() == references[p["name"]]


# --- without Ray -----------------------------------------------------------------------------------------------------

def test_without_ray_nothing_of_ray_is_imported(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:2])
    (tmp_path / "text.txt").write_text(text_of(40))
    code = ("import sys; from refimpl.cli import main; "
            f"assert main(['golden', {OPT!r}, '--prompts', {str(prompts)!r}, '-o', {str(tmp_path / 'packs')!r}]) == 0; "
            f"assert main(['perplexity', {OPT!r}, {str(tmp_path / 'text.txt')!r}, '--ctx', '32']) == 0; "
            "assert 'ray' not in sys.modules, 'ray was imported'; "
            "assert not [m for m in sys.modules if m.startswith('ray.')]; print('no ray')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "no ray" in result.stdout, result.stderr
    assert (tmp_path / "packs" / "index.json").exists()


def test_ray_missing_names_the_extra(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:1])
    code = ("import sys; sys.modules['ray'] = None; from refimpl.cli import main; "
            f"sys.exit(main(['golden', {OPT!r}, '--prompts', {str(prompts)!r}, '-o', {str(tmp_path / 'o')!r}, "
            "'--ray']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refimpl: error: --ray needs Ray"), result.stderr
    assert "pip install 'refimpl[ray]'" in lines[0]


@pytest.mark.parametrize("line,fragment", [
    ({"name": "a/b", "ids": [1]}, "plain file name"),
    ({"name": "..", "ids": [1]}, "'..'"),
    ({"name": "x..y", "ids": [1]}, "'..'"),
    ({"name": ".hidden", "ids": [1]}, "start with '.'"),
    ({"name": "", "ids": [1]}, "non-empty string"),
    ({"name": "a", "ids": [1], "text": "t"}, "exactly one"),
    ({"name": "a", "ids": []}, "non-empty list"),
    ({"name": "a", "ids": [1, -2]}, "non-negative"),
    ({"name": "a", "text": ""}, "non-empty string"),
    ({"name": "a", "prompt": "x"}, "unknown key 'prompt'"),
    ("not json", "line 2: not valid JSON"),
])
def test_a_bad_prompts_line_is_named(tmp_path, line, fragment):
    from refimpl.distributed import read_prompts
    from refimpl.errors import InputError

    (tmp_path / "p.jsonl").write_text(json.dumps({"name": "ok", "ids": [1]}) + "\n"
                                      + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(InputError, match="line 2") as info:
        read_prompts(str(tmp_path / "p.jsonl"))
    assert fragment in str(info.value)


def test_batch_refuses_duplicates_existing_packs_and_stray_flags(tmp_path, capsys):
    from refimpl.cli import main

    dup = write_prompts(tmp_path / "dup.jsonl", [{"name": "A", "ids": [1]}, {"name": "a", "ids": [2]}])
    assert main(["golden", OPT, "--prompts", str(dup), "-o", str(tmp_path / "o")]) == 2
    assert "used twice" in capsys.readouterr().err
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "packs"
    assert main(["golden", OPT, "--prompts", str(prompts), "-o", str(out), "-q"]) == 0
    before = (out / "ids_short.safetensors").stat().st_mtime_ns
    assert main(["golden", OPT, "--prompts", str(prompts), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "ids_short.safetensors").stat().st_mtime_ns == before
    assert main(["golden", OPT, "--prompts", str(prompts), "-o", str(out), "--force", "-q"]) == 0
    assert main(["golden", OPT, "--ids", "1,2", "-o", str(tmp_path / "x.safetensors"), "--ray"]) == 2
    assert "--ray applies to a batch" in capsys.readouterr().err
    assert main(["golden", OPT, "--prompts", str(prompts), "-o", str(tmp_path / "q"), "--ray-actors", "2"]) == 2
    assert "applies with --ray" in capsys.readouterr().err
    assert main(["golden", OPT, "--prompts", str(prompts), "-o", str(tmp_path / "r"), "--ray", OPT]) == 2
    assert "not a Ray address" in capsys.readouterr().err
    with contextlib.suppress(FileNotFoundError):
        assert not os.listdir(tmp_path / "q")
