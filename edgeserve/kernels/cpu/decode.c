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
 * output rows); attention is attention.c's; the rest is a few vector loops over a row.
 *
 * KV pages: a layer's keys and values of page p, token t, head g start at
 *   kv + p s_page + layer s_layer + t s_token + (0: key, 1: value) s_kv + g s_head
 * (floats), head_dim contiguous; page_table holds each row's pages in order.
 */
#include "decode.h"

void es_matmul_f32(const float *x, long ldx, const float *w, long ldw, const float *bias,
                   float *y, long ldy, long M, long N, long K, int threads);
void es_matmul_q8(const float *x, long ldx, const uint8_t *codes, const uint16_t *scale,
                  const uint16_t *min, const float *bias, float *y, long ldy, long M, long N,
                  long K, int threads);
int es_matmul_q4(const float *x, long ldx, const uint8_t *packed, const uint16_t *scale,
                 const uint16_t *min, const float *bias, float *y, long ldy, long M, long N,
                 long K, int threads);

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
        es_place(d, l, s, w->qkv + b * width, b, w->cs + b * d->head_dim);
    if (es_paged_attention(d, l, s, w->qkv, w->att)) return -1;
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
