"""Properties the forward pass must have whatever the weights: checked with hypothesis on the golden checkpoints."""
import dataclasses
import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import refimpl
from refimpl import rope
from refimpl.ops import apply_rotary
from golden_cases import GOLDEN

FAMILIES = ["llama_gqa_bias", "openllama_default", "opt_350m_like", "opt_preln", "llama_rope_yarn"]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@functools.lru_cache(maxsize=None)
def model(case, dtype=np.float32):
    return refimpl.load(f"{GOLDEN}/models/{case}", dtype=dtype)


def token_ids(draw, case, batch, length):
    vocab = model(case).config.vocab_size
    return np.array(draw(st.lists(st.lists(st.integers(3, vocab - 1), min_size=length, max_size=length),
                                  min_size=batch, max_size=batch)))


@st.composite
def batch_of(draw, case, max_len=24):
    length = draw(st.integers(2, max_len))
    return token_ids(draw, case, draw(st.integers(1, 2)), length)


@pytest.mark.parametrize("case", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_causality(case, data):
    """Changing tokens after position p leaves the logits of positions <= p bit-for-bit unchanged."""
    ids = data.draw(batch_of(case))
    p = data.draw(st.integers(0, ids.shape[1] - 2))
    changed = ids.copy()
    changed[:, p + 1:] = token_ids(data.draw, case, ids.shape[0], ids.shape[1] - p - 1)
    m = model(case)
    a, b = m(input_ids=ids).logits, m(input_ids=changed).logits
    np.testing.assert_array_equal(a[:, :p + 1], b[:, :p + 1])


@pytest.mark.parametrize("case", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_cached_decoding_equals_full_forward(case, data):
    """A prefix forward followed by single-token steps with the cache gives the full forward's logits."""
    ids = data.draw(batch_of(case))
    split = data.draw(st.integers(1, ids.shape[1] - 1))
    m = model(case)
    full = m(input_ids=ids).logits
    out = m(input_ids=ids[:, :split], use_cache=True)
    steps = [out.logits]
    for t in range(split, ids.shape[1]):
        out = m(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    # different matmul shapes, different BLAS blocking: fp32 rounding only (~1e-6 here)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
    assert out.past_key_values[0][0].shape[2] == ids.shape[1]


@pytest.mark.parametrize("case", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_left_padded_batch_equals_rows_alone(case, data):
    """Each row of a left-padded batch gives, at its real tokens, the logits it gives alone."""
    lengths = data.draw(st.lists(st.integers(1, 20), min_size=2, max_size=3))
    width = max(lengths)
    m = model(case)
    rows = [token_ids(data.draw, case, 1, n)[0] for n in lengths]
    ids = np.full((len(rows), width), m.config.pad_token_id or 0)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    # positions counted from each row's first real token, as generate() does (OPT derives them from the mask itself)
    positions = None if m.family == "opt" else np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    batch = m(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for i, row in enumerate(rows):
        alone = m(input_ids=row[None]).logits[0]
        np.testing.assert_allclose(batch[i, width - len(row):], alone, atol=1e-5, rtol=0)


def _as_mha(gqa):
    """The same model with every key/value head stored n_rep times: plain multi-head attention."""
    cfg = gqa.config
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    mha_cfg = dataclasses.replace(cfg, num_key_value_heads=cfg.num_attention_heads)

    def repeat_heads(w):  # [Hkv*Dh, ...] -> [Hkv*n_rep*Dh, ...], head j of the result is kv head j // n_rep
        return np.repeat(w.reshape(cfg.num_key_value_heads, cfg.head_dim, *w.shape[1:]), n_rep, axis=0).reshape(
            cfg.num_attention_heads * cfg.head_dim, *w.shape[1:])

    layers = []
    for layer in gqa.params["layers"]:
        layer = dict(layer)
        for name in ("k_proj", "v_proj", "k_proj_bias", "v_proj_bias"):
            if name in layer:
                layer[name] = repeat_heads(layer[name])
        layers.append(layer)
    return type(gqa)(mha_cfg, dict(gqa.params, layers=layers), gqa.dtype)


@SETTINGS
@given(data=st.data())
def test_gqa_equals_mha_with_repeated_heads(data):
    gqa = model("llama_gqa_bias")
    assert gqa.config.num_key_value_heads < gqa.config.num_attention_heads
    ids = data.draw(batch_of("llama_gqa_bias"))
    np.testing.assert_allclose(gqa(input_ids=ids).logits, _as_mha(gqa)(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama_mha", "llama_rope_llama3", "llama_rope_longrope", "llama_rope_yarn"])
@SETTINGS
@given(m=st.integers(0, 200), n=st.integers(0, 200), shift=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(case, m, n, shift, seed):
    """<R(m) q, R(n) k> == <R(m+s) q, R(n+s) k> for the static rope types (float64 tables)."""
    cfg = model(case).config
    state = rope.llama_rope_state(cfg, np.float64)
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 1, cfg.head_dim))

    def score(pm, pn):
        cos, sin = rope.llama_cos_sin(state, np.array([[pm, pn]]), np.float64)
        return float(np.sum(apply_rotary(q, cos[:, :1], sin[:, :1]) * apply_rotary(k, cos[:, 1:], sin[:, 1:])))

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-9 * cfg.head_dim)


@pytest.mark.parametrize("case", ["llama_mha", "openllama_default", "opt_preln"])
@SETTINGS
@given(data=st.data())
def test_loss_is_cross_entropy_of_the_returned_logits(case, data):
    ids = data.draw(batch_of(case))
    labels = ids.copy()
    labels[:, 0] = -100
    if ids.shape[1] > 2 and data.draw(st.booleans()):
        labels[:, -1] = -100  # ignored targets drop out of the mean
    out = model(case)(input_ids=ids, labels=labels)
    logits = out.logits[:, :-1].astype(np.float64)
    target = labels[:, 1:]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = target != -100
    expected = -np.mean(np.take_along_axis(logp, np.where(keep, target, 0)[..., None], -1)[..., 0][keep])
    assert out.loss.dtype == np.float32
    assert float(out.loss) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("case", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_float64_and_float32_agree(case, data):
    ids = data.draw(batch_of(case))
    low = model(case)(input_ids=ids, output_hidden_states=True, output_attentions=True, use_cache=True)
    high = model(case, np.float64)(input_ids=ids, output_hidden_states=True, output_attentions=True, use_cache=True)
    np.testing.assert_allclose(low.logits, high.logits, atol=1e-5, rtol=0)  # fp32 rounding of a small model
    for name in ("logits", "hidden_states", "attentions", "past_key_values"):
        for a, b in zip(arrays(getattr(low, name)), arrays(getattr(high, name))):
            assert a.dtype == np.float32 and b.dtype == np.float64, name


def arrays(value):
    """Every array inside an output field (tuples of arrays, tuples of (k, v) pairs)."""
    if isinstance(value, (tuple, list)):
        return [a for item in value for a in arrays(item)]
    return [np.asarray(value)]


@pytest.mark.parametrize("case", ["llama_seqcls", "openllama_seqcls", "opt_seqcls", "opt_qa", "llama_base", "opt_base"])
def test_head_outputs_keep_the_compute_dtype(case):
    for dtype in (np.float32, np.float64):
        m = model(case, dtype)
        out = m(input_ids=[[5, 6, 7, 8]], output_hidden_states=True)
        for name in out.keys():
            for array in arrays(getattr(out, name)):
                assert array.dtype == dtype, (case, name, array.dtype)
