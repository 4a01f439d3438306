"""Checks of fastbn.distributed, run by tests/test_distributed.py under
``mpiexec -n K python -m mpi4py tests/mpi/sync_checks.py MODE``.

Every process builds the same whole batch (same seed), takes its slice of it, and compares
the synchronized results with single-process fastbn on the whole batch. Each process
collects its failures; at the end rank 0 prints them all and every process exits 1 if
any process failed (a mismatch never leaves a process waiting in a collective).
"""
import sys
import traceback

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import distributed

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
FAILURES = []
CHECKS = [0]


def check(cond, what):
    CHECKS[0] += 1
    if not cond:
        FAILURES.append(f"process {RANK}/{SIZE}: {what}")


def run_case(name, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception:
        FAILURES.append(f"process {RANK}/{SIZE}: {name} raised:\n{traceback.format_exc()}")


def finish(mode):
    everyone = WORLD.allgather(FAILURES)
    failed = [f for fs in everyone for f in fs]
    checks = sum(WORLD.allgather(CHECKS[0]))
    if RANK == 0:
        for f in failed:
            print("FAIL", f)
        print(f"{mode}: {SIZE} processes, {checks} checks, {len(failed)} failures", flush=True)
    sys.exit(1 if failed else 0)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def tol(dtype):
    if np.dtype(dtype) == np.float64:
        return dict(rtol=1e-10, atol=1e-10)
    if np.dtype(dtype).itemsize == 2:       # one ulp of the half type, both faithful
        return dict(rtol=2.0 ** -7 if np.dtype(dtype).name == "bfloat16" else 2.0 ** -10,
                    atol=2.0 ** -7 if np.dtype(dtype).name == "bfloat16" else 2.0 ** -10)
    return dict(rtol=2e-5, atol=2e-5)


def close(got, want, t):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return got.shape == want.shape and bool(np.all(np.abs(got - want) <=
                                                   t["atol"] + t["rtol"] * np.abs(want)))


def to_layout(a, layout):
    return np.moveaxis(a, 1, -1).copy() if layout == "NHWC" and a.ndim > 2 else a


def whole_batch(shape, layout, dtype, seed=0, offset=3.0):
    """x, dy of the whole batch (shape given NCHW), weight, bias (float32 for half data)."""
    rng = np.random.default_rng(seed)
    x = to_layout(rng.standard_normal(shape) * 2 + offset, layout).astype(dtype)
    dy = to_layout(rng.standard_normal(shape), layout).astype(dtype)
    C = shape[1]
    pdt = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    w = rng.uniform(0.5, 1.5, C).astype(pdt)
    b = rng.uniform(-1, 1, C).astype(pdt)
    return x, dy, w, b


def sizes_for(K, N_hint):
    """Per-process batch sizes: uneven, the last process empty when K > 1."""
    if K == 1:
        return [N_hint]
    return [(2, 1, 3)[r % 3] for r in range(K - 1)] + [0]


def my_slice(a, sizes, rank, order="C"):
    start = sum(sizes[:rank])
    part = a[start:start + sizes[rank]]
    if order == "F":
        return np.asfortranarray(part)
    if order == "strided":                 # a view with gaps between its rows
        big = np.zeros((part.shape[0] * 2,) + part.shape[1:], part.dtype)
        big[::2] = part
        return big[::2]
    return np.ascontiguousarray(part)


def same_everywhere(comm, *arrays):
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return all(v == mine for v in comm.allgather(mine))


# --------------------------------------------------------------------------------------------
# mode "match": the functional API against one process holding the whole batch
# --------------------------------------------------------------------------------------------

SHAPES = [(5,), (3, 7), (17, 3, 5), (2, 3, 2, 4), (1, 1, 1), (6, 1, 1), (19, 4, 4)]   # C, ...


def match_case(comm, rest, layout, dtype, order, affine, sizes, threads=1):
    K, rank = comm.Get_size(), comm.Get_rank()
    N = sum(sizes)
    shape = (N,) + rest
    C = rest[0]
    where = (f"shape {shape} {np.dtype(dtype).name} {layout} {order} affine={affine} "
             f"sizes {sizes}")
    x, dy, w, b = whole_batch(shape, layout, dtype, seed=len(rest) * 7 + C)
    if not affine:
        w = b = None
    pdt = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    rm1, rv1 = np.linspace(-1, 1, C).astype(pdt), np.linspace(0.5, 2, C).astype(pdt)
    rms, rvs = rm1.copy(), rv1.copy()
    y1, mean1, invstd1 = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm1,
                                                 running_var=rv1)
    dx1, dw1, db1 = fastbn.batch_norm_backward(dy, x, mean1, invstd1, w, layout=layout)

    xs, dys = my_slice(x, sizes, rank, order), my_slice(dy, sizes, rank, order)
    ys, means, invstds = distributed.sync_batch_norm_train(
        xs, w, b, comm=comm, layout=layout, running_mean=rms, running_var=rvs,
        num_threads=threads)
    dxs, dws, dbs = distributed.sync_batch_norm_backward(dys, xs, means, invstds, w,
                                                         comm=comm, layout=layout,
                                                         num_threads=threads)
    t = tol(dtype)
    var1 = 1.0 / invstd1 ** 2
    check(means.dtype == np.float64 and invstds.dtype == np.float64, f"{where}: stats dtype")
    check(bool(np.all(np.abs(means - mean1) <= 1e-13 * (np.abs(mean1) + np.sqrt(var1)))),
          f"{where}: mean off by {np.max(np.abs(means - mean1)):.3g}")
    check(close(invstds, invstd1, dict(rtol=1e-12, atol=0)), f"{where}: invstd")
    mine = my_slice(y1, sizes, rank)
    check(ys.shape == xs.shape and ys.dtype == xs.dtype, f"{where}: y shape/dtype")
    check(close(ys, mine, t), f"{where}: y off by {np.max(np.abs(ys - mine), initial=0):.3g}")
    check(close(dxs, my_slice(dx1, sizes, rank), t), f"{where}: dx")
    gdt = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    check(dws.dtype == gdt and dbs.dtype == gdt and dws.shape == (C,), f"{where}: dw dtype")
    dw_all = np.sum(comm.allgather(dws.astype(np.float64)), axis=0)
    db_all = np.sum(comm.allgather(dbs.astype(np.float64)), axis=0)
    gt = dict(rtol=t["rtol"], atol=t["atol"] * max(1.0, float(np.max(np.abs(db1)))))
    check(close(dw_all, dw1, gt), f"{where}: summed dweight")
    check(close(db_all, db1, gt), f"{where}: summed dbias")
    rt = dict(rtol=4 * np.finfo(pdt).eps, atol=4 * np.finfo(pdt).eps)
    check(close(rms, rm1, rt) and close(rvs, rv1, rt), f"{where}: running stats")
    check(same_everywhere(comm, means, invstds, rms, rvs),
          f"{where}: mean/invstd/running stats differ between processes")
    # repeated calls (and another thread count) give the same bits
    rm2, rv2 = np.linspace(-1, 1, C).astype(pdt), np.linspace(0.5, 2, C).astype(pdt)
    _, mean2, invstd2 = distributed.sync_batch_norm_train(
        xs, w, b, comm=comm, layout=layout, running_mean=rm2, running_var=rv2,
        num_threads=2 if threads == 1 else 1)
    check(mean2.tobytes() == means.tobytes() and invstd2.tobytes() == invstds.tobytes() and
          rm2.tobytes() == rms.tobytes() and rv2.tobytes() == rvs.tobytes(),
          f"{where}: a repeated call changed the bits")


