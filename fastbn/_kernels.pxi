# Batch Normalization kernels: typed, GIL-free, OpenMP-parallel loops.
#
# This file is included by three extension modules built from the same code: _kernels (the
# portable baseline instruction set), and on x86-64 _kernels_avx2 (-mavx2 -mfma) and
# _kernels_avx512 (AVX-512 F/VL/DQ/BW, 512-bit vectors). fastbn/_dispatch.py imports the best
# one the CPU runs.
#
# Every kernel works on one of two canonical C-contiguous views, chosen by fastbn/functional.py:
#   planar (N, C, S): each (n, c) pair is one contiguous run of S values (NCHW memory, S > 1);
#   rows   (R, C):    each row holds one value per channel (NHWC memory, and (N, C)).
# Statistics, scale/shift coefficients and reductions are accumulated in double whatever the
# data type, and (x - mean) is always formed in double, so float32 inputs with a large mean
# keep their low-order digits.
#
# Determinism: the data of a channel is cut into a fixed list of chunks that depends on the
# shape and dtype only, never on the thread count. Each chunk's partial result is computed by
# the same code whichever thread runs it, and partials are merged in chunk order. One thread
# or many, the result is bit-identical.
#
# Parallel structure: one OpenMP parallel region per call (none at all for one thread). Phases
# that must see every chunk's partial (merge, then normalize) are separate `prange` loops
# inside that region, ordered by explicit barriers.

from cython.parallel cimport parallel, prange
from libc.float cimport DBL_MAX, FLT_MAX
from libc.math cimport NAN, sqrt
from libc.stdlib cimport free, malloc

cimport numpy as cnp

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBN_OPENMP 1
    #else
    #define FASTBN_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    #endif
    """
    int FASTBN_OPENMP
    int omp_get_max_threads() noexcept nogil


cdef extern from *:
    """
    /* AVX-512's 32 vector registers hold the LANES sums of a long run (_devs_run); with
       16 registers they would spill, so other builds keep their sums in memory lanes */
    #if defined(__AVX512F__)
    #define FASTBN_REGISTER_LANES 1
    #else
    #define FASTBN_REGISTER_LANES 0
    #endif
    """
    bint REGISTER_LANES "FASTBN_REGISTER_LANES"


cdef extern from *:
    """
    #ifndef FASTBN_CFLAGS
    #define FASTBN_CFLAGS "?"
    #endif
    #if defined(__AVX512F__)
    #define FASTBN_SIMD "AVX-512"
    #elif defined(__AVX2__)
    #define FASTBN_SIMD "AVX2"
    #elif defined(__AVX__)
    #define FASTBN_SIMD "AVX"
    #elif defined(__SSE2__) || defined(_M_X64)
    #define FASTBN_SIMD "SSE2"
    #elif defined(__ARM_NEON)
    #define FASTBN_SIMD "NEON"
    #else
    #define FASTBN_SIMD "none"
    #endif
    static int fastbn_cpu_avx2_fma(void) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    #else
        return 0;
    #endif
    }
    /* the CPU and the operating system (which must save the 512-bit registers) */
    static int fastbn_cpu_avx512(void) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        return fastbn_cpu_avx2_fma() && __builtin_cpu_supports("avx512f")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512bw");
    #else
        return 0;
    #endif
    }
    #ifdef __VERSION__
    #define FASTBN_CC_VERSION __VERSION__
    #else
    #define FASTBN_CC_VERSION "unknown"
    #endif
    """
    int fastbn_cpu_avx2_fma() noexcept nogil
    int fastbn_cpu_avx512() noexcept nogil
    const char* FASTBN_CFLAGS
    const char* FASTBN_SIMD
    const char* FASTBN_CC_VERSION

cdef extern from *:
    """
    #ifdef _OPENMP
    /* orphaned barrier: binds to the enclosing parallel region (Cython's prange inside a
       parallel block is "omp for nowait", so phases are ordered explicitly) */
    static void fastbn_barrier(void) {
        #pragma omp barrier
    }
    #else
    static void fastbn_barrier(void) { }
    #endif
    """
    void _barrier "fastbn_barrier"() noexcept nogil


ctypedef fused floating:
    float
    double

# Values per statistics block: a block is read twice (sum, then squared deviations) while it
# sits in L1, so DRAM sees it once. 1024 float32 = 4 KiB; 64 terms per accumulator lane.
cdef enum:
    # accumulator lanes across a long run: in memory lanes (L1) each lane's additions wait
    # on a store-to-load round trip, and 32 lanes keep eight vector chains busy; AVX-512
    # builds hold the 32 lanes in registers instead (REGISTER_LANES)
    LANES = 32
    BLOCK = 1024
    # planar: at most this many chunks per channel (a channel is split among a team of
    # threads only when there are fewer than 4 channels per thread).
    MAX_CHUNKS = 16
    # rows: values per chunk of rows (64 KiB of float32, so two threads share even small
    # inputs), and rows per statistics block.
    ROW_CHUNK_VALUES = 16384
    TILE_ROWS = 32
    # at least this many rows per chunk, so wide rows do not make a chunk's C-length
    # partials as large as its data
    MIN_CHUNK_ROWS = 128
    # rows: the kernels sweep several rows at a time from WIDE_ROWS channels on, and the
    # reductions also below NARROW_ROWS or on cached data (see _multi_rows)
    WIDE_ROWS = 1024
    NARROW_ROWS = 64
    # planar: at most this many short runs per block when the reduction pass reads more than
    # CACHED_BYTES (a block reads its runs, C*S values apart, as that many interleaved
    # streams, of g and of x in the backward). Measured against BLOCK // S runs, for
    # (32, 2048, 7, 7) and (64, 1024, 7, 7) (20 runs): backward 0.71-0.86x (float32 and
    # float64, AVX2 and AVX-512, 1 and 2 threads), training 0.75-0.89x on 1 thread and
    # within noise on 2; (256, 256, 8, 8) (16 runs) unchanged. Inputs that stay in cache keep
    # BLOCK values: there the extra blocks cost up to 1.3x, on (32, 128, 5, 5)
    FAR_RUNS = 8
    # planar: contiguous values a task reads per sample (groups of channels, short planes)
    GROUP_VALUES = 16384
    # planar: inputs of at most CACHED_VALUES values are taken to stay in the last-level
    # cache; their channel groups hold at most GROUP_CACHED values (256 KiB of float32)
    CACHED_VALUES = 1 << 22
    GROUP_CACHED = 1 << 16
    # rows: a reduction pass that reads at most this many bytes is taken to read from the
    # last-level cache when it runs again (see _multi_rows)
    CACHED_BYTES = 1 << 23


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(FASTBN_OPENMP)


def build_flags():
    """Compiler flags, compiler version and vector instruction set the kernels were built with."""
    return "%s (SIMD: %s; compiler %s)" % (FASTBN_CFLAGS.decode(), FASTBN_SIMD.decode(),
                                          FASTBN_CC_VERSION.decode())


def cpu_has_avx2_fma():
    """True when this CPU runs AVX2 and FMA instructions."""
    return bool(fastbn_cpu_avx2_fma())


def cpu_has_avx512():
    """True when this CPU (and its operating system) runs AVX-512 F, VL, DQ and BW, and AVX2
    and FMA."""
    return bool(fastbn_cpu_avx512())


def omp_max_threads():
    """omp_get_max_threads() of the calling thread (honours OMP_NUM_THREADS and threadpoolctl)."""
    return omp_get_max_threads()


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

cdef inline void _chan_merge(double* n, double* mean, double* m2,
                             double nb, double mb, double m2b) noexcept nogil:
    """Merge (nb, mb, m2b) into the running (n, mean, m2) (Chan et al.'s pairwise update)."""
    cdef double na = n[0]
    cdef double tot = na + nb
    cdef double delta
    if nb == 0:
        return
    if na == 0:                # a plain copy: delta**2 * 0 would be NaN for |mean| > 1e154
        n[0] = nb
        mean[0] = mb
        m2[0] = m2b
        return
    delta = mb - mean[0]
    mean[0] = mean[0] + delta * (nb / tot)
    m2[0] = m2[0] + m2b + delta * delta * (na * (nb / tot))
    n[0] = tot


cdef inline void _chan_merge_all(double* mean, double* m2, const double* mb,
                                 const double* m2b, Py_ssize_t width, double na,
                                 double nb) noexcept nogil:
    """_chan_merge of (nb, mb[c], m2b[c]) into the running (na, mean[c], m2[c]) for the
    width channels c of a set of rows: the counts, and so the weights, are the same for
    every channel, and the loop along the channels vectorizes."""
    cdef Py_ssize_t c
    cdef double wb, wn, delta
    if na == 0:                # a plain copy (see _chan_merge)
        for c in range(width):
            mean[c] = mb[c]
            m2[c] = m2b[c]
        return
    wb = nb / (na + nb)
    wn = na * wb
    for c in range(width):
        delta = mb[c] - mean[c]
        mean[c] = mean[c] + delta * wb
        m2[c] = m2[c] + m2b[c] + delta * delta * wn


# Accumulator lanes of the block reductions. Kept in a module variable (always LANES) rather
# than the compile-time constant: with a constant the compiler unrolls the lane loop and then
# vectorizes across blocks with shuffles; with a run-time count it vectorizes the lane loop
# itself, contiguously. Results depend on the lane count only, which is fixed.
cdef Py_ssize_t _lanes = LANES


cdef inline double _lane_sum(const double* a, Py_ssize_t lanes) noexcept nogil:
    """Sum of the accumulators a[0:lanes] in a fixed order: pairwise for 16 lanes (four
    dependent additions deep), eight interleaved partial sums otherwise."""
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0
    cdef Py_ssize_t j = 0
    if lanes == 16:
        return ((((a[0] + a[8]) + (a[4] + a[12])) + ((a[2] + a[10]) + (a[6] + a[14])))
                + (((a[1] + a[9]) + (a[5] + a[13])) + ((a[3] + a[11]) + (a[7] + a[15]))))
    # eight interleaved partial sums: the additions overlap instead of forming one chain
    while j + 8 <= lanes:
        s0 = s0 + a[j]
        s1 = s1 + a[j + 1]
        s2 = s2 + a[j + 2]
        s3 = s3 + a[j + 3]
        s4 = s4 + a[j + 4]
        s5 = s5 + a[j + 5]
        s6 = s6 + a[j + 6]
        s7 = s7 + a[j + 7]
        j = j + 8
    while j < lanes:
        s0 = s0 + a[j]
        j = j + 1
    return ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))


