"""Pick the kernel module this CPU runs best.

All modules are compiled from fastbn/kernels/all.pxi: `_kernels` for the portable baseline, and
on x86-64 `_kernels_avx2` (AVX2 + FMA + F16C) and `_kernels_avx512` (AVX-512 F/VL/DQ/BW with 512-bit
vectors). FASTBN_SIMD (read at import) forces one: `baseline`, `avx2` or `avx512` (for
comparisons and debugging; when this CPU cannot run it, the baseline). Results are
bit-identical across thread counts within one module; modules may differ in the last bits
(FMA rounds once, and the vector width changes how the compiler splits some loops).
"""
import contextlib
import importlib
import os

from . import _kernels as _baseline
from . import _memory, _support

# the best first
_VARIANTS = (("avx512", "_kernels_avx512", _support.cpu_has_avx512),
             ("avx2", "_kernels_avx2", _support.cpu_has_avx2_fma))


def _select():
    wanted = os.environ.get("FASTBN_SIMD", "").lower()
    if wanted in ("baseline", "sse2", "none"):
        return _baseline
    if wanted not in [name for name, _, _ in _VARIANTS]:
        wanted = ""            # unset or unknown: the best this CPU runs
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
    Builds without the setting (another checkout's) are left as they are."""
    if hasattr(module, "group_bytes"):
        module.group_bytes(max(_memory.L2_BYTES // 2, 1))
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
        kernels = saved
