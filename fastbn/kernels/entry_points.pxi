# Python entry points of the kernels, called by fastbn/functional.py with validated, canonical
# arrays (the view, PLANAR or ROWS, and its dimensions), and the memory-bandwidth yardsticks
# of the speed table. Arrays are taken as raw pointers (no buffer acquisition: small calls
# stay cheap); each entry re-checks what would make a pointer unsafe, so a wrong internal
# call raises, never crashes.

from fastbn._arrays cimport _native, _param_ok, _running_pair_ok, _vec

cnp.import_array()

cdef extern from "build_info.h":
    const char* FASTBN_CFLAGS
    const char* FASTBN_SIMD
    const char* FASTBN_CC_VERSION


cdef extern from "stream.h":
    bint FASTBN_STREAMS


def streaming_stores():
    """Whether this build writes with streaming (non-temporal) stores; without them (builds
    for CPUs other than x86) a 'streamed' output is an ordinary copy of a staged block, a
    detour that costs a pass, so fastbn._memory never asks for it."""
    return bool(FASTBN_STREAMS)


def build_flags():
    """Compiler flags, compiler version and vector instruction set the kernels were built with."""
    return "%s (SIMD: %s; compiler %s)" % (FASTBN_CFLAGS.decode(), FASTBN_SIMD.decode(),
                                          FASTBN_CC_VERSION.decode())


# Largest kernel scratch allocation in bytes, -1 for no limit: for tests, which make an
# allocation fail as an exhausted memory would (scratch_limit).
cdef Py_ssize_t _scratch_limit = -1


def scratch_limit(limit):
    """For tests: make every kernel scratch allocation of more than `limit` bytes fail as
    an exhausted memory would (the call raises MemoryError); None lifts the limit. Returns
    the previous limit."""
    global _scratch_limit
    previous = None if _scratch_limit < 0 else _scratch_limit
    _scratch_limit = -1 if limit is None else limit
    return previous


def group_bytes(n):
    """Set how many bytes of data a planar group of channels may hold between its
    statistics (or sums) and its elementwise pass, n > 0 (fastbn._dispatch sets half the
    L2 cache the CPU reports); returns the previous value. Results do not depend on it."""
    global _group_bytes
    if n <= 0:
        raise ValueError(f"group_bytes takes a positive byte count, got {n}")
    previous = _group_bytes
    _group_bytes = n
    return previous


cdef int _check_alloc(const Work* w) except -1:
    """MemoryError if a kernel's scratch allocation failed (see _kernel_alloc)."""
    if w.failed[0]:
        raise MemoryError("fastbn: out of memory for a kernel's scratch")
    return 0


