"""Property tests: fastbn agrees with fastbn/reference.py (its float64 NumPy twin) on random
shapes, layouts, dtypes, memory orders and values, or raises the same documented error.

Tolerances follow from the arithmetic: fastbn accumulates in float64, so an output element may
differ from the reference by one rounding of the output dtype plus float64 rounding relative
to the magnitude of the terms that formed it (|x| + |mean| times the scale, not the possibly
cancelled result). Channels whose statistics are ill-conditioned by construction (eps = 0 and
a variance at the level of float64 rounding) are checked for shape and no crash only.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastbn
from cases import CASES
from fastbn import reference

pytestmark = [
    # hypothesis' failure report imports a module that warns; keep failures readable
    pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"),
    # NaN/inf inputs are part of the domain: NumPy's invalid-value warnings in the oracle
    # and in the tolerance arithmetic are expected
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = (np.float32, np.float64)
# magnitudes whose squares, sums and scaled results stay finite in float64 and the outputs
# finite in the data dtype
SCALES = {np.float32: (1e-30, 1e-3, 1.0, 1e3, 1e30), np.float64: (1e-150, 1e-3, 1.0, 1e3, 1e150)}
REL64 = 1e-11          # float64 rounding allowance relative to the term magnitudes
# Extra allowance for float32 inputs relative to the centred magnitudes |x - mean| (never to
# the offset |x|), for the float32 arithmetic of fastbn's float32 kernels: the elementwise
# passes (y, dx) and the backward's dot sum(dy * (x - mean)) run in float32 around the mean
# split into a float32 value and its remainder, in blocks of at most 32 terms per lane
# summed in double, and sum(dy) four values per lane in float32 before double (AVX-512
# NCHW blocks); the statistics stay in double (no bound32 term). 16 float32 units of
# rounding, the float32 contract's 4 * 2**-23 on dweight and dbias (tests/contract.py); the
# docs/math.rst bar is 8 on y.
REL32 = 16 * 2.0 ** -24


def _channel_axis(layout, ndim):
    return 1 if layout == "NCHW" else ndim - 1


def _bc(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


# the small cases of tests/cases.py (every ndim, C = 1, HW = 1, odd channel counts)
SMALL_CASES = [c for c in CASES if np.prod(c.nchw) <= 4096]


@st.composite
def shapes(draw, min_values=0):
    if draw(st.integers(0, 3)) == 0:               # one of the shared cases
        case = draw(st.sampled_from(SMALL_CASES))
        return case.shape, case.layout
    ndim = draw(st.integers(2, 5))
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    dims = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    if draw(st.integers(0, 9)) == 0:               # occasional size-0 axis
        dims[draw(st.integers(0, ndim - 1))] = 0
    axis = _channel_axis(layout, ndim)
    dims[axis] = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 17]))
    if draw(st.booleans()):                         # occasional longer batch axis
        dims[0] = draw(st.integers(1, 40))
    return tuple(dims), layout


def _arrange(draw, a, writable=True):
    """a, laid out in a random memory order (C, Fortran, permuted, sliced, reversed)."""
    kind = draw(st.sampled_from(["C", "F", "perm", "slice", "reverse", "readonly"]))
    if kind == "F":
        a = np.asfortranarray(a)
    elif kind == "perm":
        p = draw(st.permutations(range(a.ndim)))
        a = np.ascontiguousarray(a.transpose(p)).transpose(np.argsort(p))
    elif kind == "slice":
        ax = draw(st.integers(0, a.ndim - 1))
        shape = list(a.shape)
        shape[ax] *= 2
        big = np.full(shape, np.nan, dtype=a.dtype)
        idx = [slice(None)] * a.ndim
        idx[ax] = slice(None, None, 2)
        big[tuple(idx)] = a
        a = big[tuple(idx)]
    elif kind == "reverse":
        ax = draw(st.integers(0, a.ndim - 1))
        idx = [slice(None)] * a.ndim
        idx[ax] = slice(None, None, -1)
        a = np.ascontiguousarray(a[tuple(idx)])[tuple(idx)]
    else:
        a = np.ascontiguousarray(a)
    if kind == "readonly" and not writable:
        a.flags.writeable = False
    return a


@st.composite
def data_arrays(draw, shape, dtype, layout, special=True):
    """Per-channel offset + scale * noise, optionally with NaN/inf sprinkled in."""
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from(SCALES[dtype]))
    offset = draw(st.sampled_from([0.0, 0.0, 1.0, 1e4, 1e6]))
    axis = _channel_axis(layout, len(shape))
    C = shape[axis]
    centres = offset * scale * (1 + rng.random(C))
    kind = draw(st.sampled_from(["normal", "normal", "uniform", "ints", "constant"]))
    if kind == "normal":
        noise = rng.normal(size=shape)
    elif kind == "uniform":
        noise = rng.uniform(-1, 1, size=shape) * 10.0 ** rng.integers(-3, 4, size=shape)
    elif kind == "ints":
        noise = rng.integers(-3, 4, size=shape).astype(np.float64)
    else:
        noise = np.zeros(shape)
    a = (_bc(centres, len(shape), axis) + scale * noise).astype(dtype)
    if special and a.size and draw(st.integers(0, 4)) == 0:
        for _ in range(draw(st.integers(1, 3))):
            pos = tuple(int(rng.integers(0, s)) for s in shape)
            a[pos] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return a


@st.composite
def vectors(draw, C, lo=-3.0, hi=3.0, positive=False, allow_none=True, big=False):
    if allow_none and draw(st.integers(0, 3)) == 0:
        return None
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    v = rng.uniform(lo, hi, size=C)
    if positive:
        v = np.abs(v) + draw(st.sampled_from([0.0, 1e-3, 0.5]))
    elif C and draw(st.integers(0, 5)) == 0:
        v[rng.integers(0, C)] = 0.0
    dtype = np.float64 if big else draw(st.sampled_from([np.float32, np.float64]))
    return v.astype(dtype)


def _spacing(ref, dtype):
    with np.errstate(invalid="ignore"):
        return np.spacing(np.abs(np.where(np.isfinite(ref), ref, 0)).astype(dtype)).astype(
            np.float64)


def _assert_close(name, got, ref, bound, dtype, skip=None, ulps=2, bound32=None):
    """got == ref within ulps of dtype + REL64 * bound (+ REL32 * bound32, the float32
    accumulation allowance); identical non-finiteness."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, name
    with np.errstate(invalid="ignore", over="ignore"):
        tol = ulps * _spacing(ref, dtype) + REL64 * np.asarray(bound, dtype=np.float64)
        if bound32 is not None:
            tol = tol + REL32 * np.asarray(bound32, dtype=np.float64)
        check = np.ones(ref.shape, bool) if skip is None else ~skip
        fin_r, fin_g = np.isfinite(ref), np.isfinite(got)
        # a finite reference may round to infinity within the tolerance (a float32 running
        # mean of huge float64 data: an error of 1e-16 * max|x| is already past 3.4e38)
        may_overflow = fin_r & np.isinf(got) & (np.abs(ref) + tol >= np.finfo(dtype).max)
        bad = check & (fin_r != fin_g) & ~may_overflow
        assert not bad.any(), f"{name}: finiteness differs at {np.argwhere(bad)[:5].tolist()}: " \
            f"got {got[bad][:5]}, reference {ref[bad][:5]}"
        both = check & fin_r & fin_g
        err = np.where(both, np.abs(got - ref), 0)
        over = both & ~(err <= tol)
    assert not over.any(), f"{name}: max error {err[over].max()} (tolerance " \
        f"{tol[over][np.argmax(err[over])]}) at {np.argwhere(over)[:3].tolist()}"


