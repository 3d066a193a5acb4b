"""accel/cpu/gguf_blocks.py against its twins: gguf.quants.dequantize (bit for bit) and x @ W.T on the dequantized W.

Q8_0 / Q4_0 / Q5_0 rows are made by gguf.quants.quantize from random weights; K-quant rows (gguf-py cannot quantize
them) are random bytes with finite fp16 d (and a positive dmin) written in. Some blocks are edge cases: all zero,
d = 0, all quant bytes 0xff, negative d, extreme int8 values, subnormal fp16 d.
"""
import numpy as np
import pytest

pytest.importorskip("numba")
gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quantize  # noqa: E402

from refimpl_accel.cpu import gguf_blocks as g  # noqa: E402

T = gguf.GGMLQuantizationType
TYPES = tuple(g.BLOCKS)
MINS = ("Q4_K", "Q5_K")  # w = dl * q - dm
D_AT = {"Q8_0": 0, "Q4_0": 0, "Q5_0": 0, "Q4_K": 0, "Q5_K": 0, "Q6_K": 208}  # byte of the fp16 d in a block
U = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32


def shapes(name):
    """(O, D): O odd and even, D of 1 to 16 blocks."""
    if g.BLOCKS[name][1] == 32:
        return [(1, 32), (3, 64), (7, 256), (64, 512)]
    return [(1, 256), (3, 512), (7, 256), (64, 512)]


def put_half(blocks, at, values):
    """Write fp16 `values` [O, nb] at byte `at` of each block of blocks [O, nb, block_bytes]."""
    blocks[..., at:at + 2] = np.asarray(values, np.float16)[..., None].view(np.uint8)