cdef Py_ssize_t _partials(int view, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                          Py_ssize_t reduce_bytes) noexcept:
    """Doubles of scratch for the per-chunk partial results."""
    cdef Planar p
    cdef Py_ssize_t rpc
    if view == PLANAR:
        p = _planar(N, C, S, reduce_bytes)
        return 3 * C * p.nchunk
    rpc = _rows_per_chunk(N, C)
    return 2 * C * ((N + rpc - 1) // rpc)


cdef int _dtype_code(cnp.ndarray x):
    """The DType of x's elements, or -1 for any other dtype."""
    cdef int t = cnp.PyArray_TYPE(x)
    if t == cnp.NPY_FLOAT32:
        return F32
    if t == cnp.NPY_FLOAT64:
        return F64
    if t == cnp.NPY_FLOAT16:
        return F16
    if (cnp.PyArray_ISUSERDEF(x) and cnp.PyArray_ITEMSIZE(x) == 2
            and x.dtype.name == "bfloat16"):
        return BF16
    return -1


cdef int _data_type(cnp.ndarray x, cnp.ndarray y, Py_ssize_t size,
                    bint y_written=True) except -1:
    """The DType of the data; checks x and y are contiguous, aligned, native, of one dtype
    and `size` long, and y writable (when y_written)."""
    cdef int t = cnp.PyArray_TYPE(x)
    cdef int dtype = _dtype_code(x)
    if dtype < 0:
        raise TypeError("kernel data must be float32, float64, float16 or bfloat16")
    if cnp.PyArray_TYPE(y) != t:
        raise TypeError("kernel input and output dtypes differ")
    if not (cnp.PyArray_IS_C_CONTIGUOUS(x) and cnp.PyArray_IS_C_CONTIGUOUS(y)
            and _native(x) and _native(y)):
        raise ValueError("kernel arrays must be C-contiguous, aligned, in native byte order")
    if cnp.PyArray_SIZE(x) != size or cnp.PyArray_SIZE(y) != size:
        raise ValueError("kernel arrays do not match the shape")
    if y_written and not cnp.PyArray_ISWRITEABLE(y):
        raise ValueError("kernel output is read-only")
    return dtype


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


# bytes per channel of an Affine's float32 form (mean32, scale32, shift32, ok32)
cdef enum:
    _AFFINE32_BYTES = 3 * sizeof(float) + 1


cdef void _affine_arrays(Affine* af, const double* mean, const double* scale,
                         const double* shift, char* mem, Py_ssize_t C,
                         double slope) noexcept nogil:
    """af over the double coefficients, its float32 form in mem (_AFFINE32_BYTES * C), and
    the fused ReLU's slope below 0 (0: max(v, 0))."""
    af.slope = slope
    af.mean = mean
    af.scale = scale
    af.shift = shift
    af.mean32 = <float*>mem
    af.scale32 = af.mean32 + C
    af.shift32 = af.mean32 + 2 * C
    af.ok32 = <unsigned char*>(af.mean32 + 3 * C)


cdef void _check_dims(int view, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                      int nthreads) except *:
    if view not in (PLANAR, ROWS) or N < 1 or C < 1 or S < 1 or nthreads < 1:
        raise ValueError("bad kernel dimensions")
    if view == ROWS and S != 1:
        raise ValueError("rows kernels take S = 1")


cdef const void* _like_data(object a, cnp.ndarray x, bint writable=False) except? NULL:
    """The data pointer of a (NULL for None): an array of x's dtype and size, C-contiguous,
    aligned, native (the residual, the forward's y, the residual's gradient)."""
    cdef cnp.ndarray arr
    if a is None:
        return NULL
    arr = <cnp.ndarray?>a
    if (cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(x) or cnp.PyArray_SIZE(arr) != cnp.PyArray_SIZE(x)
            or not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not _native(arr)
            or (writable and not cnp.PyArray_ISWRITEABLE(arr))):
        raise ValueError("kernel epilogue arrays must match the data")
    return cnp.PyArray_DATA(arr)


cdef void _run(int view, const Planar* p, const void* a, const void* b, void* out,
               const Work* w, int nthreads) noexcept nogil:
    """A reduction kernel (training forward or backward) on the view."""
    if view == PLANAR:
        _planar_run(p, a, b, out, w, nthreads)
    else:
        _rows_run(a, b, out, p.N, p.C, w, nthreads)


def schedule(int view, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int nthreads):
    """How a training forward or a backward on this view is split among nthreads threads:
    "serial", "planar groups" (whole channels per thread), "planar team" (threads share
    each channel), "rows chunks" (chunks of rows), or "rows columns" (one chunk of few
    rows whose channels the threads split); planar views of planes longer than BLOCK add
    ", long planes". For tests and for reading the code (tests/cases.py)."""
    cdef Py_ssize_t rpc
    _check_dims(view, N, C, S, nthreads)
    if view == PLANAR:
        long_planes = ", long planes" if S > BLOCK else ""
        if nthreads == 1:
            return "serial" + long_planes
        return ("planar groups" if C >= 4 * nthreads else "planar team") + long_planes
    if nthreads == 1:
        return "serial"
    rpc = _rows_per_chunk(N, C)
    return "rows columns" if (N + rpc - 1) // rpc == 1 else "rows chunks"


cdef Work _new_work(int op, int dtype, int phases, int* failed) noexcept:
    """A Work with every other field zero (nothing fused, no partials, no mask bits,
    streaming off); the caller sets what its call needs."""
    cdef Work w
    memset(&w, 0, sizeof(Work))
    w.op = op
    w.dtype = dtype
    w.phases = phases
    w.failed = failed
    w.alloc_limit = _scratch_limit
    return w


cdef int _set_epilogue(Work* w, cnp.ndarray x, residual, bint relu, double slope) except -1:
    """The forward's fused epilogue y = max(y + residual, 0) (residual None: no add), the
    leaky ReLU's y + residual where >= 0, else (y + residual) * slope, for a slope > 0."""
    if residual is not None and not relu:
        raise ValueError("the kernels add a residual only before the ReLU")
    _check_slope(slope, relu)
    w.res = _like_data(residual, x)
    w.relu = relu
    return 0


cdef int _check_slope(double slope, bint masked) except -1:
    """A fused ReLU's slope below 0: finite and >= 0, and > 0 only with the ReLU (masked)."""
    if not (0 <= slope < INFINITY):
        raise ValueError("kernel slope must be finite and >= 0")
    if slope != 0 and not masked:
        raise ValueError("kernel slope needs the fused ReLU")
    return 0


def train_forward(cnp.ndarray x, cnp.ndarray y, int view, Py_ssize_t N, Py_ssize_t C,
                  Py_ssize_t S, weight, bias, double eps, cnp.ndarray stats, renorm,
                  int nthreads, bint stream=False, residual=None, bint relu=False,
                  bits=None, double negative_slope=0.0):
    """Training forward on a canonical view.

    view PLANAR: x is (N, C, S); view ROWS: x is (N, C) rows and S is 1. x, y: C-contiguous,
    one float dtype (y may be x). weight, bias: float32 or float64 (C,), or None. stats:
    float64 (5, C), receives mean, biased var, invstd, scale, shift. renorm: None, or
    (running_mean, running_std, r_out, d_out, rmin, rmax, dmax) with float64 (C,) arrays,
    for Batch Renormalization (running_mean and running_std may also be float32). stream:
    write y with non-temporal stores (an output larger than the caches). residual (an array
    laid out as x, or None) and relu: the fused epilogue y = max(y + residual, 0). bits
    (with relu, float32 data: a uint8 array of kept_bits_size bytes, or None) receives the
    mask y > 0 for a backward that reads it instead of y (backward's kept_bits).
    negative_slope (with relu, > 0, no bits): the leaky ReLU, y * negative_slope below 0."""
    _train(x, y, view, N, C, S, weight, bias, eps, stats, renorm, nthreads, stream,
           residual, relu, REDUCE | APPLY, bits, negative_slope)


def train_statistics(cnp.ndarray x, int view, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                     cnp.ndarray stats, int nthreads):
    """The statistics pass of a training forward alone: stats (float64 (5, C)) receives
    this data's mean and biased var in its first two rows (fastbn.distributed merges them
    across processes)."""
    _train(x, x, view, N, C, S, None, None, 0.0, stats, None, nthreads, False, None,
           False, REDUCE, None)


cdef int _train(cnp.ndarray x, cnp.ndarray y, int view, Py_ssize_t N, Py_ssize_t C,
                Py_ssize_t S, weight, bias, double eps, cnp.ndarray stats, renorm,
                int nthreads, bint stream, residual, bint relu, int phases,
                bits, double slope=0) except -1:
    cdef Coef cf
    cdef Planar p
    cdef double* part
    cdef Py_ssize_t npart, reduce_bytes
    cdef int failed = 0
    cdef Work w = _new_work(TRAIN, 0, phases, &failed)
    _check_dims(view, N, C, S, nthreads)
    w.dtype = _data_type(x, y, N * C * S, phases & APPLY)
    reduce_bytes = N * C * S * cnp.PyArray_ITEMSIZE(x)
    npart = _partials(view, N, C, S, reduce_bytes)
    p = _planar(N, C, S, reduce_bytes)
    # the partials, then weight, bias, running mean and std (C doubles each), then the
    # float32 form of the affine coefficients
    part = <double*>malloc((npart + 4 * C) * sizeof(double) + _AFFINE32_BYTES * C)
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
        _affine_arrays(&cf.af, cf.mean, cf.scale, cf.shift, <char*>(part + npart + 4 * C), C,
                       slope)
        _renorm(&cf, renorm, C, part + npart + 2 * C)
        w.cf = &cf
        w.part = part
        # float32 and 16-bit statistics sweep four rows at a time whatever the size: with
        # the prefetch, on 103 MB of float32 (C = 64 and 256) and 51 MB (C = 512) that pass
        # took 1.35-2.2x a read pass against 1.8-2.5x one row at a time (Intel Xeon, 2
        # threads, NHWC). float64 keeps its sums' order (_multi_row), so its bits.
        w.multi_row = _multi_row(C, reduce_bytes) or w.dtype != F64
        w.stream = stream
        _set_epilogue(&w, x, residual, relu, slope)
        if bits is not None:
            if not relu or slope != 0:
                raise ValueError("kernel mask bits need relu, not leaky")
            w.keep = _kept_bits(bits, view, N, C, S, w.dtype)
            w.bits_stride = _kept_stride(view, N, C, S, w.dtype)
        with nogil:
            _run(view, &p, cnp.PyArray_DATA(x), cnp.PyArray_DATA(x), cnp.PyArray_DATA(y), &w,
                 nthreads)
        _check_alloc(&w)
    finally:
        free(part)
    return 0


cdef int _renorm(Coef* cf, renorm, Py_ssize_t C, double* slots) except -1:
    """Batch Renormalization's arguments into cf (renorm None: plain Batch Normalization);
    slots: 2 C doubles for the running mean and std when they are float32."""
    cf.renorm = 0
    if renorm is None:
        return 0
    cf.renorm = 1
    cf.run_mean = _param(renorm[0], C, slots)
    cf.run_std = _param(renorm[1], C, slots + C)
    cf.r = _vec(renorm[2], C)
    cf.d = _vec(renorm[3], C)
    cf.rmin = renorm[4]
    cf.rmax = renorm[5]
    cf.dmax = renorm[6]
    return 0


def infer_forward(cnp.ndarray x, cnp.ndarray y, int view, Py_ssize_t N, Py_ssize_t C,
                  Py_ssize_t S, running_mean, running_var, weight, bias, double eps,
                  int nthreads, bint divisor_is_std=False, bint stream=False, residual=None,
                  bint relu=False, double negative_slope=0.0):
    """y = (x - running_mean) * weight / sqrt(running_var + eps) + bias on a canonical view
    (see train_forward); the per-channel vectors are float32 or float64 (C,), weight/bias
    may be None. With divisor_is_std, running_var holds a standard deviation and
    y = (x - running_mean) * weight / running_var + bias (eps is not used). residual and
    relu: the fused epilogue y = max(y + residual, 0); negative_slope (> 0, with relu): the
    leaky ReLU, y * negative_slope below 0."""
    _infer(x, y, view, N, C, S, running_mean, running_var, weight, bias, eps, nthreads,
           divisor_is_std, stream, residual, relu, negative_slope)


cdef int _infer(cnp.ndarray x, cnp.ndarray y, int view, Py_ssize_t N, Py_ssize_t C,
                Py_ssize_t S, running_mean, running_var, weight, bias, double eps,
                int nthreads, bint divisor_is_std, bint stream, residual,
                bint relu, double slope=0) except -1:
    cdef Planar p
    cdef Affine af
    cdef Work work = _new_work(INFER, 0, APPLY, NULL)
    cdef int dtype
    cdef Py_ssize_t c
    cdef const double* rm
    cdef const double* rv
    cdef const double* w
    cdef const double* b
    cdef double* coef
    _check_dims(view, N, C, S, nthreads)
    dtype = _data_type(x, y, N * C * S)
    work.dtype = dtype
    work.stream = stream
    _set_epilogue(&work, x, residual, relu, slope)
    p = _planar(N, C, S, 0)
    coef = <double*>malloc(6 * C * sizeof(double) + _AFFINE32_BYTES * C)
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
            _affine_arrays(&af, rm, coef, coef + C, <char*>(coef + 6 * C), C, slope)
            if dtype != F64:
                _affine32(&af, 0, C)
            if view == PLANAR:
                _planar_infer(&p, cnp.PyArray_DATA(x), cnp.PyArray_DATA(y), &af, &work, nthreads)
            else:
                _rows_infer(cnp.PyArray_DATA(x), cnp.PyArray_DATA(y), N, C, &af, &work, nthreads)
    finally:
        free(coef)
    return 0


def backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, int view, Py_ssize_t N,
             Py_ssize_t C, Py_ssize_t S, mean, invstd, weight, bint training,
             cnp.ndarray grads, int nthreads, bint stream=False, ymask=None, dres=None,
             kept_bits=None, double negative_slope=0.0, bint from_output=False):
    """dx (may be g itself), and dweight, dbias into grads ((2, C), C-contiguous float64,
    or float32: computed in double, rounded once) on a canonical view (see train_forward);
    mean, invstd, weight: float32 or float64 (C,), weight may be None. ymask (the fused
    ReLU's forward output, laid out as g): dy counts where y > 0 only; dres receives that
    masked dy (or None). kept_bits (instead of ymask): the mask as the training forward
    kept it (train_forward's bits); y is not read then. The same bits as with ymask.
    negative_slope (> 0, with ymask): the leaky ReLU's, dy * negative_slope where y <= 0.
    from_output (with negative_slope > 0 and ymask, which is x itself): x is the leaky ReLU's
    output, read as its pre-activation (x / negative_slope where x <= 0)."""
    _backward(g, x, dx, view, N, C, S, mean, invstd, weight, training, grads, nthreads,
              stream, ymask, dres, REDUCE | APPLY, None, 0, kept_bits, negative_slope,
              from_output)


