"""``python -m fastbn.distributed --bench``: synchronized Batch Normalization against local
fastbn on the same per-process data, and the time of the communication.

Run as is, it launches ``mpiexec -n K`` for each K of ``--procs`` (the mpiexec next to
this Python, as ``pip install mpich`` puts it, else the one on PATH), each process with
one thread (``--threads``). Run under mpiexec (``mpiexec -n 2 python -m mpi4py -m
fastbn.distributed --bench``), it measures that one communicator.

Each round times, one after the other and with every process starting together (a
barrier before each call), local ``batch_norm_train``, ``sync_batch_norm_train``, one read
pass over x, the all-gather of the forward's payload alone, local ``batch_norm_backward``,
``sync_batch_norm_backward`` and the all-gather of the backward's payload; the best of the
rounds, then the slowest process's best (a data-parallel step waits for the slowest).
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from .. import _config, distributed, functional
from .._dispatch import kernels
from .options import positive_count
from .timing import make_data

DEFAULT_SHAPE = (16, 256, 28, 28)
COLUMNS = ("local fwd", "sync fwd", "read", "comm fwd", "local bwd", "sync bwd", "comm bwd")


def _shape(text):
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be comma-separated integers, got {text!r}")
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape needs >= 2 positive sizes, got {text!r}")
    return shape


def _procs(text):
    try:
        procs = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"procs must be comma-separated integers, got {text!r}")
    if not procs or min(procs) < 1:
        raise argparse.ArgumentTypeError(f"procs must be positive, got {text!r}")
    return procs


def parser():
    p = argparse.ArgumentParser(prog="python -m fastbn.distributed",
                                description="Synchronized Batch Normalization over MPI")
    p.add_argument("--bench", action="store_true", help="run the benchmark")
    p.add_argument("--procs", type=_procs, default=[1, 2, 4],
                   help="process counts to launch (default 1,2,4; ignored under mpiexec)")
    p.add_argument("--shape", type=_shape, default=DEFAULT_SHAPE,
                   help="per-process x, given NCHW (default 16,256,28,28)")
    p.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=positive_count, default=1,
                   help="threads per process, >= 1 (default 1)")
    p.add_argument("--rounds", type=positive_count, default=15,
                   help="rounds (best of), >= 1 (default 15)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def mpiexec():
    """The mpiexec of this environment (next to sys.executable), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec")


def _row_args(args):
    return ["--shape", ",".join(map(str, args.shape)), "--layout", args.layout,
            "--dtype", args.dtype, "--threads", str(args.threads), "--rounds", str(args.rounds)]


def launch(args):
    """Run the benchmark under mpiexec -n K for each K; print the header and every row."""
    exe = mpiexec()
    if exe is None:
        print("no mpiexec: pip install \"fastbn[mpi]\" (mpi4py and mpich)", file=sys.stderr)
        return 2
    header(args, exe)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for k in args.procs:
        cmd = [exe, "-n", str(k), sys.executable, "-m", "mpi4py", "-m", "fastbn.distributed",
               "--bench", "--worker"] + _row_args(args)
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=1800)
        if done.returncode:
            print(done.stdout + done.stderr, file=sys.stderr)
            print(f"mpiexec -n {k} failed (exit {done.returncode})", file=sys.stderr)
            return 1
        sys.stdout.write(done.stdout)
        sys.stdout.flush()
    footer()
    return 0


def header(args, exe=None):
    cfg = _config.config()
    cpu = _config.cpu_model()
    print(f"fastbn {cfg['fastbn']} synchronized Batch Normalization, kernels {cfg['kernels']}; "
          f"{cpu}, {os.cpu_count()} CPUs")
    if exe:
        print(f"mpiexec: {exe}")
    print(f"per process: x {tuple(args.shape)} (given NCHW) {args.dtype} {args.layout}, "
          f"{args.threads} thread(s), best of {args.rounds} rounds, slowest process; ms")
    print(f"{'procs':>5} " + " ".join(f"{c:>9}" for c in COLUMNS) +
          f" {'fwd/budget':>10} {'bwd/budget':>10}")


