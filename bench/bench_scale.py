"""Real sizes: Llama-2-7B-shaped checkpoints (fp16 and bf16 sharded safetensors), an OPT-1.3b-shaped fp16
pytorch_model.bin and, with --huge, a 13B fp16 shape larger than this machine's memory, through every engine and mode.

    python bench/bench_scale.py                      # 7b-fp16, 7b-bf16, opt-1.3b; every row
    python bench/bench_scale.py --huge               # adds 13b-fp16 (26 GB: streamed from disk on a 24 GB machine)
    python bench/bench_scale.py --shapes 7b-fp16 --rows refimpl,accel-int8 --decode 4

Each checkpoint is written with random weights into a temporary folder (deleted at the end, with accel's weight
caches). Each row runs in its own process; a watchdog samples its anonymous and file-backed RSS and stops it when
the machine's available memory falls under --reserve, printing "would not fit". Columns: peak anonymous and
file-backed RSS, load seconds (accel: conversion into its cache, the first time), a 16-token forward, a 128-token
prompt in tokens/s, decode seconds per token (median over --decode steps after a 16-token prompt), and decode as a
fraction of its limit: bytes of weights read per token / the DRAM bandwidth measured at the start (for a checkpoint
larger than RAM: / the disk read speed measured on the checkpoint itself).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
LLAMA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40, vocab_size=32000)
OPT_1_3B = dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32, vocab_size=50272)
SHAPES = {  # name -> (family, sizes, element type, file format, shards) as the Hub ships them
    "7b-fp16": ("llama", LLAMA_7B, "F16", "safetensors", 2),
    "7b-bf16": ("llama", LLAMA_7B, "BF16", "safetensors", 2),
    "opt-1.3b": ("opt", OPT_1_3B, "F16", "bin", 1),
    "13b-fp16": ("llama", LLAMA_13B, "F16", "safetensors", 3),
    # seconds-long shapes that check this script itself (--shapes tiny-llama,tiny-opt)
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=100), "BF16", "safetensors", 2),
    "tiny-opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=100), "F16", "bin", 1),
}
DEFAULT_SHAPES = ("7b-fp16", "7b-bf16", "opt-1.3b")
ROWS = ("refimpl", "refimpl-f64", "refimpl-golden", "accel-fp16", "accel-bf16", "accel-int8",
        "torch-fp16", "torch-bf16", "torch-fp32")
TORCH_DTYPE = {"F16": "torch-fp16", "BF16": "torch-bf16"}


# --- writing checkpoints (random weights, never the whole model in memory) -----------------------------------------

def llama_tensors(c):
    """(name, shape, is_norm) of a Llama checkpoint as transformers' save_pretrained names them."""
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    yield "model.embed_tokens.weight", (V, D), False
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{name}.weight", (D, D), False
        yield p + "mlp.gate_proj.weight", (F, D), False
        yield p + "mlp.up_proj.weight", (F, D), False
        yield p + "mlp.down_proj.weight", (D, F), False
        yield p + "input_layernorm.weight", (D,), True
        yield p + "post_attention_layernorm.weight", (D,), True
    yield "model.norm.weight", (D,), True
    yield "lm_head.weight", (V, D), False


def opt_tensors(c):
    """(name, shape, is_norm) of an OPT checkpoint as the Hub's pytorch_model.bin names them ("decoder." prefix)."""
    D, F, V = c["hidden_size"], c["ffn_dim"], c["vocab_size"]
    yield "decoder.embed_tokens.weight", (V, D), False
    yield "decoder.embed_positions.weight", (2050, D), False
    for i in range(c["num_hidden_layers"]):
        p = f"decoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield p + f"self_attn.{name}.weight", (D, D), False
            yield p + f"self_attn.{name}.bias", (D,), False
        yield p + "self_attn_layer_norm.weight", (D,), True
        yield p + "self_attn_layer_norm.bias", (D,), False
        yield p + "fc1.weight", (F, D), False
        yield p + "fc1.bias", (F,), False
        yield p + "fc2.weight", (D, F), False
        yield p + "fc2.bias", (D,), False
        yield p + "final_layer_norm.weight", (D,), True
        yield p + "final_layer_norm.bias", (D,), False
    yield "decoder.final_layer_norm.weight", (D,), True
    yield "decoder.final_layer_norm.bias", (D,), False


