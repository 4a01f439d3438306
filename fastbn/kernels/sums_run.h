/* Reductions in AVX-512 registers: the planar backward's fused sums of a block (float32 and
   16-bit data), and the sums of 16-bit data read straight from it: the planar training
   statistics' of a block, the rows backward's and training statistics' of a tile. */
#ifndef FASTBN_SUMS_RUN_H
#define FASTBN_SUMS_RUN_H
#include <stdint.h>
#include <string.h>
#include "fma.h"
#include "stream.h"

/* How dy is read in the sums (the Cython loops' mask_t variants, as values, not types):
   plain; masked by the fused ReLU's output y (y > 0, else +0); masked by the bits the
   forward kept (bit i % 8 of bits[i / 8]); the leaky ReLU's dy * (1 if y > 0 else slope);
   and that with x read as the pre-activation of x = y (y * (1 if y > 0 else inverse)). */
enum { FASTBN_G_PLAIN, FASTBN_G_RELU, FASTBN_G_BITS, FASTBN_G_LEAKY, FASTBN_G_LEAKY_INVERSE };

typedef struct {
    int kind;                   /* FASTBN_G_* */
    const void* y;              /* RELU, LEAKY, LEAKY_INVERSE: laid out as dy, stored as
                                   dy is (float32, or the same 16-bit type) */
    const unsigned char* bits;  /* BITS */
    float slope;                /* LEAKY, LEAKY_INVERSE */
    float inverse;              /* LEAKY_INVERSE */
} fastbn_gread;

/* How the values are stored: float32, or 16-bit (float16, bfloat16) widened in registers
   (exactly: every 16-bit value is a float32 value) */
enum { FASTBN_FMT_F32, FASTBN_FMT_F16, FASTBN_FMT_BF16 };

#if defined(__AVX512F__)
#include <immintrin.h>

static inline float fastbn_sums_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* 16 values at p + i (of format fmt) as float32, lanes outside m as +0 */
static inline __attribute__((always_inline)) __m512 fastbn_load_fmt(const void* p, Py_ssize_t i,
                                                                    __mmask16 m, int fmt) {
    __m256i h;
    if (fmt == FASTBN_FMT_F32)
        return _mm512_maskz_loadu_ps(m, (const float*)p + i);
    h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)p + i);
    if (fmt == FASTBN_FMT_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* the lower and the upper eight float32 lanes of v in double (exactly) */
static inline __m512d fastbn_lo_pd(__m512 v) {
    return _mm512_cvtps_pd(_mm512_castps512_ps256(v));
}
static inline __m512d fastbn_hi_pd(__m512 v) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* the lanes of 16 values of which `left` remain (all 16 when left >= 16) */
static inline __mmask16 fastbn_mask16(Py_ssize_t left) {
    return (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1);
}

/* p[0:16] += (lo, hi), the lanes of k only (the double sums of 16 channels) */
static inline void fastbn_add16_pd(double* p, __mmask16 k, __m512d lo, __m512d hi) {
    _mm512_mask_storeu_pd(p, (__mmask8)k, _mm512_add_pd(_mm512_maskz_loadu_pd((__mmask8)k, p),
                                                       lo));
    _mm512_mask_storeu_pd(p + 8, (__mmask8)(k >> 8),
                          _mm512_add_pd(_mm512_maskz_loadu_pd((__mmask8)(k >> 8), p + 8), hi));
}

/* 16 values of dy and x at i, lanes outside m as 0 (dy) and mean (x), read as r says. */
static inline __attribute__((always_inline)) void fastbn_gx16(
        const void* g, const void* x, Py_ssize_t i, __mmask16 m, const fastbn_gread* r,
        int kind, int fmt, __m512* gv, __m512* xv, __m512 mean) {
    __m512 y;
    __mmask16 pos;
    *gv = fastbn_load_fmt(g, i, m, fmt);
    if (fmt == FASTBN_FMT_F32)
        *xv = _mm512_mask_loadu_ps(mean, m, (const float*)x + i);
    else
        *xv = _mm512_mask_mov_ps(mean, m, fastbn_load_fmt(x, i, m, fmt));
    if (kind == FASTBN_G_PLAIN)
        return;
    if (kind == FASTBN_G_BITS) {
        uint16_t w = 0;
        if (m == (__mmask16)0xFFFF)
            memcpy(&w, r->bits + i / 8, 2);
        else if (m != 0)        /* the run's last bits: no byte past them is read */
            memcpy(&w, r->bits + i / 8, (size_t)(_mm_popcnt_u32(m) + 7) / 8);
        *gv = _mm512_maskz_mov_ps((__mmask16)(w & m), *gv);
        return;
    }
    y = fastbn_load_fmt(r->y, i, m, fmt);
    pos = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GT_OQ);
    if (kind == FASTBN_G_RELU) {
        *gv = _mm512_maskz_mov_ps(pos, *gv);
        return;
    }
    /* g * (1 if y > 0 else slope): g itself where y > 0 (g * 1 is g, bit for bit) */
    *gv = _mm512_mask_mul_ps(*gv, (__mmask16)~pos, *gv, _mm512_set1_ps(r->slope));
    if (kind == FASTBN_G_LEAKY_INVERSE)
        *xv = _mm512_mask_mul_ps(*xv, (__mmask16)(~pos & m), *xv,
                                 _mm512_set1_ps(r->inverse));
}

