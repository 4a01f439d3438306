"""The lean path of small calls (fastbn/kernels/lean.pxi): checks, kernel and result in one C
call. It must give the general path's results to the bit, update the same buffers, and
leave every call it does not take (anything unusual, and every bad input) to the general
path, which raises the documented errors."""
import numpy as np
import pytest

import fastbn
from fastbn import _dispatch, _memory, _threads

try:
    import ml_dtypes
    BF16 = [np.dtype(ml_dtypes.bfloat16)]
except ImportError:      # pragma: no cover
    BF16 = []

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)] + BF16
SHAPES = [((2, 3, 5, 7), "NCHW"), ((2, 5, 7, 3), "NHWC"), ((4, 33), "NCHW"), ((4, 33), "NHWC"),
          ((3, 1, 6), "NCHW"), ((3, 6, 1), "NHWC"), ((5, 17, 1, 1), "NCHW"),
          ((2, 4, 3, 2, 5), "NCHW"), ((1, 70, 2), "NCHW"), ((2, 1, 1, 70), "NHWC")]
LEAN = ("lean_train", "lean_infer", "lean_backward")


def _data(shape, layout, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1] if layout == "NCHW" else shape[-1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    pdt = np.float64 if dtype == np.float64 else np.float32
    w = rng.uniform(0.5, 1.5, C).astype(pdt)
    b = rng.uniform(-1, 1, C).astype(pdt)
    return x, dy, w, b, C


@pytest.fixture
def lean_calls(monkeypatch):
    """Counts the calls each lean entry point took (returned a result)."""
    taken = dict.fromkeys(LEAN, 0)
    kernels = _dispatch.kernels
    for name in LEAN:
        def spy(*args, _f=getattr(kernels, name), _name=name):
            r = _f(*args)
            taken[_name] += r is not None
            return r
        monkeypatch.setattr(kernels, name, spy)
    return taken


def _general(monkeypatch):
    """Turn the lean path off: every call takes the general path."""
    for name in LEAN:
        monkeypatch.setattr(_dispatch.kernels, name, lambda *args: None)


def _calls(x, dy, w, b, C, layout, relu, out_mode):
    """Every lean-capable call on this data; out_mode None (fresh), "out" or "inplace"."""
    res = {}
    rm, rv = np.zeros(C, w.dtype), np.ones(C, w.dtype)
    train = fastbn.batch_norm_relu_train if relu else fastbn.batch_norm_train
    infer = fastbn.batch_norm_relu_infer if relu else fastbn.batch_norm_infer
    kw = {}
    xt = x.copy()
    if out_mode == "out":
        kw = dict(out=np.full_like(x, 7))
    elif out_mode == "inplace":
        kw = dict(out=xt)
    res["train"] = train(xt, w, b, layout=layout, running_mean=rm, running_var=rv,
                         momentum=0.3, **kw)
    res["train_y"] = res["train"][0].copy()
    res["running"] = (rm, rv)
    xi = x.copy()
    kw = dict(out=np.full_like(x, 7)) if out_mode == "out" else (
        dict(out=xi) if out_mode == "inplace" else {})
    res["infer"] = infer(xi, rm, rv, w, b, layout=layout, **kw)
    _, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout)
    y = fastbn.batch_norm_relu_train(x, w, b, layout=layout)[0] if relu else None
    for training in (True, False):
        dyt = dy.copy()
        kw = dict(out=np.full_like(x, 7)) if out_mode == "out" else (
            dict(out=dyt) if out_mode == "inplace" else {})
        if relu:
            res[f"backward{training}"] = fastbn.batch_norm_relu_backward(
                dyt, y, x, mean, invstd, w, training=training, layout=layout, **kw)
        else:
            res[f"backward{training}"] = fastbn.batch_norm_backward(
                dyt, x, mean, invstd, w, training=training, layout=layout, **kw)
    return res


def _flat(res):
    out = []
    for k in sorted(res):
        v = res[k]
        for a in (v if isinstance(v, tuple) else (v,)):
            out.append((k, a))
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,layout", [((4, 16, 32, 32), "NCHW"), ((4, 32, 32, 16), "NHWC"),
                                          ((1024, 40), "NCHW")])
def test_lean_calls_on_threads_give_the_general_paths_bits(shape, layout, threads, lean_calls,
                                                           monkeypatch):
    """Larger lean calls start the threads the policy gives them, as the general path
    does."""
    x, dy, w, b, C = _data(shape, layout, np.float32)
    with _threads.default_threads(threads):
        lean = _calls(x, dy, w, b, C, layout, False, None)
        assert lean_calls["lean_backward"] == 2
        _general(monkeypatch)
        general = _calls(x, dy, w, b, C, layout, False, None)
    for (k, a), (_, e) in zip(_flat(lean), _flat(general)):
        assert a.tobytes() == e.tobytes(), k


