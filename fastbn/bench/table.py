"""The speed table behind ``python -m fastbn``: fastbn against its NumPy reference and
PyTorch for every shape and layout, fastbn against itself and against the memory system
(the roofline rows), and the serial-threshold crossover table.
"""
import sys

import numpy as np

from .. import _config, _memory, _threads, functional
from . import caffe as caffe_rows
from .case import Case
from .ort import ort_modules, ort_version
from .timing import interleaved, latencies, make_data, torch_module

SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7),
          (16, 128, 28, 28), (1, 64, 56, 56), (1, 256, 14, 14), (8, 32, 8, 8), (256, 1024)]
LARGE = SHAPES[:3]             # beyond the caches: memory-bound
QUICK_SHAPES = [(32, 256, 56, 56), (1, 64, 56, 56), (8, 32, 8, 8), (256, 1024)]
OPS = ("train", "infer", "backward")
# Inputs above this many bytes get the rows that compare fastbn with itself and with the
# memory system (self, fused, train out=), and one round of the slow NumPy reference: at
# 8 MiB an input is past the per-core L2 of every machine this project runs on (1-2 MiB)
# and past most of their shared L3, so those rows show the memory system, not the caches.
LARGE_BYTES = 8 << 20
# Inputs of at most this many bytes (the small calls: per-call work and thread start-up,
# not memory) also get their latency row: p50 and p99 of LATENCY_CALLS consecutive calls of
# each op, where a descheduled thread or a stall shows, which the best time hides.
SMALL_BYTES = 1 << 20
LATENCY_CALLS = 300
# A pass that reads x (or the residual) once more is held to this many read passes: a
# stated budget (one pass and 30% for the merge and the second parallel region), not a
# measurement; a ratio <= 1 against it means the extra read costs at most that.
READ_ALLOWANCE = 1.3
# The roofline model's target: training and backward with out= within this factor of the
# least their passes over memory can cost (roofline_model)
ROOFLINE_TARGET = 1.15


def roofline_model(layout, channel_bytes, l2_bytes, t_infer, t_read):
    """The least a training forward and a backward with out= can cost, from I = inference
    with out= (one read of x and one write, at the copy limit) and R = one read pass over
    x: NCHW training I + k R and backward I + R + 2 k R, where k = 0 when one channel of x
    fits in half the L2 cache of a core (its statistics pass leaves it there for the
    normalization) and 1 otherwise; NHWC training I + R and backward I + 3 R (the rows
    kernels read x, or dy and x, in a pass of their own). Returns (train, backward, k)."""
    if layout == "NCHW":
        k = 0 if channel_bytes <= l2_bytes // 2 else 1
        return t_infer + k * t_read, t_infer + t_read + 2 * k * t_read, k
    return t_infer + t_read, t_infer + 3 * t_read, 1


def _fmt_ms(t):
    return f"{'-':>9}" if not np.isfinite(t) else f"{t * 1e3:9.3f}"


def _fmt_ratio(r):
    return f"{'-':>6}" if not np.isfinite(r) else f"{r:6.2f}"


def _ratio(a, b):
    """a / b, NaN when either time is missing (a column that was not measured)."""
    return a / b if np.isfinite(a) and np.isfinite(b) else float("nan")


