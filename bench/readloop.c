/* The memory floor for bench/block_kernels.py: read n bytes once (32-byte loads summed, 2 threads like
   the kernels), so GB/s = n / time is the rate a weight-streaming kernel cannot beat. */
#include <immintrin.h>
#include <stdint.h>

int64_t read_bytes(const uint8_t *p, int64_t n, int nthreads) {
    int64_t s = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : s)
    for (int64_t i = 0; i < n / 4096; i++) {
        __m256i a = _mm256_setzero_si256();
        for (int64_t j = i * 4096; j < (i + 1) * 4096; j += 32) a = _mm256_add_epi64(a, _mm256_loadu_si256((const __m256i *)(p + j)));
        s += _mm256_extract_epi64(a, 0) + _mm256_extract_epi64(a, 3);
    }
    return s;
}
