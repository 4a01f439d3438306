"""Build and runtime information (:func:`show_config`); the thread policy is in _threads.py."""
import os
import platform
import sys
import sysconfig

import numpy as np

from . import _memory, _support
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
        "output_cache": _cache_text(),
    }


def _cache_text():
    info = _memory.output_cache_info()
    if not info["max_bytes"]:
        return "off"
    return (f"up to {info['max_bytes'] / 2**20:.0f} MiB of freed outputs from "
            f"{info['min_bytes'] / 2**20:.0f} MiB (holds {info['bytes'] / 2**20:.0f} MiB; "
            f"{info['hits']} hits, {info['misses']} misses)")


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
                "OMP_NUM_THREADS", "compiler", "kernels", "cflags", "output_cache"):
        print(f"  {key:<16} {cfg[key]}", file=file)
