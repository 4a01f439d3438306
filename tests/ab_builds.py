"""A/B of two builds of the kernels in one process (not collected by pytest): the kernel
modules of another checkout (built in place, e.g. an earlier commit in a git worktree)
against this one's, through fastbn's own functions. Prints any case of tests/cases.py whose
results differ in a single bit, then the speed table's shapes timed interleaved, new / old.

    git worktree add /tmp/old COMMIT && (cd /tmp/old && python setup.py build_ext --inplace)
    python tests/ab_builds.py /tmp/old [--variant _kernels_avx512] [--rounds 15]
"""
import argparse
import glob
import importlib.util
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import fastbn                                    # noqa: E402
from fastbn import _dispatch                     # noqa: E402
from fastbn.bench.table import SHAPES            # noqa: E402
from fastbn.bench.timing import make_data        # noqa: E402
import cases                                     # noqa: E402


def load(checkout, variant):
    """The kernel module `variant` of another checkout, loaded under another name."""
    paths = glob.glob(os.path.join(checkout, "fastbn", variant + ".*.so"))
    if not paths:
        sys.exit(f"no {variant} build in {checkout}/fastbn (build it in place first)")
    spec = importlib.util.spec_from_file_location("old_kernels." + variant, paths[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_all(x, g, layout, threads):
    """Every kernel path fastbn's functions take on x: training forward (plain, fused
    ReLU with and without a residual, leaky ReLU), inference, backward (plain, fused with
    and without the residual's gradient, eval, leaky, from the leaky ReLU's output),
    renorm."""
    C = x.shape[1 if layout == "NCHW" else -1]
    pdt = np.float32 if x.dtype.itemsize == 2 else x.dtype
    w = np.linspace(0.5, 1.5, C).astype(pdt)
    b = np.linspace(-1, 1, C).astype(pdt)
    rm, rv = np.zeros(C, pdt), np.ones(C, pdt)
    out = []
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm,
                                              running_var=rv, num_threads=threads)
    out += [y, mean, invstd, rm, rv]
    yr, _, _ = fastbn.batch_norm_relu_train(x, w, b, residual=g, layout=layout,
                                            num_threads=threads)
    out += [yr, fastbn.batch_norm_infer(x, rm, rv, w, b, layout=layout, num_threads=threads)]
    out += [fastbn.batch_norm_relu_train(x, w, b, layout=layout, num_threads=threads)[0]]
    out += list(fastbn.batch_norm_relu_backward(g, yr, x, mean, invstd, w, layout=layout,
                                                num_threads=threads))
    out += list(fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout,
                                           num_threads=threads))
    out += list(fastbn.batch_norm_relu_backward(g, yr, x, mean, invstd, w, layout=layout,
                                                dresidual=np.empty_like(x),
                                                num_threads=threads))
    out += list(fastbn.batch_norm_backward(g, x, mean, invstd, w, training=False,
                                           layout=layout, num_threads=threads))
    out += list(fastbn.batch_renorm_train(x, w, b, np.zeros(C), np.ones(C), layout=layout,
                                          num_threads=threads))
    out += list(fastbn.batch_norm_relu_backward(g, yr, x, mean, invstd, w, training=False,
                                                layout=layout, num_threads=threads))
    # the leaky ReLU: its forward, backward (with the residual's gradient, and with fixed
    # statistics) and the backward from its output
    try:
        yl = fastbn.batch_norm_relu_train(x, w, b, layout=layout, num_threads=threads,
                                          negative_slope=0.1)[0]
    except TypeError:          # kernels from before the leaky ReLU
        return out
    out += [yl]
    out += list(fastbn.batch_norm_relu_backward(g, yl, x, mean, invstd, w, layout=layout,
                                                dresidual=np.empty_like(x),
                                                num_threads=threads, negative_slope=0.1))
    out += list(fastbn.batch_norm_relu_backward(g, yl, x, mean, invstd, w, training=False,
                                                layout=layout, num_threads=threads,
                                                negative_slope=0.1))
    out += list(fastbn.batch_norm_backward_from_output(g, yl, invstd, w, b, layout=layout,
                                                       num_threads=threads,
                                                       negative_slope=0.1))
    return out


