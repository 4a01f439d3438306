# NCHW (planar) kernels on the (N, C, S) view: training forward (statistics, then
# normalization), inference, and backward (the fused sums, then dx).
#
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


cdef Planar _planar(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                    Py_ssize_t reduce_bytes) noexcept:
    """The blocks and chunks of an (N, C, S) input whose reduction pass reads `reduce_bytes`
    bytes (x, or g and x; 0 for inference, which has no reduction)."""
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
        if reduce_bytes > CACHED_BYTES and p.runs > FAR_RUNS:
            p.runs = FAR_RUNS
        if p.runs > N:
            p.runs = N if N > 0 else 1
        p.nblock = (N + p.runs - 1) // p.runs
    p.nchunk = p.nblock if p.nblock < MAX_CHUNKS else MAX_CHUNKS
    if p.nchunk < 1:
        p.nchunk = 1
    return p


cdef inline Block _block(const Planar* p, Py_ssize_t c, Py_ssize_t b) noexcept nogil:
    """Block b of channel c."""
    cdef Block r
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


# ---------------------------------------------------------------------------------------------
# Training forward: statistics per chunk, merged per channel, then the normalization
# ---------------------------------------------------------------------------------------------

cdef inline void _planar_chunk_stats(const Planar* p, const floating* x, Py_ssize_t c0,
                                     Py_ssize_t c1, Py_ssize_t k, double* part) noexcept nogil:
    """(count, mean, m2) of chunk k of each channel in [c0, c1), into part[3 * (c*nchunk + k)].

    Blocks are visited block-major, channel-minor: for small planes the runs of
    neighbouring channels are adjacent in memory, so the group streams through DRAM.
    Each channel still sees its own blocks in the same order, whatever the group.
    """
    cdef Py_ssize_t b, c
    cdef Block blk
    cdef double bmean, bm2
    cdef double* q
    for c in range(c0, c1):
        q = part + 3 * (c * p.nchunk + k)
        q[0] = 0
        q[1] = 0
        q[2] = 0
    for b in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            blk = _block(p, c, b)
            if blk.length > 0:
                q = part + 3 * (c * p.nchunk + k)
                _block_stats(x + blk.offset, blk, &bmean, &bm2)
                _chan_merge(&q[0], &q[1], &q[2], <double>(blk.length * blk.nrun), bmean, bm2)


cdef inline void _planar_chunk_affine(const Planar* p, const floating* x, floating* y,
                                      Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t k,
                                      const Coef* cf, bint stream, const floating* res,
                                      bint relu, unsigned char* keep,
                                      Py_ssize_t kstride) noexcept nogil:
    """y of chunk k of channels [c0, c1); with keep, the mask bits too (_kept_run_bits,
    kstride bytes per run)."""
    cdef Py_ssize_t b, c
    cdef Block blk
    for b in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            blk = _block(p, c, b)
            _affine(x + blk.offset, y + blk.offset, blk.length, blk.nrun, blk.stride, &cf.af,
                    c, stream, res + blk.offset if res != NULL else NULL, relu,
                    _kept_run_bits(p, keep, kstride, c, b) if keep != NULL else NULL,
                    kstride)


cdef inline void _merge_stats(const double* part, Py_ssize_t nchunk,
                              double* mean, double* var) noexcept nogil:
    """Merge nchunk (count, mean, m2) triples in order; biased variance."""
    cdef double n = 0, m = 0, m2 = 0
    cdef Py_ssize_t k
    for k in range(nchunk):
        _chan_merge(&n, &m, &m2, part[3 * k], part[3 * k + 1], part[3 * k + 2])
    mean[0] = m
    var[0] = m2 / n if n > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Backward: the two sums per chunk, added per channel, then dx
# ---------------------------------------------------------------------------------------------

