"""The planar backward's sums over runs of every length mod 32 (float32): a run's last
values go into the same lanes as the others (AVX-512: masked into them), so the sums must
stay within the accuracy contract for every tail, and every way of reading dy (plain,
masked by the fused ReLU's output, by the layer's kept bits, the leaky ReLU's, from the
output) must give the unfused backward's bits. 16-bit data (AVX-512: read in the registers,
not staged) must give the float32 sums and statistics of its widened values, bit for bit."""
import numpy as np
import pytest

import fastbn
from fastbn import reference as ref

# N = 1: each channel is one run (one block); N = 2 and S > 1024: runs cut into pieces;
# N > 1 and short planes: blocks of several runs (up to 1024 values), and several blocks
SHAPES = ([(1, 3, s) for s in list(range(2, 70)) + [95, 96, 97, 127, 128, 129, 196, 1023,
                                                       1024]]
          + [(2, 2, s) for s in (1025, 1031, 2049, 3136)]
          + [(8, 3, s) for s in (1, 5, 17, 31, 33, 49, 64, 100)] + [(40, 2, 49), (300, 2, 7)])
EPS23 = 2.0 ** -23
try:
    import ml_dtypes
    HALF_DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
except ImportError:         # bfloat16 needs ml_dtypes
    HALF_DTYPES = [np.dtype(np.float16)]


def _same_bits(a, e):
    """a and e bit for bit, except that a NaN may be any NaN (which one an invalid
    operation gives depends on the order of its operands, which the vector loops of each
    build choose)."""
    nan = np.isnan(a)
    return np.array_equal(nan, np.isnan(e)) and a[~nan].tobytes() == e[~nan].tobytes()


def _data(shape, seed=0, offset=3.0):
    rng = np.random.default_rng(seed + shape[-1])
    x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    b = rng.uniform(-1, 1, shape[1]).astype(np.float32)
    return x, dy, w, b


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sums_within_the_contract(shape):
    """dbias and dweight within 4 * 2**-23 of the sum of their terms' absolute values
    (docs/math.rst), dx within 8 float32 ulps of its natural scale."""
    x, dy, w, _ = _data(shape)
    _, mean, invstd = fastbn.batch_norm_train(x, w)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
    rdx, rdw, rdb = ref.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                            mean, invstd, w)
    g, xc = dy.astype(np.float64), x.astype(np.float64) - mean[None, :, None]
    db_terms = np.abs(g).sum(axis=(0, 2))
    dw_terms = (np.abs(g * xc) * invstd[None, :, None]).sum(axis=(0, 2))
    assert (np.abs(db - rdb) <= 4 * EPS23 * db_terms).all(), (db, rdb)
    assert (np.abs(dw - rdw) <= 4 * EPS23 * dw_terms).all(), (dw, rdw)
    scale = (np.abs(w) * invstd)[None, :, None] * np.maximum(np.abs(dy), np.sqrt(
        (dy.astype(np.float64) ** 2).mean()))
    assert (np.abs(dx - rdx) <= 8 * EPS23 * scale).all()


