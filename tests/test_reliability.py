"""Regression tests for inputs a hostile or careless caller passes: byte-swapped and unaligned
arrays, array subclasses, outputs whose elements alias each other, flags that are not bools,
extreme values in layer state, layers shared between Python threads, and layer settings
changed between forward and backward. Each asserts the right answer against float64 NumPy,
or the exception type, the argument named in the message and every caller-owned array
unchanged."""
import copy
import pickle
import threading

import numpy as np
import pytest

import fastbn
from fastbn import caffe, onnx, reference
from conftest import Snapshot


def _x(shape=(8, 3, 5), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).normal(2, 3, shape).astype(dtype)


def _swapped(a):
    """a's values in the opposite byte order (a new array)."""
    return a.astype(a.dtype.newbyteorder("S"))


def _unaligned(a):
    """A copy of a whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = np.frombuffer(buf.data, dtype=a.dtype, offset=1, count=a.size).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned
    return u


# ---- 1, 2: byte order ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_byte_swapped_running_buffers_are_updated_right(dtype, layout):
    x = _x()
    starts = (np.linspace(-1, 1, 3), np.linspace(0.5, 2, 3)) if layout == "NCHW" else \
        (np.linspace(-1, 1, 5), np.linspace(0.5, 2, 5))
    rm, rv = (_swapped(s.astype(dtype)) for s in starts)
    rm_want, rv_want = (s.astype(dtype) for s in starts)
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout, running_mean=rm,
                                              running_var=rv, momentum=0.3)
    yr, meanr, _ = reference.batch_norm_train(x, layout=layout, running_mean=rm_want,
                                              running_var=rv_want, momentum=0.3)
    assert rm.dtype.byteorder in "<>" and not rm.dtype.isnative
    np.testing.assert_allclose(rm, rm_want, rtol=1e-6)
    np.testing.assert_allclose(rv, rv_want, rtol=1e-6)
    np.testing.assert_allclose(y, yr, rtol=1e-5, atol=1e-5)


def test_byte_swapped_running_mean_in_batch_renorm():
    x = _x()
    rm, rs = _swapped(np.ones(3)), np.full(3, 2.0)
    y, mean, std, r, d = fastbn.batch_renorm_train(x, None, None, rm, rs)
    m64 = x.astype(np.float64).mean(axis=(0, 2))
    s64 = np.sqrt(x.astype(np.float64).var(axis=(0, 2)) + 1e-5)
    np.testing.assert_allclose(d, np.clip((m64 - 1.0) / 2.0, -5, 5), rtol=1e-12)
    np.testing.assert_allclose(r, np.clip(s64 / 2.0, 1 / 3, 3), rtol=1e-12)
    xhat = (x - m64[None, :, None]) / s64[None, :, None]
    np.testing.assert_allclose(y, xhat * r[None, :, None] + d[None, :, None], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(rm, 1.0 + 0.01 * (m64 - 1.0), rtol=1e-14)
    np.testing.assert_allclose(rs, 2.0 + 0.01 * (s64 - 2.0), rtol=1e-14)


def test_layer_with_byte_swapped_buffers():
    x = _x()
    bn, want = fastbn.BatchNorm(3), fastbn.BatchNorm(3)
    bn.running_mean, bn.running_var = _swapped(bn.running_mean), _swapped(bn.running_var)
    for _ in range(3):
        np.testing.assert_array_equal(bn(x), want(x))
    np.testing.assert_allclose(bn.running_mean, want.running_mean, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, want.running_var, rtol=1e-6)
    brn, brn_want = fastbn.BatchRenorm(3), fastbn.BatchRenorm(3)
    brn.running_mean, brn.running_std = _swapped(brn.running_mean), _swapped(brn.running_std)
    for _ in range(3):
        np.testing.assert_allclose(brn(x), brn_want(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(brn.running_std, brn_want.running_std, rtol=1e-6)


def test_load_state_dict_of_byte_swapped_arrays():
    src = fastbn.BatchNorm(3)
    src(_x())
    bn = fastbn.BatchNorm(3)
    bn.load_state_dict({k: _swapped(v) for k, v in src.state_dict().items()})
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, src.state_dict()[k], err_msg=k)


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_byte_swapped_data_is_converted(dtype):
    x = _x(dtype=np.float64).astype(dtype)
    native = x.astype(x.dtype.newbyteorder("="))
    y, mean, invstd = fastbn.batch_norm_train(x)
    assert y.dtype == native.dtype and y.dtype.isnative
    np.testing.assert_array_equal(y, fastbn.batch_norm_train(native)[0])
    dy = _x(seed=1).astype(dtype)
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd)[0]
    np.testing.assert_array_equal(
        dx, fastbn.batch_norm_backward(dy.astype(native.dtype), native, mean, invstd)[0])
    np.testing.assert_array_equal(onnx.batch_normalization(x, *[_swapped(np.ones(3))] * 4),
                                  onnx.batch_normalization(native, *[np.ones(3)] * 4))


def test_byte_swapped_parameters_are_read_right():
    x = _x()
    w, b = np.array([1.0, -2.0, 0.5]), np.array([0.0, 3.0, -1.0])
    rm, rv = np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 4.0])
    np.testing.assert_array_equal(
        fastbn.batch_norm_infer(x, _swapped(rm), _swapped(rv), _swapped(w), _swapped(b)),
        fastbn.batch_norm_infer(x, rm, rv, w, b))
    np.testing.assert_array_equal(fastbn.batch_norm_train(x, _swapped(w), _swapped(b))[0],
                                  fastbn.batch_norm_train(x, w, b)[0])


def test_byte_swapped_out_is_refused_naming_byte_order():
    x = _x()
    out = np.zeros(x.shape, ">f4")
    snap = Snapshot(x, out)
    with pytest.raises(ValueError, match="out.*byte order"):
        fastbn.batch_norm_train(x, out=out)
    snap.assert_unchanged()


@pytest.mark.parametrize("engine", ["fused", "gemv"])
def test_caffe_byte_swapped_blob_is_refused(engine):
    layer = caffe.BatchNorm(3, engine=engine)
    layer.blobs[0] = _swapped(layer.blobs[0])
    x = _x()
    snap = Snapshot(layer.blobs, x)
    with pytest.raises(TypeError, match=r"blobs\[0\].*byte order"):
        layer.forward(x)
    snap.assert_unchanged()
    y = caffe.BatchNorm(3, engine=engine).forward(_swapped(x))     # data is converted
    np.testing.assert_array_equal(y, caffe.BatchNorm(3, engine=engine).forward(x))


def test_unaligned_arrays_are_read_right():
    x = _x((4, 3, 50))
    rm, rv = np.linspace(0, 1, 3), np.linspace(1, 2, 3)
    y_want, mean, invstd = fastbn.batch_norm_train(x)
    np.testing.assert_array_equal(fastbn.batch_norm_train(_unaligned(x))[0], y_want)
    np.testing.assert_array_equal(
        fastbn.batch_norm_infer(_unaligned(x), _unaligned(rm), _unaligned(rv)),
        fastbn.batch_norm_infer(x, rm, rv))
    out = _unaligned(np.zeros_like(x))
    assert fastbn.batch_norm_train(x, out=out)[0] is out
    np.testing.assert_array_equal(out, y_want)
    dx = fastbn.batch_norm_backward(_unaligned(x), _unaligned(x), _unaligned(mean),
                                    _unaligned(invstd))[0]
    np.testing.assert_array_equal(dx, fastbn.batch_norm_backward(x, x, mean, invstd)[0])
    rmu, rvu = _unaligned(np.zeros(3)), _unaligned(np.ones(3))
    rmw, rvw = np.zeros(3), np.ones(3)
    fastbn.batch_norm_train(x, running_mean=rmu, running_var=rvu)
    fastbn.batch_norm_train(x, running_mean=rmw, running_var=rvw)
    np.testing.assert_array_equal(rmu, rmw)
    np.testing.assert_array_equal(rvu, rvw)


# ---- 3: a layer shared by Python threads -----------------------------------------------------

def _interleaved(layer, xs, dys, steps=5):
    """Two threads run forward/backward on one layer; each forward of one thread is followed
    by the other thread's forward before either backward runs."""
    barrier = threading.Barrier(2)
    got = [[], []]
    errors = []

    def work(t):
        try:
            for _ in range(steps):
                y = layer.forward(xs[t])
                barrier.wait()            # both forwards done
                got[t].append((y, layer.backward(dys[t])))
                barrier.wait()
        except Exception as e:           # reported by the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return got


