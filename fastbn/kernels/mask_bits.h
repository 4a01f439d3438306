/* The fused ReLU's mask bits: packing y > 0 into bits. */
#ifndef FASTBN_MASK_BITS_H
#define FASTBN_MASK_BITS_H

/* fastbn_pack_f32/_f64: the mask bits of y[0:n] into bits, 16 or 8 values per
   comparison where the instructions allow */
#if defined(__AVX512F__) && defined(__AVX512BW__)
static void fastbn_pack_f32(const float* y, Py_ssize_t n, unsigned char* bits) {
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(y + i), _mm512_setzero_ps(),
                                         _CMP_GT_OQ);
        memcpy(bits + i / 8, &k, 2);
    }
    fastbn_pack_tail_f32(y, i, n, bits);
}
static void fastbn_pack_f64(const double* y, Py_ssize_t n, unsigned char* bits) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        bits[i / 8] = (unsigned char)_mm512_cmp_pd_mask(_mm512_loadu_pd(y + i),
                                                        _mm512_setzero_pd(), _CMP_GT_OQ);
    fastbn_pack_tail_f64(y, i, n, bits);
}
#elif defined(__AVX2__)
static void fastbn_pack_f32(const float* y, Py_ssize_t n, unsigned char* bits) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        bits[i / 8] = (unsigned char)_mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(y + i), _mm256_setzero_ps(), _CMP_GT_OQ));
    fastbn_pack_tail_f32(y, i, n, bits);
}
static void fastbn_pack_f64(const double* y, Py_ssize_t n, unsigned char* bits) {
    Py_ssize_t i = 0;
    __m256d z = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
        int lo = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(y + i), z, _CMP_GT_OQ));
        int hi = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(y + i + 4), z,
                                                  _CMP_GT_OQ));
        bits[i / 8] = (unsigned char)(lo | (hi << 4));
    }
    fastbn_pack_tail_f64(y, i, n, bits);
}
#else
static void fastbn_pack_f32(const float* y, Py_ssize_t n, unsigned char* bits) {
    fastbn_pack_tail_f32(y, 0, n, bits);
}
static void fastbn_pack_f64(const double* y, Py_ssize_t n, unsigned char* bits) {
    fastbn_pack_tail_f64(y, 0, n, bits);
}
#endif

#endif  /* FASTBN_MASK_BITS_H */
