/* The parallel region's orphaned barrier, and whether the build keeps long-run sums in
   vector registers (AVX-512's 32) or in memory lanes. */
#ifndef FASTBN_PARALLEL_H
#define FASTBN_PARALLEL_H

#ifdef _OPENMP
/* orphaned barrier: binds to the enclosing parallel region (Cython's prange inside a
   parallel block is "omp for nowait", so phases are ordered explicitly) */
static void fastbn_barrier(void) {
    #pragma omp barrier
}
#else
static void fastbn_barrier(void) { }
#endif
/* AVX-512's 32 vector registers hold the LANES sums of a long run (_devs_run); with
   16 registers they would spill, so other builds keep their sums in memory lanes */
#if defined(__AVX512F__)
#define FASTBN_REGISTER_LANES 1
#else
#define FASTBN_REGISTER_LANES 0
#endif

#endif  /* FASTBN_PARALLEL_H */
