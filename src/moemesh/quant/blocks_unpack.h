/* Portable unpacking of one chunk (256 weights; fewer at the end of a row of a 32-block type) of one
   weight row into int8 codes q[i] (value order) and the chunk's scales (bk_scales): W = a q + b.
   Layouts follow gguf.quants' dequantize_blocks (and llama.cpp's ggml-quants.c) type by type.
   The AVX2 build unpacks with blocks_unpack_avx2.h; both give the same codes and scales. */
#ifndef BLOCKS_UNPACK_H
#define BLOCKS_UNPACK_H
#include "blocks_kernel.h"

static const int8_t BK_MXFP4_LUT[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};  /* doubled e2m1 */
static const int8_t BK_IQ4_LUT[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static inline float bk_e8m0_half(uint8_t e) {  /* 2^(e - 128): ggml_e8m0_to_fp32_half */
    const uint32_t u = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Q4_K / Q5_K's 6-bit scale and min of sub-block j (get_scale_min_k4). */
static inline void bk_k4_scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = s[j] & 63, *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Q3_K's 6-bit signed scale of 16-group j. */
static inline int bk_q3_scale(const uint8_t *s, int j) {
    const int lo = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
    const int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
    return (lo | (hi << 4)) - 32;
}

static inline int bk_iq4xs_scale(const uint8_t *b, int j) {
    const int lo = (b[4 + j / 2] >> (4 * (j & 1))) & 0xF, hi = (bk_rd16(b + 2) >> (2 * j)) & 3;
    return (lo | (hi << 4)) - 32;
}

/* The scales of one 32-block (MXFP4, Q8_0, Q4_0, Q4_1): a[g] (and b[g] for Q4_1). */
BK_INLINE void bk_scales32(const int type, const uint8_t *blk, bk_scales *sc, int g) {
    if (type == BK_MXFP4) {
        sc->a[g] = bk_e8m0_half(blk[0]);
    } else {
        sc->a[g] = bk_f16(bk_rd16(blk));
        if (type == BK_Q4_1) sc->b[g] = bk_f16(bk_rd16(blk + 2));
    }
}

/* One 32-block's codes in value order. */
BK_INLINE void bk_codes32(const int type, const uint8_t *blk, int8_t *q) {
    switch (type) {
    case BK_MXFP4:
        for (int i = 0; i < 16; i++) q[i] = BK_MXFP4_LUT[blk[1 + i] & 0xF], q[i + 16] = BK_MXFP4_LUT[blk[1 + i] >> 4];
        break;
    case BK_Q8_0:
        for (int i = 0; i < 32; i++) q[i] = (int8_t)blk[2 + i];
        break;
    case BK_Q4_0:
        for (int i = 0; i < 16; i++) q[i] = (int8_t)((blk[2 + i] & 0xF) - 8), q[i + 16] = (int8_t)((blk[2 + i] >> 4) - 8);
        break;
    default: /* BK_Q4_1 */
        for (int i = 0; i < 16; i++) q[i] = (int8_t)(blk[4 + i] & 0xF), q[i + 16] = (int8_t)(blk[4 + i] >> 4);
    }
}

#if BK_AVX2
/* 8 or 16 integer scales (bytes, widened with ``cvt``) times d into dst (and -(dmin * m) for mins): the
   scalar path's products, 8 at a time. */
BK_INLINE void bk_scale8(__m128i bytes8, float d, float *dst) {
    _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8)), _mm256_set1_ps(d)));
}
BK_INLINE void bk_min8(__m128i bytes8, float dmin, float *dst) {
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8)), _mm256_set1_ps(dmin));
    _mm256_storeu_ps(dst, _mm256_xor_ps(v, _mm256_set1_ps(-0.f)));
}
#endif

