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
 * The vector width VW follows the compiler's target; GCC's vector extensions lower it to
 * plain scalar code where the CPU has no SIMD unit of that width.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX2__)
#define VW 8
#else
#define VW 4
#endif
#define NR 4            /* output rows per tile: their weights are loaded once per K step */
#define MR 4            /* activation rows per tile */
#define GROUP 32

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef uint8_t vb __attribute__((vector_size(VW)));
typedef uint8_t vbu __attribute__((vector_size(VW), aligned(1)));
#define INLINE static inline __attribute__((always_inline))

INLINE vf loadf(const float *p) { return *(const vfu *)p; }
INLINE vb loadb(const uint8_t *p) { return *(const vbu *)p; }
INLINE vf splat(float s) { return (vf){0} + s; }

/* VW codes from VW bytes at p: the bytes (part 0), their low (1) or high (2) nibbles. */
INLINE vf codes(const uint8_t *p, int part) {
#if defined(__AVX512F__)
    __m128i r = _mm_loadu_si128((const __m128i *)p);
#elif defined(__AVX2__)
    __m128i r = _mm_loadl_epi64((const __m128i *)p);
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
    if (part == 1) r = _mm_and_si128(r, _mm_set1_epi8(15));
    if (part == 2) r = _mm_and_si128(_mm_srli_epi16(r, 4), _mm_set1_epi8(15));
#endif
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(r));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(r));
#else
    vb b = loadb(p);
    if (part == 1) b &= 15;
    if (part == 2) b >>= 4;
    return __builtin_convertvector(b, vf);
#endif
}

INLINE float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
#endif
}

INLINE float half(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else  /* IEEE half -> float by hand: sign, exponent, mantissa; subnormals scaled */
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023, bits;
    float f;
    if (e == 0) {
        f = (float)m * (1.f / 16777216.f);          /* m * 2^-24 */
        return sign ? -f : f;
    }
    bits = sign | ((e == 31 ? 255u : e + 112u) << 23) | (m << 13);
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* Stores one tile's sums plus bias; K tail (K % VW) for float weights added by the caller. */
INLINE void store(vf acc[MR][NR], int mr, int nr, float *y, long ldy, const float *bias) {
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++)
            y[m * ldy + n] = hsum(acc[m][n]) + (bias ? bias[n] : 0.f);
}

