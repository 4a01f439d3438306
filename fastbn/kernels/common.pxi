# What every kernel shares: the data types, the tuning constants, the Chan merge of partial
# statistics, the per-channel coefficients, and the description of one call's work.
#
# The kernels work on one of two canonical C-contiguous views, chosen by fastbn/functional.py:
#   PLANAR (N, C, S): each (n, c) pair is one contiguous run of S values (NCHW memory, S > 1);
#                     kernels in planar.pxi, block arithmetic in planar_blocks.pxi;
#   ROWS   (R, C):    each row holds one value per channel (NHWC memory, and (N, C));
#                     kernels in rows.pxi.
# Statistics, coefficients and sum(dy) are accumulated in double whatever the data type.
# For float32 data the elementwise passes and the backward's dot sum(dy * (x - mean)) run in
# float32 around the mean split into a float32 value and its remainder, so inputs with a
# large mean keep their low-order digits (planar_blocks.pxi, docs/math.rst); float64 data runs
# in double throughout.
#
# Determinism: the data of a channel is cut into a fixed list of chunks that depends on the
# shape and dtype only, never on the thread count. Each chunk's partial result is computed by
# the same code whichever thread runs it, and partials are merged in chunk order. One thread
# or many, the result is bit-identical.
#
# Parallel structure: one OpenMP parallel region per call (none at all for one thread). Every
# reduction kernel has three phases: reduce (each chunk's partial statistics or sums), coef
# (merge a channel's partials in chunk order, then its per-channel coefficients) and apply
# (normalize, or write dx). The phases are separate `prange` loops inside the region, ordered
# by explicit barriers, unless one thread owns whole channels and runs all three per group.

from cython.parallel cimport parallel, prange
from libc.float cimport DBL_MAX, FLT_MAX
from libc.math cimport INFINITY, NAN, fabs, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

cimport numpy as cnp
from fastbn._support cimport _call_threads, _note_region, _running_average, fastbn_region
import numpy as np

cdef extern from "parallel.h":
    void _barrier "fastbn_barrier"() noexcept nogil
    bint REGISTER_LANES "FASTBN_REGISTER_LANES"
    void _region_begin "fastbn_region_begin"(fastbn_region* r) noexcept nogil
    void _region_enter "fastbn_region_enter"(fastbn_region* r) noexcept nogil
    void _region_leave "fastbn_region_leave"(fastbn_region* r) noexcept nogil


cdef extern from "stream.h":
    void _stream_f32 "fastbn_stream_f32"(float* dst, const float* src, Py_ssize_t n) noexcept nogil
    void _stream_f64 "fastbn_stream_f64"(double* dst, const double* src, Py_ssize_t n) noexcept nogil
    void _stream_fence "fastbn_stream_fence"() noexcept nogil
    void _stream_u16 "fastbn_stream_u16"(unsigned short* dst, const unsigned short* src, Py_ssize_t n) noexcept nogil
    void _prefetch "fastbn_prefetch"(const void* p, Py_ssize_t nbytes) noexcept nogil


cdef extern from "half_convert.h":
    void _f16_to_f32 "fastbn_f16_to_f32"(const unsigned short* src, float* dst, Py_ssize_t n) noexcept nogil
    void _f32_to_f16 "fastbn_f32_to_f16"(const float* src, unsigned short* dst, Py_ssize_t n) noexcept nogil
    void _bf16_to_f32 "fastbn_bf16_to_f32"(const unsigned short* src, float* dst, Py_ssize_t n) noexcept nogil
    void _f32_to_bf16 "fastbn_f32_to_bf16"(const float* src, unsigned short* dst, Py_ssize_t n) noexcept nogil
    void _affine16 "fastbn_affine16"(const unsigned short* x, unsigned short* y, Py_ssize_t n,
                                     float m, float a, float c, int bf16) noexcept nogil
    bint DIRECT16 "FASTBN_DIRECT16"
    ctypedef struct Act16 "fastbn_act16":
        # the fused activation of a 16-bit dx loop: dy masked by y (NULL: none), stored to
        # e (or NULL), slope 0 (the ReLU) or the leaky ReLU's, inverse > 0: x read as the
        # leaky ReLU's pre-activation (x is y)
        const unsigned short* y
        unsigned short* e
        float slope
        float inverse
    void _dx16 "fastbn_dx16"(const unsigned short* g, const unsigned short* x,
                             unsigned short* d, Py_ssize_t n, int training, float mean, float a,
                             float kx, float k0, float gm, float gl, int bf16,
                             Act16 act) noexcept nogil
    void _dx16_rows "fastbn_dx16_rows"(const unsigned short* g, const unsigned short* x,
                                       unsigned short* d, Py_ssize_t nrow, Py_ssize_t width,
                                       int training, const float* mean, const float* a,
                                       const float* kx, const float* k0, const float* gm,
                                       const float* gl, int bf16, Act16 act) noexcept nogil
    void _affine16_rows "fastbn_affine16_rows"(const unsigned short* x, unsigned short* y,
                                               Py_ssize_t nrow, Py_ssize_t width, const float* m,
                                               const float* a, const float* c,
                                               int bf16) noexcept nogil


