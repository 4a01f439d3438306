"""fastbn.BatchNorm against torch.nn.BatchNorm{1,2,3}d: outputs, gradients, state."""
import numpy as np
import pytest

import fastbn
from cases import LAYER_SHAPES

try:
    import torch
except ImportError:          # the torch comparisons skip; the layer's own tests still run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

LAYOUTS = ("NCHW", "NHWC")
SHAPES = LAYER_SHAPES


def torch_bn(ndim, C, **kwargs):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[ndim]
    return cls(C, dtype=torch.float64, **kwargs)


def to_layout(a, layout):
    return a if layout == "NCHW" else np.moveaxis(a, 1, -1)


def from_layout(a, layout):
    return a if layout == "NCHW" else np.moveaxis(a, -1, 1)


def data(shape, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    C = shape[1]
    cshape = (1, C) + (1,) * (len(shape) - 2)
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, C).reshape(cshape) \
        + rng.normal(0, 3, C).reshape(cshape)
    dy = rng.normal(size=shape)
    return x.astype(dtype), dy.astype(dtype)


def run_torch(module, x, dy):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y = module(xt)
    y.backward(torch.from_numpy(dy.copy()))
    return y.detach().numpy(), xt.grad.numpy()


def assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want) / (1 + np.abs(want))) if want.size else 0.0
    assert err <= tol, f"{what}: max rel err {err:.3g} > {tol}"


def assert_state(bn, tbn, tol, what):
    state = {k: v.detach().numpy() for k, v in tbn.state_dict().items()}
    mine = bn.state_dict()
    assert sorted(mine) == sorted(state), what
    for k, v in state.items():
        if k == "num_batches_tracked":
            assert int(mine[k]) == int(v), f"{k} {what}"
        else:
            assert_close(mine[k], v, tol, f"{k} {what}")


# --------------------------------------------------------------------------------------
# Acceptance 1: four training steps, then eval, against torch
# --------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_training_steps_match_torch(momentum, shape, layout):
    C = shape[1]
    tbn = torch_bn(len(shape), C, momentum=momentum)
    rng = np.random.default_rng(1)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, C)))
        tbn.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, C)))
    bn = fastbn.BatchNorm(C, momentum=momentum, layout=layout, dtype=np.float64)
    bn.load_state_dict({k: v.detach().numpy() for k, v in tbn.state_dict().items()})
    for step in range(4):
        x, dy = data(shape, step)
        y_t, dx_t = run_torch(tbn, x, dy)
        y = bn(to_layout(x, layout))
        dx = bn.backward(to_layout(dy, layout))
        tag = f"step {step} momentum={momentum} {shape} {layout}"
        assert y.shape == to_layout(x, layout).shape
        assert_close(from_layout(y, layout), y_t, 1e-9, "y " + tag)
        assert_close(from_layout(dx, layout), dx_t, 1e-9, "dx " + tag)
        assert_close(bn.weight_grad, tbn.weight.grad.numpy(), 1e-9, "weight_grad " + tag)
        assert_close(bn.bias_grad, tbn.bias.grad.numpy(), 1e-9, "bias_grad " + tag)
        assert_state(bn, tbn, 1e-9, tag)
        assert bn.num_batches_tracked == step + 1
    tbn.eval()
    bn.eval()
    assert not bn.training
    x, dy = data(shape, 10)
    y_t, dx_t = run_torch(tbn, x, dy)
    y = bn(to_layout(x, layout))
    dx = bn.backward(to_layout(dy, layout))
    tag = f"eval momentum={momentum} {shape} {layout}"
    assert_close(from_layout(y, layout), y_t, 1e-9, "y " + tag)
    assert_close(from_layout(dx, layout), dx_t, 1e-9, "dx " + tag)
    assert_close(bn.weight_grad, tbn.weight.grad.numpy(), 1e-9, "weight_grad " + tag)
    assert_close(bn.bias_grad, tbn.bias.grad.numpy(), 1e-9, "bias_grad " + tag)
    assert_state(bn, tbn, 1e-9, tag)


@needs_torch
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_options_match_torch(affine, track, layout):
    shape = (4, 6, 5, 5)
    tbn = torch_bn(4, 6, affine=affine, track_running_stats=track)
    bn = fastbn.BatchNorm(6, affine=affine, track_running_stats=track, layout=layout,
                          dtype=np.float64)
    assert sorted(bn.state_dict()) == sorted(tbn.state_dict())
    for mode in ("train", "train", "eval"):
        getattr(tbn, mode)()
        getattr(bn, mode)()
        x, dy = data(shape, 3)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        y_t = tbn(xt)
        y_t.backward(torch.from_numpy(dy))
        y = bn(to_layout(x, layout))
        dx = bn.backward(to_layout(dy, layout))
        tag = f"{mode} affine={affine} track={track} {layout}"
        assert_close(from_layout(y, layout), y_t.detach().numpy(), 1e-9, "y " + tag)
        assert_close(from_layout(dx, layout), xt.grad.numpy(), 1e-9, "dx " + tag)
        assert_state(bn, tbn, 1e-9, tag)
        if affine:
            assert_close(bn.weight_grad, tbn.weight.grad.numpy(), 1e-9, "weight_grad " + tag)
        else:
            assert bn.weight is None and bn.weight_grad is None


