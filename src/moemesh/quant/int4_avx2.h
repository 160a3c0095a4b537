/* The AVX2 (+FMA) path of int4_kernel.h's contract: vpmaddubsw (u8 nibble x s8 activation, adjacent
   pairs summed to s16) accumulates a group's 32 k in s16 lanes (at most 8 pair sums of |.| <= 2 * 15 *
   128 = 3840 per lane: 30720 < 2^15, so never saturated), then vpmaddwd folds the pairs and the two
   planes into the exact s32 dot, D = 256 * A1 + A2 - 8 SX; the fp32 steps are the AVX-512 path's, so the
   bits are too. Weights: both of torch's packings (int4_kernel.h), each in its own tile:
   - 64-row blocks ([K, 32] bytes, byte c = rows c | c + 32): 4 k-rows of 32 bytes are transposed in
     128-bit lanes (vpunpck{l,h}bw, then vpunpck{l,h}wd) so each dword is 4 consecutive k of one column;
     two passes over the block, columns {0-7, 16-23} then {8-15, 24-31}, keep 8 accumulators in the 16
     ymm registers.
   - 32-row blocks ([K, 16] bytes, byte c = rows c | c + 16; torch's AVX2 packing): a 32-byte load is
     k-rows k, k + 1; vpunpck{l,h}bw of two loads pairs k0 with k2 and k1 with k3 in each column, the
     activation bytes are shuffled to match, and the two 128-bit halves (k0 + k2, k1 + k3) are added in
     s32 after the group.
   Included by int4_kernel.h for I4_ISA >= 1 (the AVX-512 build uses it for 32-row blocks).
   Measured on this project's AVX2 machine (AMD EPYC, KVM "EPYC" model: 256-bit ops run as two 128-bit
   uops, ymm vpmaddubsw 0.5 per cycle at ~2.45 GHz): the two planes' 8 multiplies per 128 weights bound a
   step at 16 cycles, the bare instruction mix runs 19.6, the tiles 23-27 in L2 (both packings within a
   few %); 5.3-5.7 GB of expert weights per CPU-second, torch's int4 kernel 2.0-2.4, a plain read 12-16
   (bench/int4_kernel.py --bandwidth --quick under a load average of 17: per CPU-second, as wall-clock
   rates meant little). So here decode is compute-bound: about half the read floor with 2 threads. The
   one-plane build (I4_X8: a2 never accumulates, its maddubs are gone) halves the multiplies: 1.2-1.4x
   per matmul on that machine (bench/int4_act.py). */
#ifndef INT4_AVX2_H
#define INT4_AVX2_H

/* x [M, K] (fp32 or bf16) -> the planes and group stats of int4_kernel.h, the values of quant_x_scalar. */
static inline void quant_x_avx2(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *x1, int8_t *x2, float *du,
                                float *sumx, int32_t *sx) {
    const int64_t G = k / GS;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  /* undoes the packs' lane interleave */
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t o = r * k + g * GS;
            __m256 v[4];
            for (int h = 0; h < 4; h++) {
                if (x_bf16) {
                    __m128i b = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + o + 8 * h));
                    v[h] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
                } else {
                    v[h] = _mm256_loadu_ps((const float *)x + o + 8 * h);
                }
            }
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                                      _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
            const float amax = _mm_cvtss_f32(m4);
            const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m256i q1[4], q2[4], acc = _mm256_setzero_si256();
            for (int h = 0; h < 4; h++) {
                __m256 t = _mm256_mul_ps(v[h], inv);                                    /* |t| <= 127 */
                q1[h] = _mm256_cvtps_epi32(t);                                          /* round to nearest even */
                __m256 rest = _mm256_sub_ps(t, _mm256_cvtepi32_ps(q1[h]));              /* exact */
                q2[h] = _mm256_cvtps_epi32(_mm256_mul_ps(rest, _mm256_set1_ps(256.f)));
                q2[h] = I4_X8 ? _mm256_setzero_si256() : _mm256_min_epi32(q2[h], _mm256_set1_epi32(127));
                acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_slli_epi32(q1[h], 8), q2[h]));
            }
            __m256i p1 = _mm256_packs_epi16(_mm256_packs_epi32(q1[0], q1[1]), _mm256_packs_epi32(q1[2], q1[3]));
            __m256i p2 = _mm256_packs_epi16(_mm256_packs_epi32(q2[0], q2[1]), _mm256_packs_epi32(q2[2], q2[3]));
            _mm256_storeu_si256((__m256i *)(x1 + o), _mm256_permutevar8x32_epi32(p1, order));
            _mm256_storeu_si256((__m256i *)(x2 + o), _mm256_permutevar8x32_epi32(p2, order));
            /* the fp32 sum in sum32's order: a = v[0:16] + v[16:32] is (v0 + v2 | v1 + v3) */
            __m256 t3 = _mm256_add_ps(_mm256_add_ps(v[1], v[3]), _mm256_add_ps(v[0], v[2]));
            __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
            __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
            sumx[r * G + g] = _mm_cvtss_f32(_mm_add_ss(t8, _mm_shuffle_ps(t8, t8, 1)));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
            du[r * G + g] = amax / 127.f / 256.f;
            sx[r * G + g] = _mm_cvtsi128_si32(s4);
        }
}

