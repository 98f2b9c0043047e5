/* Matrix products and row gathers directly on GGML-quantized weight blocks.
 *
 * Plain C11 (no torch headers): folklm.kernels.native compiles this file at first use with the
 * system compiler for the CPU it runs on and calls it through ctypes with tensors' data
 * pointers. Block layouts follow llama.cpp's ggml-common.h (documented again in
 * folklm/checkpoint/gguf_quants.py); the code is folklm's own.
 *
 * Method (the one llama.cpp popularised for CPUs): each row of activations is quantized once
 * per call to int8 in blocks of 32 (one float scale per block, plus the integer sum of every
 * 16 values), so a weight block's dot product is an integer dot product of its codes with the
 * activation codes, scaled once per block:
 *
 *   w = d * (q - z)   (Q4_0 z=8, Q5_0 z=16, Q6_K z=32 with d = d * sc[16]):
 *       sum w x  =  d * dx * (sum q qx  -  z * sum qx)
 *   w = d * q + m     (Q4_1, Q5_1; Q4_K/Q5_K with d = d*sc, m = -dmin*mn per 32):
 *       sum w x  =  dx * (d * sum q qx  +  m * sum qx)
 *   Q8_0: w = d * q with signed q: the sign is moved onto the activation (|q| * sign(qx, q)).
 *
 * Codes q are unsigned (at most 6 bits) in every format but Q8_0, so the unsigned x signed
 * byte products of AVX2 (vpmaddubsw, no saturation below 2 * 63 * 127) and AVX-VNNI /
 * AVX512-VNNI (vpdpbusd) apply directly. A portable scalar path computes the same integer
 * sums for every format (other CPUs, and a self-check); `path` 1 forces it.
 *
 * Exported (all sizes int64; k is the row length in weights; w rows are `row_bytes` apart):
 *   folk_isa()                        -> 2 VNNI, 1 AVX2, 0 scalar (what this build runs)
 *   folk_matmul(...)                  y[m, out_index[r]] = sum_k W[r, k] x[m, k]
 *   folk_dequant_rows(...)            out[i, :] = W[rows[i], :] as float32, exactly as ggml
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FOLK_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define FOLK_VNNI 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#elif defined(__AVXVNNI__)
#define FOLK_VNNI 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#endif
#endif

#include "folk_kernels.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

enum {
    T_Q4_0 = 2,
    T_Q4_1 = 3,
    T_Q5_0 = 6,
    T_Q5_1 = 7,
    T_Q8_0 = 8,
    T_Q4_K = 12,
    T_Q5_K = 13,
    T_Q6_K = 14,
    T_I8R = 256, /* not GGML: folklm's int8 rows (k signed codes; the row scale is applied by
                    the caller) */
    T_I4G = 257, /* not GGML: folklm's int4 groups re-laid as Q4_1 with float32 d and m (24 bytes
                    per 32 weights: d, m, 16 bytes of nibbles in Q4_1 order), w = d * q + m */
};

/* ---- float16 ------------------------------------------------------------------------ */

/* IEEE half to float, bit by bit (also used by decode_step.c where F16C is missing) */
float folk_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return folk_half_to_float(h);
#endif
}

static inline uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j from the 12 packed bytes. */
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* ---- activations: int8 blocks of 32 ------------------------------------------------- */

typedef struct {
    const int8_t *q;  /* k codes */
    const float *d;   /* k / 32 scales */
    const int32_t *s; /* k / 16 sums of codes */
    const int32_t *s4; /* k / 4 sums of codes (the lanes of one block's 8-lane dot product) */
    const float *f4;  /* k / 4: d * s4 of the block */
    /* the second level (the rounding residual), for the fused two-level kernel */
    const int8_t *q2;
    const float *d2;
    const int32_t *s42;
    const float *f42;
} xrow;

static void quantize_row(const float *x, int64_t k, int8_t *q, float *d, int32_t *s, int32_t *s4,
                         float *f4) {
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float db = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[b] = db;
        int8_t *qb = q + 32 * b;
        for (int j = 0; j < 32; j++) {
            int v = (int)lrintf(xb[j] * id);
            qb[j] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
        }
        /* lane order of the 8-lane dot products: lane i sums codes 4i..4i+3 */
        for (int i = 0; i < 8; i++) {
            int32_t t = qb[4 * i] + qb[4 * i + 1] + qb[4 * i + 2] + qb[4 * i + 3];
            s4[8 * b + i] = t;
            f4[8 * b + i] = db * (float)t;
        }
        s[2 * b] = s4[8 * b] + s4[8 * b + 1] + s4[8 * b + 2] + s4[8 * b + 3];
        s[2 * b + 1] = s4[8 * b + 4] + s4[8 * b + 5] + s4[8 * b + 6] + s4[8 * b + 7];
    }
}