ctypedef fused floating:
    float
    double

# the 16-bit payload of a float16 or bfloat16 value (its arithmetic is in float32)
ctypedef unsigned short half_bits

# accumulator type of a reduction (float32 lanes for float32 data where they are exact
# enough, double otherwise)
ctypedef fused acc_t:
    float
    double

# arithmetic type of an elementwise pass (y, dx): float for float32 data whose per-channel
# coefficients float32 carries (_f32_coefs_ok, _dx32_ok), double otherwise
ctypedef fused opmath_t:
    float
    double

# Compile-time variants of the loops the fused ReLU extends: Cython compiles one copy of a
# loop per member type, and `if mask_t is char` is decided at compile time, so the plain
# kernels keep their own loops, untouched, and the fused ones get theirs. The member types
# only name the variant (an argument of that type selects it, one of the tags below):
# The leaky ReLU's variants carry its slope (below 0) in the tag's value:
ctypedef struct Leaky:          # mask_t: dy * (1 if y > 0 else slope); epi_t: v * (slope if
    double slope                # v < 0 else 1)

ctypedef struct LeakyStored:    # mask_t: as Leaky, and stored
    double slope

ctypedef struct LeakyResidual:  # epi_t: Leaky's on value + residual
    double slope

ctypedef struct LeakyInverse:   # mask_t: as Leaky, and x is the leaky ReLU's output y,
    double slope                # read as the pre-activation (y if y > 0 else y * inverse,
    double inverse              # inverse = 1 / slope): the backward from the output

ctypedef fused mask_t:      # backward loops over dy
    char                    # plain: dy as it is
    short                   # dy masked by the fused ReLU's output (y > 0)
    int                     # masked, and the masked dy stored (the residual's gradient)
    Leaky                   # dy where y > 0, else dy * slope (the leaky ReLU)
    LeakyStored             # as Leaky, and stored
    LeakyInverse            # as Leaky, x read through the inverse of the activation

ctypedef fused epi_t:       # forward rows loops
    char                    # plain: the normalized value
    short                   # max(value, 0)
    int                     # max(value + residual, 0)
    Leaky                   # the leaky ReLU of the value
    LeakyResidual           # the leaky ReLU of value + residual

# The tags a call site passes to select a variant (a variable of the member type; its value
# is never read):
cdef char PLAIN = 0             # mask_t and epi_t: the plain loop
cdef short MASKED = 0           # mask_t: dy masked by y > 0
cdef int MASKED_STORED = 0      # mask_t: masked, and stored
cdef short RELU = 0             # epi_t: max(value, 0)
cdef int RELU_RESIDUAL = 0      # epi_t: max(value + residual, 0)


cpdef enum View:
    # the canonical view of a call's data (fastbn/functional.py passes it as `view`)
    PLANAR = 0
    ROWS = 1


cdef enum DType:
    # the data type of x, dy, y, dx (Work.dtype)
    F32 = 0
    F64 = 1
    F16 = 2            # IEEE binary16 (NumPy's float16)
    BF16 = 3           # bfloat16 (ml_dtypes.bfloat16)


