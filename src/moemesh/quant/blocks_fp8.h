/* FP8_E4M3_B128 (quant/fp8.py): per row, blocks of [fp32 scale | 128 e4m3 bytes]. An fp32 path:
   e4m3 -> fp32 exactly, as value * 2^-8 (the byte's 7 magnitude bits placed in an fp16's exponent and
   mantissa: an exact fp16, subnormals included; e4m3fn's NaN codes 0x7F/0xFF are not treated specially:
   valid checkpoints hold none). Per block, 8 fp32 lanes (lane = k % 8, in k order):
   p = fma(w, x, p), then acc = fma(p, scale * 256, acc); y = reduce8(acc). The AVX2 and the scalar
   build do these same operations (bit-identical results); x is zero-padded to whole blocks. */
#ifndef BLOCKS_FP8_H
#define BLOCKS_FP8_H
#include "blocks_kernel.h"

#define BK_FP8_BLOCK 128

static inline float bk_e4m3_scaled(uint8_t b) {  /* e4m3 value * 2^-8, exact */
    return bk_f16((uint16_t)(((b & 0x7F) << 7) | ((b & 0x80) << 8)));
}

/* Block c of a row -> 128 floats (value * 2^-8) and the block's scale * 256. */
static inline float bk_fp8_unpack(const uint8_t *row, int64_t c, float *w) {
    const uint8_t *b = row + c * (4 + BK_FP8_BLOCK);
    float s;
    memcpy(&s, b, 4);
#if BK_AVX2
    const __m256i m7 = _mm256_set1_epi16(0x7F), m8 = _mm256_set1_epi16(0x80);
    for (int i = 0; i < BK_FP8_BLOCK; i += 16) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 4 + i)));
        const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, m7), 7),
                                          _mm256_slli_epi16(_mm256_and_si256(v, m8), 8));
        _mm256_storeu_ps(w + i, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
        _mm256_storeu_ps(w + i + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
    }
#else
    for (int i = 0; i < BK_FP8_BLOCK; i++) w[i] = bk_e4m3_scaled(b[4 + i]);
#endif
    return s * 256.f;
}

/* acc[8] += the block's contribution: x (128 floats) against w. */
static inline void bk_fp8_dot(const float *w, float s256, const float *x, float *acc) {
#if BK_AVX2
    __m256 p = _mm256_setzero_ps();
    for (int i = 0; i < BK_FP8_BLOCK; i += 8) p = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), p);
    _mm256_storeu_ps(acc, _mm256_fmadd_ps(p, _mm256_set1_ps(s256), _mm256_loadu_ps(acc)));
#else
    float p[8] = {0};
    for (int i = 0; i < BK_FP8_BLOCK; i++) p[i % 8] = fmaf(w[i], x[i], p[i % 8]);
    for (int l = 0; l < 8; l++) acc[l] = fmaf(p[l], s256, acc[l]);
#endif
}

#endif /* BLOCKS_FP8_H */
