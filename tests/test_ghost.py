"""Ghost Batch Normalization (ghost_batch_size): each group of samples along N is a batch of
its own. The forward equals separate calls on the slices, to the bit (y, statistics, the
running statistics updated once per group in order); the backward's dx equals the slices'
backward, and dweight, dbias their sum; the NumPy twin agrees; bad arguments raise before
anything the caller owns changes."""
import numpy as np
import pytest

import fastbn
from fastbn import reference

try:
    import ml_dtypes
    BF16 = [np.dtype(ml_dtypes.bfloat16)]
except ImportError:            # pragma: no cover - ml_dtypes is in the test extra
    BF16 = []

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)] + BF16

# (NCHW shape, ghost_batch_size): uneven last group, one sample per group, one group,
# C = 1, HW = 1, 2-D, 5-D, C not a multiple of 16
CASES = [((10, 5, 3, 4), 4), ((6, 3, 2, 5), 1), ((4, 7, 3, 3), 8), ((9, 1, 4, 4), 2),
         ((12, 33, 1, 1), 5), ((64, 70), 16), ((5, 4, 2, 3, 2), 2)]


def _param_dtype(dt):
    return np.float64 if dt == np.float64 else np.float32


def _data(shape, layout, dt, seed=0, order="C"):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, size=shape)
    if layout == "NHWC":
        x = np.moveaxis(x, 1, -1)
    x = np.ascontiguousarray(x).astype(dt)
    return np.asfortranarray(x) if order == "F" else x