def backward_sums(cnp.ndarray g, cnp.ndarray x, int view, Py_ssize_t N, Py_ssize_t C,
                  Py_ssize_t S, mean, invstd, cnp.ndarray sums, int nthreads):
    """The reduction of a training backward alone: sums (float64 (2, C)) receives this
    data's sum(g) and sum(g * (x - mean)); no dx (fastbn.distributed adds the sums of
    every process)."""
    _backward(g, x, x, view, N, C, S, mean, invstd, None, True, np.empty((2, C)), nthreads,
              False, None, None, REDUCE, sums, 0, None)


def backward_dx(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, int view, Py_ssize_t N,
                Py_ssize_t C, Py_ssize_t S, mean, invstd, weight, cnp.ndarray sums,
                double count, int nthreads, bint stream=False):
    """dx of a training backward from given sums (float64 (2, C), as backward_sums gives
    them, over `count` values per channel); this data is not reduced."""
    if count <= 0:
        raise ValueError("kernel sums need a count")
    _backward(g, x, dx, view, N, C, S, mean, invstd, weight, True, np.empty((2, C)),
              nthreads, stream, None, None, APPLY, sums, count, None)


# The backward's per-channel scratch, after the partials: C doubles for each of these...
cdef enum GradSlot:
    G_A, G_KX, G_K0, G_MEAN, G_INVSTD, G_WEIGHT, G_DWEIGHT, G_DBIAS, G_GMEAN, G_MEAN_LO,
    G_DOUBLES
