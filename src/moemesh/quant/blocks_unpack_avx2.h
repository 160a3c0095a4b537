/* Unpacking into the dot's weight layout (blocks_dot.h bk_wq): the scalar build uses the portable
   codes as they are; the AVX2 build widens them to int16, each group of 32 as even then odd positions
   (the activations' order, blocks_kernel.h). The hot types unpack with AVX2 directly; every path gives
   the codes and scales of blocks_unpack.h (tests compare the builds bit for bit). */
#ifndef BLOCKS_UNPACK_AVX2_H
#define BLOCKS_UNPACK_AVX2_H
#include "blocks_dot.h"
#include "blocks_unpack.h"

#if BK_AVX2
/* 32 int8 codes in value order -> int16 [even 16 | odd 16] */
static inline void bk_widen32(__m256i v, int16_t *out) {
    _mm256_storeu_si256((__m256i *)out, _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8));
    _mm256_storeu_si256((__m256i *)(out + 16), _mm256_srai_epi16(v, 8));
}

/* 32 unsigned codes held as int16 lanes even/odd already (values < 128) */
static inline void bk_store_eo(__m256i even, __m256i odd, int16_t *out) {
    _mm256_storeu_si256((__m256i *)out, even);
    _mm256_storeu_si256((__m256i *)(out + 16), odd);
}

/* 16 bytes whose low nibbles are values 0..15 and high nibbles 16..31 -> the 32 nibbles in value order */
static inline __m256i bk_nibbles16(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

static inline void bk_unpack_q4k_avx2(int type, const uint8_t *b, int16_t *w, bk_scales *sc) {
    const float d = bk_f16(bk_rd16(b)), dmin = bk_f16(bk_rd16(b + 2));
    for (int j = 0; j < 8; j++) {
        uint8_t s, m;
        bk_k4_scale_min(b + 4, j, &s, &m);
        sc->a[j] = d * (float)s, sc->b[j] = -(dmin * (float)m);
    }
    const uint8_t *qs = b + (type == BK_Q4_K ? 16 : 48);
    const __m256i m4 = _mm256_set1_epi16(0x000F);
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
    for (int p = 0; p < 4; p++) {  /* 32 bytes: low nibbles = group 2p, high = group 2p + 1 */
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
        __m256i e0 = _mm256_and_si256(v, m4), o0 = _mm256_and_si256(_mm256_srli_epi16(v, 8), m4);
        __m256i e1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), o1 = _mm256_srli_epi16(v, 12);
        if (type == BK_Q5_K) {  /* bit g of qh[l] is value l's 5th bit in group g */
            const int g0 = 2 * p, g1 = 2 * p + 1;
            const __m256i h0 = _mm256_srli_epi16(qh, g0), h1 = _mm256_srli_epi16(qh, g1);
            const __m256i b1 = _mm256_set1_epi16(1);
            e0 = _mm256_or_si256(e0, _mm256_slli_epi16(_mm256_and_si256(h0, b1), 4));
            o0 = _mm256_or_si256(o0, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h0, 8), b1), 4));
            e1 = _mm256_or_si256(e1, _mm256_slli_epi16(_mm256_and_si256(h1, b1), 4));
            o1 = _mm256_or_si256(o1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h1, 8), b1), 4));
        }
        bk_store_eo(e0, o0, w + 64 * p);
        bk_store_eo(e1, o1, w + 64 * p + 32);
    }
}

static inline void bk_unpack_q6k_avx2(const uint8_t *b, int16_t *w, bk_scales *sc) {
    const float d = bk_f16(bk_rd16(b + 208));
    for (int j = 0; j < 16; j++) sc->a[j] = d * (float)(int8_t)b[192 + j];
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(0x03), k32 = _mm256_set1_epi8(32);
    for (int g = 0; g < 8; g++) {
        const int h = g / 4, r = g % 4;  /* group g: ql bytes h*64 + (r%2)*32, nibble r/2; qh bits 2r */
        const __m256i ql = _mm256_loadu_si256((const __m256i *)(b + h * 64 + (r % 2) * 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + h * 32));
        const __m256i lo = _mm256_and_si256(r / 2 ? _mm256_srli_epi16(ql, 4) : ql, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * r), m3);
        bk_widen32(_mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), k32), w + 32 * g);
    }
}

static inline void bk_unpack32_avx2(int type, const uint8_t *blk, int16_t *w, bk_scales *sc, int g) {
    switch (type) {
    case BK_MXFP4: {
        const __m128i lut = _mm_loadu_si128((const __m128i *)BK_MXFP4_LUT);
        sc->a[g] = bk_e8m0_half(blk[0]);
        bk_widen32(_mm256_shuffle_epi8(_mm256_set_m128i(lut, lut), bk_nibbles16(blk + 1)), w);
        break;
    }
    case BK_Q8_0:
        sc->a[g] = bk_f16(bk_rd16(blk));
        bk_widen32(_mm256_loadu_si256((const __m256i *)(blk + 2)), w);
        break;
    case BK_Q4_0:
        sc->a[g] = bk_f16(bk_rd16(blk));
        bk_widen32(_mm256_sub_epi8(bk_nibbles16(blk + 2), _mm256_set1_epi8(8)), w);
        break;
    default: /* BK_Q4_1 */
        sc->a[g] = bk_f16(bk_rd16(blk)), sc->b[g] = bk_f16(bk_rd16(blk + 2));
        bk_widen32(bk_nibbles16(blk + 4), w);
    }
}

static inline void bk_unpack_iq4xs_avx2(const uint8_t *b, int16_t *w, bk_scales *sc) {
    const float d = bk_f16(bk_rd16(b));
    const __m128i lut = _mm_loadu_si128((const __m128i *)BK_IQ4_LUT);
    for (int j = 0; j < 8; j++) {
        sc->a[j] = d * (float)bk_iq4xs_scale(b, j);
        bk_widen32(_mm256_shuffle_epi8(_mm256_set_m128i(lut, lut), bk_nibbles16(b + 8 + 16 * j)), w + 32 * j);
    }
}
#endif

/* Chunk c of a weight row into the dot's layout and its scales (zeros past the row's end). */
static inline void bk_unpack(int type, const uint8_t *row, int64_t k, int64_t c, bk_wq *w, bk_scales *sc) {
#if BK_AVX2
    const bk_traits t = BK_TRAITS[type];
    memset(sc, 0, sizeof(*sc));
    if (t.block == 32) {
        const int64_t g0 = c * 8, G = k / BK_GS;
        sc->ng = (int)(G - g0 < 8 ? G - g0 : 8);
        for (int g = 0; g < sc->ng; g++) bk_unpack32_avx2(type, row + (g0 + g) * t.size, w + 32 * g, sc, g);
        return;
    }
    sc->ng = 8;
    const uint8_t *b = row + c * t.size;
    if (type == BK_Q4_K || type == BK_Q5_K) {
        bk_unpack_q4k_avx2(type, b, w, sc);
    } else if (type == BK_Q6_K) {
        bk_unpack_q6k_avx2(b, w, sc);
    } else if (type == BK_IQ4_XS) {
        bk_unpack_iq4xs_avx2(b, w, sc);
    } else { /* Q2_K, Q3_K: portable codes, widened */
        int8_t q[256];
        bk_unpack256(type, b, q, sc);
        for (int g = 0; g < 8; g++) bk_widen32(_mm256_loadu_si256((const __m256i *)(q + 32 * g)), w + 32 * g);
    }
#else
    bk_unpack_chunk(type, row, k, c, w, sc);
#endif
}

#endif /* BLOCKS_UNPACK_AVX2_H */
