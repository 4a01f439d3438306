/* Fused multiply-add where fastbn's arithmetic asks for it, and nowhere else. */
#ifndef FASTBN_FMA_H
#define FASTBN_FMA_H
#include <math.h>

/* Every module is compiled with -ffp-contract=off, so no a * b + c becomes one rounding
   unless written as fastbn_madd: the result of an expression is then what its source says,
   the same in every path that computes it (fused and unfused kernels, 1 and N threads),
   whatever the compiler would have chosen. Where the CPU the build targets has fused
   multiply-add (x86 builds with FMA, every 64-bit ARM CPU), fastbn_madd is one (exact
   product, one rounding: the more accurate, and one instruction); elsewhere (the portable
   x86-64 build) it is the product rounded, then the sum. */
#if defined(__FMA__) || defined(__aarch64__) || defined(_M_ARM64)
#define FASTBN_HAS_FMA 1
#if defined(__GNUC__) || defined(__clang__)
static inline double fastbn_madd(double a, double b, double c) { return __builtin_fma(a, b, c); }
static inline float fastbn_maddf(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#else
static inline double fastbn_madd(double a, double b, double c) { return fma(a, b, c); }
static inline float fastbn_maddf(float a, float b, float c) { return fmaf(a, b, c); }
#endif
#else
#define FASTBN_HAS_FMA 0
static inline double fastbn_madd(double a, double b, double c) { return a * b + c; }
static inline float fastbn_maddf(float a, float b, float c) { return a * b + c; }
#endif

#endif  /* FASTBN_FMA_H */
