"""The oracle for porters: golden packs, `refimpl diff` and its hint catalogue (docs/oracle.md).

Each catalogued porting bug is seeded into a copy of the forward pass (monkeypatched refimpl functions or a
changed config); the pack it writes is the "port", and diff must name the op where the bug first shows and the
bug's hint.
"""
import dataclasses
import json
import os

import numpy as np
import pytest

import refimpl
import refimpl.llama
import refimpl.opt
from golden_cases import CASES, GOLDEN
from refimpl import oracle_cli
from refimpl.diff import TOLERANCES, diff_packs, format_report, gguf_permutation, raw_logits_pack
from refimpl.pack import (SUMMARY_FIELDS, make_pack, read_header, read_metadata, read_pack, summarize,
                          write_safetensors)

IDS = [[1, 17, 42, 9, 100, 7, 33, 64]]


def load(case, dtype=np.float32):
    return refimpl.load(os.path.join(GOLDEN, "models", case), dtype=dtype)


def golden(case, path, **kwargs):
    """The reference pack of a golden case (with full metadata, as `refimpl golden` writes it)."""
    tensors, metadata = make_pack(load(case), kwargs.get("ids", IDS), kwargs.get("mask"),
                                  summary=kwargs.get("summary", False), model_path=os.path.join(GOLDEN, "models", case))
    write_safetensors(path, tensors, metadata)
    return read_pack(path)


def port(model, path, ids=IDS, mask=None):
    """A port's pack: the same trace names, written without refimpl's metadata."""
    tensors, _ = make_pack(model, ids, mask)
    write_safetensors(path, tensors)
    return read_pack(path)


def interleaved_rotary(x, cos, sin):
    """RoPE on adjacent pairs (2j, 2j + 1) with frequency j (Meta's / GGML NORM convention) on HF weights."""
    half = x.shape[-1] // 2
    cos = np.repeat(cos[..., :half], 2, axis=-1)[:, None]
    sin = np.repeat(sin[..., :half], 2, axis=-1)[:, None]
    rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


def with_config(model, **changes):
    model.config = dataclasses.replace(model.config, **changes)
    return model


def seed_interleaved_rope(monkeypatch):
    monkeypatch.setattr(refimpl.llama, "apply_rotary", interleaved_rotary)
    return load("llama_mha")


def seed_wrong_eps(monkeypatch):
    return with_config(load("llama_mha"), rms_norm_eps=1e-6)  # Llama 1's eps on a 1e-5 model


def seed_missing_opt_offset(monkeypatch):
    model = load("opt_preln")  # loaded first: the table's shape is checked with the real offset
    monkeypatch.setattr(refimpl.opt, "POSITION_OFFSET", 0)
    return model


def seed_no_stable_embedding(monkeypatch):
    return with_config(load("openllama_default"), use_stable_embedding=False)


def seed_post_ln_as_pre_ln(monkeypatch):
    return with_config(load("opt_350m_like"), do_layer_norm_before=True)


def seed_gqa_tile(monkeypatch):
    monkeypatch.setattr(refimpl.llama, "repeat_kv", lambda x, n: x if n == 1 else np.tile(x, (1, n, 1, 1)))
    return load("llama_gqa_bias")


SEEDED_BUGS = [  # (reference case, the bug, first divergent op, hint id)
    ("llama_mha", seed_interleaved_rope, "layers.0.attn.q_rope", "rope"),
    ("llama_mha", seed_wrong_eps, "layers.0.input_norm", "norm-eps"),
    ("opt_preln", seed_missing_opt_offset, "pos_embed", "opt-position-offset"),
    ("openllama_default", seed_no_stable_embedding, "embed", "stable-embedding"),
    ("opt_350m_like", seed_post_ln_as_pre_ln, "layers.0.attn_in", "opt-layer-norm-placement"),
    ("llama_gqa_bias", seed_gqa_tile, "layers.0.attn.k_repeat", "kv-repeat"),
]


