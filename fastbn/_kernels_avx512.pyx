# The kernels built with AVX-512 (F, VL, DQ, BW) and FMA (x86-64 only; see kernels/all.pxi
# and _dispatch.py).
include "kernels/all.pxi"
