"""Bad-input battery for every public entry point.

Each case builds fresh arguments, calls the function, and checks the exception type, that
the message names the offending argument, and that every array the caller passed (inputs,
running buffers, out=) is bit-for-bit unchanged afterwards.
"""
import re

import numpy as np
import pytest

import fastbn
from fastbn import reference
from conftest import Snapshot

N, C, H, W = 4, 3, 2, 5


def _x(dtype=np.float32, shape=(N, C, H, W), seed=0):
    """Test data of the given dtype. Integer types get rounded values through int64
    (integer casts wrap silently): a negative float cast to an unsigned type is undefined
    in C, and NumPy warns about it on some CPUs (64-bit ARM), which this suite turns into
    an error."""
    x = np.random.default_rng(seed).normal(3.0, 2.0, size=shape)
    if dtype is not object and np.dtype(dtype).kind in "iub":
        x = np.round(x).astype(np.int64)
    return x.astype(dtype)


def _vec(c=C, dtype=np.float64, seed=1, positive=False):
    v = np.random.default_rng(seed).normal(size=c).astype(dtype)
    return np.abs(v) + 0.5 if positive else v


def _readonly(a):
    a.flags.writeable = False
    return a


def _overlapping(x):
    """An array of x's shape and dtype that partially overlaps x (shifted by one element)."""
    buf = np.zeros(x.size + 1, dtype=x.dtype)
    buf[:-1] = x.ravel()
    xv = buf[:-1].reshape(x.shape)
    return xv, buf[1:].reshape(x.shape)


def _restrided(x):
    """x's own memory seen with other strides (same bytes, not the same view)."""
    i = x.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        x, shape=x.shape, strides=(x.strides[0], x.strides[1], i, i * x.shape[2]))


def _self_overlapping(shape, kind, dtype=np.float32):
    """A writable view of `shape` whose elements share memory: a zero stride, a stride of
    half an element, or strides that interleave two axes."""
    item = np.dtype(dtype).itemsize
    base = np.zeros(4 * int(np.prod(shape)) + 8, dtype)
    if kind == "zero":
        strides = (0,) * len(shape)
    elif kind == "half":
        strides = tuple(item // 2 * int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    else:                      # axis 0 steps by 2 elements, the last by 1: shape >= 3 wide
        strides = (2 * item,) + (item * 7,) * (len(shape) - 2) + (item,)
    return np.lib.stride_tricks.as_strided(base, shape=shape, strides=strides,
                                           writeable=True)


def _train_args(**kw):
    x = kw.pop("x", None)
    x = _x() if x is None else x
    args = [x]
    kwargs = dict(weight=_vec(seed=2), bias=_vec(seed=3), running_mean=_vec(seed=4),
                  running_var=_vec(seed=5, positive=True))
    kwargs.update(kw)
    return args, kwargs


def _infer_args(**kw):
    x = kw.pop("x", None)
    x = _x() if x is None else x
    rm = kw.pop("running_mean", _vec(seed=4))
    rv = kw.pop("running_var", _vec(seed=5, positive=True))
    kwargs = dict(weight=_vec(seed=2), bias=_vec(seed=3))
    kwargs.update(kw)
    return [x, rm, rv], kwargs


def _backward_args(**kw):
    x = kw.pop("x", None)
    x = _x() if x is None else x
    dy = kw.pop("dy", None)
    if dy is None:
        dy = _x(x.dtype, x.shape, seed=9) if isinstance(x, np.ndarray) else _x(seed=9)
    mean = kw.pop("mean", _vec(seed=6))
    invstd = kw.pop("invstd", _vec(seed=7, positive=True))
    kwargs = dict(weight=_vec(seed=2))
    kwargs.update(kw)
    return [dy, x, mean, invstd], kwargs


def _like(x, seed):
    """A default array shaped like x (the fused functions' residual, y, dresidual), or None
    when x is not a float array to be like."""
    if isinstance(x, np.ndarray) and not isinstance(x, np.ma.MaskedArray) and \
            x.dtype.kind == "f":
        return _x(x.dtype, x.shape, seed=seed)
    return None


def _relu_train_args(**kw):
    x = kw.get("x")
    x = _x() if x is None else x
    kw.setdefault("residual", _like(x, 11))
    return _train_args(**dict(kw, x=x))


def _relu_infer_args(**kw):
    x = kw.get("x")
    x = _x() if x is None else x
    kw.setdefault("residual", _like(x, 11))
    return _infer_args(**dict(kw, x=x))


def _relu_backward_args(**kw):
    x = kw.get("x")
    x = _x() if x is None else x
    y = kw.pop("y", None)
    y = _like(x, 12) if y is None else y
    kw.setdefault("dresidual", _like(x, 13))
    args, kwargs = _backward_args(**dict(kw, x=x))
    return [args[0], y] + args[1:], kwargs


def _fold_args(**kw):
    rm = kw.pop("running_mean", _vec(seed=4))
    rv = kw.pop("running_var", _vec(seed=5, positive=True))
    kwargs = dict(weight=_vec(seed=2), bias=_vec(seed=3))
    kwargs.update(kw)
    return [rm, rv], kwargs


BUILDERS = {
    "batch_norm_train": _train_args,
    "batch_norm_infer": _infer_args,
    "batch_norm_backward": _backward_args,
    "fold_batch_norm": _fold_args,
    "batch_norm_relu_train": _relu_train_args,
    "batch_norm_relu_infer": _relu_infer_args,
    "batch_norm_relu_backward": _relu_backward_args,
}

TRAIN = ("batch_norm_train", "batch_norm_relu_train")
INFER = ("batch_norm_infer", "batch_norm_relu_infer")
BACKWARD = ("batch_norm_backward", "batch_norm_relu_backward")

# 2-byte types that are not float16 or bfloat16 stay refused
BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object,
              np.int16, np.uint16, "V2"]


