"""Peak memory and load time of refimpl's checkpoint loader, against transformers, on a ~1 GB fp32 Llama.

    python bench/bench_load.py [--runs 3] [--layers 16]

Builds a random Llama checkpoint (vocab 32000, hidden 1024, 16 layers: about 1.1 GB of fp32 weights) with
transformers in a temporary folder, never in the repository, plus an fp16 and a .bin copy. Each measurement runs in
a fresh Python process and reports that process's peak resident memory (ru_maxrss) and the wall time of the load
and of one forward step (1 x 16 tokens). Medians of --runs runs. Needs torch + transformers (the [golden] extra).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each child process does; it prints {"load_s", "forward_s", "maxrss_kib"} as JSON.
CHILD = r"""
import json, resource, sys, time
mode, path = sys.argv[1], sys.argv[2]
ids = [[(7 * i) % 32000 + 3 for i in range(16)]]
if mode.startswith("hf"):
    import torch, transformers
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    loaded = time.perf_counter()
    if mode == "hf-forward":
        model(torch.tensor(ids)).logits
else:
    import numpy as np, refimpl
    start = time.perf_counter()
    if mode == "refimpl-eager":  # weights_dtype=float32: every matrix converted at load (the old default)
        model = refimpl.load(path, weights_dtype=np.float32)
    elif mode != "baseline":
        model = refimpl.load(path)  # matrices stay as stored, widened per product (refimpl/stored.py)
    loaded = time.perf_counter()
    if mode in ("refimpl-forward", "refimpl-eager"):
        model(input_ids=ids).logits
done = time.perf_counter()
print(json.dumps({"load_s": loaded - start, "forward_s": done - loaded,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def build(folder: str, layers: int) -> None:
    """Random Llama checkpoints in folder/fp32 (safetensors), folder/fp32-bin (.bin), folder/fp16 (safetensors)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=layers, num_attention_heads=16, max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(os.path.join(folder, "fp32"), max_shard_size="10GB")
    model.save_pretrained(os.path.join(folder, "fp32-bin"), max_shard_size="10GB", safe_serialization=False)
    model.half().save_pretrained(os.path.join(folder, "fp16"), max_shard_size="10GB")


def measure(mode: str, path: str, runs: int) -> dict:
    results = []
    for _ in range(runs):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", CHILD, mode, path], capture_output=True, text=True, env=env,
                             check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def weights_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".safetensors", ".bin")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)  # internal: the builder process
    args = parser.parse_args(argv)
    if args.build:
        build(args.build, args.layers)
        return 0
    with tempfile.TemporaryDirectory(prefix="refimpl-bench-") as folder:
        # built in its own process: Linux carries ru_maxrss across fork + exec, so the measuring children must be
        # started by a parent that never held the model
        subprocess.run([sys.executable, os.path.abspath(__file__), "--build", folder, "--layers", str(args.layers)],
                       check=True)
        paths = {name: os.path.join(folder, name) for name in ("fp32", "fp32-bin", "fp16")}
        size = weights_bytes(paths["fp32"])  # fp32 file = the weights at the compute dtype
        print(f"checkpoint: Llama, {size / 2**30:.2f} GiB of fp32 weights; medians of {args.runs} fresh processes\n")
        rows = [
            ("python + numpy + refimpl imported", "baseline", "fp32"),
            ("refimpl load, fp32 safetensors", "refimpl-load", "fp32"),
            ("refimpl load + forward, fp32 safetensors", "refimpl-forward", "fp32"),
            ("refimpl load + forward, fp32 .bin", "refimpl-forward", "fp32-bin"),
            ("refimpl load + forward, fp16 kept stored", "refimpl-forward", "fp16"),
            ("refimpl load + forward, fp16 -> float32 at load", "refimpl-eager", "fp16"),
            ("transformers from_pretrained, fp32 safetensors", "hf-load", "fp32"),
            ("transformers from_pretrained + forward", "hf-forward", "fp32"),
        ]
        results = {label: measure(mode, paths[kind], args.runs) for label, mode, kind in rows}
    hf = results["transformers from_pretrained + forward"]
    print(f"{'case':48s} {'peak RSS':>10s} {'RSS/weights':>12s} {'load s':>8s} {'load/HF':>8s} {'load+fwd s':>11s} "
          f"{'vs HF':>7s}")
    for label, r in results.items():
        rss, total = r["maxrss_kib"] * 1024, r["load_s"] + r["forward_s"]
        print(f"{label:48s} {rss / 2**30:6.2f} GiB {rss / size:11.2f}x {r['load_s']:8.3f} "
              f"{r['load_s'] / hf['load_s']:7.3f}x {total:11.3f} {total / (hf['load_s'] + hf['forward_s']):6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
