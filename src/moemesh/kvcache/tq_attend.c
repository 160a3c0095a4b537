/* TurboQuant decode attention straight from packed codes: one query token of one sequence, one
 * layer, all heads (tq_decode_step). The torch twin is tq_attention.attend_codes; tq_native.py
 * builds and loads this file with tq_encode.c.
 *
 * With AVX-512, a group's centroid table sits in one register, repeated to 16 entries so that
 * index bits above b need no masking, and one permute looks up 16 tokens' centroids at once;
 * other CPUs take the scalar loops.
 */
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* Flush denormals to zero inside the kernel: tiny softmax weights would otherwise make every
 * multiply a microcode assist on Intel (measured 30x slower at 4K tokens). Per thread: MXCSR is. */
#define FTZ_BEGIN const unsigned int saved_csr_ = _mm_getcsr(); _mm_setcsr(saved_csr_ | 0x8040);
#define FTZ_END _mm_setcsr(saved_csr_);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif
#include <math.h>
#include <string.h>

#include "tq_native.h"

#define BLK 512  /* tokens per block of the value pass: its words and weights stay in L1/L2 */

static inline uint32_t code_at(const uint32_t *w, int64_t ws, const group_t *g, int i, int64_t t) {
    switch (g->bits) {
    case 4: return (w[(g->w0 + i / 8) * ws + t] >> (4 * (i % 8))) & 15;
    case 2: return (w[(g->w0 + i / 16) * ws + t] >> (2 * (i % 16))) & 3;
    case 1: return (w[(g->w0 + i / 32) * ws + t] >> (i % 32)) & 1;
    default: return ((w[(g->w0 + i / 16) * ws + t] >> (2 * (i % 16))) & 3)
                    | (((w[(g->w1 + i / 32) * ws + t] >> (i % 32)) & 1) << 2);
    }
}

#ifdef __AVX512F__
static inline __mmask16 lanes(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* Centroid-table indices of coordinates [i0, i0 + 8) (i0 % 8 == 0) for the 16 tokens at t:
 * x holds coordinate i0 + k's code in its low bits after k steps of `next`. */
typedef struct { __m512i x, x1; int bits; } octet_t;

static inline octet_t octet_load(const uint32_t *w, int64_t ws, const group_t *g, int i0, int64_t t, __mmask16 v) {
    octet_t o;
    o.bits = g->bits;
    const int per = 32 / (g->bits == 3 ? 2 : g->bits);
    o.x = _mm512_maskz_loadu_epi32(v, w + (g->w0 + i0 / per) * ws + t);
    o.x = _mm512_srl_epi32(o.x, _mm_cvtsi32_si128((i0 % per) * (g->bits == 3 ? 2 : g->bits)));
    o.x1 = _mm512_setzero_si512();
    if (g->bits == 3)
        o.x1 = _mm512_srl_epi32(_mm512_maskz_loadu_epi32(v, w + (g->w1 + i0 / 32) * ws + t), _mm_cvtsi32_si128(i0 % 32));
    return o;
}

static inline __m512 octet_lookup(const octet_t *o, __m512 table) {
    if (o->bits != 3) return _mm512_permutexvar_ps(o->x, table);
    /* index bits 0-1 from the 2-bit plane, bit 2 from the 1-bit plane: bitwise select */
    const __m512i idx = _mm512_ternarylogic_epi32(o->x, _mm512_slli_epi32(o->x1, 2), _mm512_set1_epi32(3), 0xE4);
    return _mm512_permutexvar_ps(idx, table);
}

static inline void octet_next(octet_t *o) {
    switch (o->bits) {
    case 4: o->x = _mm512_srli_epi32(o->x, 4); break;
    case 2: o->x = _mm512_srli_epi32(o->x, 2); break;
    case 1: o->x = _mm512_srli_epi32(o->x, 1); break;
    default: o->x = _mm512_srli_epi32(o->x, 2); o->x1 = _mm512_srli_epi32(o->x1, 1);
    }
}

/* s[m][t..t+16) = kn * <qr[m], centroids(t)> for MG query heads; constant MG after inlining
 * keeps the accumulators in registers. */
static inline __attribute__((always_inline)) void scores16(
    const uint32_t *w, int64_t ws, const group_t *gs, int ng, const __m512 *tables, const float *qr, int d,
    const float *kn, int64_t t, int64_t nc, float *s, int64_t len, const int MG) {
    const __mmask16 v = lanes(nc - t);
    __m512 acc[4];
    for (int m = 0; m < MG; m++) acc[m] = _mm512_setzero_ps();
    for (int gi = 0; gi < ng; gi++) {
        const group_t *g = gs + gi;
        for (int i0 = 0; i0 < g->n; i0 += 8) {
            octet_t o = octet_load(w, ws, g, i0, t, v);
            const int kn8 = g->n - i0 < 8 ? g->n - i0 : 8;
            for (int k = 0; k < kn8; k++) {
                const __m512 c = octet_lookup(&o, tables[gi]);
                for (int m = 0; m < MG; m++) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(qr[m * d + g->lo + i0 + k]), c, acc[m]);
                octet_next(&o);
            }
        }
    }
    const __m512 n = _mm512_maskz_loadu_ps(v, kn + t);
    for (int m = 0; m < MG; m++) _mm512_mask_storeu_ps(s + m * len + t, v, _mm512_mul_ps(acc[m], n));
}

