"""support.cuda_sampling against its host twin support.numba_sampling.sample_row: the checks tests/test_cuda_sampling.py runs
under Numba's CUDA simulator (NumPy arrays) and tests/test_cuda_sampling_device.py runs on a GPU (CuPy arrays).

The twin is deterministic given u, so a check is equality, token for token, on the same u; as in tests/test_backend_ops.py, `dev`
moves a NumPy array to where the kernels run and `host` brings one back. Rows come in kinds chosen to reach the
hard cases: ties (scores from a few values), flat rows (every score equal, where float64 masses are exact integers
and u * total can sit exactly on a boundary), -inf entries, all -inf rows, and +-0.0 (equal to NumPy).
"""
from __future__ import annotations

import numpy as np

from support.numba_sampling import sample_row

from support import cuda_sampling as S

KINDS = ("normal", "ties", "flat", "neg_inf", "signed_zero", "peaked")
# u at the ends of [0, 1): rng.random() returns k * 2^-53 for k in [0, 2^53)
EDGE_U = (0.0, 2.0 ** -53, 0.5, 1.0 - 2.0 ** -53, 1.0 - 2.0 ** -30, 1e-12)


def make_scores(rng, kind, rows, vocab):
    """[rows, vocab] float32 scores of one kind (see the module docstring)."""
    if kind == "normal":
        s = rng.standard_normal((rows, vocab)) * 3.0
    elif kind == "ties":
        s = rng.integers(-3, 2, (rows, vocab)).astype(np.float64) * 0.75
    elif kind == "flat":
        s = np.full((rows, vocab), rng.choice([0.0, -2.5, 7.0]))
    elif kind == "neg_inf":
        s = rng.integers(-2, 2, (rows, vocab)).astype(np.float64)
        s[rng.random((rows, vocab)) < 0.5] = -np.inf
        if rows > 1:
            s[-1] = -np.inf  # a row with nothing left
    elif kind == "signed_zero":
        s = rng.choice([0.0, -0.0, -1.0, 1.0], (rows, vocab))
    elif kind == "peaked":  # one token far above: others' weights underflow (exp(-800) = 0 in float64)
        s = rng.standard_normal((rows, vocab))
        s[:, rng.integers(vocab)] = 800.0
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(s, dtype=np.float32)


def reference(scores, top_k, top_p, u):
    """The host twin's tokens for every row (support.numba_sampling.sample_row on the same u)."""
    return np.array([sample_row(row, int(top_k or 0), float(top_p), float(u[b])) for b, row in enumerate(scores)],
                    dtype=np.int64)


def host_defined(scores, top_p):
    """Rows the host can draw from: with top_p < 1 an all -inf row makes the host raise (it has no token to keep)."""
    return top_p >= 1.0 or bool(np.all(np.any(scores > -np.inf, axis=-1)))


def run(dev, host, scores, top_k, top_p, u, threads=None):
    """(tokens, path) from the kernel, both as NumPy arrays."""
    B = scores.shape[0]
    path = dev(np.full(B, -1, np.int8))
    out = dev(np.full(B, -7, np.int64))
    tokens = S.sample(dev(scores), top_k, top_p, dev(np.asarray(u, np.float64)), out=out, threads=threads, path=path)
    return np.asarray(host(tokens)), np.asarray(host(path))


def check_sample(dev, host, scores, top_k, top_p, u, threads=None):
    """The kernel's tokens equal the host twin's on the same u. Returns (tokens, paths taken: S.PARALLEL, ...)."""
    tokens, path = run(dev, host, scores, top_k, top_p, u, threads)
    assert tokens.dtype == np.int64
    expected = reference(scores, top_k, top_p, u)
    if not np.array_equal(tokens, expected):
        bad = int(np.flatnonzero(tokens != expected)[0])
        raise AssertionError(f"row {bad}: kernel token {tokens[bad]} (path {path[bad]}), host {expected[bad]}; "
                             f"top_k={top_k} top_p={top_p} u={float(u[bad])!r} threads={threads}\n"
                             f"scores={scores[bad].tolist()}")
    assert set(path.tolist()) <= {S.PARALLEL, S.SERIAL, S.EMPTY}, path
    return tokens, path


def check_random(dev, host, seed, rows, vocab, top_k, top_p, kind, threads=None, edge_u=False):
    """Rows of one kind, u from rng (or the EDGE_U values), against the host twin."""
    rng = np.random.default_rng(seed)
    scores = make_scores(rng, kind, rows, vocab)
    if not host_defined(scores, top_p):
        scores[:, 0] = 0.0
    if edge_u:
        u = np.array([EDGE_U[(seed + b) % len(EDGE_U)] for b in range(rows)])
    else:
        u = rng.random((rows, 1))[:, 0]
    return check_sample(dev, host, scores, top_k, top_p, u, threads)[1]


