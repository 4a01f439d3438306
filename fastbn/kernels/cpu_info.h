/* OpenMP facts, cache sizes and CPU features, for fastbn._support. */
#ifndef FASTBN_CPU_INFO_H
#define FASTBN_CPU_INFO_H

#ifdef _OPENMP
#include <omp.h>
#define FASTBN_OPENMP 1
#else
#define FASTBN_OPENMP 0
static int omp_get_max_threads(void) { return 1; }
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>             /* sysconf; Windows has neither */
#endif
/* the C library's report of a data cache's size in bytes, 0 if unknown (glibc on 64-bit ARM
   reports 0 for every level: fastbn._memory reads /sys first) */
static long fastbn_cache_size(int level) {
    long n = 0;
    (void)level;
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE) \
    && defined(_SC_LEVEL3_CACHE_SIZE)
    n = sysconf(level == 1 ? _SC_LEVEL1_DCACHE_SIZE
                : level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
#endif
    return n > 0 ? n : 0;
}
static int fastbn_cpu_avx2_fma(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}
/* the CPU and the operating system (which must save the 512-bit registers) */
static int fastbn_cpu_avx512(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return fastbn_cpu_avx2_fma() && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

#endif  /* FASTBN_CPU_INFO_H */
