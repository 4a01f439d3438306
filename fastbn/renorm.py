"""Batch Renormalization (Ioffe 2017): training forward and backward.

Batch Renormalization corrects the batch statistics towards running statistics with two
per-channel constants computed from the running mean ``mu`` and standard deviation
``sigma`` *before* their update::

    sigma_B = sqrt(var_B + eps)                    (biased batch variance)
    r = clip(sigma_B / sigma, rmin, rmax)          (rmin = 1 / rmax unless given)
    d = clip((mu_B - mu) / sigma, -dmax, dmax)
    y = weight * ((x - mu_B) / sigma_B * r + d) + bias

r and d are constants for the gradient. With ``rmax = 1`` and ``dmax = 0`` this is plain
Batch Normalization. The forward runs the core's fused statistics + normalization kernel:
r and d are folded into its per-channel scale and shift, so it costs no extra pass.

This module also holds the rmax / dmax schedules used by :class:`fastbn.BatchRenorm`.
"""
import numpy as np

from . import _calls
from ._validate import real_scalar, scalar_at_least

__all__ = ["batch_renorm_train", "batch_renorm_backward", "linear_schedule", "paper_schedules"]


def batch_renorm_train(x, weight, bias, running_mean, running_std, *, rmax=3.0, dmax=5.0,
                       momentum=0.01, eps=1e-5, layout="NCHW", out=None, num_threads=None):
    """Batch Renormalization, training forward.

    ``y = weight * ((x - mean) / std * r + d) + bias`` per channel, where ``mean`` and
    ``std = sqrt(biased_var + eps)`` are the batch statistics and
    ``r = clip(std / running_std, 1/rmax, rmax)``,
    ``d = clip((mean - running_mean) / running_std, -dmax, dmax)`` come from the running
    statistics before this call. Then, in place,
    ``running_mean += momentum * (mean - running_mean)`` and
    ``running_std += momentum * (std - running_std)``.

    One fused pass over the data, as :func:`fastbn.batch_norm_train`.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, ndim >= 2
        Input of shape (N, C, ...) for ``layout="NCHW"`` or (N, ..., C) for ``"NHWC"``.
    weight, bias : array_like (C,) or None
        Affine parameters (gamma, beta); None means 1 and 0.
    running_mean, running_std : ndarray (C,)
        Running mean and standard deviation (the paper's mu and sigma), writable floating
        arrays updated in place; running_std must be finite and > 0.
    rmax : float >= 1
        r is clipped to [1/rmax, rmax].
    dmax : float >= 0
        d is clipped to [-dmax, dmax].
    momentum : float in [0, 1]
        Weight of the new batch in the running update (the paper's alpha).
    eps : float >= 0
        Added to the batch variance inside the batch standard deviation.
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional
        Where to write y (shape and dtype of x); may be ``x`` itself.
    num_threads : int, optional

    Returns
    -------
    y : ndarray
        Shape and dtype of x (``out`` if given).
    mean, std : ndarray (C,), float64
        Batch mean and ``sqrt(biased_var + eps)``.
    r, d : ndarray (C,), float64
        The correction constants, as :func:`batch_renorm_backward` takes them.

    Raises
    ------
    TypeError
        A non-floating array; a non-real rmax, dmax, momentum or eps.
    ValueError
        Bad shapes, layout, eps, momentum, out or num_threads; rmax < 1; dmax < 0;
        running_std not finite and positive; a running buffer missing or read-only;
        one value per channel.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    >>> running_mean, running_std = np.zeros(3), np.ones(3)
    >>> y, mean, std, r, d = fastbn.batch_renorm_train(x, None, None, running_mean,
    ...                                                running_std, rmax=2.0, dmax=1.0)
    >>> y.shape, r, d
    ((2, 3, 4), array([2., 2., 2.]), array([1., 1., 1.]))
    >>> running_mean
    array([0.075, 0.115, 0.155])
    """
    return _calls.renorm_train(x, weight, bias, running_mean, running_std, rmin=None,
                               rmax=rmax, dmax=dmax, momentum=momentum, eps=eps, layout=layout,
                               out=out, num_threads=num_threads)


