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


cdef extern from "parallel.h":
    double fastbn_now() noexcept nogil


# ---------------------------------------------------------------------------------------------
# Shared machines: a team whose threads the scheduler puts aside
# ---------------------------------------------------------------------------------------------
# A parallel region ends when its last thread does: if another process keeps the CPU a thread
# of the team needs, the call waits for a scheduler time slice (milliseconds, for a call of
# microseconds). The kernels time each region: when a thread starts late, or the master
# thread, its own share done, waits at the closing barrier, by more than WAIT_LATE seconds
# and more than WAIT_SHARE times the time the master's share took, the team cost the call
# more than it gave (one thread alone would have been done about when the master's share
# and its wait were: a thread the scheduler put aside, or asleep so long that waking it took
# longer than the work). Two such regions within WAIT_SUSPECT seconds (one alone may be a
# team waking from sleep, or the machine's hypervisor, before calls that then go on back to
# back; a competing process delays them again and again) make calls on the default thread
# count run on one thread for a while:
# _contended_for seconds, doubled (up to WAIT_WINDOW_MAX) each time the next team call waits
# again, back to WAIT_WINDOW after one that does not. Results do not depend on the thread
# count; an explicit num_threads is kept.
cdef double WAIT_LATE = 2e-4
cdef double WAIT_SHARE = 1.0
cdef double WAIT_SUSPECT = 0.05
cdef double WAIT_WINDOW = 0.1
cdef double WAIT_WINDOW_MAX = 3.2
cdef double _serial_until = 0.0
cdef double _suspect_until = 0.0
cdef double _contended_for = WAIT_WINDOW


cdef void _note_region(const fastbn_region* r) noexcept nogil:
    """A parallel region, timed (fastbn/kernels/parallel.h), has just ended (see above): the
    delay is the latest of its threads' late start, the master's time off the CPU during
    its share, and its wait at the closing barrier; the work, the master's CPU time."""
    cdef double wall = r.master_done - r.t0
    cdef double cpu = r.master_cpu - r.cpu0
    cdef double off = wall - cpu if cpu > 0 else 0.0
    cdef double late = r.latest - r.t0
    _note_wait(late if late > off else off, cpu if cpu > 0 else wall,
               fastbn_now() - r.master_done)


cdef void _note_wait(double late, double work, double wait) noexcept nogil:
    """A region's threads were delayed `late` seconds (a late start, or the master off the
    CPU); its master thread worked `work` seconds on its share, then waited `wait` seconds
    for the others."""
    global _serial_until, _suspect_until, _contended_for
    cdef double delay = late if late > wait else wait
    cdef double now
    if delay > WAIT_LATE and delay > WAIT_SHARE * work:
        now = fastbn_now()
        if _contended_for > WAIT_WINDOW or now < _suspect_until:
            _serial_until = now + _contended_for
            _contended_for = min(2 * _contended_for, WAIT_WINDOW_MAX)
            _suspect_until = 0.0
        else:
            _suspect_until = now + WAIT_SUSPECT
    else:
        _contended_for = WAIT_WINDOW


def note_wait(double late, double work, double wait):
    """_note_wait for Python (tests)."""
    _note_wait(late, work, wait)


def contended():
    """Seconds left of the current one-thread window (0.0: none): see _note_wait."""
    return max(0.0, _serial_until - fastbn_now())


def end_contention():
    """Close the one-thread window and reset its length (tests)."""
    global _serial_until, _suspect_until, _contended_for
    _serial_until = 0.0
    _suspect_until = 0.0
    _contended_for = WAIT_WINDOW


cdef int _call_threads(object num_threads, Py_ssize_t size, bint planar,
                       list policy) except -2:
    """_threads_for, adapting to contended CPUs (the kernels' lean calls)."""
    return _threads_for(num_threads, size, planar, policy, True)


cdef int _threads_for(object num_threads, Py_ssize_t size, bint planar, list policy,
                      bint adapt) except -2:
    """The threads a call on `size` values runs on (fastbn/_threads.py's policy, read from its
    POLICY list): num_threads when given (at most MAX_THREADS), else the count set with
    set_num_threads, else OpenMP's default capped by the CPUs the process may use, and one
    while the CPUs are contended (_note_wait); one for inputs below the view's serial
    threshold, and without OpenMP (adapt False: the default as configured, contended or not).
    -1 when num_threads is neither None nor an int >= 1 (the caller validates it)."""
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
    if not n:
        n = max(1, min(omp_get_max_threads(), <Py_ssize_t>policy[3]))
    if adapt and n > 1 and _serial_until > 0.0 and fastbn_now() < _serial_until:
        return 1
    return n


def call_threads(num_threads, Py_ssize_t size, bint planar, list policy, bint adapt=True):
    """_threads_for for Python (fastbn/_threads.py)."""
    return _threads_for(num_threads, size, planar, policy, adapt)


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