def mode_match(dtypes=("float32", "float64")):
    sizes = sizes_for(SIZE, 4)
    orders = ("C", "F", "strided")
    i = 0
    for dtype in dtypes:
        for layout in ("NCHW", "NHWC"):
            for rest in SHAPES:
                order = orders[i % 3]
                affine = i % 4 != 3
                i += 1
                run_case(f"match {rest} {dtype} {layout}", match_case, WORLD, rest, layout,
                         np.dtype(dtype).type, order, affine, sizes)
    # every process with one sample of one value per channel: only the union has statistics
    if SIZE > 1:
        run_case("one value per process", match_case, WORLD, (3, 1, 1), "NCHW", np.float64,
                 "C", True, [1] * SIZE)
    # the statistics in double of large offsets
    run_case("bigger, two threads", match_case, WORLD, (16, 9, 9), "NHWC", np.float32, "C",
             True, [max(1, 3 - r) for r in range(SIZE)], threads=2)


def mode_half():
    import ml_dtypes   # noqa: F401  (bfloat16)
    sizes = sizes_for(SIZE, 4)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        for layout in ("NCHW", "NHWC"):
            run_case(f"half {dtype} {layout}", match_case, WORLD, (6, 5, 3), layout, dtype,
                     "C", True, sizes)


# --------------------------------------------------------------------------------------------
# mode "groups": sub-communicators
# --------------------------------------------------------------------------------------------