def _cases():
    """(id, function name, builder kwargs (callable -> dict), exception, argument name)."""
    cases = []

    def add(fn, cid, make, exc, name):
        for impl in ("fastbn", "reference"):
            cases.append(pytest.param(impl, fn, make, exc, name, id=f"{fn}-{cid}-{impl}"))

    data_fns = TRAIN + INFER + BACKWARD
    for fn in data_fns:
        for dt in BAD_DTYPES:
            add(fn, f"x-{np.dtype(dt).name}", lambda dt=dt: {"x": _x(dt)}, TypeError, "x")
        add(fn, "x-0d", lambda: {"x": np.float32(1.0)}, ValueError, "x")
        add(fn, "x-1d", lambda: {"x": _x(shape=(12,))}, ValueError, "x")
        add(fn, "x-str", lambda: {"x": "abc"}, TypeError, "x")
        for layout in ("NWHC", "nchw", "", None, 1):
            add(fn, f"layout-{layout!r}", lambda layout=layout: {"layout": layout},
                ValueError, "layout")
        for n in (0, -1):
            add(fn, f"num_threads-{n}", lambda n=n: {"num_threads": n}, ValueError,
                "num_threads")
        for n in (1.5, "2", True):
            add(fn, f"num_threads-{n!r}", lambda n=n: {"num_threads": n}, TypeError,
                "num_threads")
        # out=
        add(fn, "out-shape", lambda: {"out": np.zeros((N, C, H, W + 1), np.float32)},
            ValueError, "out")
        add(fn, "out-shape-transposed",
            lambda: {"out": np.zeros((N, W, H, C), np.float32)}, ValueError, "out")
        add(fn, "out-dtype", lambda: {"out": np.zeros((N, C, H, W), np.float64)},
            ValueError, "out")
        add(fn, "out-dtype-int", lambda: {"out": np.zeros((N, C, H, W), np.int32)},
            ValueError, "out")
        add(fn, "out-readonly", lambda: {"out": _readonly(np.zeros((N, C, H, W), np.float32))},
            ValueError, "out")
        add(fn, "out-list", lambda: {"out": np.zeros((N, C, H, W)).tolist()}, TypeError, "out")
        # outputs whose elements alias each other, byte-swapped outputs, masked arrays
        add(fn, "out-zero-stride", lambda: {"out": _self_overlapping((N, C, H, W), "zero")},
            ValueError, "out")
        add(fn, "out-half-stride", lambda: {"out": _self_overlapping((N, C, H, W), "half")},
            ValueError, "out")
        add(fn, "out-interleaved", lambda: {"out": _self_overlapping((N, C, H, W), "mixed")},
            ValueError, "out")
        add(fn, "out-byteswapped", lambda: {"out": np.zeros((N, C, H, W), ">f4")},
            ValueError, "out")
        add(fn, "out-masked", lambda: {"out": np.ma.zeros((N, C, H, W), np.float32)},
            TypeError, "out")
        add(fn, "x-masked", lambda: {"x": np.ma.masked_greater(_x(), 4.0)}, TypeError, "x")
        for wname in ("weight", "bias") if fn not in BACKWARD else ("weight",):
            add(fn, f"{wname}-len-short", lambda w=wname: {w: _vec(C - 1)}, ValueError, wname)
            add(fn, f"{wname}-len-long", lambda w=wname: {w: _vec(C + 1)}, ValueError, wname)
            add(fn, f"{wname}-2d", lambda w=wname: {w: _vec().reshape(1, C)}, ValueError, wname)
            add(fn, f"{wname}-0d", lambda w=wname: {w: np.float64(1.0)}, ValueError, wname)
            add(fn, f"{wname}-int", lambda w=wname: {w: np.arange(C)}, TypeError, wname)
            add(fn, f"{wname}-complex", lambda w=wname: {w: _vec().astype(complex)},
                TypeError, wname)
            add(fn, f"{wname}-masked", lambda w=wname: {w: np.ma.masked_less(_vec(), 0)},
                TypeError, wname)
    # eps (every function that takes it)
    for fn in TRAIN + INFER + ("fold_batch_norm",):
        for e in (-1e-5, -np.inf, np.inf, np.nan, 10 ** 400, np.array(-1.0)):
            label = "10**400" if isinstance(e, int) else repr(e)
            add(fn, f"eps-{label}", lambda e=e: {"eps": e}, ValueError, "eps")
        for e in ("1e-5", None, 1j, [1e-5]):
            add(fn, f"eps-{e!r}", lambda e=e: {"eps": e}, TypeError, "eps")

    # batch_norm_train only
    for fn in TRAIN:
        for m in (-0.1, 1.1, np.nan, np.inf):
            add(fn, f"momentum-{m}", lambda m=m: {"momentum": m}, ValueError, "momentum")
        for m in ("0.1", None):
            add(fn, f"momentum-{m!r}", lambda m=m: {"momentum": m}, TypeError, "momentum")
        add(fn, "only-running_mean", lambda: {"running_var": None}, ValueError, "running_var")
        add(fn, "only-running_var", lambda: {"running_mean": None}, ValueError, "running_mean")
        for rname in ("running_mean", "running_var"):
            add(fn, f"{rname}-readonly", lambda r=rname: {r: _readonly(_vec(positive=True))},
                ValueError, rname)
            add(fn, f"{rname}-int", lambda r=rname: {r: np.ones(C, dtype=np.int64)}, TypeError, rname)
            add(fn, f"{rname}-bool", lambda r=rname: {r: np.ones(C, dtype=bool)}, TypeError, rname)
            add(fn, f"{rname}-list", lambda r=rname: {r: [1.0] * C}, TypeError, rname)
            add(fn, f"{rname}-len", lambda r=rname: {r: _vec(C + 1, positive=True)}, ValueError, rname)
            add(fn, f"{rname}-2d", lambda r=rname: {r: _vec(positive=True).reshape(C, 1)},
                ValueError, rname)
            add(fn, f"{rname}-zero-stride", lambda r=rname: {r: _self_overlapping((C,), "zero")},
                ValueError, rname)
            add(fn, f"{rname}-masked", lambda r=rname: {r: np.ma.ones(C)}, TypeError, rname)
        add(fn, "running-shared", lambda: (lambda v: {"running_mean": v, "running_var": v})(
            _vec(positive=True)), ValueError, "running_mean")
        # empty batches and one value per channel in training
        add(fn, "empty-batch", lambda: {"x": np.zeros((0, C, H, W), np.float32)}, ValueError, "x")
        add(fn, "empty-spatial", lambda: {"x": np.zeros((N, C, 0), np.float32)}, ValueError, "x")
        add(fn, "one-value-NC", lambda: {"x": _x(shape=(1, C))}, ValueError, "x")
        add(fn, "one-value-NCHW", lambda: {"x": _x(shape=(1, C, 1, 1))}, ValueError, "x")
        add(fn, "one-value-NHWC",
            lambda: {"x": _x(shape=(1, 1, 1, C)), "layout": "NHWC"}, ValueError, "x")
        add(fn, "one-value-NCL-f64", lambda: {"x": _x(np.float64, shape=(1, C, 1))}, ValueError, "x")
        add(fn, "one-value-inplace",
            lambda: (lambda x: {"x": x, "out": x})(_x(shape=(1, C, 1))), ValueError, "x")
        # in-place call rejected late: x (= out) must survive
        add(fn, "inplace-bad-momentum",
            lambda: (lambda x: {"x": x, "out": x, "momentum": 2.0})(_x()), ValueError, "momentum")
        add(fn, "inplace-bad-eps",
            lambda: (lambda x: {"x": x, "out": x, "eps": -1.0})(_x()), ValueError, "eps")
        add(fn, "inplace-bad-weight",
            lambda: (lambda x: {"x": x, "out": x, "weight": _vec(C + 2)})(_x()), ValueError, "weight")
        add(fn, "out-overlaps-running_mean",
            lambda: (lambda o: {"out": o, "running_mean": o[0, :, 0, 0]})(
                np.zeros((N, C, H, W), np.float32)), ValueError, "out")

    # out partial overlap with x (train/infer) and with dy or any overlap with x (backward)
    for fn in TRAIN + INFER:
        add(fn, "out-partial-overlap-x",
            lambda: dict(zip(("x", "out"), _overlapping(_x()))), ValueError, "out")
        add(fn, "out-overlaps-weight",
            lambda: (lambda o: {"out": o, "weight": o[0, :, 0, 0]})(
                np.zeros((N, C, H, W), np.float32)), ValueError, "out")
        add(fn, "out-is-x-restrided", lambda: (lambda x: {"x": x, "out": _restrided(x)})(_x()),
            ValueError, "out")

    for fn in INFER:
        for rname in ("running_mean", "running_var"):
            add(fn, f"{rname}-None", lambda r=rname: {r: None}, ValueError, rname)
            add(fn, f"{rname}-len", lambda r=rname: {r: _vec(C - 1, positive=True)}, ValueError, rname)
            add(fn, f"{rname}-int", lambda r=rname: {r: np.ones(C, dtype=np.int64)}, TypeError, rname)
            add(fn, f"{rname}-complex", lambda r=rname: {r: np.ones(C, dtype=complex)},
                TypeError, rname)
        add(fn, "inplace-bad-eps",
            lambda: (lambda x: {"x": x, "out": x, "eps": np.nan})(_x()), ValueError, "eps")

    for fn in BACKWARD:
        add(fn, "dy-shape", lambda: {"dy": _x(shape=(N, C, H, W + 1))}, ValueError, "dy")
        add(fn, "dy-transposed", lambda: {"dy": _x(shape=(N, C, W, H))}, ValueError, "dy")
        add(fn, "dy-dtype", lambda: {"dy": _x(np.float64)}, TypeError, "dy")
        for dt in BAD_DTYPES:
            add(fn, f"dy-{np.dtype(dt).name}", lambda dt=dt: {"dy": _x().astype(dt)}, TypeError, "dy")
        add(fn, "dy-1d", lambda: {"dy": _x(shape=(12,))}, ValueError, "dy")
        add(fn, "dy-masked", lambda: {"dy": np.ma.masked_greater(_x(seed=9), 4.0)}, TypeError, "dy")
        for t in ("False", "True", None, [], 0.0, 1, np.array([True])):
            add(fn, f"training-{t!r}", lambda t=t: {"training": t}, TypeError, "training")
        for vname in ("mean", "invstd"):
            add(fn, f"{vname}-len-short", lambda v=vname: {v: _vec(C - 1)}, ValueError, vname)
            add(fn, f"{vname}-len-long", lambda v=vname: {v: _vec(C + 1)}, ValueError, vname)
            add(fn, f"{vname}-2d", lambda v=vname: {v: _vec().reshape(1, C)}, ValueError, vname)
            add(fn, f"{vname}-None", lambda v=vname: {v: None}, ValueError, vname)
            add(fn, f"{vname}-int", lambda v=vname: {v: np.ones(C, dtype=np.int32)}, TypeError, vname)
        add(fn, "out-is-x", lambda: (lambda x: {"x": x, "out": x})(_x()), ValueError, "out")
        add(fn, "out-partial-overlap-dy",
            lambda: dict(zip(("dy", "out"), _overlapping(_x(seed=9)))), ValueError, "out")
        add(fn, "out-partial-overlap-x",
            lambda: dict(zip(("x", "out"), _overlapping(_x()))), ValueError, "out")
        add(fn, "out-overlaps-mean",
            lambda: (lambda o: {"out": o, "mean": o[0, :, 0, 0]})(
                np.zeros((N, C, H, W), np.float32)), ValueError, "out")
        add(fn, "inplace-bad-mean",
            lambda: (lambda g: {"dy": g, "out": g, "mean": _vec(C + 1)})(_x(seed=9)),
            ValueError, "mean")
        add(fn, "inplace-bad-layout",
            lambda: (lambda g: {"dy": g, "out": g, "layout": "CHWN"})(_x(seed=9)),
            ValueError, "layout")

    # the fused ReLU's residual (forward), y and dresidual (backward)
    for fn in ("batch_norm_relu_train", "batch_norm_relu_infer"):
        add(fn, "residual-shape", lambda: {"residual": _x(shape=(N, C, H, W + 1))}, ValueError,
            "residual")
        add(fn, "residual-transposed", lambda: {"residual": _x(shape=(N, C, W, H))}, ValueError,
            "residual")
        add(fn, "residual-1d", lambda: {"residual": _x(shape=(N * C * H * W,))}, ValueError,
            "residual")
        add(fn, "residual-dtype", lambda: {"residual": _x(np.float64)}, TypeError, "residual")
        add(fn, "residual-int", lambda: {"residual": _x().astype(np.int32)}, TypeError,
            "residual")
        add(fn, "residual-masked", lambda: {"residual": np.ma.masked_greater(_x(seed=11), 4.0)},
            TypeError, "residual")
        add(fn, "residual-str", lambda: {"residual": "abc"}, TypeError, "residual")
        add(fn, "out-partial-overlap-residual",
            lambda: dict(zip(("residual", "out"), _overlapping(_x(seed=11)))), ValueError, "out")
        add(fn, "out-is-residual-restrided",
            lambda: (lambda r: {"residual": r, "out": _restrided(r)})(_x(seed=11)),
            ValueError, "out")
        add(fn, "inplace-residual-bad-eps",
            lambda: (lambda r: {"residual": r, "out": r, "eps": -1.0})(_x(seed=11)),
            ValueError, "eps")
        add(fn, "inplace-residual-bad-weight",
            lambda: (lambda r: {"residual": r, "out": r, "weight": _vec(C + 1)})(_x(seed=11)),
            ValueError, "weight")
    add("batch_norm_relu_train", "inplace-residual-one-value",
        lambda: (lambda r: {"x": _x(shape=(1, C, 1)), "residual": r, "out": r})(
            _x(shape=(1, C, 1), seed=11)), ValueError, "x")
    fn = "batch_norm_relu_backward"
    add(fn, "y-shape", lambda: {"y": _x(shape=(N, C, H, W + 1))}, ValueError, "y")
    add(fn, "y-dtype", lambda: {"y": _x(np.float64)}, TypeError, "y")
    add(fn, "y-int", lambda: {"y": _x().astype(np.int8)}, TypeError, "y")
    add(fn, "y-masked", lambda: {"y": np.ma.masked_greater(_x(seed=12), 4.0)}, TypeError, "y")
    add(fn, "out-is-y", lambda: (lambda y: {"y": y, "out": y})(_x(seed=12)), ValueError, "out")
    add(fn, "dresidual-shape", lambda: {"dresidual": np.zeros((N, C, H, W + 1), np.float32)},
        ValueError, "dresidual")
    add(fn, "dresidual-dtype", lambda: {"dresidual": np.zeros((N, C, H, W))}, ValueError,
        "dresidual")
    add(fn, "dresidual-readonly",
        lambda: {"dresidual": _readonly(np.zeros((N, C, H, W), np.float32))}, ValueError,
        "dresidual")
    add(fn, "dresidual-list", lambda: {"dresidual": np.zeros((N, C, H, W)).tolist()},
        TypeError, "dresidual")
    add(fn, "dresidual-masked", lambda: {"dresidual": np.ma.zeros((N, C, H, W), np.float32)},
        TypeError, "dresidual")
    add(fn, "dresidual-byteswapped", lambda: {"dresidual": np.zeros((N, C, H, W), ">f4")},
        ValueError, "dresidual")
    add(fn, "dresidual-zero-stride",
        lambda: {"dresidual": _self_overlapping((N, C, H, W), "zero")}, ValueError, "dresidual")
    for other in ("dy", "x", "y"):
        add(fn, f"dresidual-is-{other}",
            lambda o=other: (lambda a: {o: a, "dresidual": a})(_x(seed=14)), ValueError,
            "dresidual")
    add(fn, "dresidual-partial-overlap-dy",
        lambda: dict(zip(("dy", "dresidual"), _overlapping(_x(seed=9)))), ValueError,
        "dresidual")
    add(fn, "dresidual-is-out",
        lambda: (lambda o: {"out": o, "dresidual": o})(np.zeros((N, C, H, W), np.float32)),
        ValueError, "dresidual")
    add(fn, "dresidual-overlaps-mean",
        lambda: (lambda o: {"dresidual": o, "mean": o[0, :, 0, 0]})(
            np.zeros((N, C, H, W), np.float32)), ValueError, "dresidual")
    add(fn, "inplace-dresidual-bad-mean",
        lambda: (lambda g: {"dy": g, "out": g, "mean": _vec(C + 1)})(_x(seed=9)),
        ValueError, "mean")

    fn = "fold_batch_norm"
    add(fn, "running_mean-2d", lambda: {"running_mean": _vec().reshape(1, C)}, ValueError,
        "running_mean")
    add(fn, "running_mean-0d", lambda: {"running_mean": np.float64(1.0)}, ValueError,
        "running_mean")
    add(fn, "running_mean-int", lambda: {"running_mean": np.arange(C)}, TypeError,
        "running_mean")
    add(fn, "running_var-len", lambda: {"running_var": _vec(C + 1, positive=True)}, ValueError,
        "running_var")
    add(fn, "running_var-bool", lambda: {"running_var": np.ones(C, bool)}, TypeError,
        "running_var")
    add(fn, "running_var-None", lambda: {"running_var": None}, ValueError, "running_var")
    for wname in ("weight", "bias"):
        add(fn, f"{wname}-len", lambda w=wname: {w: _vec(C - 1)}, ValueError, wname)
        add(fn, f"{wname}-int", lambda w=wname: {w: np.arange(C)}, TypeError, wname)
    return cases


