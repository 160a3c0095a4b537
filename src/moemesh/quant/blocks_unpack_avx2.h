/* AVX2 unpacking into the dot's layout (blocks_dot.h): per group of 32, int16 codes in the type's layout
   (value order with AVX-512 BW/VL for the types of bk_natural, else [even 16 | odd 16] positions: the
   activations' order, blocks_kernel.h), the codes of blocks_unpack.h (the scalar build's;
   tests compare the builds bit for bit). ``bk_unpack`` fills a chunk's buffer (prefill: decoded once, used
   for many activation rows); ``bk_dot_direct`` unpacks in registers straight into the dot (one row: no
   store and reload of the decoded weights). The scalar build has bk_unpack only (the portable codes). */
#ifndef BLOCKS_UNPACK_AVX2_H
#define BLOCKS_UNPACK_AVX2_H
#include "blocks_dot.h"
#include "blocks_unpack.h"

#if BK_AVX2
/* 32 int8 codes in value order -> int16 even and odd positions (sign-extended) */
BK_INLINE void bk_widen(__m256i v, __m256i *e, __m256i *o) {
    *e = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
    *o = _mm256_srai_epi16(v, 8);
}

/* the same for codes 0..127 */
BK_INLINE void bk_widen_u(__m256i v, __m256i *e, __m256i *o) {
    *e = _mm256_and_si256(v, _mm256_set1_epi16(0x00FF));
    *o = _mm256_srli_epi16(v, 8);
}

/* 16 bytes whose low nibbles are values 0..15 and high nibbles 16..31 -> the 32 nibbles in value order */
BK_INLINE __m256i bk_nibbles16(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

BK_INLINE __m256i bk_lut16(const int8_t *lut, __m256i idx) {
    const __m128i l = _mm_loadu_si128((const __m128i *)lut);
    return _mm256_shuffle_epi8(_mm256_set_m128i(l, l), idx);
}

#if BK_PERMW
/* A 16-entry int8 table (blocks_unpack.h's) as 16 int16 lanes, vpermw's table. */
BK_INLINE __m256i bk_lut16_i16(const int8_t *lut) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)lut)); }

/* 16 bytes of nibbles (low: values 0..15, high: 16..31) -> int16 [values 0..15], [16..31] via a 16-entry
   int16 table (lut as 16 int16 lanes). */
BK_INLINE void bk_nibbles_lut16(const uint8_t *p, __m256i lut, __m256i *e, __m256i *o) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    *e = _mm256_permutexvar_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x000F)), lut);
    *o = _mm256_permutexvar_epi16(_mm256_srli_epi16(v, 4), lut);
}

/* Group g of a natural-layout type (bk_natural): values 0..15 (*e) and 16..31 (*o) as int16. */
BK_INLINE void bk_group_natural(const int type, const uint8_t *cb, int g, __m256i *e, __m256i *o) {
    switch (type) {
    case BK_MXFP4:
        bk_nibbles_lut16(cb + g * 17 + 1, bk_lut16_i16(BK_MXFP4_LUT), e, o);
        break;
    case BK_IQ4_XS:
        bk_nibbles_lut16(cb + 8 + 16 * g, bk_lut16_i16(BK_IQ4_LUT), e, o);
        break;
    case BK_Q8_0:
        *e = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(cb + g * 34 + 2)));
        *o = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(cb + g * 34 + 18)));
        break;
    default: { /* BK_Q4_0 (codes nibble - 8), BK_Q4_1 (nibble) */
        const int off = type == BK_Q4_0 ? 8 : 0;
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(cb + g * BK_TRAITS[type].size + 2 + 2 * (type == BK_Q4_1))));
        *e = _mm256_sub_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x000F)), _mm256_set1_epi16((short)off));
        *o = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), _mm256_set1_epi16((short)off));
    }
    }
}
#endif

/* Group g (0..7) of the chunk starting at cb: its codes as int16, the first (*e) and second (*o) 16
   positions of the type's layout (bk_natural: value order; otherwise even and odd positions). */
