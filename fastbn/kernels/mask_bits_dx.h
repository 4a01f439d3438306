/* dx of a piece of a float32 row or run with dy masked by the mask bits. */
#ifndef FASTBN_MASK_BITS_DX_H
#define FASTBN_MASK_BITS_DX_H
#include "relu_mask.h"    /* fastbn_bit_f */
#include "stream.h"       /* fastbn_prefetch */
#include "dx_loop.h"      /* fastbn_dx_one_f32 */

/* dx of one piece of a float32 row (n values) in float32, training, with dy masked by
   the mask bits (bit j of the piece's bits: value j; the piece starts at a byte); the
   _run form: one planar run of one channel, its coefficients scalars:
   d = ((v - gm) - gl) * a + ((x - m) * kx + k), v = dy where the bit is set, else +0,
   with the two products fused into the additions (fastbn_dx_one_f32, as _dx_value: so
   the same bits); e (or NULL) receives v. dy is loaded
   whole and masked by a zeroing move (AVX-512: the load does not wait for the bits) or an
   AND with the bits spread to lanes (AVX2). */
static inline float fastbn_dxb_one(float v, float x, float m, float gm, float gl,
                                   float a, float kx, float k) {
    return fastbn_dx_one_f32(v, x, m, a, kx, k, gm, gl);
}
/* The scalar tail of both forms: values [c, n) */
#define FASTBN_DXB_TAIL(M, GM, GL, A, KX, K)                                          \
    for (; c < n; c++) {                                                            \
        float v = fastbn_bit_f(g[c], bits[c / 8], c % 8);                           \
        if (e) e[c] = v;                                                            \
        d[c] = fastbn_dxb_one(v, x[c], M, GM, GL, A, KX, K);                        \
    }

/* The vector forms, one body for both instruction sets: W lanes of float, LOAD / STORE /
   SET1 / SUB / FMA, and MASKED(c): the W values of g from c with the bits' zeros as +0
   (a zeroing masked move on AVX-512, an AND with the bits spread to lanes on AVX2). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FASTBN_HAVE_DX_BITS 1
typedef __m512 fastbn_vf;
#define FB_W 16
#define FB_LOAD _mm512_loadu_ps
#define FB_STORE _mm512_storeu_ps
#define FB_SET1 _mm512_set1_ps
#define FB_SUB _mm512_sub_ps
#define FB_FMA _mm512_fmadd_ps
#define FB_MASK_SETUP
static inline __m512 fastbn_masked_g(const float* g, const unsigned char* bits,
                                     Py_ssize_t c) {
    __mmask16 b;
    memcpy(&b, bits + c / 8, 2);
    return _mm512_maskz_mov_ps(b, _mm512_loadu_ps(g + c));
}
#define FB_MASKED_AT(G, B, c) fastbn_masked_g(G, B, c)
#elif defined(__AVX2__) && defined(__FMA__)
#define FASTBN_HAVE_DX_BITS 1
typedef __m256 fastbn_vf;
#define FB_W 8
#define FB_LOAD _mm256_loadu_ps
#define FB_STORE _mm256_storeu_ps
#define FB_SET1 _mm256_set1_ps
#define FB_SUB _mm256_sub_ps
#define FB_FMA _mm256_fmadd_ps
#define FB_MASK_SETUP const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
#define FB_MASKED_AT(G, B, c)                                                       \
    _mm256_and_ps(_mm256_loadu_ps((G) + (c)), _mm256_castsi256_ps(_mm256_cmpeq_epi32(  \
        _mm256_and_si256(_mm256_set1_epi32((B)[(c) / 8]), lane), lane)))
#else
#define FASTBN_HAVE_DX_BITS 0
#endif

/* out[0:n] = g masked by the bits (g where the bit is set, else +0: the values
   fastbn_mask_f gives for the y the bits were packed from); the backward that reads the
   layer's kept bits sums this copy, from L1, in the loops of the y-masked sums. ahead:
   0, or the distance in bytes at which g is prefetched (as the sums' own loops do) */
#define FASTBN_MASKED_TAIL                                                          \
    for (; c < n; c++)                                                              \
        out[c] = fastbn_bit_f(g[c], bits[c / 8], c % 8);

