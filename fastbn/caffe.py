"""Caffe's BatchNorm and Scale layers with Caffe's exact state and update rules.

Caffe splits PyTorch's ``BatchNorm2d`` in two layers: ``BatchNorm`` normalizes (no affine
parameters) and keeps three blobs of *sums*; ``Scale`` (with ``bias_term``) applies
``y = x * gamma + beta`` per channel. The channel axis is 1: inputs are (N, C, ...).

``BatchNorm`` has two engines with the same results up to float32 rounding:

* ``engine="fused"``: a thin client of :func:`fastbn.batch_norm_train`,
  :func:`fastbn.batch_norm_infer` and :func:`fastbn.batch_norm_backward` (one or two
  passes over the data, all threads);
* ``engine="gemv"``: Caffe's own CPU sequence of BLAS calls (matrix-vector products with
  vectors of ones for the sums, rank-1 products for the broadcasts, all arithmetic in the
  data type), run without the GIL through scipy's BLAS. It exists to reproduce Caffe
  operation for operation and as a speed baseline.

:func:`to_pytorch_state` and :func:`from_pytorch_state` convert a BatchNorm + Scale pair to
and from PyTorch ``BatchNorm`` state (``running_mean = blobs[0] / blobs[2]``, ...).
"""
from collections import namedtuple

import numpy as np

from . import _caffe_gemv
from ._layer_threads import PerThreadState
from ._rounding import store_rounded
from ._validate import (channel_vector, choice, data_array, eps_value, flag, float_dtype,
                        layer_blob, momentum_value, optional_bool, out_array, positive_int,
                        same_shape)
from .functional import batch_norm_backward, batch_norm_infer, batch_norm_train

__all__ = ["BatchNorm", "Scale", "to_pytorch_state", "from_pytorch_state"]

ENGINES = ("fused", "gemv")
PHASES = ("TRAIN", "TEST")
_BLAS_INT_MAX = 2**31 - 1

# What backward needs from the last forward. fused: invstd (training) or var (global
# statistics), float64 (C,); gemv: the engine's buffers hold temp and x_norm.
_Saved = namedtuple("_Saved", "shape use_global_stats engine invstd var")


def _check_input(name, a, channels, dtype):
    a = data_array(name, a)
    if a.dtype != dtype:
        raise TypeError(f"{name} must have the layer's dtype {dtype}, got {a.dtype}")
    if a.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels on axis 1 (N, C, ...), "
                         f"got shape {a.shape}")
    return a


def _contiguous_target(out, flat_src):
    """Flat C-contiguous array a kernel writes into: out's memory when possible."""
    if out is not None and out.flags.c_contiguous:
        return out.reshape(-1)
    return np.empty_like(flat_src)


def _deliver(out, flat, shape):
    if out is None:
        return flat.reshape(shape)
    if not np.may_share_memory(out, flat):
        out[...] = flat.reshape(shape)
    return out