@pytest.mark.parametrize("impl, fn, make, exc, name", _cases())
def test_bad_input(impl, fn, make, exc, name):
    module = fastbn if impl == "fastbn" else reference
    args, kwargs = BUILDERS[fn](**make())
    snap = Snapshot(args, kwargs)
    threads_before = fastbn.get_num_threads()
    with pytest.raises(exc) as info:
        getattr(module, fn)(*args, **kwargs)
    # the exact type, not a subclass, and a message that names the argument
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", str(info.value)), \
        f"message does not name {name!r}: {info.value}"
    snap.assert_unchanged()
    assert fastbn.get_num_threads() == threads_before


@pytest.mark.parametrize("n, exc", [(0, ValueError), (-4, ValueError), (1.0, TypeError),
                                    ("3", TypeError), (True, TypeError), ([2], TypeError)])
def test_set_num_threads_bad(n, exc):
    before = fastbn.get_num_threads()
    with pytest.raises(exc, match="num_threads"):
        fastbn.set_num_threads(n)
    assert fastbn.get_num_threads() == before


def test_huge_num_threads_is_capped_not_fatal():
    # a team of 10**5 threads crashed libgomp; 2**31 did not fit a C int
    x = _x(shape=(64, 2, 16, 32))
    ref = fastbn.batch_norm_train(x, num_threads=1)[0]
    for n in (10 ** 5, 2 ** 31 - 1, 2 ** 31, 10 ** 30):
        np.testing.assert_array_equal(fastbn.batch_norm_train(x, num_threads=n)[0], ref)
    fastbn.set_num_threads(10 ** 6)
    try:
        assert 1 <= fastbn.get_num_threads() < 10 ** 6
        np.testing.assert_array_equal(fastbn.batch_norm_train(x)[0], ref)
    finally:
        fastbn.set_num_threads(None)