cdef inline unsigned char* _run_bits(const Planar* p, unsigned char* bits, Py_ssize_t stride,
                                     Py_ssize_t c, Py_ssize_t b) noexcept nogil:
    """The mask bits of the first run of block b of channel c: each run (sample n, channel
    c, piece q) owns `stride` bytes, at run index (n * C + c) * pieces + q; the next run of
    a block (the next sample) is C * stride bytes on."""
    cdef Py_ssize_t n, q
    if p.pieces == 1:
        return bits + (b * p.runs * p.C + c) * stride
    n = b // p.pieces
    q = b - n * p.pieces
    return bits + ((n * p.C + c) * p.pieces + q) * stride


cdef inline unsigned char* _kept_run_bits(const Planar* p, unsigned char* bits,
                                          Py_ssize_t stride, Py_ssize_t c,
                                          Py_ssize_t b) noexcept nogil:
    """The kept mask bits (a training forward's, for its backward) of the first run of block
    b of channel c. They are channel-major, so that each pass reads a channel's bits as one
    sequential stream: run (n, c, q) at ((c * N + n) * pieces + q) * stride; the next run
    of a block (the next sample) is stride bytes on. (The same (N, C, S) gives the forward
    and the backward the same pieces, and a block's runs are consecutive samples whatever
    the number of runs per block of either.)"""
    if p.pieces == 1:
        return bits + (c * p.N + b * p.runs) * stride
    return bits + (c * p.nblock + b) * stride         # b = n * pieces + q


cdef inline void _kept_block_sums(const float* g, const float* x, Block blk,
                                  const unsigned char* rb, Py_ssize_t bstride, double mean,
                                  double* sum_g, double* dot, float* gs,
                                  float* xs) noexcept nogil:
    """_block_sums of one block's g masked by the kept bits (run r's at rb + r * bstride)
    through L1 stages: g masked into gs, and, for a block of several runs, x copied into
    xs, the runs packed one after the other (a block holds at most BLOCK values); the
    block's arithmetic does not depend on where its runs lie, so the same bits as the
    block masked by y."""
    cdef Block cb = blk
    cdef Py_ssize_t r
    cdef Py_ssize_t ahead = PREFETCH_BYTES if (blk.nrun == 1 and blk.length *
                                               <Py_ssize_t>sizeof(float) > PREFETCH_BYTES) else 0
    for r in range(blk.nrun):
        _masked_copy_f32(g + blk.offset + r * blk.stride, rb + r * bstride, blk.length,
                         gs + r * blk.length, ahead)
    if blk.nrun == 1:
        _block_sums(<const float*>gs, x + blk.offset, blk, mean, sum_g, dot,
                    <const float*>NULL, PLAIN)
        return
    for r in range(blk.nrun):
        memcpy(xs + r * blk.length, x + blk.offset + r * blk.stride,
               blk.length * sizeof(float))
    cb.offset = 0
    cb.stride = blk.length
    _block_sums(<const float*>gs, <const float*>xs, cb, mean, sum_g, dot,
                <const float*>NULL, PLAIN)


