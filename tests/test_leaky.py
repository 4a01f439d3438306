"""The leaky ReLU of the fused calls (negative_slope of batch_norm_relu_train, _infer and
_backward), the backward from a leaky ReLU's output (batch_norm_backward_from_output's
negative_slope) and the layers' activation=("leaky_relu", slope): equal to the NumPy twin
within the accuracy contract, to PyTorch's float64 autograd, bit-identical across thread
counts, the plain ReLU unchanged at slope 0, clear errors."""
import numpy as np
import pytest

import fastbn
from fastbn import reference
from test_from_output import _data as from_output_data

try:
    import ml_dtypes
    BF16 = [np.dtype(ml_dtypes.bfloat16)]
except ImportError:            # pragma: no cover - ml_dtypes is in the test extra
    BF16 = []

F64, F32, F16 = np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)
DTYPES = [F64, F32, F16] + BF16
# odd sizes: C = 1, one value per plane, C not a multiple of 16, (N, C), 5-d
SHAPES = [(8, 5, 6, 7), (4, 1, 3, 3), (16, 3, 1, 1), (2, 33, 4, 4), (64, 70), (3, 4, 2, 3, 2)]
# the rounding unit of each dtype's outputs
UNIT = {F64: 2.0 ** -52, F32: 2.0 ** -23, F16: 2.0 ** -10}
if BF16:
    UNIT[BF16[0]] = 2.0 ** -7
SLOPES = [0.1, 2.5]


def _kernel_unit(dt):
    """The unit of the kernels' arithmetic: float32 for float32 and 16-bit data."""
    return 2.0 ** -45 if dt == F64 else 2.0 ** -23


def _data(shape, layout, dt, seed, loc=0.3, scale=2.0, order="C"):
    """Normal data around loc (default 0.3: both signs of the pre-activation) in layout."""
    return from_output_data(shape, layout, dt, seed, loc=loc, scale=scale, order=order)


def _params(C, dt, seed=1, wmin=0.25):
    rng = np.random.default_rng(seed)
    pdt = np.float64 if dt == F64 else np.float32
    w = rng.uniform(wmin, 2.0, size=C) * rng.choice([-1.0, 1.0], size=C)
    return w.astype(pdt), rng.normal(size=C).astype(pdt)


def _bits(a):
    """a's bytes, for bit-for-bit comparisons (NaN payloads and signed zeros included)."""
    return np.ascontiguousarray(a).view(np.uint8)


def _f64(a):
    return np.asarray(a).astype(np.float64)


def _assert_outputs(got, want, dt, what):
    """Outputs within the contract: 8 float32 ulps of max(1, |want|) (float64: 1e-12),
    plus one rounding unit of a 16-bit dtype."""
    got, want = _f64(got), _f64(want)
    assert np.array_equal(np.isnan(got), np.isnan(want)), what
    fin = np.isfinite(want)
    bound = (8 * _kernel_unit(dt) * 4096 ** (dt == F64) + (UNIT[dt] if dt in (F16,) + tuple(BF16)
                                                          else 0)) * np.maximum(1, np.abs(want))
    err = np.abs(got - want)
    assert np.all(err[fin] <= bound[fin]), f"{what}: max error {err[fin].max()}"