def run(shapes=SHAPES, layouts=("NCHW", "NHWC"), dtype=np.float32, threads=None,
        rounds=7, with_reference=True, with_torch=True, roofline=True, caffe=True, fused=True,
        with_ort=True, file=None):
    """Print the speed table; return its rows as dicts. threads None: get_num_threads()
    for fastbn and the peers alike, and the latency rows time fastbn's calls with
    num_threads=None (its default, one thread while the machine is contended)."""
    file = file or sys.stdout
    default_threads = threads is None
    threads = _threads.get_num_threads() if threads is None else threads
    torch = torch_module() if with_torch else None
    if torch is not None:
        torch.set_num_threads(threads)
    _config.show_config(file=file)
    print(f"  {'threads used':<16} {threads}", file=file)
    print(f"  {'torch':<16} {torch.__version__ if torch is not None else 'not installed'}",
          file=file)
    with_ort = with_ort and ort_modules() is not None
    print(f"  {'onnxruntime':<16} {ort_version()}", file=file)
    print(f"\ndtype {np.dtype(dtype).name}; times in ms, best of {rounds} interleaved rounds, "
          "fresh outputs; ref = NumPy reference (fastbn.reference); speed-up = ref/fastbn; "
          "vs torch = fastbn/torch; ort = ONNX Runtime's BatchNormalization node (inference, "
          "NCHW), vs ort = fastbn/ort (lower is better)\n", file=file)
    print(LEGEND, file=file)
    head = (f"{'shape':<20} {'layout':<6} {'op':<9} {'fastbn':>9} {'ref':>9} {'torch':>9} "
            f"{'speed-up':>8} {'vs torch':>8} {'ort':>9} {'vs ort':>6}")
    print(head, file=file)
    print("-" * len(head), file=file)
    rows = []
    # (N, C) is the same array in both layouts: timed as NCHW only
    jobs = [(shape, layout) for shape in shapes for layout in layouts
            if not (len(shape) == 2 and layout == "NHWC")]
    total = len(jobs) + bool(caffe)
    done = 0
    for shape, layout in jobs:
        case = Case(shape, layout, dtype, threads, torch)
        rows += op_rows(case, shape, layout, rounds, with_reference, file, with_ort)
        if case.x.nbytes <= SMALL_BYTES:
            rows.append(latency_row(case, shape, layout, file,
                                    default_threads=default_threads))
        if case.x.nbytes > LARGE_BYTES:
            rows.append(self_ratios(case, shape, layout, rows, rounds, file))
            if fused:
                rows.append(fused_ratios(case, shape, layout, rounds, file))
            if roofline:
                rows.append(roofline_row(case, shape, layout, rounds, file))
        done += 1
        print(f"  [{done}/{total}]", file=sys.stderr, flush=True)
    if caffe:
        print("\nCaffe BatchNorm layer, NCHW, float32: engine='fused' (fastbn kernels) vs "
              "engine='gemv' (Caffe's BLAS call sequence)", file=file)
        caffe_rows.main(file=file, shapes=[s for s in shapes if len(s) == 4][:2], rounds=rounds)
        done += 1
        print(f"  [{done}/{total}]", file=sys.stderr, flush=True)
    print("", file=file)
    for line in summary(rows):
        print(line, file=file)
    return rows


LEGEND = """\
Rows: train, infer, backward: one call each (fresh outputs); below them, per shape:
  BRN train  batch_renorm_train against batch_norm_train (same data)
  latency    small inputs: p50 / p99 of consecutive calls on fastbn's default threads
             (a thread the scheduler puts aside shows in the p99 only)
  self       large inputs: fastbn against itself (train and backward against inference)
  fused      large inputs: the fused residual add + ReLU calls against the plain ones
  roofline   large inputs, out=: train and backward against the least their passes over
             memory cost (I = inference, R = one read pass; target <= %g)
  train out= large inputs: training with out= against one read pass plus one copy pass
""" % ROOFLINE_TARGET


