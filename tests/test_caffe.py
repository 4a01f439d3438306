"""fastbn.caffe against a NumPy transliteration of Caffe's BatchNorm layer.

``CaffeBatchNormOracle`` below follows Caffe's BatchNormLayer::Forward_cpu and
Backward_cpu step by step (matrix-vector products with vectors of ones for the sums,
rank-1 products for the broadcasts, every operation in the blob dtype), so both engines
are checked against Caffe's own sequence rather than against a formula.
"""
import zlib

import numpy as np
import pytest

from fastbn import _blas
from fastbn.caffe import BatchNorm, Scale, from_pytorch_state, to_pytorch_state

ENGINES = ("fused", "gemv")
SHAPES = [(5, 2, 3, 4), (8, 16, 7, 7), (6, 5), (4, 3, 10)]
DTYPES = (np.float32, np.float64)
RTOL = {np.float32: 2e-6, np.float64: 1e-14}   # ~16 and ~45 ulp of the largest value


def assert_close(actual, expected, dtype, what):
    """Equal up to the dtype's rounding, relative to the size of the expected values."""
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype],
                               atol=RTOL[dtype] * max(scale, 1e-30), err_msg=what)


class CaffeBatchNormOracle:
    """Caffe's BatchNorm Forward_cpu / Backward_cpu, transliterated to NumPy.

    Buffers keep Caffe's names: ``num_by_chans`` (num*channels,), ``mean``/``variance``
    (channels,), ``temp`` (the spread sqrt(var + eps)), ``x_norm`` (copy of the output).
    The parameters are protobuf floats in Caffe, hence the float32 rounding of maf and eps.
    """

    def __init__(self, channels, dtype, moving_average_fraction, eps):
        self.T = np.dtype(dtype).type
        self.maf = self.T(np.float32(moving_average_fraction))
        self.eps = self.T(np.float32(eps))
        self.blobs = [np.zeros(channels, dtype), np.zeros(channels, dtype),
                      np.zeros(1, dtype)]

    def forward(self, bottom, use_global_stats):
        T = self.T
        num, channels = bottom.shape[:2]
        spatial = bottom.size // (num * channels)
        ones_s = np.ones(spatial, T)
        ones_n = np.ones(num, T)
        top = np.array(bottom, dtype=T).reshape(num * channels, spatial)   # caffe_copy
        if use_global_stats:
            s = self.blobs[2][0]
            scale_factor = T(0) if s == 0 else T(1) / s
            mean = scale_factor * self.blobs[0]
            variance = scale_factor * self.blobs[1]
        else:
            num_by_chans = T(1.0 / (num * spatial)) * (top @ ones_s)
            mean = num_by_chans.reshape(num, channels).T @ ones_n
        # subtract mean: gemm(ones_n, mean) then gemm(num_by_chans, ones_s, -1, beta=1)
        num_by_chans = np.outer(ones_n, mean).reshape(-1)
        top = top + T(-1) * np.outer(num_by_chans, ones_s)
        if not use_global_stats:
            temp = top * top
            num_by_chans = T(1.0 / (num * spatial)) * (temp @ ones_s)
            variance = num_by_chans.reshape(num, channels).T @ ones_n
            self.blobs[2][0] *= self.maf
            self.blobs[2][0] += T(1)
            self.blobs[0][:] = self.maf * self.blobs[0] + mean          # caffe_cpu_axpby
            m = num * spatial
            correction = T(m) / T(m - 1) if m > 1 else T(1)
            self.blobs[1][:] = self.maf * self.blobs[1] + correction * variance
        variance = np.sqrt(variance + self.eps)
        num_by_chans = np.outer(ones_n, variance).reshape(-1)
        self.temp = np.outer(num_by_chans, ones_s)
        top = top / self.temp
        self.x_norm = top.copy()
        self.use_global_stats = use_global_stats
        self.dims = (num, channels, spatial)
        return top.reshape(bottom.shape)

    def backward(self, top_diff):
        T = self.T
        num, channels, spatial = self.dims
        ones_s = np.ones(spatial, T)
        ones_n = np.ones(num, T)
        dy = np.array(top_diff, dtype=T).reshape(num * channels, spatial)
        if self.use_global_stats:
            return (dy / self.temp).reshape(top_diff.shape)
        y = self.x_norm
        bottom_diff = y * dy
        mean = (bottom_diff @ ones_s).reshape(num, channels).T @ ones_n
        bottom_diff = np.outer(np.outer(ones_n, mean).reshape(-1), ones_s)
        bottom_diff = y * bottom_diff
        mean = (dy @ ones_s).reshape(num, channels).T @ ones_n
        bottom_diff = bottom_diff + np.outer(np.outer(ones_n, mean).reshape(-1), ones_s)
        bottom_diff = T(-1.0 / (num * spatial)) * bottom_diff + dy
        bottom_diff = bottom_diff / self.temp
        return bottom_diff.reshape(top_diff.shape)


