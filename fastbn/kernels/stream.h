/* Streaming (non-temporal) stores of a staged block. */
#ifndef FASTBN_STREAM_H
#define FASTBN_STREAM_H

/* Streaming (non-temporal) stores of a staged block to its destination: the output
   of a pass over data larger than the caches goes straight to memory, neither reading
   its cache lines first nor evicting the input the pass still needs. The destination's
   unaligned head and tail use ordinary stores. Without SSE (non-x86), a plain copy. */
#include <stdint.h>
#if defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#endif
/* Ask the cache for the lines of p[0:nbytes] (a hint: no fault, no effect on results). */
static inline void fastbn_prefetch(const void* p, Py_ssize_t nbytes) {
    const char* c = (const char*)p;
    Py_ssize_t off;
    for (off = 0; off < nbytes; off += 64) {
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(c + off);
#elif defined(_M_X64) || defined(_M_IX86)
        _mm_prefetch(c + off, _MM_HINT_T0);
#else
        (void)c;
#endif
    }
}

#if defined(__AVX512F__)
#define FASTBN_VEC_BYTES 64
#define FASTBN_STREAM_PS(p, s) _mm512_stream_ps((p), _mm512_loadu_ps(s))
#define FASTBN_STREAM_PD(p, s) _mm512_stream_pd((p), _mm512_loadu_pd(s))
#define FASTBN_STREAM_I(p, s) _mm512_stream_si512((void*)(p), _mm512_loadu_si512((const void*)(s)))
#elif defined(__AVX__)
#define FASTBN_VEC_BYTES 32
#define FASTBN_STREAM_PS(p, s) _mm256_stream_ps((p), _mm256_loadu_ps(s))
#define FASTBN_STREAM_PD(p, s) _mm256_stream_pd((p), _mm256_loadu_pd(s))
#define FASTBN_STREAM_I(p, s) _mm256_stream_si256((__m256i*)(p), _mm256_loadu_si256((const __m256i*)(s)))
#elif defined(__SSE2__) || defined(_M_X64)
#define FASTBN_VEC_BYTES 16
#define FASTBN_STREAM_PS(p, s) _mm_stream_ps((p), _mm_loadu_ps(s))
#define FASTBN_STREAM_PD(p, s) _mm_stream_pd((p), _mm_loadu_pd(s))
#define FASTBN_STREAM_I(p, s) _mm_stream_si128((__m128i*)(p), _mm_loadu_si128((const __m128i*)(s)))
#endif
#ifdef FASTBN_VEC_BYTES
#define FASTBN_STREAMS 1
#define FASTBN_STREAM_BODY(T, STORE)                                               \
    Py_ssize_t i = 0, k, lanes = FASTBN_VEC_BYTES / (Py_ssize_t)sizeof(T);          \
    while (i < n && ((size_t)(dst + i) % FASTBN_VEC_BYTES) != 0) {                  \
        dst[i] = src[i]; i++;                                                        \
    }                                                                                \
    for (; i + lanes <= n; i += lanes) STORE(dst + i, src + i);                     \
    for (k = i; k < n; k++) dst[k] = src[k];
static void fastbn_stream_f32(float* dst, const float* src, Py_ssize_t n) {
    FASTBN_STREAM_BODY(float, FASTBN_STREAM_PS)
}
static void fastbn_stream_f64(double* dst, const double* src, Py_ssize_t n) {
    FASTBN_STREAM_BODY(double, FASTBN_STREAM_PD)
}
static void fastbn_stream_fence(void) { _mm_sfence(); }
static void fastbn_stream_u16(uint16_t* dst, const uint16_t* src, Py_ssize_t n) {
    FASTBN_STREAM_BODY(uint16_t, FASTBN_STREAM_I)
}
#else
#define FASTBN_STREAMS 0
static void fastbn_stream_f32(float* dst, const float* src, Py_ssize_t n) {
    Py_ssize_t i; for (i = 0; i < n; i++) dst[i] = src[i];
}
static void fastbn_stream_f64(double* dst, const double* src, Py_ssize_t n) {
    Py_ssize_t i; for (i = 0; i < n; i++) dst[i] = src[i];
}
static void fastbn_stream_fence(void) { }
static void fastbn_stream_u16(uint16_t* dst, const uint16_t* src, Py_ssize_t n) {
    Py_ssize_t i; for (i = 0; i < n; i++) dst[i] = src[i];
}
#endif

#endif  /* FASTBN_STREAM_H */