@pytest.mark.parametrize("cls", [fastbn.BatchNorm, fastbn.BatchRenorm])
@pytest.mark.parametrize("training", [True, False])
def test_layer_shared_by_threads_gives_each_thread_its_own_gradients(cls, training):
    xs = [_x((6, 3, 7), np.float64, seed=s) for s in (1, 2)]
    dys = [_x((6, 3, 7), np.float64, seed=s) for s in (3, 4)]
    layer = cls(3, dtype=np.float64).train(training)
    got = _interleaved(layer, xs, dys)
    # the running statistics are now those of 10 steps; each backward must still match
    # its own forward, redone alone from the same statistics
    for t in range(2):
        for y, dx in got[t]:
            assert y.shape == xs[t].shape and dx.shape == xs[t].shape
        if training and cls is fastbn.BatchNorm:
            _, mean, invstd = reference.batch_norm_train(xs[t])
            want = reference.batch_norm_backward(dys[t], xs[t], mean, invstd, layer.weight)[0]
            for y, dx in got[t]:
                np.testing.assert_allclose(dx, want, rtol=1e-10, atol=1e-12)
    assert layer.num_batches_tracked == (10 if training else 0)
    # 10 backwards accumulated their sums
    want_bias = 5 * (dys[0].sum(axis=(0, 2)) + dys[1].sum(axis=(0, 2)))
    np.testing.assert_allclose(layer.bias_grad, want_bias, rtol=1e-12)


