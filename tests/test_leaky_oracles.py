"""The leaky ReLU, a second and independent set of checks (tests/test_leaky.py holds the
contract sweep): negative_slope of the fused functions (fastbn.batch_norm_relu_*), the
backward from the output of a leaky ReLU (batch_norm_backward_from_output(negative_slope=))
and the layers' activation=("leaky_relu", slope). Against the NumPy twins and PyTorch's
float64 autograd; slope 0 bit for bit the ReLU; the unfused definition; out= in place of x
or of the residual; memory orders; NaN; thread counts; data beyond the caches; 16-bit data;
weights near 0; clear errors that change nothing; and the twins themselves against PyTorch.
"""
import fractions
import importlib

import numpy as np
import pytest

import fastbn
from cases import CASES, ORACLE, THREADS, TORCH, ids
from conftest import Snapshot
from fastbn import _memory
from fastbn import reference as ref
from test_relu import _data, _from_torch, _orders, _scaled_close, _to_torch

try:
    import ml_dtypes
    BF16 = [np.dtype(ml_dtypes.bfloat16)]
except ImportError:            # pragma: no cover - ml_dtypes is in the test extra
    BF16 = []

F64, F32, F16 = np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)
DTYPES = (np.float32, np.float64)
ALL_DTYPES = [F64, F32, F16] + BF16
SLOPES = (0.01, 0.2, 1.0, 3.0)
# the rounding unit of each dtype's y, which the recovered pre-activation inherits
UNIT = {F64: 2.0 ** -52, F32: 2.0 ** -23, F16: 2.0 ** -10}
if BF16:
    UNIT[BF16[0]] = 2.0 ** -7

# every case of the kernel sweep, each with one of the slopes in turn (the NCHW and NHWC
# forms of a shape get different ones), so that every slope meets every kind of branch
SLOPED = [(c, SLOPES[i % len(SLOPES)]) for i, c in enumerate(ORACLE)]
# the cases of each parallel branch, for the thread counts
THREAD_PICKS = [c for c in THREADS if c.nchw in ((100, 333), (9000, 17), (7, 6, 28, 28),
                                                 (2, 33, 40, 40), (3, 700, 4, 4),
                                                 (32, 3, 40, 40))]
HALF_PICKS = [c for c in CASES if c.branch == "serial" and np.prod(c.nchw) <= 10_000] + [
    c for c in CASES if c.nchw in ((7, 6, 28, 28), (3, 40, 17, 17), (9000, 17))]


def _axis(layout, ndim):
    return 1 if layout == "NCHW" else ndim - 1


def _signed(w, seed):
    """w with about half of its channels' signs flipped (negative weights)."""
    return (w * np.random.default_rng(seed).choice([-1, 1], w.shape)).astype(w.dtype)


def _leaky(v, s):
    """The definition, in float64: v * (s if v < 0 else 1)."""
    v = np.asarray(v, np.float64)
    return v * np.where(v < 0, s, 1.0)


def _g(dy, y, s):
    """The leaky ReLU's backward in float64: dy where y > 0, else dy * s (NaN y too)."""
    return np.asarray(dy, np.float64) * np.where(np.asarray(y) > 0, 1.0, s)


# --------------------------------------------------------------------------------------------
# the twins (fastbn.reference) against PyTorch's float64 autograd, and their own semantics
# --------------------------------------------------------------------------------------------

TWIN_SHAPES = [(16, 5), (6, 4, 9), (4, 3, 5, 6), (3, 4, 3, 4, 5), (8, 1, 3, 3), (2, 17, 1, 1)]


def _layout_shape(nchw, layout):
    if layout == "NCHW" or len(nchw) == 2:
        return nchw
    return (nchw[0],) + nchw[2:] + (nchw[1],)


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("nchw", TWIN_SHAPES, ids=str)
def test_reference_against_torch(nchw, layout, slope):
    """The twins' leaky forward (training and inference, with and without a residual),
    backward (dx, dweight, dbias and the residual's gradient) and the backward from the
    output against leaky_relu(batch_norm(x) + residual) of PyTorch's float64 autograd."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng([len(nchw), nchw[1], int(slope * 100), layout == "NHWC"])
    shape, C = _layout_shape(nchw, layout), nchw[1]
    x, res, dy = rng.normal(0.5, 2, shape), rng.normal(size=shape), rng.normal(size=shape)
    w = rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)
    b = rng.uniform(-1, 1, C)
    rm0, rv0 = rng.normal(size=C), rng.uniform(0.5, 2, C)
    for training in (True, False):
        for residual in (None, res):
            where = f"training={training} residual={residual is not None}"
            rm, rv = rm0.copy(), rv0.copy()
            if training:
                y, mean, invstd = ref.batch_norm_relu_train(
                    x, w, b, residual=residual, layout=layout, running_mean=rm,
                    running_var=rv, negative_slope=slope)
            else:
                y = ref.batch_norm_relu_infer(x, rm, rv, w, b, residual=residual,
                                              layout=layout, negative_slope=slope)
                mean, invstd = rm, 1 / np.sqrt(rv + 1e-5)
            dres = np.empty_like(x)
            dx, dw, db = ref.batch_norm_relu_backward(dy, y, x, mean, invstd, w,
                                                      training=training, layout=layout,
                                                      dresidual=dres, negative_slope=slope)
            xt, rt = _to_torch(x, layout, torch, True), _to_torch(res, layout, torch, True)
            wt = torch.tensor(w, requires_grad=True)
            bt = torch.tensor(b, requires_grad=True)
            rmt, rvt = torch.tensor(rm0), torch.tensor(rv0)
            z = F.batch_norm(xt, rmt, rvt, wt, bt, training=training, eps=1e-5)
            if residual is not None:
                z = z + rt
            yt = F.leaky_relu(z, slope)
            yt.backward(_to_torch(dy, layout, torch))
            # the same mask: the twin's y > 0 is torch's z > 0 (measured: no value near 0)
            np.testing.assert_array_equal(y > 0, _from_torch(z, layout) > 0)
            _scaled_close(y, _from_torch(yt, layout), np.float64, f"y {where}")
            np.testing.assert_allclose(rm, rmt.numpy(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(rv, rvt.numpy(), rtol=1e-12, atol=1e-12)
            for a, t, name in ((dx, xt.grad, "dx"), (dw, wt.grad, "dweight"),
                               (db, bt.grad, "dbias")):
                _scaled_close(a, _from_torch(t, layout), np.float64, f"{name} {where}")
            if residual is not None:
                np.testing.assert_allclose(dres, _from_torch(rt.grad, layout), rtol=1e-15,
                                           atol=0, err_msg=where)
            if training and residual is None:
                got = ref.batch_norm_backward_from_output(dy, y, invstd, w, b, layout=layout,
                                                          negative_slope=slope)
                for a, t, name in zip(got, (xt.grad, wt.grad, bt.grad), ("dx", "dw", "db")):
                    _scaled_close(a, _from_torch(t, layout), np.float64, f"from y: {name}")


def test_reference_nan_signed_zero_and_slope_zero():
    """The twins' definition: NaN stays NaN, -0.0 stays -0.0, -inf times the slope; a NaN y
    in the backward gives dy * slope; slope 0 (any zero) is the ReLU's code, bit for bit."""
    x = np.array([-2.0, -0.0, 0.0, np.nan, 3.0, -np.inf, np.inf]).reshape(7, 1)
    # bias -0.0 keeps x's signed zeros through the normalization: (x - 0) * 1 + (-0.0)
    y = ref.batch_norm_relu_infer(x, [0.0], [1.0], None, [-0.0], eps=0.0, negative_slope=0.25)
    np.testing.assert_array_equal(y.ravel(), [-0.5, -0.0, 0.0, np.nan, 3.0, -np.inf, np.inf])
    np.testing.assert_array_equal(np.signbit(y.ravel()), [1, 1, 0, 0, 0, 1, 0])
    relu = ref.batch_norm_relu_infer(x, [0.0], [1.0], None, [-0.0], eps=0.0)
    np.testing.assert_array_equal(relu.ravel(), [0.0, 0.0, 0.0, np.nan, 3.0, 0.0, np.inf])

    rng = np.random.default_rng(1)
    xs, res, dy = (rng.normal(size=(6, 3, 5)) for _ in range(3))
    y, mean, invstd = ref.batch_norm_relu_train(xs, residual=res, negative_slope=0.3)
    y[0, :, 0] = np.nan
    dres = np.empty_like(xs)
    got = ref.batch_norm_relu_backward(dy, y, xs, mean, invstd, dresidual=dres,
                                       negative_slope=0.3)
    np.testing.assert_array_equal(dres, np.where(y > 0, dy, dy * 0.3))
    np.testing.assert_array_equal(dres[0, :, 0], dy[0, :, 0] * 0.3)
    assert all(np.isfinite(a).all() for a in got)

    rm, rv = np.zeros(3), np.ones(3)
    base_train = ref.batch_norm_relu_train(xs, residual=res, running_mean=rm, running_var=rv)
    base_infer = ref.batch_norm_relu_infer(xs, rm, rv, residual=res)
    y0 = base_train[0]
    base_bwd = ref.batch_norm_relu_backward(dy, y0, xs, *base_train[1:], dresidual=dres)
    for zero in (0.0, 0, -0.0, np.float32(0), np.array(0.0)):
        rm2, rv2 = np.zeros(3), np.ones(3)
        t = ref.batch_norm_relu_train(xs, residual=res, running_mean=rm2, running_var=rv2,
                                      negative_slope=zero)
        for a, e in zip(t + (rm2, rv2), base_train + (rm, rv)):
            assert a.tobytes() == e.tobytes()
        i = ref.batch_norm_relu_infer(xs, rm, rv, residual=res, negative_slope=zero)
        assert i.tobytes() == base_infer.tobytes()
        d2 = np.empty_like(xs)
        bwd = ref.batch_norm_relu_backward(dy, y0, xs, *base_train[1:], dresidual=d2,
                                           negative_slope=zero)
        for a, e in zip(bwd, base_bwd):
            assert a.tobytes() == e.tobytes()
        assert d2.tobytes() == dres.tobytes()