/* ---- scalar dot products (every format) --------------------------------------------- */

/* Integer sums of q * qx over the two halves of a 32-block, q given as 32 unsigned codes. */
static inline void isum32(const uint8_t *q, const int8_t *x, int32_t *h0, int32_t *h1) {
    int32_t a = 0, b = 0;
    for (int j = 0; j < 16; j++) a += q[j] * x[j];
    for (int j = 16; j < 32; j++) b += q[j] * x[j];
    *h0 = a;
    *h1 = b;
}

static void codes_q4(const uint8_t *qs, uint8_t *q) {
    for (int j = 0; j < 16; j++) {
        q[j] = qs[j] & 0x0F;
        q[j + 16] = qs[j] >> 4;
    }
}

static void codes_q5(const uint8_t *qs, uint32_t qh, uint8_t *q) {
    for (int j = 0; j < 16; j++) {
        q[j] = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
        q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    }
}

/* Q6_K: codes of 32-block c (0..7) of a super-block: half h = c / 4, part p = c % 4. */
static void codes_q6(const uint8_t *blk, int c, uint8_t *q) {
    const uint8_t *ql = blk + 64 * (c / 4) + 32 * (c % 2), *qh = blk + 128 + 32 * (c / 4);
    int nib = 4 * ((c % 4) / 2), hs = 2 * (c % 4);
    for (int l = 0; l < 32; l++) q[l] = ((ql[l] >> nib) & 0x0F) | (((qh[l] >> hs) & 3) << 4);
}

static void codes_k(const uint8_t *qs, const uint8_t *qh, int j, uint8_t *q) {
    /* Q4_K/Q5_K sub-block j: nibbles of qs[32 (j/2) ..], fifth bit j of qh[l] (Q5_K). */
    const uint8_t *p = qs + 32 * (j / 2);
    int nib = 4 * (j % 2);
    for (int l = 0; l < 32; l++) {
        q[l] = (p[l] >> nib) & 0x0F;
        if (qh) q[l] |= ((qh[l] >> j) & 1) << 4;
    }
}

static float dot_scalar(int type, const uint8_t *w, int64_t k, xrow x) {
    float acc = 0.0f;
    uint8_t q[32];
    int32_t h0, h1;
    if (type == T_I8R) {
        for (int64_t b = 0; b < k / 32; b++, w += 32) {
            int32_t sum = 0;
            for (int j = 0; j < 32; j++) sum += ((const int8_t *)w)[j] * x.q[32 * b + j];
            acc += x.d[b] * (float)sum;
        }
        return acc;
    }
    if (type == T_Q8_0) {
        for (int64_t b = 0; b < k / 32; b++, w += 34) {
            const int8_t *qs = (const int8_t *)(w + 2);
            int32_t sum = 0;
            for (int j = 0; j < 32; j++) sum += qs[j] * x.q[32 * b + j];
            acc += f16_at(w) * x.d[b] * (float)sum;
        }
        return acc;
    }
    if (type == T_I4G) {
        for (int64_t b = 0; b < k / 32; b++, w += 24) {
            float d, mn;
            memcpy(&d, w, 4);
            memcpy(&mn, w + 4, 4);
            codes_q4(w + 8, q);
            isum32(q, x.q + 32 * b, &h0, &h1);
            acc += x.d[b] * (d * (float)(h0 + h1) + mn * (float)(x.s[2 * b] + x.s[2 * b + 1]));
        }
        return acc;
    }
    if (type == T_Q4_0 || type == T_Q4_1 || type == T_Q5_0 || type == T_Q5_1) {
        int size = type == T_Q4_0 ? 18 : type == T_Q4_1 ? 20 : type == T_Q5_0 ? 22 : 24;
        int has_min = type == T_Q4_1 || type == T_Q5_1;
        int zero = type == T_Q4_0 ? 8 : 16;
        for (int64_t b = 0; b < k / 32; b++, w += size) {
            const uint8_t *qs = w + (has_min ? 4 : 2);
            if (type == T_Q4_0 || type == T_Q4_1)
                codes_q4(qs, q);
            else
                codes_q5(qs + 4, u32_at(qs), q);
            isum32(q, x.q + 32 * b, &h0, &h1);
            int32_t sx = x.s[2 * b] + x.s[2 * b + 1];
            if (has_min)
                acc += x.d[b] * (f16_at(w) * (float)(h0 + h1) + f16_at(w + 2) * (float)sx);
            else
                acc += f16_at(w) * x.d[b] * (float)(h0 + h1 - zero * sx);
        }
        return acc;
    }
    if (type == T_Q4_K || type == T_Q5_K) {
        int size = type == T_Q4_K ? 144 : 176;
        for (int64_t sb = 0; sb < k / 256; sb++, w += size) {
            float d = f16_at(w), dmin = f16_at(w + 2);
            const uint8_t *qh = type == T_Q5_K ? w + 16 : NULL;
            const uint8_t *qs = w + (type == T_Q5_K ? 48 : 16);
            for (int j = 0; j < 8; j++) {
                int sc, mn;
                k_scale_min(w + 4, j, &sc, &mn);
                int64_t b = 8 * sb + j;
                codes_k(qs, qh, j, q);
                isum32(q, x.q + 32 * b, &h0, &h1);
                int32_t sx = x.s[2 * b] + x.s[2 * b + 1];
                acc += x.d[b] * (d * (float)(sc * (h0 + h1)) - dmin * (float)(mn * sx));
            }
        }
        return acc;
    }
    if (type == T_Q6_K) {
        for (int64_t sb = 0; sb < k / 256; sb++, w += 210) {
            float d = f16_at(w + 208);
            const int8_t *sc = (const int8_t *)(w + 192);
            for (int c = 0; c < 8; c++) {
                int64_t b = 8 * sb + c;
                codes_q6(w, c, q);
                isum32(q, x.q + 32 * b, &h0, &h1);
                int32_t t = sc[2 * c] * (h0 - 32 * x.s[2 * b]) +
                            sc[2 * c + 1] * (h1 - 32 * x.s[2 * b + 1]);
                acc += d * x.d[b] * (float)t;
            }
        }
        return acc;
    }
    return NAN;
}