def _call_both(fn, args, kwargs, ref_args, ref_kwargs):
    """(fast result or exception, reference result or exception)."""
    res = []
    for f, a, k in ((getattr(fastbn, fn), args, kwargs),
                    (getattr(reference, fn), ref_args, ref_kwargs)):
        try:
            # invalid-operation warnings are not part of the contract (the kernels raise
            # none); the values are compared below
            with np.errstate(all="ignore"):
                res.append(f(*a, **k))
        except (TypeError, ValueError) as e:
            res.append(e)
    return res


def _degenerate(var_r, xmax, eps):
    """Channels whose normalization is ill-conditioned by construction: a variance within
    the float64 reference's rounding noise for data of that size (a constant channel of
    1.5e150 has a reference variance of 3e268), where that noise is not negligible against
    eps."""
    with np.errstate(invalid="ignore", over="ignore"):
        noise = np.maximum((1e-12 * xmax) ** 2, 1e-290)
        return ~(var_r > noise) & ~(noise * 1e6 < eps)


def _channel_max(a, layout, centre=None):
    """Per-channel max |a| (or max |a - centre|) over the finite values."""
    axis = _channel_axis(layout, a.ndim)
    red = tuple(i for i in range(a.ndim) if i != axis)
    a = a.astype(np.float64)
    with np.errstate(invalid="ignore"):
        if centre is not None:
            a = a - _bc(np.where(np.isfinite(centre), centre, 0), a.ndim, axis)
        return np.abs(np.where(np.isfinite(a), a, 0)).max(axis=red, initial=0)