def test_caffe_layers_shared_by_threads():
    xs = [_x((6, 3, 7), np.float64, seed=s) for s in (1, 2)]
    dys = [_x((6, 3, 7), np.float64, seed=s) for s in (3, 4)]
    for engine in ("fused", "gemv"):
        bn = caffe.BatchNorm(3, engine=engine, dtype=np.float64)
        got = _interleaved(bn, xs, dys)
        for t in range(2):
            alone = caffe.BatchNorm(3, engine=engine, dtype=np.float64)
            y0 = alone.forward(xs[t])
            dx0 = alone.backward(dys[t])
            for y, dx in got[t]:
                np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-12)
                np.testing.assert_allclose(dx, dx0, rtol=1e-10, atol=1e-12)
        assert bn.blobs[2][0] == pytest.approx(sum(0.999 ** k for k in range(10)))
    sc = caffe.Scale(3, bias_term=True, dtype=np.float64)
    sc.blobs[0][:] = [1.0, 2.0, 3.0]
    got = _interleaved(sc, xs, dys)
    for t in range(2):
        for y, dx in got[t]:
            np.testing.assert_allclose(dx, dys[t] * sc.blobs[0][None, :, None])
    np.testing.assert_allclose(sc.diffs[0], 5 * sum((d * x).sum(axis=(0, 2))
                                                    for x, d in zip(xs, dys)))


def test_backward_in_a_thread_without_its_own_forward_raises():
    bn = fastbn.BatchNorm(3)
    bn(_x())
    caught = []
    th = threading.Thread(target=lambda: caught.append(pytest.raises(
        RuntimeError, bn.backward, _x())))
    th.start()
    th.join()
    assert caught and "before forward" in str(caught[0].value)


