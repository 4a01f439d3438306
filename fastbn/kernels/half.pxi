# 16-bit data (float16, bfloat16): the NCHW and NHWC kernels' data passes, staged through
# float32. Each block of a reduction (planar) or chunk of rows (rows) is widened into a
# stage of float32 values and handed to the float32 code, so the statistics, sums and their
# accuracy are exactly those of the float32 path on the widened values; each piece of an
# elementwise pass is computed in float32 and rounded once, to nearest even, to the data
# type. The float32 result is within 2 float32 ulps of the exact one, so the 16-bit output
# is a faithful rounding (within one unit of its last place).


cdef inline void _widen(const half_bits* src, float* dst, Py_ssize_t n, int dtype) noexcept nogil:
    if dtype == BF16:
        _bf16_to_f32(src, dst, n)
    else:
        _f16_to_f32(src, dst, n)


cdef inline void _narrow(const float* src, half_bits* dst, Py_ssize_t n,
                         int dtype) noexcept nogil:
    if dtype == BF16:
        _f32_to_bf16(src, dst, n)
    else:
        _f32_to_f16(src, dst, n)


cdef inline void _store16(const float* src, half_bits* dst, half_bits* stage, Py_ssize_t n,
                          int dtype, bint stream) noexcept nogil:
    """Round n float32 values to the 16-bit type into dst, through `stage` (STAGE values)
    with streaming stores when `stream`."""
    if stream:
        _narrow(src, stage, n, dtype)
        _stream_u16(dst, stage, n)
    else:
        _narrow(src, dst, n, dtype)


# ---------------------------------------------------------------------------------------------
# Planar (N, C, S)
# ---------------------------------------------------------------------------------------------

cdef inline Block _stage_block(const half_bits* x, Block blk, float* buf,
                               int dtype) noexcept nogil:
    """Widen block blk of x (its runs) into buf, contiguously; the block as it lies in buf."""
    cdef Py_ssize_t r
    for r in range(blk.nrun):
        _widen(x + blk.offset + r * blk.stride, buf + r * blk.length, blk.length, dtype)
    blk.offset = 0
    blk.stride = blk.length
    return blk


cdef void _planar16_reduce(const Planar* p, const half_bits* a, const half_bits* b,
                           const Work* w, Py_ssize_t c0, Py_ssize_t c1,
                           Py_ssize_t k) noexcept nogil:
    """_planar_reduce for 16-bit data: each block widened, then the float32 block code."""
    cdef float xs[BLOCK]
    cdef float gs[BLOCK]
    cdef Py_ssize_t bi, c
    cdef Block blk, staged
    cdef double bmean, bm2
    cdef double* q
    cdef int nval = 3 if w.op == TRAIN else 2
    for c in range(c0, c1):
        q = w.part + nval * (c * p.nchunk + k)
        q[0] = 0
        q[1] = 0
        if w.op == TRAIN:
            q[2] = 0
    for bi in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            blk = _block(p, c, bi)
            if blk.length <= 0:
                continue
            q = w.part + nval * (c * p.nchunk + k)
            if w.op == TRAIN:
                staged = _stage_block(a, blk, xs, w.dtype)
                _block_stats(xs, staged, &bmean, &bm2)
                _chan_merge(&q[0], &q[1], &q[2], <double>(blk.length * blk.nrun), bmean, bm2)
            else:
                staged = _stage_block(a, blk, gs, w.dtype)
                _stage_block(b, blk, xs, w.dtype)
                _block_sums(gs, xs, staged, w.gd.mean[c], &q[0], &q[1])


