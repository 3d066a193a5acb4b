"""The command-line tools and habits (docs/cli.md): perplexity against transformers, bench, and what every command
shares (-m, one-line errors naming flags, --version, sampling flags, -q/-v, the compile notice, one-line warnings).

Most tests run `python -m refimpl ...` in a subprocess on the tiny golden models, as a user would.
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from golden_cases import GOLDEN, ROOT

OPT = os.path.join(GOLDEN, "models", "opt_text")
LLAMA = os.path.join(GOLDEN, "models", "llama_text")
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs about rivers and "
         "mountains").split()


def text_of(n_words, seed=3):
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def refimpl_cli(*args, stdin=None, env=None, code=None):
    """Run `python -m refimpl ARGS` (or `python -c CODE ARGS`) from the repository root -> CompletedProcess."""
    command = [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, "-m", "refimpl",
                                                                          *map(str, args)]
    return subprocess.run(command, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refimpl: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# --- perplexity -----------------------------------------------------------------------------------------------------

def transformers_guide_perplexity(path, text, ctx, stride):
    """The transformers 4.46.3 guide's loop, in transformers (torch): (exp(mean of window losses), window losses,
    the number of tokens each window scores, the ids)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                              torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, use_fast=False)
    encodings = tokenizer(text, return_tensors="pt")
    seq_len = encodings.input_ids.size(1)
    nlls, counts, prev_end_loc = [], [], 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + ctx, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
        nlls.append(outputs.loss)
        counts.append(int((target_ids[:, 1:] != -100).sum()))
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    ppl = torch.exp(torch.stack(nlls).mean())
    return float(ppl), [float(x) for x in nlls], counts, encodings.input_ids[0].tolist()


@pytest.mark.live_oracle
@pytest.mark.parametrize("model", [OPT, LLAMA], ids=["opt_text", "llama_text"])
@pytest.mark.parametrize("ctx,stride", [(None, None), (64, 32), (48, 17)], ids=["default", "stride<ctx", "odd"])
def test_perplexity_matches_transformers(model, ctx, stride, tmp_path):
    text = text_of(300)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    max_positions = json.load(open(os.path.join(model, "config.json")))["max_position_embeddings"]
    ctx_used, stride_used = ctx or max_positions, stride or ctx or max_positions
    expected, losses, counts, ids = transformers_guide_perplexity(model, text, ctx_used, stride_used)
    assert len(ids) > 2 * ctx_used  # several windows, the last one shorter

    import refimpl

    assert refimpl.load_tokenizer(model).encode(text) == ids  # the same tokens, or the comparison means nothing
    args = ["perplexity", model, tmp_path / "text.txt", "--json", tmp_path / "out.json"]
    args += ["--ctx", ctx, "--stride", stride] if ctx else []
    result = refimpl_cli(*args)
    assert result.returncode == 0, result.stderr
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity_windows"] == got["perplexity"]
    assert got["tokens"] == sum(counts)
    per_token = math.exp(sum(loss * n for loss, n in zip(losses, counts)) / sum(counts))
    assert got["perplexity_tokens"] == pytest.approx(per_token, rel=1e-5)
    assert got["windows"] == len(losses) and got["ctx"] == ctx_used and got["stride"] == stride_used
    if stride_used < ctx_used:
        assert got["tokens"] == len(ids) - 1  # overlapping windows score every token after the first once
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"perplexity {got['perplexity']:.6f} over {got['tokens']} tokens"), last


def test_perplexity_windows_follow_the_guide():
    from refimpl.perplexity import windows

    assert windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]  # stops when end_loc reaches the end
    assert windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert windows(3, 8, 8) == [(0, 3, 3)]