@pytest.mark.parametrize("cls", [fastbn.BatchNorm, fastbn.BatchRenorm, caffe.BatchNorm,
                                 caffe.Scale])
def test_layers_copy_and_pickle(cls):
    layer = cls(3)
    x = _x()
    y = layer.forward(x)
    for make in (copy.deepcopy, lambda a: pickle.loads(pickle.dumps(a))):
        clone = make(layer)
        np.testing.assert_array_equal(clone.forward(x), layer.forward(x))
        clone.backward(np.ones_like(y))
    assert y.shape == x.shape


# ---- 4: settings changed between forward and backward ------------------------------------------

@pytest.mark.parametrize("cls", [fastbn.BatchNorm, fastbn.BatchRenorm])
@pytest.mark.parametrize("training", [True, False])
def test_backward_uses_the_settings_of_its_forward(cls, training):
    x, dy = _x((4, 3, 5, 3), np.float64), _x((4, 3, 5, 3), np.float64, seed=1)
    a, b = cls(3, dtype=np.float64).train(training), cls(3, dtype=np.float64).train(training)
    a.weight[:] = b.weight[:] = [0.5, 2.0, -1.0]
    a(x)
    b(x)
    a.layout = "NHWC"                         # x has 3 values on its last axis as well
    a.weight[:] = 7.0
    a.eps = 0.5
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
    np.testing.assert_array_equal(a.weight_grad, b.weight_grad)


def test_layer_layout_is_validated_on_assignment():
    bn = fastbn.BatchNorm(3)
    with pytest.raises(ValueError, match="layout"):
        bn.layout = "CHW"
    assert bn.layout == "NCHW"


# ---- 5: BatchRenorm eval with extreme running_std ----------------------------------------------

@pytest.mark.parametrize("std", [1e-200, 1e200, 1e-160, 3e-308, 1.5e300])
def test_batch_renorm_eval_divides_by_std(std):
    x = _x((4, 3, 6), np.float64) * std
    brn = fastbn.BatchRenorm(3, dtype=np.float64)
    mean = np.array([0.5, -1.0, 2.0]) * std
    brn.load_state_dict({"weight": np.array([1.0, 2.0, -0.5]), "bias": np.array([0.0, 1.0, 2.0]),
                         "running_mean": mean, "running_std": np.full(3, std),
                         "num_batches_tracked": np.array(7)})
    y = brn.eval()(x)
    want = (x - mean[None, :, None]) / std * brn.weight[None, :, None] + brn.bias[None, :, None]
    np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-14)
    dx = brn.backward(np.ones_like(x))
    np.testing.assert_allclose(dx, np.broadcast_to(brn.weight[None, :, None] / std, x.shape),
                               rtol=1e-14)


@pytest.mark.parametrize("std", [1e-200, 1e200])
def test_batch_renorm_float32_layer_refuses_a_std_float32_cannot_hold(std):
    brn = fastbn.BatchRenorm(3)
    state = brn.state_dict()
    bad = dict(state, running_std=np.full(3, std))
    with pytest.raises(ValueError, match="running_std"):
        brn.load_state_dict(bad)
    for k, v in brn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


# ---- 6: num_batches_tracked ----------------------------------------------------------------------

@pytest.mark.parametrize("value, exc", [
    (np.array(2 ** 64 - 1, np.uint64), ValueError), (np.array(2 ** 63, np.uint64), ValueError),
    (2 ** 63, ValueError), (-1, ValueError), (np.array(-3), ValueError),
    (np.array(1.5), ValueError), (2.0, ValueError), (np.array([1, 2]), ValueError),
    ("3", TypeError), (True, TypeError), (None, TypeError)])
def test_num_batches_tracked_out_of_range_is_refused(value, exc):
    bn = fastbn.BatchNorm(3)
    state = bn.state_dict()
    with pytest.raises(exc, match="num_batches_tracked"):
        bn.load_state_dict(dict(state, num_batches_tracked=value))
    with pytest.raises(exc, match="num_batches_tracked"):
        bn.num_batches_tracked = value
    assert bn.num_batches_tracked == 0
    assert bn.state_dict()["num_batches_tracked"] == 0


