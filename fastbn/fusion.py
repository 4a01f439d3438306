"""Folding inference-mode Batch Normalization into the layer before it.

A convolution or linear layer ``z = W * x + b`` followed by Batch Normalization in inference
mode, ``y = z * scale + shift`` per output channel, is one layer with weights
``W * scale`` (scaled along the out-channel axis) and bias ``b * scale + shift``, as CPU
inference engines fuse them.
"""
import numpy as np

from ._rounding import rounded
from ._validate import channel_vector, is_bfloat16
from .functional import fold_batch_norm

__all__ = ["fuse_conv_bn"]


def fuse_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps):
    """Fold an inference-mode Batch Normalization into the preceding conv or linear layer.

    With ``scale = bn_weight / sqrt(running_var + eps)`` (see
    :func:`fastbn.fold_batch_norm`), the fused layer has
    ``fused_weight = weight * scale`` along axis 0 and
    ``fused_bias = (bias - running_mean) * scale + bn_bias``. The arithmetic is done in
    float64; the results have the common dtype of the arguments.

    Parameters
    ----------
    weight : array_like, floating, ndim >= 1
        Weights with the out-channels first: (C_out, C_in) for a linear layer,
        (C_out, C_in / groups, kH, kW) for a 2-D convolution, and so on.
    bias : array_like (C_out,) or None
        The layer's bias; None means 0.
    running_mean, running_var : array_like (C_out,)
        The Batch Normalization's running statistics.
    bn_weight, bn_bias : array_like (C_out,) or None
        Its affine parameters; None means 1 and 0.
    eps : float
        Its epsilon, >= 0.

    Returns
    -------
    fused_weight : ndarray
        Shape of weight.
    fused_bias : ndarray (C_out,)
        Always returned, also when bias is None.

    Raises
    ------
    TypeError
        A non-floating array.
    ValueError
        weight with ndim 0, mismatched lengths, bad eps.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> W = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> fW, fb = fastbn.fuse_conv_bn(W, None, np.array([1.0, 0.0]), np.array([4.0, 1.0]),
    ...                              None, np.array([0.0, 1.0]), eps=0.0)
    >>> fW
    array([[0.5, 1. ],
           [3. , 4. ]])
    >>> fb
    array([-0.5,  1. ])
    """
    w = np.asarray(weight)
    if w.dtype.kind != "f" and not is_bfloat16(w.dtype):
        raise TypeError(f"weight must be a floating-point array (float16, bfloat16, float32 "
                        f"or float64), got dtype {w.dtype}")
    if w.ndim < 1:
        raise ValueError("weight must have at least 1 dimension (out-channels first), "
                         "got a scalar")
    C = w.shape[0]
    if np.shape(running_mean) != (C,):
        raise ValueError(f"running_mean must have shape ({C},), one value per out-channel of "
                         f"weight (shape {w.shape}, out-channels first), got "
                         f"{np.shape(running_mean)}")
    b = channel_vector("bias", bias, C)
    rm = channel_vector("running_mean", running_mean, C, optional=False)
    rv = channel_vector("running_var", running_var, C, optional=False)
    gamma = channel_vector("bn_weight", bn_weight, C)
    beta = channel_vector("bn_bias", bn_bias, C)
    scale, shift = fold_batch_norm(rm, rv, gamma, beta, eps)
    dtype = np.result_type(*[np.asarray(a).dtype for a in
                             (weight, bias, running_mean, running_var, bn_weight, bn_bias)
                             if a is not None])
    with np.errstate(all="ignore"):     # rounding overflows to inf, as defined
        fused_weight = w.astype(np.float64) * scale.reshape((C,) + (1,) * (w.ndim - 1))
        fused_bias = shift if b is None else b * scale + shift
    return rounded(fused_weight, dtype), rounded(fused_bias, dtype)