def mode_groups():
    color = RANK % 2
    group = WORLD.Split(color, RANK)
    try:
        gsizes = sizes_for(group.Get_size(), 3)
        for layout in ("NCHW", "NHWC"):
            for dtype in (np.float32, np.float64):
                run_case(f"group {color} {layout}", match_case, group, (4, 3, 2), layout,
                         dtype, "C", True, gsizes)
        # the two groups see different batches, so their statistics differ
        x, _, w, b = whole_batch((8, 3, 2, 2), "NCHW", np.float64, seed=100 + color)
        n = group.Get_size()
        _, mean, _ = distributed.sync_batch_norm_train(x[group.Get_rank()::n], w, b,
                                                       comm=group)
        ref = fastbn.batch_norm_train(x, w, b)[1]
        check(bool(np.allclose(mean, ref, rtol=1e-13, atol=1e-13)),
              f"group {color}: mean of the group's batch")
        means = WORLD.allgather((color, mean.tobytes()))
        by_color = {}
        for c, m in means:
            by_color.setdefault(c, set()).add(m)
        check(all(len(v) == 1 for v in by_color.values()), "a group's processes disagree")
        if len(by_color) == 2:
            check(by_color[0] != by_color[1], "the groups share statistics")
    finally:
        group.Free()


# --------------------------------------------------------------------------------------------
# mode "layer": SyncBatchNorm over several steps against BatchNorm on the whole batch
# --------------------------------------------------------------------------------------------

def layer_case(layout, dtype, momentum, affine, track):
    C = 3
    where = f"layer {layout} {np.dtype(dtype).name} momentum={momentum} affine={affine} " \
            f"track={track}"
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, layout=layout,
              dtype=dtype)
    single = fastbn.BatchNorm(C, **kw)
    sync = distributed.SyncBatchNorm(C, comm=WORLD, **kw)
    check(sorted(sync.state_dict()) == sorted(single.state_dict()), f"{where}: state_dict keys")
    sizes = sizes_for(SIZE, 3)
    t = tol(dtype)
    for step in range(4):
        sizes = sizes[1:] + sizes[:1]            # who holds what changes every step
        x, dy, _, _ = whole_batch((sum(sizes), C, 3, 2), layout, dtype, seed=step)
        xs, dys = my_slice(x, sizes, RANK), my_slice(dy, sizes, RANK)
        y1 = single.forward(x)
        dx1 = single.backward(dy)
        ys = sync.forward(xs)
        dxs = sync.backward(dys)
        check(close(ys, my_slice(y1, sizes, RANK), t), f"{where} step {step}: y")
        check(close(dxs, my_slice(dx1, sizes, RANK), t), f"{where} step {step}: dx")
    state = sync.state_dict()
    for key, value in single.state_dict().items():
        got = state[key]
        if key == "num_batches_tracked":
            check(int(got) == int(value), f"{where}: num_batches_tracked {got} != {value}")
        else:
            check(close(got, value, dict(rtol=8 * np.finfo(dtype).eps, atol=1e-6)),
                  f"{where}: {key}")
    if track:
        check(same_everywhere(WORLD, sync.running_mean, sync.running_var),
              f"{where}: running stats differ between processes")
    if affine:
        gw = np.sum(WORLD.allgather(sync.weight_grad.astype(np.float64)), axis=0)
        gb = np.sum(WORLD.allgather(sync.bias_grad.astype(np.float64)), axis=0)
        gt = dict(rtol=t["rtol"], atol=t["atol"] * 10)
        check(close(gw, single.weight_grad, gt) and close(gb, single.bias_grad, gt),
              f"{where}: summed parameter gradients")
    # evaluation mode communicates nothing: only this process calls it, and returns
    sync.eval()
    single.eval()
    if RANK == SIZE - 1:
        x, _, _, _ = whole_batch((2, C, 2, 2), layout, dtype, seed=9)
        check(close(sync.forward(x), single.forward(x), t), f"{where}: eval forward")
    # the state loads into a BatchNorm (PyTorch-compatible keys) and back
    plain = fastbn.BatchNorm(C, **kw)
    plain.load_state_dict(sync.state_dict())
    sync.load_state_dict(plain.state_dict())
    WORLD.Barrier()