/* orot[m][lo+i0+k] += sum over tokens [t0, t1) of pw[m][t] * centroid; MG <= 3 keeps the
 * 8 x MG accumulators in registers. */
static inline __attribute__((always_inline)) void values_octet(
    const uint32_t *w, int64_t ws, const group_t *g, int i0, __m512 table, const float *pw, int64_t len,
    int64_t t0, int64_t t1, float *orot, int d, const int MG) {
    __m512 acc[8][3];
    for (int k = 0; k < 8; k++)
        for (int m = 0; m < MG; m++) acc[k][m] = _mm512_setzero_ps();
    for (int64_t t = t0; t < t1; t += 16) {
        const __mmask16 v = lanes(t1 - t);
        octet_t o = octet_load(w, ws, g, i0, t, v);
        __m512 p[3];
        for (int m = 0; m < MG; m++) p[m] = _mm512_maskz_loadu_ps(v, pw + m * len + t);
        for (int k = 0; k < 8; k++) {
            const __m512 c = octet_lookup(&o, table);
            for (int m = 0; m < MG; m++) acc[k][m] = _mm512_fmadd_ps(p[m], c, acc[k][m]);
            octet_next(&o);
        }
    }
    const int kn8 = g->n - i0 < 8 ? g->n - i0 : 8;
    for (int k = 0; k < kn8; k++)
        for (int m = 0; m < MG; m++) orot[m * d + g->lo + i0 + k] += _mm512_reduce_add_ps(acc[k][m]);
}

static inline __m512 exp16(__m512 x) {  /* e^x for x <= 0, rel. error ~2e-7: 2^k * poly(r) */
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-80.f), _CMP_GE_OQ);  /* e^-80 ~ 2e-35: zero */
    x = _mm512_max_ps(x, _mm512_set1_ps(-80.f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, k));
}
#endif

/* s[m][t] = kn[t] * <qr[m], centroids(t)>, tokens [0, nc) of w, g query heads (qr [g, d]) */
static void coded_scores(const uint32_t *w, int64_t ws, const group_t *gs, int ng, const float *tables, int g,
                         const float *qr, int d, const float *kn, int64_t nc, float *s, int64_t len) {
#ifdef __AVX512F__
    __m512 tab[MAXGROUPS];
    for (int gi = 0; gi < ng; gi++) tab[gi] = _mm512_loadu_ps(tables + 16 * gi);
    for (int m0 = 0; m0 < g; m0 += 4) {
        const float *q = qr + m0 * d;
        float *sm = s + m0 * len;
        for (int64_t t = 0; t < nc; t += 16) {
            switch (g - m0 < 4 ? g - m0 : 4) {
            case 1: scores16(w, ws, gs, ng, tab, q, d, kn, t, nc, sm, len, 1); break;
            case 2: scores16(w, ws, gs, ng, tab, q, d, kn, t, nc, sm, len, 2); break;
            case 3: scores16(w, ws, gs, ng, tab, q, d, kn, t, nc, sm, len, 3); break;
            default: scores16(w, ws, gs, ng, tab, q, d, kn, t, nc, sm, len, 4);
            }
        }
    }
#else
    for (int m = 0; m < g; m++) memset(s + m * len, 0, sizeof(float) * nc);
    for (int gi = 0; gi < ng; gi++)
        for (int i = 0; i < gs[gi].n; i++)
            for (int64_t t = 0; t < nc; t++) {
                const float c = tables[16 * gi + code_at(w, ws, gs + gi, i, t)];
                for (int m = 0; m < g; m++) s[m * len + t] += qr[m * d + gs[gi].lo + i] * c;
            }
    for (int m = 0; m < g; m++)
        for (int64_t t = 0; t < nc; t++) s[m * len + t] *= kn[t];
#endif
}

