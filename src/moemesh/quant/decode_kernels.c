/* The small fp32 steps of a forward pass between the matmuls, one C call each instead of several torch
 * ops on tiny tensors (a decode token of a small model pays ~5 us of dispatch per op and has dozens
 * per layer). Plain C that the compiler vectorizes (-O3 -march=native); built by quant/native.py with
 * -ffp-contract=off so a*b + c*d rounds like torch's separate products and sum (the rotary embedding
 * is then bit for bit torch's). Each row or head is computed independently of the others (no
 * dependence on how many rows a call has: batched == alone).
 *
 * dk_rms_norm     rows of x -> x * w / sqrt(mean(x^2) + eps)
 * dk_rope         rotate-half rotary embedding in place on [T, H, Dh] (HF checkpoints' convention)
 * dk_attend_one   one query token: append its k/v to a sequence's cache buffers at `pos`, attend over
 *                 the visible run [lo, pos] (GQA without repeating K/V; optional per-head sink logits)
 * dk_attend_batch one query token of each of B sequences: dk_attend_one per sequence, sequences shared
 *                 out over the threads
 * dk_heads_i8     per-head matrix-vector products with int8 weights (MLA's absorbed per-head matrices)
 * dk_router_topk  a softmax router's top k per row (logits, softmax over the experts, selection, renormalisation)
 * dk_router_logits_topk  gpt-oss's: biased logits, top k, softmax over the k
 * dk_add          x += y in place (a residual connection without a new tensor)
 * (the output head's greedy sampler and rescoring: head_kernels.c; a whole planned token: decode_step.c)
 */
#include "decode_common.h"

int dk_simd(void) { return 1; }

void dk_rms_norm(const float *x, int64_t rows, int64_t dim, int64_t sx, const float *w, float eps,
                 float *y, int64_t sy) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * sx;
        float *yr = y + r * sy;
        float inv = 1.0f / sqrtf(dk_dot(xr, xr, dim) / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) yr[i] = (xr[i] * inv) * w[i];
    }
}

/* x [T, H, Dh] at strides (st, sh) (elements; Dh contiguous), cos/sin [T, Dh] contiguous (cat(f, f)):
 * x = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[half:], x[:half]). */
void dk_rope(float *x, int64_t t, int64_t h, int64_t dh, int64_t st, int64_t sh, const float *cos_,
             const float *sin_) {
    int64_t half = dh / 2;
    for (int64_t i = 0; i < t; i++) {
        const float *c = cos_ + i * dh, *s = sin_ + i * dh;
        for (int64_t j = 0; j < h; j++) {
            float *v = x + i * st + j * sh;
            for (int64_t d = 0; d < half; d++) {
                float a = v[d], b = v[d + half];
                float lo = a * c[d] + (-b) * s[d];
                float hi = b * c[d + half] + a * s[d + half];
                v[d] = lo;
                v[d + half] = hi;
            }
        }
    }
}

/* a . b over n (a multiple of 8): eight lane sums over the chunks in order, then a fixed tree. One
 * accumulator: a score's adds form a short chain, and the key loop around it has many independent ones. */