class BatchNorm(PerThreadState):
    """Caffe's BatchNorm layer: normalization with moving *sums* of the batch statistics.

    Training (``use_global_stats`` false) normalizes with the batch mean and biased
    variance and updates the blobs::

        s        <- s * moving_average_fraction + 1                 (blobs[2])
        mean_sum <- mean_sum * moving_average_fraction + mean       (blobs[0])
        var_sum  <- var_sum * moving_average_fraction + m/(m-1) var (blobs[1])

    with ``m = N * spatial`` values per channel (factor 1 when m == 1). With global
    statistics the layer normalizes with ``blobs[0] / s`` and ``blobs[1] / s`` (0 when
    ``s == 0``) and leaves the blobs alone. ``y = (x - mean) / sqrt(var + eps)``; there is
    no affine part (see :class:`Scale`).

    Parameters
    ----------
    channels : int
        Number of channels C (axis 1 of the input).
    use_global_stats : bool, optional
        Fixed choice of statistics; None (Caffe's default) means ``phase == "TEST"`` at
        each forward.
    moving_average_fraction : float in [0, 1]
        Decay of the old sums per training forward.
    eps : float >= 0
        Added to the variance.
    engine : {"fused", "gemv"}
        Fast fused kernels, or Caffe's BLAS call sequence.
    dtype : {np.float32, np.float64}
        Type of the blobs and of the data the layer takes.

    Attributes
    ----------
    blobs : list of ndarray
        ``[mean_sum (C,), var_sum (C,), scale_factor (1,)]``, zeros at construction; they
        may be filled in place or replaced by arrays of the same shape and dtype.
    moving_average_fraction, eps : float
        As given, rounded to float32: Caffe's ``BatchNormParameter`` stores them as
        protobuf floats, also for double layers.

    Raises
    ------
    TypeError
        channels not an integer, use_global_stats not a bool, dtype not float32/float64.
    ValueError
        channels < 1, unknown engine, eps < 0 or not finite, moving_average_fraction
        outside [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.caffe import BatchNorm
    >>> bn = BatchNorm(3)
    >>> x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    >>> y = bn.forward(x, phase="TRAIN")
    >>> y.shape, bn.blobs[0], bn.blobs[2]
    ((2, 3, 4), array([ 7.5, 11.5, 15.5], dtype=float32), array([1.], dtype=float32))
    >>> dx = bn.backward(np.ones_like(y))
    >>> float(np.abs(dx).max())
    0.0
    >>> round(float(bn.blobs[1][0]), 4)      # unbiased: 298 / (8 - 1)
    42.5714
    >>> bn.forward(x, phase="TEST")[0, 0, :2]         # (x - 7.5) / sqrt(42.57 + eps)
    array([-1.1494818 , -0.99621755], dtype=float32)
    """

    def __init__(self, channels, *, use_global_stats=None, moving_average_fraction=0.999,
                 eps=1e-5, engine="fused", dtype=np.float32):
        self.channels = positive_int("channels", channels)
        self.use_global_stats = optional_bool("use_global_stats", use_global_stats)
        maf = momentum_value(moving_average_fraction, name="moving_average_fraction")
        self.moving_average_fraction = float(np.float32(maf))
        self.eps = float(np.float32(eps_value(eps)))
        self.engine = choice("engine", engine, ENGINES)
        self.dtype = float_dtype("dtype", dtype)
        C = self.channels
        self.blobs = [np.zeros(C, self.dtype), np.zeros(C, self.dtype),
                      np.zeros(1, self.dtype)]
        self._init_threads()
        self._zeros = np.zeros(C)
        self._ones = np.ones(C)

    def __repr__(self):
        return (f"BatchNorm({self.channels}, use_global_stats={self.use_global_stats}, "
                f"moving_average_fraction={self.moving_average_fraction}, eps={self.eps}, "
                f"engine={self.engine!r}, dtype={self.dtype.name})")

    # ---- helpers -------------------------------------------------------------------

    def _checked_blobs(self):
        if not isinstance(self.blobs, list) or len(self.blobs) != 3:
            raise ValueError("blobs must be a list of 3 arrays [mean_sum, var_sum, scale_factor]")
        C = self.channels
        for i, shape in enumerate(((C,), (C,), (1,))):
            layer_blob(f"blobs[{i}]", self.blobs[i], shape, self.dtype)
        for i in range(3):
            for j in range(i):
                if np.may_share_memory(self.blobs[i], self.blobs[j]):
                    raise ValueError(f"blobs[{j}] and blobs[{i}] must not share memory")
        return self.blobs

    @property
    def _bufs(self):
        """The calling thread's scratch arrays: a forward leaves its backward's inputs there."""
        bufs = self._saved_get("bufs")
        if bufs is None:
            bufs = self._local.bufs = {}
        return bufs

    def _buffer(self, name, shape, dtype=None, fill=None):
        """A scratch array kept between calls (reallocated when its shape changes)."""
        dtype = self.dtype if dtype is None else dtype
        buf = self._bufs.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype)
            self._bufs[name] = buf
        return buf

    def global_stats(self):
        """The statistics used with global stats: ``blobs[0:2] * (1 / blobs[2])``.

        Returns
        -------
        mean, var : ndarray (C,)
            In the layer's dtype; zeros while ``blobs[2] == 0`` (an untrained layer).

        Examples
        --------
        >>> import numpy as np
        >>> from fastbn.caffe import BatchNorm
        >>> bn = BatchNorm(2)
        >>> bn.blobs[0][:] = [1.0, 2.0]; bn.blobs[1][:] = [4.0, 4.0]; bn.blobs[2][:] = 2.0
        >>> bn.global_stats()
        (array([0.5, 1. ], dtype=float32), array([2., 2.], dtype=float32))
        """
        b0, b1, b2 = self._checked_blobs()
        s = b2[0]
        with np.errstate(over="ignore"):
            factor = self.dtype.type(0) if s == 0 else self.dtype.type(1) / s
            return b0 * factor, b1 * factor

    def _update_blobs(self, mean, unbiased_var):
        """Caffe's moving-sum update from float64 batch statistics (rounded once)."""
        b0, b1, b2 = self.blobs
        maf = self.moving_average_fraction
        t = self.dtype.type
        with np.errstate(all="ignore"):     # rounding overflows to inf, as defined
            s = b2[0] * t(maf) + t(1)       # Caffe's own arithmetic, in the blob's dtype
            store_rounded((b0, mean + maf * b0), (b1, unbiased_var + maf * b1))
            b2[0] = s

    # ---- forward -------------------------------------------------------------------

    def forward(self, bottom, *, phase="TRAIN", out=None):
        """Normalize ``bottom`` (and, in training, update the blobs).

        Parameters
        ----------
        bottom : ndarray (N, C, ...)
            Input of the layer's dtype, any memory order.
        phase : {"TRAIN", "TEST"}
            Selects the statistics when ``use_global_stats`` is None (TEST: the blobs).
        out : ndarray, optional
            Where to write the result (shape and dtype of bottom); ``out=bottom`` works in
            place, as Caffe's in-place BatchNorm.

        Returns
        -------
        top : ndarray
            ``(bottom - mean) / sqrt(var + eps)``, ``out`` if given.

        Raises
        ------
        TypeError
            bottom not a float array of the layer's dtype; a blob with a wrong dtype.
        ValueError
            Wrong channel count or ndim < 2, unknown phase, bad ``out``, no values per
            channel in training, a blob with a wrong shape.

        Examples
        --------
        >>> import numpy as np
        >>> from fastbn.caffe import BatchNorm
        >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
        >>> bn = BatchNorm(2, engine="gemv", dtype=np.float64, eps=0.0)
        >>> bn.forward(x, out=x)                         # in place
        array([[-1., -1.],
               [ 1.,  1.]])
        >>> bn.blobs[1]                                 # unbiased: 2/(2-1) * biased var
        array([  2., 200.])
        """
        phase = choice("phase", phase, PHASES)
        bottom = _check_input("bottom", bottom, self.channels, self.dtype)
        blobs = self._checked_blobs()
        inputs = {"bottom": bottom}
        inputs.update({f"blobs[{i}]": b for i, b in enumerate(blobs)})
        out = out_array(out, bottom.shape, self.dtype, inputs, may_alias=("bottom",))
        ugs = self.use_global_stats if self.use_global_stats is not None else phase == "TEST"
        N, C = bottom.shape[0], self.channels
        S = bottom.size // (N * C) if N else int(np.prod(bottom.shape[2:], dtype=np.int64))
        m = N * S
        if not ugs and m == 0:
            raise ValueError(f"bottom must have at least one value per channel to compute "
                             f"batch statistics, got shape {bottom.shape}")
        if self.engine == "gemv" and (N * C > _BLAS_INT_MAX or S > _BLAS_INT_MAX):
            raise ValueError(f"bottom of shape {bottom.shape} is too large for "
                             f"engine='gemv' (BLAS int dimensions); use engine='fused'")
        forward = self._forward_gemv if self.engine == "gemv" else self._forward_fused
        if ugs:
            return forward(bottom, out, ugs, N, S)
        with self._lock:       # a training forward updates the blobs
            return forward(bottom, out, ugs, N, S)

    def _forward_fused(self, bottom, out, ugs, N, S):
        C, m = self.channels, N * S
        if ugs:
            mean, var = (a.astype(np.float64) for a in self.global_stats())
            y = batch_norm_infer(bottom, mean, var, eps=self.eps, out=out)
            self._local.saved = _Saved(bottom.shape, True, "fused", None, var)
            return y
        if m == 1:
            # one value per channel: mean = x, var = 0 and y = 0 (Caffe allows this batch)
            mean = bottom.reshape(C).astype(np.float64)
            unbiased = np.zeros(C)
            y = batch_norm_infer(bottom, mean, unbiased, eps=self.eps, out=out)
            with np.errstate(divide="ignore"):
                invstd = np.full(C, 1.0 / np.sqrt(self.eps))
        else:
            # momentum 1 makes the running buffers exactly the batch mean and unbiased var
            mean, unbiased = np.zeros(C), np.zeros(C)
            y, _, invstd = batch_norm_train(bottom, eps=self.eps, out=out, running_mean=mean,
                                            running_var=unbiased, momentum=1.0)
        self._update_blobs(mean, unbiased)
        x_norm = self._buffer("x_norm", bottom.shape)
        np.copyto(x_norm, y)     # backward reads the output; later in-place layers may not
        self._local.saved = _Saved(bottom.shape, False, "fused", invstd, None)
        return y

    def _gemv_buffers(self, N, S):
        C = self.channels
        b = self._buffer
        return dict(temp=b("temp", (N * C * S,)), x_norm=b("gemv_x_norm", (N * C * S,)),
                    num_by_chans=b("num_by_chans", (N * C,)), mean=b("mean", (C,)),
                    variance=b("variance", (C,)), ones_n=b("ones_n", (N,), fill=1),
                    ones_s=b("ones_s", (S,), fill=1))

    def _forward_gemv(self, bottom, out, ugs, N, S):
        C = self.channels
        src = np.ascontiguousarray(bottom).reshape(-1)
        top = _contiguous_target(out, src)     # src itself when out is bottom (in place)
        bufs = self._gemv_buffers(N, S)
        b0, b1, b2 = self.blobs
        _caffe_gemv.forward(src, top, bufs["temp"], bufs["x_norm"], bufs["num_by_chans"],
                            bufs["mean"], bufs["variance"], bufs["ones_n"], bufs["ones_s"],
                            b0, b1, b2, N, C, S, ugs, self.moving_average_fraction, self.eps)
        self._local.saved = _Saved(bottom.shape, ugs, "gemv", None, None)
        return _deliver(out, top, bottom.shape)

    # ---- backward ------------------------------------------------------------------

    def backward(self, top_diff, *, out=None):
        """Gradient of the last forward with respect to its input.

        Training: ``(dy - mean(dy) - mean(dy * y) * y) / sqrt(var + eps)`` with the
        forward's output ``y`` and batch statistics; global statistics:
        ``dy / sqrt(var + eps)``.

        Parameters
        ----------
        top_diff : ndarray
            Gradient of the output: shape and dtype of the last forward's input.
        out : ndarray, optional
            Where to write bottom_diff; ``out=top_diff`` works in place.

        Returns
        -------
        bottom_diff : ndarray
            ``out`` if given.

        Raises
        ------
        RuntimeError
            No forward has run yet.
        TypeError, ValueError
            top_diff or out of the wrong type, dtype or shape.

        Examples
        --------
        >>> import numpy as np
        >>> from fastbn.caffe import BatchNorm
        >>> bn = BatchNorm(1, use_global_stats=True, dtype=np.float64, eps=0.25)
        >>> _ = bn.forward(np.zeros((2, 1)))
        >>> bn.backward(np.array([[1.0], [3.0]]))        # dy / sqrt(0 + 0.25)
        array([[2.],
               [6.]])
        """
        saved = self._saved_get("saved")
        if saved is None:
            raise RuntimeError("backward needs a forward first in this thread (no saved state)")
        top_diff = _check_input("top_diff", top_diff, self.channels, self.dtype)
        if top_diff.shape != saved.shape:
            raise ValueError(f"top_diff must have the shape of the last forward's bottom "
                             f"{saved.shape}, got {top_diff.shape}")
        out = out_array(out, top_diff.shape, self.dtype, {"top_diff": top_diff},
                        may_alias=("top_diff",))
        if saved.engine == "gemv":
            return self._backward_gemv(top_diff, out, saved)
        if saved.use_global_stats:
            return batch_norm_infer(top_diff, self._zeros, saved.var, eps=self.eps, out=out)
        x_norm = self._bufs["x_norm"]
        # with x = y, mean 0 and invstd 1 the training gradient is Caffe's formula in y;
        # the weight supplies the 1/sqrt(var + eps) factor
        dx, _, _ = batch_norm_backward(top_diff, x_norm, self._zeros, self._ones,
                                       weight=saved.invstd, training=True, out=out)
        return dx

    def _backward_gemv(self, top_diff, out, saved):
        N, C = saved.shape[0], self.channels
        count = int(np.prod(saved.shape, dtype=np.int64))
        S = count // (N * C) if N else 0
        td = np.ascontiguousarray(top_diff).reshape(-1)
        bd = _contiguous_target(out, td)
        if np.may_share_memory(td, bd):
            # in place: keep a copy of top_diff, it is read after bottom_diff is written
            scratch = self._buffer("top_diff_copy", td.shape)
            np.copyto(scratch, td)
            td = scratch
        bufs = self._gemv_buffers(N, S)
        _caffe_gemv.backward(td, bd, bufs["x_norm"], bufs["temp"], bufs["num_by_chans"],
                             bufs["mean"], bufs["ones_n"], bufs["ones_s"], N, C, S,
                             saved.use_global_stats)
        return _deliver(out, bd, saved.shape)


