# The kernels built for the portable baseline instruction set (see _kernels.pxi).
include "_kernels.pxi"
