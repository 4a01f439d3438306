"""Fuzz every public fastbn entry point with hypothesis (not collected by pytest).

Each hypothesis example builds a pool of arrays (valid and invalid dtypes, shapes, memory
orders, values with NaN/inf/huge/tiny, views sharing memory, 16-bit running buffers near
their range, array-likes whose conversion raises) and makes several calls with arguments
drawn from it, under one floating-point error mode (np.errstate "ignore", "raise", or
warnings as errors). Invariants: the process never crashes; a call either returns or
raises TypeError/ValueError, or the caller's own object's exception (layers may also raise
RuntimeError for a backward without a forward); never a FloatingPointError or a warning,
whatever the mode; on an error every array passed is unchanged; a functional call that
returns agrees in shape/dtype with the reference, and in value when its inputs are finite
and moderate. With mpi4py, the synchronized calls run on MPI.COMM_SELF.

    python tests/fuzz_calls.py --calls 100000 [--seed 0]
"""
import argparse
import contextlib
import os
import sys
import time
import traceback
import warnings

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the checkout's fastbn when its extensions are built there; else the installed one (an
# unpacked sdist's fastbn/ is unbuilt source)
if any(f.startswith("_kernels") and f.endswith((".so", ".pyd"))
       for f in os.listdir(os.path.join(ROOT, "fastbn"))):
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastbn                                   # noqa: E402
from fastbn import caffe, onnx, reference       # noqa: E402
from conftest import Snapshot                   # noqa: E402

try:
    import ml_dtypes
    HALF_TYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
except ImportError:
    HALF_TYPES = [np.dtype(np.float16)]
try:
    from mpi4py import MPI
except ImportError:
    MPI = None

CALLS = 0
ERRORS = {}
FAILURES = []

DTYPES = [np.float32, np.float64, np.float32, np.float64, np.float16, np.int32, np.bool_,
          np.complex64, object]
SPECIAL = [np.nan, np.inf, -np.inf, 1e30, -1e-30, 0.0, 1e300]
# values near each 16-bit type's range: subnormal, smallest normal, near the maximum
NEAR_RANGE = {"float16": [6e-8, 5e-5, 6.2e-5, 1.0, 6e4, 65504.0],
              "bfloat16": [1e-40, 1e-38, 1.2e-38, 1.0, 3e38, 3.38e38]}
MODE = ["ignore"]         # this example's floating-point error mode (see _errors)


class ConversionError(Exception):
    """What an Unconvertible raises: not a TypeError or ValueError."""


class Unconvertible:
    """An array-like whose conversion raises (as np.asarray of a torch tensor that requires
    grad raises RuntimeError)."""

    def __array__(self, dtype=None, copy=None):
        raise ConversionError("this object cannot become an array")

    def __float__(self):
        raise ConversionError("this object cannot become a number")


@contextlib.contextmanager
def _errors(mode):
    """The caller's floating-point error handling around one call."""
    with warnings.catch_warnings():
        if mode == "ignore":
            with np.errstate(all="ignore"):
                yield
            return
        warnings.simplefilter("error")     # any warning fastbn lets out is a failure
        with np.errstate(all="raise" if mode == "raise" else "warn"):
            yield


@st.composite
def half_buffer(draw, C):
    """A 16-bit running buffer of C values near its dtype's range (sometimes strided)."""
    dt = draw(st.sampled_from(HALF_TYPES))
    values = draw(st.lists(st.sampled_from(NEAR_RANGE[dt.name]), min_size=C, max_size=C))
    with np.errstate(all="ignore"):
        a = np.array(values, np.float64).astype(dt)
    if draw(st.booleans()):
        a = np.repeat(a, 2)[::2]
    return a


