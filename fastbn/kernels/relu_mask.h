/* The fused ReLU's mask as a bit AND. */
#ifndef FASTBN_RELU_MASK_H
#define FASTBN_RELU_MASK_H

/* The fused ReLU's mask: g where y > 0, else +0 (a NaN y gives 0), as a bit AND of g
   with the comparison's all-ones or all-zeros word. Written so, loops of it vectorize
   (GCC 12 keeps an if/else select scalar when its value feeds a float-to-double sum;
   a load under the condition would keep any loop scalar). */
#include <stdint.h>
#include <string.h>
static inline float fastbn_mask_f(float g, float y) {
    uint32_t b;
    memcpy(&b, &g, sizeof b);
    b &= (uint32_t)0 - (uint32_t)(y > 0);
    memcpy(&g, &b, sizeof b);
    return g;
}
static inline double fastbn_mask_d(double g, double y) {
    uint64_t b;
    memcpy(&b, &g, sizeof b);
    b &= (uint64_t)0 - (uint64_t)(y > 0);
    memcpy(&g, &b, sizeof b);
    return g;
}
/* The fused ReLU's mask as bits (see _bits_stride in entry_points.pxi): bit i % 8 of
   bits[i / 8] is y[i] > 0 (0 for NaN), written by the rows backward's reduction pass
   and read by its dx pass instead of y; bits starts at a byte. */
static void fastbn_pack_tail_f32(const float* y, Py_ssize_t i0, Py_ssize_t n,
                                 unsigned char* bits) {
    Py_ssize_t i;
    for (i = i0; i < n; i++) {
        if (i % 8 == 0) bits[i / 8] = 0;
        bits[i / 8] |= (unsigned char)((y[i] > 0) << (i % 8));
    }
}
static void fastbn_pack_tail_f64(const double* y, Py_ssize_t i0, Py_ssize_t n,
                                 unsigned char* bits) {
    Py_ssize_t i;
    for (i = i0; i < n; i++) {
        if (i % 8 == 0) bits[i / 8] = 0;
        bits[i / 8] |= (unsigned char)((y[i] > 0) << (i % 8));
    }
}
/* g where bit j of word is set, else +0: the bits of fastbn_mask_f/_d */
static inline float fastbn_bit_f(float g, uint32_t word, Py_ssize_t j) {
    uint32_t b;
    memcpy(&b, &g, sizeof b);
    b &= (uint32_t)0 - ((word >> j) & 1u);
    memcpy(&g, &b, sizeof b);
    return g;
}

#endif  /* FASTBN_RELU_MASK_H */
