/* One decode step of a Llama-family model (Llama, Mistral, Qwen2) in one call.
 *
 * Decoding one token of a small model in PyTorch costs far more in per-operation dispatch
 * (a few hundred calls into the framework per token) than in arithmetic. This file runs the
 * whole step -- embedding lookup, every layer (RMSNorm, q/k/v projections with RoPE, the
 * key/value write, grouped-query attention over the cache, output projection, SwiGLU MLP),
 * the final norm and the LM head -- without returning to Python. Weights stay where the
 * model keeps them: GGML blocks (memory-mapped GGUF) go through folk_matmul, dense
 * float32/float16/bfloat16 rows through the float dot products below. Activations are
 * float32 throughout; the key/value cache is the caller's float32 or bfloat16 buffer of
 * shape (rows, n_kv_heads, capacity, head_dim) per layer, the layout of folklm's KVCache
 * and slot cache, so a step may follow a prefill made by the PyTorch model.
 *
 * Row b of the batch takes token tokens[b] at RoPE position pos[b], writes its key/value at
 * slot wslot[b] and attends over slots first[b]..wslot[b] (and, for a layer with a sliding
 * window w, only slots > wslot[b] - w), matching folklm.ops.attention.build_mask.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "folk_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define STEP_AVX2 1
#endif

enum { D_F32 = 0, D_F16 = 1, D_BF16 = 30 };

typedef struct {
    int32_t type; /* GGML type: 0 F32, 1 F16, 30 BF16, or a quantized block type */
    int32_t unused;
    const uint8_t *w;         /* row r at w + r * row_bytes */
    int64_t row_bytes, n, k;  /* n output rows of k weights */
    const int64_t *out_index; /* stored row r is output out_index[r] (NULL: r) */
    const float *bias;        /* n, or NULL */
    const float *scale;       /* n per-row scales (folklm int8 rows, type 256), or NULL */
} folk_lin;

typedef struct {
    folk_lin q, k, v, o, gate, up, down;
    const float *attn_norm, *ffn_norm; /* hidden floats each */
    int64_t window;                    /* sliding attention window, 0 for none */
} folk_layer;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, ffn, vocab;
    float eps;       /* RMSNorm epsilon */
    float rope_mult; /* cos/sin multiplier (1 for plain RoPE) */
    const float *inv_freq; /* head_dim / 2 */
    folk_lin embed, head;
    const float *final_norm;
    const folk_layer *layers;
} folk_model;

typedef struct {
    int64_t rows, cap; /* buffer rows and slots per row */
    int32_t bf16;      /* 1: bfloat16 buffers, 0: float32 */
    int32_t unused;
    void *const *k; /* n_layers base pointers */
    void *const *v;
} folk_kv;