cdef enum Op:
    # what a reduction kernel computes (Work.op)
    TRAIN = 0          # statistics, coefficients, y = (x - mean) * scale + shift
    BACKWARD = 1       # sum(g) and sum(g * (x - mean)), gradient coefficients, dx
    INFER = 2          # y from given coefficients: one elementwise pass (op not read)


# The tuning constants below: what each decides, the measurement behind its value and the
# command that re-measures it are in docs/development.rst, "Tuning constants".
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
    # reductions also below NARROW_ROWS or on cached data (see _multi_row)
    WIDE_ROWS = 1024
    NARROW_ROWS = 64
    # rows: the statistics pass asks the cache for the rows this many bytes ahead of the one
    # it reads (_prefetch): the hardware prefetchers fall behind its loads, which wait on
    # the accumulators' stores. Measured (Intel Xeon, 2 threads, float32, NHWC, 103 MB):
    # the statistics pass 2.4x a read pass without, 1.5-1.9x with (1024, 2048 and 4096
    # bytes measured alike). Rows longer than this are not prefetched: the hardware follows
    # them, and prefetching (32, 2048, 7, 7) NHWC cost its training and backward 1.1x
    PREFETCH_BYTES = 2048
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
    # last-level cache when it runs again (see _multi_row)
    CACHED_BYTES = 1 << 23


cdef extern from "fma.h":
    # a * b + c, fused where the build's CPU has fused multiply-add (fma.h): written out
    # wherever the arithmetic is meant to be one, since no module lets the compiler
    # contract on its own (-ffp-contract=off)
    double _madd "fastbn_madd"(double a, double b, double c) noexcept nogil
    float _maddf "fastbn_maddf"(float a, float b, float c) noexcept nogil


cdef extern from "dx_loop.h":
    float _dx_one_f32 "fastbn_dx_one_f32"(float g, float x, float mean, float a, float kx,
                                          float k0, float gm, float gl) noexcept nogil
    double _dx_one_f64 "fastbn_dx_one_f64"(double g, double x, double mean, double a,
                                           double kx, double k0) noexcept nogil
    void _dx_f32 "fastbn_dx_f32"(const float* g, const float* x, float* dx, Py_ssize_t n,
                                 float mean, float a, float kx, float k0, float gm,
                                 float gl) noexcept nogil
    void _dx_f64 "fastbn_dx_f64"(const double* g, const double* x, double* dx, Py_ssize_t n,
                                 double mean, double a, double kx, double k0) noexcept nogil


cdef inline floating _affine1(floating x, opmath_t m, opmath_t a, opmath_t b) noexcept nogil:
    """(x - m) * a + b, the product fused into the sum, in opmath_t arithmetic (in double for
    float64 data), rounded to the data's type: one value of the normalization."""
    if opmath_t is float:
        if floating is float:
            return _maddf(x - m, a, b)
    return <floating>_madd(x - m, a, b)


cdef inline acc_t _dot1(acc_t t, floating g, floating x, acc_t mean) noexcept nogil:
    """t + g * (x - mean), the product fused into the sum: one step of a lane of the
    backward's dot, in float32 for float32 data in float32 lanes, else in double."""
    if acc_t is float:
        if floating is float:
            return _maddf(g, x - mean, t)
    return <acc_t>_madd(g, x - mean, t)


cdef inline acc_t _dot2(floating g0, floating x0, floating g1, floating x1,
                        acc_t mean) noexcept nogil:
    """g0 * (x0 - mean) + g1 * (x1 - mean), the first product fused into the sum: a pair of
    the four steps a lane adds at once."""
    if acc_t is float:
        if floating is float:
            return _maddf(g0, x0 - mean, g1 * (x1 - mean))
    return <acc_t>_madd(g0, x0 - mean, g1 * (x1 - mean))


# float32 arithmetic on float32 data keeps its relative precision, with room for the products
# of a pass, while every coefficient and sum stays within [F32_SMALL, F32_BIG] (or is 0)
cdef extern from "f32_range.h":
    const double F32_BIG "FASTBN_F32_BIG"
    const double F32_SMALL "FASTBN_F32_SMALL"


cdef inline bint _f32_fits(double v) noexcept nogil:
    """Whether v is 0, or of a size float32 carries with its full relative precision and
    room to spare, or NaN (which float32 propagates as double does); infinities are not."""
    cdef double a = fabs(v)
    # & and |, not `and` and `or`: no branches, so the loops over channels vectorize
    return (not (a > F32_BIG)) & ((a >= F32_SMALL) | (v == 0) | (v != v))