/* ---- AVX2 / VNNI dot products -------------------------------------------------------- */

#ifdef FOLK_AVX2

/* 8 int32 partial sums of u8 codes (32) times s8 activations (32); lanes 0-3 hold the
 * first 16 weights, lanes 4-7 the second 16. */
static inline __m256i udot(__m256i u, __m256i s) {
#ifdef FOLK_VNNI
    return DPBUSD(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i nibbles16(const uint8_t *qs) {
    __m128i t = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* 32 bytes, byte j = 0x10 if bit j of qh is set. */
static inline __m256i bits_to_16(uint32_t qh) {
    const __m256i pick = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    const __m256i mask = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), pick);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, mask), mask);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

#define INL static inline __attribute__((always_inline))
#define LOAD256(p) _mm256_loadu_si256((const __m256i *)(p))

/* acc += sum over the L activation levels of wscale * d_l[b] * (q . xq_l - (s4_l << zs)):
 * the weight codes q are unpacked once for both levels. */
INL __m256 levels_dot(__m256 acc, __m256 wscale, __m256i q, xrow x, int64_t b, int zs, int L) {
    for (int l = 0; l < L; l++) {
        const int8_t *xq = l ? x.q2 : x.q;
        const float *d = l ? x.d2 : x.d;
        const int32_t *s4 = l ? x.s42 : x.s4;
        __m256i dot = udot(q, LOAD256(xq + 32 * b));
        if (zs) dot = _mm256_sub_epi32(dot, _mm256_slli_epi32(LOAD256(s4 + 8 * b), zs));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(wscale, _mm256_set1_ps(d[b])),
                              _mm256_cvtepi32_ps(dot), acc);
    }
    return acc;
}

/* d * (sum of the block's activations), per lane, over the levels */
INL __m256 levels_f4(xrow x, int64_t b, int L) {
    __m256 f = _mm256_loadu_ps(x.f4 + 8 * b);
    return L > 1 ? _mm256_add_ps(f, _mm256_loadu_ps(x.f42 + 8 * b)) : f;
}

/* Signed codes q (32 bytes) scaled by dw: the sign moves onto the activations so that the
 * unsigned x signed product applies to |q|. */
INL void signed_block(__m256i q, __m256 dw, xrow x, int64_t b, __m256 *acc, int L) {
    __m256i u = _mm256_sign_epi8(q, q);
    for (int l = 0; l < L; l++) {
        const int8_t *xq = l ? x.q2 : x.q;
        const float *d = l ? x.d2 : x.d;
        __m256i dot = udot(u, _mm256_sign_epi8(LOAD256(xq + 32 * b), q));
        *acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(d[b])), _mm256_cvtepi32_ps(dot),
                               *acc);
    }
}