class RandomPool:
    """N(0, 0.02) values in the stored element type, handed out cyclically (fast to write, realistic magnitudes)."""

    def __init__(self, kind, size=1 << 24, seed=0):
        values = np.random.default_rng(seed).standard_normal(size, dtype=np.float32) * np.float32(0.02)
        self.pool = values.astype(np.float16) if kind == "F16" else (values.view(np.uint32) >> 16).astype(np.uint16)
        one = np.float16(1.0) if kind == "F16" else np.uint16(0x3F80)
        self.one = one
        self.offset = 0

    def chunks(self, count, is_norm):
        """The tensor's elements in chunks of at most the pool's size."""
        if is_norm:
            yield np.full(count, self.one, dtype=self.pool.dtype)
            return
        while count > 0:
            n = min(count, self.pool.size - self.offset)
            yield self.pool[self.offset:self.offset + n]
            self.offset = (self.offset + n) % self.pool.size
            count -= n


def write_safetensors_shards(folder, tensors, kind, shards):
    """Sharded safetensors (model-0000k-of-0000n.safetensors + index), streamed tensor by tensor."""
    tensors = list(tensors)
    total = sum(int(np.prod(shape)) * 2 for _, shape, _ in tensors)
    per_shard, groups, current, size = total / shards, [], [], 0
    for t in tensors:
        current.append(t)
        size += int(np.prod(t[1])) * 2
        if size >= per_shard * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    pool, weight_map = RandomPool(kind), {}
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0  # as save_pretrained writes it (transformers reads it)
        for name, shape, _ in group:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(os.path.join(folder, file), "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name, shape, is_norm in group:
                for chunk in pool.chunks(int(np.prod(shape)), is_norm):
                    f.write(chunk.tobytes())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def write_torch_bin(folder, tensors, kind):
    """pytorch_model.bin written by torch.save, as the OPT checkpoints ship (one state dict of fp16 tensors)."""
    import torch

    pool, state = RandomPool(kind), {}
    for name, shape, is_norm in tensors:
        values = np.concatenate(list(pool.chunks(int(np.prod(shape)), is_norm))).reshape(shape)
        state[name] = torch.from_numpy(values.copy())
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))


