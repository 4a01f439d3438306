/* float16 and bfloat16 <-> float32 conversions. */
#ifndef FASTBN_HALF_CONVERT_H
#define FASTBN_HALF_CONVERT_H

/* 16-bit data (IEEE float16 and bfloat16) are converted to float32 for the arithmetic
   and rounded back once, to nearest even. float16 <-> float32 uses the F16C (or
   AVX-512) conversion instructions where the build has them, else the portable bit
   code below (F. Giesen's round-to-nearest-even float_to_half, exact the other way);
   bfloat16 is the top half of a float32. NaN stays NaN (quiet), overflow gives inf. */
#include <stdint.h>
#include <string.h>
static inline uint32_t fastbn_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float fastbn_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline float fastbn_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {                              /* zero or subnormal: m * 2**-24, exact */
        float v = (float)m * 5.9604644775390625e-08f;
        return fastbn_bits_f32(fastbn_f32_bits(v) | sign);
    }
    if (e == 31) return fastbn_bits_f32(sign | 0x7f800000u | (m << 13));
    return fastbn_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
static inline uint16_t fastbn_float_to_half(float f) {
    const uint32_t f32infty = 255u << 23, f16max = (127u + 16u) << 23;
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t u = fastbn_f32_bits(f), sign = u & 0x80000000u;
    uint16_t o;
    u ^= sign;
    if (u >= f16max) {
        o = (u > f32infty) ? 0x7e00 : 0x7c00;      /* NaN -> quiet NaN; inf/overflow */
    } else if (u < (113u << 23)) {                  /* subnormal or zero result */
        o = (uint16_t)(fastbn_f32_bits(fastbn_bits_f32(u) + fastbn_bits_f32(denorm_magic))
                       - denorm_magic);
    } else {
        uint32_t odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}
static void fastbn_f16_to_f32(const uint16_t* src, float* dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
#endif
    for (; i < n; i++) dst[i] = fastbn_half_to_float(src[i]);
}
static void fastbn_f32_to_f16(const float* src, uint16_t* dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i*)(dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = fastbn_float_to_half(src[i]);
}
static void fastbn_bf16_to_f32(const uint16_t* src, float* dst, Py_ssize_t n) {
    Py_ssize_t i;
    uint32_t* d = (uint32_t*)dst;
    for (i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;
}
static void fastbn_f32_to_bf16(const float* src, uint16_t* dst, Py_ssize_t n) {
    Py_ssize_t i;
    const uint32_t* s = (const uint32_t*)src;
    for (i = 0; i < n; i++) {
        uint32_t u = s[i];
        uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        dst[i] = (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r);
    }
}

#endif  /* FASTBN_HALF_CONVERT_H */
