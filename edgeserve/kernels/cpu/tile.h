/* Tiles of the matmuls with 2 or more activation rows: MR activation rows by NR output rows
 * at a time, the MR x NR sums vectors along K in registers, summed across lanes only at the
 * end of a row. The activation rows come packed (pack_x), the weights either in place (float
 * rows with a row stride) or dequantized into a thread's buffer, interleaved (dequant), so
 * that a tile reads its rows through one pointer each for x and w: with one pointer per row
 * the compiler ran out of registers and kept the loop's addresses on the stack.
 */
#ifndef EDGESERVE_TILE_H
#define EDGESERVE_TILE_H
#include <stdint.h>
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

/* M activation rows packed tile by tile into xp: each tile of MR rows (mr in the last) as
 * xp[m0 * KV + k * mr + m * VW .. + VW] = x[m0 + m, k .. k + VW] for k a multiple of VW below
 * KV = K - K % VW; the K % VW tail columns are read from x itself. With perm (int4, K a
 * multiple of 2 VW) each chunk of 2 VW columns is reordered, its even columns first, then
 * its odd ones: the order of the low and high nibbles of VW packed bytes. */
static void pack_x(const float *x, long ldx, long M, long K, float *xp, int perm) {
    long kv = K / VW * VW;
    for (long m0 = 0; m0 < M; m0 += MR) {
        int mr = M - m0 < MR ? (int)(M - m0) : MR;
        float *t = xp + m0 * kv;
        for (int m = 0; m < mr; m++) {
            const float *r = x + (m0 + m) * ldx;
            if (perm) {
                for (long k = 0; k < kv; k += 2 * VW) {
                    vf ev, od;
                    deinterleave(loadf(r + k), loadf(r + k + VW), &ev, &od);
                    *(vfu *)(t + k * mr + m * VW) = ev;
                    *(vfu *)(t + (k + VW) * mr + m * VW) = od;
                }
            } else {
                for (long k = 0; k < kv; k += VW) *(vfu *)(t + k * mr + m * VW) = loadf(r + k);
            }
        }
    }
}

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

/* Columns k0 .. k1 (multiples of VW) of a tile: w's row n, columns k .. k + VW, at
 * w + n * wn + k * wk (in place: wn = the row stride, wk = 1; interleaved: wn = VW,
 * wk = nr); the rows at pf (same strides) are fetched meanwhile where pf is set, and the
 * first `lines` cache lines from pl, one a step. */
INLINE void steps(vf acc[MR][NR], const float *xt, const float *w, long wn, long wk, long k0,
                  long k1, int mr, int nr, const float *pf, const uint8_t *pl, long lines) {
    for (long k = k0; k < k1; k += VW) {
        if (lines > 0) __builtin_prefetch(pl, 0, PH), pl += 64, lines--;
        vf wv[NR];
        const float *wp = w + k * wk, *xk = xt + k * mr;
        for (int n = 0; n < nr; n++) wv[n] = loadf(wp + n * wn);
        if (pf)
            for (int n = 0; n < nr; n++) __builtin_prefetch(pf + n * wn + k * wk, 0, 3);
        for (int m = 0; m < mr; m++) {
            vf xv = loadf(xk + m * VW);
            for (int n = 0; n < nr; n++) acc[m][n] += xv * wv[n];
        }
    }
}

/* One tile: xt its packed activations (x, ldx for the K tail), float weights as in steps();
 * pf the rows ahead to fetch during columns plo .. phi (multiples of VW), or 0. */
INLINE void tile_f32(const float *xt, const float *x, long ldx, const float *w, long wn,
                     long wk, long K, float *y, long ldy, const float *bias, int mr, int nr,
                     const float *pf, long plo, long phi) {
    vf acc[MR][NR];
    long kv = K / VW * VW;
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++) acc[m][n] = (vf){0};
    if (pf) {                       /* the prefetch's test outside the loops */
        steps(acc, xt, w, wn, wk, 0, plo, mr, nr, 0, 0, 0);
        steps(acc, xt, w, wn, wk, plo, phi, mr, nr, pf, 0, 0);
        steps(acc, xt, w, wn, wk, phi, kv, mr, nr, 0, 0, 0);
    } else {
        steps(acc, xt, w, wn, wk, 0, kv, mr, nr, 0, 0, 0);
    }
    store(acc, mr, nr, y, ldy, bias);
    for (long k = kv; k < K; k++)   /* float weights in place only: K % 32 == 0 otherwise */
        for (int m = 0; m < mr; m++)
            for (int n = 0; n < nr; n++) y[m * ldy + n] += x[m * ldx + k] * w[n * wn + k];
}