def batch_renorm_backward(dy, x, mean, std, r, d, weight=None, *, layout="NCHW", out=None,
                          num_threads=None):
    """Batch Renormalization backward, with r and d held constant.

    With ``xhat0 = (x - mean) / std`` and ``m`` values per channel:
    ``dx = weight * r / std * (dy - sum(dy)/m - xhat0 * sum(dy * xhat0)/m)``
    (the Batch Normalization backward with weight ``weight * r``),
    ``dweight = sum(dy * (r * xhat0 + d))`` and ``dbias = sum(dy)``.

    Parameters
    ----------
    dy, x : ndarray, float32, float64, float16 or bfloat16
        The gradient of the forward's output, and the forward's input (one shape and
        dtype).
    mean, std, r, d : array_like (C,)
        As returned by :func:`batch_renorm_train`; std must be finite and > 0.
    weight : array_like (C,), optional
        None means 1.
    layout, out, num_threads
        As for :func:`fastbn.batch_norm_backward` (``out`` may be ``dy`` itself).

    Returns
    -------
    dx : ndarray
        The gradient of x, in x's shape and dtype.
    dweight, dbias : ndarray (C,)
        In x's dtype (float32 for float16 and bfloat16 data), also without a weight.

    Raises
    ------
    TypeError
        A non-floating array, or dy and x of different dtypes.
    ValueError
        Mismatched shapes; std not finite and positive; bad layout, out or num_threads.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4, 4))
    >>> stats = fastbn.batch_renorm_train(x, None, None, np.zeros(3), np.ones(3))
    >>> y, mean, std, r, d = stats
    >>> dx, dweight, dbias = fastbn.batch_renorm_backward(np.ones_like(x), x, mean, std, r, d)
    >>> float(np.abs(dx).max()) < 1e-12, dbias
    (True, array([128., 128., 128.]))
    >>> bool(np.allclose(dweight, 128 * d))
    True
    """
    return _calls.renorm_backward(dy, x, mean, std, r, d, weight, layout=layout, out=out,
                                  num_threads=num_threads)


def linear_schedule(start, end, begin, stop):
    """A schedule that holds `start` until step `begin`, then moves linearly to `end` at `stop`.

    Parameters
    ----------
    start, end : float
        Values before `begin` and from `stop` on.
    begin, stop : int
        Steps where the linear ramp starts and ends (``0 <= begin <= stop``).

    Returns
    -------
    schedule : callable
        ``schedule(step) -> float`` for a step count ``step >= 0``.

    Raises
    ------
    ValueError
        ``begin < 0`` or ``stop < begin``, or non-finite values.

    Examples
    --------
    >>> from fastbn.renorm import linear_schedule
    >>> f = linear_schedule(1.0, 3.0, 10, 20)
    >>> f(0), f(10), f(15), f(20), f(100)
    (1.0, 1.0, 2.0, 3.0, 3.0)
    """
    start, end = (real_scalar(name, v) for name, v in (("start", start), ("end", end)))
    if not (np.isfinite(start) and np.isfinite(end)):
        raise ValueError(f"start and end must be finite, got {start!r} and {end!r}")
    begin = scalar_at_least("begin", begin, 0.0)
    stop = scalar_at_least("stop", stop, begin)

    def schedule(step):
        if step <= begin:
            return start
        if step >= stop:
            return end
        return start + (end - start) * (step - begin) / (stop - begin)

    return schedule


def paper_schedules(warmup=5000, rmax_stop=40000, dmax_stop=25000):
    """The rmax and dmax schedules of the Batch Renormalization paper.

    rmax stays 1 and dmax stays 0 (plain Batch Normalization) for `warmup` steps; then rmax
    rises linearly to 3 at step `rmax_stop` and dmax to 5 at step `dmax_stop`.

    Parameters
    ----------
    warmup : int
        Steps of plain Batch Normalization.
    rmax_stop, dmax_stop : int
        Steps at which rmax reaches 3 and dmax reaches 5 (>= warmup).

    Returns
    -------
    rmax, dmax : callable
        ``f(step) -> float`` each, as :class:`fastbn.BatchRenorm` takes them.

    Raises
    ------
    ValueError
        A stop step before the warm-up ends.

    Examples
    --------
    >>> from fastbn.renorm import paper_schedules
    >>> rmax, dmax = paper_schedules()
    >>> rmax(0), dmax(0), rmax(22500), dmax(15000), rmax(50000), dmax(50000)
    (1.0, 0.0, 2.0, 2.5, 3.0, 5.0)
    """
    return (linear_schedule(1.0, 3.0, warmup, rmax_stop),
            linear_schedule(0.0, 5.0, warmup, dmax_stop))