static inline float dk_dot8(const float *a, const float *b, int64_t n) {
    dk_v8 acc = {0};
    for (int64_t i = 0; i < n; i += 8) acc += dk_load8(a + i) * dk_load8(b + i);
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* out [8 C8] = sum over j < n, in order, of p[j] * v[j] (v rows v_stride apart), from 0. */
static inline __attribute__((always_inline)) void head_values(const int C8, const float *p, int64_t n,
                                                               const float *v, int64_t v_stride, float *out) {
    dk_v8 o[16] = {{0}};
    for (int64_t j = 0; j < n; j++) {
        const dk_v8 pj = {p[j], p[j], p[j], p[j], p[j], p[j], p[j], p[j]};
        for (int c = 0; c < C8; c++) o[c] += pj * dk_load8(v + j * v_stride + 8 * c);
    }
    memcpy(out, o, sizeof(float) * 8 * (size_t)C8);
}

/* One KV head's group of G query heads over keys [lo, end): scores, softmax (with sinks), values.
 * A head's output is summed over the keys in order, 0 + p0 v0 + p1 v1 + ...; with Dv 64 or 128 in
 * registers, one head at a time (its value rows come from cache for the next head), else in the output
 * row: the same operations either way. */
static void attend_group(const float *q, int64_t g, int64_t dh, const float *keys, const float *values,
                         int64_t v_stride, int64_t dv, int64_t lo, int64_t end, float scale,
                         const float *sinks, float *out, float *scores) {
    int64_t n = end - lo;
    for (int64_t j = 0; j < n; j++) {  /* each key row read once for the whole group */
        const float *k = keys + (lo + j) * dh;
        for (int64_t a = 0; a < g; a++)
            scores[a * n + j] = (dh % 8 ? dk_dot(q + a * dh, k, dh) : dk_dot8(q + a * dh, k, dh)) * scale;
    }
    for (int64_t a = 0; a < g; a++) {
        float *s = scores + a * n;
        float m = sinks ? sinks[a] : -INFINITY;
        for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
        for (int64_t j = 0; j < n; j++) s[j] = dk_exp(s[j] - m);  /* (apart from the sum: this loop vectorizes) */
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) sum += s[j];
        if (sinks) sum += dk_exp(sinks[a] - m);
        float inv = 1.0f / sum;
        for (int64_t j = 0; j < n; j++) s[j] *= inv;
        memset(out + a * dv, 0, sizeof(float) * (size_t)dv);
    }
    if (dv == 64 || dv == 128) {  /* (a constant chunk count: the sums stay in registers) */
        for (int64_t a = 0; a < g; a++)
            if (dv == 64)
                head_values(8, scores + a * n, n, values + lo * v_stride, v_stride, out + a * dv);
            else
                head_values(16, scores + a * n, n, values + lo * v_stride, v_stride, out + a * dv);
        return;
    }
    for (int64_t j = 0; j < n; j++) {  /* each value row read once for the whole group */
        const float *v = values + (lo + j) * v_stride;
        for (int64_t a = 0; a < g; a++) {
            float p = scores[a * n + j];
            float *o = out + a * dv;
            for (int64_t d = 0; d < dv; d++) o[d] += p * v[d];
        }
    }
}

/* q [Hq, Dh] contiguous; k_new [Hkv, Dh] / v_new [Hkv, Dv] (head strides ks / vs; NULL: nothing to write);
 * keys [Hkv, cap, Dh], values [Hkv, cap, v_stride] contiguous buffers (values may point into keys:
 * MLA's values-in-keys, v_stride = Dh); the new token goes to row `pos`; attention over rows
 * [lo, end); sinks [Hq] or NULL; out [Hq, Dv] contiguous. Returns 0, or -1 on a bad shape. */
int dk_attend_one(const float *q, int64_t hq, const float *k_new, int64_t ks, const float *v_new, int64_t vs,
                  float *keys, float *values, int64_t hkv, int64_t cap, int64_t dh, int64_t dv, int64_t v_stride,
                  int64_t pos, int64_t lo, int64_t end, float scale, const float *sinks, float *out,
                  int nthreads) {
    if (hkv <= 0 || hq % hkv || pos < 0 || pos >= cap || lo < 0 || lo >= end || end > cap || dv > v_stride)
        return -1;
    int64_t g = hq / hkv, n = end - lo;
    for (int64_t h = 0; h < hkv; h++) {
        if (k_new) memcpy(keys + (h * cap + pos) * dh, k_new + h * ks, sizeof(float) * (size_t)dh);
        if (v_new) memcpy(values + (h * cap + pos) * v_stride, v_new + h * vs, sizeof(float) * (size_t)dv);
    }
    /* threads only when each has real work (a region costs a few microseconds) */
    int nt = (n * hkv * (dh + dv) >= (1 << 16) && nthreads > 1) ? (int)(nthreads < hq ? nthreads : hq) : 1;
    /* work units: whole KV groups (each key row read once per group), or single query heads when the groups
       do not split evenly over the threads (3 KV heads on 2 threads: one thread would do two thirds). A head's
       arithmetic is the same either way (attend_group is per query head in each of its loops): same bits. */
    const int64_t per = (nt > 1 && hkv % nt) ? 1 : g, units = hq / per;
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t u = 0; u < units; u++) {
        const int64_t h = u * per / g;  /* the unit's KV head */
        float stack[2048];
        float *scores = per * n <= 2048 ? stack : (float *)malloc(sizeof(float) * (size_t)(per * n));
        if (!scores) {
            bad = 1;
            continue;
        }
        attend_group(q + u * per * dh, per, dh, keys + h * cap * dh, values + h * cap * v_stride, v_stride, dv, lo,
                     end, scale, sinks ? sinks + u * per : NULL, out + u * per * dv, scores);
        if (scores != stack) free(scores);
    }
    return bad ? -2 : 0;
}

