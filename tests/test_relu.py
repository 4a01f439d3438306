"""The fused residual add and ReLU (fastbn.batch_norm_relu_*): against the NumPy reference and
PyTorch's float64 autograd, bit for bit against the unfused functions followed by NumPy's
maximum, running statistics bit-identical to batch_norm_train's, out= in place of x or of the
residual, memory orders, NaN, thread counts, streaming stores, 16-bit data and the layers."""
import numpy as np
import pytest

import fastbn
from cases import CASES, ORACLE, THREADS, TORCH, ids
from fastbn import _memory
from fastbn import reference as ref

DTYPES = (np.float32, np.float64)


def _data(case, dtype, seed=0, offset=0.5):
    """x, residual, dy, weight, bias, C; the residual is of bn(x)'s size, so that about
    half of the pre-activations are negative."""
    rng = np.random.default_rng(seed)
    s = case.shape
    C = case.nchw[1]
    x = (rng.standard_normal(s) * 2 + offset).astype(dtype)
    res = rng.standard_normal(s).astype(dtype)
    dy = rng.standard_normal(s).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.uniform(-1, 1, C).astype(dtype)
    return x, res, dy, w, b, C


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


def _scaled_close(a, e, dtype, what):
    scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
    np.testing.assert_allclose(a / scale, e / scale, **_tol(dtype), err_msg=what)


# --------------------------------------------------------------------------------------------
# the definition: the unfused functions, then np.maximum -- bit for bit
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ORACLE, ids=ids(ORACLE))
def test_same_bits_as_unfused(case, dtype):
    x, res, dy, w, b, C = _data(case, dtype)
    L = case.layout
    for residual in (None, res):
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        rm0, rv0 = rm.copy(), rv.copy()
        y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=residual, layout=L,
                                                       running_mean=rm, running_var=rv,
                                                       momentum=0.3)
        y0, mean0, invstd0 = fastbn.batch_norm_train(x, w, b, layout=L, running_mean=rm0,
                                                     running_var=rv0, momentum=0.3)
        want = np.maximum(y0 if residual is None else y0 + residual, 0)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, want)
        for a, e in ((mean, mean0), (invstd, invstd0), (rm, rm0), (rv, rv0)):
            assert a.tobytes() == e.tobytes()
        yi = fastbn.batch_norm_relu_infer(x, rm, rv, w, b, residual=residual, layout=L)
        yi0 = fastbn.batch_norm_infer(x, rm, rv, w, b, layout=L)
        np.testing.assert_array_equal(yi, np.maximum(yi0 if residual is None else yi0 + residual,
                                                     0))
        g = np.where(y > 0, dy, 0).astype(dtype)
        for training in (True, False):
            dres = np.full_like(x, np.nan)
            got = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, training=training,
                                                  layout=L, dresidual=dres)
            unfused = fastbn.batch_norm_backward(g, x, mean, invstd, w, training=training,
                                                 layout=L)
            for a, e, name in zip(got, unfused, ("dx", "dweight", "dbias")):
                assert a.dtype == e.dtype and a.tobytes() == e.tobytes(), \
                    f"{name} training={training}"
            np.testing.assert_array_equal(dres, g)


# --------------------------------------------------------------------------------------------
# against the NumPy reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ORACLE, ids=ids(ORACLE))
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference(case, dtype, affine):
    x, res, dy, w, b, C = _data(case, dtype, seed=1)
    if not affine:
        w = b = None
    L = case.layout
    where = f"{case} {np.dtype(dtype).name} affine={affine}"
    for residual in (None, res):
        y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=residual, layout=L)
        yr, meanr, invstdr = ref.batch_norm_relu_train(x, w, b, residual=residual, layout=L)
        _scaled_close(y, yr, dtype, f"y {where}")
        np.testing.assert_allclose(mean, meanr, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(invstd, invstdr, rtol=1e-12, atol=1e-12)
        rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
        yi = fastbn.batch_norm_relu_infer(x, rm, rv, w, b, residual=residual, layout=L)
        _scaled_close(yi, ref.batch_norm_relu_infer(x, rm, rv, w, b, residual=residual,
                                                    layout=L), dtype, f"infer {where}")
        for training in (True, False):
            dres, dres_r = np.empty_like(x), np.empty_like(x)
            got = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, training=training,
                                                  layout=L, dresidual=dres)
            want = ref.batch_norm_relu_backward(dy, y, x, mean, invstd, w, training=training,
                                                layout=L, dresidual=dres_r)
            for a, e, name in zip(got, want, ("dx", "dweight", "dbias")):
                assert a.dtype == x.dtype
                _scaled_close(a, e, dtype, f"{name} training={training} {where}")
            np.testing.assert_array_equal(dres, dres_r)


# --------------------------------------------------------------------------------------------
# against PyTorch's float64 autograd of relu(batch_norm(x) + residual)
# --------------------------------------------------------------------------------------------

