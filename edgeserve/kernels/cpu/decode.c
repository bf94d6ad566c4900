/* A decode step (one new token per sequence) through Llama-family decoder layers in one call.
 *
 * For each layer and each of the step's rows (sequences), in float32:
 *   h = rms_norm(x, norm_in)
 *   q, k, v = h @ Wqkv^T (+ bias); per-head RMS norm of q and k (Qwen3); rotary embeddings
 *   k, v written into the row's page slot; attention of q over the row's cached keys
 *   (grouped-query, optional sliding window, softmax in float32)
 *   x += attention @ Wo^T (+ bias)
 *   h = rms_norm(x, norm_post)
 *   x += (silu(gate) * up) @ Wdown^T (+ bias), gate | up = h @ Wgate_up^T (+ bias)
 * The matmuls are matmul.c's exported kernels (float32, int8 or int4 weights, parallel over
 * output rows); attention is parallel over (row, key/value head) pairs when it is large
 * enough; the rest is a few vector loops over a row.
 *
 * KV pages: a layer's keys and values of page p, token t, head g start at
 *   kv + p s_page + layer s_layer + t s_token + (0: key, 1: value) s_kv + g s_head
 * (floats), head_dim contiguous; page_table holds each row's pages in order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "simd.h"

void es_matmul_f32(const float *x, long ldx, const float *w, long ldw, const float *bias,
                   float *y, long ldy, long M, long N, long K, int threads);
void es_matmul_q8(const float *x, long ldx, const uint8_t *codes, const uint16_t *scale,
                  const uint16_t *min, const float *bias, float *y, long ldy, long M, long N,
                  long K, int threads);
int es_matmul_q4(const float *x, long ldx, const uint8_t *packed, const uint16_t *scale,
                 const uint16_t *min, const float *bias, float *y, long ldy, long M, long N,
                 long K, int threads);

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

static void exps(float *v, long n) {
    long i = 0;
    for (; i + VW <= n; i += VW) *(vfu *)(v + i) = vexp(loadf(v + i));
    for (; i < n; i++) v[i] = expf(v[i]);
}

static float dot(const float *a, const float *b, long n) {
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
static void rms_norm(const float *x, const float *w, float *y, long n, double eps) {
    float r = 1.f / sqrtf(dot(x, x, n) / (float)n + (float)eps);
    for (long i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

static int linear(const es_linear *l, const float *x, long m, float *y, int threads) {
    if (l->kind == 0)
        es_matmul_f32(x, l->k, (const float *)l->w, l->ldw, l->bias, y, l->n, m, l->n, l->k,
                      threads);
    else if (l->kind == 8)
        es_matmul_q8(x, l->k, (const uint8_t *)l->w, l->scale, l->min, l->bias, y, l->n, m,
                     l->n, l->k, threads);
    else
        return es_matmul_q4(x, l->k, (const uint8_t *)l->w, l->scale, l->min, l->bias, y, l->n,
                            m, l->n, l->k, threads);
    return 0;
}

/* A head (head_dim values) rotated by its row's angles: cs = cos[half], sin[half]. */
static void rotate(float *v, const float *cs, long half) {
    const float *sn = cs + half;
    for (long i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cs[i] + b * -sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
    }
}

/* The row's queries and keys normed (Qwen3) and rotated; its key and value stored. */
static void place(const es_dims *d, const es_layer *l, const es_step *s, float *qkv, long b,
                  const float *cs) {
    long hd = d->head_dim, heads = d->heads, kvh = d->kv_heads;
    for (long h = 0; h < heads + kvh; h++) {
        float *v = qkv + h * hd;
        const float *w = h < heads ? l->q_norm : l->k_norm;
        if (w) rms_norm(v, w, v, hd, d->eps);
        rotate(v, cs, hd / 2);
    }
    float *slot = s->kv + s->slot_page[b] * s->s_page + l->layer * s->s_layer
                  + s->slot_offset[b] * s->s_token;
    for (long g = 0; g < kvh; g++) {
        memcpy(slot + g * s->s_head, qkv + (heads + g) * hd, sizeof(float) * hd);
        memcpy(slot + s->s_kv + g * s->s_head, qkv + (heads + kvh + g) * hd, sizeof(float) * hd);
    }
}