/* acc = fma(D, s * du, acc) (+ fma(z, sum x, acc) unless SYM) for 8 output rows whose scales are the
   8 bf16 (SYM) or (scale, zero) pairs already loaded into v (8 x 16 or 8 x 32 bits). */
static inline __attribute__((always_inline)) __m256 group_fma(__m256i d, __m256i v, __m256 dum, __m256 sm, __m256 acc,
                                                              const int SYM) {
    if (SYM) {
        __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, dum), acc);
    }
    __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    __m256 z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, dum), acc);
    return _mm256_fmadd_ps(z, sm, acc);
}

/* Scales of rows c .. c + 3 and c + 16 .. c + 19 of a group (sg: the group's first row), as group_fma's v. */
static inline __attribute__((always_inline)) __m256i scales_4_4(const uint16_t *sg, int c, const int SYM) {
    if (SYM)
        return _mm256_castsi128_si256(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(sg + c)),
                                                         _mm_loadl_epi64((const __m128i *)(sg + c + 16))));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(sg + 2 * c))),
                                   _mm_loadu_si128((const __m128i *)(sg + 2 * (c + 16))), 1);
}

/* The four nibble planes of two packed byte vectors (p, q: low then high nibbles) times the two
   activation rows' broadcast bytes, added into each row's four int16 accumulators. */
static inline __attribute__((always_inline)) void nibble_madds(__m256i a1[4], __m256i a2[4], __m256i p, __m256i q, __m256i lo4, __m256i b1, __m256i b2) {
    const __m256i w[4] = {_mm256_and_si256(p, lo4), _mm256_and_si256(q, lo4),
                          _mm256_and_si256(_mm256_srli_epi16(p, 4), lo4), _mm256_and_si256(_mm256_srli_epi16(q, 4), lo4)};
    for (int r = 0; r < 4; r++) {
        a1[r] = _mm256_add_epi16(a1[r], _mm256_maddubs_epi16(w[r], b1));
        if (!I4_X8) a2[r] = _mm256_add_epi16(a2[r], _mm256_maddubs_epi16(w[r], b2));  /* (one plane: a2 stays 0) */
    }
}

/* Half of a 64-row block (halves of 64) for one row of x: PASS 0 = columns {0-7, 16-23}, 1 = {8-15, 24-31},
   each with its high nibbles (+32); acc r holds rows base(r) + {0..3, 16..19}, base = 8 PASS + 4 (r & 1) +
   32 (r >> 1). Two passes of 8 accumulators instead of one of 16: the 16 ymm registers hold it. */
static inline __attribute__((always_inline)) void half64_avx2(const uint8_t *wb, const uint16_t *szb, int64_t gstride,
                                                              int64_t row0, int64_t G, const int8_t *x1,
                                                              const int8_t *x2, const float *du, const float *sumx,
                                                              const int32_t *sx, float *y, const int PASS,
                                                              const int SYM) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F), k256 = _mm256_set1_epi16(256), k1 = _mm256_set1_epi16(1);
    const int64_t sw = SYM ? 1 : 2;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *wg = wb + g * GS * 32;
        __m256i a1[4], a2[4];
        for (int r = 0; r < 4; r++) a1[r] = a2[r] = _mm256_setzero_si256();
