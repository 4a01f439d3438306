"""Plain NumPy twin of every fastbn kernel: float64 math, the same signatures and the same
argument errors. It is the test oracle and the readable specification of what the
kernels compute; it is not fast.
"""
import functools

import numpy as np

from ._threads import thread_count
from ._validate import (channel_axis, channel_vector, clipping, data_array, eps_value, flag,
                        fold_arguments, gradient_pair, like_x, momentum_value, out_array, positive_int,
                        positive_vector,
                        running_buffers, training_count)
from ._validate import negative_slope as negative_slope_value

__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward", "fold_batch_norm",
           "batch_norm_relu_train", "batch_norm_relu_infer", "batch_norm_relu_backward",
           "batch_renorm_train", "batch_renorm_backward"]


def _quiet(func):
    """NaN and inf propagate silently, as in the kernels (no RuntimeWarning)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return func(*args, **kwargs)
    return wrapper


def _axes(x, layout):
    axis = channel_axis(layout, x.ndim)
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    return axis, reduce


def _bc(v, x, axis):
    """A (C,) vector shaped to broadcast along x's channel axis."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def _write(result, out):
    if out is None:
        return result
    out[...] = result
    return out


def _affine(weight, bias, C):
    w = channel_vector("weight", weight, C)
    b = channel_vector("bias", bias, C)
    return (np.ones(C) if w is None else w), (np.zeros(C) if b is None else b)


def _centred_batch(x, axis, red):
    """(x - mean in float64, the batch mean, values per channel) of a training batch."""
    m = training_count("x", x.shape, axis)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=red)
    # docs/math.rst: a NaN or an infinity in a channel makes its statistics NaN (the
    # variance of a batch holding an infinity is undefined), not inf
    mean[~np.isfinite(xd).all(axis=red)] = np.nan
    return xd - _bc(mean, x, axis), mean, m


@_quiet
def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, layout="NCHW",
                     running_mean=None, running_var=None, momentum=0.1,
                     out=None, num_threads=None, ghost_batch_size=None):
    """NumPy twin of :func:`fastbn.batch_norm_train` (same parameters, returns and errors).

    Float64 arithmetic throughout: ``mean`` and the biased ``var`` over every axis but the
    channel axis, ``invstd = 1/sqrt(var + eps)``, ``y = (x - mean) * invstd * weight + bias``,
    and PyTorch's running update with the unbiased variance.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import reference
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y, mean, invstd = reference.batch_norm_train(x, eps=0.0)
    >>> y, mean, invstd
    (array([[-1., -1.],
           [ 1.,  1.]]), array([2., 4.]), array([1. , 0.5]))
    """
    x = data_array("x", x)
    axis, red = _axes(x, layout)
    C = x.shape[axis]
    w, b = _affine(weight, bias, C)
    eps = eps_value(eps)
    running_buffers(running_mean, running_var, C)
    momentum = momentum_value(momentum)
    thread_count(num_threads, lambda: 1)
    out = out_array(out, x.shape, x.dtype, {"x": x, "weight": weight, "bias": bias,
                    "running_mean": running_mean, "running_var": running_var},
                    may_alias=("x",))
    if ghost_batch_size is not None:
        # each ghost batch normalized as a batch of its own, the running statistics
        # updated once per group, in order
        size = positive_int("ghost_batch_size", ghost_batch_size)
        parts = [(a, min(a + size, x.shape[0])) for a in range(0, x.shape[0], size)]
        y = np.empty(x.shape, np.float64)
        mean, invstd = np.empty((len(parts), C)), np.empty((len(parts), C))
        for k, (a, c) in enumerate(parts):
            y[a:c], mean[k], invstd[k] = batch_norm_train(
                x[a:c].astype(np.float64), w, b, eps=eps, layout=layout,
                running_mean=running_mean, running_var=running_var, momentum=momentum)
        if not parts:
            raise ValueError("x must have more than 1 value per channel in training")
        return _write(y.astype(x.dtype), out), mean, invstd
    xc, mean, m = _centred_batch(x, axis, red)
    var = (xc * xc).mean(axis=red)                 # biased: normalization uses it
    invstd = 1.0 / np.sqrt(var + eps)
    y = xc * _bc(invstd * w, x, axis) + _bc(b, x, axis)
    if running_mean is not None:
        unbiased = var * m / (m - 1)
        running_mean[...] = momentum * mean + (1 - momentum) * running_mean.astype(np.float64)
        running_var[...] = momentum * unbiased + (1 - momentum) * running_var.astype(np.float64)
    return _write(y.astype(x.dtype), out), mean, invstd