/* the eight doubles of v summed in a fixed order: halves, then quarters, then the pair */
static inline double fastbn_hsum8(__m512d v) {
    __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
}

/* 32 values of run q at I into the lanes: the dot in t0, t1 (float32), and into U the
   float32 sum of their g, two vectors added (lane j: values I + j and I + 16 + j); lanes
   past the run's end (m0, m1) add +0. */
#define FASTBN_SUMS_STEP(I, M0, M1, U)                                                   \
    do {                                                                                \
        fastbn_gx16(gq, xq, (I), (M0), &rq, kind, fmt, &g0, &x0, m);                     \
        fastbn_gx16(gq, xq, (I) + 16, (M1), &rq, kind, fmt, &g1, &x1, m);                \
        U = _mm512_add_ps(g0, g1);                                                       \
        t0 = _mm512_fmadd_ps(g0, _mm512_sub_ps(x0, m), t0);                              \
        t1 = _mm512_fmadd_ps(g1, _mm512_sub_ps(x1, m), t1);                              \
    } while (0)

/* the 16 float32 lanes of u added into the double lanes a0 (lanes 0-7), a1 (8-15) */
#define FASTBN_SUMS_FLUSH(U)                                                             \
    do {                                                                                \
        a0 = _mm512_add_pd(a0, fastbn_lo_pd(U));                                          \
        a1 = _mm512_add_pd(a1, fastbn_hi_pd(U));                                          \
    } while (0)

/* g and x of format fmt (bytes per value: size), r->y as float32 */
static inline __attribute__((always_inline)) void fastbn_sums_run_body(
        const void* g, const void* x, Py_ssize_t n, Py_ssize_t nrun, Py_ssize_t stride,
        float mean, const fastbn_gread* r, int kind, int fmt, Py_ssize_t ahead_bytes,
        double* sum_g, double* dot) {
    __m512d a0 = _mm512_setzero_pd(), a1 = a0;
    __m512 t0 = _mm512_setzero_ps(), t1 = t0;
    __m512 m = _mm512_set1_ps(mean);
    __m512 g0, g1, x0, x1, u, v;
    __m512d d;
    const Py_ssize_t size = fmt == FASTBN_FMT_F32 ? 4 : 2;
    Py_ssize_t i, q, rest = n % 32;
    int ahead = n * size > ahead_bytes;
    /* the run's last values: 0 in the other lanes (x there reads as mean, so their
       product is +0 whatever the mean) */
    __mmask16 m0 = (__mmask16)(rest >= 16 ? 0xFFFF : (1u << rest) - 1);
    __mmask16 m1 = (__mmask16)(rest <= 16 ? 0 : (1u << (rest - 16)) - 1);
    const char* gq;
    const char* xq;
    fastbn_gread rq = *r;
    for (q = 0; q < nrun; q++) {
        gq = (const char*)g + q * stride * size;
        xq = (const char*)x + q * stride * size;
        if (r->y != NULL)
            rq.y = (const char*)r->y + q * stride * size;
        for (i = 0; i + 64 <= n; i += 64) {
            if (ahead) {
                fastbn_prefetch(gq + i * size + ahead_bytes, 64 * size);
                fastbn_prefetch(xq + i * size + ahead_bytes, 64 * size);
                if (kind == FASTBN_G_RELU || kind == FASTBN_G_LEAKY)   /* y, a third stream */
                    fastbn_prefetch((const char*)rq.y + i * size + ahead_bytes, 64 * size);
            }
            FASTBN_SUMS_STEP(i, (__mmask16)0xFFFF, (__mmask16)0xFFFF, u);
            FASTBN_SUMS_STEP(i + 32, (__mmask16)0xFFFF, (__mmask16)0xFFFF, v);
            FASTBN_SUMS_FLUSH(_mm512_add_ps(u, v));
        }
        if (i + 32 <= n) {
            FASTBN_SUMS_STEP(i, (__mmask16)0xFFFF, (__mmask16)0xFFFF, u);
            FASTBN_SUMS_FLUSH(u);
            i += 32;
        }
        if (rest > 0) {
            FASTBN_SUMS_STEP(i, m0, m1, u);
            FASTBN_SUMS_FLUSH(u);
        }
    }
    *sum_g = fastbn_hsum8(_mm512_add_pd(a0, a1));
    d = _mm512_add_pd(_mm512_add_pd(fastbn_lo_pd(t0), fastbn_lo_pd(t1)),
                      _mm512_add_pd(fastbn_hi_pd(t0), fastbn_hi_pd(t1)));
    *dot = fastbn_hsum8(d);
}
#undef FASTBN_SUMS_STEP
#undef FASTBN_SUMS_FLUSH