/* One 32-weight block of each small format: acc += scaled dot, accm += the min term. */
INL void blk_q8_0(const uint8_t *w, xrow x, int64_t b, __m256 *acc, __m256 *accm, int L) {
    (void)accm;
    signed_block(LOAD256(w + 2), _mm256_set1_ps(f16_at(w)), x, b, acc, L);
}

INL void blk_i8r(const uint8_t *w, xrow x, int64_t b, __m256 *acc, __m256 *accm, int L) {
    (void)accm;
    signed_block(LOAD256(w), _mm256_set1_ps(1.0f), x, b, acc, L);
}

INL void blk_q4_0(const uint8_t *w, xrow x, int64_t b, __m256 *acc, __m256 *accm, int L) {
    (void)accm;
    *acc = levels_dot(*acc, _mm256_set1_ps(f16_at(w)), nibbles16(w + 2), x, b, 3, L);
}

INL void blk_q5_0(const uint8_t *w, xrow x, int64_t b, __m256 *acc, __m256 *accm, int L) {
    (void)accm;
    __m256i q = _mm256_or_si256(nibbles16(w + 6), bits_to_16(u32_at(w + 2)));
    *acc = levels_dot(*acc, _mm256_set1_ps(f16_at(w)), q, x, b, 4, L);
}

INL void blk_q4_1(const uint8_t *w, xrow x, int64_t b, __m256 *acc, __m256 *accm, int L) {
    *acc = levels_dot(*acc, _mm256_set1_ps(f16_at(w)), nibbles16(w + 4), x, b, 0, L);
    *accm = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(w + 2)), levels_f4(x, b, L), *accm);
}

static inline float f32_at(const uint8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

INL void blk_i4g(const uint8_t *w, xrow x, int64_t b, __m256 *acc, __m256 *accm, int L) {
    *acc = levels_dot(*acc, _mm256_set1_ps(f32_at(w)), nibbles16(w + 8), x, b, 0, L);
    *accm = _mm256_fmadd_ps(_mm256_set1_ps(f32_at(w + 4)), levels_f4(x, b, L), *accm);
}

INL void blk_q5_1(const uint8_t *w, xrow x, int64_t b, __m256 *acc, __m256 *accm, int L) {
    __m256i q = _mm256_or_si256(nibbles16(w + 8), bits_to_16(u32_at(w + 4)));
    *acc = levels_dot(*acc, _mm256_set1_ps(f16_at(w)), q, x, b, 0, L);
    *accm = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(w + 2)), levels_f4(x, b, L), *accm);
}

/* Two independent accumulator pairs hide the latency of the fused multiply-adds. */
#define BLOCKS2(FN, SIZE)                                                                  \
    do {                                                                                   \
        int64_t b = 0;                                                                     \
        for (; b + 1 < nb; b += 2) {                                                       \
            FN(w + b * (SIZE), x, b, &acc0, &accm0, L);                                    \
            FN(w + (b + 1) * (SIZE), x, b + 1, &acc1, &accm1, L);                          \
        }                                                                                  \
        if (b < nb) FN(w + b * (SIZE), x, b, &acc0, &accm0, L);                            \
    } while (0)