def summary(rows):
    """The closing lines of the speed table: wins and losses against each peer (ratios of
    fastbn's time, lower is better) and the roofline rows over their target."""
    timed = [r for r in rows if r.get("op") in OPS]
    lines = ["Summary (fastbn's time / the peer's; < 1: fastbn faster):"]
    for key, name in (("vs_torch", "PyTorch"), ("vs_ort", "ONNX Runtime (inference)"),
                      ("speedup", "NumPy reference")):
        ratios = [(1 / r[key] if key == "speedup" else r[key], r) for r in timed
                  if np.isfinite(r.get(key, np.nan))]
        if not ratios:
            lines.append(f"  {name}: not measured")
            continue
        values = np.array([v for v, _ in ratios])
        slower = sorted([(v, r) for v, r in ratios if v > 1], key=lambda t: -t[0])
        text = (f"  {name}: fastbn faster in {int((values < 1).sum())} of {len(values)} rows "
                f"(median {np.median(values):.2f}, {values.min():.2f}-{values.max():.2f})")
        if slower:
            worst = ", ".join(f"{r['shape']} {r['layout']} {r['op']} {v:.2f}"
                              for v, r in slower[:3])
            text += f"; slower: {worst}" + (" ..." if len(slower) > 3 else "")
        lines.append(text)
    roof = [r for r in rows if r.get("op") == "self"]
    if roof:
        over = [f"{r['shape']} {r['layout']} {what} {r[key]:.2f}"
                for r in roof for what, key in (("train", "train_vs_model"),
                                                ("backward", "backward_vs_model"))
                if r[key] > ROOFLINE_TARGET]
        n = 2 * len(roof)
        text = f"  roofline: {n - len(over)} of {n} within {ROOFLINE_TARGET:g}x of the model"
        lines.append(text + (f"; over: {', '.join(over)}" if over else ""))
    return lines


def op_rows(case, shape, layout, rounds, with_reference, file, with_ort=True):
    """The rows of one shape and layout: fastbn, the reference, PyTorch and (inference, NCHW)
    ONNX Runtime for each of OPS, and Batch Renormalization's training forward against
    Batch Normalization's."""
    rows = []
    for op in OPS:
        ref_rounds = 1 if case.x.nbytes > LARGE_BYTES else 3
        t_fast, t_peer, t_ort = interleaved([case.fast(op), case.peer(op),
                                             case.ort(op, with_ort)], rounds)
        t_ref = (interleaved([case.ref(op)], ref_rounds, budget=5.0)[0]
                 if with_reference else np.inf)
        row = dict(shape=shape, layout=layout, op=op, fastbn=t_fast, ref=t_ref,
                   torch=t_peer, speedup=_ratio(t_ref, t_fast),
                   vs_torch=_ratio(t_fast, t_peer), ort=t_ort, vs_ort=_ratio(t_fast, t_ort))
        rows.append(row)
        print(f"{str(shape):<20} {layout:<6} {op:<9} {_fmt_ms(t_fast)} {_fmt_ms(t_ref)} "
              f"{_fmt_ms(t_peer)} {_fmt_ratio(row['speedup']):>8} "
              f"{_fmt_ratio(row['vs_torch']):>8} {_fmt_ms(t_ort)} "
              f"{_fmt_ratio(row['vs_ort'])}", file=file, flush=True)
    t_bn, t_brn = interleaved([case.fast("train"), case.renorm_train()], rounds)
    rows.append(dict(shape=shape, layout=layout, op="brn_train", fastbn=t_brn, bn=t_bn,
                     vs_bn=t_brn / t_bn))
    print(f"{str(shape):<20} {layout:<6} {'BRN train':<9} {_fmt_ms(t_brn)}  "
          f"batch_renorm_train / batch_norm_train: {t_brn / t_bn:.2f}", file=file, flush=True)
    return rows


def latency_row(case, shape, layout, file, calls=LATENCY_CALLS, default_threads=False):
    """p50 and p99 of `calls` consecutive fastbn calls of each op (fresh outputs), beside
    the best time of the op rows: on a shared machine a thread of the team that the
    scheduler puts aside shows in the p99 only."""
    row = dict(shape=shape, layout=layout, op="latency", calls=calls)
    parts = []
    for op in OPS:
        p50, p99 = np.percentile(latencies(case.fast(op, default_threads), calls), [50, 99])
        row[op] = (p50, p99)
        parts.append(f"{op} {p50 * 1e3:.3f} / {p99 * 1e3:.3f}")
    print(f"{str(shape):<20} {layout:<6} {'latency':<9} fastbn p50 / p99 of {calls} calls (ms): "
          + ", ".join(parts), file=file, flush=True)
    return row


