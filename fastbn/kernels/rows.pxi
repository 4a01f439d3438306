# NHWC (rows) kernels on the (R, C) view: training forward (statistics, then normalization),
# inference, and backward (the fused sums, then dx). Used for channels-last memory of any
# ndim and for (N, C) inputs.
#
# The reductions cut the rows into chunks of about ROW_CHUNK_VALUES values (the same for
# every channel), keep C-length partials per chunk and merge them in chunk order; an input of
# at most MIN_CHUNK_ROWS rows is one chunk, whose channels the threads split instead.

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
    MIN_CHUNK_ROWS rows is one chunk, whose channels the threads split (see _rows_run)."""
    cdef Py_ssize_t rpc = ROW_CHUNK_VALUES // C if C > 0 else ROW_CHUNK_VALUES
    if rpc < MIN_CHUNK_ROWS:
        rpc = MIN_CHUNK_ROWS
    return _spread_rows(R, rpc)


cdef inline Py_ssize_t _rows_per_task(Py_ssize_t R, Py_ssize_t C) noexcept nogil:
    """Rows per task of the normalizing passes, which keep no partials: about
    ROW_CHUNK_VALUES values, however few the rows (see _spread_rows)."""
    return _spread_rows(R, ROW_CHUNK_VALUES // C if C < ROW_CHUNK_VALUES else 1)


cdef inline bint _multi_row(Py_ssize_t C, Py_ssize_t reduce_bytes) noexcept nogil:
    """Whether a rows kernel updates several rows per sweep over the channels; `reduce_bytes`
    is the number of bytes a reduction pass reads (x, or g and x), 0 for the normalizing passes.

    One row at a time reads x as a single sequential stream, which the hardware prefetchers
    follow best; several rows per sweep share each load and store of the per-channel
    coefficients or accumulators. That pays once those arrays outgrow L1 (C >= WIDE_ROWS),
    and in the reductions for narrow rows (C < NARROW_ROWS), whose accumulator chains are
    short, or whose data stays in the last-level cache (reduce_bytes <= CACHED_BYTES), where the
    accumulator stores, not the prefetchers, set the pace. Measured (2 threads, float32,
    NHWC): from DRAM, one row per sweep is 1.1-1.4x faster for C = 128 to 512; from cache,
    four rows per sweep are 1.15-1.25x faster in the statistics and up to 1.2x in the
    backward sums for C = 64 to 768; several rows per sweep are 1.3-1.5x faster for
    C >= 1024 everywhere, and for C = 32 statistics 1.2-1.5x faster.
    The choice depends on the shape only, so results do not depend on the thread count.
    """
    if C >= WIDE_ROWS:
        return True
    return reduce_bytes > 0 and (C < NARROW_ROWS or reduce_bytes <= CACHED_BYTES)


cdef inline bint _apply_multi_row(Py_ssize_t C, Py_ssize_t itemsize) noexcept nogil:
    """Whether the elementwise passes (normalization, dx) sweep several rows at a time:
    _multi_row's choice, except for rows whose length is a multiple of 4 KiB. Rows that far
    apart start at the same offset in a page, so four of them and their outputs share the
    same L1 sets, and each row's loads wait on the stores 4 KiB away (the load and store
    addresses agree in their low 12 bits). Measured (Intel Xeon, float32): (256, 1024)
    inference on one thread 85.6 us four rows per sweep, 57.9 one row at a time (a copy:
    34); (32, 2048, 7, 7) NHWC inference 0.73x on two threads. The choice does not change
    any result: each output is the same expression either way."""
    return _multi_row(C, 0) and (C * itemsize) % 4096 != 0


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
        s2 = _madd(d, d, s2)
    mean[0] = bm + s1 / nb
    s2 = _madd(-s1, s1 / nb, s2)
    if s2 < 0:                 # rounding only; a NaN must stay NaN
        s2 = 0.0
    m2[0] = s2


# ---------------------------------------------------------------------------------------------
# Training forward: statistics per chunk of rows, merged along the channels, then the
# normalization
# ---------------------------------------------------------------------------------------------

cdef void _rows_chunk_stats(const floating* x, Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,
                            Py_ssize_t r0, Py_ssize_t r1, double* cmean, double* cm2,
                            bint multi_row, const Work* w, const half_bits* x16=NULL,
                            int dtype=0) noexcept nogil:
    """Mean and m2 of channels [c0, c1) (of C) over rows [r0, r1), into cmean[c], cm2[c],
    tile by tile: the TILE_ROWS rows of a tile are read once in memory order, summing
    d = x - pivot and d*d in double about the tile's first row (as _block_stats does; a
    channel whose sums would cancel is redone in two passes), and each tile is merged into
    cmean/cm2 in row order. Each channel's arithmetic is the same whatever [c0, c1).
    x16 (SUMS_RUN builds, x float32 and NULL): the data are x16's 16-bit values of type
    dtype, read straight from their 16-bit form (sums_run.h), with the arithmetic of their
    float32 copy, so its bits."""
    cdef Py_ssize_t width = c1 - c0
    cdef double* work = <double*>_kernel_alloc(w, 4 * width * sizeof(double))
    cdef double* pivot = work
    cdef double* s1 = work + width          # then the tile's mean
    cdef double* s2 = work + 2 * width
    cdef double* tile_m2 = work + 3 * width
    cdef Py_ssize_t c, b0, b1, ib
    cdef Py_ssize_t nrb = (r1 - r0 + TILE_ROWS - 1) // TILE_ROWS
    cdef double nb, n = 0
    cdef double limit = _cancel_limit(x)
    cdef float col[TILE_ROWS]
    # rows of at most PREFETCH_BYTES are prefetched; longer ones the hardware follows
    cdef bint short_rows = C * <Py_ssize_t>sizeof(floating) <= PREFETCH_BYTES
    if work == NULL:           # out of memory (w.failed is set): NaN, then a MemoryError
        for c in range(c0, c1):
            cmean[c] = NAN
            cm2[c] = NAN
        return
    if x16 != NULL:
        x16 = x16 + c0
    else:
        x = x + c0             # channel c0 + c of row r is x[r * C + c] from here on
    cmean = cmean + c0
    cm2 = cm2 + c0
    for ib in range(nrb):
        b0 = r0 + ib * TILE_ROWS
        b1 = _stop(ib, TILE_ROWS, r1 - r0) + r0
        nb = <double>(b1 - b0)
        if x16 != NULL:
            _widen(x16 + b0 * C, <float*>tile_m2, width, dtype)   # free until the tile end
            for c in range(width):
                pivot[c] = (<float*>tile_m2)[c]
                s1[c] = 0
                s2[c] = 0
            _rows_devs_h16(x16, C, b0, b1, width, pivot, s1, s2, multi_row, dtype == BF16)
        else:
            _rows_tile_devs(x, C, width, b0, b1, multi_row, short_rows, pivot, s1, s2)
        _rows_tile_end(x, x16, dtype, C, width, b0, b1, pivot, s1, s2, tile_m2, limit, col)
        _chan_merge_all(cmean, cm2, s1, tile_m2, width, n, nb)
        n = n + nb
    free(work)


cdef inline void _rows_tile_devs(const floating* x, Py_ssize_t C, Py_ssize_t width,
                                 Py_ssize_t b0, Py_ssize_t b1, bint multi_row,
                                 bint short_rows, double* pivot, double* s1,
                                 double* s2) noexcept nogil:
    """s1[c] = sum(x - pivot[c]), s2[c] = sum((x - pivot[c])^2) of channels [0, width) over
    the rows [b0, b1) of one tile, about the tile's first row, in memory order."""
    cdef double d, d1, d2, d3, k
    cdef Py_ssize_t c, r
    cdef const floating* row = x + b0 * C
    for c in range(width):
        pivot[c] = row[c]
        s1[c] = 0
        s2[c] = 0
    r = b0
    while multi_row and r + 4 <= b1:        # four rows per sweep
        row = x + r * C
        if short_rows:
            _prefetch(<const char*>row + PREFETCH_BYTES, 4 * C * sizeof(floating))
        for c in range(width):
            k = pivot[c]
            d = row[c] - k
            d1 = row[C + c] - k
            d2 = row[2 * C + c] - k
            d3 = row[3 * C + c] - k
            s1[c] = s1[c] + ((d + d1) + (d2 + d3))
            s2[c] = s2[c] + (_madd(d, d, d1 * d1) + _madd(d2, d2, d3 * d3))
        r = r + 4
    while r < b1:
        row = x + r * C
        if short_rows:
            _prefetch(<const char*>row + PREFETCH_BYTES, width * sizeof(floating))
        for c in range(width):
            d = row[c] - pivot[c]
            s1[c] = s1[c] + d
            s2[c] = _madd(d, d, s2[c])
        r = r + 1


