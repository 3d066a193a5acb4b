"""llama-bench for refimpl's engines: prompt processing (pp128) and text generation (tg64) tok/s, and peak RSS.

    python bench/bench_decode.py [--models llama-15m,llama-110m,opt-125m] [--runs 5] [--threads 2] [--engines ...]

Rows, all in one run: refimpl (NumPy) fp32; accel (Numba) fp32, int8 (and fp16 / bf16 when asked); transformers on
torch CPU fp32 (when torch and transformers import); llama.cpp f32 and q8_0 through llama-cpp-python (Llama shapes
only: llama.cpp has no OPT; when llama_cpp imports). Every row runs the same random-weight model, which this script
writes into a temporary folder (config.json + model.safetensors, and a GGUF for llama.cpp): the stories15M and
stories110M Llama shapes and the OPT-125m shape, weights ~ N(0, 0.02), norms 1. Nothing large is kept.

Each engine runs in its own process, so peak RSS (VmHWM) is that engine's. All of a model's engines are loaded at
once and timed in --runs rounds, one pp and one tg run per engine a round (after a pause and an untimed pp), the order
rotated each round: a slow spell of the (shared, noisy) machine falls on every engine alike, not on whichever ran
during it.
Warm-up (one pp, 8 tg steps, Numba's compile) is excluded; each figure is the median of the runs. Definitions:
  pp128  one forward of 128 prompt tokens up to the next-token logits, as the engine's generate does it (Llama: last
         position only; OPT: transformers and refimpl compute the logits of all 128 positions, accel the last only)
  tg64   64 single-token forwards with a KV cache that starts empty, greedy argmax between them
  ratio  the row's tok/s over the best row's, per model and column
  tg bandwidth  the decode's share of the bandwidth limit: tg tok/s x the weight bytes a token reads (every matrix
         and the lm_head in the engine's storage, bytes_per_token) / the read bandwidth measured after the rounds
         (measure_bandwidth: the best parallel sum over 512 MiB, --threads threads)
Engines: numpy, torch, accel-<fp32|fp16|bf16|int8>[-t1|-npblas|-passive|-active|-spin10k], accel-gguf-<q8_0|q4_0|
q5_0|q4_k|q6_k|q4_k_m> (weights="gguf" on the GGUF file llama.cpp reads; K-quants need rows of 256: the 110M
shape), llamacpp-<f32|f16|q8_0|q4_0|q5_0|q4_k|q6_k|q4_k_m>; ENGINE@base runs from --baseline's tree (before / after in one run).
accel's prompt products run on MKL when the mkl wheel is installed (accel/cpu/blas.py); the accel-fp32-npblas row is
the same engine with REFIMPL_BLAS=numpy (NumPy's bundled OpenBLAS), the baseline for that choice.
accel's Numba compile time is measured separately, in a process with an empty NUMBA_CACHE_DIR (cold) and again
with that cache filled (cached). --quality prints int8 / fp16 / bf16 against fp32 on the golden inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tests"))  # support.kquants: Q4_K / Q6_K blocks (gguf-py cannot make them)
from support.kquants import QUANTIZERS, q4_k_m_type  # noqa: E402

import numpy as np  # noqa: E402

MODELS = {
    "llama-15m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 288,
                  "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 6,
                  "num_key_value_heads": 6, "vocab_size": 32000, "max_position_embeddings": 1024},
    "llama-110m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768,
                   "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 1024},
    "opt-125m": {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": 768, "ffn_dim": 3072,
                 "num_hidden_layers": 12, "num_attention_heads": 12, "vocab_size": 50272,
                 "max_position_embeddings": 2048, "word_embed_proj_dim": 768, "do_layer_norm_before": True,
                 "activation_function": "relu", "enable_bias": True, "pad_token_id": 1, "bos_token_id": 2,
                 "eos_token_id": 2},
}
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
                  "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
ENGINES = ["numpy", "accel-fp32", "accel-fp32-npblas", "accel-int8", "torch", "llamacpp-f32", "llamacpp-q8_0"]
OPTIONAL_ENGINES = ["accel-fp16", "accel-bf16", "llamacpp-f16", "accel-gguf-q8_0", "accel-gguf-q4_0",
                    "accel-gguf-q5_0", "accel-gguf-q4_k", "accel-gguf-q6_k", "accel-gguf-q4_k_m", "llamacpp-q4_0",
                    "llamacpp-q5_0", "llamacpp-q4_k", "llamacpp-q6_k", "llamacpp-q4_k_m"]
# An engine name ending in "@base" runs from the source tree given by --baseline (e.g. a git worktree of the commit
# before a change): its worker is that tree's bench_decode.py, importing that tree's refimpl and accel. So a change
# is measured against its baseline in one run, interleaved (docs/accel.md: before / after).
BASELINE = None
PP, TG = 128, 64


# --- the models ---------------------------------------------------------------------------------------------------

def llama_tensors(cfg, rng):
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    Dkv = D // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    w = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))  # noqa: E731
    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32), "lm_head.weight": w(V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(D, D), p + "self_attn.k_proj.weight": w(Dkv, D),
                  p + "self_attn.v_proj.weight": w(Dkv, D), p + "self_attn.o_proj.weight": w(D, D),
                  p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
                  p + "mlp.down_proj.weight": w(D, F), p + "input_layernorm.weight": np.ones(D, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(D, np.float32)})
    return t


def opt_tensors(cfg, rng):
    D, F, V, P = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"], cfg["max_position_embeddings"] + 2
    w = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))  # noqa: E731
    z = lambda n: np.zeros(n, np.float32)  # noqa: E731
    t = {"model.decoder.embed_tokens.weight": w(V, D), "model.decoder.embed_positions.weight": w(P, D),
         "model.decoder.final_layer_norm.weight": np.ones(D, np.float32), "model.decoder.final_layer_norm.bias": z(D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.decoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{name}.weight"], t[p + f"self_attn.{name}.bias"] = w(D, D), z(D)
        t[p + "fc1.weight"], t[p + "fc1.bias"], t[p + "fc2.weight"], t[p + "fc2.bias"] = w(F, D), z(F), w(D, F), z(D)
        for name in ("self_attn_layer_norm", "final_layer_norm"):
            t[p + f"{name}.weight"], t[p + f"{name}.bias"] = np.ones(D, np.float32), z(D)
    return t


def write_safetensors(path, tensors):
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers insists on the format entry
    for name, a in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(path, cfg, tensors, qtype):
    """The Llama model as convert_hf_to_gguf.py writes it (Q/K rows permuted), with no tokenizer ("none")."""
    import gguf

    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(H)
    writer.add_head_count_kv(Hkv)
    writer.add_rope_dimension_count(cfg["hidden_size"] // H)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_tokenizer_model("none")
    kind = gguf.GGMLQuantizationType[qtype] if qtype != "Q4_K_M" else None
    for name, a in tensors.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
            heads = H if ".q_proj." in name else Hkv if ".k_proj." in name else None
            if heads:  # llama.cpp rotates adjacent pairs: rows (head, 2, Dh/2) -> (head, Dh/2, 2)
                a = a.reshape(heads, 2, a.shape[0] // heads // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        if a.ndim == 1 or qtype == "F32":
            writer.add_tensor(gname, a.astype(np.float32))
        elif qtype == "F16":
            writer.add_tensor(gname, a.astype(np.float16))
        elif qtype == "Q4_K_M":  # llama.cpp's mix: Q6_K for attn_v, ffn_down, output; Q4_K for the rest
            t = q4_k_m_type(gname)
            writer.add_tensor(gname, QUANTIZERS[t](a), raw_dtype=gguf.GGMLQuantizationType[t])
        elif qtype in QUANTIZERS:  # Q4_K, Q6_K: tests/support/kquants.py (gguf-py cannot make K-quants)
            writer.add_tensor(gname, QUANTIZERS[qtype](a), raw_dtype=kind)
        else:
            writer.add_tensor(gname, gguf.quants.quantize(a, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_model(name, root, want_gguf):
    """Write the random model `name` under root; returns (folder, {qtype: gguf path})."""
    cfg = dict(MODELS[name])
    llama = cfg["model_type"] == "llama"
    if llama:
        cfg.update(LLAMA_DEFAULTS)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    tensors = (llama_tensors if llama else opt_tensors)(cfg, np.random.default_rng(0))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    ggufs = {}
    if llama and want_gguf:
        for qtype in want_gguf:
            ggufs[qtype] = os.path.join(root, f"{name}-{qtype}.gguf")
            write_gguf(ggufs[qtype], cfg, tensors, qtype)
    return folder, ggufs


# --- one engine, in its own process -------------------------------------------------------------------------------

def median_rate(fn, tokens, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return tokens / statistics.median(times)


def worker(engine, folder, gguf_path, threads, runs, cache_dir):
    """Measure one engine on one model; prints one JSON line."""
    ids = np.random.default_rng(1).integers(3, 1000, PP)
    result = {}
    start = time.perf_counter()
    if engine == "numpy" or engine.startswith("accel"):
        import refimpl

        if engine == "numpy":
            model = refimpl.load(folder)
        elif engine.startswith("accel-gguf"):  # the GGUF file's own blocks, computed on in place
            model = refimpl.load(gguf_path, backend="numba", weights="gguf", threads=threads)
        else:
            model = refimpl.load(folder, backend="numba", weights=engine_settings(engine, threads)[0],
                                 threads=threads, cache_dir=cache_dir)
        result["load_s"] = time.perf_counter() - start
        opt = model.family == "opt"

        if engine == "numpy":
            def pp():
                model(input_ids=ids[None], use_cache=True, **model.generation_forward_kwargs())

            def new_cache():
                return None
        else:
            def pp():  # generate's first step: the prompt into a fresh cache, the last position's logits
                model.generation_forward(ids[None], np.ones((1, PP), np.int64), np.arange(PP)[None],
                                         model.new_cache(1, PP))

            def new_cache():
                return model.new_cache(1, TG)

        def tg(n=TG):
            past, token = new_cache(), 1
            for _ in range(n):
                out = model(input_ids=[[token]], past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(np.argmax(out.logits[0, -1]))
        del opt
    elif engine == "torch":
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        model.eval()
        result["load_s"] = time.perf_counter() - start
        keep = {"num_logits_to_keep": 1} if model.config.model_type == "llama" else {}
        tids = torch.tensor(ids[None])

        def pp():
            model(input_ids=tids, use_cache=True, **keep)

        def tg(n=TG):
            past, token = None, 1
            for _ in range(n):
                out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(torch.argmax(out.logits[0, -1]))
    elif engine.startswith("llamacpp"):
        import llama_cpp
        from llama_cpp import llama_cpp as lib

        default_params = lib.llama_model_default_params

        def params_without_repacking():  # this CPU's AMX repacking path crashes q8_0 models
            p = default_params()
            p.use_extra_bufts = False
            return p
        lib.llama_model_default_params = params_without_repacking
        llm = llama_cpp.Llama(gguf_path, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        result["load_s"] = time.perf_counter() - start
        n_vocab = llm.n_vocab()

        def pp():
            llm.reset()
            llm.eval(ids.tolist())

        def tg(n=TG):
            llm.reset()
            token = 1
            for _ in range(n):
                llm.eval([token])
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
                token = int(np.argmax(logits))
    else:
        raise SystemExit(f"unknown engine {engine}")

    start = time.perf_counter()
    pp()
    tg(8)
    result["warmup_s"] = time.perf_counter() - start
    if runs > 0:  # stand-alone: measure here (used for the one-off conversion run)
        result["pp"] = median_rate(pp, PP, runs)
        result["tg"] = median_rate(tg, TG, runs)
        result["rss_mb"] = peak_rss_mb()
        print(REPLY + json.dumps(result), flush=True)
        return
    # served: the parent sends "pp" / "tg" (one timed run each, seconds back) and "done" (peak RSS back), so that
    # all engines' runs are interleaved round by round and share the machine's slow and fast moments alike
    print(REPLY + json.dumps(result), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "done":
            print(REPLY + json.dumps({"rss_mb": peak_rss_mb()}), flush=True)
            return
        fn = tg if command == "tg" else pp  # "warm" is an untimed pp
        start = time.perf_counter()
        fn()
        print(REPLY + json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def peak_rss_mb():
    """This process's peak RSS (VmHWM). ru_maxrss would not do: Linux carries it over from the parent across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


