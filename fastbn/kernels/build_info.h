/* What the compiler was told and which vector instructions it used. */
#ifndef FASTBN_BUILD_INFO_H
#define FASTBN_BUILD_INFO_H

#ifndef FASTBN_CFLAGS
#define FASTBN_CFLAGS "?"
#endif
#if defined(__AVX512F__)
#define FASTBN_SIMD "AVX-512"
#elif defined(__AVX2__)
#define FASTBN_SIMD "AVX2"
#elif defined(__AVX__)
#define FASTBN_SIMD "AVX"
#elif defined(__SSE2__) || defined(_M_X64)
#define FASTBN_SIMD "SSE2"
#elif defined(__ARM_NEON)
#define FASTBN_SIMD "NEON"
#else
#define FASTBN_SIMD "none"
#endif
#ifdef __VERSION__
#define FASTBN_CC_VERSION __VERSION__
#else
#define FASTBN_CC_VERSION "unknown"
#endif

#endif  /* FASTBN_BUILD_INFO_H */