# ...then C floats for each of mean32, gmean32, gmean_lo32, a32, kx32, c32, and C bytes ok32
cdef Py_ssize_t G_FLOATS = 6


cdef int _grad_slots(Grad* gd, double* slots, Py_ssize_t C, mean, invstd, weight,
                     grads, bint float32_data, float** grads32) except -1:
    """Set gd's per-channel arrays over `slots` (see GradSlot); dweight and dbias go to
    grads when it is float64, else to slots and then, rounded, to grads32[0]."""
    cdef Py_ssize_t c
    cdef float* f
    grads32[0] = NULL
    if (cnp.PyArray_TYPE(grads) == cnp.NPY_FLOAT32 and cnp.PyArray_IS_C_CONTIGUOUS(grads)
            and cnp.PyArray_SIZE(grads) >= 2 * C and cnp.PyArray_ISWRITEABLE(grads)
            and _native(grads)):
        grads32[0] = <float*>cnp.PyArray_DATA(grads)
    gd.a = slots + G_A * C
    gd.kx = slots + G_KX * C
    gd.k0 = slots + G_K0 * C
    gd.dweight = slots + G_DWEIGHT * C if grads32[0] != NULL else _vec(grads, 2 * C)
    gd.dbias = gd.dweight + C
    gd.mean = _param(mean, C, slots + G_MEAN * C)
    gd.invstd = _param(invstd, C, slots + G_INVSTD * C)
    gd.weight = _param(weight, C, slots + G_WEIGHT * C, True)
    gd.gmean = slots + G_GMEAN * C
    gd.mean32 = NULL
    gd.mean_lo = NULL
    if float32_data:            # the float32 form of the mean (see planar_blocks.pxi)
        gd.mean_lo = slots + G_MEAN_LO * C
        f = <float*>(slots + G_DOUBLES * C)
        gd.mean32, gd.gmean32, gd.gmean_lo32 = f, f + C, f + 2 * C
        gd.a32, gd.kx32, gd.c32 = f + 3 * C, f + 4 * C, f + 5 * C
        gd.ok32 = <unsigned char*>(f + G_FLOATS * C)
        for c in range(C):
            gd.mean32[c] = <float>gd.mean[c] if _f32_bounded(gd.mean[c]) else 0.0
            gd.mean_lo[c] = gd.mean[c] - <double>gd.mean32[c]
    return 0


