"""The public functional API: validate, choose the kernel view, run the kernel, return.

Batch Normalization over the channel axis of an array of shape (N, C, ...) ("NCHW") or
(N, ..., C) ("NHWC"). The kernels work on C-contiguous canonical views:

* planar (N, C, S): NCHW memory, each (n, c) plane contiguous;
* rows (R, C): channels-last memory, one value per channel in each row.

An input whose memory already has one of these orders is used as it is, whatever its
`layout` (an NCHW-shaped array with channels-last strides goes to the rows kernel, with no
copy, and its result gets the same strides); any other input is copied once into its
layout's natural order.
"""
from collections import namedtuple

import numpy as np

from . import _memory, _support
from ._dispatch import kernels as _kernels
from ._threads import effective_threads
from ._validate import (channel_axis, channel_vector, data_array, eps_value, flag, fold_arguments,
                        grad_dtype, gradient_pair, like_x, momentum_value, out_array,
                        rounded, running_buffers, store_rounded, training_count,
                        values_per_channel)

__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward", "fold_batch_norm"]

# the canonical views, as the kernels name them
PLANAR, ROWS = int(_kernels.View.PLANAR), int(_kernels.View.ROWS)

# view: PLANAR or ROWS; perm: x.transpose(perm) is the C-contiguous canonical order (None when
# that is x's own order); inv: the inverse permutation; N, C, S: planar dims (for ROWS, N is
# the row count and S is 1).
Plan = namedtuple("Plan", "view perm inv N C S")

_plans = {}            # (shape, strides, itemsize, layout) -> (Plan, whether x itself fits it)


def _candidates(ndim, axis, layout):
    others = [i for i in range(ndim) if i != axis]
    rows = (ROWS, tuple(others + [axis]))
    planar = (PLANAR, tuple([others[0], axis] + others[1:]))
    planar_one = (PLANAR, tuple([axis] + others))      # channel-major memory, N = 1
    if layout == "NHWC":
        return [rows, planar, planar_one]
    return [planar, rows, planar_one]