def batch(rng, shape, dtype, step):
    """Data with per-channel offsets and spreads that change from step to step."""
    C = shape[1]
    cshape = (1, C) + (1,) * (len(shape) - 2)
    loc = rng.uniform(-3, 3, C).reshape(cshape) + step
    spread = rng.uniform(0.5, 2.0, C).reshape(cshape)
    return (loc + spread * rng.standard_normal(shape)).astype(dtype)


# ---- acceptance: TRAIN iterations, then TEST, against the transliteration --------------

@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("engine", ENGINES)
def test_train_then_test_matches_caffe(engine, shape, dtype, in_place):
    rng = np.random.default_rng(zlib.crc32(repr((engine, shape, in_place)).encode()))
    bn = BatchNorm(shape[1], moving_average_fraction=0.9, engine=engine, dtype=dtype)
    oracle = CaffeBatchNormOracle(shape[1], dtype, 0.9, 1e-5)
    tag = f"{engine} {np.dtype(dtype).name} {shape} in_place={in_place}"
    for step, phase in enumerate(["TRAIN"] * 4 + ["TEST"] * 2):
        x = batch(rng, shape, dtype, step)
        dy = rng.standard_normal(shape).astype(dtype)
        top_ref = oracle.forward(x, use_global_stats=(phase == "TEST"))
        diff_ref = oracle.backward(dy)
        blobs_before = [b.copy() for b in bn.blobs]
        if in_place:
            top = bn.forward(x, phase=phase, out=x)
            assert top is x
            diff = bn.backward(dy, out=dy)
            assert diff is dy
        else:
            x_copy, dy_copy = x.copy(), dy.copy()
            top = bn.forward(x, phase=phase)
            diff = bn.backward(dy)
            np.testing.assert_array_equal(x, x_copy)
            np.testing.assert_array_equal(dy, dy_copy)
        what = f"{tag} step {step} {phase}"
        assert top.dtype == dtype and diff.dtype == dtype
        assert_close(top, top_ref, dtype, what + " top")
        assert_close(diff, diff_ref, dtype, what + " bottom_diff")
        for i in range(3):
            assert_close(bn.blobs[i], oracle.blobs[i], dtype, f"{what} blobs[{i}]")
        if phase == "TEST":
            for i in range(3):
                np.testing.assert_array_equal(bn.blobs[i], blobs_before[i])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)], ids=str)