BK_INLINE void bk_group_eo(const int type, const uint8_t *cb, int g, __m256i *e, __m256i *o) {
    const __m256i m4 = _mm256_set1_epi16(0x000F);
#if BK_PERMW
    if (bk_natural(type)) {
        bk_group_natural(type, cb, g, e, o);
        return;
    }
#endif
    switch (type) {
    case BK_MXFP4:
        bk_widen(bk_lut16(BK_MXFP4_LUT, bk_nibbles16(cb + g * 17 + 1)), e, o);
        break;
    case BK_Q8_0:
        bk_widen(_mm256_loadu_si256((const __m256i *)(cb + g * 34 + 2)), e, o);
        break;
    case BK_Q4_0:
        bk_widen(_mm256_sub_epi8(bk_nibbles16(cb + g * 18 + 2), _mm256_set1_epi8(8)), e, o);
        break;
    case BK_Q4_1:
        bk_widen_u(bk_nibbles16(cb + g * 20 + 4), e, o);
        break;
    case BK_Q2_K: {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(cb + 16 + (g / 4) * 32));
        bk_widen_u(_mm256_and_si256(_mm256_srli_epi16(v, 2 * (g % 4)), _mm256_set1_epi8(3)), e, o);
        break;
    }
    case BK_Q3_K: {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(cb + 32 + (g / 4) * 32));
        const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(v, 2 * (g % 4)), _mm256_set1_epi8(3));
        const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)cb), g), _mm256_set1_epi8(1));
        bk_widen(_mm256_sub_epi8(_mm256_add_epi8(lo, _mm256_slli_epi16(hb, 2)), _mm256_set1_epi8(4)), e, o);
        break;
    }
    case BK_Q4_K:
    case BK_Q5_K: {  /* 32 bytes as int16 lanes: low nibbles = group 2p, high nibbles = group 2p + 1 */
        const __m256i v = _mm256_loadu_si256((const __m256i *)(cb + (type == BK_Q4_K ? 16 : 48) + 32 * (g / 2)));
        if (g & 1) {
            *e = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), *o = _mm256_srli_epi16(v, 12);
        } else {
            *e = _mm256_and_si256(v, m4), *o = _mm256_and_si256(_mm256_srli_epi16(v, 8), m4);
        }
        if (type == BK_Q5_K) {  /* bit g of qh[l]: value l's 5th bit */
            const __m256i h = _mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(cb + 16)), g), b1 = _mm256_set1_epi16(1);
            *e = _mm256_or_si256(*e, _mm256_slli_epi16(_mm256_and_si256(h, b1), 4));
            *o = _mm256_or_si256(*o, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 8), b1), 4));
        }
        break;
    }
    case BK_Q6_K: {  /* group g: ql bytes h*64 + (r%2)*32, nibble r/2; qh bits 2r; h = g/4, r = g%4 */
        const int h = g / 4, r = g % 4;
        const __m256i ql = _mm256_loadu_si256((const __m256i *)(cb + h * 64 + (r % 2) * 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(cb + 128 + h * 32));
        const __m256i lo = _mm256_and_si256(r / 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0x0F));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * r), _mm256_set1_epi8(3));
        bk_widen(_mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32)), e, o);
        break;
    }
    default: /* BK_IQ4_XS */
        bk_widen(bk_lut16(BK_IQ4_LUT, bk_nibbles16(cb + 8 + 16 * g)), e, o);
    }
}

/* One chunk of one row straight into the dot (no buffer). */
BK_INLINE void bk_dot_direct(const int type, const uint8_t *row, int64_t k, int64_t c, const int16_t *X, const float *du,
                             const float *sx32, const float *sx16, float *acc) {
    const int ng = bk_chunk_groups(type, k, c);
    const uint8_t *cb = bk_chunk_ptr(type, row, c);
    bk_scales sc;
    bk_chunk_scales(type, cb, ng, &sc);
    __m256i d[8];
    for (int g = 0; g < 8; g++) {
        if (g < ng) {
            __m256i e, o;
            bk_group_eo(type, cb, g, &e, &o);
            d[g] = bk_madd_eo(e, o, X + 32 * g);
        } else {
            d[g] = _mm256_setzero_si256();
        }
    }
    bk_dot_d(d, &sc, du, sx32, sx16, BK_TRAITS[type], acc);
}
#endif

/* Chunk c of a weight row into the dot's buffer layout and its scales. */
BK_INLINE void bk_unpack(const int type, const uint8_t *row, int64_t k, int64_t c, bk_wq *w, bk_scales *sc) {
#if BK_AVX2
    const int ng = bk_chunk_groups(type, k, c);
    const uint8_t *cb = bk_chunk_ptr(type, row, c);
    bk_chunk_scales(type, cb, ng, sc);
    for (int g = 0; g < ng; g++) {
        __m256i e, o;
        bk_group_eo(type, cb, g, &e, &o);
        _mm256_storeu_si256((__m256i *)(w + 32 * g), e);
        _mm256_storeu_si256((__m256i *)(w + 32 * g + 16), o);
    }
#else
    bk_unpack_chunk(type, row, k, c, w, sc);
#endif
}

#endif /* BLOCKS_UNPACK_AVX2_H */