REPLY = "@@ "  # prefix of the worker's protocol lines (a library may print to stdout too)


def _worker_cmd(engine, folder, gguf_path, threads, runs, cache_dir):
    script = os.path.abspath(__file__)
    if engine.endswith("@base"):
        engine, script = engine[:-len("@base")], os.path.join(BASELINE, "bench", "bench_decode.py")
    return [sys.executable, script, "--worker", engine, folder, gguf_path or "-", str(threads), str(runs), cache_dir]


def gguf_qtype(engine):
    """The GGUF file an engine reads: llamacpp-q8_0 and accel-gguf-q8_0 -> "Q8_0"; None for the others."""
    parts = engine.split("@")[0].split("-")
    if parts[0] == "llamacpp":
        return parts[1].upper()
    if parts[:2] == ["accel", "gguf"]:
        return parts[2].upper()
    return None


def run_worker(engine, folder, gguf_path, threads, runs, cache_dir, env=None):
    """One engine measured stand-alone in its own process (runs > 0): its JSON result, or {"error": ...}."""
    proc = subprocess.run(_worker_cmd(engine, folder, gguf_path, threads, runs, cache_dir), capture_output=True,
                          text=True, env=env, cwd=ROOT)
    replies = [line[len(REPLY):] for line in proc.stdout.splitlines() if line.startswith(REPLY)]
    if proc.returncode != 0 or not replies:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-300:]}
    return json.loads(replies[-1])