cdef inline void _rows_tile_end(const floating* x, const half_bits* x16, int dtype,
                                Py_ssize_t C, Py_ssize_t width, Py_ssize_t b0, Py_ssize_t b1,
                                const double* pivot, double* s1, const double* s2,
                                double* tile_m2, double limit, float* col) noexcept nogil:
    """A tile's mean into s1 and its m2 into tile_m2, in straight loops the compiler
    vectorizes; then the rare channels whose one-pass sums cancelled, in two passes (of
    x16's values widened into col, TILE_ROWS floats, when x16 is given)."""
    cdef Py_ssize_t c, r
    cdef double t1
    cdef double nb = <double>(b1 - b0)
    for c in range(width):
        t1 = s1[c]
        s1[c] = pivot[c] + t1 / nb
        tile_m2[c] = _madd(-t1, t1 / nb, s2[c])
    for c in range(width):
        if not (tile_m2[c] * limit >= s2[c]):
            if floating is float:
                if x16 != NULL:
                    for r in range(b0, b1):
                        _widen(x16 + r * C + c, col + (r - b0), 1, dtype)
                    _rows_tile_two_pass(<const float*>col, 1, 0, 0, b1 - b0, &s1[c],
                                        &tile_m2[c])
                    continue
            _rows_tile_two_pass(x, C, c, b0, b1, &s1[c], &tile_m2[c])


cdef void _rows_train_coefs(Coef* cf, const double* part, Py_ssize_t R, Py_ssize_t C,
                            Py_ssize_t rpc, Py_ssize_t nchunk, Py_ssize_t c0,
                            Py_ssize_t c1) noexcept nogil:
    """Merge the chunk partials of channels [c0, c1) in chunk order (as _chan_merge), then
    their coefficients. A chunk holds the same rows for every channel, so the merge runs
    along the channels (_chan_merge_all)."""
    cdef double n = 0, nb
    cdef Py_ssize_t k, c, r0
    for k in range(nchunk):
        r0 = k * rpc
        nb = <double>(_stop(k, rpc, R) - r0)
        # cf.var holds the running m2 until the coefficients
        _chan_merge_all(cf.mean + c0, cf.var + c0, part + 2 * k * C + c0,
                        part + (2 * k + 1) * C + c0, c1 - c0, n, nb)
        n = n + nb
    for c in range(c0, c1):
        cf.var[c] = cf.var[c] / n
    _set_coefs(cf, c0, c1)


cdef inline floating _fin(floating v, const floating* res, Py_ssize_t c,
                          epi_t variant) noexcept nogil:
    """One normalized value in the given variant (epi_t): v, max(v, 0), max(v + res[c], 0),
    or the leaky ReLU of v or of v + res[c] (a NaN stays NaN)."""
    if epi_t is char:
        return v
    elif epi_t is short:
        return 0 if v < 0 else v
    elif epi_t is int:
        v = v + res[c]
        return 0 if v < 0 else v
    elif epi_t is Leaky:
        return _leaky_v(v, <floating>variant.slope)
    else:
        return _leaky_v(<floating>(v + res[c]), <floating>variant.slope)


cdef void _rows_affine_in(const floating* x, floating* y, Py_ssize_t C, Py_ssize_t r0,
                          Py_ssize_t r1, const opmath_t* mean, const opmath_t* scale,
                          const opmath_t* shift, const floating* res,
                          epi_t variant) noexcept nogil:
    """y = (x - mean) * scale + shift on rows [r0, r1), in opmath_t arithmetic, in row
    order so x streams through memory; for wide rows, four rows share each load of the per-channel
    coefficients. The fused epilogue in the same loop, in the given variant (epi_t; res is
    laid out as x, and y must not be res)."""
    cdef Py_ssize_t c, r = r0
    cdef bint multi_row = _apply_multi_row(C, sizeof(floating))
    cdef const floating* x0
    cdef const floating* x1
    cdef const floating* x2
    cdef const floating* x3
    cdef const floating* q0 = NULL
    cdef const floating* q1 = NULL
    cdef const floating* q2 = NULL
    cdef const floating* q3 = NULL
    cdef floating* y0
    cdef floating* y1
    cdef floating* y2
    cdef floating* y3
    cdef opmath_t m, a, b
    while multi_row and r + 4 <= r1:
        x0 = x + r * C
        x1 = x0 + C
        x2 = x1 + C
        x3 = x2 + C
        y0 = y + r * C
        y1 = y0 + C
        y2 = y1 + C
        y3 = y2 + C
        if res != NULL:
            q0 = res + r * C
            q1 = q0 + C
            q2 = q1 + C
            q3 = q2 + C
        for c in range(C):
            m = mean[c]
            a = scale[c]
            b = shift[c]
            y0[c] = _fin(_affine1(x0[c], m, a, b), q0, c, variant)
            y1[c] = _fin(_affine1(x1[c], m, a, b), q1, c, variant)
            y2[c] = _fin(_affine1(x2[c], m, a, b), q2, c, variant)
            y3[c] = _fin(_affine1(x3[c], m, a, b), q3, c, variant)
        r = r + 4
    while r < r1:
        x0 = x + r * C
        y0 = y + r * C
        q0 = res + r * C if res != NULL else NULL
        for c in range(C):
            y0[c] = _fin(_affine1(x0[c], mean[c], scale[c], shift[c]), q0, c, variant)
        r = r + 1