def test_reference_rounds_once_in_the_data_dtype():
    """float32 data: the twin's y and its backward's results are the float64 values rounded
    once to float32 (dresidual too: dy * slope is not a float32 product)."""
    rng = np.random.default_rng(2)
    x, res, dy = (rng.normal(size=(8, 3, 7)).astype(np.float32) for _ in range(3))
    s = 0.1
    y, mean, invstd = ref.batch_norm_relu_train(x, residual=res, negative_slope=s)
    y64 = ref.batch_norm_relu_train(x.astype(np.float64), residual=res.astype(np.float64),
                                    negative_slope=s)[0]
    assert y.dtype == np.float32 and y.tobytes() == y64.astype(np.float32).tobytes()
    dres = np.empty_like(x)
    got = ref.batch_norm_relu_backward(dy, y, x, mean, invstd, dresidual=dres,
                                       negative_slope=s)
    want = ref.batch_norm_relu_backward(dy.astype(np.float64), y.astype(np.float64),
                                        x.astype(np.float64), mean, invstd, negative_slope=s)
    for a, e in zip(got, want):
        assert a.dtype == np.float32 and a.tobytes() == e.astype(np.float32).tobytes()
    assert dres.tobytes() == _g(dy, y, s).astype(np.float32).tobytes()


# --------------------------------------------------------------------------------------------
# the fused functions against the twins
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, slope", SLOPED, ids=[f"{c}-{s}" for c, s in SLOPED])
def test_matches_reference(case, slope, dtype):
    """Forward (training, inference; with and without a residual; running statistics) and
    backward (training True and False, with dresidual) against the twins, negative weights
    included; the statistics are batch_norm_train's, bit for bit."""
    x, res, dy, w, b, C = _data(case, dtype, seed=1)
    w = _signed(w, 1)
    L = case.layout
    where = f"{case} {np.dtype(dtype).name} slope={slope}"
    for residual in (None, res):
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        rm_r, rv_r = rm.copy(), rv.copy()
        rm0, rv0 = rm.copy(), rv.copy()
        y, mean, invstd = fastbn.batch_norm_relu_train(
            x, w, b, residual=residual, layout=L, running_mean=rm, running_var=rv,
            momentum=0.3, negative_slope=slope)
        yr, meanr, invstdr = ref.batch_norm_relu_train(
            x, w, b, residual=residual, layout=L, running_mean=rm_r, running_var=rv_r,
            momentum=0.3, negative_slope=slope)
        assert y.dtype == x.dtype and y.shape == x.shape
        _scaled_close(y, yr, dtype, f"y {where}")
        _, mean0, invstd0 = fastbn.batch_norm_train(x, w, b, layout=L, running_mean=rm0,
                                                    running_var=rv0, momentum=0.3)
        for a, e in ((mean, mean0), (invstd, invstd0), (rm, rm0), (rv, rv0)):
            assert a.tobytes() == e.tobytes(), where
        np.testing.assert_allclose(mean, meanr, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(invstd, invstdr, rtol=1e-12, atol=1e-12)
        _scaled_close(rm, rm_r, dtype, f"running_mean {where}")
        _scaled_close(rv, rv_r, dtype, f"running_var {where}")
        rmi, rvi = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
        yi = fastbn.batch_norm_relu_infer(x, rmi, rvi, w, b, residual=residual, layout=L,
                                          negative_slope=slope)
        yir = ref.batch_norm_relu_infer(x, rmi, rvi, w, b, residual=residual, layout=L,
                                        negative_slope=slope)
        _scaled_close(yi, yir, dtype, f"infer {where}")
        for training in (True, False):
            dres, dres_r = np.empty_like(x), np.empty_like(x)
            got = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, training=training,
                                                  layout=L, dresidual=dres,
                                                  negative_slope=slope)
            want = ref.batch_norm_relu_backward(dy, y, x, mean, invstd, w, training=training,
                                                layout=L, dresidual=dres_r,
                                                negative_slope=slope)
            for a, e, name in zip(got, want, ("dx", "dweight", "dbias")):
                assert a.dtype == x.dtype and a.shape == e.shape
                _scaled_close(a, e, dtype, f"{name} training={training} {where}")
            _assert_dresidual(dres, dy, y, slope, where)


def _assert_dresidual(dres, dy, y, s, where):
    """dresidual is g = dy where y > 0 (exactly), else dy * s: the float64 product rounded
    once for float64 data, within one rounding of the slope and one of the product for
    float32 data (the kernels may multiply by the slope rounded to float32)."""
    pos = np.asarray(y) > 0
    np.testing.assert_array_equal(dres[pos], dy[pos], err_msg=f"dresidual y > 0 {where}")
    want = _g(dy, y, s)[~pos]
    if dres.dtype == np.float64:
        np.testing.assert_array_equal(dres[~pos], want, err_msg=f"dresidual {where}")
    else:
        np.testing.assert_allclose(dres[~pos].astype(np.float64), want, rtol=2.0 ** -22,
                                   atol=0, err_msg=f"dresidual {where}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c.nchw in ((3, 5, 20, 20), (9000, 17),
                                                                 (2, 33, 40, 40))], ids=str)
