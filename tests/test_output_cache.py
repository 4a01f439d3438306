"""The output cache (fastbn.set_output_cache): fastbn's fresh outputs from 1 MiB come from
blocks that freed outputs left, mapped; they must be fully overwritten, behave as any
array, survive threads and interpreter exit, and change no result."""
import os
import pickle
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastbn
from fastbn import _memory, _output_cache

ml_dtypes = pytest.importorskip("ml_dtypes")

# above the cache's 1 MiB floor in every dtype
SHAPE = (4, 8, 136, 136)
DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


@pytest.fixture
def cache():
    """A 256 MiB cache, emptied before and after; the previous cap restored."""
    before = fastbn.output_cache_info()["max_bytes"]
    fastbn.set_output_cache(256 << 20)
    fastbn.empty_output_cache()
    yield
    _output_cache.set_poison(False)
    fastbn.empty_output_cache()
    fastbn.set_output_cache(before)


@pytest.fixture
def poisoned(cache):
    """The cache with every freed block filled with 0xFF bytes (NaN in each float dtype)."""
    _output_cache.set_poison(True)
    yield


def data(dtype, layout="NCHW", shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    if layout == "NHWC":
        shape = (shape[0],) + shape[2:] + (shape[1],)
    x = rng.normal(1.0, 2.0, size=shape).astype(dtype)
    g = rng.normal(size=shape).astype(dtype)
    C = shape[1] if layout == "NCHW" else shape[-1]
    pdt = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    w = rng.uniform(0.5, 1.5, C).astype(pdt)
    b = rng.uniform(-0.5, 0.5, C).astype(pdt)
    return x, g, w, b


def every_call(x, g, w, b, layout):
    """The results of every API that returns a fresh output, as one list of arrays."""
    C = w.size
    rm, rv = np.zeros(C, w.dtype), np.ones(C, w.dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout, running_mean=rm,
                                              running_var=rv)
    out = [y, mean, invstd, rm, rv,
           fastbn.batch_norm_infer(x, rm, rv, w, b, layout=layout),
           *fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout),
           *fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout, training=False)]
    yr, m, s = fastbn.batch_norm_relu_train(x, w, b, residual=g, layout=layout)
    dres = np.empty_like(x)
    out += [yr, *fastbn.batch_norm_relu_backward(g, yr, x, m, s, w, layout=layout,
                                                 dresidual=dres), dres]
    out += [fastbn.batch_norm_relu_infer(x, rm, rv, w, b, residual=g, layout=layout)]
    if x.dtype.itemsize >= 4:
        rout = fastbn.batch_renorm_train(x, w, b, np.zeros(C), np.ones(C), layout=layout)
        out += [*rout, *fastbn.batch_renorm_backward(g, x, *rout[1:], w, layout=layout)]
    xt = np.asfortranarray(x)                     # copied into the kernel's order
    out += [*fastbn.batch_norm_train(xt, w, b, layout=layout)]
    odd = np.empty(x.shape[::-1], x.dtype).T      # an out= the kernel cannot write directly
    out += [fastbn.batch_norm_infer(x, rm, rv, w, b, layout=layout, out=odd)]
    if x.dtype.itemsize >= 4:                     # the layers' dtypes
        layer = fastbn.BatchNorm(C, layout=layout, dtype=x.dtype, activation="relu")
        y = layer.forward(x, residual=g)
        out += [y, *layer.backward(g), layer.weight_grad.copy()]
    return [np.array(a, copy=True) for a in out]


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_poisoned_blocks_are_fully_overwritten(poisoned, dtype, layout):
    """Every fresh output of every API, taken from blocks filled with NaN bytes, has the
    bits of the same call with the cache off (so no byte of a reused block survives)."""
    x, g, w, b = data(dtype, layout)
    fastbn.set_output_cache(0)
    expected = every_call(x, g, w, b, layout)
    fastbn.set_output_cache(256 << 20)
    every_call(x, g, w, b, layout)           # fills the cache with poisoned blocks
    hits = fastbn.output_cache_info()["hits"]
    for _ in range(2):
        got = every_call(x, g, w, b, layout)
        assert all(same(e, r) for e, r in zip(expected, got))
    assert fastbn.output_cache_info()["hits"] > hits