def mode_layer():
    for layout in ("NCHW", "NHWC"):
        for dtype in (np.float32, np.float64):
            for momentum, affine, track in ((0.1, True, True), (None, True, True),
                                            (0.3, False, True), (0.1, True, False)):
                run_case(f"layer {layout} {dtype} {momentum}", layer_case, layout, dtype,
                         momentum, affine, track)
    try:
        import pickle
        pickle.dumps(distributed.SyncBatchNorm(2, comm=WORLD))
        check(False, "a SyncBatchNorm pickled")
    except TypeError as exc:
        check("state_dict" in str(exc), f"pickle message: {exc}")


# --------------------------------------------------------------------------------------------
# mode "errors": every process raises, nothing changes, and the next call works
# --------------------------------------------------------------------------------------------

class Snapshot:
    def __init__(self, *arrays):
        self.items = [(a, a.copy()) for a in arrays if isinstance(a, np.ndarray)]

    def unchanged(self):
        return all(np.array_equal(a, s, equal_nan=True) for a, s in self.items)


def expect(name, call, arrays, kind, *needles):
    """call() must raise kind with every needle in its message, leaving arrays unchanged."""
    snap = Snapshot(*arrays)
    try:
        call()
    except Exception as exc:
        msg = str(exc)
        check(type(exc) is kind, f"{name}: {type(exc).__name__} ({msg}) instead of "
                                 f"{kind.__name__}")
        check(all(n in msg for n in needles), f"{name}: message {msg!r} lacks {needles}")
    else:
        check(False, f"{name}: no exception")
    check(snap.unchanged(), f"{name}: an argument changed")


def fresh(C=4, n=3, dtype=np.float32, layout="NCHW"):
    x, dy, w, b = whole_batch((n, C, 2, 3), layout, dtype, seed=RANK)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    out = np.full_like(x, 7)
    return x, dy, w, b, rm, rv, out


def train(x, w, b, rm, rv, out, **kw):
    return distributed.sync_batch_norm_train(x, w, b, comm=WORLD, running_mean=rm,
                                             running_var=rv, out=out, **kw)