/* orot[m][j] = sum_t pw[m][t] * centroid_j(t) for the coordinates [i0, i0 + 8) of group gi
 * (orot [g, d] zeroed by the caller), tokens [0, nc) */
static void coded_values(const uint32_t *w, int64_t ws, const group_t *gs, int gi, int i0, const float *tables,
                         int g, const float *pw, int64_t len, int64_t nc, float *orot, int d) {
    const group_t *gr = gs + gi;
#ifdef __AVX512F__
    const __m512 tab = _mm512_loadu_ps(tables + 16 * gi);
    for (int64_t t0 = 0; t0 < nc; t0 += BLK) {
        const int64_t t1 = nc - t0 < BLK ? nc : t0 + BLK;
        for (int m0 = 0; m0 < g; m0 += 3) {
            const float *p = pw + m0 * len;
            float *o = orot + m0 * d;
            switch (g - m0 < 3 ? g - m0 : 3) {
            case 1: values_octet(w, ws, gr, i0, tab, p, len, t0, t1, o, d, 1); break;
            case 2: values_octet(w, ws, gr, i0, tab, p, len, t0, t1, o, d, 2); break;
            default: values_octet(w, ws, gr, i0, tab, p, len, t0, t1, o, d, 3);
            }
        }
    }
#else
    for (int i = i0; i < i0 + 8 && i < gr->n; i++)
        for (int64_t t = 0; t < nc; t++) {
            const float c = tables[16 * gi + code_at(w, ws, gr, i, t)];
            for (int m = 0; m < g; m++) orot[m * d + gr->lo + i] += pw[m * len + t] * c;
        }
#endif
}

static void softmax_row(float *s, int64_t len) {
    float mx = -INFINITY, sum = 0.f;
    int64_t t = 0;
#ifdef __AVX512F__
    __m512 vm = _mm512_set1_ps(-INFINITY), vs = _mm512_setzero_ps();
    for (; t + 16 <= len; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + t));
    mx = _mm512_reduce_max_ps(vm);
    for (; t < len; t++) mx = s[t] > mx ? s[t] : mx;
    const __m512 bm = _mm512_set1_ps(mx);
    for (t = 0; t + 16 <= len; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), bm));
        _mm512_storeu_ps(s + t, e);
        vs = _mm512_add_ps(vs, e);
    }
    sum = _mm512_reduce_add_ps(vs);
#else
    for (; t < len; t++) mx = s[t] > mx ? s[t] : mx;
    t = 0;
#endif
    for (; t < len; t++) { s[t] = expf(s[t] - mx); sum += s[t]; }
    const float inv = 1.f / sum;
    for (t = 0; t < len; t++) s[t] *= inv;
}

static float half_to_float(uint16_t h) {
    const uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    float f;
    if (exp == 0) f = (float)mant * (1.f / 16777216.f);  /* zero / subnormal: mant * 2^-24 */
    else if (exp == 31) f = mant ? NAN : INFINITY;
    else {
        const uint32_t bits = ((exp + 112) << 23) | (mant << 13);  /* rebias 15 -> 127 */
        memcpy(&f, &bits, 4);
    }
    return (h & 0x8000) ? -f : f;
}

#define SCHUNK 512  /* tokens per scores task */

/* One decode step of one sequence and layer. The new token's k/v [hkv, d] are appended to the
 * exact window wk/wv [hkv, wcap, d] (nw tokens before the call); q [hq, d] * scale attends over
 * codes of tokens [lo, coded) and window entries [e0, nw + 1); then, if the window holds more
 * than `window` tokens, its oldest is encoded into token column `coded` and dropped. Work is
 * split over `threads` OpenMP threads by (head, token chunk), (head, query) and (head, octet).
 * scratch: hq * (nc + ne) + 2 * hkv * nc + 2 * hq * d floats. Returns the number of evicted
 * tokens (0 or 1), or -1 for sizes beyond the fixed limits. */