class Served:
    """An engine loaded and warmed up in its own process, timing one pp or tg run per request."""

    def __init__(self, engine, folder, gguf_path, threads, cache_dir, env=None):
        self.proc = subprocess.Popen(_worker_cmd(engine, folder, gguf_path, threads, 0, cache_dir), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     cwd=ROOT)
        self.result = self._reply()
        self.times = {"pp": [], "tg": []}

    def _reply(self):
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        tail = self.proc.stderr.read().strip().splitlines()[-3:]
        self.proc.wait()
        return {"error": " | ".join(tail)[-300:] or f"worker exited with {self.proc.returncode}"}

    def ok(self):
        return "error" not in self.result

    def time(self, what):
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            self.result = reply
        elif what in self.times:
            self.times[what].append(reply["seconds"])

    def finish(self):
        """The result row: load and warm-up seconds, median tok/s of the pp and tg runs, peak RSS."""
        if self.ok():
            self.proc.stdin.write("done\n")
            self.proc.stdin.flush()
            reply = self._reply()
            self.result.update(reply)
            if "error" not in reply:
                self.result["pp"] = PP / statistics.median(self.times["pp"])
                self.result["tg"] = TG / statistics.median(self.times["tg"])
        self.proc.kill()
        self.proc.wait()
        return self.result


