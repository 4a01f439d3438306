/* float16 and bfloat16 <-> float32 conversions. */
#ifndef FASTBN_HALF_CONVERT_H
#define FASTBN_HALF_CONVERT_H

/* 16-bit data (IEEE float16 and bfloat16) are converted to float32 for the arithmetic
   and rounded back once, to nearest even. float16 <-> float32 uses the F16C (or
   AVX-512) conversion instructions where the build has them, 64-bit ARM's own (every
   ARMv8 CPU has them), else the portable bit code below (F. Giesen's round-to-nearest-even
   float_to_half, exact the other way);
   bfloat16 is the top half of a float32. NaN stays NaN (quiet), overflow gives inf. */
#include <stdint.h>
#include <string.h>
#include "fma.h"
#include "dx_loop.h"
#include "relu_mask.h"
#if defined(__aarch64__) || defined(_M_ARM64)
/* 64-bit ARM: float16 <-> float32 conversions are base instructions (fcvtl, fcvtn) */
#include <arm_neon.h>
#define FASTBN_NEON16 1
#endif
/* float32 bits seen as uint32_t in the bfloat16 loops, which the compiler may not assume to
   be distinct objects (C's aliasing rule; MSVC assumes nothing) */
#if defined(__GNUC__) || defined(__clang__)
typedef uint32_t __attribute__((__may_alias__)) fastbn_u32_alias;
#else
typedef uint32_t fastbn_u32_alias;
#endif
/* Bytes ahead of the loads that the 16-bit loops ask the cache for: with the prefetch, NCHW
   inference of (32, 64, 112, 112) float16 took 0.58x float32's time instead of 0.67x, bfloat16
   0.61x instead of 0.81x (Intel Xeon, 2 threads; 1024 and 4096 bytes measured the same). Half
   a vector of 16-bit values is loaded per step, which leaves the hardware prefetcher behind;
   the widening loops that stage 16-bit data for the reductions prefetch the same way. */
#define FASTBN_PREFETCH16 2048

static inline uint32_t fastbn_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float fastbn_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
#ifdef FASTBN_NEON16
/* one value, with the same instructions' scalar forms, so that a run's tail rounds (and keeps
   a NaN's payload) exactly as its vector body */
static inline float fastbn_half_to_float(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}
static inline uint16_t fastbn_float_to_half(float f) {
    return vget_lane_u16(vreinterpret_u16_f16(vcvt_f16_f32(vdupq_n_f32(f))), 0);
}
#else
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
#endif
static void fastbn_f16_to_f32(const uint16_t* src, float* dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char*)(src + i) + FASTBN_PREFETCH16, _MM_HINT_T0);
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + i))));
    }
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
        _mm_prefetch((const char*)(src + i) + FASTBN_PREFETCH16, _MM_HINT_T0);
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
    }
#elif defined(FASTBN_NEON16)
    for (; i + 8 <= n; i += 8) {
        const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(src + i));
        vst1q_f32(dst + i, vcvt_f32_f16(vget_low_f16(h)));
        vst1q_f32(dst + i + 4, vcvt_high_f32_f16(h));
    }
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
#elif defined(FASTBN_NEON16)
    for (; i + 8 <= n; i += 8)
        vst1q_u16(dst + i, vreinterpretq_u16_f16(vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(src + i)),
                                                                   vld1q_f32(src + i + 4))));
#endif
    for (; i < n; i++) dst[i] = fastbn_float_to_half(src[i]);
}
static void fastbn_bf16_to_f32(const uint16_t* src, float* dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
    fastbn_u32_alias* d = (fastbn_u32_alias*)dst;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char*)(src + i) + FASTBN_PREFETCH16, _MM_HINT_T0);
        _mm512_storeu_si512((void*)(d + i), _mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + i))), 16));
    }
#elif defined(__AVX2__)
    for (; i + 8 <= n; i += 8) {
        _mm_prefetch((const char*)(src + i) + FASTBN_PREFETCH16, _MM_HINT_T0);
        _mm256_storeu_si256((__m256i*)(d + i), _mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + i))), 16));
    }