@st.composite
def arrays(draw, shape=None, float_only=False):
    if shape is None:
        ndim = draw(st.sampled_from([0, 1, 2, 2, 3, 4, 4, 5]))
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 4, 7]), min_size=ndim,
                                    max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES[:4] if float_only else DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1.0, 1e3, 1e30]))
    base = np.asarray(rng.normal(size=shape)) * scale + draw(st.sampled_from([0.0, 0.0, 1e4, -1e6]))
    if base.size and draw(st.integers(0, 3)) == 0:
        base.flat[rng.integers(0, base.size)] = draw(st.sampled_from(SPECIAL))
    with np.errstate(all="ignore"):
        a = np.asarray(base.astype(dtype))
    order = draw(st.sampled_from(["C", "F", "rev", "slice", "T", "ro", "swap", "alias",
                                  "masked", "matrix", "unaligned"]))
    if order == "swap":                   # the other byte order
        a = a.astype(a.dtype.newbyteorder("S")) if a.dtype.kind != "O" else a
    elif order == "alias" and a.ndim and a.size:   # writable, elements share memory
        a = np.lib.stride_tricks.as_strided(
            a, shape=a.shape, strides=tuple(draw(st.sampled_from([0, a.itemsize]))
                                            for _ in a.shape), writeable=True)
    elif order == "masked":
        a = np.ma.masked_array(a, mask=np.zeros(a.shape, bool) if a.ndim else False)
    elif order == "matrix" and a.ndim == 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            a = np.asmatrix(a)
    elif order == "unaligned" and a.dtype.kind != "O":
        buf = np.zeros(a.nbytes + 1, np.uint8)
        u = np.frombuffer(buf.data, dtype=a.dtype, offset=1, count=a.size).reshape(a.shape)
        u[...] = a
        a = u
    if order == "F":
        a = np.asfortranarray(a)
    elif order == "rev" and a.ndim:
        a = np.ascontiguousarray(a[::-1])[::-1]
    elif order == "slice" and a.ndim:
        big = np.zeros((a.shape[0] * 2,) + a.shape[1:], dtype=a.dtype)
        big[::2] = a
        a = big[::2]
    elif order == "T" and a.ndim > 1:
        a = np.ascontiguousarray(a.T).T
    elif order == "ro":
        a = a.copy()
        a.flags.writeable = False
    return a


FLAGS = [True, False, np.bool_(True), np.bool_(False), "False", None, 0, 1, 0.0, []]


def _flag(draw, valid):
    """A flag argument: bools (NumPy's too), and when not valid anything truthy or falsy."""
    return draw(st.sampled_from(FLAGS[:4] if valid else FLAGS))


def _junk(draw, pool):
    return draw(st.sampled_from(pool + [None, None, 0, -1, 1.5, np.nan, "NCHW", True, [1.0, 2.0],
                                        1j, np.float32(2.0), Unconvertible()]))


def _count(fn):
    global CALLS
    CALLS += 1
    return fn


def _check_call(name, fn, args, kwargs, allowed=(TypeError, ValueError)):
    snap = Snapshot(args, kwargs)
    _count(fn)
    allowed = tuple(allowed) + (ConversionError,)
    try:
        with _errors(MODE[0]):
            res = fn(*args, **kwargs)
    except allowed as e:
        ERRORS[(name, type(e).__name__)] = ERRORS.get((name, type(e).__name__), 0) + 1
        try:
            snap.assert_unchanged()
        except AssertionError as a:
            raise AssertionError(f"{name}: {type(e).__name__}({e}) left an argument "
                                 f"modified: {a}") from None
        return e
    ERRORS[(name, "ok")] = ERRORS.get((name, "ok"), 0) + 1
    return res


def _close(a, b, rtol):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    fin = np.isfinite(b)
    return a.shape == b.shape and np.array_equal(np.isfinite(a), fin) and np.all(
        np.abs(a[fin] - b[fin]) <= rtol * (1 + np.abs(b[fin])))