def test_same_bits_as_the_unfused_definition(case, dtype):
    """The forward is batch_norm_train's y (+ residual, rounded as the ReLU's fused forward
    rounds it), then v * (s if v < 0 else 1) rounded once: bit for bit for float64 data,
    and for float32 data with slopes float32 holds exactly (0.25, 3.0); within one rounding
    of the slope otherwise. dresidual likewise."""
    x, res, dy, w, b, C = _data(case, dtype, seed=2)
    L = case.layout
    y0, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=L)
    rm, rv = mean, 1 / invstd ** 2
    yi0 = fastbn.batch_norm_infer(x, rm, rv, w, b, layout=L)
    for s in (0.25, 3.0, 0.1, 0.01):
        exact = dtype == np.float64 or float(np.float32(s)) == s
        for residual in (None, res):
            for name, got, base in (
                    ("train", fastbn.batch_norm_relu_train(x, w, b, residual=residual,
                                                           layout=L, negative_slope=s)[0], y0),
                    ("infer", fastbn.batch_norm_relu_infer(x, rm, rv, w, b, residual=residual,
                                                           layout=L, negative_slope=s), yi0)):
                v = base if residual is None else base + residual     # rounded to dtype
                want = v * np.where(v < 0, v.dtype.type(s), v.dtype.type(1))
                where = f"{name} slope={s} residual={residual is not None}"
                np.testing.assert_array_equal(got > 0, v > 0, err_msg=where)
                if exact:
                    assert got.tobytes() == want.tobytes(), where
                else:
                    np.testing.assert_allclose(got, _leaky(v, s), rtol=2.0 ** -22, atol=0,
                                               err_msg=where)
        y = fastbn.batch_norm_relu_train(x, w, b, layout=L, negative_slope=s)[0]
        dres = np.empty_like(x)
        fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=L, dresidual=dres,
                                        negative_slope=s)
        if exact:
            np.testing.assert_array_equal(dres, np.where(y > 0, dy, dy * dy.dtype.type(s)))
        _assert_dresidual(dres, dy, y, s, f"slope={s}")


@pytest.mark.parametrize("case", [c for c in CASES if c.nchw in ((4, 3, 5, 7), (9000, 17),
                                                                 (8, 3, 64, 48))], ids=str)
@pytest.mark.parametrize("dt", ALL_DTYPES, ids=str)
def test_slope_zero_is_the_relu_bit_for_bit(case, dt):
    """negative_slope=0 (0.0, 0, -0.0, a NumPy zero) runs the ReLU's code: the bits of the
    calls without negative_slope, the running statistics included."""
    x, res, dy, w, b, C = _data(case, np.float64, seed=3)
    x, res, dy = x.astype(dt), res.astype(dt), dy.astype(dt)
    if dt in (F16,) + tuple(BF16):
        w, b = w.astype(np.float32), b.astype(np.float32)
    L = case.layout

    def run(**kw):
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=L,
                                                       running_mean=rm, running_var=rv, **kw)
        yi = fastbn.batch_norm_relu_infer(x, rm, rv, w, b, residual=res, layout=L, **kw)
        out = [y, mean, invstd, rm, rv, yi]
        for training in (True, False):
            dres = np.empty_like(x)
            out += fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=L,
                                                   training=training, dresidual=dres, **kw)
            out.append(dres)
        return out

    base = run()
    for zero in (0.0, 0, -0.0, np.float64(0), np.float32(0), np.array(0.0)):
        for a, e in zip(run(negative_slope=zero), base):
            assert a.dtype == e.dtype and a.tobytes() == e.tobytes(), repr(zero)


def test_slope_takes_any_real():
    """A Python or NumPy real, a 0-d array or a Fraction: the bits of the float."""
    case = [c for c in CASES if c.nchw == (3, 5, 20, 20) and c.layout == "NCHW"][0]
    x, res, dy, w, b, C = _data(case, np.float64, seed=4)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, negative_slope=0.25)
    yi = fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2, w, b, negative_slope=0.25)
    grads = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, negative_slope=0.25)
    y0 = fastbn.batch_norm_relu_train(x, w, b, negative_slope=0.25)[0]
    from_y = fastbn.batch_norm_backward_from_output(dy, y0, invstd, w, b, negative_slope=0.25)
    for s in (np.float64(0.25), np.float32(0.25), np.array(0.25), fractions.Fraction(1, 4)):
        assert fastbn.batch_norm_relu_train(x, w, b, residual=res,
                                            negative_slope=s)[0].tobytes() == y.tobytes()
        assert fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2, w, b,
                                            negative_slope=s).tobytes() == yi.tobytes()
        for a, e in zip(fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w,
                                                        negative_slope=s), grads):
            assert a.tobytes() == e.tobytes()
        for a, e in zip(fastbn.batch_norm_backward_from_output(dy, y0, invstd, w, b,
                                                               negative_slope=s), from_y):
            assert a.tobytes() == e.tobytes()
    y1 = fastbn.batch_norm_relu_train(x, w, b, negative_slope=1)[0]
    assert y1.tobytes() == fastbn.batch_norm_relu_train(x, w, b, negative_slope=1.0)[0].tobytes()


# --------------------------------------------------------------------------------------------
# against PyTorch's float64 autograd of leaky_relu(batch_norm(x) + residual)
# --------------------------------------------------------------------------------------------