cdef int _mask(Work* w, int view, Planar* p, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
               cnp.ndarray x, ymask, dres, bint training, Py_ssize_t reduce_bytes,
               int nthreads, unsigned char** bits, kept) except -1:
    """The fused ReLU's backward: the mask y (ymask) or the forward's kept bits (kept), the
    residual's gradient (dres) and, where they pay, the mask bits kept between the two
    passes (allocated into bits[0])."""
    w.ymask = _like_data(ymask, x)
    w.dres = <void*>_like_data(dres, x, True)
    if kept is not None:
        if w.ymask != NULL or w.phases != REDUCE | APPLY:
            raise ValueError("kernel kept bits replace ymask, in a whole backward")
        w.bits = _kept_bits(kept, view, N, C, S, w.dtype)
        w.bits_stride = _kept_stride(view, N, C, S, w.dtype)
        w.kept_bits = True
        return 0
    if w.dres != NULL and w.ymask == NULL:
        raise ValueError("kernel dres needs ymask")
    if w.ymask != NULL and w.phases == REDUCE | APPLY and w.gd.slope == 0:
        w.bits_stride = _bits_stride(view, N, C, S, w.dtype == F32, training, reduce_bytes,
                                     nthreads)
    if w.bits_stride:
        bits[0] = <unsigned char*>malloc(w.bits_stride * (N if view == ROWS else
                                                          N * C * p.pieces))
        if bits[0] == NULL:
            raise MemoryError()
        w.bits = bits[0]
    return 0


