"""Shared data and helpers for fastbn's asv benchmarks.

Everything here is plain NumPy so the benchmarks also run against older fastbn commits:
no helper of the package under test is used to build the data.

Arrays are built in each benchmark's ``setup`` and are filled with random values (no
``np.zeros``/``np.empty`` pages that the kernel would fault in on first touch, which would
be timed as part of the first call). Shapes are given NCHW; for layout "NHWC" the channel
axis moves last, and the memory order is asserted to be the layout's natural C order, so
a benchmark never measures a copy made for an unusual stride.
"""
import importlib
import time

import numpy as np

DTYPES = ["float32", "float64"]
# A mid-size 4-D batch (one channel plane fits in L2), two fully connected (N, C) batches
# (the second has so few rows that its threads split the channels) and a small input that
# runs on one thread (where per-call overhead dominates).
SHAPES = [(8, 64, 56, 56), (256, 1024), (128, 2048), (8, 32, 8, 8)]
LAYOUTS = ["NCHW", "NHWC"]

PARAMS = [DTYPES, SHAPES, LAYOUTS]
PARAM_NAMES = ["dtype", "shape", "layout"]

_cache = {}


def layout_shape(shape, layout):
    """The NCHW `shape` as it is stored for `layout`."""
    shape = tuple(shape)
    if layout == "NHWC" and len(shape) > 2:
        return (shape[0],) + shape[2:] + (shape[1],)
    return shape


def channel_axis(ndim, layout):
    return 1 if layout == "NCHW" else ndim - 1


def skip_duplicate(shape, layout):
    """(N, C) is the same array in both layouts: run it once, as NCHW."""
    if len(shape) == 2 and layout == "NHWC":
        raise NotImplementedError("(N, C) input: NHWC is the same case as NCHW")


def check_layout(a, shape, layout, dtype):
    """Assert `a` is the filled, C-ordered, owning array a benchmark expects."""
    want = layout_shape(shape, layout)
    assert a.shape == want, (a.shape, want)
    assert a.dtype == np.dtype(dtype), (a.dtype, dtype)
    assert a.flags.c_contiguous and a.flags.owndata and a.flags.writeable
    assert np.isfinite(a.reshape(-1)[:: max(1, a.size // 1024)]).all()


def data(shape, layout, dtype, offset=0.0, seed=0):
    """(x, dy, weight, bias) for one benchmark case, built once per process.

    x ~ N(offset + 0.5, 1), dy ~ N(0, 1), weight in [0.5, 1.5], bias in [-0.5, 0.5]. The
    cached arrays are inputs only: no benchmark writes into them.
    """
    key = (tuple(shape), layout, str(dtype), float(offset), seed)
    if key not in _cache:
        if len(_cache) >= 4:
            _cache.clear()
        dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        full = layout_shape(shape, layout)
        C = shape[1]
        x = rng.standard_normal(full).astype(dtype)
        x += dtype.type(offset + 0.5)
        dy = rng.standard_normal(full).astype(dtype)
        w = rng.uniform(0.5, 1.5, C).astype(dtype)
        b = rng.uniform(-0.5, 0.5, C).astype(dtype)
        for a in (x, dy):
            check_layout(a, shape, layout, dtype)
        _cache[key] = (x, dy, w, b)
    return _cache[key]


def filled_like(a, value=1.0):
    """A new array like `a` with every page written (for out= buffers)."""
    out = np.empty_like(a)
    out.fill(value)
    return out


def running_stats(C, dtype):
    """Fresh writable running mean/var buffers (updated in place by training calls)."""
    return np.zeros(C, dtype=dtype), np.ones(C, dtype=dtype)


def feature(module, name):
    """fastbn.<module>.<name>, or NotImplementedError (asv then skips the benchmark) when
    the installed commit does not have it yet."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise NotImplementedError(f"{module} is not in this commit") from exc
    try:
        return getattr(mod, name)
    except AttributeError as exc:
        raise NotImplementedError(f"{module}.{name} is not in this commit") from exc


def best_time(func, repeat, budget=2.0):
    """Best wall time (s) of `repeat` calls after one warm-up call, stopping early once
    `budget` seconds have been spent."""
    func()
    best = np.inf
    start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    return best


def bcast(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def train_forward64(x, w, b, eps, layout):
    """Training forward in float64 from the given inputs (two-pass statistics):
    (y, mean, invstd), the accuracy yardstick."""
    axis = channel_axis(x.ndim, layout)
    red = tuple(i for i in range(x.ndim) if i != axis)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=red)
    xc = xd - bcast(mean, x.ndim, axis)
    invstd = 1.0 / np.sqrt((xc * xc).mean(axis=red) + eps)
    y = xc * bcast(invstd * w, x.ndim, axis) + bcast(b, x.ndim, axis)
    return y, mean, invstd


def backward64(dy, x, mean, invstd, w, layout):
    """Training-mode backward in float64: dx."""
    axis = channel_axis(x.ndim, layout)
    red = tuple(i for i in range(x.ndim) if i != axis)
    g = dy.astype(np.float64)
    xhat = (x.astype(np.float64) - bcast(mean, x.ndim, axis)) * bcast(invstd, x.ndim, axis)
    gm = g.mean(axis=red)
    gx = (g * xhat).mean(axis=red)
    return (g - bcast(gm, x.ndim, axis) - xhat * bcast(gx, x.ndim, axis)) * \
        bcast(invstd * w, x.ndim, axis)


def max_ulp(result, exact):
    """Largest error of `result` against the float64 `exact`, in float32 ulps of
    max(|exact|, 1): normalized outputs are O(1), so values near zero are judged on the
    absolute scale of the output instead of their own (tiny) spacing."""
    exact = np.asarray(exact, dtype=np.float64)
    unit = np.spacing(np.maximum(np.abs(exact), 1.0).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(result.astype(np.float64) - exact) / unit))