@pytest.mark.parametrize("momentum", [0.1, None])
def test_num_batches_tracked_saturates_at_int64_max(momentum):
    top = 2 ** 63 - 1
    bn = fastbn.BatchNorm(3, momentum=momentum)
    bn.load_state_dict(dict(bn.state_dict(), num_batches_tracked=np.array(top - 1)))
    for _ in range(3):
        bn(_x())
    assert bn.num_batches_tracked == top
    state = bn.state_dict()
    assert state["num_batches_tracked"] == top and state["num_batches_tracked"].dtype == np.int64
    brn = fastbn.BatchRenorm(3)
    brn.num_batches_tracked = np.uint64(top)
    brn(_x())
    assert brn.state_dict()["num_batches_tracked"] == top


# ---- 7: flags are bools ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["False", "True", 0, 1, 0.0, None, [], np.array([True])])
def test_layer_train_takes_bools_only(mode):
    bn = fastbn.BatchNorm(3).eval()
    with pytest.raises(TypeError, match="mode"):
        bn.train(mode)
    with pytest.raises(TypeError, match="training"):
        bn.training = mode
    assert bn.training is False


def test_numpy_bools_are_flags():
    x = _x()
    y, mean, invstd = fastbn.batch_norm_train(x)
    a = fastbn.batch_norm_backward(x, x, mean, invstd, training=np.bool_(False))[0]
    np.testing.assert_array_equal(a, fastbn.batch_norm_backward(x, x, mean, invstd,
                                                                training=False)[0])
    bn = fastbn.BatchNorm(3, affine=np.bool_(False)).train(np.bool_(False))
    assert bn.training is False and bn.affine is False
    with pytest.raises(TypeError, match="strict"):
        bn.load_state_dict(bn.state_dict(), strict="no")


# ---- 8: array subclasses ---------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_matrix_input_is_converted_to_ndarray():
    x = _x((6, 4), np.float64)
    y, mean, invstd = fastbn.batch_norm_train(np.asmatrix(x))
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, fastbn.batch_norm_train(x)[0])


def test_masked_layer_inputs_are_refused():
    for layer in (fastbn.BatchNorm(3), fastbn.BatchRenorm(3), caffe.BatchNorm(3),
                  caffe.Scale(3)):
        x = np.ma.masked_greater(_x(), 4.0)
        snap = Snapshot(x, [v for v in vars(layer).values() if isinstance(v, np.ndarray)])
        with pytest.raises(TypeError, match="masked"):
            layer.forward(x)
        snap.assert_unchanged()
    bn = fastbn.BatchNorm(3)
    with pytest.raises(TypeError, match="running_mean.*masked"):
        bn.load_state_dict(dict(bn.state_dict(), running_mean=np.ma.zeros(3)))


# ---- 9: outputs whose elements alias each other ----------------------------------------------------

def _zero_stride(shape, dtype=np.float32):
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=shape,
                                           strides=(0,) * len(shape), writeable=True)


def test_self_overlapping_outputs_are_refused_everywhere():
    x = _x()
    mean, std = np.zeros(3), np.ones(3)
    calls = {
        "train": lambda o: fastbn.batch_norm_train(x, out=o),
        "infer": lambda o: fastbn.batch_norm_infer(x, mean, std, out=o),
        "backward": lambda o: fastbn.batch_norm_backward(x, x, mean, std, out=o),
        "renorm_train": lambda o: fastbn.batch_renorm_train(x, None, None, np.zeros(3),
                                                            np.ones(3), out=o),
        "renorm_backward": lambda o: fastbn.batch_renorm_backward(x, x, mean, std, std, mean,
                                                                  out=o),
        "caffe_forward": lambda o: caffe.BatchNorm(3).forward(x, out=o),
        "caffe_gemv_forward": lambda o: caffe.BatchNorm(3, engine="gemv").forward(x, out=o),
    }
    for name, call in calls.items():
        out = _zero_stride(x.shape)
        snap = Snapshot(x, out, mean, std)
        with pytest.raises(ValueError, match="out.*share memory"):
            call(out)
        snap.assert_unchanged()
    bn = caffe.BatchNorm(3)
    bn.forward(x)
    with pytest.raises(ValueError, match="out"):
        bn.backward(x, out=_zero_stride(x.shape))


