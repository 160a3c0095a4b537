/* y fp32 [M, N] = x fp32 [M, K] @ W.T (+ bias), W's rows in a block format (blocks_kernel.h).

Work: tiles of BK_NB weight rows x BK_MB activation rows. One activation row (decode): each weight row
start to end, unpacked in registers straight into the dot (one sequential stream per row: walking the
tile's rows chunk by chunk in step was 1.7-4.6x slower from RAM, the prefetchers juggling four strided
streams). Several rows: chunk by chunk (256 weights; one 128-block for FP8), each weight row's chunk is
unpacked once and used for every activation row of the tile; with AVX-512 VNNI and at least 8 rows, 16
activation rows a lane set (blocks_v512.h). Threads share tiles (OpenMP, guided: long runs of
consecutive rows for the prefetchers); every output element has the arithmetic of blocks_kernel.h
whoever computes it, so results do not depend on M, N, the path or threads. */
#include "blocks_fp8.h"
#include "blocks_tile.h"
#include "blocks_unpack_avx2.h"
#include "blocks_v512.h"

int bk_simd(void) { return BK_V512 ? 2 : BK_AVX2; }  /* 0 scalar, 1 AVX2, 2 AVX2 + AVX-512 VNNI prefill */

void bk_xfree(bk_xbuf *b) {
    free(b->X), free(b->f), free(b->XT), free(b->fT);
    b->X = NULL, b->f = NULL, b->XT = NULL, b->fT = NULL;
}

int bk_prepare(int type, const float *x, int64_t m, int64_t k, bk_xbuf *b) {
    b->X = NULL, b->f = NULL, b->G8 = 0, b->XT = NULL, b->fT = NULL;
    if (type == BK_FP8) {
        const int64_t kp = (k + BK_FP8_BLOCK - 1) / BK_FP8_BLOCK * BK_FP8_BLOCK;
        b->f = (float *)calloc((size_t)(m * kp), sizeof(float));
        if (!b->f) return -3;
        for (int64_t r = 0; r < m; r++) memcpy(b->f + r * kp, x + r * k, sizeof(float) * (size_t)k);
        return 0;
    }
    const int64_t G = k / BK_GS;
    b->G8 = (G + 7) / 8 * 8;
    b->X = (int16_t *)malloc(sizeof(int16_t) * (size_t)(m * k) + 64);
    b->f = (float *)malloc(sizeof(float) * (size_t)(4 * m * b->G8));
    if (!b->X || !b->f) return -3;
    for (int64_t r = 0; r < m; r++) {
        const bk_xrow a = {b->X + r * k, b->f + r * b->G8, b->f + (m + r) * b->G8, b->f + 2 * m * b->G8 + 2 * r * b->G8};
        bk_quant_x(x + r * k, k, a, bk_natural(type));
    }
    if (BK_V512 && m >= BK_V512_MIN) return bk_prepare_t(b->X, b->f, m, k, b->G8, &b->XT, &b->fT);
    return 0;
}

