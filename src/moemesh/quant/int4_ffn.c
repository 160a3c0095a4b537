/* Fused int4 SwiGLU experts for one token (decode): for each of n experts
     y_e = down_e(silu(g) * u),  [g | u] = gate_up_e(x)   (gate rows 0..I-1, up rows I..2I-1)
   in one OpenMP region (three work-shared loops: gate_up blocks of every expert, the activation
   and its quantization per expert, down blocks of every expert) instead of two kernel calls, a
   chunk, a silu and a multiply per expert from Python.

   Both matmuls are int4_kernel.h's i4_block, so every output row has the arithmetic of i4_matmul (and
   the same bits on every ISA path). y_e depends only on x and expert e's weights (not on n, on the other experts in the
   call, on the thread count or schedule): computing a layer's experts in one call or one at a time
   gives the same bits, which keeps lazy (experts computed as their reads land) == resident.

   Work sharing is guided, not dynamic with chunks of one block: a thread then streams long runs of
   consecutive blocks (an expert's blocks are contiguous in its blob) instead of every other 64 KB
   block, which the hardware prefetchers follow far better. Measured on the 12-layer Qwen3-shaped
   store's experts (8 random experts per layer, 2 threads, 8 alternating rounds): dynamic,1 ~16
   GB/s median, guided ~24 GB/s (a plain 2-thread C read loop reaches 26-30 GB/s here). A thread
   descheduled by other load still leaves the shrinking tail chunks to the other. */
#include "int4_kernel.h"

/* x fp32 [D]; expert e: gate_up qweight gu_q[e] [gu_npad, D/2], scales gu_sz[e] bf16 [D/32, gu_npad, 2]
   ([D/32, gu_npad] when sym: symmetric int4, see int4_kernel.h); down dn_q[e] [dn_npad, I/2],
   dn_sz[e] [I/32, dn_npad(, 2)], or block-major with FMT_BLOCKS (int4_kernel.h); weights in 32-row
   blocks with FMT_B32. fmt (FMT_SYM, FMT_BLOCKS, FMT_B32) applies to every matrix of the call. epi: NULL,
   or the experts' act and biases (int4_kernel.h i4_epi; bias rows by position e). y fp32 [n, dn_npad]. 0, or -1. */
int i4_experts_ffn(const float *x, int64_t d, int64_t inter, int64_t n, const uint8_t *const *gu_q,
                   const uint16_t *const *gu_sz, int64_t gu_npad, const uint8_t *const *dn_q,
                   const uint16_t *const *dn_sz, int64_t dn_npad, int fmt, const i4_epi *epi, float *y, int nthreads) {
    if (d % GS || inter % GS || gu_npad % 16 || dn_npad % 16 || gu_npad < 2 * inter || n <= 0) return -1;
    const int64_t G1 = d / GS, G2 = inter / GS, bn = block_rows(fmt);
    const int64_t nb1 = (gu_npad + bn - 1) / bn, nb2 = (dn_npad + bn - 1) / bn;
    /* scratch: x planes [D] x2, gate_up out [n, gu_npad], activation planes [n, I] x2, group stats */
    int8_t *xq = (int8_t *)malloc((size_t)(2 * d + 2 * n * inter));
    float *fs = (float *)malloc(sizeof(float) * (size_t)(2 * G1 + n * gu_npad + 2 * n * G2));
    int32_t *is = (int32_t *)malloc(sizeof(int32_t) * (size_t)(G1 + n * G2));
    if (!xq || !fs || !is) {
        free(xq), free(fs), free(is);
        return -1;
    }
    int8_t *x1 = xq, *x2 = xq + d, *a1 = xq + 2 * d, *a2 = a1 + n * inter;
    float *du = fs, *sumx = fs + G1, *h = fs + 2 * G1, *adu = h + n * gu_npad, *asum = adu + n * G2;
    int32_t *sx = is, *asx = is + G1;
    i4_quant_x(x, 0, 1, d, x1, x2, du, sumx, sx);
    if (n * (gu_npad * d + dn_npad * inter) < SERIAL_MACS) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(guided)
        for (int64_t it = 0; it < n * nb1; it++) {
            const int64_t e = it / nb1;
            i4_block(gu_q[e], gu_sz[e], fmt, it % nb1, gu_npad, d, 1, x1, x2, du, sumx, sx, h + e * gu_npad, gu_npad);
        }
#pragma omp for schedule(static)
        for (int64_t e = 0; e < n; e++) {
            float *he = h + e * gu_npad;
            if (epi && epi->bias) i4_add_bias(he, epi->bias + 2 * e, 2 * inter);
            i4_act_mul(he, inter, epi);  /* act in place */
            i4_quant_x(he, 0, 1, inter, a1 + e * inter, a2 + e * inter, adu + e * G2, asum + e * G2, asx + e * G2);
        }
#pragma omp for schedule(guided)
        for (int64_t it = 0; it < n * nb2; it++) {
            const int64_t e = it / nb2;
            i4_block(dn_q[e], dn_sz[e], fmt, it % nb2, dn_npad, inter, 1, a1 + e * inter, a2 + e * inter, adu + e * G2,
                     asum + e * G2, asx + e * G2, y + e * dn_npad, dn_npad);
        }
        if (epi && epi->bias) {
#pragma omp for schedule(static)
            for (int64_t e = 0; e < n; e++) i4_add_bias(y + e * dn_npad, epi->bias + 2 * e + 1, d);
        }
    }
    free(xq), free(fs), free(is);
    return 0;
}