cdef inline void _planar_chunk_sums(const Planar* p, const floating* g, const floating* x,
                                    Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t k,
                                    const Grad* gd, double* part,
                                    const floating* ym, unsigned char* bits,
                                    Py_ssize_t bstride, bint kept) noexcept nogil:
    """sum(g), sum(g * (x - mean)) of chunk k of channels [c0, c1) into part[2*(c*nchunk+k)];
    with ym (the fused ReLU's forward output), of g masked by y > 0, in the same loops; with
    bits too, the block's mask is also stored as bits (_run_bits), from cache. kept (float32
    data): the mask is the bits the forward kept (_kept_run_bits), ANDed into the register
    lanes' loop (AVX-512, blocks of one run) or applied through L1 stages
    (_kept_block_sums): the values the masked loops take, so the same bits as with ym."""
    cdef Py_ssize_t b, c, r
    cdef Block blk
    cdef double* q
    cdef unsigned char* rb
    cdef floating gs[BLOCK]
    cdef floating xs[BLOCK]
    cdef const double* mean = gd.mean
    for c in range(c0, c1):
        q = part + 2 * (c * p.nchunk + k)
        q[0] = 0
        q[1] = 0
    for b in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            blk = _block(p, c, b)
            q = part + 2 * (c * p.nchunk + k)
            if floating is float:
                if kept and REGISTER_LANES and blk.nrun == 1:   # the bits in the lanes' loops
                    _block_sums(g + blk.offset, x + blk.offset, blk, mean[c], &q[0], &q[1],
                                <const floating*>NULL, PLAIN,
                                _kept_run_bits(p, bits, bstride, c, b))
                    continue
                if kept:                            # through L1 stages
                    _kept_block_sums(g, x, blk, _kept_run_bits(p, bits, bstride, c, b),
                                     bstride, mean[c], &q[0], &q[1], gs, xs)
                    continue
            if ym == NULL:
                _block_sums(g + blk.offset, x + blk.offset, blk, mean[c], &q[0], &q[1],
                            <const floating*>NULL, PLAIN)
            else:
                _block_sums_y(g + blk.offset, x + blk.offset, blk, mean[c], &q[0], &q[1],
                              ym + blk.offset, gd)
                if bits != NULL:
                    rb = _run_bits(p, bits, bstride, c, b)
                    for r in range(blk.nrun):
                        _pack(ym + blk.offset + r * blk.stride, blk.length,
                              rb + r * p.C * bstride)


cdef inline void _planar_chunk_dx(const Planar* p, const floating* g, const floating* x,
                                  floating* dx, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t k,
                                  const Grad* gd, bint stream, const floating* ym,
                                  floating* dres, const unsigned char* bits,
                                  Py_ssize_t bstride) noexcept nogil:
    """dx of chunk k of channels [c0, c1): masked by ym, or by the bits (vector loops,
    float32 training), or, for the kept bits where those loops do not apply (a channel in
    double, fixed statistics), by g masked into an L1 stage, run by run."""
    cdef Py_ssize_t b, c, r, off
    cdef Block blk
    cdef floating gs[BLOCK]
    for b in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            blk = _block(p, c, b)
            if (floating is float and bits != NULL and gd.training and gd.mean32 != NULL
                    and gd.ok32[c]):
                if ym == NULL:          # the kept bits
                    _dx_run_bits(g + blk.offset, x + blk.offset, dx + blk.offset, blk.length,
                                 blk.nrun, blk.stride, gd, c, stream,
                                 _kept_run_bits(p, <unsigned char*>bits, bstride, c, b),
                                 bstride, dres + blk.offset if dres != NULL else NULL)
                else:
                    _dx_run_bits(g + blk.offset, x + blk.offset, dx + blk.offset, blk.length,
                                 blk.nrun, blk.stride, gd, c, stream,
                                 _run_bits(p, <unsigned char*>bits, bstride, c, b),
                                 p.C * bstride, dres + blk.offset if dres != NULL else NULL)
                continue
            if floating is float:
                if bits != NULL and ym == NULL:
                    for r in range(blk.nrun):
                        off = blk.offset + r * blk.stride
                        _masked_copy_f32(g + off, _kept_run_bits(
                            p, <unsigned char*>bits, bstride, c, b) + r * bstride, blk.length,
                            gs, 0)
                        if dres != NULL:
                            memcpy(dres + off, gs, blk.length * sizeof(float))
                        _dx_run(<const floating*>gs, x + off, dx + off, blk.length, 1,
                                blk.stride, gd, c, stream, <const floating*>NULL,
                                <floating*>NULL)
                    continue
            _dx_run(g + blk.offset, x + blk.offset, dx + blk.offset, blk.length, blk.nrun,
                    blk.stride, gd, c, stream, ym + blk.offset if ym != NULL else NULL,
                    dres + blk.offset if dres != NULL else NULL)


cdef inline void _planar_grad_sums(const Planar* p, Grad* gd, const double* part,
                                   Py_ssize_t c) noexcept nogil:
    """Channel c's two sums, its partials added in chunk order, into dbias and dweight
    (where _grad_coefs takes them)."""
    cdef double sum_g = 0, dot = 0
    cdef Py_ssize_t k
    for k in range(p.nchunk):
        sum_g = sum_g + part[2 * (c * p.nchunk + k)]
        dot = dot + part[2 * (c * p.nchunk + k) + 1]
    gd.dbias[c] = sum_g
    gd.dweight[c] = dot


