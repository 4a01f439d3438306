/* The parallel region's orphaned barrier and clock, and whether the build keeps long-run sums in
   vector registers (AVX-512's 32) or in memory lanes. */
#ifndef FASTBN_PARALLEL_H
#define FASTBN_PARALLEL_H

#include <time.h>
#ifdef _OPENMP
#include <omp.h>
/* orphaned barrier: binds to the enclosing parallel region (Cython's prange inside a
   parallel block is "omp for nowait", so phases are ordered explicitly) */
static void fastbn_barrier(void) {
    #pragma omp barrier
}
/* seconds on a monotonic clock */
static double fastbn_now(void) { return omp_get_wtime(); }
static int fastbn_thread_num(void) { return omp_get_thread_num(); }
#else
static void fastbn_barrier(void) { }
static double fastbn_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static int fastbn_thread_num(void) { return 0; }
#endif

/* seconds of CPU time the calling thread has run (0 where the system does not say) */
static double fastbn_thread_cpu(void) {
#ifdef CLOCK_THREAD_CPUTIME_ID
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#endif
    return 0.0;
}

/* When a parallel region's threads ran (fastbn._support's _note_region judges whether the
   CPUs are contended): the region's start, the latest start of a thread in it, when the
   master thread's own share was done (before the closing barrier's wait), and the master's
   CPU time at the start and at that point (its share's time off the CPU is the
   difference from the wall time). */
typedef struct {
    double t0;
    double latest;
    double master_done;
    double cpu0;
    double master_cpu;
} fastbn_region;

static void fastbn_region_begin(fastbn_region* r) {
    r->t0 = r->latest = r->master_done = fastbn_now();
    r->cpu0 = r->master_cpu = fastbn_thread_cpu();
}
/* every thread, first thing in the region */
static void fastbn_region_enter(fastbn_region* r) {
    double t = fastbn_now();
#ifdef _OPENMP
    #pragma omp critical (fastbn_region)
#endif
    {
        if (t > r->latest)
            r->latest = t;
    }
}
/* every thread, last thing in the region */
static void fastbn_region_leave(fastbn_region* r) {
    if (fastbn_thread_num() == 0) {
        r->master_done = fastbn_now();
        r->master_cpu = fastbn_thread_cpu();
    }
}
/* AVX-512's 32 vector registers hold the LANES sums of a long run (_devs_run); with
   16 registers they would spill, so other builds keep their sums in memory lanes */
#if defined(__AVX512F__)
#define FASTBN_REGISTER_LANES 1
#else
#define FASTBN_REGISTER_LANES 0
#endif

#endif  /* FASTBN_PARALLEL_H */