def _to_torch(a, layout, torch, grad=False):
    a = np.moveaxis(a, -1, 1) if layout == "NHWC" and a.ndim > 2 else a
    return torch.tensor(np.ascontiguousarray(a, dtype=np.float64), requires_grad=grad)


def _from_torch(t, layout):
    a = t.detach().numpy()
    return np.moveaxis(a, 1, -1) if layout == "NHWC" and a.ndim > 2 else a


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TORCH, ids=ids(TORCH))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_against_torch_autograd(case, dtype, training, with_residual):
    torch = pytest.importorskip("torch")
    x, res, dy, w, b, C = _data(case, dtype, seed=3)
    L = case.layout
    residual = res if with_residual else None
    rm0, rv0 = np.linspace(-0.5, 0.5, C), np.linspace(0.5, 1.5, C)
    rm, rv = rm0.copy(), rv0.copy()
    if training:
        y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=residual, layout=L,
                                                       running_mean=rm, running_var=rv)
    else:
        y = fastbn.batch_norm_relu_infer(x, rm, rv, w, b, residual=residual, layout=L)
        mean, invstd = rm, 1 / np.sqrt(rv + 1e-5)
    dres = np.empty_like(x)
    dx, dw, db = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, training=training,
                                                 layout=L, dresidual=dres)

    xt = _to_torch(x, L, torch, grad=True)
    rt = _to_torch(res, L, torch, grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    rmt, rvt = torch.tensor(rm0), torch.tensor(rv0)
    z = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training=training, momentum=0.1,
                                       eps=1e-5)
    if with_residual:
        z = z + rt
    yt = torch.relu(z)
    # the backward mask is fastbn's y > 0 (where z is within rounding of 0 the two may differ)
    mask = _to_torch((y > 0).astype(np.float64), L, torch)
    z.backward(_to_torch(dy, L, torch) * mask)
    f32 = dtype == np.float32
    fwd = dict(rtol=2e-5, atol=2e-5) if f32 else dict(rtol=1e-10, atol=1e-10)
    bwd = dict(rtol=1e-4, atol=1e-4) if f32 else dict(rtol=1e-10, atol=1e-10)
    where = f"{case} {np.dtype(dtype).name} training={training} residual={with_residual}"
    np.testing.assert_allclose(y, _from_torch(yt, L), **fwd, err_msg=f"y {where}")
    np.testing.assert_allclose(rm, rmt.numpy(), **fwd, err_msg=where)
    np.testing.assert_allclose(rv, rvt.numpy(), **fwd, err_msg=where)
    for a, t, name in ((dx, xt.grad, "dx"), (dw, wt.grad, "dweight"), (db, bt.grad, "dbias")):
        e = _from_torch(t, L)
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(a / scale, e / scale, **bwd, err_msg=f"{name} {where}")
    if with_residual:
        np.testing.assert_allclose(dres, _from_torch(rt.grad, L), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# out=, memory orders, NaN, threads, streaming stores
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_out_may_be_x_or_the_residual(layout, dtype):
    case = [c for c in CASES if c.nchw == (3, 40, 17, 17) and c.layout == layout][0]
    x, res, dy, w, b, C = _data(case, dtype, seed=4)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout)
    yi = fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2, w, b, residual=res,
                                      layout=layout)
    for target in ("x", "residual"):
        xc, rc = x.copy(), res.copy()
        out = xc if target == "x" else rc
        got = fastbn.batch_norm_relu_train(xc, w, b, residual=rc, layout=layout, out=out)[0]
        assert got is out
        np.testing.assert_array_equal(out, y)
        xc, rc = x.copy(), res.copy()
        out = xc if target == "x" else rc
        assert fastbn.batch_norm_relu_infer(xc, mean, 1 / invstd ** 2, w, b, residual=rc,
                                            layout=layout, out=out) is out
        np.testing.assert_array_equal(out, yi)
    # the backward in place of dy, with the residual's gradient beside it
    want = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout)
    g, dres = dy.copy(), np.empty_like(dy)
    dx, dw, db = fastbn.batch_norm_relu_backward(g, y, x, mean, invstd, w, layout=layout,
                                                 out=g, dresidual=dres)
    assert dx is g
    np.testing.assert_array_equal(dx, want[0])
    np.testing.assert_array_equal(dres, np.where(y > 0, dy, 0))
    np.testing.assert_array_equal(dw, want[1])


def _orders(a, kind):
    """a's values in another memory order."""
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if kind == "readonly":
        r = a.copy()
        r.flags.writeable = False
        return r
    return np.ascontiguousarray(a)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("kind", ["F", "strided", "readonly"])
