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
from . import _support

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


kernels = _select()


@contextlib.contextmanager
def using(module):
    """Within the block, fastbn's calls run on the kernel module `module` (another build,
    for tests that compare the builds and for A/B measurements). Not thread-safe."""
    global kernels
    saved = kernels
    kernels = module
    try:
        yield module
    finally:
        kernels = saved