cdef inline void _epilogue(floating* y, const floating* res, Py_ssize_t n,
                           bint relu, double slope=0) noexcept nogil:
    """The fused epilogue on n outputs: add the residual (if any), then the ReLU (a NaN
    stays NaN), leaky with a slope > 0."""
    cdef Py_ssize_t i
    cdef floating t
    cdef floating s = <floating>slope
    if res != NULL:
        for i in range(n):
            y[i] = y[i] + res[i]
    if relu and slope != 0:
        for i in range(n):
            y[i] = _leaky_v(y[i], s)
    elif relu:
        for i in range(n):
            t = y[i]
            y[i] = 0 if t < 0 else t      # a select, not a conditional store: vectorized


cdef void _rows_affine_staged(const floating* x, floating* y, Py_ssize_t C, Py_ssize_t r0,
                              Py_ssize_t r1, const opmath_t* mean, const opmath_t* scale,
                              const opmath_t* shift, bint stream, const floating* res,
                              bint relu, unsigned char* keep,
                              Py_ssize_t rowbytes, double slope) noexcept nogil:
    """_rows_affine_in with the fused epilogue, piece by piece (whole rows per piece when they
    fit, else pieces of a row). A piece goes through an L1 stage when its stores stream, or
    when a residual is added (y may be the residual itself: each piece of the residual is
    read before that piece of y is written). With keep, the mask bits y > 0 of row r go to
    keep + r * rowbytes, packed from the stage or from the rows just written. A slope > 0:
    the leaky ReLU (no keep)."""
    cdef Leaky leaky
    cdef LeakyResidual leaky_res
    if relu and slope != 0:
        if res != NULL:
            leaky_res.slope = slope
            _rows_affine_v(x, y, C, r0, r1, mean, scale, shift, stream, res, NULL, 0,
                           leaky_res)
        else:
            leaky.slope = slope
            _rows_affine_v(x, y, C, r0, r1, mean, scale, shift, stream, res, NULL, 0, leaky)
    elif res != NULL:
        _rows_affine_v(x, y, C, r0, r1, mean, scale, shift, stream, res, keep, rowbytes,
                       RELU_RESIDUAL)
    elif relu:
        _rows_affine_v(x, y, C, r0, r1, mean, scale, shift, stream, res, keep, rowbytes, RELU)
    else:
        _rows_affine_v(x, y, C, r0, r1, mean, scale, shift, stream, res, NULL, 0, PLAIN)