def _assert_backward(res, want, dy, y, w, invstd, slope, dt, what):
    """dx within 8 kernel ulps of its natural scale |w| invstd max(|g|, rms(g)) plus one
    unit of the output dtype; dweight and dbias within 4 kernel ulps of the sum of their
    terms' magnitudes."""
    dx, dw, db = (_f64(a) for a in res)
    dxr, dwr, dbr = (_f64(a) for a in want)
    g = _f64(dy) * np.where(_f64(y) > 0, 1.0, slope)
    natural = np.abs(w).max() * np.max(invstd) * max(np.abs(g).max(), np.sqrt((g * g).mean()))
    k = 8 * _kernel_unit(dt)
    assert np.abs(dx - dxr).max() <= k * natural + UNIT[dt] * np.abs(dxr).max(), what + " dx"
    terms = np.abs(g).sum() * max(1.0, np.abs(dxr).max() / max(natural, 1e-300))
    gk = 4 * _kernel_unit(dt) * terms * 8
    assert np.abs(dw - dwr).max() <= gk + UNIT[dt] * np.abs(dwr).max(), what + " dweight"
    assert np.abs(db - dbr).max() <= gk + UNIT[dt] * np.abs(dbr).max(), what + " dbias"


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("order", ["C", "F"])
def test_forward_and_backward_match_the_twin(shape, layout, dt, order):
    C = shape[1]
    x = _data(shape, layout, dt, 0, order=order)
    res = _data(shape, layout, dt, 3, loc=0.0, scale=1.0)
    dy = _data(shape, layout, dt, 2, loc=0.0, scale=1.0, order=order)
    w, b = _params(C, dt)
    for s in SLOPES:
        for r in (None, res):
            runs = []
            for nt in (1, 2):
                y, mean, invstd = fastbn.batch_norm_relu_train(
                    x, w, b, residual=r, layout=layout, negative_slope=s, num_threads=nt)
                yi = fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2 - 1e-5, w, b,
                                                  residual=r, layout=layout, negative_slope=s,
                                                  num_threads=nt)
                dres = np.empty_like(x)
                grads = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w,
                                                        layout=layout, negative_slope=s,
                                                        dresidual=dres, num_threads=nt)
                fixed = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w,
                                                        training=False, layout=layout,
                                                        negative_slope=s, num_threads=nt)
                runs.append((y, mean, invstd, yi, dres) + grads + fixed)
            for a, c in zip(*runs):            # bit-identical for any thread count
                assert np.array_equal(_bits(a), _bits(c))
            y, mean, invstd = runs[0][:3]
            assert y.dtype == x.dtype and y.shape == x.shape
            yr, mr, ir = reference.batch_norm_relu_train(_f64(x), w, b, residual=None if r is None
                                                         else _f64(r), layout=layout,
                                                         negative_slope=s)
            where = f"{shape} {layout} {dt} s={s} residual={r is not None}"
            _assert_outputs(y, yr, dt, "train y " + where)
            if (yr < 0).any():
                assert (_f64(y) < 0).any()          # leaky: negative outputs survive
            yir = reference.batch_norm_relu_infer(_f64(x), mean, 1 / invstd ** 2 - 1e-5, w, b,
                                                  residual=None if r is None else _f64(r),
                                                  layout=layout, negative_slope=s)
            _assert_outputs(runs[0][3], yir, dt, "infer y " + where)
            # the backward on fastbn's own y (the mask is y's sign), in float64
            dres_r = np.empty(x.shape)
            want = reference.batch_norm_relu_backward(_f64(dy), _f64(y), _f64(x), mean, invstd,
                                                      w, layout=layout, negative_slope=s,
                                                      dresidual=dres_r)
            _assert_backward(runs[0][5:8], want, dy, y, w, invstd, s, dt, "backward " + where)
            assert np.array_equal(runs[0][4], (_f64(dy) * np.where(_f64(y) > 0, 1.0, s))
                                  .astype(dt)) or dt != F64 and np.abs(
                _f64(runs[0][4]) - dres_r).max() <= UNIT[dt] * np.abs(dres_r).max()
            want = reference.batch_norm_relu_backward(_f64(dy), _f64(y), _f64(x), mean, invstd,
                                                      w, training=False, layout=layout,
                                                      negative_slope=s)
            _assert_backward(runs[0][8:], want, dy, y, w, invstd, s, dt, "fixed " + where)


