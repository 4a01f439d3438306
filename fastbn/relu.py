"""Batch Normalization fused with a residual add and a ReLU (or a leaky ReLU).

``y = max(bn(x) + residual, 0)`` in the pass that normalizes x, and its backward in the
passes of :func:`fastbn.batch_norm_backward`: the unfused NumPy code,
``np.maximum(bn(x) + residual, 0, out=...)``, reads and writes the data two or three more
times. With ``negative_slope=s > 0`` the activation is the leaky ReLU, ``v if v >= 0 else
s * v``, in the same loops. The kernels are those of :mod:`fastbn.functional`; the residual, the ReLU and the
ReLU's mask are extra terms of their loops (see the performance guide, "Fused ReLU").
"""
from . import _calls
from ._validate import negative_slope as slope_value

__all__ = ["batch_norm_relu_train", "batch_norm_relu_infer", "batch_norm_relu_backward"]


def batch_norm_relu_train(x, weight=None, bias=None, *, residual=None, eps=1e-5, layout="NCHW",
                          running_mean=None, running_var=None, momentum=0.1, out=None,
                          num_threads=None, negative_slope=0.0):
    """Batch Normalization training forward, then a residual add and a ReLU, in one pass.

    ``y = max(bn(x) + residual, 0)`` with ``bn(x) = (x - mean) * invstd * weight + bias``
    over the batch statistics, as :func:`fastbn.batch_norm_train` (with a negative_slope
    s > 0, the leaky ReLU ``v if v >= 0 else s * v`` of ``v = bn(x) + residual``). A NaN
    before the ReLU stays NaN (as ``np.maximum`` keeps it). The running statistics, mean and
    invstd are those of :func:`fastbn.batch_norm_train` on the same x, bit for bit.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, ndim >= 2
        (N, C, ...) for ``layout="NCHW"``, (N, ..., C) for ``"NHWC"``.
    weight, bias : array_like (C,), optional
        None means 1 and 0.
    residual : ndarray, optional
        Added before the ReLU: the shape and dtype of x, any memory order.
    eps, layout, running_mean, running_var, momentum, num_threads
        As :func:`fastbn.batch_norm_train`.
    out : ndarray, optional
        Where to write y; may be ``x`` itself or ``residual`` itself.
    negative_slope : float >= 0, optional
        The slope below 0: 0 (the default) is the ReLU, s > 0 the leaky ReLU. Computed in
        the data's arithmetic (float32 for float32 and 16-bit data, with s rounded to
        float32).

    Returns
    -------
    y : ndarray
        Shape and dtype of x; keep it for :func:`batch_norm_relu_backward` (its sign is the
        ReLU's mask), or, for a leaky ReLU without residual, for
        :func:`fastbn.batch_norm_backward_from_output` (which needs no x).
    mean, invstd : ndarray (C,), float64

    Raises
    ------
    TypeError
        Non-float arrays; a residual of another dtype than x; a negative_slope that is not
        a real number.
    ValueError
        As :func:`fastbn.batch_norm_train`; a residual of another shape than x; an out
        that overlaps residual without being it; a negative_slope < 0, NaN or infinite.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.arange(8.0).reshape(2, 2, 2)
    >>> y, mean, invstd = fastbn.batch_norm_relu_train(x, eps=0.0)
    >>> bool((y >= 0).all()), int((y > 0).sum())
    (True, 4)
    >>> y, _, _ = fastbn.batch_norm_relu_train(x, residual=np.ones_like(x), eps=0.0)
    >>> bool(np.allclose(y, np.maximum(fastbn.batch_norm_train(x, eps=0.0)[0] + 1, 0)))
    True
    >>> y, _, _ = fastbn.batch_norm_relu_train(x, eps=0.0, negative_slope=0.1)
    >>> v = fastbn.batch_norm_train(x, eps=0.0)[0]
    >>> bool(np.allclose(y, np.where(v < 0, 0.1 * v, v)))
    True
    """
    slope = slope_value(negative_slope)
    return _calls.batch_norm_train(x, weight, bias, eps=eps, layout=layout,
                                   running_mean=running_mean, running_var=running_var,
                                   momentum=momentum, out=out, num_threads=num_threads,
                                   residual=residual, relu=True, negative_slope=slope)