#endif
    for (; i < n; i++) d[i] = (uint32_t)src[i] << 16;
}
static void fastbn_f32_to_bf16(const float* src, uint16_t* dst, Py_ssize_t n) {
    Py_ssize_t i;
    const fastbn_u32_alias* s = (const fastbn_u32_alias*)src;
    for (i = 0; i < n; i++) {
        uint32_t u = s[i];
        uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        dst[i] = (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r);
    }
}

/* The normalization of 16-bit data in one loop: y = round16((widen(x) - m) * a + c), the
   float32 expression of the float32 kernels' normalization (_affine_into), evaluated as it
   is there (one fused multiply-add where the build has FMA: fastbn_maddf, fma.h), so the
   bits are those of widening into a stage, normalizing it and rounding it, in
   one pass over registers instead of three over the stage. bf16: nonzero for bfloat16,
   else float16. */
static inline uint16_t fastbn_round_bf16(float f) {
    uint32_t u = fastbn_f32_bits(f);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r);
}
/* W 16-bit values widened into a float32 vector (fastbn_load16), a float32 vector rounded
   into W 16-bit values (fastbn_store16), and FASTBN_V16(op), the float32 vector operation
   of that width: W = 16 with AVX-512, 8 with AVX2 + F16C, none in the portable build. */
#if defined(__AVX512F__)
#define FASTBN_W16 16
typedef __m512 fastbn_v16;
static inline __m512 fastbn_load16(const uint16_t* p, int bf16) {
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
static inline void fastbn_store16(uint16_t* p, __m512 r, int bf16) {
    if (bf16) {
        const __m512i u = _mm512_castps_si512(r);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
        const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(
            _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
        _mm256_storeu_si256((__m256i*)p,
                            _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet)));
    } else {
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
    }
}
#define FASTBN_V16(op) _mm512_##op##_ps
#elif defined(__AVX2__) && defined(__F16C__)
#define FASTBN_W16 8
typedef __m256 fastbn_v16;
static inline __m256 fastbn_load16(const uint16_t* p, int bf16) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}
static inline void fastbn_store16(uint16_t* p, __m256 r, int bf16) {
    if (bf16) {
        const __m256i u = _mm256_castps_si256(r);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i rounded = _mm256_srli_epi32(
            _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
        const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
        /* (u & 0x7fffffff) > 0x7f800000 compared as signed: both sides are non-negative */
        const __m256i nan = _mm256_cmpgt_epi32(
            _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
        const __m256i v = _mm256_blendv_epi8(rounded, quiet, nan);
        _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(v),
                                                       _mm256_extracti128_si256(v, 1)));
    } else {
        _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
    }
}
#define FASTBN_V16(op) _mm256_##op##_ps
#endif

#ifdef FASTBN_W16
/* a * b + c as the float32 kernels compute it (fastbn_maddf, fma.h): one fused
   multiply-add where the build has FMA */
static inline fastbn_v16 fastbn_madd_v16(fastbn_v16 a, fastbn_v16 b, fastbn_v16 c) {
#if FASTBN_HAS_FMA
    return FASTBN_V16(fmadd)(a, b, c);
#else
    return FASTBN_V16(add)(FASTBN_V16(mul)(a, b), c);
#endif
}
/* the normalization, (v - m) * a + c */
static inline fastbn_v16 fastbn_affine16_v(fastbn_v16 v, fastbn_v16 m, fastbn_v16 a,
                                           fastbn_v16 c) {
    return fastbn_madd_v16(FASTBN_V16(sub)(v, m), a, c);
}
/* t where c > 0, else f (a NaN c gives f): the fused activation's select */
#if defined(__AVX512F__)
static inline fastbn_v16 fastbn_gt0_v16(fastbn_v16 c, fastbn_v16 t, fastbn_v16 f) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_GT_OQ), f, t);
}
#else
static inline fastbn_v16 fastbn_gt0_v16(fastbn_v16 c, fastbn_v16 t, fastbn_v16 f) {
    return _mm256_blendv_ps(f, t, _mm256_cmp_ps(c, _mm256_setzero_ps(), _CMP_GT_OQ));
}
#endif
/* dy behind the fused activation, as the staged loops take it (_mask_into): where y > 0
   dy, else +0 (the ReLU, slope 0) or dy * slope (the leaky ReLU) */
