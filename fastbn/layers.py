"""Stateful layers with PyTorch-compatible state: BatchNorm and BatchRenorm.

Both are thin clients of fastbn's call requests (fastbn._calls, what the functional API
runs): a forward picks the call for the mode (training statistics or running statistics),
keeps what the backward needs, and updates the state.
"""
import numpy as np

from . import _calls, _ghost, _memory, renorm
from ._rounding import rounded
from ._layer_threads import PerThreadState
from ._validate import (channel_axis, choice, clipping, data_array, eps_value, flag, float_dtype,
                        grad_dtype, is_bfloat16, is_half, momentum_value, negative_slope,
                        positive_int, real_scalar)

__all__ = ["BatchNorm", "BatchRenorm"]

# num_batches_tracked is saved as PyTorch's int64 scalar: it saturates there
_MAX_STEPS = np.iinfo(np.int64).max

def _activation(value):
    """A layer's activation, checked: None, "relu", or ("leaky_relu", slope) with a finite
    slope >= 0 (returned as a tuple with a float slope)."""
    if value is None or (isinstance(value, str) and value == "relu"):
        return value
    if (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str)
            and value[0] == "leaky_relu"):
        return ("leaky_relu", negative_slope(value[1], name="the leaky ReLU's slope"))
    raise ValueError(f"activation must be None, 'relu' or ('leaky_relu', slope), got {value!r}")