def mode_errors():
    last = RANK == SIZE - 1
    x, dy, w, b, rm, rv, out = fresh()
    args = (x, w, b, rm, rv, out)
    differ = "differs between processes"
    if SIZE > 1:
        # arguments that must agree
        xc, _, wc, bc, rmc, rvc, outc = fresh(C=5) if last else fresh()
        expect("channel count", lambda: train(xc, wc, bc, rmc, rvc, outc),
               (xc, wc, bc, rmc, rvc, outc), ValueError, "channel count", differ)
        xd, _, wd, bd, rmd, rvd, outd = fresh(dtype=np.float64) if last else fresh()
        expect("dtype", lambda: train(xd, wd, bd, rmd, rvd, outd),
               (xd, wd, bd, rmd, rvd, outd), ValueError, "dtype", differ)
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if last else x
        outl = np.full_like(xl, 7)
        expect("layout", lambda: train(xl, w, b, rm, rv, outl,
                                       layout="NHWC" if last else "NCHW"),
               (xl, w, b, rm, rv, outl), ValueError, "layout", differ)
        expect("eps", lambda: train(*args, eps=1e-3 if last else 1e-5), args, ValueError,
               "eps", differ)
        expect("affine", lambda: train(x, None if last else w, None if last else b, rm, rv,
                                       out), args, ValueError, "weight given", differ)
        expect("running stats", lambda: train(x, w, b, None if last else rm,
                                              None if last else rv, out),
               args, ValueError, "running statistics given", differ)
        expect("momentum", lambda: train(*args, momentum=0.2 if last else 0.1), args,
               ValueError, "momentum", differ)
        # a bad argument on one process: its own error there, a ValueError elsewhere
        bad_out = np.empty((1,), np.float32) if last else out
        expect("bad out", lambda: train(x, w, b, rm, rv, bad_out), args + (bad_out,),
               ValueError, "out" if last else f"failed on process {SIZE - 1}")
        bad_x = x.astype(np.int32) if last else x
        expect("bad x", lambda: train(bad_x, w, b, rm, rv, None), args,
               TypeError if last else ValueError, "x" if last else "TypeError")
        bad_w = np.ones(3, np.float32) if last else w
        expect("bad weight", lambda: train(x, bad_w, b, rm, rv, out), args + (bad_w,),
               ValueError, "weight")
        # backward: mean/invstd that differ, dy of the wrong shape on one process
        y, mean, invstd = train(*args)
        args_b = (dy, x, mean, invstd, w)
        other = mean + 1e-9 if last else mean
        expect("backward mean", lambda: distributed.sync_batch_norm_backward(
            dy, x, other, invstd, w, comm=WORLD), args_b + (other,), ValueError,
            "mean and invstd", differ)
        bad_dy = dy[:, :, :1] if last else dy
        expect("backward dy", lambda: distributed.sync_batch_norm_backward(
            bad_dy, x, mean, invstd, w, comm=WORLD), args_b, ValueError,
            "dy" if last else "failed on process")
        expect("backward weight given", lambda: distributed.sync_batch_norm_backward(
            dy, x, mean, invstd, None if last else w, comm=WORLD), args_b, ValueError,
            "weight given", differ)
        # the layer: a bad input on one process raises on every process
        bn = distributed.SyncBatchNorm(4, comm=WORLD)
        state = {k: v.copy() for k, v in bn.state_dict().items()}
        bad = x.astype(np.float64) if last else x
        expect("layer dtype", lambda: bn.forward(bad), (x,), TypeError if last else ValueError,
               "dtype" if last else "failed on process")
        bad = x[:, :3] if last else x
        expect("layer channels", lambda: bn(bad), (x,), ValueError,
               "channels" if last else "failed on process")
        expect("layer residual", lambda: bn(x, x.copy() if last else None), (x,), ValueError,
               "residual" if last else "failed on process")
        check(all(np.array_equal(state[k], v) for k, v in bn.state_dict().items()),
              "the layer's state changed on an error")
        expect("layer backward first everywhere", lambda: bn.backward(dy), (dy,),
               RuntimeError, "before forward")
        bn(x)
        layer = distributed.SyncBatchNorm(4, comm=WORLD) if last else bn
        expect("layer backward first", lambda: layer.backward(dy), (dy,),
               RuntimeError if last else ValueError, "before forward")
        expect("layer backward dy", lambda: bn.backward(dy[:, :, :1] if last else dy), (dy,),
               ValueError, "dy" if last else "failed on process")
        bn.backward(dy)
        try:
            bn.activation = "relu"
            check(False, "SyncBatchNorm took activation='relu'")
        except ValueError as exc:
            check("no fused activation" in str(exc), f"activation message: {exc}")
    # the whole batch with one value per channel (here: on process 0 only, or nowhere)
    one = x[:1, :, :1, :1] if RANK == 0 else x[:0, :, :1, :1]
    expect("one value", lambda: train(one, w, b, rm, rv, None), args, ValueError,
           "more than 1 value per channel")
    empty = x[:0]
    expect("no value", lambda: train(empty, w, b, rm, rv, None), args, ValueError,
           "more than 1 value per channel")
    # not a communicator: the TypeError needs no collective
    for comm in (None, "COMM_WORLD", 0, MPI.COMM_NULL, MPI.COMM_SELF.Get_group()):
        expect(f"comm={comm!r}", lambda: distributed.sync_batch_norm_train(
            x, w, b, comm=comm, running_mean=rm, running_var=rv), args, TypeError, "comm")
        expect(f"backward comm={comm!r}", lambda: distributed.sync_batch_norm_backward(
            dy, x, np.zeros(4), np.ones(4), comm=comm), (dy, x), TypeError, "comm")
    try:
        distributed.SyncBatchNorm(4, comm=None)
        check(False, "SyncBatchNorm(comm=None) did not raise")
    except TypeError:
        pass
    # after all that, a good call works and agrees everywhere
    y, mean, invstd = train(*args)
    check(same_everywhere(WORLD, mean, invstd, rm, rv), "the call after the errors")
    check(bool(np.shares_memory(y, out)), "out= not used")


