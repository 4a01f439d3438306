"""float16 and bfloat16 data: every output a faithful rounding of the float64 result computed
from the same 16-bit inputs, statistics to 1e-12, parameter gradients to 2e-5, results
bit-identical across thread counts, both layouts, the kernel branches of tests/cases.py."""
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _memory, _rounding
from fastbn import reference as ref
from cases import CASES, ids

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [F16, BF16]
EPS32 = float(np.finfo(np.float32).eps)
HALF_CASES = [c for c in CASES if np.prod(c.nchw) <= 300_000]


def _ulp(v, dt):
    """One unit in the last place of dt at |v| (the subnormal spacing below the normal
    range)."""
    mant, emin = (10, -14) if dt == F16 else (7, -126)
    e = np.floor(np.log2(np.maximum(np.abs(v), 2.0 ** emin)))
    return 2.0 ** (e - mant)


def assert_faithful(got, exact, dt, what):
    """|got - exact| <= 1 ulp of dt at exact (+ 8 float32 eps x max(1, |exact|) for tiny
    values); NaN where exact is NaN; inf only where exact is beyond dt's range."""
    got = np.asarray(got).astype(np.float64)
    assert got.dtype == np.float64
    nan = np.isnan(exact)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN pattern")
    fin = np.isfinite(exact) & np.isfinite(got)
    tol = _ulp(exact, dt) + 8 * EPS32 * np.maximum(1.0, np.abs(exact))
    err = np.abs(got - exact)
    bad = fin & (err > tol)
    assert not bad.any(), f"{what}: {int(bad.sum())} values beyond one ulp, worst " \
        f"{(err[bad] / tol[bad]).max():.3f} x tolerance"


def _data(case, dt, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(case.shape) * 2 + offset).astype(dt)
    g = rng.standard_normal(case.shape).astype(dt)
    C = case.shape[1] if case.layout == "NCHW" else case.shape[-1]
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.uniform(-1, 1, C).astype(np.float32)
    return x, g, w, b, C


@pytest.mark.parametrize("dt", HALF, ids=str)
@pytest.mark.parametrize("case", HALF_CASES, ids=ids(HALF_CASES))
def test_matches_float64_faithfully(case, dt):
    x, g, w, b, C = _data(case, dt)
    L = case.layout
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=L, running_mean=rm,
                                              running_var=rv, momentum=0.3)
    rm64, rv64 = np.zeros(C), np.ones(C)
    yr, meanr, invstdr = ref.batch_norm_train(x64, w, b, layout=L, running_mean=rm64,
                                              running_var=rv64, momentum=0.3)
    assert y.dtype == dt and mean.dtype == invstd.dtype == np.float64
    assert_faithful(y, yr, dt, "y")
    np.testing.assert_allclose(mean, meanr, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(invstd, invstdr, rtol=1e-12)
    np.testing.assert_allclose(rm, rm64, rtol=2e-7, atol=1e-7)      # float32 buffers
    np.testing.assert_allclose(rv, rv64, rtol=2e-7)
    for training in (True, False):
        dx, dw, db = fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=L,
                                                training=training)
        dxr, dwr, dbr = ref.batch_norm_backward(g64, x64, mean, invstd, w, layout=L,
                                                training=training)
        assert dx.dtype == dt and dw.dtype == db.dtype == np.float32
        assert_faithful(dx, dxr, dt, f"dx training={training}")
        for a, e, name in ((dw, dwr, "dweight"), (db, dbr, "dbias")):
            np.testing.assert_allclose(a, e, rtol=0, atol=2e-5 * max(1.0, np.abs(e).max()),
                                       err_msg=name)
    # inference, also in place
    yi = fastbn.batch_norm_infer(x, meanr, 1 / invstdr ** 2 - 1e-5, w, b, layout=L)
    assert_faithful(yi, yr, dt, "infer")
    xi = x.copy()
    assert fastbn.batch_norm_infer(xi, meanr, 1 / invstdr ** 2 - 1e-5, w, b, layout=L,
                                   out=xi) is xi
    np.testing.assert_array_equal(xi.view(np.uint16), yi.view(np.uint16))


@pytest.mark.parametrize("dt", HALF, ids=str)
@pytest.mark.parametrize("case", [c for c in HALF_CASES if not c.branch.startswith("serial")],
                         ids=ids([c for c in HALF_CASES if not c.branch.startswith("serial")]))
