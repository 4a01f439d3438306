# The kernels built with AVX2 and FMA (x86-64 only; see kernels/all.pxi and _dispatch.py).
include "kernels/all.pxi"
