/* TurboQuant kernels: decode attention straight from packed codes (one query token, one
 * sequence, one layer, all heads) and code packing. Built and loaded by tq_native.py (plain C,
 * no torch headers); tq_attention.attend_codes and quantizer.encode are the torch twins.
 *
 * Codes are coordinate-major 32-bit words: word i of token t of kv head h is at
 * words[h * head_stride + i * word_stride + t], so one word position is streamed over many
 * tokens with contiguous SIMD loads. Coordinate j's code = base_j + sum over its bit planes p of
 * ((word[word_p] >> bit_p) & mask_p) << shift_p; desc[j] = {nplanes, base, (word, bit, mask,
 * shift) * MAXP}. With AVX-512 the 32-entry centroid table lives in two registers and one
 * permute looks up 16 codes; other CPUs take the scalar loops.
 */
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAXP 3
#define DESC (2 + 4 * MAXP)
#define BLK 256   /* tokens per block: a block's words and weights stay in L1 */
#define MAXG 16   /* query heads per kv head */
#define MAXD 256  /* head dim */
#define TABLE 32  /* centroid table entries (zero-padded) */

typedef struct {
    int np;
    uint32_t base, word[MAXP], bit[MAXP], mask[MAXP], shift[MAXP];
} coord_t;

static void load_desc(const int32_t *desc, int d, coord_t *cd) {
    for (int j = 0; j < d; j++) {
        const int32_t *dj = desc + j * DESC;
        cd[j].np = dj[0];
        cd[j].base = (uint32_t)dj[1];
        for (int p = 0; p < dj[0]; p++) {
            cd[j].word[p] = dj[2 + 4 * p], cd[j].bit[p] = dj[3 + 4 * p];
            cd[j].mask[p] = dj[4 + 4 * p], cd[j].shift[p] = dj[5 + 4 * p];
        }
    }
}

static inline uint32_t code_at(const uint32_t *w, int64_t ws, const coord_t *c, int64_t t) {
    uint32_t code = c->base;
    for (int p = 0; p < c->np; p++) code += ((w[c->word[p] * ws + t] >> c->bit[p]) & c->mask[p]) << c->shift[p];
    return code;
}

#ifdef __AVX512F__
/* centroids of coordinate c for the 16 tokens at t (lanes outside `valid` read as code base) */
static inline __m512 lookup16(const uint32_t *w, int64_t ws, const coord_t *c, int64_t t, __mmask16 valid,
                              __m512 tlo, __m512 thi) {
    __m512i code = _mm512_set1_epi32((int)c->base);
    for (int p = 0; p < c->np; p++) {
        __m512i x = _mm512_maskz_loadu_epi32(valid, w + c->word[p] * ws + t);
        x = _mm512_and_si512(_mm512_srl_epi32(x, _mm_cvtsi32_si128((int)c->bit[p])), _mm512_set1_epi32((int)c->mask[p]));
        code = _mm512_add_epi32(code, _mm512_sll_epi32(x, _mm_cvtsi32_si128((int)c->shift[p])));
    }
    return _mm512_permutex2var_ps(tlo, code, thi);
}

static inline __mmask16 lanes(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }
#endif

/* s[m][t] = kn[t] * <qr[m], centroids(t)> for tokens [0, nc), g query heads */
static void coded_scores(const uint32_t *w, int64_t ws, const coord_t *cd, int d, const float *table,
                         int g, const float (*qr)[MAXD], const float *kn, int64_t nc, float *s, int64_t len) {
#ifdef __AVX512F__
    const __m512 tlo = _mm512_loadu_ps(table), thi = _mm512_loadu_ps(table + 16);
    for (int m0 = 0; m0 < g; m0 += 4) {  /* 4 accumulators: decode once per 4 query heads */
        const int mg = g - m0 < 4 ? g - m0 : 4;
        for (int64_t t = 0; t < nc; t += 16) {
            const __mmask16 v = lanes(nc - t);
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int j = 0; j < d; j++) {
                const __m512 c = lookup16(w, ws, cd + j, t, v, tlo, thi);
                for (int m = 0; m < mg; m++) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(qr[m0 + m][j]), c, acc[m]);
            }
            const __m512 n = _mm512_maskz_loadu_ps(v, kn + t);
            for (int m = 0; m < mg; m++) _mm512_mask_storeu_ps(s + (m0 + m) * len + t, v, _mm512_mul_ps(acc[m], n));
        }
    }