static inline fastbn_v16 fastbn_mask16_v(fastbn_v16 g, fastbn_v16 y, float slope,
                                         fastbn_v16 vslope, fastbn_v16 one) {
    if (slope == 0)
        return fastbn_gt0_v16(y, g, FASTBN_V16(setzero)());
    return FASTBN_V16(mul)(g, fastbn_gt0_v16(y, one, vslope));
}
/* dx in training, as _dx_value's float32 form: ((g - gm) - gl) * a + ((x - mean) * kx + k0) */
static inline fastbn_v16 fastbn_dx16_v(fastbn_v16 g, fastbn_v16 x, fastbn_v16 mean,
                                       fastbn_v16 a, fastbn_v16 kx, fastbn_v16 k0,
                                       fastbn_v16 gm, fastbn_v16 gl) {
    return fastbn_madd_v16(FASTBN_V16(sub)(FASTBN_V16(sub)(g, gm), gl), a,
                           fastbn_madd_v16(FASTBN_V16(sub)(x, mean), kx, k0));
}
#endif

/* Whether the one-loop forms below have vector code in this build (the kernels use them only
   then: the portable build's staged loops are vectorized by the compiler, a scalar loop over
   these would not be, and its NaNs could carry another sign than the staged loops give) */
#ifdef FASTBN_W16
#define FASTBN_DIRECT16 1
#else
#define FASTBN_DIRECT16 0
#endif

/* One value of the normalization, as the vector forms compute it */
static inline uint16_t fastbn_affine16_one(uint16_t x, float m, float a, float c, int bf16) {
    float v = bf16 ? fastbn_bits_f32((uint32_t)x << 16) : fastbn_half_to_float(x);
    float r = fastbn_maddf(v - m, a, c);
    uint16_t h;
    if (bf16)
        return fastbn_round_bf16(r);
    fastbn_f32_to_f16(&r, &h, 1);
    return h;
}

/* n values of one channel (planar data) */
static void fastbn_affine16(const uint16_t* x, uint16_t* y, Py_ssize_t n, float m, float a,
                            float c, int bf16) {
    Py_ssize_t i = 0;
#ifdef FASTBN_W16
    const fastbn_v16 vm = FASTBN_V16(set1)(m), va = FASTBN_V16(set1)(a),
                     vc = FASTBN_V16(set1)(c);
    for (; i + FASTBN_W16 <= n; i += FASTBN_W16) {
        _mm_prefetch((const char*)(x + i) + FASTBN_PREFETCH16, _MM_HINT_T0);
        fastbn_store16(y + i, fastbn_affine16_v(fastbn_load16(x + i, bf16), vm, va, vc), bf16);
    }
#endif
    for (; i < n; i++)
        y[i] = fastbn_affine16_one(x[i], m, a, c, bf16);
}

/* nrow rows of `width` channels, contiguous, with the channels' coefficients (rows data) */
static void fastbn_affine16_rows(const uint16_t* x, uint16_t* y, Py_ssize_t nrow,
                                 Py_ssize_t width, const float* m, const float* a,
                                 const float* c, int bf16) {
    Py_ssize_t r, j;
    for (r = 0; r < nrow; r++) {
        const uint16_t* xr = x + r * width;
        uint16_t* yr = y + r * width;
        j = 0;
#ifdef FASTBN_W16
        for (; j + FASTBN_W16 <= width; j += FASTBN_W16) {
            _mm_prefetch((const char*)(xr + j) + FASTBN_PREFETCH16, _MM_HINT_T0);
            fastbn_store16(yr + j, fastbn_affine16_v(fastbn_load16(xr + j, bf16),
                                                     FASTBN_V16(loadu)(m + j),
                                                     FASTBN_V16(loadu)(a + j),
                                                     FASTBN_V16(loadu)(c + j)), bf16);
        }
#endif
        for (; j < width; j++)
            yr[j] = fastbn_affine16_one(xr[j], m[j], a[j], c[j], bf16);
    }
}

