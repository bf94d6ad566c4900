/* Attention of one new token per row over the row's KV pages, read in place.
 *
 * KV pages: a layer's keys and values of page p, token t, head g start at
 *   kv + p s_page + layer s_layer + t s_token + (0: key, 1: value) s_kv + g s_head
 * (floats), head_dim contiguous; page_table holds each row's pages in order. Queries of a
 * key/value head's group are scored together (each key read once), softmax in float32,
 * sliding windows as a first visible key. Threads share (row, key/value head) pairs when
 * the work is large enough.
 */
#ifdef _OPENMP
#include <omp.h>
#endif
#include "decode.h"

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
void es_place(const es_dims *d, const es_layer *l, const es_step *s, float *qkv, long b,
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
/* Tokens are a page's rows (all layers' keys and values of a token between two of a layer),
 * further apart than the hardware prefetcher follows: keys are fetched AHEAD tokens ahead,
 * and each token's value with its key, for the pass over the values. */
#define AHEAD 8

INLINE void fetch(const float *p, long n) {
    for (long i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}

/* out[i] = q . key[i] for 4 keys, n a multiple of VW: one horizontal sum for the four. */
static void dots4(const float *q, const float *const key[4], long n, float out[4]) {
    vf a0 = (vf){0}, a1 = (vf){0}, a2 = (vf){0}, a3 = (vf){0};
    for (long i = 0; i < n; i += VW) {
        vf x = loadf(q + i);
        a0 += x * loadf(key[0] + i), a1 += x * loadf(key[1] + i);
        a2 += x * loadf(key[2] + i), a3 += x * loadf(key[3] + i);
    }
    hsum4(a0, a1, a2, a3, out);
}

static void attend(const es_dims *d, const es_layer *l, const es_step *s, const float *q,
                   long b, long g, float *out, float *p) {
    long hd = d->head_dim, group = d->heads / d->kv_heads, first;
    long n = span(l, s, b, &first), P = s->page_tokens;
    const int64_t *pages = s->page_table + b * s->pt_stride;
    const float *base = s->kv + l->layer * s->s_layer + g * s->s_head;
    float scale = 1.f / sqrtf((float)hd);
    for (long t = first; t < first + n; t += 4) {       /* scores of 4 keys at a time */
        const float *key[4];
        int c = 0;
        for (; c < 4 && t + c < first + n; c++) {
            long at = t + c, ahead = at + AHEAD < first + n ? at + AHEAD : at;
            key[c] = base + pages[at / P] * s->s_page + (at % P) * s->s_token;
            fetch(base + pages[ahead / P] * s->s_page + (ahead % P) * s->s_token, hd);
            fetch(key[c] + s->s_kv, hd);            /* its value, for the second pass */
        }
        for (long h = 0; h < group; h++) {
            float *ph = p + h * n + t - first;
            if (c == 4 && hd % VW == 0) {
                dots4(q + h * hd, key, hd, ph);
                for (int i = 0; i < 4; i++) ph[i] *= scale;
            } else {
                for (int i = 0; i < c; i++) ph[i] = dot(q + h * hd, key[i], hd) * scale;
            }
        }
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
int es_paged_attention(const es_dims *d, const es_layer *l, const es_step *s, const float *qkv,
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