INL float dot_avx2_impl(int type, const uint8_t *w, int64_t k, xrow x, const int L) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 accm0 = _mm256_setzero_ps(), accm1 = _mm256_setzero_ps();
    const int64_t nb = k / 32;
    switch (type) {
    case T_Q8_0:
        BLOCKS2(blk_q8_0, 34);
        break;
    case T_I8R:
        BLOCKS2(blk_i8r, 32);
        break;
    case T_I4G:
        BLOCKS2(blk_i4g, 24);
        break;
    case T_Q4_0:
        BLOCKS2(blk_q4_0, 18);
        break;
    case T_Q4_1:
        BLOCKS2(blk_q4_1, 20);
        break;
    case T_Q5_0:
        BLOCKS2(blk_q5_0, 22);
        break;
    case T_Q5_1:
        BLOCKS2(blk_q5_1, 24);
        break;
    case T_Q4_K:
    case T_Q5_K: {
        const int five = type == T_Q5_K, size = five ? 176 : 144;
        for (int64_t sb = 0; sb < k / 256; sb++, w += size) {
            float d = f16_at(w), dmin = f16_at(w + 2);
            const uint8_t *qs = w + (five ? 48 : 16);
            __m256i hbits = five ? LOAD256(w + 16) : _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                __m256i raw = LOAD256(qs + 32 * c);
                __m256i q0 = _mm256_and_si256(raw, lo4);
                __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
                if (five) {
                    const __m256i one = _mm256_set1_epi8(1);
                    __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c), one);
                    __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c + 1), one);
                    q0 = _mm256_or_si256(q0, _mm256_slli_epi16(h0, 4));
                    q1 = _mm256_or_si256(q1, _mm256_slli_epi16(h1, 4));
                }
                int sc0, mn0, sc1, mn1;
                k_scale_min(w + 4, 2 * c, &sc0, &mn0);
                k_scale_min(w + 4, 2 * c + 1, &sc1, &mn1);
                int64_t b0 = 8 * sb + 2 * c, b1 = b0 + 1;
                acc0 = levels_dot(acc0, _mm256_set1_ps(d * (float)sc0), q0, x, b0, 0, L);
                acc1 = levels_dot(acc1, _mm256_set1_ps(d * (float)sc1), q1, x, b1, 0, L);
                accm0 = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * (float)mn0), levels_f4(x, b0, L),
                                        accm0);
                accm1 = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * (float)mn1), levels_f4(x, b1, L),
                                        accm1);
            }
        }
        break;
    }
    case T_Q6_K:
        for (int64_t sb = 0; sb < k / 256; sb++, w += 210) {
            float d = f16_at(w + 208);
            const int8_t *sc = (const int8_t *)(w + 192);
            const __m256i three = _mm256_set1_epi8(3);
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = w + 64 * h;
                __m256i l0 = LOAD256(ql), l1 = LOAD256(ql + 32), hb = LOAD256(w + 128 + 32 * h);
                __m256i q[4];
                q[0] = _mm256_and_si256(l0, lo4);
                q[1] = _mm256_and_si256(l1, lo4);
                q[2] = _mm256_and_si256(_mm256_srli_epi16(l0, 4), lo4);
                q[3] = _mm256_and_si256(_mm256_srli_epi16(l1, 4), lo4);
                for (int p = 0; p < 4; p++) {
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * p), three);
                    __m256i qq = _mm256_or_si256(q[p], _mm256_slli_epi16(hi, 4));
                    int c = 4 * h + p;
                    float s0 = d * (float)sc[2 * c], s1 = d * (float)sc[2 * c + 1];
                    __m256 scale = _mm256_set_ps(s1, s1, s1, s1, s0, s0, s0, s0);
                    if (p & 1)
                        acc1 = levels_dot(acc1, scale, qq, x, 8 * sb + c, 5, L);
                    else
                        acc0 = levels_dot(acc0, scale, qq, x, 8 * sb + c, 5, L);
                }
            }
        }
        break;
    default:
        return NAN;
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(accm0, accm1)));
}

static float dot_avx2(int type, const uint8_t *w, int64_t k, xrow x) {
    return dot_avx2_impl(type, w, k, x, 1);
}

/* both activation levels in one pass over the weights (x.q2, x.d2, x.s42, x.f42 set) */
static float dot_avx2_two(int type, const uint8_t *w, int64_t k, xrow x) {
    return dot_avx2_impl(type, w, k, x, 2);
}
#endif

static int known_type(int t) {
    return t == T_I8R || t == T_I4G || t == T_Q4_0 || t == T_Q4_1 || t == T_Q5_0 || t == T_Q5_1 || t == T_Q8_0 ||
           t == T_Q4_K || t == T_Q5_K || t == T_Q6_K;
}

/* ---- threads ----------------------------------------------------------------------------
 * A small pool instead of OpenMP: the caller works through chunks itself and returns as soon
 * as every chunk is done, without waiting for helpers that never got a core. On a machine
 * shared with other processes an OpenMP barrier waits for every thread to be scheduled;
 * measured here (2 cores, load average 13): 2 OpenMP threads were 8x slower than 1. */

typedef struct {
    void (*fn)(void *ctx, int64_t lo, int64_t hi);
    void *ctx;
    int64_t n, chunk;
    atomic_llong next, done;
    atomic_int users; /* helpers inside this job */
} job_t;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static job_t *pool_job;
static unsigned long long pool_gen;
static int pool_size; /* helpers started */
static atomic_int pool_want; /* helpers that may take part in the current job */

static void run_chunks(job_t *j) {
    for (;;) {
        int64_t lo = atomic_fetch_add(&j->next, j->chunk);
        if (lo >= j->n) return;
        int64_t hi = lo + j->chunk < j->n ? lo + j->chunk : j->n;
        j->fn(j->ctx, lo, hi);
        atomic_fetch_add(&j->done, hi - lo);
    }
}