@pytest.mark.parametrize("dt", [F32, F64], ids=str)
def test_slope_zero_is_the_relu(dt):
    """negative_slope=0.0 runs the ReLU's code: the same bits as leaving it out."""
    for shape, layout in [((4, 6, 5, 5), "NCHW"), ((8, 40, 40, 24), "NHWC"),
                          ((8, 64, 48, 48), "NCHW"), ((300, 37), "NCHW")]:
        C = shape[1] if layout == "NCHW" else shape[-1]
        x = _data(shape if layout == "NCHW" else (shape[0], C) + shape[1:-1], layout, dt, 4)
        dy = np.random.default_rng(5).normal(size=x.shape).astype(dt)
        res = np.random.default_rng(6).normal(size=x.shape).astype(dt)
        w, b = _params(C, dt)
        a = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout)
        c = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout,
                                         negative_slope=0.0)
        for u, v in zip(a, c):
            assert np.array_equal(u, v)
        y, mean, invstd = a
        assert np.array_equal(
            fastbn.batch_norm_relu_infer(x, mean, invstd, w, b, layout=layout),
            fastbn.batch_norm_relu_infer(x, mean, invstd, w, b, layout=layout, negative_slope=0))
        d1, d2 = np.empty_like(x), np.empty_like(x)
        for u, v in zip(fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                                        dresidual=d1),
                        fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                                        dresidual=d2, negative_slope=0.0)):
            assert np.array_equal(u, v)
        assert np.array_equal(d1, d2)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dt", [F32] + BF16, ids=str)
def test_large_data(layout, dt):
    """Data past the caches (streaming stores, channel groups, the paths where the ReLU keeps
    mask bits): the twin's results, and the backward from y close to the one from x."""
    shape = (8, 64, 64, 64)
    x = _data(shape, layout, dt, 7)
    dy = _data(shape, layout, dt, 8, loc=0.0, scale=1.0)
    w, b = _params(64, dt, wmin=0.5)
    s = 0.1
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, layout=layout, negative_slope=s)
    yr, _, _ = reference.batch_norm_relu_train(_f64(x), w, b, layout=layout, negative_slope=s)
    _assert_outputs(y, yr, dt, "large y")
    grads = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                            negative_slope=s)
    want = reference.batch_norm_relu_backward(_f64(dy), _f64(y), _f64(x), mean, invstd, w,
                                              layout=layout, negative_slope=s)
    _assert_backward(grads, want, dy, y, w, invstd, s, dt, "large backward")
    fo = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, layout=layout,
                                                negative_slope=s)
    want = reference.batch_norm_backward_from_output(_f64(dy), _f64(y), invstd, w, b,
                                                     layout=layout, negative_slope=s)
    _assert_backward(fo, want, dy, y, w, invstd, s, dt, "large from y")


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_from_output_equals_the_backward_from_x(shape, layout, dt):
    C = shape[1]
    x = _data(shape, layout, dt, 9)
    dy = _data(shape, layout, dt, 10, loc=0.0, scale=1.0)
    w, b = _params(C, dt, seed=11)
    for s in SLOPES:
        y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, layout=layout, negative_slope=s)
        r1 = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, layout=layout,
                                                    negative_slope=s, num_threads=1)
        r2 = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, layout=layout,
                                                    negative_slope=s, num_threads=2)
        for u, v in zip(r1, r2):
            assert np.array_equal(_bits(u), _bits(v))
        assert r1[0].dtype == x.dtype and r1[0].shape == x.shape
        # the NumPy twin on the same y: the kernels' arithmetic only
        want = reference.batch_norm_backward_from_output(_f64(dy), _f64(y), invstd, w, b,
                                                         layout=layout, negative_slope=s)
        where = f"{shape} {layout} {dt} s={s}"
        _assert_backward(r1, want, dy, y, w, invstd, s, dt, "from y " + where)
        # the backward from x: y's rounding (one unit of y's dtype, relative to the largest
        # |pre-activation - bias| / |weight|) is what separates them
        dx0, dw0, db0 = (_f64(a) for a in fastbn.batch_norm_relu_backward(
            dy, y, x, mean, invstd, w, layout=layout, negative_slope=s))
        g = _f64(dy) * np.where(_f64(y) > 0, 1.0, s)
        yl = np.moveaxis(_f64(y), 1 if layout == "NCHW" else -1, -1)
        v = np.where(yl > 0, yl, yl / s)
        yunit = UNIT[dt] * ((np.abs(v) + np.abs(b)) / np.abs(w)).max()
        natural = np.abs(w).max() * invstd.max() * max(np.abs(g).max(), np.sqrt((g * g).mean()))
        k = 8 * _kernel_unit(dt)
        dx, dw, db = (_f64(a) for a in r1)
        assert np.abs(dx - dx0).max() <= k * natural + 8 * natural * yunit + \
            2 * UNIT[dt] * np.abs(dx0).max(), where
        assert np.abs(dw - dw0).max() <= 32 * _kernel_unit(dt) * np.abs(g).sum() * (
            1 + np.abs(v).max()) + 2 * yunit * np.abs(g).sum() + 2 * UNIT[dt] * np.abs(dw0).max()
        assert np.abs(db - db0).max() <= 32 * _kernel_unit(dt) * np.abs(g).sum() + \
            2 * UNIT[dt] * np.abs(db0).max()


