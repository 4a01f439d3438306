# NCHW (planar) block arithmetic: the statistics and the fused backward sums of one block of
# one channel, and the elementwise passes over one run. A block is BLOCK values at most: part
# of one long run, or several short runs of the channel (one per sample, C*S values apart); it
# is read twice at most while it sits in L1. The chunking of channels into blocks, and the
# kernels that call these, are in planar.pxi.


cdef struct Block:
    Py_ssize_t offset       # of the first value
    Py_ssize_t length       # values per run
    Py_ssize_t nrun         # runs
    Py_ssize_t stride       # between runs (C * S)


# Accumulator lanes of the block reductions. Kept in a module variable (always LANES) rather
# than the compile-time constant: with a constant the compiler unrolls the lane loop and then
# vectorizes across blocks with shuffles; with a run-time count it vectorizes the lane loop
# itself, contiguously. Results depend on the lane count only, which is fixed.
cdef Py_ssize_t _lanes = LANES


cdef inline double _lane_sum(const acc_t* a, Py_ssize_t lanes) noexcept nogil:
    """Sum of the accumulators a[0:lanes] in double, in a fixed order: pairwise for 16 lanes
    (four dependent additions deep), eight interleaved partial sums otherwise."""
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0
    cdef Py_ssize_t j = 0
    if lanes == 16:
        return ((((<double>a[0] + a[8]) + (<double>a[4] + a[12]))
                 + ((<double>a[2] + a[10]) + (<double>a[6] + a[14])))
                + (((<double>a[1] + a[9]) + (<double>a[5] + a[13]))
                   + ((<double>a[3] + a[11]) + (<double>a[7] + a[15]))))
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


cdef inline bint _long_runs(Block blk) noexcept nogil:
    """Whether a block is summed run by run, each run in LANES lanes: one run, or fewer than
    four runs of at least LANES values. One lane per position (the other way) pays off when
    four runs share each update of a lane; with one to three runs every value would load
    and store its lane, and the block would end summing as many lanes as a run is long."""
    return blk.nrun == 1 or (blk.nrun < 4 and blk.length >= LANES)


cdef inline Py_ssize_t _block_lanes(Block blk) noexcept nogil:
    """Accumulator lanes for a block: LANES across long runs, or one lane per position of a
    run when the block is four or more short runs (the runs are then summed like the rows
    of a matrix, which vectorizes along the run however short it is)."""
    if not _long_runs(blk) and blk.length >= 4:
        return blk.length
    return _lanes


cdef inline double _cancel_limit(const floating* p) noexcept nogil:
    """Largest accepted s2 / m2 of a shifted one-pass block (see _block_stats): the one-pass
    m2 keeps a relative error below about 40 * limit * 2**-53, 5e-12 for float32 data (far
    under its precision) and 1e-13 for float64."""
    if floating is float:
        return 1024.0
    else:
        return 16.0


cdef inline Py_ssize_t _block_steps(Block blk, Py_ssize_t lanes, Py_ssize_t* step) noexcept nogil:
    """A block as a number of steps of `lanes` consecutive values, step[0] apart: the
    lane-sized pieces of each long run (the count is per run), or the runs themselves when
    each run is one group of lanes. Runs shorter than 4 values have no steps (they are
    summed one value at a time)."""
    if _long_runs(blk):
        step[0] = lanes
        return blk.length // lanes
    step[0] = blk.stride
    return blk.nrun if lanes == blk.length else 0


cdef inline Py_ssize_t _stepped(Block blk, Py_ssize_t lanes, Py_ssize_t nstep) noexcept nogil:
    """Values of each run covered by the steps; the rest of each run is summed one by one."""
    if _long_runs(blk):
        return nstep * lanes
    return blk.length if nstep > 0 else 0


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
        sq[j] = sq[j] + (_madd(d0, d0, d1 * d1) + _madd(d2, d2, d3 * d3))