cdef inline bint _long_runs(Piece pc) noexcept nogil:
    """Whether a block is summed run by run, each run in LANES lanes: one run, or fewer than
    four runs of at least LANES values. One lane per position (the other way) pays off when
    four runs share each update of a lane; with one to three runs every value would load
    and store its lane, and the block would end summing as many lanes as a run is long."""
    return pc.nrun == 1 or (pc.nrun < 4 and pc.length >= LANES)


cdef inline Py_ssize_t _block_lanes(Piece pc) noexcept nogil:
    """Accumulator lanes for a block: LANES across long runs, or one lane per position of a
    run when the block is four or more short runs (the runs are then summed like the rows
    of a matrix, which vectorizes along the run however short it is)."""
    if not _long_runs(pc) and pc.length >= 4:
        return pc.length
    return _lanes


cdef inline double _cancel_limit(const floating* p) noexcept nogil:
    """Largest accepted s2 / m2 of a shifted one-pass block (see _block_stats): the one-pass
    m2 keeps a relative error below about 40 * limit * 2**-53, 5e-12 for float32 data (far
    under its precision) and 1e-13 for float64."""
    if floating is float:
        return 1024.0
    else:
        return 16.0


cdef inline Py_ssize_t _block_steps(Piece pc, Py_ssize_t lanes, Py_ssize_t* step) noexcept nogil:
    """A block as a number of steps of `lanes` consecutive values, step[0] apart: the
    lane-sized pieces of each long run (the count is per run), or the runs themselves when
    each run is one group of lanes. Runs shorter than 4 values have no steps (they are
    summed one value at a time)."""
    if _long_runs(pc):
        step[0] = lanes
        return pc.length // lanes
    step[0] = pc.stride
    return pc.nrun if lanes == pc.length else 0


cdef inline Py_ssize_t _stepped(Piece pc, Py_ssize_t lanes, Py_ssize_t nstep) noexcept nogil:
    """Values of each run covered by the steps; the rest of each run is summed one by one."""
    if _long_runs(pc):
        return nstep * lanes
    return pc.length if nstep > 0 else 0


cdef inline void _devs_quad(const floating* q, Py_ssize_t step, Py_ssize_t lanes, double bm,
                            double* acc, double* sq) noexcept nogil:
    """Four steps at q, q + step, ... into the lanes: acc += sum of d, sq += sum of d^2 over
    the four, d = x - bm. Each lane is read and written once for four values."""
    cdef Py_ssize_t j
    cdef double d0, d1, d2, d3
    for j in range(lanes):
        d0 = q[j] - bm
        d1 = q[j + step] - bm
        d2 = q[j + 2 * step] - bm
        d3 = q[j + 3 * step] - bm
        acc[j] = acc[j] + ((d0 + d1) + (d2 + d3))
        sq[j] = sq[j] + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))


cdef inline void _devs_one(const floating* q, Py_ssize_t lanes, double bm, double* acc,
                           double* sq) noexcept nogil:
    cdef Py_ssize_t j
    cdef double d
    for j in range(lanes):
        d = q[j] - bm
        acc[j] = acc[j] + d
        sq[j] = sq[j] + d * d


cdef inline void _devs_run(const floating* q, Py_ssize_t nrun, Py_ssize_t stride,
                           Py_ssize_t nstep, double bm, double* acc, double* sq) noexcept nogil:
    """nstep steps of LANES values of each of nrun runs (stride apart) into acc[0:LANES],
    sq[0:LANES] (as _devs_one on each step, run after run). The sums are kept in local
    arrays of constant size, which the compiler holds in vector registers throughout."""
    cdef double a[LANES]
    cdef double s[LANES]
    cdef double d
    cdef Py_ssize_t i, j, k
    cdef const floating* r
    for j in range(LANES):
        a[j] = 0
        s[j] = 0
    for k in range(nrun):
        r = q + k * stride
        for i in range(nstep):
            for j in range(LANES):
                d = r[i * LANES + j] - bm
                a[j] = a[j] + d
                s[j] = s[j] + d * d
    for j in range(LANES):
        acc[j] = a[j]
        sq[j] = s[j]


cdef inline void _block_devs(const floating* p, Piece pc, double bm, double* s1,
                             double* s2) noexcept nogil:
    """s1 = sum(x - bm) and s2 = sum((x - bm)^2) over one block, one pass, in double lanes
    that the compiler vectorizes without reassociating any lane's sum."""
    cdef double acc[BLOCK]
    cdef double sq[BLOCK]
    cdef double t1 = 0, t2 = 0, d
    cdef Py_ssize_t lanes = _block_lanes(pc)
    cdef Py_ssize_t step, nstep = _block_steps(pc, lanes, &step)
    cdef bint long_runs = _long_runs(pc)
    cdef Py_ssize_t nquad = 0 if long_runs else nstep // 4
    cdef Py_ssize_t i, j, k
    cdef const floating* run
    if REGISTER_LANES and long_runs:
        _devs_run(p, pc.nrun, pc.stride, nstep, bm, acc, sq)
    else:
        for j in range(lanes):
            acc[j] = 0
            sq[j] = 0
        if long_runs:
            for k in range(pc.nrun):
                for i in range(nstep):
                    _devs_one(p + k * pc.stride + i * step, lanes, bm, acc, sq)
        else:
            for i in range(nquad):
                _devs_quad(p + 4 * i * step, step, lanes, bm, acc, sq)
            for i in range(4 * nquad, nstep):
                _devs_one(p + i * step, lanes, bm, acc, sq)
    for k in range(pc.nrun):
        run = p + k * pc.stride
        for i in range(_stepped(pc, lanes, nstep), pc.length):
            d = run[i] - bm
            t1 = t1 + d
            t2 = t2 + d * d
    s1[0] = t1 + _lane_sum(acc, lanes)
    s2[0] = t2 + _lane_sum(sq, lanes)


cdef inline void _block_stats(const floating* p, Piece pc, double* mean,
                              double* m2) noexcept nogil:
    """Mean and centred sum of squares of one block (pc.nrun runs of pc.length values,
    pc.stride apart; at most BLOCK values).

    One pass sums d = x - K and d*d about the block's first value K (_block_devs):
    m2 = sum(d^2) - sum(d)^2/L. The subtraction loses the digits of
    sum(d^2) / m2 = 1 + L (K - mean)^2 / m2, and since K is one of the block's values,
    (K - mean)^2 <= m2: at most log2(L + 1) bits of double's 53, whatever the size of the
    mean. A block whose ratio exceeds _cancel_limit (float64 data, which keeps more digits,
    with an outlier first value), or whose sums are not finite, is summed again about the
    mean of the first pass while it sits in L1; the ratio is then close to 1.
    The choice depends on the data only, so results stay the same for any thread count.
    """
    cdef double s1, s2, v
    cdef double count = <double>(pc.length * pc.nrun)
    cdef double bm = p[0]
    _block_devs(p, pc, bm, &s1, &s2)
    v = s2 - s1 * (s1 / count)
    if not (v * _cancel_limit(p) >= s2):     # also when a sum is NaN or infinite
        bm = bm + s1 / count
        _block_devs(p, pc, bm, &s1, &s2)
        v = s2 - s1 * (s1 / count)
    mean[0] = bm + s1 / count
    if v < 0:                  # rounding only; a NaN must stay NaN
        v = 0.0
    m2[0] = v


cdef inline void _sums_quad(const floating* g, const floating* x, Py_ssize_t step,
                            Py_ssize_t lanes, double mean, double* acc,
                            double* dt) noexcept nogil:
    """Four steps into the lanes: acc += sum of g, dt += sum of g * (x - mean)."""
    cdef Py_ssize_t j
    for j in range(lanes):
        # in double: two floats would be added in float
        acc[j] = acc[j] + ((<double>g[j] + g[j + step])
                           + (<double>g[j + 2 * step] + g[j + 3 * step]))
        dt[j] = dt[j] + ((g[j] * (x[j] - mean) + g[j + step] * (x[j + step] - mean))
                         + (g[j + 2 * step] * (x[j + 2 * step] - mean)
                            + g[j + 3 * step] * (x[j + 3 * step] - mean)))


cdef inline void _sums_one(const floating* g, const floating* x, Py_ssize_t lanes,
                           double mean, double* acc, double* dt) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(lanes):
        acc[j] = acc[j] + g[j]
        dt[j] = dt[j] + g[j] * (x[j] - mean)


cdef inline void _sums_run(const floating* g, const floating* x, Py_ssize_t nrun,
                           Py_ssize_t stride, Py_ssize_t nstep, double mean, double* acc,
                           double* dt) noexcept nogil:
    """nstep steps of LANES values of each of nrun runs into acc[0:LANES], dt[0:LANES] (as
    _sums_one on each step, run after run), in register-held local sums as in _devs_run."""
    cdef double a[LANES]
    cdef double t[LANES]
    cdef Py_ssize_t i, j, k
    cdef const floating* gr
    cdef const floating* xr
    for j in range(LANES):
        a[j] = 0
        t[j] = 0
    for k in range(nrun):
        gr = g + k * stride
        xr = x + k * stride
        for i in range(nstep):
            for j in range(LANES):
                a[j] = a[j] + gr[i * LANES + j]
                t[j] = t[j] + gr[i * LANES + j] * (xr[i * LANES + j] - mean)
    for j in range(LANES):
        acc[j] = a[j]
        dt[j] = t[j]