@pytest.mark.parametrize("shape", SHAPES[::3] + SHAPES[-4:], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_every_read_of_dy_gives_the_unfused_bits(shape, threads):
    x, dy, w, b = _data(shape, seed=1, offset=0.2)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, num_threads=threads)
    g = np.where(y > 0, dy, 0).astype(np.float32)
    want = fastbn.batch_norm_backward(g, x, mean, invstd, w, num_threads=threads)
    got = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, num_threads=threads)
    for a, e in zip(got, want):
        assert a.tobytes() == e.tobytes()
    # the layer keeps the forward's mask as bits and reads them instead of y
    before = fastbn.get_num_threads()
    fastbn.set_num_threads(threads)
    try:
        layer = fastbn.BatchNorm(shape[1], activation="relu")
        layer.weight[...] = w
        layer.bias[...] = b
        assert layer.forward(x).tobytes() == y.tobytes()
        assert layer.backward(dy).tobytes() == want[0].tobytes()
    finally:
        fastbn.set_num_threads(before)
    assert layer.weight_grad.tobytes() == want[1].tobytes()
    assert layer.bias_grad.tobytes() == want[2].tobytes()
    # the leaky ReLU: dy * (1 if y > 0 else slope), bit for bit
    s = 0.1
    yk, mk, ik = fastbn.batch_norm_relu_train(x, w, b, negative_slope=s, num_threads=threads)
    gk = dy * np.where(yk > 0, np.float32(1), np.float32(s))
    want = fastbn.batch_norm_backward(gk, x, mk, ik, w, num_threads=threads)
    got = fastbn.batch_norm_relu_backward(dy, yk, x, mk, ik, w, negative_slope=s,
                                          num_threads=threads)
    for a, e in zip(got, want):
        assert a.tobytes() == e.tobytes()


@pytest.mark.parametrize("shape", SHAPES[::2] + SHAPES[-4:], ids=str)
@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_half_sums_are_the_widened_float32_sums(shape, dt):
    """The backward's dweight and dbias of 16-bit data are those of float32 data holding the
    same values (docs/math.rst), for every tail and block of several runs; an offset of 1e4
    puts x's mean beyond what the float32 lanes hold exactly in both."""
    for offset in (3.0, 1e4):
        x, dy, w, b = _data(shape, seed=2, offset=offset)
        xh, gh = x.astype(dt), dy.astype(dt)
        _, mean, invstd = fastbn.batch_norm_train(xh, w, b)
        _, dw, db = fastbn.batch_norm_backward(gh, xh, mean, invstd, w)
        _, ew, eb = fastbn.batch_norm_backward(gh.astype(np.float32), xh.astype(np.float32),
                                               mean, invstd, w)
        assert dw.tobytes() == ew.tobytes(), (offset, dw, ew)
        assert db.tobytes() == eb.tobytes(), (offset, db, eb)


@pytest.mark.parametrize("shape", SHAPES[::2] + SHAPES[-4:], ids=str)
@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_half_statistics_are_the_widened_float32_statistics(shape, dt):
    """The training statistics of 16-bit data are those of float32 data holding the same
    values, bit for bit, for every tail and block of several runs; also where each run's
    first value sits far from the rest (the sums about it lose the most digits a block's
    value can make them lose), and where an infinity makes a block's sums NaN and takes it
    through the second pass."""
    for case in ("plain", "far", "inf"):
        x, _, w, b = _data(shape, seed=3)
        if case == "far":
            x[:, :, 0] = 1e3
        elif case == "inf":
            x[:, 0, -1] = np.inf
        xh = x.astype(dt)
        with np.errstate(invalid="ignore"):
            _, mean, invstd = fastbn.batch_norm_train(xh, w, b)
            _, em, ei = fastbn.batch_norm_train(xh.astype(np.float32), w, b)
        assert _same_bits(mean, em), (case, mean, em)
        assert _same_bits(invstd, ei), (case, invstd, ei)


# channels-last rows: tiles of 32 rows, sweeps of 4, channel counts around the 16-lane
# vectors, one chunk and several
ROWS = [(r, c) for r in (2, 3, 4, 5, 31, 33, 70) for c in (1, 7, 16, 17, 40)] + [
    (600, 3), (300, 129), (2000, 16)]


