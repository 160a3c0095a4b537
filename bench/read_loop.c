/* The floor for streaming weights: a plain read of n buffers (the bytes a kernel call streams), split
   over nthreads like the kernels split theirs (OpenMP, chunks of 64 KiB, dynamic), summing 64-bit words
   so nothing is skipped. Built by bench/int4_kernel.py through moemesh.quant.native. */
#include <stdint.h>
#include <stddef.h>

#define CHUNK (64 * 1024)

uint64_t read_bufs(const uint8_t *const *bufs, const int64_t *sizes, int64_t n, int nthreads) {
    int64_t total = 0, nchunks = 0;
    for (int64_t b = 0; b < n; b++) total += sizes[b], nchunks += (sizes[b] + CHUNK - 1) / CHUNK;
    uint64_t acc = 0;
    (void)total;
#pragma omp parallel for schedule(dynamic, 4) reduction(^ : acc) num_threads(nthreads)
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t b = 0, first = 0;  /* which buffer chunk c is in */
        while (first + (sizes[b] + CHUNK - 1) / CHUNK <= c) first += (sizes[b] + CHUNK - 1) / CHUNK, b++;
        const int64_t off = (c - first) * CHUNK, len = sizes[b] - off < CHUNK ? sizes[b] - off : CHUNK;
        const uint64_t *p = (const uint64_t *)(bufs[b] + off);
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        int64_t i = 0, words = len / 8;
        for (; i + 4 <= words; i += 4) s0 ^= p[i], s1 ^= p[i + 1], s2 ^= p[i + 2], s3 ^= p[i + 3];
        for (; i < words; i++) s0 ^= p[i];
        acc ^= s0 ^ s1 ^ s2 ^ s3;
    }
    return acc;
}