cdef void _rows_affine_v(const floating* x, floating* y, Py_ssize_t C, Py_ssize_t r0,
                         Py_ssize_t r1, const opmath_t* mean, const opmath_t* scale,
                         const opmath_t* shift, bint stream, const floating* res,
                         unsigned char* keep, Py_ssize_t rowbytes,
                         epi_t variant) noexcept nogil:
    """_rows_affine_staged in the given variant (epi_t)."""
    cdef floating stage[STAGE]
    cdef Py_ssize_t r = r0, n, c0, off, i
    if not stream and res == NULL:
        _rows_affine_in(x, y, C, r0, r1, mean, scale, shift, NULL, variant)
        if keep != NULL:           # a task's rows (ROW_CHUNK_VALUES values) are in cache
            for r in range(r0, r1):
                _pack(y + r * C, C, keep + r * rowbytes)
        return
    while r < r1:
        if C <= STAGE:                 # whole rows per piece
            n = STAGE // C if STAGE // C < r1 - r else r1 - r
            off = r * C
            _rows_affine_in(x + off, stage, C, 0, n, mean, scale, shift,
                            _at(res, off), variant)
            if keep != NULL:
                for i in range(n):
                    _pack(stage + i * C, C, keep + (r + i) * rowbytes)
            _store(y + off, stage, n * C, stream)
            r = r + n
        else:                          # pieces of one row
            c0 = 0
            while c0 < C:
                n = STAGE if c0 + STAGE <= C else C - c0
                off = r * C + c0
                _rows_affine_in(x + off, stage, n, 0, 1, mean + c0, scale + c0, shift + c0,
                                _at(res, off), variant)
                if keep != NULL:               # c0: a multiple of STAGE, so of 8
                    _pack(stage, n, keep + r * rowbytes + c0 // 8)
                _store(y + off, stage, n, stream)
                c0 = c0 + n
            r = r + 1
    if stream:
        _stream_fence()


cdef inline void _store(floating* y, const floating* stage, Py_ssize_t n,
                        bint stream) noexcept nogil:
    """A staged piece into y: streaming stores, or a copy."""
    if stream:
        _stream(y, stage, n)
    else:
        memcpy(y, stage, n * sizeof(floating))


cdef void _rows_affine(const floating* x, floating* y, Py_ssize_t C, Py_ssize_t r0,
                       Py_ssize_t r1, const Affine* af, Py_ssize_t c0, bint stream,
                       const floating* res, bint relu, unsigned char* keep=NULL,
                       Py_ssize_t rowbytes=0) noexcept nogil:
    """The normalization of rows [r0, r1) of C channels, with the coefficients of channels
    [c0, c0 + C) of af (and the fused epilogue when asked): in float32 for float32 data
    whose every channel allows it (see planar_blocks.pxi), else in double."""
    if floating is float:
        if _all_set(af.ok32 + c0, C):
            _rows_affine_staged(x, y, C, r0, r1, <const float*>(af.mean32 + c0),
                                <const float*>(af.scale32 + c0),
                                <const float*>(af.shift32 + c0), stream, res, relu, keep,
                                rowbytes, af.slope)
            return
    _rows_affine_staged(x, y, C, r0, r1, af.mean + c0, af.scale + c0, af.shift + c0, stream,
                        res, relu, keep, rowbytes, af.slope)


# ---------------------------------------------------------------------------------------------
# Backward: the two sums per chunk of rows, added along the channels, then dx
# ---------------------------------------------------------------------------------------------

cdef void _rows_sums_in(const floating* g, const floating* x, Py_ssize_t C, Py_ssize_t r0,
                        Py_ssize_t r1, Py_ssize_t width, const acc_t* mean, double* sg,
                        acc_t* sd, bint multi_row, const floating* ym,
                        unsigned char* bits, Py_ssize_t rowbytes, const Grad* gd,
                        const unsigned char* kept=NULL) noexcept nogil:
    """sum(g) (in double) and sum(g * (x - mean)) (in acc_t) of `width` channels (the first
    of them at g[0], x[0]; rows C apart) over rows [r0, r1), into sg[c], sd[c]: one pass in
    memory order. With ym (the fused ReLU's output, laid out as g), of g masked by y > 0;
    with bits too, each row's mask is also stored there (row r at bits + r * rowbytes).
    With kept (float32 data: the bits the forward kept, row r's at kept + r * rowbytes), of
    g masked by them (_rows_sums_bits). gd: the variant of the mask (Grad.slope, .inverse)."""
    cdef Leaky leaky
    if floating is float and acc_t is float:
        if kept != NULL:
            _rows_sums_bits(g, x, C, r0, r1, width, mean, sg, sd, multi_row, kept, rowbytes)
            return
    if ym == NULL:
        _rows_sums_v(g, x, C, r0, r1, width, mean, sg, sd, multi_row, NULL, NULL, 0, PLAIN)
    elif gd.slope == 0:
        _rows_sums_v(g, x, C, r0, r1, width, mean, sg, sd, multi_row, ym, bits, rowbytes,
                     MASKED)
    elif gd.inverse:
        _rows_sums_v(g, x, C, r0, r1, width, mean, sg, sd, multi_row, ym, NULL, 0,
                     _leaky_inverse(gd))
    else:
        leaky.slope = gd.slope
        _rows_sums_v(g, x, C, r0, r1, width, mean, sg, sd, multi_row, ym, NULL, 0, leaky)


cdef void _rows_sums_v(const floating* g, const floating* x, Py_ssize_t C, Py_ssize_t r0,
                       Py_ssize_t r1, Py_ssize_t width, const acc_t* mean, double* sg,
                       acc_t* sd, bint multi_row, const floating* ym,
                       unsigned char* bits, Py_ssize_t rowbytes,
                       mask_t variant) noexcept nogil:
    """_rows_sums_in in the given variant (mask_t: plain, or masked by ym with the rows'
    masks packed into bits first when given, so that each sweep's rows then come from L1)."""
    cdef Py_ssize_t c, r
    cdef const floating* xr
    cdef const floating* gr
    cdef const floating* yr
    cdef Py_ssize_t r4 = r0 + (r1 - r0) // 4 * 4 if multi_row else r0
    cdef bint short_rows = C * <Py_ssize_t>sizeof(floating) <= PREFETCH_BYTES   # as the stats
    cdef floating g0, g1, g2, g3
    cdef acc_t m
    for c in range(width):
        sg[c] = 0
        sd[c] = 0
    for r in range(r0, r4, 4):     # four rows per sweep (see _rows_chunk_stats)
        xr = x + r * C
        gr = g + r * C
        yr = _at(ym, r * C)
        if short_rows:
            _prefetch(<const char*>xr + PREFETCH_BYTES, 4 * C * sizeof(floating))
            _prefetch(<const char*>gr + PREFETCH_BYTES, 4 * C * sizeof(floating))
        if mask_t is not char and bits != NULL:
            for c in range(4):
                _pack(yr + c * C, width, bits + (r + c) * rowbytes)
        for c in range(width):
            m = mean[c]
            g0 = _gat(gr, yr, c, variant)
            g1 = _gat(gr, yr, C + c, variant)
            g2 = _gat(gr, yr, 2 * C + c, variant)
            g3 = _gat(gr, yr, 3 * C + c, variant)
            sg[c] = sg[c] + ((<double>g0 + g1) + (<double>g2 + g3))
            sd[c] = sd[c] + (_dot2(g0, _xat(xr, c, variant), g1, _xat(xr, C + c, variant), m)
                             + _dot2(g2, _xat(xr, 2 * C + c, variant), g3,
                                     _xat(xr, 3 * C + c, variant), m))
    for r in range(r4, r1):
        xr = x + r * C
        gr = g + r * C
        yr = _at(ym, r * C)
        if short_rows:
            _prefetch(<const char*>xr + PREFETCH_BYTES, width * sizeof(floating))
            _prefetch(<const char*>gr + PREFETCH_BYTES, width * sizeof(floating))
        if mask_t is not char and bits != NULL:
            _pack(yr, width, bits + r * rowbytes)
        for c in range(width):
            g0 = _gat(gr, yr, c, variant)
            sg[c] = sg[c] + g0
            sd[c] = _dot1(sd[c], g0, _xat(xr, c, variant), mean[c])


cdef void _rows_sums_bits(const float* g, const float* x, Py_ssize_t C, Py_ssize_t r0,
                          Py_ssize_t r1, Py_ssize_t width, const float* mean, double* sg,
                          float* sd, bint multi_row, const unsigned char* kept,
                          Py_ssize_t rowbytes) noexcept nogil:
    """_rows_sums_v's plain float32 sums of g masked by the kept bits (row r's at kept +
    r * rowbytes, channel c's bit c % 8 of byte c // 8): the same rows per sweep and the
    same expressions on the values the masked variant takes (a bit AND), so the same
    bits; the channels go 32 at a time, one 32-bit word of each row's bits per block (a
    channel's sums do not depend on the order of the channels)."""
    cdef Py_ssize_t c, r, cb, j
    cdef const float* xr
    cdef const float* gr
    cdef const unsigned char* br
    cdef Py_ssize_t r4 = r0 + (r1 - r0) // 4 * 4 if multi_row else r0
    cdef Py_ssize_t wb = width - width % 32
    cdef bint short_rows = C * <Py_ssize_t>sizeof(float) <= PREFETCH_BYTES
    cdef unsigned int w0, w1, w2, w3
    cdef float g0, g1, g2, g3, m
    for c in range(width):
        sg[c] = 0
        sd[c] = 0
    for r in range(r0, r4, 4):
        xr = x + r * C
        gr = g + r * C
        br = kept + r * rowbytes
        if short_rows:
            _prefetch(<const char*>xr + PREFETCH_BYTES, 4 * C * sizeof(float))
            _prefetch(<const char*>gr + PREFETCH_BYTES, 4 * C * sizeof(float))
            _prefetch(br + 16 * rowbytes, 4 * rowbytes)    # measured: 1 thread needs it
        for cb in range(0, wb, 32):
            memcpy(&w0, br + cb // 8, 4)
            memcpy(&w1, br + rowbytes + cb // 8, 4)
            memcpy(&w2, br + 2 * rowbytes + cb // 8, 4)
            memcpy(&w3, br + 3 * rowbytes + cb // 8, 4)
            for j in range(32):
                c = cb + j
                m = mean[c]
                g0 = _bit_f(gr[c], w0, j)
                g1 = _bit_f(gr[C + c], w1, j)
                g2 = _bit_f(gr[2 * C + c], w2, j)
                g3 = _bit_f(gr[3 * C + c], w3, j)
                sg[c] = sg[c] + ((<double>g0 + g1) + (<double>g2 + g3))
                sd[c] = sd[c] + (_dot2(g0, xr[c], g1, xr[C + c], m)
                                 + _dot2(g2, xr[2 * C + c], g3, xr[3 * C + c], m))
        for c in range(wb, width):
            m = mean[c]
            g0 = _bit_f(gr[c], br[c // 8], c % 8)
            g1 = _bit_f(gr[C + c], br[rowbytes + c // 8], c % 8)
            g2 = _bit_f(gr[2 * C + c], br[2 * rowbytes + c // 8], c % 8)
            g3 = _bit_f(gr[3 * C + c], br[3 * rowbytes + c // 8], c % 8)
            sg[c] = sg[c] + ((<double>g0 + g1) + (<double>g2 + g3))
            sd[c] = sd[c] + (_dot2(g0, xr[c], g1, xr[C + c], m)
                             + _dot2(g2, xr[2 * C + c], g3, xr[3 * C + c], m))
    for r in range(r4, r1):
        xr = x + r * C
        gr = g + r * C
        br = kept + r * rowbytes
        if short_rows:
            _prefetch(<const char*>xr + PREFETCH_BYTES, width * sizeof(float))
            _prefetch(<const char*>gr + PREFETCH_BYTES, width * sizeof(float))
        for cb in range(0, wb, 32):
            memcpy(&w0, br + cb // 8, 4)
            for j in range(32):
                c = cb + j
                g0 = _bit_f(gr[c], w0, j)
                sg[c] = sg[c] + g0
                sd[c] = _dot1(sd[c], g0, xr[c], mean[c])
        for c in range(wb, width):
            g0 = _bit_f(gr[c], br[c // 8], c % 8)
            sg[c] = sg[c] + g0
            sd[c] = _dot1(sd[c], g0, xr[c], mean[c])


cdef void _rows_chunk_sums(const floating* g, const floating* x, Py_ssize_t C, Py_ssize_t c0,
                           Py_ssize_t c1, Py_ssize_t r0, Py_ssize_t r1, const Grad* gd,
                           double* sg, double* sd, bint multi_row,
                           const floating* ym, unsigned char* bits,
                           Py_ssize_t rowbytes, bint kept, const Work* w,
                           const half_bits* g16=NULL, const half_bits* x16=NULL,
                           int dtype=0) noexcept nogil:
    """sum(g) and sum(g * (x - mean)) of channels [c0, c1) (of C) over rows [r0, r1), into
    sg[c], sd[c], in one pass in memory order. sum(g) is accumulated in double. For float32
    data the dot runs tile by tile (TILE_ROWS rows) in float32 around the float32 mean, each
    tile's dot added in double with the mean's low part corrected, and a tile dot out of
    float32's comfortable range summed again in double (as _block_sums does). With ym (the
    fused ReLU's output, laid out as g, or NULL), of g masked by y > 0, and the mask stored
    as bits when bits is not NULL (whole rows only: c0 = 0, c1 = C). kept (float32 data):
    the mask is the bits the forward kept (row r at bits + r * rowbytes; c0 a multiple of
    8), read as _rows_sums_in reads them: the same bits as with ym. g16, x16 (SUMS_RUN
    builds, g and x float32 and NULL, no mask, gd.mean32 set): the data are 16-bit values
    of type dtype, read straight from their 16-bit form (sums_run.h), with the arithmetic
    of their float32 copy, so its bits."""
    cdef Py_ssize_t width = c1 - c0
    cdef Py_ssize_t c, r, b0, b1, ib
    cdef Py_ssize_t nrb = (r1 - r0 + TILE_ROWS - 1) // TILE_ROWS
    cdef double* work
    cdef float* dot32
    cdef const unsigned char* kb = NULL
    cdef double t, m, gv
    cdef float g1, x1
    if g16 != NULL:
        g16 = g16 + c0
        x16 = x16 + c0
    else:
        g = g + c0
        x = x + c0
    sg = sg + c0
    sd = sd + c0
    if ym != NULL:
        ym = ym + c0
    if floating is float:
        work = <double*>_kernel_alloc(w, width * (sizeof(double) + sizeof(float))) \
            if gd.mean32 != NULL else NULL
        if work != NULL:
            dot32 = <float*>(work + width)
            if kept:
                kb = bits + c0 // 8
            for c in range(width):
                sg[c] = 0
                sd[c] = 0
            for ib in range(nrb):
                b0 = r0 + ib * TILE_ROWS
                b1 = _stop(ib, TILE_ROWS, r1 - r0) + r0
                if g16 != NULL:
                    _rows_sums_h16(g16, x16, C, b0, b1, width, <const float*>(gd.mean32 + c0),
                                   work, dot32, multi_row, dtype == BF16)
                else:
                    _rows_sums_in(g, x, C, b0, b1, width, <const float*>(gd.mean32 + c0),
                                  work, dot32, multi_row, ym, NULL if kept else bits,
                                  rowbytes, gd, kb)
                for c in range(width):
                    t = dot32[c]
                    if not _f32_sum_ok(t):
                        t = 0
                        m = gd.mean[c0 + c]
                        for r in range(b0, b1):
                            if g16 != NULL:
                                _widen(g16 + r * C + c, &g1, 1, dtype)
                                _widen(x16 + r * C + c, &x1, 1, dtype)
                                t = _madd(g1, x1 - m, t)
                                continue
                            if kept:
                                gv = _bit_f(g[r * C + c], kb[r * rowbytes + c // 8], c % 8)
                            else:
                                gv = _grad_at(g, ym, r * C + c, gd)
                            t = _madd(gv, _x_at(x, r * C + c, gd) - m, t)
                        t = _madd(gd.mean_lo[c0 + c], work[c], t)      # cancelled below
                    sg[c] = sg[c] + work[c]
                    sd[c] = sd[c] + _madd(-gd.mean_lo[c0 + c], work[c], t)
            free(work)
            return
        if g16 != NULL:        # no scratch (w.failed is set: the call raises MemoryError)
            for c in range(width):
                sg[c] = NAN
                sd[c] = NAN
            return
    # no scratch (w.failed is set: the call raises MemoryError), or float64 data
    _rows_sums_in(g, x, C, r0, r1, width, gd.mean + c0, sg, sd, multi_row, ym,
                  NULL if kept else bits, rowbytes, gd)


cdef void _rows_grad_coefs(Grad* gd, const double* part, Py_ssize_t C, Py_ssize_t nchunk,
                           Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Add up the chunk sums of channels [c0, c1) in chunk order, in loops along the
    channels, then their dweight, dbias and dx constants (_grad_coefs)."""
    cdef double* sum_g = gd.dbias        # the running sums until _grad_coefs
    cdef double* dot = gd.dweight
    cdef const double* ps
    cdef const double* pd
    cdef Py_ssize_t k, c
    for c in range(c0, c1):
        sum_g[c] = 0
        dot[c] = 0
    for k in range(nchunk):
        ps = part + 2 * k * C
        pd = part + (2 * k + 1) * C
        for c in range(c0, c1):
            sum_g[c] = sum_g[c] + ps[c]
            dot[c] = dot[c] + pd[c]
    _grad_coefs(gd, c0, c1)



cdef void _rows_dx_in(const floating* g, const floating* x, floating* dx, Py_ssize_t C,
                     Py_ssize_t r0, Py_ssize_t r1, bint training, const opmath_t* mean,
                     const opmath_t* a, const opmath_t* kx, const opmath_t* k0,
                     const opmath_t* gm, const opmath_t* gl, const floating* ym,
                     floating* dres, mask_t variant) noexcept nogil:
    """dx on rows [r0, r1) in row order: _dx_value of each value in training (gm and gl: the
    gradient's split mean of the float32 form, NULL in double), g * a with fixed statistics
    (x is not read); for wide rows, two rows share each coefficient load. With ym (the fused
    ReLU's output) g is masked by y > 0, and stored to dres when given (both laid out as g,
    or NULL)."""
    cdef Py_ssize_t c, r = r0
    cdef const floating* g0
    cdef const floating* x0
    cdef const floating* y0
    cdef const floating* y1
    cdef floating* d0
    cdef floating* e0
    cdef floating* e1
    cdef floating v0, v1
    cdef opmath_t gmc = 0, glc = 0
    if not training:           # fixed statistics: dx = g * a, x is not read
        for r in range(r0, r1):
            g0 = g + r * C
            d0 = dx + r * C
            y0 = _at(ym, r * C)
            e0 = _at_w(dres, r * C)
            for c in range(C):
                v0 = _gat(g0, y0, c, variant)
                if mask_t is int or mask_t is LeakyStored:
                    e0[c] = v0
                d0[c] = <floating>(v0 * a[c])
        return
    while r < r1:
        g0 = g + r * C
        x0 = x + r * C
        d0 = dx + r * C
        y0 = _at(ym, r * C)
        e0 = _at_w(dres, r * C)
        if r + 2 <= r1 and _apply_multi_row(C, sizeof(floating)):
            y1 = _at(ym, r * C + C)
            e1 = _at_w(dres, r * C + C)
            for c in range(C):
                if opmath_t is float:
                    gmc = gm[c]
                    glc = gl[c]
                v0 = _gat(g0, y0, c, variant)
                v1 = _gat(g0 + C, y1, c, variant)
                if mask_t is int or mask_t is LeakyStored:
                    e0[c] = v0
                    e1[c] = v1
                d0[c] = _dx_value(v0, _xat(x0, c, variant), mean[c], a[c], kx[c], k0[c], gmc,
                                  glc)
                d0[C + c] = _dx_value(v1, _xat(x0, C + c, variant), mean[c], a[c], kx[c], k0[c],
                                      gmc, glc)
            r = r + 2
        else:
            for c in range(C):
                if opmath_t is float:
                    gmc = gm[c]
                    glc = gl[c]
                v0 = _gat(g0, y0, c, variant)
                if mask_t is int or mask_t is LeakyStored:
                    e0[c] = v0
                d0[c] = _dx_value(v0, _xat(x0, c, variant), mean[c], a[c], kx[c], k0[c], gmc,
                                  glc)
            r = r + 1


cdef inline void _rows_dx_piece(const floating* g, const floating* x, floating* dx,
                                Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, const Grad* gd,
                                Py_ssize_t c0, bint use32, const floating* ym,
                                floating* dres, mask_t variant) noexcept nogil:
    """dx of rows [r0, r1) of C channels starting at channel c0 of the coefficients (rows C
    apart in g, x, dx, ym and dres), in the given variant (mask_t)."""
    if floating is float:
        if use32:
            _rows_dx_in(g, x, dx, C, r0, r1, gd.training, <const float*>(gd.mean32 + c0),
                        <const float*>(gd.a32 + c0), <const float*>(gd.kx32 + c0),
                        <const float*>(gd.c32 + c0), <const float*>(gd.gmean32 + c0),
                        <const float*>(gd.gmean_lo32 + c0), ym, dres, variant)
            return
    _rows_dx_in(g, x, dx, C, r0, r1, gd.training, gd.mean + c0, gd.a + c0, gd.kx + c0,
                gd.k0 + c0, <const double*>NULL, <const double*>NULL, ym, dres, variant)


cdef void _rows_dx(const floating* g, const floating* x, floating* dx, Py_ssize_t C,
                   Py_ssize_t r0, Py_ssize_t r1, const Grad* gd, Py_ssize_t c0, bint stream,
                   const floating* ym, floating* dres) noexcept nogil:
    """dx on rows [r0, r1) of C channels, with the coefficients of channels [c0, c0 + C) of
    gd: in float32 for float32 data whose every channel allows it (see
    _dx_into), else in double; through an L1 stage with streaming stores when `stream`.
    With ym (the fused ReLU's forward output), dy counts where y > 0 only, and that masked
    dy goes to dres (the residual's gradient) when given."""
    cdef Leaky leaky
    cdef LeakyStored leaky_stored
    if ym == NULL:
        _rows_dx_v(g, x, dx, C, r0, r1, gd, c0, stream, NULL, NULL, PLAIN)
    elif gd.slope == 0:
        if dres == NULL:
            _rows_dx_v(g, x, dx, C, r0, r1, gd, c0, stream, ym, NULL, MASKED)
        else:
            _rows_dx_v(g, x, dx, C, r0, r1, gd, c0, stream, ym, dres, MASKED_STORED)
    elif gd.inverse:
        _rows_dx_v(g, x, dx, C, r0, r1, gd, c0, stream, ym, NULL, _leaky_inverse(gd))
    elif dres == NULL:
        leaky.slope = gd.slope
        _rows_dx_v(g, x, dx, C, r0, r1, gd, c0, stream, ym, NULL, leaky)
    else:
        leaky_stored.slope = gd.slope
        _rows_dx_v(g, x, dx, C, r0, r1, gd, c0, stream, ym, dres, leaky_stored)


cdef void _rows_dx_v(const floating* g, const floating* x, floating* dx, Py_ssize_t C,
                     Py_ssize_t r0, Py_ssize_t r1, const Grad* gd, Py_ssize_t c0, bint stream,
                     const floating* ym, floating* dres, mask_t variant) noexcept nogil:
    """_rows_dx in the given variant (mask_t)."""
    cdef floating stage[STAGE]
    cdef Py_ssize_t r = r0, n, cp, base
    cdef bint use32 = False
    if floating is float:
        use32 = gd.mean32 != NULL and _all_set(gd.ok32 + c0, C)
    if not stream:
        _rows_dx_piece(g, x, dx, C, r0, r1, gd, c0, use32, ym, dres, variant)
        return
    if C <= STAGE:
        while r < r1:
            n = STAGE // C if STAGE // C < r1 - r else r1 - r
            base = r * C
            _rows_dx_piece(g + base, x + base, stage, C, 0, n, gd, c0, use32, _at(ym, base),
                           _at_w(dres, base), variant)
            _stream(dx + base, stage, n * C)
            r = r + n
    else:
        for r in range(r0, r1):
            cp = 0
            while cp < C:
                n = STAGE if cp + STAGE <= C else C - cp
                base = r * C + cp
                _rows_dx_piece(g + base, x + base, stage, n, 0, 1, gd, c0 + cp, use32,
                               _at(ym, base), _at_w(dres, base), variant)
                _stream(dx + base, stage, n)
                cp = cp + n
    _stream_fence()


cdef void _rows_dx_bits(const float* g, const float* x, float* dx, Py_ssize_t C,
                        Py_ssize_t r0, Py_ssize_t r1, const Grad* gd, bint stream,
                        const unsigned char* bits, Py_ssize_t rowbytes,
                        float* dres) noexcept nogil:
    """dx of float32 data in float32 (training, every channel allowing it: _dx_value's float32
    form) on rows [r0, r1), with dy masked by the reduction's mask bits (row r at bits +
    r * rowbytes) instead of y, in vector loops of their own (_dx_bits_f32); through an
    L1 stage with streaming stores when `stream`; rows of at most STAGE values a stage of
    whole rows at a time (_dx_bits_rows_f32; with a call and a store per row, the kept-bits
    backward of (32, 112, 112, 64) channels-last took 1.34x the plain one, so 1.05x; 2
    threads, Intel Xeon). The same bits as _rows_dx."""
    cdef float stage[STAGE]
    cdef Py_ssize_t r, n, c0, base
    if C <= STAGE:
        r = r0
        while r < r1:
            n = STAGE // C if STAGE // C < r1 - r else r1 - r
            base = r * C
            _dx_bits_rows_f32(g + base, x + base, &stage[0] if stream else dx + base,
                              _at_w(dres, base), C, n, gd.mean32, gd.gmean32, gd.gmean_lo32,
                              gd.a32, gd.kx32, gd.c32, bits + r * rowbytes, rowbytes)
            if stream:
                _stream(dx + base, stage, n * C)
            r = r + n
        if stream:
            _stream_fence()
        return
    for r in range(r0, r1):
        c0 = 0
        while c0 < C:
            n = STAGE if c0 + STAGE <= C else C - c0
            base = r * C + c0
            _dx_bits_f32(g + base, x + base, &stage[0] if stream else dx + base,
                         _at_w(dres, base), n, gd.mean32 + c0, gd.gmean32 + c0,
                         gd.gmean_lo32 + c0, gd.a32 + c0, gd.kx32 + c0, gd.c32 + c0,
                         bits + r * rowbytes + c0 // 8)
            if stream:
                _stream(dx + base, stage, n)
            c0 = c0 + n
    if stream:
        _stream_fence()


cdef void _rows_dx_kept(const float* g, const float* x, float* dx, Py_ssize_t C,
                        Py_ssize_t r0, Py_ssize_t r1, const Grad* gd, bint stream,
                        const unsigned char* bits, Py_ssize_t rowbytes,
                        float* dres) noexcept nogil:
    """dx on rows [r0, r1) with dy masked by the bits the forward kept, where _rows_dx_bits
    does not apply (a channel in double, or fixed statistics): each piece of a row is
    masked into an L1 stage (the values the masked loops take; stored to dres when given)
    and differentiated from there as _rows_dx does, in float32 or double as it decides for
    the whole row. The same bits."""
    cdef float gs[STAGE]
    cdef float stage[STAGE]
    cdef Py_ssize_t r, n, c0, base
    cdef bint use32 = gd.mean32 != NULL and _all_set(gd.ok32, C)
    for r in range(r0, r1):
        c0 = 0
        while c0 < C:
            n = STAGE if c0 + STAGE <= C else C - c0
            base = r * C + c0
            _masked_copy_f32(g + base, bits + r * rowbytes + c0 // 8, n, gs, 0)
            if dres != NULL:
                memcpy(dres + base, gs, n * sizeof(float))
            _rows_dx_piece(<const float*>gs, x + base, &stage[0] if stream else dx + base, n,
                           0, 1, gd, c0, use32, <const float*>NULL, <float*>NULL, PLAIN)
            if stream:
                _stream(dx + base, stage, n)
            c0 = c0 + n
    if stream:
        _stream_fence()


# ---------------------------------------------------------------------------------------------
# The three phases of a training forward or a backward, and their schedule
# ---------------------------------------------------------------------------------------------
# Each prange body below is one call, so that every local is private to its thread.

cdef inline void _rows_reduce_t(const floating* a, const floating* b, const Work* w,
                                Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t r0,
                                Py_ssize_t r1, Py_ssize_t k) noexcept nogil:
    """Partials of channels [c0, c1) over rows [r0, r1), into chunk k's rows of w.part
    (float32 and float64 data)."""
    if w.op == TRAIN:
        _rows_chunk_stats(a, C, c0, c1, r0, r1, w.part + 2 * k * C, w.part + (2 * k + 1) * C,
                          w.multi_row, w)
    else:
        _rows_chunk_sums(a, b, C, c0, c1, r0, r1, w.gd, w.part + 2 * k * C,
                         w.part + (2 * k + 1) * C, w.multi_row, <const floating*>w.ymask,
                         w.bits if (c0 == 0 and c1 == C) or w.kept_bits else NULL,
                         w.bits_stride, w.kept_bits, w)


cdef inline void _rows_coef(const Work* w, Py_ssize_t R, Py_ssize_t C, Py_ssize_t rpc,
                            Py_ssize_t nchunk, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Merge the chunk partials of channels [c0, c1); then their coefficients."""
    cdef Py_ssize_t c
    if w.op == TRAIN:
        _rows_train_coefs(w.cf, w.part, R, C, rpc, nchunk, c0, c1)
    elif w.gd.given != NULL:
        for c in range(c0, c1):
            w.gd.dbias[c] = w.gd.given[c]
            w.gd.dweight[c] = w.gd.given[C + c]
        _grad_coefs(w.gd, c0, c1)
    else:
        _rows_grad_coefs(w.gd, w.part, C, nchunk, c0, c1)


cdef inline void _rows_apply_t(const floating* a, const floating* b, floating* out,
                               const Work* w, Py_ssize_t C, Py_ssize_t r0,
                               Py_ssize_t r1) noexcept nogil:
    """y (or dx) of rows [r0, r1) (float32 and float64 data)."""
    if w.op == TRAIN:
        _rows_affine(a, out, C, r0, r1, &w.cf.af, 0, w.stream, <const floating*>w.res, w.relu,
                     w.keep, w.bits_stride)
    else:
        if (floating is float and w.bits != NULL and w.gd.training and
                w.gd.mean32 != NULL and _all_set(w.gd.ok32, C)):
            _rows_dx_bits(a, b, out, C, r0, r1, w.gd, w.stream, w.bits, w.bits_stride,
                          <float*>w.dres)
        elif floating is float and w.kept_bits:
            _rows_dx_kept(a, b, out, C, r0, r1, w.gd, w.stream, w.bits, w.bits_stride,
                          <float*>w.dres)
        else:
            _rows_dx(a, b, out, C, r0, r1, w.gd, 0, w.stream, <const floating*>w.ymask,
                     <floating*>w.dres)


cdef inline void _rows_reduce(const void* a, const void* b, const Work* w, Py_ssize_t C,
                              Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t r0, Py_ssize_t r1,
                              Py_ssize_t k) noexcept nogil:
    """Partials of channels [c0, c1) over rows [r0, r1), in the data type w.dtype."""
    if w.dtype == F32:
        _rows_reduce_t(<const float*>a, <const float*>b, w, C, c0, c1, r0, r1, k)
    elif w.dtype == F64:
        _rows_reduce_t(<const double*>a, <const double*>b, w, C, c0, c1, r0, r1, k)
    else:
        _rows16_reduce(<const half_bits*>a, <const half_bits*>b, w, C, c0, c1, r0, r1, k)


cdef inline void _rows_apply(const void* a, const void* b, void* out, const Work* w,
                             Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """y (or dx) of rows [r0, r1), in the data type w.dtype."""
    if w.dtype == F32:
        _rows_apply_t(<const float*>a, <const float*>b, <float*>out, w, C, r0, r1)
    elif w.dtype == F64:
        _rows_apply_t(<const double*>a, <const double*>b, <double*>out, w, C, r0, r1)
    else:
        _rows16_apply(<const half_bits*>a, <const half_bits*>b, <half_bits*>out, w,
                      &w.cf.af if w.op == TRAIN else NULL, C, r0, r1)


cdef void _rows_columns(const void* a, const void* b, const Work* w, Py_ssize_t R,
                        Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Partials and coefficients of channels [c0, c1) over all R rows as one chunk."""
    if w.phases & REDUCE:
        _rows_reduce(a, b, w, C, c0, c1, 0, R, 0)
    _rows_coef(w, R, C, R, 1, c0, c1)


cdef inline Py_ssize_t _col_width(Py_ssize_t C, int nthreads) noexcept nogil:
    """Channels per block when the threads of a rows kernel split the channels (all rows
    are one chunk): an equal share rounded up to a multiple of 16, so that two threads never
    write to the same 64-byte line of a row."""
    cdef Py_ssize_t w = (C + nthreads - 1) // nthreads
    return (w + 15) // 16 * 16



cdef void _rows_run(const void* a, const void* b, void* out, Py_ssize_t R, Py_ssize_t C,
                    const Work* w, int nthreads) noexcept nogil:
    """A training forward (w.op TRAIN: a = x, out = y) or backward (BACKWARD: a = g, b = x,
    out = dx) on nthreads threads."""
    cdef Py_ssize_t rpc = _rows_per_chunk(R, C)
    cdef Py_ssize_t nchunk = (R + rpc - 1) // rpc
    cdef Py_ssize_t cw = _col_width(C, nthreads)
    cdef Py_ssize_t ncol = (C + cw - 1) // cw
    cdef Py_ssize_t rpt = _rows_per_task(R, C)
    cdef Py_ssize_t k
    cdef Py_ssize_t nreduce = nchunk if w.phases & REDUCE else 0
    cdef Py_ssize_t napply = nchunk if w.phases & APPLY else 0
    cdef fastbn_region region
    cdef fastbn_region* r = &region
    if nthreads == 1:
        for k in range(nreduce):
            _rows_reduce(a, b, w, C, 0, C, k * rpc, _stop(k, rpc, R), k)
        _rows_coef(w, R, C, rpc, nchunk, 0, C)
        for k in range(napply):
            _rows_apply(a, b, out, w, C, k * rpc, _stop(k, rpc, R))
        return
    _region_begin(r)
    if nchunk == 1:
        # few rows of many channels (R <= MIN_CHUNK_ROWS): the threads split the channels
        # for the reduction (each channel's arithmetic is that of the one-thread call),
        # then the rows for the normalizing pass (whole rows stream best)
        with parallel(num_threads=nthreads):
            _region_enter(r)
            for k in prange(ncol, schedule="static"):
                _rows_columns(a, b, w, R, C, k * cw, _stop(k, cw, C))
            _barrier()
            for k in prange((R + rpt - 1) // rpt if w.phases & APPLY else 0,
                            schedule="static"):
                _rows_apply(a, b, out, w, C, k * rpt, _stop(k, rpt, R))
            _region_leave(r)
    else:
        with parallel(num_threads=nthreads):
            _region_enter(r)
            for k in prange(nreduce, schedule="static"):
                _rows_reduce(a, b, w, C, 0, C, k * rpc, _stop(k, rpc, R), k)
            _barrier()
            for k in prange(ncol, schedule="static"):
                _rows_coef(w, R, C, rpc, nchunk, k * cw, _stop(k, cw, C))
            _barrier()
            for k in prange(napply, schedule="static"):
                _rows_apply(a, b, out, w, C, k * rpc, _stop(k, rpc, R))
            _region_leave(r)
    _note_region(&region)


# ---------------------------------------------------------------------------------------------
# Inference: one elementwise pass
# ---------------------------------------------------------------------------------------------

cdef void _rows_infer_task(const void* x, void* y, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1,
                           const Affine* af, const Work* w) noexcept nogil:
    if w.dtype == F32:
        _rows_affine(<const float*>x, <float*>y, C, r0, r1, af, 0, w.stream,
                     <const float*>w.res, w.relu)
    elif w.dtype == F64:
        _rows_affine(<const double*>x, <double*>y, C, r0, r1, af, 0, w.stream,
                     <const double*>w.res, w.relu)
    else:
        _rows16_apply(<const half_bits*>x, NULL, <half_bits*>y, w, af, C, r0, r1)


cdef void _rows_infer(const void* x, void* y, Py_ssize_t R, Py_ssize_t C, const Affine* af,
                      const Work* w, int nthreads) noexcept nogil:
    cdef Py_ssize_t rpc = _rows_per_task(R, C)
    cdef Py_ssize_t nchunk = (R + rpc - 1) // rpc
    cdef Py_ssize_t k
    cdef fastbn_region region
    cdef fastbn_region* r = &region
    if nthreads == 1:
        for k in range(nchunk):
            _rows_infer_task(x, y, C, k * rpc, _stop(k, rpc, R), af, w)
        return
    _region_begin(r)
    with parallel(num_threads=nthreads):
        _region_enter(r)
        for k in prange(nchunk, schedule="static"):
            _rows_infer_task(x, y, C, k * rpc, _stop(k, rpc, R), af, w)
        _region_leave(r)
    _note_region(&region)