def _draw_input(data):
    """A shape, layout and dtype, an input x0 of them, its channel axis and channel count."""
    shape, layout = data.draw(shapes())
    dtype = data.draw(st.sampled_from(DTYPES))
    x0 = data.draw(data_arrays(shape, dtype, layout))
    axis = _channel_axis(layout, len(shape))
    return shape, layout, dtype, x0, axis, shape[axis]


def _draw_out(data, shape, dtype, operand=None):
    """The out= argument: None, a fresh array in some memory order, or (when given, for an
    in-place call) the input operand itself."""
    kind = data.draw(st.sampled_from([None, "fresh", "operand"] if operand is not None
                                     else [None, "fresh"]))
    if kind == "fresh":
        out = _arrange(data.draw, np.full(shape, -7.0, dtype=dtype))
        out.flags.writeable = True
        return out
    return operand if kind == "operand" else None


@SETTINGS
@given(st.data())
def test_train_matches_reference(data):
    shape, layout, dtype, x0, axis, C = _draw_input(data)
    inplace = data.draw(st.integers(0, 4)) == 0
    x = _arrange(data.draw, x0.copy(), writable=inplace)
    w = data.draw(vectors(C))
    b = data.draw(vectors(C, -1e3, 1e3))
    eps = data.draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    momentum = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    running = data.draw(st.booleans())
    rdt = data.draw(st.sampled_from(DTYPES)) if running else None
    rm = np.linspace(-1, 1, C).astype(rdt) if running else None
    rv = np.linspace(0.5, 2, C).astype(rdt) if running else None
    out = _draw_out(data, shape, dtype, x if inplace else None)
    nt = data.draw(st.sampled_from([None, 1, 2]))
    kw = dict(weight=w, bias=b, eps=eps, layout=layout, momentum=momentum, num_threads=nt)
    rkw = dict(kw, running_mean=None if rm is None else rm.copy(),
               running_var=None if rv is None else rv.copy())
    fast, ref = _call_both("batch_norm_train", [x], dict(kw, running_mean=rm, running_var=rv,
                                                         out=out),
                           [x0.copy()], rkw)
    if isinstance(ref, Exception):
        if C == 0 and not isinstance(fast, Exception):
            # no channels: fastbn returns empty results (the reference rejects the call)
            assert fast[0].shape == shape and fast[1].shape == fast[2].shape == (0,)
            return
        assert type(fast) is type(ref), (fast, ref)
        assert str(ref).split()[0] in str(fast)
        return
    assert not isinstance(fast, Exception), fast
    y, mean, invstd = fast
    yr, mr, ir = ref
    if out is not None:
        assert y is out
    assert y.shape == shape and y.dtype == dtype
    assert mean.dtype == invstd.dtype == np.float64 and mean.shape == invstd.shape == (C,)
    xmax = _channel_max(x0, layout)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        var_r = 1.0 / ir ** 2 - eps
        degen = _degenerate(var_r, xmax, eps)
        kappa = xmax * ir
        wv = np.ones(C) if w is None else w.astype(np.float64)
        bv = np.zeros(C) if b is None else b.astype(np.float64)
        # the mean carries an error relative to the channel's largest |x|, not to |mean|
        ybound = (np.abs(x0.astype(np.float64)) + _bc(np.abs(mr) + xmax, x0.ndim, axis)) \
            * _bc(np.abs(wv) * ir, x0.ndim, axis) + _bc(np.abs(bv), x0.ndim, axis)
    b32 = {}
    if dtype == np.float32:
        spread = _channel_max(x0, layout, centre=mr)
        with np.errstate(invalid="ignore", over="ignore"):
            xc = np.abs(x0.astype(np.float64) - _bc(mr, x0.ndim, axis))
            # the statistics and running statistics are computed in double: no allowance
            b32 = dict(y=(xc + _bc(spread, x0.ndim, axis)) * _bc(np.abs(wv) * ir, x0.ndim, axis))
    skip_y = np.broadcast_to(degen.reshape(_bc(degen, x0.ndim, axis).shape), shape)
    _assert_close("mean", mean, mr, 10 * xmax, np.float64, bound32=b32.get("mean"))
    _assert_close("invstd", invstd, ir, ir * (1 + kappa) * 10, np.float64, skip=degen,
                  bound32=b32.get("invstd"))
    _assert_close("y", y, yr, ybound, dtype, skip=skip_y, bound32=b32.get("y"))
    if running:
        _assert_close("running_mean", rm, rkw["running_mean"], 10 * xmax + 1, rdt,
                      bound32=b32.get("rm"))
        with np.errstate(over="ignore", invalid="ignore"):
            vbound = 10 * (xmax ** 2 * (1 + kappa)) + 2
        _assert_close("running_var", rv, rkw["running_var"], vbound, rdt, skip=degen,
                      bound32=b32.get("rv"))
    if not inplace:
        np.testing.assert_array_equal(x, x0)