def test_residual_y_and_outputs_in_any_memory_order(layout, kind):
    case = [c for c in CASES if c.nchw == (3, 5, 20, 20) and c.layout == layout][0]
    x, res, dy, w, b, C = _data(case, np.float64, seed=5)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout)
    y2 = fastbn.batch_norm_relu_train(x, w, b, residual=_orders(res, kind), layout=layout)[0]
    np.testing.assert_array_equal(y2, y)
    yi = fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2, residual=res, layout=layout)
    yi2 = fastbn.batch_norm_relu_infer(_orders(x, kind), mean, 1 / invstd ** 2,
                                       residual=_orders(res, kind), layout=layout)
    np.testing.assert_array_equal(yi2, yi)
    dres = np.empty_like(x)
    want = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                           dresidual=dres)
    if kind != "readonly":
        dres2 = _orders(np.zeros_like(x), kind)
        out = _orders(np.zeros_like(x), kind)
    else:
        dres2, out = np.zeros_like(x), None
    got = fastbn.batch_norm_relu_backward(dy, _orders(y, kind), x, mean, invstd, w,
                                          layout=layout, dresidual=dres2, out=out)
    for a, e in zip(got, want):
        np.testing.assert_array_equal(a, e)
    np.testing.assert_array_equal(dres2, dres)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_nan_forward_and_masks_to_zero_backward(layout, dtype):
    case = [c for c in CASES if c.nchw == (4, 3, 5, 7) and c.layout == layout][0]
    x, res, dy, w, b, C = _data(case, dtype, seed=6)
    axis = 1 if layout == "NCHW" else x.ndim - 1
    # training: a NaN in channel 0 makes its statistics, so all its y, NaN
    xn = x.copy()
    xn[(0,) * x.ndim] = np.nan
    y, mean, invstd = fastbn.batch_norm_relu_train(xn, w, b, layout=layout)
    assert np.isnan(np.take(y, 0, axis=axis)).all()
    assert not np.isnan(np.take(y, [1, 2], axis=axis)).any()
    # inference: NaN where x or the residual is NaN, nowhere else (not the ReLU's 0)
    rn = res.copy()
    rn[(1,) * x.ndim] = np.nan
    yi = fastbn.batch_norm_relu_infer(xn, np.zeros(C), np.ones(C), w, b, residual=rn,
                                      layout=layout)
    want_nan = np.isnan(xn) | np.isnan(rn)
    np.testing.assert_array_equal(np.isnan(yi), want_nan)
    # the backward: y NaN counts as not positive: its dy is masked to 0
    y_clean, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, layout=layout)
    y_nan = y_clean.copy()
    y_nan[want_nan] = np.nan
    dres = np.empty_like(x)
    dx, dw, db = fastbn.batch_norm_relu_backward(dy, y_nan, x, mean, invstd, w, layout=layout,
                                                 dresidual=dres)
    g = np.where(y_nan > 0, dy, 0).astype(dtype)
    assert (dres[want_nan] == 0).all()
    np.testing.assert_array_equal(dres, g)
    for a, e in zip((dx, dw, db), fastbn.batch_norm_backward(g, x, mean, invstd, w,
                                                             layout=layout)):
        np.testing.assert_array_equal(a, e)
    assert np.isfinite(dx).all()


def _run_all(x, res, dy, w, b, layout, **kw):
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout, **kw)
    yi = fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2, w, b, residual=res,
                                      layout=layout, **kw)
    dres = np.empty_like(x)
    grads = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=layout,
                                            dresidual=dres, **kw)
    return (y, mean, invstd, yi, dres) + tuple(grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", THREADS, ids=ids(THREADS))
def test_bit_identical_across_threads(case, dtype):
    x, res, dy, w, b, C = _data(case, dtype, seed=7, offset=100.0)
    one = _run_all(x, res, dy, w, b, case.layout, num_threads=1)
    for nt in (2, 3):
        for a, e in zip(_run_all(x, res, dy, w, b, case.layout, num_threads=nt), one):
            assert a.tobytes() == e.tobytes(), f"differs on {nt} threads"


STREAM_CASES = [c for c in CASES if np.prod(c.nchw) >= 2000]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", STREAM_CASES, ids=ids(STREAM_CASES))
def test_streaming_stores_give_the_same_bits(case, dtype, monkeypatch):
    x, res, dy, w, b, C = _data(case, dtype, seed=8, offset=2.0)
    L = case.layout
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=L)

    def run():
        o = [np.empty_like(x) for _ in range(3)]
        fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=L, out=o[0])
        fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2, w, b, residual=res, layout=L,
                                     out=o[1])
        dres = np.empty_like(x)
        fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=L, out=o[2],
                                        dresidual=dres)
        return o + [dres]

    plain = run()
    monkeypatch.setattr(_memory, "STREAM_ABOVE", 0)
    for a, e, name in zip(run(), plain, ("y", "infer", "dx", "dresidual")):
        assert a.tobytes() == e.tobytes(), f"{name} differs with streaming stores"