# ---------------------------------------------------------------------------------------------
# The three phases of a training forward or a backward, and their schedule
# ---------------------------------------------------------------------------------------------
# Each prange body below is one call, so that every local is private to its thread.

cdef inline void _planar_reduce_t(const Planar* p, const floating* a, const floating* b,
                                  const Work* w, Py_ssize_t c0, Py_ssize_t c1,
                                  Py_ssize_t k) noexcept nogil:
    """Chunk k's partials of channels [c0, c1) (float32 and float64 data)."""
    if w.op == TRAIN:
        _planar_chunk_stats(p, a, c0, c1, k, w.part)
    else:
        _planar_chunk_sums(p, a, b, c0, c1, k, w.gd, w.part, <const floating*>w.ymask,
                           w.bits, w.bits_stride, w.kept_bits)


cdef inline void _planar_coef(const Planar* p, const Work* w, Py_ssize_t c0,
                              Py_ssize_t c1) noexcept nogil:
    """Merge the partials of channels [c0, c1) in chunk order; then their coefficients."""
    cdef Py_ssize_t c
    if w.op == TRAIN:
        for c in range(c0, c1):
            _merge_stats(w.part + 3 * c * p.nchunk, p.nchunk, &w.cf.mean[c], &w.cf.var[c])
        _set_coefs(w.cf, c0, c1)
    else:
        for c in range(c0, c1):
            if w.gd.given != NULL:
                w.gd.dbias[c] = w.gd.given[c]
                w.gd.dweight[c] = w.gd.given[w.gd.nc + c]
            else:
                _planar_grad_sums(p, w.gd, w.part, c)
        _grad_coefs(w.gd, c0, c1)


cdef inline void _planar_apply_t(const Planar* p, const floating* a, const floating* b,
                                 floating* out, const Work* w, Py_ssize_t c0, Py_ssize_t c1,
                                 Py_ssize_t k) noexcept nogil:
    """y (or dx) of chunk k of channels [c0, c1) (float32 and float64 data)."""
    if w.op == TRAIN:
        _planar_chunk_affine(p, a, out, c0, c1, k, w.cf, w.stream, <const floating*>w.res,
                             w.relu, w.keep, w.bits_stride)
    else:
        _planar_chunk_dx(p, a, b, out, c0, c1, k, w.gd, w.stream, <const floating*>w.ymask,
                         <floating*>w.dres, w.bits, w.bits_stride)
    if w.stream:
        _stream_fence()        # the streaming stores are seen before the task ends


cdef inline void _planar_reduce(const Planar* p, const void* a, const void* b, const Work* w,
                                Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t k) noexcept nogil:
    """Chunk k's partials of channels [c0, c1), in the data type w.dtype."""
    if w.dtype == F32:
        _planar_reduce_t(p, <const float*>a, <const float*>b, w, c0, c1, k)
    elif w.dtype == F64:
        _planar_reduce_t(p, <const double*>a, <const double*>b, w, c0, c1, k)
    else:
        _planar16_reduce(p, <const half_bits*>a, <const half_bits*>b, w, c0, c1, k)


cdef inline void _planar_apply(const Planar* p, const void* a, const void* b, void* out,
                               const Work* w, Py_ssize_t c0, Py_ssize_t c1,
                               Py_ssize_t k) noexcept nogil:
    """y (or dx) of chunk k of channels [c0, c1), in the data type w.dtype."""
    if w.dtype == F32:
        _planar_apply_t(p, <const float*>a, <const float*>b, <float*>out, w, c0, c1, k)
    elif w.dtype == F64:
        _planar_apply_t(p, <const double*>a, <const double*>b, <double*>out, w, c0, c1, k)
    else:
        _planar16_apply(p, <const half_bits*>a, <const half_bits*>b, <half_bits*>out, w, c0,
                        c1, k)


