/* AVX-512 VNNI prefill tiles for the integer block types: 16 activation rows at once, one per lane.

The per-row kernel (blocks_dot.h) spends most of its instructions folding each group's 8-16 int32
partial sums into one D (a horizontal reduction per row, weight row and group). Here the activations
of 16 rows are transposed so that a lane is a row: X pairs (two int16 of a row) as int32,
XT[pair][16 rows]; a weight pair (two int16 codes of the unpacked chunk, blocks_unpack_avx2.h's layout)
is broadcast to all lanes, and vpdpwssd adds w0 x0 + w1 x1 into each row's lane. After a group's 16
pairs (a 16-weight half's 8 for the G16 types) a lane holds that row's exact D: the same integer as
the per-row kernel, then the same fp32 lane updates (fma(D, a * du, acc), fma(b, sumx, acc)) with
the row's du and sums in lanes too, and the same fixed 8-lane reduction at the end. So every output
element has blocks_kernel.h's arithmetic bit for bit (tests compare with the scalar build) and no
horizontal reduction is left: 16 pairs x 16 rows per instruction.
Used for calls of at least BK_V512_MIN rows (a padded block of 16 with fewer rows does empty work);
decode (one row) keeps the direct per-row path. */
#ifndef BLOCKS_V512_H
#define BLOCKS_V512_H
#include "blocks_dot.h"
#include "blocks_tile.h"

#if BK_AVX2 && defined(__AVX512F__) && defined(__AVX512VNNI__) && !defined(BK_NO512)
#define BK_V512 1
#else
#define BK_V512 0
#endif
#define BK_RB 16        /* activation rows per lane set */
#define BK_V512_MIN 8   /* fewer rows: the per-row path (padding would waste more than the lanes save) */

/* Transposed copies of the prepared rows (bk_prepare's X and group stats), per block of 16 rows:
   XT [nrb][K/2][16] int32 pairs, fT [nrb][4 G8][16]: du [G8], sumx32 [G8], sumx16 [2 G8] per lane;
   rows past m are zero. 0 or -3. */
static inline int bk_prepare_t(const int16_t *X, const float *f, int64_t m, int64_t k, int64_t G8, int32_t **XT,
                               float **fT) {
    const int64_t nrb = (m + BK_RB - 1) / BK_RB, kp = k / 2;
    *XT = (int32_t *)aligned_alloc(64, sizeof(int32_t) * (size_t)(nrb * kp * BK_RB));
    *fT = (float *)aligned_alloc(64, sizeof(float) * (size_t)(nrb * 4 * G8 * BK_RB));
    if (!*XT || !*fT) return -3;
    for (int64_t b = 0; b < nrb; b++)
        for (int l = 0; l < BK_RB; l++) {
            const int64_t row = b * BK_RB + l;
            int32_t *xt = *XT + b * kp * BK_RB + l;
            float *ft = *fT + b * 4 * G8 * BK_RB + l;
            if (row >= m) {
                for (int64_t p = 0; p < kp; p++) xt[p * BK_RB] = 0;
                for (int64_t j = 0; j < 4 * G8; j++) ft[j * BK_RB] = 0.f;
                continue;
            }
            const int32_t *xr = (const int32_t *)(const void *)(X + row * k);
            for (int64_t p = 0; p < kp; p++) memcpy(xt + p * BK_RB, xr + p, 4);
            for (int64_t g = 0; g < G8; g++) {  /* bk_prepare's f: du [m][G8], sumx32 [m][G8], sumx16 [m][2 G8] */
                ft[g * BK_RB] = f[row * G8 + g];
                ft[(G8 + g) * BK_RB] = f[(m + row) * G8 + g];
                ft[(2 * G8 + 2 * g) * BK_RB] = f[2 * m * G8 + 2 * row * G8 + 2 * g];
                ft[(2 * G8 + 2 * g + 1) * BK_RB] = f[2 * m * G8 + 2 * row * G8 + 2 * g + 1];
            }
        }
    return 0;
}

#if BK_V512
/* 16 rows' D for NN weight rows at once over the pairs p0 .. p0 + np - 1 of their unpacked chunks
   (independent dpwssd chains, two per row; each X load serves every row); d[r] = the rows' exact D. */
BK_INLINE void bk_d16(const int NN, const bk_wq (*q)[BK_CHUNK], const int32_t *xt, int p0, int np, __m512i *d) {
    __m512i e[4], o[4];
    for (int r = 0; r < NN; r++) e[r] = o[r] = _mm512_setzero_si512();
    for (int i = 0; i < np; i += 2) {
        const __m512i x0 = _mm512_load_si512((const void *)(xt + (p0 + i) * BK_RB));
        const __m512i x1 = _mm512_load_si512((const void *)(xt + (p0 + i + 1) * BK_RB));
        for (int r = 0; r < NN; r++) {
            const int32_t *qp = (const int32_t *)(const void *)q[r];
            e[r] = _mm512_dpwssd_epi32(e[r], x0, _mm512_set1_epi32(qp[p0 + i]));
            o[r] = _mm512_dpwssd_epi32(o[r], x1, _mm512_set1_epi32(qp[p0 + i + 1]));
        }
    }
    for (int r = 0; r < NN; r++) d[r] = _mm512_add_epi32(e[r], o[r]);  /* integers: exact in any order */
}

