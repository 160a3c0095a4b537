/* A prompt's attention in blocks: the scores of a block of keys stay in cache, never a [queries, keys] matrix.

n queries of one sequence at positions start .. start + n - 1 attend to the sequence's keys: query i
sees keys [lo_i, start + i], lo_i = 0, or start + i - window + 1 with a sliding window. torch's path
(kvcache/dense.py, causal_attention.py, sinks.py) writes every score of a query block against all its
keys to memory, masks it, takes the softmax in further passes and multiplies: with gpt-oss's sinks
16-25 G multiply-adds/s, and about half of an 8,192-token prompt's prefill (bench/attention_prefill.py).
Here (the online softmax of FlashAttention) a unit of ROWS rows = (query head of one KV head, query)
walks the keys in blocks of KB, the rows in vector lanes (a row's max, sum and scale are lane-wise, no
horizontal reductions; the queries are transposed once per unit, the keys read as they lie):
    S = scale * Q K_blk^T   (masked entries -inf),  m' = max(m, rowmax S),  c = exp(m - m'),
    P = exp(S - m') (masked: 0),  l = c l + rowsum P,  O = c O + P V_blk,  and at the end O / l.
A sink (gpt-oss) is a key with logit sinks[h] and no value: it starts the row at m = sink, l = 1.

Key blocks start at multiples of KB counted from position 0, whatever the call's queries, and a row's
operations depend only on its own query and the keys it sees: a fully masked block leaves m, l and O
exactly as they were (c = exp(0) = 1, P = 0). So a query's output has the same bits whichever chunk of
the prompt it is computed in and whichever other rows share its unit: chunked and layer-major prefill,
and a prefix-cached suffix, agree bit for bit. Against the reference (torch's masked softmax) the
values agree to fp32 rounding (another summation order; tests/test_attention_prefill.py). */
#include "decode_common.h"
/* fused multiply-adds here (5-10% on Zen 4, one process A/B): no torch op's rounding to match, and every
   call of this kernel still rounds a row the same way (GCC; other compilers keep separate roundings) */
#pragma GCC optimize("fp-contract=fast")

#define KB 64              /* keys per block */
#ifndef NV
#define NV 4               /* 16-lane vectors of rows per unit */
#endif
#define ROWS (16 * NV)     /* rows per unit: query heads of one KV head x queries (the keys are read once per unit) */
#define KT (16 / NV)       /* keys per register tile of scores (16 accumulators) */
#define RT 4               /* rows per register tile of the values' products */

typedef struct {
    const float *q, *keys, *values, *sinks;
    float *out;
    int64_t n, hq, qt, qh, hkv, cap, dh, dv, v_stride, start, window, ot, oh, g, ga, qb;
    float scale;
} pf_args;

/* S[j, 0..ROWS) = scale * (q_r . k_j) for keys j < kb of the block (rows in lanes): qt [dh, ROWS], k [kb, dh]. */
static void block_scores(const float *qt, const float *k, int64_t dh, int64_t kb, float scale, dk_v16 *s) {
    int64_t j = 0;
    for (; j + KT <= kb; j += KT) {
        dk_v16 acc[KT][NV] = {{{0}}};
        for (int64_t d = 0; d < dh; d++) {
            dk_v16 qv[NV];
            for (int c = 0; c < NV; c++) memcpy(&qv[c], qt + d * ROWS + 16 * c, sizeof(dk_v16));
            for (int t = 0; t < KT; t++) {
                const dk_v16 kd = DK_SPLAT16(k[(j + t) * dh + d]);
                for (int c = 0; c < NV; c++) acc[t][c] += kd * qv[c];
            }
        }
        for (int t = 0; t < KT; t++)
            for (int c = 0; c < NV; c++) s[NV * (j + t) + c] = acc[t][c] * DK_SPLAT16(scale);
    }
    for (; j < kb; j++) {  /* the same operations, one key at a time */
        dk_v16 acc[NV] = {{0}};
        for (int64_t d = 0; d < dh; d++) {
            const dk_v16 kd = DK_SPLAT16(k[j * dh + d]);
            for (int c = 0; c < NV; c++) {
                dk_v16 qv;
                memcpy(&qv, qt + d * ROWS + 16 * c, sizeof qv);
                acc[c] += kd * qv;
            }
        }
        for (int c = 0; c < NV; c++) s[NV * j + c] = acc[c] * DK_SPLAT16(scale);
    }
}