@pytest.mark.parametrize("case, seed, first, hint", SEEDED_BUGS, ids=[s[1].__name__[5:] for s in SEEDED_BUGS])
def test_seeded_bug_is_named(tmp_path, monkeypatch, case, seed, first, hint):
    ref = golden(case, tmp_path / "ref.safetensors")
    bad = port(seed(monkeypatch), tmp_path / "port.safetensors")
    report = diff_packs(ref, bad)
    text = format_report(report, ref, bad)
    assert report.first is not None and report.first.name == first, text
    assert report.hints and report.hints[0][0] == hint, text
    assert f"first divergent op: {first}" in text and f"likely cause [{hint}]" in text
    assert all(not op.failed for op in report.ops[:report.ops.index(report.first)])  # nothing earlier failed


def test_more_catalogued_causes(tmp_path, monkeypatch):
    """fp16 mask overflow (NaN after attention), a llama.cpp Q/K permutation, the attention scale."""
    mask = [[0, 0, 1, 1, 1, 1, 1, 1]]  # left padding: the pad queries see no key at all
    ref = golden("llama_mha", tmp_path / "ref.safetensors", mask=mask)
    real_mask = refimpl.llama.causal_mask
    with monkeypatch.context() as m:  # -inf instead of finfo.min: what finfo(float32).min becomes in fp16
        m.setattr(refimpl.llama, "causal_mask", lambda a, t, d: np.where(real_mask(a, t, d) < 0, -np.inf, 0).astype(d))
        with np.errstate(invalid="ignore"):  # the port's softmax of an all -inf row
            report = diff_packs(ref, port(load("llama_mha"), tmp_path / "nan.safetensors", mask=mask))
    assert (report.first.name, report.first.status, report.hints[0][0]) == (
        "layers.0.attn.probs", "nonfinite", "fp16-mask-overflow")

    ref = golden("llama_mha", tmp_path / "ref2.safetensors")
    model = load("llama_mha")
    perm = gguf_permutation(model.config.head_dim)
    for layer in model.params["layers"]:  # convert_hf_to_gguf's permute(), with the RoPE that goes with it
        for name in ("q_proj", "k_proj"):
            w = layer[name]
            layer[name] = w.reshape(-1, model.config.head_dim, w.shape[-1])[:, perm].reshape(w.shape)
    with monkeypatch.context() as m:
        m.setattr(refimpl.llama, "apply_rotary", interleaved_rotary)
        report = diff_packs(ref, port(model, tmp_path / "perm.safetensors"))
    assert (report.first.name, report.hints[0][0]) == ("layers.0.attn.q", "qk-permutation")
    skipped = diff_packs(ref, read_pack(tmp_path / "perm.safetensors"), skip=["layers.*.attn.[qk]*"])
    assert skipped.ok, format_report(skipped)  # consistent permutation + interleaved RoPE: the same model

    with monkeypatch.context() as m:
        m.setattr(refimpl.llama, "math", type("NoSqrt", (), {"sqrt": staticmethod(lambda x: 1.0)}))
        report = diff_packs(ref, port(load("llama_mha"), tmp_path / "scale.safetensors"))
    assert (report.first.name, report.hints[0][0]) == ("layers.0.attn.scores", "attention-scale")