@pytest.mark.parametrize("out_mode", [None, "out", "inplace"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SHAPES, ids=[f"{s}-{L}" for s, L in SHAPES])
def test_lean_calls_give_the_general_paths_bits(shape, layout, dtype, relu, out_mode,
                                                lean_calls, monkeypatch):
    x, dy, w, b, C = _data(shape, layout, dtype)
    lean = _calls(x, dy, w, b, C, layout, relu, out_mode)
    assert lean_calls["lean_train"] >= 1 and lean_calls["lean_infer"] == 1
    assert lean_calls["lean_backward"] == 2
    _general(monkeypatch)
    general = _calls(x, dy, w, b, C, layout, relu, out_mode)
    for (k, a), (_, e) in zip(_flat(lean), _flat(general)):
        assert a.dtype == e.dtype and a.shape == e.shape and a.strides == e.strides, k
        assert a.tobytes() == e.tobytes(), k


def test_lean_results_are_plain_arrays(lean_calls):
    x, dy, w, b, C = _data((2, 3, 4, 4), "NCHW", np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
    assert lean_calls["lean_train"] == lean_calls["lean_backward"] == 1
    assert y.flags.c_contiguous and y.flags.owndata and y.flags.writeable
    assert mean.dtype == invstd.dtype == np.float64 and mean.shape == (C,)
    assert dw.dtype == db.dtype == np.float32 and dw.shape == (C,)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)


def test_which_calls_are_lean(lean_calls):
    """Calls smaller than the output cache's sizes are lean, on any thread count; larger
    ones and unusual arguments take the general path (with the same results)."""
    x, dy, w, b, C = _data((2, 8, 4, 4), "NCHW", np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)

    def lean_infer(*args, **kw):
        before = lean_calls["lean_infer"]
        fastbn.batch_norm_infer(*args, **kw)
        return lean_calls["lean_infer"] - before

    assert lean_infer(x, rm, rv, w, b) == 1
    assert lean_infer(x, rm, rv, w, b, num_threads=1) == 1
    assert lean_infer(x, rm, rv, w.astype(np.float64), None) == 1
    assert lean_infer(x, rm, rv, list(w), b) == 0              # converted by the general path
    assert lean_infer(x, rm, rv, w[::-1], b) == 0               # not contiguous
    assert lean_infer(x, rm, rv, w, b, eps=np.float32(1e-3)) == 0
    assert lean_infer(x, rm, rv, w, b, eps=1) == 0
    assert lean_infer(x[:, :, ::2], rm, rv, w, b) == 0          # a view: copied first
    assert lean_infer(np.asfortranarray(x), rm, rv, w, b) == 0
    assert lean_infer(x, rm, rv, w, b, out=np.empty_like(x)[..., ::-1]) == 0
    assert lean_infer(x, rm, rv, w, b, num_threads=np.int64(1)) == 0
    big = np.zeros((2, 8, 64, 64), np.float32)                  # 65536 values: threads
    assert lean_infer(big, rm, rv, w, b) == 1
    assert lean_infer(big, rm, rv, w, b, num_threads=1) == 1
    huge = np.zeros((2, 8, 128, 128), np.float32)               # 1 MiB: the output cache
    assert huge.nbytes >= _memory.CACHE_FROM
    assert lean_infer(huge, rm, rv, w, b, num_threads=1) == 0


def test_lean_bytes_is_the_output_caches_threshold():
    assert _dispatch.kernels.LEAN_BYTES == _memory.CACHE_FROM
    assert _memory.STREAM_ABOVE >= 1


@pytest.mark.parametrize("call", ["train", "infer", "backward"])
def test_out_overlaps_are_left_to_the_general_path(call, snapshot):
    """An out= that overlaps an input (other than the one it may be) is refused with the
    general path's error, and nothing the caller owns changes."""
    x, dy, w, b, C = _data((2, 8, 3, 3), "NCHW", np.float32)
    _, mean, invstd = fastbn.batch_norm_train(x, w, b)
    buf = np.zeros(2 * x.size, np.float32)
    part = buf[3:3 + x.size].reshape(x.shape)           # partially overlaps `whole`
    whole = buf[:x.size].reshape(x.shape)
    whole[...] = x if call != "backward" else dy
    params = np.zeros(x.size, np.float32)
    wv = params[:C]
    wv[...] = w
    outp = params.reshape(x.shape)                       # overlaps the weight
    for out, msg in ((part, "partially overlaps"), (outp, "must not share memory")):
        snap = snapshot(buf, params)
        with pytest.raises(ValueError, match=msg):
            if call == "train":
                fastbn.batch_norm_train(whole, wv, b, out=out)
            elif call == "infer":
                fastbn.batch_norm_infer(whole, mean.astype(np.float32), np.ones(C, np.float32),
                                        wv, b, out=out)
            else:
                fastbn.batch_norm_backward(whole, x, mean, invstd, wv, out=out)
        snap.assert_unchanged()


@pytest.mark.parametrize("bad", [
    dict(num_threads=0), dict(num_threads=1.0), dict(eps=-1.0), dict(eps=float("nan")),
    dict(layout="nchw"), dict(momentum=1.5)])
def test_bad_small_calls_raise_as_before(bad, snapshot):
    x, dy, w, b, C = _data((2, 8, 3, 3), "NCHW", np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    snap = snapshot(x, w, b, rm, rv)
    kind = TypeError if bad.get("num_threads") == 1.0 else ValueError
    name = next(iter(bad))
    with pytest.raises(kind, match=name if name != "layout" else "layout"):
        fastbn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, **bad)
    if name != "momentum":
        with pytest.raises(kind, match=name):
            fastbn.batch_norm_infer(x, rm, rv, w, b, **bad)
    snap.assert_unchanged()


def test_training_batch_of_one_value_raises():
    x = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm_train(x)