# Edge inputs that are valid: they must work (and agree with the reference), not raise.

@pytest.mark.parametrize("shape, layout", [((2, C), "NCHW"), ((1, C, 2), "NCHW"),
                                           ((1, 2, C), "NHWC"), ((2, 1), "NCHW"),
                                           ((2, 1, 1, 1), "NHWC")])
def test_two_values_per_channel_is_enough(shape, layout):
    x = _x(shape=shape)
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout)
    yr, mr, ir = reference.batch_norm_train(x, layout=layout)
    np.testing.assert_allclose(y, yr, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean, mr, rtol=1e-12)


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1, 1), (0, C, 4)])
def test_infer_and_backward_accept_single_and_empty_batches(shape):
    x = _x(shape=shape)
    rm, rv = _vec(), _vec(positive=True)
    y = fastbn.batch_norm_infer(x, rm, rv)
    np.testing.assert_allclose(y, reference.batch_norm_infer(x, rm, rv), rtol=1e-6, atol=1e-6)
    dx, dw, db = fastbn.batch_norm_backward(np.ones_like(x), x, rm, rv, training=False)
    assert dx.shape == x.shape and dw.shape == db.shape == (C,)


def test_running_buffers_of_other_float_dtypes_are_updated():
    x = _x()
    for dt in (np.float32, np.float64):
        rm, rv = np.zeros(C, dt), np.ones(C, dt)
        fastbn.batch_norm_train(x, running_mean=rm, running_var=rv)
        assert rm.dtype == dt and np.all(rm != 0)


