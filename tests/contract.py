"""The accuracy contract of the training statistics, as the tests check it.

float64 data: the float64 reference's statistics to 1e-12 (each test gives its tolerance).
float32, float16 and bfloat16 data: as exact as float32 outputs can show (the bar the
statistics must keep when they move from double to float32 lanes; today's double
statistics are far inside it),
|mean - mean64| <= 2 * 2**-23 * std64 (exactly the value of a constant channel) and
|invstd / invstd64 - 1| <= 2 * 2**-23, where mean64, std64 and invstd64 are the float64
statistics of the same values.
"""
import numpy as np

MEAN_STDS = 2 * 2.0 ** -23      # |mean - mean64| in standard deviations
INVSTD_REL = 2 * 2.0 ** -23     # |invstd / invstd64 - 1|
REF_REL = 2.0 ** -50            # the float64 reference's own rounding


def channel_std(x, layout):
    """The float64 standard deviation (biased) of each channel of x."""
    x = np.asarray(x).astype(np.float64)
    axis = 1 if layout == "NCHW" or x.ndim == 2 else x.ndim - 1
    with np.errstate(invalid="ignore", over="ignore"):
        return x.std(axis=tuple(a for a in range(x.ndim) if a != axis))


def _within(name, got, want, bound, err_msg):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = (np.abs(got - want) <= bound) | (got == want) | (np.isnan(got) & np.isnan(want))
    assert ok.all(), (f"{name} beyond the accuracy contract {err_msg}: channels "
                      f"{np.flatnonzero(~ok)[:5].tolist()}, got {got[~ok][:3]}, "
                      f"float64 {want[~ok][:3]}, bound {np.broadcast_to(bound, ok.shape)[~ok][:3]}")


def assert_statistics(x, layout, mean, invstd, mean_r, invstd_r, err_msg="", *, times=1,
                      rtol=1e-12, atol=1e-12):
    """mean and invstd of x's training forward against the float64 statistics mean_r,
    invstd_r: rtol/atol for float64 data, the contract for the others (times: how many
    results within the contract the comparison spans, 2 for two fastbn results)."""
    if np.dtype(x.dtype) == np.float64:
        np.testing.assert_allclose(mean, mean_r, rtol=rtol, atol=atol, err_msg=err_msg)
        if invstd is not None:
            np.testing.assert_allclose(invstd, invstd_r, rtol=rtol, atol=atol,
                                       err_msg=err_msg)
        return
    std = channel_std(x, layout)
    _within("mean", mean, mean_r,
            times * MEAN_STDS * std + REF_REL * np.abs(np.asarray(mean_r, np.float64)),
            err_msg)
    if invstd is not None:
        _within("invstd", invstd, invstd_r,
                (times * INVSTD_REL + REF_REL) * np.abs(np.asarray(invstd_r, np.float64)),
                err_msg)
