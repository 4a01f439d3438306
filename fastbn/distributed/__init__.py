"""Synchronized Batch Normalization across processes, over MPI (mpi4py).

Data-parallel training splits each batch over the processes of an MPI communicator. Here
the statistics are those of the whole batch, the union of every process's slice, exactly
as if one process held it all:

* forward: each process computes its slice's (count, mean, M2) per channel with fastbn's
  statistics kernel (in double); one all-gather gives every process every slice's triple,
  and every process merges them with Chan's formula in rank order. Every process thus
  computes the same mean and invstd to the bit, run after run, whatever MPI's reduction
  algorithm; then it normalizes its own slice.
* backward: each process computes its slice's sum(dy) and sum(dy * (x - mean)); one
  all-gather, a sum in rank order, and each process computes dx of its slice from the
  whole batch's sums. dweight and dbias are the process's share: summed over the
  processes (with the other parameter gradients) they are the whole batch's.

The same all-gather carries each process's arguments (channel count, dtype, layout, eps,
affine-ness, running statistics, momentum) and any error it raised while checking its own
arguments, so a mismatch or a bad argument on one process raises on every process instead
of leaving the others waiting. mpi4py is imported here only (``pip install "fastbn[mpi]"``).

Traffic per process and call: one all-gather of about 16 C + 300 bytes from each process
(two float64 vectors of C channels and a small header, pickled), so each process receives
K times that. It grows linearly with the number of processes K; for large K, synchronize
within groups (a communicator from ``comm.Split``), as the statistics of a group of 8-32
processes are as good as the whole batch's.
"""
import zlib

import numpy as np

from .. import _calls
from .._rounding import rounded
from .._validate import (channel_axis, channel_vector, eps_value, grad_dtype, momentum_value,
                        out_array, running_buffers, training_count, values_per_channel)
from ..layers import BatchNorm

__all__ = ["sync_batch_norm_train", "sync_batch_norm_backward", "SyncBatchNorm"]

NEEDS = ("fastbn.distributed needs mpi4py and an MPI library: "
         "pip install \"fastbn[mpi]\" (mpi4py and mpich)")


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(NEEDS) from exc
    return MPI


def _communicator(comm):
    """comm as an mpi4py intracommunicator, or TypeError."""
    MPI = _mpi()
    if isinstance(comm, MPI.Comm) and comm == MPI.COMM_NULL:
        raise TypeError("comm must be an mpi4py intracommunicator (MPI.COMM_WORLD, or one "
                        "from comm.Split), got MPI.COMM_NULL: a null communicator, or one "
                        "that was freed (comm.Free())")
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py intracommunicator (MPI.COMM_WORLD, or one "
                        f"from comm.Split), got {type(comm).__name__}")
    return comm


# --------------------------------------------------------------------------------------------
# one collective: every process's arguments, partial results and errors
# --------------------------------------------------------------------------------------------

class _Local:
    """What one process contributes to the collective: `meta`, the arguments that must
    agree across processes; `data`, its partial results; `error`, the exception (any
    Exception) it raised before the collective (then meta and data are not read). Every
    process joins the collective even when it failed: one that skipped it would pair its
    next call with the others' current one."""

    def __init__(self, error=None):
        self.meta = self.data = None
        self.error = error


def _fail_together(comm, error, what):
    """Join the collective the other processes are in with `error`: raise it here, and a
    ValueError naming this process on the others."""
    _exchange(comm, _Local(error), what)


def _wire(meta, data, error):
    """The one message format of the all-gather: a process's meta, data and error."""
    return (meta, data, error)


def forward_message(C, count, dtype, layout, *, eps=1e-5, weight=True, bias=True,
                    running=False, momentum=0.1):
    """The message a process sends in the all-gather of :func:`sync_batch_norm_train` for
    these arguments (statistics zero): its size is the communication of one call, which
    the benchmark times alone."""
    return _wire(_train_meta(C, dtype, layout, eps, weight, bias, running, momentum),
                 (count, np.zeros(C), np.zeros(C)), None)


def backward_message(C, count, dtype, layout, mean, invstd, *, weight=True):
    """The message a process sends in the all-gather of :func:`sync_batch_norm_backward`
    for these arguments (sums zero), as :func:`forward_message`."""
    return _wire(_backward_meta(C, dtype, layout, weight, _digest(mean, invstd)),
                 (count, np.zeros((2, C))), None)


