"""What the CPU's caches tell the kernels, read once at import.

* Outputs whose pages are mapped already (the caller's ``out=``, or a block from the output
  cache below) and larger than the cache this process can count on are written with
  streaming (non-temporal) stores: they cannot stay in a cache anyway, and ordinary stores
  would first read every output line from memory and evict the input that the kernel still
  reads. Measured (AMD EPYC, 2 threads, float32, 103 MB and 51 MB inputs): inference out=
  0.80-0.92x, training 0.80-0.97x, backward 0.92-0.99x. A new array is different: the
  kernel zeroes each new page as it is first written, which leaves the page's lines in the
  cache, and ordinary stores then cost nothing extra (streaming them measured 1.04-1.12x
  for inference). Outputs that fit are left in the cache for the next layer to read.
* The cache a process can count on is not the last-level cache the CPU reports: that one
  is shared with every other core of the socket, and a virtual machine reports its host's
  whole cache (an Intel Xeon host of 2-vCPU machines reports 480 MiB). fastbn counts
  STREAM_PER_CPU bytes for each CPU the process may run on, at most the last-level cache.
  Measured on that Intel Xeon machine, 2 threads, float32, each store form called 30 times
  in a row (three alternating runs of each; streaming / ordinary time): 6 MiB outputs
  1.09-1.20x, 12 MiB 0.99-1.26x, 24 MiB 0.97-1.12x, 49 MiB 0.52-1.09x (0.77 for NCHW
  inference), 100 MB 0.5x. Timed in interleaved pairs instead, streaming looks better from
  4 MiB (0.75-1.02x): each ordinary call then finds its output evicted by the streaming
  call before it, which a layer called again and again does not.

Sizes come from Linux's /sys/devices/system/cpu (the CPU's own report, through the
kernel), else from the C library's sysconf, else the defaults below.

* Fresh outputs from CACHE_FROM bytes up come from the output cache (_output_cache): a
  block NumPy frees waits there, its pages mapped, for the next output of a fitting size,
  so that a loop which drops each result (a training loop) pays no page faults after its
  first step. Its size is bounded (set_output_cache); the caller's own arrays never go
  through it.
"""
import glob
import math
import os
import warnings

import numpy as np

from . import _output_cache, _support

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
# between 12 and 24 MiB of output for 2 CPUs)
STREAM_PER_CPU = 8 << 20


def stream_threshold(llc, cpus):
    """The output size above which mapped outputs are streamed: STREAM_PER_CPU for each of
    `cpus` CPUs, at most the last-level cache `llc`."""
    return min(llc, cpus * STREAM_PER_CPU)


L2_BYTES, LLC_BYTES = cache_sizes()
# outputs above this many bytes are written with streaming stores (fastbn._dispatch sets it
# to NEVER_STREAM for kernels built without them)
STREAM_ABOVE = STREAMED_ABOVE = stream_threshold(LLC_BYTES, usable_cpus())
NEVER_STREAM = 1 << 62


def stream_output(nbytes, mapped):
    """Whether an output of nbytes is written with streaming stores (mapped: its pages are
    mapped already, as the caller's out= or a block from the output cache; a new array's
    are not)."""
    return mapped and nbytes > STREAM_ABOVE


# ---------------------------------------------------------------------------------------------
# The output cache
# ---------------------------------------------------------------------------------------------

# Fresh outputs of at least this many bytes come from the output cache. Below it the C
# library's allocator keeps freed memory mapped itself (measured: a 256 KiB inference output
# costs the same fresh or with out=), and the cache's lock and handler switch would be
# the larger cost.
CACHE_FROM = 1 << 20
# The default cap: this fraction of the physical memory, at most CACHE_CAP_MAX bytes
CACHE_FRACTION = 1 / 8
CACHE_CAP_MAX = 1 << 30
CACHE_ENV = "FASTBN_OUTPUT_CACHE"