/* dx of 16-bit data in one loop, as the float32 kernels compute it (_dx_value's float32
   form in training, g * a with fixed statistics; x is then not read) and rounded once:
   fastbn_dx16 on n values of one channel, fastbn_dx16_rows on nrow contiguous rows of
   `width` channels with the channels' coefficients. */
static inline float fastbn_widen16(uint16_t h, int bf16) {
    return bf16 ? fastbn_bits_f32((uint32_t)h << 16) : fastbn_half_to_float(h);
}

static inline uint16_t fastbn_narrow16(float r, int bf16) {
    uint16_t h;
    if (bf16)
        return fastbn_round_bf16(r);
    fastbn_f32_to_f16(&r, &h, 1);
    return h;
}

/* The fused activation's part of one value (see fastbn_dx16): g masked by y (y NULL: as
   it is), stored to e[0] (when e), and x read as the pre-activation (inverse > 0) */
typedef struct {
    const uint16_t* y;  /* the forward's output, or NULL (no activation) */
    uint16_t* e;        /* receives the masked dy (the residual's gradient), or NULL */
    float slope;        /* 0: the ReLU, else the leaky ReLU's slope */
    float inverse;      /* > 0: x is y, read as x * (x > 0 ? 1 : inverse); else 0 */
} fastbn_act16;

static inline uint16_t fastbn_dx16_one(uint16_t g, uint16_t x, int training, float mean,
                                       float a, float kx, float k0, float gm, float gl,
                                       int bf16, const fastbn_act16* act, Py_ssize_t i) {
    float gv = fastbn_widen16(g, bf16), r;
    if (act->y) {
        float yv = fastbn_widen16(act->y[i], bf16);
        gv = act->slope == 0 ? fastbn_mask_f(gv, yv) : gv * (yv > 0 ? 1.0f : act->slope);
        if (act->e)
            act->e[i] = fastbn_narrow16(gv, bf16);
    }
    if (training) {
        float xv = fastbn_widen16(x, bf16);
        if (act->inverse > 0)
            xv = xv * (xv > 0 ? 1.0f : act->inverse);
        r = fastbn_dx_one_f32(gv, xv, mean, a, kx, k0, gm, gl);
    } else {
        r = gv * a;
    }
    return fastbn_narrow16(r, bf16);
}

#ifdef FASTBN_W16
/* FASTBN_W16 values of dy at i behind the fused activation (see fastbn_act16), the masked
   dy stored to act->e; and x at i read through the activation's inverse (when asked) */
static inline fastbn_v16 fastbn_act16_g(fastbn_v16 g, const fastbn_act16* act, Py_ssize_t i,
                                        fastbn_v16 vslope, fastbn_v16 one, int bf16) {
    if (!act->y)
        return g;
    _mm_prefetch((const char*)(act->y + i) + FASTBN_PREFETCH16, _MM_HINT_T0);
    g = fastbn_mask16_v(g, fastbn_load16(act->y + i, bf16), act->slope, vslope, one);
    if (act->e)
        fastbn_store16(act->e + i, g, bf16);
    return g;
}

static inline fastbn_v16 fastbn_act16_x(fastbn_v16 x, const fastbn_act16* act,
                                        fastbn_v16 vinverse, fastbn_v16 one) {
    if (act->inverse > 0)
        return FASTBN_V16(mul)(x, fastbn_gt0_v16(x, one, vinverse));
    return x;
}
#endif

