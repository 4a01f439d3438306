# Whole small calls in C. A call on a few thousand values takes a few microseconds in the
# kernels, and as long again in the Python steps around them (checking each argument, picking
# the canonical view, allocating the results). The lean entry points below do all of it in C
# for the common case: the data a C-contiguous, aligned, native ndarray of a kernel dtype, laid
# out as `layout` says, smaller than the output cache's sizes; the per-channel inputs float32
# or float64 vectors of the channel count (what fastbn's own results are); out= None or an
# array the kernel writes directly; eps, momentum, num_threads plain Python numbers. They
# return None for anything else, and the caller (fastbn/_calls.py) takes the general path,
# which checks everything in full and raises the documented errors. A lean call gives what
# the general path would, to the bit: the same kernel on the same view, with the same thread
# count (fastbn/_threads.py's policy, read by fastbn._support's call_threads in C).


# A lean call's data is smaller than this (fastbn._memory.CACHE_FROM): its result is a plain
# NumPy array, as the general path's would be (larger ones come from the output cache)
LEAN_BYTES = 1 << 20


cdef int _lean_view(object a, object layout, Py_ssize_t* dims) except -2:
    """The canonical view (PLANAR or ROWS) of data array a as it lies in memory, with its N, C,
    S in dims[0:3] (as fastbn/_calls.py's plan gives them), or -1 when a call on it is not a
    lean one: a not an exact ndarray of a kernel dtype with ndim >= 2, C-contiguous,
    aligned and native, with values, smaller than LEAN_BYTES; layout not the str "NCHW" or
    "NHWC"."""
    cdef cnp.ndarray arr
    cdef int nd
    cdef Py_ssize_t size, C
    if type(a) is not cnp.ndarray or type(layout) is not str:
        return -1
    arr = <cnp.ndarray>a
    nd = cnp.PyArray_NDIM(arr)
    if (nd < 2 or not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not _native(arr)
            or _dtype_code(arr) < 0):
        return -1
    size = cnp.PyArray_SIZE(arr)
    if size == 0 or cnp.PyArray_NBYTES(arr) >= LEAN_BYTES:
        return -1
    if layout == "NCHW":
        C = cnp.PyArray_DIM(arr, 1)
        dims[0] = cnp.PyArray_DIM(arr, 0)
        dims[2] = size // (dims[0] * C)
    elif layout == "NHWC":
        C = cnp.PyArray_DIM(arr, nd - 1)
        dims[2] = 1
    else:
        return -1
    dims[1] = C
    if dims[2] > 1:
        return PLANAR
    dims[0] = size // C
    dims[2] = 1
    return ROWS


cdef int _lean_start(object x, object layout, object num_threads, list policy,
                     Py_ssize_t* dims) except -2:
    """_lean_view of x, with the call's threads (fastbn._support's call_threads, the policy
    of fastbn/_threads.py) in dims[3]; -1 when the call is not a lean one (also when
    num_threads is not None or an int >= 1)."""
    cdef int view = _lean_view(x, layout, dims)
    if view < 0:
        return -1
    dims[3] = _call_threads(num_threads, dims[0] * dims[1] * dims[2], view == PLANAR, policy)
    return view if dims[3] > 0 else -1


cdef bint _lean_scalar(object v, double lo, double hi):
    """Whether v is a Python float in [lo, hi] (finite)."""
    return type(v) is float and lo <= <double>v <= hi


cdef bint _disjoint(cnp.ndarray a, object b):
    """Whether b (None, or a C-contiguous array) shares no byte with a (C-contiguous)."""
    cdef char* pa
    cdef char* pb
    if b is None:
        return True
    pa = <char*>cnp.PyArray_DATA(a)
    pb = <char*>cnp.PyArray_DATA(<cnp.ndarray>b)
    return (pa + cnp.PyArray_NBYTES(a) <= pb
            or pb + cnp.PyArray_NBYTES(<cnp.ndarray>b) <= pa)


cdef cnp.ndarray _lean_result(object out, cnp.ndarray x, object alias, tuple inputs,
                              Py_ssize_t stream_above):
    """The array a lean call writes its result into: a new one (out None), or out when it
    can be written as the general path would (x's shape and dtype, C-contiguous, aligned,
    native, writable, no more than stream_above bytes, fastbn._memory.STREAM_ABOVE, as
    larger ones are streamed; alias itself or disjoint from it, disjoint from every array
    of inputs, None or lean-checked C-contiguous arrays); else None."""
    cdef cnp.ndarray o
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x),
                                 cnp.PyArray_TYPE(x), 0)
    if not _lean_like(out, x) or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
        return None
    o = <cnp.ndarray>out
    if cnp.PyArray_NBYTES(o) > stream_above:
        return None
    if cnp.PyArray_DATA(o) != cnp.PyArray_DATA(<cnp.ndarray>alias) and not _disjoint(o, alias):
        return None
    for a in inputs:
        if not _disjoint(o, a):
            return None
    return o


