"""Batch Renormalization: functional forward/backward and the BatchRenorm layer."""
import numpy as np
import pytest

import fastbn
from cases import LAYER_SHAPES
from conftest import running_buffers
from fastbn import reference
from fastbn.renorm import linear_schedule, paper_schedules

LAYOUTS = ("NCHW", "NHWC")
CLIPS = [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)]
SHAPES = LAYER_SHAPES


def to_layout(a, layout):
    """An NCHW-shaped array in `layout` (channels moved last for NHWC)."""
    return a if layout == "NCHW" else np.moveaxis(a, 1, -1)


def caxis(layout, ndim):
    return 1 if layout == "NCHW" else ndim - 1


def bc(v, layout, ndim):
    shape = [1] * ndim
    shape[caxis(layout, ndim)] = -1
    return np.asarray(v).reshape(shape)


def make(shape, layout, dtype=np.float64, seed=0):
    """x with per-channel offsets/scales, dy, weight, bias, running mean/std; x in `layout`.

    The running statistics are spread so that, for the clips in CLIPS, some channels get
    r and d clipped and some do not.
    """
    rng = np.random.default_rng(seed)
    C = shape[1]
    loc = rng.normal(0, 2, C)
    scale = rng.uniform(0.2, 4.0, C)
    x = rng.normal(size=shape) * scale.reshape((1, C) + (1,) * (len(shape) - 2)) \
        + loc.reshape((1, C) + (1,) * (len(shape) - 2))
    dy = rng.normal(size=shape)
    w = rng.uniform(0.5, 1.5, C)
    b = rng.uniform(-0.5, 0.5, C)
    rm = loc + rng.normal(0, 1.0, C)
    rs = scale * rng.uniform(0.5, 2.0, C)
    x, dy = (to_layout(a, layout).astype(dtype) for a in (x, dy))
    return x, dy, w.astype(dtype), b.astype(dtype), rm.astype(dtype), rs.astype(dtype)


def torch_oracle(x, dy, w, b, rm, rs, rmin, rmax, dmax, momentum, eps, layout):
    """Batch Renormalization in float64 torch autograd, r and d detached."""
    torch = pytest.importorskip("torch")

    def t(a):
        a = torch.from_numpy(np.array(a, dtype=np.float64))
        return a.movedim(-1, 1) if layout == "NHWC" and a.ndim > 2 else a

    xt = t(x).requires_grad_(True)
    wt = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
    bt = torch.tensor(np.asarray(b, np.float64), requires_grad=True)
    rmt, rst = torch.tensor(np.asarray(rm, np.float64)), torch.tensor(np.asarray(rs, np.float64))
    dims = [i for i in range(xt.ndim) if i != 1]
    shape = [1, -1] + [1] * (xt.ndim - 2)
    mu = xt.mean(dims)
    sigma = torch.sqrt(xt.var(dims, unbiased=False) + eps)
    r = torch.clamp(sigma / rst, rmin, rmax).detach()
    d = torch.clamp((mu - rmt) / rst, -dmax, dmax).detach()
    xhat = (xt - mu.view(shape)) / sigma.view(shape) * r.view(shape) + d.view(shape)
    y = wt.view(shape) * xhat + bt.view(shape)
    y.backward(t(dy))

    def back(a):
        a = a.detach()
        a = a.movedim(1, -1) if layout == "NHWC" and a.ndim > 2 else a
        return a.numpy()

    new_rm = (rmt + momentum * (mu.detach() - rmt)).numpy()
    new_rs = (rst + momentum * (sigma.detach() - rst)).numpy()
    return dict(y=back(y), r=r.numpy(), d=d.numpy(), mean=mu.detach().numpy(),
                std=sigma.detach().numpy(), running_mean=new_rm, running_std=new_rs,
                dx=back(xt.grad), dweight=wt.grad.numpy(), dbias=bt.grad.numpy())


def assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want) / (1 + np.abs(want))) if want.size else 0.0
    assert err <= tol, f"{what}: max rel err {err:.3g} > {tol}"


