/* One decode token of one sequence through every layer in one call (engine/decode_step.py).

The planned decode (engine/decode_plan.py) made each layer a handful of pre-bound C calls; what was
left per token was Python: ~12 ctypes calls, their argument conversion and the attribute lookups
around them per layer, ~1/3 of a one-thread decode step of the 30-layer demo MoE on a Zen 4 (perf),
and on two threads the worker waits through all of it. Here the same calls, with the same arguments
in the same order, run from one C loop over a table of layers built once: the same bits as the
planned path (tests/test_decode_step.py), without the Python between them.

The int4 matmuls live in another library (quant/int4_native: one build per ISA and activation
precision), so each layer carries pointers to the functions its linears' own library exports. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void dk_rms_norm(const float *x, int64_t rows, int64_t dim, int64_t sx, const float *w, float eps, float *y,
                 int64_t sy);
void dk_rope(float *x, int64_t t, int64_t h, int64_t dh, int64_t st, int64_t sh, const float *cos_, const float *sin_);
int dk_attend_one(const float *q, int64_t hq, const float *k_new, int64_t ks, const float *v_new, int64_t vs,
                  float *keys, float *values, int64_t hkv, int64_t cap, int64_t dh, int64_t dv, int64_t v_stride,
                  int64_t pos, int64_t lo, int64_t end, float scale, const float *sinks, float *out, int nthreads);
int dk_attend_batch(int64_t b, const float *q, int64_t qs, int64_t hq, const float *k_new, int64_t kbs, int64_t ks,
                    const float *v_new, int64_t vbs, int64_t vs, const int64_t *keys, const int64_t *values,
                    const int64_t *caps, const int64_t *pos, const int64_t *lo, int64_t hkv, int64_t dh, int64_t dv,
                    int64_t v_stride, float scale, const float *sinks, float *out, int nthreads);
int dk_router_topk(const float *x, int64_t t, int64_t d, int64_t sx, const float *w, int64_t e, int64_t k, int norm,
                   int64_t *ids, float *wout, int nthreads);
int dk_router_logits_topk(const float *x, int64_t t, int64_t d, int64_t sx, const float *w, const float *b, int64_t e,
                          int64_t k, int64_t *ids, float *wout, int nthreads);
void dk_add(float *x, const float *y, int64_t n);

typedef int (*i4_matmul_fn)(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *qw, const uint16_t *sz,
                            int fmt, int64_t n_pad, float *y, int nthreads);
typedef int (*i4_moe_fn)(const float *x, int64_t d, int64_t inter, int64_t a, const int64_t *ids, const float *w,
                         const int64_t *table, int64_t num_experts, int64_t gu_npad, int64_t dn_npad, int fmt,
                         const void *epi, float *out, int nthreads);
typedef int (*i4_moe_batch_fn)(const float *x, int64_t t, int64_t d, int64_t inter, int64_t a, const int64_t *ids,
                               const float *w, const int64_t *table, int64_t num_experts, int64_t gu_npad,
                               int64_t dn_npad, int fmt, const void *epi, float *out, int nthreads);
typedef int (*i4_silu_rows_fn)(float *h, int64_t m, int64_t ld, int64_t inter);
typedef int (*i4_ffn_fn)(const float *x, int64_t d, int64_t inter, int64_t n, const uint8_t *const *gu_q,
                         const uint16_t *const *gu_sz, int64_t gu_npad, const uint8_t *const *dn_q,
                         const uint16_t *const *dn_sz, int64_t dn_npad, int fmt, const void *epi, float *y,
                         int nthreads);

enum { FFN_MOE = 1, FFN_MLP = 2 };
enum { ROUTER_SOFTMAX = 0, ROUTER_LOGITS = 1 };  /* TopKRouter; gpt-oss's: biased logits, top k, softmax over k */

/* One layer; mirrored field for field by engine/decode_step.Layer (ctypes). */
typedef struct {
    i4_matmul_fn qkv_fn, o_fn;
    void *ffn_fn;                    /* i4_moe_fn (FFN_MOE) or i4_ffn_fn (FFN_MLP) */
    void *ffn_batch_fn;              /* i4_moe_batch_fn (FFN_MOE) or i4_silu_rows_fn (FFN_MLP) */
    const float *attn_norm, *q_norm, *k_norm, *sinks, *ffn_norm, *router;  /* q/k_norm, sinks: NULL if none */
    const float *qkv_b, *o_b, *router_b;  /* the projections' and router's biases, NULL if none */
    const void *epi;                 /* the experts' act and biases (int4_kernel.h i4_epi), NULL: plain SwiGLU */
    const uint8_t *qkv_q, *o_q;
    const uint16_t *qkv_s, *o_s;
    const int64_t *table;            /* experts' [E, 4] pointer table, or the MLP's [4] */
    int64_t qkv_npad, o_npad, qkv_fmt, o_fmt;
    int64_t hq, hkv, dh, window;     /* window 0: none */
    int64_t ffn_kind, router_kind, n_exp, top_k, norm_topk, inter, gu_npad, dn_npad, ffn_fmt;
    float attn_eps, q_eps, k_eps, scale, ffn_eps, pad_;
} dk_layer;

