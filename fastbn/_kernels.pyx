# Batch Normalization kernels: typed, GIL-free, OpenMP-parallel loops.
#
# Every kernel works on one of two canonical C-contiguous views, chosen by fastbn/functional.py:
#   planar (N, C, S): each (n, c) pair is one contiguous run of S values (NCHW memory, S > 1);
#   rows   (R, C):    each row holds one value per channel (NHWC memory, and (N, C)).
# Statistics, scale/shift coefficients and reductions are accumulated in double whatever the
# data type, and (x - mean) is always formed in double, so float32 inputs with a large mean
# keep their low-order digits.
#
# Determinism: the data of a channel is cut into a fixed list of chunks that depends on the
# shape only, never on the thread count. Each chunk's partial result is computed by the same
# code whichever thread runs it, and partials are merged in chunk order. One thread or many,
# the result is bit-identical.
#
# Parallel structure: one OpenMP parallel region per call. Phases that must see every chunk's
# partial (merge, then normalize) are separate `prange` loops inside that region; the implicit
# barrier at the end of each loop orders them.

from cython.parallel cimport parallel, prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

import numpy as np

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
    #ifdef __VERSION__
    #define FASTBN_CC_VERSION __VERSION__
    #else
    #define FASTBN_CC_VERSION "unknown"
    #endif
    """
    const char* FASTBN_CFLAGS
    const char* FASTBN_SIMD
    const char* FASTBN_CC_VERSION

cdef extern from *:
    """
    #ifdef _OPENMP
    static int fastbn_thread_slot(void) { return omp_get_thread_num(); }
    /* orphaned barrier: binds to the enclosing parallel region (Cython's prange inside a
       parallel block is "omp for nowait", so phases are ordered explicitly) */
    static void fastbn_barrier(void) {
        #pragma omp barrier
    }
    #else
    static int fastbn_thread_slot(void) { return 0; }
    static void fastbn_barrier(void) { }
    #endif
    """
    int _thread_slot "fastbn_thread_slot"() noexcept nogil
    void _barrier "fastbn_barrier"() noexcept nogil


ctypedef fused floating:
    float
    double

# Values per statistics block: a block is read twice (sum, then squared deviations) while it
# sits in L1, so DRAM sees it once. 2048 float32 = 8 KiB.
cdef enum:
    LANES = 16
    BLOCK = 2048
    # planar: at most this many chunks per channel (a channel is split among a team of
    # threads only when there are fewer channels than threads).
    MAX_CHUNKS = 16
    # rows: values per chunk of rows (about 256 KiB of float32), and channels per tile.
    ROW_CHUNK_VALUES = 65536
    TILE = 512
    TILE_ROWS = 16


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(FASTBN_OPENMP)


def build_flags():
    """Compiler flags, compiler version and vector instruction set the kernels were built with."""
    return "%s (SIMD: %s; compiler %s)" % (FASTBN_CFLAGS.decode(), FASTBN_SIMD.decode(),
                                          FASTBN_CC_VERSION.decode())


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
    delta = mb - mean[0]
    mean[0] = mean[0] + delta * (nb / tot)
    m2[0] = m2[0] + m2b + delta * delta * (na * (nb / tot))
    n[0] = tot


cdef inline void _block_stats(const floating* p, Py_ssize_t length,
                              double* mean, double* m2) noexcept nogil:
    """Mean and centred sum of squares of p[0:length], two passes over an L1-resident block.

    Pass one gives the block mean; pass two sums d = x - block_mean and d*d, and the
    correction m2 = sum(d^2) - sum(d)^2/L removes what rounding left in the block mean.
    LANES independent accumulators (the inner j loops) let the compiler vectorize without
    reassociating a sum, so the result does not depend on the vector width.
    """
    cdef double acc[LANES]
    cdef double sq[LANES]
    cdef double s, s1, s2, bm, d
    cdef Py_ssize_t i, j, nfull = length // LANES
    cdef const floating* q
    for j in range(LANES):
        acc[j] = 0
    for i in range(nfull):
        q = p + i * LANES
        for j in range(LANES):
            acc[j] = acc[j] + q[j]
    s = _lane_sum(acc)
    for i in range(nfull * LANES, length):
        s = s + p[i]
    bm = s / length
    for j in range(LANES):
        acc[j] = 0
        sq[j] = 0
    for i in range(nfull):
        q = p + i * LANES
        for j in range(LANES):
            d = q[j] - bm
            acc[j] = acc[j] + d
            sq[j] = sq[j] + d * d
    s1 = _lane_sum(acc)
    s2 = _lane_sum(sq)
    for i in range(nfull * LANES, length):
        d = p[i] - bm
        s1 = s1 + d
        s2 = s2 + d * d
    mean[0] = bm + s1 / length
    s2 = s2 - s1 * (s1 / length)
    m2[0] = s2 if s2 > 0 else 0.0


cdef inline double _lane_sum(const double* a) noexcept nogil:
    """Fixed-order pairwise sum of LANES (16) accumulators."""
    return ((((a[0] + a[8]) + (a[4] + a[12])) + ((a[2] + a[10]) + (a[6] + a[14])))
            + (((a[1] + a[9]) + (a[5] + a[13])) + ((a[3] + a[11]) + (a[7] + a[15]))))


cdef inline void _block_sums(const floating* g, const floating* x, Py_ssize_t length, double mean,
                             double* sum_g, double* dot) noexcept nogil:
    """sum(g) and sum(g * (x - mean)) over one contiguous run, in one pass."""
    cdef double acc[LANES]
    cdef double dt[LANES]
    cdef double s, t
    cdef Py_ssize_t i, j, nfull = length // LANES
    cdef const floating* gq
    cdef const floating* xq
    for j in range(LANES):
        acc[j] = 0
        dt[j] = 0
    for i in range(nfull):
        gq = g + i * LANES
        xq = x + i * LANES
        for j in range(LANES):
            acc[j] = acc[j] + gq[j]
            dt[j] = dt[j] + <double>gq[j] * (xq[j] - mean)
    s = _lane_sum(acc)
    t = _lane_sum(dt)
    for i in range(nfull * LANES, length):
        s = s + g[i]
        t = t + <double>g[i] * (x[i] - mean)
    sum_g[0] = sum_g[0] + s
    dot[0] = dot[0] + t


cdef inline void _affine(const floating* x, floating* y, Py_ssize_t length,
                         double mean, double scale, double shift) noexcept nogil:
    """y = (x - mean) * scale + shift, (x - mean) in double."""
    cdef Py_ssize_t i
    for i in range(length):
        y[i] = <floating>((x[i] - mean) * scale + shift)


cdef inline void _dx_run(const floating* g, const floating* x, floating* dx, Py_ssize_t length,
                         double mean, double a, double k1, double k2) noexcept nogil:
    """dx = (g - k1 - (x - mean) * k2) * a."""
    cdef Py_ssize_t i
    for i in range(length):
        dx[i] = <floating>((g[i] - k1 - (x[i] - mean) * k2) * a)


cdef struct Coef:
    # inputs
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


cdef inline void _set_coef(Coef* cf, Py_ssize_t c, double mean, double var) noexcept nogil:
    """Store the statistics of channel c and the scale/shift of its normalization."""
    cdef double invstd = 1.0 / sqrt(var + cf.eps)
    cdef double w = cf.weight[c]
    cdef double r, d
    cf.mean[c] = mean
    cf.var[c] = var
    cf.invstd[c] = invstd
    if cf.renorm:
        # y = w * ((x - mean) * invstd * r + d) + b, r and d from the pre-update running stats
        r = _clip(sqrt(var + cf.eps) / cf.run_std[c], cf.rmin, cf.rmax)
        d = _clip((mean - cf.run_mean[c]) / cf.run_std[c], -cf.dmax, cf.dmax)
        cf.r[c] = r
        cf.d[c] = d
        cf.scale[c] = w * r * invstd
        cf.shift[c] = w * d + cf.bias[c]
    else:
        cf.scale[c] = w * invstd
        cf.shift[c] = cf.bias[c]


# ---------------------------------------------------------------------------------------------
# Planar (N, C, S): chunking of one channel
# ---------------------------------------------------------------------------------------------
# A channel is N runs of S values. Each run is cut into `pieces` blocks of nearly equal length
# (<= BLOCK); the channel's N * pieces blocks are grouped into `nchunk` consecutive chunks.

cdef struct Planar:
    Py_ssize_t N
    Py_ssize_t C
    Py_ssize_t S
    Py_ssize_t pieces
    Py_ssize_t nblock
    Py_ssize_t nchunk


cdef Planar _planar(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept:
    cdef Planar p
    p.N = N
    p.C = C
    p.S = S
    p.pieces = (S + BLOCK - 1) // BLOCK if S > 0 else 1
    p.nblock = N * p.pieces
    p.nchunk = p.nblock if p.nblock < MAX_CHUNKS else MAX_CHUNKS
    if p.nchunk < 1:
        p.nchunk = 1
    return p


cdef inline void _piece(const Planar* p, Py_ssize_t c, Py_ssize_t b,
                        Py_ssize_t* offset, Py_ssize_t* length) noexcept nogil:
    """Offset and length of block b of channel c."""
    cdef Py_ssize_t n = b // p.pieces
    cdef Py_ssize_t q = b % p.pieces
    cdef Py_ssize_t lo = (p.S * q) // p.pieces
    cdef Py_ssize_t hi = (p.S * (q + 1)) // p.pieces
    offset[0] = (n * p.C + c) * p.S + lo
    length[0] = hi - lo


cdef inline void _planar_chunk_stats(const Planar* p, const floating* x, Py_ssize_t c,
                                     Py_ssize_t k, double* out) noexcept nogil:
    """(count, mean, m2) of chunk k of channel c."""
    cdef Py_ssize_t b, off, length
    cdef Py_ssize_t b0 = (p.nblock * k) // p.nchunk
    cdef Py_ssize_t b1 = (p.nblock * (k + 1)) // p.nchunk
    cdef double n = 0, mean = 0, m2 = 0, bmean, bm2
    for b in range(b0, b1):
        _piece(p, c, b, &off, &length)
        if length > 0:
            _block_stats(x + off, length, &bmean, &bm2)
            _chan_merge(&n, &mean, &m2, <double>length, bmean, bm2)
    out[0] = n
    out[1] = mean
    out[2] = m2


cdef inline void _planar_chunk_affine(const Planar* p, const floating* x, floating* y,
                                      Py_ssize_t c, Py_ssize_t k, double mean, double scale,
                                      double shift) noexcept nogil:
    cdef Py_ssize_t b, off, length
    cdef Py_ssize_t b0 = (p.nblock * k) // p.nchunk
    cdef Py_ssize_t b1 = (p.nblock * (k + 1)) // p.nchunk
    for b in range(b0, b1):
        _piece(p, c, b, &off, &length)
        _affine(x + off, y + off, length, mean, scale, shift)


cdef inline void _planar_chunk_sums(const Planar* p, const floating* g, const floating* x,
                                    Py_ssize_t c, Py_ssize_t k, double mean,
                                    double* out) noexcept nogil:
    cdef Py_ssize_t b, off, length
    cdef Py_ssize_t b0 = (p.nblock * k) // p.nchunk
    cdef Py_ssize_t b1 = (p.nblock * (k + 1)) // p.nchunk
    out[0] = 0
    out[1] = 0
    for b in range(b0, b1):
        _piece(p, c, b, &off, &length)
        _block_sums(g + off, x + off, length, mean, &out[0], &out[1])


cdef inline void _planar_chunk_dx(const Planar* p, const floating* g, const floating* x,
                                  floating* dx, Py_ssize_t c, Py_ssize_t k, double mean,
                                  double a, double k1, double k2) noexcept nogil:
    cdef Py_ssize_t b, off, length
    cdef Py_ssize_t b0 = (p.nblock * k) // p.nchunk
    cdef Py_ssize_t b1 = (p.nblock * (k + 1)) // p.nchunk
    for b in range(b0, b1):
        _piece(p, c, b, &off, &length)
        _dx_run(g + off, x + off, dx + off, length, mean, a, k1, k2)


cdef inline void _merge_stats(const double* part, Py_ssize_t nchunk,
                              double* mean, double* var) noexcept nogil:
    """Merge nchunk (count, mean, m2) triples in order; biased variance."""
    cdef double n = 0, m = 0, m2 = 0
    cdef Py_ssize_t k
    for k in range(nchunk):
        _chan_merge(&n, &m, &m2, part[3 * k], part[3 * k + 1], part[3 * k + 2])
    mean[0] = m
    var[0] = m2 / n if n > 0 else 0.0


# Each prange body below is one call, so that every local is private to its thread.

cdef void _planar_train_channel(const Planar* p, const floating* x, floating* y, Coef* cf,
                                double* part, Py_ssize_t c) noexcept nogil:
    """Statistics of channel c, then its normalization while it is still in cache."""
    cdef Py_ssize_t k
    cdef double mean, var
    for k in range(p.nchunk):
        _planar_chunk_stats(p, x, c, k, part + 3 * (c * p.nchunk + k))
    _merge_stats(part + 3 * c * p.nchunk, p.nchunk, &mean, &var)
    _set_coef(cf, c, mean, var)
    for k in range(p.nchunk):
        _planar_chunk_affine(p, x, y, c, k, mean, cf.scale[c], cf.shift[c])


cdef void _planar_train_coef(const Planar* p, Coef* cf, const double* part,
                             Py_ssize_t c) noexcept nogil:
    cdef double mean, var
    _merge_stats(part + 3 * c * p.nchunk, p.nchunk, &mean, &var)
    _set_coef(cf, c, mean, var)


cdef void _planar_train(const Planar* p, const floating* x, floating* y, Coef* cf,
                        double* part, int nthreads) noexcept nogil:
    cdef Py_ssize_t c, t, ntask = p.C * p.nchunk
    if p.C >= nthreads:
        # whole channels per thread
        for c in prange(p.C, num_threads=nthreads, schedule="dynamic"):
            _planar_train_channel(p, x, y, cf, part, c)
    else:
        # fewer channels than threads: a team of threads per channel, one chunk per task
        with parallel(num_threads=nthreads):
            for t in prange(ntask, schedule="static"):
                _planar_chunk_stats(p, x, t // p.nchunk, t % p.nchunk, part + 3 * t)
            _barrier()
            for c in prange(p.C, schedule="static"):
                _planar_train_coef(p, cf, part, c)
            _barrier()
            for t in prange(ntask, schedule="static"):
                _planar_chunk_affine(p, x, y, t // p.nchunk, t % p.nchunk, cf.mean[t // p.nchunk],
                                     cf.scale[t // p.nchunk], cf.shift[t // p.nchunk])


cdef void _planar_infer(const Planar* p, const floating* x, floating* y, const double* mean,
                        const double* scale, const double* shift, int nthreads) noexcept nogil:
    cdef Py_ssize_t run
    for run in prange(p.N * p.C, num_threads=nthreads, schedule="static"):
        _affine(x + run * p.S, y + run * p.S, p.S, mean[run % p.C], scale[run % p.C],
                shift[run % p.C])


cdef struct Grad:
    # inputs, length C
    const double* mean
    const double* invstd
    const double* weight
    int training
    double m            # values per channel
    # outputs, length C
    double* dweight
    double* dbias
    double* a           # dx = (g - k1 - (x - mean) * k2) * a
    double* k1
    double* k2


cdef inline void _grad_coef(Grad* gd, Py_ssize_t c, double sum_g, double dot) noexcept nogil:
    """dweight, dbias and the dx constants of channel c from its two sums."""
    cdef double istd = gd.invstd[c]
    gd.dweight[c] = dot * istd
    gd.dbias[c] = sum_g
    gd.a[c] = istd * gd.weight[c]
    if gd.training:
        gd.k1[c] = sum_g / gd.m
        gd.k2[c] = dot / gd.m * istd * istd
    else:
        gd.k1[c] = 0.0
        gd.k2[c] = 0.0


cdef void _planar_grad_coef(const Planar* p, Grad* gd, const double* part,
                            Py_ssize_t c) noexcept nogil:
    cdef double sum_g = 0, dot = 0
    cdef Py_ssize_t k
    for k in range(p.nchunk):
        sum_g = sum_g + part[2 * (c * p.nchunk + k)]
        dot = dot + part[2 * (c * p.nchunk + k) + 1]
    _grad_coef(gd, c, sum_g, dot)


cdef void _planar_backward_channel(const Planar* p, const floating* g, const floating* x,
                                   floating* dx, Grad* gd, double* part,
                                   Py_ssize_t c) noexcept nogil:
    """The fused sums of channel c, then its dx while dy and x are still in cache."""
    cdef Py_ssize_t k
    for k in range(p.nchunk):
        _planar_chunk_sums(p, g, x, c, k, gd.mean[c], part + 2 * (c * p.nchunk + k))
    _planar_grad_coef(p, gd, part, c)
    for k in range(p.nchunk):
        _planar_chunk_dx(p, g, x, dx, c, k, gd.mean[c], gd.a[c], gd.k1[c], gd.k2[c])


cdef void _planar_backward(const Planar* p, const floating* g, const floating* x, floating* dx,
                           Grad* gd, double* part, int nthreads) noexcept nogil:
    cdef Py_ssize_t c, t, ntask = p.C * p.nchunk
    if p.C >= nthreads:
        for c in prange(p.C, num_threads=nthreads, schedule="dynamic"):
            _planar_backward_channel(p, g, x, dx, gd, part, c)
    else:
        with parallel(num_threads=nthreads):
            for t in prange(ntask, schedule="static"):
                _planar_chunk_sums(p, g, x, t // p.nchunk, t % p.nchunk, gd.mean[t // p.nchunk],
                                   part + 2 * t)
            _barrier()
            for c in prange(p.C, schedule="static"):
                _planar_grad_coef(p, gd, part, c)
            _barrier()
            for t in prange(ntask, schedule="static"):
                c = t // p.nchunk
                _planar_chunk_dx(p, g, x, dx, c, t % p.nchunk, gd.mean[c], gd.a[c], gd.k1[c],
                                 gd.k2[c])


# ---------------------------------------------------------------------------------------------
# Rows (R, C): chunks of rows, C-length partials per chunk, merged in chunk order
# ---------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _rows_per_chunk(Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t rpc = ROW_CHUNK_VALUES // C if C > 0 else ROW_CHUNK_VALUES
    if rpc < TILE_ROWS:
        rpc = TILE_ROWS
    return rpc - rpc % TILE_ROWS


cdef void _rows_chunk_stats(const floating* x, Py_ssize_t R, Py_ssize_t C, Py_ssize_t r0,
                            Py_ssize_t r1, double* cmean, double* cm2,
                            double* work) noexcept nogil:
    """Per-channel mean and m2 of rows [r0, r1), block by block (TILE_ROWS x TILE values)."""
    cdef double* acc = work
    cdef double* s1 = work + TILE
    cdef double* s2 = work + 2 * TILE
    cdef Py_ssize_t c0, c1, c, r, b0, b1, nt
    cdef double n, nb, bm, d, tot, delta
    cdef const floating* row
    cdef Py_ssize_t ntile = (C + TILE - 1) // TILE
    cdef Py_ssize_t nrb = (r1 - r0 + TILE_ROWS - 1) // TILE_ROWS
    cdef Py_ssize_t it, ib
    for it in range(ntile):
        c0 = it * TILE
        c1 = c0 + TILE if c0 + TILE < C else C
        nt = c1 - c0
        n = 0
        for ib in range(nrb):
            b0 = r0 + ib * TILE_ROWS
            b1 = b0 + TILE_ROWS if b0 + TILE_ROWS < r1 else r1
            nb = <double>(b1 - b0)
            for c in range(nt):
                acc[c] = 0
                s1[c] = 0
                s2[c] = 0
            for r in range(b0, b1):
                row = x + r * C + c0
                for c in range(nt):
                    acc[c] = acc[c] + row[c]
            for c in range(nt):
                acc[c] = acc[c] / nb
            for r in range(b0, b1):
                row = x + r * C + c0
                for c in range(nt):
                    d = row[c] - acc[c]
                    s1[c] = s1[c] + d
                    s2[c] = s2[c] + d * d
            tot = n + nb
            for c in range(nt):
                bm = acc[c] + s1[c] / nb
                d = s2[c] - s1[c] * (s1[c] / nb)
                if d < 0:
                    d = 0
                if n == 0:
                    cmean[c0 + c] = bm
                    cm2[c0 + c] = d
                else:
                    delta = bm - cmean[c0 + c]
                    cmean[c0 + c] = cmean[c0 + c] + delta * (nb / tot)
                    cm2[c0 + c] = cm2[c0 + c] + d + delta * delta * (n * (nb / tot))
            n = tot


cdef void _rows_train_coef(Coef* cf, const double* part, Py_ssize_t R, Py_ssize_t C,
                           Py_ssize_t rpc, Py_ssize_t nchunk, Py_ssize_t c) noexcept nogil:
    """Merge the chunk partials of channel c in chunk order."""
    cdef double n = 0, m = 0, m2 = 0
    cdef Py_ssize_t k, r0
    for k in range(nchunk):
        r0 = k * rpc
        _chan_merge(&n, &m, &m2, <double>((r0 + rpc if r0 + rpc < R else R) - r0),
                    part[2 * k * C + c], part[(2 * k + 1) * C + c])
    _set_coef(cf, c, m, m2 / n)


cdef inline void _rows_affine(const floating* x, floating* y, Py_ssize_t C, const double* mean,
                              const double* scale, const double* shift) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        y[c] = <floating>((x[c] - mean[c]) * scale[c] + shift[c])


cdef void _rows_train(const floating* x, floating* y, Py_ssize_t R, Py_ssize_t C, Coef* cf,
                      double* part, double* work, int nthreads) noexcept nogil:
    cdef Py_ssize_t rpc = _rows_per_chunk(C)
    cdef Py_ssize_t nchunk = (R + rpc - 1) // rpc
    cdef Py_ssize_t k, c, r
    with parallel(num_threads=nthreads):
        for k in prange(nchunk, schedule="static"):
            _rows_chunk_stats(x, R, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R,
                              part + 2 * k * C, part + (2 * k + 1) * C,
                              work + 3 * TILE * _thread_slot())
        _barrier()
        for c in prange(C, schedule="static"):
            _rows_train_coef(cf, part, R, C, rpc, nchunk, c)
        _barrier()
        for r in prange(R, schedule="static"):
            _rows_affine(x + r * C, y + r * C, C, cf.mean, cf.scale, cf.shift)


cdef void _rows_infer(const floating* x, floating* y, Py_ssize_t R, Py_ssize_t C,
                      const double* mean, const double* scale, const double* shift,
                      int nthreads) noexcept nogil:
    cdef Py_ssize_t r
    for r in prange(R, num_threads=nthreads, schedule="static"):
        _rows_affine(x + r * C, y + r * C, C, mean, scale, shift)


cdef void _rows_chunk_sums(const floating* g, const floating* x, Py_ssize_t C, Py_ssize_t r0,
                           Py_ssize_t r1, const double* mean, double* sg,
                           double* sd) noexcept nogil:
    """Per-channel sum(g) and sum(g * (x - mean)) of rows [r0, r1), one pass."""
    cdef Py_ssize_t r, c
    cdef const floating* xr
    cdef const floating* gr
    for c in range(C):
        sg[c] = 0
        sd[c] = 0
    for r in range(r0, r1):
        xr = x + r * C
        gr = g + r * C
        for c in range(C):
            sg[c] = sg[c] + gr[c]
            sd[c] = sd[c] + <double>gr[c] * (xr[c] - mean[c])


cdef void _rows_grad_coef(Grad* gd, const double* part, Py_ssize_t C, Py_ssize_t nchunk,
                          Py_ssize_t c) noexcept nogil:
    cdef double sum_g = 0, dot = 0
    cdef Py_ssize_t k
    for k in range(nchunk):
        sum_g = sum_g + part[2 * k * C + c]
        dot = dot + part[(2 * k + 1) * C + c]
    _grad_coef(gd, c, sum_g, dot)


cdef inline void _rows_dx(const floating* g, const floating* x, floating* dx, Py_ssize_t C,
                          const double* mean, const double* a, const double* k1,
                          const double* k2) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        dx[c] = <floating>((g[c] - k1[c] - (x[c] - mean[c]) * k2[c]) * a[c])


cdef void _rows_backward(const floating* g, const floating* x, floating* dx, Py_ssize_t R,
                         Py_ssize_t C, Grad* gd, double* part, int nthreads) noexcept nogil:
    cdef Py_ssize_t rpc = _rows_per_chunk(C)
    cdef Py_ssize_t nchunk = (R + rpc - 1) // rpc
    cdef Py_ssize_t k, c, r
    with parallel(num_threads=nthreads):
        for k in prange(nchunk, schedule="static"):
            _rows_chunk_sums(g, x, C, k * rpc, (k + 1) * rpc if (k + 1) * rpc < R else R,
                             gd.mean, part + 2 * k * C, part + (2 * k + 1) * C)
        _barrier()
        for c in prange(C, schedule="static"):
            _rows_grad_coef(gd, part, C, nchunk, c)
        _barrier()
        for r in prange(R, schedule="static"):
            _rows_dx(g + r * C, x + r * C, dx + r * C, C, gd.mean, gd.a, gd.k1, gd.k2)


# ---------------------------------------------------------------------------------------------
# Python entry points (called by fastbn/functional.py with validated, canonical arrays)
# ---------------------------------------------------------------------------------------------

def _workspace_train(int kind, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int nthreads):
    """Scratch arrays (partials, per-thread work) for training forward."""
    cdef Planar p
    cdef Py_ssize_t rpc
    if kind == 0:
        p = _planar(N, C, S)
        return np.empty(3 * C * p.nchunk, dtype=np.float64), np.empty(1, dtype=np.float64)
    rpc = _rows_per_chunk(C)
    nchunk = (N + rpc - 1) // rpc
    return (np.empty(max(2 * nchunk * C, 1), dtype=np.float64),
            np.empty(3 * TILE * nthreads, dtype=np.float64))


cdef _train_impl(const floating[::1] x, floating[::1] y, int kind, Py_ssize_t N, Py_ssize_t C,
                 Py_ssize_t S, const double[::1] weight, const double[::1] bias, double eps,
                 double[::1] mean, double[::1] var, double[::1] invstd, double[::1] scale,
                 double[::1] shift, renorm, int nthreads):
    cdef Coef cf
    cdef Planar p
    cdef double[::1] part, work
    cdef const double[::1] run_mean
    cdef const double[::1] run_std
    cdef double[::1] r_out
    cdef double[::1] d_out
    cf.weight = &weight[0]
    cf.bias = &bias[0]
    cf.eps = eps
    cf.mean = &mean[0]
    cf.var = &var[0]
    cf.invstd = &invstd[0]
    cf.scale = &scale[0]
    cf.shift = &shift[0]
    cf.renorm = 0
    if renorm is not None:
        run_mean, run_std, r_out, d_out, rmin, rmax, dmax = renorm
        cf.renorm = 1
        cf.run_mean = &run_mean[0]
        cf.run_std = &run_std[0]
        cf.r = &r_out[0]
        cf.d = &d_out[0]
        cf.rmin = rmin
        cf.rmax = rmax
        cf.dmax = dmax
    part, work = _workspace_train(kind, N, C, S, nthreads)
    if kind == 0:
        p = _planar(N, C, S)
        with nogil:
            _planar_train(&p, &x[0], &y[0], &cf, &part[0], nthreads)
    else:
        with nogil:
            _rows_train(&x[0], &y[0], N, C, &cf, &part[0], &work[0], nthreads)


def train_forward(x, y, int kind, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, weight, bias,
                  double eps, mean, var, invstd, scale, shift, renorm, int nthreads):
    """Training forward on a canonical view.

    kind 0: x is planar (N, C, S); kind 1: x is rows (N, C) and S is ignored.
    x, y: flat C-contiguous arrays of one float dtype. weight, bias: float64 (C,).
    Writes mean, var (biased), invstd, scale, shift (float64 (C,)). renorm is None or
    (running_mean, running_std, r_out, d_out, rmin, rmax, dmax) for Batch Renormalization.
    """
    if x.dtype == np.float32:
        _train_impl[float](x, y, kind, N, C, S, weight, bias, eps, mean, var, invstd, scale,
                           shift, renorm, nthreads)
    else:
        _train_impl[double](x, y, kind, N, C, S, weight, bias, eps, mean, var, invstd, scale,
                            shift, renorm, nthreads)


cdef _infer_impl(const floating[::1] x, floating[::1] y, int kind, Py_ssize_t N, Py_ssize_t C,
                 Py_ssize_t S, const double[::1] mean, const double[::1] scale,
                 const double[::1] shift, int nthreads):
    cdef Planar p
    if kind == 0:
        p = _planar(N, C, S)
        with nogil:
            _planar_infer(&p, &x[0], &y[0], &mean[0], &scale[0], &shift[0], nthreads)
    else:
        with nogil:
            _rows_infer(&x[0], &y[0], N, C, &mean[0], &scale[0], &shift[0], nthreads)


def infer_forward(x, y, int kind, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, mean, scale, shift,
                  int nthreads):
    """y = (x - mean) * scale + shift per channel on a canonical view (see train_forward)."""
    if x.dtype == np.float32:
        _infer_impl[float](x, y, kind, N, C, S, mean, scale, shift, nthreads)
    else:
        _infer_impl[double](x, y, kind, N, C, S, mean, scale, shift, nthreads)


cdef _backward_impl(const floating[::1] g, const floating[::1] x, floating[::1] dx, int kind,
                    Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, const double[::1] mean,
                    const double[::1] invstd, const double[::1] weight, bint training,
                    double[::1] dweight, double[::1] dbias, int nthreads):
    cdef Planar p
    cdef Grad gd
    cdef double[::1] part
    cdef double[::1] coef = np.empty(3 * C, dtype=np.float64)
    cdef Py_ssize_t rpc, nchunk
    gd.mean = &mean[0]
    gd.invstd = &invstd[0]
    gd.weight = &weight[0]
    gd.training = training
    gd.m = <double>(N * S)
    gd.dweight = &dweight[0]
    gd.dbias = &dbias[0]
    gd.a = &coef[0]
    gd.k1 = &coef[C]
    gd.k2 = &coef[2 * C]
    if kind == 0:
        p = _planar(N, C, S)
        part = np.empty(2 * C * p.nchunk, dtype=np.float64)
        with nogil:
            _planar_backward(&p, &g[0], &x[0], &dx[0], &gd, &part[0], nthreads)
    else:
        rpc = _rows_per_chunk(C)
        nchunk = (N + rpc - 1) // rpc
        part = np.empty(2 * nchunk * C, dtype=np.float64)
        with nogil:
            _rows_backward(&g[0], &x[0], &dx[0], N, C, &gd, &part[0], nthreads)


def backward(g, x, dx, int kind, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, mean, invstd, weight,
             bint training, dweight, dbias, int nthreads):
    """dx, dweight, dbias on a canonical view (see train_forward). dweight/dbias: float64 (C,)."""
    if x.dtype == np.float32:
        _backward_impl[float](g, x, dx, kind, N, C, S, mean, invstd, weight, training, dweight,
                              dbias, nthreads)
    else:
        _backward_impl[double](g, x, dx, kind, N, C, S, mean, invstd, weight, training, dweight,
                               dbias, nthreads)
