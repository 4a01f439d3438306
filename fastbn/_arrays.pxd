# Checks of NumPy arrays that C code reads through raw pointers, shared by the kernels
# (fastbn/kernels/entry_points.pxi, lean.pxi) and fastbn/_support.pyx.
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


cdef inline bint _param_ok(object a, Py_ssize_t C):
    """Whether a is a C-contiguous, native float32/float64 vector of C values (a
    per-channel input the kernels read as it is)."""
    cdef cnp.ndarray arr
    cdef int t
    if type(a) is not cnp.ndarray:
        return False
    arr = <cnp.ndarray>a
    t = cnp.PyArray_TYPE(arr)
    return ((t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and cnp.PyArray_NDIM(arr) == 1
            and cnp.PyArray_DIM(arr, 0) == C and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and _native(arr))


cdef inline bint _running_ok(object buf, Py_ssize_t C):
    """Whether buf is a writable, C-contiguous, native float32/float64 vector of C values
    (a running-statistics buffer updated in place)."""
    cdef cnp.ndarray a
    if type(buf) is not cnp.ndarray:
        return False
    a = <cnp.ndarray>buf
    return ((cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 or cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64)
            and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISWRITEABLE(a) and _native(a)
            and cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_SIZE(a) == C)


cdef inline bint _running_pair_ok(object running_mean, object running_var, Py_ssize_t C):
    """Whether both buffers pass _running_ok and their bytes do not overlap."""
    cdef char* a
    cdef char* b
    if not (_running_ok(running_mean, C) and _running_ok(running_var, C)):
        return False
    a = <char*>cnp.PyArray_DATA(<cnp.ndarray>running_mean)
    b = <char*>cnp.PyArray_DATA(<cnp.ndarray>running_var)
    return (a + cnp.PyArray_NBYTES(<cnp.ndarray>running_mean) <= b
            or b + cnp.PyArray_NBYTES(<cnp.ndarray>running_var) <= a)