/* The layer's router on rows h [t, D] (TopKRouter's or gpt-oss's C call, as its module's forward). */
static int route(const dk_layer *L, const float *h, int64_t t, int64_t d, int64_t *ids, float *w, int nthreads) {
    if (L->router_kind == ROUTER_LOGITS)
        return dk_router_logits_topk(h, t, d, d, L->router, L->router_b, L->n_exp, L->top_k, ids, w, nthreads);
    return dk_router_topk(h, t, d, d, L->router, L->n_exp, L->top_k, (int)L->norm_topk, ids, w, nthreads);
}

/* x fp32 [D]: the token's embedding in, its last hidden state out (in place). layers [n]; kv int64 [n, 4]
   per layer this step: keys address, values address, capacity, values' row stride; dv: the cache's
   value dim; cos/sin [Dh] of position pos. Returns 0, or 1 + 16 * layer + what failed (1 qkv, 2
   attention, 3 o, 4 router, 5 experts / MLP) so the caller can say which layer; -1 without memory. */
int dk_decode_layers(float *x, int64_t d, const dk_layer *layers, int64_t n, const int64_t *kv, int64_t dv,
                     const float *cos_, const float *sin_, int64_t pos, int nthreads) {
    int64_t wq = 0, wo = 0, wa = 0, wk = 0, wy = d;
    for (int64_t i = 0; i < n; i++) {
        const dk_layer *L = layers + i;
        wq = L->qkv_npad > wq ? L->qkv_npad : wq;
        wo = L->o_npad > wo ? L->o_npad : wo;
        wa = L->hq * (L->dh > dv ? L->dh : dv) > wa ? L->hq * (L->dh > dv ? L->dh : dv) : wa;
        wk = L->top_k > wk ? L->top_k : wk;
        wy = L->dn_npad > wy ? L->dn_npad : wy;
    }
    /* h [D], qkv [wq], q and k normed copies [wa] x2, attention out [wa], o [wo], FFN out [wy], weights [wk] */
    float *buf = (float *)malloc(sizeof(float) * (size_t)(d + wq + 3 * wa + wo + wy + wk + 1));
    int64_t *ids = (int64_t *)malloc(sizeof(int64_t) * (size_t)(wk + 1));
    if (!buf || !ids) {
        free(buf), free(ids);
        return -1;
    }
    float *h = buf, *qkv = h + d, *qn = qkv + wq, *kn = qn + wa, *att = kn + wa, *o = att + wa, *y = o + wo,
          *w = y + wy;
    int rc = 0;
    for (int64_t i = 0; i < n && !rc; i++) {
        const dk_layer *L = layers + i;
        const int64_t hq = L->hq, hkv = L->hkv, dh = L->dh, *c = kv + 4 * i;
        const int fail = (int)(1 + 16 * i);
        /* attention block (decode_plan.AttentionPlan) */
        dk_rms_norm(x, 1, d, d, L->attn_norm, L->attn_eps, h, d);
        if (L->qkv_fn(h, 0, 1, d, L->qkv_q, L->qkv_s, (int)L->qkv_fmt, L->qkv_npad, qkv, nthreads)) {
            rc = fail + 1;
            break;
        }
        if (L->qkv_b) dk_add(qkv, L->qkv_b, (hq + 2 * hkv) * dh);
        float *q = qkv, *k = qkv + hq * dh, *v = qkv + (hq + hkv) * dh;
        if (L->q_norm) {  /* per head, over Dh */
            dk_rms_norm(qkv, hq, dh, dh, L->q_norm, L->q_eps, qn, dh);
            dk_rms_norm(qkv + hq * dh, hkv, dh, dh, L->k_norm, L->k_eps, kn, dh);
            q = qn, k = kn;
        }
        dk_rope(q, 1, hq, dh, hq * dh, dh, cos_, sin_);
        dk_rope(k, 1, hkv, dh, hkv * dh, dh, cos_, sin_);
        const int64_t lo = L->window <= 0 ? 0 : (pos + 1 - L->window > 0 ? pos + 1 - L->window : 0);
        if (dk_attend_one(q, hq, k, dh, v, dh, (float *)(intptr_t)c[0], (float *)(intptr_t)c[1], hkv, c[2], dh, dv,
                          c[3], pos, lo, pos + 1, L->scale, L->sinks, att, nthreads)) {
            rc = fail + 2;
            break;
        }
        if (L->o_fn(att, 0, 1, hq * dv, L->o_q, L->o_s, (int)L->o_fmt, L->o_npad, o, nthreads)) {
            rc = fail + 3;
            break;
        }
        if (L->o_b) dk_add(o, L->o_b, d);
        dk_add(x, o, d);
        /* FFN block (decode_plan.FfnPlan) */
        dk_rms_norm(x, 1, d, d, L->ffn_norm, L->ffn_eps, h, d);
        if (L->ffn_kind == FFN_MOE) {
            if (route(L, h, 1, d, ids, w, nthreads)) {
                rc = fail + 4;
                break;
            }
            if (((i4_moe_fn)L->ffn_fn)(h, d, L->inter, L->top_k, ids, w, L->table, L->n_exp, L->gu_npad, L->dn_npad,
                                       (int)L->ffn_fmt, L->epi, y, nthreads)) {
                rc = fail + 5;
                break;
            }
        } else if (((i4_ffn_fn)L->ffn_fn)(h, d, L->inter, 1, (const uint8_t *const *)L->table,
                                          (const uint16_t *const *)(L->table + 1), L->gu_npad,
                                          (const uint8_t *const *)(L->table + 2),
                                          (const uint16_t *const *)(L->table + 3), L->dn_npad, (int)L->ffn_fmt,
                                          L->epi, y, nthreads)) {
            rc = fail + 5;
            break;
        }
        dk_add(x, y, d);
    }
    free(buf), free(ids);
    return rc;
}