/* out fp32 [d] = sum over the call's experts, in call order, of y_e[:d] * w[e] (y_e as
   i4_experts_ffn computes it): per expert one product, then one addition, in order, exactly the
   IEEE operations of layers/moe.sum_in_order (torch's y * w[:, None], then out.add_(row) per
   expert), so the bits match it. The products are stored before they are added: no compiler
   contracts them into an fma. 0, or -1. */
int i4_experts_mix(const float *x, int64_t d, int64_t inter, int64_t n, const uint8_t *const *gu_q,
                   const uint16_t *const *gu_sz, int64_t gu_npad, const uint8_t *const *dn_q,
                   const uint16_t *const *dn_sz, int64_t dn_npad, int fmt, const i4_epi *epi, const float *w, float *out,
                   int nthreads) {
    if (n <= 0 || d > dn_npad) return -1;
    float *y = (float *)malloc(sizeof(float) * (size_t)(n * dn_npad));
    if (!y) return -1;
    int rc = i4_experts_ffn(x, d, inter, n, gu_q, gu_sz, gu_npad, dn_q, dn_sz, dn_npad, fmt, epi, y, nthreads);
    if (rc == 0) {
        for (int64_t e = 0; e < n; e++)
            for (int64_t j = 0; j < d; j++) y[e * dn_npad + j] = y[e * dn_npad + j] * w[e];
        for (int64_t j = 0; j < d; j++) out[j] = 0.f;
        for (int64_t e = 0; e < n; e++)
            for (int64_t j = 0; j < d; j++) out[j] = out[j] + y[e * dn_npad + j];
    }
    free(y);
    return rc;
}

#define MIX_MAX 256  /* experts per token */

/* The compiled graph's MoE layer for one token (layers/int4_ops.moe_decode): the router's picks
   ids int64 [a] with weights fp32 [a], the layer's pointer table int64 [E, 4] (gate_up qweight,
   gate_up scales, down qweight, down scales per expert); epi NULL or the experts' act and biases (bias
   rows by expert id). The picks are summed in expert-id order (a stable sort, like Python's sorted), as
   the eager layer sums them. 0, -1 (bad shape), or -2 (an id outside [0, E)). */
int i4_moe_decode(const float *x, int64_t d, int64_t inter, int64_t a, const int64_t *ids, const float *w,
                  const int64_t *table, int64_t num_experts, int64_t gu_npad, int64_t dn_npad, int fmt,
                  const i4_epi *epi, float *out, int nthreads) {
    if (a <= 0 || a > MIX_MAX) return -1;
    int64_t order[MIX_MAX];
    for (int64_t i = 0; i < a; i++) {
        if (ids[i] < 0 || ids[i] >= num_experts) return -2;
        int64_t j = i;
        for (; j > 0 && ids[order[j - 1]] > ids[i]; j--) order[j] = order[j - 1];  /* stable insertion */
        order[j] = i;
    }
    const uint8_t *gq[MIX_MAX], *dq[MIX_MAX];
    const uint16_t *gs[MIX_MAX], *ds[MIX_MAX];
    float ws[MIX_MAX];
    int64_t bias[2 * MIX_MAX];  /* the picks' bias rows, in the call's order */
    i4_epi picked;
    for (int64_t i = 0; i < a; i++) {
        const int64_t *row = table + 4 * ids[order[i]];
        gq[i] = (const uint8_t *)(uintptr_t)row[0], gs[i] = (const uint16_t *)(uintptr_t)row[1];
        dq[i] = (const uint8_t *)(uintptr_t)row[2], ds[i] = (const uint16_t *)(uintptr_t)row[3];
        ws[i] = w[order[i]];
        if (epi && epi->bias) bias[2 * i] = epi->bias[2 * ids[order[i]]], bias[2 * i + 1] = epi->bias[2 * ids[order[i]] + 1];
    }
    if (epi) picked = *epi, picked.bias = epi->bias ? bias : NULL, epi = &picked;
    return i4_experts_mix(x, d, inter, a, gq, gs, gu_npad, dq, ds, dn_npad, fmt, epi, ws, out, nthreads);
}