def roofline_row(case, shape, layout, rounds, file):
    """The training forward with out= against one read pass plus one copy pass."""
    t_out, t_read, t_copy = interleaved(
        [case.fast("train_out"), case.read_pass(), case.copy_pass()], rounds)
    row = dict(shape=shape, layout=layout, op="train_out", fastbn=t_out, read=t_read,
               copy=t_copy, roofline=t_out / (t_read + t_copy))
    print(f"{str(shape):<20} {layout:<6} {'train out=':<9}{_fmt_ms(t_out)}  "
          f"read pass {t_read * 1e3:.3f} + copy pass {t_copy * 1e3:.3f} ms: "
          f"{row['roofline']:.2f}x of (read + copy)", file=file, flush=True)
    return row


def self_ratios(case, shape, layout, rows, rounds, file):
    """fastbn against itself on one large input: training and backward against inference
    (with fresh outputs, from the rows already timed, and with out=), and training and
    backward with out= against the roofline model (roofline_model). These ratios depend on
    the memory system only, not on a peer."""
    t_train, t_infer, t_bwd, t_read = interleaved(
        [case.fast("train_out"), case.fast("infer_out"), case.fast("backward_out"),
         case.read_pass()], rounds)
    fresh = {r["op"]: r["fastbn"] for r in rows
             if r["shape"] == shape and r["layout"] == layout and r["op"] in OPS}
    channel_bytes = case.x.nbytes // shape[1 if layout == "NCHW" else -1]
    m_train, m_bwd, k = roofline_model(layout, channel_bytes, _memory.L2_BYTES, t_infer,
                                       t_read)
    row = dict(shape=shape, layout=layout, op="self", train_out=t_train, infer_out=t_infer,
               backward_out=t_bwd, read=t_read,
               train_infer_fresh=_ratio(fresh.get("train", np.nan), fresh.get("infer", np.nan)),
               train_infer_out=t_train / t_infer, backward_infer_out=t_bwd / t_infer,
               k=k, train_model=m_train, backward_model=m_bwd,
               train_vs_model=t_train / m_train, backward_vs_model=t_bwd / m_bwd)
    print(f"{str(shape):<20} {layout:<6} {'self':<9} train/infer {row['train_infer_fresh']:.2f} "
          f"(fresh), {row['train_infer_out']:.2f} (out=); backward/infer (out=) "
          f"{row['backward_infer_out']:.2f}", file=file, flush=True)
    rt = "I + R" if layout == "NHWC" else f"I + {k}R"
    rb = "I + 3R" if layout == "NHWC" else f"I + {1 + 2 * k}R"
    print(f"{str(shape):<20} {layout:<6} {'roofline':<9} (out=; I = infer {t_infer * 1e3:.3f} ms, "
          f"R = read pass {t_read * 1e3:.3f} ms; target <= {ROOFLINE_TARGET:g}) train "
          f"{row['train_vs_model']:.2f}x of {rt}, backward {row['backward_vs_model']:.2f}x of "
          f"{rb}", file=file, flush=True)
    return row