cdef inline void _devs_one(const floating* q, Py_ssize_t lanes, double bm, double* acc,
                           double* sq) noexcept nogil:
    cdef Py_ssize_t j
    cdef double d
    for j in range(lanes):
        d = q[j] - bm
        acc[j] = acc[j] + d
        sq[j] = _madd(d, d, sq[j])


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
    # runs longer than the prefetch distance ask for their values ahead; shorter ones would
    # fetch other channels' planes
    cdef bint ahead = nstep * LANES * <Py_ssize_t>sizeof(floating) > PREFETCH_BYTES
    for k in range(nrun):
        r = q + k * stride
        for i in range(nstep):
            if ahead:
                _prefetch(<const char*>(r + i * LANES) + PREFETCH_BYTES,
                          LANES * sizeof(floating))
            for j in range(LANES):
                d = r[i * LANES + j] - bm
                a[j] = a[j] + d
                s[j] = _madd(d, d, s[j])
    for j in range(LANES):
        acc[j] = a[j]
        sq[j] = s[j]


cdef inline void _block_devs(const floating* p, Block blk, double bm, double* s1,
                             double* s2) noexcept nogil:
    """s1 = sum(x - bm) and s2 = sum((x - bm)^2) over one block, one pass, in double lanes
    that the compiler vectorizes without reassociating any lane's sum."""
    cdef double acc[BLOCK]
    cdef double sq[BLOCK]
    cdef double t1 = 0, t2 = 0, d
    cdef Py_ssize_t lanes = _block_lanes(blk)
    cdef Py_ssize_t step, nstep = _block_steps(blk, lanes, &step)
    cdef bint long_runs = _long_runs(blk)
    cdef Py_ssize_t nquad = 0 if long_runs else nstep // 4
    cdef Py_ssize_t i, j, k
    cdef const floating* run
    if REGISTER_LANES and long_runs:
        _devs_run(p, blk.nrun, blk.stride, nstep, bm, acc, sq)
    else:
        for j in range(lanes):
            acc[j] = 0
            sq[j] = 0
        if long_runs:
            for k in range(blk.nrun):
                for i in range(nstep):
                    _devs_one(p + k * blk.stride + i * step, lanes, bm, acc, sq)
        else:
            for i in range(nquad):
                _devs_quad(p + 4 * i * step, step, lanes, bm, acc, sq)
            for i in range(4 * nquad, nstep):
                _devs_one(p + i * step, lanes, bm, acc, sq)
    for k in range(blk.nrun):
        run = p + k * blk.stride
        for i in range(_stepped(blk, lanes, nstep), blk.length):
            d = run[i] - bm
            t1 = t1 + d
            t2 = _madd(d, d, t2)
    s1[0] = t1 + _lane_sum(acc, lanes)
    s2[0] = t2 + _lane_sum(sq, lanes)