def test_perplexity_of_a_fake_model_by_hand():
    """Window losses of a stand-in model -> both averages, computed here by hand."""
    from refimpl.perplexity import strided_perplexity

    seen = []

    class Model:
        def __call__(self, input_ids, labels):
            seen.append((input_ids[0].tolist(), labels[0].tolist()))
            return argparse.Namespace(loss=np.float32(len(seen)))  # loss 1, 2, 3 for the windows in turn

    result = strided_perplexity(Model(), list(range(10)), ctx=4, stride=3)
    assert seen[1] == ([3, 4, 5, 6], [-100, 4, 5, 6])  # begin 3, end 7, trg_len 3: the context labelled -100
    assert result["window_tokens"] == [3, 3, 3] and result["tokens"] == 9
    assert result["perplexity_windows"] == pytest.approx(math.exp((1 + 2 + 3) / 3))
    assert result["perplexity_tokens"] == pytest.approx(math.exp((1 * 3 + 2 * 3 + 3 * 3) / 9))


def test_perplexity_reads_stdin_and_checks_its_flags(tmp_path):
    result = refimpl_cli("perplexity", "-m", OPT, "-", "--ctx", "32", "--json", "-", stdin=text_of(60))
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)  # --json -: standard output is the JSON alone
    assert {"perplexity", "tokens"} <= set(got) and got["ctx"] == 32 and got["stride"] == 32
    assert "perplexity" in result.stderr.splitlines()[-1]
    assert_one_line_error(refimpl_cli("perplexity", OPT, "-", "-c", "16", "--stride", "20", stdin="a b c"),
                          "--stride 20")
    assert_one_line_error(refimpl_cli("perplexity", OPT, "-", "-c", "1000", stdin="a b"), "--ctx 1000")
    assert_one_line_error(refimpl_cli("perplexity", OPT, tmp_path / "missing.txt"), "no such file or folder")
    assert_one_line_error(refimpl_cli("perplexity", OPT, "-", stdin=""), "at least 2")
    (tmp_path / "t.txt").write_text(text_of(20))
    assert_one_line_error(refimpl_cli("perplexity", OPT, tmp_path / "t.txt", "--json", tmp_path / "no" / "r.json"),
                          "does not exist")
    assert_one_line_error(refimpl_cli("perplexity", OPT, tmp_path / "t.txt", "--json", tmp_path), "is a folder")
    (tmp_path / "r.json").write_text("{}")
    assert_one_line_error(refimpl_cli("perplexity", OPT, tmp_path / "t.txt", "--json", tmp_path / "r.json"),
                          "--force")
    assert refimpl_cli("perplexity", OPT, tmp_path / "t.txt", "--json", tmp_path / "r.json", "--force").returncode == 0
    assert json.loads((tmp_path / "r.json").read_text())["tokens"] > 0


def test_perplexity_progress_bar_only_on_a_terminal():
    from refimpl.perplexity import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    bar(1, 4, 123.456)
    bar(4, 4, 99.5)
    text = out.getvalue()
    assert text.startswith("\rperplexity [##........] 1/4 windows, ppl 123.4560")
    assert "[##########] 4/4 windows, ppl 99.5000" in text and text.endswith("\n")
    result = refimpl_cli("perplexity", OPT, "-", stdin=text_of(50))  # stderr is a pipe here: no bar
    assert result.returncode == 0 and result.stderr == ""


# --- bench ----------------------------------------------------------------------------------------------------------

def test_bench_prints_llama_bench_table():
    result = refimpl_cli("bench", OPT, "-p", "16", "-n", "8", "-r", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["model", "backend", "weights", "threads", "test",
                                                                  "t/s"]
    assert lines[1].startswith("|-") and lines[1].endswith(":|")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[4] for row in rows] == ["pp16", "tg8"]
    for row in rows:
        assert row[0] == "opt 85.3K" and row[1] == "numpy" and row[2] == "f32" and int(row[3]) >= 1
        mean, std = row[5].split(" ± ")
        assert float(mean) > 0 and float(std) >= 0
    assert result.stderr.startswith("warm-up: ")  # the warm-up on its own line, not in the table


