"""What fastbn compiles once, for every instruction set: CPU and OpenMP facts, and the C
fast paths of the per-call checks and running-statistics updates around the kernels.

The kernels themselves (fastbn/kernels/*.pxi) are compiled once per instruction set, as
_kernels, _kernels_avx2 and _kernels_avx512; nothing here needs wide vectors.
"""
from libc.float cimport DBL_MAX, FLT_MAX
from libc.math cimport sqrt

cimport numpy as cnp
from fastbn._arrays cimport _native, _param_ok, _running_ok, _running_pair_ok, _vec

cnp.import_array()

cdef extern from "cpu_info.h":
    int FASTBN_OPENMP
    int omp_get_max_threads() noexcept nogil
    long fastbn_cache_size(int level) noexcept nogil
    int fastbn_cpu_avx2_fma() noexcept nogil
    int fastbn_cpu_avx512() noexcept nogil


def openmp_enabled():
    """True when fastbn was compiled with OpenMP."""
    return bool(FASTBN_OPENMP)


def omp_max_threads():
    """omp_get_max_threads() of the calling thread (honours OMP_NUM_THREADS and threadpoolctl)."""
    return omp_get_max_threads()


cdef int _call_threads(object num_threads, Py_ssize_t size, bint planar,
                       list policy) except -2:
    """The threads a call on `size` values runs on (fastbn/_threads.py's policy, read from its
    POLICY list): num_threads when given (at most MAX_THREADS), else the count set with
    set_num_threads, else OpenMP's default capped by the CPUs the process may use; one for
    inputs below the view's serial threshold, and without OpenMP. -1 when num_threads is
    neither None nor an int >= 1 (the caller validates it)."""
    cdef Py_ssize_t n = 0
    if num_threads is not None:
        if type(num_threads) is not int or num_threads < 1:
            return -1
        n = policy[4] if num_threads > policy[4] else num_threads
    if not FASTBN_OPENMP or size < <Py_ssize_t>policy[0 if planar else 1]:
        return 1
    if n:
        return n
    n = policy[2]
    if n:
        return n
    n = omp_get_max_threads()
    return max(1, min(n, <Py_ssize_t>policy[3]))


def call_threads(num_threads, Py_ssize_t size, bint planar, list policy):
    """_call_threads for Python (fastbn/_threads.py)."""
    return _call_threads(num_threads, size, planar, policy)


def cache_sizes():
    """(L1d, L2, L3) cache sizes in bytes as the C library reports them (0: unknown)."""
    return tuple(fastbn_cache_size(level) for level in (1, 2, 3))


def cpu_has_avx2_fma():
    """True when this CPU runs AVX2, FMA and F16C instructions."""
    return bool(fastbn_cpu_avx2_fma())


def cpu_has_avx512():
    """True when this CPU (and its operating system) runs AVX-512 F, VL, DQ and BW, and AVX2
    and FMA."""
    return bool(fastbn_cpu_avx512())


# ---------------------------------------------------------------------------------------------
# Fast paths of the checks in fastbn/_validate.py: the common case at C speed, the caller
# validating (and converting) in full when one says False
# ---------------------------------------------------------------------------------------------

def params_ok(Py_ssize_t C, Py_ssize_t required, *params):
    """True when every per-channel input can go to a kernel as it is: a C-contiguous,
    native float32 or float64 array of shape (C,), the first `required` of them present
    (the others may be None). The caller validates and converts otherwise."""
    cdef Py_ssize_t i
    for i in range(len(params)):
        if params[i] is None:
            if i < required:
                return False
        elif not _param_ok(params[i], C):
            return False
    return True


def running_pair_ok(running_mean, running_var, Py_ssize_t C):
    """True when both running buffers are writable C-contiguous float32/float64 vectors of
    the channel count, aligned and in native byte order, whose bytes do not overlap (the
    common case, checked at C speed; the caller validates anything else in full)."""
    return _running_pair_ok(running_mean, running_var, C)


