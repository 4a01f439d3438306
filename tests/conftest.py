"""Shared helpers for fastbn's tests: snapshots of the caller's arrays."""
import numpy as np
import pytest


def _arrays(obj, prefix="arg"):
    """(label, ndarray) pairs found in obj (nested dicts, lists and tuples)."""
    if isinstance(obj, np.ndarray):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _arrays(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _arrays(v, f"{prefix}[{i}]")


class Snapshot:
    """Copies of every ndarray reachable from the given objects, to check nothing changed."""

    def __init__(self, *objs):
        self.items = [(label, a, a.copy(), a.flags.writeable)
                      for label, a in _arrays(list(objs))]

    def assert_unchanged(self):
        for label, a, saved, writeable in self.items:
            assert a.shape == saved.shape and a.dtype == saved.dtype, label
            assert a.flags.writeable == writeable, f"{label}: writeable flag changed"
            if a.dtype.kind == "O":     # same objects in the same places (NaN != NaN)
                same = a.tobytes() == saved.tobytes()
            else:
                same = np.array_equal(a, saved, equal_nan=a.dtype.kind in "fc")
            assert same, f"{label} was modified"


@pytest.fixture
def snapshot():
    return Snapshot


@pytest.fixture
def kernel_modules():
    """Names of the kernel builds this CPU runs: the portable one, and the AVX2 and AVX-512
    ones where built and supported (checked before any import: a variant's module may not
    even load on other CPUs)."""
    import importlib.util
    from fastbn._support import cpu_has_avx2_fma, cpu_has_avx512
    mods = ["fastbn._kernels"]
    for name, cpu_runs in (("fastbn._kernels_avx2", cpu_has_avx2_fma),
                           ("fastbn._kernels_avx512", cpu_has_avx512)):
        if cpu_runs() and importlib.util.find_spec(name) is not None:
            mods.append(name)
    return mods


def split_channels(a, layout):
    """a (N, C, ...) or (N, ..., C) as a list of per-channel 1-d float64 arrays."""
    axis = 1 if layout == "NCHW" else a.ndim - 1
    return [np.asarray(np.take(a, c, axis=axis), dtype=np.float64).ravel()
            for c in range(a.shape[axis])]


def running_buffers(starts, dtype, strided):
    """Writable (C,) buffers holding `starts` in `dtype`: contiguous, or every other element
    of a twice-as-long array (strided) -- the two paths of the running-statistics update."""
    bufs = []
    for start in starts:
        b = np.zeros(2 * len(start) if strided else len(start), dtype)
        b = b[::2] if strided else b
        b[...] = start
        bufs.append(b)
    return bufs
