/* int4 weight-only matmul on torch's own CPU int4 packing (no repack): AVX-512 VNNI, AVX2 or plain C.

y[m, n] = sum_k x[m, k] * W[n, k],  W[n, k] = (q[n, k] - 8) * s[k/32, n] + z[k/32, n]

Weights: what torch._convert_weight_to_int4pack_for_cpu writes on the machine that packed them, both of
its SIMD layouts ("halves"); ``fmt`` bit FMT_B32 names the second:
- AVX-512 build (torch on an AVX-512 CPU): blocks of 64 rows, each [K, 32] bytes; byte j of row k holds
  row j (low nibble) and row j + 32 (high nibble);
- AVX2 build (FMT_B32): blocks of 32 rows, each [K, 16] bytes; byte j = rows j | j + 16.
A short tail block (16..48 rows) is [K, tail/2] bytes, byte j = rows 2j, 2j+1, in both.
We keep torch's packing rather than repacking into one layout of ours: torch's own kernel (the
MOEMESH_INT4_NATIVE=0 fallback, tests comparing against it) keeps reading the same buffers, and a store
written on either kind of machine runs on the other (the layout is in its metas). Every path reads
both layouts: AVX-512 tiles 64-row blocks (and uses the AVX2 tile for 32-row ones), AVX2 has a tile for
each, the scalar path indexes any.
Scales/zeros: bf16 [K/32, N_pad, 2] (scale, zero), or with ``sym`` (symmetric int4, GGUF Q4_0's
values: the zero is 0) bf16 scales alone, [K/32, N_pad]: 18 instead of 20 bytes per 32 weights,
and the zero fma is skipped (fma(0, sum x, acc) == acc, so sym and a zero-filled asymmetric copy
give the same values). Group size 32 only.
Scale layouts (``fmt`` bit FMT_BLOCKS): torch's [K/32, N_pad(, 2)], where one group's 64 scales of a
block sit N_pad entries after the previous group's (a 3-10 KB stride: a second, scattered stream
beside the weights), or block-major, each 64-row block's scales one contiguous run [K/32, width(, 2)],
blocks in order (the tail block last, ``width`` = its rows); quant/int4_native.block_scales
writes it. The scale blocks are 64 rows whatever the weight layout (a 32-row weight block reads half
of one). Same values, same arithmetic, other addresses: both layouts give the same bits.

Activations: per (row, group of 32), t = x * 127 / amax is split into two int8 planes,
x1 = round(t) and x2 = round(256 (t - x1)), so x ~ du * (256 x1 + x2), du = amax / 127 / 256
(about 16-bit precision: llama.cpp's Q8 with a second residual plane). Built with -DI4_X8=1, x2 is 0
(x ~ du * 256 x1: llama.cpp's Q8 activations) and the SIMD paths skip its multiplies; the formula,
and so the agreement of the builds bit for bit, is unchanged. The integer dot of each plane
is exact (VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd, or plain C) and they combine into
D = sum((q - 8) * (256 x1 + x2)), |D| < 2^24 so exact in fp32; the zero term uses the fp32 group sum
of x in one fixed order (int4_scalar.h sum32):  acc = fma(D, s * du, acc); acc = fma(z, sum(x), acc)
(groups in order). Every output row goes through this same arithmetic whatever M is, whichever path
(vector block or scalar tail) and whichever ISA computes it, so results are batch invariant (a row's
output depends only on that row of x and the weight) and the three builds give the same bits
(tests/test_int4_variants.py).

Builds (quant/int4_native.py): -DI4_ISA=2 (AVX-512 VNNI + VBMI), 1 (AVX2 + FMA) or 0 (plain C), each
with -march=native; I4_PATH is the path the compiler could target, i4_isa() reports it.
*/
#ifndef INT4_KERNEL_H
#define INT4_KERNEL_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef I4_ISA
#define I4_ISA 2  /* the best one the compiler targets */
#endif
#ifndef I4_X8
#define I4_X8 0  /* 1: activations as one int8 plane (x2 = 0: llama.cpp's Q8 precision, half the multiplies) */
#endif
#if I4_ISA >= 2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define I4_PATH 2
#elif I4_ISA >= 1 && defined(__AVX2__) && defined(__FMA__)
#define I4_PATH 1
#else
#define I4_PATH 0
#endif
#if I4_PATH
#include <immintrin.h>
#endif