def _message(exc):
    """str(exc), or a note when even that raises."""
    try:
        return str(exc)
    except Exception:
        return "(its message could not be read)"


def _exchange(comm, local, what):
    """All-gather (meta, data, error) of every process; raise on every process if any
    process failed or the metas differ. Returns the list of data, in rank order."""
    error = None if local.error is None else (type(local.error).__name__,
                                              _message(local.error))
    everyone = comm.allgather(_wire(local.meta, local.data, error))
    failed = [(r, e) for r, (_, _, e) in enumerate(everyone) if e is not None]
    if failed:
        if local.error is not None:
            raise local.error
        r, (kind, msg) = failed[0]
        raise ValueError(f"{what} failed on process {r} of {comm.Get_size()} "
                         f"({kind}: {msg}); no process changed anything")
    metas = [m for m, _, _ in everyone]
    for key in metas[0]:
        values = [m[key] for m in metas]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"{what}: {key} differs between processes: " +
                             ", ".join(f"process {r}: {v!r}" for r, v in enumerate(values)))
    return [d for _, d, _ in everyone]


def _train_meta(C, dtype, layout, eps, has_weight, has_bias, has_running, momentum):
    """The arguments of a synchronized training forward that must agree across processes."""
    return {"channel count": C, "dtype": np.dtype(dtype).name, "layout": layout, "eps": eps,
            "weight given": has_weight, "bias given": has_bias,
            "running statistics given": has_running, "momentum": momentum}


def _backward_meta(C, dtype, layout, has_weight, digest):
    """The arguments of a synchronized backward that must agree across processes."""
    return {"channel count": C, "dtype": np.dtype(dtype).name, "layout": layout,
            "weight given": has_weight, "mean and invstd": digest}


def _digest(*arrays):
    """A checksum of per-channel vectors, to check that processes pass the same ones."""
    crc = 0
    for a in arrays:
        if a is not None:
            crc = zlib.crc32(np.ascontiguousarray(a, dtype=np.float64).tobytes(), crc)
    return crc


def _chan_merge(parts):
    """(count, mean, M2) of the union of the (count, mean (C,), M2 (C,)) parts, merged in
    the order given (Chan, Golub and LeVeque), in float64. Never E[x^2] - E[x]^2."""
    n, mean, m2 = 0, None, None
    for nb, mb, m2b in parts:
        if nb == 0:
            continue
        if n == 0:
            n, mean, m2 = nb, mb.copy(), m2b.copy()
            continue
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta * delta * (n * nb / total)
        n = total
    return n, mean, m2


# --------------------------------------------------------------------------------------------
# the functional API
# --------------------------------------------------------------------------------------------

