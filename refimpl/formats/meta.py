"""Meta's original Llama 2 checkpoints: params.json, consolidated.NN.pth model-parallel shards, read without torch.

Meta's reference code (fairscale) splits every matrix across NN model-parallel ranks and each rank torch.saves its
slice: ColumnParallelLinear (wq, wk, wv, w1, w3, output) by rows, RowParallelLinear (wo, w2) and Llama 2's
ParallelEmbedding (tok_embeddings) by columns; the norms are replicated. transformers' conversion script
(models/llama/convert_llama_weights_to_hf.py, write_model, llama_version "2") concatenates the slices and permutes
the rows of wq and wk, because Meta's RoPE rotates adjacent pairs (x0, x1) where transformers rotates halves
(x0, x_{Dh/2}). This reader gives the same tensors under transformers' names, lazily: listing reads the pickles and
no tensor data. Each tensor is one `Stored` whose rows(start, stop) reads only those rows from the shard(s) holding
them (a column split: the same rows of every shard, joined along columns); for q and k it reads the band of whole
heads a tile lies in and gathers the stored row of each transformers row through an index array, so the
permutation is applied while a tile is gathered and nothing is copied at load. load() builds the whole tensor.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from ..errors import CheckpointError, ConfigError
from .common import Stored, human_bytes, report, show_progress
from .torch_bin import list_torch_bin

PARAMS_FILE = "params.json"
SHARD_NAME = re.compile(r"consolidated\.(\d{2,})\.pth")  # Meta: f"consolidated.{rank:02d}.pth"
MAX_PARAMS_BYTES = 1 << 16  # a params.json is ~200 bytes
MAX_SIZE = 1 << 24  # any size in params.json; config.py's limits apply to the config built from it

# params.json field -> (kind, required). Any other field is refused: Llama 3's use_scaled_rope, for one, would change
# the numbers. null reads as absent (Meta's ModelArgs defaults n_kv_heads and ffn_dim_multiplier to None).
PARAMS = {
    "dim": (int, True),
    "n_layers": (int, True),
    "n_heads": (int, True),
    "n_kv_heads": (int, False),
    "vocab_size": (int, False),  # -1 in Llama 2: the tokenizer's size, which is the embedding's row count
    "multiple_of": (int, False),
    "ffn_dim_multiplier": (float, False),
    "norm_eps": (float, True),
    "rope_theta": (float, False),  # Code Llama: 1e6
}

# Meta name -> (transformers name, how the shards split it: 0 by rows, 1 by columns, None replicated).
META_TOP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),  # Llama 2's ParallelEmbedding: the script's concat_dim 1
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
META_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
IGNORED = ("rope.freqs",)  # Llama 1 saved its RoPE frequencies; they are recomputed from the config, as the script does
PERMUTED = {"attention.wq.weight": "num_attention_heads", "attention.wk.weight": "num_key_value_heads"}


def is_meta_folder(path) -> bool:
    """A folder with params.json and consolidated.*.pth files and no config.json (else it is a Hugging Face folder)."""
    path = os.fspath(path)
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return False
    names = os.listdir(path)
    return PARAMS_FILE in names and any(n.startswith("consolidated.") and n.endswith(".pth") for n in names)


def read_meta_config(path, progress=False) -> dict:
    """A Meta folder -> the config.json that transformers' conversion script writes for it, checked against the shapes."""
    return read_meta(os.fspath(path), progress)[0]


def list_meta(path, progress=None) -> dict[str, Stored]:
    """A Meta folder -> {transformers name: Stored}, shards joined and q/k rows un-permuted lazily; no data read."""
    return read_meta(os.fspath(path), progress)[1]


