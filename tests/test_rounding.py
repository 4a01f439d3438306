"""Values rounded into a dtype: running buffers updated silently and all-or-nothing, whatever
np.errstate and the warning filters say; outputs assembled from partial sums combined in
double and rounded once; bfloat16 accepted wherever float16 is."""
import warnings
from contextlib import contextmanager

import numpy as np
import pytest

import fastbn
from fastbn import _calls, _rounding, caffe, onnx

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:      # the bfloat16 cases are skipped
    BF16 = None

needs_bf16 = pytest.mark.skipif(BF16 is None, reason="needs ml_dtypes (bfloat16)")


@contextmanager
def strict(mode):
    """The caller's floating-point error handling: 'raise' (np.errstate(all='raise')),
    'error' (warnings are exceptions, as python -W error) or 'default'."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # also under 'default': no stray warning
        if mode == "raise":
            with np.errstate(all="raise"):
                yield
        elif mode == "error":
            with np.errstate(all="warn"):
                yield
        else:
            yield


MODES = ["raise", "error", "default"]


def round64(values, dtype):
    """float64 values rounded once to dtype, the expected result (NumPy rounds to float16
    and float32 correctly; bfloat16's rounding is checked in test_half.py)."""
    with np.errstate(all="ignore"):
        if BF16 is not None and np.dtype(dtype) == BF16:
            return _rounding.rounded(values, dtype)
        return np.asarray(values, np.float64).astype(dtype)


def same(a, b):
    """Same values, bit for bit (NaN and inf included)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.asarray(a).tobytes() == np.asarray(b).tobytes()


# buffer dtype, its start mean and var (or std), and the data's scale (a power of 2): the
# updated mean underflows to a subnormal, the updated var overflows to inf, in that dtype
BUFFERS = [
    ("float16", 5e-5, 6e4, 2.0 ** 10),       # mean 2.5e-5, var 0.5 * (6e4 + 2**20)
    ("float32", 1e-38, 3.4e38, 2.0 ** 64),   # mean 5e-39, var 0.5 * (3.4e38 + 2**128)
    ("bfloat16", 1e-38, 3.4e38, 2.0 ** 64),
]


def buffer_cases():
    for name, mean0, var0, scale in BUFFERS:
        marks = [needs_bf16] if name == "bfloat16" else []
        for layout in ("NCHW", "NHWC"):
            yield pytest.param(name, mean0, var0, scale, layout, marks=marks,
                               id=f"{name}-{layout}")


def data(scale, layout, C=3):
    """float32 data of +scale and -scale, as many of each in every channel: mean exactly 0
    and biased var exactly scale**2 (every partial sum is exact)."""
    x = np.ones((8, C, 4, 4))
    x[1::2] = -1.0
    x = (x * scale).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if layout == "NHWC" else x


def buffers(name, first, second, C=3, strided=False):
    dt = BF16 if name == "bfloat16" else np.dtype(name)
    a, b = np.full(C, first, dt), np.full(C, second, dt)
    if strided:          # not contiguous: the NumPy path of the update, not the C loop
        a = np.repeat(a, 2)[::2]
        b = np.repeat(b, 2)[::2]
    return a, b


def tiny(dtype):
    return float(np.finfo(np.float16).tiny) if dtype == np.float16 else 1.1754943508e-38


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", ["batch_norm_train", "batch_norm_relu_train"])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("name, mean0, var0, scale, layout", list(buffer_cases()))
def test_running_buffers_near_their_range(name, mean0, var0, scale, layout, strided, fn,
                                          mode):
    x = data(scale, layout)
    rm, rv = buffers(name, mean0, var0, strided=strided)
    start_m, start_v = rm.astype(np.float64), rv.astype(np.float64)
    out = np.zeros_like(x)
    with strict(mode):
        y, mean, invstd = getattr(fastbn, fn)(x, running_mean=rm, running_var=rv,
                                              momentum=0.5, layout=layout, out=out)
    M = x.size // 3
    assert np.array_equal(mean, np.zeros(3))
    assert same(rm, round64(0.5 * mean + 0.5 * start_m, rm.dtype))
    assert same(rv, round64(0.5 * (scale ** 2 * (M / (M - 1.0))) + 0.5 * start_v, rv.dtype))
    assert np.isinf(rv).all()                                      # overflow to inf
    assert (0 < rm.astype(np.float64)).all() and \
        (rm.astype(np.float64) < tiny(rm.dtype)).all()              # a subnormal
    want = x / np.float32(scale)                                    # +1 and -1
    assert y is out and np.array_equal(out, want if fn == "batch_norm_train"
                                       else np.maximum(want, 0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, mean0, var0, scale, layout", list(buffer_cases()))
def test_renorm_running_buffers_near_their_range(name, mean0, var0, scale, layout, mode):
    """running_std is a convex combination of two finite values (it cannot overflow);
    running_mean underflows to a subnormal."""
    x = data(scale, layout)
    rm, rs = buffers(name, mean0, np.sqrt(var0), strided=name == "float32")
    start_m, start_s = rm.astype(np.float64), rs.astype(np.float64)
    with strict(mode):
        y, mean, std, r, d = fastbn.batch_renorm_train(x, None, None, rm, rs, momentum=0.5,
                                                       layout=layout)
    assert same(rm, round64(start_m + 0.5 * (mean - start_m), rm.dtype))
    assert same(rs, round64(start_s + 0.5 * (std - start_s), rs.dtype))
    assert (rm.astype(np.float64) < tiny(rm.dtype)).all()


@pytest.mark.parametrize("mode", MODES)
def test_onnx_running_outputs_near_their_range(mode):
    x = data(1e3, "NCHW")
    im, iv = np.full(3, 5e-5, np.float16), np.full(3, 6e4, np.float16)
    with strict(mode):
        y, rm, rv = onnx.batch_normalization(x, np.ones(3, np.float32), np.zeros(3, np.float32),
                                             im, iv, momentum=0.5, training_mode=1)
    assert rm.dtype == rv.dtype == np.float16 and np.isinf(rv).all()
    assert np.array_equal(im, np.full(3, 5e-5, np.float16))         # inputs untouched


def test_the_update_is_all_or_nothing(monkeypatch):
    """If rounding one buffer raised, no buffer was written: every value is rounded before
    the first write."""
    real = _rounding.rounded
    calls = []

    def fails_second(values, dtype):
        calls.append(dtype)
        if len(calls) == 2:
            raise MemoryError("while rounding the second buffer")
        return real(values, dtype)
    monkeypatch.setattr(_rounding, "rounded", fails_second)
    a, b = np.zeros(3, np.float16), np.ones(3, np.float16)
    with pytest.raises(MemoryError):
        _rounding.store_rounded((a, np.full(3, 7.0)), (b, np.full(3, 9.0)))
    assert (a == 0).all() and (b == 1).all()
    monkeypatch.setattr(_rounding, "rounded", real)
    _rounding.store_rounded((a, np.full(3, 7.0)), (b, np.full(3, 1e6)))
    assert (a == 7).all() and np.isinf(b).all()


@pytest.mark.parametrize("mode", MODES)
def test_accumulated_and_folded_values_overflow_quietly(mode):
    """Other places fastbn rounds a float64 value into float32: folding, conv fusion, the
    Caffe blobs, the layers' accumulated gradients."""
    big = np.full(2, 3e38, np.float32)
    with strict(mode):
        scale, shift = fastbn.fold_batch_norm(np.zeros(2, np.float32),
                                              np.full(2, 1e-6, np.float32), big, eps=0.0)
        fw, fb = fastbn.fuse_conv_bn(np.full((2, 3), 2.0, np.float32), None,
                                     np.zeros(2, np.float32), np.ones(2, np.float32), big,
                                     big, eps=0.0)
    assert np.isinf(scale).all() and scale.dtype == np.float32
    assert np.isinf(fw).all() and fw.dtype == fb.dtype == np.float32

    bn = caffe.BatchNorm(2, moving_average_fraction=1.0)
    bn.blobs[1][...] = 3e38
    with strict(mode):
        bn.forward(np.array([[1e19, 1.0], [-1e19, 3.0]], np.float32))
    assert np.isinf(bn.blobs[1][0]) and bn.blobs[2][0] == 1 and bn.blobs[0][1] == 2.0

    layer = fastbn.BatchNorm(2)
    layer.weight_grad[...] = 3e38
    layer.bias_grad[...] = 3e38
    x = np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32)
    layer(x)
    with strict(mode):
        layer.backward(np.full_like(x, 1e38))
    assert np.isinf(layer.bias_grad).all()


