"""Speed of the Caffe BatchNorm layer's two engines (``engine="fused"`` vs ``"gemv"``).

Both engines run in one process, one after the other (each the best of its rounds), on the
same data from fastbn.bench.timing.make_data, writing into preallocated outputs (as Caffe's
top and bottom blobs are). They are not interleaved: OpenBLAS's threads spin for a while
after each gemv call and would slow the fused engine's threads that follow.
``python -m fastbn.bench.caffe`` prints the rows.
"""
import sys

import numpy as np

from ..caffe import ENGINES, BatchNorm
from .timing import interleaved, make_data

SHAPES = [(32, 256, 56, 56), (8, 32, 8, 8)]


def bench_rows(shapes=SHAPES, dtype=np.float32, rounds=5):
    """Time forward (TRAIN) and backward of both engines.

    Parameters
    ----------
    shapes : sequence of tuple
        NCHW input shapes.
    dtype : {np.float32, np.float64}
    rounds : int
        Interleaved rounds; each time is the best round.

    Returns
    -------
    list of dict
        One row per (shape, op) with keys ``shape``, ``dtype``, ``op`` ("forward TRAIN" or
        "backward"), ``fused`` and ``gemv`` (seconds) and ``ratio`` (gemv / fused).

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.bench.caffe import bench_rows
    >>> rows = bench_rows([(2, 3, 4, 4)], rounds=1)
    >>> [r["op"] for r in rows], sorted(rows[0])
    (['forward TRAIN', 'backward'], ['dtype', 'fused', 'gemv', 'op', 'ratio', 'shape'])
    """
    rows = []
    dtype = np.dtype(dtype).type
    for shape in shapes:
        x, dy, _, _ = make_data(shape, "NCHW", dtype)
        layers = [BatchNorm(shape[1], engine=e, dtype=dtype) for e in ENGINES]
        tops = [np.empty_like(x) for _ in ENGINES]
        diffs = [np.empty_like(x) for _ in ENGINES]
        fwd = [lambda bn=bn, top=top: bn.forward(x, phase="TRAIN", out=top)
               for bn, top in zip(layers, tops)]
        bwd = [lambda bn=bn, dx=dx: bn.backward(dy, out=dx) for bn, dx in zip(layers, diffs)]
        for op, funcs in (("forward TRAIN", fwd), ("backward", bwd)):
            # one engine after the other, not interleaved: after a BLAS call OpenBLAS's
            # threads keep spinning for a while and would steal the cores from the fused
            # engine's OpenMP threads (on 2 cores that made small fused calls 20x slower)
            t_fused = interleaved(funcs[:1], rounds)[0]
            t_gemv = interleaved(funcs[1:], rounds)[0]
            rows.append(dict(shape=tuple(shape), dtype=np.dtype(dtype).name, op=op,
                             fused=t_fused, gemv=t_gemv, ratio=t_gemv / t_fused))
    return rows


def main(file=None, shapes=SHAPES, rounds=5):
    """Print :func:`bench_rows` (float32)."""
    file = file or sys.stdout
    print(f"{'shape':<20} {'op':<14} {'fused ms':>9} {'gemv ms':>9} {'gemv/fused':>10}",
          file=file)
    for r in bench_rows(shapes, rounds=rounds):
        print(f"{str(r['shape']):<20} {r['op']:<14} {r['fused'] * 1e3:9.3f} "
              f"{r['gemv'] * 1e3:9.3f} {r['ratio']:10.2f}", file=file, flush=True)


if __name__ == "__main__":
    main()