def lean_train(x, weight, bias, eps, layout, running_mean, running_var, momentum, out,
               num_threads, bint relu, list policy, Py_ssize_t stream_above):
    """fastbn.batch_norm_train (relu: batch_norm_relu_train with no residual) as one C call:
    (y, mean, invstd), the running buffers (both or neither) updated; or None when the call
    is not a lean one (see _lean_view and _lean_result; the running buffers must pass
    fastbn._support.running_pair_ok, a batch have more than one value per channel)."""
    cdef Py_ssize_t dims[4]
    cdef Py_ssize_t C
    cdef cnp.npy_intp sdims[2]
    cdef cnp.ndarray y, stats
    cdef double m
    cdef int view = _lean_start(x, layout, num_threads, policy, dims)
    if view < 0:
        return None
    C = dims[1]
    m = <double>(dims[0] * dims[2])
    if (m <= 1 or not _lean_scalar(eps, 0.0, DBL_MAX)
            or not _lean_scalar(momentum, 0.0, 1.0)
            or not ((weight is None or _param_ok(weight, C))
                    and (bias is None or _param_ok(bias, C)))
            or not ((running_mean is None and running_var is None)
                    or _running_pair_ok(running_mean, running_var, C))):
        return None
    y = _lean_result(out, <cnp.ndarray>x, x, (weight, bias, running_mean, running_var),
                     stream_above)
    if y is None:
        return None
    sdims[0] = 5
    sdims[1] = C
    stats = cnp.PyArray_EMPTY(2, sdims, cnp.NPY_FLOAT64, 0)
    _train(<cnp.ndarray>x, y, view, dims[0], C, dims[2], weight, bias, <double>eps, stats,
           None, <int>dims[3], False, None, relu, REDUCE | APPLY, None)
    if running_mean is not None:
        _running_average(<cnp.ndarray>running_mean, <double*>cnp.PyArray_DATA(stats), 1.0,
                         <double>momentum, C, False)
        _running_average(<cnp.ndarray>running_var, <double*>cnp.PyArray_DATA(stats) + C,
                         m / (m - 1.0), <double>momentum, C, False)
    return y, stats[0], stats[2]


def lean_infer(x, running_mean, running_var, weight, bias, eps, layout, out, num_threads,
               bint relu, list policy, Py_ssize_t stream_above):
    """fastbn.batch_norm_infer (relu: batch_norm_relu_infer with no residual) as one C call:
    y, or None when the call is not a lean one (see _lean_view and _lean_result)."""
    cdef Py_ssize_t dims[4]
    cdef Py_ssize_t C
    cdef cnp.ndarray y
    cdef int view = _lean_start(x, layout, num_threads, policy, dims)
    if view < 0:
        return None
    C = dims[1]
    if (not _lean_scalar(eps, 0.0, DBL_MAX)
            or not (_param_ok(running_mean, C) and _param_ok(running_var, C)
                    and (weight is None or _param_ok(weight, C))
                    and (bias is None or _param_ok(bias, C)))):
        return None
    y = _lean_result(out, <cnp.ndarray>x, x, (running_mean, running_var, weight, bias),
                     stream_above)
    if y is None:
        return None
    _infer(<cnp.ndarray>x, y, view, dims[0], C, dims[2], running_mean, running_var, weight,
           bias, <double>eps, <int>dims[3], False, False, None, relu)
    return y


def lean_backward(dy, x, mean, invstd, weight, training, layout, out, num_threads, ymask,
                  list policy, Py_ssize_t stream_above):
    """fastbn.batch_norm_backward (ymask: the fused ReLU's y, batch_norm_relu_backward with
    no dresidual; None: plain) as one C call: (dx, dweight, dbias); or None when the call is
    not a lean one (see _lean_view and _lean_result, which lets dx be dy; dy and ymask must
    be laid out as x)."""
    cdef Py_ssize_t dims[4]
    cdef Py_ssize_t C
    cdef cnp.npy_intp gdims[2]
    cdef cnp.ndarray dx, grads
    cdef int view = _lean_start(x, layout, num_threads, policy, dims)
    if view < 0:
        return None
    C = dims[1]
    if (not _lean_like(dy, <cnp.ndarray>x) or (ymask is not None and not _lean_like(ymask, <cnp.ndarray>x))
            or not (training is True or training is False)
            or not (_param_ok(mean, C) and _param_ok(invstd, C)
                    and (weight is None or _param_ok(weight, C)))):
        return None
    dx = _lean_result(out, <cnp.ndarray>x, dy, (x, mean, invstd, weight, ymask),
                      stream_above)
    if dx is None:
        return None
    gdims[0] = 2
    gdims[1] = C
    grads = cnp.PyArray_EMPTY(2, gdims, cnp.NPY_FLOAT64 if _dtype_code(<cnp.ndarray>x) == F64
                              else cnp.NPY_FLOAT32, 0)
    _backward(<cnp.ndarray>dy, <cnp.ndarray>x, dx, view, dims[0], C, dims[2], mean, invstd,
              weight, training is True, grads, <int>dims[3], False, ymask, None,
              REDUCE | APPLY, None, 0, None)
    return dx, grads[0], grads[1]


cdef bint _lean_like(object a, cnp.ndarray x):
    """Whether a is an exact ndarray of x's shape and dtype, C-contiguous, aligned, native."""
    cdef cnp.ndarray arr
    cdef int i
    if type(a) is not cnp.ndarray:
        return False
    arr = <cnp.ndarray>a
    if (cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(x) or cnp.PyArray_NDIM(arr) != cnp.PyArray_NDIM(x)
            or not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not _native(arr)):
        return False
    for i in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIM(arr, i) != cnp.PyArray_DIM(x, i):
            return False
    return True