TORCH_SLOPED = [(c, SLOPES[i % len(SLOPES)]) for i, c in enumerate(TORCH)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, slope", TORCH_SLOPED, ids=[f"{c}-{s}" for c, s in TORCH_SLOPED])
def test_against_torch_autograd(case, slope, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, res, dy, w, b, C = _data(case, dtype, seed=5)
    w = _signed(w, 5)
    L = case.layout
    f32 = dtype == np.float32
    fwd = dict(rtol=2e-5, atol=2e-5) if f32 else dict(rtol=1e-10, atol=1e-10)
    bwd = dict(rtol=1e-4, atol=1e-4) if f32 else dict(rtol=1e-10, atol=1e-10)
    rm0, rv0 = np.linspace(-0.5, 0.5, C), np.linspace(0.5, 1.5, C)
    for training in (True, False):
        for residual in (None, res):
            rm, rv = rm0.copy(), rv0.copy()
            if training:
                y, mean, invstd = fastbn.batch_norm_relu_train(
                    x, w, b, residual=residual, layout=L, running_mean=rm, running_var=rv,
                    negative_slope=slope)
            else:
                y = fastbn.batch_norm_relu_infer(x, rm, rv, w, b, residual=residual, layout=L,
                                                 negative_slope=slope)
                mean, invstd = rm, 1 / np.sqrt(rv + 1e-5)
            dres = np.empty_like(x)
            dx, dw, db = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w,
                                                         training=training, layout=L,
                                                         dresidual=dres, negative_slope=slope)
            xt, rt = _to_torch(x, L, torch, True), _to_torch(res, L, torch, True)
            wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
            bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
            rmt, rvt = torch.tensor(rm0), torch.tensor(rv0)
            z = F.batch_norm(xt, rmt, rvt, wt, bt, training=training, eps=1e-5)
            if residual is not None:
                z = z + rt
            yt = F.leaky_relu(z, slope)
            # the backward's mask is fastbn's y > 0 (where z is within rounding of 0 the
            # two may differ): the leaky ReLU's backward applied by hand with it
            factor = _to_torch(np.where(y > 0, 1.0, slope), L, torch)
            z.backward(_to_torch(dy, L, torch) * factor)
            where = f"{case} {np.dtype(dtype).name} training={training} " \
                    f"residual={residual is not None}"
            np.testing.assert_allclose(y, _from_torch(yt, L), **fwd, err_msg=f"y {where}")
            np.testing.assert_allclose(rm, rmt.numpy(), **fwd, err_msg=where)
            np.testing.assert_allclose(rv, rvt.numpy(), **fwd, err_msg=where)
            for a, t, name in ((dx, xt.grad, "dx"), (dw, wt.grad, "dweight"),
                               (db, bt.grad, "dbias")):
                e = _from_torch(t, L)
                scale = max(1.0, float(np.abs(e).max()))
                np.testing.assert_allclose(a / scale, e / scale, **bwd,
                                           err_msg=f"{name} {where}")
            if residual is not None:
                # torch's gradient is the float64 product; fastbn's is rounded to dtype
                np.testing.assert_allclose(dres, _from_torch(rt.grad, L),
                                           rtol=2.0 ** -22 if f32 else 0, atol=0, err_msg=where)


# --------------------------------------------------------------------------------------------
# out=, memory orders, NaN, threads, data beyond the caches, 16-bit data
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_out_may_be_x_or_the_residual(layout, dtype):
    case = [c for c in CASES if c.nchw == (3, 40, 17, 17) and c.layout == layout][0]
    x, res, dy, w, b, C = _data(case, dtype, seed=6)
    s = 0.2
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout,
                                                   negative_slope=s)
    _scaled_close(y, ref.batch_norm_relu_train(x, w, b, residual=res, layout=layout,
                                               negative_slope=s)[0], dtype, "y")
    rv = 1 / invstd ** 2
    yi = fastbn.batch_norm_relu_infer(x, mean, rv, w, b, residual=res, layout=layout,
                                      negative_slope=s)
    for target in ("x", "residual"):
        xc, rc = x.copy(), res.copy()
        out = xc if target == "x" else rc
        got = fastbn.batch_norm_relu_train(xc, w, b, residual=rc, layout=layout, out=out,
                                           negative_slope=s)[0]
        assert got is out
        np.testing.assert_array_equal(out, y, err_msg=target)
        xc, rc = x.copy(), res.copy()
        out = xc if target == "x" else rc
        assert fastbn.batch_norm_relu_infer(xc, mean, rv, w, b, residual=rc, layout=layout,
                                            out=out, negative_slope=s) is out
        np.testing.assert_array_equal(out, yi, err_msg=target)
    # without a residual, out=x: the pattern of the backward from the output
    xc = x.copy()
    got = fastbn.batch_norm_relu_train(xc, w, b, layout=layout, out=xc, negative_slope=s)[0]
    assert got is xc
    np.testing.assert_array_equal(xc, fastbn.batch_norm_relu_train(x, w, b, layout=layout,
                                                                   negative_slope=s)[0])
    # the backward in place of dy, with the residual's gradient beside it
    want = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                           negative_slope=s)
    g, dres = dy.copy(), np.empty_like(dy)
    dx, dw, db = fastbn.batch_norm_relu_backward(g, y, x, mean, invstd, w, layout=layout,
                                                 out=g, dresidual=dres, negative_slope=s)
    assert dx is g
    for a, e in zip((dx, dw, db), want):
        np.testing.assert_array_equal(a, e)
    _assert_dresidual(dres, dy, y, s, layout)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("kind", ["F", "strided", "readonly"])
def test_any_memory_order(layout, kind):
    """x, the residual, y, dy, out and dresidual in Fortran order, strided or read-only: the
    bits of C order."""
    case = [c for c in CASES if c.nchw == (3, 5, 20, 20) and c.layout == layout][0]
    x, res, dy, w, b, C = _data(case, np.float64, seed=7)
    s = 0.1
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout,
                                                   negative_slope=s)
    y2 = fastbn.batch_norm_relu_train(_orders(x, kind), w, b, residual=_orders(res, kind),
                                      layout=layout, negative_slope=s)[0]
    np.testing.assert_array_equal(y2, y)
    rv = 1 / invstd ** 2
    yi = fastbn.batch_norm_relu_infer(x, mean, rv, residual=res, layout=layout,
                                      negative_slope=s)
    yi2 = fastbn.batch_norm_relu_infer(_orders(x, kind), mean, rv, residual=_orders(res, kind),
                                       layout=layout, negative_slope=s)
    np.testing.assert_array_equal(yi2, yi)
    dres = np.empty_like(x)
    want = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                           dresidual=dres, negative_slope=s)
    if kind != "readonly":
        dres2, out = _orders(np.zeros_like(x), kind), _orders(np.zeros_like(x), kind)
    else:
        dres2, out = np.zeros_like(x), None
    got = fastbn.batch_norm_relu_backward(_orders(dy, kind), _orders(y, kind), _orders(x, kind),
                                          mean, invstd, w, layout=layout, dresidual=dres2,
                                          out=out, negative_slope=s)
    for a, e in zip(got, want):
        np.testing.assert_array_equal(a, e)
    np.testing.assert_array_equal(dres2, dres)
    y0 = fastbn.batch_norm_relu_train(x, w, b, layout=layout, negative_slope=s)[0]
    fy = fastbn.batch_norm_backward_from_output(dy, y0, invstd, w, b, layout=layout,
                                                negative_slope=s)
    fy2 = fastbn.batch_norm_backward_from_output(_orders(dy, kind), _orders(y0, kind), invstd,
                                                 w, b, layout=layout, negative_slope=s)
    for a, e in zip(fy2, fy):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_nan_forward_and_scales_backward(layout, dtype):
    """Forward: a NaN in x makes its channel NaN in training; in inference NaN exactly where
    x or the residual is NaN (neither masked nor scaled away). Backward: a NaN in y, like
    any y <= 0 (+0.0 and -0.0 too), gives dy * slope: the bits of the backward with -1 in
    its place."""
    case = [c for c in CASES if c.nchw == (4, 3, 5, 7) and c.layout == layout][0]
    x, res, dy, w, b, C = _data(case, dtype, seed=8)
    s = 0.2
    axis = _axis(layout, x.ndim)
    xn = x.copy()
    xn[(0,) * x.ndim] = np.nan
    y, mean, invstd = fastbn.batch_norm_relu_train(xn, w, b, layout=layout, negative_slope=s)
    assert np.isnan(np.take(y, 0, axis=axis)).all()
    assert not np.isnan(np.take(y, [1, 2], axis=axis)).any()
    rn = res.copy()
    rn[(1,) * x.ndim] = np.nan
    yi = fastbn.batch_norm_relu_infer(xn, np.zeros(C), np.ones(C), w, b, residual=rn,
                                      layout=layout, negative_slope=s)
    want_nan = np.isnan(xn) | np.isnan(rn)
    np.testing.assert_array_equal(np.isnan(yi), want_nan)
    assert (yi[~want_nan] < 0).any() and (yi[~want_nan] > 0).any()

    y_clean, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, layout=layout,
                                                         negative_slope=s)
    y_nan = y_clean.copy()
    flat = y_nan.reshape(-1)
    flat[::7] = np.nan
    flat[1::11] = 0.0
    flat[2::13] = -0.0
    y_neg = np.where(y_nan > 0, y_nan, -1.0).astype(dtype)
    for training in (True, False):
        dres, dres_neg = np.empty_like(x), np.empty_like(x)
        got = fastbn.batch_norm_relu_backward(dy, y_nan, x, mean, invstd, w, layout=layout,
                                              training=training, dresidual=dres,
                                              negative_slope=s)
        want = fastbn.batch_norm_relu_backward(dy, y_neg, x, mean, invstd, w, layout=layout,
                                               training=training, dresidual=dres_neg,
                                               negative_slope=s)
        for a, e in zip(got, want):
            assert a.tobytes() == e.tobytes()
        assert dres.tobytes() == dres_neg.tobytes()
        _assert_dresidual(dres, dy, y_nan, s, "NaN y")
        assert all(np.isfinite(a).all() for a in got)
        wr = ref.batch_norm_relu_backward(dy, y_nan, x, mean, invstd, w, layout=layout,
                                          training=training, negative_slope=s)
        for a, e, name in zip(got, wr, ("dx", "dweight", "dbias")):
            _scaled_close(a, e, dtype, f"{name} training={training}")


