/*
 * Splitting a kernel's range [lo, hi) over the threads of the process's OpenMP team.
 *
 * Built with -fopenmp, the shared object needs libgomp.so.1, and the dynamic loader hands it the one PyTorch has
 * already loaded: the native kernels then run on PyTorch's own intra-op threads. A separate thread pool would
 * compete with those threads, which spin for a while after each operator and take the cores the pool needs
 * (measured: the native kernels of the fast model ran no faster on 2 threads than on 1). Without OpenMP the
 * range runs on the calling thread.
 *
 * ESC_PARALLEL_RANGE(lo, hi, a, b, call) runs `call` (an int expression of a and b; non-zero means failure) on
 * consecutive sub-ranges [a, b), one per thread, and returns the OR of the results. It uses the variable
 * `threads` of the calling function as the team size.
 */
#ifndef ESC_PARALLEL_H
#define ESC_PARALLEL_H
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#define ESC_PARALLEL_RANGE(lo, hi, a, b, call)                                                                    \
    do {                                                                                                          \
        int err_ = 0;                                                                                             \
        const int64_t lo_ = (lo), hi_ = (hi);                                                                     \
        if (threads <= 1) { /* no team at all, as PyTorch's own single-threaded operators */                     \
            const int64_t a = lo_, b = hi_;                                                                       \
            return b > a ? (call) : 0;                                                                            \
        }                                                                                                         \
        _Pragma("omp parallel num_threads(threads) reduction(| : err_)") {                                       \
            const int64_t n_ = omp_get_num_threads(), t_ = omp_get_thread_num();                                 \
            const int64_t a = lo_ + (hi_ - lo_) * t_ / n_, b = lo_ + (hi_ - lo_) * (t_ + 1) / n_;                 \
            if (b > a)                                                                                            \
                err_ |= (call);                                                                                   \
        }                                                                                                         \
        return err_;                                                                                              \
    } while (0)
#define ESC_OPENMP 1
#else
#define ESC_PARALLEL_RANGE(lo, hi, a, b, call)                                                                    \
    do {                                                                                                          \
        (void)threads;                                                                                            \
        const int64_t a = (lo), b = (hi);                                                                         \
        return b > a ? (call) : 0;                                                                                \
    } while (0)
#define ESC_OPENMP 0
#endif

#endif