def finite_positive(a, Py_ssize_t C):
    """True when a is a C-contiguous float32/float64 vector of C finite values > 0."""
    cdef Py_ssize_t c
    cdef const float* f
    cdef const double* d
    if not _param_ok(a, C):
        return False
    if cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.NPY_FLOAT32:
        f = <const float*>cnp.PyArray_DATA(<cnp.ndarray>a)
        for c in range(C):
            if not (f[c] > 0 and f[c] <= FLT_MAX):
                return False
    else:
        d = <const double*>cnp.PyArray_DATA(<cnp.ndarray>a)
        for c in range(C):
            if not (d[c] > 0 and d[c] <= DBL_MAX):
                return False
    return True


# ---------------------------------------------------------------------------------------------
# Running-statistics updates, in one C loop per buffer
# ---------------------------------------------------------------------------------------------

cdef void _running_average(cnp.ndarray buf, const double* batch, double scale,
                           double momentum, Py_ssize_t C, bint toward) noexcept:
    """buf <- the running average of buf and batch * scale, in double, stored in buf's dtype:
    ``buf + momentum * (new - buf)`` if toward (Batch Renormalization's form), else
    ``momentum * new + (1 - momentum) * buf`` (PyTorch's form; the same value up to
    rounding). Compiled here, for every build of the kernels alike (fastbn/_support.pxd): the
    compiler may contract a * b + c into one rounding where FMA instructions are enabled,
    as they are in the AVX2 and AVX-512 kernels, and a lean call updates the buffers to the
    bit as the general path does."""
    cdef Py_ssize_t c
    cdef double old, new
    cdef float* f = <float*>cnp.PyArray_DATA(buf)
    cdef double* d = <double*>cnp.PyArray_DATA(buf)
    cdef bint single = cnp.PyArray_TYPE(buf) == cnp.NPY_FLOAT32
    for c in range(C):
        old = f[c] if single else d[c]
        new = batch[c] * scale
        new = old + momentum * (new - old) if toward else momentum * new + (1.0 - momentum) * old
        if single:
            f[c] = <float>new
        else:
            d[c] = new


def renorm_update(running_mean, running_std, cnp.ndarray stats, double momentum, double eps,
                  cnp.ndarray std):
    """The running update of Batch Renormalization's training forward, in C:
    std <- sqrt(var + eps) (float64 (C,)), then running_mean += momentum * (mean -
    running_mean) and running_std += momentum * (std - running_std), in double, stored in
    the buffers' dtype. The buffers must pass running_pair_ok."""
    cdef Py_ssize_t c, C = cnp.PyArray_DIM(stats, 1) if cnp.PyArray_NDIM(stats) == 2 else -1
    cdef const double* st
    cdef double* sd
    if C < 0 or not running_pair_ok(running_mean, running_std, C):
        raise ValueError("renorm_update takes the running buffers running_pair_ok accepts")
    st = _vec(stats, 2 * C)
    sd = _vec(std, C)
    for c in range(C):
        sd[c] = sqrt(st[C + c] + eps)
    _running_average(<cnp.ndarray>running_mean, st, 1.0, momentum, C, True)
    _running_average(<cnp.ndarray>running_std, sd, 1.0, momentum, C, True)


def update_running(running_mean, running_var, cnp.ndarray stats, double momentum,
                   double unbias):
    """The running-statistics update of training forward, in one C loop per buffer:
    running_mean <- (1 - momentum) * running_mean + momentum * stats[0] and the same for
    running_var with stats[1] * unbias, computed in double and stored in the buffer's
    dtype. Returns False, writing nothing, unless both buffers are writable C-contiguous
    float32/float64 vectors of the channel count (the caller then updates them itself)."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(stats, 1) if cnp.PyArray_NDIM(stats) == 2 else -1
    cdef const double* st = _vec(stats, 2 * C) if C >= 0 else NULL
    if st == NULL or not (_running_ok(running_mean, C) and _running_ok(running_var, C)):
        return False
    _running_average(<cnp.ndarray>running_mean, st, 1.0, momentum, C, False)
    _running_average(<cnp.ndarray>running_var, st + C, unbias, momentum, C, False)
    return True