def read_meta(path: str, progress=None) -> tuple[dict, dict[str, Stored]]:
    params = read_params(path)
    files = meta_shard_files(path)
    verbose = show_progress(progress)
    listed = []
    for i, file in enumerate(files, 1):
        report(verbose, f"reading {i}/{len(files)} {os.path.basename(file)} ({human_bytes(os.path.getsize(file))})")
        listed.append(list_torch_bin(file))
    parts = _parts(path, files, listed, params["n_layers"])  # {Meta name: [Stored of each shard]}
    config = hf_config(path, params, parts, len(files))
    expected = expected_shapes(config)
    stored = {}
    for name, pieces in parts.items():
        rest = name.split(".", 2)[2] if name.startswith("layers.") else name
        hf_name, axis = META_TOP[rest] if rest in META_TOP else META_LAYER[rest]
        if name.startswith("layers."):
            hf_name = f"model.layers.{name.split('.')[1]}.{hf_name}"
        tensor = joined(path, name, pieces, axis, expected[rest])
        if rest in PERMUTED:
            tensor = unpermuted(tensor, config[PERMUTED[rest]])
        stored[hf_name] = tensor
    return config, stored


# --- params.json and the shard files --------------------------------------------------------------------------------

def read_params(path: str) -> dict:
    """params.json -> its fields, each checked for type and range (ConfigError naming the field and value)."""
    file = os.path.join(path, PARAMS_FILE)
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_PARAMS_BYTES + 1)  # never more, whatever the file holds
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read ({exc.strerror})") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{file}: over {MAX_PARAMS_BYTES} bytes; a params.json is a few hundred")
    try:
        params = json.loads(data.decode("utf-8"), parse_int=_short_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{file}: not valid JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(params).__name__}")
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ConfigError(f"{file}: field {_show(unknown[0])} is not one of Llama 2's params.json ({', '.join(PARAMS)})")
    out = {}
    for name, (kind, required) in PARAMS.items():
        value = params.get(name)
        if value is None:
            if required:
                raise ConfigError(f"{file}: the field {name!r} is missing")
            continue
        out[name] = _checked(file, name, value, kind)
    return out


def _short_int(text):
    if len(text) > 30:  # int() is quadratic in the digits; no size needs more than a few
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _checked(file, name, value, kind):
    """An int in [1, MAX_SIZE] (vocab_size may be -1), or a finite number > 0; bools are not numbers."""
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and (
            1 <= value <= MAX_SIZE or (name == "vocab_size" and value == -1))
        expected = "an integer in [1, 2^24]" + (" or -1" if name == "vocab_size" else "")
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1e30
        expected = "a finite number > 0"
    if not ok:
        raise ConfigError(f"{file}: {name} is {_show(value)}, expected {expected}")
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def meta_shard_files(path) -> list[str]:
    """consolidated.00.pth ... consolidated.NN.pth in rank order; a gap, a duplicate rank or another .pth file raises."""
    path = os.fspath(path)
    ranks = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".pth"):
            continue
        match = SHARD_NAME.fullmatch(name)
        if match is None:  # the script would load any *.pth as a shard
            raise CheckpointError(f"{path}: {_show(name)} is not a consolidated.NN.pth shard; move it out of the folder")
        rank = int(match.group(1))
        if rank in ranks:
            raise CheckpointError(f"{path}: {ranks[rank]} and {name} are both model-parallel rank {rank}")
        ranks[rank] = name
    if not ranks:
        raise CheckpointError(f"{path}: no consolidated.NN.pth shard")
    for rank in range(max(ranks) + 1):
        if rank not in ranks:
            raise CheckpointError(f"{path}: consolidated.{rank:02d}.pth is missing (found {len(ranks)} shards, the "
                                  f"last numbered {max(ranks):02d})")
    return [os.path.join(path, ranks[rank]) for rank in range(len(ranks))]