# Bytes of data a planar group of channels may hold between its two passes (set from the
# L2 cache size the CPU reports: group_bytes, called by fastbn._dispatch)
cdef Py_ssize_t _group_bytes = 1 << 20


cdef inline Py_ssize_t _group_size(Py_ssize_t C, Py_ssize_t N, Py_ssize_t S,
                                   int nthreads, Py_ssize_t bytes_per_value) noexcept nogil:
    """Channels per task. Long planes (S > BLOCK) go one channel at a time: each sample's
    plane is already a long contiguous stream, and the channel stays in L2 between its
    statistics and its normalization. Short planes are grouped so that a task reads about
    GROUP_VALUES contiguous values per sample, keeping at least four tasks per thread.
    When the whole input is small enough to stay in the last-level cache, the group is
    also kept within GROUP_CACHED values, so that the second pass (normalization, dx)
    finds it in L2; for larger inputs long DRAM streams matter more (measured on AMD EPYC:
    capping (32, 512, 28, 28) to GROUP_CACHED halves its speed; capping (32, 2048, 7, 7)
    cuts backward by 25 %). Every group's data (x, or dy and x: bytes_per_value per value)
    is also kept within _group_bytes, half the L2 cache the CPU reports (fastbn._dispatch).
    Results do not depend on it."""
    cdef Py_ssize_t g, most
    if S > BLOCK:
        return 1
    g = (GROUP_VALUES + S - 1) // S
    if N * C * S <= CACHED_VALUES and g * N * S > GROUP_CACHED:
        g = GROUP_CACHED // (N * S)
    if g * N * S * bytes_per_value > _group_bytes:
        g = _group_bytes // (N * S * bytes_per_value)
    most = (C + 4 * nthreads - 1) // (4 * nthreads)
    if g > most:
        g = most
    return g if g > 0 else 1


cdef inline Py_ssize_t _work_bytes_per_value(const Work* w) noexcept nogil:
    """Bytes a call reads per value of a channel: x (training), or dy and x (backward)."""
    cdef Py_ssize_t item = 4 if w.dtype == F32 else 8 if w.dtype == F64 else 2
    return item if w.op == TRAIN else 2 * item