def check_kept(dev, host, scores, top_k, top_p, expected_kept, threads=None):
    """One row whose kept set was worked out by hand: refimpl's own filters keep exactly expected_kept, and the
    kernel (equal to the host twin on every u tried) draws by the renormalised distribution over expected_kept: at
    the middle of each token's interval, and just below and just above each interval's end (a token kept or removed
    by mistake shifts an end, or adds an interval there), and at both ends of [0, 1)."""
    from refimpl.processors import top_k as top_k_filter, top_p as top_p_filter

    row = np.asarray(scores, np.float32)
    filtered = row[None]
    if top_k:
        filtered = top_k_filter(None, filtered, top_k)
    if top_p < 1.0:
        filtered = top_p_filter(None, filtered, top_p)
    kept = sorted(expected_kept)
    assert np.flatnonzero(filtered[0] > -np.inf).tolist() == kept, (np.flatnonzero(filtered[0] > -np.inf), kept)
    w = np.exp(row[kept].astype(np.float64) - row.max())
    cdf = np.concatenate([[0.0], np.cumsum(w) / w.sum()])
    us, want = [0.0, 1.0 - 2.0 ** -53], [kept[0], kept[-1]]
    for i, token in enumerate(kept):
        us.append((cdf[i] + cdf[i + 1]) / 2)
        want.append(token)
        if i + 1 < len(kept):
            us += [cdf[i + 1] * (1 - 1e-9), cdf[i + 1] * (1 + 1e-9)]
            want += [token, kept[i + 1]]
    rows = np.repeat(row[None], len(us), axis=0)
    tokens, paths = check_sample(dev, host, rows, top_k, top_p, np.array(us), threads)
    assert tokens.tolist() == want, (tokens.tolist(), want)
    return paths


def check_boundary_ties(dev, host, threads=None):
    """Ties sitting exactly on the top-k and on the top-p boundary, with the kept sets worked out by hand.

    Returns every path taken (flat rows put u * total exactly on a prefix sum: the serial fallback must agree)."""
    paths = []
    # top-k = 2 without ties: the two largest, among -inf entries
    paths += list(check_kept(dev, host, [0.0, -np.inf, 2.0, 1.0, 3.0, -np.inf], 2, 1.0, {2, 4}, threads))
    # top-k = 2 with the 2nd largest score (3) tied three times: all three are kept (refimpl removes only s < kth)
    paths += list(check_kept(dev, host, [1.0, 3.0, 3.0, 2.0, 3.0], 2, 1.0, {1, 2, 4}, threads))
    # top-k = 3 with the 3rd largest tied: 5.0 (id 3), then 4.0 at ids 0, 2, 5 -> 4 tokens kept
    paths += list(check_kept(dev, host, [4.0, 1.0, 4.0, 5.0, -np.inf, 4.0], 3, 1.0, {0, 2, 3, 5}, threads))
    # top-p = 0.5 on four equal scores: ascending cumulative 0.25, 0.5 (<= 0.5: removed), 0.75, 1.0, the stable
    # sort putting the lower ids first: ids 0 and 1 go, 2 and 3 stay
    paths += list(check_kept(dev, host, [2.0, 2.0, 2.0, 2.0], 0, 0.5, {2, 3}, threads))
    # the same among -inf entries, with top_p = 0.75 (1 - top_p = 0.25 exactly: the first of the four goes)
    paths += list(check_kept(dev, host, [-np.inf, 0.0, 0.0, 0.0, -np.inf, 0.0], 0, 0.75, {2, 3, 5}, threads))
    # a larger token above them: w = e^-3 for the 0.0s, 1 for id 6, the 0.0s' cumulative <= 4 e^-3 / (1 + 4 e^-3)
    # = 0.17 <= 0.5: only id 6 stays
    paths += list(check_kept(dev, host, [-np.inf, 0.0, 0.0, 0.0, -np.inf, 0.0, 3.0], 0, 0.5, {6}, threads))
    # top-p boundary inside a tie group: w = e^-1 for the 0.0s (ids 0, 2, 3), 1 for the 1.0s, T = 2 + 3/e = 3.10;
    # the 0.0s' cumulative 0.119, 0.237, 0.356: top_p = 0.8 removes <= 0.2, id 0 only
    paths += list(check_kept(dev, host, [0.0, 1.0, 0.0, 0.0, 1.0], 0, 0.8, {1, 2, 3, 4}, threads))
    # top-k = 2 with the 2nd largest (0.0) tied four times, then top-p cutting inside that tie group: w = e^-5 for
    # the 0.0s, T = 1 + 4 e^-5, cumulative 0.0066, 0.0131, 0.0197, 0.0262 (ids 0, 1, 3, 5): top_p = 0.99 removes id 0
    paths += list(check_kept(dev, host, [0.0, 0.0, 5.0, 0.0, -1.0, 0.0], 2, 0.99, {1, 2, 3, 5}, threads))
    # and a flat tie group (w = 1): ids 0, 1, 2, 3, 5 at cumulative 0.2 .. 1.0, top_p = 0.5 removes ids 0, 1
    paths += list(check_kept(dev, host, [0.0, 0.0, 0.0, 0.0, -1.0, 0.0], 2, 0.5, {2, 3, 5}, threads))
    # +0.0 and -0.0 are one score (NumPy compares them equal): top_k = 1 keeps both, top_p = 0.5 then ids >= 2
    paths += list(check_kept(dev, host, [-0.0, -1.0, 0.0, -0.0], 1, 1.0, {0, 2, 3}, threads))
    paths += list(check_kept(dev, host, [-0.0, -np.inf, 0.0, -0.0, 0.0], 0, 0.5, {3, 4}, threads))
    # a tiny top_p (1 - top_p rounds to 1.0): only the top token, the highest id among the tied maxima
    paths += list(check_kept(dev, host, [1.0, 3.0, 3.0, 0.0], 0, 1e-17, {2}, threads))
    return paths


