"""The public functional API of Batch Normalization over the channel axis of an array of
shape (N, C, ...) ("NCHW") or (N, ..., C) ("NHWC"): training forward, inference, backward
and folding. Each call goes through fastbn._calls, which validates its arguments once,
picks the canonical view of the data (planar or rows, copying only when the memory order
fits neither) and runs the kernel.
"""
import numpy as np

from . import _calls, _ghost
from ._rounding import rounded
from ._threads import thread_count
from ._validate import negative_slope as slope_value
from ._validate import (channel_axis, channel_vector, data_array, fold_arguments, out_array,
                        same_shape)

__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward",
           "batch_norm_backward_from_output", "fold_batch_norm"]


def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, layout="NCHW",
                     running_mean=None, running_var=None, momentum=0.1,
                     out=None, num_threads=None, ghost_batch_size=None):
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
    ghost_batch_size : int >= 1, optional
        Ghost Batch Normalization (Hoffer, Hubara and Soudry, 2017): each consecutive group
        of this many samples along N (the last group may be smaller) is normalized with its
        own statistics, exactly as separate calls on the slices would, and the running
        statistics are updated once per group, in order. Every group needs more than one
        value per channel.

    Returns
    -------
    y : ndarray
        Same shape and dtype as x (``out`` if given).
    mean, invstd : ndarray (C,), float64
        Batch mean and ``1 / sqrt(biased_var + eps)``, as :func:`batch_norm_backward` takes them;
        with ``ghost_batch_size``, (G, C): one row per group, G = ceil(N / ghost_batch_size).

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
    >>> y, mean, invstd = fastbn.batch_norm_train(x, ghost_batch_size=1)   # one per sample
    >>> mean
    array([[ 1.5,  5.5,  9.5],
           [13.5, 17.5, 21.5]])
    """
    if ghost_batch_size is not None:
        return _ghost.train(x, weight, bias, eps=eps, layout=layout,
                            running_mean=running_mean, running_var=running_var,
                            momentum=momentum, out=out, num_threads=num_threads,
                            ghost_batch_size=ghost_batch_size)
    return _calls.batch_norm_train(x, weight, bias, eps=eps, layout=layout,
                                   running_mean=running_mean, running_var=running_var,
                                   momentum=momentum, out=out, num_threads=num_threads)


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
    return _calls.batch_norm_infer(x, layout, running_mean, running_var, weight, bias, eps=eps,
                                   out=out, num_threads=num_threads)


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, layout="NCHW",
                        out=None, num_threads=None, ghost_batch_size=None):
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
    ghost_batch_size : int >= 1, optional
        The forward's (:func:`batch_norm_train`): mean and invstd are then (G, C), one row
        per group of samples, and each group's dx is that of its own batch; dweight and
        dbias are summed over the groups in float64, in order, and rounded once.

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
    if ghost_batch_size is not None:
        return _ghost.backward(dy, x, mean, invstd, weight, training=training, layout=layout,
                               out=out, num_threads=num_threads,
                               ghost_batch_size=ghost_batch_size)
    return _calls.backward(dy, x, mean, invstd, weight, training=training, layout=layout,
                           out=out, num_threads=num_threads)


def batch_norm_backward_from_output(dy, y, invstd, weight=None, bias=None, *,
                                    negative_slope=None, layout="NCHW", out=None,
                                    num_threads=None):
    """Batch Normalization backward from the forward's output y instead of its input x.

    Since ``y = weight * xhat + bias``, ``xhat = (y - bias) / weight``, and the backward of
    :func:`batch_norm_train` needs nothing else of x (In-Place Activated BatchNorm, Rota
    Bulo, Porzi and Kontschieder, 2018): a training step may free x, or overwrite it with y
    (``batch_norm_train(x, ..., out=x)``), and keep only y, which halves what Batch
    Normalization holds between the forward and the backward. The results are those of
    :func:`batch_norm_backward` on the x that made y, up to the rounding of y: one fused
    pass reads dy and y for ``sum(dy)`` and ``sum(dy * xhat)`` and a second writes dx, the
    same passes and bytes as the backward from x.

    Parameters
    ----------
    dy : ndarray
        Gradient of y: the shape and dtype of y.
    y : ndarray, float32, float64, float16 or bfloat16
        The output of :func:`batch_norm_train` (training statistics), or with a
        negative_slope, of :func:`fastbn.batch_norm_relu_train` with that slope and no
        residual.
    invstd : array_like (C,)
        As :func:`batch_norm_train` returned it.
    weight, bias : array_like (C,), optional
        The forward's; None means 1 and 0. No weight may be 0 (xhat cannot be recovered
        there); the paper keeps weights away from 0 by training ``|weight| + eps`` in
        their place, which changes the gradient of the weight by its sign.
    negative_slope : float > 0, optional
        y is a leaky ReLU's output of this slope: the pre-activation is y where y > 0, else
        ``y / negative_slope``, and the activation's backward (``dy`` where y > 0, else
        ``negative_slope * dy``) comes first, both in the same two passes. The results are
        those of :func:`fastbn.batch_norm_relu_backward` on the x that made y, up to the
        rounding of y. None (the default): y is the normalization's own output.
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional
        Where to write dx; may be ``dy`` itself (in place).
    num_threads : int, optional

    Returns
    -------
    dx : ndarray
        Shape and dtype of y.
    dweight, dbias : ndarray (C,)
        As :func:`batch_norm_backward`.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm_backward`; a weight with a zero (the message names the
        channel); a negative_slope that is not a real number > 0 (0 is the ReLU, which
        cannot be inverted).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4, 4))
    >>> w, b = np.array([0.5, 2.0, -1.0]), np.array([0.1, 0.0, 3.0])
    >>> y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    >>> dy = np.cos(y)
    >>> dx, dw, db = fastbn.batch_norm_backward_from_output(dy, y, invstd, w, b)
    >>> dx0, dw0, db0 = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
    >>> bool(np.allclose(dx, dx0, atol=1e-12)), bool(np.allclose(dw, dw0))
    (True, True)
    """
    # every argument checked here under its own name; the call below then cannot fail
    y = data_array("y", y)
    dy = data_array("dy", dy)
    same_shape("dy", dy, "y", y)
    if dy.dtype != y.dtype:
        raise TypeError(f"dy must have the dtype of y ({y.dtype}), got {dy.dtype}")
    C = y.shape[channel_axis(layout, y.ndim)]
    s = channel_vector("invstd", invstd, C, optional=False)
    w = channel_vector("weight", weight, C)
    b = channel_vector("bias", bias, C)
    w = np.ones(C) if w is None else w
    zero = np.flatnonzero(w == 0)
    if zero.size:
        raise ValueError(f"weight must have no zero to recover the normalized input from y, "
                         f"got weight[{zero[0]}] = 0 ({zero.size} channel(s) with zero weight)")
    if negative_slope is not None:
        negative_slope = slope_value(negative_slope, invertible=True)
    out = out_array(out, y.shape, y.dtype, {"dy": dy, "y": y, "invstd": invstd,
                                            "weight": weight, "bias": bias}, may_alias=("dy",))
    thread_count(num_threads, lambda: 1)
    return _calls.backward_from_output(dy, y, s, w, b, layout=layout, out=out,
                                       num_threads=num_threads, negative_slope=negative_slope)


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