def physical_memory():
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def default_cache_bytes(environ=os.environ):
    """The cap at import: FASTBN_OUTPUT_CACHE (bytes, with an optional K, M or G suffix;
    0 turns the cache off) when set, else CACHE_FRACTION of the physical memory, at most
    CACHE_CAP_MAX (CACHE_CAP_MAX / 4 where the system does not say how much it has)."""
    text = environ.get(CACHE_ENV)
    if text is not None:
        try:
            value = _parse_size(text)
        except ValueError:
            value = -1
        if value >= 0:
            return value
        warnings.warn(f"{CACHE_ENV}={text!r} is not a size in bytes (such as 0, 536870912 or "
                      "512M); using the default", RuntimeWarning, stacklevel=2)
    phys = physical_memory()
    if not phys:
        return CACHE_CAP_MAX // 4
    return min(int(phys * CACHE_FRACTION), CACHE_CAP_MAX)


_cache_max = default_cache_bytes()
_output_cache.set_max(_cache_max)


def new_array(shape, dtype, beside=None):
    """(an uninitialised C-contiguous array of this shape and np.dtype for fastbn to fill,
    whether its pages are mapped already): from the output cache from CACHE_FROM bytes up,
    while it is on, and then half a page from the page offset of `beside` (the array the
    kernel reads while it writes this one): loads and stores whose addresses differ by a
    few bytes modulo 4 KiB stall each other in the CPU (measured: a training forward of
    (32, 2048, 7, 7) with out= 64 bytes from x's page offset 0.85-0.91x slower than with
    out= half a page away)."""
    if _cache_max and dtype.itemsize * math.prod(shape) >= CACHE_FROM:
        return _output_cache.empty(shape, dtype,
                                   0 if beside is None else beside.ctypes.data)
    return np.empty(shape, dtype), False


def set_output_cache(max_bytes):
    """Set how many bytes of freed outputs fastbn keeps for reuse.

    fastbn allocates its large outputs (from 1 MiB) through a NumPy memory handler of its
    own: when such an array is freed, its memory waits in a cache, already mapped, for the
    next output of a fitting size, instead of going back to the operating system. A loop
    that drops each result then pays no page faults after its first step. The default is
    an eighth of the physical memory, at most 1 GiB, or the environment variable
    ``FASTBN_OUTPUT_CACHE`` (bytes, or with a K, M or G suffix) when it is set.

    Parameters
    ----------
    max_bytes : int
        The most bytes the cache holds (>= 0); 0 turns it off: outputs are then allocated
        by NumPy's own allocator, as for any array. Blocks beyond a smaller cap are given
        back at once.

    Raises
    ------
    TypeError
        max_bytes is not an integer.
    ValueError
        max_bytes is negative.

    Examples
    --------
    >>> import fastbn
    >>> fastbn.set_output_cache(256 << 20)
    >>> fastbn.output_cache_info()["max_bytes"]
    268435456
    """
    global _cache_max
    if isinstance(max_bytes, (bool, np.bool_)) or not isinstance(max_bytes,
                                                                 (int, np.integer)):
        raise TypeError(f"max_bytes must be an integer number of bytes, got "
                        f"{type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 (0 turns the cache off), got {max_bytes}")
    max_bytes = min(int(max_bytes), (1 << 63) - 1)
    _output_cache.set_max(max_bytes)
    _cache_max = max_bytes


def empty_output_cache():
    """Give the memory of every cached output block back to the operating system now.

    Returns
    -------
    int
        The bytes given back.

    Examples
    --------
    >>> import fastbn
    >>> fastbn.empty_output_cache() >= 0
    True
    """
    return _output_cache.release()


def output_cache_info():
    """What the output cache holds and how it has served.

    Returns
    -------
    dict
        ``max_bytes`` (the cap), ``bytes`` (held now), ``blocks`` (held now), ``hits``
        (outputs that reused a block), ``misses`` (outputs that needed new memory) and
        ``min_bytes`` (outputs smaller than this never use the cache).

    Examples
    --------
    >>> import fastbn
    >>> sorted(fastbn.output_cache_info())
    ['blocks', 'bytes', 'hits', 'max_bytes', 'min_bytes', 'misses']
    """
    max_bytes, held, blocks, hits, misses = _output_cache.counts()
    return dict(max_bytes=max_bytes, bytes=held, blocks=blocks, hits=hits, misses=misses,
                min_bytes=CACHE_FROM)