def mode_out():
    """out=: a fresh array, x itself; and dx into dy."""
    x, dy, w, b, rm, rv, out = fresh(n=2 + RANK)
    y_fresh, mean, invstd = distributed.sync_batch_norm_train(x, w, b, comm=WORLD)
    y_out, _, _ = distributed.sync_batch_norm_train(x, w, b, comm=WORLD, out=out)
    check(y_out is out and np.array_equal(out, y_fresh), "out=")
    xin = x.copy()
    y_in, _, _ = distributed.sync_batch_norm_train(xin, w, b, comm=WORLD, out=xin)
    check(y_in is xin and np.array_equal(xin, y_fresh), "out=x")
    dx, dw, db = distributed.sync_batch_norm_backward(dy, x, mean, invstd, w, comm=WORLD)
    dyin = dy.copy()
    dx2, dw2, db2 = distributed.sync_batch_norm_backward(dyin, x, mean, invstd, w, comm=WORLD,
                                                         out=dyin)
    check(dx2 is dyin and np.array_equal(dx2, dx) and np.array_equal(dw2, dw) and
          np.array_equal(db2, db), "out=dy")


# --------------------------------------------------------------------------------------------
# mode "robust": any exception on one process joins the collective, so the processes stay
# paired call for call; 16-bit running buffers are rounded silently and all-or-nothing;
# C = 0; null and freed communicators
# --------------------------------------------------------------------------------------------

class Boom(Exception):
    """Not a TypeError or ValueError: what a caller's own object may raise."""


class Unconvertible:
    """An array-like whose conversion raises (as np.asarray of a torch tensor that requires
    grad raises RuntimeError)."""

    def __init__(self, exc):
        self.exc = exc

    def __array__(self, dtype=None, copy=None):
        raise self.exc