cdef inline bint _f32_bounded(double v) noexcept nogil:
    """Whether |v| <= F32_BIG, or v is NaN (tiny values are fine where their rounding error
    is tiny too)."""
    return not (fabs(v) > F32_BIG)


cdef inline bint _f32_coefs_ok(double mean, double scale, double shift) noexcept nogil:
    """Whether (x - mean) * scale + shift can run in float32 (see planar_blocks.pxi): the mean
    and shift bounded, the scale representable with its precision. NaN coefficients are
    fine: the channel's outputs are NaN either way."""
    return _f32_bounded(mean) & _f32_bounded(shift) & _f32_fits(scale)


cdef inline bint _dx32_ok(double mean, double gmean, double a, double kx,
                          double c) noexcept nogil:
    """Whether dx = ((g - gmean) * a + (x - mean) * kx + c can run in float32."""
    return (_f32_bounded(mean) & _f32_bounded(gmean) & _f32_bounded(c) & _f32_fits(a)
            & _f32_fits(kx))


cdef inline bint _f32_sum_ok(double s) noexcept nogil:
    """Whether a block sum made in float32 lanes can be kept: finite, and not so small that
    its terms may have underflowed (0 is kept only when exact, i.e. summed again)."""
    cdef double a = fabs(s)
    return a >= F32_SMALL and a <= F32_BIG


cdef enum:
    # values staged in L1 (on the stack) before a streaming store of an output
    STAGE = 1024


cdef extern from "relu_mask.h":
    float _mask_f "fastbn_mask_f"(float g, float y) noexcept nogil
    float _bit_f "fastbn_bit_f"(float g, unsigned int word, Py_ssize_t j) noexcept nogil
    double _mask_d "fastbn_mask_d"(double g, double y) noexcept nogil


cdef extern from "sums_run.h":
    const bint SUMS_RUN "FASTBN_SUMS_RUN"
    enum:
        G_PLAIN "FASTBN_G_PLAIN"
        G_RELU "FASTBN_G_RELU"
        G_BITS "FASTBN_G_BITS"
        G_LEAKY "FASTBN_G_LEAKY"
        G_LEAKY_INVERSE "FASTBN_G_LEAKY_INVERSE"
    ctypedef struct GRead "fastbn_gread":
        int kind
        const void* y
        const unsigned char* bits
        float slope
        float inverse
    void _sums_run_f32 "fastbn_sums_run_f32"(const float* g, const float* x, Py_ssize_t n,
        Py_ssize_t nrun, Py_ssize_t stride, float mean, const GRead* r,
        Py_ssize_t ahead_bytes, double* sum_g, double* dot) noexcept nogil
    void _devs_h16 "fastbn_devs_h16"(const unsigned short* p, Py_ssize_t n, Py_ssize_t nrun,
        Py_ssize_t stride, double bm, bint bf16, Py_ssize_t ahead_bytes, double* s1,
        double* s2) noexcept nogil
    void _rows_sums_h16 "fastbn_rows_sums_h16"(const unsigned short* g,
        const unsigned short* x, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t width,
        const float* mean, double* sg, float* sd, bint multi_row, bint bf16) noexcept nogil
    void _rows_devs_h16 "fastbn_rows_devs_h16"(const unsigned short* x, Py_ssize_t C,
        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t width, const double* pivot, double* s1,
        double* s2, bint multi_row, bint bf16) noexcept nogil
    void _sums_run_h16 "fastbn_sums_run_h16"(const unsigned short* g, const unsigned short* x,
        Py_ssize_t n, Py_ssize_t nrun, Py_ssize_t stride, float mean, bint bf16,
        const GRead* r, Py_ssize_t ahead_bytes, double* sum_g, double* dot) noexcept nogil


cdef extern from "mask_bits.h":
    void _pack_f32 "fastbn_pack_f32"(const float* y, Py_ssize_t n, unsigned char* bits) noexcept nogil
    void _pack_f64 "fastbn_pack_f64"(const double* y, Py_ssize_t n, unsigned char* bits) noexcept nogil