def _make_plan(shape, axis, view, perm):
    C = shape[axis]
    size = 1
    for s in shape:
        size *= s
    inv = tuple(int(i) for i in np.argsort(perm))
    if perm == tuple(range(len(shape))):
        perm = inv = None
    if view == ROWS or C == 0:
        return Plan(ROWS, perm, inv, size // C if C else 0, C, 1)
    first = perm[0] if perm is not None else 0
    N = shape[first] if first != axis else 1
    S = size // (N * C) if N * C else 0
    if S == 1:
        # (N, C, 1) planes are (N, C) rows: the rows kernel handles them far better
        return Plan(ROWS, perm, inv, N, C, 1)
    return Plan(PLANAR, perm, inv, N, C, S)


def _plan(x, axis, layout):
    """Pick the canonical view of x: (plan, C-contiguous data), copying only if needed."""
    key = (x.shape, x.strides, x.itemsize, layout)
    hit = _plans.get(key)
    if hit is None:
        cands = _candidates(x.ndim, axis, layout)
        for view, perm in cands:
            if x.transpose(perm).flags.c_contiguous:
                hit = (_make_plan(x.shape, axis, view, perm), True)
                break
        else:
            hit = (_make_plan(x.shape, axis, *cands[0]), False)
        if len(_plans) > 512:
            _plans.clear()
        _plans[key] = hit
    plan, fits = hit
    xt = x if plan.perm is None else x.transpose(plan.perm)
    return plan, (xt if fits and x.flags.aligned else np.array(xt, order="C"))


def _like(a, plan):
    """a (same shape as x) in the plan's C-contiguous order: no copy when its memory fits."""
    at = a if plan.perm is None else a.transpose(plan.perm)
    return at if at.flags.c_contiguous and at.flags.aligned else np.array(at, order="C")


def _result(plan, shape, dtype, out):
    """(array to return, C-contiguous array the kernel writes into, written directly?)."""
    if out is not None:
        ot = out if plan.perm is None else out.transpose(plan.perm)
        if ot.flags.c_contiguous and ot.flags.aligned:
            return out, ot, True
        return out, np.empty(ot.shape, dtype=dtype), False
    if plan.perm is None:
        y = np.empty(shape, dtype=dtype)
        return y, y, True
    yt = np.empty(tuple(shape[i] for i in plan.perm), dtype=dtype)
    return yt.transpose(plan.inv), yt, True


def _finish(result, flat, direct, plan):
    """Copy the kernel's output into `result` when it could not be written directly."""
    if not direct:
        rt = result if plan.perm is None else result.transpose(plan.perm)
        rt[...] = flat
    return result


def _train(x, weight, bias, eps, layout, out, num_threads, renorm=None, extra_inputs=None,
           residual=None, relu=False):
    """Shared training forward (Batch Normalization and Renormalization, with the fused
    residual add and ReLU when asked).

    Validates x/weight/bias/eps/layout/out/residual (the caller validates its own extra
    arguments before calling), runs the fused statistics + normalization kernel and returns
    (y, mean, var, invstd, M) with var biased and M the values per channel.
    `renorm` is passed to the kernel: None, or (running_mean, running_std (float64),
    r_out, d_out, rmin, rmax, dmax).
    """
    x = data_array("x", x)
    axis = channel_axis(layout, x.ndim)
    C = x.shape[axis]
    if residual is not None:
        residual = like_x("residual", residual, x)
    M = values_per_channel(x.shape, axis)
    eps = eps_value(eps)
    if _support.params_ok(C, 0, weight, bias):
        w, b = weight, bias
    else:
        w = channel_vector("weight", weight, C)
        b = channel_vector("bias", bias, C)
    if out is not None:
        inputs = {"x": x, "weight": weight, "bias": bias, "residual": residual}
        inputs.update(extra_inputs or {})
        out = out_array(out, x.shape, x.dtype, inputs, may_alias=("x", "residual"))
    training_count("x", x.shape, axis, M)
    plan, xc = _plan(x, axis, layout)
    nthreads = effective_threads(num_threads, x.size, plan.view == PLANAR)
    y, yc, direct = _result(plan, x.shape, x.dtype, out)
    stats = np.empty((5, C))
    if C:
        _kernels.train_forward(xc, yc, plan.view, plan.N, C, plan.S, w, b, eps, stats, renorm,
                               nthreads, _memory.stream_output(x.nbytes, out),
                               None if residual is None else _like(residual, plan), relu)
    return _finish(y, yc, direct, plan), stats[0], stats[1], stats[2], M


def _update_running(momentum, *pairs):
    """running <- (1 - momentum) * running + momentum * batch for each (running, batch)
    pair, in float64, rounded once to each buffer's dtype, in place: every buffer or none,
    and silently whatever np.errstate says (rounding overflows to inf, as defined)."""
    with np.errstate(all="ignore"):
        store_rounded(*[(running, momentum * batch + (1.0 - momentum) *
                         running.astype(np.float64)) for running, batch in pairs])


def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, layout="NCHW",
                     running_mean=None, running_var=None, momentum=0.1,
                     out=None, num_threads=None):
    """Batch Normalization, training forward: normalize with the batch statistics.

    ``y = (x - mean) * invstd * weight + bias`` per channel, with ``mean`` and the biased
    variance ``var`` over every axis but the channel axis (one fused pass over the data) and
    ``invstd = 1 / sqrt(var + eps)``.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, ndim >= 2
        Input of shape (N, C, ...) for ``layout="NCHW"`` or (N, ..., C) for ``"NHWC"``.
        Any memory order; read-only is fine.
    weight, bias : array_like (C,), optional
        Affine parameters (gamma, beta); None means 1 and 0.
    eps : float
        Added to the variance, >= 0.
    layout : {"NCHW", "NHWC"}
        Where the channel axis is: 1, or last.
    running_mean, running_var : ndarray (C,), optional
        Running statistics, both or neither, updated in place with PyTorch's rule
        ``running = (1 - momentum) * running + momentum * batch`` (unbiased batch variance).
    momentum : float in [0, 1]
        Weight of the new batch in the running update.
    out : ndarray, optional
        Where to write y (shape and dtype of x); may be ``x`` itself.
    num_threads : int, optional
        Threads for this call; default :func:`fastbn.get_num_threads`.

    Returns
    -------
    y : ndarray
        Same shape and dtype as x (``out`` if given).
    mean, invstd : ndarray (C,), float64
        Batch mean and ``1 / sqrt(biased_var + eps)``, as :func:`batch_norm_backward` takes them.

    Raises
    ------
    TypeError
        x, weight, bias or a running buffer is not a floating-point array.
    ValueError
        Bad shape, layout, eps, momentum, num_threads or out; one value per channel.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    >>> y, mean, invstd = fastbn.batch_norm_train(x)
    >>> y.shape, mean
    ((2, 3, 4), array([ 7.5, 11.5, 15.5]))
    >>> bool(abs(y.mean()) < 1e-6)
    True
    """
    return _batch_norm_train(x, weight, bias, eps, layout, running_mean, running_var, momentum,
                             out, num_threads)


