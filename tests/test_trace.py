"""The forward-pass trace (refimpl/trace.py): names from the table, in graph order, equal to what transformers
returns at the corresponding points, and no effect on the numbers."""
import os
import time

import numpy as np
import pytest

import refimpl
from golden_cases import ATOL_FP32_CASE, CASES, FORWARD_KWARGS, GOLDEN, load_case
from refimpl.trace import LLAMA_TRACE, NO_TRACE, OPT_TRACE, TABLES, Trace, entry, generic_name, graph_order

# the same bound as tests/test_golden.py: fp32 refimpl against fp32 transformers, different summation orders
ATOL = 1e-5


def traced_call(case, call_name="full"):
    """Replay one stored call of a golden case with a Trace -> (trace, stored outputs {key: array}, model)."""
    data, meta = load_case(case)
    call = next(c for c in meta["calls"] if c["name"] == call_name)
    model = refimpl.load(os.path.join(GOLDEN, "models", case))
    kwargs = {arg: data[f"{call_name}.in.{arg}"] for arg in call["inputs"]}
    kwargs.update({k: v for k, v in call["kwargs"].items() if k in FORWARD_KWARGS})
    trace = Trace()
    model(**kwargs, trace=trace)
    prefix = f"{call_name}.out."
    return trace, {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}, model


def last_point(trace, model):
    """The trace name equal to transformers' last hidden state."""
    if model.config.family == "opt":
        for name in ("project_out", "final_layer_norm"):
            if name in trace:
                return name
        return f"layers.{model.config.num_hidden_layers - 1}.out"
    return "final_norm"


@pytest.mark.parametrize("case", CASES)
def test_trace_matches_transformers_at_corresponding_points(case):
    """hidden_states[j] = layers.j.in, hidden_states[L] = the final norm (OPT: after project_out), attentions[j] =
    layers.j.attn.probs, the cache of a call without past = k after RoPE (OPT: k) and v, logits = logits."""
    trace, stored, model = traced_call(case)
    L = model.config.num_hidden_layers
    pairs = []
    for key, expected in stored.items():
        parts = key.split(".")
        if parts[0] == "hidden_states":
            j = int(parts[1])
            pairs.append((key, f"layers.{j}.in" if j < L else last_point(trace, model), expected))
        elif parts[0] == "attentions":
            pairs.append((key, f"layers.{parts[1]}.attn.probs", expected))
        elif parts[0] == "past_key_values":
            k = "k" if model.config.family == "opt" else "k_rope"
            pairs.append((key, f"layers.{parts[1]}.attn.{k if parts[2] == 'key' else 'v'}", expected))
        elif parts[0] == "logits":
            pairs.append((key, "logits", expected))
        elif parts[0] in ("start_logits", "end_logits"):
            pairs.append((key, "logits", np.stack([stored["start_logits"], stored["end_logits"]], -1)))
    assert any(key.startswith("hidden_states") for key, _, _ in pairs), f"{case}: no hidden states stored"
    for key, name, expected in pairs:
        assert name in trace, f"{case}: trace has no {name} (for transformers' {key})"
        actual = trace[name]
        assert actual.shape == expected.shape, f"{case}: {name} {actual.shape} vs {key} {expected.shape}"
        error = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
        atol = ATOL_FP32_CASE.get(case, ATOL)
        assert error <= atol, f"{case}: {name} differs from transformers' {key} by {error:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_every_name_is_in_the_table_in_graph_order(case):
    trace, _, model = traced_call(case)
    family = model.config.family
    names = list(trace)
    assert [n for n in names if entry(n, family) is None] == []
    assert graph_order(names, family) == names  # the table's order is the order the code computes
    assert graph_order(list(reversed(names)), family) == names


def test_every_table_row_is_recorded_by_some_case():
    """The table lists nothing the code does not record (rows only some configs produce are covered by a case)."""
    seen = {"llama": set(), "opt": set()}
    for case in CASES:
        trace, _, model = traced_call(case)
        seen["opt" if model.config.family == "opt" else "llama"] |= {generic_name(n)[0] for n in trace}
    assert {row[0] for row in LLAMA_TRACE} == seen["llama"]
    assert {row[0] for row in OPT_TRACE} == seen["opt"]


def test_table_rows_are_well_formed():
    for family, table in TABLES.items():
        names = [row[0] for row in table]
        assert len(names) == len(set(names)), family
        for row in table:
            assert len(row) == 5 and all(isinstance(field, str) and field for field in row), row
    assert entry("layers.3.attn.q", "llama")[4] == "blk.3.attn_q / Qcur-3 (rows permuted, see docs/oracle.md)"
    assert entry("layers.3.input_norm", "llama")[3] == "model.layers.3.input_layernorm"
    assert entry("layers.0.out", "opt")[3] == "model.decoder.layers.0 output"


