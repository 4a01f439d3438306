"""The kernels' own memory: scratch that cannot be had is a MemoryError (never NaN
statistics or sums computed another way; the inputs and the running statistics unchanged,
out= may have been written), and no C allocation leaks (the process's resident memory over
thousands of calls, which tracemalloc in test_leaks.py cannot see)."""
import os
import sys

import numpy as np
import pytest

import fastbn
from fastbn._dispatch import kernels

try:
    import ml_dtypes
    HALF = [np.float16, ml_dtypes.bfloat16]
except ImportError:
    HALF = [np.float16]

DTYPES = [np.float32, np.float64] + HALF


@pytest.fixture
def no_scratch():
    """Every kernel scratch allocation fails, as with memory exhausted."""
    previous = kernels.scratch_limit(0)
    yield
    kernels.scratch_limit(previous)


def rows(dtype, shape=(64, 3, 3, 40)):
    """Channels-last data (the rows kernels, which reduce through per-thread scratch)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    g = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    return x, g


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_forward_without_scratch_raises(dtype, threads, no_scratch, snapshot):
    x, _ = rows(dtype)
    pdt = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    rm, rv = np.zeros(40, pdt), np.ones(40, pdt)
    out = np.full_like(x, 7)
    snap = snapshot(x, rm, rv)
    with pytest.raises(MemoryError, match="kernel's scratch"):
        fastbn.batch_norm_train(x, running_mean=rm, running_var=rv, layout="NHWC", out=out,
                                num_threads=threads)
    snap.assert_unchanged()
    with pytest.raises(MemoryError):
        fastbn.batch_norm_relu_train(x, residual=x, layout="NHWC", num_threads=threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32] + HALF)     # float64 sums need no scratch
def test_backward_without_scratch_raises(dtype, threads, snapshot):
    x, g = rows(dtype)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, layout="NHWC")
    want = fastbn.batch_norm_backward(g, x, mean, invstd, layout="NHWC", num_threads=threads)
    out, dres = np.full_like(x, 7), np.full_like(x, 7)
    snap = snapshot(g, x, mean, invstd)
    previous = kernels.scratch_limit(0)
    try:
        with pytest.raises(MemoryError, match="kernel's scratch"):
            fastbn.batch_norm_backward(g, x, mean, invstd, layout="NHWC", out=out,
                                       num_threads=threads)
        with pytest.raises(MemoryError, match="kernel's scratch"):
            fastbn.batch_norm_relu_backward(g, y, x, mean, invstd, layout="NHWC", out=out,
                                            dresidual=dres, num_threads=threads)
        snap.assert_unchanged()
    finally:
        kernels.scratch_limit(previous)
    # with the memory back, the same call gives the same bits as before
    got = fastbn.batch_norm_backward(g, x, mean, invstd, layout="NHWC", num_threads=threads)
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()


def test_the_limit_is_only_a_limit(no_scratch):
    """The planar kernels (NCHW memory) allocate no scratch, inference none either; and
    a generous limit lets every call through."""
    x = np.random.default_rng(2).standard_normal((8, 4, 6, 6)).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x)
    fastbn.batch_norm_backward(x, x, mean, invstd)
    fastbn.batch_norm_infer(np.moveaxis(x, 1, -1).copy(), mean, 1 / invstd ** 2,
                            layout="NHWC")
    kernels.scratch_limit(1 << 30)
    xr, _ = rows(np.float16)
    fastbn.batch_norm_train(xr, layout="NHWC")


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_no_c_allocation_leaks(dtype):
    """Kernel scratch, partials and mask bits (C malloc/free) over 3000 calls of each kind,
    failed ones included: the resident memory does not grow by more than the allocator's
    slack (a leak of even the smallest scratch, a few KiB per call, would show as 10+ MB)."""
    x, g = rows(dtype, (16, 2, 2, 64))
    y, out = np.empty_like(x), np.empty_like(x)

    def calls():
        _, mean, invstd = fastbn.batch_norm_relu_train(x, layout="NHWC", out=y)
        fastbn.batch_norm_relu_backward(g, y, x, mean, invstd, layout="NHWC", out=out)
        fastbn.batch_norm_train(x, layout="NHWC", num_threads=2, out=out)
        fastbn.batch_norm_backward(g, x, mean, invstd, layout="NHWC", num_threads=2, out=out)
        previous = kernels.scratch_limit(0)
        try:
            fastbn.batch_norm_train(x, layout="NHWC", out=out)
        except MemoryError:
            pass
        finally:
            kernels.scratch_limit(previous)

    for _ in range(300):                     # the allocator's pools reach their size
        calls()
    before = resident_bytes()
    for _ in range(3000):
        calls()
    grown = resident_bytes() - before
    assert grown < 4 << 20, f"resident memory grew by {grown / 2 ** 20:.1f} MiB"
