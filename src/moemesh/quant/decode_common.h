/* Helpers shared by the decode kernels' C files (decode_kernels.c, head_kernels.c): an exp the
 * loops vectorize, fixed-order dot products, GCC/Clang vector types. Everything is static inline. */
#ifndef DECODE_COMMON_H
#define DECODE_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* exp for the softmax, Cephes' expf (range reduction by ln 2, degree-6 polynomial; < 2 ulp on
 * [-87, 88]), written so the loops over it vectorize. exp(-inf) = 0 via the clamp: callers pass
 * s - max, never above 0. */
static inline float dk_exp(float x) {
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 88.37626f ? 88.37626f : x;
    const float t = x * 1.44269504088896341f + 0.5f;
    float n = (float)(int32_t)t; /* floorf(t), as a truncation and a step: a call to floorf kept the */
    n = n > t ? n - 1.0f : n;    /* loops over dk_exp from vectorizing (|t| < 2^7: exact either way) */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two;
    memcpy(&two, &bits, sizeof two);
    return p * two;
}

#define LANES 16 /* partial sums per reduction: two AVX registers, so the loops vectorize */

/* sum of a[i] * b[i], in LANES partial sums (a fixed order: the same bits for the same inputs) */
static inline float dk_dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s + tail;
}

/* 8 floats as one value (GCC/Clang vector extension: elementwise IEEE operations, so every target,
 * with or without SIMD, gives the same bits); loads and stores through memcpy (no alignment assumed). */
typedef float dk_v8 __attribute__((vector_size(32)));

static inline dk_v8 dk_load8(const float *p) {
    dk_v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef float dk_v16 __attribute__((vector_size(64)));
typedef int32_t dk_v16i __attribute__((vector_size(64)));
typedef double dk_v8d __attribute__((vector_size(64)));

#define DK_SPLAT16(c) ((dk_v16){c, c, c, c, c, c, c, c, c, c, c, c, c, c, c, c})

static inline dk_v16 dk_blend16(dk_v16i mask, dk_v16 a, dk_v16 b) { /* mask ? a : b, per lane */
    return (dk_v16)(((dk_v16i)a & mask) | ((dk_v16i)b & ~mask));
}

/* dk_exp on 16 lanes, the same operations in the same order (so the same bits), written with vector
 * types: the compiler turned the scalar form's clamps into branches in some loops and kept them scalar. */
static inline dk_v16 dk_exp16(dk_v16 x) {
    x = dk_blend16(x < DK_SPLAT16(-87.33654f), DK_SPLAT16(-87.33654f), x);
    x = dk_blend16(x > DK_SPLAT16(88.37626f), DK_SPLAT16(88.37626f), x);
    const dk_v16 t = x * DK_SPLAT16(1.44269504088896341f) + DK_SPLAT16(0.5f);
    dk_v16 n = __builtin_convertvector(__builtin_convertvector(t, dk_v16i), dk_v16);
    n = dk_blend16(n > t, n - DK_SPLAT16(1.0f), n);
    dk_v16 r = x - n * DK_SPLAT16(0.693359375f);
    r = r - n * DK_SPLAT16(-2.12194440e-4f);
    dk_v16 p = DK_SPLAT16(1.9875691500e-4f);
    p = p * r + DK_SPLAT16(1.3981999507e-3f);
    p = p * r + DK_SPLAT16(8.3334519073e-3f);
    p = p * r + DK_SPLAT16(4.1665795894e-2f);
    p = p * r + DK_SPLAT16(1.6666665459e-1f);
    p = p * r + DK_SPLAT16(5.0000001201e-1f);
    p = p * r * r + r + DK_SPLAT16(1.0f);
    const dk_v16i bits = (__builtin_convertvector(n, dk_v16i) + 127) << 23;
    return p * (dk_v16)bits;
}

#endif /* DECODE_COMMON_H */
