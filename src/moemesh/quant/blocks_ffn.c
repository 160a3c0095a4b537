/* Gated activations and the fused one-token experts call for block-format experts.

bk_act: [gate | up] rows -> act rows; silu(g) * u = (g / (1 + exp(-g))) * u, or gpt-oss's clamped SwiGLU
(layers/gpt_oss_moe.ClampedSwiGLU's operations in its order): g = min(gate, limit), u = clamp(up,
-limit, limit), (u + 1) * (g * (1 / (1 + exp(-(g * alpha))))). exp is a Cephes-style polynomial (range
reduction by ln 2, degree-6 polynomial, 2^n by exponent bits; ~2 ulp), the same operations in the AVX2
and the scalar build, so both give the same bits, and every element is computed alone (no dependence
on M or on the other elements).

bk_experts_mix: one token x [D] through n experts e (gate rows, up rows [I, D], down [D, I] in block
formats, optional fp32 biases [2I] and [D]): y_e = down(act(gate_up(x) + b1) ) + b2, each matmul the
arithmetic of bk_matmul with M = 1 and act that of bk_act, so y_e has the bits of the per-expert path
(quant/blocks_ffn.expert_forward); then out = sum over e in call order of y_e * w[e] (each product
rounded, then one addition per expert: layers/moe's sum_in_order). With w NULL, out [n, D] gets the y_e.
Phases: every expert's gate_up tiles, the activations, every expert's down tiles, the sum; one OpenMP
region, tiles shared between threads. */
#include "blocks_kernel.h"
#include "blocks_tile.h"
#include "exp_poly.h"

#define BK_EXP_HI 88.3f
#define BK_EXP_LO -87.3f  /* 2^n stays a normal float */

static inline float bk_exp(float x) {
    x = x > BK_EXP_HI ? BK_EXP_HI : (x < BK_EXP_LO ? BK_EXP_LO : x);
    float n;
    const float p = exp_poly1(x, &n);
    const uint32_t u = (uint32_t)((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &u, 4);
    return p * s;
}

static inline float bk_act1(int act, float alpha, float limit, float g, float u) {
    if (act == 0) return (g / (1.f + bk_exp(-g))) * u;
    g = g < limit ? g : limit;  /* NaN -> limit, like _mm256_min_ps(g, limit) */
    u = u > -limit ? u : -limit;
    u = u < limit ? u : limit;
    return (u + 1.f) * (g * (1.f / (1.f + bk_exp(-(g * alpha)))));
}

#if BK_AVX2
static inline __m256 bk_exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(BK_EXP_LO)), _mm256_set1_ps(BK_EXP_HI));
    __m256 n;
    const __m256 p = exp_poly8(x, &n);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 bk_act8(int act, float alpha, float limit, __m256 g, __m256 u) {
    const __m256 one = _mm256_set1_ps(1.f);
    if (act == 0) return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, bk_exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))), u);
    const __m256 l = _mm256_set1_ps(limit);
    g = _mm256_min_ps(g, l);
    u = _mm256_min_ps(_mm256_max_ps(u, _mm256_set1_ps(-limit)), l);
    const __m256 z = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(g, _mm256_set1_ps(alpha)));
    const __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, bk_exp8(z)));
    return _mm256_mul_ps(_mm256_add_ps(u, one), _mm256_mul_ps(g, sg));
}
#endif

/* One row: h [2I] -> out [I]. */
static void bk_act_row(int act, float alpha, float limit, const float *h, int64_t inter, float *out) {
    int64_t i = 0;
#if BK_AVX2
    for (; i + 8 <= inter; i += 8)
        _mm256_storeu_ps(out + i, bk_act8(act, alpha, limit, _mm256_loadu_ps(h + i), _mm256_loadu_ps(h + inter + i)));
#endif
    for (; i < inter; i++) out[i] = bk_act1(act, alpha, limit, h[i], h[inter + i]);
}

/* h fp32 [m, 2I] -> out [m, I]. 0 or -1 (unknown act). */
int bk_act(int act, float alpha, float limit, const float *h, int64_t m, int64_t inter, float *out) {
    if (act < 0 || act > 1) return -1;
    for (int64_t r = 0; r < m; r++) bk_act_row(act, alpha, limit, h + r * 2 * inter, inter, out + r * inter);
    return 0;
}