/* B decode tokens, one per sequence: sequence i's q at q + i qs [Hq, Dh], its new k/v at k_new + i kbs /
 * v_new + i vbs (head strides ks / vs; NULL: values live in the keys), its buffers at keys[i] / values[i]
 * (addresses) with capacity caps[i], its token at row pos[i], attention over [lo[i], pos[i]]; out [B, Hq, Dv].
 * Each sequence is dk_attend_one on one thread (the same bits as alone); the threads take whole sequences.
 * 0, or -1 if any sequence's shapes are bad. */
int dk_attend_batch(int64_t b, const float *q, int64_t qs, int64_t hq, const float *k_new, int64_t kbs, int64_t ks,
                    const float *v_new, int64_t vbs, int64_t vs, const int64_t *keys, const int64_t *values,
                    const int64_t *caps, const int64_t *pos, const int64_t *lo, int64_t hkv, int64_t dh, int64_t dv,
                    int64_t v_stride, float scale, const float *sinks, float *out, int nthreads) {
    int64_t work = 0;
    for (int64_t i = 0; i < b; i++) work += pos[i] + 1 - lo[i];
    int nt = (work * hkv * (dh + dv) >= (1 << 16) && nthreads > 1) ? (int)(nthreads < b ? nthreads : b) : 1;
    int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1) reduction(| : bad)
    for (int64_t i = 0; i < b; i++)
        bad |= dk_attend_one(q + i * qs, hq, k_new ? k_new + i * kbs : NULL, ks, v_new ? v_new + i * vbs : NULL, vs,
                             (float *)(uintptr_t)keys[i], (float *)(uintptr_t)values[i], hkv, caps[i], dh, dv, v_stride,
                             pos[i], lo[i], pos[i] + 1, scale, sinks, out + i * hq * dv, 1) != 0;
    return bad ? -1 : 0;
}

/* sum of x[i] * (float)q[i] in LANES partial sums */
static inline float dk_dot_i8(const float *x, const int8_t *q, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l] * (float)q[i + l];
    float tail = 0.0f;
    for (; i < n; i++) tail += x[i] * (float)q[i];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s + tail;
}

/* dk_dot_i8 of four vectors against one q: each weight converted once for the four, each sum the same
 * operations in the same order as dk_dot_i8 alone (the same bits). out[4]. */
static inline void dk_dot_i8_x4(const float *const *x, const int8_t *q, int64_t n, float *out) {
    float acc[4][LANES] = {{0}};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            const float w = (float)q[i + l];
            for (int r = 0; r < 4; r++) acc[r][l] += x[r][i + l] * w;
        }
    for (int r = 0; r < 4; r++) {
        float tail = 0.0f;
        for (int64_t j = i; j < n; j++) tail += x[r][j] * (float)q[j];
        float s = 0.0f;
        for (int l = 0; l < LANES; l++) s += acc[r][l];
        out[r] = s + tail;
    }
}

/* y[t, h, j] = s[h, j] * sum_i x[t, h, i] * w[h, j, i]: H independent [N, K] int8 matrices (per-row
 * fp32 scales), each applied to its own K-vector of every token. x [T, H, K] at strides (xt, xh), K
 * contiguous; w [H, N, K], s [H, N] contiguous; y [T, H, N] contiguous. Heads outer, tokens inner:
 * a head's matrix is read from memory once per call, whatever T is; tokens in fours share each row's
 * loads and conversions (MLA's prefill: ~3x, the bits of one token at a time). */
void dk_heads_i8(const float *x, int64_t t, int64_t h, int64_t k, int64_t xt, int64_t xh, const int8_t *w,
                 const float *s, int64_t n, float *y, int nthreads) {
    int nt = (h * n * k >= (1 << 18) && nthreads > 1) ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t hh = 0; hh < h; hh++) {
        const int8_t *wh = w + hh * n * k;
        const float *sh = s + hh * n;
        int64_t tt = 0;
        for (; tt + 4 <= t; tt += 4) {
            const float *xv[4] = {x + tt * xt + hh * xh, x + (tt + 1) * xt + hh * xh, x + (tt + 2) * xt + hh * xh,
                                  x + (tt + 3) * xt + hh * xh};
            for (int64_t j = 0; j < n; j++) {
                float d[4];
                dk_dot_i8_x4(xv, wh + j * k, k, d);
                for (int r = 0; r < 4; r++) y[((tt + r) * h + hh) * n + j] = sh[j] * d[r];
            }
        }
        for (; tt < t; tt++) {
            const float *xv = x + tt * xt + hh * xh;
            float *yv = y + (tt * h + hh) * n;
            for (int64_t j = 0; j < n; j++) yv[j] = sh[j] * dk_dot_i8(xv, wh + j * k, k);
        }
    }
}