static atomic_ullong pool_gen_seen; /* pool_gen, readable without the lock */

static void *helper(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned long long seen = 0;
    pthread_mutex_lock(&pool_mu);
    for (;;) {
        if (pool_gen == seen) {
            /* A decode step calls the kernels a few hundred times in a row: poll politely
             * (sched_yield gives the core away when others want it) for about a millisecond
             * before sleeping, so the next call does not pay a wake-up. */
            pthread_mutex_unlock(&pool_mu);
            for (int i = 0; i < 2000 && atomic_load(&pool_gen_seen) == seen; i++) sched_yield();
            pthread_mutex_lock(&pool_mu);
        }
        while (pool_gen == seen) pthread_cond_wait(&pool_cv, &pool_mu);
        seen = pool_gen;
        job_t *j = pool_job;
        if (!j || id >= atomic_load(&pool_want)) continue;
        atomic_fetch_add(&j->users, 1);
        pthread_mutex_unlock(&pool_mu);
        run_chunks(j);
        atomic_fetch_sub(&j->users, 1);
        pthread_mutex_lock(&pool_mu);
    }
    return NULL;
}

/* The pool runs one job at a time: a caller from another thread (two models decoding in two
 * threads) that finds it busy runs its job alone instead of waiting. */
static pthread_mutex_t pool_owner = PTHREAD_MUTEX_INITIALIZER;

static void pool_run(void (*fn)(void *, int64_t, int64_t), void *ctx, int64_t n, int64_t chunk,
                     int nthreads);

void folk_parallel_for(void (*fn)(void *, int64_t, int64_t), void *ctx, int64_t n, int64_t chunk,
                       int nthreads) {
    if (nthreads <= 1 || n <= chunk || pthread_mutex_trylock(&pool_owner) != 0) {
        fn(ctx, 0, n);
        return;
    }
    pool_run(fn, ctx, n, chunk, nthreads);
    pthread_mutex_unlock(&pool_owner);
}

static void pool_run(void (*fn)(void *, int64_t, int64_t), void *ctx, int64_t n, int64_t chunk,
                     int nthreads) {
    job_t j = {.fn = fn, .ctx = ctx, .n = n, .chunk = chunk};
    atomic_init(&j.next, 0);
    atomic_init(&j.done, 0);
    atomic_init(&j.users, 0);
    pthread_mutex_lock(&pool_mu);
    while (pool_size < nthreads - 1 && pool_size < 255) {
        pthread_t t;
        if (pthread_create(&t, NULL, helper, (void *)(intptr_t)pool_size)) break;
        pthread_detach(t);
        pool_size++;
    }
    atomic_store(&pool_want, nthreads - 1);
    pool_job = &j;
    pool_gen++;
    atomic_store(&pool_gen_seen, pool_gen);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    run_chunks(&j);
    while (atomic_load(&j.done) < n) sched_yield(); /* chunks a helper is still running */
    pthread_mutex_lock(&pool_mu);
    pool_job = NULL; /* helpers waking later see no job */
    pthread_mutex_unlock(&pool_mu);
    while (atomic_load(&j.users) > 0) sched_yield(); /* helpers leaving run_chunks */
}

/* ---- exported ------------------------------------------------------------------------- */

int folk_isa(void) {
#if defined(FOLK_VNNI)
    return 2;
#elif defined(FOLK_AVX2)
    return 1;
#else
    return 0;
#endif
}

typedef struct {
    const folk_part *parts;
    int nparts;
    int64_t k, m, levels;
    const int8_t *xq;
    const float *xd;
    const int32_t *xs, *xs4;
    const float *xf4;
    float (*dot)(int, const uint8_t *, int64_t, xrow);
    float (*dot2)(int, const uint8_t *, int64_t, xrow); /* fused two-level dot, or NULL */
} matmul_ctx;