def test_interleaved_strides_without_overlap_are_accepted():
    x = _x((4, 3, 5))
    base = np.zeros(200, np.float32)
    # element (i, j, k) at 4*(3i + 12k + j)... no two elements share an offset
    out = np.lib.stride_tricks.as_strided(base, shape=(4, 3, 5), strides=(12, 4, 48),
                                          writeable=True)
    assert not fastbn._validate.self_overlapping(out)
    y = fastbn.batch_norm_train(x, out=out)[0]
    assert y is out
    np.testing.assert_array_equal(out, fastbn.batch_norm_train(x)[0])
    inter = np.lib.stride_tricks.as_strided(base, shape=(5, 5), strides=(8, 12),
                                            writeable=True)  # offsets 8i + 12j collide
    assert fastbn._validate.self_overlapping(inter)


def test_zero_stride_running_buffers_are_refused():
    x = _x()
    rm, rv = _zero_stride((3,), np.float64), np.ones(3)
    snap = Snapshot(x, rm, rv)
    with pytest.raises(ValueError, match="running_mean"):
        fastbn.batch_norm_train(x, running_mean=rm, running_var=rv)
    with pytest.raises(ValueError, match="running_std"):
        fastbn.batch_renorm_train(x, None, None, np.zeros(3), _zero_stride((3,), np.float64))
    snap.assert_unchanged()


# ---- 10: scalars, the thread cap, the oracle's infinities ----------------------------------------

def test_zero_d_arrays_are_scalars_everywhere():
    x = _x()
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, invstd = fastbn.batch_norm_train(x, eps=np.array(1e-5), momentum=np.array(0.1),
                                              running_mean=rm, running_var=rv,
                                              num_threads=np.array(2))
    rm2, rv2 = np.zeros(3), np.ones(3)
    y2 = fastbn.batch_norm_train(x, eps=1e-5, momentum=0.1, running_mean=rm2,
                                 running_var=rv2, num_threads=2)[0]
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(rm, rm2)
    fastbn.BatchNorm(3, eps=np.array(1e-3), momentum=np.array(0.5))
    fastbn.batch_renorm_train(x, None, None, np.zeros(3), np.ones(3), rmax=np.array(2.0),
                              dmax=np.array(1.0))
    with pytest.raises(TypeError, match="eps"):
        fastbn.batch_norm_train(x, eps=np.array(True))
    with pytest.raises(TypeError, match="num_threads"):
        fastbn.batch_norm_train(x, num_threads=np.array(2.0))


def test_set_num_threads_cap():
    cap = fastbn._threads.MAX_THREADS
    try:
        fastbn.set_num_threads(10 ** 9)
        assert fastbn.get_num_threads() == cap
    finally:
        fastbn.set_num_threads(None)
    assert "capped" in fastbn.set_num_threads.__doc__


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_reference_gives_nan_statistics_for_a_non_finite_channel(bad, layout):
    x = _x((6, 3, 4)) if layout == "NCHW" else _x((6, 4, 3))
    if layout == "NCHW":
        x[2, 1, 3] = bad
    else:
        x[2, 3, 1] = bad
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout)
    yr, meanr, invstdr = reference.batch_norm_train(x, layout=layout)
    np.testing.assert_array_equal(np.isnan(mean), [False, True, False])
    np.testing.assert_array_equal(np.isnan(meanr), np.isnan(mean))
    np.testing.assert_array_equal(np.isnan(invstdr), np.isnan(invstd))
    np.testing.assert_array_equal(np.isnan(yr), np.isnan(y))