def whole_mean_check(where, layout="NCHW"):
    """A good synchronized forward and backward after the failures: the whole batch's
    statistics and this process's dx, against one process holding the whole batch."""
    sizes = sizes_for(SIZE, 4)
    shape = (sum(sizes), 3, 2, 2)
    x, dy, w, b = whole_batch(shape, layout, np.float64, seed=11, offset=10.5)
    _, mean1, invstd1 = fastbn.batch_norm_train(x, w, b, layout=layout)
    dx1, _, _ = fastbn.batch_norm_backward(dy, x, mean1, invstd1, w, layout=layout)
    xs, dys = my_slice(x, sizes, RANK), my_slice(dy, sizes, RANK)
    _, mean, invstd = distributed.sync_batch_norm_train(xs, w, b, comm=WORLD, layout=layout)
    dxs, _, _ = distributed.sync_batch_norm_backward(dys, xs, mean, invstd, w, comm=WORLD,
                                                     layout=layout)
    check(close(mean, mean1, tol(np.float64)) and close(invstd, invstd1, tol(np.float64)),
          f"{where}: whole-batch statistics {mean} instead of {mean1}")
    check(close(dxs, my_slice(dx1, sizes, RANK), tol(np.float64)), f"{where}: dx")
    check(same_everywhere(WORLD, mean, invstd), f"{where}: processes disagree")