@pytest.mark.parametrize("rc", ROWS, ids=str)
@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_half_rows_sums_are_the_widened_float32_sums(rc, dt):
    """The channels-last backward's dweight and dbias of 16-bit data (AVX-512: read in the
    registers, not staged) are those of float32 data holding the same values, bit for bit,
    also where a tile's float32 dot overflows and is summed again in double (bfloat16
    values near 1e30)."""
    rows, C = rc
    cases = [(3.0, 1.0)] + ([(0.0, 1e30)] if dt.name == "bfloat16" else [])
    for offset, scale in cases:
        x, dy, w, b = _data((rows, C, 1), seed=4, offset=offset)
        x, dy = x[:, :, 0] * np.float32(scale), dy[:, :, 0] * np.float32(scale)
        xh, gh = x.astype(dt), dy.astype(dt)
        for shape in [(rows, C), (1, rows, 1, C)]:
            xs, gs = xh.reshape(shape), gh.reshape(shape)
            layout = "NHWC"
            _, mean, invstd = fastbn.batch_norm_train(xs, w, b, layout=layout)
            with np.errstate(over="ignore", invalid="ignore"):
                _, dw, db = fastbn.batch_norm_backward(gs, xs, mean, invstd, w, layout=layout)
                _, ew, eb = fastbn.batch_norm_backward(gs.astype(np.float32),
                                                       xs.astype(np.float32), mean, invstd,
                                                       w, layout=layout)
            assert dw.tobytes() == ew.tobytes(), (shape, scale, dw, ew)
            assert db.tobytes() == eb.tobytes(), (shape, scale, db, eb)


@pytest.mark.parametrize("rc", ROWS, ids=str)
@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_half_rows_statistics_are_the_widened_float32_statistics(rc, dt):
    """The channels-last training statistics of 16-bit data (AVX-512: read in the registers,
    not staged) are those of float32 data holding the same values, bit for bit; also where
    each tile's first row sits far from the rest (every 32nd row at 1e3), and where an
    infinity makes a tile's one-pass sums NaN and takes it through the two-pass fallback."""
    rows, C = rc
    for case in ("plain", "far", "inf"):
        x, _, w, b = _data((rows, C, 1), seed=5)
        x = x[:, :, 0]
        if case == "far":
            x[::32] = 1e3
        elif case == "inf":
            x[-1, 0] = np.inf
        xh = x.astype(dt)
        for shape in [(rows, C), (1, rows, 1, C)]:
            xs = xh.reshape(shape)
            with np.errstate(invalid="ignore"):
                _, mean, invstd = fastbn.batch_norm_train(xs, w, b, layout="NHWC")
                _, em, ei = fastbn.batch_norm_train(xs.astype(np.float32), w, b,
                                                    layout="NHWC")
            assert _same_bits(mean, em), (shape, case, mean, em)
            assert _same_bits(invstd, ei), (shape, case, invstd, ei)


@pytest.mark.parametrize("shape", SHAPES[::3] + SHAPES[-4:], ids=str)
@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_half_fused_sums_are_the_widened_float32_sums(shape, dt):
    """The fused activation's backward of 16-bit data (AVX-512: dy masked by the 16-bit y in
    the registers, not staged) gives the dweight and dbias of float32 data holding the same
    values, bit for bit: the ReLU, the leaky ReLU, and the leaky ReLU's backward from its
    output."""
    x, dy, w, b = _data(shape, seed=6, offset=0.2)
    xh, gh = x.astype(dt), dy.astype(dt)
    for s in (0.0, 0.1):
        yh, mean, invstd = fastbn.batch_norm_relu_train(xh, w, b, negative_slope=s)
        y32, g32, x32 = yh.astype(np.float32), gh.astype(np.float32), xh.astype(np.float32)
        got = fastbn.batch_norm_relu_backward(gh, yh, xh, mean, invstd, w, negative_slope=s)
        want = fastbn.batch_norm_relu_backward(g32, y32, x32, mean, invstd, w,
                                               negative_slope=s)
        for a, e in zip(got[1:], want[1:]):
            assert a.tobytes() == e.tobytes(), (s, a, e)
        if s:
            got = fastbn.batch_norm_backward_from_output(gh, yh, invstd, w, b,
                                                         negative_slope=s)
            want = fastbn.batch_norm_backward_from_output(g32, y32, invstd, w, b,
                                                          negative_slope=s)
            for a, e in zip(got[1:], want[1:]):
                assert a.tobytes() == e.tobytes(), ("from y", a, e)