def _moderate(*arrs):
    for a in arrs:
        if a is None:
            continue
        a = np.asarray(a)
        if a.dtype.kind != "f" or a.size == 0:
            continue
        with np.errstate(all="ignore"):
            if not np.all(np.isfinite(a)) or np.abs(a).max() > 1e6 or np.abs(a).max() < 1e-6:
                return False
    return True


@st.composite
def gradient_for(draw, x):
    """A gradient for data x: mostly x's shape, sometimes converted to x's dtype."""
    g = draw(arrays(shape=x.shape if draw(st.integers(0, 5)) else None,
                    float_only=True)) if x.ndim else draw(arrays())
    if isinstance(g, np.ndarray) and g.dtype != x.dtype and draw(st.booleans()):
        with np.errstate(all="ignore"):
            g = g.astype(x.dtype) if x.dtype.kind == "f" else g
    return g


@st.composite
def channel_like(draw, C, pool, valid=False):
    kind = draw(st.integers(0, 4 if valid else 9))
    if kind < 6:
        return draw(arrays(shape=(C,), float_only=kind < 5))
    if kind < 8:
        return draw(arrays())
    return _junk(draw, pool)


def fuzz_once(data):
    draw = data.draw
    MODE[0] = draw(st.sampled_from(["ignore", "ignore", "raise", "error"]))
    # half of the examples are valid calls (so the kernels run), half anything goes
    valid = draw(st.booleans())
    if valid:
        ndim = draw(st.integers(2, 5))
        shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
        x = draw(arrays(shape=shape, float_only=True))
    else:
        x = draw(arrays(float_only=draw(st.integers(0, 4)) > 0))
    layout = draw(st.sampled_from(["NCHW", "NHWC"] if valid else
                                  ["NCHW", "NCHW", "NHWC", "NHWC", "nchw", None]))
    C = 1
    if x.ndim >= 2:
        C = x.shape[1] if layout != "NHWC" else x.shape[-1]
    pool = [x]
    vec = lambda: draw(channel_like(C, pool, valid))     # noqa: E731
    nt = draw(st.sampled_from([None, 1, 2, 3] if valid else [None, None, 1, 2, 3, 0, -1, 2.5]))
    eps = draw(st.sampled_from([1e-5, 1e-5, 0.0, 1e-3] if valid else
                               [1e-5, 1e-5, 0.0, 1e-3, -1.0, np.nan]))
    out_kind = draw(st.sampled_from([None, None, "x", "fresh"] if valid else
                                    [None, None, "x", "fresh", "bad", "overlap"]))

    def make_out(like):
        if out_kind == "x":
            return like
        if out_kind == "fresh" and isinstance(like, np.ndarray):
            return np.empty_like(like)
        if out_kind == "bad":
            return draw(arrays())
        if out_kind == "overlap" and isinstance(like, np.ndarray) and like.size > 1 \
                and like.dtype.kind == "f":
            buf = np.zeros(like.size + 1, like.dtype)
            return buf[1:].reshape(like.shape)
        return None

    which = draw(st.sampled_from(["train", "infer", "backward", "fold", "renorm", "layer",
                                  "renorm_layer", "onnx", "caffe", "scale", "fuse", "relu",
                                  "sync", "ghost", "from_output"]))
    half = draw(st.integers(0, 3)) == 0 and C >= 0     # 16-bit running buffers
    if which == "train":
        w, b = vec(), vec()
        rm, rv = (vec(), vec()) if draw(st.booleans()) else (None, None)
        if half:
            rm, rv = draw(half_buffer(C)), draw(half_buffer(C))
        if rm is not None and isinstance(rm, np.ndarray) and rm.flags.writeable is False \
                and draw(st.booleans()):
            rm = rm.copy()
        kw = dict(eps=eps, layout=layout, running_mean=rm, running_var=rv,
                  momentum=draw(st.sampled_from([0.1, 0.0, 1.0, -0.5, 2.0])), out=make_out(x),
                  num_threads=nt)
        ref_kw = dict(kw, out=None,
                      running_mean=rm.copy() if isinstance(rm, np.ndarray) else rm,
                      running_var=rv.copy() if isinstance(rv, np.ndarray) else rv)
        x_before = x.copy()
        res = _check_call("batch_norm_train", fastbn.batch_norm_train, [x, w, b], kw)
        if not isinstance(res, Exception) and _moderate(x_before, w, b) and C > 0:
            try:
                with np.errstate(all="ignore"):
                    want = reference.batch_norm_train(x_before, w, b, **ref_kw)
            except (TypeError, ValueError):
                return
            # byte-swapped data is converted: results are in native byte order
            assert res[0].shape == x.shape and res[0].dtype == x.dtype.newbyteorder("=")
            assert _close(res[1], want[1], 1e-5), "train mean"
            if eps > 0:
                assert _close(res[0], want[0], 1e-3), "train y"
    elif which == "infer":
        rm, rv, w, b = vec(), vec(), vec(), vec()
        kw = dict(eps=eps, layout=layout, out=make_out(x), num_threads=nt)
        x_before = x.copy()
        res = _check_call("batch_norm_infer", fastbn.batch_norm_infer, [x, rm, rv, w, b], kw)
        if not isinstance(res, Exception) and _moderate(x_before, rm, rv, w, b) and eps > 0:
            with np.errstate(all="ignore"):
                want = reference.batch_norm_infer(x_before, rm, rv, w, b, eps=eps, layout=layout)
            if np.all(np.asarray(rv) >= 0):
                assert _close(res, want, 1e-3), "infer y"
    elif which == "backward":
        g = draw(gradient_for(x))
        pool.append(g)
        mean, invstd, w = vec(), vec(), vec()
        kw = dict(training=_flag(draw, valid), layout=layout, out=make_out(g), num_threads=nt)
        g_before, x_before = np.array(g, copy=True), x.copy()
        res = _check_call("batch_norm_backward", fastbn.batch_norm_backward,
                          [g, x, mean, invstd, w], kw)
        if not isinstance(res, Exception) and _moderate(g_before, x_before, mean, invstd, w):
            with np.errstate(all="ignore"):
                want = reference.batch_norm_backward(g_before, x_before, mean, invstd, w,
                                                     training=kw["training"], layout=layout)
            assert res[0].shape == x.shape and res[2].dtype == x.dtype.newbyteorder("=")
            assert _close(res[2], want[2], 1e-3), "backward dbias"
    elif which == "ghost":
        w, b = vec(), vec()
        rm, rv = (vec(), vec()) if draw(st.booleans()) else (None, None)
        size = draw(st.sampled_from([1, 2, 3, 8, 0, -1, 2.5, True, "2", np.int64(2)]))
        kw = dict(eps=eps, layout=layout, running_mean=rm, running_var=rv,
                  out=make_out(x), num_threads=nt, ghost_batch_size=size)
        x_before = x.copy()
        ref_kw = dict(kw, out=None, num_threads=None,
                      running_mean=rm.copy() if isinstance(rm, np.ndarray) else rm,
                      running_var=rv.copy() if isinstance(rv, np.ndarray) else rv)
        res = _check_call("batch_norm_train(ghost)", fastbn.batch_norm_train, [x, w, b], kw)
        if isinstance(res, Exception):
            return
        if _moderate(x_before, w, b) and C > 0:
            try:
                with np.errstate(all="ignore"):
                    want = reference.batch_norm_train(x_before, w, b, **ref_kw)
            except (TypeError, ValueError):
                return
            assert res[1].shape == want[1].shape, "ghost mean shape"
            assert _close(res[1], want[1], 1e-5), "ghost mean"
        g = draw(arrays(shape=x.shape, float_only=True))
        if isinstance(g, np.ndarray) and g.dtype != x.dtype:
            with np.errstate(all="ignore"):
                g = g.astype(x.dtype)
        mean, invstd = (res[1], res[2]) if draw(st.integers(0, 3)) else (vec(), vec())
        _check_call("batch_norm_backward(ghost)", fastbn.batch_norm_backward,
                    [g, x, mean, invstd, w],
                    dict(layout=layout, out=make_out(g), num_threads=nt, ghost_batch_size=size))
    elif which == "from_output":
        g = draw(gradient_for(x))
        pool.append(g)
        invstd, w, b = vec(), vec(), vec()
        kw = dict(layout=layout, out=make_out(g), num_threads=nt)
        g_before, y_before = np.array(g, copy=True), x.copy()
        res = _check_call("batch_norm_backward_from_output",
                          fastbn.batch_norm_backward_from_output, [g, x, invstd, w, b], kw)
        if not isinstance(res, Exception) and _moderate(g_before, y_before, invstd, w, b):
            with np.errstate(all="ignore"):
                want = reference.batch_norm_backward_from_output(g_before, y_before, invstd, w,
                                                                 b, layout=layout)
            assert res[0].shape == x.shape and res[2].dtype == x.dtype.newbyteorder("=")
            assert _close(res[2], want[2], 1e-3), "from_output dbias"
    elif which == "fold":
        _check_call("fold_batch_norm", fastbn.fold_batch_norm,
                    [vec(), vec(), vec(), vec()], dict(eps=eps))
    elif which == "renorm":
        w, b, rm, rs = vec(), vec(), vec(), vec()
        if half:
            rm, rs = draw(half_buffer(C)), draw(half_buffer(C))
        kw = dict(rmax=draw(st.sampled_from([3.0, 1.0, 0.5, np.inf])),
                  dmax=draw(st.sampled_from([5.0, 0.0, -1.0])),
                  momentum=draw(st.sampled_from([0.01, 1.5])), eps=eps, layout=layout,
                  out=make_out(x), num_threads=nt)
        res = _check_call("batch_renorm_train", fastbn.batch_renorm_train, [x, w, b, rm, rs], kw)
        if not isinstance(res, Exception) and draw(st.booleans()):
            y, mean, std, r, d = res
            g = draw(arrays(shape=x.shape, float_only=True)).astype(x.dtype)
            _check_call("batch_renorm_backward", fastbn.batch_renorm_backward,
                        [g, x, mean, std, r, d, w],
                        dict(layout=layout, out=make_out(g), num_threads=nt))
        elif draw(st.booleans()):
            _check_call("batch_renorm_backward", fastbn.batch_renorm_backward,
                        [x, x, vec(), vec(), vec(), vec(), vec()],
                        dict(layout=layout, num_threads=nt))
    elif which in ("layer", "renorm_layer"):
        nf = draw(st.sampled_from([C, C, 0, -1, 2.5, C + 1]))
        kw = dict(eps=eps, layout=layout,
                  dtype=draw(st.sampled_from([np.float32, np.float64, np.int32])))
        if which == "layer":
            kw.update(momentum=draw(st.sampled_from([0.1, None, 2.0])),
                      affine=_flag(draw, valid), track_running_stats=_flag(draw, valid))
            cls = fastbn.BatchNorm
        else:
            kw.update(rmax=draw(st.sampled_from([3.0, 0.5])), dmax=5.0)
            cls = fastbn.BatchRenorm
        layer = _check_call(cls.__name__, cls, [nf], kw)
        if isinstance(layer, Exception):
            return
        allowed = (TypeError, ValueError, RuntimeError)
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["fwd", "fwd", "bwd", "eval", "train", "state"]))
            if op == "fwd":
                _check_call(f"{cls.__name__}.forward", layer.forward, [x], {}, allowed)
            elif op == "bwd":
                _check_call(f"{cls.__name__}.backward", layer.backward,
                            [draw(arrays(shape=x.shape, float_only=True))], {}, allowed)
            elif op == "eval":
                layer.eval()
            elif op == "train":
                _check_call(f"{cls.__name__}.train", layer.train, [_flag(draw, valid)], {})
            else:
                sd = layer.state_dict()
                if sd and draw(st.booleans()):
                    k = draw(st.sampled_from(sorted(sd)))
                    sd = dict(sd)
                    sd[k] = vec()
                _check_call(f"{cls.__name__}.load_state_dict", layer.load_state_dict, [sd], {},
                            allowed)
    elif which == "onnx":
        _check_call("onnx.batch_normalization", onnx.batch_normalization,
                    [x, vec(), vec()] + ([draw(half_buffer(C)), draw(half_buffer(C))] if half
                                         else [vec(), vec()]),
                    dict(epsilon=eps, momentum=draw(st.sampled_from([0.9, 0.0, 1.5])),
                         training_mode=draw(st.sampled_from([0, 1, 2, True]))))
    elif which == "caffe":
        layer = _check_call("caffe.BatchNorm", caffe.BatchNorm, [draw(st.sampled_from([C, 0]))],
                            dict(use_global_stats=draw(st.sampled_from([None, True, False])),
                                 moving_average_fraction=draw(st.sampled_from([0.999, 1.5])),
                                 eps=eps, engine=draw(st.sampled_from(["fused", "gemv", "x"])),
                                 dtype=draw(st.sampled_from([np.float32, np.float64]))))
        if isinstance(layer, Exception):
            return
        allowed = (TypeError, ValueError, RuntimeError)
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                _check_call("caffe.BatchNorm.forward", layer.forward, [x],
                            dict(phase=draw(st.sampled_from(["TRAIN", "TEST", "x"])),
                                 out=make_out(x)), allowed)
            else:
                _check_call("caffe.BatchNorm.backward", layer.backward,
                            [draw(arrays(shape=x.shape, float_only=True))], {}, allowed)
    elif which == "scale":
        layer = _check_call("caffe.Scale", caffe.Scale, [draw(st.sampled_from([C, 0, -2]))],
                            dict(bias_term=_flag(draw, valid),
                                 dtype=draw(st.sampled_from([np.float32, np.float64]))))
        if isinstance(layer, Exception):
            return
        allowed = (TypeError, ValueError, RuntimeError)
        _check_call("caffe.Scale.forward", layer.forward, [x], {}, allowed)
        _check_call("caffe.Scale.backward", layer.backward,
                    [draw(arrays(shape=x.shape, float_only=True))], {}, allowed)
    elif which == "relu":
        fuzz_relu(draw, x, C, vec, layout, nt, eps, make_out, half)
    elif which == "sync":
        if MPI is not None:
            fuzz_sync(draw, x, C, vec, layout, nt, eps, make_out, half)
    else:
        wshape = draw(st.sampled_from([(C, 3, 2, 2), (C, 4), (C,), (C + 1, 2), ()]))
        _check_call("fuse_conv_bn", fastbn.fuse_conv_bn,
                    [draw(arrays(shape=wshape)), vec(), vec(), vec(), vec(), vec(), eps], {})