def test_one_value_per_channel_trains_like_caffe(engine, shape):
    """m == 1: Caffe accepts it (variance 0, correction factor 1, top 0)."""
    rng = np.random.default_rng(1)
    bn = BatchNorm(3, engine=engine, dtype=np.float64)
    oracle = CaffeBatchNormOracle(3, np.float64, 0.999, 1e-5)
    for step in range(2):
        x = rng.standard_normal(shape)
        top = bn.forward(x)
        np.testing.assert_array_equal(top, 0.0)
        np.testing.assert_allclose(top, oracle.forward(x, False), atol=0)
        dy = rng.standard_normal(shape)
        np.testing.assert_allclose(bn.backward(dy), oracle.backward(dy), atol=1e-12)
        for i in range(3):
            np.testing.assert_allclose(bn.blobs[i], oracle.blobs[i], rtol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("engine", ENGINES)
def test_untrained_layer_with_global_stats_divides_by_sqrt_eps(engine, dtype):
    x = batch(np.random.default_rng(2), (4, 3, 5), dtype, 0)
    for bn, phase in ((BatchNorm(3, engine=engine, dtype=dtype), "TEST"),
                      (BatchNorm(3, use_global_stats=True, engine=engine, dtype=dtype), "TRAIN")):
        top = bn.forward(x, phase=phase)
        assert_close(top, x / np.sqrt(dtype(np.float32(1e-5))), dtype, phase)
        for b in bn.blobs:
            np.testing.assert_array_equal(b, 0)
        dy = np.ones_like(x)
        assert_close(bn.backward(dy), dy / np.sqrt(dtype(np.float32(1e-5))), dtype, phase)


@pytest.mark.parametrize("engine", ENGINES)
def test_use_global_stats_false_updates_blobs_in_test_phase(engine):
    """An explicit use_global_stats=False computes batch statistics in TEST too (Caffe)."""
    rng = np.random.default_rng(3)
    x = batch(rng, (4, 3, 6), np.float64, 0)
    a = BatchNorm(3, use_global_stats=False, engine=engine, dtype=np.float64)
    b = BatchNorm(3, engine=engine, dtype=np.float64)
    np.testing.assert_allclose(a.forward(x, phase="TEST"), b.forward(x, phase="TRAIN"),
                               rtol=1e-12, atol=1e-12)
    for ba, bb in zip(a.blobs, b.blobs):
        np.testing.assert_allclose(ba, bb, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_engines_agree(dtype):
    rng = np.random.default_rng(4)
    shape = (4, 8, 20, 20)
    layers = [BatchNorm(8, engine=e, dtype=dtype) for e in ENGINES]
    for step, phase in enumerate(["TRAIN", "TRAIN", "TRAIN", "TEST"]):
        x = batch(rng, shape, dtype, 10 * step)
        dy = rng.standard_normal(shape).astype(dtype)
        (top_f, top_g) = (bn.forward(x, phase=phase) for bn in layers)
        assert_close(top_g, top_f, dtype, f"top step {step}")
        assert_close(layers[1].backward(dy), layers[0].backward(dy), dtype, f"diff {step}")
        for i in range(3):
            assert_close(layers[1].blobs[i], layers[0].blobs[i], dtype, f"blobs[{i}]")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("order", ["F", "strided"])
def test_non_contiguous_inputs_and_outputs(engine, order):
    rng = np.random.default_rng(5)
    base = batch(rng, (6, 4, 5, 8), np.float32, 0)
    gbase = rng.standard_normal(base.shape).astype(np.float32)
    if order == "F":
        x, dy = np.asfortranarray(base), np.asfortranarray(gbase)
    else:
        x, dy = base[:, :, :, ::2], gbase[:, :, :, ::2]
    ref = BatchNorm(4, engine=engine)
    top_ref = ref.forward(np.ascontiguousarray(x))
    diff_ref = ref.backward(np.ascontiguousarray(dy))
    bn = BatchNorm(4, engine=engine)
    out = np.asfortranarray(np.zeros_like(top_ref))
    assert bn.forward(x, out=out) is out
    np.testing.assert_array_equal(out, top_ref)
    np.testing.assert_array_equal(bn.backward(dy), diff_ref)
    # in place on a non-contiguous array
    bn2 = BatchNorm(4, engine=engine)
    x2, dy2 = x.copy(order="K"), dy.copy(order="K")
    if order == "strided":
        x2, dy2 = base.copy()[:, :, :, ::2], gbase.copy()[:, :, :, ::2]
    assert bn2.forward(x2, out=x2) is x2
    np.testing.assert_array_equal(x2, top_ref)
    assert bn2.backward(dy2, out=dy2) is dy2
    np.testing.assert_array_equal(dy2, diff_ref)
    for b, r in zip(bn2.blobs, ref.blobs):
        np.testing.assert_array_equal(b, r)


@pytest.mark.parametrize("engine", ENGINES)
def test_backward_uses_saved_output_not_the_callers_array(engine):
    """A later in-place layer may overwrite top; backward keeps its own copy (x_norm)."""
    rng = np.random.default_rng(6)
    x = batch(rng, (4, 3, 7), np.float32, 0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    a, b = BatchNorm(3, engine=engine), BatchNorm(3, engine=engine)
    top = a.forward(x.copy())
    b.forward(x.copy())
    top[...] = 123.0
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))


def test_empty_batch_in_test_phase_is_fine():
    for engine in ENGINES:
        bn = BatchNorm(3, engine=engine)
        x = np.zeros((0, 3, 4), np.float32)
        assert bn.forward(x, phase="TEST").shape == (0, 3, 4)
        assert bn.backward(x).shape == (0, 3, 4)


# ---- Scale and the PyTorch conversion ---------------------------------------------------

@pytest.mark.parametrize("bias_term", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_scale_forward_backward_and_accumulating_diffs(bias_term, dtype):
    rng = np.random.default_rng(7)
    sc = Scale(3, bias_term=bias_term, dtype=dtype)
    assert len(sc.blobs) == len(sc.diffs) == (2 if bias_term else 1)
    np.testing.assert_array_equal(sc.blobs[0], 1)
    sc.blobs[0][:] = rng.uniform(0.5, 2, 3)
    if bias_term:
        sc.blobs[1][:] = rng.uniform(-1, 1, 3)
    gamma = sc.blobs[0].reshape(1, 3, 1).astype(np.float64)
    beta = sc.blobs[1].reshape(1, 3, 1).astype(np.float64) if bias_term else 0.0
    expected_diffs = [np.zeros(3) for _ in sc.blobs]
    for _ in range(2):
        x = rng.standard_normal((4, 3, 5)).astype(dtype)
        dy = rng.standard_normal((4, 3, 5)).astype(dtype)
        x_copy = x.copy()
        y = sc.forward(x)
        np.testing.assert_array_equal(x, x_copy)
        assert_close(y, x * gamma + beta, dtype, "Scale forward")
        dx = sc.backward(dy)
        assert_close(dx, dy * gamma, dtype, "Scale bottom_diff")
        expected_diffs[0] += (dy.astype(np.float64) * x).sum(axis=(0, 2))
        if bias_term:
            expected_diffs[1] += dy.astype(np.float64).sum(axis=(0, 2))
        for d, e in zip(sc.diffs, expected_diffs):
            assert d.dtype == dtype
            assert_close(d, e, dtype, "Scale diffs")
    sc.clear_diffs()
    for d in sc.diffs:
        np.testing.assert_array_equal(d, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_batchnorm_scale_equals_torch_batchnorm2d_eval(engine):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    shape = (8, 16, 7, 7)
    bn = BatchNorm(16, engine=engine)
    sc = Scale(16, bias_term=True)
    sc.blobs[0][:] = rng.uniform(0.5, 1.5, 16)
    sc.blobs[1][:] = rng.uniform(-0.5, 0.5, 16)
    for step in range(5):
        bn.forward(batch(rng, shape, np.float32, step))
    state = to_pytorch_state(bn, sc)
    module = torch.nn.BatchNorm2d(16, eps=bn.eps)
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    module.eval()
    x = batch(rng, shape, np.float32, 2)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    actual = sc.forward(bn.forward(x, phase="TEST"))
    assert_close(actual, expected, np.float32, f"{engine} BatchNorm+Scale vs torch eval")
    # and back: the converted pair gives the same inference output
    bn2, sc2 = from_pytorch_state({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                                  eps=bn.eps, engine=engine)
    np.testing.assert_array_equal(bn2.blobs[2], [1.0])
    assert_close(sc2.forward(bn2.forward(x, phase="TEST")), actual, np.float32, "round trip")


def test_conversion_helpers_without_scale_and_untrained():
    bn = BatchNorm(2, dtype=np.float64)
    state = to_pytorch_state(bn)
    np.testing.assert_array_equal(state["running_mean"], 0)
    np.testing.assert_array_equal(state["running_var"], 0)     # s == 0 gives 0
    np.testing.assert_array_equal(state["weight"], 1)
    np.testing.assert_array_equal(state["bias"], 0)
    assert state["num_batches_tracked"].dtype == np.int64
    bn2, sc2 = from_pytorch_state({"running_mean": np.array([1.0, 2.0]),
                                   "running_var": np.array([3.0, 4.0])}, dtype=np.float64)
    assert sc2 is None
    np.testing.assert_array_equal(bn2.global_stats()[0], [1.0, 2.0])
    np.testing.assert_array_equal(bn2.global_stats()[1], [3.0, 4.0])


# ---- the BLAS wrappers ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_blas_wrappers_match_numpy(dtype):
    rng = np.random.default_rng(9)
    tol = dict(rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10)
    A = rng.standard_normal((7, 4)).astype(dtype)
    x4, x7 = rng.standard_normal(4).astype(dtype), rng.standard_normal(7).astype(dtype)
    y7 = rng.standard_normal(7).astype(dtype)
    y = y7.copy()
    _blas.gemv(False, 1.5, A, x4, -0.5, y)
    np.testing.assert_allclose(y, 1.5 * A @ x4 - 0.5 * y7, **tol)
    y4 = np.full(4, np.nan, dtype)
    _blas.gemv(True, 2.0, A, x7, 0.0, y4)           # beta 0: y is not read
    np.testing.assert_allclose(y4, 2.0 * A.T @ x7, **tol)
    B = A.copy()
    _blas.ger(-2.0, x7, x4, B)
    np.testing.assert_allclose(B, A - 2.0 * np.outer(x7, x4), **tol)
    z = x7.copy()
    _blas.scal(3.0, z)
    np.testing.assert_allclose(z, 3.0 * x7, **tol)
    _blas.axpy(-1.0, y7, z)
    np.testing.assert_allclose(z, 3.0 * x7 - y7, **tol)
    _blas.copy(y7, z)
    np.testing.assert_array_equal(z, y7)
    with pytest.raises(ValueError, match="gemv"):
        _blas.gemv(False, 1.0, A, x7, 0.0, y7.copy())


# ---- bad arguments: exception type, the argument's name, nothing changed -----------------

@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(channels=0), ValueError, "channels"),
    (dict(channels=2.0), TypeError, "channels"),
    (dict(channels=True), TypeError, "channels"),
    (dict(channels=3, engine="blas"), ValueError, "engine"),
    (dict(channels=3, eps=-1.0), ValueError, "eps"),
    (dict(channels=3, eps=float("nan")), ValueError, "eps"),
    (dict(channels=3, moving_average_fraction=1.5), ValueError, "moving_average_fraction"),
    (dict(channels=3, use_global_stats="yes"), TypeError, "use_global_stats"),
    (dict(channels=3, dtype=np.int32), TypeError, "dtype"),
    (dict(channels=3, dtype="float16"), TypeError, "dtype"),
])
def test_bad_constructor_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        BatchNorm(**kwargs)


def _trained(engine):
    rng = np.random.default_rng(10)
    bn = BatchNorm(3, engine=engine)
    x = batch(rng, (4, 3, 5), np.float32, 0)
    bn.forward(x)
    return bn, x


def _forward_cases():
    x = batch(np.random.default_rng(11), (4, 3, 5), np.float32, 1)
    base = batch(np.random.default_rng(12), (6, 3, 5), np.float32, 1)
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    return [
        ("int bottom", dict(bottom=x.astype(np.int32)), TypeError, "bottom"),
        ("float64 bottom", dict(bottom=x.astype(np.float64)), TypeError, "bottom"),
        ("channels", dict(bottom=np.zeros((4, 2, 5), np.float32)), ValueError, "bottom"),
        ("1-d", dict(bottom=np.zeros(3, np.float32)), ValueError, "bottom"),
        ("empty batch", dict(bottom=np.zeros((0, 3, 5), np.float32)), ValueError, "bottom"),
        ("phase", dict(bottom=x, phase="train"), ValueError, "phase"),
        ("out shape", dict(bottom=x, out=np.zeros((4, 3, 4), np.float32)), ValueError, "out"),
        ("out dtype", dict(bottom=x, out=np.zeros(x.shape)), ValueError, "out"),
        ("out read-only", dict(bottom=x, out=ro), ValueError, "out"),
        ("out overlap", dict(bottom=base[:4], out=base[2:6]), ValueError, "out"),
    ]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", _forward_cases(), ids=lambda c: c[0])
def test_bad_forward_arguments_change_nothing(engine, case):
    _, kwargs, exc, name = case
    bn, _ = _trained(engine)
    blobs = [b.copy() for b in bn.blobs]
    arrays = [a for a in kwargs.values() if isinstance(a, np.ndarray)]
    copies = [a.copy() for a in arrays]
    with pytest.raises(exc, match=name):
        bn.forward(**kwargs)
    for b, c in zip(bn.blobs, blobs):
        np.testing.assert_array_equal(b, c)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_blobs_are_reported(engine):
    bn, x = _trained(engine)
    x_copy = x.copy()
    bn.blobs[0] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"blobs\[0\]"):
        bn.forward(x)
    bn, _ = _trained(engine)
    bn.blobs[2] = np.ones(1, np.float64)
    b0 = bn.blobs[0].copy()
    with pytest.raises(TypeError, match=r"blobs\[2\]"):
        bn.forward(x, phase="TEST")
    np.testing.assert_array_equal(bn.blobs[0], b0)
    np.testing.assert_array_equal(x, x_copy)


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_backward_arguments_change_nothing(engine):
    with pytest.raises(RuntimeError, match="forward"):
        BatchNorm(3, engine=engine).backward(np.zeros((4, 3, 5), np.float32))
    bn, x = _trained(engine)
    dy = np.ones_like(x)
    base = np.ones((6, 3, 5), np.float32)
    for kwargs, exc, name in [
        (dict(top_diff=np.ones((4, 3, 6), np.float32)), ValueError, "top_diff"),
        (dict(top_diff=dy.astype(np.float64)), TypeError, "top_diff"),
        (dict(top_diff=base[:4], out=base[1:5]), ValueError, "out"),
        (dict(top_diff=dy, out=np.zeros((4, 3, 5))), ValueError, "out"),
    ]:
        arrays = [a for a in kwargs.values() if isinstance(a, np.ndarray)]
        copies = [a.copy() for a in arrays]
        with pytest.raises(exc, match=name):
            bn.backward(**kwargs)
        for a, c in zip(arrays, copies):
            np.testing.assert_array_equal(a, c)
    bn.backward(dy)          # the saved state is still usable


def test_bad_scale_and_conversion_arguments():
    with pytest.raises(TypeError, match="bias_term"):
        Scale(3, bias_term="yes")
    with pytest.raises(ValueError, match="channels"):
        Scale(0)
    sc = Scale(3)
    with pytest.raises(RuntimeError, match="forward"):
        sc.backward(np.zeros((2, 3), np.float32))
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="x"):
        sc.forward(x.astype(np.float64))
    sc.forward(x)
    with pytest.raises(ValueError, match="dy"):
        sc.backward(np.ones((2, 3, 1), np.float32))
    np.testing.assert_array_equal(sc.diffs[0], 0)
    with pytest.raises(TypeError, match="batch_norm"):
        to_pytorch_state(object())
    with pytest.raises(ValueError, match="scale"):
        to_pytorch_state(BatchNorm(2), Scale(3))
    with pytest.raises(ValueError, match="running_mean"):
        from_pytorch_state({"running_var": np.ones(2)})
    with pytest.raises(ValueError, match="running_var"):
        from_pytorch_state({"running_mean": np.ones(2), "running_var": np.ones(3)})
    with pytest.raises(TypeError, match="state"):
        from_pytorch_state([1, 2])