def write_checkpoint(shape_name, folder):
    family, sizes, kind, fmt, shards = SHAPES[shape_name]
    os.makedirs(folder, exist_ok=True)
    if family == "llama":
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1,
                  "eos_token_id": 2, "tie_word_embeddings": False,
                  "torch_dtype": {"F16": "float16", "BF16": "bfloat16"}[kind], **sizes}
        tensors = llama_tensors(sizes)
    else:
        config = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_function": "relu",
                  "max_position_embeddings": 2048, "word_embed_proj_dim": sizes["hidden_size"],
                  "do_layer_norm_before": True, "enable_bias": True, "bos_token_id": 2, "eos_token_id": 2,
                  "pad_token_id": 1, "torch_dtype": "float16", **sizes}
        tensors = opt_tensors(sizes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if fmt == "safetensors":
        write_safetensors_shards(folder, tensors, kind, shards)
    else:
        write_torch_bin(folder, tensors, kind)
    return folder


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


# --- what each row runs (in its own process) -----------------------------------------------------------------------

def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def child(row, path, args):
    """Run one row on one checkpoint; print one JSON line of measurements."""
    rng = np.random.default_rng(1)
    result = {}
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    prompt16 = rng.integers(3, vocab, size=16).tolist()
    prompt128 = rng.integers(3, vocab, size=args.prompt).tolist()
    if row.startswith("torch"):
        return child_torch(row, path, args, prompt16, prompt128)
    import refimpl

    options = {}
    if row == "refimpl-f64":
        options["dtype"] = np.float64
    if row.startswith("accel"):
        options.update(backend="numba", weights=row.split("-")[1], threads=args.threads,
                       cache_dir=os.path.join(args.workdir, "accel-cache"))
    model, result["load_s"] = timed(lambda: refimpl.load(path, **options))
    emit_partial(result)
    if row == "refimpl-golden":
        from refimpl.pack import make_pack, write_pack
        from refimpl.trace import selection

        out = os.path.join(args.workdir, "pack.safetensors")
        (tensors, metadata), result["forward16_s"] = timed(lambda: make_pack(
            model, [prompt16], summary=True, keep=selection(None, None)))
        write_pack(out, tensors, metadata)
        result["pack_mb"] = os.path.getsize(out) / 1e6
        return result
    _, result["forward16_s"] = timed(lambda: model(input_ids=[prompt16]))
    emit_partial(result)
    if args.prompt and row != "refimpl-f64":
        _, seconds = timed(lambda: model(input_ids=[prompt128], num_logits_to_keep=1)
                           if type(model).__name__.startswith("Llama") else model(input_ids=[prompt128]))
        result["prompt_tok_s"] = args.prompt / seconds
        emit_partial(result)
    result["decode_s"] = decode_times(lambda ids, past: model(input_ids=[ids], past_key_values=past, use_cache=True),
                                      prompt16, args.decode)
    return result


def decode_times(step, prompt, n):
    """Median seconds per decode step (greedy, KV cache) after a prompt, and the spread (min, max)."""
    out = step(prompt, None)
    times = []
    for _ in range(n):
        logits = out.logits.float().numpy() if hasattr(out.logits, "float") else np.asarray(out.logits)  # torch bf16
        token = int(np.argmax(logits[0, -1]))
        out, seconds = timed(lambda: step([token], out.past_key_values))
        times.append(seconds)
    return [statistics.median(times), min(times), max(times)]


def child_torch(row, path, args, prompt16, prompt128):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads or os.cpu_count())
    dtype = {"torch-fp16": torch.float16, "torch-bf16": torch.bfloat16, "torch-fp32": torch.float32}[row]
    result = {}
    model, result["load_s"] = timed(lambda: AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=dtype, attn_implementation="eager", low_cpu_mem_usage=True))
    emit_partial(result)
    with torch.no_grad():
        _, result["forward16_s"] = timed(lambda: model(torch.tensor([prompt16])))
        emit_partial(result)
        if args.prompt:
            _, seconds = timed(lambda: model(torch.tensor([prompt128])))
            result["prompt_tok_s"] = args.prompt / seconds
            emit_partial(result)
        result["decode_s"] = decode_times(
            lambda ids, past: model(torch.tensor([ids]), past_key_values=past, use_cache=True), prompt16, args.decode)
    return result


def emit_partial(result):
    """What is measured so far, so that a row stopped by the watchdog still reports it."""
    print("PARTIAL " + json.dumps(result), flush=True)


# --- the parent: processes, watchdog, table ------------------------------------------------------------------------

