/* The backward's fused sums over one run of float32 values in AVX-512 registers. */
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
    const float* y;             /* RELU, LEAKY, LEAKY_INVERSE: laid out as dy */
    const unsigned char* bits;  /* BITS */
    float slope;                /* LEAKY, LEAKY_INVERSE */
    float inverse;              /* LEAKY_INVERSE */
} fastbn_gread;

#if defined(__AVX512F__)
#include <immintrin.h>

/* 16 values of dy and x at i, lanes outside m as 0 (dy) and mean (x), read as r says. */
static inline __attribute__((always_inline)) void fastbn_gx16(
        const float* g, const float* x, Py_ssize_t i, __mmask16 m, const fastbn_gread* r,
        int kind, __m512* gv, __m512* xv, __m512 mean) {
    __m512 y;
    __mmask16 pos;
    *gv = _mm512_maskz_loadu_ps(m, g + i);
    *xv = _mm512_mask_loadu_ps(mean, m, x + i);
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
    y = _mm512_maskz_loadu_ps(m, r->y + i);
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

/* 32 values of run q at i into the lanes: the sum of g in a0..a3 (double), the dot in
   t0, t1 (float32); lanes past the run's end (m0, m1) add +0. */
#define FASTBN_SUMS_STEP(M0, M1)                                                         \
    do {                                                                                \
        fastbn_gx16(gq, xq, i, (M0), &rq, kind, &g0, &x0, m);                            \
        fastbn_gx16(gq, xq, i + 16, (M1), &rq, kind, &g1, &x1, m);                       \
        a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(g0)));             \
        a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(                         \
            _mm512_extractf64x4_pd(_mm512_castps_pd(g0), 1))));                          \
        a2 = _mm512_add_pd(a2, _mm512_cvtps_pd(_mm512_castps512_ps256(g1)));             \
        a3 = _mm512_add_pd(a3, _mm512_cvtps_pd(_mm256_castpd_ps(                         \
            _mm512_extractf64x4_pd(_mm512_castps_pd(g1), 1))));                          \
        t0 = _mm512_fmadd_ps(g0, _mm512_sub_ps(x0, m), t0);                              \
        t1 = _mm512_fmadd_ps(g1, _mm512_sub_ps(x1, m), t1);                              \
    } while (0)

static inline __attribute__((always_inline)) void fastbn_sums_run_body(
        const float* g, const float* x, Py_ssize_t n, Py_ssize_t nrun, Py_ssize_t stride,
        float mean, const fastbn_gread* r, int kind, Py_ssize_t ahead_bytes, double* sum_g,
        double* dot) {
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    __m512 t0 = _mm512_setzero_ps(), t1 = t0;
    __m512 m = _mm512_set1_ps(mean);
    __m512 g0, g1, x0, x1;
    __m512d d;
    Py_ssize_t i, q, rest = n % 32;
    int ahead = n * (Py_ssize_t)sizeof(float) > ahead_bytes;
    /* the run's last values: 0 in the other lanes (x there reads as mean, so their
       product is +0 whatever the mean) */
    __mmask16 m0 = (__mmask16)(rest >= 16 ? 0xFFFF : (1u << rest) - 1);
    __mmask16 m1 = (__mmask16)(rest <= 16 ? 0 : (1u << (rest - 16)) - 1);
    const float* gq;
    const float* xq;
    fastbn_gread rq = *r;
    for (q = 0; q < nrun; q++) {
        gq = g + q * stride;
        xq = x + q * stride;
        if (r->y != NULL)
            rq.y = r->y + q * stride;
        for (i = 0; i + 32 <= n; i += 32) {
            if (ahead) {
                fastbn_prefetch((const char*)(gq + i) + ahead_bytes, 128);
                fastbn_prefetch((const char*)(xq + i) + ahead_bytes, 128);
            }
            FASTBN_SUMS_STEP((__mmask16)0xFFFF, (__mmask16)0xFFFF);
        }
        if (rest > 0)
            FASTBN_SUMS_STEP(m0, m1);
    }
    *sum_g = fastbn_hsum8(_mm512_add_pd(_mm512_add_pd(a0, a2), _mm512_add_pd(a1, a3)));
    d = _mm512_add_pd(
        _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(t0)),
                      _mm512_cvtps_pd(_mm512_castps512_ps256(t1))),
        _mm512_add_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                          _mm512_castps_pd(t0), 1))),
                      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                          _mm512_castps_pd(t1), 1)))));
    *dot = fastbn_hsum8(d);
}
#undef FASTBN_SUMS_STEP