cdef void _planar16_apply(const Planar* p, const half_bits* a, const half_bits* b,
                          half_bits* out, const Work* w, Py_ssize_t c0, Py_ssize_t c1,
                          Py_ssize_t k) noexcept nogil:
    """_planar_apply for 16-bit data: each run in pieces of STAGE values, widened, computed
    in float32 and rounded once."""
    cdef float xs[STAGE]
    cdef float gs[STAGE]
    cdef float ys[STAGE]
    cdef half_bits hs[STAGE]
    cdef Py_ssize_t bi, c, r, off, n, base
    cdef Block blk
    for bi in range(_chunk_lo(p, k), _chunk_lo(p, k + 1)):
        for c in range(c0, c1):
            blk = _block(p, c, bi)
            for r in range(blk.nrun):
                off = 0
                while off < blk.length:
                    n = blk.length - off if blk.length - off < STAGE else STAGE
                    base = blk.offset + r * blk.stride + off
                    if w.op == TRAIN:
                        _widen(a + base, xs, n, w.dtype)
                        _affine_into(xs, ys, n, 1, 0, &w.cf.af, c)
                    else:
                        _widen(a + base, gs, n, w.dtype)
                        if w.gd.training:
                            _widen(b + base, xs, n, w.dtype)
                        _dx_into(gs, xs, ys, n, 1, 0, w.gd, c)
                    _store16(ys, out + base, hs, n, w.dtype, w.stream)
                    off = off + n
    if w.stream:
        _stream_fence()


cdef void _planar16_infer_runs(const Planar* p, const half_bits* x, half_bits* y,
                               Py_ssize_t r0, Py_ssize_t r1, const Affine* af, bint stream,
                               int dtype) noexcept nogil:
    """_planar_infer_runs for 16-bit data."""
    cdef float xs[STAGE]
    cdef float ys[STAGE]
    cdef half_bits hs[STAGE]
    cdef Py_ssize_t run, off, n, c = r0 % p.C
    for run in range(r0, r1):
        off = 0
        while off < p.S:
            n = p.S - off if p.S - off < STAGE else STAGE
            _widen(x + run * p.S + off, xs, n, dtype)
            _affine_into(xs, ys, n, 1, 0, af, c)
            _store16(ys, y + run * p.S + off, hs, n, dtype, stream)
            off = off + n
        c = c + 1
        if c == p.C:
            c = 0
    if stream:
        _stream_fence()


# ---------------------------------------------------------------------------------------------
# Rows (R, C)
# ---------------------------------------------------------------------------------------------

cdef void _stage_rows(const half_bits* x, Py_ssize_t C, Py_ssize_t c0, Py_ssize_t width,
                      Py_ssize_t r0, Py_ssize_t r1, float* buf, int dtype) noexcept nogil:
    """Widen channels [c0, c0 + width) of rows [r0, r1) into buf, rows `width` apart."""
    cdef Py_ssize_t r
    for r in range(r0, r1):
        _widen(x + r * C + c0, buf + (r - r0) * width, width, dtype)


cdef void _rows16_reduce(const half_bits* a, const half_bits* b, const Work* w, Py_ssize_t C,
                         Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t r0, Py_ssize_t r1,
                         Py_ssize_t k) noexcept nogil:
    """_rows_reduce for 16-bit data: the chunk's rows [r0, r1) of channels [c0, c1)
    widened (about ROW_CHUNK_VALUES values), then reduced by the float32 code into chunk k."""
    cdef Py_ssize_t width = c1 - c0, nr = r1 - r0, c
    cdef double* out0 = w.part + 2 * k * C + c0
    cdef double* out1 = w.part + (2 * k + 1) * C + c0
    cdef Grad gview
    cdef float* sa = <float*>malloc((2 if w.op != TRAIN else 1) * nr * width * sizeof(float))
    cdef float* sb
    if sa == NULL:             # out of memory: NaN partials rather than a crash
        for c in range(width):
            out0[c] = NAN
            out1[c] = NAN
        return
    _stage_rows(a, C, c0, width, r0, r1, sa, w.dtype)
    if w.op == TRAIN:
        _rows_chunk_stats(sa, width, 0, width, 0, nr, out0, out1, w.multi_row)
    else:
        sb = sa + nr * width
        _stage_rows(b, C, c0, width, r0, r1, sb, w.dtype)
        gview = w.gd[0]        # the coefficients of channels [c0, c1) from index 0
        gview.mean = gview.mean + c0
        if gview.mean32 != NULL:
            gview.mean32 = gview.mean32 + c0
            gview.mean_lo = gview.mean_lo + c0
        _rows_chunk_sums(sa, sb, width, 0, width, 0, nr, &gview, out0, out1, w.multi_row)
    free(sa)