def check_edges(dev, host, threads=None):
    """Rows the kernel must not trip on: V = 1, all -inf (token V - 1, path EMPTY), top_k > V, k = V."""
    check_sample(dev, host, np.array([[0.5]], np.float32), 0, 1.0, np.array([0.3]), threads)
    check_sample(dev, host, np.array([[0.5]], np.float32), 1, 0.5, np.array([1.0 - 2.0 ** -53]), threads)
    neg = np.full((2, 5), -np.inf, np.float32)
    tokens, path = run(dev, host, neg, 0, 1.0, np.array([0.0, 0.7]), threads)
    assert tokens.tolist() == [4, 4] and path.tolist() == [S.EMPTY, S.EMPTY], (tokens, path)
    assert reference(neg, 0, 1.0, np.array([0.0, 0.7])).tolist() == [4, 4]
    rng = np.random.default_rng(5)
    scores = make_scores(rng, "normal", 2, 17)
    for k in (16, 17, 18, 1000):
        check_sample(dev, host, scores, k, 0.9, rng.random(2), threads)


def _parallel_prefix(w, threads):
    """The kernel's prefix sums of w (no top-k / top-p): per-thread chunk sums, a Hillis-Steele scan of them, then
    each chunk's running sum from the mass before it. Returns (prefix [V], total) in that rounding order."""
    V = w.shape[0]
    chunk = -(-V // threads)
    sums = [0.0] * threads
    for t in range(threads):
        for j in range(min(t * chunk, V), min(t * chunk + chunk, V)):
            sums[t] += w[j]
    step = 1
    while step < threads:
        sums = [sums[t] + (sums[t - step] if t >= step else 0.0) for t in range(threads)]
        step *= 2
    prefix = np.empty(V)
    for t in range(threads):
        running = sums[t - 1] if t else 0.0
        for j in range(min(t * chunk, V), min(t * chunk + chunk, V)):
            running += w[j]
            prefix[j] = running
    return prefix, sums[-1]


def rounding_case(seed, vocab=16, threads=4):
    """(scores [1, V], u [1]): a row and a u for which the kernel's parallel prefix sums, taken at face value, would
    draw another token than the host's sequential ones (they differ in the last bit, and u * total falls between).
    The kernel must see that it is within its rounding bound and draw serially."""
    import math

    rng = np.random.default_rng(seed)
    for _ in range(1000):
        scores = (rng.standard_normal(vocab) * 2).astype(np.float32)
        w = np.array([math.exp(float(s) - float(scores.max())) for s in scores])
        prefix, total = _parallel_prefix(w, threads)
        sequential = np.cumsum(w)  # in order, as support.numba_sampling._draw adds
        for j in np.flatnonzero(prefix != sequential):
            for direction in (-np.inf, np.inf):
                u = sequential[j] / sequential[-1]
                for _ in range(4):  # u within a few ulps of the host's boundary after token j
                    u = float(np.nextafter(u, direction))
                    if not 0.0 <= u < 1.0:
                        break
                    host_pick = int(np.argmax(sequential > u * sequential[-1]))
                    naive_pick = int(np.argmax(prefix > u * total))
                    if host_pick != naive_pick:
                        return scores[None], np.array([u])
    raise AssertionError("no row found whose parallel and sequential prefix sums pick different tokens")
