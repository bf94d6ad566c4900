/* y (M, N) = x (M, K) @ W^T (+ bias) for a few rows M, over float32, int8 and int4 weights.
 *
 * Decode multiplies a few activation rows by large weights: the time is the weight's bytes
 * read from memory. Each thread takes a contiguous run of output rows; for NR output rows
 * at a time it walks all M rows in tiles of MR, so a weight row comes from memory once and
 * from cache for the other tiles. The MR x NR accumulators are vectors along K, summed
 * across lanes only at the end of a row. Quantized weights are dequantized in registers
 * (w = code * scale + min, per group of 32 columns); activations stay float32.
 *
 * Layouts (row-major):
 *   f32  w (N, K) float, row stride ldw
 *   q8   codes uint8 (N, K), scale and min float16 (N, K / 32)
 *   q4   packed uint8 (N, K / 2): low nibble column 2j, high nibble column 2j + 1;
 *        scale and min float16 (N, K / 32)
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "simd.h"
#include "vec.h"

/* NR output rows per tile (their weights are loaded once per K step) and MR activation rows
 * (4 or 2). On AVX-512 (measured) 24 accumulators, 6 weight vectors and an activation
 * vector fill 31 of the 32 vector registers; with 16 registers, 8 accumulators. */
#if VW == 16
#define NR 6
#define MR 4
#else
#define NR 4
#define MR 2
#endif
#define MINWORK 65536   /* weights (N K) below which one thread does the whole product */
#define CHUNKS 4        /* chunks of output rows per thread, taken in turn */
#ifndef QH
#define QH 3
#endif
#ifndef QA
#define QA 2
#endif

/* Stores one tile's sums plus bias; K tail (K % VW) for float weights added by the caller. */
INLINE void store(vf acc[MR][NR], int mr, int nr, float *y, long ldy, const float *bias) {
    vf *v = &acc[0][0];             /* the mr x nr sums, four at a time, in row order */
    float sums[MR * NR + 3];
    int i = 0;
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++) v[i++] = acc[m][n];
    for (int t = 0; t + 4 <= i; t += 4) hsum4(v[t], v[t + 1], v[t + 2], v[t + 3], sums + t);
    for (int t = i & ~3; t < i; t++) sums[t] = hsum(v[t]);
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++)
            y[m * ldy + n] = sums[m * nr + n] + (bias ? bias[n] : 0.f);
}

INLINE void tile_f32(const float *x, long ldx, const float *w, long ldw, long K,
                     float *y, long ldy, const float *bias, int mr, int nr, const float *pf,
                     long plo, long phi) {
    vf acc[MR][NR];
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++) acc[m][n] = (vf){0};
    long k = 0;
    for (; k + VW <= K; k += VW) {
        vf wv[NR];
        for (int n = 0; n < nr; n++) wv[n] = loadf(w + n * ldw + k);
        if (pf && k >= plo && k < phi)
            for (int n = 0; n < NR; n++) __builtin_prefetch(pf + n * ldw + k, 0, 3);
        for (int m = 0; m < mr; m++) {
            vf xv = loadf(x + m * ldx + k);
            for (int n = 0; n < nr; n++) acc[m][n] += xv * wv[n];
        }
    }
    store(acc, mr, nr, y, ldy, bias);
    for (; k < K; k++)
        for (int m = 0; m < mr; m++)
            for (int n = 0; n < nr; n++) y[m * ldy + n] += x[m * ldx + k] * w[n * ldw + k];
}

/* Share g of a block of weights ahead (step bytes per share) fetched into the cache: short
 * quantized rows are too short for the hardware prefetcher to run far enough ahead. */
INLINE void ahead(const uint8_t *pf, long step, long g) {
    for (long o = g * step; o < (g + 1) * step; o += 64) __builtin_prefetch(pf + o, 0, QH);
}

/* x here is the activations with int4's column order within each chunk of 2 VW columns:
 * the even columns, then the odd ones (see permute()), so low and high nibbles need no
 * interleaving. For int8, x is in its own order. */
