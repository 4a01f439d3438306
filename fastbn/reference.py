"""Plain NumPy twin of every fastbn kernel: float64 math, the same signatures and the same
argument errors. It is the test oracle and the readable specification of what the
kernels compute; it is not fast.
"""
import functools

import numpy as np

from ._validate import (channel_axis, channel_vector, data_array, eps_value, flag,
                        momentum_value, out_array, running_buffers, same_shape, thread_count)

__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward", "fold_batch_norm"]


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


@_quiet
def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, layout="NCHW",
                     running_mean=None, running_var=None, momentum=0.1,
                     out=None, num_threads=None):
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
    m = int(np.prod([s for i, s in enumerate(x.shape) if i != axis]))
    if m <= 1:
        raise ValueError(f"x must have more than 1 value per channel in training, got shape "
                         f"{x.shape}")
    xd = x.astype(np.float64)
    mean = xd.mean(axis=red)
    # docs/math.rst: a NaN or an infinity in a channel makes its statistics NaN (the
    # variance of a batch holding an infinity is undefined), not inf
    mean[~np.isfinite(xd).all(axis=red)] = np.nan
    xc = xd - _bc(mean, x, axis)
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
                        out=None, num_threads=None):
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
    x = data_array("x", x)
    dy = data_array("dy", dy)
    same_shape("dy", dy, "x", x)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
    axis, red = _axes(x, layout)
    C = x.shape[axis]
    training = flag("training", training)
    out = out_array(out, x.shape, x.dtype, {"dy": dy, "x": x, "mean": mean,
                    "invstd": invstd, "weight": weight}, may_alias=("dy",))
    mean = channel_vector("mean", mean, C, optional=False)
    invstd = channel_vector("invstd", invstd, C, optional=False)
    w = channel_vector("weight", weight, C)
    w = np.ones(C) if w is None else w
    thread_count(num_threads, lambda: 1)
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
    return (_write(dx.astype(x.dtype), out), (dot * invstd).astype(x.dtype),
            sum_g.astype(x.dtype))


@_quiet
def fold_batch_norm(running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """NumPy twin of :func:`fastbn.fold_batch_norm` (same parameters, returns and errors).

    Examples
    --------
    >>> from fastbn import reference
    >>> reference.fold_batch_norm([1.0], [4.0], eps=0.0)
    (array([0.5]), array([-0.5]))
    """
    rm_arr = np.asarray(running_mean)
    if rm_arr.ndim != 1:
        raise ValueError(f"running_mean must be 1-d (C,), got shape {rm_arr.shape}")
    C = rm_arr.shape[0]
    rm = channel_vector("running_mean", running_mean, C, optional=False)
    rv = channel_vector("running_var", running_var, C, optional=False)
    w, b = _affine(weight, bias, C)
    eps = eps_value(eps)
    dtype = np.result_type(*[np.asarray(a).dtype for a in (running_mean, running_var, weight,
                                                            bias) if a is not None])
    scale = w / np.sqrt(rv + eps)
    return scale.astype(dtype), (b - rm * scale).astype(dtype)
