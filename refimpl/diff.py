"""Compare a port's golden pack with refimpl's, op by op in graph order, and name the first op that diverges.

Per op: max abs error, max rel error (max |port - ref| / max |ref|), NMSE (sum (port - ref)^2 / sum ref^2, as
llama.cpp's test-backend-ops) and cosine similarity. An op passes when

    max |port - ref| <= atol + rtol * max |ref|

with (atol, rtol) from TOLERANCES for the less precise of the two packs' dtypes (or --atol / --rtol). Values at or
below MASKED in both packs are "masked" (finfo.min, -65504 and -inf are all the same mask) and count as equal.
For the first op over tolerance the report gives the worst index, the error along the positions, and the likely
causes from HINTS: a literal list of (id, predicate, message), each predicate a small function of the error
pattern, tried in order. Final logits also get argmax agreement, top-k overlap and KL(ref || port).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .pack import INPUT_NAMES, SUMMARY_FIELDS, Pack, guess_family, summarize
from .trace import entry, generic_name, select

# dtype -> (atol, rtol). float32: refimpl's own fp32 trace is within 1.3e-6 * max|ref| of float64 on every
# golden case and op (the precision report, `refimpl golden --compare-dtypes`), so 1e-4 leaves a margin of ~100
# for a port's different summation order. float16 / bfloat16 have 11 / 8 significant bits (eps 1e-3 / 8e-3).
TOLERANCES = {
    "float64": (1e-12, 1e-9),
    "float32": (1e-6, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}
PRECISION_ORDER = ("float64", "float32", "float16", "bfloat16")  # most to least precise
STORED_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MASKED = -1e4  # at or below this in both packs: a masked score or mask entry, equal whatever its exact value


@dataclass
class OpResult:
    """The comparison of one trace name. status: "ok", "over" (tolerance), "nonfinite" or "shape"."""

    name: str
    shape: tuple
    status: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    nmse: float = 0.0
    cosine: float = 1.0
    worst: tuple | None = None  # index into shape (or ("first[3]",) for summaries)
    ref_value: float | None = None
    port_value: float | None = None
    bound: float = 0.0  # atol + rtol * max|ref|
    port_shape: tuple | None = None

    @property
    def failed(self):
        return self.status != "ok"


@dataclass
class LogitMetrics:
    positions: int
    argmax_agree: int
    top_k: int
    top_k_overlap: float  # mean over positions of |top-k(ref) & top-k(port)| / k
    kl_mean: float  # KL(softmax(ref) || softmax(port)), nats, mean over positions
    kl_max: float


@dataclass
class Report:
    ref_path: str
    port_path: str
    tolerance: tuple  # (dtype name, atol, rtol)
    ops: list = field(default_factory=list)
    first: OpResult | None = None
    hints: list = field(default_factory=list)  # [(id, message)] for the first divergent op
    details: list = field(default_factory=list)  # lines about the first divergent op
    logits: LogitMetrics | None = None
    missing: list = field(default_factory=list)  # in the reference, not in the port
    extra: list = field(default_factory=list)  # in the port, not in the reference
    notes: list = field(default_factory=list)
    family: str = "llama"

    @property
    def ok(self):
        return self.first is None

    @property
    def failed_ops(self):
        return [op for op in self.ops if op.failed]


class DiffError(InputError):
    """The two packs cannot be compared (different inputs, nothing in common, unreadable logits file)."""


# ---------------------------------------------------------------------------------------------------------------
# metrics


def tolerance_dtype(*names):
    """The least precise of the given dtype names (unknown names ignored); float32 when none is known."""
    known = [n for n in names if n in PRECISION_ORDER]
    return max(known, key=PRECISION_ORDER.index) if known else "float32"


def pack_dtype(pack):
    """The dtype a pack computed in (its metadata), else the least precise float dtype it stores."""
    if pack.metadata.get("dtype") in PRECISION_ORDER:
        return pack.metadata["dtype"]
    return tolerance_dtype(*(STORED_DTYPES.get(d) for d in pack.stored_dtypes.values()))


def prepare(ref, port):
    """Both arrays as float64 of the reference's shape (a port may drop or add axes of size 1), masked entries
    zeroed in both. -> (r, p), or None when the shapes differ otherwise."""
    r = np.asarray(ref, dtype=np.float64)
    p = np.asarray(port, dtype=np.float64)
    if r.shape != p.shape:
        if r.size != p.size or tuple(d for d in r.shape if d != 1) != tuple(d for d in p.shape if d != 1):
            return None
        p = p.reshape(r.shape)
    with np.errstate(invalid="ignore"):
        masked = (r <= MASKED) & (p <= MASKED)
    return np.where(masked, 0.0, r), np.where(masked, 0.0, p)


def error(r, p):
    """|p - r| elementwise; inf where exactly one side is NaN/inf or they are different infinities, 0 where both
    are NaN."""
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(p - r)
    both_nan = np.isnan(r) & np.isnan(p)
    return np.where(both_nan, 0.0, np.where(np.isnan(d), np.inf, d))


def measure(name, r, p, atol, rtol):
    """Metrics of one op from prepared arrays (see prepare)."""
    if r.size == 0:
        return OpResult(name, r.shape, "ok")
    d = error(r, p)
    finite_r = r[np.isfinite(r)]
    scale = float(np.max(np.abs(finite_r))) if finite_r.size else 0.0
    flat = int(np.argmax(d))
    worst = tuple(int(i) for i in np.unravel_index(flat, r.shape))
    max_abs = float(d.flat[flat])
    bound = atol + rtol * scale
    with np.errstate(all="ignore"):
        denominator = float(np.sum(r * r))
        nmse = float(np.sum(d * d)) / denominator if denominator > 0 else (0.0 if max_abs == 0 else math.inf)
        norms = float(np.linalg.norm(r)) * float(np.linalg.norm(p))
        cosine = float(np.sum(r * p)) / norms if norms > 0 and np.isfinite(norms) else (1.0 if max_abs == 0 else 0.0)
    nonfinite = bool(np.any(~np.isfinite(p) & np.isfinite(r)))
    status = "nonfinite" if nonfinite else ("over" if not max_abs <= bound else "ok")
    return OpResult(name, r.shape, status, max_abs, max_abs / scale if scale > 0 else max_abs, nmse, cosine, worst,
                    float(r.flat[flat]), float(p.flat[flat]), bound)


def measure_summary(name, ref, port, atol, rtol):
    """Compare two summary vectors (SUMMARY_FIELDS): mean, absmax and the first/last values against the bound,
    NaN/inf counts exactly; the sum is reported in the table but, depending on the size, not judged."""
    judged = [k for k, f in enumerate(SUMMARY_FIELDS) if f != "sum"]
    r, p = np.asarray(ref, np.float64), np.asarray(port, np.float64)
    result = measure(name, r[judged], p[judged], atol, rtol)
    result.shape, result.worst = (len(SUMMARY_FIELDS),), (SUMMARY_FIELDS[judged[result.worst[0]]],)
    scale = abs(r[SUMMARY_FIELDS.index("absmax")])
    result.bound = atol + rtol * scale
    result.max_rel = result.max_abs / scale if scale > 0 else result.max_abs
    counts = [SUMMARY_FIELDS.index("nan_count"), SUMMARY_FIELDS.index("inf_count")]
    result.status = ("nonfinite" if np.any(r[counts] != p[counts]) else
                     "ok" if result.max_abs <= result.bound else "over")
    return result


def logit_metrics(ref, port, k=5):
    """ref, port [..., V] -> LogitMetrics over every position (float64 softmax)."""
    r = np.asarray(ref, np.float64).reshape(-1, np.shape(ref)[-1])
    p = np.asarray(port, np.float64).reshape(r.shape)
    k = min(k, r.shape[-1])
    top_r = np.argsort(-r, axis=-1, kind="stable")[:, :k]
    top_p = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_r, top_p)])
    log_r = r - r.max(-1, keepdims=True)
    log_r = log_r - np.log(np.exp(log_r).sum(-1, keepdims=True))
    log_p = p - p.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    with np.errstate(invalid="ignore"):
        kl = np.sum(np.exp(log_r) * (log_r - log_p), axis=-1)
    kl = np.where(np.isnan(kl), np.inf, kl)
    return LogitMetrics(r.shape[0], int(np.sum(top_r[:, 0] == top_p[:, 0])), k, float(overlap), float(np.mean(kl)),
                        float(np.max(kl)))


# ---------------------------------------------------------------------------------------------------------------
# hints: what the error pattern of the first divergent op says about its cause


@dataclass
class View:
    """What a hint predicate sees: the first divergent op, its prepared arrays and the comparison context."""

    result: OpResult
    r: np.ndarray | None  # reference, float64, masked entries zeroed (None for a shape mismatch or a summary)
    p: np.ndarray | None
    axes: list | None  # shape letters from the trace table, e.g. ["B", "H", "S", "Dh"]
    family: str
    config: dict  # the reference's config.json ({} when unknown)
    results: dict  # name -> OpResult of every op compared
    ref: Pack
    port: Pack

    @property
    def name(self):
        return self.result.name

    @property
    def generic(self):
        return generic_name(self.result.name)[0]

    @property
    def layer(self):
        return generic_name(self.result.name)[1]

    def tail(self, *local_names):
        """Is the op one of these, named within its layer ("attn.scores", "out") or at the top ("logits")?"""
        return self.generic.removeprefix("layers.{i}.") in local_names

    def passed(self, name):
        """True / False when `name` was compared, None when the port does not hold it."""
        result = self.results.get(name)
        return None if result is None else not result.failed

    def sibling(self, suffix):
        """The concrete name of another op in the same layer: sibling("attn.k_rope") -> "layers.3.attn.k_rope"."""
        return suffix if self.layer is None else f"layers.{self.layer}.{suffix}"

    def over(self):
        return error(self.r, self.p) > self.result.bound


def _arrays(view):
    return view.r is not None and view.p is not None and view.r.ndim >= 1


def _new_nonfinite(v):
    return v.result.status == "nonfinite"


def _layout(v):
    return v.result.status == "shape"


def _close(a, b, bound):
    return a.shape == b.shape and bool(np.all(error(a, b) <= bound))


def gguf_permutation(dh):
    """llama.cpp's convert permutes Q/K rows within each head so that interleaved RoPE pairs (2j, 2j + 1) hold
    HF's half-split pairs (j, j + Dh/2): new[2j + t] = old[t * Dh/2 + j]."""
    half = dh // 2
    return np.array([t * half + j for j in range(half) for t in (0, 1)])