def test_float64_against_autograd():
    torch = pytest.importorskip("torch")
    for layout in ("NCHW", "NHWC"):
        for s in (0.01, 0.2, 3.0):
            x = _data((6, 4, 5, 3), layout, F64, 12)
            r = _data((6, 4, 5, 3), layout, F64, 13, loc=0.0, scale=1.0)
            dy = _data((6, 4, 5, 3), layout, F64, 14, loc=0.0, scale=1.0)
            w, b = _params(4, F64, seed=15)
            perm = (0, 3, 1, 2) if layout == "NHWC" else (0, 1, 2, 3)
            inv = np.argsort(perm)
            xt = torch.tensor(np.transpose(x, perm), requires_grad=True)
            rt = torch.tensor(np.transpose(r, perm), requires_grad=True)
            wt = torch.tensor(w, requires_grad=True)
            bt = torch.tensor(b, requires_grad=True)
            yt = torch.nn.functional.leaky_relu(
                torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True,
                                               eps=1e-5) + rt, s)
            yt.backward(torch.tensor(np.transpose(dy, perm)))
            y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=r, layout=layout,
                                                           negative_slope=s)
            np.testing.assert_allclose(y, np.transpose(yt.detach().numpy(), inv), rtol=1e-12,
                                       atol=1e-12)
            dres = np.empty_like(x)
            dx, dw, db = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w,
                                                         layout=layout, negative_slope=s,
                                                         dresidual=dres)
            ref_dx = np.transpose(xt.grad.numpy(), inv)
            np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-10 * np.abs(ref_dx).max())
            np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(dres, np.transpose(rt.grad.numpy(), inv), rtol=1e-15)
            # the backward from the output (no residual) against autograd
            xt.grad = None
            wt.grad = None
            bt.grad = None
            yt = torch.nn.functional.leaky_relu(
                torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True,
                                               eps=1e-5), s)
            yt.backward(torch.tensor(np.transpose(dy, perm)))
            y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, layout=layout,
                                                           negative_slope=s)
            dx, dw, db = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b,
                                                                layout=layout, negative_slope=s)
            ref_dx = np.transpose(xt.grad.numpy(), inv)
            np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-10 * np.abs(ref_dx).max())
            np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_nan_and_weights_near_zero():
    x = _data((16, 3, 4, 4), "NCHW", F64, 16)
    dy = _data((16, 3, 4, 4), "NCHW", F64, 17, loc=0.0, scale=1.0)
    w = np.array([1e-3, -2e-4, 1.5])
    b = np.array([0.2, -0.1, 0.0])
    s = 0.05
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, negative_slope=s)
    dx, dw, db = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, negative_slope=s)
    dx0, dw0, db0 = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, negative_slope=s)
    np.testing.assert_allclose(dx, dx0, rtol=1e-9, atol=1e-9 * np.abs(dx0).max())
    np.testing.assert_allclose(dw, dw0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db, db0, rtol=1e-12, atol=1e-12)
    # a NaN in x: its channel's y is NaN, and NaN stays NaN through the leaky ReLU
    xn = x.copy()
    xn[3, 1, 2, 2] = np.nan
    yn, mn, isn = fastbn.batch_norm_relu_train(xn, w, b, negative_slope=s)
    assert np.isnan(yn[:, 1]).all() and not np.isnan(yn[:, [0, 2]]).any()
    assert np.isnan(fastbn.batch_norm_relu_infer(xn, mean, 1 / invstd ** 2 - 1e-5, w, b,
                                                 negative_slope=s)[3, 1, 2, 2])
    # a NaN in y given to the backward counts as y <= 0: dy * slope (as the twin)
    yb = y.copy()
    yb[0, 0, 0, 0] = np.nan
    dres = np.empty_like(x)
    got = fastbn.batch_norm_relu_backward(dy, yb, x, mean, invstd, w, negative_slope=s,
                                          dresidual=dres)
    assert dres[0, 0, 0, 0] == dy[0, 0, 0, 0] * s
    want = reference.batch_norm_relu_backward(dy, yb, x, mean, invstd, w, negative_slope=s)
    for u, v in zip(got, want):
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-10 * np.abs(v).max())
    # the backward from y: the NaN channels agree with the backward from x
    a = fastbn.batch_norm_backward_from_output(dy, yn, isn, w, b, negative_slope=s)
    c = fastbn.batch_norm_relu_backward(dy, yn, xn, mn, isn, w, negative_slope=s)
    for u, v in zip(a, c):
        assert np.array_equal(np.isnan(u), np.isnan(v))


