"""fastbn.fuse_conv_bn: a conv/linear layer followed by eval-mode BN equals the fused layer."""
import numpy as np
import pytest

import fastbn


def conv2d(x, w, b, groups=1):
    """Direct NumPy 2-D convolution (cross-correlation), stride 1, no padding."""
    N, Cin, H, W = x.shape
    Cout, Cg, kh, kw = w.shape
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    og = Cout // groups
    outs = []
    for g in range(groups):
        xg = win[:, g * Cg:(g + 1) * Cg]
        wg = w[g * og:(g + 1) * og]
        outs.append(np.einsum("nchwij,ocij->nohw", xg, wg))
    y = np.concatenate(outs, axis=1)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def bn_eval(z, rm, rv, gamma, beta, eps):
    shape = (1, -1) + (1,) * (z.ndim - 2)
    g = np.ones_like(rm) if gamma is None else gamma
    bt = np.zeros_like(rm) if beta is None else beta
    return (z - rm.reshape(shape)) / np.sqrt(rv.reshape(shape) + eps) * g.reshape(shape) \
        + bt.reshape(shape)


def bn_params(C, rng, dtype=np.float64):
    return (rng.normal(0, 2, C).astype(dtype), rng.uniform(0.1, 4, C).astype(dtype),
            rng.uniform(0.5, 2, C).astype(dtype), rng.normal(size=C).astype(dtype))


def rel_err(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_then_bn_equals_fused_conv(with_bias, groups):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 9, 8))
    w = rng.normal(size=(6, 4 // groups, 3, 3))
    b = rng.normal(size=6) if with_bias else None
    rm, rv, gamma, beta = bn_params(6, rng)
    eps = 1e-3
    saved = [a.copy() for a in (w, rm, rv, gamma, beta)]
    want = bn_eval(conv2d(x, w, b, groups), rm, rv, gamma, beta, eps)
    fw, fb = fastbn.fuse_conv_bn(w, b, rm, rv, gamma, beta, eps)
    assert fw.shape == w.shape and fb.shape == (6,)
    assert fw.dtype == fb.dtype == np.float64
    assert rel_err(conv2d(x, fw, fb, groups), want) < 1e-6
    for a, s in zip((w, rm, rv, gamma, beta), saved):
        np.testing.assert_array_equal(a, s)


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_then_bn_equals_fused_linear(with_bias):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 7))
    w = rng.normal(size=(5, 7))
    b = rng.normal(size=5) if with_bias else None
    rm, rv, gamma, beta = bn_params(5, rng)
    z = x @ w.T + (0 if b is None else b)
    want = fastbn.batch_norm_infer(z, rm, rv, gamma, beta, eps=1e-5)
    fw, fb = fastbn.fuse_conv_bn(w, b, rm, rv, gamma, beta, 1e-5)
    assert rel_err(x @ fw.T + fb, want) < 1e-6


def test_bn_without_affine():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 7))
    w = rng.normal(size=(5, 7))
    rm, rv, _, _ = bn_params(5, rng)
    fw, fb = fastbn.fuse_conv_bn(w, None, rm, rv, None, None, 0.0)
    assert rel_err(x @ fw.T + fb, bn_eval(x @ w.T, rm, rv, None, None, 0.0)) < 1e-6


def test_matches_torch_fusion():
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(3, 8, 3, bias=True, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(8, eps=1e-4, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.normal_(0, 2)
        bn.running_var.uniform_(0.1, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = bn(conv(x)).numpy()
    p = {k: v.detach().numpy() for k, v in list(conv.state_dict().items())
         + [("bn_" + k, v) for k, v in bn.state_dict().items()]}
    fw, fb = fastbn.fuse_conv_bn(p["weight"], p["bias"], p["bn_running_mean"],
                                 p["bn_running_var"], p["bn_weight"], p["bn_bias"], bn.eps)
    with torch.no_grad():
        got = torch.nn.functional.conv2d(x, torch.from_numpy(fw), torch.from_numpy(fb)).numpy()
    assert rel_err(got, want) < 1e-6


def test_float32_in_float32_out():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    rm, rv, gamma, beta = bn_params(4, rng, np.float32)
    fw, fb = fastbn.fuse_conv_bn(w, None, rm, rv, gamma, beta, 1e-5)
    assert fw.dtype == fb.dtype == np.float32
    scale = gamma.astype(np.float64) / np.sqrt(rv.astype(np.float64) + 1e-5)
    np.testing.assert_allclose(fw, w * scale.reshape(-1, 1, 1, 1), rtol=1e-6)
    np.testing.assert_allclose(fb, beta - rm * scale, rtol=1e-6, atol=1e-6)


def _good():
    rng = np.random.default_rng(4)
    return dict(weight=rng.normal(size=(4, 3, 2, 2)), bias=rng.normal(size=4),
                running_mean=np.zeros(4), running_var=np.ones(4), bn_weight=np.ones(4),
                bn_bias=np.zeros(4), eps=1e-5)


@pytest.mark.parametrize("name,value,exc", [
    ("weight", np.ones((4, 3), np.int64), TypeError),
    ("weight", np.float64(1.0), ValueError),
    ("weight", np.ones((5, 3)), ValueError),
    ("bias", np.ones(5), ValueError),
    ("bias", np.ones(4, np.int32), TypeError),
    ("running_mean", np.zeros(3), ValueError),
    ("running_var", np.ones(5), ValueError),
    ("running_var", np.ones(4, np.int64), TypeError),
    ("bn_weight", np.ones(2), ValueError),
    ("bn_bias", np.zeros(4, np.int8), TypeError),
    ("eps", -1.0, ValueError),
])
def test_bad_arguments(name, value, exc):
    args = _good()
    args[name] = value
    saved = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc, match=name):
        fastbn.fuse_conv_bn(**args)
    for k, v in saved.items():
        np.testing.assert_array_equal(args[k], v)