/* One tile over dequant()'s buffer (K a multiple of VW); the `lines` cache lines from pl
 * (quantized rows ahead) are fetched meanwhile, one a step, spread over the tiles. */
INLINE void tile_buf(const float *xt, const float *buf, long K, float *y, long ldy,
                     const float *bias, int mr, int nr, const uint8_t *pl, long lines) {
    vf acc[MR][NR];
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++) acc[m][n] = (vf){0};
    steps(acc, xt, buf, VW, nr, 0, K, mr, nr, 0, pl, lines);
    store(acc, mr, nr, y, ldy, bias);
}

/* Share g of a block of weights ahead (step bytes per share) fetched into the cache: short
 * quantized rows are too short for the hardware prefetcher to run far enough ahead. */
INLINE void ahead(const uint8_t *pf, long step, long g) {
    for (long o = g * step; o < (g + 1) * step; o += 64) __builtin_prefetch(pf + o, 0, PH);
}

/* VW weights (int8), or 2 VW (int4: the low nibbles, then the high ones) of row q's codes at
 * column k, dequantized with the group's scale s and minimum b. */
INLINE void weights(const uint8_t *q, long k, int bits, float s, float b, vf *w0, vf *w1) {
    if (bits == 8) {
        *w0 = codes(q + k, 0) * s + b;
    } else {
        nibbles(q + k / 2, w0, w1);
        *w0 = *w0 * s + b;
        *w1 = *w1 * s + b;
    }
}

/* One tile over quantized rows q (ldq bytes a row), dequantized in registers. xt: its packed
 * activations; for int4 in pack_x's reordered columns (within each chunk of 2 VW columns the
 * even ones, then the odd ones), so low and high nibbles need no interleaving. */
INLINE void tile_q(const float *xt, const uint8_t *q, long ldq, const uint16_t *sc,
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
                for (int n = 0; n < nr; n++)
                    weights(q + n * ldq, k, bits, s[n][g], b[n][g], &w0[n], &w1[n]);
                for (int m = 0; m < mr; m++) {
                    vf x0 = loadf(xt + k * mr + m * VW);
                    for (int n = 0; n < nr; n++) acc[m][n] += x0 * w0[n];
                    if (bits == 4) {
                        vf x1 = loadf(xt + (k + VW) * mr + m * VW);
                        for (int n = 0; n < nr; n++) acc[m][n] += x1 * w1[n];
                    }
                }
            }
        }
    }
    store(acc, mr, nr, y, ldy, bias);
}

/* nr quantized rows q (ldq bytes a row, groups scales and minimums a row) dequantized into
 * buf interleaved: row n's columns k .. k + VW at buf[k * nr + n * VW] (int4: in pack_x's
 * order), for tile_buf. */
INLINE void dequant(const uint8_t *q, long ldq, const uint16_t *sc, const uint16_t *mn,
                    long K, int nr, int bits, float *buf) {
    long groups = K / GROUP;
    float s[GCHUNK], b[GCHUNK];     /* a row's scales and minimums, read from memory below */
    for (int n = 0; n < nr; n++)
        for (long g0 = 0; g0 < groups; g0 += GCHUNK) {
            int gc = groups - g0 < GCHUNK ? (int)(groups - g0) : GCHUNK;
            halves(sc + n * groups + g0, s, gc);
            halves(mn + n * groups + g0, b, gc);
            for (int g = 0; g < gc; g++)
                for (int v = 0; v < GROUP / VW; v += (bits == 4 ? 2 : 1)) {
                    long k = (g0 + g) * GROUP + v * VW;
                    vf w0, w1;
                    weights(q + n * ldq, k, bits, s[g], b[g], &w0, &w1);
                    *(vf *)(buf + k * nr + n * VW) = w0;
                    if (bits == 4) *(vf *)(buf + (k + VW) * nr + n * VW) = w1;
                }
        }
}
#endif
