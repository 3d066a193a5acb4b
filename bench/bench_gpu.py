"""GPU rows of the llama-bench table: refimpl-cuda (fp32, fp16, int8) and transformers on torch CUDA (fp32, fp16).

    python bench/bench_gpu.py [--models llama-15m,llama-110m,opt-125m] [--runs 5]

Same random-weight models (the stories15M / stories110M Llama shapes, the OPT-125m shape) and definitions as
bench/bench_decode.py, timed after a warm-up with the device synchronised:
  pp128  one 128-token prompt forward into an empty cache, up to the last position's logits on the host (refimpl-cuda:
         what generate's first step does, model._decoder_call + model._last_logits; transformers: Llama keeps the
         last position's logits only, OPT computes all 128);
  tg64   64 single-token forwards with a KV cache, greedy between them (refimpl-cuda: model.generate of 64 new
         tokens after a 1-token prompt, eos disabled: refimpl's generate loop, logits of the last position to the
         host each step; transformers: its forward in a loop with argmax on the device).
Columns: tok/s, memory (refimpl-cuda: bytes of the uploaded weights and CuPy's pool high water; torch:
torch.cuda.max_memory_allocated) and, for tg64, the fraction of the device's bandwidth limit reached: weight bytes
read per token / time per token over 2 * memoryClockRate * memoryBusWidth / 8 (device properties).
Prints "no GPU backend: <reason>" and exits 0 where check_cuda() (accel/cuda/device.py) says the backend cannot run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import numpy as np  # noqa: E402

from refimpl_accel.cuda.device import bandwidth_limit, check_cuda  # noqa: E402


def timed(fn, sync, runs):
    fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def refimpl_cuda_rows(folder, fmt, runs, pp, tg):
    import cupy

    import refimpl

    model = refimpl.load(folder, backend="cuda", weights=fmt)
    pool = cupy.get_default_memory_pool()
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, pp))
    mask, positions = np.ones((1, pp), np.int64), np.arange(pp)[None]
    sync = cupy.cuda.Device().synchronize

    def prompt():
        h, _ = model._decoder_call(ids, mask, positions, model.new_cache(1, pp))
        model._last_logits(h)

    def decode():
        model.generate(np.array([[3]]), max_new_tokens=tg, eos_token_id=[], do_sample=False)

    t_pp, t_tg = timed(prompt, sync, runs), timed(decode, sync, runs)
    return pp / t_pp, tg / t_tg, model.weight_bytes(), pool.total_bytes(), model.weight_bytes() * tg / t_tg


def torch_rows(folder, dtype_name, runs, pp, tg):
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype).cuda().eval()
    ids = torch.randint(1, model.config.vocab_size, (1, pp), device="cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    keep = {"num_logits_to_keep": 1} if model.config.model_type == "llama" else {}  # OPT has no such argument

    @torch.no_grad()
    def prompt():
        model(input_ids=ids, use_cache=True, **keep)

    @torch.no_grad()
    def decode():
        past, token = None, torch.tensor([[1]], device="cuda")
        for _ in range(tg):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    torch.cuda.reset_peak_memory_stats()
    t_pp, t_tg = timed(prompt, torch.cuda.synchronize, runs), timed(decode, torch.cuda.synchronize, runs)
    return pp / t_pp, tg / t_tg, weight_bytes, torch.cuda.max_memory_allocated(), weight_bytes * tg / t_tg


def main():
    from bench_decode import PP, TG, make_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama-15m,llama-110m,opt-125m")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    ok, reason = check_cuda()
    if not ok:
        print(f"no GPU backend: {reason}")
        return 0
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    limit = bandwidth_limit(props)
    print(f"device: {reason}; bandwidth limit {limit / 1e9:.0f} GB/s")
    print(f"{'model':<12} {'engine':<24} {'pp128 tok/s':>12} {'tg64 tok/s':>11} {'weights MB':>11} "
          f"{'peak MB':>8} {'tg % of BW':>10}")
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            folder, _ = make_model(name, root, ())
            rows = [(f"refimpl-cuda {fmt}", refimpl_cuda_rows, fmt) for fmt in ("fp32", "fp16", "int8")]
            try:
                import torch
                import transformers  # noqa: F401

                if torch.cuda.is_available():
                    rows += [(f"transformers-cuda {d}", torch_rows, d) for d in ("float32", "float16")]
            except ImportError:
                pass
            for label, fn, fmt in rows:
                pp_rate, tg_rate, wbytes, peak, bw = fn(folder, fmt, args.runs, PP, TG)
                print(f"{name:<12} {label:<24} {pp_rate:>12.1f} {tg_rate:>11.1f} {wbytes / 1e6:>11.1f} "
                      f"{peak / 1e6:>8.1f} {100 * bw / limit:>9.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