def test_empty_and_single_value_batches():
    x = np.zeros((0, 3, 4), np.float32)
    assert fastbn.batch_norm_relu_infer(x, np.zeros(3), np.ones(3), residual=x).shape == x.shape
    dres = np.empty_like(x)
    dx, dw, db = fastbn.batch_norm_relu_backward(x, x, x, np.zeros(3), np.ones(3),
                                                 dresidual=dres)
    assert dx.shape == x.shape and (dw == 0).all() and (db == 0).all()
    x1 = np.array([[-1.0, 2.0]])
    np.testing.assert_array_equal(
        fastbn.batch_norm_relu_infer(x1, np.zeros(2), np.ones(2), eps=0.0), [[0.0, 2.0]])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm_relu_train(x1)


# --------------------------------------------------------------------------------------------
# 16-bit data
# --------------------------------------------------------------------------------------------

HALF_CASES = [c for c in CASES if np.prod(c.nchw) <= 100_000]


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", HALF_CASES, ids=ids(HALF_CASES))
def test_half_precision_is_faithful(case, dt):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from test_half import assert_faithful
    dt = np.dtype(ml_dtypes.bfloat16 if dt == "bfloat16" else np.float16)
    x, res, dy, _, _, C = _data(case, np.float64, seed=9, offset=3.0)
    x, res, dy = x.astype(dt), res.astype(dt), dy.astype(dt)
    w = np.linspace(0.5, 1.5, C).astype(np.float32)
    b = np.linspace(-1, 1, C).astype(np.float32)
    L = case.layout
    x64, r64, g64 = (a.astype(np.float64) for a in (x, res, dy))
    for residual, r in ((None, None), (res, r64)):
        y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=residual, layout=L)
        yr, meanr, _ = ref.batch_norm_relu_train(x64, w, b, residual=r, layout=L)
        assert y.dtype == dt
        # the residual is added to the unrounded normalized value: one rounding in all
        assert_faithful(y, yr, dt, f"y residual={residual is not None}")
        yi = fastbn.batch_norm_relu_infer(x, mean, 1 / invstd ** 2, w, b, residual=residual,
                                          layout=L)
        assert_faithful(yi, ref.batch_norm_relu_infer(x64, mean, 1 / invstd ** 2, w, b,
                                                      residual=r, layout=L), dt, "infer")
        for training in (True, False):
            dres = np.empty_like(x)
            dx, dw, db = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=L,
                                                         training=training, dresidual=dres)
            dxr, dwr, dbr = ref.batch_norm_relu_backward(g64, y.astype(np.float64), x64, mean,
                                                         invstd, w, layout=L, training=training)
            assert dx.dtype == dres.dtype == dt and dw.dtype == db.dtype == np.float32
            assert_faithful(dx, dxr, dt, f"dx training={training}")
            np.testing.assert_allclose(dw, dwr, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(db, dbr, rtol=2e-5, atol=2e-5)
            np.testing.assert_array_equal(dres, np.where(y > 0, dy, 0).astype(dt))


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_half_precision_in_place(dt, layout):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = np.dtype(ml_dtypes.bfloat16 if dt == "bfloat16" else np.float16)
    case = [c for c in CASES if c.nchw == (2, 70, 3, 300) and c.layout == layout][0]
    x, res, _, _, _, C = _data(case, np.float64, seed=10)
    x, res = x.astype(dt), res.astype(dt)
    y = fastbn.batch_norm_relu_train(x, residual=res, layout=layout)[0]
    yi = fastbn.batch_norm_relu_infer(x, np.zeros(C), np.ones(C), residual=res, layout=layout)
    for target in ("x", "residual"):
        xc, rc = x.copy(), res.copy()
        out = xc if target == "x" else rc
        fastbn.batch_norm_relu_train(xc, residual=rc, layout=layout, out=out)
        np.testing.assert_array_equal(out.view(np.uint16), y.view(np.uint16))
        xc, rc = x.copy(), res.copy()
        out = xc if target == "x" else rc
        fastbn.batch_norm_relu_infer(xc, np.zeros(C), np.ones(C), residual=rc, layout=layout,
                                     out=out)
        np.testing.assert_array_equal(out.view(np.uint16), yi.view(np.uint16))


def test_kernel_variants_agree(kernel_modules):
    """Every build of the kernels this CPU runs (portable, AVX2, AVX-512) gives the unfused
    bits, in the planar, rows and wide-rows kernels, with out= the residual itself."""
    import importlib
    from fastbn import _dispatch
    mods = kernel_modules
    picked = [c for c in CASES if c.nchw in ((3, 40, 17, 17), (2, 1100, 4, 4), (9000, 17))]
    for name in mods:
        with _dispatch.using(importlib.import_module(name)):
            for case in picked:
                x, res, dy, w, b, C = _data(case, np.float32, seed=11)
                L = case.layout
                y0, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=L)
                rc = res.copy()
                y = fastbn.batch_norm_relu_train(x, w, b, residual=rc, layout=L, out=rc)[0]
                np.testing.assert_array_equal(y, np.maximum(y0 + res, 0), err_msg=name)
                dres = np.empty_like(x)
                got = fastbn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, layout=L,
                                                      dresidual=dres)
                g = np.where(y > 0, dy, 0).astype(x.dtype)
                want = fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=L)
                for a, e in zip(got, want):
                    np.testing.assert_array_equal(a, e, err_msg=f"{name} {case}")
                np.testing.assert_array_equal(dres, g)