cdef void _rows16_apply(const half_bits* a, const half_bits* b, half_bits* out, const Work* w,
                        const Affine* af, Py_ssize_t C, Py_ssize_t r0,
                        Py_ssize_t r1) noexcept nogil:
    """The normalization (af given) or dx (af NULL) of rows [r0, r1) of 16-bit data: whole
    rows per stage when they fit, else pieces of a row, computed by the float32 code."""
    cdef float xs[STAGE]
    cdef float gs[STAGE]
    cdef float ys[STAGE]
    cdef half_bits hs[STAGE]
    cdef Py_ssize_t r = r0, n, c0, width
    cdef Affine aview
    cdef Grad gview
    if C <= STAGE:
        while r < r1:
            n = STAGE // C if STAGE // C < r1 - r else r1 - r
            if af != NULL:
                _widen(a + r * C, xs, n * C, w.dtype)
                _rows_affine(xs, ys, C, 0, n, af, False)
            else:
                _widen(a + r * C, gs, n * C, w.dtype)
                if w.gd.training:
                    _widen(b + r * C, xs, n * C, w.dtype)
                _rows_dx(gs, xs, ys, C, 0, n, w.gd, False)
            _store16(ys, out + r * C, hs, n * C, w.dtype, w.stream)
            r = r + n
    else:
        for r in range(r0, r1):
            c0 = 0
            while c0 < C:
                width = STAGE if c0 + STAGE <= C else C - c0
                if af != NULL:
                    aview = _affine_from(af, c0)
                    _widen(a + r * C + c0, xs, width, w.dtype)
                    _rows_affine(xs, ys, width, 0, 1, &aview, False)
                else:
                    gview = _grad_from(w.gd, c0)
                    _widen(a + r * C + c0, gs, width, w.dtype)
                    if w.gd.training:
                        _widen(b + r * C + c0, xs, width, w.dtype)
                    _rows_dx(gs, xs, ys, width, 0, 1, &gview, False)
                _store16(ys, out + r * C + c0, hs, width, w.dtype, w.stream)
                c0 = c0 + width
    if w.stream:
        _stream_fence()


cdef inline Affine _affine_from(const Affine* af, Py_ssize_t c0) noexcept nogil:
    """af seen from channel c0 on (for a piece of a row)."""
    cdef Affine v = af[0]
    v.mean = v.mean + c0
    v.scale = v.scale + c0
    v.shift = v.shift + c0
    v.mean32 = v.mean32 + c0
    v.scale32 = v.scale32 + c0
    v.shift32 = v.shift32 + c0
    v.ok32 = v.ok32 + c0
    return v


cdef inline Grad _grad_from(const Grad* gd, Py_ssize_t c0) noexcept nogil:
    """The dx coefficients of gd seen from channel c0 on (for a piece of a row)."""
    cdef Grad v = gd[0]
    v.mean = v.mean + c0
    v.a = v.a + c0
    v.kx = v.kx + c0
    v.k0 = v.k0 + c0
    if v.mean32 != NULL:
        v.mean32 = v.mean32 + c0
        v.gmean32 = v.gmean32 + c0
        v.gmean_lo32 = v.gmean_lo32 + c0
        v.a32 = v.a32 + c0
        v.kx32 = v.kx32 + c0
        v.c32 = v.c32 + c0
        v.ok32 = v.ok32 + c0
    return v
