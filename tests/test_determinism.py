"""Bit-identical results for 1 and 2 threads (num_threads= and threadpoolctl) and across
repeated calls, for every kernel, both layouts and the shapes that pick different paths:
C < threads (a team of threads per channel), C = 1, HW = 1, (N, C), several row chunks.
Inputs are large enough (>= 2**16 values) that fastbn does use its threads.
"""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastbn
from cases import THREADS
from fastbn import _dispatch, _memory

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

# (shape, layout): every case of tests/cases.py that runs on several threads, and a
# channels-last array described as NCHW (rows kernel, no copy)
CASES = [(c.shape, c.layout) for c in THREADS] + [("channels-last-NCHW", "NCHW")]
DTYPES = [np.float32, np.float64]


def _make(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if shape == "channels-last-NCHW":
        a = rng.normal(5.0, 3.0, size=(8, 64, 48, 3)).transpose(0, 3, 1, 2)
        return a.astype(dtype)          # NCHW shape, NHWC memory
    return rng.normal(5.0, 3.0, size=shape).astype(dtype)


def _kernels(x, layout):
    """Every kernel's results (as tuples of arrays) for x, by name, for one thread setting."""
    axis = 1 if layout == "NCHW" else x.ndim - 1
    C = x.shape[axis]
    rng = np.random.default_rng(7)
    w, b = rng.normal(size=C), rng.normal(size=C)
    g = _make(x.shape, x.dtype, 11) if x.flags.c_contiguous else _make("channels-last-NCHW",
                                                                        x.dtype, 11)
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)

    def run(num_threads):
        rm1, rv1 = rm.copy(), rv.copy()
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm1,
                                                  running_var=rv1, num_threads=num_threads)
        out = {"train": (y, mean, invstd, rm1, rv1)}
        out["infer"] = (fastbn.batch_norm_infer(x, rm, rv, w, b, layout=layout,
                                                num_threads=num_threads),)
        out["backward"] = fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout,
                                                     num_threads=num_threads)
        out["backward-eval"] = fastbn.batch_norm_backward(
            g, x, rm, 1 / np.sqrt(rv + 1e-5), w, training=False, layout=layout,
            num_threads=num_threads)
        rm2, rs2 = rm.copy(), np.sqrt(rv)
        out["renorm"] = fastbn.batch_renorm_train(x, w, b, rm2, rs2, layout=layout,
                                                  num_threads=num_threads) + (rm2, rs2)
        _, m, s, r, d = out["renorm"][:5]
        out["renorm-backward"] = fastbn.batch_renorm_backward(g, x, m, s, r, d, w, layout=layout,
                                                              num_threads=num_threads)
        return out
    return run


def _assert_identical(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        for i, (u, v) in enumerate(zip(a[k], b[k])):
            assert u.dtype == v.dtype and u.shape == v.shape
            # bit-identical: compare the bytes, so -0.0/0.0 and NaN payloads count too
            assert np.ascontiguousarray(u).tobytes() == np.ascontiguousarray(v).tobytes(), \
                f"{what}: {k} result {i} differs (max |diff| " \
                f"{np.nanmax(np.abs(u.astype(np.float64) - v.astype(np.float64)))})"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape, layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
def test_thread_count_invariance(shape, layout, dtype):
    x = _make(shape, dtype, 3)
    run = _kernels(x, layout)
    one = run(1)
    _assert_identical(one, run(2), "num_threads=2 vs 1")
    _assert_identical(one, run(1), "repeated num_threads=1")
    _assert_identical(one, run(2), "repeated num_threads=2")
    with threadpool_limits(limits=1):
        _assert_identical(one, run(None), "threadpool_limits(1)")
    with threadpool_limits(limits=2):
        _assert_identical(one, run(None), "threadpool_limits(2)")
    fastbn.set_num_threads(2)
    try:
        _assert_identical(one, run(None), "set_num_threads(2)")
    finally:
        fastbn.set_num_threads(None)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_odd_thread_counts_and_in_place(layout):
    # more threads than cores and than channels; out= and in-place give the same bits
    shape = (6, 2, 90, 70) if layout == "NCHW" else (6, 90, 70, 2)
    x = _make(shape, np.float32, 5)
    ref = fastbn.batch_norm_train(x, layout=layout, num_threads=1)
    for n in (3, 5, 8):
        got = fastbn.batch_norm_train(x, layout=layout, num_threads=n)
        _assert_identical({"t": ref}, {"t": got}, f"num_threads={n}")
    xi = x.copy()
    y, mean, invstd = fastbn.batch_norm_train(xi, layout=layout, out=xi, num_threads=2)
    assert y is xi
    _assert_identical({"t": ref}, {"t": (y, mean, invstd)}, "in place, 2 threads")
    g = _make(shape, np.float32, 6)
    dref = fastbn.batch_norm_backward(g, x, mean, invstd, layout=layout, num_threads=1)
    gi = g.copy()
    dgot = fastbn.batch_norm_backward(gi, x, mean, invstd, layout=layout, out=gi, num_threads=2)
    assert dgot[0] is gi
    _assert_identical({"b": dref}, {"b": dgot}, "backward in place, 2 threads")


@pytest.mark.parametrize("engine", ["fused", "gemv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_caffe_engines_thread_invariance(engine, dtype):
    # the gemv engine runs BLAS: threadpool_limits bounds its threads as well as OpenMP's
    x = _make((8, 3, 64, 48), dtype, 3)
    g = _make((8, 3, 64, 48), dtype, 4)

    def run():
        layer = fastbn.caffe.BatchNorm(3, engine=engine, dtype=dtype)
        y = layer.forward(x, phase="TRAIN").copy()
        dx = layer.backward(g).copy()
        yt = layer.forward(x, phase="TEST").copy()
        return {"c": (y, dx, yt) + tuple(b.copy() for b in layer.blobs)}

    with threadpool_limits(limits=1):
        one = run()
    with threadpool_limits(limits=2):
        _assert_identical(one, run(), f"caffe {engine}, 2 threads")
    _assert_identical(one, run(), f"caffe {engine}, default threads")


GROUPED = [(c.shape, c.layout) for c in THREADS if c.branch.startswith("planar groups")]


@pytest.mark.parametrize("dtype", DTYPES + ([ml_dtypes.bfloat16] if ml_dtypes else []),
                         ids=str)
@pytest.mark.parametrize("shape, layout", GROUPED, ids=[f"{s}-{l}" for s, l in GROUPED])
def test_group_bytes_do_not_change_results(shape, layout, dtype):
    """How many channels a planar group holds (the cache budget fastbn._dispatch sets from
    the CPU's L2 size) changes the order in which channels are visited, never a result."""
    x = _make(shape, np.float32, 4).astype(dtype)
    run = _kernels(x, layout)
    kernels = _dispatch.kernels
    saved = kernels.group_bytes(1 << 40)
    try:
        one = run(2)
        for budget in (1, 64 << 10, 1 << 20):
            kernels.group_bytes(budget)
            _assert_identical(one, run(2), f"group_bytes({budget})")
            _assert_identical(one, run(1), f"group_bytes({budget}), 1 thread")
    finally:
        kernels.group_bytes(saved)


def test_group_bytes_come_from_the_cpus_l2():
    assert _dispatch.kernels.group_bytes(1) == max(_memory.L2_BYTES // 2, 1)
    _dispatch.kernels.group_bytes(max(_memory.L2_BYTES // 2, 1))
    with pytest.raises(ValueError, match="positive"):
        _dispatch.kernels.group_bytes(0)
