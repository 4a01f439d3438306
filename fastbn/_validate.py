"""Argument checks and conversions, run once before any kernel and before anything the
caller owns is written. Every error names the argument and what was expected. (Rounding
results into a dtype is in fastbn._rounding.)"""
import math
import numbers
import operator

import numpy as np

LAYOUTS = ("NCHW", "NHWC")
DATA_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FLOAT16 = np.dtype(np.float16)
DATA_NAMES = "float32, float64, float16 or bfloat16"


def is_bfloat16(dt):
    """Whether dt is bfloat16 as ml_dtypes registers it with NumPy (a 2-byte user-defined
    dtype named "bfloat16"), recognised without importing ml_dtypes."""
    return dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16" and dt.isnative


def is_half(dt):
    """Whether dt is a 16-bit floating type fastbn takes: float16 or bfloat16."""
    return dt == FLOAT16 or is_bfloat16(dt)


def is_data_dtype(dt):
    """Whether fastbn's kernels take data of dtype dt."""
    return dt in DATA_DTYPES or is_half(dt)


def grad_dtype(dt):
    """dtype of dweight and dbias for data of dtype dt: float32 for 16-bit data."""
    return np.dtype(np.float32) if is_half(dt) else dt


def channel_axis(layout, ndim):
    """Index of the channel axis for `layout` ('NCHW': 1, 'NHWC': last)."""
    if layout == "NCHW" and type(layout) is str:
        return 1
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return 1 if layout == "NCHW" else ndim - 1


_FLOAT32, _FLOAT64 = DATA_DTYPES


def plain_array(name, a):
    """a as a plain ndarray (array-likes converted, ndarray subclasses viewed as ndarray,
    nothing copied). Masked arrays are refused: their mask would be silently ignored."""
    if type(a) is np.ndarray:
        return a
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} must not be a masked array (fastbn cannot honour a mask); "
                        f"pass {name}.filled(value) or {name}.data")
    return np.asarray(a)


def native(a):
    """a in native byte order: a itself, or a converted copy of a byte-swapped array."""
    if a.dtype.isnative:
        return a
    return a.astype(a.dtype.newbyteorder("="))


def data_array(name, a):
    """A float32/float64/float16/bfloat16 array of ndim >= 2, in native byte order (not
    copied unless it was byte-swapped)."""
    if type(a) is np.ndarray and (a.dtype is _FLOAT32 or a.dtype is _FLOAT64) and a.ndim >= 2:
        return a               # the common case, without the general checks below
    a = plain_array(name, a)
    if a.dtype.kind == "f" and not a.dtype.isnative:
        a = native(a)
    if not is_data_dtype(a.dtype):
        raise TypeError(f"{name} must be a {DATA_NAMES} array, got dtype {a.dtype}")
    if a.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (N, C, ...), got shape {a.shape}")
    return a


def _float_dtype(name, a):
    if a.dtype.kind != "f" and not is_bfloat16(a.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")


def channel_vector(name, a, C, *, optional=True):
    """A per-channel parameter as a C-contiguous float64 (C,) array, for reading only: a
    float64 contiguous input is returned as it is, anything else is converted (None stays
    None if optional)."""
    if a is None:
        if optional:
            return None
        raise ValueError(f"{name} is required")
    if (type(a) is np.ndarray and a.dtype == np.float64 and a.shape == (C,)
            and a.flags.c_contiguous and a.flags.aligned):
        return a               # the common case, read as it is
    a = plain_array(name, a)
    _float_dtype(name, a)
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), got {a.shape}")
    return np.require(a, np.float64, ("C", "A"))      # contiguous, aligned, native order


def values_per_channel(shape, axis):
    """How many values each channel of an array of this shape holds (also with no channel)."""
    return math.prod(s for i, s in enumerate(shape) if i != axis)


def training_count(name, shape, axis, count=None, over=None):
    """The values per channel of a training batch, which must be more than 1 (a variance
    needs two), else a ValueError naming `name` and its shape. The batch is the array of
    this shape, or (`over`, e.g. "all 4 processes") the union of such arrays, with `count`
    values per channel in all."""
    m = values_per_channel(shape, axis) if count is None else count
    if m > 1:
        return m
    if over is None:
        raise ValueError(f"{name} must have more than 1 value per channel in training, got "
                         f"shape {shape} ({m} value(s) per channel)")
    raise ValueError(f"{name} must have more than 1 value per channel over {over} in "
                     f"training, got {m} in all (this process: shape {shape})")