@_quiet
def batch_norm_infer(x, running_mean, running_var, weight=None, bias=None, *, eps=1e-5,
                     layout="NCHW", out=None, num_threads=None):
    """NumPy twin of :func:`fastbn.batch_norm_infer` (same parameters, returns and errors).

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import reference
    >>> reference.batch_norm_infer(np.array([[3.0], [5.0]]), [1.0], [4.0], eps=0.0)
    array([[1.],
           [2.]])
    """
    x = data_array("x", x)
    axis, _ = _axes(x, layout)
    C = x.shape[axis]
    rm = channel_vector("running_mean", running_mean, C, optional=False)
    rv = channel_vector("running_var", running_var, C, optional=False)
    w, b = _affine(weight, bias, C)
    eps = eps_value(eps)
    thread_count(num_threads, lambda: 1)
    out = out_array(out, x.shape, x.dtype, {"x": x, "running_mean": running_mean,
                    "running_var": running_var, "weight": weight, "bias": bias},
                    may_alias=("x",))
    xd = x.astype(np.float64)
    y = (xd - _bc(rm, x, axis)) * _bc(w / np.sqrt(rv + eps), x, axis) + _bc(b, x, axis)
    return _write(y.astype(x.dtype), out)


@_quiet
def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, layout="NCHW",
                        out=None, num_threads=None, ghost_batch_size=None):
    """NumPy twin of :func:`fastbn.batch_norm_backward` (same parameters, returns and errors).

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import reference
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = reference.batch_norm_train(x, eps=0.0)
    >>> reference.batch_norm_backward(np.array([[1.0], [0.0]]), x, mean, invstd)
    (array([[0.],
           [0.]]), array([-1.]), array([1.]))
    """
    dy, x = gradient_pair(dy, x)
    axis, red = _axes(x, layout)
    C = x.shape[axis]
    training = flag("training", training)
    out = out_array(out, x.shape, x.dtype, {"dy": dy, "x": x, "mean": mean,
                    "invstd": invstd, "weight": weight}, may_alias=("dy",))
    w = channel_vector("weight", weight, C)
    w = np.ones(C) if w is None else w
    thread_count(num_threads, lambda: 1)
    if ghost_batch_size is None:
        mean = channel_vector("mean", mean, C, optional=False)
        invstd = channel_vector("invstd", invstd, C, optional=False)
        dx, dweight, dbias = _backward64(dy, x, mean, invstd, w, training, axis, red)
    else:
        # one row of mean and invstd per ghost batch; dweight and dbias summed over them
        size = positive_int("ghost_batch_size", ghost_batch_size)
        parts = [(a, min(a + size, x.shape[0])) for a in range(0, x.shape[0], size)]
        mean, invstd = np.asarray(mean, np.float64), np.asarray(invstd, np.float64)
        for name, v in (("mean", mean), ("invstd", invstd)):
            if v.shape != (len(parts), C):
                raise ValueError(f"{name} must have shape ({len(parts)}, {C}), got {v.shape}")
        dx = np.empty(x.shape)
        dweight, dbias = np.zeros(C), np.zeros(C)
        for k, (a, c) in enumerate(parts):
            dx[a:c], dw, db = _backward64(dy[a:c], x[a:c], mean[k], invstd[k], w, training,
                                          axis, red)
            dweight += dw
            dbias += db
    return _write(dx.astype(x.dtype), out), dweight.astype(x.dtype), dbias.astype(x.dtype)