def _batch_norm_train(x, weight, bias, eps, layout, running_mean, running_var, momentum, out,
                      num_threads, residual=None, relu=False):
    """batch_norm_train, with the fused residual add and ReLU when asked."""
    x = data_array("x", x)
    axis = channel_axis(layout, x.ndim)
    C = x.shape[axis]
    if running_mean is None or not _support.running_pair_ok(running_mean, running_var, C):
        running_buffers(running_mean, running_var, C)
    momentum = momentum_value(momentum)
    y, mean, var, invstd, M = _train(
        x, weight, bias, eps, layout, out, num_threads,
        extra_inputs={"running_mean": running_mean, "running_var": running_var},
        residual=residual, relu=relu)
    # mean and var are rows 0 and 1 of the kernel's (5, C) statistics array, mean.base;
    # the kernel updates contiguous float buffers in one loop, NumPy any other
    if running_mean is not None and C and not _support.update_running(
            running_mean, running_var, mean.base, momentum, M / (M - 1.0)):
        _update_running(momentum, (running_mean, mean),
                        (running_var, var * (M / (M - 1.0))))
    return y, mean, invstd


def batch_norm_infer(x, running_mean, running_var, weight=None, bias=None, *, eps=1e-5,
                     layout="NCHW", out=None, num_threads=None):
    """Batch Normalization, inference forward from running statistics.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, ndim >= 2
        Input, (N, C, ...) or (N, ..., C).
    running_mean, running_var : array_like (C,)
        Statistics to normalize with (not modified).
    weight, bias : array_like (C,), optional
        Affine parameters; None means 1 and 0.
    eps : float
        Added to the variance, >= 0.
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional
        Where to write y; may be ``x`` itself (in place).
    num_threads : int, optional

    Returns
    -------
    y : ndarray
        Same shape and dtype as x.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm_train`.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.ones((2, 3, 5), dtype=np.float32)
    >>> y = fastbn.batch_norm_infer(x, np.ones(3), np.full(3, 4.0), eps=0.0)
    >>> float(y.max())
    0.0
    """
    return _infer(x, running_mean, running_var, weight, bias, eps, layout, out, num_threads)


def _infer(x, running_mean, running_var, weight, bias, eps, layout, out, num_threads,
           divisor_is_std=False, residual=None, relu=False):
    """batch_norm_infer; with divisor_is_std, running_var is a standard deviation and
    y = (x - running_mean) * weight / running_var + bias (Batch Renormalization's eval);
    residual and relu: the fused epilogue y = max(y + residual, 0)."""
    x = data_array("x", x)
    axis = channel_axis(layout, x.ndim)
    C = x.shape[axis]
    if residual is not None:
        residual = like_x("residual", residual, x)
    if _support.params_ok(C, 2, running_mean, running_var, weight, bias):
        rm, rv, w, b = running_mean, running_var, weight, bias
    else:
        rm = channel_vector("running_mean", running_mean, C, optional=False)
        rv = channel_vector("running_var", running_var, C, optional=False)
        w = channel_vector("weight", weight, C)
        b = channel_vector("bias", bias, C)
    eps = eps_value(eps)
    if out is not None:
        out = out_array(out, x.shape, x.dtype,
                        {"x": x, "running_mean": running_mean, "running_var": running_var,
                         "weight": weight, "bias": bias, "residual": residual},
                        may_alias=("x", "residual"))
    plan, xc = _plan(x, axis, layout)
    nthreads = effective_threads(num_threads, x.size, plan.view == PLANAR)
    y, yc, direct = _result(plan, x.shape, x.dtype, out)
    if x.size:
        _kernels.infer_forward(xc, yc, plan.view, plan.N, C, plan.S, rm, rv, w, b, eps, nthreads,
                               divisor_is_std, _memory.stream_output(x.nbytes, out),
                               None if residual is None else _like(residual, plan), relu)
    return _finish(y, yc, direct, plan)


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, layout="NCHW",
                        out=None, num_threads=None):
    """Batch Normalization backward: gradients of x, weight and bias.

    With ``xhat = (x - mean) * invstd`` and ``m`` values per channel:

    * ``training=True`` (mean, invstd are the batch statistics of the forward):
      ``dx = weight * invstd * (dy - sum(dy)/m - xhat * sum(dy * xhat)/m)``;
    * ``training=False`` (mean, invstd fixed, e.g. from running stats):
      ``dx = weight * invstd * dy``;
    * always ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)``.

    The two sums come from one fused pass over dy and x.

    Parameters
    ----------
    dy : ndarray
        Gradient of the output, shape and dtype of x.
    x : ndarray, float32, float64, float16 or bfloat16
        The forward's input.
    mean, invstd : array_like (C,)
        As returned by :func:`batch_norm_train` (or running mean and
        ``1/sqrt(running_var + eps)`` with ``training=False``).
    weight : array_like (C,), optional
        None means 1.
    training : bool
        Whether the statistics depended on the batch.
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional
        Where to write dx; may be ``dy`` itself (in place).
    num_threads : int, optional

    Returns
    -------
    dx : ndarray
        Shape and dtype of x.
    dweight, dbias : ndarray (C,)
        In x's dtype, float32 for float16 and bfloat16 data (returned also when weight is
        None).

    Raises
    ------
    TypeError, ValueError
        Non-float arrays; mismatched shapes or dtypes; bad layout, out or num_threads.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4, 4))
    >>> y, mean, invstd = fastbn.batch_norm_train(x)
    >>> dx, dw, db = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    >>> float(np.abs(dx).max()) < 1e-12, db
    (True, array([128., 128., 128.]))
    """
    return _backward(dy, x, mean, invstd, weight, training, layout, out, num_threads)