@needs_torch
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_layer_matches_torch(layout):
    shape = (8, 16, 6, 6)
    tbn = torch.nn.BatchNorm2d(16)
    bn = fastbn.BatchNorm(16, layout=layout)
    for step in range(3):
        x, dy = data(shape, step, dtype=np.float32)
        y_t, dx_t = run_torch(tbn, x, dy)
        y = bn(to_layout(x, layout))
        dx = bn.backward(to_layout(dy, layout))
        assert y.dtype == dx.dtype == bn.running_mean.dtype == np.float32
        assert_close(from_layout(y, layout), y_t, 1e-5, f"y float32 {layout}")
        assert_close(from_layout(dx, layout), dx_t, 1e-4, f"dx float32 {layout}")
        assert_state(bn, tbn, 1e-5, f"float32 {layout}")
        assert_close(bn.weight_grad, tbn.weight.grad.numpy(), 1e-4, "weight_grad float32")


@needs_torch
def test_load_torch_state_dict_then_eval():
    """A trained torch BatchNorm2d's state_dict, converted to NumPy, loads directly."""
    tbn = torch.nn.BatchNorm2d(5, momentum=0.2)
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 2.0)
        tbn.bias.uniform_(-1.0, 1.0)
    for step in range(3):
        tbn(torch.from_numpy(data((6, 5, 4, 4), step, np.float32)[0]))
    tbn.eval()
    bn = fastbn.BatchNorm(5)
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    assert bn.num_batches_tracked == 3
    bn.eval()
    x, _ = data((6, 5, 4, 4), 9, np.float32)
    with torch.no_grad():
        y_t = tbn(torch.from_numpy(x)).numpy()
    assert_close(bn(x), y_t, 1e-6, "eval after load_state_dict")
    # tensors themselves (np.asarray works on CPU tensors) load too
    bn2 = fastbn.BatchNorm(5)
    bn2.load_state_dict(tbn.state_dict())
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(bn2.state_dict()[k], v, err_msg=k)


@needs_torch
def test_cumulative_average_continues_from_loaded_count():
    """momentum=None weights the next batch by 1/(num_batches_tracked + 1), as torch does."""
    tbn = torch_bn(4, 3, momentum=None)
    for step in range(2):
        tbn(torch.from_numpy(data((4, 3, 2, 2), step)[0]))
    bn = fastbn.BatchNorm(3, momentum=None, dtype=np.float64)
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    x, _ = data((4, 3, 2, 2), 5)
    tbn(torch.from_numpy(x))
    bn(x)
    assert_state(bn, tbn, 1e-12, "cumulative after load")


# --------------------------------------------------------------------------------------
# Gradient accumulation, modes, errors
# --------------------------------------------------------------------------------------
def test_grads_accumulate_until_zero_grad():
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    x, dy = data((5, 3, 4), 0)
    bn(x)
    bn.backward(dy)
    g1 = bn.weight_grad.copy(), bn.bias_grad.copy()
    bn.backward(dy)
    np.testing.assert_allclose(bn.weight_grad, 2 * g1[0], rtol=1e-15)
    np.testing.assert_allclose(bn.bias_grad, 2 * g1[1], rtol=1e-15)
    bn.zero_grad()
    np.testing.assert_array_equal(bn.weight_grad, 0)
    np.testing.assert_array_equal(bn.bias_grad, 0)
    bn.backward(dy)
    np.testing.assert_array_equal(bn.weight_grad, g1[0])


def test_backward_uses_the_weight_of_its_forward():
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    x, dy = data((5, 3, 4), 0)
    bn(x)
    dx1 = bn.backward(dy)
    bn(x)
    bn.weight[...] = 7.0            # an optimizer step after the forward
    np.testing.assert_array_equal(bn.backward(dy), dx1)


def test_train_eval_switch():
    bn = fastbn.BatchNorm(3)
    assert bn.training
    assert bn.eval() is bn and not bn.training
    assert bn.train() is bn and bn.training
    bn.train(False)
    assert not bn.training