def test_readonly_and_list_inputs_are_accepted():
    x = _readonly(_x())
    snap = Snapshot(x)
    y, mean, invstd = fastbn.batch_norm_train(x, weight=[1.0, 2.0, 3.0])
    yr, _, _ = reference.batch_norm_train(x, weight=[1.0, 2.0, 3.0])
    np.testing.assert_allclose(y, yr, rtol=1e-5, atol=1e-5)
    y2 = fastbn.batch_norm_train(x.tolist())[0]
    assert y2.dtype == np.float64
    snap.assert_unchanged()


def test_plan_cache_distinguishes_dtypes():
    fastbn.batch_norm_train(np.zeros((2, 1)))                   # float64, strides (8, 8)
    x = np.arange(4, dtype=np.float32).reshape(2, 2)[:, ::2]    # float32, strides (8, 8)
    y, mean, invstd = fastbn.batch_norm_train(x)
    np.testing.assert_allclose(mean, [1.0])


# ---------------------------------------------------------------------------------------------
# Batch Renormalization, ONNX, conv+BN fusion, layers and Caffe layers
# ---------------------------------------------------------------------------------------------

def _renorm_args(**kw):
    x = kw.pop("x", None)
    x = _x() if x is None else x
    args = [x, kw.pop("weight", _vec(seed=2)), kw.pop("bias", _vec(seed=3)),
            kw.pop("running_mean", _vec(seed=4)), kw.pop("running_std", _vec(seed=5, positive=True))]
    return args, kw


