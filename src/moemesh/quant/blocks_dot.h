/* One chunk (256 weights) of one weight row against one activation row: the exact integer group
   dots D, then the fp32 lane updates of blocks_kernel.h. acc: 16 floats (G32 types use lanes 0-7;
   G16 types: lanes 0-7 "A" hold groups 0-3, lanes 8-15 "B" groups 4-7, lane L of a set = group L % 4,
   half L / 4, i.e. 16-group j = 2 (L % 4) + L / 4). bk_finish folds them into y. */
#ifndef BLOCKS_DOT_H
#define BLOCKS_DOT_H
#include "blocks_kernel.h"

#if BK_AVX2
typedef int16_t bk_wq;  /* unpacked weights: int16 in the type's layout (bk_natural: value order, else even then odd) */
#else
typedef int8_t bk_wq;   /* unpacked weights: int8 codes in value order */
#endif

static inline void bk_finish_scalar(const float *acc, int g16, float *out) {
    float v[8];
    for (int l = 0; l < 8; l++) v[l] = g16 ? acc[l] + acc[8 + l] : acc[l];
    *out = bk_reduce8(v);
}

#if !BK_AVX2
BK_INLINE void bk_dot(const bk_wq *q, const int16_t *X, const bk_scales *sc, const float *du, const float *sx32,
                          const float *sx16, const bk_traits t, float *acc) {
    int32_t D[16];
    for (int j = 0; j < 16; j++) {
        int32_t s = 0;
        if (j < 2 * sc->ng)
            for (int i = 16 * j; i < 16 * j + 16; i++) s += (int32_t)q[i] * (int32_t)X[i];
        D[j] = s;
    }
    if (!t.g16) {
        for (int g = 0; g < 8; g++) {
            acc[g] = fmaf((float)(D[2 * g] + D[2 * g + 1]), sc->a[g] * du[g], acc[g]);
            if (t.has_min) acc[g] = fmaf(sc->b[g], sx32[g], acc[g]);
        }
        return;
    }
    for (int s = 0; s < 2; s++)
        for (int l = 0; l < 8; l++) {
            const int j = 8 * s + 2 * (l % 4) + l / 4;
            float *a = acc + 8 * s + l;
            *a = fmaf((float)D[j], sc->a[j] * du[4 * s + l % 4], *a);
            if (t.has_min) *a = fmaf(sc->b[j], sx16[j], *a);
        }
}

BK_INLINE void bk_finish(const float *acc, int g16, float *out) { bk_finish_scalar(acc, g16, out); }

#else
/* The fp32 update of one chunk from its 8 group dot vectors d[g] (int32 lanes l = values 4l..4l+3 of
   group g, zero past ng): lanes [g0a g1a g2a g3a | g0b g1b g2b g3b] (lo) and the same for groups 4-7
   (hi), a/b = a group's first/second 16 weights; then blocks_kernel.h's lane arithmetic. */
BK_INLINE void bk_dot_d(const __m256i *d, const bk_scales *sc, const float *du, const float *sx32, const float *sx16,
                        const bk_traits t, float *acc) {
    const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
    const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
    if (!t.g16) {
        const __m128i s0 = _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
        const __m128i s1 = _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
        const __m256 D = _mm256_cvtepi32_ps(_mm256_set_m128i(s1, s0));  /* groups 0..7 */
        __m256 a = _mm256_loadu_ps(acc);
        a = _mm256_fmadd_ps(D, _mm256_mul_ps(_mm256_loadu_ps(sc->a), _mm256_loadu_ps(du)), a);
        if (t.has_min) a = _mm256_fmadd_ps(_mm256_loadu_ps(sc->b), _mm256_loadu_ps(sx32), a);
        _mm256_storeu_ps(acc, a);
        return;
    }
    const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256 dus = _mm256_loadu_ps(du);
    for (int s = 0; s < 2; s++) {
        const __m256 D = _mm256_cvtepi32_ps(s ? hi : lo);
        const __m256 sa = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc->a + 8 * s), perm);
        const __m256 sd = _mm256_permutevar8x32_ps(dus, _mm256_setr_epi32(4 * s, 4 * s + 1, 4 * s + 2, 4 * s + 3,
                                                                          4 * s, 4 * s + 1, 4 * s + 2, 4 * s + 3));
        __m256 a = _mm256_loadu_ps(acc + 8 * s);
        a = _mm256_fmadd_ps(D, _mm256_mul_ps(sa, sd), a);
        if (t.has_min)
            a = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(sc->b + 8 * s), perm),
                                _mm256_permutevar8x32_ps(_mm256_loadu_ps(sx16 + 8 * s), perm), a);
        _mm256_storeu_ps(acc + 8 * s, a);
    }
}

/* int16 weights of a group, its first (e) and second (o) 16 positions in the type's layout (even | odd,
   or value order: bk_natural), against the activations in the same layout: int32 lanes. */
BK_INLINE __m256i bk_madd_eo(__m256i e, __m256i o, const int16_t *X) {
    return _mm256_add_epi32(_mm256_madd_epi16(e, _mm256_loadu_si256((const __m256i *)X)),
                            _mm256_madd_epi16(o, _mm256_loadu_si256((const __m256i *)(X + 16))));
}

/* One chunk from the unpacked buffer q (bk_unpack). */
BK_INLINE void bk_dot(const bk_wq *q, const int16_t *X, const bk_scales *sc, const float *du, const float *sx32,
                      const float *sx16, const bk_traits t, float *acc) {
    __m256i d[8];
    for (int g = 0; g < 8; g++)
        d[g] = t.block == 256 || g < sc->ng ? bk_madd_eo(  /* 256-blocks: always 8 groups, no branch */_mm256_loadu_si256((const __m256i *)(q + 32 * g)),
                                       _mm256_loadu_si256((const __m256i *)(q + 32 * g + 16)), X + 32 * g)
                          : _mm256_setzero_si256();
    bk_dot_d(d, sc, du, sx32, sx16, t, acc);
}

BK_INLINE void bk_finish(const float *acc, int g16, float *out) {
    __m256 v = _mm256_loadu_ps(acc);
    if (g16) v = _mm256_add_ps(v, _mm256_loadu_ps(acc + 8));
    *out = bk_reduce8_avx(v);
}
#endif

#endif /* BLOCKS_DOT_H */
