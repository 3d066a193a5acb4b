"""Replays the calls stored in golden/cases/*.npz (made by transformers, golden/make_golden.py) on refimpl."""
from __future__ import annotations

import json
import os

import numpy as np

import refimpl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "golden")
CASES = sorted(f[:-4] for f in os.listdir(os.path.join(GOLDEN, "cases")) if f.endswith(".npz"))

# Forward arguments a call may carry; anything else in a call's kwargs is a transformers-only switch.
FORWARD_KWARGS = {"use_cache", "output_attentions", "output_hidden_states", "num_logits_to_keep"}

# Float32 tolerance per case where the project's 1e-5 does not hold. The trained model (golden/train.py) has logits
# up to ~14 where the random models' are ~5-10, and transformers' own fp32 rounding on them is already 9.7e-6
# (measured against refimpl float64, which stays within 1e-5); refimpl fp32 adds its own: 1.24e-5 on short.logits,
# 1.05e-5 on full.logits (hidden states <= 3.1e-6). So that one case gets twice the target in float32.
ATOL_FP32_CASE = {"llama_trained": 2e-5}


def load_case(case):
    data = np.load(os.path.join(GOLDEN, "cases", case + ".npz"))
    meta = json.loads(str(data["meta"]))
    return data, meta


def ours(out, key):
    """Our output for a golden key such as 'logits', 'hidden_states.2' or 'past_key_values.1.key'."""
    parts = key.split(".")
    value = getattr(out, parts[0])
    if parts[0] in ("hidden_states", "attentions"):
        return value[int(parts[1])]
    if parts[0] == "past_key_values":
        return value[int(parts[1])][0 if parts[2] == "key" else 1]
    return value


def replay(case, dtype=np.float32, model=None):
    """Yield (call name, key, expected, actual) for every stored output of every call, in the stored order."""
    data, meta = load_case(case)
    model = model or refimpl.load(os.path.join(GOLDEN, "models", case), dtype=dtype)
    pasts = {}
    for call in meta["calls"]:
        name = call["name"]
        kwargs = {arg: data[f"{name}.in.{arg}"] for arg in call["inputs"]}
        kwargs.update({k: v for k, v in call["kwargs"].items() if k in FORWARD_KWARGS})
        if call.get("past_from"):
            kwargs["past_key_values"] = pasts[call["past_from"]]
        out = model(**kwargs)
        pasts[name] = out.past_key_values
        prefix = f"{name}.out."
        for key in data.files:
            if key.startswith(prefix):
                yield name, key[len(prefix):], data[key], ours(out, key[len(prefix):])


def max_errors(case, dtype=np.float32):
    """{'call.key': max abs error} for one case."""
    return {f"{call}.{key}": float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
            if np.size(expected) else 0.0
            for call, key, expected, actual in replay(case, dtype)}


if __name__ == "__main__":  # python tests/golden_cases.py: the error table for the closing note
    for dtype in (np.float32, np.float64):
        print(f"\n{np.dtype(dtype).name}: case, max |logits err|, max |any output err|")
        for case in CASES:
            errors = max_errors(case, dtype)
            logit = max([v for k, v in errors.items() if "logits" in k] or [0.0])
            print(f"  {case:28s} {logit:.2e}  {max(errors.values()):.2e}")