def test_outputs_reuse_blocks_and_the_cap_holds(cache):
    x, g, w, b = data(np.float32)
    info0 = fastbn.output_cache_info()
    fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8))
    info = fastbn.output_cache_info()
    assert info["misses"] - info0["misses"] == 1 and info["hits"] == info0["hits"]
    assert info["blocks"] == 1 and info["bytes"] >= x.nbytes
    for _ in range(5):
        fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8))
    info = fastbn.output_cache_info()
    assert (info["hits"] - info0["hits"], info["misses"] - info0["misses"],
            info["blocks"]) == (5, 1, 1)
    fastbn.set_output_cache(x.nbytes // 2)         # smaller than the block: given back
    assert fastbn.output_cache_info()["bytes"] == 0
    fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8))
    assert fastbn.output_cache_info()["bytes"] == 0
    fastbn.set_output_cache(3 * x.nbytes)          # room for two blocks of x's size
    held = [fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8)) for _ in range(5)]
    del held
    info = fastbn.output_cache_info()
    assert info["blocks"] == 2 and info["bytes"] <= 3 * x.nbytes
    assert fastbn.empty_output_cache() == info["bytes"]
    assert fastbn.output_cache_info()["bytes"] == 0


def test_small_outputs_and_a_disabled_cache_bypass_it(cache):
    info0 = fastbn.output_cache_info()
    x = np.ones((2, 8, 8, 8), np.float32)          # 4 KiB: below the floor
    fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8))
    assert fastbn.output_cache_info()["misses"] == info0["misses"]
    fastbn.set_output_cache(0)
    big, *_ = data(np.float32)
    y = fastbn.batch_norm_infer(big, np.zeros(8), np.ones(8))
    info = fastbn.output_cache_info()
    assert info["misses"] == info0["misses"] and info["max_bytes"] == 0
    assert y.flags.owndata and y.base is None


def test_cached_arrays_behave_as_any_array(cache):
    x, g, w, b = data(np.float32)
    y = fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8), w, b)
    expected = y.copy()
    assert y.flags.owndata and y.flags.c_contiguous and y.ctypes.data % 64 == 0
    # half a page from x's page offset (a store near a load's offset modulo 4 KiB stalls)
    assert y.ctypes.data % 4096 == (x.ctypes.data + 2048) % 4096 // 64 * 64
    assert same(pickle.loads(pickle.dumps(y)), expected)
    view = y[1:, ::2]                               # a view outlives its array
    buf = np.frombuffer(memoryview(y), np.float32)  # and so does a buffer of it
    del y
    for _ in range(3):                              # its block is not reused meanwhile
        fastbn.batch_norm_infer(x + 1, np.zeros(8), np.ones(8), w, b)
    assert same(view, expected[1:, ::2].copy()) and same(buf, expected.ravel())
    del view, buf
    y = fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8), w, b)
    y.resize(2 * y.size, refcheck=False)           # grows: a new block, old values kept
    assert same(y[:expected.size], expected.ravel()) and not y[expected.size:].any()
    y.resize(100, refcheck=False)                  # shrinks into a small block
    assert same(y, expected.ravel()[:100])
    y.resize(0, refcheck=False)
    assert y.size == 0