def fused_ratios(case, shape, layout, rounds, file):
    """The fused residual add + ReLU against the plain kernels on one large input: the
    ReLU's cost (relu_train / train and relu_infer / infer, out= both), the residual's
    (relu_infer with a residual against inference plus 1.3 read passes: the residual is one
    more read), what fusing saves (fused, fresh output, against fastbn then np.maximum in
    place) and the backward's (relu_backward / backward, out=; it also reads y; and the
    layers' backward, BatchNorm(activation="relu") against BatchNorm, fresh outputs: the
    ReLU layer keeps the forward's mask as bits where the kernels read them, not y)."""
    names = ("train_out", "relu_train", "infer_out", "relu_infer", "relu_infer_res", "read",
             "relu_train_fresh", "then_max_train", "relu_infer_fresh", "then_max_infer",
             "backward_out", "relu_backward", "layer_backward", "layer_relu_backward")
    funcs = [case.read_pass() if k == "read" else case.fast(k) if k in ("train_out",
             "infer_out", "backward_out") else case.fused(k) for k in names]
    t = dict(zip(names, interleaved(funcs, rounds)))
    row = dict(shape=shape, layout=layout, op="fused", times=t,
               relu_train=t["relu_train"] / t["train_out"],
               relu_infer=t["relu_infer"] / t["infer_out"],
               residual=t["relu_infer_res"] / (t["infer_out"] + READ_ALLOWANCE * t["read"]),
               vs_max_train=t["relu_train_fresh"] / t["then_max_train"],
               vs_max_infer=t["relu_infer_fresh"] / t["then_max_infer"],
               relu_backward=t["relu_backward"] / t["backward_out"],
               layer_backward=t["layer_relu_backward"] / t["layer_backward"])
    print(f"{str(shape):<20} {layout:<6} {'fused':<9} relu_train/train {row['relu_train']:.2f}, "
          f"relu_infer/infer {row['relu_infer']:.2f} (out=); relu_infer+residual / (infer + "
          f"{READ_ALLOWANCE:g} read) {row['residual']:.2f}; fused / (fastbn then np.maximum) train "
          f"{row['vs_max_train']:.2f}, infer {row['vs_max_infer']:.2f}; relu_backward/backward "
          f"{row['relu_backward']:.2f}; layer relu/plain backward {row['layer_backward']:.2f}",
          file=file, flush=True)
    return row


def fused_table(shapes=LARGE[:2], layouts=("NCHW", "NHWC"), dtype=np.float32, threads=None,
                rounds=7, file=None):
    """Only the fused residual add + ReLU rows (``python -m fastbn --fused``)."""
    file = file or sys.stdout
    threads = _threads.get_num_threads() if threads is None else threads
    print(f"dtype {np.dtype(dtype).name}, {threads} threads, best of {rounds} interleaved "
          "rounds", file=file)
    return [fused_ratios(Case(shape, layout, dtype, threads), shape, layout, rounds, file)
            for shape in shapes for layout in layouts]