/* A batched decode step: one token of each of b sequences, x fp32 [b, D] in and out. The modules' batched
   forward (int4 matmuls over b rows, attention as dk_attend_batch, the MoE layer as i4_moe_batch, a dense
   MLP as gate_up, silu over the rows, down) as C calls, so each row has those bits, which are also its bits
   alone (every kernel is row-invariant). kv int64 [n, 3, b]: per layer the sequences' keys and values
   addresses and capacities; v_stride: the values' row stride; pos [b]; cos/sin [b, Dh]. Returns as
   dk_decode_layers. */
int dk_decode_layers_batch(float *x, int64_t b, int64_t d, const dk_layer *layers, int64_t n, const int64_t *kv,
                           int64_t dv, int64_t v_stride, const float *cos_, const float *sin_, const int64_t *pos,
                           int nthreads) {
    int64_t wq = 0, wo = 0, wa = 0, wk = 1, wy = d, wm = 0;
    for (int64_t i = 0; i < n; i++) {
        const dk_layer *L = layers + i;
        const int64_t a = L->hq * (L->dh > dv ? L->dh : dv);
        wq = L->qkv_npad > wq ? L->qkv_npad : wq;
        wo = L->o_npad > wo ? L->o_npad : wo;
        wa = a > wa ? a : wa;
        wk = L->top_k > wk ? L->top_k : wk;
        wy = L->dn_npad > wy ? L->dn_npad : wy;
        wm = L->ffn_kind == FFN_MLP && L->gu_npad > wm ? L->gu_npad : wm;
    }
    /* per row: h [D], qkv [wq], normed q, k [wa] x2, attention out [wa], o [wo], FFN out [wy], gate_up [wm],
       activation [wm], router weights [wk]; and ids [b, wk], lo [b] */
    const int64_t row = d + wq + 3 * wa + wo + wy + 2 * wm + wk;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(b * row + 1));
    int64_t *ids = (int64_t *)malloc(sizeof(int64_t) * (size_t)(b * wk + b + 1));
    if (!buf || !ids) {
        free(buf), free(ids);
        return -1;
    }
    float *h = buf, *qkv = h + b * d, *qn = qkv + b * wq, *kn = qn + b * wa, *att = kn + b * wa, *o = att + b * wa,
          *y = o + b * wo, *gu = y + b * wy, *act = gu + b * wm, *w = act + b * wm;
    int64_t *lo = ids + b * wk;
    int rc = 0;
    for (int64_t i = 0; i < n && !rc; i++) {
        const dk_layer *L = layers + i;
        const int64_t hq = L->hq, hkv = L->hkv, dh = L->dh, *c = kv + 3 * b * i;
        const int fail = (int)(1 + 16 * i);
        dk_rms_norm(x, b, d, d, L->attn_norm, L->attn_eps, h, d);
        if (L->qkv_fn(h, 0, b, d, L->qkv_q, L->qkv_s, (int)L->qkv_fmt, L->qkv_npad, qkv, nthreads)) {
            rc = fail + 1;
            break;
        }
        if (L->qkv_b)
            for (int64_t r = 0; r < b; r++) dk_add(qkv + r * L->qkv_npad, L->qkv_b, (hq + 2 * hkv) * dh);
        float *q = qkv, *k = qkv + hq * dh;
        int64_t qs = L->qkv_npad, kbs = L->qkv_npad;
        if (L->q_norm) { /* per head, over Dh, each row's heads */
            for (int64_t r = 0; r < b; r++) {
                dk_rms_norm(qkv + r * L->qkv_npad, hq, dh, dh, L->q_norm, L->q_eps, qn + r * hq * dh, dh);
                dk_rms_norm(qkv + r * L->qkv_npad + hq * dh, hkv, dh, dh, L->k_norm, L->k_eps, kn + r * hkv * dh, dh);
            }
            q = qn, k = kn, qs = hq * dh, kbs = hkv * dh;
        }
        dk_rope(q, b, hq, dh, qs, dh, cos_, sin_);
        dk_rope(k, b, hkv, dh, kbs, dh, cos_, sin_);
        for (int64_t r = 0; r < b; r++)
            lo[r] = L->window <= 0 ? 0 : (pos[r] + 1 - L->window > 0 ? pos[r] + 1 - L->window : 0);
        if (dk_attend_batch(b, q, qs, hq, k, kbs, dh, qkv + (hq + hkv) * dh, L->qkv_npad, dh, c, c + b, c + 2 * b, pos,
                            lo, hkv, dh, dv, v_stride, L->scale, L->sinks, att, nthreads)) {
            rc = fail + 2;
            break;
        }
        if (L->o_fn(att, 0, b, hq * dv, L->o_q, L->o_s, (int)L->o_fmt, L->o_npad, o, nthreads)) {
            rc = fail + 3;
            break;
        }
        for (int64_t r = 0; r < b; r++) {
            if (L->o_b) dk_add(o + r * L->o_npad, L->o_b, d);
            dk_add(x + r * d, o + r * L->o_npad, d);
        }
        dk_rms_norm(x, b, d, d, L->ffn_norm, L->ffn_eps, h, d);
        int64_t so; /* the FFN output's row stride in y */
        if (L->ffn_kind == FFN_MOE) {
            if (route(L, h, b, d, ids, w, nthreads)) {
                rc = fail + 4;
                break;
            }
            so = d; /* i4_moe_batch writes [b, D] */
            if (((i4_moe_batch_fn)L->ffn_batch_fn)(h, b, d, L->inter, L->top_k, ids, w, L->table, L->n_exp,
                                                   L->gu_npad, L->dn_npad, (int)L->ffn_fmt, L->epi, y, nthreads)) {
                rc = fail + 5;
                break;
            }
        } else { /* gate_up over the rows, silu(gate) * up, down: GatedMLP.forward's batched path */
            const int64_t *t = L->table; /* gate_up q, scales, down q, scales */
            if (L->qkv_fn(h, 0, b, d, (const uint8_t *)(intptr_t)t[0], (const uint16_t *)(intptr_t)t[1],
                          (int)L->ffn_fmt, L->gu_npad, gu, nthreads) ||
                ((i4_silu_rows_fn)L->ffn_batch_fn)(gu, b, L->gu_npad, L->inter)) {
                rc = fail + 5;
                break;
            }
            for (int64_t r = 0; r < b; r++) memcpy(act + r * L->inter, gu + r * L->gu_npad, sizeof(float) * (size_t)L->inter);
            so = L->dn_npad;
            if (L->qkv_fn(act, 0, b, L->inter, (const uint8_t *)(intptr_t)t[2], (const uint16_t *)(intptr_t)t[3],
                          (int)L->ffn_fmt, L->dn_npad, y, nthreads)) {
                rc = fail + 5;
                break;
            }
        }
        for (int64_t r = 0; r < b; r++) dk_add(x + r * d, y + r * so, d);
    }
    free(buf), free(ids);
    return rc;
}