INLINE void tile_q(const float *x, long ldx, const uint8_t *q, long ldq, const uint16_t *sc,
                   const uint16_t *mn, long K, float *y, long ldy, const float *bias,
                   int mr, int nr, int bits, const uint8_t *pf) {
    vf acc[MR][NR];
    long groups = K / GROUP;
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++) acc[m][n] = (vf){0};
    for (long g0 = 0; g0 < groups; g0 += GCHUNK) {
        /* this chunk's scales and minimums in float, broadcast from memory below */
        float s[NR][GCHUNK], b[NR][GCHUNK];
        int gc = groups - g0 < GCHUNK ? (int)(groups - g0) : GCHUNK;
        for (int n = 0; n < nr; n++) {
            halves(sc + n * groups + g0, s[n], gc);
            halves(mn + n * groups + g0, b[n], gc);
        }
        for (int g = 0; g < gc; g++) {
            if (pf) ahead(pf, NR * ldq / groups, g0 + g);
            for (int v = 0; v < GROUP / VW; v += (bits == 4 ? 2 : 1)) {
                long k = (g0 + g) * GROUP + v * VW;
                vf w0[NR], w1[NR];
                for (int n = 0; n < nr; n++) {
                    if (bits == 8) {
                        w0[n] = codes(q + n * ldq + k, 0) * s[n][g] + b[n][g];
                    } else {
                        w0[n] = codes(q + n * ldq + k / 2, 1) * s[n][g] + b[n][g];
                        w1[n] = codes(q + n * ldq + k / 2, 2) * s[n][g] + b[n][g];
                    }
                }
                for (int m = 0; m < mr; m++) {
                    vf x0 = loadf(x + m * ldx + k);
                    for (int n = 0; n < nr; n++) acc[m][n] += x0 * w0[n];
                    if (bits == 4) {
                        vf x1 = loadf(x + m * ldx + k + VW);
                        for (int n = 0; n < nr; n++) acc[m][n] += x1 * w1[n];
                    }
                }
            }
        }
    }
    store(acc, mr, nr, y, ldy, bias);
}

enum { F32 = 0, Q8 = 8, Q4 = 4 };

typedef struct {
    int kind;
    const float *x; long ldx;
    const void *w; long ldw;        /* f32: floats per row; q8, q4: bytes per row */
    const uint16_t *scale, *min;
    const float *bias;
    float *y; long ldy;
    long M, N, K;
    const float *xs;                /* one activation row, quantized: its group sums */
} job;

/* One tile of mr activation rows and nr output rows, with constant mr, nr per branch so the
 * accumulators stay in registers. w: the tile's first weight row, ldw its row stride. */
#define TILE(MRC, NRC)                                                                     \
    do {                                                                                  \
        if (kind == F32)                                                                  \
            tile_f32(x, j->ldx, (const float *)w, ldw, j->K, y, j->ldy, bias, MRC, NRC,   \
                     pf, plo, phi);                                                       \
        else                                                                              \
            tile_q(x, j->ldx, (const uint8_t *)w, ldw, sc, mn, j->K, y, j->ldy, bias,     \
                   MRC, NRC, kind, pfq);                                                  \
    } while (0)

/* nr quantized rows from n0 dequantized into buf (nr, K), in the order tile_q reads them:
 * with many activation rows, dequantizing once beats dequantizing per tile. */
static void dequant(const job *j, long n0, int nr, float *buf, long end) {
    long groups = j->K / GROUP;
    const uint8_t *pf = n0 + 3 * NR <= end ? (const uint8_t *)j->w + (n0 + 2 * NR) * j->ldw : 0;
    for (int n = 0; n < nr; n++) {
        const uint8_t *q = (const uint8_t *)j->w + (n0 + n) * j->ldw;
        for (long g = 0; g < groups; g++) {
            if (pf && n == 0) ahead(pf, NR * j->ldw / groups, g);
            float s = half(j->scale[(n0 + n) * groups + g]);
            float b = half(j->min[(n0 + n) * groups + g]);
            for (int v = 0; v < GROUP / VW; v += (j->kind == Q4 ? 2 : 1)) {
                long k = g * GROUP + v * VW;
                float *out = buf + n * j->K + k;
                if (j->kind == Q8) {
                    *(vfu *)out = codes(q + k, 0) * s + b;
                } else {
                    *(vfu *)out = codes(q + k / 2, 1) * s + b;
                    *(vfu *)(out + VW) = codes(q + k / 2, 2) * s + b;
                }
            }
        }
    }
}

