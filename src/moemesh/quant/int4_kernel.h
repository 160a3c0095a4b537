/* int4 weight-only matmul on torch's own CPU int4 packing (no repack), AVX-512 VNNI.

y[m, n] = sum_k x[m, k] * W[n, k],  W[n, k] = (q[n, k] - 8) * s[k/32, n] + z[k/32, n]

Weights: torch._convert_weight_to_int4pack_for_cpu's AVX-512 layout (block_n 64, "halves"):
blocks of 64 rows, each [K, 32] bytes; byte j of row k holds row j (low nibble) and row j + 32
(high nibble); a short tail block (16..48 rows) is [K, tail/2] bytes, byte j = rows 2j, 2j+1.
Scales/zeros: bf16 [K/32, N_pad, 2] (scale, zero), or with ``sym`` (symmetric int4, GGUF Q4_0's
values: the zero is 0) bf16 scales alone, [K/32, N_pad]: 18 instead of 20 bytes per 32 weights,
and the zero fma is skipped (fma(0, sum x, acc) == acc, so sym and a zero-filled asymmetric copy
give the same values). Group size 32 only.
Scale layouts (``fmt`` bit FMT_BLOCKS): torch's [K/32, N_pad(, 2)], where one group's 64 scales of a
block sit N_pad entries after the previous group's (a 3-10 KB stride: a second, scattered stream
beside the weights), or block-major, each block's scales one contiguous run [K/32, width(, 2)],
blocks in order (the tail block last, ``width`` = its rows); layers/int4_native.block_scales
writes it. Same values, same arithmetic, other addresses: both layouts give the same bits.

Activations: per (row, group of 32), t = x * 127 / amax is split into two int8 planes,
x1 = round(t) and x2 = round(256 (t - x1)), so x ~ du * (256 x1 + x2), du = amax / 127 / 256
(about 16-bit precision: llama.cpp's Q8 with a second residual plane). Both planes go through
VNNI (vpdpbusd, u8 weights x s8 activations) and combine into the exact integer
D = sum((q - 8) * (256 x1 + x2)), |D| < 2^24 so exact in fp32; the zero term uses the exact fp32
group sum of x:  acc = fma(D, s * du, acc); acc = fma(z, sum(x), acc)  (groups in order).
Every output row goes through this same arithmetic whatever M is and whichever path (vector
block or scalar tail) computes it, so results are batch invariant: a row's output depends only
on that row of x and the weight.
*/
#ifndef INT4_KERNEL_H
#define INT4_KERNEL_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define I4_SIMD 1
#else
#define I4_SIMD 0
#endif

#define GS 32   /* group size */
#define FMT_SYM 1     /* fmt bit: symmetric int4 (scales alone) */
#define FMT_BLOCKS 2  /* fmt bit: block-major scales */
#define BLK 64  /* rows per packed block */
#ifndef MT_MAX
#define MT_MAX 2  /* rows of x per weight pass (1 or 2: accumulators must fit the 32 zmm) */
#endif
#ifndef SERIAL_MACS
#define SERIAL_MACS (1 << 19)  /* below this many multiply-adds one thread does the call */
#endif
#ifndef PF_S
#define PF_S 4  /* scale prefetch distance, groups */
#endif
/* No software prefetch of the weights: a thread streams long runs of consecutive blocks, which the
   hardware prefetchers follow; prefetching 2 KB ahead cost bandwidth here (experts, 2 threads:
   23.4 -> 32.6 GB/s without it on huge pages with block scales, 15.8 -> 23.0 on 4 KiB pages with
   torch's layout; qkv-shaped matmuls 26 -> 31). */

/* Where weight block ``blk``'s scales start, and (*gstride) the entries from one group's to the next. */
static inline const uint16_t *scale_block(const uint16_t *sz, int fmt, int64_t blk, int64_t G, int64_t n_pad,
                                          int64_t *gstride) {
    const int64_t sw = (fmt & FMT_SYM) ? 1 : 2, width = n_pad - blk * BLK < BLK ? n_pad - blk * BLK : BLK;
    if (fmt & FMT_BLOCKS) {
        *gstride = width;
        return sz + blk * BLK * G * sw;
    }
    *gstride = n_pad;
    return sz + blk * BLK * sw;
}

static inline float bf16f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if I4_SIMD
/* x [M, K] (fp32 or bf16) -> int8 x1, x2 [M, K] with x ~ dx * (x1 + x2 / 256) per (row, group of
   32), dx = amax / 127; per group: du = dx / 256, the fp32 sum of x and SX = sum(256 x1 + x2). */
static inline void quant_x(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *x1, int8_t *x2, float *du, float *sumx,
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
                q2 = _mm512_min_epi32(q2, _mm512_set1_epi32(127));         /* +128 only at an exact half */
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
static inline __attribute__((always_inline)) void block_tile(
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
                    d2[mi][r] = _mm512_dpbusd_epi32(d2[mi][r], w[r], b2);
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

/* Scalar path for the tail block (rows 2j, 2j+1 share byte j); same arithmetic per row. */
static inline void tail_rows(const uint8_t *wt, const uint16_t *szb, int64_t gstride, int sym, int64_t n0, int64_t tail,
                      int64_t k, int64_t m, const int8_t *x1, const int8_t *x2, const float *du, const float *sumx,
                      const int32_t *sx, float *y, int64_t n_out) {
    const int64_t G = k / GS, half = tail / 2;
    for (int64_t r = 0; r < m; r++)
        for (int64_t t = 0; t < tail; t++) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                int32_t dot = -8 * sx[r * G + g];
                for (int64_t kk = g * GS; kk < (g + 1) * GS; kk++) {
                    uint8_t byte = wt[kk * half + t / 2];
                    int32_t q = (t & 1) ? byte >> 4 : byte & 15;
                    dot += q * (256 * (int32_t)x1[r * k + kk] + (int32_t)x2[r * k + kk]);
                }
                const uint16_t *p = szb + (g * gstride + t) * (sym ? 1 : 2);
                acc = fmaf((float)dot, bf16f(p[0]) * du[r * G + g], acc);
                if (!sym) acc = fmaf(bf16f(p[1]), sumx[r * G + g], acc);
            }
            y[r * n_out + n0 + t] = acc;
        }
}
#endif

#endif /* INT4_KERNEL_H */