/* ---- float dot products -------------------------------------------------------------- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7F800000u) == 0x7F800000u && (b & 0x7FFFFFu)) return (uint16_t)((b >> 16) | 0x40);
    b += 0x7FFFu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

#ifdef STEP_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load8(int type, const uint8_t *w, int64_t j) {
    if (type == D_F32) return _mm256_loadu_ps((const float *)w + j);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + j));
    if (type == D_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#ifdef __F16C__
    return _mm256_cvtph_ps(h);
#else
    float t[8];
    for (int i = 0; i < 8; i++) t[i] = folk_half_to_float(((const uint16_t *)w)[j + i]);
    return _mm256_loadu_ps(t);
#endif
}
#endif

static inline float elem(int type, const uint8_t *w, int64_t j) {
    if (type == D_F32) return ((const float *)w)[j];
    uint16_t h = ((const uint16_t *)w)[j];
    return type == D_BF16 ? bf16_to_f32(h) : folk_half_to_float(h);
}

static float dot_dense(int type, const uint8_t *w, const float *x, int64_t k) {
    int64_t j = 0;
    float acc = 0.0f;
#ifdef STEP_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; j + 32 <= k; j += 32) {
        a0 = _mm256_fmadd_ps(load8(type, w, j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(load8(type, w, j + 8), _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(load8(type, w, j + 16), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(load8(type, w, j + 24), _mm256_loadu_ps(x + j + 24), a3);
    }
    for (; j + 8 <= k; j += 8) a0 = _mm256_fmadd_ps(load8(type, w, j), _mm256_loadu_ps(x + j), a0);
    acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; j < k; j++) acc += elem(type, w, j) * x[j];
    return acc;
}

static int is_dense(int type) { return type == D_F32 || type == D_F16 || type == D_BF16; }

#define MAX_GROUP 3

typedef struct {
    const folk_lin *L[MAX_GROUP];
    float *y[MAX_GROUP];
    int count;
    const float *x;
    int64_t m;
} dense_ctx;

static void dense_rows(void *ctx, int64_t lo, int64_t hi) {
    const dense_ctx *c = ctx;
    int p = 0;
    int64_t base = 0;
    for (int64_t g = lo; g < hi; g++) {
        while (g - base >= c->L[p]->n) base += c->L[p++]->n;
        const folk_lin *L = c->L[p];
        int64_t r = g - base;
        const uint8_t *wr = L->w + r * L->row_bytes;
        int64_t col = L->out_index ? L->out_index[r] : r;
        for (int64_t i = 0; i < c->m; i++)
            c->y[p][i * L->n + col] = dot_dense(L->type, wr, c->x + i * L->k, L->k);
    }
}

/* y[j] (m, n_j) = x (m, k) W_j^T (* scale_j) + b_j for the `count` weights of a group that
 * read the same activations (q/k/v, gate/up): one parallel job when their kinds agree. */
static int lin_group(const folk_lin *const *L, float *const *y, int count, const float *x,
                     int64_t m, int levels, int nthreads) {
    int dense = 0;
    int64_t n = 0;
    for (int j = 0; j < count; j++) {
        dense += is_dense(L[j]->type);
        n += L[j]->n;
    }
    int64_t chunk = n / (8 * (int64_t)(nthreads > 0 ? nthreads : 1));
    chunk = chunk < 8 ? 8 : chunk;
    if (dense == count) {
        dense_ctx c = {.count = count, .x = x, .m = m};
        for (int j = 0; j < count; j++) c.L[j] = L[j], c.y[j] = y[j];
        folk_parallel_for(dense_rows, &c, n, chunk, nthreads);
    } else if (dense == 0) {
        folk_part parts[MAX_GROUP];
        for (int j = 0; j < count; j++) {
            folk_part p = {L[j]->type, L[j]->w, L[j]->row_bytes, L[j]->n, L[j]->out_index,
                           y[j], L[j]->n};
            parts[j] = p;
        }
        if (folk_matmul_parts(parts, count, L[0]->k, x, m, levels, nthreads, 0)) return -1;
    } else {
        for (int j = 0; j < count; j++)
            if (lin_group(&L[j], &y[j], 1, x, m, levels, nthreads)) return -1;
        return 0;
    }
    for (int j = 0; j < count; j++) {
        const folk_lin *A = L[j];
        float *Y = y[j];
        if (A->scale)
            for (int64_t i = 0; i < m; i++)
                for (int64_t r = 0; r < A->n; r++) {
                    int64_t col = A->out_index ? A->out_index[r] : r;
                    Y[i * A->n + col] *= A->scale[r];
                }
        if (A->bias)
            for (int64_t i = 0; i < m; i++)
                for (int64_t c = 0; c < A->n; c++) Y[i * A->n + c] += A->bias[c];
    }
    return 0;
}

static int lin_apply(const folk_lin *L, const float *x, int64_t m, float *y, int levels,
                     int nthreads) {
    return lin_group(&L, &y, 1, x, m, levels, nthreads);
}

/* ---- pieces of the layer -------------------------------------------------------------- */

static void rmsnorm(const float *x, const float *w, int64_t C, float eps, float *out) {
    double ss = 0.0;
    for (int64_t j = 0; j < C; j++) ss += (double)x[j] * x[j];
    float r = 1.0f / sqrtf((float)(ss / (double)C) + eps);
    for (int64_t j = 0; j < C; j++) out[j] = w[j] * (x[j] * r);
}