# --------------------------------------------------------------------------------------------
# outputs assembled from partial sums: combined in double, rounded once
# --------------------------------------------------------------------------------------------

def cancelling(dtype, layout, ndim):
    """x: -1 everywhere but three values -1 + delta (delta a few ulps of the dtype), so with
    mean 0, std 1, r = d = 1 and dy = 1, dweight = sum(x) + sum(dy) = 3 * delta exactly,
    while each of the two sums rounded to float32 alone is off by more than that."""
    delta = 2.0 ** -8            # -1 + delta is a float16 and a bfloat16 (a float32 ulp
                                 # of sum(x) = -2**18 + 3 * delta is 2**-6)
    shape = (2 ** 18, 1) if ndim == 2 else (2 ** 12, 1, 8, 8)
    x = np.full(shape, -1.0)
    x.reshape(-1)[:3] += delta
    if layout == "NHWC" and ndim == 4:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    return x.astype(dt), 3 * delta


@pytest.mark.parametrize("layout, ndim", [("NCHW", 2), ("NCHW", 4), ("NHWC", 4)])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16",
                                   pytest.param("bfloat16", marks=needs_bf16)])
def test_renorm_dweight_is_rounded_once(dtype, layout, ndim):
    x, exact = cancelling(dtype, layout, ndim)
    one = np.ones(1)
    dx, dweight, dbias = fastbn.batch_renorm_backward(np.ones_like(x), x, np.zeros(1), one,
                                                      one, one, layout=layout)
    assert dweight.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert dweight[0] == exact and dbias[0] == x.size


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_renorm_dweight_against_float64_numpy(layout):
    """Random data with r * sum(dy * xhat0) and d * sum(dy) cancelling to a few percent:
    dweight within the contract's 4 * 2**-23 of the sum of its terms' magnitudes."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 4, 6, 6)).astype(np.float32)
    dy = (rng.standard_normal(x.shape) + 3.0).astype(np.float32)
    if layout == "NHWC":
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
    axis = 1 if layout == "NCHW" else 3
    red = tuple(i for i in range(4) if i != axis)
    x64, g64 = x.astype(np.float64), dy.astype(np.float64)
    mean, std = x64.mean(axis=red), x64.std(axis=red)
    shape = [1] * 4
    shape[axis] = 4
    xh0 = (x64 - mean.reshape(shape)) / std.reshape(shape)
    r = np.full(4, 1.5)
    d = -r * (g64 * xh0).sum(axis=red) / g64.sum(axis=red) * 0.99     # near cancellation
    terms = g64 * (r.reshape(shape) * xh0 + d.reshape(shape))
    want = terms.sum(axis=red)
    _, dweight, _ = fastbn.batch_renorm_backward(dy, x, mean, std, r, d, layout=layout)
    bound = 4 * 2.0 ** -23 * np.abs(terms).sum(axis=red)
    assert np.all(np.abs(dweight - want) <= bound), (dweight, want, bound)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_renorm_layer_gradient_is_the_functional_one(activation):
    """BatchRenorm.weight_grad (plain and fused ReLU, whose mask is all ones here) is the
    functional dweight, rounded once, bit for bit."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 3, 5, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = fastbn.BatchRenorm(3, rmax=2.0, dmax=1.0, activation=activation)
    layer.running_mean[...] = [-0.5, 0.2, 0.4]
    layer.running_std[...] = [0.7, 1.3, 1.0]
    layer.bias[...] = 100.0            # y > 0 everywhere: the ReLU's mask passes all of dy
    rm, rs = layer.running_mean.copy(), layer.running_std.copy()
    layer(x)
    layer.backward(dy)
    _, mean, std, r, d = fastbn.batch_renorm_train(x, layer.weight, layer.bias, rm, rs,
                                                   rmax=2.0, dmax=1.0, momentum=0.01)
    _, dweight, dbias = fastbn.batch_renorm_backward(dy, x, mean, std, r, d, layer.weight)
    assert same(layer.weight_grad, dweight) and same(layer.bias_grad, dbias)


