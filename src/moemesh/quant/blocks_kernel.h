/* Block-format matmul kernels (GGUF quant types, FP8 e4m3 blocks): common definitions.

y[m, n] = sum_k x[m, k] W[n, k], W's rows kept as the file's raw block bytes (quant/blocks.py).

The arithmetic, identical in the AVX2 and the scalar build (so they agree bit for bit):
  Activations, per (row m, group g of 32 k): amax = max |x|, X = round_even(x * (32767 / amax)) as
  int16 (about 16-bit precision: the int4 kernel's two int8 planes, in one int16 plane), du = amax / 32767,
  plus fp32 sums of x over each 16 (sumx16, a fixed pairwise tree: reduce8 of x[l] + x[l + 8]) and
  each 32 (sumx32 = sumx16a + sumx16b), for the types whose weights carry a min.
  Weights, per group of 32 (or 16, "G16" types Q2_K, Q3_K, Q6_K): W = a * q + b, q a small integer
  (int8: signed codes, lookups, or unsigned with b the min), a and b fp32 and exact products of the
  file's fp16 scales and small integers.
  Per (m, n) and group: D = sum q * X, an exact integer (int32); then in 8 fp32 lanes, lane = group % 8
  (G16: two sets of 8 lanes, see bk_dot): acc = fma((float)D, a * du, acc); acc = fma(b, sumx, acc).
  Groups in order, 8 per chunk of 256 weights; at the end y = reduce8(acc) (+ bias, one fp32 add).
Every output element goes through exactly this, whatever M, N, the tile or the thread that computes
it: results are batch invariant (a row's bits depend only on that row of x and the weight).
FP8_E4M3_B128 is an fp32 path (blocks_fp8.h).
*/
#ifndef BLOCKS_KERNEL_H
#define BLOCKS_KERNEL_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(BK_SCALAR)
#include <immintrin.h>
#define BK_AVX2 1
#else
#define BK_AVX2 0
#endif
/* AVX-512 BW + VL (16-bit lane permutes on ymm): the 32-block types and IQ4_XS keep their activations
   and unpacked codes in value order ("natural"), decoded by a 16-entry int16 table lookup (vpermw)
   instead of byte lookups widened to even/odd int16 (MXFP4 decode 1.13x on Zen 4: bench/block_kernels_ab.py). */
#if BK_AVX2 && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(BK_NO512)
#define BK_PERMW 1
#else
#define BK_PERMW 0
#endif

enum { BK_MXFP4, BK_Q8_0, BK_Q4_0, BK_Q4_1, BK_Q2_K, BK_Q3_K, BK_Q4_K, BK_Q5_K, BK_Q6_K, BK_IQ4_XS, BK_FP8, BK_NTYPES };

#define BK_GS 32      /* weights per group (activation scale granularity) */
#define BK_CHUNK 256  /* weights per chunk: 8 groups; a K-quant super-block */

typedef struct {
    int block;      /* weights per file block */
    int size;       /* bytes per file block */
    int g16;        /* scales per 16 weights (Q2_K, Q3_K, Q6_K) */
    int has_min;    /* W = a q + b with b != 0 */
} bk_traits;

static const bk_traits BK_TRAITS[BK_NTYPES] = {
    [BK_MXFP4] = {32, 17, 0, 0},  [BK_Q8_0] = {32, 34, 0, 0},   [BK_Q4_0] = {32, 18, 0, 0},
    [BK_Q4_1] = {32, 20, 0, 1},   [BK_Q2_K] = {256, 84, 1, 1},  [BK_Q3_K] = {256, 110, 1, 0},
    [BK_Q4_K] = {256, 144, 0, 1}, [BK_Q5_K] = {256, 176, 0, 1}, [BK_Q6_K] = {256, 210, 1, 0},
    [BK_IQ4_XS] = {256, 136, 0, 0}, [BK_FP8] = {128, 132, 0, 0},
};

/* Scales of one chunk of one weight row: G32 types a[g], b[g] for g < 8 (zero past ng); G16 types
   a[j], b[j] per 16 weights, j < 16. */
typedef struct {
    float a[16];
    float b[16];
    int ng;  /* groups of 32 in the chunk (< 8 only at the end of a row of a 32-block type) */
} bk_scales;

/* Whether ``type``'s activations and codes are in value order in this build (BK_PERMW above); the
   other AVX2 layouts hold each group of 32 as its 16 even then its 16 odd positions. Any layout gives
   the same exact integer D: only the products' pairing changes. */