/* O[r, c0 .. c0 + 16 W) = c[r] O[r, ...] + sum_{j < kb} P[j, r] V[j, ...] for rows r0 .. r0 + RT, in j order. */
static inline __attribute__((always_inline)) void values_tile(const int W, float *o, int64_t dv, const float *p,
                                                              const float *c, int64_t r0, const float *v,
                                                              int64_t v_stride, int64_t kb, int64_t c0) {
    dk_v16 acc[RT][4];
    for (int r = 0; r < RT; r++)
        for (int w = 0; w < W; w++) {
            memcpy(&acc[r][w], o + (r0 + r) * dv + c0 + 16 * w, sizeof(dk_v16));
            acc[r][w] = acc[r][w] * DK_SPLAT16(c[r0 + r]);
        }
    for (int64_t j = 0; j < kb; j++) {
        dk_v16 vv[4];
        for (int w = 0; w < W; w++) memcpy(&vv[w], v + j * v_stride + c0 + 16 * w, sizeof(dk_v16));
        for (int r = 0; r < RT; r++) {
            const dk_v16 pj = DK_SPLAT16(p[j * ROWS + r0 + r]);
            for (int w = 0; w < W; w++) acc[r][w] += pj * vv[w];
        }
    }
    for (int r = 0; r < RT; r++)
        for (int w = 0; w < W; w++) memcpy(o + (r0 + r) * dv + c0 + 16 * w, &acc[r][w], sizeof(dk_v16));
}

/* One unit: KV head h, query heads a0 .. a0 + ga of its group, queries i0 .. i0 + qb; rows r = (query
   r / ga, head r % ga), padded to ROWS with copies of the last row (computed, not written). Scratch: qt
   [dh ROWS], s [KB ROWS] (scores, then probabilities), o [ROWS dv]. */
static void pf_unit(const pf_args *A, int64_t h, int64_t a0, int64_t i0, float *qt, dk_v16 *s, float *o) {
    const int64_t qb = A->qb < A->n - i0 ? A->qb : A->n - i0, nr = A->ga * qb;
    int64_t head[ROWS];
    float pos[ROWS], lo[ROWS], m[ROWS], l[ROWS];  /* positions as floats: exact below 2^24 */
    for (int64_t r = 0; r < ROWS; r++) {
        const int64_t rr = r < nr ? r : nr - 1, i = i0 + rr / A->ga, a = h * A->g + a0 + rr % A->ga, p = A->start + i;
        const float *qr = A->q + i * A->qt + a * A->qh;
        for (int64_t d = 0; d < A->dh; d++) qt[d * ROWS + r] = qr[d];
        pos[r] = (float)p;
        lo[r] = (float)(A->window > 0 && p - A->window + 1 > 0 ? p - A->window + 1 : 0);
        head[r] = a;
        m[r] = A->sinks ? A->sinks[a] : -INFINITY;  /* a sink: a key of that logit and no value */
        l[r] = A->sinks ? 1.0f : 0.0f;
    }
    memset(o, 0, sizeof(float) * (size_t)(ROWS * A->dv));
    const float *kh = A->keys + h * A->cap * A->dh, *vh = A->values + h * A->cap * A->v_stride;
    const int64_t first = (int64_t)lo[0] / KB * KB, last = (int64_t)pos[ROWS - 1];  /* rows ascend in position */
    for (int64_t j0 = first; j0 <= last; j0 += KB) {
        const int64_t kb = last + 1 - j0 < KB ? last + 1 - j0 : KB;
        block_scores(qt, kh + j0 * A->dh, A->dh, kb, A->scale, s);
        float c[ROWS];
        for (int half = 0; half < NV; half++) {  /* the online softmax, 16 rows per lane vector */
            dk_v16 vp, vl, vm, vs;
            memcpy(&vp, pos + 16 * half, sizeof vp);
            memcpy(&vl, lo + 16 * half, sizeof vl);
            memcpy(&vm, m + 16 * half, sizeof vm);
            memcpy(&vs, l + 16 * half, sizeof vs);
            dk_v16 mx = vm;
            for (int64_t j = 0; j < kb; j++) {
                const dk_v16 kp = DK_SPLAT16((float)(j0 + j));
                const dk_v16i vis = (kp >= vl) & (kp <= vp);
                dk_v16 *sj = s + NV * j + half;
                *sj = dk_blend16(vis, *sj, DK_SPLAT16(-INFINITY));
                mx = dk_blend16(*sj > mx, *sj, mx);
            }
            const dk_v16i none = mx == DK_SPLAT16(-INFINITY);  /* nothing visible yet: the row stays as it is */
            const dk_v16 base = dk_blend16(none, DK_SPLAT16(0.0f), mx);
            const dk_v16 cv = dk_blend16(none, DK_SPLAT16(1.0f), dk_exp16(vm - base));  /* exp(-inf) -> ~1e-38: O, l are 0 */
            dk_v16 sum = DK_SPLAT16(0.0f);
            for (int64_t j = 0; j < kb; j++) {
                dk_v16 *sj = s + NV * j + half;
                const dk_v16i vis = *sj > DK_SPLAT16(-INFINITY);
                *sj = dk_blend16(vis, dk_exp16(*sj - base), DK_SPLAT16(0.0f));
                sum += *sj;
            }
            vs = vs * cv + sum;
            memcpy(l + 16 * half, &vs, sizeof vs);
            memcpy(m + 16 * half, &mx, sizeof mx);
            memcpy(c + 16 * half, &cv, sizeof cv);
        }
        const float *p = (const float *)s, *vb = vh + j0 * A->v_stride;
        for (int64_t r0 = 0; r0 < ROWS; r0 += RT)
            for (int64_t c0 = 0; c0 < A->dv; c0 += 64) {
                const int64_t w = (A->dv - c0) / 16 < 4 ? (A->dv - c0) / 16 : 4;
                if (w == 4) values_tile(4, o, A->dv, p, c, r0, vb, A->v_stride, kb, c0);
                else if (w == 3) values_tile(3, o, A->dv, p, c, r0, vb, A->v_stride, kb, c0);
                else if (w == 2) values_tile(2, o, A->dv, p, c, r0, vb, A->v_stride, kb, c0);
                else values_tile(1, o, A->dv, p, c, r0, vb, A->v_stride, kb, c0);
            }
    }
    for (int64_t r = 0; r < nr; r++) {
        float *dst = A->out + (i0 + r / A->ga) * A->ot + head[r] * A->oh;
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < A->dv; d++) dst[d] = o[r * A->dv + d] * inv;
    }
}