/* sum(g) and sum(g * (x - mean)) over nrun runs of n values, stride apart (r->y laid out as
   g; r->bits only for one run), g read as r says: the dot in 32 float32 lanes (value i of
   each run in lane i % 32, each product fused into its lane's sum); the sum of g in 16
   double lanes, each 64 values of a run first added in float32 four to a lane as a tree
   (lane j: (g[i+j] + g[i+16+j]) + (g[i+32+j] + g[i+48+j]), two roundings, within the
   float32 contract, docs/math.rst), a last 32 or fewer two to a lane; each run's last
   n % 32 values masked into the same lanes (no scalar tail), then each set of lanes summed
   in double in a fixed order. The same bits for every kind of r that reads the same
   values. Runs longer than ahead_bytes prefetch g and x that many bytes ahead. */
/* fastbn_sums_run_body with r->kind and the format FMT as constants */
#define FASTBN_SUMS_KINDS(FMT)                                                             \
    switch (r->kind) {                                                                     \
    case FASTBN_G_RELU:                                                                    \
        FASTBN_SUMS_KIND(FASTBN_G_RELU, FMT);                                              \
    case FASTBN_G_BITS:                                                                    \
        FASTBN_SUMS_KIND(FASTBN_G_BITS, FMT);                                              \
    case FASTBN_G_LEAKY:                                                                   \
        FASTBN_SUMS_KIND(FASTBN_G_LEAKY, FMT);                                             \
    case FASTBN_G_LEAKY_INVERSE:                                                           \
        FASTBN_SUMS_KIND(FASTBN_G_LEAKY_INVERSE, FMT);                                     \
    default:                                                                               \
        FASTBN_SUMS_KIND(FASTBN_G_PLAIN, FMT);                                             \
    }
#define FASTBN_SUMS_KIND(KIND, FMT)                                                        \
    fastbn_sums_run_body(g, x, n, nrun, stride, mean, r, KIND, FMT, ahead_bytes, sum_g,    \
                         dot);                                                             \
    break

static void fastbn_sums_run_f32(const float* g, const float* x, Py_ssize_t n,
                                Py_ssize_t nrun, Py_ssize_t stride, float mean,
                                const fastbn_gread* r, Py_ssize_t ahead_bytes, double* sum_g,
                                double* dot) {
    FASTBN_SUMS_KINDS(FASTBN_FMT_F32)
}

/* The same sums of 16-bit g and x (bfloat16 when bf16, else float16; r->y of the same
   type), widened in the registers: the lanes and arithmetic of fastbn_sums_run_f32 on
   the widened values, so the same bits as that function on a float32 copy of them,
   without the copy. (r->bits, FASTBN_G_BITS, is the layer's float32 mask: not used with
   16-bit data.) */
static void fastbn_sums_run_h16(const uint16_t* g, const uint16_t* x, Py_ssize_t n,
                                Py_ssize_t nrun, Py_ssize_t stride, float mean, int bf16,
                                const fastbn_gread* r, Py_ssize_t ahead_bytes, double* sum_g,
                                double* dot) {
    if (bf16) {
        FASTBN_SUMS_KINDS(FASTBN_FMT_BF16)
    } else {
        FASTBN_SUMS_KINDS(FASTBN_FMT_F16)
    }
}
#undef FASTBN_SUMS_KIND
#undef FASTBN_SUMS_KINDS

