# The kernels built with AVX2 and FMA (x86-64 only; see _kernels.pxi and _dispatch.py).
include "_kernels.pxi"