/* q: query i, head a at q + i qt + a qh (Dh contiguous); keys [Hkv, cap, Dh], values [Hkv, cap, v_stride]
   (values may point into keys: MLA's values-in-keys), the n queries' own keys already written at rows
   start ..; window 0: none; sinks [Hq] or NULL; out: query i, head a at out + i ot + a oh (Dv contiguous).
   Dh and Dv multiples of 16. 0, -1 (bad shape) or -2 (no memory). */
int dk_attend_prefill(const float *q, int64_t n, int64_t hq, int64_t qt, int64_t qh, const float *keys,
                      const float *values, int64_t hkv, int64_t cap, int64_t dh, int64_t dv, int64_t v_stride,
                      int64_t start, int64_t window, float scale, const float *sinks, float *out, int64_t ot,
                      int64_t oh, int nthreads) {
    if (n <= 0 || hkv <= 0 || hq % hkv || dh % 16 || dv % 16 || dv > v_stride || start < 0 || start + n > cap ||
        window < 0 || start + n >= (1 << 24))
        return -1;
    pf_args A = {q, keys, values, sinks, out, n, hq, qt, qh, hkv, cap, dh, dv, v_stride, start, window, ot, oh,
                 hq / hkv, 0, 0, scale};
    A.ga = A.g < ROWS ? A.g : ROWS;
    while (A.g % A.ga) A.ga--;  /* head subgroups of equal size (a group of 3: 21 queries x 3 heads + 1 padding row) */
    A.qb = ROWS / A.ga;
    const int64_t nsub = A.g / A.ga, nqb = (n + A.qb - 1) / A.qb, units = hkv * nsub * nqb;
    const int nt = nthreads > 1 && units > 1 ? nthreads : 1;
    int bad = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : bad)
    {
        float *qt = (float *)malloc(sizeof(float) * (size_t)(A.dh * ROWS + ROWS * dv));
        dk_v16 *s = (dk_v16 *)aligned_alloc(64, sizeof(dk_v16) * NV * KB);
        bad = !qt || !s;
        /* the last query blocks see the most keys: handed out first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            if (!qt || !s) continue;
            const int64_t qbi = nqb - 1 - u / (hkv * nsub), rest = u % (hkv * nsub);
            pf_unit(&A, rest / nsub, rest % nsub * A.ga, qbi * A.qb, qt, s, qt + A.dh * ROWS);
        }
        free(qt);
        free(s);
    }
    return bad ? -2 : 0;
}