int tq_decode_step(const coded_t *c, int hq, int hkv, int d, const float *q, float scale, const float *k_new,
                   const float *v_new, float *wk, float *wv, int64_t wcap, int64_t nw, int64_t window,
                   int64_t lo, int64_t coded, int64_t e0, float *scratch, float *out, int threads) {
    const int g = hq / hkv;
    if (g > MAXG || d > MAXD || g * hkv != hq || c->ng > MAXGROUPS || nw + 1 > wcap) return -1;
    FTZ_BEGIN
    const int64_t nc = coded > lo ? coded - lo : 0, ne = nw + 1 - e0, len = nc + ne;
    float *sc = scratch, *kn = sc + (int64_t)hq * len, *vn = kn + hkv * nc, *qr = vn + hkv * nc, *orot = qr + hq * d;
    int noct = 0, octs[MAXD / 8 + MAXGROUPS][2];  /* (group, first coordinate) of every octet */
    for (int gi = 0; gi < c->ng; gi++)
        for (int i0 = 0; i0 < c->groups[gi].n; i0 += 8) octs[noct][0] = gi, octs[noct++][1] = i0;
    const int64_t nchunk = (nc + SCHUNK - 1) / SCHUNK;
    for (int h = 0; h < hkv; h++) {
        memcpy(wk + (h * wcap + nw) * d, k_new + h * d, sizeof(float) * d);
        memcpy(wv + (h * wcap + nw) * d, v_new + h * d, sizeof(float) * d);
    }
    memset(orot, 0, sizeof(float) * hq * d);
    for (int r = 0; r < hq; r++)  /* rotate the queries once: <q, k> = <q rt, k rt> */
        for (int j = 0; j < d; j++) {
            float x = 0.f;
            for (int i = 0; i < d; i++) x += q[r * d + i] * c->rt[i * d + j];
            qr[r * d + j] = x * scale;
        }
#pragma omp parallel num_threads(threads)
    {
        FTZ_BEGIN
#pragma omp for schedule(static)
        for (int64_t i = 0; i < hkv * nc; i++) {
            const int64_t h = i / nc, t = i % nc;
            kn[i] = half_to_float(c->kn[h * c->norm_stride + lo + t]);
            vn[i] = half_to_float(c->vn[h * c->norm_stride + lo + t]);
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < hkv * nchunk; task++) {
            const int h = (int)(task / nchunk);
            const int64_t t0 = (task % nchunk) * SCHUNK, n = nc - t0 < SCHUNK ? nc - t0 : SCHUNK;
            coded_scores(c->kw + h * c->head_stride + lo + t0, c->ws, c->groups, c->ng, c->tables, g,
                         qr + h * g * d, d, kn + h * nc + t0, n, sc + (int64_t)h * g * len + t0, len);
        }
#pragma omp for schedule(dynamic)
        for (int r = 0; r < hq; r++) {  /* exact window scores, softmax, fold in the value norms */
            const int h = r / g;
            const float *ek = wk + (h * wcap + e0) * d;
            float *s = sc + (int64_t)r * len;
            for (int64_t e = 0; e < ne; e++) {
                float dot = 0.f;
                for (int i = 0; i < d; i++) dot += q[r * d + i] * ek[e * d + i];
                s[nc + e] = dot * scale;
            }
            softmax_row(s, len);
            for (int64_t t = 0; t < nc; t++) s[t] *= vn[h * nc + t];
        }
#pragma omp for schedule(dynamic)
        for (int task = 0; task < hkv * noct; task++) {
            const int h = task / noct, o = task % noct;
            coded_values(c->vw + h * c->head_stride + lo, c->ws, c->groups, octs[o][0], octs[o][1], c->tables, g,
                         sc + (int64_t)h * g * len, len, nc, orot + h * g * d, d);
        }
        FTZ_END
    }
    for (int r = 0; r < hq; r++) {  /* rotate back once (x = x_rot rt^T), add the window's values */
        const float *ev = wv + ((r / g) * wcap + e0) * d, *pw = sc + (int64_t)r * len + nc;
        for (int i = 0; i < d; i++) {
            float x = 0.f;
            for (int j = 0; j < d; j++) x += orot[r * d + j] * c->rt[i * d + j];
            out[r * d + i] = x;
        }
        for (int64_t e = 0; e < ne; e++)
            for (int i = 0; i < d; i++) out[r * d + i] += pw[e] * ev[e * d + i];
    }
    FTZ_END
    if (nw + 1 <= window) return 0;
    for (int h = 0; h < hkv; h++) {  /* the oldest window token becomes codes */
        tq_encode_one(c, d, h, 0, wk + h * wcap * d, coded);
        tq_encode_one(c, d, h, 1, wv + h * wcap * d, coded);
        memmove(wk + h * wcap * d, wk + (h * wcap + 1) * d, sizeof(float) * d * nw);
        memmove(wv + h * wcap * d, wv + (h * wcap + 1) * d, sizeof(float) * d * nw);
    }
    return 1;
}