static inline int bk_natural(int type) {
    return !BK_AVX2 || (BK_PERMW && (type == BK_MXFP4 || type == BK_Q8_0 || type == BK_Q4_0 || type == BK_Q4_1 ||
                                     type == BK_IQ4_XS));
}

/* One activation row, quantized (bk_quant_x). */
typedef struct {
    int16_t *X;      /* [K] int16 in the type's layout (bk_natural) */
    float *du;       /* [G8] per group, zero past G */
    float *sumx32;   /* [G8] */
    float *sumx16;   /* [2 * G8] */
} bk_xrow;

#define BK_INLINE static inline __attribute__((always_inline))

static inline float bk_f16(uint16_t h) {  /* IEEE half -> float, exact (F16C's conversion) */
#if BK_AVX2
    return _cvtsh_ss(h);
#endif
    const uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    uint32_t u;
    if (e == 0x1F) {
        u = s | 0x7F800000u | (m << 13);
    } else if (e) {
        u = s | ((e + 112) << 23) | (m << 13);
    } else if (m) {  /* subnormal: normalize */
        int sh = 0;
        uint32_t mm = m;
        while (!(mm & 0x400)) mm <<= 1, sh++;
        u = s | ((uint32_t)(113 - sh) << 23) | ((mm & 0x3FF) << 13);
    } else {
        u = s;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bk_rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* The fixed reduction of 8 lanes: ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)). */
static inline float bk_reduce8(const float *v) {
    const float t0 = v[0] + v[4], t1 = v[1] + v[5], t2 = v[2] + v[6], t3 = v[3] + v[7];
    return (t0 + t2) + (t1 + t3);
}

#if BK_AVX2
static inline float bk_reduce8_avx(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  /* t0..t3 */
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));                                         /* t0+t2, t1+t3 */
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));
    return _mm_cvtss_f32(t);
}
#endif

/* x fp32 [K] (K % 32 == 0) -> one activation row (see the header comment); natural: value order. */
static inline void bk_quant_x(const float *x, int64_t k, bk_xrow a, int natural) {
    const int64_t G = k / BK_GS, G8 = (G + 7) / 8 * 8;
    for (int64_t g = 0; g < G; g++) {
        const float *xg = x + g * BK_GS;
        int16_t *X = a.X + g * BK_GS;
#if BK_AVX2
        __m256 v[4];
        __m256 mx = _mm256_setzero_ps();
        const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xg + 8 * i), mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], nosign));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
        if (natural) {  /* packs interleaves 128-bit halves: [q0 0-3, q1 0-3 | q0 4-7, q1 4-7] -> value order */
            _mm256_storeu_si256((__m256i *)X, _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
            _mm256_storeu_si256((__m256i *)(X + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
        } else {
            const __m256i eo = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
            for (int i = 0; i < 4; i++) q[i] = _mm256_permutevar8x32_epi32(q[i], eo);
            const __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);  /* [evens | odds] of 16 */
            _mm256_storeu_si256((__m256i *)X, _mm256_permute2x128_si256(p01, p23, 0x20));
            _mm256_storeu_si256((__m256i *)(X + 16), _mm256_permute2x128_si256(p01, p23, 0x31));
        }
        a.sumx16[2 * g] = bk_reduce8_avx(_mm256_add_ps(v[0], v[1]));
        a.sumx16[2 * g + 1] = bk_reduce8_avx(_mm256_add_ps(v[2], v[3]));
#else
        (void)natural;  /* the scalar build is in value order */
        float amax = 0.f;
        for (int i = 0; i < BK_GS; i++) {
            const float ax = fabsf(xg[i]);
            amax = ax > amax ? ax : amax;
        }
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        for (int i = 0; i < BK_GS; i++) X[i] = (int16_t)lrintf(xg[i] * inv);  /* |.| <= 32767.0x: no overflow */
        for (int h = 0; h < 2; h++) {
            float t[8];
            for (int l = 0; l < 8; l++) t[l] = xg[16 * h + l] + xg[16 * h + l + 8];
            a.sumx16[2 * g + h] = bk_reduce8(t);
        }
#endif
        a.du[g] = amax / 32767.f;
        a.sumx32[g] = a.sumx16[2 * g] + a.sumx16[2 * g + 1];
    }
    for (int64_t g = G; g < G8; g++) a.du[g] = a.sumx32[g] = a.sumx16[2 * g] = a.sumx16[2 * g + 1] = 0.f;
}

#endif /* BLOCKS_KERNEL_H */
