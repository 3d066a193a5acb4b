#!/usr/bin/env python
"""Goldens for the trained models golden/models/llama_trained and opt_trained (made by golden/train.py).

transformers computes in float32 from the stored float16 weights (from_pretrained(torch_dtype=torch.float32),
eager attention, eval, no_grad, one thread) on real held-out text (golden/trained/heldout.txt), and this writes

  golden/cases/<name>.npz               the standard calls of make_golden.py (see golden/README.md): `full`
                                        (2 held-out docstrings of 64 tokens, row 1 left-padded by 6, labels,
                                        hidden states, attentions, cache), `prefix`, `step` (cached decode) and
                                        `short` (16 tokens); replayed by tests/test_golden.py like every case
  golden/generation/<name>.npz          text in, text out (make_golden.build_text_generation's format): greedy
                                        generations of 24 tokens for docstring-style prompts; replayed by
                                        tests/test_generation.py's text test

and refreshes golden/manifest.json (make_golden.write_manifest, which hashes every file under models/, cases/
and generation/).

Usage:
    python golden/make_trained_goldens.py                     # both models' files and the manifest
    python golden/make_trained_goldens.py --name opt_trained  # one model's
    python golden/make_trained_goldens.py --check             # recompute and compare bitwise with the stored files
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden as mg  # noqa: E402
from transformers import GPT2Tokenizer, LlamaForCausalLM, LlamaTokenizer, OPTForCausalLM  # noqa: E402

CASES = {
    "llama_trained": mg.Case("llama_trained", "llama", LlamaForCausalLM, 1234,
                             "trained Llama (golden/train.py: 4 layers, hidden 192, vocab 2000, fp16 weights computed "
                             "in fp32) on held-out Python docstrings: trained activations, sharp softmaxes", {},
                             labels=True),
    "opt_trained": mg.Case("opt_trained", "opt", OPTForCausalLM, 1234,
                           "trained OPT (golden/train.py: 4 layers, hidden 192, byte-level BPE vocab 2000, fp16 weights "
                           "computed in fp32) on held-out Python docstrings: trained activations, sharp softmaxes", {},
                           labels=True),
}
TOKENIZERS = {"llama_trained": LlamaTokenizer, "opt_trained": GPT2Tokenizer}
PAD_ID = {"llama_trained": 0, "opt_trained": 1}  # <unk> (Llama has no pad token), <pad>
S = 64
PROMPTS = ["Return the", "Return True if the", "Create a new", "This module provides",
           "Raise ValueError if", "Set the value of"]
MAX_NEW = 24


def load(root: Path, name: str):
    model = CASES[name].cls.from_pretrained(root / "models" / name, torch_dtype=torch.float32,
                                         attn_implementation=mg.ATTN)
    return model.eval(), TOKENIZERS[name].from_pretrained(root / "models" / name)


def heldout_ids(root: Path, tok, n: int) -> list[list[int]]:
    """The first n held-out docstrings with at least S tokens (bos + text, as the tokenizer frames them), cut to S
    tokens."""
    rows = []
    for line in (root / "trained" / "heldout.txt").read_text(encoding="utf-8").splitlines():
        ids = tok(line).input_ids  # <s> text (Llama), </s> text (OPT)
        if len(ids) >= S:
            rows.append(ids[:S])
        if len(rows) == n:
            return rows
    raise ValueError("not enough long held-out docstrings")


def calls(root: Path, tok, name: str) -> list:
    rows = heldout_ids(root, tok, 3)
    ids = torch.tensor(rows[:2], dtype=torch.int64)
    mask = torch.ones_like(ids)
    ids[1, mg.N_LEFT_PAD:] = ids[1, :S - mg.N_LEFT_PAD].clone()   # row 1: 6 pads then text
    ids[1, :mg.N_LEFT_PAD] = PAD_ID[name]
    mask[1, :mg.N_LEFT_PAD] = 0
    labels = ids.masked_fill(mask == 0, -100)
    short = torch.tensor([rows[2][:mg.SHORT]], dtype=torch.int64)
    return [mg.Call("full", {"input_ids": ids, "attention_mask": mask, "labels": labels}, mg.flags(True, True, True)),
            mg.Call("prefix", {"input_ids": ids[:, :-1].contiguous(), "attention_mask": mask[:, :-1].contiguous()},
                    mg.flags(True)),
            mg.Call("step", {"input_ids": ids[:, -1:].contiguous(), "attention_mask": mask}, mg.flags(True),
                    past_from="prefix"),
            mg.Call("short", {"input_ids": short}, mg.flags(False))]


@torch.no_grad()
def build(root: Path, out: Path, name: str) -> tuple[Path, Path]:
    NAME, CASE = name, CASES[name]
    model, tok = load(root, name)
    cs = calls(root, tok, name)
    arrays = mg.run_calls(CASE, model, cs)
    arrays["meta"] = np.array(json.dumps(mg.meta_dict(CASE, cs), sort_keys=False))
    (out / "cases").mkdir(parents=True, exist_ok=True)
    case_path = out / "cases" / f"{NAME}.npz"
    mg.write_npz(case_path, arrays)
    lg = arrays["full.out.logits"]
    print(f"cases/{NAME}.npz {case_path.stat().st_size/1e3:.1f} kB; full logits std {lg.std():.2f}, "
          f"max |logit| {np.abs(lg).max():.1f}, loss {float(arrays['full.out.loss']):.3f}", flush=True)

    gen, meta = {}, {"model": NAME, "tokenizer": type(tok).__name__, "runs": []}
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok.encode(prompt)])
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
        gen[f"prompt{i}.in.input_ids"] = mg.to_np(ids)
        gen[f"prompt{i}.out.sequences"] = mg.to_np(seq)
        text = tok.decode(seq[0], skip_special_tokens=True)
        meta["runs"].append({"name": f"prompt{i}", "prompt": prompt, "kwargs": {"max_new_tokens": MAX_NEW},
                             "text": text})
        print(f"  {text!r}", flush=True)
    gen["meta"] = np.array(json.dumps(meta, ensure_ascii=False))
    (out / "generation").mkdir(parents=True, exist_ok=True)
    gen_path = out / "generation" / f"{NAME}.npz"
    mg.write_npz(gen_path, gen)
    print(f"generation/{NAME}.npz {gen_path.stat().st_size/1e3:.1f} kB", flush=True)
    return case_path, gen_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--name", choices=sorted(CASES), action="append", help="one model (repeatable); default: all")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = args.name or sorted(CASES)
    if args.check:
        with tempfile.TemporaryDirectory() as td:
            new = [p for name in names for p in build(mg.GOLDEN, Path(td), name)]
            same = [(mg.GOLDEN / p.parent.name / p.name).read_bytes() == p.read_bytes() for p in new]
        print("CHECK PASSED" if all(same) else f"CHECK FAILED {same}")
        return 0 if all(same) else 1
    for name in names:
        build(mg.GOLDEN, mg.GOLDEN, name)
    mg.write_manifest(mg.GOLDEN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
