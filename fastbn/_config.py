"""Build and runtime information (:func:`show_config`); the thread policy is in _threads.py."""
import os
import platform
import sys
import sysconfig

import numpy as np

from . import _memory, _support
from ._dispatch import kernels as _kernels
from ._threads import get_num_threads


# 64-bit ARM CPUs by /proc/cpuinfo's "CPU part" (implementer 0x41, Arm Ltd.): the cores of
# the boards and servers fastbn is used on
_ARM_PARTS = {
    0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
    0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
    0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd40: "Neoverse-V1", 0xd41: "Cortex-A78",
    0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd49: "Neoverse-N2", 0xd4f: "Neoverse-V2",
    0xd80: "Cortex-A520", 0xd81: "Cortex-A720", 0xd84: "Neoverse-V3",
}


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00\n ")
    except OSError:
        return ""


def cpu_model():
    """The CPU's name as the system reports it: /proc/cpuinfo's "model name" (x86), else the
    board's device-tree model and the ARM core ("CPU part"), else platform.processor()."""
    cpuinfo = _read("/proc/cpuinfo")
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("model name"):
        return fields["model name"]
    parts = []
    board = _read("/sys/firmware/devicetree/base/model")
    if board:
        parts.append(board)
    if "CPU part" in fields:
        try:
            implementer, part = int(fields.get("CPU implementer", "0"), 16), \
                int(fields["CPU part"], 16)
        except ValueError:
            implementer, part = 0, -1
        name = _ARM_PARTS.get(part) if implementer == 0x41 else None
        parts.append(name or f"ARM CPU part {fields['CPU part']} "
                             f"(implementer {fields.get('CPU implementer', '?')})")
    return ", ".join(parts) or platform.processor() or platform.machine() or "unknown CPU"


def config():
    """Build and runtime facts as a dict (see :func:`show_config`)."""
    from . import __version__
    return {
        "fastbn": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "caches": f"L2 {_memory.L2_BYTES >> 10} KiB, last level {_memory.LLC_BYTES >> 10} KiB",
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
    for key in ("python", "numpy", "platform", "cpu", "caches", "cpu_count", "openmp", "threads",
                "OMP_NUM_THREADS", "compiler", "kernels", "cflags", "output_cache"):
        print(f"  {key:<16} {cfg[key]}", file=file)
