"""The ONNX BatchNormalization operator (opset 15 semantics) on NumPy arrays.

ONNX's conventions differ from PyTorch's (docs/conventions.rst): ``momentum`` is the
weight of the OLD running value (default 0.9) and the running variance is updated with the
biased batch variance. The channel axis is 1. Inputs are never modified: the updated running
statistics are returned as new arrays.
"""
import numpy as np

from . import _calls
from ._rounding import rounded
from ._validate import channel_vector, eps_value, momentum_value

__all__ = ["batch_normalization"]


def _training_mode(training_mode):
    if isinstance(training_mode, (bool, np.bool_)):
        return bool(training_mode)
    if isinstance(training_mode, (int, np.integer)) and training_mode in (0, 1):
        return bool(training_mode)
    raise ValueError(f"training_mode must be 0 or 1, got {training_mode!r}")


def batch_normalization(X, scale, B, input_mean, input_var, *, epsilon=1e-5, momentum=0.9,
                        training_mode=0):
    """ONNX ``BatchNormalization`` (opset 15).

    ``training_mode=0``: ``Y = (X - input_mean) / sqrt(input_var + epsilon) * scale + B``.

    ``training_mode=1``: ``Y`` is normalized with the batch mean and biased batch variance
    (over every axis but 1), and the running statistics are returned updated as
    ``running = input * momentum + batch * (1 - momentum)``.

    Parameters
    ----------
    X : ndarray, float32, float64, float16 or bfloat16
        Input of shape (N, C) or (N, C, D1, ..., Dn).
    scale, B : array_like (C,)
        Affine parameters.
    input_mean, input_var : array_like (C,)
        Running statistics (not modified).
    epsilon : float
        Added to the variance, >= 0.
    momentum : float in [0, 1]
        Weight of the old running value (used in training mode only).
    training_mode : {0, 1}

    Returns
    -------
    Y : ndarray
        Shape and dtype of X (``training_mode=0``).
    Y, running_mean, running_var : tuple of ndarray
        With ``training_mode=1``; the running statistics have input_mean's (and
        input_var's) floating dtype.

    Raises
    ------
    TypeError
        Non-floating arrays.
    ValueError
        Wrong shapes, bad epsilon or momentum, training_mode not 0 or 1, or (in training
        mode) one value per channel.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.onnx import batch_normalization
    >>> X = np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float32)
    >>> ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    >>> batch_normalization(X, ones, zeros, zeros, ones, epsilon=0.0)
    array([[1., 2.],
           [3., 6.]], dtype=float32)
    >>> Y, running_mean, running_var = batch_normalization(X, ones, zeros, zeros, ones,
    ...                                                    epsilon=0.0, training_mode=1)
    >>> Y
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> running_mean, running_var
    (array([0.2, 0.4], dtype=float32), array([1. , 1.3], dtype=float32))
    """
    batch = _calls.Batch(X, "NCHW", name="X")
    C = batch.C
    for name, v in (("scale", scale), ("B", B)):
        channel_vector(name, v, C, optional=False)
    mean_in = channel_vector("input_mean", input_mean, C, optional=False)
    var_in = channel_vector("input_var", input_var, C, optional=False)
    epsilon = eps_value(epsilon, name="epsilon")
    momentum = momentum_value(momentum)
    training = _training_mode(training_mode)
    if not training:
        return _calls.infer(batch, input_mean, input_var, scale, B, eps=epsilon)
    Y, mean, var, _, _ = _calls.train(batch, scale, B, eps=epsilon, name="X")
    with np.errstate(all="ignore"):     # rounding overflows to inf, as defined
        running_mean = mean_in * momentum + mean * (1.0 - momentum)
        running_var = var_in * momentum + var * (1.0 - momentum)
    return (Y, rounded(running_mean, np.asarray(input_mean).dtype),
            rounded(running_var, np.asarray(input_var).dtype))