@SETTINGS
@given(st.data())
def test_infer_matches_reference(data):
    shape, layout, dtype, x0, axis, C = _draw_input(data)
    inplace = data.draw(st.integers(0, 4)) == 0
    x = _arrange(data.draw, x0.copy(), writable=inplace)
    xmax = _channel_max(x0, layout)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    big = bool(xmax.max(initial=0) > 1e15 or 0 < xmax.max(initial=0) < 1e-15)
    rm = (xmax * rng.uniform(-1, 1, C)).astype(np.float64 if big else
                                               data.draw(st.sampled_from(DTYPES)))
    rv = ((xmax + 1e-300) * rng.uniform(0.1, 10, C)) ** 2
    if C and data.draw(st.integers(0, 5)) == 0:
        rv[rng.integers(0, C)] = 0.0
    w = data.draw(vectors(C))
    b = data.draw(vectors(C, -1e3, 1e3))
    eps = data.draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    out = _draw_out(data, shape, dtype, x if inplace else None)
    kw = dict(weight=w, bias=b, eps=eps, layout=layout,
              num_threads=data.draw(st.sampled_from([None, 1, 2])))
    fast, ref = _call_both("batch_norm_infer", [x, rm, rv], dict(kw, out=out),
                           [x0.copy(), rm, rv], kw)
    if isinstance(ref, Exception):
        assert type(fast) is type(ref), (fast, ref)
        return
    assert not isinstance(fast, Exception), fast
    assert fast.shape == shape and fast.dtype == dtype
    if out is not None:
        assert fast is out
    wv = np.ones(C) if w is None else w.astype(np.float64)
    bv = np.zeros(C) if b is None else b.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sc = np.abs(wv) / np.sqrt(rv + eps)
        bound = (np.abs(x0.astype(np.float64)) + _bc(np.abs(rm), x0.ndim, axis)) \
            * _bc(sc, x0.ndim, axis) + _bc(np.abs(bv), x0.ndim, axis)
    _assert_close("y", fast, ref, bound, dtype)