@_quiet
def batch_norm_backward_from_output(dy, y, invstd, weight=None, bias=None, *,
                                    negative_slope=None, layout="NCHW", out=None,
                                    num_threads=None):
    """NumPy twin of :func:`fastbn.batch_norm_backward_from_output`: xhat = (y - bias) /
    weight in float64, then the backward's formulas with it. With a negative_slope (> 0),
    y is a leaky ReLU's output: xhat = (v - bias) / weight of its pre-activation v = y where
    y > 0, else y / negative_slope, and dy where y > 0, else dy * negative_slope.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import reference
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = reference.batch_norm_train(x, np.array([2.0]), eps=0.0)
    >>> reference.batch_norm_backward_from_output(np.array([[1.0], [0.0]]), y, invstd,
    ...                                           np.array([2.0]))
    (array([[0.],
           [0.]]), array([-1.]), array([1.]))
    """
    dy, y = gradient_pair(dy, y)
    axis, red = _axes(y, layout)
    C = y.shape[axis]
    out = out_array(out, y.shape, y.dtype, {"dy": dy, "y": y, "invstd": invstd,
                    "weight": weight, "bias": bias}, may_alias=("dy",))
    invstd = channel_vector("invstd", invstd, C, optional=False)
    w, b = _affine(weight, bias, C)
    if np.any(w == 0):
        raise ValueError(f"weight must have no zero, got weight[{np.flatnonzero(w == 0)[0]}] = 0")
    slope = None if negative_slope is None else negative_slope_value(negative_slope,
                                                                     invertible=True)
    thread_count(num_threads, lambda: 1)
    g = dy.astype(np.float64)
    v = y.astype(np.float64)
    if slope is not None:
        g = _leaky_grad(dy, y, slope)
        v = np.where(y > 0, v, v / slope)
    xhat = (v - _bc(b, y, axis)) / _bc(w, y, axis)
    m = y.size // C if C else 0
    sum_g = g.sum(axis=red)
    dot = (g * xhat).sum(axis=red)
    if m:
        dx = (g - _bc(sum_g / m, y, axis) - xhat * _bc(dot / m, y, axis)) * _bc(invstd * w, y, axis)
    else:
        dx = g
    return _write(dx.astype(y.dtype), out), dot.astype(y.dtype), sum_g.astype(y.dtype)


def _backward64(dy, x, mean, invstd, w, training, axis, red):
    """dx, dweight and dbias of one batch, in float64."""
    C = x.shape[axis]
    g = dy.astype(np.float64)
    xc = x.astype(np.float64) - _bc(mean, x, axis)
    m = x.size // C if C else 0
    sum_g = g.sum(axis=red)
    dot = (g * xc).sum(axis=red)
    if training and m:
        # dx = w*invstd * (g - mean(g) - xhat * mean(g * xhat)), xhat = xc * invstd
        k2 = dot / m * invstd * invstd
        dx = (g - _bc(sum_g / m, x, axis) - xc * _bc(k2, x, axis)) * _bc(invstd * w, x, axis)
    else:
        dx = g * _bc(invstd * w, x, axis)
    return dx, dot * invstd, sum_g


def _relu_epilogue(y, x, residual, out, slope=0.0):
    """max(y + residual, 0) from the float64 y of the normalization, rounded once to x's
    dtype; NaN stays NaN (np.maximum). A slope > 0: the leaky ReLU, v where v >= 0 (and
    NaN), else v * slope."""
    if residual is not None:
        y = y + residual.astype(np.float64)
    if slope:
        return _write((y * np.where(y < 0, slope, 1.0)).astype(x.dtype), out)
    return _write(np.maximum(y, 0.0).astype(x.dtype), out)


def _leaky_grad(dy, y, slope):
    """The leaky ReLU's backward in float64: dy where its output y > 0, else dy * slope (a
    NaN y gives dy * slope)."""
    return dy.astype(np.float64) * np.where(y > 0, 1.0, slope)


def _relu_out(x, layout, residual, out, inputs):
    """Validate the fused forward's residual and out (out may be x or residual itself)."""
    channel_axis(layout, x.ndim)
    if residual is not None:
        residual = like_x("residual", residual, x)
    out = out_array(out, x.shape, x.dtype, dict(inputs, x=x, residual=residual),
                    may_alias=("x", "residual"))
    return residual, out


@_quiet
def batch_norm_relu_train(x, weight=None, bias=None, *, residual=None, eps=1e-5, layout="NCHW",
                          running_mean=None, running_var=None, momentum=0.1, out=None,
                          num_threads=None, negative_slope=0.0):
    """NumPy twin of :func:`fastbn.batch_norm_relu_train` (same parameters, returns and
    errors): :func:`batch_norm_train`'s float64 y, plus residual, then ``np.maximum(., 0)``
    (``v * where(v < 0, negative_slope, 1)`` for a leaky ReLU), rounded once.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import reference
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y, mean, invstd = reference.batch_norm_relu_train(x, eps=0.0, residual=np.full((2, 2), 0.5))
    >>> y
    array([[0. , 0. ],
           [1.5, 1.5]])
    """
    x = data_array("x", x)
    slope = negative_slope_value(negative_slope)
    residual, out = _relu_out(x, layout, residual, out, {"weight": weight, "bias": bias,
                              "running_mean": running_mean, "running_var": running_var})
    y, mean, invstd = batch_norm_train(x.astype(np.float64), weight, bias, eps=eps,
                                       layout=layout, running_mean=running_mean,
                                       running_var=running_var, momentum=momentum,
                                       num_threads=num_threads)
    return _relu_epilogue(y, x, residual, out, slope), mean, invstd