def _renorm_bwd_args(**kw):
    x = kw.pop("x", None)
    x = _x() if x is None else x
    dy = kw.pop("dy", None)
    dy = _x(seed=9) if dy is None else dy
    args = [dy, x] + [kw.pop(n, _vec(seed=s, positive=True))
                      for n, s in (("mean", 6), ("std", 7), ("r", 8), ("d", 10))]
    args.append(kw.pop("weight", _vec(seed=2)))
    return args, kw


def _onnx_args(**kw):
    X = kw.pop("X", None)
    X = _x() if X is None else X
    args = [X] + [kw.pop(n, _vec(seed=s, positive=True))
                  for n, s in (("scale", 2), ("B", 3), ("input_mean", 4), ("input_var", 5))]
    return args, kw


def _fuse_args(**kw):
    w = kw.pop("weight", None)
    w = _x(np.float32, (C, 4, 3, 3)) if w is None else w
    args = [w] + [kw.pop(n, _vec(seed=s, positive=True))
                  for n, s in (("bias", 1), ("running_mean", 4), ("running_var", 5),
                               ("bn_weight", 2), ("bn_bias", 3))]
    args.append(kw.pop("eps", 1e-5))
    return args, kw


OTHER = {
    "batch_renorm_train": (lambda: fastbn.batch_renorm_train, _renorm_args),
    "batch_renorm_backward": (lambda: fastbn.batch_renorm_backward, _renorm_bwd_args),
    "reference.batch_renorm_train": (lambda: reference.batch_renorm_train, _renorm_args),
    "reference.batch_renorm_backward": (lambda: reference.batch_renorm_backward,
                                        _renorm_bwd_args),
    "onnx.batch_normalization": (lambda: fastbn.onnx.batch_normalization, _onnx_args),
    "fuse_conv_bn": (lambda: fastbn.fuse_conv_bn, _fuse_args),
}