/* rotate-half RoPE of n_heads heads of x (one row) at position pos */
static void rope(float *x, int64_t n_heads, int64_t D, const float *cs, const float *sn) {
    int64_t half = D / 2;
    for (int64_t h = 0; h < n_heads; h++) {
        float *v = x + h * D;
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = b * cs[i] + a * sn[i];
        }
    }
}

static inline void kv_put(const folk_kv *kv, void *base, int64_t offset, const float *src,
                          int64_t D) {
    if (kv->bf16) {
        uint16_t *dst = (uint16_t *)base + offset;
        for (int64_t i = 0; i < D; i++) dst[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)base + offset, src, sizeof(float) * (size_t)D);
    }
}

typedef struct {
    const folk_model *m;
    const folk_kv *kv;
    int64_t layer, window;
    const float *q; /* (B, H * D) */
    float *out;     /* (B, H * D) */
    const int64_t *wslot, *first;
    float *scores; /* smax floats per (row, head) */
    int64_t smax;
} attn_ctx;

static void attn_heads(void *ctx, int64_t lo, int64_t hi) {
    const attn_ctx *c = ctx;
    const folk_model *m = c->m;
    const int64_t H = m->n_heads, G = m->n_heads / m->n_kv, D = m->head_dim, cap = c->kv->cap;
    const float scale = 1.0f / sqrtf((float)D);
    for (int64_t t = lo; t < hi; t++) {
        float *p = c->scores + t * c->smax;
        int64_t b = t / H, h = t % H, g = h / G;
        int64_t last = c->wslot[b], start = c->first[b];
        if (c->window > 0 && last - c->window + 1 > start) start = last - c->window + 1;
        int64_t S = last - start + 1;
        const float *q = c->q + (b * H + h) * D;
        int64_t row = (b * m->n_kv + g) * cap;
        float mx = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            int64_t off = (row + start + s) * D;
            float d;
            if (c->kv->bf16)
                d = dot_dense(D_BF16, (const uint8_t *)((const uint16_t *)c->kv->k[c->layer] + off),
                              q, D);
            else
                d = dot_dense(D_F32, (const uint8_t *)((const float *)c->kv->k[c->layer] + off), q,
                              D);
            p[s] = d * scale;
            mx = p[s] > mx ? p[s] : mx;
        }
        float sum = 0.0f;
        for (int64_t s = 0; s < S; s++) {
            p[s] = expf(p[s] - mx);
            sum += p[s];
        }
        float *o = c->out + (b * H + h) * D;
        for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
        for (int64_t s = 0; s < S; s++) {
            int64_t off = (row + start + s) * D;
            float w = p[s] / sum;
            if (c->kv->bf16) {
                const uint16_t *vv = (const uint16_t *)c->kv->v[c->layer] + off;
                for (int64_t i = 0; i < D; i++) o[i] += w * bf16_to_f32(vv[i]);
            } else {
                const float *vv = (const float *)c->kv->v[c->layer] + off;
                for (int64_t i = 0; i < D; i++) o[i] += w * vv[i];
            }
        }
    }
}

/* ---- the step ------------------------------------------------------------------------- */

static int embed_rows(const folk_lin *E, const int64_t *tokens, int64_t B, float *x,
                      int nthreads) {
    if (!is_dense(E->type))
        return folk_dequant_rows(E->type, E->w, E->row_bytes, E->k, tokens, 0, B, x, nthreads);
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *row = E->w + tokens[b] * E->row_bytes;
        for (int64_t j = 0; j < E->k; j++) x[b * E->k + j] = elem(E->type, row, j);
    }
    return 0;
}

static float silu(float g) { return g / (1.0f + expf(-g)); }

/* Logits (B, vocab) of the next token of every row; see the file comment for the arguments.
 * Returns 0, -1 for a kernel failure or a bad argument, -2 when memory ran out. */
