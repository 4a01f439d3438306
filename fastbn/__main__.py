"""``python -m fastbn``: build information and the speed table.

fastbn against its NumPy reference, and against PyTorch's CPU kernels when torch is
importable, for every shape and layout; ``--quick`` runs a subset in under a minute.
"""
import argparse

import numpy as np

import sys

from . import _bench, _config, _plot, _threads


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a subset of shapes, fewer rounds")
    p.add_argument("--vs-torch", action="store_true",
                   help="fastbn against PyTorch only (no NumPy reference column)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: fastbn's)")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                   default="float32", help="data dtype (bfloat16 needs ml_dtypes)")
    p.add_argument("--layout", choices=("NCHW", "NHWC", "both"), default="both")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per timing")
    p.add_argument("--markdown", metavar="FILE", default=None,
                   help="also write the table as Markdown to FILE")
    p.add_argument("--plot", metavar="FILE", default=None,
                   help="also draw fastbn / PyTorch against the input size into FILE "
                        "(.png, .svg or .pdf; needs matplotlib)")
    p.add_argument("--fused", action="store_true",
                   help="only the fused residual add + ReLU rows (fastbn.batch_norm_relu_*) "
                        "on the large shapes")
    p.add_argument("--crossover", action="store_true",
                   help="time 1 vs 2 threads on small inputs (where to stop forking threads)")
    args = p.parse_args(argv)
    if args.plot and not _plot.available():
        print(_plot.NEEDS, file=sys.stderr)
        return 2
    if args.crossover:
        _bench.crossover()
        return
    shapes = _bench.QUICK_SHAPES if args.quick else _bench.SHAPES
    rounds = args.rounds or (3 if args.quick else 7)
    layouts = ("NCHW", "NHWC") if args.layout == "both" else (args.layout,)
    if args.fused:
        _bench.fused_table(layouts=layouts, threads=args.threads, rounds=rounds)
        return
    if args.dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            print("--dtype bfloat16 needs ml_dtypes: pip install ml_dtypes", file=sys.stderr)
            return 2
        dtype = ml_dtypes.bfloat16
    else:
        dtype = np.dtype(args.dtype).type
    threads = args.threads or _threads.get_num_threads()
    rows = _bench.run(shapes=shapes, layouts=layouts, dtype=dtype, threads=threads,
                      rounds=rounds, with_reference=not args.vs_torch, roofline=not args.quick,
                      caffe=not args.vs_torch)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_bench.markdown(rows, threads, dtype) + "\n")
    if args.plot:
        cfg = _config.config()
        _plot.plot(rows, args.plot, f"fastbn {cfg['fastbn']} vs PyTorch, {np.dtype(dtype).name}, "
                   f"{threads} thread(s), {cfg['kernels']}", dtype)


if __name__ == "__main__":
    sys.exit(main())