cdef inline void _pack(const floating* y, Py_ssize_t n, unsigned char* bits) noexcept nogil:
    """The mask bits of y[0:n] (y > 0) into bits (which starts at a byte)."""
    if floating is float:
        _pack_f32(y, n, bits)
    else:
        _pack_f64(y, n, bits)


cdef extern from "mask_bits_dx.h":
    const bint HAVE_DX_BITS "FASTBN_HAVE_DX_BITS"
    void _dx_bits_f32 "fastbn_dx_bits_f32"(const float* g, const float* x, float* d, float* e,
        Py_ssize_t n, const float* m, const float* gm, const float* gl, const float* a,
        const float* kx, const float* k, const unsigned char* bits) noexcept nogil
    void _dx_bits_run_f32 "fastbn_dx_bits_run_f32"(const float* g, const float* x, float* d,
        float* e, Py_ssize_t n, float m, float gm, float gl, float a, float kx, float k,
        const unsigned char* bits) noexcept nogil
    void _dx_bits_rows_f32 "fastbn_dx_bits_rows_f32"(const float* g, const float* x, float* d,
        float* e, Py_ssize_t n, Py_ssize_t nrows, const float* m, const float* gm,
        const float* gl, const float* a, const float* kx, const float* k,
        const unsigned char* bits, Py_ssize_t rowbytes) noexcept nogil
    void _masked_copy_f32 "fastbn_masked_copy_f32"(const float* g, const unsigned char* bits,
        Py_ssize_t n, float* out, Py_ssize_t ahead) noexcept nogil


cdef inline floating _masked(floating g, floating y) noexcept nogil:
    """g where the fused ReLU's output y is > 0, else 0 (a NaN y gives 0); branch-free."""
    if floating is float:
        return _mask_f(g, y)
    else:
        return _mask_d(g, y)


cdef inline void _mask_into(const floating* g, const floating* y, floating* out,
                            Py_ssize_t n, double slope=0) noexcept nogil:
    """out[i] = _masked(g[i], y[i]) for n values (out may be g); with a slope > 0, the leaky
    ReLU's g[i] * (1 if y[i] > 0 else slope)."""
    cdef Py_ssize_t i
    cdef floating s = <floating>slope
    if slope == 0:
        for i in range(n):
            out[i] = _masked(g[i], y[i])
    else:
        for i in range(n):
            out[i] = _leaky_g(g[i], y[i], s)


cdef inline floating _leaky_g(floating g, floating y, floating slope) noexcept nogil:
    """The leaky ReLU's backward: g where its output y > 0, else g * slope (a NaN y gives
    g * slope); g * 1 is g, bit for bit, so one multiply of a select: vectorized."""
    return g * (<floating>1 if y > 0 else slope)


cdef inline floating _leaky_v(floating v, floating slope) noexcept nogil:
    """The leaky ReLU: v where v >= 0 (and NaN), else v * slope."""
    return v * (slope if v < 0 else <floating>1)


cdef inline void _invert_into(floating* x, Py_ssize_t n, double inverse) noexcept nogil:
    """x[i] <- the pre-activation of the leaky ReLU's output x[i]: x[i] where > 0, else
    x[i] * inverse (1 / slope), in place."""
    cdef Py_ssize_t i
    cdef floating s = <floating>inverse
    for i in range(n):
        x[i] = x[i] * (<floating>1 if x[i] > 0 else s)


cdef inline floating _gat(const floating* g, const floating* ym, Py_ssize_t i,
                          mask_t variant) noexcept nogil:
    """g[i]; in the masked variants, g[i] where the fused ReLU's output ym[i] > 0, else 0
    (the leaky ones: else g[i] * slope)."""
    if mask_t is char:
        return g[i]
    elif mask_t is short or mask_t is int:
        return _masked(g[i], ym[i])
    else:
        return _leaky_g(g[i], ym[i], <floating>variant.slope)


cdef inline floating _xat(const floating* x, Py_ssize_t i, mask_t variant) noexcept nogil:
    """x[i]; in the LeakyInverse variant (x is the leaky ReLU's output), its pre-activation."""
    cdef floating v
    if mask_t is LeakyInverse:
        v = x[i]
        return v * (<floating>1 if v > 0 else <floating>variant.inverse)
    else:
        return x[i]


