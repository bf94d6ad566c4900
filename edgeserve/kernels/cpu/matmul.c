/* y (M, N) = x (M, K) @ W^T (+ bias) for a few rows M, over float32, int8 and int4 weights.
 *
 * Decode multiplies a few activation rows by large weights: the time is the weight's bytes
 * read from memory, or with more rows the multiply-adds. One activation row goes to vec.h's
 * kernels. With more, each thread takes runs of output rows; for NR output rows at a time
 * it walks all M rows in tiles of MR (tile.h), so a weight row comes from memory once and
 * from cache for the other tiles. Quantized weights (w = code * scale + min, per group of 32
 * columns) are dequantized in registers for up to MR rows, and with more rows once per NR
 * rows into a thread's buffer; activations stay float32.
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
#include "tile.h"
#include "vec.h"

#define MINWORK 65536   /* weights (N K) below which one thread does the whole product */
#define CHUNKS 4        /* chunks of output rows per thread, taken in turn */
#define PFB 1           /* blocks of NR rows ahead fetched into the cache (measured: 1 best) */

enum { F32 = 0, Q8 = 8, Q4 = 4 };

typedef struct {
    int kind;
    const float *x; long ldx;
    const void *w; long ldw;        /* f32: floats per row; q8, q4: bytes per row */
    const uint16_t *scale, *min;
    const float *bias;
    float *y; long ldy;
    long M, N, K;
    const float *xp;                /* x packed by pack_x (M > 1; int4 reordered) */
    const float *xs;                /* x's group sums (M = 1, quantized) */
} job;

/* One tile of mr activation rows and nr output rows, with constant mr, nr per branch so the
 * accumulators stay in registers. */
#define TILE(MRC, NRC)                                                                     \
    do {                                                                                  \
        if (buf)                                                                          \
            tile_buf(xt, buf, j->K, y, j->ldy, bias, MRC, NRC, pl, lines);                \
        else if (j->kind == F32)                                                          \
            tile_f32(xt, x, j->ldx, (const float *)w, j->ldw, 1, j->K, y, j->ldy, bias,   \
                     MRC, NRC, pf, plo, phi);                                             \
        else                                                                              \
            tile_q(xt, (const uint8_t *)w, j->ldw, sc, mn, j->K, y, j->ldy, bias, MRC,    \
                   NRC, j->kind, pfq);                                                    \
    } while (0)

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
    long groups = j->K / GROUP, ldw = j->ldw, kv = j->K / VW * VW;
    const uint16_t *sc = j->scale ? j->scale + n0 * groups : 0;
    const uint16_t *mn = j->min ? j->min + n0 * groups : 0;
    const float *bias = j->bias ? j->bias + n0 : 0;
    const void *w = j->kind == F32 ? (const void *)((const float *)j->w + n0 * ldw)
                                   : (const void *)((const uint8_t *)j->w + n0 * ldw);
    /* the block PFB ahead is fetched into the cache meanwhile (more requests in flight than
     * the hardware prefetcher makes on its own): float rows over all tiles, a share of K
     * each; quantized rows during the first tile, or with a buffer one line a step over
     * the tiles */
    int ahead = n0 + (PFB + 1) * NR <= end;
    long unit = j->kind == F32 ? 4 : 1;                         /* bytes per ldw */
    const uint8_t *next = ahead ? (const uint8_t *)w + PFB * NR * ldw * unit : 0;
    if (buf)                        /* dequantized once, then multiplied as floats */
        dequant(w, ldw, sc, mn, j->K, nr, j->kind, buf);
    for (long m0 = 0; m0 < j->M; m0 += MR) {
        const float *x = j->x + m0 * j->ldx, *xt = j->xp + m0 * kv;
        float *y = j->y + m0 * j->ldy + n0;
        int mr = j->M - m0 < MR ? (int)(j->M - m0) : MR;
        long tiles = (j->M + MR - 1) / MR, t = m0 / MR;
        const float *pf = j->kind == F32 ? (const float *)next : 0;
        long plo = kv / VW * t / tiles * VW, phi = kv / VW * (t + 1) / tiles * VW;
        const uint8_t *pfq = m0 == 0 ? next : 0;
        long all = next ? (NR * ldw + 63) / 64 : 0, l0 = all * t / tiles;
        const uint8_t *pl = next ? next + 64 * l0 : 0;
        long lines = all * (t + 1) / tiles - l0;
        if (nr == NR)
            TILES(NR)
        else
            TILES(1)
    }
}

/* Output rows lo .. hi of a product with one activation row (vec.h). */
static void one_row(const job *j, long lo, long hi) {
    const uint8_t *q = (const uint8_t *)j->w;
    if (j->kind == F32)
        vec_f32(j->x, (const float *)j->w, j->ldw, j->K, j->bias, j->y, lo, hi, j->N);
    else if (j->kind == Q8)
        vec_q(j->x, j->xs, q, j->ldw, j->scale, j->min, j->K, j->bias, j->y, lo, hi, j->N, 8);
    else
        vec_q(j->x, j->xs, q, j->ldw, j->scale, j->min, j->K, j->bias, j->y, lo, hi, j->N, 4);
}

