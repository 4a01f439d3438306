"""NaN and inf propagate per channel: a non-finite value in channel k makes channel k's batch
statistics and output NaN and leaves every other channel bit-identical to a run without it.
Checked for train, infer and backward, both layouts, 1, 2 and 4 threads (4 > C puts a team
of threads on each channel)."""
import numpy as np
import pytest

import fastbn
from cases import NAN

# one case of each kernel branch (tests/cases.py); channel BAD of each is made non-finite
SHAPES = {layout: [c.shape for c in NAN if c.layout == layout] for layout in ("NCHW", "NHWC")}
BAD = 1


def _ch(a, layout, k):
    """Channel k of a, as a view."""
    return a[:, k] if layout == "NCHW" else a[..., k]


def _others(a, layout, C=3):
    return [np.array(_ch(a, layout, c)) for c in range(C) if c != BAD]


def _inputs(shape, layout, dtype, value, where):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=shape).astype(dtype)
    g = rng.normal(size=shape).astype(dtype)
    bad = x.copy()
    ch = _ch(bad, layout, BAD)
    idx = {"first": 0, "middle": ch.size // 2, "last": ch.size - 1}[where]
    pos = np.unravel_index(idx, ch.shape)
    ch[pos] = value
    assert not np.isfinite(bad).all()
    return x, g, bad


def _bits_equal(a, b):
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


CASES = [(c.layout, c.shape) for c in NAN]


@pytest.mark.parametrize("num_threads", [1, 2, 4])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout, shape", CASES, ids=[f"{l}-{s}" for l, s in CASES])
def test_train_nan_stays_in_its_channel(layout, shape, dtype, value, num_threads):
    for where in ("first", "last"):
        x, g, bad = _inputs(shape, layout, dtype, value, where)
        w, b = np.array([0.5, 2.0, -1.0]), np.array([0.1, 0.2, 0.3])
        rm0, rv0 = np.zeros(3), np.ones(3)
        rm, rv = rm0.copy(), rv0.copy()
        rmb, rvb = rm0.copy(), rv0.copy()
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm,
                                                  running_var=rv, num_threads=num_threads)
        yb, meanb, invstdb = fastbn.batch_norm_train(bad, w, b, layout=layout, running_mean=rmb,
                                                     running_var=rvb, num_threads=num_threads)
        # the bad channel: statistics, running statistics and every output value are NaN
        assert np.isnan(meanb[BAD]) and np.isnan(invstdb[BAD])
        assert np.isnan(rmb[BAD]) and np.isnan(rvb[BAD])
        assert np.isnan(_ch(yb, layout, BAD)).all()
        # the others: bit-identical to the run without the bad value
        keep = [c for c in range(3) if c != BAD]
        assert _bits_equal(mean[keep], meanb[keep]) and _bits_equal(invstd[keep], invstdb[keep])
        assert _bits_equal(rm[keep], rmb[keep]) and _bits_equal(rv[keep], rvb[keep])
        for u, v in zip(_others(y, layout), _others(yb, layout)):
            assert _bits_equal(u, v)
        # and the statistics feed backward: dx of the bad channel is NaN, the rest unchanged
        dx, dw, db = fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout,
                                                num_threads=num_threads)
        dxb, dwb, dbb = fastbn.batch_norm_backward(g, bad, meanb, invstdb, w, layout=layout,
                                                   num_threads=num_threads)
        assert np.isnan(_ch(dxb, layout, BAD)).all() and np.isnan(dwb[BAD])
        assert _bits_equal(db, dbb)              # sum(dy) does not involve x
        assert _bits_equal(dw[keep], dwb[keep])
        for u, v in zip(_others(dx, layout), _others(dxb, layout)):
            assert _bits_equal(u, v)