class _Norm(PerThreadState):
    """State and bookkeeping shared by the layers.

    Subclasses list their buffers in ``_buffers`` and implement ``_forward_train`` /
    ``_forward_eval`` (x, residual), each returning (y, backward closure). The closure holds
    everything the backward needs (the input, statistics, a copy of the weight, the layout,
    the fused ReLU's mask: as bits where the kernels keep them, else y), so a backward
    always belongs to its own forward.

    Threads: what a forward saves for its backward is kept per Python thread, and the
    updates of the layer's state (running statistics, num_batches_tracked, the gradient
    sums) are made under a lock; see the threads section of the getting-started guide.
    """

    _buffers = ()

    def __init__(self, num_features, *, eps, momentum, affine, layout, dtype, activation):
        self.num_features = positive_int("num_features", num_features)
        self.activation = activation
        self.eps = eps_value(eps)
        self.momentum = None if momentum is None else momentum_value(momentum)
        self.affine = flag("affine", affine)
        self.layout = layout
        self.dtype = float_dtype("dtype", dtype)
        C = self.num_features
        if self.affine:
            self.weight = np.ones(C, self.dtype)
            self.bias = np.zeros(C, self.dtype)
            self.weight_grad = np.zeros(C, self.dtype)
            self.bias_grad = np.zeros(C, self.dtype)
        else:
            self.weight = self.bias = self.weight_grad = self.bias_grad = None
        self.num_batches_tracked = 0
        self.training = True
        self._init_threads()

    # ----- validated settings -------------------------------------------------------------
    @property
    def layout(self):
        """Where the channel axis of the inputs is: "NCHW" (axis 1) or "NHWC" (last)."""
        return self._layout

    @layout.setter
    def layout(self, value):
        channel_axis(value, 2)
        self._layout = value

    @property
    def activation(self):
        """None, "relu" (the forward returns ``max(bn(x) + residual, 0)``, fused), or
        ``("leaky_relu", slope)`` (``v if v >= 0 else slope * v`` of ``v = bn(x) +
        residual``, fused)."""
        return self._activation

    @activation.setter
    def activation(self, value):
        self._activation = _activation(value)

    @property
    def _slope(self):
        """The fused activation's slope below 0: 0.0 for the ReLU (and for none)."""
        a = self.activation
        return a[1] if isinstance(a, tuple) else 0.0

    def _kept_output(self, y):
        """What a forward's backward reads of y: y with an activation, else None."""
        return None if self.activation is None else y

    def _relu_mask(self):
        """A ReluMask for a training forward to fill (the plain ReLU's), or None."""
        return _calls.ReluMask() if self.activation == "relu" else None

    @property
    def training(self):
        """Whether forward uses batch statistics (set with :meth:`train` / :meth:`eval`)."""
        return self._training

    @training.setter
    def training(self, value):
        self._training = flag("training", value)

    @property
    def num_batches_tracked(self):
        """Training forwards run so far (an int in [0, 2**63 - 1]; it stops there)."""
        return self._num_batches_tracked

    @num_batches_tracked.setter
    def num_batches_tracked(self, value):
        self._num_batches_tracked = _step_count(value)

    # ----- modes ------------------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (``mode=True``) or evaluation mode; return the layer.

        Raises
        ------
        TypeError
            mode is not a bool.
        """
        self.training = flag("mode", mode)
        return self

    def eval(self):
        """Set evaluation mode; return the layer."""
        return self.train(False)

    # ----- forward / backward -----------------------------------------------------------
    def _check_input(self, x):
        x = data_array("x", x)
        # float32 layers also take 16-bit inputs (PyTorch's mixed precision: float32
        # parameters, buffers and parameter gradients; y and dx in the input's dtype)
        if x.dtype != self.dtype and not (self.dtype == np.float32 and is_half(x.dtype)):
            expected = f"{self.dtype}" + (", float16 or bfloat16" if self.dtype == np.float32
                                          else "")
            raise TypeError(f"x must have the layer's dtype ({expected}), got {x.dtype}")
        C = x.shape[channel_axis(self.layout, x.ndim)]
        if C != self.num_features:
            raise ValueError(f"x must have {self.num_features} channels on its "
                             f"{self.layout} channel axis, got shape {x.shape}")
        return x

    def _factor(self):
        """Running-update weight of this step's batch (momentum=None: cumulative average)."""
        if self.momentum is None:
            return 1.0 / (self.num_batches_tracked + 1)
        return self.momentum

    def _count_step(self):
        if self._num_batches_tracked < _MAX_STEPS:
            self._num_batches_tracked += 1

    def forward(self, x, residual=None):
        """Normalize x (then add the residual and apply the ReLU, with
        ``activation="relu"``); keep what :meth:`backward` needs.

        Parameters
        ----------
        x : ndarray
            (N, C, ...) for layout "NCHW" or (N, ..., C) for "NHWC", in the layer's dtype.
            It is kept by reference for the backward: do not modify it before then.
        residual : ndarray, optional
            Only with an activation: added before it (a residual block's shortcut), the
            shape and dtype of x.

        Returns
        -------
        y : ndarray
            Shape and dtype of x. With ``activation="relu"`` the backward needs the ReLU's
            mask (y > 0): a training forward of float32 data keeps it as bits, 1 per value,
            where the kernels read them (the AVX2 and AVX-512 builds), and y is then yours
            to free or overwrite; otherwise (and with a leaky ReLU) y is kept by reference:
            do not modify it before the backward.

        Raises
        ------
        TypeError
            x (or the residual) is not an array of the layer's dtype.
        ValueError
            Wrong channel count or ndim; in training, one value per channel; a residual
            of another shape, or without an activation. The layer's state is unchanged
            then.
        """
        x = self._check_input(x)
        if residual is not None and self.activation is None:
            raise ValueError("residual needs an activation, 'relu' or ('leaky_relu', slope) "
                             "(the fused residual add and activation); add it to the output "
                             "yourself otherwise")
        if self._uses_batch_stats():
            with self._lock:   # the running statistics and the step count
                y, backward = self._forward_train(x, residual)
        else:
            y, backward = self._forward_eval(x, residual)
        self._local.backward = backward
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient of x for the last forward; accumulate weight_grad and bias_grad.

        Parameters
        ----------
        dy : ndarray
            Gradient of the last forward's output (its shape and dtype).

        Returns
        -------
        dx : ndarray
            Or ``(dx, dresidual)`` when the forward was given a residual: dresidual is its
            gradient (dy where y > 0, else 0, or ``slope * dy`` for a leaky ReLU), written in
            the same pass.

        Raises
        ------
        RuntimeError
            No forward has run yet in this thread.
        """
        backward = self._saved_get("backward")
        if backward is None:
            raise RuntimeError("backward called before forward (in this thread)")
        dx, dweight, dbias, dresidual = backward(dy)
        if self.affine:
            # both sums or neither: an overflow to inf is not an error
            with self._lock, np.errstate(all="ignore"):
                self.weight_grad += dweight
                self.bias_grad += dbias
        return dx if dresidual is None else (dx, dresidual)

    def zero_grad(self):
        """Reset weight_grad and bias_grad to zero."""
        if self.affine:
            self.weight_grad[...] = 0
            self.bias_grad[...] = 0

    # ----- state ------------------------------------------------------------------------
    def _state_keys(self):
        keys = ["weight", "bias"] if self.affine else []
        if self._tracks():
            keys += list(self._buffers) + ["num_batches_tracked"]
        return keys

    def state_dict(self):
        """The layer's state as fresh arrays, under PyTorch's key names.

        Returns
        -------
        dict
            "weight", "bias" (affine layers), the running buffers and
            "num_batches_tracked" (a 0-d int64 array), when running statistics are tracked.
        """
        out = {}
        for k in self._state_keys():
            v = self.num_batches_tracked if k == "num_batches_tracked" else getattr(self, k)
            out[k] = np.array(v, dtype=np.int64 if k == "num_batches_tracked" else self.dtype)
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Copy a state (e.g. a PyTorch module's ``state_dict()`` as NumPy arrays) in.

        Values are converted to the layer's dtype. Nothing changes unless every value is
        valid.

        Parameters
        ----------
        state_dict : mapping
            Keys as :meth:`state_dict` returns them; values array-like (NumPy arrays, CPU
            tensors, lists).
        strict : bool
            Whether missing and unexpected keys are errors; otherwise they are skipped.

        Raises
        ------
        KeyError
            Missing or unexpected keys (strict).
        TypeError
            A non-floating parameter or buffer, a num_batches_tracked that is not a number;
            strict not a bool.
        ValueError
            A value of the wrong shape; a num_batches_tracked that is not an integer, or
            is negative or beyond int64.
        """
        strict = flag("strict", strict)
        keys = self._state_keys()
        if strict:
            missing = [k for k in keys if k not in state_dict]
            unexpected = [k for k in state_dict if k not in keys]
            if missing or unexpected:
                raise KeyError(f"state_dict does not match the layer: missing keys {missing}, "
                               f"unexpected keys {unexpected}")
        new = {}
        C = self.num_features
        for k in keys:
            if k not in state_dict:
                continue
            v = state_dict[k]
            if k == "num_batches_tracked":
                new[k] = _step_count(v, loaded=True)
                continue
            if isinstance(v, np.ma.MaskedArray):
                raise TypeError(f"{k} must not be a masked array")
            v = np.asarray(v)
            if v.dtype.kind != "f" and not is_bfloat16(v.dtype):
                raise TypeError(f"{k} must be a floating-point array (float16, bfloat16, "
                                f"float32 or float64), got dtype {v.dtype}")
            if v.shape != (C,):
                raise ValueError(f"{k} must have shape ({C},), got {v.shape}")
            with np.errstate(all="ignore"):    # overflow to inf: checked as it will be stored
                v = v.astype(self.dtype)
            self._check_loaded(k, v)
            new[k] = v
        for k, v in new.items():
            if k == "num_batches_tracked":
                self.num_batches_tracked = v
            else:
                getattr(self, k)[...] = v

    def _check_loaded(self, key, value):
        """Subclass hook: validate one loaded buffer."""