@_quiet
def batch_norm_relu_infer(x, running_mean, running_var, weight=None, bias=None, *,
                          residual=None, eps=1e-5, layout="NCHW", out=None, num_threads=None,
                          negative_slope=0.0):
    """NumPy twin of :func:`fastbn.batch_norm_relu_infer` (same parameters, returns and
    errors).

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import reference
    >>> reference.batch_norm_relu_infer(np.array([[3.0], [-5.0]]), [1.0], [4.0], eps=0.0)
    array([[1.],
           [0.]])
    """
    x = data_array("x", x)
    slope = negative_slope_value(negative_slope)
    residual, out = _relu_out(x, layout, residual, out, {"running_mean": running_mean,
                              "running_var": running_var, "weight": weight, "bias": bias})
    y = batch_norm_infer(x.astype(np.float64), running_mean, running_var, weight, bias, eps=eps,
                         layout=layout, num_threads=num_threads)
    return _relu_epilogue(y, x, residual, out, slope)


@_quiet
def batch_norm_relu_backward(dy, y, x, mean, invstd, weight=None, *, training=True,
                             layout="NCHW", out=None, dresidual=None, num_threads=None,
                             negative_slope=0.0):
    """NumPy twin of :func:`fastbn.batch_norm_relu_backward` (same parameters, returns and
    errors): :func:`batch_norm_backward` of ``g = where(y > 0, dy, 0)`` (a leaky ReLU's:
    ``dy * where(y > 0, 1, negative_slope)``, in float64), and g into dresidual.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import reference
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = reference.batch_norm_relu_train(x, eps=0.0)
    >>> reference.batch_norm_relu_backward(np.ones((2, 1)), y, x, mean, invstd)
    (array([[0.],
           [0.]]), array([1.]), array([1.]))
    """
    dy, x = gradient_pair(dy, x)
    channel_axis(layout, x.ndim)
    y = like_x("y", y, x)
    slope = negative_slope_value(negative_slope)
    inputs = {"dy": dy, "x": x, "mean": mean, "invstd": invstd, "weight": weight, "y": y}
    out = out_array(out, x.shape, x.dtype, inputs, may_alias=("dy",))
    dresidual = out_array(dresidual, x.shape, x.dtype, dict(inputs, out=out), name="dresidual")
    if slope:
        g = _leaky_grad(dy, y, slope)
        dx, dweight, dbias = batch_norm_backward(g, x.astype(np.float64), mean, invstd, weight,
                                                 training=training, layout=layout,
                                                 num_threads=num_threads)
        g = g.astype(x.dtype)
        dx, dweight, dbias = dx.astype(x.dtype), dweight.astype(x.dtype), dbias.astype(x.dtype)
    else:
        g = np.where(y > 0, dy, np.zeros((), dy.dtype))       # NaN > 0 is False: 0
        dx, dweight, dbias = batch_norm_backward(g, x, mean, invstd, weight, training=training,
                                                 layout=layout, num_threads=num_threads)
    if dresidual is not None:
        dresidual[...] = g
    return _write(dx, out), dweight, dbias