static void fastbn_dx16(const uint16_t* g, const uint16_t* x, uint16_t* d, Py_ssize_t n,
                        int training, float mean, float a, float kx, float k0, float gm,
                        float gl, int bf16, fastbn_act16 act) {
    Py_ssize_t i = 0;
#ifdef FASTBN_W16
    const fastbn_v16 vmean = FASTBN_V16(set1)(mean), va = FASTBN_V16(set1)(a),
                     vkx = FASTBN_V16(set1)(kx), vk0 = FASTBN_V16(set1)(k0),
                     vgm = FASTBN_V16(set1)(gm), vgl = FASTBN_V16(set1)(gl),
                     one = FASTBN_V16(set1)(1.0f), vslope = FASTBN_V16(set1)(act.slope),
                     vinverse = FASTBN_V16(set1)(act.inverse);
    fastbn_v16 gv;
    if (training) {
        for (; i + FASTBN_W16 <= n; i += FASTBN_W16) {
            _mm_prefetch((const char*)(g + i) + FASTBN_PREFETCH16, _MM_HINT_T0);
            _mm_prefetch((const char*)(x + i) + FASTBN_PREFETCH16, _MM_HINT_T0);
            gv = fastbn_act16_g(fastbn_load16(g + i, bf16), &act, i, vslope, one, bf16);
            fastbn_store16(d + i, fastbn_dx16_v(gv, fastbn_act16_x(fastbn_load16(x + i, bf16),
                                                                   &act, vinverse, one),
                                                vmean, va, vkx, vk0, vgm, vgl), bf16);
        }
    } else {
        for (; i + FASTBN_W16 <= n; i += FASTBN_W16) {
            _mm_prefetch((const char*)(g + i) + FASTBN_PREFETCH16, _MM_HINT_T0);
            gv = fastbn_act16_g(fastbn_load16(g + i, bf16), &act, i, vslope, one, bf16);
            fastbn_store16(d + i, FASTBN_V16(mul)(gv, va), bf16);
        }
    }
#endif
    for (; i < n; i++)
        d[i] = fastbn_dx16_one(g[i], training ? x[i] : 0, training, mean, a, kx, k0, gm, gl,
                               bf16, &act, i);
}

static void fastbn_dx16_rows(const uint16_t* g, const uint16_t* x, uint16_t* d,
                             Py_ssize_t nrow, Py_ssize_t width, int training,
                             const float* mean, const float* a, const float* kx,
                             const float* k0, const float* gm, const float* gl, int bf16,
                             fastbn_act16 act) {
    Py_ssize_t r, j;
#ifdef FASTBN_W16
    const fastbn_v16 one = FASTBN_V16(set1)(1.0f), vslope = FASTBN_V16(set1)(act.slope),
                     vinverse = FASTBN_V16(set1)(act.inverse);
    fastbn_v16 gv;
#endif
    for (r = 0; r < nrow; r++) {
        const uint16_t* gr = g + r * width;
        const uint16_t* xr = x + r * width;
        uint16_t* dr = d + r * width;
        /* the activation's arrays at this row (laid out as g) */
        fastbn_act16 ar = act;
        if (act.y)
            ar.y = act.y + r * width;
        if (act.e)
            ar.e = act.e + r * width;
        j = 0;
#ifdef FASTBN_W16
        for (; j + FASTBN_W16 <= width; j += FASTBN_W16) {
            _mm_prefetch((const char*)(gr + j) + FASTBN_PREFETCH16, _MM_HINT_T0);
            gv = fastbn_act16_g(fastbn_load16(gr + j, bf16), &ar, j, vslope, one, bf16);
            if (training) {
                _mm_prefetch((const char*)(xr + j) + FASTBN_PREFETCH16, _MM_HINT_T0);
                fastbn_store16(dr + j, fastbn_dx16_v(
                    gv, fastbn_act16_x(fastbn_load16(xr + j, bf16), &ar, vinverse, one),
                    FASTBN_V16(loadu)(mean + j), FASTBN_V16(loadu)(a + j),
                    FASTBN_V16(loadu)(kx + j), FASTBN_V16(loadu)(k0 + j),
                    FASTBN_V16(loadu)(gm + j), FASTBN_V16(loadu)(gl + j)), bf16);
            } else {
                fastbn_store16(dr + j, FASTBN_V16(mul)(gv, FASTBN_V16(loadu)(a + j)), bf16);
            }
        }
#endif
        for (; j < width; j++)
            dr[j] = fastbn_dx16_one(gr[j], training ? xr[j] : 0, training,
                                    training ? mean[j] : 0, a[j], training ? kx[j] : 0,
                                    training ? k0[j] : 0, training ? gm[j] : 0,
                                    training ? gl[j] : 0, bf16, &ar, j);
    }
}

#endif  /* FASTBN_HALF_CONVERT_H */