/* s1 = sum(x - bm) and s2 = sum((x - bm)^2) over nrun runs of n 16-bit values (bfloat16
   when bf16, else float16), stride apart, widened in the registers, in double: the
   arithmetic of the Cython _block_devs on a block of long runs (value i < n - n % 32 of
   each run in lane i % 32 of 32 double lanes, d = x - bm, d added and d * d fused into its
   lane, run after run; then each run's last n % 32 values one at a time into t1, t2; then
   t1 plus the lanes summed as _lane_sum sums 32), so the same bits as _block_devs on a
   float32 copy of the block, without the copy. Runs longer than ahead_bytes / 2 values
   prefetch that many bytes ahead. */
/* d added into the lanes a, d * d fused into q */
static inline __attribute__((always_inline)) void fastbn_dev8(__m512d d, __m512d* a, __m512d* q) {
    *a = _mm512_add_pd(*a, d);
    *q = _mm512_fmadd_pd(d, d, *q);
}

static void fastbn_devs_h16(const uint16_t* p, Py_ssize_t n, Py_ssize_t nrun,
                            Py_ssize_t stride, double bm, int bf16, Py_ssize_t ahead_bytes,
                            double* s1, double* s2) {
    const int fmt = bf16 ? FASTBN_FMT_BF16 : FASTBN_FMT_F16;
    const __m512d vb = _mm512_set1_pd(bm);
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    __m512d q0 = a0, q1 = a0, q2 = a0, q3 = a0, d;
    __m512 v0, v1;
    double t1 = 0.0, t2 = 0.0, e;
    Py_ssize_t i, k, body = n - n % 32;
    int ahead = 2 * n > ahead_bytes;
    const uint16_t* r;
    for (k = 0; k < nrun; k++) {
        r = p + k * stride;
        for (i = 0; i < body; i += 32) {
            if (ahead)
                fastbn_prefetch((const char*)(r + i) + ahead_bytes, 64);
            v0 = fastbn_load_fmt(r, i, (__mmask16)0xFFFF, fmt);
            v1 = fastbn_load_fmt(r, i + 16, (__mmask16)0xFFFF, fmt);
            fastbn_dev8(_mm512_sub_pd(fastbn_lo_pd(v0), vb), &a0, &q0);
            fastbn_dev8(_mm512_sub_pd(fastbn_hi_pd(v0), vb), &a1, &q1);
            fastbn_dev8(_mm512_sub_pd(fastbn_lo_pd(v1), vb), &a2, &q2);
            fastbn_dev8(_mm512_sub_pd(fastbn_hi_pd(v1), vb), &a3, &q3);
        }
    }
    for (k = 0; k < nrun; k++) {
        r = p + k * stride;
        for (i = body; i < n; i++) {
            e = (double)(bf16 ? fastbn_sums_bits_f32((uint32_t)r[i] << 16)
                              : _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(r[i])))) - bm;
            t1 = t1 + e;
            t2 = fastbn_madd(e, e, t2);
        }
    }
    /* _lane_sum of 32 lanes: partial sum j % 8 of lanes j, j + 8, j + 16, j + 24 added in
       that order from +0, then the eight in fastbn_hsum8's order */
    d = _mm512_setzero_pd();
    *s1 = t1 + fastbn_hsum8(_mm512_add_pd(_mm512_add_pd(_mm512_add_pd(_mm512_add_pd(
        d, a0), a1), a2), a3));
    *s2 = t2 + fastbn_hsum8(_mm512_add_pd(_mm512_add_pd(_mm512_add_pd(_mm512_add_pd(
        d, q0), q1), q2), q3));
}

/* The plain float32 sums of the rows kernels (rows.pxi's _rows_sums_v) over one tile of
   16-bit rows (bfloat16 when bf16, else float16), widened in the registers: channels
   [0, width) of rows [r0, r1), rows C apart, into sg[c] (double) and sd[c] (float32) with
   the float32 means mean[c]. Four rows per sweep up to r4 (r0 when not multi_row):
   sg[c] += (g0 + g1) + (g2 + g3) in double, sd[c] += g0 (x0 - m) + g1 (x1 - m) (the first
   product fused into the sum) + the same of rows 2 and 3; then one row at a time, sg[c] += g
   and sd[c] = fma(g, x - m, sd[c]). Sixteen channels per vector, the last ones masked: each
   channel's sums are those expressions, so the same bits as _rows_sums_v on a float32 copy
   of the tile, without the copy. */
