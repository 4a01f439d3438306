"""Pick the kernel module this CPU runs best.

All modules are compiled from fastbn/kernels/all.pxi: `_kernels` for the portable baseline, and
on x86-64 `_kernels_avx2` (AVX2 + FMA + F16C) and `_kernels_avx512` (AVX-512 F/VL/DQ/BW with 512-bit
vectors). FASTBN_SIMD (read at import) forces one: `baseline` (also `sse2`, `neon`), `avx2` or
`avx512` (for comparisons and debugging; when this CPU cannot run it, the baseline; an unknown
name warns and takes the best). On 64-bit ARM the baseline is the only build: NEON is part
of every ARMv8 CPU, float16 conversions included. Results are
bit-identical across thread counts within one module; modules may differ in the last bits
(FMA rounds once, and the vector width changes how the compiler splits some loops).
"""
import contextlib
import importlib
import os
import warnings

from . import _kernels as _baseline
from . import _memory, _support

# the best first
_VARIANTS = (("avx512", "_kernels_avx512", _support.cpu_has_avx512),
             ("avx2", "_kernels_avx2", _support.cpu_has_avx2_fma))


# names of the portable build: what it is on x86-64 (SSE2) and on 64-bit ARM (NEON)
_BASELINE_NAMES = ("baseline", "sse2", "neon", "none")


def _select():
    wanted = os.environ.get("FASTBN_SIMD", "").strip().lower()
    if wanted in _BASELINE_NAMES:
        return _baseline
    if wanted and wanted not in [name for name, _, _ in _VARIANTS]:
        warnings.warn("FASTBN_SIMD=%r is not a kernel build fastbn knows (%s); using the best "
                      "this CPU runs" % (os.environ["FASTBN_SIMD"], ", ".join(
                          [name for name, _, _ in _VARIANTS] + list(_BASELINE_NAMES))),
                      RuntimeWarning, stacklevel=2)
        wanted = ""            # unknown: the best this CPU runs
    for name, module, cpu_runs in _VARIANTS:
        if (wanted and wanted != name) or not cpu_runs():
            continue           # never import a variant the CPU cannot run: its module
                               # initialization itself may use the wider instructions
        try:
            return importlib.import_module("." + module, __package__)
        except ImportError:    # not built on this platform
            continue
    return _baseline


def _configure(module):
    """Tell a kernel module the cache sizes it cannot read itself: a planar group of
    channels holds at most half the L2 cache the CPU reports between its two passes
    (measured on an Intel Xeon with 2 MiB of L2, 2 threads, against the former groups of
    about 16384 values per sample: (32, 512, 28, 28) float32 training 0.91x and backward
    0.84x, float64 0.81x and 0.87x, bfloat16 backward 0.90x; other shapes 0.96-1.07x).
    Builds without the setting (another checkout's) are left as they are. Outputs are
    streamed only by builds that have streaming stores (x86)."""
    if hasattr(module, "group_bytes"):
        module.group_bytes(max(_memory.L2_BYTES // 2, 1))
    streams = module.streaming_stores() if hasattr(module, "streaming_stores") else True
    _memory.STREAM_ABOVE = _memory.STREAMED_ABOVE if streams else _memory.NEVER_STREAM
    return module


kernels = _configure(_select())


@contextlib.contextmanager
def using(module):
    """Within the block, fastbn's calls run on the kernel module `module` (another build,
    for tests that compare the builds and for A/B measurements). Not thread-safe."""
    global kernels
    saved = kernels
    kernels = _configure(module)
    try:
        yield module
    finally:
        kernels = _configure(saved)