/* sum(g) and sum(g * (x - mean)) over nrun runs of n values, stride apart (r->y laid out as
   g; r->bits only for one run), g read as r says: the sum of g in 32 double lanes, the dot
   in 32 float32 lanes (value i of each run in lane i % 32, each product fused into its
   lane's sum), each run's last n % 32 values masked into the same lanes (no scalar tail),
   then each set of lanes summed in double in a fixed order. The same bits for every kind
   of r that reads the same values. Runs longer than ahead_bytes prefetch g and x that
   many bytes ahead. */
static void fastbn_sums_run_f32(const float* g, const float* x, Py_ssize_t n,
                                Py_ssize_t nrun, Py_ssize_t stride, float mean,
                                const fastbn_gread* r, Py_ssize_t ahead_bytes, double* sum_g,
                                double* dot) {
    switch (r->kind) {
    case FASTBN_G_RELU:
        fastbn_sums_run_body(g, x, n, nrun, stride, mean, r, FASTBN_G_RELU, ahead_bytes, sum_g, dot);
        break;
    case FASTBN_G_BITS:
        fastbn_sums_run_body(g, x, n, nrun, stride, mean, r, FASTBN_G_BITS, ahead_bytes, sum_g, dot);
        break;
    case FASTBN_G_LEAKY:
        fastbn_sums_run_body(g, x, n, nrun, stride, mean, r, FASTBN_G_LEAKY, ahead_bytes, sum_g, dot);
        break;
    case FASTBN_G_LEAKY_INVERSE:
        fastbn_sums_run_body(g, x, n, nrun, stride, mean, r, FASTBN_G_LEAKY_INVERSE,
                             ahead_bytes, sum_g, dot);
        break;
    default:
        fastbn_sums_run_body(g, x, n, nrun, stride, mean, r, FASTBN_G_PLAIN, ahead_bytes, sum_g, dot);
    }
}
#define FASTBN_SUMS_RUN 1
#else
/* The same arithmetic, one value at a time (the builds without AVX-512 sum their blocks in
   the Cython loops; this keeps the function defined, with the bits above). */
static void fastbn_sums_run_f32(const float* g, const float* x, Py_ssize_t n,
                                Py_ssize_t nrun, Py_ssize_t stride, float mean,
                                const fastbn_gread* r, Py_ssize_t ahead_bytes, double* sum_g,
                                double* dot) {
    double a[32] = {0}, v[8], h[4];
    float t[32] = {0};
    float gv, xv, y;
    Py_ssize_t i, q, o;
    int k;
    (void)ahead_bytes;
    for (q = 0; q < nrun; q++) {
        for (i = 0; i < n; i++) {
            o = q * stride + i;
            gv = g[o];
            xv = x[o];
            if (r->kind == FASTBN_G_BITS) {
                if (!((r->bits[i / 8] >> (i % 8)) & 1)) gv = 0.0f;
            } else if (r->kind != FASTBN_G_PLAIN) {
                y = r->y[o];
                if (r->kind == FASTBN_G_RELU) {
                    if (!(y > 0)) gv = 0.0f;
                } else {
                    gv = gv * (y > 0 ? 1.0f : r->slope);
                    if (r->kind == FASTBN_G_LEAKY_INVERSE)
                        xv = xv * (xv > 0 ? 1.0f : r->inverse);
                }
            }
            a[i % 32] += gv;
            t[i % 32] = fastbn_maddf(gv, xv - mean, t[i % 32]);
        }
    }
    for (k = 0; k < 8; k++)
        v[k] = (a[k] + a[k + 16]) + (a[k + 8] + a[k + 24]);
    for (k = 0; k < 4; k++)
        h[k] = v[k] + v[k + 4];
    *sum_g = (h[0] + h[2]) + (h[1] + h[3]);
    for (k = 0; k < 8; k++)
        v[k] = ((double)t[k] + (double)t[k + 16]) + ((double)t[k + 8] + (double)t[k + 24]);
    for (k = 0; k < 4; k++)
        h[k] = v[k] + v[k + 4];
    *dot = (h[0] + h[2]) + (h[1] + h[3]);
}
#define FASTBN_SUMS_RUN 0
#endif

#endif  /* FASTBN_SUMS_RUN_H */