/* The MoE layer of t tokens (a batched decode step) in one call, from the router's picks ids int64
   [t, a], weights fp32 [t, a] and the layer's pointer table [E, 4]: the grouped loop's computation
   (experts/mixing.GroupedProvider.run) without its Python. Slots are grouped by expert id, each
   expert's tokens ascending (a stable counting sort: torch.argsort(stable=True)'s order); each expert
   runs i4_block over its m tokens' rows (the rows' bits do not depend on m: int4_kernel.h), then
   y * w is stored per row and out[token] += it, experts in id order, exactly index_add_'s additions.
   epi: NULL or the experts' act and biases (bias rows by expert id). out fp32 [t, d]. 0, -1 (bad shape /
   no memory) or -2 (an id outside [0, E)). */
int i4_moe_batch(const float *x, int64_t t, int64_t d, int64_t inter, int64_t a, const int64_t *ids, const float *w,
                 const int64_t *table, int64_t num_experts, int64_t gu_npad, int64_t dn_npad, int fmt,
                 const i4_epi *epi, float *out, int nthreads) {
    if (t <= 0 || a <= 0 || d % GS || inter % GS || gu_npad < 2 * inter || dn_npad < d || num_experts <= 0) return -1;
    const int64_t R = t * a, G1 = d / GS, G2 = inter / GS, bn = block_rows(fmt);
    const int64_t nb1 = (gu_npad + bn - 1) / bn, nb2 = (dn_npad + bn - 1) / bn;
    int64_t *start = (int64_t *)calloc((size_t)(num_experts + 1), sizeof(int64_t));
    int64_t *slot = (int64_t *)malloc(sizeof(int64_t) * (size_t)R);   /* row r of the grouped order -> flat slot */
    int64_t *used = (int64_t *)malloc(sizeof(int64_t) * (size_t)(R + 1)); /* experts with rows, ascending */
    /* fp32: h [R, gu_npad], y [R, dn_npad], per-row stats of the grouped rows and of the t tokens */
    float *xg = (float *)malloc(sizeof(float) * (size_t)(R * gu_npad + R * dn_npad + 2 * R * G1 + 2 * R * G2 + 2 * t * G1));
    int8_t *q = (int8_t *)malloc((size_t)(2 * R * d + 2 * R * inter + 2 * t * d));
    int32_t *is = (int32_t *)malloc(sizeof(int32_t) * (size_t)(R * G1 + R * G2 + t * G1));
    int rc = start && slot && used && xg && q && is ? 0 : -1;
    for (int64_t s = 0; rc == 0 && s < R; s++)
        if (ids[s] < 0 || ids[s] >= num_experts) rc = -2;
    if (rc) {
        free(start), free(slot), free(used), free(xg), free(q), free(is);
        return rc;
    }
    for (int64_t s = 0; s < R; s++) start[ids[s] + 1]++;
    int64_t nu = 0;
    for (int64_t e = 0; e < num_experts; e++) {
        if (start[e + 1]) used[nu++] = e;
        start[e + 1] += start[e];
    }
    {
        int64_t *fill = (int64_t *)malloc(sizeof(int64_t) * (size_t)num_experts);
        if (!fill) {
            free(start), free(slot), free(used), free(xg), free(q), free(is);
            return -1;
        }
        memcpy(fill, start, sizeof(int64_t) * (size_t)num_experts);
        for (int64_t s = 0; s < R; s++) slot[fill[ids[s]]++] = s;  /* slots ascending within an expert */
        free(fill);
    }
    float *h = xg, *y = h + R * gu_npad, *du = y + R * dn_npad, *sumx = du + R * G1, *adu = sumx + R * G1,
          *asum = adu + R * G2, *tdu = asum + R * G2, *tsum = tdu + t * G1;
    int8_t *x1 = q, *x2 = q + R * d, *a1 = x2 + R * d, *a2 = a1 + R * inter, *t1 = a2 + R * inter, *t2 = t1 + t * d;
    int32_t *sx = is, *asx = is + R * G1, *tsx = asx + R * G2;
    /* each token's planes once (a row's quantization depends on that row alone), then copied to its slots'
       grouped rows: the planes a quantization of the gathered rows would give, without quantizing a token
       once per expert it picked */
    i4_quant_x(x, 0, t, d, t1, t2, tdu, tsum, tsx);
    for (int64_t r = 0; r < R; r++) {
        const int64_t tok = slot[r] / a;
        memcpy(x1 + r * d, t1 + tok * d, (size_t)d);
        memcpy(x2 + r * d, t2 + tok * d, (size_t)d);
        memcpy(du + r * G1, tdu + tok * G1, sizeof(float) * (size_t)G1);
        memcpy(sumx + r * G1, tsum + tok * G1, sizeof(float) * (size_t)G1);
        memcpy(sx + r * G1, tsx + tok * G1, sizeof(int32_t) * (size_t)G1);
    }
    if (R * (gu_npad * d + dn_npad * inter) < SERIAL_MACS) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(guided)
        for (int64_t it = 0; it < nu * nb1; it++) {
            const int64_t e = used[it / nb1], r0 = start[e], m = start[e + 1] - r0;
            const int64_t *row = table + 4 * e;
            i4_block((const uint8_t *)(uintptr_t)row[0], (const uint16_t *)(uintptr_t)row[1], fmt, it % nb1, gu_npad, d, m,
                     x1 + r0 * d, x2 + r0 * d, du + r0 * G1, sumx + r0 * G1, sx + r0 * G1, h + r0 * gu_npad, gu_npad);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            if (epi && epi->bias) i4_add_bias(h + r * gu_npad, epi->bias + 2 * ids[slot[r]], 2 * inter);
            i4_act_mul(h + r * gu_npad, inter, epi);
            i4_quant_x(h + r * gu_npad, 0, 1, inter, a1 + r * inter, a2 + r * inter, adu + r * G2, asum + r * G2, asx + r * G2);
        }
#pragma omp for schedule(guided)
        for (int64_t it = 0; it < nu * nb2; it++) {
            const int64_t e = used[it / nb2], r0 = start[e], m = start[e + 1] - r0;
            const int64_t *row = table + 4 * e;
            i4_block((const uint8_t *)(uintptr_t)row[2], (const uint16_t *)(uintptr_t)row[3], fmt, it % nb2, dn_npad, inter,
                     m, a1 + r0 * inter, a2 + r0 * inter, adu + r0 * G2, asum + r0 * G2, asx + r0 * G2, y + r0 * dn_npad,
                     dn_npad);
        }
    }
    for (int64_t r = 0; r < R; r++) {  /* (the down bias), products stored before they are added */
        if (epi && epi->bias) i4_add_bias(y + r * dn_npad, epi->bias + 2 * ids[slot[r]] + 1, d);
        for (int64_t j = 0; j < d; j++) y[r * dn_npad + j] = y[r * dn_npad + j] * w[slot[r]];
    }
    for (int64_t j = 0; j < t * d; j++) out[j] = 0.f;
    for (int64_t r = 0; r < R; r++) {
        float *o = out + (slot[r] / a) * d;
        for (int64_t j = 0; j < d; j++) o[j] = o[j] + y[r * dn_npad + j];
    }
    free(start), free(slot), free(used), free(xg), free(q), free(is);
    return 0;
}

