"""Core functional API: fastbn against its NumPy reference and against PyTorch's float64
autograd, the accuracy traps, memory orders, in-place use and thread-count invariance."""
import numpy as np
import pytest

import fastbn
from cases import ORACLE, THREADS, TORCH, ids
from conftest import running_buffers
from fastbn import reference as ref

LAYOUTS = ("NCHW", "NHWC")
DTYPES = (np.float32, np.float64)
# the shared cases (tests/cases.py): odd sizes, every ndim, every kernel branch


def nchw_to(layout, shape):
    """An NCHW shape in the given layout."""
    if layout == "NHWC" and len(shape) > 2:
        return (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return shape


def channels(shape, layout):
    return shape[1] if layout == "NCHW" else shape[-1]


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


def data(shape, layout, dtype, seed=0, offset=0.5):
    rng = np.random.default_rng(seed)
    s = nchw_to(layout, shape)
    C = channels(s, layout)
    x = (rng.standard_normal(s) * 2 + offset).astype(dtype)
    dy = rng.standard_normal(s).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.uniform(-1, 1, C).astype(dtype)
    return x, dy, w, b


def values_per_channel(shape, layout):
    return int(np.prod(shape)) // channels(shape, layout)


# --------------------------------------------------------------------------------------------
# against the NumPy reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", [(c.nchw, c.layout) for c in ORACLE], ids=ids(ORACLE))
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference(shape, dtype, layout, affine):
    x, dy, w, b = data(shape, layout, dtype)
    s = x.shape
    C = channels(s, layout)
    if not affine:
        w = b = None
    where = f"{shape} {np.dtype(dtype).name} {layout} affine={affine}"
    m = values_per_channel(s, layout)
    if m > 1:
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        rm_r, rv_r = rm.copy(), rv.copy()
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm,
                                                  running_var=rv, momentum=0.3)
        y_r, mean_r, invstd_r = ref.batch_norm_train(x, w, b, layout=layout, running_mean=rm_r,
                                                     running_var=rv_r, momentum=0.3)
        np.testing.assert_allclose(y, y_r, **tol(dtype), err_msg=where)
        # statistics are accumulated in double for both dtypes
        stat_tol = dict(rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(mean, mean_r, **stat_tol, err_msg=where)
        np.testing.assert_allclose(invstd, invstd_r, **stat_tol, err_msg=where)
        np.testing.assert_allclose(rm, rm_r, **tol(dtype), err_msg=where)
        np.testing.assert_allclose(rv, rv_r, **tol(dtype), err_msg=where)
        assert y.dtype == x.dtype and mean.dtype == invstd.dtype == np.float64
        for training in (True, False):
            g = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout,
                                           training=training)
            g_r = ref.batch_norm_backward(dy, x, mean, invstd, w, layout=layout,
                                          training=training)
            for a, a_r, name in zip(g, g_r, ("dx", "dweight", "dbias")):
                scale = max(1.0, float(np.abs(a_r).max()))
                np.testing.assert_allclose(a / scale, a_r / scale, **tol(dtype),
                                           err_msg=f"{name} training={training} {where}")
                assert a.dtype == x.dtype
    rm = np.linspace(-1, 1, C)
    rv = np.linspace(0.5, 2, C)
    y = fastbn.batch_norm_infer(x, rm, rv, w, b, layout=layout)
    y_r = ref.batch_norm_infer(x, rm, rv, w, b, layout=layout)
    np.testing.assert_allclose(y, y_r, **tol(dtype), err_msg=where)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("order", ["F", "strided", "transposed", "readonly", "channels-last"])
