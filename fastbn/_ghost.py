"""Ghost Batch Normalization: the statistics of each consecutive group of `ghost_batch_size`
samples along N (the last group may be smaller), as if each group were a batch of its own.

Each group is one call of the usual fused kernels on the group's slice of the data (a
slice along N of a C-contiguous array is C-contiguous, so nothing is copied), writing into
its slice of one output with the stores that the whole output's size calls for (streaming
stores past the cache, as one call would use): the same passes over memory as one call on
the whole batch, and results equal to the bit to separate calls on the slices. The running
statistics are updated once per group, in order; the backward adds the groups' dweight and
dbias in float64, in group order, and rounds once.
"""
import numpy as np

from . import _calls, _memory
from ._rounding import rounded
from ._validate import (channel_axis, channel_vector, data_array, flag, grad_dtype, gradient_pair,
                        like_x, out_array, positive_int, values_per_channel)


def groups(N, size):
    """The (start, stop) of each ghost batch of N samples."""
    return [(g, min(g + size, N)) for g in range(0, N, size)]


def _plan(x, layout, ghost_batch_size, name="x"):
    """(ghost batch size, C, the groups) of a training batch x, each group with more than
    one value per channel, else ValueError."""
    size = positive_int("ghost_batch_size", ghost_batch_size)
    axis = channel_axis(layout, x.ndim)
    C = x.shape[axis]
    N = x.shape[0]
    per_sample = values_per_channel(x.shape[1:], axis - 1)
    parts = groups(N, size)
    smallest = min((b - a for a, b in parts), default=0)
    if smallest * per_sample <= 1:
        raise ValueError(
            f"each ghost batch of {name} must have more than 1 value per channel in training: "
            f"{name} has shape {x.shape} and ghost_batch_size={size}, so a group of "
            f"{smallest} sample(s) has {smallest * per_sample} value(s) per channel")
    return size, C, parts


def written_bytes(result):
    """The bytes that decide each group's stores: the whole result's, where that changes
    the decision (small calls keep their lean path)."""
    return result.nbytes if result.nbytes > _memory.STREAM_ABOVE else None


def _output(x, out):
    if out is not None:
        return out
    if x.flags.c_contiguous:
        return _memory.new_array(x.shape, x.dtype, beside=x)[0]
    return np.empty_like(x)          # x's memory order, as the kernels' results keep it


def train(x, weight, bias, *, eps, layout, running_mean=None, running_var=None, momentum=0.1,
          out=None, num_threads=None, ghost_batch_size, residual=None, relu=False,
          negative_slope=0.0):
    """fastbn.batch_norm_train with ghost_batch_size: (y, mean (G, C), invstd (G, C))."""
    x = data_array("x", x)
    size, C, parts = _plan(x, layout, ghost_batch_size)
    if residual is not None:
        residual = like_x("residual", residual, x)
    out = out_array(out, x.shape, x.dtype,
                    {"x": x, "weight": weight, "bias": bias, "residual": residual,
                     "running_mean": running_mean, "running_var": running_var},
                    may_alias=("x", "residual"))
    y = _output(x, out)
    mean = np.empty((len(parts), C))
    invstd = np.empty((len(parts), C))
    # the first group's call checks every other argument before anything is written;
    # the later groups' arguments are the same, on other slices
    for k, (a, b) in enumerate(parts):
        _, mean[k], invstd[k] = _calls.batch_norm_train(
            x[a:b], weight, bias, eps=eps, layout=layout, running_mean=running_mean,
            running_var=running_var, momentum=momentum, out=y[a:b], num_threads=num_threads,
            residual=None if residual is None else residual[a:b], relu=relu,
            written=written_bytes(y), negative_slope=negative_slope)
    return y, mean, invstd


def statistics_rows(name, v, G, C, size):
    """A (G, C) array of per-group statistics as float64, else a clear error."""
    if v is None:
        raise TypeError(f"{name} must be an array of shape ({G}, {C}), got None")
    a = np.asarray(v)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if a.shape != (G, C):
        raise ValueError(f"{name} must have shape ({G}, {C}) with ghost_batch_size={size} "
                         f"(one row per ghost batch, as batch_norm_train returns it), got "
                         f"{a.shape}")
    return np.require(a, np.float64, ("C", "A"))


def backward(dy, x, mean, invstd, weight, *, training, layout, out=None, num_threads=None,
             ghost_batch_size, y=None, dresidual=None, negative_slope=0.0):
    """fastbn.batch_norm_backward with ghost_batch_size: mean and invstd are (G, C), one row
    per ghost batch; (dx, dweight, dbias)."""
    dy, x = gradient_pair(dy, x)
    size = positive_int("ghost_batch_size", ghost_batch_size)
    training = flag("training", training)
    axis = channel_axis(layout, x.ndim)
    C = x.shape[axis]
    parts = groups(x.shape[0], size)
    mean_g = statistics_rows("mean", mean, len(parts), C, size)
    invstd_g = statistics_rows("invstd", invstd, len(parts), C, size)
    channel_vector("weight", weight, C)
    if y is not None:
        y = like_x("y", y, x)
    inputs = {"dy": dy, "x": x, "mean": mean, "invstd": invstd, "weight": weight, "y": y}
    out = out_array(out, x.shape, x.dtype, inputs, may_alias=("dy",))
    if dresidual is not None:
        dresidual = out_array(dresidual, x.shape, x.dtype, dict(inputs, out=out),
                              name="dresidual")
    dx = _output(x, out)
    dweight = np.zeros(C)
    dbias = np.zeros(C)
    with np.errstate(over="ignore", invalid="ignore"):
        for k, (a, b) in enumerate(parts):
            _, dw, db = _calls.backward(
                dy[a:b], x[a:b], mean_g[k], invstd_g[k], weight, training=training,
                layout=layout, out=dx[a:b], num_threads=num_threads,
                y=None if y is None else y[a:b],
                dresidual=None if dresidual is None else dresidual[a:b], float64_grads=True,
                written=written_bytes(dx), negative_slope=negative_slope)
            dweight += dw
            dbias += db
    gdt = grad_dtype(x.dtype)
    return dx, rounded(dweight, gdt), rounded(dbias, gdt)
