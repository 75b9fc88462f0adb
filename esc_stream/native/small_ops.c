/*
 * Per-frequency channel mixing of the large-kernel FFT path (esc_stream.fast.LargeKernelFFT.conv_nhwc):
 *
 *     y[f, o, t] = sum_i s[f, i, o] * x[f, i, t]        for f in [f0, f1)
 *
 * x: (F, ci, cols) fp32, the real and imaginary parts of each tile's spectrum as columns; s: (F, ci, co) fp32,
 * the filter's real spectrum; y: (F, co, cols) fp32. For the small channel counts of the CPU models (8 or 12) a
 * batched GEMM spends its time on per-matrix overhead (one 2x8 by 8x8 product per frequency); this loop keeps a
 * column's co sums in registers and streams x, s and y once.
 */
#include <stdint.h>

#define MAX_CO 64

int esc_spectral_mix(const float *restrict x, const float *restrict s, float *restrict y, int64_t ci, int64_t co,
                     int64_t cols, int64_t f0, int64_t f1) {
    if (ci <= 0 || co <= 0 || co > MAX_CO || cols <= 0 || f0 < 0 || f1 < f0)
        return 1;
    float acc[MAX_CO];
    for (int64_t f = f0; f < f1; f++) {
        const float *xf = x + f * ci * cols;
        const float *sf = s + f * ci * co;
        float *yf = y + f * co * cols;
        for (int64_t t = 0; t < cols; t++) {
            for (int64_t o = 0; o < co; o++)
                acc[o] = 0.0f;
            for (int64_t i = 0; i < ci; i++) {
                const float xv = xf[i * cols + t];
                const float *si = sf + i * co;
                for (int64_t o = 0; o < co; o++) /* contiguous in s: vectorised by the compiler */
                    acc[o] += xv * si[o];
            }
            for (int64_t o = 0; o < co; o++)
                yf[o * cols + t] = acc[o];
        }
    }
    return 0;
}

/*
 * LayerNorm over the channels of NHWC rows (the fast path's per-pixel norms): y = (x - mean) / sqrt(var + eps),
 * then * weight + bias when weight is not NULL. x, y: (rows, c) fp32, rows [r0, r1). With 8-16 channels a row is
 * one or two vector registers; the generic kernel spends most of its time on per-row setup.
 */
int esc_layer_norm_rows(const float *restrict x, float *restrict y, const float *restrict weight,
                        const float *restrict bias, int64_t c, float eps, int64_t r0, int64_t r1) {
    if (c <= 0 || r0 < 0 || r1 < r0)
        return 1;
    const float inv_c = 1.0f / (float)c;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * c;
        float *yr = y + r * c;
        float sum = 0.0f;
        for (int64_t k = 0; k < c; k++)
            sum += xr[k];
        const float mean = sum * inv_c;
        float sq = 0.0f;
        for (int64_t k = 0; k < c; k++) {
            const float d = xr[k] - mean;
            sq += d * d;
        }
        const float inv = 1.0f / __builtin_sqrtf(sq * inv_c + eps);
        if (weight) {
            for (int64_t k = 0; k < c; k++)
                yr[k] = (xr[k] - mean) * inv * weight[k] + bias[k];
        } else {
            for (int64_t k = 0; k < c; k++)
                yr[k] = (xr[k] - mean) * inv;
        }
    }
    return 0;
}