BITS_CASES = [("NHWC", (1200, 600)), ("NHWC", (40, 7, 5, 611)), ("NHWC", (400, 2051)),
              ("NHWC", (72, 9, 9, 129)), ("NCHW", (8, 24, 112, 112)),
              ("NCHW", (16, 3, 130, 131)), ("NCHW", (4, 5, 300, 301)),
              ("NCHW", (96, 40, 13, 15))]


@pytest.mark.parametrize("layout, shape", BITS_CASES, ids=str)
def test_mask_bits_path_gives_the_unfused_bits(layout, shape, monkeypatch, kernel_modules):
    """float32 data beyond the caches: the backward keeps y > 0 as bits between its passes
    (relu_mask_bits) and reads them in its own vector dx loops; every build, 1 and 2
    threads, with and without dresidual and streaming stores, NaN in y, long planes cut in
    pieces, short planes in runs, a channel team (C = 3), channels-last C past the stage
    (2051) and not a multiple of 16 give the unfused bits."""
    import importlib
    from fastbn import _dispatch
    mods = kernel_modules
    rng = np.random.default_rng(12)
    C = shape[-1] if layout == "NHWC" else shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    res = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, w, b, residual=res, layout=layout)
    y.reshape(-1)[::997] = np.nan
    g = np.where(y > 0, dy, 0).astype(np.float32)
    if layout == "NHWC":
        view, N, S = 1, int(np.prod(shape[:-1])), 1
    else:
        view, N, S = 0, shape[0], int(np.prod(shape[2:]))
    for name in mods:
        with _dispatch.using(importlib.import_module(name)) as k:
            for nt in (1, 2):
                assert k.relu_mask_bits(view, N, C, S, 4, True, nt) == \
                    (name != "fastbn._kernels")
                want = fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout,
                                                  num_threads=nt)
                for stream_above in (None, 0):
                    if stream_above is not None:
                        monkeypatch.setattr(_memory, "STREAM_ABOVE", stream_above)
                    for with_dres in (False, True):
                        dres = np.empty_like(x) if with_dres else None
                        got = fastbn.batch_norm_relu_backward(
                            dy, y, x, mean, invstd, w, layout=layout, out=np.empty_like(x),
                            dresidual=dres, num_threads=nt)
                        where = f"{name} {nt} threads stream={stream_above} dres={with_dres}"
                        for a, e in zip(got, want):
                            assert a.tobytes() == e.tobytes(), where
                        if with_dres:
                            assert dres.tobytes() == g.tobytes(), where
                    monkeypatch.undo()


