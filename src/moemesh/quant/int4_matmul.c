/* int4 weight-only matmul entry points; the arithmetic lives in int4_kernel.h (shared with int4_ffn.c). */
#include "int4_kernel.h"

/* The path this library was built with: 0 plain C, 1 AVX2 + FMA, 2 AVX-512 VNNI + VBMI. */
int i4_isa(void) { return I4_PATH; }
int i4_x8(void) { return I4_X8; }

/* y fp32 [M, n_pad] = x [M, K] @ W.T; sz: (scale, zero) pairs, or scales alone when fmt & FMT_SYM, in
   torch's or (fmt & FMT_BLOCKS) the block-major layout; qw in torch's 64-row or (fmt & FMT_B32) 32-row
   packing. Returns 0, or -1 (bad shape / no memory). */
int i4_matmul(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *qw, const uint16_t *sz, int fmt,
              int64_t n_pad, float *y, int nthreads) {
    if (k % GS || n_pad % 16 || m <= 0) return -1;
    const int64_t G = k / GS, bn = block_rows(fmt);
    int8_t *x1 = (int8_t *)malloc((size_t)(2 * m * k));
    float *fs = (float *)malloc(sizeof(float) * 2 * (size_t)(m * G));
    int32_t *sx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(m * G));
    if (!x1 || !fs || !sx) {
        free(x1), free(fs), free(sx);
        return -1;
    }
    int8_t *x2 = x1 + m * k;
    float *du = fs, *sumx = fs + m * G;
    i4_quant_x(x, x_bf16, m, k, x1, x2, du, sumx, sx);
    const int64_t nblocks = (n_pad + bn - 1) / bn;
    if (m * n_pad * k < SERIAL_MACS || nblocks < 2) nthreads = 1;  /* waking a thread costs ~10 us */
#if I4_STATIC
#pragma omp parallel for schedule(static) num_threads(nthreads)
#else  /* dynamic: a thread descheduled by other load leaves its blocks to the other (same result);
          chunks of 4 blocks keep each thread's reads in long consecutive runs the prefetchers follow
          (trunk shapes, 2 threads: 15.6 GB/s median with chunks of 1, 18.8 with 4) */
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads)
#endif
    for (int64_t blk = 0; blk < nblocks; blk++)
        i4_block(qw, sz, fmt, blk, n_pad, k, m, x1, x2, du, sumx, sx, y, n_pad);
    free(x1), free(fs), free(sx);
    return 0;
}