class BatchNorm(_Norm):
    """Batch Normalization layer with PyTorch's ``BatchNorm{1,2,3}d`` behaviour and state.

    Training mode normalizes with the batch statistics and updates the running statistics
    (``running = (1 - momentum) * running + momentum * batch``, unbiased batch variance);
    evaluation mode normalizes with the running statistics.

    Parameters
    ----------
    num_features : int
        Channels C.
    eps : float
        Added to the variance.
    momentum : float in [0, 1] or None
        Weight of the new batch in the running update; None gives the cumulative average
        (weight ``1 / num_batches_tracked``).
    affine : bool
        Whether the layer has a learnable weight (gamma, init 1) and bias (beta, init 0).
    track_running_stats : bool
        If False there are no running statistics and the batch statistics are used in
        evaluation mode too.
    layout : {"NCHW", "NHWC"}
        Where the channel axis of the inputs is.
    dtype : {np.float32, np.float64}
        Of the parameters, buffers and inputs.
    activation : None, "relu" or ("leaky_relu", slope)
        "relu": forward returns ``max(bn(x) + residual, 0)`` (residual optional) from one
        fused pass, and backward masks dy with y's sign in its own passes
        (:func:`fastbn.batch_norm_relu_train` and the rest), read from bits the training
        forward keeps (1 per value) where the kernels can, so that the backward costs what
        the plain one does and y need not be kept (see :meth:`forward`). The state is the
        same. ``("leaky_relu", slope)`` (a finite slope >= 0): ``v if v >= 0 else slope *
        v`` of ``v = bn(x) + residual``, fused the same way (``negative_slope`` of those
        functions); the layer keeps y for its backward.
    memory : {"normal", "low"}
        What a training forward keeps for the backward: x ("normal"), or its output y
        ("low"; needs ``activation=None`` or ``("leaky_relu", slope)`` with a slope > 0,
        which is inverted: the ReLU's 0 hides its input): the backward then recovers the
        normalized input as ``(y - bias) / weight``, of the leaky ReLU's pre-activation
        (:func:`fastbn.batch_norm_backward_from_output`), so x
        may be freed or overwritten once the forward has returned, and a network that keeps
        each layer's output anyway holds one array per layer instead of two. y is kept by
        reference: do not modify it before the backward. No weight may be 0 at the
        forward (the backward raises a ValueError naming the channel). Evaluation keeps x,
        as the normal layer does.
    ghost_batch_size : int >= 1, optional
        Ghost Batch Normalization: a training forward normalizes each consecutive group of
        this many samples with the group's own statistics and updates the running
        statistics once per group, in order, with the step's momentum (one step counted);
        evaluation is unchanged. See ``ghost_batch_size`` of
        :func:`fastbn.batch_norm_train`. (With an activation the layer keeps y for the
        backward.)

    Attributes
    ----------
    weight, bias : ndarray (C,) or None
    weight_grad, bias_grad : ndarray (C,) or None
        Accumulated by :meth:`backward` until :meth:`zero_grad`.
    running_mean, running_var : ndarray (C,) or None
    num_batches_tracked : int
        Training forwards so far; it stops at 2**63 - 1 (PyTorch saves it as an int64).
    training : bool

    Raises
    ------
    TypeError, ValueError
        Bad arguments: non-integer or non-positive num_features, eps < 0, momentum outside
        [0, 1], unknown layout, non-float dtype. At run time: an input of the wrong dtype or
        channel count, or a training batch with one value per channel.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(3, dtype=np.float64)
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, size=(16, 3, 4, 4))
    >>> y = bn(x)
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.bias_grad, bn.num_batches_tracked
    (array([256., 256., 256.]), 1)
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    >>> y_eval = bn.eval()(x)
    """

    _buffers = ("running_mean", "running_var")

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, layout="NCHW", dtype=np.float32, activation=None,
                 ghost_batch_size=None, memory="normal"):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         layout=layout, dtype=dtype, activation=activation)
        self.ghost_batch_size = ghost_batch_size
        self.memory = memory
        self.track_running_stats = flag("track_running_stats", track_running_stats)
        if self.track_running_stats:
            self.running_mean = np.zeros(self.num_features, self.dtype)
            self.running_var = np.ones(self.num_features, self.dtype)
        else:
            self.running_mean = self.running_var = None

    @property
    def ghost_batch_size(self):
        """None, or the samples per ghost batch of a training forward (an int >= 1)."""
        return self._ghost_batch_size

    @ghost_batch_size.setter
    def ghost_batch_size(self, value):
        self._ghost_batch_size = (None if value is None
                                  else positive_int("ghost_batch_size", value))

    @property
    def memory(self):
        """"normal" (a training forward keeps x for the backward) or "low" (it keeps y, and
        the backward recovers the normalized input from it)."""
        return self._memory

    @memory.setter
    def memory(self, value):
        choice("memory", value, ("normal", "low"))
        if value == "low" and not _invertible(self.activation):
            raise ValueError(f"memory='low' needs activation=None or ('leaky_relu', slope) "
                             f"with a slope > 0, got {self.activation!r}: y determines x "
                             f"only through an invertible activation, and the ReLU's 0 "
                             f"hides its input")
        self._memory = value

    @_Norm.activation.setter
    def activation(self, value):
        value = _activation(value)
        if not _invertible(value) and getattr(self, "_memory", "normal") == "low":
            raise ValueError(f"activation must be None or ('leaky_relu', slope) with a slope "
                             f"> 0 while memory='low', got {value!r}")
        _Norm.activation.fset(self, value)

    def _tracks(self):
        return self.track_running_stats

    def _uses_batch_stats(self):
        return self.training or not self.track_running_stats

    def reset_running_stats(self):
        """Running mean 0, running variance 1, num_batches_tracked 0."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def _forward_train(self, x, residual):
        update = self.training and self.track_running_stats
        layout = self.layout
        if self.memory == "low" and residual is not None:
            raise ValueError("memory='low' takes no residual: y = act(bn(x) + residual) "
                             "determines bn(x) only with the residual, which the layer "
                             "would then have to keep")
        if self.ghost_batch_size is not None:
            return self._forward_ghost(x, residual, update)
        if self.memory == "low":
            y, mean, invstd = _calls.batch_norm_train(
                x, self.weight, self.bias, eps=self.eps, layout=layout,
                running_mean=self.running_mean if update else None,
                running_var=self.running_var if update else None,
                momentum=self._factor() if update else 0.0,
                relu=self.activation is not None, negative_slope=self._slope)
            if update:
                self._count_step()
            return y, self._from_output_closure(y, invstd[None], None)
        mask = self._relu_mask()
        y, mean, invstd = _calls.batch_norm_train(
            x, self.weight, self.bias, eps=self.eps, layout=layout,
            running_mean=self.running_mean if update else None,
            running_var=self.running_var if update else None,
            momentum=self._factor() if update else 0.0, residual=residual,
            relu=self.activation is not None, mask=mask, negative_slope=self._slope)
        if update:
            self._count_step()
        return y, _backward_closure(_calls.backward, x, (mean, invstd, _copy(self.weight)),
                                    dict(training=True, layout=layout,
                                         negative_slope=self._slope),
                                    self._kept_output(y), mask, residual is not None)

    def _forward_ghost(self, x, residual, update):
        """The training forward of Ghost Batch Normalization: each group's statistics, the
        running statistics updated once per group (with this step's momentum)."""
        layout = self.layout
        y, mean, invstd = _ghost.train(
            x, self.weight, self.bias, eps=self.eps, layout=layout,
            running_mean=self.running_mean if update else None,
            running_var=self.running_var if update else None,
            momentum=self._factor() if update else 0.0, residual=residual,
            relu=self.activation is not None, negative_slope=self._slope,
            ghost_batch_size=self.ghost_batch_size)
        if update:
            self._count_step()
        if self.memory == "low":
            return y, self._from_output_closure(y, invstd, self.ghost_batch_size)
        return y, _backward_closure(_ghost.backward, x, (mean, invstd, _copy(self.weight)),
                                    dict(training=True, layout=layout,
                                         ghost_batch_size=self.ghost_batch_size,
                                         negative_slope=self._slope),
                                    self._kept_output(y), None, residual is not None)

    def _from_output_closure(self, y, invstd, ghost_batch_size):
        """The backward of a memory='low' training forward: from y (and invstd, one row per
        ghost batch), with copies of the weight and bias of the forward; x is not held.
        Behind a leaky ReLU y is the activation's output, which the kernels invert."""
        C, layout = self.num_features, self.layout
        slope = self._slope if self.activation is not None else None
        weight = np.ones(C) if self.weight is None else self.weight.astype(np.float64)
        bias = None if self.bias is None else self.bias.astype(np.float64)
        parts = [(0, y.shape[0])] if ghost_batch_size is None else \
            _ghost.groups(y.shape[0], ghost_batch_size)

        def backward(dy):
            dy = data_array("dy", dy)
            if dy.shape != y.shape:
                raise ValueError(f"dy must have the shape of the forward's output {y.shape}, "
                                 f"got {dy.shape}")
            if dy.dtype != y.dtype:
                raise TypeError(f"dy must have the dtype of the forward's output ({y.dtype}), "
                                f"got {dy.dtype}")
            zero = np.flatnonzero(weight == 0)
            if zero.size:
                raise ValueError(f"memory='low' recovers the normalized input from y through "
                                 f"the weight, which is 0 in channel {zero[0]}")
            dx = (_memory.new_array(y.shape, y.dtype, beside=y)[0] if y.flags.c_contiguous
                  else np.empty_like(y))
            dweight, dbias = np.zeros(C), np.zeros(C)
            with np.errstate(over="ignore", invalid="ignore"):
                for k, (a, b) in enumerate(parts):
                    _, dw, db = _calls.backward_from_output(
                        dy[a:b], y[a:b], invstd[k], weight, bias, layout=layout,
                        out=dx[a:b], num_threads=None, float64_grads=True,
                        written=_ghost.written_bytes(dx), negative_slope=slope)
                    dweight += dw
                    dbias += db
            gdt = grad_dtype(y.dtype)
            return dx, rounded(dweight, gdt), rounded(dbias, gdt), None
        return backward

    def _forward_eval(self, x, residual):
        layout = self.layout
        y = _calls.batch_norm_infer(x, layout, self.running_mean, self.running_var,
                                    self.weight, self.bias, eps=self.eps, residual=residual,
                                    relu=self.activation is not None,
                                    negative_slope=self._slope)
        mean = self.running_mean.astype(np.float64)
        with np.errstate(all="ignore"):     # a loaded var < 0 gives NaN, as the kernels do
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        return y, _backward_closure(_calls.backward, x, (mean, invstd, _copy(self.weight)),
                                    dict(training=False, layout=layout,
                                         negative_slope=self._slope),
                                    self._kept_output(y), None, residual is not None)


def _invertible(activation):
    """Whether y determines the activation's input: none, or a leaky ReLU of slope > 0."""
    return activation is None or (isinstance(activation, tuple) and activation[1] > 0)


def _backward_closure(grad, x, args, kwargs, y, mask, has_residual):
    """The backward of one forward: grad(dy, x, *args, **kwargs, y=y, dresidual=...) ->
    (dx, dweight, dbias, dresidual or None). args hold the forward's statistics and a copy
    of the weight (an optimizer step in between does not change it), kwargs the layout
    (and whether the statistics were the batch's). The fused ReLU's mask: the forward's
    mask bits (mask, a _calls.ReluMask whose bits were kept), else its output y (None
    without the ReLU); y is not held when the bits are."""
    if mask is not None and mask.bits is not None:
        y, kw = None, dict(kwargs, mask=mask)
    else:
        kw = kwargs
    del mask

    def backward(dy):
        dres = None
        if has_residual:
            dres = (_memory.new_array(x.shape, x.dtype)[0] if x.flags.c_contiguous
                    else np.empty_like(x))
        dx, dweight, dbias = grad(dy, x, *args, **kw, y=y, dresidual=dres)
        return dx, dweight, dbias, dres
    return backward


def _copy(weight):
    return None if weight is None else weight.copy()


def _step_count(v, loaded=False):
    """num_batches_tracked as an int in [0, 2**63 - 1] (PyTorch keeps it in an int64)."""
    name = "num_batches_tracked"
    if isinstance(v, np.ndarray) or loaded:
        a = np.asarray(v)
        if a.shape not in ((), (1,)):
            raise ValueError(f"{name} must be a scalar, got shape {a.shape}")
        v = a.reshape(())[()]
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    if isinstance(v, (int, np.integer)):
        n = int(v)
    elif isinstance(v, (float, complex, np.floating, np.complexfloating)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    else:
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if not 0 <= n <= _MAX_STEPS:
        raise ValueError(f"{name} must be in [0, 2**63 - 1] (an int64 count), got {n}")
    return n


def _clip_param(name, v):
    """A constant, a callable of the step count, or "paper"; returned as a callable."""
    if callable(v):
        return v
    if isinstance(v, str):
        if v != "paper" or name == "rmin":
            choices = "a number or a callable of the step count" + (
                "" if name == "rmin" else " or 'paper'")
            raise ValueError(f"{name} must be {choices}, got {v!r}")
        return renorm.paper_schedules()[0 if name == "rmax" else 1]
    return _Constant(real_scalar(name, v))


class _Constant:
    """A schedule that is one value at every step (a class, so the layer pickles)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, step):
        return self.value


class BatchRenorm(_Norm):
    """Batch Renormalization layer (Ioffe 2017).

    Training mode runs :func:`fastbn.batch_renorm_train` (batch statistics corrected by
    r and d towards the running mean and standard deviation, which it then updates);
    evaluation mode gives ``y = weight * (x - running_mean) / running_std + bias``.

    Parameters
    ----------
    num_features : int
        Channels C.
    rmax, dmax : float, callable or "paper"
        Clipping bounds of r and d: a constant, a callable ``f(step) -> float`` of the
        number of training steps done before this one (``num_batches_tracked``), or
        "paper" for the paper's schedule (rmax 1 -> 3 and dmax 0 -> 5, relaxed linearly
        after 5000 steps of plain Batch Normalization; see
        :func:`fastbn.renorm.paper_schedules` for other step counts).
    rmin : float, callable or None
        Lower clip of r, as Keras' ``renorm_clipping["rmin"]``; None means ``1 / rmax``.
    momentum : float in [0, 1] or None
        Weight of the new batch in the running update (the paper's alpha); None gives
        the cumulative average.
    eps : float
        Added to the batch variance inside the batch standard deviation.
    affine : bool
        Whether the layer has a learnable weight and bias.
    layout : {"NCHW", "NHWC"}
    dtype : {np.float32, np.float64}
    activation : None, "relu" or ("leaky_relu", slope)
        As :class:`BatchNorm`: "relu" fuses the residual add and the ReLU into the
        normalizing pass and the ReLU's mask into the backward.

    Attributes
    ----------
    weight, bias, weight_grad, bias_grad : ndarray (C,) or None
    running_mean, running_std : ndarray (C,)
        Initialized to 0 and 1.
    num_batches_tracked : int
        Training forwards so far; it stops at 2**63 - 1 (PyTorch saves it as an int64).
        Training steps so far (the schedules' step count).
    training : bool

    Raises
    ------
    TypeError, ValueError
        Bad arguments as :class:`BatchNorm`; rmax < 1, dmax < 0 or rmin outside (0, 1]
        (checked when used, so schedules are checked at every step).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> brn = fastbn.BatchRenorm(3, rmax=1.5, dmax=0.5, dtype=np.float64)
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, size=(16, 3, 4, 4))
    >>> y = brn(x)
    >>> dx = brn.backward(np.ones_like(y))
    >>> brn.num_batches_tracked, brn.clipping()
    (1, (0.6666666666666666, 1.5, 0.5))
    >>> y_eval = brn.eval()(x)
    >>> m, s = brn.running_mean[:, None, None], brn.running_std[:, None, None]
    >>> bool(np.allclose(y_eval, (x - m) / s))
    True
    >>> sorted(brn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_std', 'weight']
    """

    _buffers = ("running_mean", "running_std")

    def __init__(self, num_features, *, rmax=3.0, dmax=5.0, rmin=None, momentum=0.01,
                 eps=1e-5, affine=True, layout="NCHW", dtype=np.float32, activation=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         layout=layout, dtype=dtype, activation=activation)
        self.rmax = _clip_param("rmax", rmax)
        self.dmax = _clip_param("dmax", dmax)
        self.rmin = None if rmin is None else _clip_param("rmin", rmin)
        self.clipping(0)
        self.running_mean = np.zeros(self.num_features, self.dtype)
        self.running_std = np.ones(self.num_features, self.dtype)

    def _tracks(self):
        return True

    def _uses_batch_stats(self):
        return self.training

    def clipping(self, step=None):
        """(rmin, rmax, dmax) used at `step` (default: the next training step)."""
        step = self.num_batches_tracked if step is None else step
        rmin = None if self.rmin is None else self.rmin(step)
        return clipping(rmin, self.rmax(step), self.dmax(step))

    def _check_loaded(self, key, value):
        if key == "running_std" and not np.all(np.isfinite(value) & (value > 0)):
            raise ValueError(f"running_std must hold finite values > 0 in the layer's dtype "
                             f"{self.dtype}, got {value!r}")

    def _forward_train(self, x, residual):
        rmin, rmax, dmax = self.clipping()
        layout = self.layout
        mask = self._relu_mask()
        y, mean, std, r, d = _calls.renorm_train(
            x, self.weight, self.bias, self.running_mean, self.running_std, rmin=rmin,
            rmax=rmax, dmax=dmax, momentum=self._factor(), eps=self.eps, layout=layout,
            residual=residual, relu=self.activation is not None, mask=mask,
            negative_slope=self._slope)
        self._count_step()
        return y, _backward_closure(_calls.renorm_backward, x,
                                    (mean, std, r, d, _copy(self.weight)),
                                    dict(layout=layout, negative_slope=self._slope),
                                    self._kept_output(y), mask, residual is not None)

    def _forward_eval(self, x, residual):
        layout = self.layout
        mean = self.running_mean.astype(np.float64)
        std = self.running_std.astype(np.float64)
        # y = (x - mean) * (weight / std) + bias: std is divided by, never squared, so an
        # extreme std (1e-200, 1e200) neither underflows nor overflows
        y = _calls.infer(_calls.Batch(x, layout), mean, std, self.weight, self.bias, eps=0.0,
                         divisor_is_std=True, residual=residual,
                         relu=self.activation is not None, negative_slope=self._slope)
        with np.errstate(all="ignore"):     # a subnormal std gives inf, as the kernels do
            invstd = 1.0 / std
        return y, _backward_closure(_calls.backward, x, (mean, invstd, _copy(self.weight)),
                                    dict(training=False, layout=layout,
                                         negative_slope=self._slope),
                                    self._kept_output(y), None, residual is not None)