# --------------------------------------------------------------------------------------------
# the layers: activation="relu"
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(8, 5), (4, 6, 7), (4, 6, 5, 5), (2, 3, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("activation", ["relu", ("leaky_relu", 0.2)], ids=str)
def test_batchnorm_layer_matches_torch(shape, layout, with_residual, activation):
    """Three training steps and an eval step of BatchNorm(activation="relu", or a leaky
    ReLU with signed weights) against torch's BatchNorm then relu(. + residual) (or
    leaky_relu): y, dx, the residual's gradient, the parameter gradients and the
    state_dict."""
    torch = pytest.importorskip("torch")
    from test_layers import assert_close, assert_state, from_layout, to_layout, torch_bn
    C = shape[1]
    bn = fastbn.BatchNorm(C, layout=layout, dtype=np.float64, activation=activation)
    tbn = torch_bn(len(shape), C)
    rng = np.random.default_rng(12)
    w, b = rng.uniform(0.5, 1.5, C), rng.uniform(-1, 1, C)
    if activation == "relu":
        act = torch.relu
    else:
        w = w * rng.choice([-1, 1], C)
        act = lambda z: torch.nn.functional.leaky_relu(z, activation[1])   # noqa: E731
    bn.weight[...], bn.bias[...] = w, b
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(w))
        tbn.bias.copy_(torch.from_numpy(b))
    for step in range(4):
        if step == 3:
            bn.eval()
            tbn.eval()
        x, res, dy = (rng.normal(size=shape) for _ in range(3))
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        rt = torch.from_numpy(res.copy()).requires_grad_(True)
        yt = act(tbn(xt) + (rt if with_residual else 0))
        yt.backward(torch.from_numpy(dy.copy()))
        args = (to_layout(x, layout),) + ((to_layout(res, layout),) if with_residual else ())
        y = bn(*args)
        got = bn.backward(to_layout(dy, layout))
        dx, dres = got if with_residual else (got, None)
        what = f"step {step}"
        assert_close(from_layout(y, layout), yt.detach().numpy(), 1e-10, f"y {what}")
        assert_close(from_layout(dx, layout), xt.grad.numpy(), 1e-9, f"dx {what}")
        if with_residual:
            assert_close(from_layout(dres, layout), rt.grad.numpy(), 0, f"dres {what}")
        assert_close(bn.weight_grad, tbn.weight.grad.numpy(), 1e-9, f"dweight {what}")
        assert_close(bn.bias_grad, tbn.bias.grad.numpy(), 1e-9, f"dbias {what}")
        assert_state(bn, tbn, 1e-10, what)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_use_the_fused_functions(layout, dtype):
    """BatchNorm and BatchRenorm with activation="relu": the bits of the functional calls,
    in training and eval, with and without a residual; the state keys are unchanged."""
    shape = (6, 5, 4, 3) if layout == "NCHW" else (6, 4, 3, 5)
    rng = np.random.default_rng(13)
    x, res, dy = (rng.normal(1, 2, shape).astype(dtype) for _ in range(3))
    for cls in (fastbn.BatchNorm, fastbn.BatchRenorm):
        plain = cls(5, layout=layout, dtype=dtype)
        fused = cls(5, layout=layout, dtype=dtype, activation="relu")
        assert sorted(fused.state_dict()) == sorted(plain.state_dict())
        for mode in ("train", "eval"):
            getattr(plain, mode)()
            getattr(fused, mode)()
            for residual in (None, res):          # one forward of each layer per round
                y0 = plain(x)
                y = fused(x) if residual is None else fused(x, residual)
                want = np.maximum(y0 if residual is None else y0 + residual, 0)
                np.testing.assert_array_equal(y, want, err_msg=f"{cls.__name__} {mode}")
                got = fused.backward(dy)
                g = np.where(y > 0, dy, 0).astype(dtype)
                if residual is not None:
                    got, dres = got
                    np.testing.assert_array_equal(dres, g)
                np.testing.assert_array_equal(got, plain.backward(g))
        for k, v in plain.state_dict().items():
            np.testing.assert_array_equal(fused.state_dict()[k], v)
        np.testing.assert_array_equal(fused.weight_grad, plain.weight_grad)
        np.testing.assert_array_equal(fused.bias_grad, plain.bias_grad)


