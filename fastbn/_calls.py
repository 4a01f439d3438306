"""The seam between fastbn's APIs and its kernels: validated call requests.

Every public call (functional, the fused ReLU, Batch Renormalization, the layers, ONNX,
the synchronized calls) goes through the functions here, with keyword arguments: each
validates what it is given, once, picks the canonical view of the data and runs the kernel.
No other module calls the kernels' training, inference or backward entry points.

The kernels work on C-contiguous canonical views:

* planar (N, C, S): NCHW memory, each (n, c) plane contiguous;
* rows (R, C): channels-last memory, one value per channel in each row.

An input whose memory already has one of these orders is used as it is, whatever its
`layout` (an NCHW-shaped array with channels-last strides goes to the rows kernel, with no
copy, and its result gets the same strides); any other input is copied once into its
layout's natural order.
"""
from collections import namedtuple

import numpy as np

from . import _dispatch, _memory, _support, _threads
from ._threads import effective_threads
from ._rounding import rounded, store_rounded
from ._validate import (channel_axis, channel_vector, clipping, data_array, eps_value, flag,
                        grad_dtype, gradient_pair, like_x, momentum_value, out_array,
                        positive_vector, running_buffers, training_count, values_per_channel)

# the canonical views, as the kernels name them
PLANAR, ROWS = int(_dispatch.kernels.View.PLANAR), int(_dispatch.kernels.View.ROWS)

# view: PLANAR or ROWS; perm: x.transpose(perm) is the C-contiguous canonical order (None when
# that is x's own order); inv: the inverse permutation; N, C, S: planar dims (for ROWS, N is
# the row count and S is 1).
Plan = namedtuple("Plan", "view perm inv N C S")

_plans = {}            # (shape, strides, itemsize, layout) -> (Plan, whether x itself fits it)


def _candidates(ndim, axis, layout):
    others = [i for i in range(ndim) if i != axis]
    rows = (ROWS, tuple(others + [axis]))
    planar = (PLANAR, tuple([others[0], axis] + others[1:]))
    planar_one = (PLANAR, tuple([axis] + others))      # channel-major memory, N = 1
    if layout == "NHWC":
        return [rows, planar, planar_one]
    return [planar, rows, planar_one]


