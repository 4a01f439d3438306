# 16-bit data (float16, bfloat16): the NCHW and NHWC kernels' data passes. Each block of a
# reduction (planar) or chunk of rows (rows) is widened into a stage of float32 values and
# handed to the float32 code, so the statistics, sums and their accuracy are exactly those
# of the float32 path on the widened values. The AVX-512 build reads the common ones
# straight from the 16-bit data instead, with that same arithmetic (sums_run.h): the
# training statistics (planar blocks of long runs, rows tiles), a plain backward's sums and
# (planar) the fused activation's backward sums, so the same bits without the stage. Each
# piece of an elementwise pass is computed in float32 and rounded once, to nearest even, to
# the data type. The plain normalization (no residual, no ReLU) and dx (with or without the
# fused activation's mask), where float32 carries the coefficients, do that in one loop over
# registers in the AVX2 and AVX-512 builds (_affine16, _dx16: the float32 code's
# expressions, so the same bits); the rest goes through an L1 stage. The float32 result is
# within 2 float32 ulps of the exact one, so the 16-bit output is a faithful rounding
# (within one unit of its last place).


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


cdef inline void _mask_staged(float* gs, const half_bits* ym, Block blk, int dtype,
                              double slope) noexcept nogil:
    """Zero the staged dy of block blk where the forward's y (16-bit) is not > 0 (a slope >
    0: multiply it by the leaky ReLU's slope there)."""
    cdef float ys[BLOCK]
    cdef Py_ssize_t i
    _stage_block(ym, blk, ys, dtype)
    _mask_into(gs, ys, gs, blk.nrun * blk.length, slope)