def _other_cases():
    cases = []

    def add(fn, cid, make, exc, name):
        cases.append(pytest.param(fn, make, exc, name, id=f"{fn}-{cid}"))
        if fn.startswith("batch_renorm"):      # the NumPy twin raises the same errors
            cases.append(pytest.param("reference." + fn, make, exc, name,
                                      id=f"reference.{fn}-{cid}"))

    fn = "batch_renorm_train"
    for dt in (np.int32, np.bool_, np.complex64, object):
        add(fn, f"x-{np.dtype(dt).name}", lambda dt=dt: {"x": _x().astype(dt)}, TypeError, "x")
    add(fn, "x-1d", lambda: {"x": _x(shape=(12,))}, ValueError, "x")
    add(fn, "one-value", lambda: {"x": _x(shape=(1, C, 1))}, ValueError, "x")
    add(fn, "empty", lambda: {"x": _x(shape=(0, C, 2))}, ValueError, "x")
    for rname in ("running_mean", "running_std"):
        add(fn, f"{rname}-None", lambda r=rname: {r: None}, ValueError, rname)
        add(fn, f"{rname}-len", lambda r=rname: {r: _vec(C + 1, positive=True)}, ValueError,
            rname)
        add(fn, f"{rname}-int", lambda r=rname: {r: np.ones(C, np.int64)}, TypeError, rname)
        add(fn, f"{rname}-readonly", lambda r=rname: {r: _readonly(_vec(positive=True))},
            ValueError, rname)
    add(fn, "weight-len", lambda: {"weight": _vec(C - 1)}, ValueError, "weight")
    add(fn, "bias-int", lambda: {"bias": np.arange(C)}, TypeError, "bias")
    add(fn, "rmax-below-1", lambda: {"rmax": 0.5}, ValueError, "rmax")
    add(fn, "dmax-negative", lambda: {"dmax": -1.0}, ValueError, "dmax")
    add(fn, "momentum", lambda: {"momentum": 1.5}, ValueError, "momentum")
    add(fn, "eps", lambda: {"eps": -1.0}, ValueError, "eps")
    add(fn, "layout", lambda: {"layout": "NCWH"}, ValueError, "layout")
    add(fn, "num_threads", lambda: {"num_threads": 0}, ValueError, "num_threads")
    add(fn, "out-shape", lambda: {"out": np.zeros((N, C, H, W + 1), np.float32)}, ValueError,
        "out")
    add(fn, "out-overlap-x", lambda: dict(zip(("x", "out"), _overlapping(_x()))), ValueError,
        "out")
    add(fn, "inplace-bad-rmax", lambda: (lambda x: {"x": x, "out": x, "rmax": 0.0})(_x()),
        ValueError, "rmax")
    for rname in ("running_mean", "running_std"):
        add(fn, f"{rname}-zero-stride", lambda r=rname: {r: _self_overlapping((C,), "zero",
                                                                             np.float64)},
            ValueError, rname)
        add(fn, f"{rname}-masked", lambda r=rname: {r: np.ma.ones(C)}, TypeError, rname)
    add(fn, "out-zero-stride", lambda: {"out": _self_overlapping((N, C, H, W), "zero")},
        ValueError, "out")
    add(fn, "x-masked", lambda: {"x": np.ma.masked_greater(_x(), 4.0)}, TypeError, "x")
    add(fn, "eps-huge", lambda: {"eps": 10 ** 400}, ValueError, "eps")

    fn = "batch_renorm_backward"
    add(fn, "dy-shape", lambda: {"dy": _x(shape=(N, C, H, W + 1))}, ValueError, "dy")
    add(fn, "dy-dtype", lambda: {"dy": _x(np.float64)}, TypeError, "dy")
    add(fn, "x-int", lambda: {"x": _x().astype(np.int32)}, TypeError, "x")
    for v in ("mean", "std", "r", "d"):
        add(fn, f"{v}-len", lambda v=v: {v: _vec(C + 1)}, ValueError, v)
        add(fn, f"{v}-int", lambda v=v: {v: np.ones(C, np.int32)}, TypeError, v)
    add(fn, "weight-len", lambda: {"weight": _vec(C + 1)}, ValueError, "weight")
    add(fn, "out-is-x", lambda: (lambda x: {"x": x, "out": x})(_x()), ValueError, "out")
    add(fn, "layout", lambda: {"layout": "HWCN"}, ValueError, "layout")
    add(fn, "out-zero-stride", lambda: {"out": _self_overlapping((N, C, H, W), "zero")},
        ValueError, "out")
    add(fn, "dy-masked", lambda: {"dy": np.ma.masked_greater(_x(seed=9), 4.0)}, TypeError,
        "dy")

    fn = "onnx.batch_normalization"
    add(fn, "X-int", lambda: {"X": _x().astype(np.int64)}, TypeError, "X")
    add(fn, "X-1d", lambda: {"X": _x(shape=(7,))}, ValueError, "X")
    for v in ("scale", "B", "input_mean", "input_var"):
        add(fn, f"{v}-len", lambda v=v: {v: _vec(C + 1)}, ValueError, v)
        add(fn, f"{v}-None", lambda v=v: {v: None}, ValueError, v)
        add(fn, f"{v}-int", lambda v=v: {v: np.ones(C, np.int32)}, TypeError, v)
    cases.append(pytest.param(
        fn, lambda: {"epsilon": -1.0}, ValueError, "epsilon", id=f"{fn}-epsilon"))
    add(fn, "momentum", lambda: {"momentum": 1.5}, ValueError, "momentum")
    add(fn, "training_mode", lambda: {"training_mode": 2}, ValueError, "training_mode")
    add(fn, "training-one-value", lambda: {"X": _x(shape=(1, C)), "training_mode": 1},
        ValueError, "X")
    add(fn, "X-masked", lambda: {"X": np.ma.masked_greater(_x(), 4.0)}, TypeError, "X")
    add(fn, "scale-masked", lambda: {"scale": np.ma.ones(C)}, TypeError, "scale")

    fn = "fuse_conv_bn"
    add(fn, "weight-int", lambda: {"weight": np.ones((C, 2), np.int32)}, TypeError, "weight")
    add(fn, "weight-0d", lambda: {"weight": np.float32(1.0)}, ValueError, "weight")
    for v in ("bias", "running_mean", "running_var", "bn_weight", "bn_bias"):
        add(fn, f"{v}-len", lambda v=v: {v: _vec(C + 1)}, ValueError, v)
    add(fn, "running_var-complex", lambda: {"running_var": np.ones(C, complex)}, TypeError,
        "running_var")
    add(fn, "eps", lambda: {"eps": -1.0}, ValueError, "eps")
    return cases


@pytest.mark.parametrize("fn, make, exc, name", _other_cases())
def test_bad_input_other_entry_points(fn, make, exc, name):
    get, build = OTHER[fn]
    args, kwargs = build(**make())
    snap = Snapshot(args, kwargs)
    with pytest.raises(exc) as info:
        get()(*args, **kwargs)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", str(info.value)), \
        f"message does not name {name!r}: {info.value}"
    snap.assert_unchanged()


def _layer_state(layer):
    """Every array the layer holds (parameters, running statistics, gradients, blobs)."""
    return {k: v for k, v in vars(layer).items() if isinstance(v, np.ndarray)} | {
        f"blobs{i}": b for i, b in enumerate(getattr(layer, "blobs", []) or [])} | {
        f"diffs{i}": b for i, b in enumerate(getattr(layer, "diffs", []) or [])}


