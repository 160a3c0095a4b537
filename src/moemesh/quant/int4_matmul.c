/* int4 weight-only matmul entry points; the arithmetic lives in int4_kernel.h (shared with int4_ffn.c). */
#include "int4_kernel.h"

int i4_simd(void) { return I4_SIMD; }

/* y fp32 [M, n_pad] = x [M, K] @ W.T; sz: (scale, zero) pairs, or scales alone when fmt & FMT_SYM, in
   torch's or (fmt & FMT_BLOCKS) the block-major layout. Returns 0, or -1 (no SIMD build / bad shape /
   no memory). */
int i4_matmul(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *qw, const uint16_t *sz, int fmt,
              int64_t n_pad, float *y, int nthreads) {
#if I4_SIMD
    if (k % GS || n_pad % 16 || m <= 0) return -1;
    const int64_t G = k / GS, nfull = n_pad / BLK, tail = n_pad % BLK;
    int8_t *x1 = (int8_t *)malloc((size_t)(2 * m * k));
    float *fs = (float *)malloc(sizeof(float) * 2 * (size_t)(m * G));
    int32_t *sx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(m * G));
    if (!x1 || !fs || !sx) {
        free(x1), free(fs), free(sx);
        return -1;
    }
    int8_t *x2 = x1 + m * k;
    float *du = fs, *sumx = fs + m * G;
    quant_x(x, x_bf16, m, k, x1, x2, du, sumx, sx);
    uint8_t ia[64], ib[64];
    for (int j = 0; j < 16; j++) {  /* dword j = bytes of row j (resp. 16 + j) at k, k+1, k+2, k+3 */
        ia[4 * j] = j, ia[4 * j + 1] = 32 + j, ia[4 * j + 2] = 64 + j, ia[4 * j + 3] = 96 + j;
        ib[4 * j] = 16 + j, ib[4 * j + 1] = 48 + j, ib[4 * j + 2] = 80 + j, ib[4 * j + 3] = 112 + j;
    }
    const __m512i idx_a = _mm512_loadu_si512(ia), idx_b = _mm512_loadu_si512(ib);
    const int64_t nblocks = nfull + (tail ? 1 : 0);
    if (m * n_pad * k < SERIAL_MACS || nblocks < 2) nthreads = 1;  /* waking a thread costs ~10 us */
#if I4_STATIC
#pragma omp parallel for schedule(static) num_threads(nthreads)
#else  /* dynamic: a thread descheduled by other load leaves its blocks to the other (same result);
          chunks of 4 blocks keep each thread's reads in long consecutive runs the prefetchers follow
          (trunk shapes, 2 threads: 15.6 GB/s median with chunks of 1, 18.8 with 4) */
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads)
#endif
    for (int64_t blk = 0; blk < nblocks; blk++) {
        int64_t gs;
        const uint16_t *szb = scale_block(sz, fmt, blk, G, n_pad, &gs);
        if (blk == nfull) {
            tail_rows(qw + nfull * k * (BLK / 2), szb, gs, fmt & FMT_SYM, nfull * BLK, tail, k, m, x1, x2, du, sumx, sx,
                      y, n_pad);
            continue;
        }
        const uint8_t *wb = qw + blk * k * (BLK / 2);
        int64_t r = 0;
#define I4_TILES(S)                                                                                              \
    for (; r + MT_MAX <= m; r += MT_MAX)                                                                         \
        block_tile(wb, szb, gs, blk * BLK, G, k, x1 + r * k, x2 + r * k, du + r * G, sumx + r * G, sx + r * G,   \
                   y + r * n_pad, n_pad, MT_MAX, S, idx_a, idx_b);                                               \
    for (; r < m; r++)                                                                                           \
        block_tile(wb, szb, gs, blk * BLK, G, k, x1 + r * k, x2 + r * k, du + r * G, sumx + r * G, sx + r * G,   \
                   y + r * n_pad, n_pad, 1, S, idx_a, idx_b);
        if (fmt & FMT_SYM) {  /* constant SYM per instantiation: the branch leaves the inner loops */
            I4_TILES(1)
        } else {
            I4_TILES(0)
        }
#undef I4_TILES
    }
    free(x1), free(fs), free(sx);
    return 0;
#else
    (void)x, (void)x_bf16, (void)m, (void)k, (void)qw, (void)sz, (void)fmt, (void)n_pad, (void)y, (void)nthreads;
    return -1;
#endif
}
