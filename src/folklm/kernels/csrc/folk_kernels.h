/* Functions shared between folklm's C sources (gguf_kernels.c, decode_step.c). */
#ifndef FOLK_KERNELS_H
#define FOLK_KERNELS_H
#include <stdint.h>

/* fn(ctx, lo, hi) over [0, n) in chunks, on up to nthreads threads (the caller included). */
void folk_parallel_for(void (*fn)(void *, int64_t, int64_t), void *ctx, int64_t n, int64_t chunk,
                       int nthreads);

/* One weight in a fused matmul job (folk_matmul_parts). */
typedef struct {
    int type;
    const uint8_t *w;
    int64_t row_bytes, n;
    const int64_t *out_index;
    float *y;
    int64_t ldy;
} folk_part;

int folk_matmul_parts(const folk_part *parts, int nparts, int64_t k, const float *x, int64_t m,
                      int levels, int nthreads, int path);

int folk_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
                const float *x, int64_t m, float *y, int64_t ldy, const int64_t *out_index,
                int levels, int nthreads, int path);

int folk_dequant_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t k,
                      const int64_t *rows, int64_t first, int64_t count, float *out,
                      int nthreads);
/* IEEE half-precision bits to float */
float folk_half_to_float(uint16_t h);
#endif