def _slices(N, size):
    return [slice(a, min(a + size, N)) for a in range(0, N, size)]


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint8 if a.dtype.itemsize == 1 else f"u{a.dtype.itemsize}")


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape,size", CASES)
def test_forward_and_backward_equal_the_slices(shape, size, layout, dt):
    x = _data(shape, layout, dt)
    C = shape[1]
    pdt = _param_dtype(dt)
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=C).astype(pdt), rng.normal(size=C).astype(pdt)
    rm, rv = rng.normal(size=C).astype(pdt), rng.uniform(0.5, 2, size=C).astype(pdt)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm,
                                              running_var=rv, momentum=0.3,
                                              ghost_batch_size=size)
    parts = _slices(shape[0], size)
    assert mean.shape == invstd.shape == (len(parts), C) and mean.dtype == np.float64
    for k, s in enumerate(parts):
        ys, ms, ins = fastbn.batch_norm_train(x[s], w, b, layout=layout, running_mean=rm0,
                                              running_var=rv0, momentum=0.3)
        assert _same(y[s], ys) and _same(mean[k], ms) and _same(invstd[k], ins)
    assert _same(rm, rm0) and _same(rv, rv0)          # once per group, in order

    dy = _data(shape, layout, dt, seed=2)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout,
                                            ghost_batch_size=size)
    dw64, db64 = np.zeros(C), np.zeros(C)
    for k, s in enumerate(parts):
        dxs, dws, dbs = fastbn.batch_norm_backward(dy[s], x[s], mean[k], invstd[k], w,
                                                   layout=layout)
        assert _same(dx[s], dxs)
        dw64 += dws.astype(np.float64)
        db64 += dbs.astype(np.float64)
    gdt = np.float64 if dt == np.float64 else np.float32
    assert dw.dtype == db.dtype == gdt
    # summed in float64 before one rounding: within the roundings of the groups' terms
    tol = (1e-12 if dt == np.float64 else 1e-5) * (1 + np.abs(dw64))
    assert np.all(np.abs(dw - dw64) <= tol) and np.all(np.abs(db - db64) <= tol)

    # the NumPy twin, float64 throughout
    yr, mr, ir = reference.batch_norm_train(x.astype(np.float64), w, b, layout=layout,
                                            ghost_batch_size=size)
    np.testing.assert_allclose(mean, mr, rtol=1e-12, atol=1e-12 * 3.0)
    np.testing.assert_allclose(invstd, ir, rtol=1e-12)
    ytol = 1e-12 if dt == np.float64 else (1e-5 if dt == np.float32 else 2e-2)
    np.testing.assert_allclose(y.astype(np.float64), yr, rtol=ytol, atol=ytol * 4)
    dxr, dwr, dbr = reference.batch_norm_backward(
        dy.astype(np.float64), x.astype(np.float64), mean, invstd, w.astype(np.float64),
        layout=layout, ghost_batch_size=size)
    np.testing.assert_allclose(dx.astype(np.float64), dxr, rtol=ytol,
                               atol=ytol * np.abs(dxr).max())
    scale = np.abs(dy.astype(np.float64)).sum() * 3
    np.testing.assert_allclose(dw, dwr, rtol=0, atol=(1e-12 if dt == np.float64 else 1e-5) * scale)
    np.testing.assert_allclose(db, dbr, rtol=0, atol=(1e-12 if dt == np.float64 else 1e-5) * scale)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_memory_orders_threads_and_out(layout):
    shape, size = (20, 6, 5, 7), 6
    x = _data(shape, layout, np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout, ghost_batch_size=size,
                                              num_threads=1)
    for threads in (2, 3):
        y2, m2, i2 = fastbn.batch_norm_train(x, layout=layout, ghost_batch_size=size,
                                             num_threads=threads)
        assert _same(y, y2) and _same(mean, m2) and _same(invstd, i2)
    xf = np.asfortranarray(x)               # another memory order: same values
    yf, mf, i_f = fastbn.batch_norm_train(xf, layout=layout, ghost_batch_size=size)
    assert _same(np.ascontiguousarray(yf), y) and _same(mf, mean)
    out = np.full_like(x, np.nan)
    r = fastbn.batch_norm_train(x, layout=layout, ghost_batch_size=size, out=out)
    assert r[0] is out and _same(out, y)
    xin = x.copy()                          # in place
    fastbn.batch_norm_train(xin, layout=layout, ghost_batch_size=size, out=xin)
    assert _same(xin, y)
    dy = _data(shape, layout, np.float32, seed=3)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, layout=layout,
                                            ghost_batch_size=size, num_threads=1)
    dx2, dw2, db2 = fastbn.batch_norm_backward(dy, x, mean, invstd, layout=layout,
                                               ghost_batch_size=size, num_threads=2)
    assert _same(dx, dx2) and _same(dw, dw2) and _same(db, db2)
    dyin = dy.copy()
    r = fastbn.batch_norm_backward(dyin, x, mean, invstd, layout=layout,
                                   ghost_batch_size=size, out=dyin)
    assert r[0] is dyin and _same(dyin, dx)
    # training=False: fixed statistics per group, dx = weight * invstd * dy
    dxf, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, layout=layout,
                                           ghost_batch_size=size, training=False)
    s = slice(6, 12)
    assert _same(dxf[s], fastbn.batch_norm_backward(dy[s], x[s], mean[1], invstd[1],
                                                    layout=layout, training=False)[0])


