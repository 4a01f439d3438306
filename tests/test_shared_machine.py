"""Shared machines: when a parallel region's team cost a call more than it gave (a thread the
scheduler put aside), calls on the default thread count run on one thread for a while
(fastbn/_support.pyx, _note_wait; the kernels time every parallel region). The decisions are
tested here with reported regions, not with timings."""
import time

import numpy as np
import pytest

import fastbn
from fastbn import _support, _threads

BIG = 1 << 30          # values: above every serial threshold


@pytest.fixture(autouse=True)
def no_contention():
    _support.end_contention()
    yield
    _support.end_contention()


def _default():
    return _threads.effective_threads(None, BIG, True)


@pytest.mark.skipif(not _threads.OPENMP, reason="a build without OpenMP runs one thread")
def test_a_delayed_region_makes_default_calls_serial_for_a_while():
    with _threads.default_threads(2):
        assert _default() == 2
        _support.note_wait(0.0, 1e-5, 4e-3)        # waited 4 ms for a 10 us share
        assert _support.contended() == 0.0          # once may be a team waking up
        _support.note_wait(0.0, 1e-5, 4e-3)        # twice in a row: contended
        assert 0.0 < _support.contended() <= 0.1
        assert _default() == 1
        assert _support.call_threads(None, BIG, False, _threads.POLICY) == 1
        assert _threads.effective_threads(2, BIG, True) == 2     # an explicit count is kept
        assert fastbn.get_num_threads() == 2                       # the setting is unchanged
        _support.end_contention()
        assert _default() == 2


@pytest.mark.parametrize("late,work,wait,contended", [
    (0.0, 1e-5, 4e-3, True),       # the master waited at the closing barrier
    (4e-3, 1e-5, 0.0, True),       # a thread started late (or the master was off the CPU)
    (1e-4, 1e-5, 1e-4, False),     # under WAIT_LATE: a thread waking up
    (5e-4, 2e-3, 5e-4, False),     # late, but less than the share: the team still paid
    (0.0, 2e-3, 3e-3, True),
])
def test_what_counts_as_a_delay(late, work, wait, contended):
    _support.note_wait(late, work, wait)
    _support.note_wait(late, work, wait)
    assert (_support.contended() > 0) == contended


def test_delayed_regions_far_apart_open_no_window():
    """One delayed region now and then (a team waking from sleep) is not contention; two
    within WAIT_SUSPECT (0.05 s) are, even with good ones between them."""
    for _ in range(3):
        _support.note_wait(0.0, 1e-5, 4e-3)
        _support.note_wait(0.0, 1e-3, 0.0)      # the next team call paid
        time.sleep(0.06)
    assert _support.contended() == 0.0
    _support.note_wait(0.0, 1e-5, 4e-3)
    _support.note_wait(0.0, 1e-3, 0.0)
    _support.note_wait(0.0, 1e-5, 4e-3)
    assert _support.contended() > 0.0


def test_the_window_doubles_while_delays_go_on_and_resets():
    _support.note_wait(0.0, 1e-5, 4e-3)
    _support.note_wait(0.0, 1e-5, 4e-3)
    first = _support.contended()
    _support.note_wait(0.0, 1e-5, 4e-3)
    second = _support.contended()
    assert 0.1 < second <= 0.2 + 1e-3 and second > first
    for _ in range(10):
        _support.note_wait(0.0, 1e-5, 4e-3)
    assert _support.contended() <= 3.2 + 1e-3                 # capped
    _support.note_wait(0.0, 1e-3, 0.0)                        # a team call that paid
    _support.note_wait(0.0, 1e-5, 4e-3)                       # suspected only: the open
    assert _support.contended() > 3.0                         # window is not extended
    _support.note_wait(0.0, 1e-5, 4e-3)
    assert 0.0 < _support.contended() <= 0.1 + 1e-3           # back to the first length


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_results_do_not_change_while_contended(layout):
    """A contended window changes the thread count only: the same bits."""
    rng = np.random.default_rng(0)
    shape = (8, 64, 16, 16) if layout == "NCHW" else (8, 16, 16, 64)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    with _threads.default_threads(2):
        team = fastbn.batch_norm_train(x, layout=layout)
        dteam = fastbn.batch_norm_backward(dy, x, team[1], team[2], layout=layout)
        _support.note_wait(0.0, 1e-5, 4e-3)
        _support.note_wait(0.0, 1e-5, 4e-3)
        assert _default() == 1 or not _threads.OPENMP
        alone = fastbn.batch_norm_train(x, layout=layout)
        dalone = fastbn.batch_norm_backward(dy, x, alone[1], alone[2], layout=layout)
    for a, b in zip(team + dteam, alone + dalone):
        assert a.tobytes() == b.tobytes()