LAYER_CASES = [
    # (constructor, kwargs, exc, name)
    ("BatchNorm", (0,), {}, ValueError, "num_features"),
    ("BatchNorm", (2.5,), {}, TypeError, "num_features"),
    ("BatchNorm", (C,), {"eps": -1.0}, ValueError, "eps"),
    ("BatchNorm", (C,), {"momentum": 2.0}, ValueError, "momentum"),
    ("BatchNorm", (C,), {"layout": "CHW"}, ValueError, "layout"),
    ("BatchNorm", (C,), {"dtype": np.int32}, TypeError, "dtype"),
    ("BatchRenorm", (C,), {"rmax": 0.5}, ValueError, "rmax"),
    ("BatchRenorm", (C,), {"dmax": -1.0}, ValueError, "dmax"),
    ("BatchRenorm", (0,), {}, ValueError, "num_features"),
    ("caffe.BatchNorm", (0,), {}, ValueError, "channels"),
    ("caffe.BatchNorm", (C,), {"engine": "blas"}, ValueError, "engine"),
    ("caffe.BatchNorm", (C,), {"moving_average_fraction": 1.5}, ValueError,
     "moving_average_fraction"),
    ("caffe.BatchNorm", (C,), {"eps": np.nan}, ValueError, "eps"),
    ("caffe.Scale", (-1,), {}, ValueError, "channels"),
    # flags take bools only
    ("BatchNorm", (C,), {"affine": 1}, TypeError, "affine"),
    ("BatchNorm", (C,), {"track_running_stats": "False"}, TypeError, "track_running_stats"),
    ("BatchRenorm", (C,), {"affine": None}, TypeError, "affine"),
    ("caffe.BatchNorm", (C,), {"use_global_stats": "True"}, TypeError, "use_global_stats"),
    ("caffe.Scale", (C,), {"bias_term": 1}, TypeError, "bias_term"),
    ("caffe.Scale", (C,), {"bias_term": None}, TypeError, "bias_term"),
]


def _layer_cls(name):
    return getattr(fastbn.caffe, name.split(".")[1]) if name.startswith("caffe.") \
        else getattr(fastbn, name)


@pytest.mark.parametrize("cls, args, kwargs, exc, name", LAYER_CASES,
                         ids=[f"{c[0]}-{c[4]}-{i}" for i, c in enumerate(LAYER_CASES)])
def test_bad_layer_arguments(cls, args, kwargs, exc, name):
    with pytest.raises(exc, match=rf"(?<![A-Za-z_]){name}(?![A-Za-z_])") as info:
        _layer_cls(cls)(*args, **kwargs)
    assert type(info.value) is exc


@pytest.mark.parametrize("cls", ["BatchNorm", "BatchRenorm"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_failed_layer_calls_leave_state_unchanged(cls, layout):
    layer = _layer_cls(cls)(C, layout=layout)
    shape = (N, C, H, W) if layout == "NCHW" else (N, H, W, C)
    x = _x(shape=shape)
    layer.forward(x)
    layer.backward(_x(shape=shape, seed=5))          # gradients now non-zero
    for bad, exc, name in [(_x(shape=shape[:-1] + (shape[-1] + 1,)) if layout == "NHWC"
                            else _x(shape=(N, C + 1, H, W)), ValueError, "x"),
                           (x.astype(np.int32), TypeError, "x"),
                           (_x(shape=(1, C)), ValueError, "x"),
                           (_x(shape=(N,)), ValueError, "x")]:
        state = Snapshot(_layer_state(layer), bad)
        with pytest.raises(exc, match=rf"(?<![A-Za-z_]){name}(?![A-Za-z_])"):
            layer.forward(bad)
        state.assert_unchanged()
    state = Snapshot(_layer_state(layer))
    with pytest.raises(ValueError, match="dy"):
        layer.backward(_x(shape=(N, C, H, W + 2)))
    state.assert_unchanged()
    # a failed call does not disturb the next good one
    y = layer.forward(x)
    assert y.shape == x.shape and np.isfinite(y).all()


@pytest.mark.parametrize("engine", ["fused", "gemv"])
def test_failed_caffe_calls_leave_blobs_unchanged(engine):
    layer = fastbn.caffe.BatchNorm(C, engine=engine)
    x = _x()
    layer.forward(x, phase="TRAIN")
    cases = [((_x(shape=(N, C + 1, H)),), {}, ValueError, "bottom"),
             ((x,), {"phase": "VALIDATE"}, ValueError, "phase"),
             ((x,), {"out": np.zeros(x.shape, np.float64)}, ValueError, "out"),
             ((x,), {"out": _readonly(np.zeros(x.shape, np.float32))}, ValueError, "out"),
             ((x.astype(np.float64),), {}, TypeError, "bottom")]
    for args, kwargs, exc, name in cases:
        snap = Snapshot(_layer_state(layer), args, kwargs)
        with pytest.raises(exc, match=rf"(?<![A-Za-z_]){name}(?![A-Za-z_])"):
            layer.forward(*args, **kwargs)
        snap.assert_unchanged()
    scale = fastbn.caffe.Scale(C, bias_term=True)
    snap = Snapshot(_layer_state(scale))
    with pytest.raises(ValueError, match="x"):
        scale.forward(_x(shape=(N, C + 1, H)))
    with pytest.raises(RuntimeError):
        scale.backward(x)
    snap.assert_unchanged()
