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

/* One 32-block (MXFP4, Q8_0, Q4_0, Q4_1) into q[0..31], a[g], b[g]. */
static inline void bk_unpack32(int type, const uint8_t *blk, int8_t *q, bk_scales *sc, int g) {
    switch (type) {
    case BK_MXFP4:
        sc->a[g] = bk_e8m0_half(blk[0]);
        for (int i = 0; i < 16; i++) q[i] = BK_MXFP4_LUT[blk[1 + i] & 0xF], q[i + 16] = BK_MXFP4_LUT[blk[1 + i] >> 4];
        break;
    case BK_Q8_0:
        sc->a[g] = bk_f16(bk_rd16(blk));
        for (int i = 0; i < 32; i++) q[i] = (int8_t)blk[2 + i];
        break;
    case BK_Q4_0:
        sc->a[g] = bk_f16(bk_rd16(blk));
        for (int i = 0; i < 16; i++) q[i] = (int8_t)((blk[2 + i] & 0xF) - 8), q[i + 16] = (int8_t)((blk[2 + i] >> 4) - 8);
        break;
    default: /* BK_Q4_1 */
        sc->a[g] = bk_f16(bk_rd16(blk)), sc->b[g] = bk_f16(bk_rd16(blk + 2));
        for (int i = 0; i < 16; i++) q[i] = (int8_t)(blk[4 + i] & 0xF), q[i + 16] = (int8_t)(blk[4 + i] >> 4);
    }
}

/* One 256-weight super-block (K-quants, IQ4_XS) into q[0..255] and its scales. */
static inline void bk_unpack256(int type, const uint8_t *b, int8_t *q, bk_scales *sc) {
    switch (type) {
    case BK_Q2_K: {
        const float d = bk_f16(bk_rd16(b + 80)), dmin = bk_f16(bk_rd16(b + 82));
        for (int j = 0; j < 16; j++) sc->a[j] = d * (float)(b[j] & 0xF), sc->b[j] = -(dmin * (float)(b[j] >> 4));
        for (int i = 0; i < 256; i++) q[i] = (int8_t)((b[16 + (i / 128) * 32 + i % 32] >> (2 * ((i % 128) / 32))) & 3);
        break;
    }
    case BK_Q3_K: {
        const float d = bk_f16(bk_rd16(b + 108));
        for (int j = 0; j < 16; j++) sc->a[j] = d * (float)bk_q3_scale(b + 96, j);
        for (int i = 0; i < 256; i++) {
            const int lo = (b[32 + (i / 128) * 32 + i % 32] >> (2 * ((i % 128) / 32))) & 3;
            const int hb = (b[i % 32] >> (i / 32)) & 1;
            q[i] = (int8_t)(lo - (hb ? 0 : 4));
        }
        break;
    }
    case BK_Q4_K:
    case BK_Q5_K: {
        const float d = bk_f16(bk_rd16(b)), dmin = bk_f16(bk_rd16(b + 2));
        const uint8_t *qs = b + (type == BK_Q4_K ? 16 : 48);
        for (int j = 0; j < 8; j++) {
            uint8_t s, m;
            bk_k4_scale_min(b + 4, j, &s, &m);
            sc->a[j] = d * (float)s, sc->b[j] = -(dmin * (float)m);
        }
        for (int i = 0; i < 256; i++) {
            const int g = i / 32, l = i % 32;
            int v = (qs[(g / 2) * 32 + l] >> (4 * (g & 1))) & 0xF;
            if (type == BK_Q5_K) v |= ((b[16 + l] >> g) & 1) << 4;
            q[i] = (int8_t)v;
        }
        break;
    }
    case BK_Q6_K: {
        const float d = bk_f16(bk_rd16(b + 208));
        for (int j = 0; j < 16; j++) sc->a[j] = d * (float)(int8_t)b[192 + j];
        for (int i = 0; i < 256; i++) {
            const int h = i / 128, r = i % 128;
            const int lo = (b[h * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
            const int hi = (b[128 + h * 32 + r % 32] >> (2 * (r / 32))) & 3;
            q[i] = (int8_t)((lo | (hi << 4)) - 32);
        }
        break;
    }
    default: { /* BK_IQ4_XS */
        const float d = bk_f16(bk_rd16(b));
        for (int j = 0; j < 8; j++) sc->a[j] = d * (float)bk_iq4xs_scale(b, j);
        for (int i = 0; i < 256; i++) {
            const int g = i / 32, l = i % 32;
            q[i] = BK_IQ4_LUT[(b[8 + 16 * g + l % 16] >> (4 * (l / 16))) & 0xF];
        }
    }
    }
}

/* Chunk c of a weight row (raw bytes ``row``, K weights): codes q[0..255] and scales (zeros past the
   row's end). */
static inline void bk_unpack_chunk(int type, const uint8_t *row, int64_t k, int64_t c, int8_t *q, bk_scales *sc) {
    const bk_traits t = BK_TRAITS[type];
    memset(sc, 0, sizeof(*sc));
    if (t.block == 256) {
        sc->ng = 8;
        bk_unpack256(type, row + c * t.size, q, sc);
        return;
    }
    const int64_t g0 = c * 8, G = k / BK_GS;
    sc->ng = (int)(G - g0 < 8 ? G - g0 : 8);
    for (int g = 0; g < sc->ng; g++) bk_unpack32(type, row + (g0 + g) * t.size, q + 32 * g, sc, g);
    memset(q + 32 * sc->ng, 0, (size_t)(32 * (8 - sc->ng)));
}

#endif /* BLOCKS_UNPACK_H */