/* The tile for mr = 1 .. MR activation rows, with mr a constant in each. */
#if MR == 4
#define TILES(N)                                                                           \
    switch (mr) {                                                                         \
    case 1: TILE(1, N); break;                                                            \
    case 2: TILE(2, N); break;                                                            \
    case 3: TILE(3, N); break;                                                            \
    default: TILE(4, N); break;                                                           \
    }
#else
#define TILES(N) if (mr == 1) TILE(1, N); else TILE(MR, N);
#endif

/* Output rows n0 .. n0 + nr for all M activation rows; buf: NR K floats or NULL; rows up
 * to end (this thread's chunk) may be fetched ahead. */
static void rows(const job *j, long n0, int nr, float *buf, long end) {
    long groups = j->K / GROUP, ldw = j->ldw;
    const uint16_t *sc = j->scale ? j->scale + n0 * groups : 0;
    const uint16_t *mn = j->min ? j->min + n0 * groups : 0;
    const float *bias = j->bias ? j->bias + n0 : 0;
    int kind = j->kind;
    const void *w = kind == F32 ? (const void *)((const float *)j->w + n0 * ldw)
                                : (const void *)((const uint8_t *)j->w + n0 * ldw);
    if (buf) {                      /* dequantized once, then multiplied as floats */
        dequant(j, n0, nr, buf, end);
        kind = F32; w = buf; ldw = j->K;
    }
    for (long m0 = 0; m0 < j->M; m0 += MR) {
        const float *x = j->x + m0 * j->ldx;
        float *y = j->y + m0 * j->ldy + n0;
        int mr = j->M - m0 < MR ? (int)(j->M - m0) : MR;
        /* float weights: the rows two blocks ahead are fetched during the first tile (more
         * requests in flight than the hardware prefetcher makes on its own) */
        const float *pf = j->kind == F32 && n0 + 3 * NR <= end
                              ? (const float *)w + 2 * NR * ldw : 0;
        long tiles = (j->M + MR - 1) / MR, t = m0 / MR;   /* each tile fetches a K share */
        long plo = j->K * t / tiles, phi = j->K * (t + 1) / tiles;
        const uint8_t *pfq = m0 == 0 && kind != F32 && n0 + (QA + 1) * NR <= end
                                 ? (const uint8_t *)w + QA * NR * ldw : 0;
        if (nr == NR)
            TILES(NR)
        else
            TILES(1)
    }
}

/* Output rows lo .. hi of a product with one activation row. */
static void one_row(const job *j, long lo, long hi) {
    if (j->kind == F32)
        vec_f32(j->x, (const float *)j->w, j->ldw, j->K, j->bias, j->y, lo, hi, j->N);
    else if (j->kind == Q8)
        vec_q(j->x, j->xs, (const uint8_t *)j->w, j->ldw, j->scale, j->min, j->K, j->bias, j->y,
              lo, hi, j->N, 8);
    else
        vec_q(j->x, j->xs, (const uint8_t *)j->w, j->ldw, j->scale, j->min, j->K, j->bias, j->y,
              lo, hi, j->N, 4);
}

/* Each thread takes chunks of `per` NR-row blocks, the next free one each time (the last
 * chunk is the N % NR rows, one at a time): on a shared CPU a thread that is switched out
 * leaves its share to the others instead of holding up the step. Quantized weights with
 * more than MR activation rows are dequantized block by block into a thread's own buffer. */
static void part(const job *j, long per) {
    long blocks = j->N / NR, chunks = (blocks + per - 1) / per;
    float *buf = j->kind != F32 && j->M > MR ? malloc(sizeof(float) * NR * j->K) : 0;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (long c = 0; c <= chunks; c++) {
        if (j->M == 1 && (j->kind == F32 || j->xs)) {     /* one row: vec.h, no tiles */
            long lo = (c < chunks ? c * per : blocks) * NR;
            long hi = c < chunks ? ((c + 1) * per < blocks ? (c + 1) * per : blocks) * NR : j->N;
            if (lo < hi) one_row(j, lo, hi);
            continue;
        }
        if (c == chunks) {
            for (long n = blocks * NR; n < j->N; n++) rows(j, n, 1, buf, 0);
            continue;
        }
        long end = (c + 1) * per < blocks ? (c + 1) * per : blocks;
        for (long b = c * per; b < end; b++) rows(j, b * NR, NR, buf, end * NR);
    }
    free(buf);
}