def test_memory_orders(order, layout):
    """Non-contiguous, Fortran-ordered, read-only and channels-last-strided inputs work, and
    the result keeps the input's memory order where the kernel ran on it directly."""
    x, dy, w, b = data((4, 6, 9, 5), layout, np.float64)
    if order == "F":
        x, dy = np.asfortranarray(x), np.asfortranarray(dy)
    elif order == "strided":
        big = np.repeat(x, 2, axis=-1)
        x, dy = big[..., ::2], np.repeat(dy, 2, axis=-1)[..., ::2]
    elif order == "transposed":
        x = np.ascontiguousarray(np.swapaxes(x, 2, 3)).swapaxes(2, 3)
        dy = np.ascontiguousarray(np.swapaxes(dy, 2, 3)).swapaxes(2, 3)
    elif order == "readonly":
        x.flags.writeable = False
        dy.flags.writeable = False
    elif order == "channels-last":
        # same shape, channel axis moved in memory (PyTorch's channels_last / NCHW-from-NHWC)
        axis = 1 if layout == "NCHW" else 3
        other = 3 if layout == "NCHW" else 1
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, axis, other)), other, axis)
        dy = np.moveaxis(np.ascontiguousarray(np.moveaxis(dy, axis, other)), other, axis)
        assert not x.flags.c_contiguous
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout)
    y_r, mean_r, invstd_r = ref.batch_norm_train(x, w, b, layout=layout)
    np.testing.assert_allclose(y, y_r, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean, mean_r, rtol=1e-12, atol=1e-13)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    dx_r, dw_r, db_r = ref.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    np.testing.assert_allclose(dx, dx_r, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, dw_r, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, db_r, rtol=1e-10, atol=1e-12)
    if order == "channels-last":
        assert y.strides == x.strides and dx.strides == x.strides


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_and_out(layout, dtype):
    x, dy, w, b = data((3, 5, 4, 6), layout, dtype)
    y_r, mean, invstd = ref.batch_norm_train(x, w, b, layout=layout)
    # out= a separate array
    out = np.empty_like(x)
    y, _, _ = fastbn.batch_norm_train(x, w, b, layout=layout, out=out)
    assert y is out
    np.testing.assert_allclose(out, y_r, **tol(dtype))
    # out=x: in place
    xi = x.copy()
    y, _, _ = fastbn.batch_norm_train(xi, w, b, layout=layout, out=xi)
    assert y is xi
    np.testing.assert_allclose(xi, y_r, **tol(dtype))
    # inference in place
    rm, rv = np.full(xi.shape[1 if layout == "NCHW" else -1], 0.25), np.full(
        xi.shape[1 if layout == "NCHW" else -1], 4.0)
    xi = x.copy()
    fastbn.batch_norm_infer(xi, rm, rv, w, b, layout=layout, out=xi)
    np.testing.assert_allclose(xi, ref.batch_norm_infer(x, rm, rv, w, b, layout=layout),
                               **tol(dtype))
    # backward in place over dy
    dx_r = ref.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)[0]
    g = dy.copy()
    dx, _, _ = fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout, out=g)
    assert dx is g
    np.testing.assert_allclose(g, dx_r, **tol(dtype))
    # a non-contiguous out is filled too
    out = np.empty(x.shape[::-1], dtype).T
    fastbn.batch_norm_train(x, w, b, layout=layout, out=out)
    np.testing.assert_allclose(out, y_r, **tol(dtype))


def test_fold_batch_norm():
    rng = np.random.default_rng(1)
    rm, rv, w, b = rng.normal(size=4), rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4)
    scale, shift = fastbn.fold_batch_norm(rm, rv, w, b, eps=1e-3)
    x = rng.normal(size=(5, 4, 3))
    np.testing.assert_allclose(x * scale[:, None] + shift[:, None],
                               ref.batch_norm_infer(x, rm, rv, w, b, eps=1e-3), rtol=1e-12)
    s32, _ = fastbn.fold_batch_norm(rm.astype(np.float32), rv.astype(np.float32))
    assert s32.dtype == np.float32


def test_zero_variance_and_eps_zero():
    """A constant channel with eps=0: invstd is inf and y is NaN (0 * inf), as in PyTorch
    and the reference; with eps > 0 it is exactly `bias`."""
    x = np.ones((4, 2, 3))
    x[:, 1] = np.arange(12).reshape(4, 3)
    y, mean, invstd = fastbn.batch_norm_train(x, eps=0.0)
    assert np.isinf(invstd[0]) and np.isnan(y[:, 0]).all()
    assert np.isfinite(y[:, 1]).all()