#pragma GCC unroll 2  /* fully unrolled, gcc sums the 64 products as a tree and spills them all */
        for (int st = 0; st < GS / 4; st++) {  /* 4 k per step */
            const __m256i r0 = _mm256_loadu_si256((const __m256i *)(wg + st * 128));
            const __m256i r1 = _mm256_loadu_si256((const __m256i *)(wg + st * 128 + 32));
            const __m256i r2 = _mm256_loadu_si256((const __m256i *)(wg + st * 128 + 64));
            const __m256i r3 = _mm256_loadu_si256((const __m256i *)(wg + st * 128 + 96));
            const __m256i ta = PASS ? _mm256_unpackhi_epi8(r0, r1) : _mm256_unpacklo_epi8(r0, r1);
            const __m256i tb = PASS ? _mm256_unpackhi_epi8(r2, r3) : _mm256_unpacklo_epi8(r2, r3);
            const __m256i u0 = _mm256_unpacklo_epi16(ta, tb), u1 = _mm256_unpackhi_epi16(ta, tb);  /* dword: k0..k3 */
            int32_t v1, v2;
            memcpy(&v1, x1 + g * GS + st * 4, 4);
            memcpy(&v2, x2 + g * GS + st * 4, 4);
            const __m256i b1 = _mm256_set1_epi32(v1), b2 = _mm256_set1_epi32(v2);
            nibble_madds(a1, a2, u0, u1, lo4, b1, b2);
        }
        const __m256 dum = _mm256_set1_ps(du[g]), sm = _mm256_set1_ps(sumx[g]);
        const __m256i off = _mm256_set1_epi32(-8 * sx[g]);
        const uint16_t *sg = szb + g * gstride * sw;
        for (int r = 0; r < 4; r++) {
            __m256i d = _mm256_add_epi32(_mm256_madd_epi16(a1[r], k256), _mm256_madd_epi16(a2[r], k1));
            d = _mm256_add_epi32(d, off);
            acc[r] = group_fma(d, scales_4_4(sg, 8 * PASS + 4 * (r & 1) + 32 * (r >> 1), SYM), dum, sm, acc[r], SYM);
        }
    }
    for (int r = 0; r < 4; r++) {
        float *yr = y + row0 + 8 * PASS + 4 * (r & 1) + 32 * (r >> 1);
        _mm_storeu_ps(yr, _mm256_castps256_ps128(acc[r]));
        _mm_storeu_ps(yr + 16, _mm256_extractf128_ps(acc[r], 1));
    }
}

/* One full 32-row block (halves of 32: torch's AVX2 packing) for one row of x: rows row0 .. row0 + 31. */
static inline __attribute__((always_inline)) void tile32_avx2(const uint8_t *wb, const uint16_t *szb, int64_t gstride,
                                                              int64_t row0, int64_t G, const int8_t *x1,
                                                              const int8_t *x2, const float *du, const float *sumx,
                                                              const int32_t *sx, float *y, const int SYM) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F), k1_256 = _mm256_set1_epi32(0x01000001);  /* s16 pairs (1, 256) */
    /* activation bytes of k0..k3 -> (x0, x2) pairs in the low 128 bits, (x1, x3) in the high */
    const __m256i spread = _mm256_setr_epi8(0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2,
                                            1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3);
    const int64_t sw = SYM ? 1 : 2;
    /* acc r: rows 8r .. 8r + 7 (r 0, 1: low nibbles of columns 0-7, 8-15; r 2, 3: high nibbles) */
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *wg = wb + g * GS * 16;
        __m256i a1[4], a2[4];
        for (int r = 0; r < 4; r++) a1[r] = a2[r] = _mm256_setzero_si256();
