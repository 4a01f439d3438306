"""fastbn's thread policy, in one place: how many threads a call gets.

A call runs on ``num_threads`` threads if given, else on :func:`get_num_threads` (the value
set with :func:`set_num_threads`, else OpenMP's default for the calling thread, and without
OMP_NUM_THREADS no more than the CPUs the process may use: :func:`available_cpus`), capped
at MAX_THREADS; small inputs run on one thread (:func:`effective_threads`). The kernels take
that count as an explicit argument: how they split the work among the threads (whole
channels, a team per channel, chunks of rows) never changes their results.
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
# The planar kernels (NCHW memory) gain from a second thread on smaller inputs than the rows
# kernels (channels-last memory). Measured at 16384 values on 9 planar shapes, 2 threads
# take 0.84-0.96x the time of one for training, 0.95-0.99x for inference and 0.75-0.86x for
# the backward; on rows 0.97-1.6x (`python -m fastbn --crossover` prints such a table).
SERIAL_BELOW_ROWS = 1 << 15
SERIAL_BELOW_PLANAR = 1 << 14

_num_threads = None
_cpus = None            # the default's cap: available_cpus(), read once (see get_num_threads)


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
    global _cpus
    if _num_threads is not None:
        return _num_threads
    if _cpus is None:          # once: OpenMP too reads OMP_NUM_THREADS at start-up only
        _cpus = MAX_THREADS if "OMP_NUM_THREADS" in os.environ else available_cpus()
    return min(max(1, int(_support.omp_max_threads())), _cpus)


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
    global _num_threads
    _num_threads = None if n is None else thread_count(n, None)


def effective_threads(num_threads, size, planar=False):
    """Threads for one call on `size` values: explicit or default, one for small inputs
    (below SERIAL_BELOW_PLANAR values for the planar kernels, SERIAL_BELOW_ROWS for the
    rows)."""
    if num_threads is not None:
        num_threads = thread_count(num_threads, None)
    if size < (SERIAL_BELOW_PLANAR if planar else SERIAL_BELOW_ROWS) or not OPENMP:
        return 1
    return get_num_threads() if num_threads is None else num_threads


@contextlib.contextmanager
def serial_below(*, planar, rows):
    """Within the block, the serial thresholds are `planar` and `rows` values (0: every
    input may run on several threads); for measuring where they belong (``python -m fastbn
    --crossover``). Not thread-safe: it changes them for every thread of the process."""
    global SERIAL_BELOW_PLANAR, SERIAL_BELOW_ROWS
    saved = SERIAL_BELOW_PLANAR, SERIAL_BELOW_ROWS
    SERIAL_BELOW_PLANAR, SERIAL_BELOW_ROWS = planar, rows
    try:
        yield
    finally:
        SERIAL_BELOW_PLANAR, SERIAL_BELOW_ROWS = saved


@contextlib.contextmanager
def default_threads(n):
    """Within the block, set_num_threads(n) (then the previous setting again); for timing
    the layers, which take no num_threads, on a given thread count. Not thread-safe."""
    global _num_threads
    saved = _num_threads
    set_num_threads(n)
    try:
        yield
    finally:
        _num_threads = saved