#define GS 32   /* group size */
#define FMT_SYM 1     /* fmt bit: symmetric int4 (scales alone) */
#define FMT_BLOCKS 2  /* fmt bit: block-major scales */
#define FMT_B32 4     /* fmt bit: weights in 32-row blocks (torch's AVX2 packing), else 64 */
#define BLK 64  /* rows per scale block (block-major scales) and per AVX-512 weight block */
#ifndef MT_MAX
#define MT_MAX 2  /* AVX-512: rows of x per weight pass (1 or 2: accumulators must fit the 32 zmm) */
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

/* Where the scales of output rows row0.. start, and (*gstride) the entries from one group's to the next. */
static inline const uint16_t *scale_block(const uint16_t *sz, int fmt, int64_t row0, int64_t G, int64_t n_pad,
                                          int64_t *gstride) {
    const int64_t sw = (fmt & FMT_SYM) ? 1 : 2, sb = row0 / BLK;
    if (fmt & FMT_BLOCKS) {
        *gstride = n_pad - sb * BLK < BLK ? n_pad - sb * BLK : BLK;  /* the scale block's width */
        return sz + (sb * BLK * G + row0 % BLK) * sw;
    }
    *gstride = n_pad;
    return sz + row0 * sw;
}

static inline float bf16f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#include "exp_poly.h"
#include "int4_scalar.h"
#if I4_PATH >= 1
#include "int4_avx2.h"
#endif
#if I4_PATH == 2
#include "int4_avx512.h"
#endif

static inline int64_t block_rows(int fmt) { return (fmt & FMT_B32) ? 32 : BLK; }

/* x [M, K] -> planes x1, x2 [M, K] and per (row, group) du, sum x, SX (the values of every path). */
static inline void i4_quant_x(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *x1, int8_t *x2, float *du,
                              float *sumx, int32_t *sx) {
#if I4_PATH == 2
    quant_x_avx512(x, x_bf16, m, k, x1, x2, du, sumx, sx);
#elif I4_PATH == 1
    quant_x_avx2(x, x_bf16, m, k, x1, x2, du, sumx, sx);
#else
    quant_x_scalar(x, x_bf16, m, k, x1, x2, du, sumx, sx);
#endif
}

/* h[i] = silu(h[i]) * h[inter + i] for i < inter (a multiple of 32), in place. */
static inline void i4_silu_mul(float *h, int64_t inter) {
    int64_t i = 0;
#if I4_PATH == 2
    for (; i + 16 <= inter; i += 16)
        _mm512_storeu_ps(h + i, silu_mul16(_mm512_loadu_ps(h + i), _mm512_loadu_ps(h + inter + i)));
#elif I4_PATH == 1
    for (; i + 8 <= inter; i += 8)
        _mm256_storeu_ps(h + i, silu_mul8(_mm256_loadu_ps(h + i), _mm256_loadu_ps(h + inter + i)));
#endif
    for (; i < inter; i++) h[i] = silu_mul1(h[i], h[inter + i]);
}

/* What an expert does around its two matmuls besides silu(gate) * up: NULL (every SwiGLU without biases)
   or this (engine: quant/int4_native.Epilogue, field for field). act 1 is gpt-oss's clamped SwiGLU
   (clamp_swiglu1) with its alpha and limit; bias, when not NULL, is an int64 [rows, 2] table of fp32
   bias addresses (gate_up's [2I], down's [D]; 0 for none), its rows indexed like the call's weight
   table (by expert id) or pointer arrays (by position). */
typedef struct {
    int64_t act;
    float alpha, limit;
    const int64_t *bias;
} i4_epi;

enum { I4_ACT_SILU = 0, I4_ACT_CLAMP_SWIGLU = 1 };

/* h[i] = act(h[i], h[inter + i]) for i < inter, in place: silu_mul or the epilogue's act. */
static inline void i4_act_mul(float *h, int64_t inter, const i4_epi *epi) {
    if (!epi || epi->act == I4_ACT_SILU) {
        i4_silu_mul(h, inter);
        return;
    }
    const float alpha = epi->alpha, limit = epi->limit;
    int64_t i = 0;
#if I4_PATH == 2
    for (; i + 16 <= inter; i += 16)
        _mm512_storeu_ps(h + i, clamp_swiglu16(_mm512_loadu_ps(h + i), _mm512_loadu_ps(h + inter + i), alpha, limit));
#elif I4_PATH == 1
    for (; i + 8 <= inter; i += 8)
        _mm256_storeu_ps(h + i, clamp_swiglu8(_mm256_loadu_ps(h + i), _mm256_loadu_ps(h + inter + i), alpha, limit));
#endif
    for (; i < inter; i++) h[i] = clamp_swiglu1(h[i], h[inter + i], alpha, limit);
}