/* The first key of row b this layer attends to, and the count. */
INLINE long span(const es_layer *l, const es_step *s, long b, long *first) {
    long t = s->kv_lens[b];
    *first = l->window > 0 && t > l->window ? t - l->window : 0;
    return t - *first;
}

/* Row b's query heads of key/value head g over the row's cached keys -> out (group, hd).
 * p: room for group * (keys) scores. */
static void attend(const es_dims *d, const es_layer *l, const es_step *s, const float *q,
                   long b, long g, float *out, float *p) {
    long hd = d->head_dim, group = d->heads / d->kv_heads, first;
    long n = span(l, s, b, &first), P = s->page_tokens;
    const int64_t *pages = s->page_table + b * s->pt_stride;
    const float *base = s->kv + l->layer * s->s_layer + g * s->s_head;
    float scale = 1.f / sqrtf((float)hd);
    for (long t = first; t < first + n; t++) {
        const float *key = base + pages[t / P] * s->s_page + (t % P) * s->s_token;
        for (long h = 0; h < group; h++) p[h * n + t - first] = dot(q + h * hd, key, hd) * scale;
    }
    memset(out, 0, sizeof(float) * group * hd);
    for (long h = 0; h < group; h++) {
        float *ph = p + h * n, top = ph[0], sum = 0.f;
        for (long i = 1; i < n; i++) top = ph[i] > top ? ph[i] : top;
        for (long i = 0; i < n; i++) ph[i] -= top;
        exps(ph, n);
        for (long i = 0; i < n; i++) sum += ph[i];
        for (long i = 0; i < n; i++) ph[i] /= sum;
    }
    for (long t = first; t < first + n; t++) {
        const float *val = base + s->s_kv + pages[t / P] * s->s_page + (t % P) * s->s_token;
        for (long h = 0; h < group; h++) {
            float w = p[h * n + t - first], *o = out + h * hd;
            for (long i = 0; i < hd; i++) o[i] += w * val[i];
        }
    }
}

/* Attention of every row: q from qkv (rows, qkv width) -> out (rows, heads * hd). */
static int attention(const es_dims *d, const es_layer *l, const es_step *s, const float *qkv,
                     float *out) {
    long hd = d->head_dim, group = d->heads / d->kv_heads, width = d->heads + 2 * d->kv_heads;
    long most = 0, work = 0, pairs = s->rows * d->kv_heads;
    int failed = 0, threads = (int)s->threads;
    for (long b = 0; b < s->rows; b++) {
        long first, n = span(l, s, b, &first);
        most = n > most ? n : most;
        work += n * d->heads * hd * 2;
    }
    if (work < s->parallel_from) threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
#endif
    {
        float *p = malloc(sizeof(float) * group * (most > 0 ? most : 1));
        if (!p) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (long i = 0; i < pairs; i++) {
            long b = i / d->kv_heads, g = i % d->kv_heads;
            if (p) attend(d, l, s, qkv + b * width * hd + g * group * hd, b, g,
                          out + b * d->heads * hd + g * group * hd, p);
        }
        free(p);
    }
    return failed ? -1 : 0;
}

static void silu_mul(const float *gu, float *act, long inter) {
    long i = 0;
    for (; i + VW <= inter; i += VW) {
        vf g = loadf(gu + i);
        *(vfu *)(act + i) = g / (1.f + vexp(-g)) * loadf(gu + inter + i);
    }
    for (; i < inter; i++) act[i] = gu[i] / (1.f + expf(-gu[i])) * gu[inter + i];
}

/* Scratch of a call: rows of normed input, q|k|v, attention, a projection's output,
 * gate|up, the activation; rotary cos|sin per row. */
typedef struct { float *h, *qkv, *att, *y, *gu, *act, *cs; } buffers;