class Scale(PerThreadState):
    """Caffe's Scale layer (with its bias when ``bias_term``): ``y = x * gamma + beta``.

    Per channel on axis 1. Parameter gradients accumulate into :attr:`diffs` until
    :meth:`clear_diffs`, as Caffe accumulates diffs until the solver clears them.
    Forward and backward are thin clients of :func:`fastbn.batch_norm_infer` and
    :func:`fastbn.batch_norm_backward` (statistics mean 0, variance 1, eps 0).

    Parameters
    ----------
    channels : int
        Number of channels C.
    bias_term : bool
        Whether to add ``beta``.
    dtype : {np.float32, np.float64}

    Attributes
    ----------
    blobs : list of ndarray
        ``[gamma (C,)]`` or ``[gamma, beta]``; gamma starts at 1 (Caffe's default filler),
        beta at 0.
    diffs : list of ndarray
        Accumulated gradients of the blobs.

    Raises
    ------
    TypeError, ValueError
        Bad channels, bias_term or dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.caffe import Scale
    >>> sc = Scale(2, bias_term=True, dtype=np.float64)
    >>> sc.blobs[0][:] = [2.0, 3.0]; sc.blobs[1][:] = [0.5, -1.0]
    >>> sc.forward(np.ones((1, 2, 2)))
    array([[[2.5, 2.5],
            [2. , 2. ]]])
    >>> sc.backward(np.ones((1, 2, 2)))
    array([[[2., 2.],
            [3., 3.]]])
    >>> sc.diffs
    [array([2., 2.]), array([2., 2.])]
    """

    def __init__(self, channels, *, bias_term=False, dtype=np.float32):
        self.channels = positive_int("channels", channels)
        self.bias_term = flag("bias_term", bias_term)
        self.dtype = float_dtype("dtype", dtype)
        C = self.channels
        self.blobs = [np.ones(C, self.dtype)]
        if bias_term:
            self.blobs.append(np.zeros(C, self.dtype))
        self.diffs = [np.zeros(C, self.dtype) for _ in self.blobs]
        self._init_threads()
        self._zeros = np.zeros(C)
        self._ones = np.ones(C)

    def __repr__(self):
        return f"Scale({self.channels}, bias_term={self.bias_term}, dtype={self.dtype.name})"

    def _checked(self, attr):
        arrays = getattr(self, attr)
        n = 2 if self.bias_term else 1
        if not isinstance(arrays, list) or len(arrays) != n:
            raise ValueError(f"{attr} must be a list of {n} arrays")
        for i, a in enumerate(arrays):
            layer_blob(f"{attr}[{i}]", a, (self.channels,), self.dtype)
        return arrays

    def clear_diffs(self):
        """Set the accumulated gradients to zero."""
        for d in self._checked("diffs"):
            d[...] = 0

    def forward(self, x):
        """``x * gamma + beta`` per channel.

        Parameters
        ----------
        x : ndarray (N, C, ...)
            Input of the layer's dtype (copied for backward).

        Returns
        -------
        y : ndarray
            New array, shape and dtype of x.

        Raises
        ------
        TypeError, ValueError
            x not of the layer's dtype, wrong channel count; a blob of the wrong shape/dtype.

        Examples
        --------
        >>> import numpy as np
        >>> from fastbn.caffe import Scale
        >>> sc = Scale(2)
        >>> sc.blobs[0][:] = [2.0, -1.0]
        >>> sc.forward(np.ones((3, 2), np.float32))
        array([[ 2., -1.],
               [ 2., -1.],
               [ 2., -1.]], dtype=float32)
        """
        x = _check_input("x", x, self.channels, self.dtype)
        blobs = self._checked("blobs")
        beta = blobs[1] if self.bias_term else None
        # variance 1 with eps 0 makes the kernel's scale exactly gamma
        y = batch_norm_infer(x, self._zeros, self._ones, blobs[0], beta, eps=0.0)
        self._local.x = np.array(x, copy=True)
        return y

    def backward(self, dy):
        """Gradient of x (``dy * gamma``); adds the gamma and beta gradients to diffs.

        Parameters
        ----------
        dy : ndarray
            Gradient of the output, shape and dtype of the last forward's input.

        Returns
        -------
        dx : ndarray
            ``dy * gamma`` per channel.

        Raises
        ------
        RuntimeError
            No forward has run yet in this thread.
        TypeError, ValueError
            dy of the wrong dtype or shape.

        Examples
        --------
        >>> import numpy as np
        >>> from fastbn.caffe import Scale
        >>> sc = Scale(1, dtype=np.float64)
        >>> _ = sc.forward(np.array([[1.0], [2.0]]))
        >>> _ = sc.backward(np.ones((2, 1))); _ = sc.backward(np.ones((2, 1)))
        >>> sc.diffs[0]                 # sum(dy * x) = 3, twice
        array([6.])
        """
        x = self._saved_get("x")
        if x is None:
            raise RuntimeError("backward needs a forward first in this thread (no saved input)")
        dy = _check_input("dy", dy, self.channels, self.dtype)
        same_shape("dy", dy, "the last forward's x", x)
        blobs = self._checked("blobs")
        diffs = self._checked("diffs")
        dx, dgamma, dbeta = batch_norm_backward(dy, x, self._zeros, self._ones,
                                                blobs[0], training=False)
        with self._lock, np.errstate(all="ignore"):     # overflow to inf is not an error
            diffs[0] += dgamma
            if self.bias_term:
                diffs[1] += dbeta
        return dx