def _qk_permuted(v):
    if not (_arrays(v) and v.tail("attn.q", "attn.k", "attn.q_rope", "attn.k_rope", "attn.k_repeat")):
        return False
    dh = v.r.shape[-1]
    if dh % 2:
        return False
    perm = gguf_permutation(dh)
    return (_close(v.r[..., perm], v.p, v.result.bound) or _close(v.r, v.p[..., perm], v.result.bound))


# Llama ops a RoPE error reaches: everything from the rotation on (q, k, v and the norms before it are not).
AFTER_ROPE = ("rope.cos", "rope.sin", "attn.q_rope", "attn.k_rope", "attn.k_repeat", "attn.scores", "attn.probs",
              "attn.context", "attn.out", "attn_residual", "post_attn_norm", "mlp.gate", "mlp.up", "mlp.act",
              "mlp.down", "out", "final_norm", "logits")


def _first_position_clean(v):
    """Position 0 exact, later positions over tolerance: what a RoPE mismatch does (the angle is 0 at position 0,
    and the first query sees only its own key)."""
    if v.family == "opt" or not v.tail(*AFTER_ROPE):
        return False
    if not (_arrays(v) and v.axes and "S" in v.axes) or v.r.shape[v.axes.index("S")] < 2:
        return False
    axis = v.axes.index("S")
    per_position = np.moveaxis(error(v.r, v.p), axis, 0).reshape(v.r.shape[axis], -1).max(axis=1)
    first_is_zero = int(np.ravel(v.ref.tensors.get("position_ids", [0]))[0]) == 0
    later = float(per_position[1:].max())
    return first_is_zero and later > v.result.bound and per_position[0] <= min(v.result.bound, 0.01 * later)