cdef int _backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, int view, Py_ssize_t N,
                   Py_ssize_t C, Py_ssize_t S, mean, invstd, weight, bint training,
                   cnp.ndarray grads, int nthreads, bint stream, ymask, dres, int phases,
                   sums, double count, kept, double slope=0, bint inverse=False) except -1:
    cdef Planar p
    cdef Grad gd
    cdef double* part
    cdef float* grads32 = NULL
    cdef Py_ssize_t c, npart, reduce_bytes
    cdef unsigned char* bits = NULL
    cdef int failed = 0
    cdef Work w = _new_work(BACKWARD, 0, phases, &failed)
    _check_dims(view, N, C, S, nthreads)
    w.dtype = _data_type(x, dx, N * C * S, phases & APPLY)
    if _data_type(g, dx, N * C * S, phases & APPLY) != w.dtype:
        raise TypeError("kernel gradient dtype differs")
    _check_slope(slope, ymask is not None)
    if inverse and (slope == 0 or dres is not None or _like_data(ymask, x) !=
                    <const void*>cnp.PyArray_DATA(x)):
        raise ValueError("kernel from_output needs a slope > 0, ymask = x and no dres")
    if slope != 0 and kept is not None:
        raise ValueError("kernel kept bits are the ReLU's, not a leaky one's")
    gd.slope = slope
    gd.inverse = inverse
    gd.training = training
    gd.m = <double>(N * S) if phases & REDUCE else count
    gd.nc = C
    gd.sums = _vec(sums, 2 * C) if phases == REDUCE else NULL
    gd.given = _vec(sums, 2 * C) if phases == APPLY else NULL
    reduce_bytes = 2 * N * C * S * cnp.PyArray_ITEMSIZE(x)
    npart = _partials(view, N, C, S, reduce_bytes)
    p = _planar(N, C, S, reduce_bytes)
    part = <double*>malloc((npart + G_DOUBLES * C) * sizeof(double) +
                           (G_FLOATS * sizeof(float) + 1) * C)
    if part == NULL:
        raise MemoryError()
    try:
        _grad_slots(&gd, part + npart, C, mean, invstd, weight, grads, w.dtype != F64,
                    &grads32)
        w.gd = &gd
        w.part = part
        w.multi_row = _multi_row(C, reduce_bytes)
        w.stream = stream
        _mask(&w, view, &p, N, C, S, x, ymask, dres, training, reduce_bytes, nthreads, &bits,
              kept)
        with nogil:
            _run(view, &p, cnp.PyArray_DATA(g), cnp.PyArray_DATA(x), cnp.PyArray_DATA(dx),
                 &w, nthreads)
        _check_alloc(&w)
        if grads32 != NULL:
            for c in range(2 * C):
                grads32[c] = <float>gd.dweight[c]
    finally:
        free(part)
        free(bits)
    return 0