def footer():
    print("fwd/budget = sync fwd / (local fwd + read + comm fwd); bwd/budget = sync bwd / (local bwd + 2 read + comm bwd)")
    print("(read: one pass over x; the synchronized calls read their inputs once more than "
          "the local ones,\n which reread each channel from cache between the reduction and "
          "the elementwise pass)")
    print("more processes than CPUs share the cores: their times are not per-process speed")


def worker(args):
    """Measure on the processes of COMM_WORLD; the slowest process's best times, on rank 0."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dtype = np.dtype(args.dtype).type
    x, dy, _, _ = make_data(args.shape, args.layout, dtype, seed=rank)
    C = args.shape[1]
    params = np.random.default_rng(0)                  # the same parameters everywhere
    w = params.uniform(0.5, 1.5, C).astype(dtype)
    b = params.uniform(-0.5, 0.5, C).astype(dtype)
    t = args.threads
    y_local, y_sync = np.zeros_like(x), np.zeros_like(x)
    dx_local, dx_sync = np.zeros_like(x), np.zeros_like(x)
    _, mean_l, invstd_l = functional.batch_norm_train(x, w, b, layout=args.layout)
    _, mean_s, invstd_s = distributed.sync_batch_norm_train(x, w, b, comm=comm,
                                                            layout=args.layout)
    # the messages of the two collectives, alone
    fwd_payload = distributed.forward_message(C, x.size // C, dtype, args.layout)
    bwd_payload = distributed.backward_message(C, x.size // C, dtype, args.layout, mean_s,
                                               invstd_s)
    xr = np.ascontiguousarray(x).reshape(-1).view(np.float32)

    calls = [
        lambda: functional.batch_norm_train(x, w, b, layout=args.layout, out=y_local,
                                            num_threads=t),
        lambda: distributed.sync_batch_norm_train(x, w, b, comm=comm, layout=args.layout,
                                                  out=y_sync, num_threads=t),
        lambda: kernels.read_pass(xr, t),
        lambda: comm.allgather(fwd_payload),
        lambda: functional.batch_norm_backward(dy, x, mean_l, invstd_l, w, layout=args.layout,
                                               out=dx_local, num_threads=t),
        lambda: distributed.sync_batch_norm_backward(dy, x, mean_s, invstd_s, w, comm=comm,
                                                     layout=args.layout, out=dx_sync,
                                                     num_threads=t),
        lambda: comm.allgather(bwd_payload),
    ]
    best = np.full(len(calls), np.inf)
    for r in range(args.rounds + 1):           # round 0 warms up
        for i, f in enumerate(calls):
            comm.Barrier()
            t0 = time.perf_counter()
            f()
            dt = time.perf_counter() - t0
            if r:
                best[i] = min(best[i], dt)
    slowest = np.empty_like(best)
    comm.Allreduce(best, slowest, op=MPI.MAX)
    if rank == 0:
        lf, sf, rd, cf, lb, sb, cb = slowest
        print(f"{size:>5} " + " ".join(f"{v * 1e3:9.3f}" for v in slowest) +
              f" {sf / (lf + rd + cf):10.2f} {sb / (lb + 2 * rd + cb):10.2f}", flush=True)


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if not args.bench:
        if sys.argv[1:] if argv is None else argv:
            p.error("the options are the benchmark's: add --bench")
        p.print_help()
        return 0
    if args.worker:
        worker(args)
        return 0
    if importlib.util.find_spec("mpi4py") is None:
        print("fastbn.distributed needs mpi4py and an MPI library: "
              "pip install \"fastbn[mpi]\" (mpi4py and mpich)", file=sys.stderr)
        return 2
    if not under_mpiexec():
        return launch(args)
    from mpi4py import MPI                      # already under mpiexec: measure this one
    if MPI.COMM_WORLD.Get_rank() == 0:
        header(args)
    worker(args)
    if MPI.COMM_WORLD.Get_rank() == 0:
        footer()
    return 0


def under_mpiexec():
    """Whether this process was started by an MPI launcher (checked without starting MPI,
    so that the launching process does not become an MPI process itself)."""
    return any(v in os.environ for v in ("PMI_SIZE", "PMI_RANK", "PMIX_RANK",
                                         "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"))