INLINE void tile_f32(const float *x, long ldx, const float *w, long ldw, long K,
                     float *y, long ldy, const float *bias, int mr, int nr) {
    vf acc[MR][NR];
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++) acc[m][n] = (vf){0};
    long k = 0;
    for (; k + VW <= K; k += VW) {
        vf wv[NR];
        for (int n = 0; n < nr; n++) wv[n] = loadf(w + n * ldw + k);
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

/* x here is the activations with int4's column order within each chunk of 2 VW columns:
 * the even columns, then the odd ones (see permute()), so low and high nibbles need no
 * interleaving. For int8, x is in its own order. */
INLINE void tile_q(const float *x, long ldx, const uint8_t *q, long ldq, const uint16_t *sc,
                   const uint16_t *mn, long K, float *y, long ldy, const float *bias,
                   int mr, int nr, int bits) {
    vf acc[MR][NR];
    long groups = K / GROUP;
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++) acc[m][n] = (vf){0};
    for (long g = 0; g < groups; g++) {
        vf s[NR], b[NR];
        for (int n = 0; n < nr; n++) {
            s[n] = splat(half(sc[n * groups + g]));
            b[n] = splat(half(mn[n * groups + g]));
        }
        for (int v = 0; v < GROUP / VW; v += (bits == 4 ? 2 : 1)) {
            long k = g * GROUP + v * VW;
            vf w0[NR], w1[NR];
            for (int n = 0; n < nr; n++) {
                if (bits == 8) {
                    w0[n] = codes(q + n * ldq + k, 0) * s[n] + b[n];
                } else {
                    w0[n] = codes(q + n * ldq + k / 2, 1) * s[n] + b[n];
                    w1[n] = codes(q + n * ldq + k / 2, 2) * s[n] + b[n];
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
} job;

/* One tile of mr activation rows and nr output rows, with constant mr, nr per branch so the
 * accumulators stay in registers. */
#define TILE(MRC, NRC)                                                                     \
    do {                                                                                  \
        if (j->kind == F32)                                                               \
            tile_f32(x, j->ldx, (const float *)j->w + n0 * j->ldw, j->ldw, j->K, y,       \
                     j->ldy, bias, MRC, NRC);                                             \
        else if (j->kind == Q8)                                                           \
            tile_q(x, j->ldx, (const uint8_t *)j->w + n0 * j->ldw, j->ldw, sc, mn, j->K,  \
                   y, j->ldy, bias, MRC, NRC, 8);                                         \
        else                                                                              \
            tile_q(x, j->ldx, (const uint8_t *)j->w + n0 * j->ldw, j->ldw, sc, mn, j->K,  \
                   y, j->ldy, bias, MRC, NRC, 4);                                         \
    } while (0)

/* nr quantized rows from n0 dequantized into buf (nr, K), in the order tile_q reads them:
 * with many activation rows, dequantizing once beats dequantizing per tile. */
static void dequant(const job *j, long n0, int nr, float *buf) {
    long groups = j->K / GROUP;
    for (int n = 0; n < nr; n++) {
        const uint8_t *q = (const uint8_t *)j->w + (n0 + n) * j->ldw;
        for (long g = 0; g < groups; g++) {
            vf s = splat(half(j->scale[(n0 + n) * groups + g]));
            vf b = splat(half(j->min[(n0 + n) * groups + g]));
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

static void rows(const job *j, long n0, int nr) {
    static _Thread_local float *buf;
    static _Thread_local long cap;
    long groups = j->K / GROUP;
    const uint16_t *sc = j->scale ? j->scale + n0 * groups : 0;
    const uint16_t *mn = j->min ? j->min + n0 * groups : 0;
    const float *bias = j->bias ? j->bias + n0 : 0;
    job f = *j;                     /* quantized rows dequantized: then a float job */
    if (j->kind != F32 && j->M > MR) {
        if (NR * j->K > cap) {
            float *grown = realloc(buf, sizeof(float) * NR * j->K);
            if (grown) { buf = grown; cap = NR * j->K; }
        }
        if (NR * j->K <= cap) {
            dequant(j, n0, nr, buf);
            f.kind = F32; f.w = buf - n0 * j->K; f.ldw = j->K;
        }
    }
    j = &f;
    for (long m0 = 0; m0 < j->M; m0 += MR) {
        const float *x = j->x + m0 * j->ldx;
        float *y = j->y + m0 * j->ldy + n0;
        int mr = j->M - m0 < MR ? (int)(j->M - m0) : MR;
        if (nr == NR) {
            switch (mr) {
            case 1: TILE(1, NR); break;
            case 2: TILE(2, NR); break;
            case 3: TILE(3, NR); break;
            default: TILE(MR, NR); break;
            }
        } else {
            switch (mr) {
            case 1: TILE(1, 1); break;
            case 2: TILE(2, 1); break;
            case 3: TILE(3, 1); break;
            default: TILE(MR, 1); break;
            }
        }
    }
}

/* Thread t of T: a contiguous run of whole NR-row blocks (the last thread also gets the
 * N % NR rows, one at a time). */
static void part(const job *j, int t, int T) {
    long blocks = j->N / NR;
    long b0 = blocks * t / T, b1 = blocks * (t + 1) / T;
    for (long b = b0; b < b1; b++) rows(j, b * NR, NR);
    if (t == T - 1)
        for (long n = blocks * NR; n < j->N; n++) rows(j, n, 1);
}

static void run(const job *j, int threads) {
#ifdef _OPENMP
    if (threads > 1 && j->N >= 2 * NR) {
#pragma omp parallel num_threads(threads)
        part(j, omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    (void)threads;
    part(j, 0, 1);
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