def _run_all(x, res, dy, w, b, layout, s, **kw):
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout,
                                                   negative_slope=s, **kw)
    yi = fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2, w, b, residual=res,
                                      layout=layout, negative_slope=s, **kw)
    dres = np.empty_like(x)
    grads = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                            dresidual=dres, negative_slope=s, **kw)
    y0 = fastbn.batch_norm_relu_train(x, w, b, layout=layout, negative_slope=s, **kw)[0]
    from_y = fastbn.batch_norm_backward_from_output(dy, y0, invstd, w, b, layout=layout,
                                                    negative_slope=s, **kw)
    return (y, mean, invstd, yi, dres) + tuple(grads) + tuple(from_y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", THREAD_PICKS, ids=ids(THREAD_PICKS))
def test_bit_identical_across_threads(case, dtype):
    x, res, dy, w, b, C = _data(case, dtype, seed=9, offset=1.0)
    one = _run_all(x, res, dy, w, b, case.layout, 0.1, num_threads=1)
    for a, e in zip(_run_all(x, res, dy, w, b, case.layout, 0.1, num_threads=2), one):
        assert a.tobytes() == e.tobytes(), "differs on 2 threads"


BIG = [("NCHW", (8, 64, 96, 96)), ("NHWC", (8, 96, 96, 64))]


@pytest.mark.parametrize("layout, shape", BIG, ids=str)
def test_large_float32_against_the_twin(layout, shape, monkeypatch, kernel_modules):
    """float32 data beyond the caches (18 MiB an array), where the kernels take their
    big-data paths: the training forward with a residual and the training backward (NaN, 0
    and -0.0 in y among the values it masks) against the twins, in every build this CPU
    runs; 1 and 2 threads and streaming stores give the same bits; the backward from the
    output of the same forward without a residual within its contract."""
    from fastbn import _dispatch
    rng = np.random.default_rng(10)
    C = shape[-1] if layout == "NHWC" else shape[1]
    x = (rng.standard_normal(shape, np.float32) * 3 + 0.5).astype(np.float32)
    dy = rng.standard_normal(shape, np.float32)
    res = rng.standard_normal(shape, np.float32)
    w = _signed(rng.uniform(0.5, 1.5, C).astype(np.float32), 10)
    b = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    s = 0.1
    yr, meanr, invstdr = ref.batch_norm_relu_train(x, w, b, residual=res, layout=layout,
                                                   negative_slope=s)
    y_back = yr.copy()
    flat = y_back.reshape(-1)
    flat[::997] = np.nan
    flat[1::1009] = 0.0
    flat[2::1013] = -0.0
    want = ref.batch_norm_relu_backward(dy, y_back, x, meanr, invstdr, w, layout=layout,
                                        negative_slope=s)
    for name in kernel_modules:
        with _dispatch.using(importlib.import_module(name)):
            first = None
            for nt, stream_above in ((1, None), (2, None), (2, 0)):
                if stream_above is not None:
                    monkeypatch.setattr(_memory, "STREAM_ABOVE", stream_above)
                where = f"{name} {nt} threads stream={stream_above}"
                y, mean, invstd = fastbn.batch_norm_relu_train(
                    x, w, b, residual=res, layout=layout, negative_slope=s, num_threads=nt,
                    out=np.empty_like(x))
                dres = np.empty_like(x)
                got = fastbn.batch_norm_relu_backward(
                    dy, y_back, x, mean, invstd, w, layout=layout, out=np.empty_like(x),
                    dresidual=dres, negative_slope=s, num_threads=nt)
                results = (y, mean, invstd, dres) + tuple(got)
                if first is None:
                    first = results
                    _scaled_close(y, yr, np.float32, f"y {where}")
                    np.testing.assert_allclose(mean, meanr, rtol=1e-12, atol=1e-12)
                    np.testing.assert_allclose(invstd, invstdr, rtol=1e-12, atol=1e-12)
                    for a, e, what in zip(got, want, ("dx", "dweight", "dbias")):
                        _scaled_close(a, e, np.float32, f"{what} {where}")
                    _assert_dresidual(dres, dy, y_back, s, where)
                else:
                    for a, e in zip(results, first):
                        assert a.tobytes() == e.tobytes(), where
            monkeypatch.undo()
    # the backward from the output: y of the forward without a residual, written over x
    xc = x.copy()
    y, mean, invstd = fastbn.batch_norm_relu_train(xc, w, b, layout=layout, negative_slope=s,
                                                   out=xc)
    got = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, layout=layout,
                                                 negative_slope=s)
    from_x = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                             negative_slope=s)
    _assert_from_output(got, from_x, dy, y, invstd, w, b, s, layout)


def test_empty_batches():
    x = np.zeros((0, 3, 4), np.float32)
    y = fastbn.batch_norm_relu_infer(x, np.zeros(3), np.ones(3), residual=x, negative_slope=0.2)
    assert y.shape == x.shape
    dres = np.empty_like(x)
    dx, dw, db = fastbn.batch_norm_relu_backward(x, x, x, np.zeros(3), np.ones(3),
                                                 dresidual=dres, negative_slope=0.2)
    assert dx.shape == x.shape and (dw == 0).all() and (db == 0).all()
    x1 = np.array([[-1.0, 2.0]])
    np.testing.assert_array_equal(
        fastbn.batch_norm_relu_infer(x1, np.zeros(2), np.ones(2), eps=0.0, negative_slope=0.5),
        [[-0.5, 2.0]])


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", HALF_PICKS, ids=ids(HALF_PICKS))
def test_half_precision_is_faithful(case, dt):
    """16-bit data: y, dx and dresidual each a faithful rounding of the float64 value from the
    same 16-bit inputs; dweight and dbias float32 to 2e-5."""
    ml = pytest.importorskip("ml_dtypes")
    from test_half import assert_faithful
    dt = np.dtype(ml.bfloat16 if dt == "bfloat16" else np.float16)
    x, res, dy, _, _, C = _data(case, np.float64, seed=11, offset=1.0)
    x, res, dy = x.astype(dt), res.astype(dt), dy.astype(dt)
    w = _signed(np.linspace(0.5, 1.5, C).astype(np.float32), 11)
    b = np.linspace(-1, 1, C).astype(np.float32)
    L = case.layout
    x64, r64, g64 = (a.astype(np.float64) for a in (x, res, dy))
    for s in (0.01, 0.3):
        for residual, r in ((None, None), (res, r64)):
            where = f"slope={s} residual={residual is not None}"
            y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=residual,
                                                           layout=L, negative_slope=s)
            yr = ref.batch_norm_relu_train(x64, w, b, residual=r, layout=L,
                                           negative_slope=s)[0]
            assert y.dtype == dt
            assert_faithful(y, yr, dt, f"y {where}")
            yi = fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2, w, b,
                                              residual=residual, layout=L, negative_slope=s)
            assert_faithful(yi, ref.batch_norm_relu_infer(x64, mean, 1 / invstd ** 2, w, b,
                                                          residual=r, layout=L,
                                                          negative_slope=s), dt, "infer")
            for training in (True, False):
                dres = np.empty_like(x)
                dx, dw, db = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w,
                                                             layout=L, training=training,
                                                             dresidual=dres, negative_slope=s)
                dxr, dwr, dbr = ref.batch_norm_relu_backward(
                    g64, y.astype(np.float64), x64, mean, invstd, w, layout=L,
                    training=training, negative_slope=s)
                assert dx.dtype == dres.dtype == dt and dw.dtype == db.dtype == np.float32
                assert_faithful(dx, dxr, dt, f"dx training={training} {where}")
                np.testing.assert_allclose(dw, dwr, rtol=2e-5, atol=2e-5)
                np.testing.assert_allclose(db, dbr, rtol=2e-5, atol=2e-5)
                assert_faithful(dres, _g(g64, y, s), dt, f"dresidual {where}")


