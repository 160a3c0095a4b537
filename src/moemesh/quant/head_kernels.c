/* The output head's steps after its matmul (decode_kernels.py: ``greedy``, ``head_rescore``), on rows of
 * logits: the greedy sampler's argmax and log-probability in one pass, and the exact rescoring of an
 * approximate head's best candidates (layers/head.py). Built into the decode kernels' library. */
#include "decode_common.h"

/* The first index of a row's maximum, or of its first NaN (torch.argmax: a NaN wins). Per lane of 16 its
 * first maximum, in vector registers, then the lowest index among the lanes holding the maximum. */
static int64_t dk_argmax(const float *x, int64_t v) {
    int64_t i = 0, best = 0;
    float m = x[0];
    dk_v16i nan = {0};
    if (v >= 16 && v < INT32_MAX) {
        dk_v16 mx;
        dk_v16i bi;
        memcpy(&mx, x, sizeof mx);
        for (int l = 0; l < 16; l++) bi[l] = l;
        nan |= mx != mx;
        const dk_v16i step = {16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16};
        dk_v16i at = bi;
        for (i = 16; i + 16 <= v; i += 16) {
            dk_v16 a;
            memcpy(&a, x + i, sizeof a);
            at += step;
            const dk_v16i up = a > mx;
            nan |= a != a;
            mx = (dk_v16)(((dk_v16i)a & up) | ((dk_v16i)mx & ~up));
            bi = (at & up) | (bi & ~up);
        }
        m = mx[0], best = bi[0];
        for (int l = 1; l < 16; l++)
            if (mx[l] > m || (mx[l] == m && bi[l] < best)) m = mx[l], best = bi[l];
    }
    int any_nan = 0;
    for (int l = 0; l < 16; l++) any_nan |= nan[l] != 0;
    for (; i < v; i++) {
        any_nan |= x[i] != x[i];
        if (x[i] > m) m = x[i], best = i;
    }
    if (any_nan || m != m)
        for (best = 0; best < v && x[best] == x[best]; best++) {}
    return best;
}

/* sum of exp(x[i] - m) over a row: 16 double lanes, each adding its exps in order (a float sum of 10^5
 * terms would carry ~1e-6 of rounding), then the tail, then the lanes in order. */
static double dk_sum_exp(const float *x, int64_t v, float m) {
    dk_v8d lo = {0}, hi = {0};
    int64_t i = 0;
    for (; i + 16 <= v; i += 16) {
        dk_v16 a;
        memcpy(&a, x + i, sizeof a);
        const dk_v16 e = dk_exp16(a - DK_SPLAT16(m));
        dk_v8 e0, e1;
        memcpy(&e0, &e, sizeof e0);
        memcpy(&e1, (const char *)&e + sizeof e0, sizeof e1);
        lo += __builtin_convertvector(e0, dk_v8d);
        hi += __builtin_convertvector(e1, dk_v8d);
    }
    double sum = 0.0;
    for (; i < v; i++) sum += dk_exp(x[i] - m);
    for (int l = 0; l < 8; l++) sum += lo[l];
    for (int l = 0; l < 8; l++) sum += hi[l];
    return sum;
}

/* rows of logits x [rows, v] (row stride sx): idx[r] = argmax, logp[r] = log_softmax(x[r])[idx[r]],
 * computed as torch's log_softmax does: (x - max) - log(sum(exp(x - max))). */
void dk_greedy(const float *x, int64_t rows, int64_t v, int64_t sx, int64_t *idx, float *logp) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * sx;
        const int64_t best = dk_argmax(xr, v);
        idx[r] = best;
        logp[r] = xr[best] != xr[best] ? xr[best] : (float)-log(dk_sum_exp(xr, v, xr[best]));
    }
}

/* An approximate head's rescoring (layers/head.OutputHead): for each row of logits [rows, v] (row
 * stride sl), its r largest values (ties: the lower index) are replaced by the exact x[row] . w[i]
 * (x rows sx apart, w [v, d] contiguous, fp32 or, with w_bf16, bf16 widened exactly; dk_dot's fixed
 * order). 0; -1 for r outside [1, 64] or above v (or no memory); -2 for a row holding a NaN (the
 * caller runs torch's topk, which ranks NaN first). */
#define DK_MAX_RESCORE 64
int dk_head_rescore(float *logits, int64_t rows, int64_t v, int64_t sl, const float *x, int64_t sx,
                    const void *w, int w_bf16, int64_t d, int64_t r) {
    if (r < 1 || r > DK_MAX_RESCORE || r > v) return -1;
    float *wide = w_bf16 ? (float *)malloc(sizeof(float) * (size_t)d) : NULL;  /* a bf16 row, widened */
    if (w_bf16 && !wide) return -1;
    int rc = 0;
    for (int64_t row = 0; row < rows && !rc; row++) {
        float *lr = logits + row * sl;
        float top[DK_MAX_RESCORE];
        int64_t at[DK_MAX_RESCORE], n = 0;
        for (int64_t i = 0; i < v; i++) {
            const float a = lr[i];
            if (a != a) {
                rc = -2;
                break;
            }
            if (n == r && !(a > top[r - 1])) continue; /* most values: one compare */
            int64_t j = n < r ? n++ : r - 1;          /* insert, sorted descending; an equal value stays behind */
            for (; j > 0 && a > top[j - 1]; j--) top[j] = top[j - 1], at[j] = at[j - 1];
            top[j] = a, at[j] = i;
        }
        for (int64_t j = 0; j < n && !rc; j++) {
            const float *wr = (const float *)w + at[j] * d;
            if (w_bf16) {
                const uint16_t *b = (const uint16_t *)w + at[j] * d;
                for (int64_t k = 0; k < d; k++) {
                    const uint32_t u = (uint32_t)b[k] << 16;
                    memcpy(wide + k, &u, 4);
                }
                wr = wide;
            }
            lr[at[j]] = dk_dot(x + row * sx, wr, d);
        }
    }
    free(wide);
    return rc;
}
