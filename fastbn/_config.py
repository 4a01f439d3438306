"""Build and runtime information (:func:`show_config`); the thread policy is in _threads.py."""
import os
import platform
import sys
import sysconfig

import numpy as np

from . import _support
from ._dispatch import kernels as _kernels
from ._threads import get_num_threads


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
        "openmp": bool(_support.openmp_enabled()),
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