# --------------------------------------------------------------------------------------------
# the backward from the output of a leaky ReLU
# --------------------------------------------------------------------------------------------

FROM_Y_SHAPES = [(8, 5, 6, 7), (4, 1, 3, 3), (16, 3, 1, 1), (2, 33, 4, 4), (64, 70),
                 (3, 4, 2, 3, 2)]


def _from_y_data(shape, layout, dt, seed, wmin=0.25):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=shape)
    dy = rng.normal(size=shape)
    if layout == "NHWC":
        x, dy = np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1)
    C = shape[1]
    pdt = np.float64 if dt == F64 else np.float32
    w = (rng.uniform(wmin, 2.0, C) * rng.choice([-1.0, 1.0], C)).astype(pdt)
    b = rng.normal(size=C).astype(pdt)
    return (np.ascontiguousarray(x).astype(dt), np.ascontiguousarray(dy).astype(dt), w, b)


def _assert_from_output(got, from_x, dy, y, invstd, w, b, s, layout, rel64=1e-10):
    """The backward from the output of a leaky ReLU (got) against the same arithmetic on
    the same y (the twin: the kernels' rounding only) and against batch_norm_relu_backward
    on the x that made y (from_x: y's rounding too, which the recovered pre-activation
    v = y or y / s inherits, scaled by 1 / |weight|); float64 also to rel64 relative."""
    dt = y.dtype
    dx, dw, db = (np.asarray(a).astype(np.float64) for a in got)
    dx0, dw0, db0 = (np.asarray(a).astype(np.float64) for a in from_x)
    w64, b64 = np.asarray(w, np.float64), np.asarray(b, np.float64)
    dxr, dwr, dbr = ref.batch_norm_backward_from_output(
        dy.astype(np.float64), y.astype(np.float64), invstd, w64, b64, layout=layout,
        negative_slope=s)
    axis = _axis(layout, y.ndim)
    yl = np.moveaxis(y.astype(np.float64), axis, -1)
    v = np.where(yl > 0, yl, yl / s)
    g = _g(np.moveaxis(dy, axis, -1), yl, s)
    natural = np.abs(w64).max() * np.max(invstd) * max(np.abs(g).max(), np.sqrt((g * g).mean()))
    out_ulp = UNIT[dt]
    kern = 8 * max(out_ulp, 2.0 ** -23 if dt != F64 else 2.0 ** -45)
    terms = np.abs(g).sum() * np.nanmax(np.abs((v - b64) / w64))   # sum |g| * max |xhat|
    gtol = 4 * (2.0 ** -23 if dt != F64 else 2.0 ** -45) * terms
    # the kernels' arithmetic on the same y
    assert np.abs(dx - dxr).max() <= kern * natural + out_ulp * np.abs(dxr).max()
    assert np.abs(dw - dwr).max() <= gtol + np.abs(dwr).max() * out_ulp
    assert np.abs(db - dbr).max() <= gtol + np.abs(dbr).max() * out_ulp
    # the backward from x: plus y's rounding
    yunit = UNIT[dt] * (np.abs(v) / np.abs(w64)).max()
    assert np.abs(dx - dx0).max() <= (kern * natural + 8 * natural * yunit
                                      + out_ulp * np.abs(dx0).max())
    assert np.abs(dw - dw0).max() <= gtol + 2 * yunit * np.abs(g).sum() + \
        2 * out_ulp * np.abs(dw0).max()
    assert np.abs(db - db0).max() <= gtol + 2 * out_ulp * np.abs(db0).max()
    if dt == F64:
        np.testing.assert_allclose(dx, dx0, rtol=rel64, atol=rel64 * np.abs(dx0).max())
        np.testing.assert_allclose(dw, dw0, rtol=rel64, atol=rel64 * max(1, np.abs(dw0).max()))
        np.testing.assert_allclose(db, db0, rtol=rel64, atol=rel64 * max(1, np.abs(db0).max()))


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("dt", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", FROM_Y_SHAPES, ids=str)
def test_from_output_equals_the_backward_from_x(shape, layout, dt, slope):
    x, dy, w, b = _from_y_data(shape, layout, dt, 12)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, layout=layout, negative_slope=slope)
    got = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, layout=layout,
                                                 negative_slope=slope)
    from_x = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                             negative_slope=slope)
    assert got[0].shape == x.shape and got[0].dtype == x.dtype
    assert got[1].dtype == from_x[1].dtype and got[2].dtype == from_x[2].dtype
    _assert_from_output(got, from_x, dy, y, invstd, w, b, slope, layout)


@pytest.mark.parametrize("slope", [0.01, 0.2, 3.0])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_from_output_against_torch(layout, slope):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, dy, w, b = _from_y_data((6, 4, 5, 3), layout, F64, 13)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, layout=layout, negative_slope=slope)
    dx, dw, db = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, layout=layout,
                                                        negative_slope=slope)
    xt = _to_torch(x, layout, torch, True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    z = F.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    yt = F.leaky_relu(z, slope)
    yt.backward(_to_torch(dy, layout, torch))
    np.testing.assert_array_equal(y > 0, _from_torch(z, layout) > 0)
    e = _from_torch(xt.grad, layout)
    np.testing.assert_allclose(dx, e, rtol=1e-10, atol=1e-10 * np.abs(e).max())
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dt", [F64, F32], ids=str)
def test_from_output_weights_near_zero_negative_nan_threads_and_out(dt):
    """Weights near 0 (1e-3, -2e-4) and negative, with biases that keep about half of the
    pre-activations negative: the backward from x within the contract (float64: 1e-9, the
    recovered v divided by |weight|). A NaN in x: the same channels NaN as the backward from
    x. 1 and 2 threads, out= and out=dy give the same bits."""
    x, dy, _, _ = _from_y_data((16, 4, 6, 6), "NCHW", dt, 14)
    pdt = np.float64 if dt == F64 else np.float32
    w = np.array([1e-3, -2e-4, 1.5, -0.7], pdt)
    b = np.array([2e-4, -1e-4, 0.1, 0.3], pdt)
    s = 0.1
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, negative_slope=s)
    for c in range(4):
        assert (y[:, c] < 0).mean() > 0.2 and (y[:, c] > 0).mean() > 0.2, c
    got = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, negative_slope=s)
    from_x = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, negative_slope=s)
    _assert_from_output(got, from_x, dy, y, invstd, w, b, s, "NCHW", rel64=1e-9)
    # a NaN in x: its channel's statistics and y are NaN, in both backwards alike
    xn = x.copy()
    xn[3, 1, 2, 2] = np.nan
    yn, mn, isn = fastbn.batch_norm_relu_train(xn, w, b, negative_slope=s)
    a = fastbn.batch_norm_backward_from_output(dy, yn, isn, w, b, negative_slope=s)
    c = fastbn.batch_norm_relu_backward(dy, yn, xn, mn, isn, w, negative_slope=s)
    for u, v in zip(a, c):
        np.testing.assert_array_equal(np.isnan(u), np.isnan(v))
    assert np.isnan(a[0][:, 1]).all() and not np.isnan(a[0][:, [0, 2, 3]]).any()
    # threads, out=, in place
    x2, dy2, w2, b2 = _from_y_data((32, 8, 9, 9), "NHWC", dt, 15)
    y2, _, i2 = fastbn.batch_norm_relu_train(x2, w2, b2, layout="NHWC", negative_slope=s)
    r1 = fastbn.batch_norm_backward_from_output(dy2, y2, i2, w2, b2, layout="NHWC",
                                                negative_slope=s, num_threads=1)
    r2 = fastbn.batch_norm_backward_from_output(dy2, y2, i2, w2, b2, layout="NHWC",
                                                negative_slope=s, num_threads=2)
    for u, v in zip(r1, r2):
        assert u.tobytes() == v.tobytes()
    out = np.empty_like(dy2)
    r3 = fastbn.batch_norm_backward_from_output(dy2, y2, i2, w2, b2, layout="NHWC",
                                                negative_slope=s, out=out)
    assert r3[0] is out and out.tobytes() == r1[0].tobytes()
    gin = dy2.copy()
    fastbn.batch_norm_backward_from_output(gin, y2, i2, w2, b2, layout="NHWC", out=gin,
                                           negative_slope=s)
    assert gin.tobytes() == r1[0].tobytes()
    # no weight and no bias: 1 and 0
    y1, m1, i1 = fastbn.batch_norm_relu_train(x, negative_slope=s)
    _assert_from_output(fastbn.batch_norm_backward_from_output(dy, y1, i1, negative_slope=s),
                        fastbn.batch_norm_relu_backward(dy, y1, x, m1, i1, negative_slope=s),
                        dy, y1, i1, np.ones(4), np.zeros(4), s, "NCHW")


