/* Shared definitions of the TurboQuant C kernels (tq_attend.c, tq_encode.c); see tq_native.py.
 *
 * Codes are coordinate-major 32-bit words: word i of token t of kv head h is at
 * words[h * head_stride + i * ws + t]. A group of coordinates (fractional rates have two) has
 * b <= 4 bits: b = 4, 2, 1 is one bit plane, b = 3 a 2-bit plane plus a 1-bit plane
 * (packing.py), so coordinate i of a group sits in plane word i / (32 / p) at bit (i % (32/p)) * p.
 */
#ifndef TQ_NATIVE_H
#define TQ_NATIVE_H
#include <stdint.h>

#define MAXG 16      /* query heads per kv head */
#define MAXD 256     /* head dim */
#define MAXGROUPS 2  /* bit-width groups per vector */

typedef struct { int32_t lo, n, bits, w0, w1; } group_t; /* coords [lo, lo+n), words of planes 0, 1 */

typedef struct {  /* one layer of one sequence: codes, norms, and the layer's codec */
    uint32_t *kw, *vw;        /* [hkv, words, cap] */
    uint16_t *kn, *vn;        /* float16 [hkv, cap] */
    int64_t head_stride, ws;  /* of kw/vw (elements) */
    int64_t norm_stride;      /* of kn/vn */
    const float *rt;          /* [d, d]: x_rot = x @ rt */
    const group_t *groups;
    int ng;
    const float *tables;      /* [ng, 16] centroids, repeated to 16 entries */
    const float *bounds;      /* [ng, 15] boundaries, 2^b - 1 used */
} coded_t;

/* encode x [d] (head h) into token column t: norm, rotation, Lloyd-Max codes, float16 norm */
void tq_encode_one(const coded_t *c, int d, int h, int kv, const float *x, int64_t t);
/* x [2 (k, v), hkv, e, d] -> token columns [t0, t0 + e) */
void tq_encode(const coded_t *c, int hkv, int64_t e, int d, const float *x, int64_t t0);

#endif