/* Each thread takes chunks of `per` NR-row blocks, the next free one each time (the last
 * chunk is the N % NR rows): on a shared CPU a thread that is switched out leaves its share
 * to the others instead of holding up the step. Quantized weights with more than MR
 * activation rows are dequantized block by block into a thread's own buffer. */
static void part(const job *j, long per) {
    long blocks = j->N / NR, chunks = (blocks + per - 1) / per;
    int one = j->M == 1 && (j->kind == F32 || j->xs);
    float *buf = j->kind != F32 && j->M > MR ? aligned_alloc(64, sizeof(float) * NR * j->K) : 0;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (long c = 0; c <= chunks; c++) {
        long first = c < chunks ? c * per : blocks;
        long end = c < chunks ? ((c + 1) * per < blocks ? (c + 1) * per : blocks) : blocks;
        if (one) {
            long lo = first * NR, hi = c < chunks ? end * NR : j->N;
            if (lo < hi) one_row(j, lo, hi);
        } else if (c == chunks) {
            for (long n = blocks * NR; n < j->N; n++) rows(j, n, 1, buf, 0);
        } else {
            for (long b = first; b < end; b++) rows(j, b * NR, NR, buf, end * NR);
        }
    }
    free(buf);
}

/* A buffer of n floats (64-byte aligned) kept by the calling thread for its next products
 * (the packed activations); NULL without memory. */
static float *scratch(long n) {
    static _Thread_local float *buf;
    static _Thread_local long cap;
    if (n > cap) {
        free(buf);
        cap = (n + 15) / 16 * 16;
        buf = aligned_alloc(64, sizeof(float) * cap);
        if (!buf) cap = 0;
    }
    return buf;
}

static void run_threads(const job *j, int threads) {
    long blocks = j->N / NR;
#ifdef _OPENMP
    if (threads > 1 && blocks >= 2 && j->N * j->K >= MINWORK) {
        long per = blocks / (threads * CHUNKS);
#pragma omp parallel num_threads(threads)
        part(j, per > 0 ? per : 1);
        return;
    }
#endif
    (void)threads;
    part(j, blocks > 0 ? blocks : 1);
}

/* Packs x (int4: reordered, pack_x) and, for one quantized row, sums its groups; then runs
 * the product. Returns -1 where int4's activations found no memory; other products then
 * take one row at a time (one float32 or int8 row is not packed: it is its packed form). */
static int run(job *j, int threads) {
    long groups = j->K / GROUP;
    float xs[j->M == 1 && j->kind != F32 && groups <= 4096 ? groups : 1];
    j->xp = j->x;
    if (j->M == 1 && j->kind != F32 && groups <= 4096) {
        for (long g = 0; g < groups; g++) {
            vf t = {0};
            for (int v = 0; v < GROUP / VW; v++) t += loadf(j->x + g * GROUP + v * VW);
            xs[g] = hsum(t);
        }
        j->xs = xs;
    }
    if (j->M > 1 || j->kind == Q4) {
        float *xp = scratch(j->M * (j->K / VW * VW));
        if (!xp && j->kind == Q4) return -1;
        if (!xp) {
            for (long m = 0; m < j->M; m++) {
                job one = *j;
                one.x += m * j->ldx, one.y += m * j->ldy, one.M = 1;
                run(&one, threads);
            }
            return 0;
        }
        pack_x(j->x, j->ldx, j->M, j->K, xp, j->kind == Q4);
        j->xp = xp;
        if (j->M == 1) j->x = xp, j->ldx = j->K;    /* vec.h reads x: int4's order */
    }
    run_threads(j, threads);
    return 0;
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
    job j = {F32, x, ldx, w, ldw, 0, 0, bias, y, ldy, M, N, K, 0, 0};
    run(&j, threads);
}

void es_matmul_q8(const float *x, long ldx, const uint8_t *codes, const uint16_t *scale,
                  const uint16_t *min, const float *bias, float *y, long ldy, long M, long N,
                  long K, int threads) {
    job j = {Q8, x, ldx, codes, K, scale, min, bias, y, ldy, M, N, K, 0, 0};
    run(&j, threads);
}

/* Returns 0, or -1 when the reordered activations could not be allocated. */
int es_matmul_q4(const float *x, long ldx, const uint8_t *packed, const uint16_t *scale,
                 const uint16_t *min, const float *bias, float *y, long ldy, long M, long N,
                 long K, int threads) {
    job j = {Q4, x, ldx, packed, K / 2, scale, min, bias, y, ldy, M, N, K, 0, 0};
    return run(&j, threads);
}
