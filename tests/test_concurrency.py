"""Many Python threads calling the kernels at once get the same results as serial calls (the
kernels release the GIL and share no global state); nested use under an outer threadpoolctl
limit, under set_num_threads and with explicit num_threads inside worker threads works."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastbn

# large enough (>= 2**16 values) that each call runs its own OpenMP team when asked to
JOBS = [
    ((8, 3, 48, 48), "NCHW", np.float32),
    ((8, 1, 96, 96), "NCHW", np.float64),
    ((8, 48, 48, 3), "NHWC", np.float32),
    ((70000, 2), "NHWC", np.float64),
    ((4, 5, 7, 9), "NCHW", np.float32),          # small: serial path
    ((3, 7, 5, 2), "NHWC", np.float64),
]


def _inputs(i):
    shape, layout, dtype = JOBS[i % len(JOBS)]
    rng = np.random.default_rng(100 + i)
    axis = 1 if layout == "NCHW" else len(shape) - 1
    C = shape[axis]
    x = rng.normal(2.0, 3.0, size=shape).astype(dtype)
    g = rng.normal(size=shape).astype(dtype)
    return dict(x=x, g=g, layout=layout, w=rng.normal(size=C), b=rng.normal(size=C),
                rm=rng.normal(size=C), rv=rng.uniform(0.5, 2, size=C))


def _work(inp, num_threads=None):
    """Every kernel on one input; running buffers are the caller's own copies."""
    x, g, layout = inp["x"], inp["g"], inp["layout"]
    rm, rv = inp["rm"].copy(), inp["rv"].copy()
    y, mean, invstd = fastbn.batch_norm_train(x, inp["w"], inp["b"], layout=layout,
                                              running_mean=rm, running_var=rv,
                                              num_threads=num_threads)
    yi = fastbn.batch_norm_infer(x, inp["rm"], inp["rv"], inp["w"], inp["b"], layout=layout,
                                 num_threads=num_threads)
    out = np.empty_like(g)
    dx, dw, db = fastbn.batch_norm_backward(g, x, mean, invstd, inp["w"], layout=layout,
                                            out=out, num_threads=num_threads)
    assert dx is out
    dxe, _, _ = fastbn.batch_norm_backward(g, x, inp["rm"], 1 / np.sqrt(inp["rv"] + 1e-5),
                                           inp["w"], training=False, layout=layout,
                                           num_threads=num_threads)
    scale, shift = fastbn.fold_batch_norm(inp["rm"], inp["rv"], inp["w"], inp["b"])
    return [y, mean, invstd, rm, rv, yi, dx, dw, db, dxe, scale, shift]


def _same(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert u.tobytes() == v.tobytes(), f"result {i} differs"


@pytest.fixture(scope="module")
def serial():
    inputs = [_inputs(i) for i in range(2 * len(JOBS))]
    return inputs, [_work(inp, num_threads=1) for inp in inputs]


@pytest.mark.parametrize("num_threads", [None, 1, 2])
def test_threads_calling_at_once_match_serial(serial, num_threads):
    inputs, expected = serial
    start = threading.Barrier(8)

    def job(k):
        start.wait()                 # all workers enter the kernels together
        i = k % len(inputs)
        return i, [_work(inputs[i], num_threads) for _ in range(2)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(job, range(24)))
    for i, runs in results:
        for r in runs:
            _same(r, expected[i])


def test_shared_read_only_input(serial):
    # one array read by every thread at once (read-only, so nothing may write to it)
    inputs, expected = serial
    inp = dict(inputs[0])
    x = inp["x"].copy()
    x.flags.writeable = False
    inp["x"] = x
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: _work(inp, 2), range(12)))
    for r in results:
        _same(r, expected[0])


def test_in_place_calls_on_separate_arrays_at_once():
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(6, 4, 40, 40)).astype(np.float32) for _ in range(8)]
    want = [fastbn.batch_norm_train(x, num_threads=1)[0] for x in xs]
    mine = [x.copy() for x in xs]

    def job(i):
        return fastbn.batch_norm_train(mine[i], out=mine[i], num_threads=2)[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(job, range(8)))
    for i in range(8):
        assert got[i] is mine[i]
        np.testing.assert_array_equal(mine[i], want[i])


@pytest.mark.parametrize("limit", [1, 2])
def test_under_outer_threadpool_limit(serial, limit):
    inputs, expected = serial
    with threadpool_limits(limits=limit):
        for i, inp in enumerate(inputs):
            _same(_work(inp), expected[i])
        # and from worker threads started inside the limit
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda i: (i, _work(inputs[i])), range(len(inputs))))
        for i, r in results:
            _same(r, expected[i])
        # an explicit num_threads wins over the outer limit and still gives the same bits
        _same(_work(inputs[0], num_threads=2), expected[0])


def test_under_threadpool_limit_for_openmp_only(serial):
    inputs, expected = serial
    with threadpool_limits(limits=1, user_api="openmp"):
        _same(_work(inputs[1]), expected[1])


def test_set_num_threads_while_other_threads_run(serial):
    inputs, expected = serial
    stop = threading.Event()

    def toggler():
        n = 1
        while not stop.is_set():
            fastbn.set_num_threads(n)
            n = 3 - n
        fastbn.set_num_threads(None)

    t = threading.Thread(target=toggler)
    t.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda i: (i % len(inputs), _work(inputs[i % len(inputs)])),
                                    range(16)))
    finally:
        stop.set()
        t.join()
        fastbn.set_num_threads(None)
    for i, r in results:
        _same(r, expected[i])


def test_errors_in_some_threads_do_not_disturb_others(serial):
    inputs, expected = serial

    def job(k):
        if k % 2:
            with pytest.raises(ValueError, match="eps"):
                fastbn.batch_norm_train(inputs[0]["x"], eps=-1.0)
            return None
        return _work(inputs[0], 2)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(job, range(12)))
    for r in results:
        if r is not None:
            _same(r, expected[0])