cdef inline void _block_sums(const floating* g, const floating* x, Piece pc, double mean,
                             double* sum_g, double* dot) noexcept nogil:
    """Add sum(g) and sum(g * (x - mean)) over one block to sum_g, dot, in one pass,
    accumulated in double (lanes and steps as in _block_devs)."""
    cdef double acc[BLOCK]
    cdef double dt[BLOCK]
    cdef double s = 0, t = 0
    cdef Py_ssize_t lanes = _block_lanes(pc)
    cdef Py_ssize_t step, nstep = _block_steps(pc, lanes, &step)
    cdef bint long_runs = _long_runs(pc)
    cdef Py_ssize_t nquad = 0 if long_runs else nstep // 4
    cdef Py_ssize_t i, j, k, off
    cdef const floating* gr
    cdef const floating* xr
    if REGISTER_LANES and long_runs:
        _sums_run(g, x, pc.nrun, pc.stride, nstep, mean, acc, dt)
    else:
        for j in range(lanes):
            acc[j] = 0
            dt[j] = 0
        if long_runs:
            for k in range(pc.nrun):
                for i in range(nstep):
                    off = k * pc.stride + i * step
                    _sums_one(g + off, x + off, lanes, mean, acc, dt)
        else:
            for i in range(nquad):
                _sums_quad(g + 4 * i * step, x + 4 * i * step, step, lanes, mean, acc, dt)
            for i in range(4 * nquad, nstep):
                _sums_one(g + i * step, x + i * step, lanes, mean, acc, dt)
    for k in range(pc.nrun):
        gr = g + k * pc.stride
        xr = x + k * pc.stride
        for i in range(_stepped(pc, lanes, nstep), pc.length):
            s = s + gr[i]
            t = t + gr[i] * (xr[i] - mean)
    sum_g[0] = sum_g[0] + (s + _lane_sum(acc, lanes))
    dot[0] = dot[0] + (t + _lane_sum(dt, lanes))


cdef inline void _affine(const floating* x, floating* y, Py_ssize_t length,
                         double mean, double scale, double shift) noexcept nogil:
    """y = (x - mean) * scale + shift, (x - mean) in double."""
    cdef Py_ssize_t i
    for i in range(length):
        y[i] = <floating>((x[i] - mean) * scale + shift)


cdef inline void _dx_run(const floating* g, const floating* x, floating* dx, Py_ssize_t length,
                         double mean, double a, double kx, double k0,
                         int training) noexcept nogil:
    """dx = g * a + (x - mean) * kx + k0 in training (two multiply-adds per value);
    dx = g * a with fixed statistics (x is not read then: a NaN in x must not reach dx)."""
    cdef Py_ssize_t i
    if training:
        for i in range(length):
            dx[i] = <floating>(g[i] * a + ((x[i] - mean) * kx + k0))
    else:
        for i in range(length):
            dx[i] = <floating>(g[i] * a)


cdef struct Coef:
    # inputs (weight, bias: NULL means 1 and 0)
    const double* weight
    const double* bias
    double eps
    # Batch Renormalization (renorm != 0): r and d from the running mean/std before the update
    int renorm
    const double* run_mean
    const double* run_std
    double rmin
    double rmax
    double dmax
    # outputs, length C
    double* mean
    double* var
    double* invstd
    double* scale
    double* shift
    double* r
    double* d


cdef inline double _clip(double v, double lo, double hi) noexcept nogil:
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