cdef inline void _stream(floating* dst, const floating* src, Py_ssize_t n) noexcept nogil:
    """Non-temporal store of n staged values (see the C helpers above)."""
    if floating is float:
        _stream_f32(dst, src, n)
    else:
        _stream_f64(dst, src, n)


cdef inline Py_ssize_t _stop(Py_ssize_t k, Py_ssize_t per, Py_ssize_t total) noexcept nogil:
    """End of piece k when `total` items are cut into pieces of `per`: min((k+1)*per, total)."""
    cdef Py_ssize_t end = (k + 1) * per
    return end if end < total else total


# ---------------------------------------------------------------------------------------------
# Merging partial statistics (Chan et al.'s pairwise update)
# ---------------------------------------------------------------------------------------------

cdef inline void _chan_merge(double* n, double* mean, double* m2,
                             double nb, double mb, double m2b) noexcept nogil:
    """Merge (nb, mb, m2b) into the running (n, mean, m2)."""
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
    mean[0] = _madd(delta, nb / tot, mean[0])
    m2[0] = _madd(delta * delta, na * (nb / tot), m2[0] + m2b)
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
        mean[c] = _madd(delta, wb, mean[c])
        m2[c] = _madd(delta * delta, wn, m2[c] + m2b[c])


# ---------------------------------------------------------------------------------------------
# Per-channel coefficients
# ---------------------------------------------------------------------------------------------

cdef struct Affine:
    # y = (x - mean) * scale + shift per channel (length C), and its float32 form for float32
    # data, y = (x - mean32) * scale32 + shift32 (see planar_blocks.pxi), which channel c may
    # use where ok32[c] (the rows kernels use it when every channel may)
    const double* mean
    const double* scale
    const double* shift
    float* mean32
    float* scale32
    float* shift32
    unsigned char* ok32
    double slope        # the fused ReLU (Work.relu) below 0: 0 (max(v, 0)) or the leaky slope