def test_from_output_without_slope_is_unchanged():
    """negative_slope=None (the default) is the identity form: the bits of the call
    without it."""
    x, dy, w, b = _from_y_data((8, 5, 6, 7), "NCHW", F32, 16)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    base = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b)
    for a, e in zip(fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b,
                                                           negative_slope=None), base):
        assert a.tobytes() == e.tobytes()


# --------------------------------------------------------------------------------------------
# bad slopes: the right exception, a clear message, nothing changed
# --------------------------------------------------------------------------------------------

BAD_SLOPES = [(-0.1, ValueError, r"negative_slope must be a finite number >= 0, got -0\.1"),
              (-1, ValueError, "negative_slope must be a finite number >= 0"),
              (float("nan"), ValueError, "negative_slope must be a finite number >= 0"),
              (float("inf"), ValueError, "negative_slope must be a finite number >= 0"),
              (-np.inf, ValueError, "negative_slope must be a finite number >= 0"),
              (10 ** 400, ValueError, "negative_slope must be a finite number >= 0"),
              ("0.1", TypeError, "negative_slope must be a real number, got str"),
              (True, TypeError, "negative_slope must be a real number, got bool"),
              (np.True_, TypeError, "negative_slope must be a real number"),
              (1j, TypeError, "negative_slope must be a real number, got complex"),
              (np.array([0.1]), TypeError, "negative_slope must be a real number"),
              ([0.1], TypeError, "negative_slope must be a real number, got list")]
FUSED_ONLY = [(None, TypeError, "negative_slope must be a real number, got NoneType")]
NOT_INVERTIBLE = [(z, ValueError, r"negative_slope must be > 0: y = max\(x, 0\) does not "
                   r"determine a negative x") for z in (0, 0.0, -0.0, np.float32(0))]


def _error_args(dtype=np.float32):
    rng = np.random.default_rng(17)
    x, res, dy = (rng.normal(size=(4, 3, 5)).astype(dtype) for _ in range(3))
    w, b = np.array([1.0, -0.5, 2.0], dtype), np.array([0.1, 0.0, -0.3], dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    return x, res, dy, w, b, y, mean, invstd


@pytest.mark.parametrize("api", ["fastbn", "reference"])
@pytest.mark.parametrize("bad, exc, msg", BAD_SLOPES + FUSED_ONLY,
                         ids=[repr(v[0])[:20] for v in BAD_SLOPES + FUSED_ONLY])
def test_fused_bad_slopes(api, bad, exc, msg):
    """Each fused function (and its twin) refuses the slope before it writes anything: out,
    x and the residual under out=, the running statistics, dresidual all unchanged."""
    mod = fastbn if api == "fastbn" else ref
    x, res, dy, w, b, y, mean, invstd = _error_args()
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    out, dres = np.full_like(x, 7.0), np.full_like(x, 9.0)
    snap = Snapshot(x, res, dy, w, b, y, mean, invstd, rm, rv, out, dres)
    calls = [
        lambda: mod.batch_norm_relu_train(x, w, b, residual=res, running_mean=rm,
                                          running_var=rv, out=out, negative_slope=bad),
        lambda: mod.batch_norm_relu_train(x, w, b, residual=res, running_mean=rm,
                                          running_var=rv, out=res, negative_slope=bad),
        lambda: mod.batch_norm_relu_train(x, w, b, running_mean=rm, running_var=rv, out=x,
                                          negative_slope=bad),
        lambda: mod.batch_norm_relu_infer(x, rm, rv, w, b, residual=res, out=out,
                                          negative_slope=bad),
        lambda: mod.batch_norm_relu_infer(x, rm, rv, w, b, residual=res, out=res,
                                          negative_slope=bad),
        lambda: mod.batch_norm_relu_backward(dy, y, x, mean, invstd, w, out=out,
                                             dresidual=dres, negative_slope=bad),
        lambda: mod.batch_norm_relu_backward(dy, y, x, mean, invstd, w, training=False,
                                             out=dy, dresidual=dres, negative_slope=bad),
    ]
    for call in calls:
        with pytest.raises(exc, match=msg):
            call()
        snap.assert_unchanged()


@pytest.mark.parametrize("api", ["fastbn", "reference"])
@pytest.mark.parametrize("bad, exc, msg", BAD_SLOPES + NOT_INVERTIBLE,
                         ids=[repr(v[0])[:20] for v in BAD_SLOPES + NOT_INVERTIBLE])
def test_from_output_bad_slopes(api, bad, exc, msg):
    """The backward from the output refuses a slope that is not a finite real > 0 (0 is the
    ReLU, whose 0 hides a negative input), with out= and out=dy unchanged."""
    mod = fastbn if api == "fastbn" else ref
    x, res, dy, w, b, y, mean, invstd = _error_args(np.float64)
    out = np.full_like(y, 7.0)
    snap = Snapshot(dy, y, invstd, w, b, out)
    for target in (out, dy):
        with pytest.raises(exc, match=msg):
            mod.batch_norm_backward_from_output(dy, y, invstd, w, b, out=target,
                                                negative_slope=bad)
        snap.assert_unchanged()


# --------------------------------------------------------------------------------------------
# the layers: activation=("leaky_relu", slope), memory="low" behind it
# --------------------------------------------------------------------------------------------

def _layer_data(layout, dtype, seed, shape=(6, 5, 4, 3)):
    rng = np.random.default_rng(seed)
    if layout == "NHWC":
        shape = (shape[0],) + shape[2:] + (shape[1],)
    x, res, dy = (rng.normal(0.5, 2, shape).astype(dtype) for _ in range(3))
    w = _signed(rng.uniform(0.5, 1.5, 5).astype(dtype), seed)
    b = rng.uniform(-0.5, 0.5, 5).astype(dtype)
    return x, res, dy, w, b


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_uses_the_fused_functions(layout, dtype):
    """BatchNorm(activation=("leaky_relu", 0.1)): training and eval forwards and backwards,
    with and without a residual, give the bits of the functional calls; the running
    statistics and the state keys are those of the plain layer."""
    s = 0.1
    x, res, dy, w, b = _layer_data(layout, dtype, 18)
    bn = fastbn.BatchNorm(5, layout=layout, dtype=dtype, activation=("leaky_relu", s))
    plain = fastbn.BatchNorm(5, layout=layout, dtype=dtype)
    assert sorted(bn.state_dict()) == sorted(plain.state_dict())
    bn.weight[...], bn.bias[...] = w, b
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    for residual in (None, res):
        where = f"train residual={residual is not None}"
        bn.zero_grad()
        y = bn(x) if residual is None else bn(x, residual)
        yf, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=residual,
                                                        layout=layout, running_mean=rm,
                                                        running_var=rv, negative_slope=s)
        assert y.tobytes() == yf.tobytes(), where
        np.testing.assert_array_equal(bn.running_mean, rm)
        np.testing.assert_array_equal(bn.running_var, rv)
        got = bn.backward(dy)
        dres = None if residual is None else np.empty_like(x)
        want = fastbn.batch_norm_relu_backward(dy, yf, x, mean, invstd, w, layout=layout,
                                               dresidual=dres, negative_slope=s)
        if residual is not None:
            got, got_dres = got
            assert got_dres.tobytes() == dres.tobytes(), where
        assert got.tobytes() == want[0].tobytes(), where
        assert bn.weight_grad.tobytes() == want[1].tobytes(), where
        assert bn.bias_grad.tobytes() == want[2].tobytes(), where
    bn.eval()
    mean = bn.running_mean.astype(np.float64)
    invstd = 1 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    for residual in (None, res):
        where = f"eval residual={residual is not None}"
        bn.zero_grad()
        y = bn(x) if residual is None else bn(x, residual)
        yf = fastbn.batch_norm_relu_infer(x, bn.running_mean, bn.running_var, w, b,
                                          residual=residual, layout=layout, negative_slope=s)
        assert y.tobytes() == yf.tobytes(), where
        got = bn.backward(dy)
        dres = None if residual is None else np.empty_like(x)
        want = fastbn.batch_norm_relu_backward(dy, yf, x, mean, invstd, w, training=False,
                                               layout=layout, dresidual=dres, negative_slope=s)
        if residual is not None:
            got, got_dres = got
            assert got_dres.tobytes() == dres.tobytes(), where
        assert got.tobytes() == want[0].tobytes(), where
        assert bn.weight_grad.tobytes() == want[1].tobytes(), where
        assert bn.bias_grad.tobytes() == want[2].tobytes(), where