def mode_robust():
    last = RANK == SIZE - 1
    x, dy, w, b, rm, rv, out = fresh()
    failed_here = f"failed on process {SIZE - 1}"
    for exc in (RuntimeError("grad"), Boom("boom"), MemoryError("no memory"),
                KeyError("key"), ZeroDivisionError("zero")):
        kind = type(exc)
        bad = Unconvertible(exc) if last else x
        # the forward: the original error where it happened, a ValueError elsewhere
        expect(f"forward {kind.__name__}", lambda: train(bad, w, b, rm, rv, out),
               (x, w, b, rm, rv, out), kind if last else ValueError,
               str(exc.args[0]) if last else failed_here)
        bad_w = Unconvertible(exc) if last else w
        expect(f"forward weight {kind.__name__}", lambda: train(x, bad_w, b, rm, rv, out),
               (x, w, b, rm, rv, out), kind if last else ValueError,
               kind.__name__ if not last else str(exc.args[0]))
        # the backward
        y, mean, invstd = train(x, w, b, None, None, None)
        bad_dy = Unconvertible(exc) if last else dy
        dx_out = np.full_like(dy, 3)
        expect(f"backward {kind.__name__}", lambda: distributed.sync_batch_norm_backward(
            bad_dy, x, mean, invstd, w, comm=WORLD, out=dx_out), (dy, x, w, dx_out),
            kind if last else ValueError, str(exc.args[0]) if last else failed_here)
        # the layer, forward and backward
        bn = distributed.SyncBatchNorm(4, comm=WORLD)
        state = {k: v.copy() for k, v in bn.state_dict().items()}
        expect(f"layer forward {kind.__name__}", lambda: bn(bad), (x,),
               kind if last else ValueError, str(exc.args[0]) if last else failed_here)
        check(all(np.array_equal(state[k], v) for k, v in bn.state_dict().items()),
              f"layer forward {kind.__name__}: the layer's state changed")
        bn(x)
        expect(f"layer backward {kind.__name__}", lambda: bn.backward(bad_dy), (dy,),
               kind if last else ValueError, str(exc.args[0]) if last else failed_here)
        check(np.array_equal(bn.weight_grad, np.zeros(4, np.float32)),
              f"layer backward {kind.__name__}: weight_grad changed")
        # the processes are still paired call for call
        whole_mean_check(f"after {kind.__name__}")
    # a bad thread count on a process whose slice is empty (it has nothing to reduce, but
    # its argument is checked before the collective all the same)
    mine = x[:0] if last else x
    expect("num_threads on an empty slice", lambda: distributed.sync_batch_norm_train(
        mine, w, b, comm=WORLD, num_threads=0 if last else None), (x, w, b), ValueError,
        "num_threads" if last else failed_here)
    # a caller that catches the error and goes on, several times in a row, one process only
    for i in range(3):
        try:
            train(Unconvertible(RuntimeError("skip")) if last else x, w, b, None, None, None)
        except (RuntimeError, ValueError):
            pass
        whole_mean_check(f"skipped batch {i}")

    # 16-bit running buffers near their range, under errstate raise and warnings as errors
    import warnings
    pdt_list = [np.float16]
    try:
        import ml_dtypes
        pdt_list.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    xr = x - x.mean(axis=(0, 2, 3), keepdims=True)        # a mean near 0 on each process
    for pdt in pdt_list:
        for start_mean, start_var, scale in ((5e-5, 1.0, 1.0), (6e4, 6e4, 1e4)):
            rm16 = np.full(4, start_mean, pdt)
            rv16 = np.full(4, start_var, pdt)
            xin = xr * scale
            rm_start = rm16.astype(np.float64)
            rm_ref, rv_ref = rm16.copy(), rv16.copy()
            with np.errstate(all="ignore"), warnings.catch_warnings():
                y_ref, mean_ref, _ = distributed.sync_batch_norm_train(
                    xin, comm=WORLD, running_mean=rm_ref, running_var=rv_ref, momentum=0.5)
            where = f"16-bit running buffers {np.dtype(pdt).name} start {start_mean}"
            try:
                with np.errstate(all="raise"), warnings.catch_warnings():
                    warnings.simplefilter("error")
                    out16 = np.zeros_like(xin)
                    distributed.sync_batch_norm_train(xin, comm=WORLD, running_mean=rm16,
                                                      running_var=rv16, momentum=0.5,
                                                      out=out16)
            except Exception as exc:
                check(False, f"{where}: raised {type(exc).__name__}: {exc}")
                continue
            check(np.array_equal(out16, y_ref), f"{where}: y")
            check(rm16.tobytes() == rm_ref.tobytes() and rv16.tobytes() == rv_ref.tobytes(),
                  f"{where}: running buffers differ from the default errstate's")
            want_m = rm_start * 0.5 + 0.5 * mean_ref
            check(np.array_equal(rm16.astype(np.float64),
                                 np.asarray(want_m).astype(pdt).astype(np.float64))
                  or np.dtype(pdt).name == "bfloat16",
                  f"{where}: running_mean {rm16} is not the rounded {want_m}")
            check(same_everywhere(WORLD, rm16.view(np.uint16), rv16.view(np.uint16)),
                  f"{where}: processes disagree")

    # C = 0: empty results, as the local function gives
    for layout, shape in (("NCHW", (3, 0, 2)), ("NHWC", (3, 2, 0)), ("NCHW", (4, 0))):
        xe = np.zeros(shape, np.float32)
        try:
            ye, me, ie = distributed.sync_batch_norm_train(xe, comm=WORLD, layout=layout)
            yl, ml, il = fastbn.batch_norm_train(xe, layout=layout)
            check(ye.shape == yl.shape and me.shape == ml.shape == (0,) and
                  ie.shape == il.shape == (0,), f"C=0 {shape}: shapes")
            dxe, dwe, dbe = distributed.sync_batch_norm_backward(xe, xe, me, ie, comm=WORLD,
                                                                 layout=layout)
            check(dxe.shape == shape and dwe.shape == dbe.shape == (0,), f"C=0 {shape}: bwd")
        except Exception as exc:
            check(False, f"C=0 {shape}: raised {type(exc).__name__}: {exc}")

    # a null or freed communicator: said so
    freed = WORLD.Dup()
    freed.Free()
    for comm, what in ((MPI.COMM_NULL, "null"), (freed, "freed")):
        expect(f"{what} communicator", lambda: distributed.sync_batch_norm_train(
            x, w, b, comm=comm), (x, w, b), TypeError, "COMM_NULL", "freed")
        expect(f"{what} communicator, backward", lambda: distributed.sync_batch_norm_backward(
            dy, x, np.zeros(4), np.ones(4), comm=comm), (dy, x), TypeError, "COMM_NULL")
    whole_mean_check("at the end")


MODES = {"match": mode_match, "half": mode_half, "groups": mode_groups, "layer": mode_layer,
         "errors": mode_errors, "out": mode_out, "robust": mode_robust}

if __name__ == "__main__":
    for mode in sys.argv[1:]:
        run_case(mode, MODES[mode])
    finish(" ".join(sys.argv[1:]))