#else
    for (int64_t t = 0; t < nc; t++)
        for (int m = 0; m < g; m++) s[m * len + t] = 0.f;
    for (int j = 0; j < d; j++)
        for (int64_t t = 0; t < nc; t++) {
            const float c = table[code_at(w, ws, cd + j, t)];
            for (int m = 0; m < g; m++) s[m * len + t] += qr[m][j] * c;
        }
    for (int m = 0; m < g; m++)
        for (int64_t t = 0; t < nc; t++) s[m * len + t] *= kn[t];
#endif
}

/* orot[m][j] = sum_t pw[m][t] * centroid_j(t) over tokens [0, nc) */
static void coded_values(const uint32_t *w, int64_t ws, const coord_t *cd, int d, const float *table,
                         int g, const float *pw, int64_t len, int64_t nc, float (*orot)[MAXD]) {
    for (int m = 0; m < g; m++) memset(orot[m], 0, sizeof(float) * d);
#ifdef __AVX512F__
    const __m512 tlo = _mm512_loadu_ps(table), thi = _mm512_loadu_ps(table + 16);
    for (int64_t t0 = 0; t0 < nc; t0 += BLK) {
        const int64_t t1 = nc - t0 < BLK ? nc : t0 + BLK;
        for (int j = 0; j < d; j++)
            for (int m0 = 0; m0 < g; m0 += 4) {
                const int mg = g - m0 < 4 ? g - m0 : 4;
                __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                for (int64_t t = t0; t < t1; t += 16) {
                    const __mmask16 v = lanes(t1 - t);
                    const __m512 c = lookup16(w, ws, cd + j, t, v, tlo, thi);
                    for (int m = 0; m < mg; m++)
                        acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(v, pw + (m0 + m) * len + t), c, acc[m]);
                }
                for (int m = 0; m < mg; m++) orot[m0 + m][j] += _mm512_reduce_add_ps(acc[m]);
            }
    }
#else
    for (int j = 0; j < d; j++)
        for (int64_t t = 0; t < nc; t++) {
            const float c = table[code_at(w, ws, cd + j, t)];
            for (int m = 0; m < g; m++) orot[m][j] += pw[m * len + t] * c;
        }
#endif
}

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    float f;
    if (exp == 0) f = ldexpf((float)mant, -24);                 /* zero / subnormal */
    else if (exp == 31) f = mant ? NAN : INFINITY;
    else f = ldexpf((float)(mant | 0x400), (int)exp - 25);
    return sign ? -f : f;
}

/* q [hq, d] (scaled), rt [d, d] (x_rot = x @ rt), codes of tokens [lo, lo + nc), float16 norms
 * kn/vn (same indexing as the codes' tokens, head stride norm_stride), exact ek/ev [hkv, ne, d],
 * scratch [hq, nc + ne] floats + [2, nc] -> out [hq, d]. Returns 0, or -1 for unsupported sizes. */
