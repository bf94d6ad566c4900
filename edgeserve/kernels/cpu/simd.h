/* Vectors of VW floats and the conversions the matmul kernels need: codes from bytes or
 * nibbles, float16 scales, the sum across lanes. VW follows the compiler's target; GCC's
 * vector extensions lower the generic parts to scalar code on CPUs without such SIMD. */
#ifndef EDGESERVE_SIMD_H
#define EDGESERVE_SIMD_H
#include <stdint.h>
#include <string.h>
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

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef uint8_t vb __attribute__((vector_size(VW)));
typedef uint8_t vbu __attribute__((vector_size(VW), aligned(1)));
#define INLINE static inline __attribute__((always_inline))

INLINE vf loadf(const float *p) { return *(const vfu *)p; }
INLINE vb loadb(const uint8_t *p) { return *(const vbu *)p; }

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

/* The 2 VW codes of VW packed bytes at p: the low nibbles in *lo, the high ones in *hi
 * (bytes widened once, then masked and shifted: no nibble is moved across lanes). */
INLINE void nibbles(const uint8_t *p, vf *lo, vf *hi) {
#if defined(__AVX512F__)
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = (vf)_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    *hi = (vf)_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
#elif defined(__AVX2__)
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = (vf)_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    *hi = (vf)_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
#else
    vb b = loadb(p);
    *lo = __builtin_convertvector(b & 15, vf);
    *hi = __builtin_convertvector(b >> 4, vf);
#endif
}

/* The even lanes of a then b into *ev, the odd ones into *od: 2 VW columns taken apart. */
INLINE void deinterleave(vf a, vf b, vf *ev, vf *od) {
#if defined(__AVX512F__)
    const __m512i e = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i o = _mm512_add_epi32(e, _mm512_set1_epi32(1));
    *ev = (vf)_mm512_permutex2var_ps((__m512)a, e, (__m512)b);
    *od = (vf)_mm512_permutex2var_ps((__m512)a, o, (__m512)b);
#else
    for (int i = 0; i < VW / 2; i++) {
        (*ev)[i] = a[2 * i], (*ev)[VW / 2 + i] = b[2 * i];
        (*od)[i] = a[2 * i + 1], (*od)[VW / 2 + i] = b[2 * i + 1];
    }
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

/* The sums of four vectors at once: out[i] = sum of v[i]'s lanes. On AVX-512 the four are
 * folded into one vector pairwise (13 operations instead of 4 separate sums' 32). */
INLINE void hsum4(vf a, vf b, vf c, vf d, float out[4]) {
#if defined(__AVX512F__)
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps((__m512)a, (__m512)b),
                              _mm512_unpackhi_ps((__m512)a, (__m512)b));   /* a b a b */
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps((__m512)c, (__m512)d),
                              _mm512_unpackhi_ps((__m512)c, (__m512)d));   /* c d c d */
    __m512 t = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44),
                             _mm512_shuffle_ps(ab, cd, 0xEE));             /* a b c d */
    t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0x4E));    /* 128-bit lanes summed */
    t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));
    _mm_storeu_ps(out, _mm512_castps512_ps128(t));
#else
    out[0] = hsum(a), out[1] = hsum(b), out[2] = hsum(c), out[3] = hsum(d);
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

/* n float16 values to float32, 16 (or 8) at a time where the CPU converts vectors. */
INLINE void halves(const uint16_t *h, float *out, int n) {
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) out[i] = half(h[i]);
}
#endif
