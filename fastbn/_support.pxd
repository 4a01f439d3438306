# What fastbn/_support.pyx gives the kernels at C level (fastbn/kernels/lean.pxi): the
# running-statistics update, compiled once for every build of the kernels, the thread
# count of a call (fastbn/_threads.py's policy) and the kernels' report of a parallel
# region's wait at its closing barrier (contended CPUs).
cimport numpy as cnp


cdef void _running_average(cnp.ndarray buf, const double* batch, double scale,
                           double momentum, Py_ssize_t C, bint toward) noexcept


cdef int _call_threads(object num_threads, Py_ssize_t size, bint planar,
                       list policy) except -2


cdef extern from "parallel.h":
    ctypedef struct fastbn_region:
        double t0
        double latest
        double master_done
        double cpu0
        double master_cpu

cdef void _note_region(const fastbn_region* r) noexcept nogil