@SETTINGS
@given(st.data())
def test_backward_matches_reference(data):
    shape, layout, dtype, x0, axis, C = _draw_input(data)
    g0 = data.draw(data_arrays(shape, dtype, layout, special=data.draw(st.booleans())))
    inplace = data.draw(st.integers(0, 4)) == 0
    x = _arrange(data.draw, x0.copy(), writable=False)
    g = _arrange(data.draw, g0.copy(), writable=inplace)
    training = data.draw(st.booleans())
    xmax = _channel_max(x0, layout)
    if data.draw(st.booleans()) and x0.size and np.prod(shape) // max(C, 1) > 1:
        _, mean, invstd = reference.batch_norm_train(x0, layout=layout, eps=1e-5)
    else:
        rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
        mean = xmax * rng.uniform(-1, 1, C)
        invstd = 1.0 / ((xmax + 1e-300) * rng.uniform(0.1, 10, C))
    w = data.draw(vectors(C))
    out = _draw_out(data, shape, dtype, g if inplace else None)
    kw = dict(training=training, layout=layout,
              num_threads=data.draw(st.sampled_from([None, 1, 2])))
    fast, ref = _call_both("batch_norm_backward", [g, x, mean, invstd, w], dict(kw, out=out),
                           [g0.copy(), x0.copy(), mean, invstd, w], kw)
    if isinstance(ref, Exception):
        assert type(fast) is type(ref), (fast, ref)
        return
    assert not isinstance(fast, Exception), fast
    dx, dw, db = fast
    dxr, dwr, dbr = ref
    if out is not None:
        assert dx is out
    assert dx.shape == shape and dx.dtype == dw.dtype == db.dtype == dtype
    wv = np.ones(C) if w is None else w.astype(np.float64)
    red = tuple(i for i in range(len(shape)) if i != axis)
    m = x0.size // C if C else 0
    nd = len(shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ag = np.abs(g0.astype(np.float64))
        axc = np.abs(x0.astype(np.float64)) + _bc(np.abs(mean), nd, axis)
        sg = ag.sum(axis=red)
        sd = (ag * axc).sum(axis=red)
        ist = np.abs(invstd)
        if training and m:
            inner = ag + _bc(sg / m, nd, axis) + axc * _bc(sd / m * ist * ist, nd, axis)
        else:
            inner = ag
        dxbound = inner * _bc(np.abs(wv) * ist, nd, axis)
        b32 = {}
        if dtype == np.float32:
            xc = np.abs(x0.astype(np.float64) - _bc(mean, nd, axis))
            sdc = (ag * xc).sum(axis=red)
            inner32 = (_bc(sg / m, nd, axis) + xc * _bc(sdc / m * ist * ist, nd, axis)
                       if training and m else 0 * ag)
            # the float32 contract: dbias and dweight within REL32 = 4 * 2**-23 of the sum of
            # their terms' magnitudes (sum(dy) and the dot may be summed in float32 lanes)
            b32 = dict(db=sg, dw=sdc * ist, dx=inner32 * _bc(np.abs(wv) * ist, nd, axis))
    _assert_close("dbias", db, dbr, sg, dtype, bound32=b32.get("db"))
    _assert_close("dweight", dw, dwr, sd * ist, dtype, bound32=b32.get("dw"))
    # training=False: dx = dy * invstd * weight does not involve x (a NaN in x stays out)
    _assert_close("dx", dx, dxr, dxbound, dtype, bound32=b32.get("dx"))
    np.testing.assert_array_equal(x, x0)


@SETTINGS
@given(st.data())
def test_fold_matches_reference_and_infer(data):
    C = data.draw(st.integers(0, 9))
    rm = data.draw(vectors(C, -1e3, 1e3, allow_none=False))
    rv = data.draw(vectors(C, 0, 1e3, positive=True, allow_none=False))
    w = data.draw(vectors(C))
    b = data.draw(vectors(C))
    eps = data.draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    scale, shift = fastbn.fold_batch_norm(rm, rv, w, b, eps=eps)
    sr, hr = reference.fold_batch_norm(rm, rv, w, b, eps=eps)
    assert scale.dtype == sr.dtype and shift.dtype == hr.dtype
    np.testing.assert_array_equal(scale, sr)
    # the reference folds from the definition (shift = y(0)), fastbn as bias - mean * scale:
    # a few roundings apart, relative to the terms that cancel
    if C:
        w64 = np.ones(C) if w is None else np.asarray(w, np.float64)
        b64 = np.zeros(C) if b is None else np.asarray(b, np.float64)
        terms = np.abs(b64) + np.abs(np.asarray(rm, np.float64) * w64 / np.sqrt(
            np.asarray(rv, np.float64) + eps))
        bound = 4 * np.finfo(shift.dtype).eps * terms
        with np.errstate(invalid="ignore"):
            diff = np.abs(shift.astype(np.float64) - hr.astype(np.float64))
        assert np.all((diff <= bound) | (np.isnan(shift) & np.isnan(hr))
                      | (shift == hr)), (shift, hr)
    # folding is inference: x * scale + shift == batch_norm_infer(x) (up to roundings)
    if C and np.all(rv + eps > 0):
        x = np.random.default_rng(C).normal(size=(3, C))
        y = fastbn.batch_norm_infer(x, rm, rv, w, b, eps=eps)
        yf = x * scale.astype(np.float64) + shift.astype(np.float64)
        np.testing.assert_allclose(y, yf, rtol=1e-5, atol=1e-5 * (1 + np.abs(yf).max()))


# Range regressions: float32 data whose squared deviations or products dy * (x - mean) leave
# float32's range (spread above ~1.8e19 or below ~1e-19) must still be accumulated correctly
# (a float32-lane accumulation gave var = inf, invstd = 0, y == bias, or dweight = NaN), and a
# float64 mean above ~1.3e154 must not overflow the merge of block statistics.

@pytest.mark.parametrize("layout, shape", [("NCHW", (4, 2, 8, 8)), ("NHWC", (4, 8, 8, 2))])
def test_float32_large_spread_train(layout, shape):
    x = (np.random.default_rng(0).normal(size=shape) * 1e20).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout)
    yr, mr, ir = reference.batch_norm_train(x, layout=layout)
    np.testing.assert_allclose(invstd, ir, rtol=1e-5)
    np.testing.assert_allclose(y, yr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout, shape", [("NCHW", (4, 2, 8, 8)), ("NHWC", (4, 8, 8, 2))])
def test_float32_tiny_spread_train_eps0(layout, shape):
    x = (np.random.default_rng(0).normal(size=shape) * 1e-22).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout, eps=0.0)
    yr, mr, ir = reference.batch_norm_train(x, layout=layout, eps=0.0)
    np.testing.assert_allclose(invstd, ir, rtol=1e-5)
    np.testing.assert_allclose(y, yr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout, shape", [("NCHW", (4, 2, 8, 8)), ("NHWC", (4, 8, 8, 2))])
def test_float32_large_products_backward(layout, shape):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 1e20).astype(np.float32)
    g = (rng.normal(size=shape) * 1e20).astype(np.float32)
    C = shape[1] if layout == "NCHW" else shape[-1]
    mean, invstd = np.zeros(C), np.full(C, 1e-40)
    got = fastbn.batch_norm_backward(g, x, mean, invstd, layout=layout)
    want = reference.batch_norm_backward(g, x, mean, invstd, layout=layout)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 1), (1, 1, 3), (4, 3, 5)])
def test_float64_huge_mean_train(shape):
    x = 1.6e154 + 1e152 * np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    y, mean, invstd = fastbn.batch_norm_train(x)
    yr, mr, ir = reference.batch_norm_train(x)
    np.testing.assert_allclose(invstd, ir, rtol=1e-10)
    np.testing.assert_allclose(y, yr, rtol=1e-8, atol=1e-8)