def _heads_permuted(v):
    """The port holds the reference's heads in another order (axis 1 of [B, H, K, Dh])."""
    if not (_arrays(v) and v.r.ndim == 4) or v.r.shape[1] < 2:
        return False
    r, p, bound = v.r, v.p, v.result.bound
    mapping = []
    for h in range(p.shape[1]):
        matches = [g for g in range(r.shape[1]) if _close(r[:, g], p[:, h], bound)]
        if not matches:
            return False
        mapping.append(matches[0])
    return mapping != list(range(p.shape[1]))


def _kv_grouping(v):
    if v.tail("attn.k_repeat", "attn.v_repeat"):
        return _heads_permuted(v)
    heads = v.config.get("num_attention_heads")
    kv_heads = v.config.get("num_key_value_heads") or heads
    return (v.tail("attn.scores", "attn.probs") and heads is not None and kv_heads < heads
            and v.passed(v.sibling("attn.k_rope")) is not False and v.passed(v.sibling("attn.q_rope")) is not False)


def _opt_position_offset(v):
    if v.family != "opt":
        return False
    return v.tail("pos_embed", "position_ids") or (v.name == "layers.0.in" and "pos_embed" not in v.port.tensors)


def _stable_embedding(v):
    return v.family == "open-llama" and (v.name == "embed" or (v.name == "layers.0.in" and "embed" not in
                                                                 v.port.tensors))


