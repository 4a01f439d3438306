/* The fused ReLU's mask as a bit AND. */
#ifndef FASTBN_RELU_MASK_H
#define FASTBN_RELU_MASK_H

/* The fused ReLU's mask: g where y > 0, else +0 (a NaN y gives 0), as a bit AND of g
   with the comparison's all-ones or all-zeros word. Written so, loops of it vectorize
   (GCC 12 keeps an if/else select scalar when its value feeds a float-to-double sum;
   a load under the condition would keep any loop scalar). */
#include <stdint.h>
#include <string.h>
#define FASTBN_MASK(NAME, T, BITS)                                                  \
    static inline T NAME(T g, T y) {                                                \
        BITS b;                                                                     \
        memcpy(&b, &g, sizeof b);                                                   \
        b &= (BITS)0 - (BITS)(y > 0);                                               \
        memcpy(&g, &b, sizeof b);                                                   \
        return g;                                                                   \
    }
FASTBN_MASK(fastbn_mask_f, float, uint32_t)
FASTBN_MASK(fastbn_mask_d, double, uint64_t)
/* The fused ReLU's mask as bits (see _bits_stride in entry_points.pxi): bit i % 8 of
   bits[i / 8] is y[i] > 0 (0 for NaN), written by the rows backward's reduction pass
   and read by its dx pass instead of y; bits starts at a byte. */
#define FASTBN_PACK_TAIL(NAME, T)                                                   \
    static void NAME(const T* y, Py_ssize_t i0, Py_ssize_t n, unsigned char* bits) { \
        Py_ssize_t i;                                                               \
        for (i = i0; i < n; i++) {                                                  \
            if (i % 8 == 0) bits[i / 8] = 0;                                        \
            bits[i / 8] |= (unsigned char)((y[i] > 0) << (i % 8));                  \
        }                                                                           \
    }
FASTBN_PACK_TAIL(fastbn_pack_tail_f32, float)
FASTBN_PACK_TAIL(fastbn_pack_tail_f64, double)
/* g where bit j of word is set, else +0: the bits of fastbn_mask_f/_d */
static inline float fastbn_bit_f(float g, uint32_t word, Py_ssize_t j) {
    uint32_t b;
    memcpy(&b, &g, sizeof b);
    b &= (uint32_t)0 - ((word >> j) & 1u);
    memcpy(&g, &b, sizeof b);
    return g;
}

#endif  /* FASTBN_RELU_MASK_H */
