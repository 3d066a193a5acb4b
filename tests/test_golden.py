"""refimpl against the outputs transformers stored in golden/ (see golden/README.md for the cases)."""
import numpy as np
import pytest

import refimpl
from golden_cases import ATOL_FP32_CASE, CASES, GOLDEN, replay

# fp32 on both sides, different BLAS and summation orders: the golden models reach at most ~5e-6 on logits
# of magnitude ~10 (see the closing note of the spec issue). 1e-5 is the project's target for logits and is used
# for every output (hidden states, attention maps, cache, losses), except the trained model in fp32: ATOL_FP32_CASE.
ATOL_FP32 = 1e-5
# float64 audit mode against the same fp32 goldens: the difference is transformers' own fp32 rounding, the same
# size as above (refimpl float64 is the more exact of the two).
ATOL_FP64 = 1e-5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype, atol", [(np.float32, ATOL_FP32), (np.float64, ATOL_FP64)], ids=["fp32", "fp64"])
def test_case_matches_transformers(case, dtype, atol):
    if dtype == np.float32:
        atol = ATOL_FP32_CASE.get(case, atol)
    checked = 0
    for call, key, expected, actual in replay(case, dtype):
        assert actual is not None, f"{case}/{call}: refimpl returned no {key}"
        actual = np.asarray(actual)
        assert actual.shape == expected.shape, f"{case}/{call}/{key}: shape {actual.shape} != {expected.shape}"
        if np.issubdtype(expected.dtype, np.floating):
            assert actual.dtype == dtype, f"{case}/{call}/{key}: dtype {actual.dtype}, expected {np.dtype(dtype)}"
        error = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
        assert error <= atol, f"{case}/{call}/{key}: max abs error {error:.3e} > {atol:.0e}"
        checked += 1
    assert checked > 0, f"{case}: no stored output was compared"


def test_every_case_has_logits_or_hidden_state():
    """Guard against a golden file that stores nothing worth comparing."""
    for case in CASES:
        keys = {key for _, key, _, _ in replay(case)}
        assert keys & {"logits", "last_hidden_state", "start_logits"}, f"{case}: stores {sorted(keys)}"


def test_golden_covers_the_required_cases():
    required = {"llama_mha", "llama_gqa_bias", "llama_rope_linear", "llama_rope_dynamic", "llama_rope_yarn",
                "llama_rope_longrope", "llama_rope_llama3", "llama_tp2", "llama_tied", "openllama_default",
                "openllama_flags_off", "opt_preln", "opt_350m_like", "opt_nobias_noaffine"}
    assert required <= set(CASES)


def test_dynamic_rope_state_is_exercised():
    """The dynamic golden replays calls that grow past max_position_embeddings, reset, and grow again."""
    model = refimpl.load(f"{GOLDEN}/models/llama_rope_dynamic")
    seen = []
    for call, key, _, _ in replay("llama_rope_dynamic", model=model):
        if key == "logits":
            seen.append((call, model.rope_state.max_seq_len_cached))
    lengths = [length for _, length in seen]
    mpe = model.config.max_position_embeddings
    grown = [i for i, length in enumerate(lengths) if length > mpe]
    reset = [i for i, length in enumerate(lengths) if length == mpe and i > grown[0]]
    assert grown and reset and any(i > reset[0] for i in grown), seen  # grow, reset, grow again