cdef void _planar_group(const Planar* p, const void* a, const void* b, void* out,
                        const Work* w, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """The three phases on channels [c0, c1), one after the other while they are in cache."""
    cdef Py_ssize_t k
    if w.phases & REDUCE:
        for k in range(p.nchunk):
            _planar_reduce(p, a, b, w, c0, c1, k)
    _planar_coef(p, w, c0, c1)
    if w.phases & APPLY:
        for k in range(p.nchunk):
            _planar_apply(p, a, b, out, w, c0, c1, k)


cdef void _planar_run(const Planar* p, const void* a, const void* b, void* out,
                      const Work* w, int nthreads) noexcept nogil:
    """A training forward (w.op TRAIN: a = x, out = y) or backward (BACKWARD: a = g, b = x,
    out = dx) on nthreads threads."""
    cdef Py_ssize_t g, c, t, ntask = p.C * p.nchunk
    cdef Py_ssize_t gs = _group_size(p.C, p.N, p.S, nthreads, _work_bytes_per_value(w))
    cdef Py_ssize_t ngroup = (p.C + gs - 1) // gs
    cdef fastbn_region region
    cdef fastbn_region* r = &region
    if nthreads == 1:
        for g in range(ngroup):
            _planar_group(p, a, b, out, w, g * gs, _stop(g, gs, p.C))
        return
    _region_begin(r)
    if p.C >= 4 * nthreads:
        # whole channels per thread, each thread one contiguous range of groups (static):
        # measured against handing out groups one at a time (dynamic), 2 threads, float32:
        # training 0.70-0.91x and backward 0.65-0.95x on (32, 256, 56, 56), (32, 512, 28, 28),
        # (1, 256, 14, 14) and (1, 64, 56, 56), (32, 64, 112, 112) backward 0.90x;
        # (32, 2048, 7, 7) within noise (0.76-1.10x over three runs)
        with parallel(num_threads=nthreads):
            _region_enter(r)
            for g in prange(ngroup, schedule="static"):
                _planar_group(p, a, b, out, w, g * gs, _stop(g, gs, p.C))
            _region_leave(r)
    else:
        # fewer than 4 channels per thread, too few to share evenly (3 channels on 2 threads
        # leave one idle half the time): teams of threads per channel, one chunk per task.
        # Measured at 2 threads, C = 3 to 7: training 0.82-1.00x, backward 0.79-0.97x of
        # whole channels per thread. The partials and their merge are the same either way.
        with parallel(num_threads=nthreads):
            _region_enter(r)
            for t in prange(ntask if w.phases & REDUCE else 0, schedule="static"):
                _planar_reduce(p, a, b, w, t // p.nchunk, t // p.nchunk + 1, t % p.nchunk)
            _barrier()
            for c in prange(p.C, schedule="static"):
                _planar_coef(p, w, c, c + 1)
            _barrier()
            for t in prange(ntask if w.phases & APPLY else 0, schedule="static"):
                _planar_apply(p, a, b, out, w, t // p.nchunk, t // p.nchunk + 1, t % p.nchunk)
            _region_leave(r)
    _note_region(&region)


# ---------------------------------------------------------------------------------------------
# Inference: one elementwise pass
# ---------------------------------------------------------------------------------------------

cdef void _planar_infer_runs(const Planar* p, const floating* x, floating* y, Py_ssize_t r0,
                             Py_ssize_t r1, const Affine* af, bint stream, const floating* res,
                             bint relu) noexcept nogil:
    """Inference on runs [r0, r1) of the (N*C) runs, stepping the channel along (with the
    fused residual and ReLU when asked)."""
    cdef Py_ssize_t run, c = r0 % p.C
    for run in range(r0, r1):
        _affine(x + run * p.S, y + run * p.S, p.S, 1, 0, af, c, stream,
                res + run * p.S if res != NULL else NULL, relu, NULL, 0)
        c = c + 1
        if c == p.C:
            c = 0
    if stream:
        _stream_fence()


cdef void _planar_infer_task(const Planar* p, const void* x, void* y, Py_ssize_t r0,
                             Py_ssize_t r1, const Affine* af, const Work* w) noexcept nogil:
    if w.dtype == F32:
        _planar_infer_runs(p, <const float*>x, <float*>y, r0, r1, af, w.stream,
                           <const float*>w.res, w.relu)
    elif w.dtype == F64:
        _planar_infer_runs(p, <const double*>x, <double*>y, r0, r1, af, w.stream,
                           <const double*>w.res, w.relu)
    else:
        _planar16_infer_runs(p, <const half_bits*>x, <half_bits*>y, r0, r1, af, w)


cdef void _planar_infer(const Planar* p, const void* x, void* y, const Affine* af,
                        const Work* w, int nthreads) noexcept nogil:
    cdef Py_ssize_t t, nrun = p.N * p.C
    cdef Py_ssize_t per = GROUP_VALUES // p.S if p.S < GROUP_VALUES else 1
    cdef Py_ssize_t ntask = (nrun + per - 1) // per
    # tasks of about GROUP_VALUES values, their count rounded up to a multiple of 4 and the
    # runs spread evenly, so that 2 or 4 threads get equal shares
    ntask = (ntask + 3) // 4 * 4
    per = (nrun + ntask - 1) // ntask
    ntask = (nrun + per - 1) // per
    cdef fastbn_region region
    cdef fastbn_region* r = &region
    if nthreads == 1:
        _planar_infer_task(p, x, y, 0, nrun, af, w)
        return
    _region_begin(r)
    with parallel(num_threads=nthreads):
        _region_enter(r)
        for t in prange(ntask, schedule="static"):
            _planar_infer_task(p, x, y, t * per, _stop(t, per, nrun), af, w)
        _region_leave(r)
    _note_region(&region)
