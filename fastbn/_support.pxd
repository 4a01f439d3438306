# What fastbn/_support.pyx gives the kernels at C level (fastbn/kernels/lean.pxi): the
# running-statistics update, compiled once for every build of the kernels, and the thread
# count of a call (fastbn/_threads.py's policy).
cimport numpy as cnp


cdef void _running_average(cnp.ndarray buf, const double* batch, double scale,
                           double momentum, Py_ssize_t C, bint toward) noexcept


cdef int _call_threads(object num_threads, Py_ssize_t size, bint planar,
                       list policy) except -2