def test_bench_json_and_no_accel_for_numpy():
    code = ("import sys; from refimpl.cli import main; rc = main(sys.argv[1:]); "
            "assert 'refimpl_accel' not in sys.modules, 'accel imported'; sys.exit(rc)")
    result = refimpl_cli("bench", "-m", LLAMA, "-p", "8", "-n", "4", "-r", "2", "-o", "json", "-t", "1", code=code)
    assert_one_line_error(result, "--threads 1 applies to --backend numba")
    result = refimpl_cli("bench", "-m", LLAMA, "-p", "8", "-n", "0", "-r", "2", "-o", "json", code=code)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["test"] for row in rows] == ["pp8"]  # -n 0 skips tg
    row = rows[0]
    assert row["n_prompt"] == 8 and row["n_gen"] == 0 and len(row["samples_ns"]) == 2
    assert row["avg_ts"] == pytest.approx(sum(row["samples_ts"]) / 2)
    assert row["stddev_ts"] == pytest.approx(float(np.std(row["samples_ts"], ddof=1)))
    assert row["samples_ts"][0] == pytest.approx(8 / (row["samples_ns"][0] * 1e-9), rel=1e-6)
    assert "warmup_s" in row
    assert_one_line_error(refimpl_cli("bench", OPT, "-p", "200"), "-p/-n 200")
    assert_one_line_error(refimpl_cli("bench", OPT, "-p", "0", "-n", "0"), "nothing to time")


def test_bench_times_the_warm_up_apart():
    """A model whose first call is slow (as a Numba compile is): the warm-up holds it, the samples do not."""
    from refimpl.bench import run_tests
    from refimpl.config import from_hf_config

    calls = []

    class Model:
        config = from_hf_config(json.load(open(os.path.join(OPT, "config.json"))))

        def generation_forward_kwargs(self):
            return {}

        def __call__(self, input_ids, past_key_values=None, use_cache=False, attention_mask=None):
            calls.append(input_ids.shape)
            if len(calls) == 1:
                time.sleep(0.3)
            return argparse.Namespace(past_key_values=(past_key_values or 0) + 1)

    result = run_tests(Model(), 4, 3, repetitions=2)
    assert result["warmup_s"] >= 0.3
    assert calls[:3] == [(1, 4), (1, 1), (1, 1)]  # warm-up: the prompt once, two decode steps
    assert len(calls) == 3 + 2 * 1 + 2 * 3  # then 2 prompt runs and 2 x 3 decode steps
    for test in result["tests"]:
        assert max(test["samples_ns"]) < 0.3e9
    assert [t["test"] for t in result["tests"]] == ["pp4", "tg3"]


def test_bench_markdown_layout():
    from refimpl.bench import markdown

    table = markdown([{"model": "llama 7.0B", "backend": "numba", "weights": "int8", "threads": 2, "test": "pp128",
                       "avg_ts": 123.456, "stddev_ts": 1.234}])
    assert table.splitlines() == [
        "| model      | backend | weights | threads |  test |           t/s |",
        "|------------|---------|---------|--------:|------:|--------------:|",
        "| llama 7.0B | numba   | int8    |       2 | pp128 | 123.46 ± 1.23 |",
    ]


def test_bench_numba_backend(tmp_path):
    pytest.importorskip("numba")
    if os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
        pytest.skip("whole models on pure-Python kernels are too slow")
    result = refimpl_cli("bench", OPT, "--backend", "numba", "--weights", "int8", "-t", "1", "-p", "8", "-n", "4",
                         "-r", "2")
    assert result.returncode == 0, result.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in result.stdout.strip().splitlines()[2:]]
    assert [row[1:5] for row in rows] == [["numba", "int8", "1", "pp8"], ["numba", "int8", "1", "tg4"]]


# --- habits ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["generate", "-m", OPT, "-p", "Once upon a time", "-n", "3"],
    ["next-token", "-m", OPT, "--ids", "2,100,200"],
    ["perplexity", "-m", OPT, "-", "-c", "16"],
    ["bench", "-m", OPT, "-p", "4", "-n", "2", "-r", "1"],
    ["inspect", "-m", OPT, "-q"],
    ["golden", "-m", OPT, "--ids", "2,100,200", "--compare-dtypes"],
], ids=lambda a: a[0])
def test_model_flag_everywhere(args):
    result = refimpl_cli(*args, stdin=text_of(30))
    assert result.returncode == 0, result.stderr
    assert_one_line_error(refimpl_cli(*args[:2], OPT, *args[2:], stdin="a b c d"), "the model is given twice")