#if FASTBN_HAVE_DX_BITS
#define FB_MASKED(c) FB_MASKED_AT(g, bits, c)
static void fastbn_masked_copy_f32(const float* g, const unsigned char* bits, Py_ssize_t n,
                                   float* out, Py_ssize_t ahead) {
    Py_ssize_t c = 0;
    FB_MASK_SETUP
    if (ahead)
        for (; c + FB_W <= n; c += FB_W) {
            fastbn_prefetch((const char*)(g + c) + ahead, 1);
            FB_STORE(out + c, FB_MASKED(c));
        }
    for (; c + FB_W <= n; c += FB_W)
        FB_STORE(out + c, FB_MASKED(c));
    FASTBN_MASKED_TAIL
}
static void fastbn_dx_bits_f32(const float* g, const float* x, float* d, float* e,
                               Py_ssize_t n, const float* m, const float* gm,
                               const float* gl, const float* a, const float* kx,
                               const float* k, const unsigned char* bits) {
    Py_ssize_t c = 0;
    FB_MASK_SETUP
    for (; c + FB_W <= n; c += FB_W) {
        fastbn_vf v = FB_MASKED(c);
        fastbn_vf t = FB_SUB(FB_SUB(v, FB_LOAD(gm + c)), FB_LOAD(gl + c));
        fastbn_vf u = FB_FMA(FB_SUB(FB_LOAD(x + c), FB_LOAD(m + c)), FB_LOAD(kx + c),
                             FB_LOAD(k + c));
        if (e) FB_STORE(e + c, v);
        FB_STORE(d + c, FB_FMA(t, FB_LOAD(a + c), u));
    }
    FASTBN_DXB_TAIL(m[c], gm[c], gl[c], a[c], kx[c], k[c])
}
static void fastbn_dx_bits_run_f32(const float* g, const float* x, float* d, float* e,
                                   Py_ssize_t n, float m, float gm, float gl, float a,
                                   float kx, float k, const unsigned char* bits) {
    Py_ssize_t c = 0;
    FB_MASK_SETUP
    const fastbn_vf vm = FB_SET1(m), vgm = FB_SET1(gm), vgl = FB_SET1(gl);
    const fastbn_vf va = FB_SET1(a), vkx = FB_SET1(kx), vk = FB_SET1(k);
    for (; c + FB_W <= n; c += FB_W) {
        fastbn_vf v = FB_MASKED(c);
        fastbn_vf t = FB_SUB(FB_SUB(v, vgm), vgl);
        fastbn_vf u = FB_FMA(FB_SUB(FB_LOAD(x + c), vm), vkx, vk);
        if (e) FB_STORE(e + c, v);
        FB_STORE(d + c, FB_FMA(t, va, u));
    }
    FASTBN_DXB_TAIL(m, gm, gl, a, kx, k)
}
#else
static void fastbn_masked_copy_f32(const float* g, const unsigned char* bits, Py_ssize_t n,
                                   float* out, Py_ssize_t ahead) {
    Py_ssize_t c = 0;
    (void)ahead;
    FASTBN_MASKED_TAIL
}
static void fastbn_dx_bits_f32(const float* g, const float* x, float* d, float* e,
                               Py_ssize_t n, const float* m, const float* gm,
                               const float* gl, const float* a, const float* kx,
                               const float* k, const unsigned char* bits) {
    Py_ssize_t c = 0;
    FASTBN_DXB_TAIL(m[c], gm[c], gl[c], a[c], kx[c], k[c])
}
static void fastbn_dx_bits_run_f32(const float* g, const float* x, float* d, float* e,
                                   Py_ssize_t n, float m, float gm, float gl, float a,
                                   float kx, float k, const unsigned char* bits) {
    Py_ssize_t c = 0;
    FASTBN_DXB_TAIL(m, gm, gl, a, kx, k)
}
#endif

/* fastbn_dx_bits_f32 on nrows rows of n values (rows n apart in g, x, d and e; their bits
   rowbytes apart): one call for a stage of whole rows. Rows of at most FASTBN_ROWS_AHEAD
   bytes prefetch g and x that far ahead, as the rows reductions do (PREFETCH_BYTES in
   common.pxi); measured, (32, 28, 28, 512) and (32, 56, 56, 256) channels-last, 2 threads:
   the kept-bits backward 1.05-1.12x the plain one without, 0.98-0.99x with */
#define FASTBN_ROWS_AHEAD 2048
static void fastbn_dx_bits_rows_f32(const float* g, const float* x, float* d, float* e,
                                    Py_ssize_t n, Py_ssize_t nrows, const float* m,
                                    const float* gm, const float* gl, const float* a,
                                    const float* kx, const float* k,
                                    const unsigned char* bits, Py_ssize_t rowbytes) {
    Py_ssize_t r;
    Py_ssize_t bytes = n * (Py_ssize_t)sizeof(float);
    Py_ssize_t ahead = bytes <= FASTBN_ROWS_AHEAD ? bytes : 0;
    for (r = 0; r < nrows; r++) {
        fastbn_prefetch((const char*)(g + r * n) + FASTBN_ROWS_AHEAD, ahead);
        fastbn_prefetch((const char*)(x + r * n) + FASTBN_ROWS_AHEAD, ahead);
        if (ahead)          /* the bits of the rows the prefetched data belongs to */
            fastbn_prefetch(bits + (r + FASTBN_ROWS_AHEAD / bytes) * rowbytes, rowbytes);
        fastbn_dx_bits_f32(g + r * n, x + r * n, d + r * n, e ? e + r * n : NULL, n, m, gm,
                           gl, a, kx, k, bits + r * rowbytes);
    }
}

#endif  /* FASTBN_MASK_BITS_DX_H */