def test_in_place_and_out():
    """out=x in the forward (the memory-saving pattern), out=dy in the backward."""
    x = _data((8, 6, 5, 5), "NHWC", F32, 18)
    dy = _data((8, 6, 5, 5), "NHWC", F32, 19, loc=0.0, scale=1.0)
    w, b = _params(6, F32)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, layout="NHWC", negative_slope=0.2)
    want = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, layout="NHWC",
                                                  negative_slope=0.2)
    xin = x.copy()
    y2, _, _ = fastbn.batch_norm_relu_train(xin, w, b, layout="NHWC", negative_slope=0.2,
                                            out=xin)
    assert y2 is xin and np.array_equal(xin, y)
    g = dy.copy()
    dx, dw, db = fastbn.batch_norm_backward_from_output(g, xin, invstd, w, b, layout="NHWC",
                                                        negative_slope=0.2, out=g)
    assert dx is g and np.array_equal(dx, want[0]) and np.array_equal(dw, want[1])
    res = _data((8, 6, 5, 5), "NHWC", F32, 20)
    r2 = res.copy()
    yr, _, _ = fastbn.batch_norm_relu_train(x, w, b, layout="NHWC", residual=r2, out=r2,
                                            negative_slope=0.2)
    assert yr is r2 and np.array_equal(
        r2, fastbn.batch_norm_relu_train(x, w, b, layout="NHWC", residual=res,
                                         negative_slope=0.2)[0])


BAD_SLOPES = [(-0.1, ValueError, "negative_slope must be a finite number >= 0"),
              (float("nan"), ValueError, "negative_slope must be a finite number >= 0"),
              (float("inf"), ValueError, "negative_slope must be a finite number >= 0"),
              ("0.1", TypeError, "negative_slope must be a real number"),
              (True, TypeError, "negative_slope must be a real number"),
              (None, TypeError, "negative_slope must be a real number")]


