/* The AVX-512 VNNI/VBMI path (int4_kernel.h's contract): 64-row blocks of torch's AVX-512 packing,
   vpermt2b to gather 4 k of a row per dword, vpdpbusd for the exact integer dots. Included by
   int4_kernel.h when the library is built for I4_ISA 2 on a CPU with these extensions. */
#ifndef INT4_AVX512_H
#define INT4_AVX512_H

/* x [M, K] (fp32 or bf16) -> int8 x1, x2 [M, K] with x ~ dx * (x1 + x2 / 256) per (row, group of
   32), dx = amax / 127; per group: du = dx / 256, the fp32 sum of x and SX = sum(256 x1 + x2). */
static inline void quant_x_avx512(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *x1, int8_t *x2, float *du, float *sumx,
                    int32_t *sx) {
    const int64_t G = k / GS;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < G; g++) {
            const int64_t o = r * k + g * GS;
            __m512 v[2];
            for (int h = 0; h < 2; h++) {
                if (x_bf16) {
                    __m256i b = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + o + 16 * h));
                    v[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
                } else {
                    v[h] = _mm512_loadu_ps((const float *)x + o + 16 * h);
                }
            }
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m512i acc = _mm512_setzero_si512();
            for (int h = 0; h < 2; h++) {
                __m512 t = _mm512_mul_ps(v[h], inv);                       /* |t| <= 127 */
                __m512i q1 = _mm512_cvtps_epi32(t);                        /* round to nearest even */
                __m512 rest = _mm512_sub_ps(t, _mm512_cvtepi32_ps(q1));    /* exact, in [-0.5, 0.5] */
                __m512i q2 = _mm512_cvtps_epi32(_mm512_mul_ps(rest, _mm512_set1_ps(256.f)));
                q2 = I4_X8 ? _mm512_setzero_si512() : _mm512_min_epi32(q2, _mm512_set1_epi32(127));  /* +128 only at an exact half */
                _mm_storeu_si128((__m128i *)(x1 + o + 16 * h), _mm512_cvtepi32_epi8(q1));
                _mm_storeu_si128((__m128i *)(x2 + o + 16 * h), _mm512_cvtepi32_epi8(q2));
                acc = _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_slli_epi32(q1, 8), q2));
            }
            du[r * G + g] = amax / 127.f / 256.f;
            sumx[r * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
            sx[r * G + g] = _mm512_reduce_add_epi32(acc);
        }
    }
}

/* One full 64-row block (output rows row0..row0+63; its scales at szb, groups gstride entries
   apart: scale_block) for MT rows of x (MT constant after inlining). Per (row, group):
   D = sum((q - 8) * (256 x1 + x2)) exactly (|D| < 2^24, so exact in fp32), then
   acc = fma(D, s * du, acc); acc = fma(z, sum x, acc). */
