"""No memory growth over thousands of calls (tracemalloc sees NumPy's data allocations and
every Python object), including calls that raise and calls with out=."""
import gc
import tracemalloc

import numpy as np
import pytest

import fastbn
from fastbn import caffe, onnx

C = 3


def _arrays(layout, dtype):
    shape = (4, C, 5, 6) if layout == "NCHW" else (4, 5, 6, C)
    rng = np.random.default_rng(0)
    return rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)


def _functional(x, g, layout):
    rm, rv = np.zeros(C), np.ones(C)
    w, b = np.full(C, 1.5), np.full(C, 0.5)
    out = np.empty_like(x)

    def step():
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm,
                                                  running_var=rv, out=out)
        fastbn.batch_norm_infer(x, rm, rv, w, b, layout=layout)
        fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout)
        fastbn.batch_norm_backward(g, x, mean, invstd, w, training=False, layout=layout, out=out)
        fastbn.fold_batch_norm(rm, rv, w, b)
        yr, m, s, r, d = fastbn.batch_renorm_train(x, w, b, np.zeros(C), np.ones(C),
                                                   layout=layout)
        fastbn.batch_renorm_backward(g, x, m, s, r, d, w, layout=layout)
        for bad in (dict(eps=-1.0), dict(layout="CHWN"), dict(num_threads=0)):
            try:
                fastbn.batch_norm_train(x, **bad)
            except ValueError:
                pass
    return step


def _layers(x, g, layout):
    bn = fastbn.BatchNorm(C, layout=layout, dtype=x.dtype)
    brn = fastbn.BatchRenorm(C, layout=layout, dtype=x.dtype)
    cbn = caffe.BatchNorm(C, dtype=x.dtype)
    sc = caffe.Scale(C, bias_term=True, dtype=x.dtype)
    xn = x if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(x, -1, 1))

    def step():
        for layer in (bn, brn):
            layer.train()
            layer.forward(x)
            layer.backward(g)
            layer.eval()
            layer.forward(x)
            layer.zero_grad()
        cbn.forward(xn, phase="TRAIN")
        cbn.backward(xn)
        cbn.forward(xn, phase="TEST")
        sc.forward(xn)
        sc.backward(xn)
        onnx.batch_normalization(xn, np.ones(C), np.zeros(C), np.zeros(C), np.ones(C))
        onnx.batch_normalization(xn, np.ones(C), np.zeros(C), np.zeros(C), np.ones(C),
                                 training_mode=1)
    return step


def _growth(step, n):
    for _ in range(50):             # warm caches (plan cache, lazily built objects)
        step()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.take_snapshot()
        for _ in range(n):
            step()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    stats = after.compare_to(base, "lineno")
    return sum(s.size_diff for s in stats), stats[:5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("make", [_functional, _layers], ids=["functional", "layers"])
def test_no_growth(make, layout, dtype):
    x, g = _arrays(layout, dtype)
    step = make(x, g, layout)
    grew, top = _growth(step, 1500)
    # one leaked (C,) float64 vector per call would be 1500 * 24 = 36 kB, one leaked small
    # object per call ~ 1500 * 56 = 84 kB; allow noise well below both
    assert grew < 16_000, f"grew by {grew} bytes: " + "; ".join(str(s) for s in top)