def test_renorm_backward_fused_path_is_rounded_once():
    """The fused ReLU's backward (y given, all positive) combines the sums the same way."""
    x, exact = cancelling("float32", "NCHW", 2)
    one = np.ones(1)
    _, dweight, _ = _calls.renorm_backward(np.ones_like(x), x, np.zeros(1), one, one, one,
                                           None, layout="NCHW", y=np.ones_like(x))
    assert dweight[0] == exact


# --------------------------------------------------------------------------------------------
# bfloat16 wherever float16 is taken
# --------------------------------------------------------------------------------------------

@needs_bf16
@pytest.mark.parametrize("cls", [fastbn.BatchNorm, fastbn.BatchRenorm])
@pytest.mark.parametrize("layer_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16"])
def test_load_state_dict_takes_16_bit_values(cls, layer_dtype, value_dtype):
    dt = BF16 if value_dtype == "bfloat16" else np.dtype(value_dtype)
    layer = cls(4, dtype=layer_dtype)
    state = {k: (np.array([0.5, 1.5, 2.25, 3.0]).astype(dt) if k != "num_batches_tracked"
                 else v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    for k, v in layer.state_dict().items():
        if k != "num_batches_tracked":
            assert v.dtype == layer_dtype and np.array_equal(v, [0.5, 1.5, 2.25, 3.0]), k


@pytest.mark.parametrize("bad", [np.int32, np.complex64, np.bool_, "V2"])
def test_load_state_dict_still_refuses_other_dtypes(bad, snapshot):
    layer = fastbn.BatchNorm(2)
    state = layer.state_dict()
    state["weight"] = np.zeros(2, dtype=bad)
    snap = snapshot(layer.weight, layer.bias, state)
    with pytest.raises(TypeError, match="weight must be a floating-point array"):
        layer.load_state_dict(state)
    snap.assert_unchanged()


@needs_bf16
def test_fuse_conv_bn_takes_bfloat16():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((4, 3, 2, 2)).astype(BF16)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    # all bfloat16: the result in bfloat16, rounded once from the float64 computation
    args = [a.astype(BF16) for a in (rm, rv, gamma, beta)]
    fw, fb = fastbn.fuse_conv_bn(W, None, *args, 1e-5)
    scale = args[2].astype(np.float64) / np.sqrt(args[1].astype(np.float64) + 1e-5)
    want_w = W.astype(np.float64) * scale[:, None, None, None]
    want_b = args[3].astype(np.float64) - args[0].astype(np.float64) * scale
    assert fw.dtype == fb.dtype == BF16
    assert same(fw, _rounding.rounded(want_w, BF16)) and same(fb, _rounding.rounded(want_b, BF16))
    # with float32 statistics: float32 out, as NumPy's promotion gives
    fw32, _ = fastbn.fuse_conv_bn(W, None, *[a.astype(np.float32) for a in (rm, rv, gamma, beta)],
                                  1e-5)
    assert fw32.dtype == np.float32


def test_fuse_conv_bn_still_refuses_integers(snapshot):
    W = np.ones((2, 3), np.int32)
    with pytest.raises(TypeError, match="weight must be a floating-point array"):
        fastbn.fuse_conv_bn(W, None, np.zeros(2), np.ones(2), None, None, 1e-5)
