"""The command line of ``python -m fastbn``: build information and the speed table.

fastbn against its NumPy reference, and against PyTorch's CPU kernels when torch is
importable, for every shape and layout; ``--quick`` runs a subset in under a minute. Every
option is checked before any work starts (argparse's exit status 2 and a message naming
the option).
"""
import argparse
import importlib.util

import numpy as np

from .. import _config, _threads
from . import plot, table
from .options import positive_count, writable_file


def parser():
    p = argparse.ArgumentParser(prog="python -m fastbn",
                                description="fastbn's build information and speed table")
    p.add_argument("--quick", action="store_true", help="a subset of shapes, fewer rounds")
    p.add_argument("--vs-torch", action="store_true",
                   help="fastbn against PyTorch only (no NumPy reference column; needs torch)")
    p.add_argument("--threads", type=positive_count, default=None,
                   help="threads, >= 1 (default: fastbn's)")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                   default=None, help="data dtype (default float32; bfloat16 needs ml_dtypes)")
    p.add_argument("--layout", choices=("NCHW", "NHWC", "both"), default=None,
                   help="the layouts to time (default both)")
    p.add_argument("--rounds", type=positive_count, default=None,
                   help="interleaved rounds per timing, >= 1 (default 7, 3 with --quick)")
    p.add_argument("--markdown", metavar="FILE", type=writable_file, default=None,
                   help="also write the table as Markdown to FILE")
    p.add_argument("--plot", metavar="FILE", type=writable_file, default=None,
                   help="also draw fastbn / PyTorch against the input size into FILE "
                        "(.png, .svg or .pdf; needs matplotlib and torch)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fused", action="store_true",
                      help="only the fused residual add + ReLU rows (fastbn.batch_norm_relu_*) "
                           "on the large shapes (takes --layout, --threads, --rounds)")
    mode.add_argument("--crossover", action="store_true",
                      help="time 1 vs 2 threads on small inputs (where to stop forking "
                           "threads; takes no other option)")
    return p


def _check(p, args):
    """Every option checked before any work: p.error (exit 2) on a combination that would
    be ignored or fail late."""
    given = [name for name, on in (("--quick", args.quick), ("--vs-torch", args.vs_torch),
                                   ("--threads", args.threads is not None),
                                   ("--dtype", args.dtype is not None),
                                   ("--layout", args.layout is not None),
                                   ("--rounds", args.rounds is not None),
                                   ("--markdown", args.markdown is not None),
                                   ("--plot", args.plot is not None)) if on]
    if args.crossover and given:
        p.error(f"--crossover takes no other option, got {' '.join(given)}")
    if args.fused:
        unused = [g for g in given if g not in ("--layout", "--threads", "--rounds")]
        if unused:
            p.error(f"--fused takes only --layout, --threads and --rounds, got "
                    f"{' '.join(unused)}")
    if args.plot:
        if not plot.available():
            p.error(plot.NEEDS)
        formats = plot.formats()
        ext = args.plot.rpartition(".")[2].lower() if "." in args.plot else ""
        if ext not in formats:
            p.error(f"--plot: the file name must end in one of "
                    f"{', '.join('.' + f for f in sorted(formats))} (the format), "
                    f"got {args.plot!r}")
    if (args.plot or args.vs_torch) and importlib.util.find_spec("torch") is None:
        p.error(f"{'--plot' if args.plot else '--vs-torch'} compares fastbn with PyTorch: "
                "pip install torch")
    if args.dtype == "bfloat16" and importlib.util.find_spec("ml_dtypes") is None:
        p.error("--dtype bfloat16 needs ml_dtypes: pip install ml_dtypes")


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    _check(p, args)
    if args.crossover:
        table.crossover()
        return 0
    shapes = table.QUICK_SHAPES if args.quick else table.SHAPES
    rounds = args.rounds or (3 if args.quick else 7)
    layouts = ("NCHW", "NHWC") if args.layout in (None, "both") else (args.layout,)
    if args.fused:
        table.fused_table(layouts=layouts, threads=args.threads, rounds=rounds)
        return 0
    if args.dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    else:
        dtype = np.dtype(args.dtype or "float32").type
    threads = args.threads or _threads.get_num_threads()
    rows = table.run(shapes=shapes, layouts=layouts, dtype=dtype, threads=args.threads,
                      rounds=rounds, with_reference=not args.vs_torch, roofline=not args.quick,
                      caffe=not args.vs_torch)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table.markdown(rows, threads, dtype) + "\n")
    if args.plot:
        cfg = _config.config()
        plot.plot(rows, args.plot, f"fastbn {cfg['fastbn']} vs PyTorch, {np.dtype(dtype).name}, "
                   f"{threads} thread(s), {cfg['kernels']}", dtype)
    return 0