def test_bad_arguments_leave_everything_unchanged():
    x = _data((5, 3, 1, 1), "NCHW", np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.full_like(x, 7.0)
    x0 = x.copy()
    for bad, exc, text in [(0, ValueError, "ghost_batch_size must be >= 1"),
                           (-2, ValueError, "ghost_batch_size must be >= 1"),
                           (2.5, TypeError, "ghost_batch_size must be an integer"),
                           (True, TypeError, "ghost_batch_size must be an integer"),
                           ("4", TypeError, "ghost_batch_size must be an integer"),
                           # groups of 2, 2, 1 samples of one value each: the last has 1
                           (2, ValueError, "each ghost batch of x must have more than 1")]:
        with pytest.raises(exc, match=text):
            fastbn.batch_norm_train(x, running_mean=rm, running_var=rv, out=out,
                                    ghost_batch_size=bad)
        assert np.all(out == 7.0) and np.all(rm == 0) and np.all(rv == 1)
        assert _same(x, x0)
    # a bad weight, found by the first group's call before anything is written
    with pytest.raises(ValueError, match="weight must have shape"):
        fastbn.batch_norm_train(x, np.ones(4, np.float32), running_mean=rm, running_var=rv,
                                out=out, ghost_batch_size=5)
    assert np.all(out == 7.0) and np.all(rm == 0) and np.all(rv == 1)
    with pytest.raises(ValueError, match="out partially overlaps x"):
        fastbn.batch_norm_train(x, out=x[::-1], ghost_batch_size=5)

    x = _data((8, 3, 2, 2), "NCHW", np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, ghost_batch_size=4)
    dy = np.ones_like(x)
    out = np.full_like(x, 7.0)
    for m, i, exc, text in [(mean[0], invstd, ValueError, r"mean must have shape \(2, 3\)"),
                            (mean, invstd[:1], ValueError, r"invstd must have shape \(2, 3\)"),
                            (None, invstd, TypeError, "mean must be an array"),
                            (mean.astype(int), invstd, TypeError, "mean must be a floating")]:
        with pytest.raises(exc, match=text):
            fastbn.batch_norm_backward(dy, x, m, i, out=out, ghost_batch_size=4)
        assert np.all(out == 7.0)
    with pytest.raises(TypeError, match="training must be True or False"):
        fastbn.batch_norm_backward(dy, x, mean, invstd, training=1, ghost_batch_size=4)
    with pytest.raises(ValueError, match="ghost_batch_size must be >= 1"):
        fastbn.batch_norm_backward(dy, x, mean, invstd, ghost_batch_size=0)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_layer(layout, activation):
    shape, size = (10, 4, 3, 3), 4
    x = _data(shape, layout, np.float32)
    bn = fastbn.BatchNorm(4, layout=layout, activation=activation, ghost_batch_size=size)
    rng = np.random.default_rng(5)
    bn.weight[...] = rng.normal(size=4)
    bn.bias[...] = rng.normal(size=4)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(x)
    parts = _slices(shape[0], size)
    dy = _data(shape, layout, np.float32, seed=6)
    dx = bn.backward(dy)
    dw, db = np.zeros(4), np.zeros(4)
    for s in parts:
        if activation:
            ys, ms, ins = fastbn.batch_norm_relu_train(x[s], bn.weight, bn.bias, layout=layout,
                                                       running_mean=rm, running_var=rv)
            dxs, dws, dbs = fastbn.batch_norm_relu_backward(dy[s], ys, x[s], ms, ins,
                                                            bn.weight, layout=layout)
        else:
            ys, ms, ins = fastbn.batch_norm_train(x[s], bn.weight, bn.bias, layout=layout,
                                                  running_mean=rm, running_var=rv)
            dxs, dws, dbs = fastbn.batch_norm_backward(dy[s], x[s], ms, ins, bn.weight,
                                                       layout=layout)
        assert _same(y[s], ys) and _same(dx[s], dxs)
        dw += dws
        db += dbs
    assert _same(bn.running_mean, rm) and _same(bn.running_var, rv)
    assert bn.num_batches_tracked == 1
    np.testing.assert_allclose(bn.weight_grad, dw, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(bn.bias_grad, db, rtol=1e-6, atol=1e-5)
    # evaluation is unchanged: the running statistics, no groups
    bn.eval()
    ref = fastbn.BatchNorm(4, layout=layout, activation=activation)
    ref.load_state_dict(bn.state_dict())
    ref.eval()
    assert _same(bn(x), ref(x))


def test_layer_setting():
    bn = fastbn.BatchNorm(3)
    assert bn.ghost_batch_size is None
    bn.ghost_batch_size = 2
    assert bn.ghost_batch_size == 2
    with pytest.raises(ValueError, match="ghost_batch_size must be >= 1"):
        bn.ghost_batch_size = 0
    with pytest.raises(TypeError, match="ghost_batch_size must be an integer"):
        fastbn.BatchNorm(3, ghost_batch_size=1.5)
    assert bn.ghost_batch_size == 2
    # a batch whose last group has one value per channel: the layer's state is unchanged
    x = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match="each ghost batch of x"):
        bn(x)
    assert bn.num_batches_tracked == 0 and np.all(bn.running_mean == 0)
