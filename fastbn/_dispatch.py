"""Pick the kernel module this CPU runs best.

Both modules are compiled from fastbn/_kernels.pxi: `_kernels` for the portable baseline,
`_kernels_avx2` with AVX2 + FMA (built on x86-64 only). Set FASTBN_SIMD=baseline to force
the portable one (for comparisons and debugging). Results are bit-identical across thread
counts within one module; the two modules may differ in the last bits (FMA rounds once).
"""
import os

from . import _kernels as _baseline


def _select():
    if os.environ.get("FASTBN_SIMD", "").lower() in ("baseline", "sse2", "none"):
        return _baseline
    try:
        from . import _kernels_avx2
    except ImportError:        # not built on this platform
        return _baseline
    return _kernels_avx2 if _baseline.cpu_has_avx2_fma() else _baseline


kernels = _select()
