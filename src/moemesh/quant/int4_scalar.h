/* The portable path (plain C, any CPU): int4_kernel.h's contract written out one row and one weight at a
   time. It is the reference of the SIMD paths: the same integer dots, the same fp32 operations in the
   same order, so the same bits (tests/test_int4_variants.py). Also the tail block of every path.
   Needs a C compiler without -ffast-math and without fp contraction (int4_native.py builds with
   -ffp-contract=off): fmaf is one fused rounding (an instruction with FMA, libm's otherwise). */
#ifndef INT4_SCALAR_H
#define INT4_SCALAR_H

/* sum of 32 floats in the order of GCC's _mm512_reduce_add_ps over v[0:16] + v[16:32] (the AVX-512
   path's): lanes i + (i + 16), then halves 8, 4, then (0 + 2) + (1 + 3). */
static inline float sum32(const float *v) {
    float a[16], t3[8], t6[4];
    for (int i = 0; i < 16; i++) a[i] = v[i] + v[16 + i];
    for (int i = 0; i < 8; i++) t3[i] = a[8 + i] + a[i];
    for (int i = 0; i < 4; i++) t6[i] = t3[4 + i] + t3[i];
    return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}

/* x [M, K] (fp32 or bf16) -> int8 planes x1, x2 and per (row, group): du, the fp32 sum of x, SX =
   sum(256 x1 + x2) (int4_kernel.h). rintf: round half to even, like cvtps2dq under the default MXCSR. */
static inline void quant_x_scalar(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *x1, int8_t *x2, float *du,
                                  float *sumx, int32_t *sx) {
    const int64_t G = k / GS;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t o = r * k + g * GS;
            float v[GS], amax = 0.f;
            for (int i = 0; i < GS; i++) {
                v[i] = x_bf16 ? bf16f(((const uint16_t *)x)[o + i]) : ((const float *)x)[o + i];
                const float a = fabsf(v[i]);
                amax = a > amax ? a : amax;
            }
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            int32_t acc = 0;
            for (int i = 0; i < GS; i++) {
                const float t = v[i] * inv;     /* |t| <= 127 */
                const float q1 = rintf(t);
                int32_t q2 = I4_X8 ? 0 : (int32_t)rintf((t - q1) * 256.f);
                q2 = q2 < 127 ? q2 : 127;       /* +128 only at an exact half */
                x1[o + i] = (int8_t)q1, x2[o + i] = (int8_t)q2;
                acc += 256 * (int32_t)q1 + q2;
            }
            du[r * G + g] = amax / 127.f / 256.f;
            sumx[r * G + g] = sum32(v);
            sx[r * G + g] = acc;
        }
}

/* Output rows row0 .. row0 + nrows - 1 of one weight block at wb for one row of x: the nibble of
   (k, row t of the block) is byte k * bpk + (pairs ? t / 2 : t % half), high nibble for
   (pairs ? t odd : t >= half). Full blocks: halves, bpk = half = bn / 2 (bn 64 or 32); a tail block of
   w rows: pairs, bpk = w / 2. Scales at szb (scale_block), groups gstride entries apart. */
static inline void rows_scalar(const uint8_t *wb, int64_t bpk, int64_t half, int pairs, const uint16_t *szb,
                               int64_t gstride, int sym, int64_t row0, int64_t nrows, int64_t k, const int8_t *x1,
                               const int8_t *x2, const float *du, const float *sumx, const int32_t *sx, float *y) {
    const int64_t G = k / GS;
    for (int64_t t = 0; t < nrows; t++) {
        const int64_t col = pairs ? t / 2 : t % half;
        const int shift = (pairs ? (t & 1) : (t >= half)) ? 4 : 0;
        float acc = 0.f;
        for (int64_t g = 0; g < G; g++) {
            int32_t dot = -8 * sx[g];
            for (int64_t kk = g * GS; kk < (g + 1) * GS; kk++) {
                const int32_t q = (wb[kk * bpk + col] >> shift) & 15;
                dot += q * (256 * (int32_t)x1[kk] + (int32_t)x2[kk]);
            }
            const uint16_t *p = szb + (g * gstride + t) * (sym ? 1 : 2);
            acc = fmaf((float)dot, bf16f(p[0]) * du[g], acc);
            if (!sym) acc = fmaf(bf16f(p[1]), sumx[g], acc);
        }
        y[row0 + t] = acc;
    }
}

/* silu(g) * u with the AVX-512 path's operations (int4_avx512.h silu_mul16): clamp, round, two-step
   ln 2 reduction, the degree-6 polynomial by fmas, ldexpf for scalef (both exact p * 2^n, one
   rounding), a division and a product. */
static inline float silu_mul1(float g, float u) {
    float x = 0.f - g;
    x = x < 88.37626f ? x : 88.37626f;  /* minps / maxps: the second operand unless the comparison holds */
    x = x > -88.37626f ? x : -88.37626f;
    float n;
    const float p = exp_poly1(x, &n);
    const float e = ldexpf(p, (int)n);  /* exp(-g) */
    return (g / (1.f + e)) * u;
}

/* gpt-oss's clamped SwiGLU (layers/gpt_oss_moe.ClampedSwiGLU's operations in its order), with the vector
   paths' operations: g = min(g, limit) (NaN -> limit, as minps), u = clamp(up, -limit, limit),
   (u + 1) * (g * (1 / (1 + exp(-(g * alpha))))), exp as silu_mul1's. */
static inline float clamp_swiglu1(float g, float u, float alpha, float limit) {
    g = g < limit ? g : limit;
    u = u > -limit ? u : -limit;
    u = u < limit ? u : limit;
    float x = 0.f - g * alpha;
    x = x < 88.37626f ? x : 88.37626f;
    x = x > -88.37626f ? x : -88.37626f;
    float n;
    const float p = exp_poly1(x, &n);
    const float e = ldexpf(p, (int)n);  /* exp(-(g * alpha)) */
    return (u + 1.f) * (g * (1.f / (1.f + e)));
}

#endif /* INT4_SCALAR_H */