static void matmul_rows(void *ctx, int64_t lo, int64_t hi) {
    const matmul_ctx *c = ctx;
    const int64_t k = c->k;
    int p = 0;
    int64_t base = 0; /* first global row of part p */
    for (int64_t g = lo; g < hi; g++) {
        while (g - base >= c->parts[p].n) base += c->parts[p++].n;
        const folk_part *P = &c->parts[p];
        int64_t r = g - base;
        const uint8_t *wr = P->w + r * P->row_bytes;
        int64_t col = P->out_index ? P->out_index[r] : r;
        for (int64_t i = 0; i < c->m; i++) {
            float v = 0.0f;
            int64_t j0 = i * c->levels;
            if (c->dot2) { /* both levels in one pass */
                int64_t j = j0 + 1;
                xrow xr = {c->xq + j0 * k, c->xd + j0 * (k / 32), c->xs + j0 * (k / 16),
                           c->xs4 + j0 * (k / 4), c->xf4 + j0 * (k / 4),
                           c->xq + j * k, c->xd + j * (k / 32), c->xs4 + j * (k / 4),
                           c->xf4 + j * (k / 4)};
                v = c->dot2(P->type, wr, k, xr);
            } else {
                for (int64_t j = j0; j < j0 + c->levels; j++) {
                    xrow xr = {c->xq + j * k, c->xd + j * (k / 32), c->xs + j * (k / 16),
                               c->xs4 + j * (k / 4), c->xf4 + j * (k / 4), NULL, NULL, NULL,
                               NULL};
                    v += c->dot(P->type, wr, k, xr);
                }
            }
            P->y[i * P->ldy + col] = v;
        }
    }
}

/* Several weights applied to the same activations x (m, k) in one parallel job (q/k/v, or
 * gate/up): the activations are quantized once, and the threads meet once.
 * parts[p].y[i * ldy + col(r)] = dot(W_p row r, x row i); col(r) = out_index ? out_index[r] : r.
 * levels 1: x is rounded to int8 per block of 32 (relative error up to 1/254 of the block's
 * largest value); levels 2: the rounding residual is quantized again and added (error up to
 * 1/64516), at about twice the integer work. path 0: the best this build has; 1: scalar.
 * Returns 0, or -1 for an unknown type, bad arguments or a failed allocation. */
int folk_matmul_parts(const folk_part *parts, int nparts, int64_t k, const float *x, int64_t m,
                      int levels, int nthreads, int path) {
    int64_t n = 0;
    for (int p = 0; p < nparts; p++) {
        if (!known_type(parts[p].type)) return -1;
        n += parts[p].n;
    }
    if (k % 32 || nparts < 1 || levels < 1 || levels > 2) return -1;
    int64_t rows = m * levels; /* activation rows: level l of row i is row i * levels + l */
    int8_t *xq = malloc((size_t)(rows * k));
    float *xd = malloc(sizeof(float) * (size_t)(rows * k / 32));
    int32_t *xs = malloc(sizeof(int32_t) * (size_t)(rows * k / 16));
    int32_t *xs4 = malloc(sizeof(int32_t) * (size_t)(rows * k / 4));
    float *xf4 = malloc(sizeof(float) * (size_t)(rows * k / 4));
    float *res = levels > 1 ? malloc(sizeof(float) * (size_t)k) : NULL;
    if (!xq || !xd || !xs || !xs4 || !xf4 || (levels > 1 && !res)) {
        free(xq), free(xd), free(xs), free(xs4), free(xf4), free(res);
        return -1;
    }
    for (int64_t j = 0; j < rows; j++) {
        const float *src = x + (j / levels) * k;
        if (j % levels) { /* the residual of the previous level */
            const int8_t *q = xq + (j - 1) * k;
            const float *d = xd + (j - 1) * (k / 32);
            for (int64_t e = 0; e < k; e++) res[e] = src[e] - d[e / 32] * (float)q[e];
            src = res;
        }
        quantize_row(src, k, xq + j * k, xd + j * (k / 32), xs + j * (k / 16), xs4 + j * (k / 4),
                     xf4 + j * (k / 4));
    }
    matmul_ctx c = {parts, nparts, k, m, levels, xq, xd, xs, xs4, xf4, dot_scalar, NULL};
#ifdef FOLK_AVX2
    if (path == 0) c.dot = dot_avx2;
    if (path == 0 && levels == 2) c.dot2 = dot_avx2_two;
#endif
    (void)path;
    /* chunks of rows small enough to balance when a core is busy with another process */
    int64_t chunk = n / (8 * (int64_t)(nthreads > 0 ? nthreads : 1));
    folk_parallel_for(matmul_rows, &c, n, chunk < 8 ? 8 : chunk, nthreads);
    free(xq), free(xd), free(xs), free(xs4), free(xf4), free(res);
    return 0;
}

/* y[i * ldy + col(r)] = dot(W row r, x row i) for r < n, i < m (folk_matmul_parts with one
 * part). */
int folk_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
                const float *x, int64_t m, float *y, int64_t ldy, const int64_t *out_index,
                int levels, int nthreads, int path) {
    folk_part part = {type, w, row_bytes, n, out_index, y, ldy};
    return folk_matmul_parts(&part, 1, k, x, m, levels, nthreads, path);
}