/* h fp32 [m, ld] in place: h[r, i] = silu(h[r, i]) * h[r, inter + i] for i < inter, the fused kernels'
   activation (i4_silu_mul), so the unfused path over any number of rows (mlp.GatedMLP) gives each row
   the fused one-token call's bits. 0, or -1. */
int i4_silu_mul_rows(float *h, int64_t m, int64_t ld, int64_t inter) {
    if (m < 0 || inter <= 0 || ld < 2 * inter) return -1;
    for (int64_t r = 0; r < m; r++) i4_silu_mul(h + r * ld, inter);
    return 0;
}

/* As i4_silu_mul_rows with an expert's act (I4_ACT_SILU or I4_ACT_CLAMP_SWIGLU with alpha and limit): the
   unfused path's activation (gate_up's bias already added by its linear) with the fused kernels' bits. */
int i4_act_rows(float *h, int64_t m, int64_t ld, int64_t inter, int64_t act, float alpha, float limit) {
    if (m < 0 || inter <= 0 || ld < 2 * inter || act < I4_ACT_SILU || act > I4_ACT_CLAMP_SWIGLU) return -1;
    const i4_epi epi = {act, alpha, limit, NULL};
    for (int64_t r = 0; r < m; r++) i4_act_mul(h + r * ld, inter, &epi);
    return 0;
}