static void run(job *j, int threads) {
    long blocks = j->N / NR, groups = j->K / GROUP;
    float *xs = 0;
    if (j->M == 1 && j->kind != F32 && (xs = malloc(sizeof(float) * (groups + 1)))) {
        for (long g = 0; g < groups; g++) {         /* (without memory: the tiles) */
            vf t = {0};
            for (int v = 0; v < GROUP / VW; v++) t += loadf(j->x + g * GROUP + v * VW);
            xs[g] = hsum(t);
        }
        j->xs = xs;
    }
#ifdef _OPENMP
    if (threads > 1 && blocks >= 2 && j->N * j->K >= MINWORK) {
        long per = blocks / (threads * CHUNKS);
#pragma omp parallel num_threads(threads)
        part(j, per > 0 ? per : 1);
        free(xs);
        return;
    }
#endif
    (void)threads;
    part(j, blocks > 0 ? blocks : 1);
    free(xs);
}

/* int4's activations with each chunk of 2 VW columns reordered: evens, then odds. */
static float *permute(const float *x, long ldx, long M, long K) {
    static _Thread_local float *buf;
    static _Thread_local long cap;
    if (M * K > cap) {
        free(buf);
        cap = M * K;
        buf = malloc(sizeof(float) * cap);
        if (!buf) { cap = 0; return 0; }
    }
    for (long m = 0; m < M; m++)
        for (long c = 0; c < K; c += 2 * VW)
            for (int i = 0; i < VW; i++) {
                buf[m * K + c + i] = x[m * ldx + c + 2 * i];
                buf[m * K + c + VW + i] = x[m * ldx + c + 2 * i + 1];
            }
    return buf;
}

int es_vector_width(void) { return VW; }

/* The sum of n floats, each thread reading a contiguous share (fetched PF bytes ahead as
 * vec_f32 does): the machine's read bandwidth, which bench/kernels.py measures the matmuls
 * against. */
double es_stream_sum(const float *x, long n, int threads) {
    double total = 0;
    if (threads < 1) threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : total)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
        long lo = n * t / nt, hi = n * (t + 1) / nt, i = lo;
        vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (; i + 4 * VW <= hi; i += 4 * VW) {
            for (int c = 0; c < VW / 4; c++)      /* the 4 VW floats' cache lines */
                __builtin_prefetch(x + i + PF / 4 + 16 * c, 0, 3);
            s0 += loadf(x + i), s1 += loadf(x + i + VW);
            s2 += loadf(x + i + 2 * VW), s3 += loadf(x + i + 3 * VW);
        }
        double part = hsum(s0 + s1 + s2 + s3);
        for (; i < hi; i++) part += x[i];
        total += part;
    }
    return total;
}

void es_matmul_f32(const float *x, long ldx, const float *w, long ldw, const float *bias,
                   float *y, long ldy, long M, long N, long K, int threads) {
    job j = {F32, x, ldx, w, ldw, 0, 0, bias, y, ldy, M, N, K};
    run(&j, threads);
}

void es_matmul_q8(const float *x, long ldx, const uint8_t *codes, const uint16_t *scale,
                  const uint16_t *min, const float *bias, float *y, long ldy, long M, long N,
                  long K, int threads) {
    job j = {Q8, x, ldx, codes, K, scale, min, bias, y, ldy, M, N, K};
    run(&j, threads);
}

/* Returns 0, or -1 when the reordered activations could not be allocated. */
int es_matmul_q4(const float *x, long ldx, const uint8_t *packed, const uint16_t *scale,
                 const uint16_t *min, const float *bias, float *y, long ldy, long M, long N,
                 long K, int threads) {
    const float *xp = permute(x, ldx, M, K);
    if (!xp) return -1;
    job j = {Q4, xp, K, packed, K / 2, scale, min, bias, y, ldy, M, N, K};
    run(&j, threads);
    return 0;
}