NORM_OPS = ("embed", "input_norm", "post_attn_norm", "final_norm", "attn_in", "ffn_in", "self_attn_layer_norm",
            "final_layer_norm")


def _scale_explains(r, p, axis, bound):
    """Does one scale factor per slice (axis=-1: per row; the row axes: per feature; None: one for the whole
    tensor) take the error below a tenth of itself?"""
    with np.errstate(all="ignore"):
        s = np.sum(r * p, axis=axis, keepdims=True) / np.sum(r * r, axis=axis, keepdims=True)
    s = np.where(np.isfinite(s), s, 1.0)
    before = float(np.max(error(r, p)))
    after = float(np.max(error(r * s, p)))
    return before > bound and after <= max(bound, 0.1 * before) and bool(np.any(np.abs(s - 1.0) > 1e-12))


def _row_scale(v):
    """Each row (last axis) off by its own factor: an RMSNorm / LayerNorm eps (the factor depends on the row's
    variance), or the mean taken over the wrong length."""
    return _arrays(v) and v.tail(*NORM_OPS) and _scale_explains(v.r, v.p, -1, v.result.bound)


def _column_scale(v):
    """Each feature (column) off by its own factor, the same in every row (and no per-row factor): the norm's
    weight."""
    if not (_arrays(v) and v.tail(*NORM_OPS) and v.r.ndim >= 2):
        return False
    rows = tuple(range(v.r.ndim - 1))
    return _scale_explains(v.r, v.p, rows, v.result.bound) and not _row_scale(v)


def _opt_norm_swapped(v):
    """OPT layer 0: exactly one of reference and port passes its input through unchanged where the other
    normalises (attn_in is `in` itself for post-LN, LN(in) for pre-LN; likewise ffn_in and attn_residual)."""
    if not (v.family == "opt" and v.layer == 0 and _arrays(v) and v.tail("attn_in", "ffn_in")):
        return False
    source = v.ref.tensors.get(v.sibling("in" if v.tail("attn_in") else "attn_residual"))
    if source is None or np.shape(source) != v.r.shape:
        return False
    source = np.asarray(source, np.float64)
    return _close(v.r, source, v.result.bound) != _close(v.p, source, v.result.bound)


def _opt_layer_norm_placement(v):
    return v.family == "opt" and v.layer == 0 and v.tail(
        "attn_in", "self_attn_layer_norm", "ffn_in", "final_layer_norm", "attn_residual", "out")


def _global_scale(v):
    return _arrays(v) and v.tail("attn.scores", "attn.q") and _scale_explains(v.r, v.p, None, v.result.bound)


def _mask_only(v):
    """The mask itself, or errors only where the reference masks: scores at finfo.min, probs exactly 0."""
    if v.name == "mask":
        return True
    if not (_arrays(v) and v.tail("attn.scores", "attn.probs")):
        return False
    raw = np.asarray(v.ref.tensors[v.name], dtype=np.float64).reshape(v.r.shape)
    where = v.over()
    return bool(where.any()) and bool(np.all((raw[where] <= MASKED) | (raw[where] == 0.0)))


def _softmax(v):
    return v.tail("attn.probs") and v.passed(v.sibling("attn.scores")) is True


