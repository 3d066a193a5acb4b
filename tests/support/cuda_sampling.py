"""Top-k / top-p sampling on the device: one token per row of logits [B, V], the draw support.numba_sampling.sample makes
from the same uniform u, without copying the vocabulary to the host and without sorting it.

twin: support.numba_sampling.sample_row (itself refimpl.processors' top_k, top_p and refimpl.generate's sample, in that order).

The host twin, for one row of scores s [V] (float32, -inf = removed) and u in [0, 1):
  1. top-k keeps the tokens with s_j >= the k-th largest score (ties with the k-th are all kept);
  2. weights w_j = exp(s_j - max) in float64 for the kept, finite tokens (0 elsewhere), total = sum w;
  3. top-p sorts the kept tokens ascending by score, stably (equal scores: lower token id first), and removes
     those whose cumulative mass (sum of w up to and including them, / total) is <= 1 - top_p, always keeping the
     last (the top token);
  4. the draw: the first token, in token order, whose running float64 sum of the remaining weights exceeds
     u * (their sum).

A sort is what a GPU should avoid here: V is 32k..256k and only one number per row is wanted. Every step above can
be phrased as a threshold on an ordered key, and a threshold can be found by bisection, each probe being one pass
over the row and one block-wide reduction. One block of T threads handles one row (grid = B blocks); thread t reads
tokens t, t + T, t + 2T, ... (coalesced), and the block combines the T partial results in a shared-memory tree.

Ordered keys. A float32's bit pattern, read as an unsigned integer, sorts positive floats correctly and negative
ones backwards. key = bits | 0x80000000 for a positive float, ~bits for a negative one, maps float order onto
integer order exactly (-inf -> 0x007FFFFF, the smallest key of a real score; -0.0 is first folded onto +0.0, since
NumPy's comparisons treat them as equal). So "s_i < s_j" is "key_i < key_j", and a search over scores becomes a
search over the integers [0, 2^32): at most 32 probes.

  Top-k: the k-th largest key is the largest t with count(key >= t) >= k. Bisection keeps lo, hi with
  count(>= lo) >= k and count(>= hi + 1) < k, starting from the row's min and max keys. Counts are integers, so the
  answer is exact, and "keep key >= t" keeps ties with the k-th as the host does. Each probe at mid also reports
  the nearest keys of the row on either side of mid (the same reduction tree carries a sum, a min and a max), and
  lo / hi jump to them: a probe halves the interval and leaves at least one of the row's keys out of it, so a row
  with D distinct keys takes at most min(32, D) probes (a few on rows of ties).

  Weights: each thread writes exp(s_j - max) (or 0) for its tokens into a float64 scratch row, read by every later
  pass (the host twin's `weight` array).

  Top-p: the host removes a prefix of the ascending order by (score, token id), so what it keeps is "every token
  whose (key, id) is above some cut (key*, id*)". Let F(v, i) be the mass of the tokens with key < v, or key == v
  and id <= i: the host's cumulative mass of token (v, i). It only grows with (v, i), so the cut is found by
  bisection: first key* = the smallest key v with F(v, V-1) / total > 1 - top_p (<= 32 probes), then, among the
  tokens tied at key*, id* = the smallest id i with F(key*, i) / total > 1 - top_p (<= log2 V probes, a handful
  when the tie group is narrow, none for a single token). Kept: key > key*, or key == key* and id >= id*. The top
  token is always kept: F of the top token is `total` itself (the same masked sum), ratio 1.0 > 1 - top_p; if
  1 - top_p rounds to 1.0 the bisections end on the top token, which is then all that is kept, as the host's
  `removed[-1] = False` does.

  Draw: thread t takes a contiguous chunk of ceil(V / T) tokens, so that chunks follow token order; it sums its
  kept weights, a Hillis-Steele scan over the T chunk sums (log2 T steps) gives each chunk the mass before it, and
  each thread walks its chunk to the first token whose running sum exceeds u * total; the block takes the lowest.

Float64 and exactness. Integers (counts, keys) are exact, so top-k matches the host bit for bit. Masses are float64
sums in another order than the host's (it adds in token order, and for top-p in sorted order): they differ in the
last bits, by at most about (V + 2 ceil(V / T)) * 2^-53 of the total.
  * The draw is made exact anyway. Let P_j be our prefix at the chosen token j and P_(j-1) the one before it. If
    P_j > u * total + delta and P_(j-1) < u * total - delta, with delta = 4 (V + 2 ceil(V/T) + 16) 2^-53 total
    (twice the rounding bound of both summation orders, of both products u * total, and of 1-ulp differences of a
    device's exp), then the host's sequential sums cross u * total at the same j. When the margin check fails
    (u * total within delta of a prefix sum: flat rows, where sums are exact integers and u * total can sit exactly
    on one, or u near 0 with a tiny first weight), thread 0 redoes the draw serially, the host's own loop, in token
    order. `path` reports which happened: 0 parallel, 1 serial, 2 nothing to draw (all weights 0: token V - 1).
  * Top-p is not re-checked: a token is kept or removed on our float64 ratio F / total against 1 - top_p. It can
    differ from the host only when some token's cumulative mass lies within ~(V + 2 ceil(V/T)) * 2^-53 (relative) of
    1 - top_p, e.g. 1e-11 for V = 32000: for real logits, a chance of that order per draw. (Exact ties in mass do
    not cause it: when the weights are equal, e.g. tied at the max where w = 1, both sides' sums are exact
    integers and the ratios are the same correctly rounded quotients.) The host itself documents the same kind of
    difference against refimpl's float32 top-p.
  * On a real device exp() may differ from the host's libm by an ulp: covered by delta on the parallel path; on the
    serial path (and in top-p) it could flip a draw only at a boundary within a few ulps, as above.
Not handled: NaN or +inf scores (the host's result is then meaningless too); an all -inf row returns V - 1 (the
host's draw does so with top_p = 1; with top_p < 1 the host raises).

Cost per row, T threads: P passes over the row, each V / T loads per thread and one O(log T) shared-memory
reduction, P = 3 (range, weights, draw) + top-k's probes (<= 32) + top-p's (1 for the total, <= 32 on keys, 1 for
the tie group, and at most log2 of its id span on ids). Because probes snap to the row's own keys, random-normal
logits take 13-15 top-k probes at V = 32000..128256, and 16-21 top-p probes alone or 7-8 after top-k = 50 (few keys
are left above the k-th): P ~ 20-30 in practice, ~100 at worst. O(V) float64 scratch per row; the serial
fallback, when taken, is O(V) on one thread. Nothing is sorted and only B int64 come back. A radix select (8 key
bits per pass, a 256-bin histogram) would take 4 passes instead of ~15 for top-k; bisection is kept for clarity,
and because the top-p probes sum float64 masses, which a histogram of atomics would add in a nondeterministic
order.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from refimpl import ConfigError

from refimpl_accel.cuda import ops as K

MAX_THREADS = K.MAX_THREADS  # size of the shared scratch arrays (a global: Numba needs a constant shape)
SAMPLE_THREADS = 256  # default threads per block (one block per row): as many as the shared scratch holds
SIGN = 0x80000000
MASK32 = 0xFFFFFFFF
KEY_NEG_INF = 0x007FFFFF  # key of -inf (bits 0xFF800000)
NO_KEY = 1 << 32  # above every key (and every token id)
ULP = 2.0 ** -53  # unit roundoff of float64
PARALLEL, SERIAL, EMPTY = 0, 1, 2  # the values of `path`
MAX_PROBES = 64  # each bisection halves a range below 2^63: it ends within 64 probes; the bound only guarantees a
# block never spins (were a reduction ever to disagree between threads, the result would be wrong, not a hang)


@cuda.jit(device=True)
def _lesser(a, b):
    """min(a, b). Not the builtin: Numba 0.66-0.68's CUDA target fails to compile a two-argument min / max
    ("Signature mismatch: 2 argument types given", numba/numba#10753); the simulator does not see it."""
    return a if a < b else b


@cuda.jit(device=True)
def _greater(a, b):
    """max(a, b), as _lesser."""
    return a if a > b else b


@cuda.jit(device=True)
def _key(bits):
    """The float32 with these bits as an integer in [0, 2^32) that sorts like the float (-0.0 folded onto +0.0)."""
    b = np.int64(bits)
    if b == SIGN:
        b = np.int64(0)
    if b >= SIGN:
        return MASK32 - b
    return b + SIGN


@cuda.jit(device=True)
def _block_min(scratch, value):
    """Minimum of `value` over the block's threads (blockDim a power of two), by a tree in shared memory."""
    tid = cuda.threadIdx.x
    scratch[tid] = value
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            scratch[tid] = _lesser(scratch[tid], scratch[tid + step])
        cuda.syncthreads()
        step //= 2
    result = scratch[0]
    cuda.syncthreads()
    return result


@cuda.jit(device=True)
def _block_max(scratch, value):
    """Maximum of `value` over the block's threads, as _block_min."""
    tid = cuda.threadIdx.x
    scratch[tid] = value
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            scratch[tid] = _greater(scratch[tid], scratch[tid + step])
        cuda.syncthreads()
        step //= 2
    result = scratch[0]
    cuda.syncthreads()
    return result


@cuda.jit(device=True)
def _reduce3(ssum, smin, smax, x, lo, hi):
    """(sum of x, min of lo, max of hi) over the block's threads: one shared-memory tree for the three (the same
    additions, in the same order, as kernels._block_sum)."""
    tid = cuda.threadIdx.x
    ssum[tid] = x
    smin[tid] = lo
    smax[tid] = hi
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            ssum[tid] += ssum[tid + step]
            smin[tid] = _lesser(smin[tid], smin[tid + step])
            smax[tid] = _greater(smax[tid], smax[tid + step])
        cuda.syncthreads()
        step //= 2
    total = ssum[0]
    least = smin[0]
    most = smax[0]
    cuda.syncthreads()  # everyone has read slot 0 before the scratch is reused
    return total, least, most


@cuda.jit(device=True)
def _probe_count(bits, b, t, icount, imin, imax):
    """One top-k probe of row b: (how many keys are >= t, the smallest key >= t, the largest key < t)."""
    n = 0
    above = NO_KEY
    below = np.int64(-1)
    for j in range(cuda.threadIdx.x, bits.shape[1], cuda.blockDim.x):
        k = _key(bits[b, j])
        if k >= t:
            n += 1
            above = _lesser(above, k)
        else:
            below = _greater(below, k)
    return _reduce3(icount, imin, imax, n, above, below)


@cuda.jit(device=True)
def _probe_mass(bits, weight, b, v, last, fscratch, imin, imax):
    """One top-p probe of row b at (v, last): (F(v, last), the next and the previous neighbour of the probe).

    F(v, last) is the weight of the tokens with key < v, or key == v and id <= last. Each thread adds its tokens in
    order, then the tree adds the threads' sums: a fixed order, so a larger (v, last) (a superset of tokens, each
    weight >= 0) never gives a smaller float64 sum, and a bisection on it is sound.
    Neighbours: with last = V - 1 (a probe on keys), the smallest key > v and the largest key <= v; with last < V - 1
    (a probe on ids inside the tie group key == v), the smallest id > last and the largest id <= last in the group.
    """
    V = bits.shape[1]
    m = 0.0
    above = NO_KEY
    below = np.int64(-1)
    for j in range(cuda.threadIdx.x, V, cuda.blockDim.x):
        k = _key(bits[b, j])
        if k < v or (k == v and j <= last):
            m += weight[b, j]
        if last == V - 1:
            if k > v:
                above = _lesser(above, k)
            else:
                below = _greater(below, k)
        elif k == v:
            if j > last:
                above = _lesser(above, j)
            else:
                below = _greater(below, j)
    return _reduce3(fscratch, imin, imax, m, above, below)


@cuda.jit(device=True)
def _kept(bits, weight, b, j, cut_key, cut_id):
    """Token j's weight if top-p keeps it ((key, id) >= (cut_key, cut_id)), else 0."""
    k = _key(bits[b, j])
    if k > cut_key or (k == cut_key and j >= cut_id):
        return weight[b, j]
    return 0.0


@cuda.jit
def _sample_kernel(scores, bits, top_k, top_p_cut, use_top_p, u, weight, out, path):
    """Block b: row b from the top-k threshold to the drawn token (see the module docstring, steps in order)."""
    fscratch = cuda.shared.array(MAX_THREADS, np.float64)
    icount = cuda.shared.array(MAX_THREADS, np.int64)
    imin = cuda.shared.array(MAX_THREADS, np.int64)
    imax = cuda.shared.array(MAX_THREADS, np.int64)
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    V = scores.shape[1]

    # the range of keys and the top score
    top = -math.inf
    lo = NO_KEY
    hi = np.int64(-1)
    for j in range(tid, V, nt):
        k = _key(bits[b, j])
        lo = _lesser(lo, k)
        hi = _greater(hi, k)
        top = _greater(top, np.float64(scores[b, j]))
    n, kmin, kmax = _reduce3(icount, imin, imax, 0, lo, hi)
    top = _block_max(fscratch, top)

    # top-k: kth = the largest key t with count(key >= t) >= top_k. Invariant: count(>= lo) >= top_k,
    # count(>= hi + 1) < top_k, lo and hi keys of the row. A probe at mid moves lo up to the first key >= mid, or
    # hi down to the last key < mid: each probe halves [lo, hi] and leaves out at least one key of the row
    kth = kmin
    if top_k > 0 and top_k < V:
        lo = kmin
        hi = kmax
        probes = 0
        while lo < hi and probes < MAX_PROBES:
            probes += 1
            mid = (lo + hi + 1) // 2
            n, above, below = _probe_count(bits, b, mid, icount, imin, imax)
            if n >= top_k:
                lo = above
            else:
                hi = below
        kth = lo

    # weights, as support.numba_sampling._weights: exp(s - max) in float64 for the kept, finite tokens
    for j in range(tid, V, nt):
        k = _key(bits[b, j])
        w = 0.0
        if k >= kth and k > KEY_NEG_INF:
            w = math.exp(np.float64(scores[b, j]) - top)
        weight[b, j] = w
    cuda.syncthreads()  # the draw reads other threads' weights

    # top-p: keep (key, id) >= (cut_key, cut_id), the first token whose cumulative mass F / total > 1 - top_p
    cut_key = np.int64(0)
    cut_id = np.int64(0)
    if use_top_p:
        total, above, below = _probe_mass(bits, weight, b, kmax, V - 1, fscratch, imin, imax)
        if total > 0.0:
            # the smallest key v with F(v) / total > 1 - top_p. Invariant: true at hi (else hi = kmax, the top
            # token: the search then ends there), false at every key < lo (F(kth - 1) = 0: below kth w = 0)
            lo = kth
            hi = kmax
            probes = 0
            while lo < hi and probes < MAX_PROBES:
                probes += 1
                mid = (lo + hi) // 2
                m, above, below = _probe_mass(bits, weight, b, mid, V - 1, fscratch, imin, imax)
                if m / total > top_p_cut:
                    hi = below  # F(below) = F(mid): no key in between
                else:
                    lo = above
            cut_key = lo
            # the tokens tied at cut_key: the stable ascending sort removes the lower ids first, so the same
            # search on ids within the group (a single token: no probe)
            lo = np.int64(V)
            hi = np.int64(-1)
            for j in range(tid, V, nt):
                if _key(bits[b, j]) == cut_key:
                    lo = _lesser(lo, j)
                    hi = _greater(hi, j)
            n, lo, hi = _reduce3(icount, imin, imax, 0, lo, hi)
            probes = 0
            while lo < hi and probes < MAX_PROBES:
                probes += 1
                mid = (lo + hi) // 2
                m, above, below = _probe_mass(bits, weight, b, cut_key, mid, fscratch, imin, imax)
                if m / total > top_p_cut:
                    hi = below
                else:
                    lo = above
            cut_id = lo

    # the draw: contiguous chunks in token order, a scan of the chunk sums, the first crossing of u * total
    chunk = (V + nt - 1) // nt
    start = _lesser(tid * chunk, V)
    stop = _lesser(start + chunk, V)
    s = 0.0
    for j in range(start, stop):
        s += _kept(bits, weight, b, j, cut_key, cut_id)
    fscratch[tid] = s
    cuda.syncthreads()
    step = 1
    while step < nt:  # Hillis-Steele inclusive scan: after the step-d round, fscratch[t] sums chunks t-2d+1 .. t
        add = 0.0
        if tid >= step:
            add = fscratch[tid - step]
        cuda.syncthreads()
        fscratch[tid] += add
        cuda.syncthreads()
        step *= 2
    total = fscratch[nt - 1]
    running = 0.0
    if tid > 0:
        running = fscratch[tid - 1]
    cuda.syncthreads()
    target = u[b] * total
    hit = V
    before = 0.0
    after = 0.0
    for j in range(start, stop):
        before = running
        running += _kept(bits, weight, b, j, cut_key, cut_id)
        if running > target:
            hit = j
            after = running
            break
    first_hit = _block_min(imin, hit)
    delta = 4.0 * (V + 2 * chunk + 16) * ULP * total
    good = 0
    if hit == first_hit and hit < V and after > target + delta and before < target - delta:
        good = 1
    verified = _block_max(imax, good)

    if tid == 0:
        result = V - 1
        how = EMPTY
        if total > 0.0:
            if verified > 0:
                result = first_hit
                how = PARALLEL
            else:  # within rounding of a boundary: the host's serial loop (support.numba_sampling._draw), in token order
                how = SERIAL
                exact = 0.0
                for j in range(V):
                    exact += _kept(bits, weight, b, j, cut_key, cut_id)
                target = u[b] * exact
                running = 0.0
                for j in range(V):
                    running += _kept(bits, weight, b, j, cut_key, cut_id)
                    if running > target:
                        result = j
                        break
        out[b] = result
        if path.shape[0] > 0:
            path[b] = how


def _module(a):
    """numpy for NumPy arrays (the simulator), cupy for CuPy arrays (a device)."""
    if isinstance(a, np.ndarray):
        return np
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    raise TypeError(f"scores: a NumPy (simulator) or CuPy (device) array, not {type(a).__name__}")


def sample(scores, top_k, top_p, u, out=None, threads=None, path=None, weight=None):
    """tokens int64 [B] (a device array) drawn from scores [B, V] float32 (-inf = removed): top_k (0 = off) then
    top_p (1.0 = off), then the inverse-CDF draw at u [B] (float64 in [0, 1), drawn on the host as support.numba_sampling
    draws them). One block per row. `path` (int8 [B], optional) receives how each row was drawn (PARALLEL, SERIAL,
    EMPTY); `weight` (float64 [B, V], optional) is the scratch, allocated here when not given.

    twin: support.numba_sampling.sample_row (refimpl.processors top_k, top_p, refimpl.generate sample); equal token for token,
    except as the module docstring states (a top-p cumulative mass within float64 rounding of 1 - top_p).
    """
    xp = _module(scores)
    if scores.ndim != 2 or scores.dtype != np.float32:
        raise ConfigError(f"scores: float32 [B, V], not {scores.dtype} {tuple(scores.shape)}")
    B, V = scores.shape
    if V == 0:
        raise ConfigError("scores: an empty vocabulary (V = 0) has nothing to sample")
    top_k = int(top_k or 0)
    top_p = 1.0 if top_p is None else float(top_p)
    t = K._threads(SAMPLE_THREADS if threads is None else threads)
    scores = xp.ascontiguousarray(scores)  # the uint32 view below reads the same memory
    u = xp.ascontiguousarray(xp.asarray(u, dtype=np.float64).reshape(-1))
    if u.shape[0] != B:
        raise ConfigError(f"u: {u.shape[0]} numbers for {B} rows")
    if out is None:
        out = xp.empty(B, np.int64)
    if weight is None:
        weight = xp.empty((B, V), np.float64)
    if path is None:
        path = xp.empty(0, np.int8)
    if B:
        _sample_kernel[B, t](scores, scores.view(np.uint32), top_k, 1.0 - top_p, top_p < 1.0, u, weight, out, path)
    return out


def sample_rng(scores, top_k, top_p, rng, xp=None, threads=None):
    """Host np.int64 [B]: sample() with u drawn from rng exactly as support.numba_sampling.sample draws it
    (rng.random((B, 1))), so a seed gives support.numba_sampling's (and refimpl's) tokens. xp: numpy or cupy (default: the
    module of scores)."""
    xp = _module(scores) if xp is None else xp
    u = rng.random((scores.shape[0], 1))  # the numbers support.numba_sampling.sample and refimpl.generate.sample draw
    tokens = sample(scores, top_k, top_p, xp.asarray(u[:, 0]), threads=threads)
    get = getattr(tokens, "get", None)
    return np.asarray(get() if callable(get) else tokens, dtype=np.int64)
