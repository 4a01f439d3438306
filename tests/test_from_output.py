"""The backward from the output (batch_norm_backward_from_output) and the layers that keep y
instead of x (BatchNorm(memory="low")): equal to the backward from x up to the rounding of
y, to the NumPy twin, and (float64) to PyTorch's autograd; clear errors; less memory."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbn
from fastbn import reference

try:
    import ml_dtypes
    BF16 = [np.dtype(ml_dtypes.bfloat16)]
except ImportError:            # pragma: no cover - ml_dtypes is in the test extra
    BF16 = []

DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)] + BF16
SHAPES = [(8, 5, 6, 7), (4, 1, 3, 3), (16, 3, 1, 1), (2, 33, 4, 4), (64, 70), (3, 4, 2, 3, 2)]
# the rounding unit of each dtype's y, which the recovered xhat inherits
UNIT = {np.dtype(np.float64): 2.0 ** -52, np.dtype(np.float32): 2.0 ** -23,
        np.dtype(np.float16): 2.0 ** -10}
if BF16:
    UNIT[BF16[0]] = 2.0 ** -7


def _data(shape, layout, dt, seed, loc=1.0, scale=2.0, order="C"):
    x = np.random.default_rng(seed).normal(loc, scale, size=shape)
    if layout == "NHWC":
        x = np.moveaxis(x, 1, -1)
    x = np.ascontiguousarray(x).astype(dt)
    return np.asfortranarray(x) if order == "F" else x


def _params(C, dt, seed=1, wmin=0.25):
    rng = np.random.default_rng(seed)
    pdt = np.float64 if dt == np.float64 else np.float32
    w = rng.uniform(wmin, 2.0, size=C) * rng.choice([-1.0, 1.0], size=C)
    b = rng.normal(size=C)
    return w.astype(pdt), b.astype(pdt)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("order", ["C", "F"])
def test_equals_the_backward_from_x(shape, layout, dt, order):
    x = _data(shape, layout, dt, 0, order=order)
    C = shape[1]
    w, b = _params(C, dt)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout)
    dy = _data(shape, layout, dt, 2, loc=0.0, scale=1.0, order=order)
    dx, dw, db = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, layout=layout)
    dx0, dw0, db0 = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.dtype == dw0.dtype
    # the NumPy twin on the same y: the kernels' arithmetic only
    dxr, dwr, dbr = reference.batch_norm_backward_from_output(
        dy.astype(np.float64), y.astype(np.float64), invstd, w.astype(np.float64),
        b.astype(np.float64), layout=layout)
    g = dy.astype(np.float64)
    natural = np.abs(w).max() * invstd.max() * max(np.abs(g).max(), np.sqrt((g * g).mean()))
    out_ulp = UNIT[dt] if dt != np.float64 else 2.0 ** -52
    kern = 8 * max(out_ulp, 2.0 ** -23 if dt != np.float64 else 2.0 ** -45)
    assert np.abs(dx.astype(np.float64) - dxr).max() <= kern * natural + out_ulp * np.abs(dxr).max()
    yl = np.moveaxis(y.astype(np.float64), 1 if layout == "NCHW" else -1, -1)
    terms = np.abs(g).sum() * np.abs((yl - b) / w).max()        # sum |dy| * max |xhat|
    gtol = 4 * (2.0 ** -23 if dt != np.float64 else 2.0 ** -45) * terms
    assert np.abs(dw.astype(np.float64) - dwr).max() <= gtol + abs(float(dwr.max())) * out_ulp
    assert np.abs(db.astype(np.float64) - dbr).max() <= gtol + abs(float(dbr.max())) * out_ulp
    # the backward from x: y's rounding (one unit of y's dtype, relative to the largest
    # |y - bias| / |weight|) is what separates them
    yunit = UNIT[dt] * (np.abs(yl) / np.abs(w)).max()
    assert np.abs(dx.astype(np.float64) - dx0).max() <= (
        kern * natural + 4 * natural * yunit * 2 + out_ulp * np.abs(dx0.astype(np.float64)).max())
    assert np.abs(dw.astype(np.float64) - dw0).max() <= gtol + 2 * yunit * np.abs(g).sum() + \
        abs(float(dw0.max())) * out_ulp * 2
    assert np.array_equal(db, db0) or np.abs(db.astype(np.float64) - db0).max() <= gtol


def test_float64_against_autograd():
    torch = pytest.importorskip("torch")
    for layout in ("NCHW", "NHWC"):
        x = _data((6, 4, 5, 3), layout, np.float64, 3)
        w, b = _params(4, np.float64, seed=4)
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout)
        dy = _data((6, 4, 5, 3), layout, np.float64, 5, loc=0.0, scale=1.0)
        dx, dw, db = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b, layout=layout)
        perm = (0, 3, 1, 2) if layout == "NHWC" else (0, 1, 2, 3)
        xt = torch.tensor(np.transpose(x, perm), requires_grad=True)
        wt = torch.tensor(w, requires_grad=True)
        bt = torch.tensor(b, requires_grad=True)
        yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
        yt.backward(torch.tensor(np.transpose(dy, perm)))
        ref_dx = np.transpose(xt.grad.numpy(), np.argsort(perm))
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-10 * np.abs(ref_dx).max())
        np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_weights_near_zero_nan_threads_and_out():
    x = _data((16, 3, 4, 4), "NCHW", np.float64, 6)
    w = np.array([1e-3, -2e-4, 1.5])
    b = np.array([0.2, -0.1, 0.0])
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    dy = _data((16, 3, 4, 4), "NCHW", np.float64, 7, loc=0.0, scale=1.0)
    dx, dw, db = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b)
    dx0, dw0, db0 = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
    # |y - bias| is about |weight| there: xhat keeps its relative accuracy
    np.testing.assert_allclose(dx, dx0, rtol=1e-9, atol=1e-9 * np.abs(dx0).max())
    np.testing.assert_allclose(dw, dw0, rtol=1e-9, atol=1e-9)
    # a NaN in x makes its channel's y NaN: the same channels are NaN in both backwards
    xn = x.copy()
    xn[3, 1, 2, 2] = np.nan
    yn, mn, isn = fastbn.batch_norm_train(xn, w, b)
    a = fastbn.batch_norm_backward_from_output(dy, yn, isn, w, b)
    c = fastbn.batch_norm_backward(dy, xn, mn, isn, w)
    for u, v in zip(a, c):
        assert np.array_equal(np.isnan(u), np.isnan(v))
    # threads, out=, in place
    x32 = _data((32, 8, 9, 9), "NHWC", np.float32, 8)
    w32, b32 = _params(8, np.float32)
    y32, _, i32 = fastbn.batch_norm_train(x32, w32, b32, layout="NHWC")
    g32 = _data((32, 8, 9, 9), "NHWC", np.float32, 9, loc=0.0, scale=1.0)
    r1 = fastbn.batch_norm_backward_from_output(g32, y32, i32, w32, b32, layout="NHWC",
                                                num_threads=1)
    r2 = fastbn.batch_norm_backward_from_output(g32, y32, i32, w32, b32, layout="NHWC",
                                                num_threads=2)
    for u, v in zip(r1, r2):
        assert np.array_equal(u, v)
    out = np.empty_like(g32)
    r3 = fastbn.batch_norm_backward_from_output(g32, y32, i32, w32, b32, layout="NHWC", out=out)
    assert r3[0] is out and np.array_equal(out, r1[0])
    gin = g32.copy()
    fastbn.batch_norm_backward_from_output(gin, y32, i32, w32, b32, layout="NHWC", out=gin)
    assert np.array_equal(gin, r1[0])
    # no weight and no bias: 1 and 0
    y1, _, i1 = fastbn.batch_norm_train(x)
    a = fastbn.batch_norm_backward_from_output(dy, y1, i1)
    c = fastbn.batch_norm_backward(dy, x, *fastbn.batch_norm_train(x)[1:])
    np.testing.assert_allclose(a[0], c[0], rtol=1e-10, atol=1e-12)


def test_non_finite_weights_give_nan_silently():
    """As the backward from x: an infinite or NaN weight, or NaN data, is computed with no
    floating-point warning or error (under np.errstate(all="raise") too)."""
    y = np.array([[1.25e-31], [np.nan]])
    with np.errstate(all="raise"):
        for s, w in ((0.0, np.inf), (np.inf, np.nan), (1.0, 1e-300), (0.0, 1e300)):
            dx, dw, db = fastbn.batch_norm_backward_from_output(
                np.ones_like(y), y, np.array([s], np.float32), np.array([w]),
                np.array([np.nan]))
            assert dx.shape == y.shape


def test_errors_leave_everything_unchanged():
    x = _data((4, 3, 2, 2), "NCHW", np.float32, 10)
    w, b = np.array([1.0, 0.0, 2.0], np.float32), np.zeros(3, np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    dy = np.ones_like(y)
    out = np.full_like(y, 7.0)
    saved = [a.copy() for a in (dy, y, invstd, w, b)]
    cases = [
        (dict(weight=w), ValueError, r"weight\[1\] = 0"),
        (dict(weight=np.ones(4, np.float32)), ValueError, r"weight must have shape \(3,\)"),
        (dict(weight=None, dy=dy[:2]), ValueError, "dy must have the shape of y"),
        (dict(weight=None, dy=dy.astype(np.float64)), TypeError, "dy must have the dtype of y"),
        (dict(weight=None, invstd=invstd[:2]), ValueError, r"invstd must have shape \(3,\)"),
        (dict(weight=None, layout="NCWH"), ValueError, "layout"),
        (dict(weight=None, num_threads=0), ValueError, "num_threads"),
        (dict(weight=None, out=out[:, :2]), ValueError, "out must have shape"),
        (dict(weight=None, out=y), ValueError, "out"),
    ]
    for kw, exc, text in cases:
        args = dict(dy=dy, y=y, invstd=invstd, bias=b, out=out)
        args.update(kw)
        with pytest.raises(exc, match=text):
            fastbn.batch_norm_backward_from_output(**args)
        assert np.all(out == 7.0)
        for a, s in zip((dy, y, invstd, w, b), saved):
            assert np.array_equal(a, s)


@pytest.mark.parametrize("ghost", [None, 3])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_low_memory_layer(layout, ghost):
    x = _data((8, 4, 5, 5), layout, np.float32, 11)
    normal = fastbn.BatchNorm(4, layout=layout, ghost_batch_size=ghost)
    low = fastbn.BatchNorm(4, layout=layout, ghost_batch_size=ghost, memory="low")
    rng = np.random.default_rng(12)
    normal.weight[...] = rng.uniform(0.5, 2, 4)
    normal.bias[...] = rng.normal(size=4)
    low.load_state_dict(normal.state_dict())
    ya, yb = normal(x), low(x)
    assert np.array_equal(ya, yb)
    assert np.array_equal(normal.running_var, low.running_var)
    dy = _data((8, 4, 5, 5), layout, np.float32, 13, loc=0.0, scale=1.0)
    dxa, dxb = normal.backward(dy), low.backward(dy)
    np.testing.assert_allclose(dxb, dxa, rtol=0, atol=2e-5 * np.abs(dxa).max())
    np.testing.assert_allclose(low.weight_grad, normal.weight_grad, rtol=1e-5, atol=1e-4)
    assert np.array_equal(low.bias_grad, normal.bias_grad)
    # the layer holds y, not x: x may be overwritten after the forward
    x2 = x.copy()
    y2 = low(x2)
    x2[...] = np.nan
    assert np.all(np.isfinite(low.backward(dy)))
    del y2


def test_low_memory_layer_errors():
    with pytest.raises(ValueError, match="memory='low' needs activation=None"):
        fastbn.BatchNorm(3, memory="low", activation="relu")
    with pytest.raises(ValueError, match="memory must be 'normal' or 'low'"):
        fastbn.BatchNorm(3, memory="small")
    bn = fastbn.BatchNorm(3, memory="low")
    with pytest.raises(ValueError, match=r"activation must be None or \('leaky_relu', "
                                         r"slope\) with a slope > 0 while memory='low'"):
        bn.activation = "relu"
    assert bn.activation is None
    bn.weight[1] = 0.0
    x = _data((4, 3, 2, 2), "NCHW", np.float32, 14)
    bn(x)
    grads = bn.weight_grad.copy()
    with pytest.raises(ValueError, match="0 in channel 1"):
        bn.backward(np.ones_like(x))
    assert np.array_equal(bn.weight_grad, grads)
    bn.weight[1] = 1.0
    y = bn(x)
    with pytest.raises(TypeError, match="dy must have the dtype"):
        bn.backward(np.ones_like(y, dtype=np.float64))


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, tracemalloc
    import numpy as np, fastbn

    fastbn.set_output_cache(0)      # every array through NumPy's allocator, as traced
    memory = sys.argv[1]
    activation = None if sys.argv[2] == "none" else ("leaky_relu", float(sys.argv[2]))
    rng = np.random.default_rng(0)
    C, N, H = 16, 32, 32
    layers = [fastbn.BatchNorm(C, memory=memory, activation=activation) for _ in range(3)]
    kernels = [rng.normal(size=(C, C)).astype(np.float32) / 4 for _ in range(3)]
    x = rng.normal(size=(N, C, H, H)).astype(np.float32)

    def conv(h, k):                  # a 1x1 convolution: a channel mix
        return np.einsum("dc,nchw->ndhw", k, h, optimize=True).astype(np.float32)

    tracemalloc.start()
    h = x
    keep = []
    for bn, k in zip(layers, kernels):
        a = conv(h, k)               # the convolution's output, BN's input
        keep.append(h)               # what the convolution's own backward keeps: its input
        h = bn(a)                    # memory="low": BN keeps h (y) and a may go
        del a
    loss_grad = np.ones_like(h)
    peak = tracemalloc.get_traced_memory()[1]
    g = loss_grad
    for bn, k, inp in zip(layers[::-1], kernels[::-1], keep[::-1]):
        g = bn.backward(g)
        g = np.einsum("dc,ndhw->nchw", k, g, optimize=True).astype(np.float32)
    tracemalloc.stop()
    print(peak)
""")


@pytest.mark.parametrize("activation", ["none", "0.1"])
def test_low_memory_training_step_holds_less(activation):
    """A 3-layer network's training step (1x1 convolution, BatchNorm, and a leaky ReLU of
    slope 0.1 or none; x is the input): the peak memory of its arrays up to the backward,
    with the usual layers and with memory='low' (tracemalloc in a subprocess)."""
    peaks = {}
    for memory in ("normal", "low"):
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, memory, activation],
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr
        peaks[memory] = int(proc.stdout.split()[-1])
    array = 32 * 16 * 32 * 32 * 4
    # usual: per layer the conv input and BN's input (6 arrays, the first being x) plus
    # the output; low: BN's output serves as the next conv's input (3 + 1)
    assert peaks["low"] <= 0.7 * peaks["normal"], (peaks, array)