static void fastbn_rows_sums_h16(const uint16_t* g, const uint16_t* x, Py_ssize_t C,
                                 Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t width,
                                 const float* mean, double* sg, float* sd, int multi_row,
                                 int bf16) {
    const int fmt = bf16 ? FASTBN_FMT_BF16 : FASTBN_FMT_F16;
    Py_ssize_t r, c, r4 = multi_row ? r0 + (r1 - r0) / 4 * 4 : r0;
    const uint16_t* gr;
    const uint16_t* xr;
    __mmask16 k;
    __m512 m, g0, g1, g2, g3, x0, x1, x2, x3, t;
    __m512d lo, hi;
    for (c = 0; c < width; c++) {
        sg[c] = 0.0;
        sd[c] = 0.0f;
    }
    for (r = r0; r < r4; r += 4) {
        gr = g + r * C;
        xr = x + r * C;
        for (c = 0; c < width; c += 16) {
            k = fastbn_mask16(width - c);
            m = _mm512_maskz_loadu_ps(k, mean + c);
            g0 = fastbn_load_fmt(gr, c, k, fmt);
            g1 = fastbn_load_fmt(gr + C, c, k, fmt);
            g2 = fastbn_load_fmt(gr + 2 * C, c, k, fmt);
            g3 = fastbn_load_fmt(gr + 3 * C, c, k, fmt);
            x0 = fastbn_load_fmt(xr, c, k, fmt);
            x1 = fastbn_load_fmt(xr + C, c, k, fmt);
            x2 = fastbn_load_fmt(xr + 2 * C, c, k, fmt);
            x3 = fastbn_load_fmt(xr + 3 * C, c, k, fmt);
            lo = _mm512_add_pd(_mm512_add_pd(fastbn_lo_pd(g0), fastbn_lo_pd(g1)),
                               _mm512_add_pd(fastbn_lo_pd(g2), fastbn_lo_pd(g3)));
            hi = _mm512_add_pd(_mm512_add_pd(fastbn_hi_pd(g0), fastbn_hi_pd(g1)),
                               _mm512_add_pd(fastbn_hi_pd(g2), fastbn_hi_pd(g3)));
            fastbn_add16_pd(sg + c, k, lo, hi);
            t = _mm512_add_ps(
                _mm512_fmadd_ps(g0, _mm512_sub_ps(x0, m), _mm512_mul_ps(g1, _mm512_sub_ps(x1, m))),
                _mm512_fmadd_ps(g2, _mm512_sub_ps(x2, m), _mm512_mul_ps(g3, _mm512_sub_ps(x3, m))));
            _mm512_mask_storeu_ps(sd + c, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, sd + c), t));
        }
    }
    for (r = r4; r < r1; r++) {
        gr = g + r * C;
        xr = x + r * C;
        for (c = 0; c < width; c += 16) {
            k = fastbn_mask16(width - c);
            m = _mm512_maskz_loadu_ps(k, mean + c);
            g0 = fastbn_load_fmt(gr, c, k, fmt);
            x0 = fastbn_load_fmt(xr, c, k, fmt);
            fastbn_add16_pd(sg + c, k, fastbn_lo_pd(g0), fastbn_hi_pd(g0));
            _mm512_mask_storeu_ps(sd + c, k, _mm512_fmadd_ps(
                g0, _mm512_sub_ps(x0, m), _mm512_maskz_loadu_ps(k, sd + c)));
        }
    }
}

/* The training statistics' sweeps of the rows kernels (rows.pxi's _rows_chunk_stats) over
   one tile of 16-bit rows (bfloat16 when bf16, else float16), widened in the registers:
   channels [0, width) of rows [r0, r1), rows C apart, d = x - pivot[c] in double added to
   s1[c] and d * d to s2[c]; four rows per sweep while they last (when multi_row), s1[c] +=
   (d0 + d1) + (d2 + d3) and s2[c] += fma(d0, d0, d1 d1) + fma(d2, d2, d3 d3); then one row
   at a time, s1[c] += d and s2[c] = fma(d, d, s2[c]). Eight channels per vector, the last
   ones masked: the same bits as those loops on a float32 copy of the tile. */