def numpy_oracle(x, dy, w, b, rm, rs, rmin, rmax, dmax, momentum, eps, layout):
    """Batch Renormalization by fastbn.reference (float64 NumPy; needs no torch)."""
    assert rmin == 1 / rmax
    rm, rs = np.array(rm, np.float64), np.array(rs, np.float64)
    y, mean, std, r, d = reference.batch_renorm_train(
        x.astype(np.float64), w, b, rm, rs, rmax=rmax, dmax=dmax, momentum=momentum, eps=eps,
        layout=layout)
    dx, dweight, dbias = reference.batch_renorm_backward(dy.astype(np.float64),
                                                         x.astype(np.float64), mean, std, r,
                                                         d, w, layout=layout)
    return dict(y=y, r=r, d=d, mean=mean, std=std, running_mean=rm, running_std=rs, dx=dx,
                dweight=dweight, dbias=dbias)


ORACLES = {"numpy": numpy_oracle, "torch": torch_oracle}


# --------------------------------------------------------------------------------------
# Acceptance 1: against the torch-autograd oracle, and the NumPy reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("oracle", ["numpy", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rmax,dmax", CLIPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_oracle_float64(shape, layout, rmax, dmax, oracle):
    x, dy, w, b, rm, rs = make(shape, layout)
    want = ORACLES[oracle](x, dy, w, b, rm, rs, 1 / rmax, rmax, dmax, 0.1, 1e-5, layout)
    rm_buf, rs_buf = rm.copy(), rs.copy()
    y, mean, std, r, d = fastbn.batch_renorm_train(x, w, b, rm_buf, rs_buf, rmax=rmax,
                                                   dmax=dmax, momentum=0.1, layout=layout)
    dx, dweight, dbias = fastbn.batch_renorm_backward(dy, x, mean, std, r, d, w, layout=layout)
    tag = f"{shape} {layout} rmax={rmax} dmax={dmax}"
    for name, got in [("y", y), ("r", r), ("d", d), ("mean", mean), ("std", std),
                      ("running_mean", rm_buf), ("running_std", rs_buf), ("dx", dx),
                      ("dweight", dweight), ("dbias", dbias)]:
        assert_close(got, want[name], 1e-9, f"{name} | float64 | {tag}")
    assert y.dtype == dx.dtype == dweight.dtype == np.float64


def test_oracle_cases_exercise_clipping():
    """The data of the acceptance test clips r and d on some channels and not on others."""
    x, dy, w, b, rm, rs = make((4, 6, 5, 5), "NCHW")
    _, _, std, r, d = fastbn.batch_renorm_train(x, w, b, rm.copy(), rs.copy(), rmax=1.5,
                                                dmax=0.5)
    raw_r = std / rs
    assert np.any(np.abs(raw_r - r) > 0) and np.any(raw_r == r)
    assert np.any(np.abs(d) == 0.5) and np.any(np.abs(d) < 0.5)