def to_pytorch_state(batch_norm, scale=None):
    """PyTorch ``BatchNorm`` state from a Caffe BatchNorm (+ Scale) pair.

    ``running_mean = blobs[0] / blobs[2]``, ``running_var = blobs[1] / blobs[2]`` (Caffe's
    var sum already holds the unbiased variance, as PyTorch's running_var); ``weight`` and
    ``bias`` from the Scale layer (1 and 0 without one, or without its bias). The eps is
    not part of PyTorch's state: build the module with ``eps=batch_norm.eps``.

    Parameters
    ----------
    batch_norm : BatchNorm
    scale : Scale, optional

    Returns
    -------
    dict
        ``weight``, ``bias``, ``running_mean``, ``running_var`` (new arrays of the layer's
        dtype) and ``num_batches_tracked`` (int64 0: Caffe does not count batches).

    Raises
    ------
    TypeError
        Arguments that are not these layers.
    ValueError
        Channel counts that differ.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.caffe import BatchNorm, to_pytorch_state
    >>> bn = BatchNorm(2)
    >>> bn.blobs[0][:] = [3.0, 6.0]; bn.blobs[1][:] = [9.0, 3.0]; bn.blobs[2][:] = 3.0
    >>> state = to_pytorch_state(bn)
    >>> state["running_mean"], state["running_var"], state["weight"]
    (array([1., 2.], dtype=float32), array([3., 1.], dtype=float32), array([1., 1.], dtype=float32))
    """
    if not isinstance(batch_norm, BatchNorm):
        raise TypeError(f"batch_norm must be a fastbn.caffe.BatchNorm, "
                        f"got {type(batch_norm).__name__}")
    C = batch_norm.channels
    if scale is not None:
        if not isinstance(scale, Scale):
            raise TypeError(f"scale must be a fastbn.caffe.Scale or None, "
                            f"got {type(scale).__name__}")
        if scale.channels != C:
            raise ValueError(f"scale must have {C} channels like batch_norm, "
                             f"got {scale.channels}")
        blobs = scale._checked("blobs")
        weight = blobs[0].copy()
        bias = blobs[1].copy() if scale.bias_term else np.zeros(C, scale.dtype)
    else:
        weight, bias = np.ones(C, batch_norm.dtype), np.zeros(C, batch_norm.dtype)
    mean, var = batch_norm.global_stats()
    return {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var,
            "num_batches_tracked": np.array(0, dtype=np.int64)}