cdef inline void _block_stats16(const half_bits* x, Block blk, int dtype, double* mean,
                               double* m2) noexcept nogil:
    """_block_stats of a 16-bit block of long runs (_long_runs) read straight from its
    16-bit form (sums_run.h, SUMS_RUN builds): _block_devs's lanes and order on the same
    values, and the same second pass where the first cancels, so the same bits as the block
    widened into a stage, without the stage."""
    cdef double s1, s2, v
    cdef double count = <double>(blk.length * blk.nrun)
    cdef const half_bits* p = x + blk.offset
    cdef float first
    cdef double bm
    cdef double limit = _cancel_limit(<const float*>NULL)     # float32 data's
    _widen(p, &first, 1, dtype)
    bm = first
    _devs_h16(p, blk.length, blk.nrun, blk.stride, bm, dtype == BF16, PREFETCH_BYTES // 2,
              &s1, &s2)
    v = _madd(-s1, s1 / count, s2)
    if not (v * limit >= s2):                 # also when a sum is NaN or infinite
        bm = bm + s1 / count
        _devs_h16(p, blk.length, blk.nrun, blk.stride, bm, dtype == BF16,
                  PREFETCH_BYTES // 2, &s1, &s2)
        v = _madd(-s1, s1 / count, s2)
    mean[0] = bm + s1 / count
    if v < 0:                  # rounding only; a NaN must stay NaN
        v = 0.0
    m2[0] = v


cdef inline bint _block_sums16(const half_bits* g, const half_bits* x, Block blk, double mean,
                              double* sum_g, double* dot, int dtype, const half_bits* ym,
                              const Grad* gd) noexcept nogil:
    """_block_sums of a 16-bit block read straight from its 16-bit form (sums_run.h,
    SUMS_RUN builds), g as is or, with ym (the fused activation's 16-bit y, laid out as g),
    masked in gd's variant as _block_sums_y masks it: the float32 lanes on the same values,
    so the same bits as the block widened into a stage, without the stage. False, adding
    nothing, where the float32 lanes do not apply (a mean beyond float32's range, a dot
    that left it): the staged block then takes _block_sums's double path."""
    cdef double s, t
    cdef float m32
    cdef GRead rd
    if not _f32_bounded(mean):
        return False
    m32 = <float>mean
    rd.y = NULL
    rd.bits = NULL
    rd.slope = 0
    rd.inverse = 0
    if ym == NULL:
        rd.kind = G_PLAIN
    else:
        rd.y = <const void*>(ym + blk.offset)
        if gd.slope == 0:
            rd.kind = G_RELU
        elif gd.inverse:
            rd.kind = G_LEAKY_INVERSE
            rd.slope = <float>gd.slope
            rd.inverse = <float>(1.0 / gd.slope)
        else:
            rd.kind = G_LEAKY
            rd.slope = <float>gd.slope
    # the float32 blocks' prefetch in values (runs longer than PREFETCH_BYTES / 4 values
    # ask for the values that far ahead): without it, the long planes' backward took
    # 1.15-1.20x the staged one's time, whose widening loops prefetch
    _sums_run_h16(g + blk.offset, x + blk.offset, blk.length, blk.nrun, blk.stride, m32,
                  dtype == BF16, &rd, PREFETCH_BYTES // 2, &s, &t)
    if not (_f32_sum_ok(t) and fabs(s) <= F32_BIG):
        return False
    sum_g[0] = sum_g[0] + s
    dot[0] = dot[0] + _madd(-(mean - <double>m32), s, t)
    return True


cdef void _planar16_reduce(const Planar* p, const half_bits* a, const half_bits* b,
                           const Work* w, Py_ssize_t c0, Py_ssize_t c1,
                           Py_ssize_t k) noexcept nogil:
    """_planar_reduce for 16-bit data: each block widened, then the float32 block code; a
    backward's block (plain or masked by the fused activation's y), and a training block
    of long runs, are summed straight from their 16-bit form where the build has the
    register lanes (_block_sums16, _block_stats16: the same bits)."""
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
                if SUMS_RUN and _long_runs(blk):
                    _block_stats16(a, blk, w.dtype, &bmean, &bm2)
                else:
                    staged = _stage_block(a, blk, xs, w.dtype)
                    _block_stats(xs, staged, &bmean, &bm2)
                _chan_merge(&q[0], &q[1], &q[2], <double>(blk.length * blk.nrun), bmean, bm2)
            else:
                # (the leaky ReLU's backward from its output reads x as y: ymask is x)
                if (SUMS_RUN and (not w.gd.inverse or w.ymask == <const void*>b)
                        and _block_sums16(a, b, blk, w.gd.mean[c], &q[0], &q[1], w.dtype,
                                          <const half_bits*>w.ymask, w.gd)):
                    continue
                staged = _stage_block(a, blk, gs, w.dtype)
                _stage_block(b, blk, xs, w.dtype)
                if w.ymask == <const void*>b:   # from the output: y is x, staged in xs
                    _mask_into(gs, xs, gs, blk.nrun * blk.length, w.gd.slope)
                elif w.ymask != NULL:       # the fused ReLU: dy where y > 0
                    _mask_staged(gs, <const half_bits*>w.ymask, blk, w.dtype, w.gd.slope)
                if w.gd.inverse:            # x is the leaky ReLU's y: its pre-activation
                    _invert_into(xs, blk.nrun * blk.length, 1.0 / w.gd.slope)
                _block_sums(gs, xs, staged, w.gd.mean[c], &q[0], &q[1], <const float*>NULL,
                            PLAIN)


cdef inline Act16 _act16(const Work* w, Py_ssize_t base) noexcept nogil:
    """The fused activation of a backward's 16-bit dx loop at offset base: the forward's y
    and the residual's gradient there (or none), the slope, and the inverse for the
    backward from a leaky ReLU's output; the staged loops' arithmetic, so the same bits."""
    cdef Act16 act
    act.y = NULL
    act.e = NULL
    act.slope = 0
    act.inverse = 0
    if w.ymask != NULL:
        act.y = <const unsigned short*>w.ymask + base
        act.slope = <float>w.gd.slope
        if w.gd.inverse:
            act.inverse = <float>(1.0 / w.gd.slope)
        if w.dres != NULL:
            act.e = <unsigned short*>w.dres + base
    return act


cdef void _piece16(const half_bits* a, const half_bits* b, half_bits* out, Py_ssize_t n,
                   const Work* w, const Affine* af, Py_ssize_t c, Py_ssize_t base) noexcept nogil:
    """n values of channel c (n <= STAGE) of the normalization (af given: a = x) or of dx
    (af NULL: a = dy, b = x), widened, computed by the float32 code with the fused epilogue
    (w.res, w.relu; w.ymask, w.dres at the same offset `base`), rounded once."""
    cdef float xs[STAGE]
    cdef float gs[STAGE]
    cdef float ys[STAGE]
    cdef float ms[STAGE]
    cdef float ds[STAGE]
    cdef half_bits hs[STAGE]
    if DIRECT16 and af != NULL and w.res == NULL and not w.relu and af.ok32[c]:
        # the plain normalization in one loop over registers (the same bits, see _affine16)
        _affine16(a, &hs[0] if w.stream else out, n, af.mean32[c], af.scale32[c], af.shift32[c],
                  w.dtype == BF16)
        if w.stream:
            _stream_u16(out, hs, n)
        return
    if DIRECT16 and af == NULL and w.gd.mean32 != NULL and w.gd.ok32[c]:
        # dx in one loop over registers, with the fused activation's mask (the same bits,
        # see _dx16)
        _dx16(a, b, &hs[0] if w.stream else out, n, w.gd.training, w.gd.mean32[c],
              w.gd.a32[c], w.gd.kx32[c], w.gd.c32[c], w.gd.gmean32[c], w.gd.gmean_lo32[c],
              w.dtype == BF16, _act16(w, base))
        if w.stream:
            _stream_u16(out, hs, n)
        return
    if af != NULL:
        _widen(a, xs, n, w.dtype)
        if w.res != NULL:
            _widen(<const half_bits*>w.res + base, gs, n, w.dtype)
        _affine_into(xs, ys, n, 1, 0, af, c, gs if w.res != NULL else NULL, w.relu)
    else:
        _widen(a, gs, n, w.dtype)
        if w.gd.training:
            _widen(b, xs, n, w.dtype)
        if w.ymask != NULL:
            _widen(<const half_bits*>w.ymask + base, ms, n, w.dtype)
        _dx_into(gs, xs, ys, n, 1, 0, w.gd, c, ms if w.ymask != NULL else NULL,
                 ds if w.dres != NULL else NULL)
        if w.dres != NULL:
            _narrow(ds, <half_bits*>w.dres + base, n, w.dtype)
    _store16(ys, out, hs, n, w.dtype, w.stream)


cdef void _planar16_apply(const Planar* p, const half_bits* a, const half_bits* b,
                          half_bits* out, const Work* w, Py_ssize_t c0, Py_ssize_t c1,
                          Py_ssize_t k) noexcept nogil:
    """_planar_apply for 16-bit data: each run in pieces of STAGE values, widened, computed
    in float32 and rounded once."""
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
                    _piece16(a + base, b + base, out + base, n, w,
                             &w.cf.af if w.op == TRAIN else NULL, c, base)
                    off = off + n
    if w.stream:
        _stream_fence()


cdef void _planar16_infer_runs(const Planar* p, const half_bits* x, half_bits* y,
                               Py_ssize_t r0, Py_ssize_t r1, const Affine* af,
                               const Work* w) noexcept nogil:
    """_planar_infer_runs for 16-bit data."""
    cdef Py_ssize_t run, off, n, c = r0 % p.C
    for run in range(r0, r1):
        off = 0
        while off < p.S:
            n = p.S - off if p.S - off < STAGE else STAGE
            _piece16(x + run * p.S + off, NULL, y + run * p.S + off, n, w, af, c,
                     run * p.S + off)
            off = off + n
        c = c + 1
        if c == p.C:
            c = 0
    if w.stream:
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


cdef void _mask_rows(float* gs, const half_bits* ym, Py_ssize_t C, Py_ssize_t c0,
                     Py_ssize_t width, Py_ssize_t r0, Py_ssize_t r1, int dtype,
                     double slope) noexcept nogil:
    """Zero the staged dy (rows `width` apart) where the forward's 16-bit y is not > 0 (a
    slope > 0: multiply it by the leaky ReLU's slope there)."""
    cdef float ys[STAGE]
    cdef Py_ssize_t r, i, off, n
    for r in range(r0, r1):
        off = 0
        while off < width:
            n = width - off if width - off < STAGE else STAGE
            _widen(ym + r * C + c0 + off, ys, n, dtype)
            _mask_into(gs + (r - r0) * width + off, ys, gs + (r - r0) * width + off, n, slope)
            off = off + n


cdef void _rows16_reduce(const half_bits* a, const half_bits* b, const Work* w, Py_ssize_t C,
                         Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t r0, Py_ssize_t r1,
                         Py_ssize_t k) noexcept nogil:
    """_rows_reduce for 16-bit data: the chunk's rows [r0, r1) of channels [c0, c1)
    widened (about ROW_CHUNK_VALUES values), then reduced by the float32 code into chunk k;
    the training statistics and a plain backward's sums read straight from the 16-bit rows
    where the build has the register sums (_rows_chunk_stats's x16, _rows_chunk_sums's g16
    and x16: the same bits)."""
    cdef Py_ssize_t width = c1 - c0, nr = r1 - r0, c
    cdef double* out0 = w.part + 2 * k * C + c0
    cdef double* out1 = w.part + (2 * k + 1) * C + c0
    cdef Grad gview
    cdef float* sa
    cdef float* sb
    if SUMS_RUN and w.op == TRAIN:      # read straight from the 16-bit rows
        _rows_chunk_stats(<const float*>NULL, C, c0, c1, r0, r1, w.part + 2 * k * C,
                          w.part + (2 * k + 1) * C, w.multi_row, w, a, w.dtype)
        return
    if (SUMS_RUN and w.op != TRAIN and w.ymask == NULL and not w.gd.inverse
            and w.gd.mean32 != NULL):  # a plain backward's sums, straight from the 16-bit rows
        _rows_chunk_sums(<const float*>NULL, <const float*>NULL, C, c0, c1, r0, r1, w.gd,
                         w.part + 2 * k * C, w.part + (2 * k + 1) * C, w.multi_row,
                         <const float*>NULL, NULL, 0, False, w, a, b, w.dtype)
        return
    sa = <float*>_kernel_alloc(w, (2 if w.op != TRAIN else 1) * nr * width * sizeof(float))
    if sa == NULL:             # out of memory (w.failed is set): NaN, then a MemoryError
        for c in range(width):
            out0[c] = NAN
            out1[c] = NAN
        return
    _stage_rows(a, C, c0, width, r0, r1, sa, w.dtype)
    if w.op == TRAIN:
        _rows_chunk_stats(sa, width, 0, width, 0, nr, out0, out1, w.multi_row, w)
    else:
        sb = sa + nr * width
        _stage_rows(b, C, c0, width, r0, r1, sb, w.dtype)
        if w.ymask == <const void*>b:   # from the output: y is x, staged in sb
            _mask_into(sa, sb, sa, nr * width, w.gd.slope)
        elif w.ymask != NULL:  # the fused ReLU: dy where y > 0 (y widened in pieces)
            _mask_rows(sa, <const half_bits*>w.ymask, C, c0, width, r0, r1, w.dtype,
                       w.gd.slope)
        if w.gd.inverse:       # x is the leaky ReLU's y: its pre-activation
            _invert_into(sb, nr * width, 1.0 / w.gd.slope)
        gview = w.gd[0]        # the coefficients of channels [c0, c1) from index 0
        gview.slope = 0        # the staged values are masked (and inverted) already
        gview.inverse = False
        gview.mean = gview.mean + c0
        if gview.mean32 != NULL:
            gview.mean32 = gview.mean32 + c0
            gview.mean_lo = gview.mean_lo + c0
        _rows_chunk_sums(sa, sb, width, 0, width, 0, nr, &gview, out0, out1, w.multi_row,
                         <const float*>NULL, NULL, 0, False, w)
    free(sa)


cdef void _rows16_apply(const half_bits* a, const half_bits* b, half_bits* out, const Work* w,
                        const Affine* af, Py_ssize_t C, Py_ssize_t r0,
                        Py_ssize_t r1) noexcept nogil:
    """The normalization (af given) or dx (af NULL) of rows [r0, r1) of 16-bit data: whole
    rows per stage when they fit, else pieces of a row, computed by the float32 code (with
    the fused epilogue when asked)."""
    cdef float xs[STAGE]
    cdef float gs[STAGE]
    cdef float ys[STAGE]
    cdef float ms[STAGE]
    cdef float ds[STAGE]
    cdef half_bits hs[STAGE]
    cdef Py_ssize_t r = r0, n, c0 = 0, width, base, nrow
    cdef bint whole = C <= STAGE
    cdef bint direct, direct_dx
    cdef const Grad* gd
    while r < r1:
        if whole:              # n whole rows
            nrow = STAGE // C if STAGE // C < r1 - r else r1 - r
            width = C
            c0 = 0
        else:                  # a piece of row r
            nrow = 1
            width = STAGE if c0 + STAGE <= C else C - c0
        base = r * C + c0
        n = nrow * width
        direct = (DIRECT16 and af != NULL and w.res == NULL and not w.relu and
                  _all_set(af.ok32 + c0, width))
        direct_dx = (DIRECT16 and af == NULL and w.gd.mean32 != NULL and
                     _all_set(w.gd.ok32 + c0, width))
        if direct_dx:
            # dx in one loop over registers (the same bits, see _dx16)
            gd = w.gd
            _dx16_rows(a + base, b + base, &hs[0] if w.stream else out + base, nrow, width,
                       gd.training, gd.mean32 + c0, gd.a32 + c0, gd.kx32 + c0, gd.c32 + c0,
                       gd.gmean32 + c0, gd.gmean_lo32 + c0, w.dtype == BF16,
                       _act16(w, base))
            if w.stream:
                _stream_u16(out + base, hs, n)
        elif direct:
            # the plain normalization in one loop over registers (the same bits, _affine16)
            _affine16_rows(a + base, &hs[0] if w.stream else out + base, nrow, width,
                           af.mean32 + c0, af.scale32 + c0, af.shift32 + c0, w.dtype == BF16)
            if w.stream:
                _stream_u16(out + base, hs, n)
        elif af != NULL:
            _widen(a + base, xs, n, w.dtype)
            _rows_affine(xs, ys, width, 0, nrow, af, c0, False, NULL, False)
            if w.res != NULL:
                _widen(<const half_bits*>w.res + base, gs, n, w.dtype)
            if w.res != NULL or w.relu:
                _epilogue(ys, gs if w.res != NULL else NULL, n, w.relu, af.slope)
        else:
            _widen(a + base, gs, n, w.dtype)
            if w.gd.training:
                _widen(b + base, xs, n, w.dtype)
            if w.ymask != NULL:
                _widen(<const half_bits*>w.ymask + base, ms, n, w.dtype)
            _rows_dx(gs, xs, ys, width, 0, nrow, w.gd, c0, False,
                     ms if w.ymask != NULL else NULL, ds if w.dres != NULL else NULL)
            if w.dres != NULL:
                _narrow(ds, <half_bits*>w.dres + base, n, w.dtype)
        if not (direct or direct_dx):
            _store16(ys, out + base, hs, n, w.dtype, w.stream)
        if whole:
            r = r + nrow
        else:
            c0 = c0 + width
            if c0 >= C:
                c0 = 0
                r = r + 1
    if w.stream:
        _stream_fence()
