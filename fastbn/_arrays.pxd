# Checks of NumPy arrays that C code reads through raw pointers, shared by the kernels
# (fastbn/kernels/entry_points.pxi) and fastbn/_support.pyx.
cimport numpy as cnp


cdef inline bint _native(cnp.ndarray a):
    """Whether a's elements can be read through a plain C pointer: aligned, native byte
    order."""
    return cnp.PyArray_ISALIGNED(a) and cnp.PyArray_ISNOTSWAPPED(a)


cdef inline double* _vec(object a, Py_ssize_t n, bint optional=False) except? NULL:
    """Pointer to a C-contiguous float64 array of at least n values (NULL for None if optional)."""
    cdef cnp.ndarray arr
    if a is None:
        if optional:
            return NULL
        raise ValueError("kernel vector missing")
    arr = <cnp.ndarray?>a
    if (cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT64 or not cnp.PyArray_IS_C_CONTIGUOUS(arr)
            or not _native(arr) or cnp.PyArray_SIZE(arr) < n):
        raise ValueError("kernel vectors must be C-contiguous float64 of the channel count")
    return <double*>cnp.PyArray_DATA(arr)