def with_kernels(module, fn, *args):
    with _dispatch.using(module):
        return fn(*args)


def bits(old, new):
    dtypes = [np.float32, np.float64, np.float16]
    try:
        import ml_dtypes
        dtypes.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    differ = checked = 0
    for case in cases.CASES:
        shape, layout, branch = case.shape, case.layout, case.branch
        for dtype in dtypes:
            for threads in (1, 2):
                rng = np.random.default_rng(0)
                x = (rng.standard_normal(shape) * 3 + 100).astype(np.float32).astype(dtype)
                g = rng.standard_normal(shape).astype(np.float32).astype(dtype)
                a = with_kernels(old, run_all, x, g, layout, threads)
                b = with_kernels(new, run_all, x, g, layout, threads)
                checked += 1
                if any(np.asarray(u).tobytes() != np.asarray(v).tobytes()
                       for u, v in zip(a, b)):
                    differ += 1
                    print(f"DIFFER {shape} {layout} ({branch}) {np.dtype(dtype).name} "
                          f"{threads} thread(s)", flush=True)
    print(f"{checked} cases x dtypes x thread counts compared, {differ} differ")
    return differ


def speed(old, new, rounds, dtype=np.float32):
    print(f"{np.dtype(dtype).name}")
    print(f"{'shape':<20} {'layout':<6} {'op':<9} {'old ms':>8} {'new ms':>8} {'new/old':>8}")
    ratios = []
    for shape in SHAPES:
        for layout in ("NCHW", "NHWC"):
            if len(shape) == 2 and layout == "NHWC":
                continue
            x, dy, w, b = make_data(shape, layout, dtype)
            y = np.zeros_like(x)
            _, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout)
            ops = {"train": lambda: fastbn.batch_norm_train(x, w, b, layout=layout, out=y),
                   "infer": lambda: fastbn.batch_norm_infer(x, mean, 1 / invstd ** 2, w, b,
                                                            layout=layout, out=y),
                   "backward": lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, w,
                                                                  layout=layout, out=y)}
            for op, f in ops.items():
                t = {id(old): [], id(new): []}
                for _ in range(rounds):             # interleaved: old, new, old, new...
                    for m in (old, new):
                        t0 = time.perf_counter()
                        with_kernels(m, f)
                        t[id(m)].append(time.perf_counter() - t0)
                t_old, t_new = np.median(t[id(old)]), np.median(t[id(new)])
                ratios.append(t_new / t_old)
                print(f"{str(shape):<20} {layout:<6} {op:<9} {t_old * 1e3:8.3f} "
                      f"{t_new * 1e3:8.3f} {t_new / t_old:8.3f}", flush=True)
    print(f"new/old: min {min(ratios):.3f}, median {np.median(ratios):.3f}, "
          f"max {max(ratios):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkout", help="the other checkout, its extensions built in place")
    ap.add_argument("--variant", default=_dispatch.kernels.__name__.rpartition(".")[2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-bits", action="store_true",
                    help="speed only (builds whose constants differ differ in bits)")
    ap.add_argument("--dtype", default="float32",
                    choices=("float32", "float64", "float16", "bfloat16"))
    args = ap.parse_args()
    # this checkout's module first: a build loaded under another name before it would be
    # returned for it too
    new = importlib.import_module("fastbn." + args.variant)
    old = load(args.checkout, args.variant)
    print(f"old: {old.__file__}\nnew: {new.__file__}")
    if os.path.realpath(old.__file__) == os.path.realpath(new.__file__) or old is new:
        sys.exit("the two builds are one module: nothing to compare")
    differ = 0 if args.no_bits else bits(old, new)
    if not args.no_speed:
        if args.dtype == "bfloat16":
            import ml_dtypes
            dtype = ml_dtypes.bfloat16
        else:
            dtype = np.dtype(args.dtype).type
        speed(old, new, args.rounds, dtype)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