@pytest.mark.parametrize("num_threads", [1, 2, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout, shape", CASES, ids=[f"{l}-{s}" for l, s in CASES])
def test_nan_in_dy_stays_in_its_channel(layout, shape, dtype, num_threads):
    x, g, _ = _inputs(shape, layout, dtype, np.nan, "middle")
    gb = g.copy()
    ch = _ch(gb, layout, BAD)
    ch[np.unravel_index(ch.size // 3, ch.shape)] = np.nan
    _, mean, invstd = fastbn.batch_norm_train(x, layout=layout)
    keep = [c for c in range(3) if c != BAD]
    for training in (True, False):
        dx, dw, db = fastbn.batch_norm_backward(g, x, mean, invstd, layout=layout,
                                                training=training, num_threads=num_threads)
        dxb, dwb, dbb = fastbn.batch_norm_backward(gb, x, mean, invstd, layout=layout,
                                                   training=training, num_threads=num_threads)
        assert np.isnan(dwb[BAD]) and np.isnan(dbb[BAD])
        assert _bits_equal(dw[keep], dwb[keep]) and _bits_equal(db[keep], dbb[keep])
        bad_dx = _ch(dxb, layout, BAD)
        if training:
            assert np.isnan(bad_dx).all()       # the channel's sums reach every element
        else:
            # dx = dy * invstd * weight element by element: only the NaN position
            assert np.array_equal(np.isnan(bad_dx), np.isnan(_ch(gb, layout, BAD)))
            assert _bits_equal(bad_dx[~np.isnan(bad_dx)],
                               _ch(dx, layout, BAD)[~np.isnan(bad_dx)])
        for u, v in zip(_others(dx, layout), _others(dxb, layout)):
            assert _bits_equal(u, v)


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout, shape", CASES, ids=[f"{l}-{s}" for l, s in CASES])
def test_infer_is_elementwise(layout, shape, dtype, num_threads):
    # inference statistics are fixed: a NaN in x spoils its own output value only, and a NaN
    # statistic or parameter spoils its channel only
    x, _, bad = _inputs(shape, layout, dtype, np.nan, "middle")
    rm, rv = np.array([1.0, 2.0, 3.0]), np.array([1.0, 4.0, 9.0])
    y = fastbn.batch_norm_infer(x, rm, rv, layout=layout, num_threads=num_threads)
    yb = fastbn.batch_norm_infer(bad, rm, rv, layout=layout, num_threads=num_threads)
    assert np.array_equal(np.isnan(yb), np.isnan(bad))
    assert _bits_equal(y[~np.isnan(bad)], yb[~np.isnan(bad)])
    for name in ("rm", "rv", "w", "b"):
        vecs = dict(rm=rm.copy(), rv=rv.copy(), w=np.ones(3), b=np.zeros(3))
        vecs[name][BAD] = np.nan
        yv = fastbn.batch_norm_infer(x, vecs["rm"], vecs["rv"], vecs["w"], vecs["b"],
                                     layout=layout, num_threads=num_threads)
        assert np.isnan(_ch(yv, layout, BAD)).all(), name
        for u, v in zip(_others(y, layout), _others(yv, layout)):
            assert _bits_equal(u, v), name


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_nan_weight_or_bias_in_training(layout):
    x, _, _ = _inputs(SHAPES[layout][1], layout, np.float32, np.nan, "first")
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout)
    for w, b in ((np.array([1.0, np.nan, 1.0]), None), (None, np.array([0.0, np.nan, 0.0]))):
        yv, meanv, invstdv = fastbn.batch_norm_train(x, w, b, layout=layout)
        assert _bits_equal(mean, meanv) and _bits_equal(invstd, invstdv)
        assert np.isnan(_ch(yv, layout, BAD)).all()
        for u, v in zip(_others(y, layout), _others(yv, layout)):
            assert _bits_equal(u, v)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_eval_backward_dx_ignores_x(layout):
    shape = SHAPES[layout][0]
    x, g, bad = _inputs(shape, layout, np.float64, np.nan, "middle")
    mean, invstd = np.zeros(3), np.ones(3)
    dx = fastbn.batch_norm_backward(g, bad, mean, invstd, training=False, layout=layout)[0]
    np.testing.assert_array_equal(dx, g)
