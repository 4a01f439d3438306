"""What the CPU's caches tell the kernels, read once at import.

* Preallocated outputs (``out=``) larger than the cache this process can count on are
  written with streaming (non-temporal) stores: they cannot stay in a cache anyway, and
  ordinary stores would first read every output line from memory and evict the input that
  the kernel still reads. Measured (AMD EPYC, 2 threads, float32, 103 MB and 51 MB inputs):
  inference out= 0.80-0.92x, training 0.80-0.97x, backward 0.92-0.99x. A fresh output
  is different: the kernel zeroes each new page as it is first written, which leaves the
  page's lines in the cache, and ordinary stores then cost nothing extra (streaming them
  measured 1.04-1.12x for inference). Outputs that fit are left in the cache for the next
  layer to read.
* The cache a process can count on is not the last-level cache the CPU reports: that one
  is shared with every other core of the socket, and a virtual machine reports its host's
  whole cache (an Intel Xeon host of 2-vCPU machines reports 480 MiB). fastbn counts
  STREAM_PER_CPU bytes for each CPU the process may run on, at most the last-level cache.
  Measured on that Intel Xeon machine (2 threads, float32, out=, streaming / ordinary
  stores over both layouts): 1-2 MiB outputs 0.99-1.61x, 4 MiB 0.75-1.02x, 8 MiB
  0.72-1.01x, 16-64 MiB 0.62-0.98x; (32, 256, 56, 56) NCHW inference 0.69x, backward 0.67x,
  training 0.89x (medians of 41 interleaved pairs in one process).

Sizes come from Linux's /sys/devices/system/cpu (the CPU's own report, through the
kernel), else from the C library's sysconf, else the defaults below.
"""
import glob
import os

from . import _support

_DEFAULT_L2 = 1 << 20
_DEFAULT_LLC = 8 << 20


def _parse_size(text):
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _from_sys():
    """{level: bytes} of the data/unified caches of cpu0, from /sys (Linux)."""
    sizes = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "size")) as f:
                sizes[level] = _parse_size(f.read())
        except (OSError, ValueError):
            continue
    return sizes


def cache_sizes():
    """(L2 bytes per core, last-level cache bytes) as this machine reports them."""
    sizes = _from_sys()
    if not sizes:
        sizes = {level: n for level, n in zip((1, 2, 3), _support.cache_sizes()) if n > 0}
    l2 = sizes.get(2, _DEFAULT_L2)
    llc = sizes[max(sizes)] if sizes else _DEFAULT_LLC
    return l2, max(llc, l2)


def usable_cpus():
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# cache bytes counted per CPU the process may run on (the crossover measured above lies
# between 1 and 2 MiB of output per CPU)
STREAM_PER_CPU = 2 << 20


def stream_threshold(llc, cpus):
    """The output size above which out= arrays are streamed: STREAM_PER_CPU for each of
    `cpus` CPUs, at most the last-level cache `llc`."""
    return min(llc, cpus * STREAM_PER_CPU)


L2_BYTES, LLC_BYTES = cache_sizes()
# outputs above this many bytes are written with streaming stores
STREAM_ABOVE = stream_threshold(LLC_BYTES, usable_cpus())


def stream_output(nbytes, out):
    """Whether an output of nbytes is written with streaming stores (out: the caller's
    preallocated array, or None for a fresh one)."""
    return out is not None and nbytes > STREAM_ABOVE