/* A softmax top-k router on rows of x [T, D] (row stride sx): logits = x W^T (W [E, D] contiguous, each
 * one dk_dot), p = softmax over the E logits (exp(l - max) / sum, the sum in expert order), the k largest
 * in descending order (equal values: the lower expert id first), renormalised to sum 1 when norm (their
 * sum in that order). ids int64 [T, k], wout fp32 [T, k]. Rows are independent (the bits of a row do not
 * depend on T). 0, or -1 on a bad shape (k outside [1, E], E above DK_MAX_EXPERTS). */
#define DK_MAX_EXPERTS 4096
int dk_router_topk(const float *x, int64_t t, int64_t d, int64_t sx, const float *w, int64_t e, int64_t k,
                   int norm, int64_t *ids, float *wout, int nthreads) {
    if (k < 1 || k > e || e > DK_MAX_EXPERTS) return -1;
    int nt = (t * e * d >= (1 << 20) && nthreads > 1) ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < t; r++) {
        float p[DK_MAX_EXPERTS];
        const float *xr = x + r * sx;
        float m = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < e; j++) {
            p[j] = dk_dot(xr, w + j * d, d);
            m = p[j] > m ? p[j] : m;
        }
        for (int64_t j = 0; j < e; j++) {
            p[j] = dk_exp(p[j] - m);
            sum += p[j];
        }
        for (int64_t j = 0; j < e; j++) p[j] = p[j] / sum;
        int64_t *ir = ids + r * k;
        float *wr = wout + r * k, picked = 0.0f;
        for (int64_t i = 0; i < k; i++) {  /* selection: k passes (k and E are small) */
            int64_t best = -1;
            for (int64_t j = 0; j < e; j++)
                if (p[j] != -1.0f && (best < 0 || p[j] > p[best])) best = j;  /* (NaN: the first untaken) */
            ir[i] = best;
            wr[i] = p[best];
            picked += p[best];
            p[best] = -1.0f;  /* taken (a probability is never -1) */
        }
        if (norm)
            for (int64_t i = 0; i < k; i++) wr[i] = wr[i] / picked;
    }
    return 0;
}

/* gpt-oss's router (layers/gpt_oss_moe.LogitTopKRouter) per row: logits x . w_j (+ b_j), the k largest
 * (ties to the lower id), then a softmax over those k (exp(l - l_max) / sum, in selection order). */
int dk_router_logits_topk(const float *x, int64_t t, int64_t d, int64_t sx, const float *w, const float *b, int64_t e,
                          int64_t k, int64_t *ids, float *wout, int nthreads) {
    if (k < 1 || k > e || e > DK_MAX_EXPERTS) return -1;
    int nt = (t * e * d >= (1 << 20) && nthreads > 1) ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < t; r++) {
        float p[DK_MAX_EXPERTS];
        char taken[DK_MAX_EXPERTS];
        const float *xr = x + r * sx;
        for (int64_t j = 0; j < e; j++) {
            p[j] = dk_dot(xr, w + j * d, d);
            if (b) p[j] = p[j] + b[j];
            taken[j] = 0;
        }
        int64_t *ir = ids + r * k;
        float *wr = wout + r * k, sum = 0.0f;
        for (int64_t i = 0; i < k; i++) {  /* selection: k passes (NaN: the first untaken) */
            int64_t best = -1;
            for (int64_t j = 0; j < e; j++)
                if (!taken[j] && (best < 0 || p[j] > p[best])) best = j;
            ir[i] = best;
            wr[i] = p[best];
            taken[best] = 1;
        }
        const float m = wr[0];
        for (int64_t i = 0; i < k; i++) {
            wr[i] = dk_exp(wr[i] - m);
            sum += wr[i];
        }
        for (int64_t i = 0; i < k; i++) wr[i] = wr[i] / sum;
    }
    return 0;
}

void dk_add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] + y[i];
}