def test_version():
    from importlib import metadata

    import refimpl

    try:
        expected = metadata.version("refimpl")
    except metadata.PackageNotFoundError:
        expected = refimpl.__version__
    result = refimpl_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"refimpl {expected}"


def test_max_tokens_alias_and_quiet():
    a = refimpl_cli("generate", OPT, "-p", "Once upon a time", "--max-tokens", "5")
    b = refimpl_cli("-q", "generate", OPT, "-p", "Once upon a time", "-n", "5")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and "5 new tokens" in a.stderr
    assert b.stderr == ""  # -q: no stats line
    c = refimpl_cli("generate", OPT, "-p", "Once upon a time", "-n", "5", "-v")
    assert c.stdout == a.stdout and "refimpl: info: loaded" in c.stderr


@pytest.mark.parametrize("args,fragment", [
    (["generate", "meta-llama/Llama-2-7b-hf", "-p", "hi"], "refimpl does not download models; put the files in a "
     "folder (config.json, weights, tokenizer) and give its path"),
    (["generate", "no/such/folder/here", "-p", "hi"], "no such file or folder: no/such/folder/here"),
    (["next-token", "./missing", "--ids", "1"], "no such file or folder: ./missing"),
    (["generate", OPT, "-p", "hi", "--top-k", "-1"], "--top-k -1: must be >= 0"),
    (["next-token", OPT, "--ids", "1,2", "--top-k", "0"], "--top-k 0: must be >= 1"),
    (["next-token", OPT, "--ids", "1,2", "--top-k", "-3"], "--top-k -3: must be >= 1"),
    (["generate", OPT, "-p", "hi", "--temp", "0"], "--temp 0.0: must be > 0"),
    (["generate", OPT, "-p", "hi", "--top-p", "1.5"], "--top-p 1.5"),
    (["generate", OPT, "-p", "hi", "--min-p", "2"], "--min-p 2.0"),
    (["generate", OPT, "-p", "hi", "-n", "0"], "-n/--max-new-tokens 0"),
    (["generate", OPT, "-p", "hi", "--weights", "int8"], "--weights int8 applies to --backend numba or cuda"),
    (["next-token", OPT, "--ids", "1", "-t", "2"], "--threads 2 applies to --backend numba or cuda"),
    (["next-token", OPT, "--ids", "1", "--backend", "numba", "--dtype", "float64"], "--dtype float64 needs"),
    (["generate", OPT], "give a prompt"),
    (["generate"], "give a model"),
    (["generate", OPT, "-p", "hi", "--bogus"], "unrecognized arguments: --bogus"),
    (["next-token", OPT, "--ids", "1", "--top-k", "many"], "--top-k: invalid int value"),
    (["golden", OPT, "--ids", "1,2", "-o", "/no/such/folder/pack.safetensors"], "does not exist"),
    (["golden", OPT, "--ids", "1,2", "-o", "golden"], "is a folder"),
    (["convert", OPT, "/no/such/folder/out"], "the folder /no/such/folder does not exist"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_errors_are_one_line_naming_the_flag(args, fragment):
    assert_one_line_error(refimpl_cli(*args), fragment)


def test_keyword_errors_become_flags():
    from refimpl.cli_common import cli_message

    assert cli_message("weights='int4': choose one of fp32") == "--weights int4: choose one of fp32"
    assert cli_message("backend='numba' needs Numba\n(pip install)") == "--backend numba needs Numba (pip install)"
    assert cli_message("top_k=-1 must be an integer >= 0") == "--top-k -1 must be an integer >= 0"
    assert cli_message("use do_sample=False for greedy") == "use --greedy for greedy"


# --- generate: sampling flags and generation_config.json ---------------------------------------------------------

def with_generation_config(tmp_path, **fields):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in os.listdir(OPT):
        os.symlink(os.path.join(OPT, name), folder / name)
    os.unlink(folder / "generation_config.json")
    config = json.load(open(os.path.join(OPT, "generation_config.json")))
    (folder / "generation_config.json").write_text(json.dumps({**config, **fields}))
    return str(folder)


def test_sampling_turns_on_with_a_sampling_flag(tmp_path):
    greedy = refimpl_cli("generate", OPT, "-p", "Once upon a time", "-n", "8")
    assert greedy.returncode == 0 and "seed" not in greedy.stderr  # golden generation_config.json: greedy
    for flag in (["--temp", "0.9"], ["--top-k", "5"], ["--top-p", "0.9"], ["--seed", "7"]):
        sampled = refimpl_cli("generate", OPT, "-p", "Once upon a time", "-n", "8", *flag)
        assert sampled.returncode == 0 and "seed" in sampled.stderr.splitlines()[-1], flag
    a = refimpl_cli("generate", OPT, "-p", "Once upon a time", "-n", "8", "--seed", "3")
    b = refimpl_cli("generate", OPT, "-p", "Once upon a time", "-n", "8", "--do-sample", "-s", "3")
    assert a.stdout == b.stdout and a.stdout != greedy.stdout  # --seed alone samples, as --do-sample does
    forced = refimpl_cli("generate", OPT, "-p", "Once upon a time", "-n", "8", "--greedy", "--temp", "0.5")
    assert forced.stdout == greedy.stdout
    assert forced.stderr.splitlines()[0] == "refimpl: warning: --temp ignored: --greedy decodes greedily"
    sampling_model = with_generation_config(tmp_path, do_sample=True)
    honoured = refimpl_cli("generate", sampling_model, "-p", "Once upon a time", "-n", "8")
    assert honoured.returncode == 0 and "seed" in honoured.stderr  # no flag: generation_config.json's do_sample
    greedy_again = refimpl_cli("generate", sampling_model, "-p", "Once upon a time", "-n", "8", "--greedy")
    assert greedy_again.stdout == greedy.stdout and "seed" not in greedy_again.stderr


def test_sampling_settings_rule():
    from refimpl.cli import build_parser, sampling_settings

    class Model:
        def __init__(self, do_sample):
            self.generation_config = {"do_sample": do_sample} if do_sample is not None else {}

        def generate(self, input_ids, **kwargs):
            pass

    def settings(flags, do_sample_in_file):
        args = build_parser().parse_args(["generate", OPT, "-p", "x", *flags])
        return sampling_settings(args, Model(do_sample_in_file))

    assert settings([], None) == (False, {})
    assert settings([], True) == (True, {})  # do_sample left to generation_config.json
    assert settings([], False) == (False, {})
    assert settings(["--top-k", "0"], False) == (True, {"do_sample": True, "top_k": 0})
    assert settings(["--seed", "1"], None) == (True, {"do_sample": True})
    assert settings(["--greedy"], True) == (False, {"do_sample": False})
    assert settings(["--do-sample", "--temp", "0.5", "-n", "4"], False) == (
        True, {"do_sample": True, "temperature": 0.5, "max_new_tokens": 4})


def test_min_p_reaches_generate():
    import refimpl

    model = refimpl.load(OPT)
    if "min_p" not in inspect.signature(model.generate).parameters and not any(
            p.kind is p.VAR_KEYWORD for p in inspect.signature(model.generate).parameters.values()):
        pytest.skip("generate() takes no min_p yet")
    result = refimpl_cli("generate", OPT, "-p", "Once upon a time", "-n", "6", "--min-p", "0.05", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "seed 1" in result.stderr.splitlines()[-1]
    kept = refimpl_cli("generate", OPT, "-p", "Once upon a time", "-n", "6", "--min-p", "1", "--seed", "1")
    greedy = refimpl_cli("generate", OPT, "-p", "Once upon a time", "-n", "6")
    assert kept.stdout == greedy.stdout  # min_p 1 keeps only the most likely token


def test_stats_line_times_the_first_step_apart():
    from refimpl.cli import stats_line

    line = stats_line(5, 0.0, 10.0, [1.0, 6.0, 7.0, 8.0, 9.0], compiling=True, seed=4)
    assert line == ("[prompt 5 tokens in 1.00 s, 5 new tokens, first step 5.00 s, generation 1.0 tokens/s, "
                    "prompt and first step include compiling kernels, seed 4]")
    assert stats_line(3, 0.0, 1.0, [0.5]) == "[prompt 3 tokens in 0.50 s, 1 new tokens, generation n/a]"


# --- compile notice, warnings ---------------------------------------------------------------------------------------

def test_kernel_cache_detection(tmp_path):
    pytest.importorskip("numba")
    code = ("import os, sys, refimpl_accel.cpu.jit as j; folder = j.kernel_cache_dir(); print(j.kernels_cached()); "
            "open(os.path.join(folder, 'ops._dot-121.py311.nbi'), 'w').close(); print(j.kernels_cached())")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_DISABLE_JIT": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


def test_compile_notice_before_a_cold_numba_load(monkeypatch, capsys):
    pytest.importorskip("numba")
    import refimpl_accel.cpu.jit
    import refimpl
    from refimpl.cli import main
    from refimpl.cli_common import COMPILE_NOTICE

    def fake_load(*args, **kwargs):
        raise refimpl.InputError("stopped before loading")

    monkeypatch.setattr(refimpl, "load", fake_load)
    for cached, shown in ((False, True), (True, False)):
        monkeypatch.setattr(refimpl_accel.cpu.jit, "kernels_cached", lambda: cached)
        assert main(["next-token", OPT, "--ids", "1", "--backend", "numba"]) == 2
        err = capsys.readouterr().err
        assert (COMPILE_NOTICE in err) == shown
        assert err.strip().splitlines()[-1] == "refimpl: error: stopped before loading"
    monkeypatch.setattr(refimpl_accel.cpu.jit, "kernels_cached", lambda: False)
    assert main(["next-token", OPT, "--ids", "1", "--backend", "numba", "-q"]) == 2
    assert COMPILE_NOTICE not in capsys.readouterr().err


def test_library_warnings_print_as_one_line():
    code = ("import sys; sys.modules['sentencepiece'] = None; from refimpl.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = refimpl_cli("generate", LLAMA, "-p", "Once upon a time", "-n", "3", code=code)
    assert result.returncode == 0, result.stderr
    warning, stats = result.stderr.strip().splitlines()
    assert warning.startswith("refimpl: warning: sentencepiece is not installed")
    assert stats.startswith("[prompt ")
    quiet = refimpl_cli("generate", LLAMA, "-p", "Once upon a time", "-n", "3", "-q", code=code)
    assert quiet.returncode == 0 and quiet.stderr == ""


# --- packaging ------------------------------------------------------------------------------------------------------

def test_all_extra_lists_every_extra():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    others = {req for name, reqs in extras.items() if name not in ("all", "gpu") for req in reqs}
    assert set(extras["all"]) == others
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for name in extras:
        assert f"`{name}`" in readme, name
    assert project["license"] == "MIT"
    assert os.path.exists(os.path.join(ROOT, "refimpl", "py.typed"))


def test_public_api_type_hints():
    import typing

    import refimpl
    from refimpl.pretrained import PreTrainedModel

    assert typing.get_type_hints(refimpl.load)["return"] is PreTrainedModel
    for cls in (refimpl.LlamaForCausalLM, refimpl.OPTForCausalLM, refimpl.LlamaModel, refimpl.OPTModel):
        assert typing.get_type_hints(cls.__call__)["return"] is refimpl.ModelOutput
    assert "return" in PreTrainedModel.generate.__annotations__


def test_the_cli_offers_the_weight_formats_accel_implements():
    """--weights' choices (refimpl/cli_common.py, which may not import accel) are accel's formats."""
    pytest.importorskip("numba")
    from refimpl.cli_common import WEIGHT_FORMATS
    from refimpl_accel.formats import WEIGHT_FORMATS as ACCEL_FORMATS

    assert WEIGHT_FORMATS == ACCEL_FORMATS