def test_bit_identical_across_threads(case, dt):
    x, g, w, b, C = _data(case, dt, seed=4, offset=50.0)
    L = case.layout
    outs = []
    for nt in (1, 2, 3):
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=L, num_threads=nt)
        dx, dw, db = fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=L,
                                                num_threads=nt)
        yi = fastbn.batch_norm_infer(x, mean, 1 / invstd ** 2, w, b, layout=L, num_threads=nt)
        outs.append([a.view(np.uint8) for a in (y, mean, invstd, dx, dw, db, yi)])
    for other in outs[1:]:
        for a, e in zip(other, outs[0]):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("dt", HALF, ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_streamed_outputs_are_the_same(dt, layout, monkeypatch):
    shape = (6, 40, 20, 20) if layout == "NCHW" else (6, 20, 20, 40)
    x = np.random.default_rng(2).standard_normal(shape).astype(dt)
    w = np.linspace(0.5, 1.5, 40).astype(np.float32)
    y0 = fastbn.batch_norm_train(x, w, layout=layout, out=np.empty_like(x))[0]
    i0 = fastbn.batch_norm_infer(x, np.zeros(40), np.ones(40), w, layout=layout,
                                 out=np.empty_like(x))
    monkeypatch.setattr(_memory, "STREAM_ABOVE", 0)
    y1 = fastbn.batch_norm_train(x, w, layout=layout, out=np.empty_like(x))[0]
    i1 = fastbn.batch_norm_infer(x, np.zeros(40), np.ones(40), w, layout=layout,
                                 out=np.empty_like(x))
    np.testing.assert_array_equal(y1.view(np.uint16), y0.view(np.uint16))
    np.testing.assert_array_equal(i1.view(np.uint16), i0.view(np.uint16))


@pytest.mark.parametrize("dt", HALF, ids=str)
def test_large_offset_and_constant_channel(dt):
    x = np.full((8, 2, 40), 1000.0).astype(dt)
    x[:, 1] = (np.random.default_rng(0).standard_normal((8, 40)) + 100).astype(dt)
    y, mean, invstd = fastbn.batch_norm_train(x, bias=np.array([0.25, -1.0], np.float32))
    assert (y[:, 0].astype(np.float64) == 0.25).all()        # a constant channel: its bias
    yr = ref.batch_norm_train(x.astype(np.float64), bias=np.array([0.25, -1.0]))[0]
    assert_faithful(y, yr, dt, "offset 100")


def test_nan_stays_nan_and_float16_overflow_gives_inf():
    x = np.random.default_rng(1).standard_normal((4, 3, 25)).astype(np.float16)
    x[1, 1, 3] = np.nan
    y, mean, invstd = fastbn.batch_norm_train(x, bias=np.array([0.0, 0.0, 7e4]))
    assert np.isnan(y[:, 1]).all() and np.isnan(mean[1])
    assert np.isfinite(y[:, 0]).all() and np.isposinf(y[:, 2]).all()   # 7e4 > 65504
    xb = np.array([[1.0, np.nan], [2.0, 3.0]]).astype(BF16)
    yb = fastbn.batch_norm_infer(xb, np.zeros(2), np.ones(2))
    assert np.isnan(yb.astype(np.float64)[0, 1]) and yb.dtype == BF16


@pytest.mark.parametrize("buf_dt", [F16, BF16, np.dtype(np.float32), np.dtype(np.float64)],
                         ids=str)
def test_running_buffers_of_every_dtype_round_once(buf_dt):
    x = (np.random.default_rng(3).standard_normal((16, 4, 9)) * 3 + 1).astype(BF16)
    rm, rv = np.full(4, 0.3).astype(buf_dt), np.full(4, 1.7).astype(buf_dt)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    fastbn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.1)
    _, mean, invstd = ref.batch_norm_train(x.astype(np.float64))
    m = x.size // 4
    var = (1 / invstd ** 2 - 1e-5) * m / (m - 1)
    want_m, want_v = np.empty(4, buf_dt), np.empty(4, buf_dt)
    _rounding.store_rounded((want_m, 0.1 * mean + 0.9 * rm0))
    _rounding.store_rounded((want_v, 0.1 * var + 0.9 * rv0))
    if buf_dt.itemsize == 2:       # the correctly rounded value of the float64 update
        np.testing.assert_array_equal(rm.view(np.uint16), want_m.view(np.uint16))
        np.testing.assert_array_equal(rv.view(np.uint16), want_v.view(np.uint16))
    else:
        np.testing.assert_allclose(rm, want_m, rtol=1e-6)
        np.testing.assert_allclose(rv, want_v, rtol=1e-6)


def test_bfloat16_rounding_of_float64_is_correct():
    """float64 -> float32 -> bfloat16 would round twice; store_rounded does not."""
    v = np.array([1 + 2.0 ** -8 + 2.0 ** -40, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8,
                  -(1 + 2.0 ** -8 + 2.0 ** -40), 3.5e38, np.inf, np.nan, 1e-45])
    out = np.empty(len(v), BF16)
    _rounding.store_rounded((out, v))
    got = out.astype(np.float64)
    np.testing.assert_array_equal(got[:5], [1 + 2.0 ** -7, 1.0, 1 + 2 * 2.0 ** -7,
                                            -(1 + 2.0 ** -7), np.inf])
    assert got[5] == np.inf and np.isnan(got[6]) and got[7] == 0.0