def crossover(sizes=(1 << 12, 1 << 13, 1 << 14, 1 << 15, 1 << 16, 1 << 17, 1 << 18),
              channels=16, rounds=200, file=None):
    """Time 1 against 2 threads on small inputs, to place the serial thresholds of each view
    (fastbn._threads.SERIAL_BELOW_PLANAR for NCHW, SERIAL_BELOW_ROWS for NHWC) for each op:
    the training forward, the inference and the backward, float32, fresh outputs (as small
    calls run, through the lean path of fastbn/kernels/lean.pxi, on either count)."""
    file = file or sys.stdout
    print(f"{'values':>8} {'layout':<6} {'op':<9} {'1 thread us':>12} {'2 threads us':>13} "
          f"{'2/1':>6}", file=file)
    with _threads.serial_below(planar=0, rows=0):        # every size may fork
        for size in sizes:
            for layout in ("NCHW", "NHWC"):
                shape = (4, channels, size // (4 * channels))
                x, dy, w, b = make_data(shape, layout, np.float32)
                rm, rv = np.zeros_like(w), np.ones_like(w)
                _, mean, invstd = functional.batch_norm_train(x, w, b, layout=layout)
                ops = {"train": lambda n: functional.batch_norm_train(
                           x, w, b, layout=layout, num_threads=n),
                       "infer": lambda n: functional.batch_norm_infer(
                           x, rm, rv, w, b, layout=layout, num_threads=n),
                       "backward": lambda n: functional.batch_norm_backward(
                           dy, x, mean, invstd, w, layout=layout, num_threads=n)}
                for op, f in ops.items():
                    t1, t2 = interleaved([lambda: f(1), lambda: f(2)], rounds)
                    print(f"{size:8d} {layout:<6} {op:<9} {t1 * 1e6:12.1f} {t2 * 1e6:13.1f} "
                          f"{t2 / t1:6.2f}", file=file, flush=True)


def markdown(rows, threads, dtype=np.float32):
    """The speed table as Markdown (for README.md and docs/performance.rst)."""
    ms = lambda t: "-" if not np.isfinite(t) else f"{t * 1e3:.3f}"
    ratio = lambda r: "-" if not np.isfinite(r) else f"{r:.2f}"
    lines = [f"{np.dtype(dtype).name}, {threads} threads; times in ms (best of the interleaved "
             "rounds, fresh outputs); speed-up = NumPy reference / fastbn; vs torch = fastbn / "
             "PyTorch; vs ort = fastbn / ONNX Runtime (inference, NCHW) (lower is better)", "",
             "| shape | layout | op | fastbn | reference | torch | speed-up | vs torch | ort | "
             "vs ort |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    extra = []
    for r in rows:
        shape = "(" + ", ".join(str(v) for v in r["shape"]) + ")"
        if r["op"] in OPS:
            lines.append(f"| {shape} | {r['layout']} | {r['op']} | {ms(r['fastbn'])} | "
                         f"{ms(r['ref'])} | {ms(r['torch'])} | {ratio(r['speedup'])} | "
                         f"{ratio(r['vs_torch'])} | {ms(r.get('ort', np.inf))} | "
                         f"{ratio(r.get('vs_ort', np.nan))} |")
        elif r["op"] == "brn_train":
            extra.append(f"| {shape} | {r['layout']} | batch_renorm_train / batch_norm_train "
                         f"| {ratio(r['vs_bn'])} |")
        elif r["op"] == "self":
            extra.append(f"| {shape} | {r['layout']} | train / infer (fresh outputs; out=) | "
                         f"{ratio(r['train_infer_fresh'])}; {ratio(r['train_infer_out'])} |")
            extra.append(f"| {shape} | {r['layout']} | backward / infer (out=) | "
                         f"{ratio(r['backward_infer_out'])} |")
            extra.append(f"| {shape} | {r['layout']} | train(out=) / roofline model "
                         f"(I + kR, k = {r['k']}) | {ratio(r['train_vs_model'])} "
                         f"({ms(r['train_out'])} ms vs {ms(r['train_model'])}) |")
            extra.append(f"| {shape} | {r['layout']} | backward(out=) / roofline model "
                         f"| {ratio(r['backward_vs_model'])} ({ms(r['backward_out'])} ms vs "
                         f"{ms(r['backward_model'])}) |")
        elif r["op"] == "fused":
            extra.append(f"| {shape} | {r['layout']} | relu_train / train; relu_infer / infer "
                         f"(out=) | {ratio(r['relu_train'])}; {ratio(r['relu_infer'])} |")
            extra.append(f"| {shape} | {r['layout']} | relu_infer with a residual / (infer + "
                         f"{READ_ALLOWANCE:g} read pass) (out=) | {ratio(r['residual'])} |")
            extra.append(f"| {shape} | {r['layout']} | fused / (fastbn then np.maximum), "
                         f"train; infer (fresh) | {ratio(r['vs_max_train'])}; "
                         f"{ratio(r['vs_max_infer'])} |")
            extra.append(f"| {shape} | {r['layout']} | relu_backward / backward (out=) | "
                         f"{ratio(r['relu_backward'])} |")
            extra.append(f"| {shape} | {r['layout']} | BatchNorm(activation=\"relu\") / "
                         f"BatchNorm, backward (fresh) | {ratio(r['layer_backward'])} |")
        elif r["op"] == "latency":
            extra.append(f"| {shape} | {r['layout']} | p50 / p99 of {r['calls']} calls (ms): "
                         + "; ".join(f"{op} {ms(r[op][0])} / {ms(r[op][1])}" for op in OPS)
                         + " | - |")
        elif r["op"] == "train_out":
            extra.append(f"| {shape} | {r['layout']} | train out= / (read pass + copy pass) "
                         f"| {ratio(r['roofline'])} ({ms(r['fastbn'])} ms vs {ms(r['read'])} + "
                         f"{ms(r['copy'])}) |")
    if extra:
        lines += ["", "| shape | layout | comparison | ratio |", "|---|---|---|---|"] + extra
    return "\n".join(lines)