/* One weight row to float32 with ggml's own arithmetic (so results are bit-identical). */
static int dequant_row(int type, const uint8_t *w, int64_t k, float *out) {
    uint8_t q[32];
    switch (type) {
    case T_Q8_0:
        for (int64_t b = 0; b < k / 32; b++, w += 34) {
            float d = f16_at(w);
            for (int j = 0; j < 32; j++) out[32 * b + j] = d * (float)((const int8_t *)(w + 2))[j];
        }
        return 0;
    case T_Q4_0:
    case T_Q5_0:
        for (int64_t b = 0; b < k / 32; b++) {
            float d = f16_at(w);
            if (type == T_Q4_0) {
                codes_q4(w + 2, q);
                w += 18;
            } else {
                codes_q5(w + 6, u32_at(w + 2), q);
                w += 22;
            }
            int z = type == T_Q4_0 ? 8 : 16;
            for (int j = 0; j < 32; j++) out[32 * b + j] = d * (float)(q[j] - z);
        }
        return 0;
    case T_I4G:
        for (int64_t b = 0; b < k / 32; b++, w += 24) {
            float d, mn;
            memcpy(&d, w, 4);
            memcpy(&mn, w + 4, 4);
            codes_q4(w + 8, q);
            for (int j = 0; j < 32; j++) out[32 * b + j] = d * (float)q[j] + mn;
        }
        return 0;
    case T_Q4_1:
    case T_Q5_1:
        for (int64_t b = 0; b < k / 32; b++) {
            float d = f16_at(w), mn = f16_at(w + 2);
            if (type == T_Q4_1) {
                codes_q4(w + 4, q);
                w += 20;
            } else {
                codes_q5(w + 8, u32_at(w + 4), q);
                w += 24;
            }
            for (int j = 0; j < 32; j++) out[32 * b + j] = d * (float)q[j] + mn;
        }
        return 0;
    case T_Q4_K:
    case T_Q5_K:
        for (int64_t sb = 0; sb < k / 256; sb++) {
            float d = f16_at(w), dmin = f16_at(w + 2);
            const uint8_t *qh = type == T_Q5_K ? w + 16 : NULL;
            const uint8_t *qs = w + (type == T_Q5_K ? 48 : 16);
            for (int j = 0; j < 8; j++) {
                int sc, mn;
                k_scale_min(w + 4, j, &sc, &mn);
                float ds = d * (float)sc, dm = dmin * (float)mn;
                codes_k(qs, qh, j, q);
                for (int l = 0; l < 32; l++) out[256 * sb + 32 * j + l] = ds * (float)q[l] - dm;
            }
            w += type == T_Q4_K ? 144 : 176;
        }
        return 0;
    case T_Q6_K:
        for (int64_t sb = 0; sb < k / 256; sb++, w += 210) {
            float d = f16_at(w + 208);
            const int8_t *sc = (const int8_t *)(w + 192);
            for (int c = 0; c < 8; c++) {
                codes_q6(w, c, q);
                float d0 = d * (float)sc[2 * c], d1 = d * (float)sc[2 * c + 1];
                float *o = out + 256 * sb + 32 * c;
                for (int l = 0; l < 16; l++) o[l] = d0 * (float)(q[l] - 32);
                for (int l = 16; l < 32; l++) o[l] = d1 * (float)(q[l] - 32);
            }
        }
        return 0;
    }
    return -1;
}

typedef struct {
    int type;
    const uint8_t *w;
    int64_t row_bytes, k, first;
    const int64_t *rows;
    float *out;
    atomic_int bad;
} dequant_ctx;

static void dequant_some(void *ctx, int64_t lo, int64_t hi) {
    dequant_ctx *c = ctx;
    for (int64_t i = lo; i < hi; i++) {
        int64_t r = c->rows ? c->rows[i] : c->first + i;
        if (dequant_row(c->type, c->w + r * c->row_bytes, c->k, c->out + i * c->k))
            atomic_store(&c->bad, 1);
    }
}

/* out[i, :] = row (rows ? rows[i] : first + i) of W, for i < count. */
int folk_dequant_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t k,
                      const int64_t *rows, int64_t first, int64_t count, float *out,
                      int nthreads) {
    if (!known_type(type)) return -1;
    dequant_ctx c = {.type = type, .w = w, .row_bytes = row_bytes, .k = k, .first = first,
                     .rows = rows, .out = out};
    atomic_init(&c.bad, 0);
    folk_parallel_for(dequant_some, &c, count, 16, nthreads);
    return atomic_load(&c.bad) ? -1 : 0;
}