def running_buffers(running_mean, running_var, C, names=("running_mean", "running_var")):
    """Check a pair of running-statistic buffers that will be updated in place."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{names[0]} and {names[1]} must be given together (or both None)")
    if running_mean is None:
        return
    for name, buf in zip(names, (running_mean, running_var)):
        if not isinstance(buf, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array (it is updated in place), "
                            f"got {type(buf).__name__}")
        plain_array(name, buf)
        _float_dtype(name, buf)
        if buf.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},), got {buf.shape}")
        writable_target(name, buf, " (it is updated in place)")
    if np.shares_memory(running_mean, running_var):
        raise ValueError(f"{names[0]} and {names[1]} must not share memory")


def fold_arguments(running_mean, running_var, weight, bias, eps):
    """The arguments of fold_batch_norm as float64 (C,) vectors (weight 1 and bias 0 when
    None), eps, and the common floating dtype of the arrays given."""
    rm_arr = np.asarray(running_mean)
    if rm_arr.ndim != 1:
        raise ValueError(f"running_mean must be 1-d (C,), got shape {rm_arr.shape}")
    C = rm_arr.shape[0]
    rm = channel_vector("running_mean", running_mean, C, optional=False)
    rv = channel_vector("running_var", running_var, C, optional=False)
    w = channel_vector("weight", weight, C)
    b = channel_vector("bias", bias, C)
    eps = eps_value(eps)
    dtype = np.result_type(*[np.asarray(a).dtype for a in (running_mean, running_var, weight,
                                                            bias) if a is not None])
    return (rm, rv, np.ones(C) if w is None else w, np.zeros(C) if b is None else b, eps,
            dtype)


def real_scalar(name, v):
    """A real number as a float: Python and NumPy reals and 0-d real arrays (not bools).
    An integer too large for a float gives +-inf, which the callers' range checks refuse."""
    if type(v) is float:       # the common case, without the slower ABC check below
        return v
    if type(v) is np.ndarray and v.ndim == 0:
        v = v[()]              # a 0-d array is its scalar, as for num_threads
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def flag(name, v):
    """A bool (Python or NumPy) as a Python bool; anything else is a TypeError, so that
    "False", None, 0.0 or [] are never taken for a truth value."""
    if v is True or v is False:
        return v
    if isinstance(v, np.bool_) or (type(v) is np.ndarray and v.ndim == 0
                                   and v.dtype == np.bool_):
        return bool(v)
    raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")


def eps_value(eps, name="eps"):
    eps = real_scalar(name, eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return eps


def negative_slope(slope, *, invertible=False, name="negative_slope"):
    """The leaky ReLU's slope below 0 as a float: finite and >= 0 (0 is the plain ReLU);
    with invertible (the backward from the output, which inverts the activation), > 0.
    The mask of the fused backward is y > 0, which is the pre-activation's sign only for a
    slope >= 0."""
    slope = real_scalar(name, slope)
    if not math.isfinite(slope) or slope < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {slope!r}")
    if invertible and slope == 0:
        raise ValueError(f"{name} must be > 0: y = max(x, 0) does not determine a negative x "
                         f"(use negative_slope=None for y without an activation)")
    return slope


def momentum_value(momentum, name="momentum"):
    momentum = real_scalar(name, momentum)
    if not (0.0 <= momentum <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {momentum!r}")
    return momentum


def gradient_pair(dy, x):
    """The (dy, x) of a backward: data arrays of one shape and one dtype."""
    x = data_array("x", x)
    dy = data_array("dy", dy)
    same_shape("dy", dy, "x", x)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
    return dy, x


def same_shape(name, a, ref_name, ref):
    if a.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {ref.shape}, got {a.shape}")


def like_x(name, a, x):
    """An array read like x (the fused ReLU's residual, the forward's y): a data array of
    x's shape and dtype, any memory order."""
    a = data_array(name, a)
    same_shape(name, a, "x", x)
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
    return a


def self_overlapping(a):
    """True when two elements of a share a byte (a zero stride, or as_strided views whose
    elements overlap). Exact for ordinary strides; a view whose strides interleave is
    checked element by element when small, and counts as overlapping when large."""
    dims = sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1)
    extent = a.itemsize        # bytes spanned by one element, then by the inner dims
    for st, n in dims:
        if st < extent:
            break
        extent = st * (n - 1) + extent
    else:
        return False
    if a.size > (1 << 20):
        return True
    offsets = np.zeros(1, np.int64)
    for st, n in zip(a.strides, a.shape):
        offsets = (offsets[:, None] + st * np.arange(n, dtype=np.int64)).ravel()
    offsets.sort()
    return bool(np.any(np.diff(offsets) < a.itemsize))


def writable_target(name, a, why=""):
    """Check an array fastbn writes into: writable, and no two elements in the same memory."""
    if not a.flags.writeable:
        raise ValueError(f"{name} must be writable{why}")
    if self_overlapping(a):
        raise ValueError(f"{name} must not have elements that share memory (a zero or "
                         f"overlapping stride){why}")


def _same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype)


