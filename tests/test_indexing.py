"""64-bit indexing: shapes whose element count exceeds 2**31.

The cheap tests plan and validate such shapes without allocating them (a zero-stride
broadcast view stands for the input; every check that runs before a copy must reject it
quickly). The slow tests build a real float32 input of more than 2**31 elements (8.6 GB),
only when that much memory is free, and check values past element 2**31 in the planar and
the rows kernels.
"""
import time

import numpy as np
import pytest

import fastbn
from fastbn import _calls

BIG = 2 ** 31 + 2 ** 20          # elements: past the int32 range


def _mem_available():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _broadcast(shape, dtype=np.float32):
    return np.broadcast_to(np.ones((), dtype=dtype), shape)


SHAPES = [((2, 2, BIG // 4), "NCHW"), ((BIG // 2, 2), "NHWC"), ((3, 2 ** 11, 2 ** 10, 2 ** 10), "NCHW"),
          ((2 ** 12, 2 ** 10, 2 ** 10, 1), "NHWC"), ((2, 1, 2 ** 31 + 7), "NCHW")]


@pytest.mark.parametrize("shape, layout", SHAPES)
def test_plan_of_huge_shapes(shape, layout):
    """The canonical (N, C, S) / (R, C) dims of a > 2**31-element shape cover it exactly."""
    make, cands = _calls._make_plan, _calls._candidates
    size = int(np.prod(shape, dtype=np.int64))
    assert size > 2 ** 31
    axis = 1 if layout == "NCHW" else len(shape) - 1
    for view, perm in cands(len(shape), axis, layout):
        plan = make(shape, axis, view, perm)
        assert plan.C == shape[axis]
        assert plan.N * plan.C * plan.S == size
        assert all(isinstance(v, (int, np.integer)) for v in (plan.N, plan.C, plan.S))
        if plan.view == _calls.ROWS:
            assert plan.S == 1


@pytest.mark.parametrize("shape, layout", SHAPES)
def test_validation_of_huge_views_does_not_copy(shape, layout):
    x = _broadcast(shape)
    C = shape[1] if layout == "NCHW" else shape[-1]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="eps"):
        fastbn.batch_norm_train(x, layout=layout, eps=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        fastbn.batch_norm_train(x, layout=layout, momentum=2.0)
    with pytest.raises(ValueError, match="out"):
        fastbn.batch_norm_train(x, layout=layout, out=x)           # read-only view
    with pytest.raises(ValueError, match="running_mean"):
        fastbn.batch_norm_infer(x, np.zeros(C + 1), np.ones(C), layout=layout)
    with pytest.raises(ValueError, match="out"):
        fastbn.batch_norm_infer(x, np.zeros(C), np.ones(C), layout=layout,
                                out=np.empty((2, 2), np.float32))
    with pytest.raises(ValueError, match="invstd"):
        fastbn.batch_norm_backward(x, x, np.zeros(C), np.ones(C + 2), layout=layout)
    with pytest.raises(TypeError, match="dy"):
        fastbn.batch_norm_backward(_broadcast(shape, np.float64), x, np.zeros(C), np.ones(C),
                                   layout=layout)
    # a copy of these views would take gigabytes and seconds
    assert time.perf_counter() - t0 < 2.0


def _need(nbytes):
    avail = _mem_available()
    if avail < nbytes * 1.25 + 2 ** 30:
        pytest.skip(f"needs {nbytes * 1.25 / 2 ** 30:.1f} GiB free, "
                    f"{avail / 2 ** 30:.1f} GiB available")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_more_than_2_31_elements(layout):
    """In place (no second 8.6 GB array): each channel holds c + 1 and c - 1 alternately, so
    mean = c, biased var = 1 exactly and y = +-1/sqrt(1 + eps), also past element 2**31."""
    _need(BIG * 4)
    S = BIG // 4
    shape = (2, 2, S) if layout == "NCHW" else (BIG // 2, 2)
    x = np.empty(shape, dtype=np.float32)
    if layout == "NCHW":
        for c in range(2):
            x[:, c, 0::2] = c + 1
            x[:, c, 1::2] = c - 1
        chans = [x[:, c, :] for c in range(2)]
    else:
        for c in range(2):
            x[0::2, c] = c + 1
            x[1::2, c] = c - 1
        chans = [x[:, c] for c in range(2)]
    assert x.size > 2 ** 31
    rm, rv = np.zeros(2), np.zeros(2)
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout, out=x, running_mean=rm,
                                              running_var=rv, momentum=1.0, eps=0.0)
    assert y is x
    np.testing.assert_array_equal(mean, [0.0, 1.0])
    np.testing.assert_allclose(invstd, [1.0, 1.0], rtol=1e-12)
    m = x.size // 2
    np.testing.assert_allclose(rv, [m / (m - 1)] * 2, rtol=1e-12)
    for ch in chans:
        hi = ch[..., 0::2] if layout == "NCHW" else ch[0::2]
        lo = ch[..., 1::2] if layout == "NCHW" else ch[1::2]
        assert hi.min() == hi.max() == np.float32(1.0)
        assert lo.min() == lo.max() == np.float32(-1.0)
    # the last elements (flat index > 2**31) were written
    assert x.reshape(-1)[-1] == np.float32(-1.0)
    # inference in place, reading and writing past 2**31 again: y = (x - 0) / sqrt(4) + 1
    fastbn.batch_norm_infer(x, np.zeros(2), np.full(2, 4.0), bias=np.ones(2), eps=0.0,
                            layout=layout, out=x)
    flat = x.reshape(-1)
    assert flat[-1] == np.float32(0.5)
    assert flat.min() == np.float32(0.5) and flat.max() == np.float32(1.5)