static void fastbn_rows_devs_h16(const uint16_t* x, Py_ssize_t C, Py_ssize_t r0,
                                 Py_ssize_t r1, Py_ssize_t width, const double* pivot,
                                 double* s1, double* s2, int multi_row, int bf16) {
    const int fmt = bf16 ? FASTBN_FMT_BF16 : FASTBN_FMT_F16;
    Py_ssize_t r = r0, c;
    const uint16_t* row;
    __mmask16 k;
    __mmask8 h;
    __m512 v0, v1, v2, v3;
    __m512d k0, d0, d1, d2, d3;
    int half;
#define FASTBN_HALF(v, i) ((i) ? fastbn_hi_pd(v) : fastbn_lo_pd(v))
    while (multi_row && r + 4 <= r1) {
        row = x + r * C;
        for (c = 0; c < width; c += 16) {
            k = fastbn_mask16(width - c);
            v0 = fastbn_load_fmt(row, c, k, fmt);
            v1 = fastbn_load_fmt(row + C, c, k, fmt);
            v2 = fastbn_load_fmt(row + 2 * C, c, k, fmt);
            v3 = fastbn_load_fmt(row + 3 * C, c, k, fmt);
            for (half = 0; half < 2; half++) {
                h = (__mmask8)(k >> (8 * half));
                if (!h)
                    break;
                k0 = _mm512_maskz_loadu_pd(h, pivot + c + 8 * half);
                d0 = _mm512_sub_pd(FASTBN_HALF(v0, half), k0);
                d1 = _mm512_sub_pd(FASTBN_HALF(v1, half), k0);
                d2 = _mm512_sub_pd(FASTBN_HALF(v2, half), k0);
                d3 = _mm512_sub_pd(FASTBN_HALF(v3, half), k0);
                _mm512_mask_storeu_pd(s1 + c + 8 * half, h, _mm512_add_pd(
                    _mm512_maskz_loadu_pd(h, s1 + c + 8 * half),
                    _mm512_add_pd(_mm512_add_pd(d0, d1), _mm512_add_pd(d2, d3))));
                _mm512_mask_storeu_pd(s2 + c + 8 * half, h, _mm512_add_pd(
                    _mm512_maskz_loadu_pd(h, s2 + c + 8 * half),
                    _mm512_add_pd(_mm512_fmadd_pd(d0, d0, _mm512_mul_pd(d1, d1)),
                                  _mm512_fmadd_pd(d2, d2, _mm512_mul_pd(d3, d3)))));
            }
        }
        r += 4;
    }
    for (; r < r1; r++) {
        row = x + r * C;
        for (c = 0; c < width; c += 16) {
            k = fastbn_mask16(width - c);
            v0 = fastbn_load_fmt(row, c, k, fmt);
            for (half = 0; half < 2; half++) {
                h = (__mmask8)(k >> (8 * half));
                if (!h)
                    break;
                d0 = _mm512_sub_pd(FASTBN_HALF(v0, half),
                                   _mm512_maskz_loadu_pd(h, pivot + c + 8 * half));
                _mm512_mask_storeu_pd(s1 + c + 8 * half, h, _mm512_add_pd(
                    _mm512_maskz_loadu_pd(h, s1 + c + 8 * half), d0));
                _mm512_mask_storeu_pd(s2 + c + 8 * half, h, _mm512_fmadd_pd(
                    d0, d0, _mm512_maskz_loadu_pd(h, s2 + c + 8 * half)));
            }
        }
    }
#undef FASTBN_HALF
}
#define FASTBN_SUMS_RUN 1
#else
/* Builds without AVX-512 sum their blocks in the Cython loops (FASTBN_SUMS_RUN 0): the
   calls there are never reached, and compile to nothing but zeroed results. */
#define fastbn_sums_run_f32(g, x, n, nrun, stride, mean, r, ahead, sum_g, dot) \
    ((void)(r), *(sum_g) = 0.0, *(dot) = 0.0)
#define fastbn_sums_run_h16(g, x, n, nrun, stride, mean, bf16, r, ahead, sum_g, dot) \
    ((void)(r), *(sum_g) = 0.0, *(dot) = 0.0)
#define fastbn_devs_h16(p, n, nrun, stride, bm, bf16, ahead, s1, s2) (*(s1) = 0.0, *(s2) = 0.0)
#define fastbn_rows_sums_h16(g, x, C, r0, r1, width, mean, sg, sd, multi_row, bf16) \
    (*(sg) = 0.0, *(sd) = 0.0f)
#define fastbn_rows_devs_h16(x, C, r0, r1, width, pivot, s1, s2, multi_row, bf16) ((void)0)
#define FASTBN_SUMS_RUN 0
#endif

#endif  /* FASTBN_SUMS_RUN_H */
