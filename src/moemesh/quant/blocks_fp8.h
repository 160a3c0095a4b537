/* FP8_E4M3_B128 (quant/fp8.py): per row, blocks of [fp32 scale | 128 e4m3 bytes]. An fp32 path:
   e4m3 -> fp32 exactly, as value * 2^-8 (the byte's 7 magnitude bits placed in an fp16's exponent and
   mantissa: an exact fp16, subnormals included; e4m3fn's NaN codes 0x7F/0xFF are not treated specially:
   valid checkpoints hold none). Per block, 8 fp32 lanes (lane = k % 8) with four partial sums each
   (p_j, j = k / 8 % 4, in k order): p_j = fma(w, x, p_j), then acc = fma((p0 + p1) + (p2 + p3), scale * 256,
   acc); y = reduce8(acc). The AVX2 and the scalar
   build do these same operations (bit-identical results); x is zero-padded to whole blocks. */
#ifndef BLOCKS_FP8_H
#define BLOCKS_FP8_H
#include "blocks_kernel.h"

#define BK_FP8_BLOCK 128

static inline float bk_e4m3_scaled(uint8_t b) {  /* e4m3 value * 2^-8, exact */
    return bk_f16((uint16_t)(((b & 0x7F) << 7) | ((b & 0x80) << 8)));
}

#if BK_AVX2
/* 16 e4m3 bytes -> two vectors of 8 floats (value * 2^-8) */
BK_INLINE void bk_fp8_16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7F)), 7),
                                      _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}
#endif

/* Block c of a row -> 128 floats (value * 2^-8) and the block's scale * 256. */
BK_INLINE float bk_fp8_unpack(const uint8_t *row, int64_t c, float *w) {
    const uint8_t *b = row + c * (4 + BK_FP8_BLOCK);
    float s;
    memcpy(&s, b, 4);
#if BK_AVX2
    for (int i = 0; i < BK_FP8_BLOCK; i += 16) {
        __m256 lo, hi;
        bk_fp8_16(b + 4 + i, &lo, &hi);
        _mm256_storeu_ps(w + i, lo);
        _mm256_storeu_ps(w + i + 8, hi);
    }
#else
    for (int i = 0; i < BK_FP8_BLOCK; i++) w[i] = bk_e4m3_scaled(b[4 + i]);
#endif
    return s * 256.f;
}

/* acc[8] += the block's contribution: x (128 floats) against w (128 floats); four partial sums per lane
   (k / 8 % 4) keep four fma chains in flight: p = (p0 + p1) + (p2 + p3), acc = fma(p, s256, acc). */
#if BK_AVX2
BK_INLINE void bk_fp8_finish_block(__m256 p0, __m256 p1, __m256 p2, __m256 p3, float s256, float *acc) {
    const __m256 p = _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3));
    _mm256_storeu_ps(acc, _mm256_fmadd_ps(p, _mm256_set1_ps(s256), _mm256_loadu_ps(acc)));
}

BK_INLINE void bk_fp8_dot(const float *w, float s256, const float *x, float *acc) {
    __m256 p[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int i = 0; i < BK_FP8_BLOCK; i += 32)
        for (int j = 0; j < 4; j++)
            p[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8 * j), _mm256_loadu_ps(x + i + 8 * j), p[j]);
    bk_fp8_finish_block(p[0], p[1], p[2], p[3], s256, acc);
}

/* One activation row: block c converted in registers straight into the dot. */
BK_INLINE void bk_fp8_dot_direct(const uint8_t *row, int64_t c, const float *x, float *acc) {
    const uint8_t *b = row + c * (4 + BK_FP8_BLOCK);
    float s;
    memcpy(&s, b, 4);
    __m256 p[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int i = 0; i < BK_FP8_BLOCK; i += 32) {
        __m256 w0, w1, w2, w3;
        bk_fp8_16(b + 4 + i, &w0, &w1);
        bk_fp8_16(b + 4 + i + 16, &w2, &w3);
        p[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), p[0]);
        p[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), p[1]);
        p[2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + i + 16), p[2]);
        p[3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + i + 24), p[3]);
    }
    bk_fp8_finish_block(p[0], p[1], p[2], p[3], s * 256.f, acc);
}
#else
BK_INLINE void bk_fp8_dot(const float *w, float s256, const float *x, float *acc) {
    float p[4][8] = {{0}};
    for (int i = 0; i < BK_FP8_BLOCK; i++) p[(i / 8) % 4][i % 8] = fmaf(w[i], x[i], p[(i / 8) % 4][i % 8]);
    for (int l = 0; l < 8; l++) acc[l] = fmaf((p[0][l] + p[1][l]) + (p[2][l] + p[3][l]), s256, acc[l]);
}
#endif

#endif /* BLOCKS_FP8_H */