cdef void _set_coefs(Coef* cf, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """invstd and the scale/shift of the normalization of channels [c0, c1), from their
    statistics in cf.mean and cf.var, in loops along the channels (vectorized when the
    rows kernels pass many channels at once)."""
    cdef Py_ssize_t c
    cdef double w, b, r, d
    for c in range(c0, c1):
        cf.invstd[c] = 1.0 / sqrt(cf.var[c] + cf.eps)
    for c in range(c0, c1):
        w = cf.weight[c] if cf.weight != NULL else 1.0
        b = cf.bias[c] if cf.bias != NULL else 0.0
        if cf.renorm:
            # y = w * ((x - mean) * invstd * r + d) + b, r and d from the pre-update running
            # stats
            r = _clip(sqrt(cf.var[c] + cf.eps) / cf.run_std[c], cf.rmin, cf.rmax)
            d = _clip((cf.mean[c] - cf.run_mean[c]) / cf.run_std[c], -cf.dmax, cf.dmax)
            cf.r[c] = r
            cf.d[c] = d
            cf.scale[c] = w * r * cf.invstd[c]
            cf.shift[c] = w * d + b
        else:
            cf.scale[c] = w * cf.invstd[c]
            cf.shift[c] = b


# ---------------------------------------------------------------------------------------------
# Planar (N, C, S): chunking of one channel
# ---------------------------------------------------------------------------------------------
# A channel is N runs of S values (one per sample), C*S values apart. A block is either a
# part of one long run (S > BLOCK: each run is cut into `pieces` parts of nearly equal
# length) or `runs` consecutive short runs (S <= BLOCK: up to BLOCK values in all, and at
# most FAR_RUNS runs for inputs that do not stay in cache), so every block holds at most
# BLOCK values and costs one merge. The channel's `nblock` blocks are grouped into `nchunk`
# consecutive chunks. All of it depends on the shape and dtype only.

cdef struct Planar:
    Py_ssize_t N
    Py_ssize_t C
    Py_ssize_t S
    Py_ssize_t pieces       # blocks per run (long runs)
    Py_ssize_t runs         # runs per block (short runs)
    Py_ssize_t nblock
    Py_ssize_t nchunk


cdef Planar _planar(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t reads) noexcept:
    """The blocks and chunks of an (N, C, S) input whose reduction pass reads `reads` bytes
    (x, or g and x; 0 for inference, which has no reduction)."""
    cdef Planar p
    p.N = N
    p.C = C
    p.S = S
    if S > BLOCK:
        p.pieces = (S + BLOCK - 1) // BLOCK
        p.runs = 1
        p.nblock = N * p.pieces
    else:
        p.pieces = 1
        p.runs = BLOCK // S if S > 0 else 1
        if reads > CACHED_BYTES and p.runs > FAR_RUNS:
            p.runs = FAR_RUNS
        if p.runs > N:
            p.runs = N if N > 0 else 1
        p.nblock = (N + p.runs - 1) // p.runs
    p.nchunk = p.nblock if p.nblock < MAX_CHUNKS else MAX_CHUNKS
    if p.nchunk < 1:
        p.nchunk = 1
    return p


cdef struct Piece:
    Py_ssize_t offset       # of the first value
    Py_ssize_t length       # values per run
    Py_ssize_t nrun         # runs
    Py_ssize_t stride       # between runs (C * S)


cdef inline Piece _piece(const Planar* p, Py_ssize_t c, Py_ssize_t b) noexcept nogil:
    """Block b of channel c."""
    cdef Piece r
    cdef Py_ssize_t n, q, lo, hi
    r.stride = p.C * p.S
    if p.pieces == 1:
        n = b * p.runs
        r.offset = (n * p.C + c) * p.S
        r.length = p.S
        r.nrun = p.runs if n + p.runs <= p.N else p.N - n
        return r
    n = b // p.pieces
    q = b - n * p.pieces
    lo = (p.S * q) // p.pieces
    hi = (p.S * (q + 1)) // p.pieces
    r.offset = (n * p.C + c) * p.S + lo
    r.length = hi - lo
    r.nrun = 1
    return r


cdef inline Py_ssize_t _chunk_lo(const Planar* p, Py_ssize_t k) noexcept nogil:
    return (p.nblock * k) // p.nchunk


cdef inline void _planar_chunk_stats(const Planar* p, const floating* x, Py_ssize_t c0,
                                     Py_ssize_t c1, Py_ssize_t k, double* part) noexcept nogil:
    """(count, mean, m2) of chunk k of each channel in [c0, c1), into part[3 * (c*nchunk + k)].

    Blocks are visited block-major, channel-minor: for small planes the runs of
    neighbouring channels are adjacent in memory, so the group streams through DRAM.
    Each channel still sees its own blocks in the same order, whatever the group.
    """
    cdef Py_ssize_t b, c
    cdef Piece pc
    cdef double bmean, bm2
    cdef double* q
    for c in range(c0, c1):
        q = part + 3 * (c * p.nchunk + k)
        q[0] = 0
        q[1] = 0
        q[2] = 0
    for b in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            pc = _piece(p, c, b)
            if pc.length > 0:
                q = part + 3 * (c * p.nchunk + k)
                _block_stats(x + pc.offset, pc, &bmean, &bm2)
                _chan_merge(&q[0], &q[1], &q[2], <double>(pc.length * pc.nrun), bmean, bm2)


cdef inline void _planar_chunk_affine(const Planar* p, const floating* x, floating* y,
                                      Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t k,
                                      const Coef* cf) noexcept nogil:
    cdef Py_ssize_t b, c, r
    cdef Piece pc
    for b in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            pc = _piece(p, c, b)
            for r in range(pc.nrun):
                _affine(x + pc.offset + r * pc.stride, y + pc.offset + r * pc.stride,
                        pc.length, cf.mean[c], cf.scale[c], cf.shift[c])


cdef inline void _merge_stats(const double* part, Py_ssize_t nchunk,
                              double* mean, double* var) noexcept nogil:
    """Merge nchunk (count, mean, m2) triples in order; biased variance."""
    cdef double n = 0, m = 0, m2 = 0
    cdef Py_ssize_t k
    for k in range(nchunk):
        _chan_merge(&n, &m, &m2, part[3 * k], part[3 * k + 1], part[3 * k + 2])
    mean[0] = m
    var[0] = m2 / n if n > 0 else 0.0


cdef inline Py_ssize_t _group_size(Py_ssize_t C, Py_ssize_t N, Py_ssize_t S,
                                   int nthreads) noexcept nogil:
    """Channels per task. Long planes (S > BLOCK) go one channel at a time: each sample's
    plane is already a long contiguous stream, and the channel stays in L2 between its
    statistics and its normalization. Short planes are grouped so that a task reads about
    GROUP_VALUES contiguous values per sample, keeping at least four tasks per thread.
    When the whole input is small enough to stay in the last-level cache, the group is
    also kept within GROUP_CACHED values, so that the second pass (normalization, dx)
    finds it in L2; for larger inputs long DRAM streams matter more (measured: capping
    (32, 512, 28, 28) halves its speed; capping (32, 2048, 7, 7) cuts backward by 25 %).
    Results do not depend on it."""
    cdef Py_ssize_t g, most
    if S > BLOCK:
        return 1
    g = (GROUP_VALUES + S - 1) // S
    if N * C * S <= CACHED_VALUES and g * N * S > GROUP_CACHED:
        g = GROUP_CACHED // (N * S)
    most = (C + 4 * nthreads - 1) // (4 * nthreads)
    if g > most:
        g = most
    return g if g > 0 else 1


# Each prange body below is one call, so that every local is private to its thread.

cdef void _planar_train_group(const Planar* p, const floating* x, floating* y, Coef* cf,
                              double* part, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Statistics of channels [c0, c1), then their normalization while still in cache."""
    cdef Py_ssize_t k, c
    for k in range(p.nchunk):
        _planar_chunk_stats(p, x, c0, c1, k, part)
    for c in range(c0, c1):
        _merge_stats(part + 3 * c * p.nchunk, p.nchunk, &cf.mean[c], &cf.var[c])
    _set_coefs(cf, c0, c1)
    for k in range(p.nchunk):
        _planar_chunk_affine(p, x, y, c0, c1, k, cf)


cdef void _planar_train_coef(const Planar* p, Coef* cf, const double* part,
                             Py_ssize_t c) noexcept nogil:
    _merge_stats(part + 3 * c * p.nchunk, p.nchunk, &cf.mean[c], &cf.var[c])
    _set_coefs(cf, c, c + 1)


cdef void _planar_train(const Planar* p, const floating* x, floating* y, Coef* cf,
                        double* part, int nthreads) noexcept nogil:
    cdef Py_ssize_t g, c, t, ntask = p.C * p.nchunk
    cdef Py_ssize_t gs = _group_size(p.C, p.N, p.S, nthreads)
    cdef Py_ssize_t ngroup = (p.C + gs - 1) // gs
    if nthreads == 1:
        for g in range(ngroup):
            _planar_train_group(p, x, y, cf, part, g * gs,
                                (g + 1) * gs if (g + 1) * gs < p.C else p.C)
    elif p.C >= 4 * nthreads:
        # whole channels per thread, each thread one contiguous range of groups (static):
        # measured against handing out groups one at a time (dynamic), 2 threads, float32:
        # training 0.70-0.91x and backward 0.65-0.95x on (32, 256, 56, 56), (32, 512, 28, 28),
        # (1, 256, 14, 14) and (1, 64, 56, 56), (32, 64, 112, 112) backward 0.90x;
        # (32, 2048, 7, 7) within noise (0.76-1.10x over three runs)
        for g in prange(ngroup, num_threads=nthreads, schedule="static"):
            _planar_train_group(p, x, y, cf, part, g * gs,
                                (g + 1) * gs if (g + 1) * gs < p.C else p.C)
    else:
        # fewer than 4 channels per thread, too few to share evenly (3 channels on 2 threads
        # leave one idle half the time): teams of threads per channel, one chunk per task.
        # Measured at 2 threads, C = 3 to 7: training 0.82-1.00x, backward 0.79-0.97x of
        # whole channels per thread. The partials and their merge are the same either way.
        with parallel(num_threads=nthreads):
            for t in prange(ntask, schedule="static"):
                _planar_chunk_stats(p, x, t // p.nchunk, t // p.nchunk + 1, t % p.nchunk, part)
            _barrier()
            for c in prange(p.C, schedule="static"):
                _planar_train_coef(p, cf, part, c)
            _barrier()
            for t in prange(ntask, schedule="static"):
                _planar_chunk_affine(p, x, y, t // p.nchunk, t // p.nchunk + 1, t % p.nchunk, cf)


cdef void _planar_infer_runs(const Planar* p, const floating* x, floating* y, Py_ssize_t r0,
                             Py_ssize_t r1, const double* mean, const double* scale,
                             const double* shift) noexcept nogil:
    """Inference on runs [r0, r1) of the (N*C) runs, stepping the channel along."""
    cdef Py_ssize_t run, c = r0 % p.C
    for run in range(r0, r1):
        _affine(x + run * p.S, y + run * p.S, p.S, mean[c], scale[c], shift[c])
        c = c + 1
        if c == p.C:
            c = 0


cdef void _planar_infer(const Planar* p, const floating* x, floating* y, const double* mean,
                        const double* scale, const double* shift, int nthreads) noexcept nogil:
    cdef Py_ssize_t t, nrun = p.N * p.C
    cdef Py_ssize_t per = GROUP_VALUES // p.S if p.S < GROUP_VALUES else 1
    cdef Py_ssize_t ntask = (nrun + per - 1) // per
    # tasks of about GROUP_VALUES values, their count rounded up to a multiple of 4 and the
    # runs spread evenly, so that 2 or 4 threads get equal shares
    ntask = (ntask + 3) // 4 * 4
    per = (nrun + ntask - 1) // ntask
    ntask = (nrun + per - 1) // per
    if nthreads == 1:
        _planar_infer_runs(p, x, y, 0, nrun, mean, scale, shift)
    else:
        for t in prange(ntask, num_threads=nthreads, schedule="static"):
            _planar_infer_runs(p, x, y, t * per, (t + 1) * per if (t + 1) * per < nrun else nrun,
                               mean, scale, shift)


cdef struct Grad:
    # inputs, length C (weight: NULL means 1)
    const double* mean
    const double* invstd
    const double* weight
    int training
    double m            # values per channel
    # outputs, length C
    double* dweight
    double* dbias
    double* a           # dx = g * a + (x - mean) * kx + k0
    double* kx
    double* k0


cdef inline void _grad_coef(Grad* gd, Py_ssize_t c, double sum_g, double dot) noexcept nogil:
    """dweight, dbias and the dx constants of channel c from its two sums."""
    cdef double istd = gd.invstd[c]
    gd.dweight[c] = dot * istd
    gd.dbias[c] = sum_g
    cdef double a = istd * gd.weight[c] if gd.weight != NULL else istd
    gd.a[c] = a
    if gd.training:
        # dx = (g - sum_g/m - (x - mean) * dot/m * istd^2) * a
        gd.k0[c] = -(sum_g / gd.m) * a
        gd.kx[c] = -(dot / gd.m * istd * istd) * a
    else:
        gd.k0[c] = 0.0
        gd.kx[c] = 0.0


cdef inline void _planar_chunk_sums(const Planar* p, const floating* g, const floating* x,
                                    Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t k,
                                    const double* mean, double* part) noexcept nogil:
    """sum(g), sum(g * (x - mean)) of chunk k of channels [c0, c1) into part[2*(c*nchunk+k)]."""
    cdef Py_ssize_t b, c
    cdef Piece pc
    cdef double* q
    for c in range(c0, c1):
        q = part + 2 * (c * p.nchunk + k)
        q[0] = 0
        q[1] = 0
    for b in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            pc = _piece(p, c, b)
            q = part + 2 * (c * p.nchunk + k)
            _block_sums(g + pc.offset, x + pc.offset, pc, mean[c], &q[0], &q[1])


cdef inline void _planar_chunk_dx(const Planar* p, const floating* g, const floating* x,
                                  floating* dx, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t k,
                                  const Grad* gd) noexcept nogil:
    cdef Py_ssize_t b, c, r, off
    cdef Piece pc
    for b in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            pc = _piece(p, c, b)
            for r in range(pc.nrun):
                off = pc.offset + r * pc.stride
                _dx_run(g + off, x + off, dx + off, pc.length, gd.mean[c], gd.a[c], gd.kx[c],
                        gd.k0[c], gd.training)


cdef void _planar_grad_coef(const Planar* p, const floating* x, Grad* gd, const double* part,
                            Py_ssize_t c) noexcept nogil:
    cdef double sum_g = 0, dot = 0
    cdef Py_ssize_t k
    for k in range(p.nchunk):
        sum_g = sum_g + part[2 * (c * p.nchunk + k)]
        dot = dot + part[2 * (c * p.nchunk + k) + 1]
    _grad_coef(gd, c, sum_g, dot)


cdef void _planar_backward_group(const Planar* p, const floating* g, const floating* x,
                                 floating* dx, Grad* gd, double* part, Py_ssize_t c0,
                                 Py_ssize_t c1) noexcept nogil:
    """The fused sums of channels [c0, c1), then their dx while dy and x are in cache."""
    cdef Py_ssize_t k, c
    for k in range(p.nchunk):
        _planar_chunk_sums(p, g, x, c0, c1, k, gd.mean, part)
    for c in range(c0, c1):
        _planar_grad_coef(p, x, gd, part, c)
    for k in range(p.nchunk):
        _planar_chunk_dx(p, g, x, dx, c0, c1, k, gd)


cdef void _planar_backward(const Planar* p, const floating* g, const floating* x, floating* dx,
                           Grad* gd, double* part, int nthreads) noexcept nogil:
    cdef Py_ssize_t gi, c, t, ntask = p.C * p.nchunk
    cdef Py_ssize_t gs = _group_size(p.C, p.N, p.S, nthreads)
    cdef Py_ssize_t ngroup = (p.C + gs - 1) // gs
    if nthreads == 1:
        for gi in range(ngroup):
            _planar_backward_group(p, g, x, dx, gd, part, gi * gs,
                                   (gi + 1) * gs if (gi + 1) * gs < p.C else p.C)
    elif p.C >= 4 * nthreads:           # as in _planar_train
        for gi in prange(ngroup, num_threads=nthreads, schedule="static"):
            _planar_backward_group(p, g, x, dx, gd, part, gi * gs,
                                   (gi + 1) * gs if (gi + 1) * gs < p.C else p.C)
    else:
        with parallel(num_threads=nthreads):
            for t in prange(ntask, schedule="static"):
                _planar_chunk_sums(p, g, x, t // p.nchunk, t // p.nchunk + 1, t % p.nchunk,
                                   gd.mean, part)
            _barrier()
            for c in prange(p.C, schedule="static"):
                _planar_grad_coef(p, x, gd, part, c)
            _barrier()
            for t in prange(ntask, schedule="static"):
                _planar_chunk_dx(p, g, x, dx, t // p.nchunk, t // p.nchunk + 1, t % p.nchunk, gd)


# ---------------------------------------------------------------------------------------------
# Rows (R, C): chunks of rows, C-length partials per chunk, merged in chunk order
# ---------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _spread_rows(Py_ssize_t R, Py_ssize_t rpc) noexcept nogil:
    """Rows per chunk for chunks of about rpc rows: the chunk count rounded up to a multiple
    of 4 and the rows spread evenly over the chunks, so that 2 or 4 threads get equal
    shares."""
    cdef Py_ssize_t nchunk = (R + rpc - 1) // rpc
    if nchunk > 1:
        nchunk = (nchunk + 3) // 4 * 4
    return (R + nchunk - 1) // nchunk if nchunk > 0 else rpc


cdef inline Py_ssize_t _rows_per_chunk(Py_ssize_t R, Py_ssize_t C) noexcept nogil:
    """Rows per chunk of the reductions: about ROW_CHUNK_VALUES values and at least
    MIN_CHUNK_ROWS rows (see _spread_rows). Depends on the shape only; an input of at most
    MIN_CHUNK_ROWS rows is one chunk, whose channels the threads split (see _rows_train)."""
    cdef Py_ssize_t rpc = ROW_CHUNK_VALUES // C if C > 0 else ROW_CHUNK_VALUES
    if rpc < MIN_CHUNK_ROWS:
        rpc = MIN_CHUNK_ROWS
    return _spread_rows(R, rpc)


cdef inline Py_ssize_t _rows_per_task(Py_ssize_t R, Py_ssize_t C) noexcept nogil:
    """Rows per task of the normalizing passes, which keep no partials: about
    ROW_CHUNK_VALUES values, however few the rows (see _spread_rows)."""
    return _spread_rows(R, ROW_CHUNK_VALUES // C if C < ROW_CHUNK_VALUES else 1)


cdef inline bint _multi_rows(Py_ssize_t C, Py_ssize_t reads) noexcept nogil:
    """Whether a rows kernel updates several rows per sweep over the channels; `reads` is
    the number of bytes a reduction pass reads (x, or g and x), 0 for the normalizing passes.

    One row at a time reads x as a single sequential stream, which the hardware prefetchers
    follow best; several rows per sweep share each load and store of the per-channel
    coefficients or accumulators. That pays once those arrays outgrow L1 (C >= WIDE_ROWS),
    and in the reductions for narrow rows (C < NARROW_ROWS), whose accumulator chains are
    short, or whose data stays in the last-level cache (reads <= CACHED_BYTES), where the
    accumulator stores, not the prefetchers, set the pace. Measured (2 threads, float32,
    NHWC): from DRAM, one row per sweep is 1.1-1.4x faster for C = 128 to 512; from cache,
    four rows per sweep are 1.15-1.25x faster in the statistics and up to 1.2x in the
    backward sums for C = 64 to 768; several rows per sweep are 1.3-1.5x faster for
    C >= 1024 everywhere, and for C = 32 statistics 1.2-1.5x faster.
    The choice depends on the shape only, so results do not depend on the thread count.
    """
    if C >= WIDE_ROWS:
        return True
    return reads > 0 and (C < NARROW_ROWS or reads <= CACHED_BYTES)


cdef void _rows_tile_two_pass(const floating* x, Py_ssize_t C, Py_ssize_t c, Py_ssize_t b0,
                              Py_ssize_t b1, double* mean, double* m2) noexcept nogil:
    """Mean and m2 of channel c over rows [b0, b1) in two passes (the fallback of
    _rows_chunk_stats for a tile whose one-pass sums would cancel)."""
    cdef Py_ssize_t r
    cdef double s = 0, s1 = 0, s2 = 0, bm, d
    cdef double nb = <double>(b1 - b0)
    for r in range(b0, b1):
        s = s + x[r * C + c]
    bm = s / nb
    for r in range(b0, b1):
        d = x[r * C + c] - bm
        s1 = s1 + d
        s2 = s2 + d * d
    mean[0] = bm + s1 / nb
    s2 = s2 - s1 * (s1 / nb)
    if s2 < 0:                 # rounding only; a NaN must stay NaN
        s2 = 0.0
    m2[0] = s2


cdef void _rows_chunk_stats(const floating* x, Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,
                            Py_ssize_t r0, Py_ssize_t r1, double* cmean, double* cm2,
                            bint wide) noexcept nogil:
    """Mean and m2 of channels [c0, c1) (of C) over rows [r0, r1), into cmean[c], cm2[c],
    tile by tile: the TILE_ROWS rows of a tile are read once in memory order, summing
    d = x - K and d*d in double about the tile's first row K (as _block_stats does; a
    channel whose sums would cancel is redone in two passes), and each tile is merged into
    cmean/cm2 in row order. Each channel's arithmetic is the same whatever [c0, c1)."""
    cdef Py_ssize_t width = c1 - c0
    cdef double* work = <double*>malloc(3 * width * sizeof(double))
    cdef double* K = work
    cdef double* s1 = work + width
    cdef double* s2 = work + 2 * width
    cdef double d, d1, d2, d3, k
    cdef Py_ssize_t c, r, b0, b1, ib
    cdef Py_ssize_t nrb = (r1 - r0 + TILE_ROWS - 1) // TILE_ROWS
    cdef double nb, n = 0, t1
    cdef double limit = _cancel_limit(x)
    cdef const floating* row
    if work == NULL:           # out of memory: NaN statistics rather than a crash
        for c in range(c0, c1):
            cmean[c] = NAN
            cm2[c] = NAN
        return
    x = x + c0                 # channel c0 + c of row r is x[r * C + c] from here on
    cmean = cmean + c0
    cm2 = cm2 + c0
    for ib in range(nrb):
        b0 = r0 + ib * TILE_ROWS
        b1 = b0 + TILE_ROWS if b0 + TILE_ROWS < r1 else r1
        nb = <double>(b1 - b0)
        row = x + b0 * C
        for c in range(width):
            K[c] = row[c]
            s1[c] = 0
            s2[c] = 0
        r = b0
        while wide and r + 4 <= b1:        # four rows per sweep
            row = x + r * C
            for c in range(width):
                k = K[c]
                d = row[c] - k
                d1 = row[C + c] - k
                d2 = row[2 * C + c] - k
                d3 = row[3 * C + c] - k
                s1[c] = s1[c] + ((d + d1) + (d2 + d3))
                s2[c] = s2[c] + ((d * d + d1 * d1) + (d2 * d2 + d3 * d3))
            r = r + 4
        while r < b1:
            row = x + r * C
            for c in range(width):
                d = row[c] - K[c]
                s1[c] = s1[c] + d
                s2[c] = s2[c] + d * d
            r = r + 1
        # the tile's mean into s1 and m2 into K, in straight loops the compiler vectorizes;
        # then the rare channels whose one-pass sums cancelled, in two passes
        for c in range(width):
            t1 = s1[c]
            s1[c] = K[c] + t1 / nb
            K[c] = s2[c] - t1 * (t1 / nb)
        for c in range(width):
            if not (K[c] * limit >= s2[c]):
                _rows_tile_two_pass(x, C, c, b0, b1, &s1[c], &K[c])
        _chan_merge_all(cmean, cm2, s1, K, width, n, nb)
        n = n + nb
    free(work)


cdef void _rows_train_coefs(Coef* cf, const double* part, Py_ssize_t R, Py_ssize_t C,
                            Py_ssize_t rpc, Py_ssize_t nchunk, Py_ssize_t c0,
                            Py_ssize_t c1) noexcept nogil:
    """Merge the chunk partials of channels [c0, c1) in chunk order (as _chan_merge), then
    their coefficients. A chunk holds the same rows for every channel, so the merge runs
    along the channels (_chan_merge_all)."""
    cdef double n = 0, nb
    cdef Py_ssize_t k, c, r0
    if c1 > C:
        c1 = C
    for k in range(nchunk):
        r0 = k * rpc
        nb = <double>((r0 + rpc if r0 + rpc < R else R) - r0)
        # cf.var holds the running m2 until the coefficients
        _chan_merge_all(cf.mean + c0, cf.var + c0, part + 2 * k * C + c0,
                        part + (2 * k + 1) * C + c0, c1 - c0, n, nb)
        n = n + nb
    for c in range(c0, c1):
        cf.var[c] = cf.var[c] / n
    _set_coefs(cf, c0, c1)


cdef void _rows_affine(const floating* x, floating* y, Py_ssize_t C, Py_ssize_t r0,
                       Py_ssize_t r1, const double* mean, const double* scale,
                       const double* shift) noexcept nogil:
    """y = (x - mean) * scale + shift on rows [r0, r1), in row order so x streams through
    memory; for wide rows, four rows share each load of the per-channel coefficients."""
    cdef Py_ssize_t c, r = r0
    cdef bint wide = _multi_rows(C, 0)
    cdef const floating* x0
    cdef const floating* x1
    cdef const floating* x2
    cdef const floating* x3
    cdef floating* y0
    cdef floating* y1
    cdef floating* y2
    cdef floating* y3
    cdef double m, a, b
    while wide and r + 4 <= r1:
        x0 = x + r * C
        x1 = x0 + C
        x2 = x1 + C
        x3 = x2 + C
        y0 = y + r * C
        y1 = y0 + C
        y2 = y1 + C
        y3 = y2 + C
        for c in range(C):
            m = mean[c]
            a = scale[c]
            b = shift[c]
            y0[c] = <floating>((x0[c] - m) * a + b)
            y1[c] = <floating>((x1[c] - m) * a + b)
            y2[c] = <floating>((x2[c] - m) * a + b)
            y3[c] = <floating>((x3[c] - m) * a + b)
        r = r + 4
    while r < r1:
        x0 = x + r * C
        y0 = y + r * C
        for c in range(C):
            y0[c] = <floating>((x0[c] - mean[c]) * scale[c] + shift[c])
        r = r + 1


cdef inline Py_ssize_t _col_width(Py_ssize_t C, int nthreads) noexcept nogil:
    """Channels per block when the threads of a rows kernel split the channels (all rows
    are one chunk): an equal share rounded up to a multiple of 16, so that two threads never
    write to the same 64-byte line of a row."""
    cdef Py_ssize_t w = (C + nthreads - 1) // nthreads
    return (w + 15) // 16 * 16


cdef void _rows_stats_cols(const floating* x, Py_ssize_t R, Py_ssize_t C, Py_ssize_t c0,
                           Py_ssize_t c1, Coef* cf, double* part, bint wide) noexcept nogil:
    """Statistics and coefficients of channels [c0, c1) over all R rows as one chunk."""
    if c1 > C:
        c1 = C
    _rows_chunk_stats(x, C, c0, c1, 0, R, part, part + C, wide)
    _rows_train_coefs(cf, part, R, C, R, 1, c0, c1)


cdef void _rows_train(const floating* x, floating* y, Py_ssize_t R, Py_ssize_t C, Coef* cf,
                      double* part, int nthreads) noexcept nogil:
    cdef Py_ssize_t rpc = _rows_per_chunk(R, C)
    cdef Py_ssize_t nchunk = (R + rpc - 1) // rpc
    cdef Py_ssize_t cw = _col_width(C, nthreads)
    cdef Py_ssize_t rpt = _rows_per_task(R, C)
    cdef Py_ssize_t k
    cdef bint wide = _multi_rows(C, R * C * <Py_ssize_t>sizeof(floating))
    if nthreads == 1:
        for k in range(nchunk):
            _rows_chunk_stats(x, C, 0, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R,
                              part + 2 * k * C, part + (2 * k + 1) * C, wide)
        _rows_train_coefs(cf, part, R, C, rpc, nchunk, 0, C)
        for k in range(nchunk):
            _rows_affine(x, y, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R,
                         cf.mean, cf.scale, cf.shift)
    elif nchunk == 1:
        # few rows of many channels (R <= MIN_CHUNK_ROWS): the threads split the channels
        # for the statistics (each channel's arithmetic is that of the one-thread call),
        # then the rows for the normalization (whole rows stream best)
        with parallel(num_threads=nthreads):
            for k in prange((C + cw - 1) // cw, schedule="static"):
                _rows_stats_cols(x, R, C, k * cw, (k + 1) * cw, cf, part, wide)
            _barrier()
            for k in prange((R + rpt - 1) // rpt, schedule="static"):
                _rows_affine(x, y, C, k * rpt, (k + 1) * rpt if (k + 1) * rpt < R else R,
                             cf.mean, cf.scale, cf.shift)
    else:
        with parallel(num_threads=nthreads):
            for k in prange(nchunk, schedule="static"):
                _rows_chunk_stats(x, C, 0, C, k * rpc,
                                  (k + 1) * rpc if (k + 1) * rpc < R else R,
                                  part + 2 * k * C, part + (2 * k + 1) * C, wide)
            _barrier()
            for k in prange((C + cw - 1) // cw, schedule="static"):
                _rows_train_coefs(cf, part, R, C, rpc, nchunk, k * cw, (k + 1) * cw)
            _barrier()
            for k in prange(nchunk, schedule="static"):
                _rows_affine(x, y, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R,
                             cf.mean, cf.scale, cf.shift)


cdef void _rows_infer(const floating* x, floating* y, Py_ssize_t R, Py_ssize_t C,
                      const double* mean, const double* scale, const double* shift,
                      int nthreads) noexcept nogil:
    cdef Py_ssize_t rpc = _rows_per_task(R, C)
    cdef Py_ssize_t nchunk = (R + rpc - 1) // rpc
    cdef Py_ssize_t k
    if nthreads == 1:
        for k in range(nchunk):
            _rows_affine(x, y, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R,
                         mean, scale, shift)
        return
    for k in prange(nchunk, num_threads=nthreads, schedule="static"):
        _rows_affine(x, y, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R,
                     mean, scale, shift)


cdef void _rows_chunk_sums(const floating* g, const floating* x, Py_ssize_t C, Py_ssize_t c0,
                           Py_ssize_t c1, Py_ssize_t r0, Py_ssize_t r1, const double* mean,
                           double* sg, double* sd, bint wide) noexcept nogil:
    """sum(g) and sum(g * (x - mean)) of channels [c0, c1) (of C) over rows [r0, r1), into
    sg[c], sd[c]: one pass in memory order, accumulated in double."""
    cdef Py_ssize_t c, r
    cdef Py_ssize_t width = c1 - c0
    cdef const floating* xr
    cdef const floating* gr
    g = g + c0
    x = x + c0
    mean = mean + c0
    sg = sg + c0
    sd = sd + c0
    for c in range(width):
        sg[c] = 0
        sd[c] = 0
    cdef Py_ssize_t r4 = r0 + (r1 - r0) // 4 * 4 if wide else r0
    cdef double m
    for r in range(r0, r4, 4):     # four rows per sweep (see _rows_chunk_stats)
        xr = x + r * C
        gr = g + r * C
        for c in range(width):
            m = mean[c]
            sg[c] = sg[c] + ((<double>gr[c] + gr[C + c]) + (<double>gr[2 * C + c] + gr[3 * C + c]))
            sd[c] = sd[c] + ((gr[c] * (xr[c] - m) + gr[C + c] * (xr[C + c] - m))
                             + (gr[2 * C + c] * (xr[2 * C + c] - m)
                                + gr[3 * C + c] * (xr[3 * C + c] - m)))
    for r in range(r4, r1):
        xr = x + r * C
        gr = g + r * C
        for c in range(width):
            sg[c] = sg[c] + gr[c]
            sd[c] = sd[c] + gr[c] * (xr[c] - mean[c])


cdef void _rows_grad_coefs(Grad* gd, const double* part, Py_ssize_t C, Py_ssize_t nchunk,
                           Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Add up the chunk sums of channels [c0, c1) in chunk order, in loops along the
    channels, then their dweight, dbias and dx constants (_grad_coef)."""
    cdef double* sum_g = gd.dbias        # the running sums until _grad_coef
    cdef double* dot = gd.dweight
    cdef const double* ps
    cdef const double* pd
    cdef Py_ssize_t k, c
    if c1 > C:
        c1 = C
    for c in range(c0, c1):
        sum_g[c] = 0
        dot[c] = 0
    for k in range(nchunk):
        ps = part + 2 * k * C
        pd = part + (2 * k + 1) * C
        for c in range(c0, c1):
            sum_g[c] = sum_g[c] + ps[c]
            dot[c] = dot[c] + pd[c]
    for c in range(c0, c1):
        _grad_coef(gd, c, sum_g[c], dot[c])


cdef void _rows_dx(const floating* g, const floating* x, floating* dx, Py_ssize_t C,
                   Py_ssize_t r0, Py_ssize_t r1, const Grad* gd) noexcept nogil:
    """dx on rows [r0, r1), in row order; for wide rows, two rows share each coefficient
    load."""
    cdef Py_ssize_t c, r = r0
    cdef const double* mean = gd.mean
    cdef const double* a = gd.a
    cdef const double* kx = gd.kx
    cdef const double* k0 = gd.k0
    cdef const floating* g0
    cdef const floating* g1
    cdef const floating* x0
    cdef const floating* x1
    cdef floating* d0
    cdef floating* d1
    cdef double m, aa, kkx, kk0
    if not gd.training:        # fixed statistics: dx = g * a, x is not read
        for r in range(r0, r1):
            g0 = g + r * C
            d0 = dx + r * C
            for c in range(C):
                d0[c] = <floating>(g0[c] * a[c])
        return
    while r + 2 <= r1 and _multi_rows(C, 0):
        g0 = g + r * C
        g1 = g0 + C
        x0 = x + r * C
        x1 = x0 + C
        d0 = dx + r * C
        d1 = d0 + C
        for c in range(C):
            m = mean[c]
            aa = a[c]
            kkx = kx[c]
            kk0 = k0[c]
            d0[c] = <floating>(g0[c] * aa + ((x0[c] - m) * kkx + kk0))
            d1[c] = <floating>(g1[c] * aa + ((x1[c] - m) * kkx + kk0))
        r = r + 2
    while r < r1:
        g0 = g + r * C
        x0 = x + r * C
        d0 = dx + r * C
        for c in range(C):
            d0[c] = <floating>(g0[c] * a[c] + ((x0[c] - mean[c]) * kx[c] + k0[c]))
        r = r + 1


cdef void _rows_sums_cols(const floating* g, const floating* x, Py_ssize_t R, Py_ssize_t C,
                          Py_ssize_t c0, Py_ssize_t c1, Grad* gd, double* part,
                          bint wide) noexcept nogil:
    """The two sums and the gradient coefficients of channels [c0, c1) over all R rows as
    one chunk."""
    if c1 > C:
        c1 = C
    _rows_chunk_sums(g, x, C, c0, c1, 0, R, gd.mean, part, part + C, wide)
    _rows_grad_coefs(gd, part, C, 1, c0, c1)


cdef void _rows_backward(const floating* g, const floating* x, floating* dx, Py_ssize_t R,
                         Py_ssize_t C, Grad* gd, double* part, int nthreads) noexcept nogil:
    cdef Py_ssize_t rpc = _rows_per_chunk(R, C)
    cdef Py_ssize_t nchunk = (R + rpc - 1) // rpc
    cdef Py_ssize_t cw = _col_width(C, nthreads)
    cdef Py_ssize_t rpt = _rows_per_task(R, C)
    cdef Py_ssize_t k
    cdef bint wide = _multi_rows(C, 2 * R * C * <Py_ssize_t>sizeof(floating))
    if nthreads == 1:
        for k in range(nchunk):
            _rows_chunk_sums(g, x, C, 0, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R,
                             gd.mean, part + 2 * k * C, part + (2 * k + 1) * C, wide)
        _rows_grad_coefs(gd, part, C, nchunk, 0, C)
        for k in range(nchunk):
            _rows_dx(g, x, dx, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R, gd)
    elif nchunk == 1:
        # few rows of many channels: channels split for the sums, rows for dx (as in
        # _rows_train)
        with parallel(num_threads=nthreads):
            for k in prange((C + cw - 1) // cw, schedule="static"):
                _rows_sums_cols(g, x, R, C, k * cw, (k + 1) * cw, gd, part, wide)
            _barrier()
            for k in prange((R + rpt - 1) // rpt, schedule="static"):
                _rows_dx(g, x, dx, C, k * rpt, (k + 1) * rpt if (k + 1) * rpt < R else R,
                         gd)
    else:
        with parallel(num_threads=nthreads):
            for k in prange(nchunk, schedule="static"):
                _rows_chunk_sums(g, x, C, 0, C, k * rpc,
                                 (k + 1) * rpc if (k + 1) * rpc < R else R,
                                 gd.mean, part + 2 * k * C, part + (2 * k + 1) * C, wide)
            _barrier()
            for k in prange((C + cw - 1) // cw, schedule="static"):
                _rows_grad_coefs(gd, part, C, nchunk, k * cw, (k + 1) * cw)
            _barrier()
            for k in prange(nchunk, schedule="static"):
                _rows_dx(g, x, dx, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R,
                         gd)


# ---------------------------------------------------------------------------------------------
# Python entry points, called by fastbn/functional.py with validated, canonical arrays.
# Arrays are taken as raw pointers (no buffer acquisition: small calls stay cheap); each entry
# re-checks what would make a pointer unsafe, so a wrong internal call raises, never crashes.
# ---------------------------------------------------------------------------------------------

cnp.import_array()


cdef Py_ssize_t _partials(int kind, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                          Py_ssize_t reads) noexcept:
    """Doubles of scratch for the per-chunk partial results."""
    cdef Planar p
    cdef Py_ssize_t rpc
    if kind == 0:
        p = _planar(N, C, S, reads)
        return 3 * C * p.nchunk
    rpc = _rows_per_chunk(N, C)
    return 2 * C * ((N + rpc - 1) // rpc)


cdef inline bint _native(cnp.ndarray a):
    """Whether a's elements can be read through a plain C pointer: aligned, native byte
    order."""
    return cnp.PyArray_ISALIGNED(a) and cnp.PyArray_ISNOTSWAPPED(a)


cdef int _data_kind(cnp.ndarray x, cnp.ndarray y, Py_ssize_t size) except -1:
    """0 for float32, 1 for float64; checks x and y are contiguous, same dtype, `size` long."""
    cdef int t = cnp.PyArray_TYPE(x)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise TypeError("kernel data must be float32 or float64")
    if cnp.PyArray_TYPE(y) != t:
        raise TypeError("kernel input and output dtypes differ")
    if not (cnp.PyArray_IS_C_CONTIGUOUS(x) and cnp.PyArray_IS_C_CONTIGUOUS(y)
            and _native(x) and _native(y)):
        raise ValueError("kernel arrays must be C-contiguous, aligned, in native byte order")
    if cnp.PyArray_SIZE(x) != size or cnp.PyArray_SIZE(y) != size:
        raise ValueError("kernel arrays do not match the shape")
    if not cnp.PyArray_ISWRITEABLE(y):
        raise ValueError("kernel output is read-only")
    return 0 if t == cnp.NPY_FLOAT32 else 1


cdef double* _vec(object a, Py_ssize_t n, bint optional=False) except? NULL:
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
    cdef cnp.ndarray arr
    cdef int t
    if type(a) is not cnp.ndarray:
        return False
    arr = <cnp.ndarray>a
    t = cnp.PyArray_TYPE(arr)
    return ((t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and cnp.PyArray_NDIM(arr) == 1
            and cnp.PyArray_DIM(arr, 0) == C and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and _native(arr))


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


cdef const double* _param(object a, Py_ssize_t n, double* scratch,
                          bint optional=False) except? NULL:
    """A per-channel input read as double: a C-contiguous float64 array is read in place, a
    float32 one is converted into scratch (n doubles), so float32 models pay no NumPy
    conversion per call. NULL for None if optional."""
    cdef cnp.ndarray arr
    cdef const float* f
    cdef Py_ssize_t i
    if a is None or cnp.PyArray_TYPE(<cnp.ndarray?>a) != cnp.NPY_FLOAT32:
        return _vec(a, n, optional)
    arr = <cnp.ndarray>a
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not _native(arr) or cnp.PyArray_SIZE(arr) < n:
        raise ValueError("kernel vectors must be C-contiguous, aligned, native, of the "
                         "channel count")
    f = <const float*>cnp.PyArray_DATA(arr)
    for i in range(n):
        scratch[i] = f[i]
    return scratch


cdef void _check_dims(int kind, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                      int nthreads) except *:
    if kind not in (0, 1) or N < 1 or C < 1 or S < 1 or nthreads < 1:
        raise ValueError("bad kernel dimensions")


def train_forward(cnp.ndarray x, cnp.ndarray y, int kind, Py_ssize_t N, Py_ssize_t C,
                  Py_ssize_t S, weight, bias, double eps, cnp.ndarray stats, renorm,
                  int nthreads):
    """Training forward on a canonical view.

    kind 0: x is planar (N, C, S); kind 1: x is rows (N, C) and S is 1. x, y: C-contiguous,
    one float dtype (y may be x). weight, bias: float32 or float64 (C,), or None. stats:
    float64 (5, C),
    receives mean, biased var, invstd, scale, shift. renorm: None, or (running_mean,
    running_std, r_out, d_out, rmin, rmax, dmax) with float64 (C,) arrays, for Batch
    Renormalization (running_mean and running_std may also be float32).
    """
    cdef Coef cf
    cdef Planar p
    cdef int fl
    cdef double* part
    cdef Py_ssize_t npart, reads
    _check_dims(kind, N, C, S, nthreads)
    fl = _data_kind(x, y, N * C * S)
    reads = N * C * S * cnp.PyArray_ITEMSIZE(x)
    npart = _partials(kind, N, C, S, reads)
    p = _planar(N, C, S, reads)
    part = <double*>malloc((npart + 4 * C) * sizeof(double))
    if part == NULL:
        raise MemoryError()
    try:
        cf.weight = _param(weight, C, part + npart, True)
        cf.bias = _param(bias, C, part + npart + C, True)
        cf.eps = eps
        cf.mean = _vec(stats, 5 * C)
        cf.var = cf.mean + C
        cf.invstd = cf.mean + 2 * C
        cf.scale = cf.mean + 3 * C
        cf.shift = cf.mean + 4 * C
        cf.renorm = 0
        if renorm is not None:
            cf.renorm = 1
            cf.run_mean = _param(renorm[0], C, part + npart + 2 * C)
            cf.run_std = _param(renorm[1], C, part + npart + 3 * C)
            cf.r = _vec(renorm[2], C)
            cf.d = _vec(renorm[3], C)
            cf.rmin = renorm[4]
            cf.rmax = renorm[5]
            cf.dmax = renorm[6]
        with nogil:
            if kind == 0 and fl == 0:
                _planar_train(&p, <float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(y),
                              &cf, part, nthreads)
            elif kind == 0:
                _planar_train(&p, <double*>cnp.PyArray_DATA(x), <double*>cnp.PyArray_DATA(y),
                              &cf, part, nthreads)
            elif fl == 0:
                _rows_train(<float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(y), N, C,
                            &cf, part, nthreads)
            else:
                _rows_train(<double*>cnp.PyArray_DATA(x), <double*>cnp.PyArray_DATA(y), N, C,
                            &cf, part, nthreads)
    finally:
        free(part)


def infer_forward(cnp.ndarray x, cnp.ndarray y, int kind, Py_ssize_t N, Py_ssize_t C,
                  Py_ssize_t S, running_mean, running_var, weight, bias, double eps,
                  int nthreads, bint divisor_is_std=False):
    """y = (x - running_mean) * weight / sqrt(running_var + eps) + bias on a canonical view
    (see train_forward); the per-channel vectors are float32 or float64 (C,), weight/bias
    may be None. With divisor_is_std, running_var holds a standard deviation and
    y = (x - running_mean) * weight / running_var + bias (eps is not used)."""
    cdef Planar p
    cdef int fl
    cdef Py_ssize_t c
    cdef const double* rm
    cdef const double* rv
    cdef const double* w
    cdef const double* b
    cdef double* coef
    _check_dims(kind, N, C, S, nthreads)
    fl = _data_kind(x, y, N * C * S)
    p = _planar(N, C, S, 0)
    coef = <double*>malloc(6 * C * sizeof(double))
    if coef == NULL:
        raise MemoryError()
    try:
        rm = _param(running_mean, C, coef + 2 * C)
        rv = _param(running_var, C, coef + 3 * C)
        w = _param(weight, C, coef + 4 * C, True)
        b = _param(bias, C, coef + 5 * C, True)
        with nogil:
            for c in range(C):
                coef[c] = (w[c] if w != NULL else 1.0) / (rv[c] if divisor_is_std
                                                          else sqrt(rv[c] + eps))
                coef[C + c] = b[c] if b != NULL else 0.0
            if kind == 0 and fl == 0:
                _planar_infer(&p, <float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(y),
                              rm, coef, coef + C, nthreads)
            elif kind == 0:
                _planar_infer(&p, <double*>cnp.PyArray_DATA(x), <double*>cnp.PyArray_DATA(y),
                              rm, coef, coef + C, nthreads)
            elif fl == 0:
                _rows_infer(<float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(y), N, C,
                            rm, coef, coef + C, nthreads)
            else:
                _rows_infer(<double*>cnp.PyArray_DATA(x), <double*>cnp.PyArray_DATA(y), N, C,
                            rm, coef, coef + C, nthreads)
    finally:
        free(coef)


def backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, int kind, Py_ssize_t N,
             Py_ssize_t C, Py_ssize_t S, mean, invstd, weight, bint training,
             cnp.ndarray grads, int nthreads):
    """dx (may be g itself), and dweight, dbias into grads ((2, C), C-contiguous float64,
    or float32: computed in double, rounded once) on a canonical view (see train_forward);
    mean, invstd, weight: float32 or float64 (C,), weight may be None."""
    cdef Planar p
    cdef Grad gd
    cdef int fl
    cdef double* part
    cdef float* grads32 = NULL
    cdef Py_ssize_t c, npart, reads
    _check_dims(kind, N, C, S, nthreads)
    fl = _data_kind(x, dx, N * C * S)
    if _data_kind(g, dx, N * C * S) != fl:
        raise TypeError("kernel gradient dtype differs")
    if (cnp.PyArray_TYPE(grads) == cnp.NPY_FLOAT32 and cnp.PyArray_IS_C_CONTIGUOUS(grads)
            and cnp.PyArray_SIZE(grads) >= 2 * C and cnp.PyArray_ISWRITEABLE(grads)):
        grads32 = <float*>cnp.PyArray_DATA(grads)
    gd.training = training
    gd.m = <double>(N * S)
    reads = 2 * N * C * S * cnp.PyArray_ITEMSIZE(x)
    npart = _partials(kind, N, C, S, reads)
    p = _planar(N, C, S, reads)
    part = <double*>malloc((npart + 8 * C) * sizeof(double))
    if part == NULL:
        raise MemoryError()
    gd.a = part + npart
    gd.kx = gd.a + C
    gd.k0 = gd.a + 2 * C
    try:
        gd.dweight = gd.a + 6 * C if grads32 != NULL else _vec(grads, 2 * C)
        gd.dbias = gd.dweight + C
        gd.mean = _param(mean, C, gd.a + 3 * C)
        gd.invstd = _param(invstd, C, gd.a + 4 * C)
        gd.weight = _param(weight, C, gd.a + 5 * C, True)
        with nogil:
            if kind == 0 and fl == 0:
                _planar_backward(&p, <float*>cnp.PyArray_DATA(g), <float*>cnp.PyArray_DATA(x),
                                 <float*>cnp.PyArray_DATA(dx), &gd, part, nthreads)
            elif kind == 0:
                _planar_backward(&p, <double*>cnp.PyArray_DATA(g), <double*>cnp.PyArray_DATA(x),
                                 <double*>cnp.PyArray_DATA(dx), &gd, part, nthreads)
            elif fl == 0:
                _rows_backward(<float*>cnp.PyArray_DATA(g), <float*>cnp.PyArray_DATA(x),
                               <float*>cnp.PyArray_DATA(dx), N, C, &gd, part, nthreads)
            else:
                _rows_backward(<double*>cnp.PyArray_DATA(g), <double*>cnp.PyArray_DATA(x),
                               <double*>cnp.PyArray_DATA(dx), N, C, &gd, part, nthreads)
            if grads32 != NULL:
                for c in range(2 * C):
                    grads32[c] = <float>gd.dweight[c]
    finally:
        free(part)


cdef bint _running_ok(object buf, Py_ssize_t C):
    cdef cnp.ndarray a
    if type(buf) is not cnp.ndarray:
        return False
    a = <cnp.ndarray>buf
    return ((cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 or cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64)
            and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISWRITEABLE(a) and _native(a)
            and cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_SIZE(a) == C)


def running_pair_ok(running_mean, running_var, Py_ssize_t C):
    """True when both running buffers are writable C-contiguous float32/float64 vectors of
    the channel count, aligned and in native byte order, whose bytes do not overlap (the common case, checked at C speed; the
    caller validates anything else in full)."""
    cdef char* a
    cdef char* b
    if not (_running_ok(running_mean, C) and _running_ok(running_var, C)):
        return False
    a = <char*>cnp.PyArray_DATA(<cnp.ndarray>running_mean)
    b = <char*>cnp.PyArray_DATA(<cnp.ndarray>running_var)
    return (a + cnp.PyArray_NBYTES(<cnp.ndarray>running_mean) <= b
            or b + cnp.PyArray_NBYTES(<cnp.ndarray>running_var) <= a)


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


cdef void _nudge(cnp.ndarray buf, const double* batch, double momentum,
                 Py_ssize_t C):
    """buf <- buf + momentum * (batch - buf), in double."""
    cdef Py_ssize_t c
    cdef double m
    cdef float* f
    cdef double* d
    if cnp.PyArray_TYPE(buf) == cnp.NPY_FLOAT32:
        f = <float*>cnp.PyArray_DATA(buf)
        for c in range(C):
            m = f[c]
            f[c] = <float>(m + momentum * (batch[c] - m))
    else:
        d = <double*>cnp.PyArray_DATA(buf)
        for c in range(C):
            m = d[c]
            d[c] = m + momentum * (batch[c] - m)


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
    _nudge(<cnp.ndarray>running_mean, st, momentum, C)
    _nudge(<cnp.ndarray>running_std, sd, momentum, C)


cdef void _blend(cnp.ndarray buf, const double* batch, double scale, double momentum,
                 Py_ssize_t C):
    """buf <- momentum * (batch * scale) + (1 - momentum) * buf, in double."""
    cdef Py_ssize_t c
    cdef float* f
    cdef double* d
    if cnp.PyArray_TYPE(buf) == cnp.NPY_FLOAT32:
        f = <float*>cnp.PyArray_DATA(buf)
        for c in range(C):
            f[c] = <float>(momentum * (batch[c] * scale) + (1.0 - momentum) * <double>f[c])
    else:
        d = <double*>cnp.PyArray_DATA(buf)
        for c in range(C):
            d[c] = momentum * (batch[c] * scale) + (1.0 - momentum) * d[c]


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
    _blend(<cnp.ndarray>running_mean, st, 1.0, momentum, C)
    _blend(<cnp.ndarray>running_var, st + C, unbias, momentum, C)
    return True


# ---------------------------------------------------------------------------------------------
# Memory-bandwidth yardsticks for the speed table: one read pass and one copy pass over an
# array, split over the same threads as the kernels (the "roofline" of training forward).
# ---------------------------------------------------------------------------------------------

cdef double _read_range(const float* x, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef float acc[LANES]
    cdef Py_ssize_t lanes = _lanes
    cdef Py_ssize_t i, j, nfull = (hi - lo) // lanes
    cdef const float* q
    cdef double s = 0
    for j in range(lanes):
        acc[j] = 0
    for i in range(nfull):
        q = x + lo + i * lanes
        for j in range(lanes):
            acc[j] = acc[j] + q[j]
    for i in range(lo + nfull * lanes, hi):
        s = s + x[i]
    for j in range(lanes):
        s = s + acc[j]
    return s


cdef void _copy_range(const float* x, float* y, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(lo, hi):
        y[i] = x[i]


def read_pass(cnp.ndarray x, int nthreads):
    """Sum a C-contiguous float32 array once (memory-bandwidth yardstick); returns the sum."""
    cdef Py_ssize_t n, t, nt = nthreads
    cdef double* part
    cdef double total = 0
    cdef const float* p
    if cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(x):
        raise ValueError("read_pass takes a C-contiguous float32 array")
    if nthreads < 1:
        raise ValueError("nthreads must be >= 1")
    n = cnp.PyArray_SIZE(x)
    p = <const float*>cnp.PyArray_DATA(x)
    part = <double*>malloc(nt * sizeof(double))
    if part == NULL:
        raise MemoryError()
    try:
        with nogil:
            for t in prange(nt, num_threads=nthreads, schedule="static"):
                part[t] = _read_range(p, n * t // nt, n * (t + 1) // nt)
            for t in range(nt):
                total = total + part[t]
    finally:
        free(part)
    return total


def copy_pass(cnp.ndarray x, cnp.ndarray y, int nthreads):
    """Copy a C-contiguous float32 array into another of its size (bandwidth yardstick)."""
    cdef Py_ssize_t n, t, nt = nthreads
    cdef const float* p
    cdef float* q
    if (cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT32 or cnp.PyArray_TYPE(y) != cnp.NPY_FLOAT32
            or not cnp.PyArray_IS_C_CONTIGUOUS(x) or not cnp.PyArray_IS_C_CONTIGUOUS(y)
            or cnp.PyArray_SIZE(x) != cnp.PyArray_SIZE(y) or not cnp.PyArray_ISWRITEABLE(y)):
        raise ValueError("copy_pass takes two C-contiguous float32 arrays of one size")
    if nthreads < 1:
        raise ValueError("nthreads must be >= 1")
    n = cnp.PyArray_SIZE(x)
    p = <const float*>cnp.PyArray_DATA(x)
    q = <float*>cnp.PyArray_DATA(y)
    with nogil:
        for t in prange(nt, num_threads=nthreads, schedule="static"):
            _copy_range(p, q, n * t // nt, n * (t + 1) // nt)