@pytest.mark.parametrize("case", ["llama_mha", "llama_rope_dynamic", "openllama_default", "opt_350m_like", "opt_preln"])
def test_tracing_does_not_change_the_numbers(case):
    """Bitwise the same outputs, cache steps included, with a trace and without."""
    path = os.path.join(GOLDEN, "models", case)
    plain, traced = refimpl.load(path), refimpl.load(path)
    ids = np.arange(3, 15)[None] % plain.config.vocab_size
    a = plain(input_ids=ids[:, :-1], use_cache=True, output_hidden_states=True)
    b = traced(input_ids=ids[:, :-1], use_cache=True, output_hidden_states=True, trace=Trace())
    a2 = plain(input_ids=ids[:, -1:], past_key_values=a.past_key_values, use_cache=True)
    trace = Trace()
    b2 = traced(input_ids=ids[:, -1:], past_key_values=b.past_key_values, use_cache=True, trace=trace)
    for x, y in [(a.logits, b.logits), (a2.logits, b2.logits), *zip(a.hidden_states, b.hidden_states)]:
        assert np.array_equal(x, y)
    assert trace["layers.0.attn.scores"].shape[-1] == ids.shape[1]  # cached + new keys
    assert trace["layers.0.attn.q"].shape[2] == 1  # new tokens only


def test_recorder_semantics():
    t = Trace()
    value = np.ones(3)
    t("a", value)
    value[0] = 5.0  # the trace keeps a copy taken when the value was recorded
    layer = t.scope("layers.3")
    layer.scope("attn")("q", np.zeros(2))
    assert list(t) == ["a", "layers.3.attn.q"] and t["a"][0] == 1.0 and len(t) == 2
    with pytest.raises(ValueError, match="recorded twice"):
        t("a", value)
    assert NO_TRACE("x", value) is None and NO_TRACE.scope("layers.0") is NO_TRACE


def test_no_trace_costs_little():
    """Tracing off adds one no-op call per record point: a few percent of a forward pass on this tiny model, where
    it weighs most, and far less on real sizes (docs/oracle.md quotes the measured figures)."""
    model = refimpl.load(os.path.join(GOLDEN, "models", "llama_mha"))
    ids = np.arange(3, 35)[None]
    calls = []

    class Counting:
        def __call__(self, name, value):
            calls.append(name)

        def scope(self, name):
            return self

    model(input_ids=ids, trace=Counting())
    per_call = min(timed(lambda: [NO_TRACE("x", ids) for _ in range(1000)]) for _ in range(5)) / 1000
    forward = min(timed(lambda: model(input_ids=ids)) for _ in range(10))
    assert len(calls) * per_call < 0.1 * forward, (len(calls), per_call, forward)


def timed(f):
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def test_trace_selection_keeps_only_the_asked_layers_and_ops():
    from refimpl.trace import selection

    model = refimpl.load(os.path.join(GOLDEN, "models", "llama_mha"))
    full, picked = Trace(), Trace(keep=selection({1}, ["attn.q*", "mlp.down"]))
    model(input_ids=[[1, 17, 42]], trace=full)
    model(input_ids=[[1, 17, 42]], trace=picked)
    expected = [n for n in full if not n.startswith("layers.") or n in
                ("layers.1.attn.q", "layers.1.attn.q_rope", "layers.1.mlp.down")]
    assert list(picked) == expected and "logits" in picked
    for name in picked:
        np.testing.assert_array_equal(picked[name], full[name])
    assert picked.shapes["layers.1.attn.q"] == full["layers.1.attn.q"].shape


def test_golden_pack_with_layers_ops_and_summaries(tmp_path):
    """--layers / --ops keep a 7B pack small; --summary is taken as values are recorded, with the shapes kept."""
    import json

    from refimpl import oracle_cli
    from refimpl.pack import SUMMARY_FIELDS, read_pack

    out = tmp_path / "p.safetensors"
    assert oracle_cli.main(["golden", f"{GOLDEN}/models/llama_mha", "--ids", "1,17,42", "-o", str(out),
                            "--layers", "0-1", "--ops", "attn.scores,mlp.*", "--summary"]) == 0
    pack = read_pack(out)
    layer_names = [n for n in pack.tensors if n.startswith("layers.")]
    assert layer_names and all(n.split(".", 2)[2] == "attn.scores" or n.split(".", 2)[2].startswith("mlp.")
                               for n in layer_names)
    assert {n.split(".")[1] for n in layer_names} == {"0", "1"}
    assert pack.tensors["layers.0.attn.scores"].shape == (len(SUMMARY_FIELDS),)
    assert pack.tensors["logits"].shape[-1] == refimpl.read_config(f"{GOLDEN}/models/llama_mha").vocab_size
    shapes = json.loads(pack.metadata["summary_shapes"])
    assert shapes["layers.0.attn.scores"][-2:] == [3, 3]
    with pytest.raises(refimpl.InputError, match="--layers"):
        oracle_cli.parse_layers("0-x")
