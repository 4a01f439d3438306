/* The magnitudes float32 arithmetic is trusted with (docs/math.rst). */
#ifndef FASTBN_F32_RANGE_H
#define FASTBN_F32_RANGE_H

#define FASTBN_F32_BIG 1e30
#define FASTBN_F32_SMALL 1e-30

#endif  /* FASTBN_F32_RANGE_H */