/* One lane update of NN weight rows: acc[r][lane l][16 rows] = fma(D, a * du, .) (+ fma(b, sumx, .)). */
BK_INLINE void bk_lane16(const int NN, const bk_traits t, const __m512i *d, const bk_scales *sc, int j, int l,
                         __m512 du, const float *sx, float *acc) {
    for (int r = 0; r < NN; r++) {
        float *a = acc + (r * 16 + l) * BK_RB;
        __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_mul_ps(_mm512_set1_ps(sc[r].a[j]), du), _mm512_load_ps(a));
        if (t.has_min) v = _mm512_fmadd_ps(_mm512_set1_ps(sc[r].b[j]), _mm512_load_ps(sx), v);
        _mm512_store_ps(a, v);
    }
}

/* One chunk of NN weight rows (unpacked q, scales sc) into 16 rows' lane accumulators acc [NN][16
   lanes][16 rows] (lane l of the per-row kernel; one activation row per zmm lane). xt: the chunk's
   128 pairs [128][16]; ft: the block's stats, g0 = the chunk's first group. */
BK_INLINE void bk_chunk16(const int NN, const bk_traits t, int ng, const bk_wq (*q)[BK_CHUNK], const bk_scales *sc,
                          const int32_t *xt, const float *ft, int64_t G8, int64_t g0, float *acc) {
    __m512i d[4], d2[4];
    for (int g = 0; g < 8; g++) {
        if (t.block != 256 && g >= ng) break;
        const __m512 du = _mm512_load_ps(ft + (g0 + g) * BK_RB);
        if (!t.g16) {  /* pairs 16g .. 16g + 15: the whole group */
            bk_d16(NN, q, xt, 16 * g, 16, d);
            bk_lane16(NN, t, d, sc, g, g, du, ft + (G8 + g0 + g) * BK_RB, acc);
            continue;
        }
        for (int h = 0; h < 2; h++) {  /* 16-weight half h: evens and odds of values 16h..16h+15 = pairs 4h.., 8 + 4h.. */
            bk_d16(NN, q, xt, 16 * g + 4 * h, 4, d);
            bk_d16(NN, q, xt, 16 * g + 8 + 4 * h, 4, d2);
            for (int r = 0; r < NN; r++) d[r] = _mm512_add_epi32(d[r], d2[r]);
            const int j = 2 * g + h, l = 8 * (g / 4) + 4 * h + g % 4;  /* blocks_dot.h's G16 lane of 16-group j */
            bk_lane16(NN, t, d, sc, j, l, du, ft + (2 * G8 + 2 * (g0 + g) + h) * BK_RB, acc);
        }
    }
}

/* The tile (weight rows n0..n0+nn-1, activation rows m0..m0+mm-1, m0 a multiple of 16) from the
   transposed rows: chunk by chunk, each weight row unpacked once for all the tile's rows. acc: BK_ACC
   floats of scratch, [block][weight row][16 lanes][16 rows]. */
BK_INLINE void bk_tile_v512(const int type, const int32_t *XT, const float *fT, int64_t G8, int64_t k,
                            const uint8_t *w, int64_t rs, int64_t n, const float *bias, float *y, int64_t m0, int64_t mm,
                            int64_t n0, int64_t nn, float *acc) {
    const bk_traits t = BK_TRAITS[type];
    const int64_t nc = G8 / 8, kp = k / 2, b0 = m0 / BK_RB, nb = (mm + BK_RB - 1) / BK_RB;
    memset(acc, 0, sizeof(float) * (size_t)(nb * BK_NB * 16 * BK_RB));
    _Alignas(64) bk_wq wq[BK_NB][BK_CHUNK];
    bk_scales sc[BK_NB];
    for (int64_t c = 0; c < nc; c++) {
        const int ng = bk_chunk_groups(type, k, c);
        for (int64_t r = 0; r < nn; r++) bk_unpack(type, w + (n0 + r) * rs, k, c, wq[r], &sc[r]);
        for (int64_t b = 0; b < nb; b++) {
            const int32_t *xt = XT + (b0 + b) * kp * BK_RB + c * 128 * BK_RB;
            const float *ft = fT + (b0 + b) * 4 * G8 * BK_RB;
            float *ab = acc + b * BK_NB * 16 * BK_RB;
            if (nn == BK_NB) {
                bk_chunk16(BK_NB, t, ng, wq, sc, xt, ft, G8, 8 * c, ab);
            } else {
                for (int64_t r = 0; r < nn; r++) bk_chunk16(1, t, ng, wq + r, sc + r, xt, ft, G8, 8 * c, ab + r * 16 * BK_RB);
            }
        }
    }
    for (int64_t b = 0; b < nb; b++)
        for (int64_t r = 0; r < nn; r++) {
            const float *ar = acc + (b * BK_NB + r) * 16 * BK_RB;
            __m512 v[8];
            for (int l = 0; l < 8; l++) {
                v[l] = _mm512_load_ps(ar + l * BK_RB);
                if (t.g16) v[l] = _mm512_add_ps(v[l], _mm512_load_ps(ar + (8 + l) * BK_RB));
            }
            /* bk_reduce8: ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)) */
            const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(v[0], v[4]), _mm512_add_ps(v[2], v[6])),
                                           _mm512_add_ps(_mm512_add_ps(v[1], v[5]), _mm512_add_ps(v[3], v[7])));
            _Alignas(64) float out[BK_RB];
            _mm512_store_ps(out, s);
            const int64_t rows = mm - b * BK_RB < BK_RB ? mm - b * BK_RB : BK_RB;
            for (int64_t i = 0; i < rows; i++)
                y[(m0 + b * BK_RB + i) * n + n0 + r] = bias ? out[i] + bias[n0 + r] : out[i];
        }
}
#endif

#endif /* BLOCKS_V512_H */