def _activation(v):
    if v.tail("mlp.act"):
        return v.passed(v.sibling("mlp.gate")) is True and v.passed(v.sibling("mlp.up")) is True
    return v.tail("act") and v.passed(v.sibling("fc1")) is True


def _lm_head(v):
    if v.name != "logits":
        return False
    before = [n for n in ("project_out", "final_layer_norm", "final_norm") if n in v.results]
    return bool(before) and v.passed(before[0]) is True


PROJECTIONS = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.gate", "mlp.up", "mlp.down", "fc1", "fc2",
               "project_in", "project_out")


def _projection(v):
    return v.tail(*PROJECTIONS)


OPT_PLACEMENT = (
    "OPT LayerNorm placement: pre-LN models (do_layer_norm_before=true) normalise before attention and FFN; "
    "post-LN models (false, OPT-350m) add the residual first and normalise after it (and have no final "
    "LayerNorm). Layer 0 diverging here means the port uses the other placement")

# (id, predicate, message), most specific first; every matching entry is reported, the first is the likely cause.
HINTS = [
    ("layout", _layout,
     "the port's tensor has another shape: store each trace name in the layout of the table in refimpl/trace.py "
     "(e.g. q as [B, H, S, Dh], not llama.cpp's [S, H, Dh] order)"),
    ("fp16-mask-overflow", lambda v: _new_nonfinite(v) and v.tail(
        "mask", "attn.scores", "attn.probs", "attn.context", "attn.out"),
     "NaN/inf after attention: fp16 mask overflow. finfo(float32).min (-3.4e38) added in float16 becomes -inf, "
     "and a fully masked row (a left-pad query) then gives softmax 0/0 = NaN. Build the mask with the compute "
     "dtype's finfo.min (transformers does) and take softmax in float32"),
    ("nonfinite", _new_nonfinite,
     "NaN/inf first appears here: an overflow (float16 saturates at 65504: large activations, residuals, "
     "mean of squares in a norm) or a division by zero. Compute this op, or its reduction, in float32"),
    ("qk-permutation", _qk_permuted,
     "q/k match after llama.cpp's Q/K row permutation (convert_hf_to_gguf permute() for interleaved RoPE): "
     "the weights and the RoPE convention disagree. HF weights need half-split RoPE (rotate_half, "
     "GGML_ROPE_TYPE_NEOX); GGUF-permuted weights need interleaved RoPE (GGML_ROPE_TYPE_NORM). If the port is "
     "consistent, skip these ops with --skip 'layers.*.attn.[qk]*'"),
    ("rope", _first_position_clean,
     "position 0 matches but later positions drift: RoPE convention. HF Llama rotates half-split pairs "
     "(j, j + Dh/2) with rotate_half; an interleaved rotation of pairs (2j, 2j + 1), a Q/K permutation "
     "mismatch, or a wrong rope_theta / rope_scaling all leave position 0 (angle 0) exact. (Past the "
     "attention, anything that matters only when a query sees more than one key does the same.)"),
    ("kv-repeat", _kv_grouping,
     "GQA grouping: query head j must use kv head j // (H / Hkv) (repeat_kv = np.repeat on the head axis, "
     "h0 h0 h1 h1); the port's order looks like np.tile (h0 h1 h0 h1)"),
    ("opt-position-offset", _opt_position_offset,
     "OPT learned positions: the row of embed_positions is position + 2 (OPTLearnedPositionalEmbedding offset), "
     "with position = cumsum(attention_mask) * attention_mask - 1, so the first real token reads row 2"),
    ("stable-embedding", _stable_embedding,
     "Open-Llama stable embedding: with use_stable_embedding the token embedding goes through a LayerNorm "
     "(embed_layer_norm, eps 1e-5) before layer 0 (not applied to inputs_embeds)"),
    ("opt-layer-norm-placement", _opt_norm_swapped, OPT_PLACEMENT),
    ("norm-eps", _row_scale,
     "a uniform scale error per row after a norm: the norm's eps (config rms_norm_eps / layer_norm eps: "
     "Llama 2 uses 1e-5, Llama 1 1e-6; eps goes inside the square root) or the mean taken over the wrong length"),
    ("norm-weight", _column_scale,
     "a per-feature scale error after a norm: the norm weight (x * w, not x * (1 + w); weight applied after the "
     "normalisation, in the compute dtype)"),
    ("opt-layer-norm-placement", _opt_layer_norm_placement, OPT_PLACEMENT),
    ("attention-scale", _global_scale,
     "one scale factor off across the scores: the attention scaling. Llama divides q k^T by sqrt(head_dim) "
     "after the product (head_dim may differ from hidden / heads); OPT multiplies q by head_dim^-0.5 after its "
     "bias"),
    ("mask", _mask_only,
     "errors only where the reference masks: the causal or padding mask (a key is visible when "
     "k <= past + s and attention_mask[k] == 1)"),
    ("softmax", _softmax,
     "scores match but probabilities do not: softmax over the last (key) axis, max-subtracted, accumulated in "
     "at least float32"),
    ("activation", _activation,
     "inputs match but the activation does not: hidden_act / activation_function (gelu is erf-exact, gelu_new "
     "the tanh approximation; silu = x * sigmoid(x))"),
    ("lm-head", _lm_head,
     "final hidden state matches but logits do not: the output projection (tie_word_embeddings, Open-Llama's "
     "shared_input_output_embedding, a transposed lm_head)"),
    ("projection", _projection,
     "the projection's input matches but its output does not: the weight (transposed, another layer's, a "
     "GGUF name mapped wrong) or a missing bias (attention_bias, mlp_bias, enable_bias)"),
]


