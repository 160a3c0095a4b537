/* TurboQuant encoder in C (the torch twin is TurboQuantizer.encode): norm, rotation by rt,
 * nearest Lloyd-Max centroid per coordinate (code = number of boundaries below it), bit-packing
 * into the coordinate-major words, norm stored as float16 (round to nearest even, as torch). */
#include <math.h>
#include <string.h>

#include "tq_native.h"

static uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    x &= 0x7FFFFFFF;
    if (x >= 0x47800000) return (uint16_t)(sign | (x > 0x7F800000 ? 0x7E00 : 0x7C00)); /* overflow/inf/nan */
    if (x < 0x38800000) {  /* below the smallest normal half: subnormal or zero */
        if (x < 0x33000000) return (uint16_t)sign;
        const uint32_t mant = (x & 0x7FFFFF) | 0x800000, shift = 126 - (x >> 23);
        uint32_t h = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((x >> 13) - (112u << 10)) & 0xFFFF;  /* rebias 127 -> 15, drop 13 mantissa bits */
    const uint32_t rem = x & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;  /* carries into the exponent correctly */
    return (uint16_t)(sign | h);
}

void tq_encode_one(const coded_t *c, int d, int h, int kv, const float *x, int64_t t) {
    float ss = 0.f, y[MAXD];
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    const float norm = sqrtf(ss), inv = 1.f / (norm > 1e-30f ? norm : 1e-30f);
    for (int j = 0; j < d; j++) y[j] = 0.f;
    for (int i = 0; i < d; i++) {
        const float xi = x[i] * inv;
        for (int j = 0; j < d; j++) y[j] += xi * c->rt[i * d + j];
    }
    uint32_t *w = (kv ? c->vw : c->kw) + h * c->head_stride + t;
    for (int gi = 0; gi < c->ng; gi++) {
        const group_t *g = c->groups + gi;
        const int pb = g->bits == 3 ? 2 : g->bits, per = 32 / pb;
        for (int i = 0; i < (g->n + per - 1) / per; i++) w[(g->w0 + i) * c->ws] = 0;
        if (g->bits == 3)
            for (int i = 0; i < (g->n + 31) / 32; i++) w[(g->w1 + i) * c->ws] = 0;
        const float *b = c->bounds + 15 * gi;
        const int nb = (1 << g->bits) - 1;
        for (int i = 0; i < g->n; i++) {
            uint32_t code = 0;
            for (int k = 0; k < nb; k++) code += b[k] < y[g->lo + i];
            w[(g->w0 + i / per) * c->ws] |= (code & ((1u << pb) - 1)) << ((i % per) * pb);
            if (g->bits == 3) w[(g->w1 + i / 32) * c->ws] |= (code >> 2) << (i % 32);
        }
    }
    const float stored = norm < 65504.f ? norm : 65504.f;  /* NORM_MAX: clamp like the torch encoder */
    (kv ? c->vn : c->kn)[h * c->norm_stride + t] = float_to_half(stored);
}

/* x [2 (k, v), hkv, e, d] -> token columns [t0, t0 + e) */
void tq_encode(const coded_t *c, int hkv, int64_t e, int d, const float *x, int64_t t0) {
    for (int kv = 0; kv < 2; kv++)
        for (int h = 0; h < hkv; h++)
            for (int64_t t = 0; t < e; t++) tq_encode_one(c, d, h, kv, x + (((int64_t)kv * hkv + h) * e + t) * d, t0 + t);
}
