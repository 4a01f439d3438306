/* dx of a piece of a float32 row or run with dy masked by the mask bits. */
#ifndef FASTBN_MASK_BITS_DX_H
#define FASTBN_MASK_BITS_DX_H

/* dx of one piece of a float32 row (n values) in float32, training, with dy masked by
   the mask bits (bit j of the piece's bits: value j; the piece starts at a byte); the
   _run form: one planar run of one channel, its coefficients scalars:
   d = ((v - gm) - gl) * a + ((x - m) * kx + k), v = dy where the bit is set, else +0,
   with the two products fused into the additions as the compiler fuses them in the
   loops of _rows_dx32 (so the same bits); e (or NULL) receives v. The dy loads are
   masked loads (AVX-512) or an AND with the bits spread to lanes (AVX2). */
static inline float fastbn_dxb_one(float v, float x, float m, float gm, float gl,
                                   float a, float kx, float k) {
    return ((v - gm) - gl) * a + ((x - m) * kx + k);
}
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FASTBN_HAVE_DX_BITS 1
static void fastbn_dx_bits_f32(const float* g, const float* x, float* d, float* e,
                               Py_ssize_t n, const float* m, const float* gm,
                               const float* gl, const float* a, const float* kx,
                               const float* k, const unsigned char* bits) {
    Py_ssize_t c = 0;
    for (; c + 16 <= n; c += 16) {
        __mmask16 b;
        memcpy(&b, bits + c / 8, 2);
        __m512 v = _mm512_maskz_loadu_ps(b, g + c);
        __m512 t = _mm512_sub_ps(_mm512_sub_ps(v, _mm512_loadu_ps(gm + c)),
                                 _mm512_loadu_ps(gl + c));
        __m512 u = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + c),
                                                 _mm512_loadu_ps(m + c)),
                                   _mm512_loadu_ps(kx + c), _mm512_loadu_ps(k + c));
        if (e) _mm512_storeu_ps(e + c, v);
        _mm512_storeu_ps(d + c, _mm512_fmadd_ps(t, _mm512_loadu_ps(a + c), u));
    }
    for (; c < n; c++) {
        float v = fastbn_bit_f(g[c], bits[c / 8], c % 8);
        if (e) e[c] = v;
        d[c] = fastbn_dxb_one(v, x[c], m[c], gm[c], gl[c], a[c], kx[c], k[c]);
    }
}
static void fastbn_dx_bits_run_f32(const float* g, const float* x, float* d, float* e,
                                   Py_ssize_t n, float m, float gm, float gl, float a,
                                   float kx, float k, const unsigned char* bits) {
    Py_ssize_t c = 0;
    const __m512 vm = _mm512_set1_ps(m), vgm = _mm512_set1_ps(gm), vgl = _mm512_set1_ps(gl);
    const __m512 va = _mm512_set1_ps(a), vkx = _mm512_set1_ps(kx), vk = _mm512_set1_ps(k);
    for (; c + 16 <= n; c += 16) {
        __mmask16 b;
        memcpy(&b, bits + c / 8, 2);
        __m512 v = _mm512_maskz_loadu_ps(b, g + c);
        __m512 t = _mm512_sub_ps(_mm512_sub_ps(v, vgm), vgl);
        __m512 u = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + c), vm), vkx, vk);
        if (e) _mm512_storeu_ps(e + c, v);
        _mm512_storeu_ps(d + c, _mm512_fmadd_ps(t, va, u));
    }
    for (; c < n; c++) {
        float v = fastbn_bit_f(g[c], bits[c / 8], c % 8);
        if (e) e[c] = v;
        d[c] = fastbn_dxb_one(v, x[c], m, gm, gl, a, kx, k);
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define FASTBN_HAVE_DX_BITS 1
static void fastbn_dx_bits_f32(const float* g, const float* x, float* d, float* e,
                               Py_ssize_t n, const float* m, const float* gm,
                               const float* gl, const float* a, const float* kx,
                               const float* k, const unsigned char* bits) {
    Py_ssize_t c = 0;
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (; c + 8 <= n; c += 8) {
        __m256i b = _mm256_and_si256(_mm256_set1_epi32(bits[c / 8]), lane);
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(g + c),
                                 _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, lane)));
        __m256 t = _mm256_sub_ps(_mm256_sub_ps(v, _mm256_loadu_ps(gm + c)),
                                 _mm256_loadu_ps(gl + c));
        __m256 u = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + c),
                                                 _mm256_loadu_ps(m + c)),
                                   _mm256_loadu_ps(kx + c), _mm256_loadu_ps(k + c));
        if (e) _mm256_storeu_ps(e + c, v);
        _mm256_storeu_ps(d + c, _mm256_fmadd_ps(t, _mm256_loadu_ps(a + c), u));
    }
    for (; c < n; c++) {
        float v = fastbn_bit_f(g[c], bits[c / 8], c % 8);
        if (e) e[c] = v;
        d[c] = fastbn_dxb_one(v, x[c], m[c], gm[c], gl[c], a[c], kx[c], k[c]);
    }
}
static void fastbn_dx_bits_run_f32(const float* g, const float* x, float* d, float* e,
                                   Py_ssize_t n, float m, float gm, float gl, float a,
                                   float kx, float k, const unsigned char* bits) {
    Py_ssize_t c = 0;
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 vm = _mm256_set1_ps(m), vgm = _mm256_set1_ps(gm), vgl = _mm256_set1_ps(gl);
    const __m256 va = _mm256_set1_ps(a), vkx = _mm256_set1_ps(kx), vk = _mm256_set1_ps(k);
    for (; c + 8 <= n; c += 8) {
        __m256i b = _mm256_and_si256(_mm256_set1_epi32(bits[c / 8]), lane);
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(g + c),
                                 _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, lane)));
        __m256 t = _mm256_sub_ps(_mm256_sub_ps(v, vgm), vgl);
        __m256 u = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + c), vm), vkx, vk);
        if (e) _mm256_storeu_ps(e + c, v);
        _mm256_storeu_ps(d + c, _mm256_fmadd_ps(t, va, u));
    }
    for (; c < n; c++) {
        float v = fastbn_bit_f(g[c], bits[c / 8], c % 8);
        if (e) e[c] = v;
        d[c] = fastbn_dxb_one(v, x[c], m, gm, gl, a, kx, k);
    }
}
#else
#define FASTBN_HAVE_DX_BITS 0
static void fastbn_dx_bits_f32(const float* g, const float* x, float* d, float* e,
                               Py_ssize_t n, const float* m, const float* gm,
                               const float* gl, const float* a, const float* kx,
                               const float* k, const unsigned char* bits) {
    Py_ssize_t c;
    for (c = 0; c < n; c++) {
        float v = fastbn_bit_f(g[c], bits[c / 8], c % 8);
        if (e) e[c] = v;
        d[c] = fastbn_dxb_one(v, x[c], m[c], gm[c], gl[c], a[c], kx[c], k[c]);
    }
}
static void fastbn_dx_bits_run_f32(const float* g, const float* x, float* d, float* e,
                                   Py_ssize_t n, float m, float gm, float gl, float a,
                                   float kx, float k, const unsigned char* bits) {
    Py_ssize_t c;
    for (c = 0; c < n; c++) {
        float v = fastbn_bit_f(g[c], bits[c / 8], c % 8);
        if (e) e[c] = v;
        d[c] = fastbn_dxb_one(v, x[c], m, gm, gl, a, kx, k);
    }
}
#endif

#endif  /* FASTBN_MASK_BITS_DX_H */