def kept_bits_size(int view, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int itemsize):
    """Bytes of the mask bits a training forward with the fused ReLU keeps for a backward
    that reads them instead of y (train_forward's bits, backward's kept_bits), or 0 where
    that backward has no loops for them: then y is kept. See _kept_stride."""
    cdef Py_ssize_t stride
    _check_dims(view, N, C, S, 1)
    stride = _kept_stride(view, N, C, S, F32 if itemsize == 4 else F64)
    if stride == 0:
        return 0
    return stride * (N if view == ROWS else N * C * _planar(N, C, S, 0).pieces)


cdef Py_ssize_t _kept_stride(int view, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                             int dtype) noexcept:
    """Bytes per row (rows views) or per run of a block (planar) of the kept mask bits, laid
    out as _kept_run_bits says (planar) or one row after another; 0 where they are not
    kept: data other than float32, builds without the vector loops of the bits
    (HAVE_DX_BITS), no data."""
    if not (HAVE_DX_BITS and dtype == F32) or N * C * S == 0:
        return 0
    return _bits_bytes(view, C, S)


cdef Py_ssize_t _bits_bytes(int view, Py_ssize_t C, Py_ssize_t S) noexcept:
    """Bytes of mask bits per row (rows views: C bits) or per run of a block (planar: the
    longest piece of a plane, as _planar cuts them), a multiple of 8 so that the rows or
    runs of two threads never share a byte."""
    cdef Py_ssize_t longest, pieces
    if view == PLANAR:
        pieces = (S + BLOCK - 1) // BLOCK if S > BLOCK else 1
        longest = (S + pieces - 1) // pieces
        return (longest + 63) // 64 * 8
    return (C + 63) // 64 * 8