def fuzz_relu(draw, x, C, vec, layout, nt, eps, make_out, half):
    """The fused residual add + ReLU (plain, or leaky with a drawn negative_slope, good or
    bad): train (16-bit running buffers too), infer, backward, and the backward from the
    leaky ReLU's output."""
    w, b = vec(), vec()
    slope = draw(st.sampled_from([0.0, 0.0, 0.1, 2.0, 1e-30, -0.5, float("nan"),
                                  float("inf"), "0.1", None, True]))
    kind = draw(st.sampled_from(["none", "x", "like", "junk"]))
    residual = x if kind == "x" else _junk(draw, [x]) if kind == "junk" else \
        draw(arrays(shape=x.shape, float_only=True)) if kind == "like" and x.ndim else None
    rm, rv = (draw(half_buffer(C)), draw(half_buffer(C))) if half else (None, None)
    res = _check_call("batch_norm_relu_train", fastbn.batch_norm_relu_train, [x, w, b],
                      dict(residual=residual, eps=eps, layout=layout, running_mean=rm,
                           running_var=rv, out=make_out(x), num_threads=nt,
                           negative_slope=slope))
    if isinstance(res, Exception):
        _check_call("batch_norm_relu_infer", fastbn.batch_norm_relu_infer,
                    [x, vec(), vec(), w, b],
                    dict(residual=residual, eps=eps, layout=layout, num_threads=nt,
                         negative_slope=slope))
        return
    y, mean, invstd = res
    g = draw(arrays(shape=x.shape, float_only=True))
    if g.dtype != y.dtype and draw(st.booleans()):
        with np.errstate(all="ignore"):
            g = g.astype(y.dtype)
    dres = draw(st.sampled_from([None, "fresh", "g"]))
    dres = np.empty_like(y) if dres == "fresh" else g if dres == "g" else None
    _check_call("batch_norm_relu_backward", fastbn.batch_norm_relu_backward,
                [g, y, x, mean, invstd, w],
                dict(layout=layout, out=make_out(g), dresidual=dres, num_threads=nt,
                     negative_slope=slope))
    if residual is None:
        _check_call("batch_norm_backward_from_output(leaky)",
                    fastbn.batch_norm_backward_from_output, [g, y, invstd, w, b],
                    dict(layout=layout, out=make_out(g), num_threads=nt,
                         negative_slope=slope))


