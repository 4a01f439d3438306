# The kernels, compiled once per instruction set: fastbn/_kernels.pyx (portable baseline)
# and, on x86-64, fastbn/_kernels_avx2.pyx (-mavx2 -mfma) and fastbn/_kernels_avx512.pyx
# (AVX-512 F/VL/DQ/BW, 512-bit vectors) include this file; fastbn/_dispatch.py imports the
# best one the CPU runs. Everything that needs no vector instructions is in _support.pyx.
include "common.pxi"          # types, tuning constants, Chan merges, coefficients
include "planar_blocks.pxi"   # the planar view (NCHW memory): statistics and sums of a block
include "planar.pxi"          # the planar view: training forward, inference, backward
include "rows.pxi"            # the rows view (channels-last memory, and (N, C)): the same
include "half.pxi"            # float16 and bfloat16 data, staged through float32
include "entry_points.pxi"    # the Python entry points, and the bandwidth yardsticks
include "lean.pxi"            # whole small calls in C: checks, kernel and result