def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def rss(pid):
    """(anonymous, file-backed) resident bytes of a process, from /proc/PID/status."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    values[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values.get("RssAnon", 0), values.get("RssFile", 0)


def run_row(row, path, args):
    """The row in a child process under the watchdog -> its measurements, peaks and status."""
    command = [sys.executable, os.path.abspath(__file__), "--child", row, "--model", path, "--workdir", args.workdir,
               "--decode", str(args.decode), "--prompt", str(args.prompt), "--threads", str(args.threads or 0)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks, status = [0, 0], {"killed": False}

    def watch():
        while process.poll() is None:
            anon, file = rss(process.pid)
            peaks[0], peaks[1] = max(peaks[0], anon), max(peaks[1], file)
            if mem_available() < args.reserve * 2**30:
                status["killed"] = True
                process.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = process.communicate(timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        status["timeout"] = True
    watcher.join()
    result = {}
    for line in out.splitlines():
        if line.startswith("PARTIAL "):
            result.update(json.loads(line[8:]))
        elif line.startswith("RESULT "):
            result.update(json.loads(line[7:]))
    result.update(anon_gb=peaks[0] / 1e9, file_gb=peaks[1] / 1e9)
    if status["killed"]:
        result["status"] = "would not fit"
    elif status.get("timeout"):
        result["status"] = f"timeout {args.row_timeout}s"
    elif process.returncode != 0:
        result["status"] = "failed: " + (err.strip().splitlines() or ["?"])[-1][:100]
    else:
        result["status"] = "fits"
    return result


def dram_bandwidth():
    """GB/s of a streaming read by every core at once (np.add.reduce over its own 1 GiB of float32 each, NumPy
    releasing the GIL), best of 3: the decode limit of a memory-bound step (one core alone read 24 GB/s here, both 34)."""
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    parts = [np.ones(1 << 28, np.float32) for _ in range(cores)]
    with ThreadPoolExecutor(cores) as pool:
        best = min(timed(lambda: list(pool.map(np.add.reduce, parts)))[1] for _ in range(3))
    return sum(p.nbytes for p in parts) / best / 1e9


def widening_and_blas():
    """(seconds per element of NumPy's float16 -> float32 astype, float32 GEMM GFLOP/s of a 128-row prompt product):
    the denominators of the goals, measured on one 11008 x 4096 matrix, best of 3."""
    w16 = (np.random.default_rng(0).standard_normal((11008, 4096), dtype=np.float32) * 0.02).astype(np.float16)
    astype = min(timed(lambda: w16.astype(np.float32))[1] for _ in range(3)) / w16.size
    w32, x = w16.astype(np.float32), np.ones((128, 4096), np.float32)
    gemm = min(timed(lambda: x @ w32.T)[1] for _ in range(3))
    return astype, 2 * 128 * w32.size / gemm / 1e9


def matrix_parameters(shape_name):
    """Weights in the model's matrices (what a forward widens): embeddings excluded, lm_head included."""
    family, sizes, _, _, _ = SHAPES[shape_name]
    tensors = llama_tensors(sizes) if family == "llama" else opt_tensors(sizes)
    return sum(int(np.prod(shape)) for name, shape, _ in tensors if len(shape) == 2 and "embed" not in name)


def disk_bandwidth(path):
    """GB/s reading the start of the checkpoint's first file, evicted from the page cache by what was written after
    it (the file is larger than what the cache can hold); measured on 4 GiB."""
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    total, start = 0, time.perf_counter()
    with open(os.path.join(path, files[0]), "rb", buffering=0) as f:
        while total < 4 << 30:
            block = f.read(64 << 20)
            if not block:
                break
            total += len(block)
    return total / (time.perf_counter() - start) / 1e9


def weight_bytes_read(row, path, shape_name):
    """Bytes of weights one decode step reads: the checkpoint's matrices as stored (refimpl), or as packed (accel)."""
    family, sizes, kind, _, _ = SHAPES[shape_name]
    stored = folder_bytes(path) - os.path.getsize(os.path.join(path, "config.json"))
    if row.startswith("accel"):
        per = {"fp16": 2, "bf16": 2, "int8": 1.125}[row.split("-")[1]]
        return stored / 2 * per
    if row.startswith("torch"):
        return stored / 2 * {"torch-fp16": 2, "torch-bf16": 2, "torch-fp32": 4}[row]
    return stored


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows, bandwidth, disk):
    header = ("| shape | row | fits? | peak anon GB | peak file GB | load s | 16-tok fwd s | pp128 tok/s | "
              "decode s/tok (min-max) | of limit |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for shape_name, row, r in rows:
        decode = r.get("decode_s")
        limit = r.get("limit_s")
        print(f"| {shape_name} | {row} | {r['status']} | {r['anon_gb']:.2f} | {r['file_gb']:.2f} | "
              f"{fmt(r.get('load_s'), '.1f')} | {fmt(r.get('forward16_s'), '.2f')} | "
              f"{fmt(r.get('prompt_tok_s'), '.1f')} | "
              f"{'-' if decode is None else f'{decode[0]:.2f} ({decode[1]:.2f}-{decode[2]:.2f})'} | "
              f"{'-' if decode is None or limit is None else f'{limit / decode[0]:.0%} of {limit:.2f} s'} |")
    print(f"\nDRAM read bandwidth {bandwidth:.1f} GB/s" + (f"; disk read {disk:.2f} GB/s" if disk else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--huge", action="store_true", help="add the 13B fp16 shape (26 GB on disk)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--decode", type=int, default=3, help="decode steps timed per row")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length of the pp column (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="threads (0: all cores)")
    parser.add_argument("--reserve", type=float, default=2.0, help="GiB of available memory the watchdog keeps")
    parser.add_argument("--row-timeout", type=int, default=1800)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = args.threads or None
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.model, args)), flush=True)
        return 0
    shapes = args.shapes.split(",") + (["13b-fp16"] if args.huge and "13b-fp16" not in args.shapes else [])
    wanted = args.rows.split(",")
    bandwidth = dram_bandwidth()
    astype_per_element, gflops = widening_and_blas()
    print(f"DRAM read bandwidth: {bandwidth:.1f} GB/s; NumPy fp16->fp32 astype {1e-9 / astype_per_element:.2f} "
          f"G elements/s; float32 GEMM (128 rows) {gflops:.0f} GFLOP/s", flush=True)
    rows, disk, goal_rows = [], None, []
    base = tempfile.mkdtemp(prefix="refimpl-scale-", dir=args.dir)
    try:
        for shape_name in shapes:
            folder = os.path.join(base, shape_name)
            _, seconds = timed(lambda: write_checkpoint(shape_name, folder))
            size = folder_bytes(folder)
            print(f"wrote {shape_name}: {size / 1e9:.1f} GB in {seconds:.0f} s", flush=True)
            larger_than_ram = size > mem_available()
            if larger_than_ram:
                disk = disk_bandwidth(folder)
                print(f"  larger than available memory: disk read {disk:.2f} GB/s", flush=True)
            kind = SHAPES[shape_name][2]
            params = matrix_parameters(shape_name)
            goals = {"astype_s": params * astype_per_element, "blas_pp_tok_s": gflops * 1e9 / (2 * params)}
            print(f"  whole-model astype(float32) {goals['astype_s']:.1f} s; BLAS limit of a 128-token prompt "
                  f"{goals['blas_pp_tok_s']:.1f} tok/s", flush=True)
            goal_rows.append((shape_name, goals))
            for row in wanted:
                if row.startswith("torch") and row not in (TORCH_DTYPE.get(kind), "torch-fp32"):
                    continue  # transformers in the checkpoint's own dtype, and fp32 (where it fits)
                args.workdir = tempfile.mkdtemp(dir=base, prefix="work-")
                result = run_row(row, folder, args)
                shutil.rmtree(args.workdir, ignore_errors=True)
                limit_bytes = weight_bytes_read(row, folder, shape_name)
                speed = disk if larger_than_ram and not row.startswith(("accel-int8",)) else bandwidth
                result["limit_s"] = limit_bytes / 1e9 / speed if row != "refimpl-golden" else None
                rows.append((shape_name, row, result))
                print(f"  {row}: {json.dumps(result)}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print_table(rows, bandwidth, disk)
    for shape_name, goals in goal_rows:
        print(f"{shape_name}: one whole-model astype(float32) {goals['astype_s']:.1f} s (refimpl decode goal: at most "
              f"half, {goals['astype_s'] / 2:.1f} s); BLAS limit of a 128-token prompt {goals['blas_pp_tok_s']:.1f} "
              f"tok/s (goal: at least half)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"shape": s, "row": r, **v} for s, r, v in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