int bk_experts_mix(int gu_type, int dn_type, int act, float alpha, float limit, const float *x, int64_t d,
                   int64_t inter, int64_t n, const int64_t *gate, const int64_t *up, const int64_t *down,
                   const int64_t *bias, int64_t gu_rs, int64_t dn_rs, const float *w, float *out, int nthreads) {
    if (n <= 0 || d <= 0 || inter <= 0 || act < 0 || act > 1 || gu_type < 0 || gu_type >= BK_NTYPES || dn_type < 0 ||
        dn_type >= BK_NTYPES)
        return -1;
    if ((gu_type != BK_FP8 && d % BK_TRAITS[gu_type].block) || (dn_type != BK_FP8 && inter % BK_TRAITS[dn_type].block))
        return -1;
    float *h = (float *)malloc(sizeof(float) * (size_t)(n * (2 * inter + inter + d)));
    bk_xbuf *ab = (bk_xbuf *)calloc((size_t)n, sizeof(bk_xbuf));
    bk_xbuf xb;
    int rc = h && ab ? bk_prepare(gu_type, x, 1, d, &xb) : -3;
    if (rc) {
        if (h && ab) bk_xfree(&xb);
        free(h), free(ab);
        return rc;
    }
    float *a = h + n * 2 * inter, *y = a + n * inter;
    const int64_t t1 = (2 * inter + BK_NB - 1) / BK_NB, t2 = (d + BK_NB - 1) / BK_NB;
    if (n * 3 * inter * d < BK_SERIAL) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        float *acc = bk_thread_acc(&rc);
#pragma omp for schedule(guided)
        for (int64_t it = 0; it < n * t1; it++) {  /* gate rows, then up rows, of every expert */
            const int64_t e = it / t1, r0 = (it % t1) * BK_NB, nn = 2 * inter - r0 < BK_NB ? 2 * inter - r0 : BK_NB;
            if (!acc) continue;
            const float *b1 = bias[2 * e] ? (const float *)(uintptr_t)bias[2 * e] : NULL;
            float *he = h + e * 2 * inter;
            if (r0 < inter && r0 + nn > inter) {  /* a tile across gate/up: two tiles (same per-row arithmetic) */
                bk_tile(gu_type, &xb, 1, d, (const uint8_t *)(uintptr_t)gate[e], gu_rs, 2 * inter, b1, he, 0, 1, r0,
                        inter - r0, acc);
                bk_tile(gu_type, &xb, 1, d, (const uint8_t *)(uintptr_t)up[e] - inter * gu_rs, gu_rs, 2 * inter, b1, he,
                        0, 1, inter, r0 + nn - inter, acc);
            } else {
                const uint8_t *base = r0 < inter ? (const uint8_t *)(uintptr_t)gate[e]
                                                 : (const uint8_t *)(uintptr_t)up[e] - inter * gu_rs;
                bk_tile(gu_type, &xb, 1, d, base, gu_rs, 2 * inter, b1, he, 0, 1, r0, nn, acc);
            }
        }
#pragma omp for schedule(static)
        for (int64_t e = 0; e < n; e++) {
            bk_act_row(act, alpha, limit, h + e * 2 * inter, inter, a + e * inter);
            if (bk_prepare(dn_type, a + e * inter, 1, inter, &ab[e])) {
#pragma omp atomic write
                rc = -3;
            }
        }
#pragma omp for schedule(guided)
        for (int64_t it = 0; it < n * t2; it++) {
            const int64_t e = it / t2, r0 = (it % t2) * BK_NB;
            if (!acc || rc) continue;
            const float *b2 = bias[2 * e + 1] ? (const float *)(uintptr_t)bias[2 * e + 1] : NULL;
            bk_tile(dn_type, &ab[e], 1, inter, (const uint8_t *)(uintptr_t)down[e], dn_rs, d, b2, y + e * d, 0, 1, r0,
                    d - r0 < BK_NB ? d - r0 : BK_NB, acc);
        }
        free(acc);
    }
    if (rc == 0) {
        if (!w) {
            memcpy(out, y, sizeof(float) * (size_t)(n * d));
        } else {
            for (int64_t e = 0; e < n; e++)
                for (int64_t j = 0; j < d; j++) y[e * d + j] = y[e * d + j] * w[e];  /* products stored: no fma */
            for (int64_t j = 0; j < d; j++) out[j] = 0.f;
            for (int64_t e = 0; e < n; e++)
                for (int64_t j = 0; j < d; j++) out[j] = out[j] + y[e * d + j];
        }
    }
    for (int64_t e = 0; e < n; e++) bk_xfree(&ab[e]);
    bk_xfree(&xb);
    free(h), free(ab);
    return rc;
}