int folk_decode_step(const folk_model *m, const folk_kv *kv, int64_t B, const int64_t *tokens,
                     const int64_t *pos, const int64_t *wslot, const int64_t *first,
                     float *logits, int levels, int nthreads) {
    const int64_t C = m->hidden, H = m->n_heads, Hk = m->n_kv, D = m->head_dim, F = m->ffn;
    if (B < 1 || B > kv->rows || H % Hk || D % 2) return -1;
    for (int64_t b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= m->vocab || wslot[b] < 0 || wslot[b] >= kv->cap ||
            first[b] < 0 || first[b] > wslot[b])
            return -1;
    int64_t smax = 1;
    for (int64_t b = 0; b < B; b++)
        if (wslot[b] - first[b] + 1 > smax) smax = wslot[b] - first[b] + 1;
    size_t floats = (size_t)(B * (3 * C + 2 * H * D + 2 * Hk * D + 2 * F + H * smax) + D);
    float *buf = malloc(sizeof(float) * floats);
    if (!buf) return -2;
    float *x = buf, *xn = x + B * C, *o = xn + B * C, *q = o + B * C, *att = q + B * H * D;
    float *kk = att + B * H * D, *vv = kk + B * Hk * D, *gate = vv + B * Hk * D,
          *up = gate + B * F, *scores = up + B * F, *trig = scores + B * H * smax;
    int rc = embed_rows(&m->embed, tokens, B, x, nthreads);
    for (int64_t l = 0; l < m->n_layers && !rc; l++) {
        const folk_layer *L = &m->layers[l];
        for (int64_t b = 0; b < B; b++) rmsnorm(x + b * C, L->attn_norm, C, m->eps, xn + b * C);
        const folk_lin *qkv[3] = {&L->q, &L->k, &L->v};
        float *qkv_out[3] = {q, kk, vv};
        if ((rc = lin_group(qkv, qkv_out, 3, xn, B, levels, nthreads))) break;
        for (int64_t b = 0; b < B; b++) {
            float *cs = trig, *sn = trig + D / 2;
            for (int64_t i = 0; i < D / 2; i++) {
                float f = (float)pos[b] * m->inv_freq[i];
                cs[i] = cosf(f) * m->rope_mult;
                sn[i] = sinf(f) * m->rope_mult;
            }
            rope(q + b * H * D, H, D, cs, sn);
            rope(kk + b * Hk * D, Hk, D, cs, sn);
            for (int64_t g = 0; g < Hk; g++) {
                int64_t off = ((b * Hk + g) * kv->cap + wslot[b]) * D;
                kv_put(kv, kv->k[l], off, kk + (b * Hk + g) * D, D);
                kv_put(kv, kv->v[l], off, vv + (b * Hk + g) * D, D);
            }
        }
        attn_ctx ac = {m, kv, l, L->window, q, att, wslot, first, scores, smax};
        folk_parallel_for(attn_heads, &ac, B * H, 1, nthreads);
        rc = lin_apply(&L->o, att, B, o, levels, nthreads);
        if (rc) break;
        for (int64_t i = 0; i < B * C; i++) x[i] += o[i];
        for (int64_t b = 0; b < B; b++) rmsnorm(x + b * C, L->ffn_norm, C, m->eps, xn + b * C);
        const folk_lin *gu[2] = {&L->gate, &L->up};
        float *gu_out[2] = {gate, up};
        if ((rc = lin_group(gu, gu_out, 2, xn, B, levels, nthreads))) break;
        for (int64_t i = 0; i < B * F; i++) gate[i] = silu(gate[i]) * up[i];
        rc = lin_apply(&L->down, gate, B, o, levels, nthreads);
        if (rc) break;
        for (int64_t i = 0; i < B * C; i++) x[i] += o[i];
    }
    if (!rc) {
        for (int64_t b = 0; b < B; b++) rmsnorm(x + b * C, m->final_norm, C, m->eps, xn + b * C);
        rc = lin_apply(&m->head, xn, B, logits, levels, nthreads);
    }
    free(buf);
    return rc ? -1 : 0;
}
