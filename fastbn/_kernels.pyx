# The kernels built for the portable baseline instruction set (see kernels/all.pxi).
include "kernels/all.pxi"