def make_raw(name, O, D, seed):
    rng = np.random.default_rng(seed)
    _, be, bb = g.BLOCKS[name]
    if name in ("Q8_0", "Q4_0", "Q5_0"):
        w = (rng.standard_normal((O, D)) * rng.uniform(0.01, 1.0, (O, 1))).astype(np.float32)
        raw = np.array(quantize(w, T[name]), np.uint8, order="C")
    else:
        raw = rng.integers(0, 256, (O, D // be * bb), dtype=np.uint8)
        blocks = raw.reshape(O, D // be, bb)
        put_half(blocks, D_AT[name], rng.uniform(-0.05, 0.05, (O, D // be)))
        if name in MINS:
            put_half(blocks, 2, rng.uniform(0.0, 0.05, (O, D // be)))
    assert raw.shape == (O, g.row_bytes(name, D))
    flat, at = raw.reshape(-1, bb), D_AT[name]
    quants = [i for i in range(bb) if not at <= i < at + (4 if name in MINS else 2)]
    edits = [lambda b: b.fill(0),                                   # all-zero block
             lambda b: b.__setitem__(slice(at, at + 2), 0),         # d = 0
             lambda b: b.__setitem__(quants, 0xFF),                 # max nibbles (and K scales / mins)
             lambda b: b.__setitem__(at + 1, b[at + 1] | 0x80),     # negative d
             lambda b: b.__setitem__(quants, [0x80, 0x7F] * (len(quants) // 2) + [0x80] * (len(quants) % 2)),
             lambda b: b.__setitem__(slice(at, at + 2), [1, 0])]    # d: the smallest subnormal fp16
    for i, edit in enumerate(edits, start=1):  # block 0 stays random
        if i < len(flat):
            edit(flat[i])
    return raw


def read_only_copies(raw, tmp_path):
    ro = raw.copy()
    ro.setflags(write=False)
    path = tmp_path / "raw.bin"
    raw.tofile(path)
    return ro, np.memmap(path, np.uint8, mode="r", shape=raw.shape)


def test_block_table_is_ggufs():
    assert set(TYPES) == {"Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"}
    for name, (number, elements, nbytes) in g.BLOCKS.items():
        assert int(T[name]) == number
        assert tuple(gguf.GGML_QUANT_SIZES[T[name]]) == (elements, nbytes)
        assert g.row_bytes(name, 3 * elements) == 3 * nbytes


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_rows_is_gguf_bit_for_bit(name, case, tmp_path):
    O, D = shapes(name)[case]
    raw = make_raw(name, O, D, seed=case)
    ref = dequantize(raw, T[name])
    assert ref.shape == (O, D) and ref.dtype == np.float32 and np.all(np.isfinite(ref))
    for r in (raw, *read_only_copies(raw, tmp_path)):
        y = g.dequantize_rows(name, r)
        assert y.dtype == np.float32 and y.shape == (O, D)
        assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
    start, stop = O // 3, O - O // 4
    out = np.full((stop - start, D), np.nan, np.float32)
    assert g.dequantize_tile(name, raw, start, stop, out) is out
    assert np.array_equal(out.view(np.uint32), ref[start:stop].view(np.uint32))


def magnitudes(name, raw):
    """a_j = |dl q_j| + |dm_j|: the size of both parts of each weight w_j = dl q_j - dm_j (|w_j| without mins).
    With dmin zeroed gguf gives fl(dl q_j) exactly; with d zeroed, -dm_j exactly."""
    if name not in MINS:
        return np.abs(dequantize(raw, T[name]))
    _, _, bb = g.BLOCKS[name]
    no_min, no_d = raw.copy().reshape(len(raw), -1, bb), raw.copy().reshape(len(raw), -1, bb)
    no_min[..., 2:4] = 0
    no_d[..., 0:2] = 0
    return (np.abs(dequantize(no_min.reshape(raw.shape), T[name]))
            + np.abs(dequantize(no_d.reshape(raw.shape), T[name])))


def gamma(n):
    return n * U / (1 - n * U)


# The bound of matvec. Per row it computes sum_B [dl_B * fl(sum_{j in B} q_j x_j) - dm_B * xs_B] in float32: bs-term
# sums over the blocks B that share a scale (bs = 32; 16 for Q6_K), xs_B = sum_{j in B} x_j (dm = 0 without mins),
# and a sum of the nb = k D / bs scaled block sums (k = 2 with mins: dl-term and dm-term). fastmath may reassociate
# each sum (any tree of n leaves puts a leaf under <= n - 1 additions) and contract into FMAs (which only drop
# roundings); the scales dl = fl(d * sc), dm = fl(dmin * m) are the dequantizer's. A term dl q_j x_j (or dm x_j)
# meets at most 1 (q_j x_j: q_j exact) + (bs - 1) + 1 (times dl) + (nb - 1) = bs + nb roundings, so
# |ours - sum_j (dl q_j - dm) x_j| <= gamma_{bs+nb} sum_j |x_j| a_j, a_j = |dl q_j| + |dm|. The dequantizer's
# w_j = fl(fl(dl q_j) - dm) is within gamma_2 a_j of dl q_j - dm (one rounding: gamma_1 |w_j|, a_j = |w_j| without
# mins), and the float64 reference x @ w.T adds < D 2^-53 sum |x_j| |w_j|, below one more u:
#     |ours - ref| <= gamma_{bs+nb+3} sum_j |x_j| a_j      (bs + nb <= D + 1 without mins; 64 vs 512 at D = 512)
def matvec_bound(name, x, raw):
    D = x.shape[1]
    bs = 16 if name == "Q6_K" else 32
    n = bs + (2 if name in MINS else 1) * D // bs + 3
    return gamma(n) * (np.abs(x.astype(np.float64)) @ magnitudes(name, raw).astype(np.float64).T) + 1e-30


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("name", TYPES)
def test_matvec_within_bound_of_float64_product(name, M, tmp_path):
    for case in (0, 2, 3):  # O = 1, 7, 64: odd and even
        O, D = shapes(name)[case]
        raw = make_raw(name, O, D, seed=10 + case)
        x = np.random.default_rng(case).standard_normal((M, D)).astype(np.float32)
        w = dequantize(raw, T[name]).astype(np.float64)
        ref = x.astype(np.float64) @ w.T
        bound = matvec_bound(name, x, raw)
        assert bound.max() < 1e-3 * np.sqrt(np.mean(ref ** 2))  # not vacuous: under 1e-3 of the outputs' size
        out = np.full((M, O), np.nan, np.float32)
        assert g.matvec(name, x, raw, out) is out
        # read-only raw runs another compilation, which fastmath may vectorise otherwise: the bound, not equal bits
        for result in (out, *(g.matvec(name, x, r) for r in read_only_copies(raw, tmp_path))):
            assert result.dtype == np.float32 and result.shape == (M, O)
            assert np.all(np.abs(result - ref) <= bound), (name, M, O, D, np.max(np.abs(result - ref) / bound))


@pytest.mark.parametrize("name", TYPES)
def test_bad_row_length_is_refused_naming_the_type(name):
    _, be, bb = g.BLOCKS[name]
    for D in (be - 16, be + 16, 0):
        with pytest.raises(ValueError, match=name):
            g.row_bytes(name, D)
    raw = make_raw(name, 2, 2 * be, seed=0)
    with pytest.raises(ValueError, match=name):
        g.matvec(name, np.zeros((1, 2 * be - 16), np.float32), raw)
    with pytest.raises(ValueError, match=name):
        g.dequantize_rows(name, raw[:, :bb - 1])
    with pytest.raises(ValueError, match=name):
        g.matvec(name, np.zeros((1, 2 * be), np.float32), raw[:, :-bb])  # bytes of D - block, not D
    with pytest.raises(ValueError, match="shape"):
        g.dequantize_rows(name, raw, np.zeros((2, be), np.float32))
    with pytest.raises(ValueError, match="unknown"):
        g.row_bytes("Q4_1", 64)