/* The scales of one 256-weight super-block (K-quants, IQ4_XS): a, b per 16 (G16 types) or per 32. */
BK_INLINE void bk_scales256(const int type, const uint8_t *b, bk_scales *sc) {
#if BK_AVX2
    if (type == BK_Q4_K || type == BK_Q5_K) {  /* the 12 packed bytes -> 8 scales, 8 mins (ggml's utmp shuffle) */
        uint32_t u[4];
        memcpy(u, b + 4, 12);
        u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
        const uint32_t mins_lo = u[1] & 0x3f3f3f3f;
        u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
        u[2] = mins_lo;
        u[0] &= 0x3f3f3f3f;
        const __m128i v = _mm_loadu_si128((const __m128i *)u);
        bk_scale8(v, bk_f16(bk_rd16(b)), sc->a);
        bk_min8(_mm_srli_si128(v, 8), bk_f16(bk_rd16(b + 2)), sc->b);
        return;
    }
    if (type == BK_Q6_K) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(b + 192));
        const __m256 d = _mm256_set1_ps(bk_f16(bk_rd16(b + 208)));
        _mm256_storeu_ps(sc->a, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d));
        _mm256_storeu_ps(sc->a + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), d));
        return;
    }
    if (type == BK_Q3_K) {  /* the 12 packed bytes -> 16 six-bit scales (ggml's utmp shuffle), minus 32 */
        uint32_t a[3], u[4];
        memcpy(a, b + 96, 12);
        const uint32_t k1 = 0x03030303u, k2 = 0x0f0f0f0fu;
        u[0] = (a[0] & k2) | ((a[2] & k1) << 4);
        u[1] = (a[1] & k2) | (((a[2] >> 2) & k1) << 4);
        u[2] = ((a[0] >> 4) & k2) | (((a[2] >> 4) & k1) << 4);
        u[3] = ((a[1] >> 4) & k2) | (((a[2] >> 6) & k1) << 4);
        const __m128i v = _mm_sub_epi8(_mm_loadu_si128((const __m128i *)u), _mm_set1_epi8(32));
        const __m256 d = _mm256_set1_ps(bk_f16(bk_rd16(b + 108)));
        _mm256_storeu_ps(sc->a, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d));
        _mm256_storeu_ps(sc->a + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), d));
        return;
    }
    if (type == BK_Q2_K) {
        const __m128i v = _mm_loadu_si128((const __m128i *)b), m4 = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        const float d = bk_f16(bk_rd16(b + 80)), dmin = bk_f16(bk_rd16(b + 82));
        bk_scale8(lo, d, sc->a), bk_scale8(_mm_srli_si128(lo, 8), d, sc->a + 8);
        bk_min8(hi, dmin, sc->b), bk_min8(_mm_srli_si128(hi, 8), dmin, sc->b + 8);
        return;
    }
#endif
    if (type == BK_Q2_K) {
        const float d = bk_f16(bk_rd16(b + 80)), dmin = bk_f16(bk_rd16(b + 82));
        for (int j = 0; j < 16; j++) sc->a[j] = d * (float)(b[j] & 0xF), sc->b[j] = -(dmin * (float)(b[j] >> 4));
    } else if (type == BK_Q3_K) {
        const float d = bk_f16(bk_rd16(b + 108));
        for (int j = 0; j < 16; j++) sc->a[j] = d * (float)bk_q3_scale(b + 96, j);
    } else if (type == BK_Q4_K || type == BK_Q5_K) {
        const float d = bk_f16(bk_rd16(b)), dmin = bk_f16(bk_rd16(b + 2));
        for (int j = 0; j < 8; j++) {
            uint8_t s, m;
            bk_k4_scale_min(b + 4, j, &s, &m);
            sc->a[j] = d * (float)s, sc->b[j] = -(dmin * (float)m);
        }
    } else if (type == BK_Q6_K) {
        const float d = bk_f16(bk_rd16(b + 208));
        for (int j = 0; j < 16; j++) sc->a[j] = d * (float)(int8_t)b[192 + j];
    } else { /* BK_IQ4_XS */
        const float d = bk_f16(bk_rd16(b));
        for (int j = 0; j < 8; j++) sc->a[j] = d * (float)bk_iq4xs_scale(b, j);
    }
}

/* One 256-weight super-block's codes in value order. */
BK_INLINE void bk_codes256(const int type, const uint8_t *b, int8_t *q) {
    for (int i = 0; i < 256; i++) {
        const int g = i / 32, l = i % 32, h = i / 128, r = i % 128;
        int v;
        switch (type) {
        case BK_Q2_K:
            v = (b[16 + h * 32 + l] >> (2 * (r / 32))) & 3;
            break;
        case BK_Q3_K:
            v = ((b[32 + h * 32 + l] >> (2 * (r / 32))) & 3) - (((b[l] >> g) & 1) ? 0 : 4);
            break;
        case BK_Q4_K:
        case BK_Q5_K:
            v = (b[(type == BK_Q4_K ? 16 : 48) + (g / 2) * 32 + l] >> (4 * (g & 1))) & 0xF;
            if (type == BK_Q5_K) v |= ((b[16 + l] >> g) & 1) << 4;
            break;
        case BK_Q6_K:
            v = (((b[h * 64 + r % 64] >> (4 * (r / 64))) & 0xF) | (((b[128 + h * 32 + l] >> (2 * (r / 32))) & 3) << 4)) - 32;
            break;
        default: /* BK_IQ4_XS */
            v = BK_IQ4_LUT[(b[8 + 16 * g + l % 16] >> (4 * (l / 16))) & 0xF];
        }
        q[i] = (int8_t)v;
    }
}