cdef unsigned char* _kept_bits(a, int view, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                               int dtype) except NULL:
    """The data of a kept-bits array, checked: writable C-contiguous uint8 of
    kept_bits_size bytes for this view and dtype."""
    cdef cnp.ndarray arr
    cdef Py_ssize_t stride = _kept_stride(view, N, C, S, dtype)
    if stride == 0:
        raise ValueError("kernel keeps no mask bits for this data")
    if not isinstance(a, cnp.ndarray):
        raise TypeError("kernel mask bits must be an ndarray")
    arr = <cnp.ndarray>a
    if (cnp.PyArray_TYPE(arr) != cnp.NPY_UINT8 or not cnp.PyArray_IS_C_CONTIGUOUS(arr)
            or not cnp.PyArray_ISWRITEABLE(arr) or cnp.PyArray_SIZE(arr) !=
            stride * (N if view == ROWS else N * C * _planar(N, C, S, 0).pieces)):
        raise ValueError("kernel mask bits: writable C-contiguous uint8 of kept_bits_size")
    return <unsigned char*>cnp.PyArray_DATA(arr)


def relu_mask_bits(int view, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int itemsize,
                   bint training, int nthreads):
    """Whether the fused ReLU's backward of data of `itemsize` bytes on this view keeps its
    mask as bits between its two passes (_bits_stride); for tests and for reading the code."""
    _check_dims(view, N, C, S, nthreads)
    return _bits_stride(view, N, C, S, itemsize == 4, training, 2 * N * C * S * itemsize,
                        nthreads) > 0


cdef Py_ssize_t _bits_stride(int view, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint f32,
                             bint training, Py_ssize_t reduce_bytes, int nthreads):
    """Bytes of the fused ReLU's mask bits per row of a rows view (a multiple of 8, so that
    the rows of two threads never share a byte), or 0: the dx pass reads y itself. Bits
    are kept for float32 data (f32) in training, in the AVX2 and AVX-512 builds: the dx
    loop of that form, _dx_bits_f32, has vector code there.

    Planar views: bytes per run of a block (each run of each sample, channel and piece of
    a plane owns its bytes, see _run_bits). The bits pay where y does not stay in cache
    between the backward's two passes: data whose dy, x and y outgrow CACHED_BYTES (rows
    views sweep all of it twice; planar views reduce and differentiate one channel group
    at a time, whose dy, x and y then outgrow L2). Where the threads split the channels
    of a rows reduction (one chunk of rows) they would share bytes: no bits there. The
    results are the same bits either way."""
    cdef Py_ssize_t rpc
    if not (HAVE_DX_BITS and f32 and training):
        return 0
    if reduce_bytes + reduce_bytes // 2 <= CACHED_BYTES:
        return 0
    if view == ROWS:
        rpc = _rows_per_chunk(N, C)
        if nthreads > 1 and (N + rpc - 1) // rpc == 1:
            return 0
    return _bits_bytes(view, C, S)


# ---------------------------------------------------------------------------------------------
# Memory-bandwidth yardsticks for the speed table: one read pass and one copy pass over an
# array, split over the same threads as the kernels (the "roofline" of training forward).
# They are compiled with the kernels, so they use the same vector instructions.
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