def fuzz_sync(draw, x, C, vec, layout, nt, eps, make_out, half):
    """The synchronized calls on MPI.COMM_SELF: the local calls' results and errors."""
    w, b = vec(), vec()
    rm, rv = (draw(half_buffer(C)), draw(half_buffer(C))) if half else \
        ((vec(), vec()) if draw(st.booleans()) else (None, None))
    kw = dict(comm=MPI.COMM_SELF, eps=eps, layout=layout, running_mean=rm, running_var=rv,
              momentum=draw(st.sampled_from([0.1, 0.0, 1.0, -0.5])), out=make_out(x),
              num_threads=nt)
    x_before = np.array(x, copy=True) if isinstance(x, np.ndarray) else x
    res = _check_call("sync_batch_norm_train", fastbn.distributed.sync_batch_norm_train,
                      [x, w, b], kw)
    if isinstance(res, Exception):
        return
    y, mean, invstd = res
    if _moderate(x_before, w, b) and C > 0:
        try:
            with np.errstate(all="ignore"):
                want = reference.batch_norm_train(x_before, w, b, eps=eps, layout=layout)
        except (TypeError, ValueError):
            return
        assert _close(mean, want[1], 1e-5), "sync mean"
    g = draw(arrays(shape=x.shape, float_only=True))
    if g.dtype != y.dtype:
        with np.errstate(all="ignore"):
            g = g.astype(y.dtype)
    _check_call("sync_batch_norm_backward", fastbn.distributed.sync_batch_norm_backward,
                [g, x, mean, invstd, draw(st.sampled_from([w, vec()]))],
                dict(comm=MPI.COMM_SELF, layout=layout, out=make_out(g), num_threads=nt))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    batch = 2000

    @settings(max_examples=batch, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        fuzz_once(data)

    rounds = 0
    while CALLS < args.calls:
        np.random.seed(args.seed + rounds)
        import random
        random.seed(args.seed + rounds)
        try:
            run()
        except Exception:
            FAILURES.append(traceback.format_exc())
            print(FAILURES[-1], flush=True)
        rounds += 1
        print(f"round {rounds}: {CALLS} calls, {time.time() - t0:.0f} s, "
              f"{len(FAILURES)} failing rounds", flush=True)
    print(f"\n{CALLS} calls in {time.time() - t0:.0f} s, seed {args.seed}; "
          f"failures: {len(FAILURES)}")
    for (name, kind), n in sorted(ERRORS.items()):
        print(f"  {name:<32} {kind:<12} {n}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