def explain(view):
    """[(id, message)] of every catalogued cause matching the first divergent op, most likely first."""
    found = []
    for hint_id, predicate, message in HINTS:
        try:
            matched = predicate(view)
        except (ValueError, IndexError, KeyError, TypeError):  # a predicate that cannot read this op does not match
            matched = False
        if matched and hint_id not in [h for h, _ in found]:
            found.append((hint_id, message))
    return found


# ---------------------------------------------------------------------------------------------------------------
# the comparison


def raw_logits_pack(path, ref):
    """A port's raw logits file (flat little-endian float32, llama.cpp's layout) -> a Pack holding `logits`.

    [n_tokens, vocab] for every position of the reference, or [vocab] alone for the last position (what
    llama.cpp's examples/model-conversion/logits.cpp writes; compared with the reference's last position).
    """
    values = np.fromfile(path, dtype="<f4")
    if "logits" not in ref.tensors:
        raise DiffError(f"{ref.path}: the reference pack has no logits to compare {path} with")
    shape = np.shape(ref.tensors["logits"])
    if len(shape) < 2:
        raise DiffError(f"{ref.path}: the reference's logits have shape {list(shape)}, not [..., positions, vocab]")
    vocab, positions = shape[-1], int(np.prod(shape[:-1]))
    if values.size == positions * vocab:
        return Pack(str(path), {"logits": values.reshape(shape)}, {"raw_logits": "all"}, {"logits": "F32"})
    if values.size == vocab and len(shape) == 3 and shape[0] == 1:
        return Pack(str(path), {"logits": values.reshape(1, 1, vocab)}, {"raw_logits": "last"}, {"logits": "F32"})
    raise DiffError(f"{path}: {values.size} float32 values; expected {positions} x {vocab} (every position) or "
                    f"{vocab} (the last position) for the reference's logits {list(shape)}")