def test_freed_in_other_threads(cache):
    """Arrays allocated in one thread and dropped in another, from several threads at once:
    every result right, the counts consistent, the cap held."""
    x, g, w, b = data(np.float32)
    expected = fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8), w, b, num_threads=1)
    made, errors, lock = [], [], threading.Lock()

    def produce():
        for _ in range(20):
            y = fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8), w, b, num_threads=1)
            if not same(y, expected):
                errors.append("wrong result")
            with lock:
                made.append(y)

    def consume():
        for _ in range(200):
            with lock:
                if made:
                    made.pop()
            threading.Event().wait(0.0005)

    info0 = fastbn.output_cache_info()
    threads = [threading.Thread(target=f) for f in (produce, produce, consume, consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    del made[:]
    info = fastbn.output_cache_info()
    assert not errors
    assert info["hits"] + info["misses"] - info0["hits"] - info0["misses"] == 40
    assert info["bytes"] <= info["max_bytes"]


def test_bad_caps_are_refused_and_change_nothing(cache):
    before = fastbn.output_cache_info()
    for bad, exc, text in ((-1, ValueError, ">= 0"), (1.5, TypeError, "integer"),
                           ("1G", TypeError, "integer"), (None, TypeError, "integer"),
                           (True, TypeError, "integer")):
        with pytest.raises(exc, match=text):
            fastbn.set_output_cache(bad)
        assert fastbn.output_cache_info() == before
    fastbn.set_output_cache(np.int64(1 << 20))
    assert fastbn.output_cache_info()["max_bytes"] == 1 << 20


def test_the_default_cap():
    phys = _memory.physical_memory()
    default = _memory.default_cache_bytes(environ={})
    if phys:
        assert default == min(int(phys / 8), 1 << 30)
    assert _memory.default_cache_bytes(environ={"FASTBN_OUTPUT_CACHE": "0"}) == 0
    assert _memory.default_cache_bytes(environ={"FASTBN_OUTPUT_CACHE": "64M"}) == 64 << 20
    assert _memory.default_cache_bytes(environ={"FASTBN_OUTPUT_CACHE": "4096"}) == 4096
    for bad in ("lots", "-5", "", "1.5G"):
        with pytest.warns(RuntimeWarning, match="FASTBN_OUTPUT_CACHE"):
            assert _memory.default_cache_bytes(environ={"FASTBN_OUTPUT_CACHE": bad}) == default


def run_python(code, **env):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, **env))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_environment_variable_and_interpreter_exit():
    """FASTBN_OUTPUT_CACHE sets the cap at import; arrays from the cache alive at exit (in
    globals, in a reference cycle, in another thread's frame) are freed cleanly."""
    done = run_python("""
        import threading, numpy as np, fastbn
        assert fastbn.output_cache_info()["max_bytes"] == 32 << 20
        x = np.ones((4, 8, 96, 96), np.float32)
        kept = [fastbn.batch_norm_infer(x, np.zeros(8), np.ones(8)) for _ in range(3)]
        cycle = [fastbn.batch_norm_train(x)[0]]
        cycle.append(cycle)
        del kept[0]                                  # its block waits in the cache
        t = threading.Thread(target=lambda: kept.append(fastbn.batch_norm_train(x)[0]))
        t.start(); t.join()                          # and is taken in another thread
        kept.append(fastbn.batch_norm_train(x)[0])
        del kept[0]
        print("ok", fastbn.output_cache_info()["hits"], fastbn.output_cache_info()["blocks"])
    """, FASTBN_OUTPUT_CACHE="32M")
    assert done.stdout.split() == ["ok", "1", "1"] and not done.stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_memory_of_a_training_loop():
    """A 100-step training loop of a three-layer NumPy network: peak RSS with the cache at
    most its cap above the peak without it; empty_output_cache() brings RSS back to the
    level without it."""
    code = """
        import sys, numpy as np, fastbn
        def kib(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        fastbn.set_output_cache(int(sys.argv[1]))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 16, 32, 32)).astype(np.float32)
        layers = [fastbn.BatchNorm(16, activation="relu") for _ in range(3)]
        scale = np.float32(0.5)
        for step in range(100):
            h = x
            for layer in layers:
                h = layer.forward(h) * scale             # a stand-in for a convolution
            g = h - 1.0
            for layer in reversed(layers):
                g = layer.backward(g) * scale
                layer.weight -= 0.01 * layer.weight_grad
        del h, g
        before = kib("VmRSS")
        fastbn.empty_output_cache()
        print(kib("VmHWM"), before, kib("VmRSS"), fastbn.output_cache_info()["hits"])
    """
    cap = 64 << 20
    off = [int(v) for v in run_python(code.replace("sys.argv[1]", "0")).stdout.split()]
    on = [int(v) for v in run_python(code.replace("sys.argv[1]", str(cap))).stdout.split()]
    assert off[3] == 0 and on[3] > 500                  # the loop reuses blocks
    assert on[0] <= off[0] + cap
    assert on[2] <= off[2] + (8 << 20)                  # back to the level without it