@pytest.mark.parametrize("dt", HALF, ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_layers_mixed_precision(dt, layout):
    shape = (8, 6, 5, 5) if layout == "NCHW" else (8, 5, 5, 6)
    x = (np.random.default_rng(5).standard_normal(shape) + 2).astype(dt)
    dy = np.random.default_rng(6).standard_normal(shape).astype(dt)
    for layer in (fastbn.BatchNorm(6, layout=layout), fastbn.BatchRenorm(6, layout=layout)):
        y = layer(x)
        dx = layer.backward(dy)
        assert y.dtype == dx.dtype == dt
        assert layer.weight_grad.dtype == np.float32
        assert all(v.dtype in (np.float32, np.int64) for v in layer.state_dict().values())
        assert layer.eval()(x).dtype == dt
    with pytest.raises(TypeError, match="x"):
        fastbn.BatchNorm(6, layout=layout, dtype=np.float64)(x)


@pytest.mark.parametrize("dt", HALF, ids=str)
def test_renorm_and_onnx(dt):
    x = (np.random.default_rng(7).standard_normal((6, 3, 4, 4)) * 2 + 1).astype(dt)
    g = np.random.default_rng(8).standard_normal(x.shape).astype(dt)
    rm, rs = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, std, r, d = fastbn.batch_renorm_train(x, None, None, rm, rs, rmax=1.5, dmax=0.5)
    rm64, rs64 = np.zeros(3), np.ones(3)
    yr, meanr, stdr, rr, dr = ref.batch_renorm_train(x.astype(np.float64), None, None, rm64,
                                                     rs64, rmax=1.5, dmax=0.5)
    assert_faithful(y, yr, dt, "renorm y")
    np.testing.assert_allclose(mean, meanr, rtol=1e-12)
    dx, dw, db = fastbn.batch_renorm_backward(g, x, mean, std, r, d)
    dxr, dwr, dbr = ref.batch_renorm_backward(g.astype(np.float64), x.astype(np.float64),
                                              mean, std, r, d)
    assert dx.dtype == dt and dw.dtype == db.dtype == np.float32
    assert_faithful(dx, dxr, dt, "renorm dx")
    ones = np.ones(3).astype(dt)
    zeros = np.zeros(3).astype(dt)
    Y = fastbn.onnx.batch_normalization(x, ones, zeros, zeros, ones)
    assert Y.dtype == dt
    Y, m_new, v_new = fastbn.onnx.batch_normalization(x, ones, zeros, zeros, ones,
                                                      training_mode=1)
    assert Y.dtype == m_new.dtype == v_new.dtype == dt


def test_bfloat16_is_recognised_without_importing_ml_dtypes():
    code = ("import sys, fastbn; assert 'ml_dtypes' not in sys.modules; "
            "from fastbn import _validate; import numpy as np; "
            "assert not _validate.is_bfloat16(np.dtype('V2'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("dt", HALF, ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_against_torch_where_it_is_faithful(dt, layout):
    torch = pytest.importorskip("torch")
    tdt = torch.float16 if dt == F16 else torch.bfloat16
    shape = (8, 6, 7, 7)
    x = (np.random.default_rng(9).standard_normal(shape) + 1).astype(dt)
    w = np.linspace(0.5, 1.5, 6).astype(np.float32)
    tx = torch.from_numpy(x.view(np.int16)).view(tdt)
    if layout == "NHWC":
        tx = tx.contiguous(memory_format=torch.channels_last)
        xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    else:
        xl = x
    ty = torch.native_batch_norm(tx, torch.from_numpy(w), None, None, None, True, 0.1,
                                 1e-5)[0]
    ty = ty.float().numpy() if layout == "NCHW" else ty.float().permute(0, 2, 3, 1).numpy()
    y = fastbn.batch_norm_train(xl, w, layout=layout)[0].astype(np.float64)
    exact = ref.batch_norm_train(xl.astype(np.float64), w, layout=layout)[0]
    torch_faithful = np.abs(ty - exact) <= _ulp(exact, dt) + 8 * EPS32 * np.maximum(1, abs(exact))
    assert torch_faithful.mean() > 0.5
    # where PyTorch is faithful too, the two agree to one unit in the last place
    diff = np.abs(y - ty)[torch_faithful]
    assert (diff <= _ulp(exact, dt)[torch_faithful] * 1.0001).all()
