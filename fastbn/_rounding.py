"""Rounding float64 results into a caller's dtype, once and silently: every value fastbn
stores in a narrower dtype (running statistics, parameter gradients, folded parameters)
goes through here. Rounding to nearest even overflows to inf and underflows to a
subnormal or zero, as defined, whatever np.errstate or the warning filters say."""
import numpy as np

from ._validate import is_bfloat16


def rounded(values, dtype):
    """values (float64) rounded once to dtype, to nearest even, as a new array; silent
    whatever np.errstate says: rounding overflows to inf and underflows to a subnormal or
    zero, as defined. NumPy rounds float64 to float32, float64 and float16 directly;
    bfloat16 goes through float32 rounded to odd (truncated, with the lowest bit set when
    inexact), which makes the second rounding exact, so the result is the correctly
    rounded bfloat16 of the float64 value."""
    dtype = np.dtype(dtype)
    with np.errstate(all="ignore"):
        values = np.asarray(values, dtype=np.float64)
        if not is_bfloat16(dtype):
            return values.astype(dtype)
        f = values.astype(np.float32)
        too_far = np.abs(f.astype(np.float64)) > np.abs(values)
        f = np.where(too_far, np.nextafter(f, np.float32(0)), f)    # toward zero
        bits = f.view(np.uint32).copy()
        inexact = (f.astype(np.float64) != values) & np.isfinite(values)
        bits |= inexact.astype(np.uint32)                              # to odd
        nan = np.isnan(f)
        up = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        half = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), up >> np.uint32(16))
    return half.astype(np.uint16).view(dtype)


def store_rounded(*pairs):
    """For each (buffer, float64 values) pair, buffer[...] = values rounded once to the
    buffer's dtype (:func:`rounded`). Every value is rounded before any buffer is written,
    and the writes are same-dtype copies that cannot fail: all the buffers are updated, or
    (on an exception while rounding) none."""
    done = [(buf, rounded(values, buf.dtype)) for buf, values in pairs]
    for buf, values in done:
        buf[...] = values
