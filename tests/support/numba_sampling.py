"""Top-k / top-p sampling without sorting the vocabulary: the draw refimpl.generate makes, from the same random number.

refimpl sorts all V scores for top-k and argsorts them for top-p. Here top-k needs one partition (O(V)) and top-p
sorts only the few tokens that can be kept: the largest m scores, m doubling from 64 until the mass outside them is
at most 1 - top_p (every token outside is then removed, as the ascending cumulative sum says). The draw is
refimpl.generate.sample's inverse CDF, in token order, on the same u = rng.random(), so a seed gives the same tokens.
Masses are summed in float64 (refimpl's top-p sums float32 probabilities): a token whose cumulative mass lies within
float32 rounding of 1 - top_p may be kept by one and removed by the other.
The O(V) passes are Numba loops (no temporaries); partitions and the small sort are NumPy's.
"""
from __future__ import annotations

import numpy as np

from refimpl_accel.cpu.jit import njit

FIRST_CANDIDATES = 64


@njit()
def _weights(scores, kth, weight):
    """weight[j] = exp(s_j - max) for the tokens top-k keeps (s_j >= kth, finite), else 0. Returns their sum."""
    top = scores.max()
    total = 0.0
    for j in range(scores.shape[0]):
        if scores[j] >= kth and scores[j] > -np.inf:
            weight[j] = np.exp(np.float64(scores[j]) - np.float64(top))
            total += weight[j]
        else:
            weight[j] = 0.0
    return total


@njit()
def _draw(weight, u):
    """The first token whose cumulative weight exceeds u * total (refimpl.generate.sample's inverse CDF)."""
    total = 0.0
    for j in range(weight.shape[0]):
        total += weight[j]
    target = u * total
    running = 0.0
    for j in range(weight.shape[0]):
        running += weight[j]
        if running > target:
            return j
    return weight.shape[0] - 1


def _remove_below_top_p(scores, weight, total, top_p):
    """Zero the weights of the tokens TopPLogitsWarper removes, sorting only the candidates that can stay."""
    alive = np.flatnonzero(weight > 0.0)
    alive_scores = scores[alive]
    n = alive.shape[0]
    m = min(FIRST_CANDIDATES, n)
    while True:
        cut = np.partition(alive_scores, n - m)[n - m]  # candidates: every token scoring >= cut
        outside = weight[alive[alive_scores < cut]].sum() / total
        if outside <= 1.0 - top_p or m == n:
            break
        m = min(2 * m, n)
    candidates = alive[alive_scores >= cut]  # in token order, so a stable sort breaks ties by token id
    order = candidates[np.argsort(scores[candidates], kind="stable")]  # ascending, as TopPLogitsWarper sorts
    cumulative = outside + np.cumsum(weight[order]) / total
    removed = cumulative <= 1.0 - top_p
    removed[-1] = False  # min_tokens_to_keep = 1
    weight[order[removed]] = 0.0
    weight[alive[alive_scores < cut]] = 0.0


def sample_row(scores, top_k, top_p, u):
    """One token from scores [V] (float32, -inf = removed) after top-k then top-p, drawn at u in [0, 1)."""
    V = scores.shape[0]
    kth = np.partition(scores, V - min(top_k, V))[V - min(top_k, V)] if top_k > 0 else -np.inf
    weight = np.empty(V, np.float64)
    total = _weights(scores, np.float32(kth), weight)
    if top_p < 1.0:
        _remove_below_top_p(scores, weight, total, top_p)
    return _draw(weight, float(u))


def sample(scores, top_k, top_p, rng):
    """tokens [B] from scores [B, V]: top_k (0 = off) then top_p (1.0 = off), then one draw per row from rng.

    twin: refimpl.processors top_k, top_p and refimpl.generate sample, in that order (temperature is applied before,
    by refimpl.generate.temperature_scale).
    """
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    u = rng.random((scores.shape[0], 1))  # the same numbers refimpl.generate.sample draws
    return np.array([sample_row(row, int(top_k or 0), float(top_p), u[b, 0]) for b, row in enumerate(scores)],
                    dtype=np.int64)
