/* The dx loops of the training backward, compiled as functions of their own. */
#ifndef FASTBN_DX_LOOP_H
#define FASTBN_DX_LOOP_H
#include "fma.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* One dx value in training, the one place its expression is written (the Cython kernels'
   _dx_value, the mask-bits and 16-bit loops call these): float32,
   ((g - gm) - gl) * a + ((x - mean) * kx + k0), the gradient's mean split into its float32
   value gm and the remainder gl; float64, g * a + ((x - mean) * kx + k0); both products fused
   into their sums (fma.h). */
static inline float fastbn_dx_one_f32(float g, float x, float mean, float a, float kx,
                                      float k0, float gm, float gl) {
    return fastbn_maddf((g - gm) - gl, a, fastbn_maddf(x - mean, kx, k0));
}
static inline double fastbn_dx_one_f64(double g, double x, double mean, double a, double kx,
                                       double k0) {
    return fastbn_madd(g, a, fastbn_madd(x - mean, kx, k0));
}

/* dx of n values of one channel, plain (no mask), in float32. Kept out of line: inlined into the large planar
   kernels, the loop's eight live vectors (six coefficients, two values) lost a register to
   the rest of the function on 16-register AVX2 and reloaded it from the stack every step
   (measured: the training backward 15-35 % slower on planes of 49 to 3136 values). */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((noinline))
#endif
static void fastbn_dx_f32(const float* g, const float* x, float* dx, Py_ssize_t n, float mean,
                          float a, float kx, float k0, float gm, float gl) {
    Py_ssize_t i = 0;
#if defined(__AVX512F__)
    /* fastbn_dx_one_f32 on 16 values at a time, the last n % 16 under a mask: a short run
       (a plane of 49 or 196 values) pays no scalar tail. The same bits. */
    const __m512 vm = _mm512_set1_ps(mean), va = _mm512_set1_ps(a), vkx = _mm512_set1_ps(kx),
                 vk0 = _mm512_set1_ps(k0), vgm = _mm512_set1_ps(gm), vgl = _mm512_set1_ps(gl);
    __m512 v;
    __mmask16 m;
    for (; i + 16 <= n; i += 16) {
        v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vkx, vk0);
        v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(g + i), vgm), vgl), va,
                            v);
        _mm512_storeu_ps(dx + i, v);
    }
    if (i < n) {
        m = (__mmask16)((1u << (n - i)) - 1);
        v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vm), vkx, vk0);
        v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, g + i), vgm),
                                          vgl), va, v);
        _mm512_mask_storeu_ps(dx + i, m, v);
    }
#else
    for (; i < n; i++)
        dx[i] = fastbn_dx_one_f32(g[i], x[i], mean, a, kx, k0, gm, gl);
#endif
}

/* and in float64 */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((noinline))
#endif
static void fastbn_dx_f64(const double* g, const double* x, double* dx, Py_ssize_t n,
                          double mean, double a, double kx, double k0) {
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        dx[i] = fastbn_dx_one_f64(g[i], x[i], mean, a, kx, k0);
}

#endif  /* FASTBN_DX_LOOP_H */