def batch_norm_relu_infer(x, running_mean, running_var, weight=None, bias=None, *,
                          residual=None, eps=1e-5, layout="NCHW", out=None, num_threads=None,
                          negative_slope=0.0):
    """Batch Normalization inference forward, then a residual add and a ReLU, in one pass.

    ``y = max((x - running_mean) / sqrt(running_var + eps) * weight + bias + residual, 0)``
    (the leaky ReLU with a negative_slope > 0); NaN stays NaN.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, ndim >= 2
    running_mean, running_var : array_like (C,)
        Not modified.
    weight, bias : array_like (C,), optional
    residual : ndarray, optional
        Added before the ReLU: the shape and dtype of x, any memory order.
    eps, layout, num_threads
        As :func:`fastbn.batch_norm_infer`.
    out : ndarray, optional
        Where to write y; may be ``x`` itself or ``residual`` itself.
    negative_slope : float >= 0, optional
        As :func:`batch_norm_relu_train`.

    Returns
    -------
    y : ndarray
        Shape and dtype of x.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm_relu_train`.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[-2.0, 2.0], [1.0, -1.0]])
    >>> fastbn.batch_norm_relu_infer(x, np.zeros(2), np.ones(2), eps=0.0)
    array([[0., 2.],
           [1., 0.]])
    >>> fastbn.batch_norm_relu_infer(x, np.zeros(2), np.ones(2), eps=0.0,
    ...                              residual=np.full((2, 2), 1.5))
    array([[0. , 3.5],
           [2.5, 0.5]])
    """
    slope = slope_value(negative_slope)
    return _calls.batch_norm_infer(x, layout, running_mean, running_var, weight, bias, eps=eps,
                                   out=out, num_threads=num_threads, residual=residual,
                                   relu=True, negative_slope=slope)


def batch_norm_relu_backward(dy, y, x, mean, invstd, weight=None, *, training=True,
                             layout="NCHW", out=None, dresidual=None, num_threads=None,
                             negative_slope=0.0):
    """Backward of :func:`batch_norm_relu_train` (or ``_infer``): dx, dweight, dbias.

    With ``g = dy where y > 0, else 0`` (a NaN in y gives 0; with a negative_slope s > 0,
    ``s * dy`` instead of 0), the results are those of :func:`fastbn.batch_norm_backward`
    on g; g itself is never stored, its two sums come from the one fused reduction pass and
    the dx pass reads y's sign again.

    Parameters
    ----------
    dy : ndarray
        Gradient of y: the shape and dtype of x.
    y : ndarray
        The fused forward's output (its sign is the ReLU's mask): the shape and dtype of x.
    x : ndarray
        The forward's input.
    mean, invstd, weight, training, layout, num_threads
        As :func:`fastbn.batch_norm_backward`.
    out : ndarray, optional
        Where to write dx; may be ``dy`` itself.
    dresidual : ndarray, optional
        Receives g, the gradient of the forward's residual, in the dx pass: the shape and
        dtype of x, writable, sharing no memory with the other arguments or out.
    negative_slope : float >= 0, optional
        The forward's (:func:`batch_norm_relu_train`).

    Returns
    -------
    dx : ndarray
    dweight, dbias : ndarray (C,)
        As :func:`fastbn.batch_norm_backward`.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.batch_norm_backward`; a y of another shape or dtype than x; a
        dresidual that is not a writable array of x's shape and dtype, or overlaps an
        argument; a negative_slope as :func:`batch_norm_relu_train` refuses it.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4))
    >>> y, mean, invstd = fastbn.batch_norm_relu_train(x)
    >>> dres = np.empty_like(x)
    >>> dx, dw, db = fastbn.batch_norm_relu_backward(np.ones_like(x), y, x, mean, invstd,
    ...                                              dresidual=dres)
    >>> bool((dres == (y > 0)).all()), bool(np.allclose(db, (y > 0).sum(axis=(0, 2))))
    (True, True)
    """
    slope = slope_value(negative_slope)
    return _calls.backward(dy, x, mean, invstd, weight, training=training, layout=layout,
                           out=out, num_threads=num_threads, y=y, dresidual=dresidual,
                           negative_slope=slope)