def _parts(path, files, listed, n_layers) -> dict[str, list[Stored]]:
    """The shards' {name: Stored} -> {Meta name: [Stored per shard]}: every shard must hold the same known names."""
    names = [name for name in listed[0] if name not in IGNORED]
    for name in names:
        _check_name(files[0], name, n_layers)
    for file, tensors in zip(files[1:], listed[1:]):
        other = [name for name in tensors if name not in IGNORED]
        missing = [n for n in names if n not in tensors] or [n for n in other if n not in listed[0]]
        if missing:
            raise CheckpointError(f"{path}: tensor {_show(missing[0])} is in one shard and not in the other "
                                  f"({os.path.basename(files[0])} vs {os.path.basename(file)})")
    for rest in (*META_TOP, *(f"layers.{i}.{r}" for i in range(n_layers) for r in META_LAYER)):
        if rest not in listed[0]:
            raise CheckpointError(f"{path}: no shard holds {rest} (params.json says n_layers={n_layers})")
    return {name: [tensors[name] for tensors in listed] for name in names}


def _check_name(file, name, n_layers):
    if name in META_TOP:
        return
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in META_LAYER and parts[1].isdigit() \
            and str(int(parts[1])) == parts[1]:
        if int(parts[1]) >= n_layers:
            raise CheckpointError(f"{file}: tensor {name!r} is past the last layer (params.json says "
                                  f"n_layers={n_layers})")
        return
    raise CheckpointError(f"{file}: tensor {_show(name)} is not a parameter of a Llama 2 model")


# --- the config, as convert_llama_weights_to_hf.py writes it -------------------------------------------------------