/* The tile with ``type`` a constant (bk_tile instantiates it per type): no per-group dispatch. */
BK_INLINE void bk_tile_t(const int type, const bk_xbuf *xb, int64_t m, int64_t k, const uint8_t *w, int64_t rs, int64_t n,
                         const float *bias, float *y, int64_t m0, int64_t mm, int64_t n0, int64_t nn, float *acc) {
    const bk_traits t = BK_TRAITS[type];
    memset(acc, 0, sizeof(float) * (size_t)(mm * BK_NB * 16));
    if (type == BK_FP8) {
        const int64_t nb = (k + BK_FP8_BLOCK - 1) / BK_FP8_BLOCK, kp = nb * BK_FP8_BLOCK;
#if BK_AVX2
        if (mm == 1) {  /* one activation row: row by row (sequential), converted in registers into the dot */
            for (int64_t r = 0; r < nn; r++)
                for (int64_t c = 0; c < nb; c++)
                    bk_fp8_dot_direct(w + (n0 + r) * rs, c, xb->f + m0 * kp + c * BK_FP8_BLOCK, acc + r * 16);
            goto finish;
        }
#endif
        float wf[BK_NB][BK_FP8_BLOCK], s[BK_NB];
        for (int64_t c = 0; c < nb; c++) {
            for (int64_t r = 0; r < nn; r++) s[r] = bk_fp8_unpack(w + (n0 + r) * rs, c, wf[r]);
            for (int64_t i = 0; i < mm; i++)
                for (int64_t r = 0; r < nn; r++)
                    bk_fp8_dot(wf[r], s[r], xb->f + (m0 + i) * kp + c * BK_FP8_BLOCK, acc + (i * BK_NB + r) * 16);
        }
    } else {
        const int64_t G8 = xb->G8, nc = G8 / 8;
#if BK_AVX2
        if (mm == 1) {  /* one activation row: each weight row start to end (one sequential stream), unpacked
                           in registers straight into the dot */
            for (int64_t r = 0; r < nn; r++)
                for (int64_t c = 0; c < nc; c++) {
                    const float *du = xb->f + m0 * G8 + 8 * c, *sx32 = xb->f + (m + m0) * G8 + 8 * c;
                    bk_dot_direct(type, w + (n0 + r) * rs, k, c, xb->X + m0 * k + c * BK_CHUNK, du, sx32,
                                  xb->f + 2 * m * G8 + 2 * m0 * G8 + 16 * c, acc + r * 16);
                }
            goto finish;
        }
#endif
#if BK_V512
        if (xb->XT) {  /* 16 rows a lane set (blocks_v512.h); m0 is a multiple of BK_MB */
            bk_tile_v512(type, xb->XT, xb->fT, G8, k, w, rs, n, bias, y, m0, mm, n0, nn, acc);
            return;
        }
#endif
        bk_wq wq[BK_NB][BK_CHUNK];
        bk_scales sc[BK_NB];
        for (int64_t c = 0; c < nc; c++) {
            for (int64_t r = 0; r < nn; r++) bk_unpack(type, w + (n0 + r) * rs, k, c, wq[r], &sc[r]);
            for (int64_t i = 0; i < mm; i++) {
                const int64_t row = m0 + i;
                const int16_t *X = xb->X + row * k + c * BK_CHUNK;
                const float *du = xb->f + row * G8 + 8 * c, *sx32 = xb->f + (m + row) * G8 + 8 * c;
                const float *sx16 = xb->f + 2 * m * G8 + 2 * row * G8 + 16 * c;
                for (int64_t r = 0; r < nn; r++) bk_dot(wq[r], X, &sc[r], du, sx32, sx16, t, acc + (i * BK_NB + r) * 16);
            }
        }
    }
#if BK_AVX2
finish:
#endif
    for (int64_t i = 0; i < mm; i++)
        for (int64_t r = 0; r < nn; r++) {
            float v;
            if (type == BK_FP8) {
                v = bk_reduce8(acc + (i * BK_NB + r) * 16);
            } else {
                bk_finish(acc + (i * BK_NB + r) * 16, t.g16, &v);
            }
            y[(m0 + i) * n + n0 + r] = bias ? v + bias[n0 + r] : v;
        }
}

void bk_tile(int type, const bk_xbuf *xb, int64_t m, int64_t k, const uint8_t *w, int64_t rs, int64_t n,
             const float *bias, float *y, int64_t m0, int64_t mm, int64_t n0, int64_t nn, float *acc) {
    switch (type) {
#define BK_CASE(T) \
    case T: bk_tile_t(T, xb, m, k, w, rs, n, bias, y, m0, mm, n0, nn, acc); break;
        BK_CASE(BK_MXFP4) BK_CASE(BK_Q8_0) BK_CASE(BK_Q4_0) BK_CASE(BK_Q4_1) BK_CASE(BK_Q2_K) BK_CASE(BK_Q3_K)
        BK_CASE(BK_Q4_K) BK_CASE(BK_Q5_K) BK_CASE(BK_Q6_K) BK_CASE(BK_IQ4_XS) BK_CASE(BK_FP8)
#undef BK_CASE
    default: break;
    }
}

/* Returns 0, -1 (bad arguments) or -3 (no memory). rs: bytes from one weight row to the next. */
int bk_matmul(int type, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t rs, int64_t n,
              const float *bias, float *y, int nthreads) {
    if (type < 0 || type >= BK_NTYPES || m <= 0 || n <= 0 || k <= 0) return -1;
    const bk_traits t = BK_TRAITS[type];
    if (type != BK_FP8 && k % t.block) return -1;
    const int64_t row_bytes = (k + t.block - 1) / t.block * t.size;
    if (rs < row_bytes) return -1;
    bk_xbuf xb;
    int rc = bk_prepare(type, x, m, k, &xb);
    if (rc) {
        bk_xfree(&xb);
        return rc;
    }
    const int64_t ntiles = (n + BK_NB - 1) / BK_NB, nmb = (m + BK_MB - 1) / BK_MB;
    if (m * n * k < BK_SERIAL || ntiles * nmb < 2) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        float *acc = bk_thread_acc(&rc);
#pragma omp for schedule(guided)
        for (int64_t it = 0; it < nmb * ntiles; it++) {
            if (!acc) continue;
            const int64_t mb = it / ntiles, tile = it % ntiles;
            const int64_t m0 = mb * BK_MB, n0 = tile * BK_NB;
            bk_tile(type, &xb, m, k, w, rs, n, bias, y, m0, m - m0 < BK_MB ? m - m0 : BK_MB, n0,
                    n - n0 < BK_NB ? n - n0 : BK_NB, acc);
        }
        free(acc);
    }
    bk_xfree(&xb);
    return rc;
}