/* The scales of chunk c (256 weights; 8 groups of 32, fewer at the end of a row of a 32-block type):
   cb = the chunk's first byte; zeros past the row's end. */
BK_INLINE void bk_chunk_scales(const int type, const uint8_t *cb, int ng, bk_scales *sc) {
    const bk_traits t = BK_TRAITS[type];
    sc->ng = ng;
    if (t.block == 256) {
        bk_scales256(type, cb, sc);
        return;
    }
#if BK_AVX2
    if (ng == 8) {  /* built in registers, one vector store: eight scalar stores read back as a vector stall
                       store forwarding (that reload was ~40% of an MXFP4 decode) */
        const int z = t.size;
        if (type == BK_MXFP4) {  /* bk_e8m0_half, 8 lanes */
            const __m256i e = _mm256_setr_epi32(cb[0], cb[z], cb[2 * z], cb[3 * z], cb[4 * z], cb[5 * z], cb[6 * z], cb[7 * z]);
            const __m256i small = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
            const __m256i big = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
            const __m256i u = _mm256_blendv_epi8(big, small, _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e));
            _mm256_storeu_ps(sc->a, _mm256_castsi256_ps(u));
            return;
        }
        const __m128i h = _mm_setr_epi16((short)bk_rd16(cb), (short)bk_rd16(cb + z), (short)bk_rd16(cb + 2 * z),
                                         (short)bk_rd16(cb + 3 * z), (short)bk_rd16(cb + 4 * z), (short)bk_rd16(cb + 5 * z),
                                         (short)bk_rd16(cb + 6 * z), (short)bk_rd16(cb + 7 * z));
        _mm256_storeu_ps(sc->a, _mm256_cvtph_ps(h));  /* F16C: bk_f16's exact conversion */
        if (type == BK_Q4_1) {
            const uint8_t *m = cb + 2;
            const __m128i hm = _mm_setr_epi16((short)bk_rd16(m), (short)bk_rd16(m + z), (short)bk_rd16(m + 2 * z),
                                              (short)bk_rd16(m + 3 * z), (short)bk_rd16(m + 4 * z), (short)bk_rd16(m + 5 * z),
                                              (short)bk_rd16(m + 6 * z), (short)bk_rd16(m + 7 * z));
            _mm256_storeu_ps(sc->b, _mm256_cvtph_ps(hm));
        }
        return;
    }
#endif
    if (ng < 8) memset(sc->a, 0, sizeof(sc->a)), memset(sc->b, 0, sizeof(sc->b));
    for (int g = 0; g < ng; g++) bk_scales32(type, cb + g * t.size, sc, g);
}

/* Groups of 32 in chunk c of a row of K weights. */
static inline int bk_chunk_groups(const int type, int64_t k, int64_t c) {
    if (BK_TRAITS[type].block == 256) return 8;
    const int64_t left = k / BK_GS - c * 8;
    return (int)(left < 8 ? left : 8);
}

/* The chunk's first byte in a row. */
static inline const uint8_t *bk_chunk_ptr(const int type, const uint8_t *row, int64_t c) {
    const bk_traits t = BK_TRAITS[type];
    return row + c * (BK_CHUNK / t.block) * t.size;
}

/* Chunk c of a weight row (raw bytes ``row``, K weights): codes q[0..255] (zeros past the row's end)
   and scales. */
BK_INLINE void bk_unpack_chunk(const int type, const uint8_t *row, int64_t k, int64_t c, int8_t *q, bk_scales *sc) {
    const int ng = bk_chunk_groups(type, k, c);
    const uint8_t *cb = bk_chunk_ptr(type, row, c);
    bk_chunk_scales(type, cb, ng, sc);
    if (BK_TRAITS[type].block == 256) {
        bk_codes256(type, cb, q);
        return;
    }
    for (int g = 0; g < ng; g++) bk_codes32(type, cb + g * BK_TRAITS[type].size, q + 32 * g);
    memset(q + 32 * ng, 0, (size_t)(32 * (8 - ng)));
}

#endif /* BLOCKS_UNPACK_H */
