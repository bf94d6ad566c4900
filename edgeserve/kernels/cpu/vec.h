/* y (N) = W x (+ bias) for one activation row x (decode with one stream), over float32,
 * int8 and int4 weights in matmul.c's layouts; rows n0 .. n1 of y, rows up to end may be
 * fetched ahead. With one row every weight is used once: the time is its bytes read from
 * memory, so the loops stream through VR rows at a time and fetch the rows PF bytes ahead
 * themselves (more requests in flight than the hardware prefetcher makes on its own).
 *
 * Quantized rows are not dequantized: per group of 32 columns the codes' dot product with
 * x is taken in lanes and scaled once, and the minimums' share, sum_g min_g * sum(x_g), comes
 * from the group sums xs of x, computed once per product:
 *     y[n] = sum_g scale[n, g] * (x_g . code[n, g]) + sum_g min[n, g] * xs[g]
 */
#ifndef EDGESERVE_VEC_H
#define EDGESERVE_VEC_H
#include <stdint.h>
#include "simd.h"

#define VR 4            /* rows at a time (a multiple of 4: their sums are folded by hsum4) */
#define PF 16384        /* bytes fetched ahead (measured: 8-16 KiB beat 4 and 32) */
#define PH 2            /* quantized rows fetched into L2 (measured: 9% faster than L1) */
#define GROUP 32
#define GCHUNK 64       /* groups whose scales are converted to float at once */

/* VR rows' vector sums folded, plus the tail and the bias, into y. */
INLINE void vec_store(vf acc[VR], const float *tail, int nr, float *y, const float *bias) {
    float sums[VR];
    for (int r = 0; r < VR; r += 4) hsum4(acc[r], acc[r + 1], acc[r + 2], acc[r + 3], sums + r);
    for (int r = 0; r < nr; r++) y[r] = sums[r] + tail[r] + (bias ? bias[r] : 0.f);
}

static void vec_f32(const float *x, const float *w, long ldw, long K, const float *bias,
                    float *y, long n0, long n1, long end) {
    long ahead = (PF / 4 + K - 1) / K;                          /* rows */
    if (ahead < VR) ahead = VR;
    for (long n = n0; n < n1; n += VR) {
        int nr = n1 - n < VR ? (int)(n1 - n) : VR;
        const float *wn = w + n * ldw, *pf = n + ahead + VR <= end ? wn + ahead * ldw : 0;
        vf acc[VR];
        float tail[VR] = {0};
        for (int r = 0; r < VR; r++) acc[r] = (vf){0};
        long k = 0;
        if (nr == VR) {             /* VR a constant: the sums stay in registers */
            for (; k + VW <= K; k += VW) {
                if (pf)
                    for (int r = 0; r < VR; r++) __builtin_prefetch(pf + r * ldw + k, 0, 3);
                vf xv = loadf(x + k);
                for (int r = 0; r < VR; r++) acc[r] += xv * loadf(wn + r * ldw + k);
            }
        } else {
            for (; k + VW <= K; k += VW)
                for (int r = 0; r < nr; r++) acc[r] += loadf(x + k) * loadf(wn + r * ldw + k);
        }
        for (int r = 0; r < nr; r++)
            for (long t = k; t < K; t++) tail[r] += x[t] * wn[r * ldw + t];
        vec_store(acc, tail, nr, y + n, bias ? bias + n : 0);
    }
}

/* x_g . code_g in lanes for one group (int4: x in pack_x's order, evens then odds). */
INLINE vf group_dot(const float *x, const uint8_t *q, int bits) {
    vf t;                   /* the first product starts the sum (0 + p is not folded) */
    if (bits == 8) {
        t = loadf(x) * codes(q, 0);
        for (int v = 1; v < GROUP / VW; v++) t += loadf(x + v * VW) * codes(q + v * VW, 0);
    } else {
        vf lo, hi;
        nibbles(q, &lo, &hi);
        t = loadf(x) * lo + loadf(x + VW) * hi;
        for (int v = 1; v < GROUP / (2 * VW); v++) {
            nibbles(q + v * VW, &lo, &hi);
            t += loadf(x + 2 * v * VW) * lo + loadf(x + 2 * v * VW + VW) * hi;
        }
    }
    return t;
}

/* nr rows of y from their codes w (ldq bytes a row) and their scales and minimums (groups a
 * row); the rows ahead at pf are fetched meanwhile. nr is a constant where it is VR. */
INLINE void q_rows(const float *x, const float *xs, const uint8_t *w, long ldq,
                   const uint16_t *scale, const uint16_t *min, long groups, const uint8_t *pf,
                   float *y, const float *bias, int nr, int bits) {
    long gb = GROUP * bits / 8;                         /* bytes of a row's group */
    vf acc[VR];
    float low[VR] = {0}, s[VR * GCHUNK], b[VR * GCHUNK];
    for (int r = 0; r < VR; r++) acc[r] = (vf){0};
    for (long g0 = 0; g0 < groups; g0 += GCHUNK) {
        int gc = groups - g0 < GCHUNK ? (int)(groups - g0) : GCHUNK;
        if (gc == groups) {         /* all groups at once: the rows' values are contiguous */
            halves(scale, s, nr * gc);
            halves(min, b, nr * gc);
        } else {
            for (int r = 0; r < nr; r++) {
                halves(scale + r * groups + g0, s + r * gc, gc);
                halves(min + r * groups + g0, b + r * gc, gc);
            }
        }
        for (int r = 0; r < nr; r++) {
            const float *br = b + r * gc;
            int g = 0;              /* the minimums' share in lanes, then the rest */
            for (; g + VW <= gc; g += VW) acc[r] += loadf(br + g) * loadf(xs + g0 + g);
            for (; g < gc; g++) low[r] += br[g] * xs[g0 + g];
        }
        const float *xg = x + g0 * GROUP;
        const uint8_t *q = w + g0 * gb, *p = pf + g0 * gb;
        for (int g = 0; g < gc; g++, xg += GROUP, q += gb, p += gb) {
            for (int r = 0; r < nr; r++) __builtin_prefetch(p + r * ldq, 0, PH);
            for (int r = 0; r < nr; r++)
                acc[r] += group_dot(xg, q + r * ldq, bits) * s[r * gc + g];
        }
    }
    vec_store(acc, low, nr, y, bias);
}

/* q: codes (int8) or packed nibbles (int4), ldq bytes a row; scale, min (N, K / GROUP). */
INLINE void vec_q(const float *x, const float *xs, const uint8_t *q, long ldq,
                  const uint16_t *scale, const uint16_t *min, long K, const float *bias,
                  float *y, long n0, long n1, long end, int bits) {
    long groups = K / GROUP, ahead = (PF + ldq - 1) / ldq;
    if (ahead < VR) ahead = VR;
    for (long n = n0; n < n1; n += VR) {
        int nr = n1 - n < VR ? (int)(n1 - n) : VR;
        const uint8_t *w = q + n * ldq, *pf = n + ahead + VR <= end ? w + ahead * ldq : w;
        const uint16_t *sc = scale + n * groups, *mn = min + n * groups;
        const float *b = bias ? bias + n : 0;
        if (nr == VR)
            q_rows(x, xs, w, ldq, sc, mn, groups, pf, y + n, b, VR, bits);
        else
            q_rows(x, xs, w, ldq, sc, mn, groups, pf, y + n, b, nr, bits);
    }
}
#endif
