"""The statistics of float32, float16 and bfloat16 data against the float32 accuracy
contract (tests/contract.py) on the inputs that make it hard for one-pass sums: offsets up
to 1e6 times the standard deviation, constant channels (exactly their value), scales mixed
within a channel, blocks whose first and sampled values sit far from their mean, and a
large batch."""
import numpy as np
import pytest

import fastbn
from contract import assert_statistics
from fastbn import reference as ref

try:
    import ml_dtypes
    HALF = [np.float16, ml_dtypes.bfloat16]
except ImportError:
    HALF = [np.float16]

# NCHW: one long run per block, short runs stacked into blocks, a block split into pieces;
# NHWC: the rows kernels
SHAPES = [((16, 3, 32, 32), "NCHW"), ((64, 5, 7, 7), "NCHW"), ((4, 2, 3000), "NCHW"),
          ((16, 32, 32, 3), "NHWC")]


def _check(x, layout, where):
    y, mean, invstd = fastbn.batch_norm_train(x, layout=layout)
    _, mean_r, invstd_r = ref.batch_norm_train(x.astype(np.float64), layout=layout)
    assert_statistics(x, layout, mean, invstd, mean_r, invstd_r, where)
    return mean


@pytest.mark.parametrize("shape, layout", SHAPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0, 1e3, 1e6])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_offsets_and_scales(shape, layout, offset, scale):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * scale + offset * scale).astype(np.float32)
    _check(x, layout, f"offset {offset} scale {scale}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape, layout", SHAPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 10.0, 1e3])
def test_half_precision(shape, layout, dtype, offset):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) + offset).astype(dtype)
    _check(x, layout, f"{np.dtype(dtype).name} offset {offset}")


@pytest.mark.parametrize("dtype", [np.float32] + HALF, ids=str)
@pytest.mark.parametrize("shape, layout", SHAPES, ids=str)
def test_constant_channels_give_their_value(shape, layout, dtype):
    C = shape[1] if layout == "NCHW" else shape[-1]
    x = np.empty(shape, dtype)
    big = 3e4 if dtype == np.float16 else 1e7
    values = np.array([big, -3.25, 0.1, 7e-3, 42.0][:C]).astype(dtype)
    if layout == "NCHW":
        x[:] = values.reshape((1, C) + (1,) * (len(shape) - 2))
    else:
        x[:] = values
    mean = _check(x, layout, "constant")
    assert mean.tolist() == values.astype(np.float64).tolist()


@pytest.mark.parametrize("shape, layout", SHAPES, ids=str)
def test_scales_mixed_within_a_channel(shape, layout):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    x[: shape[0] // 2] *= 1e3          # half the samples a thousand times larger
    _check((x + 50.0).astype(np.float32), layout, "mixed scales")


def test_first_values_far_from_their_blocks_mean():
    """Blocks whose first value, and every 64th, sit far from the rest of the block (a
    one-pass sum about such a value carries 63 times the centred sum of squares): the
    statistics keep the contract."""
    x = (np.random.default_rng(9).standard_normal((8, 2, 32, 32)) * 0.3).astype(np.float32)
    flat = x.reshape(8, 2, -1)
    flat[:, :, ::64] = 100.0           # the first value of each 1024-value plane, every 64th
    flat[:, :, 1::64] = -10.0
    _check(x, "NCHW", "far pivot")


def test_a_large_batch():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((64, 2, 128, 128)) * 0.5 + 3.0).astype(np.float32)
    _check(x, "NCHW", "large batch")