cdef inline void _affine32(Affine* af, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """The float32 form of channels [c0, c1) of af."""
    cdef Py_ssize_t c
    cdef float m32
    cdef double shift
    cdef const double* mean = af.mean        # local pointers: the loop vectorizes
    cdef const double* scale = af.scale
    cdef const double* shift64 = af.shift
    cdef float* mean32 = af.mean32
    cdef float* scale32 = af.scale32
    cdef float* shift32 = af.shift32
    cdef unsigned char* ok32 = af.ok32
    for c in range(c0, c1):
        # converted first, then chosen: no conversion waits behind a branch, so the loop
        # vectorizes (a conversion may raise a floating-point flag, which the compiler
        # will not do on a path the code does not take)
        m32 = <float>mean[c]
        if not _f32_bounded(mean[c]):
            m32 = 0.0
        shift = _madd(-(mean[c] - <double>m32), scale[c], shift64[c])
        mean32[c] = m32
        scale32[c] = <float>scale[c]
        shift32[c] = <float>shift
        ok32[c] = _f32_coefs_ok(mean[c], scale[c], shift)


cdef inline bint _all_set(const unsigned char* flags, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef unsigned char all_set = 1
    for i in range(n):
        all_set = all_set & flags[i]
    return all_set


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
    Affine af           # mean, scale, shift as above, and their float32 form


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
    cdef double* invstd = cf.invstd
    cdef double* scale = cf.scale
    cdef double* shift = cf.shift
    cdef const double* var = cf.var
    cdef const double* weight = cf.weight
    cdef const double* bias = cf.bias
    cdef double eps = cf.eps
    for c in range(c0, c1):
        invstd[c] = 1.0 / sqrt(var[c] + eps)
    if not cf.renorm:
        # the plain form over local pointers, which the compiler vectorizes
        for c in range(c0, c1):
            scale[c] = weight[c] * invstd[c] if weight != NULL else invstd[c]
            shift[c] = bias[c] if bias != NULL else 0.0
        _affine32(&cf.af, c0, c1)
        return
    for c in range(c0, c1):
        w = cf.weight[c] if cf.weight != NULL else 1.0
        b = cf.bias[c] if cf.bias != NULL else 0.0
        # y = w * ((x - mean) * invstd * r + d) + b, r and d from the pre-update running
        # stats
        r = _clip(sqrt(cf.var[c] + cf.eps) / cf.run_std[c], cf.rmin, cf.rmax)
        d = _clip((cf.mean[c] - cf.run_mean[c]) / cf.run_std[c], -cf.dmax, cf.dmax)
        cf.r[c] = r
        cf.d[c] = d
        cf.scale[c] = w * r * cf.invstd[c]
        cf.shift[c] = _madd(w, d, b)
    _affine32(&cf.af, c0, c1)


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
    double* gmean       # sum(g) / m in training (k0 = -gmean * a), else 0
    # float32 data (else NULL): the mean rounded to float32 and what it leaves, and dx in
    # float32 as ((g - gmean32) - gmean_lo32) * a32 + ((x - mean32) * kx32 + c32), with
    # c32 = -(mean - mean32) * kx, usable where ok32[c] (see planar_blocks.pxi)
    float* mean32
    double* mean_lo
    float* gmean32
    float* gmean_lo32
    float* a32
    float* kx32
    float* c32
    unsigned char* ok32
    # the two phases of a backward apart (fastbn.distributed: the sums of every process
    # are added between them): NULL, or (2, nc) arrays of sum(g) then sum(g * (x - mean))
    Py_ssize_t nc
    double* sums        # receives this call's sums (its reduction phase)
    const double* given # the sums to use, of m values per channel (no reduction phase)
    # the fused ReLU's backward (Work.ymask): dy where y > 0, else dy * slope (slope 0: 0);
    # with inverse (slope > 0), x is y itself, read as the pre-activation (y / slope where
    # y <= 0): the backward from the output of a leaky ReLU
    double slope
    bint inverse


cdef inline LeakyInverse _leaky_inverse(const Grad* gd) noexcept nogil:
    """The LeakyInverse tag of gd's slope (gd.inverse: the backward from the output)."""
    cdef LeakyInverse v
    v.slope = gd.slope
    v.inverse = 1.0 / gd.slope
    return v


cdef inline floating _grad_at(const floating* g, const floating* ym, Py_ssize_t i,
                              const Grad* gd) noexcept nogil:
    """g[i] as gd's variant takes it (ym NULL: plain), chosen at run time: for loops off
    the hot paths (the sums summed again in double)."""
    if ym == NULL:
        return g[i]
    if gd.slope == 0:
        return _masked(g[i], ym[i])
    return _leaky_g(g[i], ym[i], <floating>gd.slope)


cdef inline floating _x_at(const floating* x, Py_ssize_t i, const Grad* gd) noexcept nogil:
    """x[i] as gd's variant reads it: the pre-activation in the backward from the output."""
    if gd.inverse:
        return x[i] * (<floating>1 if x[i] > 0 else <floating>(1.0 / gd.slope))
    return x[i]


cdef void _grad_coefs(Grad* gd, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """dweight, dbias and the dx constants of channels [c0, c1) from their two sums, which
    wait in dbias (sum(g)) and dweight (sum(g * (x - mean))). Loops along the channels over
    local pointers, which the compiler vectorizes (a rows call may have thousands of
    channels and few rows); each channel's values are computed as one at a time would be."""
    cdef double* dweight = gd.dweight
    cdef double* dbias = gd.dbias
    cdef const double* invstd = gd.invstd
    cdef const double* weight = gd.weight
    cdef double* a = gd.a
    cdef double* kx = gd.kx
    cdef double* k0 = gd.k0
    cdef double* gmean = gd.gmean
    cdef double* sums = gd.sums
    cdef double m = gd.m
    cdef Py_ssize_t c, nc = gd.nc
    cdef double istd, ac, gm, c32
    cdef float gm32
    if sums != NULL:
        for c in range(c0, c1):
            sums[c] = dbias[c]
            sums[nc + c] = dweight[c]
    if weight != NULL:
        for c in range(c0, c1):
            a[c] = invstd[c] * weight[c]
    else:
        for c in range(c0, c1):
            a[c] = invstd[c]
    if gd.training:
        # dx = (g - sum_g/m - (x - mean) * dot/m * istd^2) * a
        for c in range(c0, c1):
            istd = invstd[c]
            gm = dbias[c] / m
            gmean[c] = gm
            k0[c] = -gm * a[c]
            kx[c] = -(dweight[c] / m * istd * istd) * a[c]
    else:
        for c in range(c0, c1):
            gmean[c] = 0.0
            k0[c] = 0.0
            kx[c] = 0.0
    for c in range(c0, c1):
        dweight[c] = dweight[c] * invstd[c]
    if gd.mean32 == NULL:
        return
    cdef const double* mean = gd.mean
    cdef const double* mean_lo = gd.mean_lo
    cdef float* gmean32 = gd.gmean32
    cdef float* gmean_lo32 = gd.gmean_lo32
    cdef float* a32 = gd.a32
    cdef float* kx32 = gd.kx32
    cdef float* c32s = gd.c32
    cdef unsigned char* ok32 = gd.ok32
    for c in range(c0, c1):
        gm = gmean[c]
        gm32 = <float>gm              # then chosen, as in _affine32
        if not _f32_bounded(gm):
            gm32 = 0.0
        c32 = -mean_lo[c] * kx[c]
        gmean32[c] = gm32
        gmean_lo32[c] = <float>(gm - <double>gm32)
        a32[c] = <float>a[c]
        kx32[c] = <float>kx[c]
        c32s[c] = <float>c32
        ok32[c] = _dx32_ok(mean[c], gm, a[c], kx[c], c32)


# ---------------------------------------------------------------------------------------------
# One call's work, for the scheduling skeletons of planar.pxi and rows.pxi
# ---------------------------------------------------------------------------------------------

cdef enum:
    REDUCE = 1          # Work.phases: the reduction (statistics, or the backward's sums)
    APPLY = 2           # the elementwise pass (y, or dx)


cdef struct Work:
    int op              # TRAIN (a = x, out = y) or BACKWARD (a = g, b = x, out = dx)
    int dtype           # of the data (DType): the 16-bit types run through half.pxi
    Coef* cf            # TRAIN
    Grad* gd            # BACKWARD
    double* part        # per-chunk partial results
    bint multi_row      # rows kernels: several rows per sweep in the reduction (_multi_row)
    bint stream         # store the output with non-temporal stores (it exceeds the caches)
    int phases          # REDUCE | APPLY: the phases to run (the coefficients always are)
    # the fused epilogue (fastbn.batch_norm_relu_*), every array laid out as the data:
    bint relu           # forward: y = max(y, 0)
    const void* res     # forward: a residual added before the ReLU, or NULL
    const void* ymask   # backward: the forward's y; dy counts where y > 0, or NULL
    void* dres          # backward: receives the masked dy (the residual's gradient), or NULL
    unsigned char* bits # backward with ymask: y > 0 as bits, written by the reduction and
                        # read by the dx pass instead of y (or NULL: it reads y); with
                        # kept_bits, the forward's (then ymask is NULL: y is not read)
    Py_ssize_t bits_stride  # bytes of bits per row (rows) or per run of a block (planar)
    bint kept_bits      # backward: w.bits are given (the layer kept them), read by both passes
    unsigned char* keep # training forward with relu: receives y > 0 as bits (or NULL), laid
                        # out as the backward's (bits_stride bytes per row or run)
    # out of memory inside the kernel (the rows reductions' per-call scratch, allocated by
    # each thread where it works: _kernel_alloc): failed[0] is set, and the entry point
    # raises MemoryError instead of returning what the missing scratch left (NaN)
    int* failed
    Py_ssize_t alloc_limit  # for tests: a larger allocation fails (-1: no limit)


cdef inline void* _kernel_alloc(const Work* w, size_t n) noexcept nogil:
    """malloc(n) inside a kernel, by the thread that uses it (in its own malloc arena:
    one block for all threads allocated before the kernel measured 7-12 % slower on small
    2-thread channels-last calls); NULL, with w.failed set, when it cannot be had."""
    cdef void* p = NULL
    if not 0 <= w.alloc_limit < <Py_ssize_t>n:
        p = malloc(n)
    if p == NULL:
        w.failed[0] = 1
    return p