def _make_plan(shape, axis, view, perm):
    C = shape[axis]
    size = 1
    for s in shape:
        size *= s
    inv = tuple(int(i) for i in np.argsort(perm))
    if perm == tuple(range(len(shape))):
        perm = inv = None
    if view == ROWS or C == 0:
        return Plan(ROWS, perm, inv, size // C if C else 0, C, 1)
    first = perm[0] if perm is not None else 0
    N = shape[first] if first != axis else 1
    S = size // (N * C) if N * C else 0
    if S == 1:
        # (N, C, 1) planes are (N, C) rows: the rows kernel handles them far better
        return Plan(ROWS, perm, inv, N, C, 1)
    return Plan(PLANAR, perm, inv, N, C, S)


def plan(x, axis, layout):
    """Pick the canonical view of x: (plan, C-contiguous data), copying only if needed."""
    key = (x.shape, x.strides, x.itemsize, layout)
    hit = _plans.get(key)
    if hit is None:
        cands = _candidates(x.ndim, axis, layout)
        for view, perm in cands:
            if x.transpose(perm).flags.c_contiguous:
                hit = (_make_plan(x.shape, axis, view, perm), True)
                break
        else:
            hit = (_make_plan(x.shape, axis, *cands[0]), False)
        if len(_plans) > 512:
            _plans.clear()
        _plans[key] = hit
    view_plan, fits = hit
    xt = x if view_plan.perm is None else x.transpose(view_plan.perm)
    return view_plan, (xt if fits and x.flags.aligned else c_copy(xt))


def like(a, plan):
    """a (same shape as x) in the plan's C-contiguous order: no copy when its memory fits."""
    at = a if plan.perm is None else a.transpose(plan.perm)
    return at if at.flags.c_contiguous and at.flags.aligned else c_copy(at)


def c_copy(a):
    """A C-contiguous copy of a (a large one in memory from the output cache: such copies
    are dropped at the end of the call, and the next call reuses their memory)."""
    c, _ = _memory.new_array(a.shape, a.dtype)
    np.copyto(c, a, casting="no")
    return c


def result(plan, shape, dtype, out, beside, written=None):
    """(array to return, C-contiguous array the kernel writes into, written directly?,
    streaming stores? (_memory.stream_output)). A fresh array comes from
    _memory.new_array (the output cache, for large ones), placed beside the kernel's
    input `beside`. written: the bytes the caller writes in all when `out` is one part of a
    larger output it fills part by part (the ghost batches), which decide the stores."""
    if out is not None:
        ot = out if plan.perm is None else out.transpose(plan.perm)
        if ot.flags.c_contiguous and ot.flags.aligned:
            return out, ot, True, _memory.stream_output(written or out.nbytes, True)
        flat, mapped = _memory.new_array(ot.shape, dtype, beside)
        return out, flat, False, mapped and _memory.stream_output(flat.nbytes, True)
    if plan.perm is None:
        y, mapped = _memory.new_array(shape, dtype, beside)
        return y, y, True, mapped and _memory.stream_output(y.nbytes, True)
    yt, mapped = _memory.new_array(tuple(shape[i] for i in plan.perm), dtype, beside)
    return yt.transpose(plan.inv), yt, True, mapped and _memory.stream_output(yt.nbytes, True)


def finish(target, flat, direct, plan):
    """Copy the kernel's output into `target` (result's first value) when it could not be
    written directly; returns target."""
    if not direct:
        rt = target if plan.perm is None else target.transpose(plan.perm)
        rt[...] = flat
    return target


class ReluMask:
    """The fused ReLU's mask as a training forward keeps it for its own backward (the
    layers' activation="relu"): y > 0 as bits (1 bit per value, uint8), laid out for the
    kernels' canonical view of that forward's x (key: view, N, C, S, dtype), so that the
    backward reads neither y nor a byte per value. bits stays None where the kernels keep
    none for the data (see kept_bits_size): the caller keeps y then."""

    __slots__ = ("bits", "key")

    def __init__(self):
        self.bits = None
        self.key = None


def _keep_mask(mask, view_plan, dtype):
    """The bits array a training forward fills for `mask` (a ReluMask), or None."""
    if mask is None or dtype != np.float32:
        return None
    vp = view_plan
    size = _dispatch.kernels.kept_bits_size(vp.view, vp.N, vp.C, vp.S, dtype.itemsize)
    if not size:
        return None
    mask.bits = _memory.new_array((size,), np.dtype(np.uint8))[0]    # reused, not faulted in
    mask.key = (vp.view, vp.N, vp.C, vp.S, dtype)
    return mask.bits


class Batch:
    """A data array validated once, with its channel axis, channel count and values per
    channel; its canonical view is made on first use (view()), after every other argument
    is checked, since it may copy the data: what every forward takes."""

    __slots__ = ("x", "layout", "axis", "C", "M", "_view")

    def __init__(self, x, layout, name="x"):
        self.x = x = data_array(name, x)
        self.layout = layout
        self.axis = axis = channel_axis(layout, x.ndim)
        self.C = C = x.shape[axis]
        self.M = x.size // C if C else values_per_channel(x.shape, axis)
        self._view = None

    def view(self):
        """(Plan, the data in the plan's C-contiguous order), made once."""
        if self._view is None:
            self._view = plan(self.x, self.axis, self.layout)
        return self._view


def train(batch, weight, bias, *, eps, out=None, num_threads=None, renorm=None,
          extra_inputs=None, residual=None, relu=False, name="x", mask=None, written=None,
          negative_slope=0.0):
    """Training forward of a Batch (Batch Normalization, and Renormalization with
    `renorm`, with the fused residual add and ReLU when asked): validates weight, bias,
    eps, out and the residual (the caller validates its own extra arguments, naming them in
    extra_inputs for the overlap checks of out=), runs the fused statistics +
    normalization kernel and returns (y, mean, var, invstd, M), var biased and M the
    values per channel. renorm: None, or (running_mean, running_std (float64), r_out,
    d_out, rmin, rmax, dmax) for the kernel. mask (a ReluMask, with relu): receives the
    ReLU's mask bits where the kernels keep them."""
    x, C = batch.x, batch.C
    if residual is not None:
        residual = like_x("residual", residual, x)
    eps = eps_value(eps)
    if _support.params_ok(C, 0, weight, bias):
        w, b = weight, bias
    else:
        w = channel_vector("weight", weight, C)
        b = channel_vector("bias", bias, C)
    if out is not None:
        inputs = {name: x, "weight": weight, "bias": bias, "residual": residual}
        inputs.update(extra_inputs or {})
        out = out_array(out, x.shape, x.dtype, inputs, may_alias=(name, "residual"))
    if batch.M <= 1:
        training_count(name, x.shape, batch.axis, batch.M)      # raises
    view_plan, xc = batch.view()
    nthreads = effective_threads(num_threads, x.size, view_plan.view == PLANAR)
    y, yc, direct, stream = result(view_plan, x.shape, x.dtype, out, xc, written)
    stats = np.empty((5, C))
    if C:
        # the kept mask bits are the ReLU's (the loops that read them are the ReLU's): the
        # layer of a leaky ReLU keeps y
        bits = _keep_mask(mask, view_plan, x.dtype) if relu and not negative_slope else None
        _dispatch.kernels.train_forward(
            xc, yc, view_plan.view, view_plan.N, C, view_plan.S, w, b, eps, stats, renorm,
            nthreads, stream,
            None if residual is None else like(residual, view_plan), relu,
            **({} if bits is None else {"bits": bits}),
            **({"negative_slope": negative_slope} if negative_slope else {}))
    return finish(y, yc, direct, view_plan), stats[0], stats[1], stats[2], batch.M


def statistics(batch, *, num_threads=None):
    """(mean, biased var) of a Batch's channels, the statistics pass alone (zeros for no
    data)."""
    view_plan, xc = batch.view()
    nthreads = effective_threads(num_threads, batch.x.size, view_plan.view == PLANAR)
    stats = np.zeros((5, batch.C))
    if batch.x.size:
        _dispatch.kernels.train_statistics(xc, view_plan.view, view_plan.N, batch.C,
                                           view_plan.S, stats, nthreads)
    return stats[0], stats[1]


def update_running(momentum, *pairs, toward=False):
    """running <- (1 - momentum) * running + momentum * batch for each (running, batch)
    pair (toward: running + momentum * (batch - running), Batch Renormalization's form;
    the same value up to rounding), in float64, rounded once to each buffer's dtype, in
    place: every buffer or none, and silently whatever np.errstate says (rounding
    overflows to inf, as defined). The NumPy twin of _support.update_running and
    _support.renorm_update, for the buffers those do not take."""
    def average(running, batch):
        old = running.astype(np.float64)
        if toward:
            return old + momentum * (batch - old)
        return momentum * batch + (1.0 - momentum) * old
    with np.errstate(all="ignore"):
        store_rounded(*[(running, average(running, batch)) for running, batch in pairs])


def batch_norm_train(x, weight, bias, *, eps, layout, running_mean=None, running_var=None,
                     momentum=0.1, out=None, num_threads=None, residual=None, relu=False,
                     mask=None, written=None, negative_slope=0.0):
    """fastbn.batch_norm_train (and, with relu, batch_norm_relu_train, leaky with a
    negative_slope > 0, checked by the caller); mask: see train; written: see result."""
    if residual is None and mask is None and written is None and not negative_slope:
        lean = _dispatch.kernels.lean_train(
            x, weight, bias, eps, layout, running_mean, running_var, momentum, out,
            num_threads, relu, _threads.POLICY, _memory.STREAM_ABOVE)
        if lean is not None:
            return lean
    batch = Batch(x, layout)
    C = batch.C
    if running_mean is None or not _support.running_pair_ok(running_mean, running_var, C):
        running_buffers(running_mean, running_var, C)
    momentum = momentum_value(momentum)
    y, mean, var, invstd, M = train(
        batch, weight, bias, eps=eps, out=out, num_threads=num_threads,
        extra_inputs={"running_mean": running_mean, "running_var": running_var},
        residual=residual, relu=relu, mask=mask, written=written,
        negative_slope=negative_slope)
    # mean and var are rows 0 and 1 of the kernel's (5, C) statistics array, mean.base;
    # the kernel updates contiguous float buffers in one loop, NumPy any other
    if running_mean is not None and C and not _support.update_running(
            running_mean, running_var, mean.base, momentum, M / (M - 1.0)):
        update_running(momentum, (running_mean, mean), (running_var, var * (M / (M - 1.0))))
    return y, mean, invstd


def batch_norm_infer(x, layout, running_mean, running_var, weight, bias, *, eps, out=None,
                     num_threads=None, residual=None, relu=False, negative_slope=0.0):
    """fastbn.batch_norm_infer (and, with relu, batch_norm_relu_infer, leaky with a
    negative_slope > 0): a small call in one C call when it can be (the kernels'
    lean_infer, fastbn/kernels/lean.pxi), else infer on a Batch of x."""
    if residual is None and not negative_slope:
        lean = _dispatch.kernels.lean_infer(
            x, running_mean, running_var, weight, bias, eps, layout, out, num_threads, relu,
            _threads.POLICY, _memory.STREAM_ABOVE)
        if lean is not None:
            return lean
    return infer(Batch(x, layout), running_mean, running_var, weight, bias, eps=eps, out=out,
                 num_threads=num_threads, residual=residual, relu=relu,
                 negative_slope=negative_slope)


def infer(batch, running_mean, running_var, weight, bias, *, eps, out=None,
          num_threads=None, divisor_is_std=False, residual=None, relu=False,
          negative_slope=0.0):
    """Inference forward of a Batch: y = (x - running_mean) / sqrt(running_var + eps) *
    weight + bias; with divisor_is_std, running_var is a standard deviation and
    y = (x - running_mean) * weight / running_var + bias (Batch Renormalization's eval);
    residual and relu: the fused epilogue y = max(y + residual, 0) (negative_slope > 0: the
    leaky ReLU's)."""
    x, C = batch.x, batch.C
    if residual is not None:
        residual = like_x("residual", residual, x)
    if _support.params_ok(C, 2, running_mean, running_var, weight, bias):
        rm, rv, w, b = running_mean, running_var, weight, bias
    else:
        rm = channel_vector("running_mean", running_mean, C, optional=False)
        rv = channel_vector("running_var", running_var, C, optional=False)
        w = channel_vector("weight", weight, C)
        b = channel_vector("bias", bias, C)
    eps = eps_value(eps)
    if out is not None:
        out = out_array(out, x.shape, x.dtype,
                        {"x": x, "running_mean": running_mean, "running_var": running_var,
                         "weight": weight, "bias": bias, "residual": residual},
                        may_alias=("x", "residual"))
    view_plan, xc = batch.view()
    nthreads = effective_threads(num_threads, x.size, view_plan.view == PLANAR)
    y, yc, direct, stream = result(view_plan, x.shape, x.dtype, out, xc)
    if x.size:
        _dispatch.kernels.infer_forward(
            xc, yc, view_plan.view, view_plan.N, C, view_plan.S, rm, rv, w, b, eps, nthreads,
            divisor_is_std, stream,
            None if residual is None else like(residual, view_plan), relu,
            **({"negative_slope": negative_slope} if negative_slope else {}))
    return finish(y, yc, direct, view_plan)


# A backward call's validated arguments and canonical views (what the kernels take)
GradCall = namedtuple("GradCall", "dy x C mean w invstd training out inputs plan xc gc "
                                  "nthreads")


def grad_call(dy, x, mean, invstd, weight, *, training, layout, out=None, num_threads=None,
              y=None):
    """Validate the arguments of a backward (y: the fused ReLU's output, laid out as x, or
    None) and put dy and x in their canonical view; returns (GradCall, y)."""
    dy, x = gradient_pair(dy, x)
    axis = channel_axis(layout, x.ndim)
    C = x.shape[axis]
    if y is not None:
        y = like_x("y", y, x)
    if _support.params_ok(C, 2, mean, invstd, weight):
        mean_k, invstd_k, w = mean, invstd, weight
    else:
        mean_k = channel_vector("mean", mean, C, optional=False)
        invstd_k = channel_vector("invstd", invstd, C, optional=False)
        w = channel_vector("weight", weight, C)
    training = flag("training", training)
    inputs = {"dy": dy, "x": x, "mean": mean, "invstd": invstd, "weight": weight, "y": y}
    if out is not None:
        out = out_array(out, x.shape, x.dtype, inputs, may_alias=("dy",))
    view_plan, xc = plan(x, axis, layout)
    nthreads = effective_threads(num_threads, x.size, view_plan.view == PLANAR)
    return GradCall(dy, x, C, mean_k, w, invstd_k, training, out, inputs, view_plan, xc,
                    like(dy, view_plan), nthreads), y


def backward(dy, x, mean, invstd, weight, *, training, layout, out=None, num_threads=None,
             y=None, dresidual=None, float64_grads=False, mask=None, written=None,
             negative_slope=0.0, from_output=False):
    """fastbn.batch_norm_backward; with y (the fused ReLU's forward output), dy counts
    where y > 0 only (negative_slope > 0: the leaky ReLU's, dy * negative_slope where
    y <= 0), and dresidual receives that masked dy. mask (instead of y): the ReluMask the
    training forward of this x filled; the same results. float64_grads: dweight and dbias
    are returned unrounded, in float64 (for callers that combine them further).
    from_output (with negative_slope > 0): x is the leaky ReLU's output, and y is x; the
    kernels read x as the pre-activation (see backward_from_output)."""
    if dresidual is None and mask is None and not float64_grads and not negative_slope:
        lean = _dispatch.kernels.lean_backward(
            dy, x, mean, invstd, weight, training, layout, out, num_threads, y,
            _threads.POLICY, _memory.STREAM_ABOVE)
        if lean is not None:
            return lean
    g, y = grad_call(dy, x, mean, invstd, weight, training=training, layout=layout, out=out,
                     num_threads=num_threads, y=y)
    x, C, vp = g.x, g.C, g.plan
    if mask is not None and mask.key != (vp.view, vp.N, vp.C, vp.S, x.dtype):
        raise ValueError("the ReLU mask belongs to another forward (its data's layout or "
                         "dtype differs)")
    if dresidual is not None:
        dresidual = out_array(dresidual, x.shape, x.dtype, dict(g.inputs, out=g.out),
                              name="dresidual")
    dx, dxc, direct, stream = result(vp, x.shape, x.dtype, g.out, g.xc, written)
    if dresidual is not None:
        dres, dresc, dres_direct, _ = result(vp, x.shape, x.dtype, dresidual, g.xc)
    gdt = np.float64 if float64_grads else grad_dtype(x.dtype)
    grads = np.empty((2, C), gdt) if x.size else np.zeros((2, C), gdt)
    if x.size:
        # from_output: the mask is x itself (the same canonical array, the kernels check)
        ymask = g.xc if from_output else None if y is None else like(y, vp)
        _dispatch.kernels.backward(
            g.gc, g.xc, dxc, vp.view, vp.N, C, vp.S, g.mean, g.invstd, g.w, g.training, grads,
            g.nthreads, stream, ymask, None if dresidual is None else dresc,
            **({} if mask is None else {"kept_bits": mask.bits}),
            **({"negative_slope": negative_slope, "from_output": from_output}
               if negative_slope else {}))
    if dresidual is not None:
        finish(dres, dresc, dres_direct, vp)
    return finish(dx, dxc, direct, vp), grads[0], grads[1]


def backward_from_output(dy, y, invstd, weight, bias, *, layout, out, num_threads,
                         float64_grads=False, written=None, negative_slope=None):
    """batch_norm_backward_from_output on checked arguments (invstd, weight and bias float64
    vectors, bias possibly None, no zero weight, negative_slope None or > 0) as the backward
    from x's kernels run it."""
    # The backward from x with x := y, mean := bias, invstd := 1 / weight reads
    # xhat = (y - bias) / weight and gives dweight = sum(dy * xhat), dbias = sum(dy);
    # its dx, (weight' * invstd') * (dy - mean(dy) - xhat * mean(dy * xhat)), is the true
    # one when weight' * invstd' = weight * invstd, i.e. weight' = weight**2 * invstd.
    # Behind a leaky ReLU (negative_slope), y is the activation's output: the kernels mask
    # dy by y > 0 (dy * slope elsewhere, the activation's backward) and read x as its
    # pre-activation, y where y > 0, else y / slope, in the same passes.
    C = invstd.shape[0]
    leaky = {} if negative_slope is None else dict(y=y, negative_slope=negative_slope,
                                                    from_output=True)
    with np.errstate(all="ignore"):     # an infinite or NaN weight gives NaN, silently
        return backward(dy, y, np.zeros(C) if bias is None else bias, 1.0 / weight,
                        weight * weight * invstd, training=True, layout=layout, out=out,
                        num_threads=num_threads, float64_grads=float64_grads,
                        written=written, **leaky)


def backward_sums(g):
    """The backward's two sums of a GradCall's data, float64 (2, C): sum(dy) and
    sum(dy * (x - mean)) (zeros for no data)."""
    sums = np.zeros((2, g.C))
    if g.x.size:
        _dispatch.kernels.backward_sums(g.gc, g.xc, g.plan.view, g.plan.N, g.C, g.plan.S,
                                        g.mean, g.invstd, sums, g.nthreads)
    return sums


def backward_dx(g, sums, count):
    """dx of a GradCall's data from given sums (over `count` values per channel), into
    its out= or a new array."""
    x, vp = g.x, g.plan
    dx, dxc, direct, stream = result(vp, x.shape, x.dtype, g.out, g.xc)
    if x.size:
        _dispatch.kernels.backward_dx(g.gc, g.xc, dxc, vp.view, vp.N, g.C, vp.S, g.mean,
                                      g.invstd, g.w, sums, count, g.nthreads, stream)
    return finish(dx, dxc, direct, vp)


def renorm_train(x, weight, bias, running_mean, running_std, *, rmin, rmax, dmax, momentum,
                 eps, layout, out=None, num_threads=None, residual=None, relu=False,
                 mask=None, negative_slope=0.0):
    """fastbn.batch_renorm_train with an explicit lower clip for r (None means 1 / rmax),
    and the fused residual add and ReLU of fastbn.BatchRenorm(activation="relu") (mask:
    see train)."""
    batch = Batch(x, layout)
    C = batch.C
    for name, buf in (("running_mean", running_mean), ("running_std", running_std)):
        if buf is None:
            raise ValueError(f"{name} is required (a writable float array of shape ({C},))")
    # the common case, checked at C speed: contiguous float buffers, disjoint, running_std
    # finite and > 0; the kernel reads them before they are updated, in C, after it
    fast = (_support.running_pair_ok(running_mean, running_std, C)
            and _support.finite_positive(running_std, C))
    if fast:
        mu, sigma = running_mean, running_std
    else:
        running_buffers(running_mean, running_std, C, names=("running_mean", "running_std"))
        mu = channel_vector("running_mean", running_mean, C, optional=False)
        sigma = positive_vector("running_std", running_std, C)
    rmin, rmax, dmax = clipping(rmin, rmax, dmax)
    momentum = momentum_value(momentum)
    r = np.empty(C)
    d = np.empty(C)
    y, mean, var, invstd, M = train(
        batch, weight, bias, eps=eps, out=out, num_threads=num_threads,
        renorm=(mu, sigma, r, d, rmin, rmax, dmax),
        extra_inputs={"running_mean": running_mean, "running_std": running_std},
        residual=residual, relu=relu, mask=mask, negative_slope=negative_slope)
    if fast and C:
        std = np.empty(C)
        _support.renorm_update(running_mean, running_std, mean.base, momentum, float(eps), std)
    else:
        std = np.sqrt(var + float(eps))
        update_running(momentum, (running_mean, mean), (running_std, std), toward=True)
    return y, mean, std, r, d


def renorm_backward(dy, x, mean, std, r, d, weight, *, layout, out=None, num_threads=None,
                    y=None, dresidual=None, mask=None, negative_slope=0.0):
    """fastbn.batch_renorm_backward; with y (the fused ReLU's forward output), dy counts
    where y > 0 only, and dresidual receives that masked dy (mask: see backward)."""
    dy, x = gradient_pair(dy, x)
    axis = channel_axis(layout, x.ndim)
    C = x.shape[axis]
    channel_vector("mean", mean, C, optional=False)
    std64 = positive_vector("std", std, C)
    r64 = channel_vector("r", r, C, optional=False)
    d64 = channel_vector("d", d, C, optional=False)
    w = channel_vector("weight", weight, C)
    w = np.ones(C) if w is None else w
    out_array(out, x.shape, x.dtype,
              {"dy": dy, "x": x, "mean": mean, "std": std, "r": r, "d": d, "weight": weight},
              may_alias=("dy",))
    with np.errstate(all="ignore"):     # a subnormal std gives inf, as the kernels do
        invstd, wr = 1.0 / std64, w * r64
    dx, dw_bn, dbias = backward(dy, x, mean, invstd, wr, training=True, layout=layout, out=out,
                                num_threads=num_threads, y=y, dresidual=dresidual,
                                float64_grads=True, mask=mask, negative_slope=negative_slope)
    # dw_bn = sum(dy * xhat0), dbias = sum(dy), both unrounded: r and d are constants, so
    # sum(dy * (r * xhat0 + d)) = r * dw_bn + d * dbias, combined in double and rounded
    # once (the two terms may cancel: rounding them first would leave only the error)
    with np.errstate(all="ignore"):
        dweight = r64 * dw_bn + d64 * dbias
    gdt = grad_dtype(x.dtype)
    return dx, rounded(dweight, gdt), rounded(dbias, gdt)