def sync_batch_norm_train(x, weight=None, bias=None, *, comm, eps=1e-5, layout="NCHW",
                          running_mean=None, running_var=None, momentum=0.1, out=None,
                          num_threads=None):
    """Batch Normalization training forward over the whole batch held by the processes of
    comm, each process passing its slice x.

    Every process of comm calls together. mean and invstd are those of the union of all
    slices (slices may differ in size, and may be empty), computed identically on every
    process; y is this process's slice of the whole-batch result; running_mean and
    running_var (pass the same values on every process) are updated identically with the
    whole batch's unbiased variance.

    Parameters
    ----------
    x : ndarray
        This process's slice: (n, C, ...) for ``layout="NCHW"`` or (n, ..., C) for
        ``"NHWC"``, n >= 0; float32, float64, float16 or bfloat16.
    weight, bias, eps, layout, running_mean, running_var, momentum, out, num_threads
        As :func:`fastbn.batch_norm_train`; every argument but x, out and num_threads must
        agree across the processes.
    comm : mpi4py.MPI.Intracomm
        The processes that share the batch: ``MPI.COMM_WORLD``, or a group of it from
        ``comm.Split``.

    Returns
    -------
    y : ndarray
        Shape and dtype of x.
    mean, invstd : ndarray (C,), float64
        Of the whole batch, the same bits on every process.

    Raises
    ------
    TypeError
        comm is not an mpi4py intracommunicator (raised by the processes that passed it).
    ValueError
        On every process, with nothing changed: the processes disagree on the channel
        count, dtype, layout, eps, weight and bias being given, running statistics being
        given, or momentum; the whole batch has at most one value per channel; or an
        argument is bad on some process (that process raises its own TypeError or
        ValueError, as :func:`fastbn.batch_norm_train` would).

    Examples
    --------
    Run under ``mpiexec -n 2 python -m mpi4py script.py``; each process holds half of the
    batch::

        from mpi4py import MPI
        x_local = x[MPI.COMM_WORLD.Get_rank()::2]
        y, mean, invstd = fastbn.distributed.sync_batch_norm_train(x_local, w, b,
                                                                   comm=MPI.COMM_WORLD)
    """
    comm = _communicator(comm)
    local = _Local()
    try:
        batch = _calls.Batch(x, layout)
        x, C = batch.x, batch.C
        w = channel_vector("weight", weight, C)
        b = channel_vector("bias", bias, C)
        eps = eps_value(eps)
        running_buffers(running_mean, running_var, C)
        momentum = momentum_value(momentum)
        out = out_array(out, x.shape, x.dtype, {"x": x, "weight": weight, "bias": bias,
                        "running_mean": running_mean, "running_var": running_var},
                        may_alias=("x",))
        mean_b, var_b = _calls.statistics(batch, num_threads=num_threads)
        local.meta = _train_meta(C, x.dtype, layout, eps, weight is not None,
                                 bias is not None, running_mean is not None, momentum)
        local.data = (batch.M, mean_b, var_b * batch.M)
    except Exception as exc:        # any error joins the collective: no process is left in it
        local.error = exc
    parts = _exchange(comm, local, "sync_batch_norm_train")
    n, mean, m2 = _chan_merge(parts)
    training_count("x", x.shape, batch.axis, n, over=f"all {comm.Get_size()} processes")
    var = m2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        invstd = 1.0 / np.sqrt(var + eps)
    y = _calls.infer(batch, mean, var, w, b, eps=eps, out=out, num_threads=num_threads)
    if running_mean is not None and C:
        _calls.update_running(momentum, (running_mean, mean), (running_var, m2 / (n - 1)))
    return y, mean, invstd


def sync_batch_norm_backward(dy, x, mean, invstd, weight=None, *, comm, layout="NCHW",
                             out=None, num_threads=None):
    """Backward of :func:`sync_batch_norm_train`: this process's dx, dweight and dbias.

    dx is the gradient of the sum of all processes' losses with respect to this process's
    x: ``dx = weight * invstd * (dy - sum(dy)/m - xhat * sum(dy * xhat)/m)`` with the sums
    and m over the whole batch. dweight and dbias are this process's share (its own slice's
    ``sum(dy * xhat)`` and ``sum(dy)``): summed over the processes they are the whole
    batch's gradient, so reduce them with the other parameter gradients.

    Parameters
    ----------
    dy, x : ndarray
        This process's slices (the shape and dtype of its forward's x).
    mean, invstd : array_like (C,)
        As :func:`sync_batch_norm_train` returned them (the same on every process).
    weight : array_like (C,), optional
    comm, layout, out, num_threads
        As :func:`sync_batch_norm_train`; out may be dy itself.

    Returns
    -------
    dx : ndarray
    dweight, dbias : ndarray (C,)
        This process's share, in x's dtype (float32 for 16-bit data).

    Raises
    ------
    TypeError, ValueError
        As :func:`sync_batch_norm_train`: disagreements (channel count, dtype, layout,
        weight given, mean and invstd) and bad arguments raise on every process.

    Examples
    --------
    After the forward of :func:`sync_batch_norm_train`, on every process::

        dx, dweight, dbias = fastbn.distributed.sync_batch_norm_backward(
            dy_local, x_local, mean, invstd, w, comm=MPI.COMM_WORLD)
        grads = np.concatenate([dweight, dbias])
        MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, grads)    # the whole batch's gradient
    """
    comm = _communicator(comm)
    local = _Local()
    try:
        g, _ = _calls.grad_call(dy, x, mean, invstd, weight, training=True, layout=layout,
                                out=out, num_threads=num_threads)
        C = g.C
        sums = _calls.backward_sums(g)
        local.meta = _backward_meta(C, g.x.dtype, layout, weight is not None,
                                    _digest(g.mean, g.invstd))
        local.data = (values_per_channel(g.x.shape, channel_axis(layout, g.x.ndim)), sums)
    except Exception as exc:        # any error joins the collective: no process is left in it
        local.error = exc
    parts = _exchange(comm, local, "sync_batch_norm_backward")
    m = sum(count for count, _ in parts)
    total = np.zeros((2, C))
    for _, part in parts:                    # in rank order: the same bits everywhere
        total += part
    dx = _calls.backward_dx(g, total, m)
    gdt = grad_dtype(g.x.dtype)
    with np.errstate(all="ignore"):
        dweight = sums[1] * g.invstd
    return dx, rounded(dweight, gdt), rounded(sums[0], gdt)