def overlaps(a, b):
    """True when a and b share at least one byte (exact; hard cases count as overlap)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=1 << 20))
    except np.exceptions.TooHardError:
        return True


def out_array(out, shape, dtype, inputs, may_alias=(), name="out"):
    """Check a preallocated result array.

    `inputs` maps argument names to arrays that out must not overlap; those named in
    `may_alias` may be exactly out itself (in-place), but not partially overlap it.
    """
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    plain_array(name, out)
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        if out.dtype.newbyteorder("=") == dtype:
            raise ValueError(f"{name} must have dtype {np.dtype(dtype)} in native byte order, "
                             f"got the byte-swapped {out.dtype.str}")
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {out.dtype}")
    writable_target(name, out)
    for arg, a in inputs.items():
        if a is None or not isinstance(a, np.ndarray):
            continue
        if a is out and arg in may_alias:
            continue
        if not np.may_share_memory(out, a):      # the common case: a cheap bounds check
            continue
        if arg in may_alias and _same_view(out, a):
            continue
        if overlaps(out, a):
            if arg in may_alias:
                raise ValueError(f"{name} partially overlaps {arg}: it must be {arg} itself "
                                 f"(in place) or not share memory with it")
            raise ValueError(f"{name} must not share memory with {arg}")
    return out


def scalar_at_least(name, v, lo, *, hi=None):
    """A finite real number in [lo, hi] (hi=None: no upper bound)."""
    v = real_scalar(name, v)
    if not math.isfinite(v) or v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be a finite number {bound}, got {v!r}")
    return v


def clipping(rmin, rmax, dmax):
    """Batch Renormalization's clipping bounds (rmin, rmax, dmax): rmax >= 1, dmax >= 0 and
    rmin in (0, 1], None meaning 1 / rmax."""
    rmax = scalar_at_least("rmax", rmax, 1.0)
    dmax = scalar_at_least("dmax", dmax, 0.0)
    if rmin is None:
        rmin = 1.0 / rmax
    else:
        rmin = scalar_at_least("rmin", rmin, 0.0, hi=1.0)
        if rmin == 0.0:
            raise ValueError("rmin must be > 0 (r = 0 would cancel the normalized input), got 0.0")
    return rmin, rmax, dmax


def positive_vector(name, a, C):
    """A (C,) floating vector of finite values > 0, as a fresh float64 array."""
    v = channel_vector(name, a, C, optional=False)
    if not np.all(np.isfinite(v) & (v > 0)):
        raise ValueError(f"{name} must hold finite values > 0, got {v!r}")
    return v


# Layer (stateful) arguments: used by fastbn.caffe.

def float_dtype(name, dtype):
    """np.dtype(dtype), which must be float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dt not in DATA_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def positive_int(name, v):
    """An integer >= 1 (bool is not an integer here)."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        n = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def choice(name, v, options):
    """One of the strings in `options`."""
    if not isinstance(v, str) or v not in options:
        expected = " or ".join(repr(o) for o in options)
        raise ValueError(f"{name} must be {expected}, got {v!r}")
    return v


def optional_bool(name, v):
    """None, or a bool (NumPy bools included) returned as a Python bool."""
    if v is None:
        return None
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be None, True or False, got {type(v).__name__}")
    return bool(v)


def layer_blob(name, a, shape, dtype):
    """A layer's parameter array that kernels read and update in place: an ndarray of
    exactly `shape` and `dtype`, C-contiguous and writable."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    plain_array(name, a)
    if a.dtype != dtype:
        order = " in native byte order" if a.dtype.newbyteorder("=") == dtype else ""
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}{order}, got {a.dtype.str}"
                        if order else f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{name} must be a C-contiguous writable array")
    return a