@_quiet
def fold_batch_norm(running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """NumPy twin of :func:`fastbn.fold_batch_norm` (same parameters, returns and errors).

    Examples
    --------
    >>> from fastbn import reference
    >>> reference.fold_batch_norm([1.0], [4.0], eps=0.0)
    (array([0.5]), array([-0.5]))
    """
    rm, rv, w, b, eps, dtype = fold_arguments(running_mean, running_var, weight, bias, eps)
    # from the definition y(x) = (x - mean) / sqrt(var + eps) * weight + bias = x*scale + shift:
    # scale is dy/dx, shift is y(0)
    std = np.sqrt(rv + eps)
    scale = w / std
    shift = (0.0 - rm) / std * w + b
    return scale.astype(dtype), shift.astype(dtype)


@_quiet
def batch_renorm_train(x, weight, bias, running_mean, running_std, *, rmax=3.0, dmax=5.0,
                       momentum=0.01, eps=1e-5, layout="NCHW", out=None, num_threads=None):
    """NumPy twin of :func:`fastbn.batch_renorm_train` (same parameters, returns and errors).

    Float64 arithmetic from the paper's definitions: ``std = sqrt(var + eps)`` of the batch,
    ``r = clip(std / running_std, 1/rmax, rmax)``, ``d = clip((mean - running_mean) /
    running_std, -dmax, dmax)`` from the running statistics before the update,
    ``y = weight * ((x - mean) / std * r + d) + bias``, then
    ``running += momentum * (batch - running)`` for the mean and the std.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import reference
    >>> x = np.array([[1.0], [3.0]])
    >>> rm, rs = np.zeros(1), np.ones(1)
    >>> y, mean, std, r, d = reference.batch_renorm_train(x, None, None, rm, rs, eps=0.0)
    >>> y.ravel(), r, d, rm
    (array([1., 3.]), array([1.]), array([2.]), array([0.02]))
    """
    x = data_array("x", x)
    axis, red = _axes(x, layout)
    C = x.shape[axis]
    for name, buf in (("running_mean", running_mean), ("running_std", running_std)):
        if buf is None:
            raise ValueError(f"{name} is required (a writable float array of shape ({C},))")
    running_buffers(running_mean, running_std, C, names=("running_mean", "running_std"))
    mu = channel_vector("running_mean", running_mean, C, optional=False)
    sigma = positive_vector("running_std", running_std, C)
    rmin, rmax, dmax = clipping(None, rmax, dmax)
    momentum = momentum_value(momentum)
    w, b = _affine(weight, bias, C)
    eps = eps_value(eps)
    thread_count(num_threads, lambda: 1)
    out = out_array(out, x.shape, x.dtype, {"x": x, "weight": weight, "bias": bias,
                    "running_mean": running_mean, "running_std": running_std},
                    may_alias=("x",))
    xc, mean, _ = _centred_batch(x, axis, red)
    std = np.sqrt((xc * xc).mean(axis=red) + eps)
    r = np.clip(std / sigma, rmin, rmax)
    d = np.clip((mean - mu) / sigma, -dmax, dmax)
    y = _bc(w, x, axis) * (xc / _bc(std, x, axis) * _bc(r, x, axis) + _bc(d, x, axis)) \
        + _bc(b, x, axis)
    running_mean[...] = mu + momentum * (mean - mu)
    running_std[...] = sigma + momentum * (std - sigma)
    return _write(y.astype(x.dtype), out), mean, std, r, d


@_quiet
def batch_renorm_backward(dy, x, mean, std, r, d, weight=None, *, layout="NCHW", out=None,
                          num_threads=None):
    """NumPy twin of :func:`fastbn.batch_renorm_backward` (same parameters, returns and
    errors).

    With r and d held constant, ``xhat0 = (x - mean) / std`` and ``g = dy``:
    ``dx = weight * r / std * (g - mean(g) - xhat0 * mean(g * xhat0))``,
    ``dweight = sum(g * (r * xhat0 + d))``, ``dbias = sum(g)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import reference
    >>> x = np.array([[1.0], [3.0]])
    >>> reference.batch_renorm_backward(np.array([[1.0], [0.0]]), x, [2.0], [1.0], [2.0],
    ...                                 [0.5])
    (array([[0.],
           [0.]]), array([-1.5]), array([1.]))
    """
    dy, x = gradient_pair(dy, x)
    axis, red = _axes(x, layout)
    C = x.shape[axis]
    mean64 = channel_vector("mean", mean, C, optional=False)
    std64 = positive_vector("std", std, C)
    r64 = channel_vector("r", r, C, optional=False)
    d64 = channel_vector("d", d, C, optional=False)
    w = channel_vector("weight", weight, C)
    w = np.ones(C) if w is None else w
    thread_count(num_threads, lambda: 1)
    out = out_array(out, x.shape, x.dtype, {"dy": dy, "x": x, "mean": mean, "std": std,
                    "r": r, "d": d, "weight": weight}, may_alias=("dy",))
    g = dy.astype(np.float64)
    xh0 = (x.astype(np.float64) - _bc(mean64, x, axis)) / _bc(std64, x, axis)
    m = x.size // C if C else 0
    mg = g.mean(axis=red) if m else np.zeros(C)
    mgx = (g * xh0).mean(axis=red) if m else np.zeros(C)
    dx = _bc(w * r64 / std64, x, axis) * (g - _bc(mg, x, axis) - xh0 * _bc(mgx, x, axis))
    dweight = (g * (_bc(r64, x, axis) * xh0 + _bc(d64, x, axis))).sum(axis=red)
    return (_write(dx.astype(x.dtype), out), dweight.astype(x.dtype),
            g.sum(axis=red).astype(x.dtype))