def from_pytorch_state(state, *, eps=1e-5, moving_average_fraction=0.999, engine="fused",
                       dtype=np.float32):
    """A Caffe BatchNorm (+ Scale) pair from PyTorch ``BatchNorm`` state.

    The BatchNorm blobs become ``[running_mean, running_var, [1]]``; when the state has
    ``weight`` or ``bias`` (an affine module) a ``Scale(bias_term=True)`` holds them.

    Parameters
    ----------
    state : mapping
        ``running_mean`` and ``running_var`` (C,), optionally ``weight`` and ``bias``
        (array-likes: NumPy arrays or CPU tensors); other keys are ignored.
    eps, moving_average_fraction, engine, dtype
        For the new :class:`BatchNorm` (use the PyTorch module's eps).

    Returns
    -------
    batch_norm : BatchNorm
    scale : Scale or None

    Raises
    ------
    TypeError, ValueError
        Missing or malformed entries; bad layer arguments.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.caffe import from_pytorch_state
    >>> bn, sc = from_pytorch_state({"running_mean": np.zeros(2), "running_var": np.ones(2),
    ...                              "weight": np.array([2.0, 1.0]), "bias": np.zeros(2)},
    ...                             eps=0.0)
    >>> sc.forward(bn.forward(np.ones((1, 2), np.float32), phase="TEST"))
    array([[2., 1.]], dtype=float32)
    """
    if not hasattr(state, "keys"):
        raise TypeError(f"state must be a mapping, got {type(state).__name__}")
    for key in ("running_mean", "running_var"):
        if key not in state:
            raise ValueError(f"state must have a {key!r} entry")
    rm = np.asarray(state["running_mean"])
    if rm.ndim != 1 or rm.shape[0] < 1:
        raise ValueError(f"state['running_mean'] must be a non-empty 1-d array, "
                         f"got shape {rm.shape}")
    C = rm.shape[0]
    mean = channel_vector("state['running_mean']", state["running_mean"], C, optional=False)
    var = channel_vector("state['running_var']", state["running_var"], C, optional=False)
    weight = channel_vector("state['weight']", state.get("weight"), C)
    bias = channel_vector("state['bias']", state.get("bias"), C)
    bn = BatchNorm(C, moving_average_fraction=moving_average_fraction, eps=eps,
                   engine=engine, dtype=dtype)
    bn.blobs[0][...] = mean
    bn.blobs[1][...] = var
    bn.blobs[2][...] = 1
    scale = None
    if weight is not None or bias is not None:
        scale = Scale(C, bias_term=True, dtype=dtype)
        if weight is not None:
            scale.blobs[0][...] = weight
        if bias is not None:
            scale.blobs[1][...] = bias
    return bn, scale