/* y[j] += b[j] for j < n when b is not NULL (a QuantLinear's bias: torch.add's one rounding). */
static inline void i4_add_bias(float *y, const int64_t *b, int64_t n) {
    const float *bf = b ? (const float *)(uintptr_t)*b : NULL;
    if (bf)
        for (int64_t j = 0; j < n; j++) y[j] = y[j] + bf[j];
}

/* Output rows of weight block ``blk`` (block_rows(fmt) rows, or the short tail block) for m rows of x:
   x planes row r at x1 + r k, stats at du + r G, output row r at y + r n_out. qw, sz: the whole matrix. */
static inline void i4_block(const uint8_t *qw, const uint16_t *sz, int fmt, int64_t blk, int64_t n_pad, int64_t k,
                            int64_t m, const int8_t *x1, const int8_t *x2, const float *du, const float *sumx,
                            const int32_t *sx, float *y, int64_t n_out) {
    const int64_t bn = block_rows(fmt), G = k / GS, row0 = blk * bn, rows = n_pad - row0 < bn ? n_pad - row0 : bn;
    const int sym = fmt & FMT_SYM;
    int64_t gs;
    const uint16_t *szb = scale_block(sz, fmt, row0, G, n_pad, &gs);
    const uint8_t *wb = qw + row0 * (k / 2);
    int64_t r = 0;
    if (rows < bn) {  /* the tail block: rows 2j, 2j+1 share byte j */
        for (; r < m; r++)
            rows_scalar(wb, rows / 2, rows / 2, 1, szb, gs, sym, row0, rows, k, x1 + r * k, x2 + r * k, du + r * G,
                        sumx + r * G, sx + r * G, y + r * n_out);
        return;
    }
#if I4_PATH == 2
    if (bn == BLK) {
        uint8_t ia[64], ib[64];
        for (int j = 0; j < 16; j++) {  /* dword j = bytes of row j (resp. 16 + j) at k, k+1, k+2, k+3 */
            ia[4 * j] = j, ia[4 * j + 1] = 32 + j, ia[4 * j + 2] = 64 + j, ia[4 * j + 3] = 96 + j;
            ib[4 * j] = 16 + j, ib[4 * j + 1] = 48 + j, ib[4 * j + 2] = 80 + j, ib[4 * j + 3] = 112 + j;
        }
        const __m512i idx_a = _mm512_loadu_si512(ia), idx_b = _mm512_loadu_si512(ib);
#define I4_TILES(S)                                                                                              \
    for (; r + MT_MAX <= m; r += MT_MAX)                                                                         \
        block_tile_avx512(wb, szb, gs, row0, G, k, x1 + r * k, x2 + r * k, du + r * G, sumx + r * G, sx + r * G, \
                          y + r * n_out, n_out, MT_MAX, S, idx_a, idx_b);                                        \
    for (; r < m; r++)                                                                                           \
        block_tile_avx512(wb, szb, gs, row0, G, k, x1 + r * k, x2 + r * k, du + r * G, sumx + r * G, sx + r * G, \
                          y + r * n_out, n_out, 1, S, idx_a, idx_b);
        if (sym) {  /* constant SYM per instantiation: the branch leaves the inner loops */
            I4_TILES(1)
        } else {
            I4_TILES(0)
        }
#undef I4_TILES
        return;
    }
#endif
#if I4_PATH >= 1
    for (; r < m; r++) {
        const int8_t *a1 = x1 + r * k, *a2 = x2 + r * k;
        const float *dr = du + r * G, *sr = sumx + r * G;
        const int32_t *xr = sx + r * G;
        float *yr = y + r * n_out;
        if (bn == BLK && sym) {
            half64_avx2(wb, szb, gs, row0, G, a1, a2, dr, sr, xr, yr, 0, 1);
            half64_avx2(wb, szb, gs, row0, G, a1, a2, dr, sr, xr, yr, 1, 1);
        } else if (bn == BLK) {
            half64_avx2(wb, szb, gs, row0, G, a1, a2, dr, sr, xr, yr, 0, 0);
            half64_avx2(wb, szb, gs, row0, G, a1, a2, dr, sr, xr, yr, 1, 0);
        } else if (sym) {
            tile32_avx2(wb, szb, gs, row0, G, a1, a2, dr, sr, xr, yr, 1);
        } else {
            tile32_avx2(wb, szb, gs, row0, G, a1, a2, dr, sr, xr, yr, 0);
        }
    }
#else
    for (; r < m; r++)
        rows_scalar(wb, bn / 2, bn / 2, 0, szb, gs, sym, row0, rows, k, x1 + r * k, x2 + r * k, du + r * G,
                    sumx + r * G, sx + r * G, y + r * n_out);
#endif
}

#endif /* INT4_KERNEL_H */