def hf_config(path: str, params: dict, parts: dict, shards: int) -> dict:
    """params.json and the embedding's shape -> config.json (write_model with llama_version "2"), a LlamaForCausalLM."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads", n_heads)
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise ConfigError(f"{path}: params.json dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads}: dim must be "
                          "a multiple of n_heads, the head size even, and n_heads a multiple of n_kv_heads")
    if n_heads % shards or n_kv_heads % shards:
        raise CheckpointError(f"{path}: {shards} model-parallel shards cannot each hold whole heads of "
                              f"n_heads={n_heads}, n_kv_heads={n_kv_heads} (a missing or extra shard?)")
    embedding = parts["tok_embeddings.weight"][0]
    if len(embedding.shape) != 2:
        raise CheckpointError(f"{path}: tok_embeddings.weight has shape {list(embedding.shape)[:8]}, not 2-D")
    vocab_size = embedding.shape[0]  # the embedding is split by columns: every shard holds every row
    if params.get("vocab_size", -1) not in (-1, vocab_size):
        raise CheckpointError(f"{path}: params.json vocab_size={params['vocab_size']}, but tok_embeddings.weight has "
                              f"{vocab_size} rows")
    rope_theta = params.get("rope_theta", 10000.0)
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": dim // n_heads,
        "hidden_act": "silu",
        "hidden_size": dim,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size(dim, params.get("ffn_dim_multiplier", 1),
                                               params.get("multiple_of", 256)),
        # the script: a rope_theta above 10000 is Code Llama, trained for 16k positions; Llama 2 has 4096
        "max_position_embeddings": 16384 if rope_theta > 10000.0 else 4096,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_heads,
        "num_hidden_layers": params["n_layers"],
        "num_key_value_heads": n_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": params["norm_eps"],
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def intermediate_size(dim: int, ffn_dim_multiplier=1, multiple_of=256) -> int:
    """Meta's FeedForward width: int(2 * 4 dim / 3), times ffn_dim_multiplier, rounded up to multiple_of (the script's
    compute_intermediate_size)."""
    return multiple_of * ((int(ffn_dim_multiplier * int(8 * dim / 3)) + multiple_of - 1) // multiple_of)


def expected_shapes(config: dict) -> dict[str, tuple]:
    """Meta name (per layer without 'layers.N.') -> the shape the config implies once the shards are joined."""
    D, V, F = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    Q = config["num_attention_heads"] * config["head_dim"]  # [H * Dh]
    KV = config["num_key_value_heads"] * config["head_dim"]  # [K * Dh]
    return {
        "tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D),
        "attention.wq.weight": (Q, D), "attention.wk.weight": (KV, D), "attention.wv.weight": (KV, D),
        "attention.wo.weight": (D, Q), "feed_forward.w1.weight": (F, D), "feed_forward.w2.weight": (D, F),
        "feed_forward.w3.weight": (F, D), "attention_norm.weight": (D,), "ffn_norm.weight": (D,),
    }


# --- joining the shards lazily ----------------------------------------------------------------------------------------

def joined(path: str, name: str, pieces: list[Stored], axis, expected: tuple) -> Stored:
    """One shard's Stored per rank -> the whole tensor: concatenated along `axis` (None: replicated, shard 0's)."""
    first = pieces[0]
    for rank, piece in enumerate(pieces[1:], 1):
        if piece.dtype != first.dtype or piece.shape != first.shape:
            raise CheckpointError(f"{path}: {name} is {piece.dtype} {list(piece.shape)} in shard {rank} but "
                                  f"{first.dtype} {list(first.shape)} in shard 0; Meta's shards split evenly")
    shape = list(first.shape)
    if axis is not None and len(shape) == 2:
        shape[axis] *= len(pieces)
    if tuple(shape) != expected:
        raise CheckpointError(f"{path}: {name} joined from {len(pieces)} shard(s) has shape {shape[:8]}, params.json "
                              f"implies {list(expected)} (a missing or extra shard?)")
    if axis is None or len(pieces) == 1:
        return first  # replicated (the script takes shard 0's), or nothing to join
    return (joined_rows if axis == 0 else joined_columns)(pieces, tuple(shape))


def joined_rows(pieces: list[Stored], shape: tuple) -> Stored:
    """Shards [O/N, D] stacked to [O, D]; rows(start, stop) reads only the shards holding those rows."""
    step = pieces[0].shape[0]  # rows per shard

    def rows(start, stop):
        bands = [piece.rows(max(start - lo, 0), min(stop - lo, step))
                 for piece, lo in zip(pieces, range(0, shape[0], step)) if start < lo + step and stop > lo]
        return bands[0] if len(bands) == 1 else np.concatenate(bands or [pieces[0].rows(0, 0)])  # [stop - start, D]

    def load():
        return np.concatenate([piece.load() for piece in pieces])  # [O, D]

    return Stored(pieces[0].dtype, shape, sum(p.nbytes for p in pieces), load, rows, view=False)


def joined_columns(pieces: list[Stored], shape: tuple) -> Stored:
    """Shards [O, D/N] side by side to [O, D]; rows(start, stop) reads those rows of every shard."""
    def rows(start, stop):
        return np.concatenate([piece.rows(start, stop) for piece in pieces], axis=1)  # [stop - start, D]

    def load():
        return np.concatenate([piece.load() for piece in pieces], axis=1)  # [O, D]

    return Stored(pieces[0].dtype, shape, sum(p.nbytes for p in pieces), load, rows, view=False)


def unpermuted(stored: Stored, n_heads: int) -> Stored:
    """Meta's interleaved q/k rows -> transformers' order, the script's permute():
    w.view(n_heads, Dh // 2, 2, D).transpose(1, 2): transformers row (h, i, j) is stored row (h, j, i)."""
    O = stored.shape[0]
    head = O // n_heads  # Dh rows per head
    order = np.arange(O).reshape(n_heads, head // 2, 2).swapaxes(1, 2).reshape(O)  # transformers row -> stored row

    def rows(start, stop):
        lo, hi = start - start % head, -(-stop // head) * head  # the whole heads the tile lies in
        return stored.rows(lo, hi)[order[start:stop] - lo]  # [stop - start, D], gathered

    def load():
        return stored.load()[order]  # [O, D]

    return Stored(stored.dtype, stored.shape, stored.nbytes, load, rows, view=False)