/* x += attention(norm_in(x)); h = norm_post(x). */
static int attend_half(const es_dims *d, const es_layer *l, const es_step *s, float *x,
                       const buffers *w) {
    long D = d->hidden, M = s->rows, width = (d->heads + 2 * d->kv_heads) * d->head_dim;
    int threads = (int)s->threads;
    for (long b = 0; b < M; b++) rms_norm(x + b * D, l->norm_in, w->h + b * D, D, d->eps);
    if (linear(&l->qkv, w->h, M, w->qkv, threads)) return -1;
    for (long b = 0; b < M; b++)
        place(d, l, s, w->qkv + b * width, b, w->cs + b * d->head_dim);
    if (attention(d, l, s, w->qkv, w->att)) return -1;
    if (linear(&l->o, w->att, M, w->y, threads)) return -1;
    for (long i = 0; i < M * D; i++) x[i] += w->y[i];
    for (long b = 0; b < M; b++) rms_norm(x + b * D, l->norm_post, w->h + b * D, D, d->eps);
    return 0;
}

/* x += down(silu(gate) * up) of h. */
static int mlp_half(const es_dims *d, const es_layer *l, const es_step *s, float *x,
                    const buffers *w) {
    long D = d->hidden, M = s->rows, I = d->inter;
    int threads = (int)s->threads;
    if (linear(&l->gate_up, w->h, M, w->gu, threads)) return -1;
    for (long b = 0; b < M; b++) silu_mul(w->gu + b * 2 * I, w->act + b * I, I);
    if (linear(&l->down, w->act, M, w->y, threads)) return -1;
    for (long i = 0; i < M * D; i++) x[i] += w->y[i];
    return 0;
}

/* A call's scratch (one allocation, returned to free) and each row's rotary cos | sin, with
 * the angles as rope.cos_sin computes them; NULL when memory ran out. */
static float *start(const es_dims *d, const es_step *s, buffers *w) {
    long M = s->rows, D = d->hidden, hd = d->head_dim, half = hd / 2, I = d->inter;
    long sizes[7] = {M * D, M * (d->heads + 2 * d->kv_heads) * hd, M * d->heads * hd, M * D,
                     M * 2 * I, M * I, M * hd};
    long total = 0;
    for (int i = 0; i < 7; i++) total += sizes[i];
    float *all = malloc(sizeof(float) * total), *at[7];
    if (!all) return 0;
    for (long i = 0, o = 0; i < 7; o += sizes[i], i++) at[i] = all + o;
    *w = (buffers){at[0], at[1], at[2], at[3], at[4], at[5], at[6]};
    for (long b = 0; b < M; b++)
        for (long i = 0; i < half; i++) {
            float a = (float)s->positions[b] * d->inv_freq[i];
            w->cs[b * hd + i] = cosf(a);
            w->cs[b * hd + half + i] = sinf(a);
        }
    return all;
}

/* x (rows, hidden) through `count` layers in place. 0, or -1 when memory ran out. */
int es_decode_layers(const es_dims *d, const es_layer *layers, long count, const es_step *s,
                     float *x) {
    buffers w;
    float *all = start(d, s, &w);
    if (!all) return -1;
    int rc = 0;
    for (long n = 0; n < count && rc == 0; n++)
        rc = attend_half(d, layers + n, s, x, &w) || mlp_half(d, layers + n, s, x, &w) ? -1 : 0;
    free(all);
    return rc;
}

/* One layer's attention half (its feed-forward computed by the caller): x in place, and
 * h (rows, hidden) = the post-attention norm of x. */
int es_decode_attention(const es_dims *d, const es_layer *l, const es_step *s, float *x,
                        float *h) {
    buffers w;
    float *all = start(d, s, &w);
    if (!all) return -1;
    w.h = h;
    int rc = attend_half(d, l, s, x, &w);
    free(all);
    return rc;
}

/* Logits y (rows, head n) of x (rows, hidden): the final RMS norm, then the head. */
int es_decode_head(const es_dims *d, const float *norm, const es_linear *head, const float *x,
                   long rows, float *y, long threads) {
    long D = d->hidden;
    float *h = malloc(sizeof(float) * rows * D);
    if (!h) return -1;
    for (long b = 0; b < rows; b++) rms_norm(x + b * D, norm, h + b * D, D, d->eps);
    int rc = linear(head, h, rows, y, (int)threads);
    free(h);
    return rc;
}
