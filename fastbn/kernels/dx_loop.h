/* The dx loops of the training backward, compiled as functions of their own. */
#ifndef FASTBN_DX_LOOP_H
#define FASTBN_DX_LOOP_H
#include "fma.h"

/* dx[i] = ((g[i] - gm) - gl) * a + ((x[i] - mean) * kx + k0) for n values of one channel:
   the float32 form of _dx_value (planar_blocks.pxi), the same expression and fused
   multiply-adds, so the same bits. Kept out of line: inlined into the large planar
   kernels, the loop's eight live vectors (six coefficients, two values) lost a register to
   the rest of the function on 16-register AVX2 and reloaded it from the stack every step
   (measured: the training backward 15-35 % slower on planes of 49 to 3136 values). */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((noinline))
#endif
static void fastbn_dx_f32(const float* g, const float* x, float* dx, Py_ssize_t n, float mean,
                          float a, float kx, float k0, float gm, float gl) {
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        dx[i] = fastbn_maddf((g[i] - gm) - gl, a, fastbn_maddf(x[i] - mean, kx, k0));
}

/* The float64 form: dx[i] = g[i] * a + ((x[i] - mean) * kx + k0) (_dx_value in double) */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((noinline))
#endif
static void fastbn_dx_f64(const double* g, const double* x, double* dx, Py_ssize_t n,
                          double mean, double a, double kx, double k0) {
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        dx[i] = fastbn_madd(g[i], a, fastbn_madd(x[i] - mean, kx, k0));
}

#endif  /* FASTBN_DX_LOOP_H */