def test_layer_renorm_matches_reference():
    rng = np.random.default_rng(14)
    x, res, dy = (rng.normal(1, 2, (8, 3, 5, 5)) for _ in range(3))
    brn = fastbn.BatchRenorm(3, rmax=1.5, dmax=0.5, dtype=np.float64, activation="relu")
    rm, rs = brn.running_mean.copy(), brn.running_std.copy()
    y = brn(x, res)
    dx, dres = brn.backward(dy)
    z, mean, std, r, d = ref.batch_renorm_train(x, None, None, rm, rs, rmax=1.5, dmax=0.5)
    yr = np.maximum(z + res, 0)
    np.testing.assert_allclose(y, yr, rtol=1e-12, atol=1e-12)
    g = np.where(y > 0, dy, 0)
    dxr, dwr, dbr = ref.batch_renorm_backward(g, x, mean, std, r, d)
    np.testing.assert_allclose(dx, dxr, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(dres, g)
    np.testing.assert_allclose(brn.weight_grad, dwr, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(brn.bias_grad, dbr, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(brn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(brn.running_std, rs, rtol=1e-12)


@pytest.mark.parametrize("cls", [fastbn.BatchNorm, fastbn.BatchRenorm])
def test_layer_activation_and_residual_errors(cls):
    from conftest import Snapshot
    for bad in ("ReLU", "gelu", "", 1, True):
        with pytest.raises(ValueError, match=r"activation must be None, 'relu' or "
                                             r"\('leaky_relu', slope\)"):
            cls(3, activation=bad)
    plain = cls(3, dtype=np.float64)
    x = np.random.default_rng(15).normal(size=(4, 3, 5))
    snap = Snapshot(x, plain.state_dict())
    state = plain.state_dict()
    with pytest.raises(ValueError, match="residual needs an activation"):
        plain(x, np.zeros_like(x))
    fused = cls(3, dtype=np.float64, activation="relu")
    for residual, exc, msg in ((np.zeros((4, 3, 6)), ValueError, "residual must have the shape"),
                               (np.zeros((4, 3, 5), np.float32), TypeError,
                                "residual must have the dtype"),
                               ("abc", TypeError, "residual")):
        with pytest.raises(exc, match=msg):
            fused(x, residual)
        assert fused.num_batches_tracked == 0
        for k, v in fused.state_dict().items():
            np.testing.assert_array_equal(v, cls(3, dtype=np.float64).state_dict()[k])
    for k, v in plain.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    snap.assert_unchanged()
    with pytest.raises(ValueError, match="activation"):
        fused.activation = "tanh"
    assert fused.activation == "relu"
    fused.activation = None
    np.testing.assert_array_equal(fused(x), plain(x))


# --------------------------------------------------------------------------------------------
# the layers keep the forward's mask as bits (float32 data, AVX2 and AVX-512 builds)
# --------------------------------------------------------------------------------------------

KEPT_CASES = [("NCHW", (4, 6, 40, 41)),        # planes cut in pieces (S > BLOCK)
              ("NCHW", (3, 5, 700)),           # one run per block (BLOCK / 2 < S <= BLOCK)
              ("NCHW", (1, 7, 9, 11)),         # N = 1: one run per block however small
              ("NCHW", (2, 3, 2100)),          # a channel team (C < 4 * threads)
              ("NCHW", (5, 4, 3, 3)),          # several short runs per block
              ("NCHW", (40, 9, 7, 7)),         # several short runs, a last block short
              ("NCHW", (6, 5, 400)),           # two long runs per block
              ("NHWC", (300, 70)),             # rows, C not a multiple of 8
              ("NHWC", (9, 7, 5, 33)),         # rows, C past a 32-bit word
              ("NHWC", (60, 2051)),            # rows past the stage (STAGE = 1024)
              ("NHWC", (40, 96)),              # one chunk of rows: threads split channels
              ("NHWC", (3, 4, 4, 1))]          # C = 1


def _planar_dims(layout, shape):
    if layout == "NHWC" or len(shape) == 2:
        return 1, int(np.prod(shape[:-1])), shape[-1], 1
    return 0, shape[0], shape[1], int(np.prod(shape[2:]))


@pytest.mark.parametrize("layout, shape", KEPT_CASES, ids=str)
def test_relu_layer_keeps_mask_bits_not_y(layout, shape, monkeypatch, kernel_modules):
    """BatchNorm(activation="relu") in training keeps y > 0 as bits (kept_bits_size bytes,
    1 bit per value) where the kernels read them, and then holds no reference to y; its
    backward gives the bits of batch_norm_relu_backward with y, for every build, 1 and 2
    threads, with and without a residual (a NaN in it: masked to 0) and streaming stores.
    The portable build (no vector loops for the bits) keeps y."""
    import gc
    import importlib
    import weakref
    from fastbn import _dispatch
    rng = np.random.default_rng(31)
    C = shape[-1] if layout == "NHWC" else shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    res = rng.standard_normal(shape).astype(np.float32)
    res.reshape(-1)[::53] = np.nan
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    view, N, C_, S = _planar_dims(layout, shape)
    for name in kernel_modules:
        with _dispatch.using(importlib.import_module(name)) as k:
            size = k.kept_bits_size(view, N, C_, S, 4)
            assert (size > 0) == (name != "fastbn._kernels"), name
            if size:
                assert size >= N * C_ * S // 8
            for nt in (1, 2):
                for stream_above in (None, 0):
                    if stream_above is not None:
                        monkeypatch.setattr(_memory, "STREAM_ABOVE", stream_above)
                    for r in (None, res):
                        where = f"{name} {nt} threads stream={stream_above} res={r is not None}"
                        bn = fastbn.BatchNorm(C, layout=layout, activation="relu")
                        bn.weight[...], bn.bias[...] = w, b
                        with fastbn._threads.default_threads(nt):
                            y = bn(x) if r is None else bn(x, r)
                            got = bn.backward(dy)
                        yf, mean, invstd = fastbn.batch_norm_relu_train(
                            x, w, b, residual=r, layout=layout, num_threads=nt)
                        assert y.tobytes() == yf.tobytes(), where
                        dres = None if r is None else np.empty_like(x)
                        want = fastbn.batch_norm_relu_backward(
                            dy, yf, x, mean, invstd, w, layout=layout, dresidual=dres,
                            num_threads=nt)
                        if r is not None:
                            got, got_dres = got
                            assert got_dres.tobytes() == dres.tobytes(), where
                        assert got.tobytes() == want[0].tobytes(), where
                        assert bn.weight_grad.tobytes() == want[1].tobytes(), where
                        assert bn.bias_grad.tobytes() == want[2].tobytes(), where
                        # the layer holds y only where it keeps no bits
                        probe = bn(x) if r is None else bn(x, r)
                        alive = weakref.ref(probe)
                        del probe
                        gc.collect()
                        assert (alive() is None) == (size > 0), where
                    monkeypatch.undo()


def test_kept_bits_fallbacks_give_the_same_bits(kernel_modules):
    """The backward from kept bits where the bits' vector dx loops do not apply: channels
    whose coefficients float32 cannot carry (a subnormal weight; dy near float32's largest,
    whose float32 dot overflows and is summed again in double) and fixed statistics
    (training=False) mask dy through an L1 stage; the bits of the backward with y."""
    import importlib
    from fastbn import _calls, _dispatch
    rng = np.random.default_rng(32)
    for name in kernel_modules[1:]:
        with _dispatch.using(importlib.import_module(name)):
            for layout, shape in (("NCHW", (4, 6, 40, 41)), ("NHWC", (300, 70)),
                                  ("NHWC", (20, 2051))):
                C = shape[1] if layout == "NCHW" else shape[-1]
                x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
                for case in ("subnormal weight", "huge dy"):
                    dy = rng.standard_normal(shape).astype(np.float32)
                    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
                    if case == "subnormal weight":
                        w[0] = 1e-42
                    else:
                        dy *= np.float32(1e36)
                    mask = _calls.ReluMask()
                    y, mean, invstd = _calls.batch_norm_train(
                        x, w, None, eps=1e-5, layout=layout, relu=True, mask=mask)
                    assert mask.bits is not None
                    for training in (True, False):
                        for nt in (1, 2):
                            d1, d2 = np.empty_like(x), np.empty_like(x)
                            with np.errstate(all="ignore"):
                                a = _calls.backward(dy, x, mean, invstd, w, training=training,
                                                    layout=layout, y=y, dresidual=d1,
                                                    num_threads=nt)
                                k = _calls.backward(dy, x, mean, invstd, w, training=training,
                                                    layout=layout, mask=mask, dresidual=d2,
                                                    num_threads=nt)
                            where = f"{name} {layout} {shape} {case} {training} {nt}"
                            for p, q in zip(a, k):
                                assert p.tobytes() == q.tobytes(), where
                            assert d1.tobytes() == d2.tobytes(), where


def test_kept_bits_layout_and_errors(kernel_modules):
    """kept_bits_size: 0 for other dtypes and the portable build; bits of another size,
    dtype or forward are refused with a clear message and change nothing."""
    import importlib
    from fastbn import _calls, _dispatch
    name = kernel_modules[-1]
    if name == "fastbn._kernels":
        pytest.skip("no build with the bits' vector loops on this CPU")
    with _dispatch.using(importlib.import_module(name)) as k:
        assert k.kept_bits_size(0, 4, 6, 1681, 4) == 4 * 6 * 2 * 112    # 2 pieces of 841
        assert k.kept_bits_size(1, 300, 70, 1, 4) == 300 * 16
        assert k.kept_bits_size(1, 300, 70, 1, 8) == 0
        assert k.kept_bits_size(1, 300, 70, 1, 2) == 0
        assert k.kept_bits_size(0, 5, 4, 9, 4) == 5 * 4 * 8          # a run in a word
        rng = np.random.default_rng(33)
        x = rng.standard_normal((300, 70)).astype(np.float32)
        dy = rng.standard_normal((300, 70)).astype(np.float32)
        stats = np.empty((5, 70))
        y = np.zeros_like(x)
        for bad, err, msg in ((np.zeros(300 * 16 - 1, np.uint8), ValueError, "kept_bits_size"),
                              (np.zeros(300 * 16, np.int8), ValueError, "uint8"),
                              ([0] * 4800, TypeError, "ndarray")):
            with pytest.raises(err, match=msg):
                k.train_forward(x, y, 1, 300, 70, 1, None, None, 1e-5, stats, None, 1,
                                False, None, True, bad)
        with pytest.raises(ValueError, match="need relu"):
            k.train_forward(x, y, 1, 300, 70, 1, None, None, 1e-5, stats, None, 1, False,
                            None, False, np.zeros(4800, np.uint8))
        with pytest.raises(ValueError, match="no mask bits"):
            k.train_forward(x.astype(np.float64), y.astype(np.float64), 1, 300, 70, 1, None,
                            None, 1e-5, stats, None, 1, False, None, True,
                            np.zeros(4800, np.uint8))
        mask = _calls.ReluMask()
        y, mean, invstd = _calls.batch_norm_train(x, None, None, eps=1e-5, layout="NHWC",
                                                  relu=True, mask=mask)
        with pytest.raises(ValueError, match="replace ymask"):
            k.backward(dy, x, np.empty_like(x), 1, 300, 70, 1, mean, invstd, None, True,
                       np.empty((2, 70)), 1, False, y, None, mask.bits)
        from conftest import Snapshot
        other = x[:150]
        snap = Snapshot(dy, other, mask.bits)
        with pytest.raises(ValueError, match="belongs to another forward"):
            _calls.backward(dy[:150], other, mean, invstd, None, training=True,
                            layout="NHWC", mask=mask)
        snap.assert_unchanged()
