"""fastbn's thread policy, in one place: how many threads a call gets.

A call runs on ``num_threads`` threads if given, else on :func:`get_num_threads` (the value
set with :func:`set_num_threads`, else OpenMP's default for the calling thread, and without
OMP_NUM_THREADS no more than the CPUs the process may use: :func:`available_cpus`), capped
at MAX_THREADS; small inputs run on one thread (:func:`effective_threads`), and so do calls
on the default count while the CPUs are contended (fastbn/_support.pyx, "Shared machines").
The policy's numbers live in POLICY, which the C side reads (fastbn._support.call_threads,
the lean calls of fastbn/kernels/lean.pxi). The kernels take the count as an explicit
argument: how they split the work among the threads (whole channels, a team per channel,
chunks of rows) never changes their results.
"""
import contextlib
import os

from . import _support
from ._validate import positive_int

OPENMP = bool(_support.openmp_enabled())

# Largest team a kernel is started with. OpenMP creates every requested thread, so an
# absurd request such as num_threads=100000 would crash the process inside libgomp, and one
# >= 2**31 would not fit the kernels' C int. Results do not depend on the thread count, so
# capping is harmless.
MAX_THREADS = max(256, 4 * (os.cpu_count() or 1))

# Below this many values a call runs on one thread: forking the team costs more than it saves.
# Measured per op (`python -m fastbn --crossover` prints the table: training forward,
# inference and backward, fresh outputs, both sides taking the lean path of
# fastbn/kernels/lean.pxi; 16 and 64 channels, Intel Xeon, 2 threads), 2 threads / 1 thread,
# three runs (2026-12-05): planar (NCHW) data at 16384 values train 0.93-1.17, infer
# 1.00-1.32, backward 0.97-1.21; at 32768 train 0.82-0.96, infer 0.82-1.01, backward
# 0.75-0.89; rows (channels-last) at 16384 train 1.33-1.40, infer 1.50-1.52, backward
# 1.20-1.23; at 32768 train 0.82-0.94, infer 0.75-1.07, backward 0.68-0.76. The three ops
# cross over at the same sizes, so one threshold per kernel serves them all. (At 16384 the
# planar kernels did gain from a second thread before the one-run backward sums and
# masked tails made one thread faster: 0.74-1.03 then.)
SERIAL_BELOW_ROWS = 1 << 15
SERIAL_BELOW_PLANAR = 1 << 15

# The thread policy as the C side reads it (fastbn/_support.pyx, call_threads: the lean path
# of small calls runs it without a Python call): [serial threshold of the planar kernels,
# of the rows kernels, the count set with set_num_threads (0: none), the CPUs the process
# may use (available_cpus; MAX_THREADS when OMP_NUM_THREADS is set), MAX_THREADS].
POLICY = [SERIAL_BELOW_PLANAR, SERIAL_BELOW_ROWS, 0, MAX_THREADS, MAX_THREADS]
_PLANAR, _ROWS, _SET, _CPUS = 0, 1, 2, 3


def available_cpus(root="/sys/fs/cgroup"):
    """How many CPUs this process may keep busy: the CPUs of its affinity mask, and no more
    than its cgroup's CPU quota allows (cgroup v2 ``cpu.max``, v1 ``cpu/cpu.cfs_quota_us``
    over ``cpu.cfs_period_us``, rounded up), as a container or a batch system restricts
    them. A team larger than that waits for its descheduled threads at every barrier.
    os.cpu_count() where none of these can be read."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, quota))
    return max(1, cpus)


def _cgroup_quota(root):
    """The CPU quota of the cgroup mounted at root, in whole CPUs rounded up, or None."""
    def read(*parts):
        try:
            with open(os.path.join(root, *parts)) as f:
                return f.read().split()
        except OSError:
            return None
    try:
        v2 = read("cpu.max")
        if v2:
            if v2[0] == "max":
                return None
            quota, period = int(v2[0]), int(v2[1]) if len(v2) > 1 else 100000
        else:
            q, p = read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")
            if not q or not p:
                return None
            quota, period = int(q[0]), int(p[0])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return -(-quota // period)


def thread_count(num_threads, default):
    """Resolve num_threads (None -> default()) to an int in [1, MAX_THREADS]."""
    if type(num_threads) is int and 1 <= num_threads <= MAX_THREADS:
        return num_threads     # the common case
    if num_threads is None:
        return min(max(1, int(default())), MAX_THREADS)
    return min(positive_int("num_threads", num_threads), MAX_THREADS)


def get_num_threads():
    """Number of threads fastbn's kernels use when `num_threads` is not given.

    The value set by :func:`set_num_threads` if any, otherwise OpenMP's default for the
    calling thread (``OMP_NUM_THREADS``, or a ``threadpoolctl`` limit, or the core count);
    without OMP_NUM_THREADS, no more than the CPUs the process may use (its affinity mask
    and cgroup CPU quota, read at the first call), so that a container limited to one CPU
    on a larger host does not start a team whose threads wait for each other.

    Examples
    --------
    >>> import fastbn
    >>> fastbn.get_num_threads() >= 1
    True
    """
    return _support.call_threads(None, 1 << 62, True, POLICY, False)


def set_num_threads(n):
    """Set the default thread count of every kernel; ``None`` returns to OpenMP's default.

    Parameters
    ----------
    n : int or None
        Threads to use (>= 1), or None. Values above ``max(256, 4 * os.cpu_count())``
        are capped there (results do not depend on the thread count, and OpenMP would
        try to start every thread asked for).

    Raises
    ------
    TypeError
        If `n` is not an integer.
    ValueError
        If `n` < 1.

    Examples
    --------
    >>> import fastbn
    >>> fastbn.set_num_threads(1)
    >>> fastbn.get_num_threads()
    1
    >>> fastbn.set_num_threads(None)
    """
    POLICY[_SET] = 0 if n is None else thread_count(n, None)


def effective_threads(num_threads, size, planar=False):
    """Threads for one call on `size` values: explicit or default, one for small inputs
    (below POLICY's serial threshold of the view: planar or rows)."""
    n = _support.call_threads(num_threads, size, planar, POLICY)
    if n < 0:
        positive_int("num_threads", num_threads)        # raises the error
        n = _support.call_threads(thread_count(num_threads, None), size, planar, POLICY)
    return n


@contextlib.contextmanager
def serial_below(*, planar, rows):
    """Within the block, the serial thresholds are `planar` and `rows` values (0: every
    input may run on several threads); for measuring where they belong (``python -m fastbn
    --crossover``). Not thread-safe: it changes them for every thread of the process."""
    saved = POLICY[_PLANAR], POLICY[_ROWS]
    POLICY[_PLANAR], POLICY[_ROWS] = planar, rows
    try:
        yield
    finally:
        POLICY[_PLANAR], POLICY[_ROWS] = saved


@contextlib.contextmanager
def default_threads(n):
    """Within the block, set_num_threads(n) (then the previous setting again); for timing
    the layers, which take no num_threads, on a given thread count. Not thread-safe."""
    saved = POLICY[_SET]
    set_num_threads(n)
    try:
        yield
    finally:
        POLICY[_SET] = saved


def _cap():
    """The default's cap: the CPUs this process may use, read once at import (as OpenMP reads
    OMP_NUM_THREADS once, at start-up); no cap when OMP_NUM_THREADS is set."""
    return MAX_THREADS if "OMP_NUM_THREADS" in os.environ else min(available_cpus(),
                                                                    MAX_THREADS)


POLICY[_CPUS] = _cap()