@pytest.mark.parametrize("oracle", ["numpy", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rmax,dmax", CLIPS)
def test_matches_torch_oracle_float32(layout, rmax, dmax, oracle):
    x, dy, w, b, rm, rs = make((4, 6, 5, 5), layout, dtype=np.float32)
    want = ORACLES[oracle](x, dy, w, b, rm, rs, 1 / rmax, rmax, dmax, 0.01, 1e-5, layout)
    rm_buf, rs_buf = rm.copy(), rs.copy()
    y, mean, std, r, d = fastbn.batch_renorm_train(x, w, b, rm_buf, rs_buf, rmax=rmax,
                                                   dmax=dmax, layout=layout)
    dx, dweight, dbias = fastbn.batch_renorm_backward(dy, x, mean, std, r, d, w, layout=layout)
    assert y.dtype == dx.dtype == dweight.dtype == dbias.dtype == np.float32
    assert rm_buf.dtype == rs_buf.dtype == np.float32
    for name, got in [("y", y), ("r", r), ("d", d), ("running_mean", rm_buf),
                      ("running_std", rs_buf), ("dx", dx), ("dweight", dweight),
                      ("dbias", dbias)]:
        assert_close(got, want[name], 2e-5, f"{name} | float32 | {layout} {rmax} {dmax}")


def test_no_weight_is_unit_weight():
    x, dy, w, b, rm, rs = make((6, 4, 3), "NCHW")
    ones, zeros = np.ones(4), np.zeros(4)
    a = fastbn.batch_renorm_train(x, None, None, rm.copy(), rs.copy())
    b_ = fastbn.batch_renorm_train(x, ones, zeros, rm.copy(), rs.copy())
    for u, v in zip(a, b_):
        np.testing.assert_array_equal(u, v)
    _, mean, std, r, d = a
    g1 = fastbn.batch_renorm_backward(dy, x, mean, std, r, d)
    g2 = fastbn.batch_renorm_backward(dy, x, mean, std, r, d, ones)
    for u, v in zip(g1, g2):
        np.testing.assert_array_equal(u, v)


def test_momentum_extremes():
    x, _, w, b, rm, rs = make((6, 4, 3), "NCHW")
    rm0, rs0 = rm.copy(), rs.copy()
    _, mean, std, _, _ = fastbn.batch_renorm_train(x, w, b, rm, rs, momentum=0.0)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rs, rs0)
    fastbn.batch_renorm_train(x, w, b, rm, rs, momentum=1.0)
    np.testing.assert_allclose(rm, mean, rtol=0, atol=1e-14)
    np.testing.assert_allclose(rs, std, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------
# Acceptance 2: rmax=1, dmax=0 is Batch Normalization
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_unit_clips_equal_batch_norm(shape, layout):
    x, dy, w, b, rm, rs = make(shape, layout)
    y, mean, std, r, d = fastbn.batch_renorm_train(x, w, b, rm, rs, rmax=1.0, dmax=0.0,
                                                   layout=layout)
    y_bn, mean_bn, invstd = fastbn.batch_norm_train(x, w, b, layout=layout)
    np.testing.assert_array_equal(r, 1.0)
    np.testing.assert_array_equal(d, 0.0)
    assert_close(y, y_bn, 1e-12, f"y {shape} {layout}")
    np.testing.assert_array_equal(mean, mean_bn)
    assert_close(1 / std, invstd, 1e-15, "std")
    g = fastbn.batch_renorm_backward(dy, x, mean, std, r, d, w, layout=layout)
    g_bn = fastbn.batch_norm_backward(dy, x, mean_bn, invstd, w, layout=layout)
    for name, u, v in zip(("dx", "dweight", "dbias"), g, g_bn):
        assert_close(u, v, 1e-12, f"{name} {shape} {layout}")


def test_unit_clips_equal_batch_norm_float32():
    x, _, w, b, rm, rs = make((4, 6, 5, 5), "NCHW", dtype=np.float32)
    y, *_ = fastbn.batch_renorm_train(x, w, b, rm, rs, rmax=1.0, dmax=0.0)
    y_bn, *_ = fastbn.batch_norm_train(x, w, b)
    np.testing.assert_allclose(y, y_bn, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------
# out=, memory orders, input not modified
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_and_in_place(layout):
    x, dy, w, b, rm, rs = make((4, 6, 5, 5), layout)
    y, mean, std, r, d = fastbn.batch_renorm_train(x, w, b, rm.copy(), rs.copy(),
                                                   layout=layout)
    out = np.empty_like(x)
    res = fastbn.batch_renorm_train(x, w, b, rm.copy(), rs.copy(), layout=layout, out=out)
    assert res[0] is out
    np.testing.assert_array_equal(out, y)
    xi = x.copy(order="K")          # same memory order: the same kernel, bit-identical
    res = fastbn.batch_renorm_train(xi, w, b, rm.copy(), rs.copy(), layout=layout, out=xi)
    assert res[0] is xi
    np.testing.assert_array_equal(xi, y)
    dx, dw, db = fastbn.batch_renorm_backward(dy, x, mean, std, r, d, w, layout=layout)
    g = dy.copy(order="K")
    res = fastbn.batch_renorm_backward(g, x, mean, std, r, d, w, layout=layout, out=g)
    assert res[0] is g
    np.testing.assert_array_equal(g, dx)
    np.testing.assert_array_equal(res[1], dw)


def test_noncontiguous_and_readonly_inputs():
    x, dy, w, b, rm, rs = make((4, 6, 5, 5), "NCHW")
    xf = np.asfortranarray(x)
    xs = np.empty((4, 6, 5, 10))[..., ::2]
    xs[...] = x
    xr = x.copy()
    xr.flags.writeable = False
    want = fastbn.batch_renorm_train(x, w, b, rm.copy(), rs.copy())
    for xv in (xf, xs, xr):
        got = fastbn.batch_renorm_train(xv, w, b, rm.copy(), rs.copy())
        for u, v in zip(got, want):
            assert_close(u, v, 1e-14, "memory order")


@pytest.mark.parametrize("buf_dtype", [np.float32, np.float64])
def test_running_update_fast_and_general_paths_agree(buf_dtype):
    """Contiguous float buffers are updated in C, others by NumPy: same values."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 4, 3, 3))
    start_m, start_s = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    results = []
    for strided in (False, True):
        bufs = running_buffers((start_m, start_s), buf_dtype, strided)
        out = fastbn.batch_renorm_train(x, None, None, bufs[0], bufs[1], rmax=1.5, dmax=0.5,
                                        momentum=0.3)
        results.append((out, bufs))
    (out_a, bufs_a), (out_b, bufs_b) = results
    for a, b in zip(out_a, out_b):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    tol = 1e-7 if buf_dtype == np.float32 else 1e-14
    for a, b in zip(bufs_a, bufs_b):
        np.testing.assert_allclose(a, b, rtol=tol)
    mean, std = out_a[1], out_a[2]
    m0 = start_m.astype(buf_dtype).astype(np.float64)
    np.testing.assert_allclose(bufs_a[0], m0 + 0.3 * (mean - m0), rtol=tol)


def test_inputs_not_modified():
    x, dy, w, b, rm, rs = make((4, 6, 5, 5), "NHWC")
    saved = [a.copy() for a in (x, dy, w, b)]
    _, mean, std, r, d = fastbn.batch_renorm_train(x, w, b, rm, rs, layout="NHWC")
    stats = [a.copy() for a in (mean, std, r, d)]
    fastbn.batch_renorm_backward(dy, x, mean, std, r, d, w, layout="NHWC")
    for a, s in zip((x, dy, w, b, mean, std, r, d), saved + stats):
        np.testing.assert_array_equal(a, s)


# --------------------------------------------------------------------------------------
# Bad arguments: exception type, the message names the argument, nothing changed
# --------------------------------------------------------------------------------------
def _args():
    x, dy, w, b, rm, rs = make((4, 3, 5), "NCHW")
    return dict(x=x, weight=w, bias=b, running_mean=rm, running_std=rs)


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


BAD_TRAIN = [
    ("rmax", dict(rmax=0.5), ValueError),
    ("rmax", dict(rmax=float("nan")), ValueError),
    ("rmax", dict(rmax="3"), TypeError),
    ("dmax", dict(dmax=-0.1), ValueError),
    ("dmax", dict(dmax=float("inf")), ValueError),
    ("momentum", dict(momentum=1.5), ValueError),
    ("momentum", dict(momentum=-0.1), ValueError),
    ("eps", dict(eps=-1.0), ValueError),
    ("layout", dict(layout="NWHC"), ValueError),
    ("num_threads", dict(num_threads=0), ValueError),
    ("running_std", dict(running_std=np.array([1.0, 0.0, 1.0])), ValueError),
    ("running_std", dict(running_std=np.array([1.0, -2.0, 1.0])), ValueError),
    ("running_std", dict(running_std=np.array([1.0, np.inf, 1.0])), ValueError),
    ("running_std", dict(running_std=np.array([1.0, np.nan, 1.0])), ValueError),
    ("running_std", dict(running_std=np.ones(4)), ValueError),
    ("running_std", dict(running_std=np.ones(3, dtype=np.int64)), TypeError),
    ("running_std", dict(running_std=[1.0, 1.0, 1.0]), TypeError),
    ("running_mean", dict(running_mean=None), ValueError),
    ("running_mean", dict(running_mean=_readonly(np.zeros(3))), ValueError),
    ("running_std", dict(running_std=_readonly(np.ones(3))), ValueError),
    ("weight", dict(weight=np.ones(4)), ValueError),
    ("bias", dict(bias=np.zeros(3, dtype=np.int32)), TypeError),
    ("x", dict(x=np.zeros((4, 3, 5), dtype=np.int32)), TypeError),
    ("x", dict(x=np.zeros(5)), ValueError),
    ("x", dict(x=np.zeros((1, 3))), ValueError),
    ("out", dict(out=np.empty((4, 3, 6))), ValueError),
    ("out", dict(out=np.empty((4, 3, 5), dtype=np.float32)), ValueError),
]


@pytest.mark.parametrize("name,override,exc", BAD_TRAIN)
def test_train_bad_arguments(name, override, exc):
    args = _args()
    args.update(override)
    saved = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    pos = [args.pop(k) for k in ("x", "weight", "bias", "running_mean", "running_std")]
    with pytest.raises(exc, match=name):
        fastbn.batch_renorm_train(*pos, **args)
    for k, v in zip(("x", "weight", "bias", "running_mean", "running_std"), pos):
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, saved[k], err_msg=k)


def test_out_must_not_overlap_running_buffers():
    x, _, w, b, _, _ = make((4, 3, 5), "NCHW")
    buf = np.ones(60 + 6)
    out = buf[:60].reshape(4, 3, 5)
    rm, rs = buf[57:60], buf[63:66]
    saved = buf.copy()
    with pytest.raises(ValueError, match="running_mean"):
        fastbn.batch_renorm_train(x, w, b, rm, rs, out=out)
    np.testing.assert_array_equal(buf, saved)


def test_running_buffers_must_not_share_memory():
    x, _, w, b, _, _ = make((4, 3, 5), "NCHW")
    buf = np.ones(3)
    with pytest.raises(ValueError, match="running_std"):
        fastbn.batch_renorm_train(x, w, b, buf, buf)
    np.testing.assert_array_equal(buf, 1.0)


def _bwd_args():
    x, dy, w, b, rm, rs = make((4, 3, 5), "NCHW")
    _, mean, std, r, d = fastbn.batch_renorm_train(x, w, b, rm, rs)
    return dict(dy=dy, x=x, mean=mean, std=std, r=r, d=d, weight=w)


BAD_BACKWARD = [
    ("std", dict(std=np.array([1.0, 0.0, 1.0])), ValueError),
    ("std", dict(std=np.array([1.0, -1.0, 1.0])), ValueError),
    ("r", dict(r=np.ones(2)), ValueError),
    ("d", dict(d=np.zeros(3, dtype=np.int64)), TypeError),
    ("mean", dict(mean=None), ValueError),
    ("weight", dict(weight=np.ones(5)), ValueError),
    ("dy", dict(dy=np.zeros((4, 3, 6))), ValueError),
    ("dy", dict(dy=np.zeros((4, 3, 5), dtype=np.float32)), TypeError),
    ("layout", dict(layout="CHW"), ValueError),
    ("out", dict(out=np.empty((4, 3, 5), dtype=np.float32)), ValueError),
]


@pytest.mark.parametrize("name,override,exc", BAD_BACKWARD)
def test_backward_bad_arguments(name, override, exc):
    args = _bwd_args()
    args.update(override)
    saved = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    keys = ("dy", "x", "mean", "std", "r", "d")
    pos = [args.pop(k) for k in keys]
    with pytest.raises(exc, match=name):
        fastbn.batch_renorm_backward(*pos, **args)
    for k, v in list(zip(keys, pos)) + list(args.items()):
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, saved[k], err_msg=k)


def test_backward_out_must_not_overlap_r():
    a = _bwd_args()
    buf = np.empty(60 + 3)
    out = buf[:60].reshape(4, 3, 5)
    r = buf[58:61]
    r[...] = a["r"][:3]
    with pytest.raises(ValueError, match="r"):
        fastbn.batch_renorm_backward(a["dy"], a["x"], a["mean"], a["std"], r, a["d"],
                                     out=out)


# --------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 5), (4, 6, 5, 5)])
def test_layer_training_steps_match_oracle(shape, layout):
    C = shape[1]
    brn = fastbn.BatchRenorm(C, rmax=1.5, dmax=0.5, momentum=0.2, layout=layout,
                             dtype=np.float64)
    brn.weight[...] = np.linspace(0.5, 1.5, C)
    brn.bias[...] = np.linspace(-1, 1, C)
    rm, rs = np.zeros(C), np.ones(C)
    gw, gb = np.zeros(C), np.zeros(C)
    for step in range(4):
        x, dy, *_ = make(shape, layout, seed=step)
        want = torch_oracle(x, dy, brn.weight, brn.bias, rm, rs, 1 / 1.5, 1.5, 0.5, 0.2, 1e-5,
                            layout)
        y = brn(x)
        dx = brn.backward(dy)
        rm, rs = want["running_mean"], want["running_std"]
        gw, gb = gw + want["dweight"], gb + want["dbias"]
        tag = f"step {step} {shape} {layout}"
        assert_close(y, want["y"], 1e-9, "y " + tag)
        assert_close(dx, want["dx"], 1e-9, "dx " + tag)
        assert_close(brn.running_mean, rm, 1e-9, "running_mean " + tag)
        assert_close(brn.running_std, rs, 1e-9, "running_std " + tag)
        assert_close(brn.weight_grad, gw, 1e-9, "weight_grad " + tag)
        assert_close(brn.bias_grad, gb, 1e-9, "bias_grad " + tag)
        assert brn.num_batches_tracked == step + 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_eval_output_uses_running_std(layout, dtype):
    """Acceptance 3: eval output is weight * (x - running_mean) / running_std + bias."""
    x, dy, w, b, rm, rs = make((4, 6, 5, 5), layout, dtype=dtype)
    brn = fastbn.BatchRenorm(6, layout=layout, dtype=dtype)
    brn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_std": rs,
                         "num_batches_tracked": np.array(7)})
    brn.eval()
    y = brn(x)
    nd = x.ndim
    want = (bc(w, layout, nd).astype(np.float64) * (x.astype(np.float64) - bc(rm, layout, nd))
            / bc(rs, layout, nd) + bc(b, layout, nd))
    assert y.dtype == dtype
    assert_close(y, want, 1e-12 if dtype == np.float64 else 1e-6, f"eval {layout} {dtype}")
    dx = brn.backward(dy)
    assert_close(dx, dy * bc(w / rs, layout, nd), 1e-12 if dtype == np.float64 else 1e-6, "dx")
    xhat = (x.astype(np.float64) - bc(rm, layout, nd)) / bc(rs, layout, nd)
    red = tuple(i for i in range(nd) if i != caxis(layout, nd))
    assert_close(brn.weight_grad, (dy * xhat).sum(red), 1e-10 if dtype == np.float64 else 1e-5,
                 "dweight")
    assert brn.num_batches_tracked == 7


def test_layer_eval_does_not_touch_state():
    x, *_ = make((4, 3, 5), "NCHW", dtype=np.float32)
    brn = fastbn.BatchRenorm(3)
    brn(x)
    state = brn.state_dict()
    brn.eval()(x)
    for k, v in brn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_schedule_callable_gets_step_count():
    seen = []

    def rmax(step):
        seen.append(step)
        return 1.0 + step

    brn = fastbn.BatchRenorm(3, rmax=rmax, dmax=lambda s: 0.0, dtype=np.float64)
    seen.clear()
    x, *_ = make((8, 3, 4), "NCHW")
    for _ in range(3):
        brn(x)
    assert seen == [0, 1, 2]
    assert brn.clipping() == (1 / 4.0, 4.0, 0.0)


def test_schedule_zero_clips_are_batch_norm():
    """A schedule at its warm-up (rmax 1, dmax 0) gives exactly batch_norm_train's output."""
    rmax, dmax = paper_schedules(warmup=2, rmax_stop=6, dmax_stop=4)
    brn = fastbn.BatchRenorm(6, rmax="paper", dmax="paper", dtype=np.float64)
    brn2 = fastbn.BatchRenorm(6, rmax=rmax, dmax=dmax, dtype=np.float64)
    x, *_ = make((4, 6, 3), "NCHW")
    y_bn, _, _ = fastbn.batch_norm_train(x, brn.weight, brn.bias)
    assert_close(brn(x), y_bn, 1e-12, "paper schedule at step 0")
    assert_close(brn2(x), y_bn, 1e-12, "short schedule at step 0")
    assert brn.clipping(22500)[:2] == (0.5, 2.0)
    assert brn.clipping(15000)[2] == 2.5 and brn.clipping(25000)[2] == 5.0
    assert brn2.clipping(4) == (1 / 2.0, 2.0, 5.0)
    assert brn2.clipping(100) == (1 / 3.0, 3.0, 5.0)


def test_rmin_keras_style():
    x, dy, w, b, rm, rs = make((8, 4, 6), "NCHW")
    rs = np.full(4, 100.0)           # sigma_B / sigma is tiny: r hits its lower clip
    brn = fastbn.BatchRenorm(4, rmax=2.0, rmin=0.8, dmax=0.0, dtype=np.float64)
    brn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_std": rs,
                         "num_batches_tracked": np.array(0)})
    want = torch_oracle(x, dy, w, b, rm, rs, 0.8, 2.0, 0.0, 0.01, 1e-5, "NCHW")
    np.testing.assert_array_equal(want["r"], 0.8)
    assert_close(brn(x), want["y"], 1e-9, "y with rmin")
    assert_close(brn.backward(dy), want["dx"], 1e-9, "dx with rmin")
    default = fastbn.BatchRenorm(4, rmax=2.0, dmax=0.0)
    assert default.clipping() == (0.5, 2.0, 0.0)


@pytest.mark.parametrize("kwargs,name,exc", [
    (dict(rmax=0.9), "rmax", ValueError),
    (dict(dmax=-1.0), "dmax", ValueError),
    (dict(rmin=1.5), "rmin", ValueError),
    (dict(rmin=0.0), "rmin", ValueError),
    (dict(rmax="papers"), "rmax", ValueError),
    (dict(rmin="paper"), "rmin", ValueError),
    (dict(rmin="0.5"), "rmin", ValueError),
    (dict(rmax=lambda s: 0.5), "rmax", ValueError),
    (dict(momentum=2.0), "momentum", ValueError),
    (dict(eps=-1e-5), "eps", ValueError),
    (dict(layout="NC"), "layout", ValueError),
    (dict(dtype=np.int32), "dtype", TypeError),
])
def test_layer_bad_arguments(kwargs, name, exc):
    with pytest.raises(exc, match=name):
        fastbn.BatchRenorm(3, **kwargs)


def test_layer_schedule_checked_each_step():
    brn = fastbn.BatchRenorm(3, rmax=lambda s: 3.0 if s < 1 else 0.5, dtype=np.float64)
    x, *_ = make((8, 3, 4), "NCHW")
    brn(x)
    state = brn.state_dict()
    with pytest.raises(ValueError, match="rmax"):
        brn(x)
    for k, v in brn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_layer_state_dict_round_trip_and_bad_load():
    x, *_ = make((8, 3, 4), "NCHW", dtype=np.float32)
    brn = fastbn.BatchRenorm(3)
    brn(x)
    state = brn.state_dict()
    assert sorted(state) == ["bias", "num_batches_tracked", "running_mean", "running_std",
                             "weight"]
    other = fastbn.BatchRenorm(3)
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    bad = dict(state, running_std=np.array([1.0, 0.0, 1.0], np.float32))
    bad["running_mean"] = np.full(3, 5.0, np.float32)
    with pytest.raises(ValueError, match="running_std"):
        other.load_state_dict(bad)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_layer_one_value_per_channel_raises_without_state_change():
    brn = fastbn.BatchRenorm(3, dtype=np.float64)
    state = brn.state_dict()
    with pytest.raises(ValueError, match="x"):
        brn(np.ones((1, 3)))
    for k, v in brn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_linear_schedule():
    f = linear_schedule(0.0, 5.0, 10, 20)
    assert [f(s) for s in (0, 10, 12, 20, 30)] == [0.0, 0.0, 1.0, 5.0, 5.0]
    g = linear_schedule(2.0, 2.0, 0, 0)
    assert g(0) == g(5) == 2.0
    with pytest.raises(ValueError, match="stop"):
        linear_schedule(1.0, 3.0, 10, 5)
    with pytest.raises(ValueError, match="begin"):
        linear_schedule(1.0, 3.0, -1, 5)
    with pytest.raises(ValueError, match="start"):
        linear_schedule(float("nan"), 3.0, 0, 5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_thread_count_invariance(layout):
    x, dy, w, b, rm, rs = make((4, 64, 9, 9), layout, dtype=np.float32)
    res = []
    for n in (1, 2, 3):
        rm_n, rs_n = rm.copy(), rs.copy()
        fwd = fastbn.batch_renorm_train(x, w, b, rm_n, rs_n, layout=layout, num_threads=n)
        bwd = fastbn.batch_renorm_backward(dy, x, *fwd[1:], w, layout=layout, num_threads=n)
        res.append(list(fwd) + list(bwd) + [rm_n, rs_n])
    for other in res[1:]:
        for u, v in zip(res[0], other):
            np.testing.assert_array_equal(u, v)