int tq_decode_attend(int hq, int hkv, int d, const float *q, const float *rt,
                     const uint32_t *kw, const uint32_t *vw, int64_t head_stride, int64_t ws,
                     int64_t lo, int64_t nc, const uint16_t *kn16, const uint16_t *vn16, int64_t norm_stride,
                     const float *ek, const float *ev, int64_t ne,
                     const float *table, const int32_t *desc, float *scratch, float *out) {
    const int g = hq / hkv;
    const int64_t len = nc + ne;
    if (g > MAXG || d > MAXD || g * hkv != hq) return -1;
    coord_t cd[MAXD];
    load_desc(desc, d, cd);
    float qr[MAXG][MAXD], orot[MAXG][MAXD];
    float *kn = scratch + (int64_t)hq * len, *vn = kn + nc;
    for (int h = 0; h < hkv; h++) {
        const float *qh = q + (int64_t)h * g * d;
        float *sh = scratch + (int64_t)h * g * len;
        for (int64_t t = 0; t < nc; t++) {
            kn[t] = half_to_float(kn16[h * norm_stride + lo + t]);
            vn[t] = half_to_float(vn16[h * norm_stride + lo + t]);
        }
        for (int m = 0; m < g; m++)  /* rotate the query once: <q, k> = <q rt, k rt> */
            for (int j = 0; j < d; j++) {
                float x = 0.f;
                for (int i = 0; i < d; i++) x += qh[m * d + i] * rt[i * d + j];
                qr[m][j] = x;
            }
        coded_scores(kw + h * head_stride + lo, ws, cd, d, table, g, (const float (*)[MAXD])qr, kn, nc, sh, len);
        for (int m = 0; m < g; m++) {  /* exact window scores, softmax, fold in the value norms */
            float *s = sh + m * len;
            for (int64_t e = 0; e < ne; e++) {
                const float *k = ek + ((int64_t)h * ne + e) * d;
                float dot = 0.f;
                for (int i = 0; i < d; i++) dot += qh[m * d + i] * k[i];
                s[nc + e] = dot;
            }
            float mx = -INFINITY, sum = 0.f;
            for (int64_t t = 0; t < len; t++) mx = s[t] > mx ? s[t] : mx;
            for (int64_t t = 0; t < len; t++) { s[t] = expf(s[t] - mx); sum += s[t]; }
            const float inv = 1.f / sum;
            for (int64_t t = 0; t < nc; t++) s[t] *= inv * vn[t];
            for (int64_t t = nc; t < len; t++) s[t] *= inv;
        }
        coded_values(vw + h * head_stride + lo, ws, cd, d, table, g, sh, len, nc, orot);
        for (int m = 0; m < g; m++) {  /* rotate back once (x = x_rot rt^T), add the window's values */
            float *o = out + (int64_t)(h * g + m) * d;
            const float *pw = sh + m * len + nc;
            for (int i = 0; i < d; i++) {
                float x = 0.f;
                for (int j = 0; j < d; j++) x += orot[m][j] * rt[i * d + j];
                o[i] = x;
            }
            for (int64_t e = 0; e < ne; e++) {
                const float *v = ev + ((int64_t)h * ne + e) * d;
                for (int i = 0; i < d; i++) o[i] += pw[e] * v[i];
            }
        }
    }
    return 0;
}

/* Pack rotated unit vectors y [n, d] (vector r = kv * hkv * e + h * e + t for kv in {keys,
 * values}, head h, token t) into words at token columns [t0, t0 + e): the torch twin is
 * codebook.quantize (count of boundaries below x) + BitLayout.pack. bounds: per coordinate
 * bdesc[j] = {offset, count} into the boundaries array. */
void tq_pack(const float *y, int hkv, int64_t e, int d, const float *bounds, const int32_t *bdesc,
             const int32_t *desc, uint32_t *kw, uint32_t *vw, int64_t head_stride, int64_t ws, int64_t t0) {
    coord_t cd[MAXD];
    load_desc(desc, d, cd);
    for (int kv = 0; kv < 2; kv++)
        for (int h = 0; h < hkv; h++) {
            uint32_t *w = (kv ? vw : kw) + h * head_stride + t0;
            for (int64_t t = 0; t < e; t++) {
                const float *x = y + (((int64_t)kv * hkv + h) * e + t) * d;
                for (int j = 0; j < d; j++)
                    for (int p = 0; p < cd[j].np; p++) w[cd[j].word[p] * ws + t] = 0;
                for (int j = 0; j < d; j++) {
                    const float *b = bounds + bdesc[2 * j];
                    uint32_t code = 0;
                    for (int k = 0; k < bdesc[2 * j + 1]; k++) code += b[k] < x[j];
                    for (int p = 0; p < cd[j].np; p++)
                        w[cd[j].word[p] * ws + t] |= ((code >> cd[j].shift[p]) & cd[j].mask[p]) << cd[j].bit[p];
                }
            }
        }
}
