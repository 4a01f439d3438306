"""Outputs written with streaming stores (preallocated outputs larger than the last-level
cache, fastbn._memory) hold the same bits as ordinary stores, for every kernel branch,
both dtypes, aligned or not, and in place."""
import numpy as np
import pytest

import fastbn
from fastbn import _memory
from cases import CASES, ids

STREAM_CASES = [c for c in CASES if np.prod(c.nchw) >= 2000] + [
    c for c in CASES if c.nchw == (4, 3)]


def _run(x, dy, w, b, layout, out):
    y = fastbn.batch_norm_train(x, w, b, layout=layout, out=out[0])[0].copy()
    _, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout)
    yi = fastbn.batch_norm_infer(x, mean, 1 / invstd ** 2, w, b, layout=layout,
                                 out=out[1]).copy()
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout,
                                    out=out[2])[0].copy()
    de = fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout, training=False,
                                    out=out[3])[0].copy()
    return y, yi, dx, de


def _outs(x, offset):
    outs = []
    for _ in range(4):
        buf = np.zeros(x.size * x.itemsize + offset, np.uint8)
        outs.append(np.frombuffer(buf.data, x.dtype, x.size, offset).reshape(x.shape)
                    if offset else np.empty_like(x))
    return outs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", STREAM_CASES, ids=ids(STREAM_CASES))
def test_streaming_stores_give_the_same_bits(case, dtype, monkeypatch):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(case.shape) * 2 + 5).astype(dtype)
    dy = rng.standard_normal(case.shape).astype(dtype)
    C = case.shape[1] if case.layout == "NCHW" else case.shape[-1]
    w, b = rng.uniform(0.5, 1.5, C), rng.uniform(-1, 1, C)
    plain = _run(x, dy, w, b, case.layout, _outs(x, 0))
    monkeypatch.setattr(_memory, "STREAM_ABOVE", 0)
    for offset in (0, 4 if dtype == np.float32 else 8):     # a 64-byte-unaligned out=
        streamed = _run(x, dy, w, b, case.layout, _outs(x, offset))
        for a, e, name in zip(streamed, plain, ("y", "infer", "dx", "dx eval")):
            assert a.tobytes() == e.tobytes(), f"{name} differs with streaming stores"
    xi = x.copy()                                              # in place
    fastbn.batch_norm_infer(xi, np.zeros(C), np.ones(C), w, b, layout=case.layout, out=xi)
    monkeypatch.setattr(_memory, "STREAM_ABOVE", 1 << 62)
    want = fastbn.batch_norm_infer(x, np.zeros(C), np.ones(C), w, b, layout=case.layout)
    assert xi.tobytes() == want.tobytes()


def test_wide_rows_stream_in_pieces(monkeypatch):
    """Rows wider than the stage (1024 values) are streamed piece by piece."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 2500)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, 2500), rng.uniform(-1, 1, 2500)
    plain = _run(x, dy, w, b, "NHWC", _outs(x, 0))
    monkeypatch.setattr(_memory, "STREAM_ABOVE", 0)
    streamed = _run(x, dy, w, b, "NHWC", _outs(x, 4))
    for a, e in zip(streamed, plain):
        assert a.tobytes() == e.tobytes()


def test_only_mapped_outputs_are_streamed():
    assert not _memory.stream_output(1 << 40, False)        # a new array's pages
    assert _memory.stream_output(_memory.STREAM_ABOVE + 1, True)
    assert not _memory.stream_output(_memory.STREAM_ABOVE, True)
    assert _memory.L2_BYTES > 0 and _memory.LLC_BYTES >= _memory.L2_BYTES


def test_the_streaming_threshold_counts_the_process_cpus():
    """out= arrays are streamed above STREAM_PER_CPU bytes per usable CPU, never above the
    last-level cache: a 2-CPU virtual machine whose host reports a 480 MiB cache streams
    from 16 MiB, a 64-CPU process on an 8 MiB cache from 8 MiB."""
    per = _memory.STREAM_PER_CPU
    assert _memory.stream_threshold(480 << 20, 2) == 2 * per
    assert _memory.stream_threshold(8 << 20, 64) == 8 << 20
    assert _memory.stream_threshold(32 << 20, 1) == per
    assert _memory.STREAMED_ABOVE == _memory.stream_threshold(_memory.LLC_BYTES,
                                                              _memory.usable_cpus())
    assert 0 < _memory.STREAMED_ABOVE <= _memory.LLC_BYTES


def test_builds_without_streaming_stores_never_stream():
    """Kernels with streaming stores (x86 builds) stream above the threshold; a build
    without them (64-bit ARM), whose 'streamed' output would be a copy of a staged block,
    never stages one."""
    import importlib
    from fastbn import _dispatch
    kernels = _dispatch.kernels
    expected = (_memory.STREAMED_ABOVE if kernels.streaming_stores() else _memory.NEVER_STREAM)
    assert _memory.STREAM_ABOVE == expected
    assert kernels.streaming_stores() == (importlib.import_module("platform").machine().lower()
                                          in ("x86_64", "amd64", "i686", "i386"))

    class NoStreams:
        def streaming_stores(self):
            return False

    with _dispatch.using(NoStreams()):
        assert _memory.STREAM_ABOVE == _memory.NEVER_STREAM
        assert not _memory.stream_output(1 << 40, True)
    assert _memory.STREAM_ABOVE == expected


def test_usable_cpus_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(_memory.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert _memory.usable_cpus() == 1
    monkeypatch.setattr(_memory.os, "sched_getaffinity", lambda pid: {0, 1, 2, 5},
                        raising=False)
    assert _memory.usable_cpus() == 4


def test_usable_cpus_without_an_affinity_call(monkeypatch):
    monkeypatch.delattr(_memory.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(_memory.os, "cpu_count", lambda: None)
    assert _memory.usable_cpus() == 1