def test_identical_packs_pass_and_cli_exit_codes(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref.safetensors"
    assert oracle_cli.main(["golden", f"{GOLDEN}/models/llama_mha", "--ids", "1,17,42,9", "-o", str(ref)]) == 0
    same = tmp_path / "same.safetensors"
    assert oracle_cli.main(["golden", f"{GOLDEN}/models/llama_mha", "--ids", "1,17,42,9", "-o", str(same)]) == 0
    assert oracle_cli.main(["diff", str(ref), str(same)]) == 0
    assert "result: PASS" in capsys.readouterr().out

    bad = tmp_path / "bad.safetensors"
    port(seed_interleaved_rope(monkeypatch), bad, ids=[[1, 17, 42, 9]])
    assert oracle_cli.main(["diff", str(ref), str(bad), "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "first divergent op: layers.0.attn.q_rope" in out and "result: FAIL" in out
    assert json.loads((tmp_path / "r.json").read_text())["hints"][0] == "rope"
    assert oracle_cli.main(["diff", str(ref), str(bad), "--rtol", "100"]) == 0  # --rtol overrides the default

    other = tmp_path / "other.safetensors"
    assert oracle_cli.main(["golden", f"{GOLDEN}/models/llama_mha", "--ids", "1,2,3,4", "-o", str(other)]) == 0
    assert oracle_cli.main(["diff", str(ref), str(other)]) == 2  # different inputs: not comparable
    assert "different input_ids" in capsys.readouterr().err
    assert oracle_cli.main(["diff", str(ref), str(tmp_path / "missing.safetensors")]) == 2


def test_golden_pack_round_trip_and_metadata(tmp_path, capsys):
    path = tmp_path / "ref.safetensors"
    model_path = f"{GOLDEN}/models/llama_gqa_bias"
    assert oracle_cli.main(["golden", model_path, "--ids", "1,17,42", "-o", str(path), "--dtype", "float64"]) == 0
    pack = read_pack(path)
    meta = read_metadata(path)
    assert meta["refimpl_version"] == refimpl.__version__ and meta["dtype"] == "float64"
    assert meta["class"] == "LlamaForCausalLM" and meta["family"] == "llama"
    assert json.loads(meta["config"])["num_key_value_heads"] == 2
    manifest = json.load(open(os.path.join(GOLDEN, "manifest.json")))["files"]
    digests = json.loads(meta["checkpoint_sha256"])
    assert digests["model.safetensors"] == manifest["models/llama_gqa_bias/model.safetensors"]
    assert list(pack.tensors)[:2] == ["input_ids", "attention_mask"]
    assert pack.tensors["input_ids"].tolist() == [[1, 17, 42]]
    assert pack.trace_names() == json.loads(meta["trace_order"])
    assert pack.tensors["logits"].dtype == np.float64 and pack.tensors["logits"].shape == (1, 3, 192)

    # written and read back: the same names in the same order, dtypes, shapes, values and metadata
    copy = tmp_path / "copy.safetensors"
    write_safetensors(copy, pack.tensors, pack.metadata)
    again = read_pack(copy)
    assert list(again.tensors) == list(pack.tensors) and again.metadata == pack.metadata
    for name, value in pack.tensors.items():
        assert again.tensors[name].dtype == value.dtype and np.array_equal(again.tensors[name], value), name
    assert read_header(copy) == read_header(path)
    assert open(copy, "rb").read() == open(path, "rb").read()


def test_packs_interoperate_with_the_safetensors_library(tmp_path):
    """A pack is plain safetensors: the library reads ours, and diff accepts the library's (sorted names, no
    metadata) as a port."""
    st = pytest.importorskip("safetensors.numpy")
    ref = golden("opt_350m_like", tmp_path / "ref.safetensors")
    loaded = st.load_file(str(tmp_path / "ref.safetensors"))
    assert set(loaded) == set(ref.tensors)
    assert all(np.array_equal(loaded[n], ref.tensors[n]) for n in loaded)
    st.save_file({n: np.array(v) for n, v in ref.tensors.items()}, str(tmp_path / "lib.safetensors"))
    theirs = read_pack(tmp_path / "lib.safetensors")
    assert theirs.metadata == {}
    assert theirs.trace_names() == ref.trace_names()  # graph order recovered from the names alone
    report = diff_packs(theirs, ref)  # a reference without metadata works too
    assert report.ok and report.family == "opt"


def test_raw_logits_files(tmp_path, monkeypatch):
    """A port's flat float32 logits: every position ([n_tokens, vocab], .bin) or the last one ([vocab])."""
    ref = golden("llama_mha", tmp_path / "ref.safetensors")
    bad = port(seed_interleaved_rope(monkeypatch), tmp_path / "port.safetensors")
    np.asarray(bad.tensors["logits"][0], "<f4").tofile(tmp_path / "logits.bin")
    report = diff_packs(ref, raw_logits_pack(tmp_path / "logits.bin", ref))
    assert [op.name for op in report.ops] == ["logits"] and report.first.name == "logits"
    assert report.hints[0][0] == "rope"  # position 0 exact in the logits too
    assert report.logits.positions == len(IDS[0]) and report.logits.kl_mean > 0
    np.asarray(ref.tensors["logits"][0, -1], "<f4").tofile(tmp_path / "last.f32")
    assert oracle_cli.main(["diff", str(tmp_path / "ref.safetensors"), str(tmp_path / "last.f32")]) == 0
    assert oracle_cli.main(["diff", str(tmp_path / "ref.safetensors"), "--port-logits",
                            str(tmp_path / "logits.bin")]) == 1
    np.zeros(7, "<f4").tofile(tmp_path / "short.bin")
    assert oracle_cli.main(["diff", str(tmp_path / "ref.safetensors"), str(tmp_path / "short.bin")]) == 2


def test_summary_packs(tmp_path, monkeypatch):
    ref = golden("llama_mha", tmp_path / "ref.safetensors", summary=True)
    assert ref.summary and ref.tensors["layers.0.attn.q"].shape == (len(SUMMARY_FIELDS),)
    assert ref.tensors["logits"].shape == (1, len(IDS[0]), 192)  # logits stay full
    full = port(load("llama_mha"), tmp_path / "full.safetensors")
    assert diff_packs(ref, full).ok
    value = full.tensors["layers.1.mlp.act"]
    summary = summarize(value)
    assert summary[SUMMARY_FIELDS.index("absmax")] == np.abs(value).max()
    assert np.array_equal(summary[5:5 + 8], value.ravel()[:8])
    report = diff_packs(ref, port(seed_wrong_eps(monkeypatch), tmp_path / "bad.safetensors"))
    assert report.first.name == "layers.0.input_norm"


def test_default_fp32_tolerance_holds_refimpl_fp32_against_float64(tmp_path):
    """The budget: refimpl's own float32 trace passes against its float64 audit trace on every golden case."""
    for case in CASES:
        tensors, metadata = make_pack(load(case, np.float64), [[3, 4, 5, 6, 7, 8]])
        write_safetensors(tmp_path / "ref64.safetensors", tensors, metadata)
        ref = read_pack(tmp_path / "ref64.safetensors")
        report = diff_packs(ref, port(load(case), tmp_path / "p32.safetensors", ids=[[3, 4, 5, 6, 7, 8]]))
        assert report.tolerance[0] == "float32" and report.tolerance[1:] == TOLERANCES["float32"]
        assert report.ok, f"{case}: {format_report(report, all_ops=False)}"


def test_prompt_needs_a_tokenizer(tmp_path, capsys):
    code = oracle_cli.main(["golden", f"{GOLDEN}/models/opt_preln", "--prompt", "Hello", "-o",
                            str(tmp_path / "p.safetensors")])
    assert code == 2
    assert "--ids" in capsys.readouterr().err


def test_compare_dtypes_report(capsys):
    assert oracle_cli.main(["golden", f"{GOLDEN}/models/llama_mha", "--ids", "1,17,42,9", "--compare-dtypes"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("layers.", "logits"))}
    assert "layers.1.attn.q_rope" in rows and "logits" in rows
    fp32_rel, _, fp16_rel, _, bf16_rel, _ = (float(x) for x in rows["logits"])
    assert 0 < fp32_rel < 1e-5 < fp16_rel < bf16_rel  # the more bits dropped, the further from float64


def test_prompt_text_goes_through_the_tokenizer(tmp_path, monkeypatch):
    class Tokenizer:
        def encode(self, text):
            return [1, 17, 42] if text == "Hello" else []

    monkeypatch.setattr(refimpl, "load_tokenizer", lambda path: Tokenizer())
    path = tmp_path / "p.safetensors"
    assert oracle_cli.main(["golden", f"{GOLDEN}/models/opt_preln", "--prompt", "Hello", "-o", str(path)]) == 0
    assert read_metadata(path)["text"] == "Hello"
    assert read_pack(path).tensors["input_ids"].tolist() == [[1, 17, 42]]


DOC = os.path.join(os.path.dirname(GOLDEN), "docs", "oracle.md")


def test_docs_list_every_trace_name_and_hint():
    """docs/oracle.md quotes the name tables and the hint catalogue: they must not drift from the code."""
    from refimpl.diff import HINTS
    from refimpl.trace import format_table

    text = open(DOC, encoding="utf-8").read()
    for family in ("llama", "opt"):
        for line in format_table(family).splitlines():
            assert line in text, f"docs/oracle.md lacks the trace table row {line}"
    catalogue = text.split("## 5.")[1].split("## 6.")[0]
    documented = [line.split("`")[1] for line in catalogue.splitlines() if line.startswith("| `")]
    assert documented == list(dict.fromkeys(hint_id for hint_id, _, _ in HINTS))


def test_docs_pack_writer_makes_a_pack_diff_accepts(tmp_path):
    """The dependency-free writer of docs/oracle.md section 2 writes what diff reads."""
    section = open(DOC, encoding="utf-8").read().split("## 2.")[1]
    code = section.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(code, namespace)
    ref = golden("llama_gqa_bias", tmp_path / "ref.safetensors")
    tensors, _ = make_pack(load("llama_gqa_bias"), IDS)
    namespace["write_pack"](str(tmp_path / "port.safetensors"), {n: np.asarray(v) for n, v in tensors.items()})
    assert diff_packs(ref, read_pack(tmp_path / "port.safetensors")).ok


def test_docs_worked_example_reproduces(tmp_path, monkeypatch, capsys):
    """Run docs/oracle.md's worked example (section 4) and check its pasted output: the ops and their verdicts,
    the first divergent op, the hint and the result (numbers may differ in the last digits on another BLAS)."""
    section = open(DOC, encoding="utf-8").read().split("## 4.")[1].split("## 5.")[0]
    code = section.split("```python\n")[1].split("```")[0]
    pasted = section.split("$ refimpl diff ref.safetensors port.safetensors\n")[1].split("$ echo")[0]
    monkeypatch.chdir(tmp_path)
    os.symlink(GOLDEN, tmp_path / "golden")
    monkeypatch.setattr(refimpl.llama, "apply_rotary", refimpl.llama.apply_rotary)  # restored after the test
    assert oracle_cli.main(["golden", "golden/models/llama_mha", "--ids", "1,17,42,9,100,7", "-o",
                            "ref.safetensors"]) == 0
    exec(code, {})
    capsys.readouterr()
    assert oracle_cli.main(["diff", "ref.safetensors", "port.safetensors"]) == 1
    out = capsys.readouterr().out

    def essentials(text):
        lines = text.strip().splitlines()
        table = [(line.split()[0], line.split()[-1] if "<-" not in line else "first") for line in lines
                 if line.split() and line.split()[0] in read_pack("ref.safetensors").tensors]
        keep = [line for line in lines if line.startswith(("reference:", "port:", "tolerance", "first divergent",
                                                             "  likely cause", "result:"))]
        return table, keep

    table, keep = essentials(pasted)
    assert len(table) == 48 and len(keep) == 6
    assert essentials(out) == (table, keep)


def test_compare_dtypes_rounds_memory_mapped_and_stored_matrices(tmp_path):
    """round_params rounds every matrix, memory-mapped fp32 arrays and StoredMatrix alike, lazily (no rounded copy
    of the model): bf16 rounding of an fp16 file's matrices changes them, fp16 rounding leaves them as they are."""
    import checkpoint_files as cf
    from refimpl.stored import StoredMatrix

    model = refimpl.load(cf.safetensors_variant("llama_mha", tmp_path, "fp16"))
    q = model.params["layers"][0]["q_proj"]
    as_fp16 = oracle_cli.round_params(model.params, oracle_cli.round_to_float16)["layers"][0]["q_proj"]
    as_bf16 = oracle_cli.round_params(model.params, oracle_cli.round_to_bfloat16)["layers"][0]["q_proj"]
    assert isinstance(as_fp16, StoredMatrix) and isinstance(as_bf16, StoredMatrix)
    np.testing.assert_array_equal(np.asarray(as_fp16), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(as_bf16), oracle_cli.round_to_bfloat16(np.asarray(q)))
    assert not np.array_equal(np.asarray(as_bf16), np.asarray(q))
    golden = refimpl.load(f"{GOLDEN}/models/llama_mha")  # fp32 memory maps
    rounded = oracle_cli.round_params(golden.params, oracle_cli.round_to_float16)["layers"][0]["q_proj"]
    np.testing.assert_array_equal(np.asarray(rounded), golden.params["layers"][0]["q_proj"].astype(np.float16))