# --------------------------------------------------------------------------------------------
# against PyTorch's float64 autograd (acceptance 2 of the core issue)
# --------------------------------------------------------------------------------------------

def torch_bn(x, w, b, layout, training, rm, rv, momentum, dy):
    """y, mean, invstd, dx, dw, db and the running stats from torch, in float64."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xt = torch.tensor(np.moveaxis(x, -1, 1) if layout == "NHWC" else x,
                      dtype=torch.float64, requires_grad=True)
    C = xt.shape[1]
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True) if w is not None else None
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True) if b is not None else None
    rmt = torch.tensor(rm, dtype=torch.float64)
    rvt = torch.tensor(rv, dtype=torch.float64)
    y = F.batch_norm(xt, rmt, rvt, wt, bt, training=training, momentum=momentum, eps=1e-5)
    g = torch.tensor(np.moveaxis(dy, -1, 1) if layout == "NHWC" else dy, dtype=torch.float64)
    y.backward(g)
    red = [0] + list(range(2, xt.ndim))
    xd = xt.detach()
    mean = xd.mean(dim=red) if training else rmt
    var = xd.var(dim=red, unbiased=False) if training else rvt
    invstd = 1 / torch.sqrt(var + 1e-5)

    def back(a):
        a = a.detach().numpy()
        return np.moveaxis(a, 1, -1) if layout == "NHWC" else a

    ones = torch.ones(C, dtype=torch.float64)
    return dict(y=back(y), mean=mean.numpy(), invstd=invstd.numpy(), dx=back(xt.grad),
                dw=(wt.grad if wt is not None else (g * (xd - mean.reshape([1, C] + [1] * (
                    xd.ndim - 2))) * invstd.reshape([1, C] + [1] * (xd.ndim - 2))).sum(
                    dim=red)).numpy(),
                db=(bt.grad if bt is not None else g.sum(dim=red) * ones).numpy(),
                rm=rmt.numpy(), rv=rvt.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", [(c.nchw, c.layout) for c in TORCH], ids=ids(TORCH))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_against_torch(shape, dtype, layout, affine, training):
    x, dy, w, b = data(shape, layout, dtype, seed=3)
    if not affine:
        w = b = None
    C = channels(x.shape, layout)
    rm0 = np.linspace(-0.5, 0.5, C)
    rv0 = np.linspace(0.5, 1.5, C)
    t = torch_bn(x.astype(np.float64), None if w is None else w.astype(np.float64),
                 None if b is None else b.astype(np.float64), layout, training,
                 rm0.copy(), rv0.copy(), 0.1, dy.astype(np.float64))
    rm, rv = rm0.copy(), rv0.copy()
    if training:
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm,
                                                  running_var=rv, momentum=0.1)
    else:
        y = fastbn.batch_norm_infer(x, rm, rv, w, b, layout=layout)
        mean, invstd = rm, 1 / np.sqrt(rv + 1e-5)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout,
                                            training=training)
    f32 = dtype == np.float32
    fwd = dict(rtol=2e-5, atol=2e-5) if f32 else dict(rtol=1e-10, atol=1e-10)
    bwd = dict(rtol=1e-4, atol=1e-4) if f32 else dict(rtol=1e-10, atol=1e-10)
    where = f"{shape} {np.dtype(dtype).name} {layout} affine={affine} training={training}"
    np.testing.assert_allclose(y, t["y"], **fwd, err_msg=where)
    np.testing.assert_allclose(mean, t["mean"], **fwd, err_msg=where)
    np.testing.assert_allclose(invstd, t["invstd"], **fwd, err_msg=where)
    np.testing.assert_allclose(rm, t["rm"], **fwd, err_msg=where)
    np.testing.assert_allclose(rv, t["rv"], **fwd, err_msg=where)
    for a, key in ((dx, "dx"), (dw, "dw"), (db, "db")):
        scale = max(1.0, float(np.abs(t[key]).max()))
        np.testing.assert_allclose(a / scale, t[key] / scale, **bwd, err_msg=f"{key} {where}")


# --------------------------------------------------------------------------------------------
# accuracy on hard data (acceptance 3)
# --------------------------------------------------------------------------------------------

def y64(x, w=None, b=None, layout="NCHW"):
    """The training output computed in float64 from the same float32 inputs."""
    return ref.batch_norm_train(x.astype(np.float64), w, b, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4, 1e5])
def test_float32_accuracy_large_offset(layout, offset):
    rng = np.random.default_rng(7)
    shape = nchw_to(layout, (16, 8, 32, 32))
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    C = channels(shape, layout)
    w = rng.uniform(0.5, 1.5, C)
    b = rng.uniform(-1, 1, C)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout)
    exact, mean64, invstd64 = y64(x, w, b, layout)
    eps32 = np.finfo(np.float32).eps
    err = np.abs(y.astype(np.float64) - exact) / np.maximum(1.0, np.abs(exact))
    assert err.max() <= 8 * eps32, f"max error {err.max() / eps32:.2f} eps at offset {offset}"
    np.testing.assert_allclose(invstd, invstd64, rtol=1e-6)


@pytest.mark.parametrize("buf_dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_running_update_any_buffer(buf_dtype, strided):
    """Contiguous float buffers are updated by the kernel module, others by NumPy: both give
    momentum * batch + (1 - momentum) * running, computed in float64."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 5, 3, 3))
    start_m, start_v = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    bufs = running_buffers((start_m, start_v), buf_dtype, strided)
    _, mean, invstd = fastbn.batch_norm_train(x, running_mean=bufs[0], running_var=bufs[1],
                                              momentum=0.25)
    var = x.var(axis=(0, 2, 3), ddof=1)
    want_m = 0.25 * mean + 0.75 * start_m.astype(buf_dtype).astype(np.float64)
    want_v = 0.25 * var + 0.75 * start_v.astype(buf_dtype).astype(np.float64)
    tol = 1e-6 if buf_dtype == np.float32 else 1e-13
    np.testing.assert_allclose(bufs[0], want_m, rtol=tol)
    np.testing.assert_allclose(bufs[1], want_v, rtol=tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C", [3, 100])
@pytest.mark.parametrize("side", [32, 20])
def test_outlier_first_value_of_every_block(layout, C, side):
    """The statistics sum deviations from each block's first value in one pass and redo a
    block in two passes when that would cancel: with an outlier at the start of every block
    (a 32x32 plane is one block, two 20x20 planes are one block summed run by run; a rows
    tile is 32 rows), float64 results stay within 1e-14 of the reference (with the two-pass
    fallback disabled, NCHW is off by 4.4e-14).
    NHWC rows of 3 and of 100 channels both take the four-rows-per-sweep tiles."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, C, side, side))
    x[:, :, 0, 0] = 1e3
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        x.reshape(-1, C)[::32] = 1e3
    _, mean, invstd = fastbn.batch_norm_train(x, layout=layout)
    _, mean64, invstd64 = ref.batch_norm_train(x, layout=layout)
    np.testing.assert_allclose(mean, mean64, rtol=1e-14, atol=0)
    np.testing.assert_allclose(invstd, invstd64, rtol=1e-14, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 3, 7, 7), (2, 3, 64, 64), (1, 5, 14, 14)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_gradient_sums_within_the_contract(layout, shape, offset):
    """The backward of float32 data keeps the float32 contract (tests/contract.py) whatever
    lanes sum dy (AVX-512 NCHW blocks add four values per lane in float32 before double):
    dbias within
    4 * 2**-23 of sum(|dy|), and dx within 8 float32 ulps of its natural scale
    |weight| * invstd * max(|dy|, rms(dy)), also for dy with a common offset 1000 times
    its spread. The errors are measured against the float64 backward of the same values."""
    shape = nchw_to(layout, shape)
    rng = np.random.default_rng(12)
    axis = 1 if layout == "NCHW" else len(shape) - 1
    red = tuple(i for i in range(len(shape)) if i != axis)
    bc = [1] * len(shape)
    bc[axis] = -1
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    dy = (rng.standard_normal(shape) + offset).astype(np.float32)
    w = rng.uniform(0.5, 2.0, channels(shape, layout)).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_train(x, layout=layout)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    dx_r, dw_r, db_r = ref.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                               mean, invstd, w.astype(np.float64),
                                               layout=layout)
    g = dy.astype(np.float64)
    assert (np.abs(db - db_r) <= 4 * 2.0 ** -23 * np.abs(g).sum(axis=red)).all()
    rms = np.sqrt((g * g).mean(axis=red)).reshape(bc)
    scale = (np.abs(w) * invstd).reshape(bc) * np.maximum(np.abs(g), rms)
    err = np.abs(dx - dx_r)
    assert (err <= 8 * 2.0 ** -23 * scale).all(), (err / scale).max() / 2.0 ** -23


@pytest.mark.parametrize("layout", LAYOUTS)
def test_huge_gradients_do_not_overflow_the_float32_sums(layout):
    """dy of +-3e38, each sign in runs of 64 values (NCHW) or 4 rows (NHWC), as the float32
    lanes add them four at a time: four such values overflow float32, so those sums are
    redone in double, and dbias is exactly the float64 sum, 0."""
    shape = (2, 3, 16, 16)
    x = np.random.default_rng(13).standard_normal(shape).astype(np.float32)
    dy = np.empty(shape, np.float32)
    if layout == "NCHW":
        sign = np.where((np.arange(256) // 64) % 2 == 0, 1, -1).reshape(16, 16)
        dy[:] = sign * np.float32(3e38)
    else:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        dy = dy.transpose(0, 2, 3, 1).copy()
        sign = np.where((np.arange(512) // 4) % 2 == 0, 1, -1)
        dy.reshape(-1, 3)[:] = (sign * np.float32(3e38))[:, None]
    _, mean, invstd = fastbn.batch_norm_train(x, layout=layout)
    _, _, db = fastbn.batch_norm_backward(dy, x, mean, invstd, layout=layout)
    _, _, db_r = ref.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64), mean,
                                         invstd, layout=layout)
    assert (db_r == 0).all()
    assert (db == 0).all(), db


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 5, 9])
def test_rows_a_page_long(dtype, rows):
    """Rows of exactly 4 KiB (and 8 KiB) go one row per sweep in the elementwise passes
    (rows.pxi, _apply_multi_row): the same results as the reference, and 1 and 2 threads
    bit for bit."""
    for C in (4096 // np.dtype(dtype).itemsize, 8192 // np.dtype(dtype).itemsize):
        rng = np.random.default_rng(rows + C)
        x = (rng.standard_normal((rows + 1, C)) * 2 + 1).astype(dtype)
        dy = rng.standard_normal((rows + 1, C)).astype(dtype)
        w = rng.uniform(0.5, 2, C).astype(dtype)
        b = rng.standard_normal(C).astype(dtype)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        out = [fastbn.batch_norm_train(x, w, b, num_threads=t) for t in (1, 2)]
        y_r, mean_r, invstd_r = ref.batch_norm_train(x, w, b)
        np.testing.assert_allclose(out[0][0], y_r, rtol=tol, atol=tol)
        var_r = (1 / invstd_r ** 2 - 1e-5).astype(dtype)
        y_i = fastbn.batch_norm_infer(x, mean_r.astype(dtype), var_r, w, b)
        np.testing.assert_allclose(y_i, y_r, rtol=20 * tol, atol=20 * tol)
        grads = [fastbn.batch_norm_backward(dy, x, out[0][1], out[0][2], w, num_threads=t)
                 for t in (1, 2)]
        dx_r, _, _ = ref.batch_norm_backward(dy, x, out[0][1], out[0][2], w)
        np.testing.assert_allclose(grads[0][0], dx_r, rtol=tol, atol=tol)
        for a, c in zip(out[0] + grads[0], out[1] + grads[1]):
            assert a.tobytes() == c.tobytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_channel_gives_bias(layout):
    shape = nchw_to(layout, (8, 3, 16, 16))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if layout == "NCHW":
        x[:, 1] = 1e7
    else:
        x[..., 1] = 1e7
    b = np.array([0.25, -0.75, 3.0], np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, np.full(3, 2.0, np.float32), b, layout=layout)
    ych = y[:, 1] if layout == "NCHW" else y[..., 1]
    assert mean[1] == 1e7
    assert (ych == np.float32(-0.75)).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_backward_accuracy_offset(layout):
    rng = np.random.default_rng(11)
    shape = nchw_to(layout, (16, 8, 32, 32))
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = channels(shape, layout)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_train(x, w, layout=layout)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    _, mean64, invstd64 = y64(x, layout=layout)
    dx64, dw64, db64 = ref.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                               mean64, invstd64, w.astype(np.float64),
                                               layout=layout)
    for a, e in ((dx, dx64), (dw, dw64), (db, db64)):
        rel = np.abs(a.astype(np.float64) - e).max() / np.abs(e).max()
        assert rel <= 1e-4, rel


# --------------------------------------------------------------------------------------------
# thread-count invariance (acceptance 4)
# --------------------------------------------------------------------------------------------



def run_all(x, dy, w, b, layout, **kw):
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, **kw)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout, **kw)
    yi = fastbn.batch_norm_infer(x, mean, 1 / invstd ** 2, w, b, layout=layout, **kw)
    return y, mean, invstd, dx, dw, db, yi


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", [(c.nchw, c.layout) for c in THREADS],
                         ids=ids(THREADS))
def test_bit_identical_across_threads(shape, dtype, layout):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x, dy, w, b = data(shape, layout, dtype, seed=5, offset=100.0)
    one = run_all(x, dy, w, b, layout, num_threads=1)
    two = run_all(x, dy, w, b, layout, num_threads=2)
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        lim1 = run_all(x, dy, w, b, layout)
    with threadpoolctl.threadpool_limits(2, user_api="openmp"):
        lim2 = run_all(x, dy, w, b, layout)
    for results in (two, lim1, lim2):
        for a, e, name in zip(results, one, ("y", "mean", "invstd", "dx", "dw", "db", "yi")):
            assert np.array_equal(a, e), f"{name} differs across thread counts"


@pytest.mark.parametrize("dtype, shape", [(np.float32, (44, 1000, 7, 7)),
                                          (np.float64, (11, 1000, 7, 7))], ids=str)
def test_planar_inputs_beyond_cache(dtype, shape):
    """A planar reduction that reads more than 8 MiB (CACHED_BYTES) cuts 49-value planes
    into blocks of 8 runs (FAR_RUNS) instead of 20: float32 (44, 1000, 7, 7) in training
    and backward, float64 (11, 1000, 7, 7) in the backward only (which reads dy and x).
    The results match the reference and are the same on 1 and 2 threads."""
    x, dy, w, b = data(shape, "NCHW", dtype, seed=7, offset=100.0)
    one = run_all(x, dy, w, b, "NCHW", num_threads=1)
    two = run_all(x, dy, w, b, "NCHW", num_threads=2)
    names = ("y", "mean", "invstd", "dx", "dw", "db", "yi")
    for a, e, name in zip(two, one, names):
        assert np.array_equal(a, e), f"{name} differs across thread counts"
    y, mean, invstd, dx, dw, db, _ = one
    y_r, mean_r, invstd_r = ref.batch_norm_train(x, w, b)
    np.testing.assert_allclose(y, y_r, **tol(dtype))
    np.testing.assert_allclose(mean, mean_r, rtol=1e-12, atol=0)
    np.testing.assert_allclose(invstd, invstd_r, rtol=1e-12, atol=0)
    for a, a_r, name in zip((dx, dw, db), ref.batch_norm_backward(dy, x, mean, invstd, w),
                            ("dx", "dweight", "dbias")):
        scale = max(1.0, float(np.abs(a_r).max()))
        np.testing.assert_allclose(a / scale, a_r / scale, **tol(dtype), err_msg=name)


def test_threads_api():
    n = fastbn.get_num_threads()
    assert n >= 1
    try:
        fastbn.set_num_threads(1)
        assert fastbn.get_num_threads() == 1
    finally:
        fastbn.set_num_threads(None)
    assert fastbn.get_num_threads() == n
    with pytest.raises(ValueError, match="num_threads"):
        fastbn.set_num_threads(0)


def test_thread_count_follows_the_cpus_the_process_may_use(tmp_path):
    """Without OMP_NUM_THREADS the default team is no larger than the process's affinity
    mask (checked in a fresh process pinned to one CPU, whose OpenMP default alone may be
    larger) and its cgroup CPU quota (v2 cpu.max, v1 cfs quota over period, rounded up;
    no quota, unreadable or malformed files change nothing)."""
    import os
    import subprocess
    import sys
    from fastbn import _threads
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "import fastbn; from fastbn import _threads; "
            "print(fastbn.get_num_threads(), _threads.available_cpus())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == ["1", "1"], out
    env["OMP_NUM_THREADS"] = "3"          # an explicit request is kept
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == ["3", "1"], out
    cpus = len(os.sched_getaffinity(0))
    for files, want in (({"cpu.max": "50000 100000\n"}, 1),
                        ({"cpu.max": "150000 100000\n"}, min(cpus, 2)),
                        ({"cpu.max": "max 100000\n"}, cpus),
                        ({"cpu.max": "garbage\n"}, cpus),
                        ({"cpu/cpu.cfs_quota_us": "100000\n",
                          "cpu/cpu.cfs_period_us": "100000\n"}, 1),
                        ({"cpu/cpu.cfs_quota_us": "-1\n",
                          "cpu/cpu.cfs_period_us": "100000\n"}, cpus),
                        ({}, cpus)):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        assert _threads.available_cpus(str(root)) == want, files


def test_small_inputs_run_on_one_thread():
    """Planar (NCHW) calls use their threads from POLICY's planar threshold on, rows
    (channels-last) calls from its rows threshold; an explicit num_threads is still
    validated."""
    from fastbn import _threads
    planar, rows = _threads.POLICY[:2]
    assert (planar, rows) == (_threads.SERIAL_BELOW_PLANAR, _threads.SERIAL_BELOW_ROWS)
    assert planar <= rows
    for size, is_planar, want in ((planar - 1, True, 1), (planar, True, 2), (planar - 1, False, 1),
                                  (rows - 1, False, 1), (rows, False, 2)):
        got = _threads.effective_threads(2, size, is_planar)
        assert got == (want if _threads.OPENMP else 1), (size, is_planar)
    with pytest.raises(ValueError, match="num_threads"):
        _threads.effective_threads(0, 10, True)
    with pytest.raises(TypeError, match="num_threads"):
        _threads.effective_threads(2.0, 10, True)


def test_thread_policy_in_c_and_python_agree():
    """The lean path reads the thread policy in C (fastbn._support.call_threads): the same
    counts as effective_threads and get_num_threads for every kind of num_threads."""
    from fastbn import _support, _threads
    big = 1 << 40
    _support.end_contention()        # a busy machine may have opened a one-thread window
    assert _support.call_threads(None, big, True, _threads.POLICY, False) == (
        fastbn.get_num_threads())
    assert _support.call_threads(None, big, True, _threads.POLICY) == fastbn.get_num_threads()
    assert _threads.effective_threads(np.int64(3), big, True) == (3 if _threads.OPENMP else 1)
    assert _threads.effective_threads(10 ** 30, big, True) == (
        _threads.MAX_THREADS if _threads.OPENMP else 1)
    assert _support.call_threads(0, big, True, _threads.POLICY) == -1
    assert _support.call_threads(True, big, True, _threads.POLICY) == -1
    with _threads.default_threads(3):
        assert fastbn.get_num_threads() == (3 if _threads.OPENMP else 1)
        _support.end_contention()
        assert _threads.effective_threads(None, big, False) == fastbn.get_num_threads()
        assert _threads.effective_threads(None, 10, False) == 1
    with _threads.serial_below(planar=5, rows=7):
        assert _threads.POLICY[:2] == [5, 7]
        assert _threads.effective_threads(2, 5, True) == (2 if _threads.OPENMP else 1)
        assert _threads.effective_threads(2, 6, False) == 1
    assert _threads.POLICY[:2] == [_threads.SERIAL_BELOW_PLANAR, _threads.SERIAL_BELOW_ROWS]


def test_show_config(capsys):
    fastbn.show_config()
    out = capsys.readouterr().out
    assert "openmp" in out and "cflags" in out and "threads" in out


def test_kernel_variants_agree(kernel_modules):
    """Every build of the kernels this CPU runs (portable, AVX2, AVX-512) matches the
    reference."""
    import importlib
    mods = kernel_modules
    from fastbn import _dispatch
    x, dy, w, b = data((4, 9, 13, 11), "NCHW", np.float32, seed=2)
    y_r, mean_r, invstd_r = ref.batch_norm_train(x, w, b)
    for name in mods:
        with _dispatch.using(importlib.import_module(name)):
            y, mean, invstd = fastbn.batch_norm_train(x, w, b)
            np.testing.assert_allclose(y, y_r, rtol=2e-6, atol=2e-6, err_msg=name)
            dx = fastbn.batch_norm_backward(dy, x, mean, invstd, w)[0]
            np.testing.assert_allclose(
                dx, ref.batch_norm_backward(dy, x, mean, invstd, w)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wanted", ["baseline", "sse2", "neon", "avx2", "avx512", "",
                                    "no-such-isa"])
def test_simd_variant_choice(wanted):
    """FASTBN_SIMD picks the kernel module at import; unset or unknown means the best one
    this CPU runs (an unknown name warns, naming the valid ones), and a variant this CPU
    cannot run falls back to the baseline."""
    import importlib.util
    import os
    import subprocess
    import sys
    from fastbn._support import cpu_has_avx2_fma, cpu_has_avx512

    def built(name):           # without importing it (see test_kernel_variants_agree)
        return importlib.util.find_spec("fastbn." + name) is not None

    best = ("_kernels_avx512" if built("_kernels_avx512") and cpu_has_avx512()
            else "_kernels_avx2" if built("_kernels_avx2") and cpu_has_avx2_fma()
            else "_kernels")
    expected = {"baseline": "_kernels", "sse2": "_kernels", "neon": "_kernels",
                "avx2": ("_kernels_avx2" if built("_kernels_avx2") and cpu_has_avx2_fma()
                         else "_kernels"),
                "avx512": ("_kernels_avx512" if built("_kernels_avx512") and cpu_has_avx512()
                           else "_kernels")}.get(wanted, best)
    env = dict(os.environ, FASTBN_SIMD=wanted)
    run = subprocess.run([sys.executable, "-c",
                          "from fastbn import _config; print(_config.config()['kernels'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == expected
    if wanted == "no-such-isa":
        assert "FASTBN_SIMD='no-such-isa' is not a kernel build" in run.stderr
        assert "avx512, avx2, baseline, sse2, neon" in run.stderr
    else:
        assert "FASTBN_SIMD" not in run.stderr


def test_bandwidth_yardsticks():
    """The read and copy passes behind the speed table's roofline rows."""
    from fastbn._dispatch import kernels as k
    x = np.random.default_rng(4).random(300_007).astype(np.float32)
    y = np.empty_like(x)
    for n in (1, 2):
        assert k.read_pass(x, n) == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-5)
        y[:] = 0
        k.copy_pass(x, y, n)
        assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="float32"):
        k.read_pass(x.astype(np.float64), 1)
    with pytest.raises(ValueError, match="float32"):
        k.copy_pass(x, y[:-1], 1)