static inline __attribute__((always_inline)) void block_tile_avx512(
    const uint8_t *wb, const uint16_t *szb, int64_t gstride, int64_t row0, int64_t G, int64_t k, const int8_t *x1,
    const int8_t *x2, const float *du, const float *sumx, const int32_t *sx, float *y, int64_t n_out, const int MT,
    const int SYM, __m512i idx_a, __m512i idx_b) {
    __m512 acc[2][4];
    for (int mi = 0; mi < MT; mi++)
        for (int r = 0; r < 4; r++) acc[mi][r] = _mm512_setzero_ps();
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    const __m512i zmask = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *wg = wb + g * GS * 32;
        const int64_t sw = SYM ? 1 : 2;  /* bf16 values per (group, row) */
        const uint16_t *sg = szb + g * gstride * sw;
        if (g + PF_S < G)  /* torch's layout strides the scales by N_pad: hardware prefetchers miss them */
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(sg + PF_S * gstride * sw + 16 * sw * r), _MM_HINT_T0);
        __m512i d1[2][4], d2[2][4];
        for (int mi = 0; mi < MT; mi++)
            for (int r = 0; r < 4; r++) {
                d1[mi][r] = _mm512_setzero_si512();
                d2[mi][r] = _mm512_set1_epi32(-8 * sx[mi * G + g]);
            }
        for (int st = 0; st < GS / 4; st++) {  /* 4 k per step */
            __m512i p = _mm512_loadu_si512((const void *)(wg + st * 128));
            __m512i q = _mm512_loadu_si512((const void *)(wg + st * 128 + 64));
            __m512i a = _mm512_permutex2var_epi8(p, idx_a, q);  /* rows 0..15 | 32..47, 4 k per dword */
            __m512i b = _mm512_permutex2var_epi8(p, idx_b, q);  /* rows 16..31 | 48..63 */
            __m512i w[4] = {_mm512_and_si512(a, lo4), _mm512_and_si512(b, lo4),
                            _mm512_and_si512(_mm512_srli_epi16(a, 4), lo4), _mm512_and_si512(_mm512_srli_epi16(b, 4), lo4)};
            for (int mi = 0; mi < MT; mi++) {
                int32_t v1, v2;
                memcpy(&v1, x1 + mi * k + g * GS + st * 4, 4);
                memcpy(&v2, x2 + mi * k + g * GS + st * 4, 4);
                __m512i b1 = _mm512_set1_epi32(v1), b2 = _mm512_set1_epi32(v2);
                for (int r = 0; r < 4; r++) {
                    d1[mi][r] = _mm512_dpbusd_epi32(d1[mi][r], w[r], b1);
                    if (!I4_X8) d2[mi][r] = _mm512_dpbusd_epi32(d2[mi][r], w[r], b2);
                }
            }
        }
        for (int mi = 0; mi < MT; mi++) {
            __m512 dum = _mm512_set1_ps(du[mi * G + g]), sm = _mm512_set1_ps(sumx[mi * G + g]);
            for (int r = 0; r < 4; r++) {
                __m512i dd = _mm512_add_epi32(_mm512_slli_epi32(d1[mi][r], 8), d2[mi][r]);
                if (SYM) {  /* 16 scales */
                    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sg + 16 * r)));
                    __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                    acc[mi][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dd), _mm512_mul_ps(s, dum), acc[mi][r]);
                } else {
                    __m512i v = _mm512_loadu_si512((const void *)(sg + 32 * r));  /* 16 x (scale, zero) */
                    __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                    __m512 z = _mm512_castsi512_ps(_mm512_and_si512(v, zmask));
                    acc[mi][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dd), _mm512_mul_ps(s, dum), acc[mi][r]);
                    acc[mi][r] = _mm512_fmadd_ps(z, sm, acc[mi][r]);
                }
            }
        }
    }
    /* acc r: rows 0-15, 16-31 (low nibbles), 32-47, 48-63 (high nibbles) */
    for (int mi = 0; mi < MT; mi++)
        for (int r = 0; r < 4; r++) _mm512_storeu_ps(y + mi * n_out + row0 + 16 * r, acc[mi][r]);
}

/* silu(g) * u over 16 lanes: g / (1 + exp(-g)) with a Cephes-style exp (range reduction by ln 2,
   degree-6 polynomial, exponent via scalef; ~2 ulp, the same bits on every call: fused results stay
   deterministic). Scalar expf cost ~10 ns per element (~60 us per MoE layer at 8 x 768). */
static inline __m512 silu_mul16(__m512 g, __m512 u) {
    const __m512 x = _mm512_max_ps(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(88.37626f)),
                                   _mm512_set1_ps(-88.37626f));  /* -g, clamped */
    __m512 n;
    const __m512 p = exp_poly16(x, &n);
    const __m512 e = _mm512_scalef_ps(p, n);  /* exp(-g) */
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u);
}

/* gpt-oss's clamped SwiGLU over 16 lanes: clamp_swiglu1's operations. */
static inline __m512 clamp_swiglu16(__m512 g, __m512 u, float alpha, float limit) {
    const __m512 l = _mm512_set1_ps(limit), one = _mm512_set1_ps(1.f);
    g = _mm512_min_ps(g, l);
    u = _mm512_min_ps(_mm512_max_ps(u, _mm512_set1_ps(-limit)), l);
    const __m512 x = _mm512_max_ps(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(g, _mm512_set1_ps(alpha))),
                                                 _mm512_set1_ps(88.37626f)), _mm512_set1_ps(-88.37626f));
    __m512 n;
    const __m512 p = exp_poly16(x, &n);
    const __m512 e = _mm512_scalef_ps(p, n);
    return _mm512_mul_ps(_mm512_add_ps(u, one), _mm512_mul_ps(g, _mm512_div_ps(one, _mm512_add_ps(one, e))));
}

#endif /* INT4_AVX512_H */