def diff_packs(ref, port, atol=None, rtol=None, skip=(), top_k=5, tolerance=None):
    """Compare two Packs -> Report. atol / rtol override the dtype's defaults; skip holds fnmatch patterns of
    trace names to leave out; tolerance names the dtype whose defaults apply (else the less precise pack's)."""
    family = guess_family(list(ref.tensors), ref.family)
    names = select(ref.trace_names(), skip)
    dtype = tolerance or tolerance_dtype(pack_dtype(ref), pack_dtype(port))
    default_atol, default_rtol = TOLERANCES[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    report = Report(ref.path, port.path, (dtype, atol, rtol), family=family)
    _check_inputs(ref, port, report)
    last_only = port.metadata.get("raw_logits") == "last"
    if last_only:
        report.notes.append("the port's logits are for the last position only: compared with the reference's last")

    results, arrays = {}, {}
    for name in names:
        if name not in port.tensors:
            report.missing.append(name)
            continue
        ref_summary = ref.summary and name in ref.tensors and name not in ("logits",) + INPUT_NAMES
        port_summary = port.summary and name not in ("logits",) + INPUT_NAMES
        if ref_summary or port_summary:
            r = ref.tensors[name] if ref_summary else summarize(ref.tensors[name])
            p = port.tensors[name] if port_summary else summarize(port.tensors[name])
            result = measure_summary(name, r, p, atol, rtol)
        else:
            ref_value, port_value = ref.tensors[name], port.tensors[name]
            if name == "logits" and last_only:
                ref_value = np.asarray(ref_value)[:, -1:]  # the port gave the last position only
            prepared = prepare(ref_value, port_value)
            if prepared is None:
                result = OpResult(name, tuple(np.shape(ref_value)), "shape", math.inf, math.inf, math.inf, 0.0,
                                  port_shape=tuple(np.shape(port_value)))
            else:
                result = measure(name, *prepared, atol, rtol)
                if report.first is None and result.failed:
                    arrays[name] = prepared
        results[name] = result
        report.ops.append(result)
        if report.first is None and result.failed:
            report.first = result
    report.extra = [n for n in port.tensors if n not in ref.tensors and n not in INPUT_NAMES]
    if not report.ops:
        raise DiffError(f"{port.path} holds none of the {len(names)} trace names of {ref.path}")

    if report.first is not None:
        r, p = arrays.get(report.first.name, (None, None))
        row = entry(report.first.name, family)
        axes = row[1].replace("B|1", "B").split() if row else None
        if axes is not None and (r is None or len(axes) != r.ndim):
            axes = None
        view = View(report.first, r, p, axes, family, ref.config() or {}, results, ref, port)
        report.hints = explain(view)
        report.details = _details(view, row)
    if "logits" in results and results["logits"].status != "shape" and not ref.summary:
        ref_logits, port_logits = np.asarray(ref.tensors["logits"]), np.asarray(port.tensors["logits"])
        if last_only:
            ref_logits = ref_logits[:, -1:]
        if ref_logits.ndim >= 2 and np.all(np.isfinite(port_logits)):
            report.logits = logit_metrics(ref_logits, port_logits.reshape(ref_logits.shape), top_k)
    return report


def _check_inputs(ref, port, report):
    for name in INPUT_NAMES:
        if name in ref.tensors and name in port.tensors:
            a, b = np.asarray(ref.tensors[name]), np.asarray(port.tensors[name])
            if a.shape != b.shape or not np.array_equal(a, b):
                raise DiffError(f"the packs were made from different {name}: {a.ravel()[:12].tolist()} vs "
                                f"{b.ravel()[:12].tolist()}; run the port on the reference's inputs")
        elif name == "input_ids" and name in ref.tensors and "raw_logits" not in port.metadata:
            report.notes.append("the port pack has no input_ids: make sure it ran on "
                                f"{np.asarray(ref.tensors[name]).ravel()[:12].tolist()}")


def _details(view, row):
    """Lines describing the first divergent op: its table row, the worst index, the error along positions."""
    op = view.result
    lines = []
    if row is not None:
        lines.append(f"{list(op.shape)} ({row[1]}): {row[2]}")
        lines.append(f"transformers: {row[3]}   GGUF / llama.cpp: {row[4]}")
    if op.status == "shape":
        lines.append(f"shape: reference {list(op.shape)}, port {list(op.port_shape)}")
        return lines
    index = ", ".join(str(i) for i in op.worst)
    lines.append(f"worst at {op.name}[{index}]: ref {op.ref_value:.6g}, port {op.port_value:.6g}, "
                 f"|diff| {op.max_abs:.3g} (bound {op.bound:.3g})")
    if view.axes and "S" in view.axes and _arrays(view):
        axis = view.axes.index("S")
        per_position = np.moveaxis(error(view.r, view.p), axis, 0).reshape(view.r.shape[axis], -1).max(axis=1)
        shown = " ".join(f"{e:.1e}" for e in per_position[:16]) + (" ..." if per_position.size > 16 else "")
        lines.append(f"max |diff| by position: {shown}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# text


def _shape_text(shape):
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _describe(pack):
    meta = pack.metadata
    if "raw_logits" in meta:
        return f"raw float32 logits ({'every position' if meta['raw_logits'] == 'all' else 'last position'})"
    if "refimpl_version" not in meta:
        return "no refimpl metadata"
    text = f"refimpl {meta['refimpl_version']}, {meta.get('class', '?')}, {meta.get('dtype', '?')}"
    return text + (", summaries" if pack.summary else "")


def format_report(report, ref=None, port=None, all_ops=True):
    """The report as text: a table of every op, then the first divergent op, its likely cause, the logits."""
    dtype, atol, rtol = report.tolerance
    out = []
    if ref is not None and port is not None:
        out.append(f"reference: {report.ref_path} ({_describe(ref)})")
        out.append(f"port:      {report.port_path} ({_describe(port)})")
    out.append(f"tolerance ({dtype}): an op passes when max|port - ref| <= {atol:.0e} + {rtol:.0e} * max|ref|")
    out.extend(f"note: {n}" for n in report.notes)
    out.append("")
    width = max([len(op.name) for op in report.ops] + [2])
    out.append(f"{'op':<{width}}  {'shape':<14} {'max abs':>9} {'max rel':>9} {'NMSE':>9} {'cosine':>9}")
    for op in report.ops:
        if not all_ops and not op.failed and op is not report.first:
            continue
        marker = {"ok": "ok", "over": "OVER", "nonfinite": "NaN/inf", "shape": "SHAPE"}[op.status]
        if op is report.first:
            marker += "  <- first divergent op"
        out.append(f"{op.name:<{width}}  {_shape_text(op.shape):<14} {op.max_abs:>9.2e} {op.max_rel:>9.2e} "
                   f"{op.nmse:>9.2e} {op.cosine:>9.6f}  {marker}")
    if report.missing:
        shown = ", ".join(report.missing[:6]) + (" ..." if len(report.missing) > 6 else "")
        out.append(f"not in the port ({len(report.missing)}, skipped): {shown}")
    if report.extra:
        out.append(f"only in the port ({len(report.extra)}, ignored): {', '.join(report.extra[:6])}")
    out.append("")
    if report.first is not None:
        out.append(f"first divergent op: {report.first.name}")
        out.extend(f"  {line}" for line in report.details)
        if report.hints:
            hint_id, message = report.hints[0]
            out.append(f"  likely cause [{hint_id}]: {message}")
            for hint_id, message in report.hints[1:]:
                out.append(f"  also possible [{hint_id}]: {message}")
        else:
            out.append("  likely cause: no catalogued pattern matches; compare the values around the worst index")
    if report.logits is not None:
        m = report.logits
        out.append(f"final logits ({m.positions} positions): argmax agrees {m.argmax_agree}/{m.positions}, "
                   f"top-{m.top_k} overlap {m.top_k_overlap:.3f}, KL(ref||port) mean {m.kl_mean:.3e} "
                   f"max {m.kl_max:.3e}")
    failed = report.failed_ops
    if report.ok:
        out.append(f"result: PASS ({len(report.ops)} ops within tolerance)")
    else:
        out.append(f"result: FAIL ({len(failed)} of {len(report.ops)} ops over tolerance; first: "
                   f"{report.first.name})")
    return "\n".join(out)


def report_json(report):
    """The report as a JSON-ready dict (for CI tools)."""
    return {
        "ok": report.ok,
        "tolerance": {"dtype": report.tolerance[0], "atol": report.tolerance[1], "rtol": report.tolerance[2]},
        "first_divergent_op": None if report.first is None else report.first.name,
        "hints": [hint_id for hint_id, _ in report.hints],
        "ops": [{"name": op.name, "status": op.status, "max_abs": op.max_abs, "max_rel": op.max_rel,
                 "nmse": op.nmse, "cosine": op.cosine, "worst": list(op.worst) if op.worst else None}
                for op in report.ops],
        "logits": None if report.logits is None else vars(report.logits),
        "missing": report.missing,
    }


def precision_rows(reference, traces):
    """{label: Trace} against a float64 reference Trace -> [(name, {label: (max_rel, nmse)})] in graph order."""
    rows = []
    for name in reference:
        cells = {}
        for label, trace in traces.items():
            if name in trace:
                prepared = prepare(reference[name], trace[name])
                if prepared is not None:
                    result = measure(name, *prepared, 0.0, 0.0)
                    cells[label] = (result.max_rel, result.nmse)
        rows.append((name, cells))
    return rows


def dumps(report):
    return json.dumps(report_json(report), indent=1, default=float)
