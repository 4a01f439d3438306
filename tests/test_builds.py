"""Every build of the kernels this CPU runs (portable, AVX2, AVX-512) against the others,
over every case of tests/cases.py and every data dtype: the builds differ only in the
rounding of their vector arithmetic, so each output is within a few units in the last
place of the portable build's. (tests/ab_builds.py compares a build with an earlier
commit's, bit for bit.)"""
import importlib

import numpy as np
import pytest

import fastbn
from cases import CASES, ids
from fastbn import _dispatch

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BF16 = None

DTYPES = ["float32", "float64", "float16"] + (["bfloat16"] if BF16 is not None else [])
# |a - b| <= TOL * (1 + |b|): the accuracy contract (docs/math.rst) allows each build a few
# float32 ulps (16-bit outputs: one ulp of the type) of the exact result, so two builds
# may differ by twice that
TOL = {"float32": 3e-6, "float64": 1e-12, "float16": 2.0 ** -9, "bfloat16": 2.0 ** -6}


def outputs(x, g, layout):
    """Training forward (with the fused residual and ReLU), inference and backward of x."""
    C = x.shape[1 if layout == "NCHW" else -1]
    pdt = np.float32 if x.dtype.itemsize == 2 else x.dtype
    w = np.linspace(0.5, 1.5, C).astype(pdt)
    b = np.linspace(-1, 1, C).astype(pdt)
    rm, rv = np.zeros(C, pdt), np.ones(C, pdt)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm,
                                              running_var=rv)
    yr, _, _ = fastbn.batch_norm_relu_train(x, w, b, residual=g, layout=layout)
    yi = fastbn.batch_norm_infer(x, rm, rv, w, b, layout=layout)
    dx, dw, db = fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout)
    dxr, _, _ = fastbn.batch_norm_relu_backward(g, yr, x, mean, invstd, w, layout=layout)
    return {"y": y, "mean": mean, "invstd": invstd, "running_var": rv, "relu y": yr,
            "infer y": yi, "dx": dx, "dweight": dw, "dbias": db, "relu dx": dxr}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_builds_agree(case, dtype, kernel_modules):
    if len(kernel_modules) == 1:
        pytest.skip("one build of the kernels on this CPU")
    dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(case.shape) * 2 + 3).astype(np.float32).astype(dt)
    g = rng.standard_normal(case.shape).astype(np.float32).astype(dt)
    results = {}
    for name in kernel_modules:
        with _dispatch.using(importlib.import_module(name)):
            results[name] = outputs(x, g, case.layout)
    base = results[kernel_modules[0]]
    for name in kernel_modules[1:]:
        for key, want in base.items():
            got, want = (np.asarray(a, np.float64) for a in (results[name][key], want))
            scale = 1 + np.abs(want)
            if key in ("dweight", "dbias"):          # sums: relative to their terms' size
                scale = scale + x.size / want.size
            bad = ~(np.abs(got - want) <= TOL[dtype] * scale)
            assert not bad.any(), (f"{name} {key}: {got[bad][:3]} against the portable "
                                   f"build's {want[bad][:3]}")