@pytest.mark.parametrize("slope,exc,msg", BAD_SLOPES, ids=repr)
def test_bad_slopes(slope, exc, msg, snapshot):
    x = _data((4, 3, 2, 2), "NCHW", F32, 21)
    w, b = _params(3, F32)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b)
    dy = np.ones_like(x)
    out = np.zeros_like(x)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    snap = snapshot(x, w, b, y, mean, invstd, dy, out, rm, rv)
    calls = [
        lambda: fastbn.batch_norm_relu_train(x, w, b, out=out, running_mean=rm, running_var=rv,
                                             negative_slope=slope),
        lambda: fastbn.batch_norm_relu_infer(x, rm, rv, w, b, out=out, negative_slope=slope),
        lambda: fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, out=out,
                                                negative_slope=slope),
    ]
    if slope is not None:
        calls.append(lambda: fastbn.batch_norm_backward_from_output(
            dy, y, invstd, w, b, out=out, negative_slope=slope))
    for call in calls:
        with pytest.raises(exc, match=msg):
            call()
        snap.assert_unchanged()
    with pytest.raises(exc, match=msg):
        reference.batch_norm_relu_train(x, w, b, negative_slope=slope)


def test_from_output_needs_an_invertible_slope(snapshot):
    x = _data((4, 3, 2, 2), "NCHW", F32, 22)
    w, b = _params(3, F32)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b)
    dy, out = np.ones_like(x), np.zeros_like(x)
    snap = snapshot(y, invstd, w, b, dy, out)
    for fn in (fastbn.batch_norm_backward_from_output, reference.batch_norm_backward_from_output):
        with pytest.raises(ValueError, match="negative_slope must be > 0"):
            fn(dy, y, invstd, w, b, out=out, negative_slope=0.0)
        snap.assert_unchanged()


# ----- the layers ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dt", [F32, F64], ids=str)
def test_layer_matches_the_functions(layout, dt):
    s = 0.15
    shape = (8, 5, 4, 6) if layout == "NCHW" else (8, 4, 6, 5)
    x = _data(shape, "NCHW", dt, 23)          # any memory; the layer's layout names the axis
    res = _data(shape, "NCHW", dt, 24)
    dy = _data(shape, "NCHW", dt, 25, loc=0.0, scale=1.0)
    bn = fastbn.BatchNorm(5, layout=layout, dtype=dt, activation=("leaky_relu", s))
    assert bn.activation == ("leaky_relu", s)
    bn.weight[...], bn.bias[...] = _params(5, dt)
    w, b = bn.weight.copy(), bn.bias.copy()
    rm, rv = np.zeros(5, dt), np.ones(5, dt)
    y = bn(x, res)
    dx, dres = bn.backward(dy)
    y0, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout,
                                                    running_mean=rm, running_var=rv,
                                                    negative_slope=s)
    d0 = np.empty_like(x)
    dx0, dw0, db0 = fastbn.batch_norm_relu_backward(dy, y0, x, mean, invstd, w, layout=layout,
                                                    dresidual=d0, negative_slope=s)
    for u, v in ((y, y0), (dx, dx0), (dres, d0), (bn.weight_grad, dw0), (bn.bias_grad, db0),
                 (bn.running_mean, rm), (bn.running_var, rv)):
        assert np.array_equal(u, v)
    bn.eval()
    ye = bn(x)
    assert np.array_equal(ye, fastbn.batch_norm_relu_infer(x, rm, rv, w, b, layout=layout,
                                                           negative_slope=s))
    dxe = bn.backward(dy)
    assert np.array_equal(dxe, fastbn.batch_norm_relu_backward(
        dy, ye, x, rm.astype(np.float64), 1 / np.sqrt(rv.astype(np.float64) + 1e-5), w,
        training=False, layout=layout, negative_slope=s)[0])