@pytest.mark.parametrize("ghost", [None, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_low_memory_layer(layout, dtype, ghost):
    """memory="low" behind a leaky ReLU: the forward and the running statistics of the
    usual layer bit for bit, its gradients within the contract of the backward from the
    output (float64: 1e-10); the layer holds y, not x; eval keeps x as the usual layer."""
    s = 0.1
    x, _, dy, w, b = _layer_data(layout, dtype, 20, shape=(8, 5, 5, 5))
    act = ("leaky_relu", s)
    normal = fastbn.BatchNorm(5, layout=layout, dtype=dtype, activation=act,
                              ghost_batch_size=ghost)
    low = fastbn.BatchNorm(5, layout=layout, dtype=dtype, activation=act,
                           ghost_batch_size=ghost, memory="low")
    normal.weight[...], normal.bias[...] = w, b
    low.load_state_dict(normal.state_dict())
    ya, yb = normal(x), low(x)
    assert ya.tobytes() == yb.tobytes()
    assert normal.running_var.tobytes() == low.running_var.tobytes()
    assert normal.running_mean.tobytes() == low.running_mean.tobytes()
    dxa, dxb = normal.backward(dy), low.backward(dy)
    if dtype == np.float64:
        tol = dict(rtol=1e-10, atol=1e-10 * np.abs(dxa).max())
        np.testing.assert_allclose(dxb, dxa, **tol)
        np.testing.assert_allclose(low.weight_grad, normal.weight_grad, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(low.bias_grad, normal.bias_grad, rtol=1e-10, atol=1e-10)
    else:
        np.testing.assert_allclose(dxb, dxa, rtol=0, atol=2e-5 * np.abs(dxa).max())
        np.testing.assert_allclose(low.weight_grad, normal.weight_grad, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(low.bias_grad, normal.bias_grad, rtol=1e-5, atol=1e-5)
    # the layer holds y, not x: x may be overwritten after the forward (the usual layer
    # takes the same step, so that the two states stay equal for the eval below)
    x2 = x.copy()
    y2 = low(x2)
    normal(x)
    x2[...] = np.nan
    assert np.isfinite(low.backward(dy)).all()
    normal.backward(dy)
    del y2
    low.eval()
    normal.eval()
    assert low(x).tobytes() == normal(x).tobytes()
    assert low.backward(dy).tobytes() == normal.backward(dy).tobytes()


def test_layer_activation_errors():
    """Bad activations are refused with a message naming what is expected (and the slope's
    rule); a refused setting leaves the layer's activation as it was."""
    for bad in (("leaky_relu", -1), ("leaky_relu", -0.5), ("leaky_relu", float("nan")),
                ("leaky_relu", float("inf"))):
        with pytest.raises(ValueError, match="slope must be a finite number >= 0"):
            fastbn.BatchNorm(3, activation=bad)
    for bad in (("leaky_relu",), ("elu", 1.0), ("leaky_relu", 0.1, 0.2), "leaky_relu",
                ("relu", 0.1), "elu"):
        with pytest.raises(ValueError, match="activation.*leaky_relu"):
            fastbn.BatchNorm(3, activation=bad)
    bn = fastbn.BatchNorm(3, activation=("leaky_relu", 0.2))
    with pytest.raises(ValueError, match="slope"):
        bn.activation = ("leaky_relu", -1)
    with pytest.raises(ValueError, match="activation"):
        bn.activation = ("elu", 1.0)
    assert bn.activation == ("leaky_relu", 0.2)


def test_low_memory_layer_activation_errors():
    """memory="low" needs an invertible activation: none, or a leaky ReLU of slope > 0. The
    ReLU (and the slope 0) stays a ValueError, a residual too (y does not determine bn(x)
    without it); a refused setting changes nothing."""
    for act in ("relu", ("leaky_relu", 0.0)):
        with pytest.raises(ValueError, match="memory='low' needs activation=None"):
            fastbn.BatchNorm(3, memory="low", activation=act)
    bn = fastbn.BatchNorm(3, memory="low")
    bn.activation = ("leaky_relu", 0.3)
    for act in ("relu", ("leaky_relu", 0)):
        with pytest.raises(ValueError, match="while memory='low'"):
            bn.activation = act
        assert bn.activation == ("leaky_relu", 0.3)
    x = np.random.default_rng(21).normal(size=(4, 3, 5)).astype(np.float32)
    state = bn.state_dict()
    snap = Snapshot(x)
    with pytest.raises(ValueError, match="residual"):
        bn(x, np.zeros_like(x))
    snap.assert_unchanged()
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    relu = fastbn.BatchNorm(3, activation="relu")
    with pytest.raises(ValueError, match="memory='low' needs activation=None"):
        relu.memory = "low"
    assert relu.memory == "normal"