#pragma GCC unroll 2  /* fully unrolled, gcc sums the 64 products as a tree and spills them all */
        for (int st = 0; st < GS / 4; st++) {  /* 4 k per step */
            const __m256i r01 = _mm256_loadu_si256((const __m256i *)(wg + st * 64));       /* k0 | k1 */
            const __m256i r23 = _mm256_loadu_si256((const __m256i *)(wg + st * 64 + 32));  /* k2 | k3 */
            const __m256i ta = _mm256_unpacklo_epi8(r01, r23), tb = _mm256_unpackhi_epi8(r01, r23);
            int32_t v1, v2;
            memcpy(&v1, x1 + g * GS + st * 4, 4);
            memcpy(&v2, x2 + g * GS + st * 4, 4);
            const __m256i b1 = _mm256_shuffle_epi8(_mm256_set1_epi32(v1), spread);
            const __m256i b2 = _mm256_shuffle_epi8(_mm256_set1_epi32(v2), spread);
            nibble_madds(a1, a2, ta, tb, lo4, b1, b2);
        }
        const __m256 dum = _mm256_set1_ps(du[g]), sm = _mm256_set1_ps(sumx[g]);
        const __m256i off = _mm256_set1_epi32(-8 * sx[g]);
        const uint16_t *sg = szb + g * gstride * sw;
        for (int r = 0; r < 4; r++) {
            /* s16 lane c of each half: column c's (k0, k2) resp. (k1, k3) partial sums over the group */
            __m256i lo = _mm256_madd_epi16(_mm256_unpacklo_epi16(a2[r], a1[r]), k1_256);  /* cols 0-3 | 0-3 */
            __m256i hi = _mm256_madd_epi16(_mm256_unpackhi_epi16(a2[r], a1[r]), k1_256);  /* cols 4-7 | 4-7 */
            /* [lo.0 + lo.1 | hi.0 + hi.1]: two blends and one lane swap (vperm2i128 is 8 uops on Zen 1) */
            __m256i d = _mm256_add_epi32(_mm256_blend_epi32(lo, hi, 0xF0),
                                         _mm256_permute4x64_epi64(_mm256_blend_epi32(hi, lo, 0xF0), 0x4E));
            d = _mm256_add_epi32(d, off);
            __m256i v = SYM ? _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(sg + 8 * r)))
                            : _mm256_loadu_si256((const __m256i *)(sg + 16 * r));
            acc[r] = group_fma(d, v, dum, sm, acc[r], SYM);
        }
    }
    for (int r = 0; r < 4; r++) _mm256_storeu_ps(y + row0 + 8 * r, acc[r]);
}

/* silu(g) * u over 8 lanes: silu_mul1's operations. 2^n is built from its exponent bits with n >= -126
   (a normal float: p * 2^n then rounds once, as scalef and ldexpf do); where n = -127, exp(-g) < 2^-100
   and 1 + exp(-g) == 1 either way. */
static inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 x = _mm256_max_ps(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.37626f)),
                                   _mm256_set1_ps(-88.37626f));  /* -g, clamped */
    __m256 n;
    const __m256 p = exp_poly8(x, &n);
    const __m256i ni = _mm256_max_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(-126));
    const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
    const __m256 e = _mm256_mul_ps(p, two_n);  /* exp(-g) */
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

/* gpt-oss's clamped SwiGLU over 8 lanes: clamp_swiglu1's operations (2^n as silu_mul8's). */
static inline __m256 clamp_swiglu8(__m256 g, __m256 u, float alpha, float limit) {
    const __m256 l = _mm256_set1_ps(limit), one = _mm256_set1_ps(1.f);
    g = _mm256_min_ps(g, l);
    u = _mm256_min_ps(_mm256_max_ps(u, _mm256_set1_ps(-limit)), l);
    const __m256 x = _mm256_max_ps(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(g, _mm256_set1_ps(alpha))),
                                                 _mm256_set1_ps(88.37626f)), _mm256_set1_ps(-88.37626f));
    __m256 n;
    const __m256 p = exp_poly8(x, &n);
    const __m256i ni = _mm256_max_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(-126));
    const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
    const __m256 e = _mm256_mul_ps(p, two_n);
    return _mm256_mul_ps(_mm256_add_ps(u, one), _mm256_mul_ps(g, _mm256_div_ps(one, _mm256_add_ps(one, e))));
}

#endif /* INT4_AVX2_H */