BUSY_LOOP = "while True:\n    pass\n"


class Busy:
    """N processes that each keep one core busy (a Python spin loop) while the rounds are timed: a laptop or a
    server is rarely idle, and threads that spin-wait on a core they do not get collapse (issue 18)."""

    def __init__(self, n):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]

    def __enter__(self):
        time.sleep(0.5 if self.procs else 0)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def engine_settings(engine, threads):
    """(weights format, threads, extra environment) of an engine name such as accel-fp32-t1-passive: -t1 runs one
    thread, -npblas NumPy's BLAS, -passive / -active set OMP_WAIT_POLICY, -spin10k GOMP_SPINCOUNT=10000."""
    parts = engine.split("@")[0].split("-")
    env = {}
    for part in parts[2:]:
        if part == "t1":
            threads = 1
        elif part == "npblas":
            env["REFIMPL_BLAS"] = "numpy"
        elif part in ("passive", "active"):
            env["OMP_WAIT_POLICY"] = part.upper()
        elif part.startswith("spin"):
            env["GOMP_SPINCOUNT"] = str(int(part[4:].replace("k", "000")))
    return (parts[1] if len(parts) > 1 else None), threads, env


def interleaved(served, runs):
    """runs rounds; in each, every engine times one pp and one tg, in an order rotated round by round."""
    names = list(served)
    for round_index in range(runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if served[name].ok():
                time.sleep(0.5)  # the previous engine's idle threads stop spinning (OpenBLAS, OpenMP block times)
                served[name].time("warm")  # an untimed pp: caches and thread pools as a back-to-back run finds them
                served[name].time("pp")
                served[name].time("tg")


# --- compile cost and quality ---------------------------------------------------------------------------------------

COMPILE_CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
import numpy as np, refimpl
t1 = time.perf_counter()
m = refimpl.load(sys.argv[1], backend="numba", weights=sys.argv[2])
t2 = time.perf_counter()
m.generation_forward(np.arange(3, 19)[None], np.ones((1, 16), np.int64), np.arange(16)[None], m.new_cache(1, 32))
out = m(input_ids=[[5]], past_key_values=m.new_cache(1, 4), use_cache=True)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_calls_s": t3 - t2}))
"""


def compile_cost(folder, fmt):
    """(cold, cached) seconds of the first prompt + decode calls, the Numba cache empty then filled."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=ROOT)
        runs = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-c", COMPILE_CHILD, folder, fmt], capture_output=True, text=True,
                                  env=env, cwd=ROOT)
            if proc.returncode != 0:
                return None
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs


def quality_report():
    """int8 / fp16 / bf16 against fp32 on the golden causal-LM inputs: top-1 agreement, perplexity, max |dlogit|."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import refimpl
    from golden_cases import CASES, GOLDEN, load_case

    rows = []
    for fmt in ("int8", "fp16", "bf16"):
        agree = total = 0
        nll32 = nllq = 0.0
        count = 0
        worst = 0.0
        for case in CASES:
            folder = os.path.join(GOLDEN, "models", case)
            if refimpl.read_config(folder).architectures[0] not in ("LlamaForCausalLM", "OpenLlamaForCausalLM",
                                                                      "OPTForCausalLM"):
                continue
            data, meta = load_case(case)
            fp32 = refimpl.load(folder, backend="numba")
            quant = refimpl.load(folder, backend="numba", weights=fmt)
            for call in meta["calls"]:
                key = f"{call['name']}.in.input_ids"
                if key not in data.files or call.get("past_from"):
                    continue
                ids = data[key]
                kwargs = {"attention_mask": data[f"{call['name']}.in.attention_mask"]} \
                    if f"{call['name']}.in.attention_mask" in data.files else {}
                a = fp32(input_ids=ids, **kwargs).logits.astype(np.float64)
                b = quant(input_ids=ids, **kwargs).logits.astype(np.float64)
                mask = kwargs.get("attention_mask", np.ones(ids.shape, np.int64)).astype(bool)
                agree += int(np.sum((a.argmax(-1) == b.argmax(-1)) & mask))
                total += int(mask.sum())
                worst = max(worst, float(np.max(np.abs(a - b))))
                target = ids[:, 1:]
                valid = mask[:, 1:] & mask[:, :-1]
                for logits, acc in ((a, "fp32"), (b, fmt)):
                    logp = logits[:, :-1] - np.log(np.sum(np.exp(logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)),
                                                          -1, keepdims=True)) - logits[:, :-1].max(-1, keepdims=True)
                    nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0][valid].sum()
                    if acc == "fp32":
                        nll32 += nll
                    else:
                        nllq += nll
                count += int(valid.sum())
        rows.append((fmt, agree / total, total, float(np.exp(nll32 / count)), float(np.exp(nllq / count)), worst))
    return rows


# --- the table ----------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma list of {', '.join(ENGINES + OPTIONAL_ENGINES)}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quality", action="store_true", help="also print int8/fp16/bf16 quality on the golden inputs")
    parser.add_argument("--no-compile", action="store_true", help="skip the Numba compile-time measurement")
    parser.add_argument("--busy", type=int, default=0,
                        help="keep this many cores busy with a competing process during the timed rounds")
    parser.add_argument("--baseline", help="a source tree (e.g. a git worktree of an earlier commit) that engines "
                                           "named ENGINE@base run from, interleaved with this tree's")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global BASELINE
    BASELINE = os.path.abspath(args.baseline) if args.baseline else None
    if args.worker:
        engine, folder, gguf_path, threads, runs, cache_dir = args.worker
        return worker(engine, folder, None if gguf_path == "-" else gguf_path, int(threads), int(runs), cache_dir)

    engines = args.engines.split(",")
    have = {"torch": _imports("torch") and _imports("transformers"), "llamacpp": _imports("llama_cpp")}
    from refimpl_accel.cpu import blas

    print(f"# bench_decode: {args.threads} threads, {args.busy} cores kept busy, median of {args.runs} runs, pp{PP} / tg{TG}, "
          f"load average {os.getloadavg()[0]:.2f}; accel's prompt GEMMs: {blas.provider()[1]} "
          f"(accel-*-npblas rows: REFIMPL_BLAS=numpy)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        cache_dir = os.path.join(root, "converted")
        for name in args.models.split(","):
            k_quants_fit = MODELS[name]["hidden_size"] % 256 == 0  # K-quant rows are whole blocks of 256
            qtypes = sorted({gguf_qtype(e) for e in engines if gguf_qtype(e) and (have["llamacpp"] or "gguf" in e)
                             and (k_quants_fit or "_K" not in gguf_qtype(e))})
            folder, ggufs = make_model(name, root, qtypes)
            served = {}
            for engine in engines:
                family = engine.split("-")[0]
                if family in have and not have[family]:
                    rows.append((name, engine, {"error": "not installed"}))
                    continue
                qtype = gguf_qtype(engine)
                if qtype and (name.startswith("opt") or qtype not in ggufs):
                    continue  # GGUF files of the Llama shapes only (llama.cpp has no OPT); K-quants need rows of 256
                if family == "accel" and not qtype:  # convert once (not timed): the timed process loads the saved weights
                    run_worker(engine, folder, None, args.threads, 1, cache_dir)
                _, threads, extra = engine_settings(engine, args.threads)
                env = dict(os.environ, **extra) if extra else None
                served[engine] = Served(engine, folder, ggufs.get(qtype), threads, cache_dir, env)
            with Busy(args.busy):
                interleaved(served, args.runs)
            for engine, worker_process in served.items():
                result = worker_process.finish()
                rows.append((name, engine, result))
                print(f"  {name:10s} {engine:14s} {json.dumps(result)}", file=sys.stderr, flush=True)
            if not args.no_compile and name == args.models.split(",")[0]:
                compile_rows = [(fmt, compile_cost(folder, fmt)) for fmt in ("fp32", "int8")]
    bandwidth = measure_bandwidth(args.threads)
    print_table(rows, bandwidth)
    if not args.no_compile:
        print("\naccel first calls (one 16-token prompt + one decode step), seconds:")
        for fmt, runs in compile_rows:
            if runs:
                print(f"  {fmt}: cold Numba cache {runs[0]['first_calls_s']:.1f} s (import {runs[0]['import_s']:.1f}, "
                      f"load {runs[0]['load_s']:.1f}); cached {runs[1]['first_calls_s']:.2f} s")
    if args.quality:
        print("\nquality against accel fp32 on the golden causal-LM inputs:")
        print("| weights | top-1 agreement | positions | perplexity fp32 | perplexity | max abs dlogit |")
        print("|---|---|---|---|---|---|")
        for fmt, agree, n, p32, pq, worst in quality_report():
            print(f"| {fmt} | {agree:.4f} | {n} | {p32:.3f} | {pq:.3f} | {worst:.3g} |")


def _imports(module):
    try:
        __import__(module)
    except Exception:
        return False
    return True


# Bytes a weight of each engine's storage (GGUF blocks: bytes a block / weights a block; Q4_K_M: its mix, per matrix)
BYTES_PER_WEIGHT = {"fp32": 4.0, "f32": 4.0, "fp16": 2.0, "f16": 2.0, "bf16": 2.0, "int8": 1.125, "q8_0": 34 / 32,
                    "q4_0": 18 / 32, "q5_0": 22 / 32, "q4_k": 144 / 256, "q6_k": 210 / 256}


def storage_of(engine):
    """numpy, torch: fp32; accel-int8: int8; accel-gguf-q4_0, llamacpp-q4_0: q4_0; ...-q4_k_m: "q4_k_m"."""
    parts = engine.split("@")[0].split("-")
    if parts[0] in ("numpy", "torch"):
        return "fp32"
    return parts[2] if parts[:2] == ["accel", "gguf"] else parts[1]


def bytes_per_token(name, engine):
    """Weight bytes one decode step reads: every matrix of every layer and the lm_head (the embedding table: one row,
    left out), in the engine's storage. Caches and activations are left out (small at tg64's lengths)."""
    cfg = MODELS[name]
    D, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    F = cfg.get("intermediate_size") or cfg["ffn_dim"]
    llama = cfg["model_type"] == "llama"
    Dkv = D // cfg["num_attention_heads"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    # (weights, Q4_K_M's block type): q, k, o, gate, up in Q4_K; v, down, output in Q6_K
    matrices = [(D * D, "q4_k"), (Dkv * D, "q4_k"), (Dkv * D, "q6_k"), (D * D, "q4_k")]
    matrices += [(F * D, "q4_k"), (F * D, "q4_k"), (D * F, "q6_k")] if llama else [(F * D, "q4_k"), (D * F, "q6_k")]
    storage = storage_of(engine)
    per = (lambda kind: BYTES_PER_WEIGHT[kind]) if storage == "q4_k_m" else (lambda kind: BYTES_PER_WEIGHT[storage])
    return L * sum(n * per(kind) for n, kind in matrices) + V * D * per("q6_k")


def measure_bandwidth(threads, seconds=2.0):
    """Read bandwidth in GB/s: the best of repeated parallel sums over a 512 MiB float32 array (Numba, `threads`
    threads), the same kind of streaming read a decode step's matrix-vector products do."""
    import numba

    @numba.njit(parallel=True, fastmath=True)
    def total(a):
        s = np.float32(0.0)
        for i in numba.prange(a.shape[0]):
            s += a[i]
        return s

    numba.set_num_threads(threads)
    a = np.ones(128 << 20, np.float32)
    total(a)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        total(a)
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def print_table(rows, bandwidth=None):
    best = {}
    for name, engine, r in rows:
        for key in ("pp", "tg"):
            if key in r:
                best[name, key] = max(best.get((name, key), 0.0), r[key])
    bw = f" (of {bandwidth:.1f} GB/s)" if bandwidth else ""
    print(f"\n| model | engine | pp{PP} tok/s | ratio | tg{TG} tok/s | ratio | tg bandwidth{bw} | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, engine, r in rows:
        if "error" in r:
            print(f"| {name} | {engine} | - | - | - | - | - | {r['error']} |")
            continue
        share = f"{r['tg'] * bytes_per_token(name, engine) / 1e9 / bandwidth:.0%}" if bandwidth else "-"
        print(f"| {name} | {engine} | {r['pp']:.0f} | {r['pp'] / best[name, 'pp']:.2f} | {r['tg']:.1f} | "
              f"{r['tg'] / best[name, 'tg']:.2f} | {share} | {r['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
