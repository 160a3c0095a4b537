/* The tile machinery of blocks_matmul.c, shared with the fused experts call (blocks_ffn.c). */
#ifndef BLOCKS_TILE_H
#define BLOCKS_TILE_H
#include <stdint.h>
#include <stdlib.h>

#define BK_NB 4              /* weight rows per tile */
#define BK_MB 64             /* activation rows per tile */
#define BK_ACC (BK_MB * BK_NB * 16)  /* floats of one tile's accumulators */
#define BK_SERIAL (1 << 18)  /* below this many multiply-adds one thread does the call */

/* One call's activations in the form the type's dot reads: int16 rows and their group stats (integer
   types) or zero-padded fp32 rows (FP8). */
typedef struct {
    int16_t *X;
    float *f;
    int64_t G8;
    int32_t *XT;  /* AVX-512 prefill: the rows transposed 16 at a time (blocks_v512.h), or NULL */
    float *fT;
} bk_xbuf;

/* x fp32 [m, k] -> b (allocated; bk_xfree). 0 or -3 (no memory). */
int bk_prepare(int type, const float *x, int64_t m, int64_t k, bk_xbuf *b);
void bk_xfree(bk_xbuf *b);
/* y[m0..m0+mm-1, n0..n0+nn-1] of y fp32 [m, n] (row stride n), + bias[n0..] when bias; W rows rs bytes
   apart; acc: BK_ACC floats of scratch. */
void bk_tile(int type, const bk_xbuf *xb, int64_t m, int64_t k, const uint8_t *w, int64_t rs, int64_t n,
             const float *bias, float *y, int64_t m0, int64_t mm, int64_t n0, int64_t nn, float *acc);

/* A thread's tile accumulator (BK_ACC floats; free it when the thread is done); NULL and *rc = -3
   when out of memory (the thread then skips its work and the call fails). */
static inline float *bk_thread_acc(int *rc) {
    float *acc = (float *)aligned_alloc(64, sizeof(float) * BK_ACC);  /* 64: zmm loads (blocks_v512.h) */
    if (!acc) {
#pragma omp atomic write
        *rc = -3;
    }
    return acc;
}

#endif