@pytest.mark.parametrize("ghost", [None, 3])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_low_memory_layer(layout, ghost):
    """memory="low" behind a leaky ReLU: the gradients of the usual layer within the
    contract (float32), y kept and x free to be overwritten."""
    s = 0.2
    x = _data((12, 6, 5, 5), layout, F32, 26)
    dy = _data((12, 6, 5, 5), layout, F32, 27, loc=0.0, scale=1.0)
    kw = dict(layout=layout, activation=("leaky_relu", s), ghost_batch_size=ghost)
    low = fastbn.BatchNorm(6, memory="low", **kw)
    usual = fastbn.BatchNorm(6, **kw)
    w, b = _params(6, F32, seed=28, wmin=0.5)
    for bn in (low, usual):
        bn.weight[...], bn.bias[...] = w, b
    y1 = usual(x)
    xc = x.copy()
    y2 = low(xc)
    assert np.array_equal(y1, y2)
    xc[...] = np.nan                           # the low-memory layer does not read x again
    dx1, dx2 = usual.backward(dy), low.backward(dy)
    scale = np.abs(dx1).max()
    assert np.abs(dx2 - dx1).max() <= 64 * 2.0 ** -23 * scale
    np.testing.assert_allclose(low.weight_grad, usual.weight_grad, rtol=1e-4,
                               atol=1e-4 * np.abs(usual.weight_grad).max())
    np.testing.assert_allclose(low.bias_grad, usual.bias_grad, rtol=1e-5, atol=1e-5)
    assert np.array_equal(low.running_mean, usual.running_mean)


def test_renorm_layer_leaky():
    """BatchRenorm(activation=("leaky_relu", s)): y is the leaky ReLU of the plain layer's
    y, and its backward the plain one of dy * (1 if y > 0 else s), float64."""
    s = 0.3
    x = _data((10, 4, 3, 3), "NCHW", F64, 29)
    dy = _data((10, 4, 3, 3), "NCHW", F64, 30, loc=0.0, scale=1.0)
    leaky = fastbn.BatchRenorm(4, dtype=np.float64, activation=("leaky_relu", s))
    plain = fastbn.BatchRenorm(4, dtype=np.float64)
    y = leaky(x)
    v = plain(x)
    np.testing.assert_allclose(y, np.where(v < 0, v * s, v), rtol=1e-15, atol=1e-15)
    dx = leaky.backward(dy)
    dx0 = plain.backward(dy * np.where(y > 0, 1.0, s))
    np.testing.assert_allclose(dx, dx0, rtol=1e-12, atol=1e-12 * np.abs(dx0).max())
    np.testing.assert_allclose(leaky.weight_grad, plain.weight_grad, rtol=1e-12, atol=1e-12)


def test_layer_activation_errors():
    for bad in [("leaky_relu", -1.0), ("leaky_relu", float("nan")), ("leaky_relu",),
                ("elu", 1.0), "leaky_relu", ("leaky_relu", 0.1, 2)]:
        with pytest.raises(ValueError, match="activation must be|slope must be"):
            fastbn.BatchNorm(3, activation=bad)
    with pytest.raises(TypeError, match="slope must be a real number"):
        fastbn.BatchNorm(3, activation=("leaky_relu", "0.1"))
    with pytest.raises(ValueError, match="memory='low' needs activation=None or"):
        fastbn.BatchNorm(3, activation="relu", memory="low")
    with pytest.raises(ValueError, match="memory='low' needs activation=None or"):
        fastbn.BatchNorm(3, activation=("leaky_relu", 0.0), memory="low")
    low = fastbn.BatchNorm(3, activation=("leaky_relu", 0.1), memory="low")
    with pytest.raises(ValueError, match="while memory='low'"):
        low.activation = "relu"
    assert low.activation == ("leaky_relu", 0.1)
    x = _data((4, 3, 2, 2), "NCHW", F32, 31)
    state = low.state_dict()
    with pytest.raises(ValueError, match="memory='low' takes no residual"):
        low(x, np.ones_like(x))
    for k, v in low.state_dict().items():
        assert np.array_equal(v, state[k])