cdef inline void _block_stats(const floating* p, Block blk, double* mean,
                              double* m2) noexcept nogil:
    """Mean and centred sum of squares of one block (blk.nrun runs of blk.length values,
    blk.stride apart; at most BLOCK values).

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
    cdef double count = <double>(blk.length * blk.nrun)
    cdef double bm = p[0]
    _block_devs(p, blk, bm, &s1, &s2)
    v = _madd(-s1, s1 / count, s2)
    if not (v * _cancel_limit(p) >= s2):     # also when a sum is NaN or infinite
        bm = bm + s1 / count
        _block_devs(p, blk, bm, &s1, &s2)
        v = _madd(-s1, s1 / count, s2)
    mean[0] = bm + s1 / count
    if v < 0:                  # rounding only; a NaN must stay NaN
        v = 0.0
    m2[0] = v


# The fused sums of the backward. sum(g) is accumulated in double lanes (the AVX-512 blocks
# of float32 and 16-bit data, sums_run.h, add four values per lane in float32 first, within
# the float32 contract: test_float32_gradient_sums_within_the_contract). For float32 data,
# sum(g * (x - mean)) runs in float32 lanes (a block has at most BLOCK values, so no lane
# adds more than 32 of them) around the mean rounded to float32, m32, and each block's dot is
# added to the channel's in double, corrected by the mean's low part: sum(g * (x - mean)) =
# sum(g * (x - m32)) - (mean - m32) * sum(g). A block whose float32 dot leaves float32's
# comfortable range (a product overflowed, or every term underflowed) or is not finite is
# summed again in double, so the range and the NaN and infinity behaviour are those of double
# lanes (and a block whose float32 sum of g leaves [-1e30, 1e30] has that summed again too).
# float64 data is summed in double.

cdef inline const floating* _at(const floating* p, Py_ssize_t off) noexcept nogil:
    """p + off, NULL for NULL. (Not a conditional expression: Cython gives that a non-const
    temporary, which C compilers warn about.)"""
    if p == NULL:
        return NULL
    return p + off


cdef inline void _sums_quad(const floating* g, const floating* x, Py_ssize_t step,
                            Py_ssize_t lanes, acc_t mean, double* acc, acc_t* dt,
                            const floating* ym, mask_t variant) noexcept nogil:
    """Four steps into the lanes: acc += sum of g (in double), dt += sum of g * (x - mean)
    (in acc_t)."""
    cdef Py_ssize_t j
    cdef floating g0, g1, g2, g3
    for j in range(lanes):
        g0 = _gat(g, ym, j, variant)
        g1 = _gat(g, ym, j + step, variant)
        g2 = _gat(g, ym, j + 2 * step, variant)
        g3 = _gat(g, ym, j + 3 * step, variant)
        acc[j] = acc[j] + ((<double>g0 + g1) + (<double>g2 + g3))
        dt[j] = dt[j] + (_dot2(g0, _xat(x, j, variant), g1, _xat(x, j + step, variant), mean)
                         + _dot2(g2, _xat(x, j + 2 * step, variant), g3,
                                 _xat(x, j + 3 * step, variant), mean))


cdef inline void _sums_one(const floating* g, const floating* x, Py_ssize_t lanes,
                           acc_t mean, double* acc, acc_t* dt, const floating* ym,
                           mask_t variant) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating gv
    for j in range(lanes):
        gv = _gat(g, ym, j, variant)
        acc[j] = acc[j] + gv
        dt[j] = _dot1(dt[j], gv, _xat(x, j, variant), mean)


cdef inline void _sums_run(const floating* g, const floating* x, Py_ssize_t nrun,
                           Py_ssize_t stride, Py_ssize_t nstep, acc_t mean, double* acc,
                           acc_t* dt, const floating* ym, mask_t variant,
                           const unsigned char* kb) noexcept nogil:
    """nstep steps of LANES values of each of nrun runs into acc[0:LANES], dt[0:LANES] (as
    _sums_one on each step, run after run), in register-held local sums as in _devs_run.
    kb (float32 data, one run, plain variant): g masked by these bits (value i's is bit
    i % 8 of kb[i // 8]), as a bit AND in the lanes: the values the masked variant takes."""
    cdef double a[LANES]
    cdef acc_t t[LANES]
    cdef Py_ssize_t i, j, k
    cdef const floating* gr
    cdef const floating* xr
    cdef const floating* yr = NULL
    cdef floating gv
    cdef unsigned int word
    cdef bint ahead = nstep * LANES * <Py_ssize_t>sizeof(floating) > PREFETCH_BYTES
    for j in range(LANES):
        a[j] = 0
        t[j] = 0
    if floating is float:
        if kb != NULL:
            for i in range(nstep):
                if ahead:
                    _prefetch(<const char*>(g + i * LANES) + PREFETCH_BYTES,
                              LANES * sizeof(floating))
                    _prefetch(<const char*>(x + i * LANES) + PREFETCH_BYTES,
                              LANES * sizeof(floating))
                memcpy(&word, kb + i * (LANES // 8), LANES // 8)
                for j in range(LANES):
                    gv = _bit_f(g[i * LANES + j], word, j)
                    a[j] = a[j] + gv
                    t[j] = _dot1(t[j], gv, x[i * LANES + j], mean)
            for j in range(LANES):
                acc[j] = a[j]
                dt[j] = t[j]
            return
    for k in range(nrun):
        gr = g + k * stride
        xr = x + k * stride
        if ym != NULL:
            yr = ym + k * stride
        for i in range(nstep):
            if ahead:          # as in _devs_run
                _prefetch(<const char*>(gr + i * LANES) + PREFETCH_BYTES,
                          LANES * sizeof(floating))
                _prefetch(<const char*>(xr + i * LANES) + PREFETCH_BYTES,
                          LANES * sizeof(floating))
            for j in range(LANES):
                gv = _gat(gr, yr, i * LANES + j, variant)
                a[j] = a[j] + gv
                t[j] = _dot1(t[j], gv, _xat(xr, i * LANES + j, variant), mean)
    for j in range(LANES):
        acc[j] = a[j]
        dt[j] = t[j]


cdef inline void _block_sums_in(const floating* g, const floating* x, Block blk, acc_t mean,
                                double* sum_g, double* dot, const floating* ym, mask_t variant,
                                const unsigned char* kb) noexcept nogil:
    """sum(g) in double lanes acc and sum(g * (x - mean)) in acc_t lanes dt over one block,
    returned in double (lanes and steps as in _block_devs). kb: see _sums_run
    (REGISTER_LANES builds only). The lanes are this function's own arrays: where the
    compiler keeps the function out of line, it still knows they alias neither g nor x."""
    cdef double acc[BLOCK]
    cdef acc_t dt[BLOCK]
    cdef double s = 0
    cdef acc_t t = 0
    cdef Py_ssize_t lanes = _block_lanes(blk)
    cdef Py_ssize_t step, nstep = _block_steps(blk, lanes, &step)
    cdef bint long_runs = _long_runs(blk)
    cdef Py_ssize_t nquad = 0 if long_runs else nstep // 4
    cdef Py_ssize_t i, j, k, off
    cdef const floating* gr
    cdef const floating* xr
    cdef const floating* yr = NULL
    cdef floating gv
    cdef GRead rd
    if floating is float:
        if acc_t is float:
            if SUMS_RUN and (blk.nrun == 1 or kb == NULL):
                # float32 in register lanes (sums_run.h), each run's last values masked
                # into them
                rd.y = <const float*>ym
                rd.bits = kb
                rd.slope = 0
                rd.inverse = 0
                if mask_t is char:
                    rd.kind = G_BITS if kb != NULL else G_PLAIN
                elif mask_t is short or mask_t is int:
                    rd.kind = G_RELU
                elif mask_t is LeakyInverse:
                    rd.kind = G_LEAKY_INVERSE
                    rd.slope = <float>variant.slope
                    rd.inverse = <float>variant.inverse
                else:
                    rd.kind = G_LEAKY
                    rd.slope = <float>variant.slope
                _sums_run_f32(g, x, blk.length, blk.nrun, blk.stride, mean, &rd,
                              PREFETCH_BYTES, sum_g, dot)
                return
    if REGISTER_LANES and long_runs:
        _sums_run(g, x, blk.nrun, blk.stride, nstep, mean, acc, dt, ym, variant, kb)
    else:
        for j in range(lanes):
            acc[j] = 0
            dt[j] = 0
        if long_runs:
            for k in range(blk.nrun):
                for i in range(nstep):
                    off = k * blk.stride + i * step
                    _sums_one(g + off, x + off, lanes, mean, acc, dt, _at(ym, off), variant)
        else:
            for i in range(nquad):
                _sums_quad(g + 4 * i * step, x + 4 * i * step, step, lanes, mean, acc, dt,
                           _at(ym, 4 * i * step), variant)
            for i in range(4 * nquad, nstep):
                _sums_one(g + i * step, x + i * step, lanes, mean, acc, dt, _at(ym, i * step),
                          variant)
    for k in range(blk.nrun):
        gr = g + k * blk.stride
        xr = x + k * blk.stride
        yr = _at(ym, k * blk.stride)
        for i in range(_stepped(blk, lanes, nstep), blk.length):
            gv = _gat(gr, yr, i, variant)
            if floating is float:
                if kb != NULL:
                    gv = _bit_f(gv, kb[i // 8], i % 8)
            s = s + gv
            t = _dot1(t, gv, _xat(xr, i, variant), mean)
    sum_g[0] = s + _lane_sum(acc, lanes)
    dot[0] = t + _lane_sum(dt, lanes)


cdef inline void _block_sums(const floating* g, const floating* x, Block blk, double mean,
                             double* sum_g, double* dot, const floating* ym,
                             mask_t variant, const unsigned char* kb=NULL) noexcept nogil:
    """Add sum(g) and sum(g * (x - mean)) over one block to sum_g, dot, in one pass (the dot
    in float32 lanes for float32 data, see above). With ym (the fused ReLU's output, laid
    out as g, or NULL), of g masked by y > 0, read in the same loops; with kb (a block of
    one run, REGISTER_LANES builds), of g masked by those bits (_sums_run).
    For float32 data, the float32 pass's sum(g) is kept whenever it is within range, also
    when the dot is summed again in double (a mean or an x beyond float32's range, a NaN in
    x): sum(g) depends on g alone."""
    cdef double s, t, s64
    cdef float m32
    cdef bint bounded
    if floating is float:
        bounded = _f32_bounded(mean)
        m32 = <float>mean if bounded else 0.0
        _block_sums_in(g, x, blk, m32, &s, &t, ym, variant, kb)
        if fabs(s) <= F32_BIG:
            if bounded and _f32_sum_ok(t):
                sum_g[0] = sum_g[0] + s
                dot[0] = dot[0] + _madd(-(mean - <double>m32), s, t)
                return
            # the dot again in double; its pass's sum of g (s64) is not used
            _block_sums_in(g, x, blk, mean, &s64, &t, ym, variant, kb)
            sum_g[0] = sum_g[0] + s
            dot[0] = dot[0] + t
            return
    _block_sums_in(g, x, blk, mean, &s, &t, ym, variant, kb)
    sum_g[0] = sum_g[0] + s
    dot[0] = dot[0] + t


cdef inline void _block_sums_y(const floating* g, const floating* x, Block blk, double mean,
                               double* sum_g, double* dot, const floating* ym,
                               const Grad* gd) noexcept nogil:
    """_block_sums of g masked by the fused ReLU's output ym, in gd's variant: the ReLU, the
    leaky ReLU, or the leaky ReLU's backward from the output (x is y then)."""
    cdef Leaky leaky
    if gd.slope == 0:
        _block_sums(g, x, blk, mean, sum_g, dot, ym, MASKED)
    elif gd.inverse:
        _block_sums(g, x, blk, mean, sum_g, dot, ym, _leaky_inverse(gd))
    else:
        leaky.slope = gd.slope
        _block_sums(g, x, blk, mean, sum_g, dot, ym, leaky)


# The elementwise passes. For float32 data they run in float32: y = (x - m32) * a + c with
# m32 the per-channel mean rounded to float32, a the scale and c = shift - (mean - m32) * a
# rounded once, so x - m32 is exact (or nearly) for data near its mean and the mean keeps
# more than float32's digits: a constant channel gives exactly its bias. Measured against
# float64: max |y - y64| below 3 float32 eps x max(1, |y64|) at offsets 0 to 1e5
# (docs/math.rst). A channel whose coefficients float32 cannot carry (_f32_coefs_ok) runs in
# double, as float64 data does.

cdef inline void _affine_into(const floating* x, floating* y, Py_ssize_t length,
                              Py_ssize_t nrun, Py_ssize_t stride, const Affine* af,
                              Py_ssize_t c, const floating* res, bint relu) noexcept nogil:
    """y = (x - mean) * scale + shift for channel c, on nrun runs of `length` values stride
    apart: in float32 for float32 data where the channel allows it (see above), else with
    (x - mean) in double. The coefficients are read once for all the runs. The fused
    epilogue: the residual `res` (laid out as x) is added, then the ReLU (a NaN stays NaN,
    as np.maximum(v, 0) keeps it) when `relu`."""
    cdef Py_ssize_t i, r
    cdef float m32, a32, c32, v32
    cdef double mean = af.mean[c], scale = af.scale[c], shift = af.shift[c], v
    cdef const floating* xr
    cdef const floating* rr
    cdef floating* yr
    cdef bint epilogue = res != NULL or relu
    cdef bint leaky = relu and af.slope != 0
    cdef float s32 = <float>af.slope
    if floating is float:
        if af.ok32[c]:
            m32 = af.mean32[c]
            a32 = af.scale32[c]
            c32 = af.shift32[c]
            for r in range(nrun):
                xr = x + r * stride
                yr = y + r * stride
                if not epilogue:
                    for i in range(length):
                        yr[i] = _maddf(xr[i] - m32, a32, c32)
                    continue
                rr = res + r * stride if res != NULL else xr
                for i in range(length):
                    v32 = _maddf(xr[i] - m32, a32, c32)
                    if res != NULL:
                        v32 = v32 + rr[i]
                    if leaky:
                        v32 = _leaky_v(v32, s32)
                    elif relu:
                        v32 = 0 if v32 < 0 else v32     # a select: vectorized
                    yr[i] = v32
            return
    for r in range(nrun):
        xr = x + r * stride
        yr = y + r * stride
        if not epilogue:
            for i in range(length):
                yr[i] = <floating>_madd(xr[i] - mean, scale, shift)
            continue
        rr = res + r * stride if res != NULL else xr
        for i in range(length):
            v = <floating>_madd(xr[i] - mean, scale, shift)
            if res != NULL:
                v = <floating>(v + rr[i])
            if leaky:
                v = _leaky_v(<floating>v, <floating>af.slope)
            elif relu:
                v = 0 if v < 0 else v
            yr[i] = <floating>v


cdef inline void _dx_into(const floating* g, const floating* x, floating* dx, Py_ssize_t length,
                          Py_ssize_t nrun, Py_ssize_t stride, const Grad* gd,
                          Py_ssize_t c, const floating* ym, floating* dres) noexcept nogil:
    """dx = g * a + (x - mean) * kx + k0 for channel c in training (two multiply-adds per
    value); dx = g * a with fixed statistics (x is not read then: a NaN in x must not reach
    dx); on nrun runs of `length` values stride apart. For float32 data in float32 where the
    channel allows it, as ((g - gmean) * a + (x - mean) * kx with both means split into a
    float32 value and its remainder (k0 = -gmean * a), so that dx keeps its relative
    precision where g - gmean cancels (test_float32_gradient_sums_in_double). The fused ReLU
    backward: with `ym` (the forward's y, laid out as g), g = dy where y > 0 else 0 (a NaN
    in y gives 0), written to `dres` (the residual's gradient) when given."""
    cdef Leaky leaky
    cdef LeakyStored leaky_stored
    cdef LeakyInverse inverse
    if ym == NULL:
        _dx_in(g, x, dx, length, nrun, stride, gd, c, NULL, NULL, PLAIN)
    elif gd.slope == 0:
        if dres == NULL:
            _dx_in(g, x, dx, length, nrun, stride, gd, c, ym, NULL, MASKED)
        else:
            _dx_in(g, x, dx, length, nrun, stride, gd, c, ym, dres, MASKED_STORED)
    elif gd.inverse:
        inverse = _leaky_inverse(gd)
        _dx_in(g, x, dx, length, nrun, stride, gd, c, ym, NULL, inverse)
    elif dres == NULL:
        leaky.slope = gd.slope
        _dx_in(g, x, dx, length, nrun, stride, gd, c, ym, NULL, leaky)
    else:
        leaky_stored.slope = gd.slope
        _dx_in(g, x, dx, length, nrun, stride, gd, c, ym, dres, leaky_stored)


cdef inline void _dx_in(const floating* g, const floating* x, floating* dx, Py_ssize_t length,
                        Py_ssize_t nrun, Py_ssize_t stride, const Grad* gd, Py_ssize_t c,
                        const floating* ym, floating* dres, mask_t variant) noexcept nogil:
    """The loops of _dx_into, in the given variant (mask_t)."""
    cdef Py_ssize_t r, off
    if floating is float:
        if gd.mean32 != NULL and gd.ok32[c]:
            for r in range(nrun):
                off = r * stride
                _dx_span(g + off, x + off, dx + off, _at(ym, off), _at_w(dres, off), length,
                         gd.training, gd.mean32[c], gd.a32[c], gd.kx32[c], gd.c32[c],
                         gd.gmean32[c], gd.gmean_lo32[c], variant)
            return
    for r in range(nrun):
        off = r * stride
        _dx_span(g + off, x + off, dx + off, _at(ym, off), _at_w(dres, off), length,
                 gd.training, gd.mean[c], gd.a[c], gd.kx[c], gd.k0[c], 0.0, 0.0, variant)


cdef inline void _dx_span(const floating* g, const floating* x, floating* dx,
                          const floating* ym, floating* dres, Py_ssize_t n, bint training,
                          opmath_t mean, opmath_t a, opmath_t kx, opmath_t k0, opmath_t gm,
                          opmath_t gl, mask_t variant) noexcept nogil:
    """dx of n consecutive values of one channel: _dx_value in training, g * a with fixed
    statistics (x is not read); g masked by ym and stored to dres as the variant says."""
    cdef Py_ssize_t i
    cdef floating gv
    if floating is float:
        if opmath_t is float:
            if mask_t is char:
                if training:           # the plain float32 loop: out of line (dx_loop.h)
                    _dx_f32(g, x, dx, n, mean, a, kx, k0, gm, gl)
                    return
    if floating is double:
        if opmath_t is double:
            if mask_t is char:
                if training:           # and the float64 one
                    _dx_f64(g, x, dx, n, mean, a, kx, k0)
                    return
    if training:
        for i in range(n):
            gv = _gat(g, ym, i, variant)
            if mask_t is int or mask_t is LeakyStored:
                dres[i] = gv
            dx[i] = _dx_value(gv, _xat(x, i, variant), mean, a, kx, k0, gm, gl)
    else:
        for i in range(n):
            gv = _gat(g, ym, i, variant)
            if mask_t is int or mask_t is LeakyStored:
                dres[i] = gv
            dx[i] = <floating>(gv * a)


cdef inline floating _dx_value(floating g, floating x, opmath_t mean, opmath_t a, opmath_t kx,
                               opmath_t k0, opmath_t gm, opmath_t gl) noexcept nogil:
    """One dx value in training. In double: g * a + ((x - mean) * kx + k0). In float32 (float32
    data where the channel allows it): ((g - gm) - gl) * a + ((x - mean) * kx + k0), the
    gradient's mean split into its float32 value gm and the remainder gl, k0 = c32 (gm and
    gl unused in double)."""
    if opmath_t is float:
        if floating is float:
            return _dx_one_f32(g, x, mean, a, kx, k0, gm, gl)       # (dx_loop.h)
        return <floating>_madd((g - gm) - gl, a, _madd(x - mean, kx, k0))   # not used
    else:
        return <floating>_dx_one_f64(g, x, mean, a, kx, k0)


cdef inline floating* _at_w(floating* p, Py_ssize_t off) noexcept nogil:
    """p + off, NULL for NULL."""
    if p == NULL:
        return NULL
    return p + off


# Outputs larger than the caches are written with streaming stores (Work.stream): each run is
# computed into an L1 stage of STAGE values and stored from there. Runs shorter than
# STREAM_MIN values (a few cache lines) are written directly: their partial lines would cost
# more than the streaming saves.
cdef enum:
    STREAM_MIN = 256


cdef void _affine_streamed(const floating* x, floating* y, Py_ssize_t length, Py_ssize_t nrun,
                           Py_ssize_t stride, const Affine* af, Py_ssize_t c,
                           const floating* res, bint relu, unsigned char* keep,
                           Py_ssize_t keep_step) noexcept nogil:
    """_affine_into through the L1 stage, run by run, with streaming stores (and the mask
    bits packed from the stage, see _affine)."""
    cdef floating stage[STAGE]
    cdef Py_ssize_t off, n, r
    for r in range(nrun):
        off = 0
        while off < length:
            n = length - off if length - off < STAGE else STAGE
            _affine_into(x + r * stride + off, stage, n, 1, 0, af, c,
                         res + r * stride + off if res != NULL else NULL, relu)
            if keep != NULL:
                _pack(stage, n, keep + r * keep_step + off // 8)
            _stream(y + r * stride + off, stage, n)
            off = off + n


cdef void _dx_streamed(const floating* g, const floating* x, floating* dx, Py_ssize_t length,
                       Py_ssize_t nrun, Py_ssize_t stride, const Grad* gd, Py_ssize_t c,
                       const floating* ym, floating* dres) noexcept nogil:
    """_dx_into through the L1 stage, run by run, with streaming stores."""
    cdef floating stage[STAGE]
    cdef Py_ssize_t off, n, r, base
    for r in range(nrun):
        off = 0
        while off < length:
            n = length - off if length - off < STAGE else STAGE
            base = r * stride + off
            _dx_into(g + base, x + base, stage, n, 1, 0, gd, c,
                     ym + base if ym != NULL else NULL, dres + base if dres != NULL else NULL)
            _stream(dx + base, stage, n)
            off = off + n


cdef inline void _affine(const floating* x, floating* y, Py_ssize_t length, Py_ssize_t nrun,
                         Py_ssize_t stride, const Affine* af, Py_ssize_t c, bint stream,
                         const floating* res, bint relu, unsigned char* keep,
                         Py_ssize_t keep_step) noexcept nogil:
    """The normalization of nrun runs of channel c (streamed when `stream`), with the
    fused epilogue (residual, ReLU) when asked; with `keep`, the mask bits y > 0 of run r
    are also packed to keep + r * keep_step, from the values just written (in L1)."""
    cdef Py_ssize_t r
    if stream and length >= STREAM_MIN:
        _affine_streamed(x, y, length, nrun, stride, af, c, res, relu, keep, keep_step)
    else:
        _affine_into(x, y, length, nrun, stride, af, c, res, relu)
        if keep != NULL:
            for r in range(nrun):
                _pack(y + r * stride, length, keep + r * keep_step)


cdef void _dx_run_bits(const float* g, const float* x, float* dx, Py_ssize_t length,
                      Py_ssize_t nrun, Py_ssize_t stride, const Grad* gd, Py_ssize_t c,
                      bint stream, const unsigned char* bits, Py_ssize_t bits_step,
                      float* dres) noexcept nogil:
    """_dx_into's float32 training form for channel c with dy masked by the reduction's mask
    bits (run r's at bits + r * bits_step) instead of y, in vector loops of their own
    (_dx_bits_run_f32); streamed through the L1 stage as _dx_run streams. The same bits."""
    cdef float stage[STAGE]
    cdef Py_ssize_t off, n, r, base
    cdef bint streamed = stream and length >= STREAM_MIN
    for r in range(nrun):
        off = 0
        while off < length:
            n = length - off if length - off < STAGE else STAGE
            if not streamed:
                n = length
            base = r * stride + off
            _dx_bits_run_f32(g + base, x + base, &stage[0] if streamed else dx + base,
                             dres + base if dres != NULL else NULL, n, gd.mean32[c],
                             gd.gmean32[c], gd.gmean_lo32[c], gd.a32[c], gd.kx32[c],
                             gd.c32[c], bits + r * bits_step + off // 8)
            if streamed:
                _stream(dx + base, stage, n)
            off = off + n


cdef inline void _dx_run(const floating* g, const floating* x, floating* dx, Py_ssize_t length,
                         Py_ssize_t nrun, Py_ssize_t stride, const Grad* gd, Py_ssize_t c,
                         bint stream, const floating* ym, floating* dres) noexcept nogil:
    """dx of nrun runs of channel c (streamed when `stream`), masked by the forward's y and
    writing the residual's gradient when asked."""
    if stream and length >= STREAM_MIN:
        _dx_streamed(g, x, dx, length, nrun, stride, gd, c, ym, dres)
    else:
        _dx_into(g, x, dx, length, nrun, stride, gd, c, ym, dres)