# A backward call's validated arguments and canonical views (what the kernels take)
GradCall = namedtuple("GradCall", "dy x C mean w invstd training out inputs plan xc gc "
                                  "nthreads")


def _grad_call(dy, x, mean, invstd, weight, training, layout, out, num_threads, y=None):
    """Validate the arguments of a backward (y: the fused ReLU's output, laid out as x, or
    None) and put dy and x in their canonical view; returns (GradCall, y)."""
    dy, x = gradient_pair(dy, x)
    axis = channel_axis(layout, x.ndim)
    C = x.shape[axis]
    if y is not None:
        y = like_x("y", y, x)
    if _support.params_ok(C, 2, mean, invstd, weight):
        mean_k, invstd_k, w = mean, invstd, weight
    else:
        mean_k = channel_vector("mean", mean, C, optional=False)
        invstd_k = channel_vector("invstd", invstd, C, optional=False)
        w = channel_vector("weight", weight, C)
    training = flag("training", training)
    inputs = {"dy": dy, "x": x, "mean": mean, "invstd": invstd, "weight": weight, "y": y}
    if out is not None:
        out = out_array(out, x.shape, x.dtype, inputs, may_alias=("dy",))
    plan, xc = _plan(x, axis, layout)
    nthreads = effective_threads(num_threads, x.size, plan.view == PLANAR)
    return GradCall(dy, x, C, mean_k, w, invstd_k, training, out, inputs, plan, xc,
                    _like(dy, plan), nthreads), y


def _backward(dy, x, mean, invstd, weight, training, layout, out, num_threads, y=None,
              dresidual=None, float64_grads=False):
    """batch_norm_backward; with y (the fused ReLU's forward output), dy counts where
    y > 0 only, and dresidual receives that masked dy. float64_grads: dweight and dbias
    are returned unrounded, in float64 (for callers that combine them further)."""
    g, y = _grad_call(dy, x, mean, invstd, weight, training, layout, out, num_threads, y)
    x, C, plan = g.x, g.C, g.plan
    if dresidual is not None:
        dresidual = out_array(dresidual, x.shape, x.dtype, dict(g.inputs, out=g.out),
                              name="dresidual")
    dx, dxc, direct = _result(plan, x.shape, x.dtype, g.out)
    if dresidual is not None:
        dres, dresc, dres_direct = _result(plan, x.shape, x.dtype, dresidual)
    gdt = np.float64 if float64_grads else grad_dtype(x.dtype)
    grads = np.empty((2, C), gdt) if x.size else np.zeros((2, C), gdt)
    if x.size:
        _kernels.backward(g.gc, g.xc, dxc, plan.view, plan.N, C, plan.S, g.mean, g.invstd, g.w,
                          g.training, grads, g.nthreads,
                          _memory.stream_output(x.nbytes, g.out),
                          None if y is None else _like(y, plan),
                          None if dresidual is None else dresc)
    if dresidual is not None:
        _finish(dres, dresc, dres_direct, plan)
    return _finish(dx, dxc, direct, plan), grads[0], grads[1]


def fold_batch_norm(running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Fold inference-mode Batch Normalization into one per-channel scale and shift.

    ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, computed in float64 and returned in the
    common floating dtype of the arguments.

    Parameters
    ----------
    running_mean, running_var : array_like (C,)
    weight, bias : array_like (C,), optional
        None means 1 and 0.
    eps : float

    Returns
    -------
    scale, shift : ndarray (C,)

    Raises
    ------
    TypeError
        A non-floating argument.
    ValueError
        Mismatched lengths, bad eps.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> fastbn.fold_batch_norm(np.array([1.0, 2.0]), np.array([4.0, 1.0]), eps=0.0)
    (array([0.5, 1. ]), array([-0.5, -2. ]))
    """
    rm, rv, w, b, eps, dtype = fold_arguments(running_mean, running_var, weight, bias, eps)
    with np.errstate(all="ignore"):     # var + eps == 0 gives inf/NaN
        scale = w / np.sqrt(rv + eps)
        shift = b - rm * scale
    return rounded(scale, dtype), rounded(shift, dtype)
