/* What decode.c and attention.c share: the call's descriptions (mirrored by ctypes in
 * decode.py), vector e^x, dot products and the RMS norm. */
#ifndef EDGESERVE_DECODE_H
#define EDGESERVE_DECODE_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"

/* Every field 8 bytes wide: the ctypes mirrors in decode.py need no padding rules. */
typedef struct {
    long kind;                      /* 0 float32, 8 int8, 4 int4 (matmul.c's layouts) */
    const void *w;                  /* float32 weights or codes */
    long ldw;                       /* float32: floats per weight row */
    const uint16_t *scale, *min;    /* quantized: float16 (N, K / 32) */
    const float *bias;              /* (N,) or NULL */
    long n, k;
} es_linear;

typedef struct {
    const float *norm_in, *norm_post;
    const float *q_norm, *k_norm;   /* (head_dim,) per-head norms, or NULL */
    es_linear qkv, o, gate_up, down;
    long window;                    /* sliding window in tokens, 0: every cached key */
    long layer;                     /* the KV pages' layer index */
} es_layer;

typedef struct {
    long hidden, heads, kv_heads, head_dim, inter;
    double eps;
    const float *inv_freq;          /* (head_dim / 2,) rotary inverse frequencies */
} es_dims;

typedef struct {
    long rows;
    const int64_t *positions, *kv_lens;     /* (rows,) */
    const int64_t *page_table;              /* (rows, pt_stride) page addresses */
    long pt_stride;
    const int64_t *slot_page, *slot_offset; /* (rows,) where the new key and value go */
    float *kv;
    long s_page, s_layer, s_token, s_kv, s_head, page_tokens;
    long threads;
    long parallel_from;     /* attention multiply-adds from which threads share it */
} es_step;

typedef int32_t vi __attribute__((vector_size(VW * 4)));

INLINE vf pick(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* e^x for VW lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7 (error
 * below float32's rounding), 2^n put into the exponent. Clamped to float's normal range. */
INLINE vf vexp(vf x) {
    const vf lo = (vf){0} - 87.3f, hi = (vf){0} + 88.3f, magic = (vf){0} + 12582912.f;
    x = pick(x < lo, lo, x);
    x = pick(x > hi, hi, x);
    vf n = (x * 1.44269504088896341f + magic) - magic;     /* round to nearest */
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;        /* ln2 in two parts */
    vf p = (vf){0} + 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
}

static inline void exps(float *v, long n) {
    long i = 0;
    for (; i + VW <= n; i += VW) *(vfu *)(v + i) = vexp(loadf(v + i));
    for (; i < n; i++) v[i] = expf(v[i]);
}

static inline float dot(const float *a, const float *b, long n) {
    long i = 0;
    float s = 0.f;
    if (n >= VW) {
        vf acc = (vf){0};
        for (; i + VW <= n; i += VW) acc += loadf(a + i) * loadf(b + i);
        s = hsum(acc);
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y = x / sqrt(mean(x^2) + eps) * w over n values (y may be x). */
static inline void rms_norm(const float *x, const float *w, float *y, long n, double eps) {
    float r = 1.f / sqrtf(dot(x, x, n) / (float)n + (float)eps);
    for (long i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* attention.c: a row's queries and keys normed and rotated, its key and value stored; the
 * attention of every row over its pages. */
void es_place(const es_dims *d, const es_layer *l, const es_step *s, float *qkv, long b,
              const float *cs);
int es_paged_attention(const es_dims *d, const es_layer *l, const es_step *s, const float *qkv,
                       float *out);
#endif
