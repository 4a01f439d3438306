"""Thread count and build information."""
import os
import platform
import sys
import sysconfig

import numpy as np

from ._dispatch import kernels as _kernels
from ._validate import thread_count

_num_threads = None
_OPENMP = bool(_kernels.openmp_enabled())

# Below this many values a call runs on one thread: forking the team costs more than it saves.
# The planar kernels (NCHW memory) gain from a second thread on smaller inputs than the rows
# kernels (channels-last memory). Measured at 16384 values on 9 planar shapes, 2 threads
# take 0.84-0.96x the time of one for training, 0.95-0.99x for inference and 0.75-0.86x for
# the backward; on rows 0.97-1.6x (`python -m fastbn --crossover` prints such a table).
SERIAL_BELOW = 1 << 15
SERIAL_BELOW_PLANAR = 1 << 14


def get_num_threads():
    """Number of threads fastbn's kernels use when `num_threads` is not given.

    The value set by :func:`set_num_threads` if any, otherwise OpenMP's default for the
    calling thread (``OMP_NUM_THREADS``, or a ``threadpoolctl`` limit, or the core count).

    Examples
    --------
    >>> import fastbn
    >>> fastbn.get_num_threads() >= 1
    True
    """
    if _num_threads is not None:
        return _num_threads
    return max(1, int(_kernels.omp_max_threads()))


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
    (below SERIAL_BELOW_PLANAR values for the planar kernels, SERIAL_BELOW for the rows)."""
    if num_threads is not None:
        num_threads = thread_count(num_threads, None)
    if size < (SERIAL_BELOW_PLANAR if planar else SERIAL_BELOW) or not _OPENMP:
        return 1
    return get_num_threads() if num_threads is None else num_threads


def config():
    """Build and runtime facts as a dict (see :func:`show_config`)."""
    from . import __version__
    return {
        "fastbn": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "openmp": bool(_kernels.openmp_enabled()),
        "threads": get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "compiler": sysconfig.get_config_var("CC"),
        "kernels": _kernels.__name__.rsplit(".", 1)[-1],
        "cflags": _kernels.build_flags(),
    }


def show_config(file=None):
    """Print build information: OpenMP on/off, threads, compiler and flags.

    Parameters
    ----------
    file : file-like, optional
        Where to print (default: standard output).

    Examples
    --------
    >>> import fastbn
    >>> fastbn.show_config()  # doctest: +ELLIPSIS
    fastbn ...
    """
    cfg = config()
    print(f"fastbn {cfg['fastbn']}", file=file)
    for key in ("python", "numpy", "platform", "cpu_count", "openmp", "threads",
                "OMP_NUM_THREADS", "compiler", "kernels", "cflags"):
        print(f"  {key:<16} {cfg[key]}", file=file)