# --------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------

class SyncBatchNorm(BatchNorm):
    """:class:`fastbn.BatchNorm` whose training statistics are those of the whole batch
    over the processes of comm (:func:`sync_batch_norm_train`).

    The interface and the state_dict are BatchNorm's (and PyTorch's). In training mode every
    process of comm calls forward together, and backward together; the running statistics
    and num_batches_tracked stay identical on every process (start them equal: the same
    initialization, or the same loaded state). Evaluation mode communicates nothing: it
    normalizes with the running statistics, or, with ``track_running_stats=False``, with
    the statistics of this process's batch (as PyTorch's SyncBatchNorm). weight_grad and
    bias_grad accumulate this process's share: all-reduce them with the other parameter
    gradients.

    Parameters
    ----------
    num_features : int
    comm : mpi4py.MPI.Intracomm
        The processes that share each batch.
    eps, momentum, affine, track_running_stats, layout, dtype
        As :class:`fastbn.BatchNorm` (momentum None: the cumulative average).

    Raises
    ------
    TypeError
        comm is not an mpi4py intracommunicator; and as :class:`fastbn.BatchNorm`.

    Examples
    --------
    One training step on every process (a complete one: :doc:`/distributed`)::

        bn = fastbn.distributed.SyncBatchNorm(64, comm=MPI.COMM_WORLD)
        y = bn.forward(x_local)                 # whole-batch statistics
        dx = bn.backward(dy_local)
        grads = np.concatenate([bn.weight_grad, bn.bias_grad])
        MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, grads)
    """

    def __init__(self, num_features, *, comm, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, layout="NCHW", dtype=np.float32):
        self.comm = _communicator(comm)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, layout=layout, dtype=dtype)

    @property
    def activation(self):
        """Always None: the fused residual add and ReLU are not synchronized (apply the
        ReLU to the output)."""
        return None

    @activation.setter
    def activation(self, value):
        if value is not None:
            raise ValueError(f"SyncBatchNorm has no fused activation, got {value!r}: apply "
                             "the ReLU (and the residual add) to its output")

    def forward(self, x, residual=None):
        # in training the other processes wait in the collective: a bad input here must
        # raise there too (the checks are BatchNorm's, then again in forward: cheap)
        if self.training:
            try:
                self._check_input(x)
                if residual is not None:
                    raise ValueError("SyncBatchNorm takes no residual (it has no fused "
                                     "activation): add it to the output")
            except Exception as exc:
                _fail_together(self.comm, exc, "sync_batch_norm_train")
        return super().forward(x, residual)

    def backward(self, dy):
        if self.training and self._saved_get("backward") is None:
            _fail_together(self.comm, RuntimeError("backward called before forward (in "
                                                   "this thread)"), "sync_batch_norm_backward")
        return super().backward(dy)

    __call__ = forward

    def _forward_train(self, x, residual):
        if not self.training:        # evaluation without running statistics: no communication
            return super()._forward_train(x, residual)
        update = self.track_running_stats
        layout, comm = self.layout, self.comm
        y, mean, invstd = sync_batch_norm_train(
            x, self.weight, self.bias, comm=comm, eps=self.eps, layout=layout,
            running_mean=self.running_mean if update else None,
            running_var=self.running_var if update else None,
            momentum=self._factor() if update else 0.0)
        if update:
            self._count_step()
        weight = None if self.weight is None else self.weight.copy()

        def backward(dy):
            dx, dweight, dbias = sync_batch_norm_backward(dy, x, mean, invstd, weight,
                                                          comm=comm, layout=layout)
            return dx, dweight, dbias, None
        return y, backward

    def __reduce__(self):
        raise TypeError("a SyncBatchNorm holds an MPI communicator and does not pickle; "
                        "save its state_dict() instead")