def test_eval_does_not_touch_state():
    bn = fastbn.BatchNorm(3)
    bn(data((5, 3, 4), 0, np.float32)[0])
    state = bn.state_dict()
    bn.eval()(data((5, 3, 4), 1, np.float32)[0])
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_state_dict_returns_copies():
    bn = fastbn.BatchNorm(3)
    state = bn.state_dict()
    state["running_mean"][...] = 5
    np.testing.assert_array_equal(bn.running_mean, 0)
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"].ndim == 0


def test_one_value_per_channel_raises_like_torch():
    if torch is not None:
        with pytest.raises(ValueError):
            torch.nn.BatchNorm1d(3)(torch.ones(1, 3))
    bn = fastbn.BatchNorm(3)
    state = bn.state_dict()
    x = np.ones((1, 3), np.float32)
    with pytest.raises(ValueError, match="x"):
        bn(x)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    np.testing.assert_array_equal(bn.eval()(x), x / np.sqrt(np.float32(1 + 1e-5)))
    with pytest.raises(ValueError, match="x"):
        fastbn.BatchNorm(3, track_running_stats=False).eval()(x)


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="forward"):
        fastbn.BatchNorm(3).backward(np.ones((2, 3), np.float32))


@pytest.mark.parametrize("kwargs,name,exc", [
    (dict(momentum=1.5), "momentum", ValueError),
    (dict(momentum=-0.1), "momentum", ValueError),
    (dict(eps=-1.0), "eps", ValueError),
    (dict(eps=float("nan")), "eps", ValueError),
    (dict(layout="NHW"), "layout", ValueError),
    (dict(dtype=np.float16), "dtype", TypeError),
    (dict(dtype=np.int64), "dtype", TypeError),
])
def test_constructor_errors(kwargs, name, exc):
    with pytest.raises(exc, match=name):
        fastbn.BatchNorm(3, **kwargs)


@pytest.mark.parametrize("n,exc", [(0, ValueError), (-2, ValueError), (2.5, TypeError),
                                   (True, TypeError)])
def test_num_features_errors(n, exc):
    with pytest.raises(exc, match="num_features"):
        fastbn.BatchNorm(n)


@pytest.mark.parametrize("x,exc", [
    (np.ones((4, 3, 2), np.float64), TypeError),       # layer is float32
    (np.ones((4, 3, 2), np.int32), TypeError),
    (np.ones((4, 5, 2), np.float32), ValueError),      # 5 channels, layer has 3
    (np.ones(3, np.float32), ValueError),
])
def test_forward_bad_input(x, exc):
    bn = fastbn.BatchNorm(3)
    state = bn.state_dict()
    saved = x.copy()
    with pytest.raises(exc, match="x"):
        bn(x)
    np.testing.assert_array_equal(x, saved)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_backward_bad_input_leaves_grads():
    bn = fastbn.BatchNorm(3)
    x, dy = data((4, 3, 2), 0, np.float32)
    bn(x)
    bn.backward(dy)
    g = bn.weight_grad.copy()
    with pytest.raises(ValueError, match="dy"):
        bn.backward(dy[:, :, :1])
    with pytest.raises(TypeError, match="dy"):
        bn.backward(dy.astype(np.float64))
    np.testing.assert_array_equal(bn.weight_grad, g)


@pytest.mark.parametrize("change,exc,name", [
    (lambda d: d.pop("running_var"), KeyError, "running_var"),
    (lambda d: d.update(extra=np.zeros(3)), KeyError, "extra"),
    (lambda d: d.update(running_var=np.ones(4)), ValueError, "running_var"),
    (lambda d: d.update(weight=np.ones(3, np.int64)), TypeError, "weight"),
    (lambda d: d.update(num_batches_tracked=np.array(1.5)), ValueError, "num_batches_tracked"),
    (lambda d: d.update(num_batches_tracked="3"), TypeError, "num_batches_tracked"),
    (lambda d: d.update(num_batches_tracked=np.array(2**64 - 1, np.uint64)), ValueError,
     "num_batches_tracked"),
    (lambda d: d.update(num_batches_tracked=np.array(-1)), ValueError, "num_batches_tracked"),
])
def test_load_state_dict_errors_change_nothing(change, exc, name):
    bn = fastbn.BatchNorm(3)
    bn(data((4, 3, 2), 0, np.float32)[0])
    state = bn.state_dict()
    new = {k: np.full_like(v, 2) for k, v in state.items()}
    change(new)
    with pytest.raises(exc, match=name):
        bn.load_state_dict(new)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_load_state_dict_not_strict():
    bn = fastbn.BatchNorm(3)
    bn.load_state_dict({"running_mean": np.ones(3), "extra": 1}, strict=False)
    np.testing.assert_array_equal(bn.running_mean, 1)
    assert bn.running_mean.dtype == np.float32
    np.testing.assert_array_equal(bn.running_var, 1)
