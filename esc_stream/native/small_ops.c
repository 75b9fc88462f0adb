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

/*
 * The ESC upsampler's pixel shuffle with its nearest-neighbour skip, in one pass (esc_stream.fast.FastShuffle):
 *
 *     out[n, y*s + i, x*s + j, c] = t[n, y, x, (c*s + i)*s + j] + lr[n, y, x, c]
 *
 * t: (N, H, W, 3*s*s) NHWC fp32 (the last convolution's output); lr: (N, H, W, 3) NHWC fp32 (the input);
 * out: (N, H*s, W*s, 3) NHWC fp32. Both inputs have contiguous pixels (channels innermost) and the given row and
 * image strides (in floats), so channels_last views of padded frames need no copy. rows [r0, r1) of the N*H input
 * rows. PyTorch's pixel_shuffle on channels_last data gathers element by element; here each output row is written
 * once, in order.
 */
int esc_shuffle_add(const float *restrict t, const float *restrict lr, float *restrict out, int64_t h, int64_t w,
                    int64_t s, int64_t t_row, int64_t t_img, int64_t lr_row, int64_t lr_img, int64_t r0,
                    int64_t r1) {
    if (s <= 0 || h <= 0 || w <= 0 || r0 < 0 || r1 < r0)
        return 1;
    const int64_t tc = 3 * s * s, out_w = w * s;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t n = r / h, y = r % h;
        const float *trow = t + n * t_img + y * t_row;
        const float *lrow = lr + n * lr_img + y * lr_row;
        float *o = out + (n * h * s + y * s) * out_w * 3;
        for (int64_t i = 0; i < s; i++) {
            float *orow = o + i * out_w * 3;
            for (int64_t x = 0; x < w; x++) {
                const float *tp = trow + x * tc + i * s;
                const float *lp = lrow + x * 3;
                float *op = orow + x * s * 3;
                for (int64_t j = 0; j < s; j++) {
                    op[j * 3 + 0] = tp[j] + lp[0];
                    op[j * 3 + 1] = tp[s * s + j] + lp[1];
                    op[j * 3 + 2] = tp[2 * s * s + j] + lp[2];
                }
            }
        }
    }
    return 0;
}

/*
 * Float pixels in 0..1 to integers, as the upscaler returns uint8/uint16 frames: q = rint(clamp(v, 0, 1) * peak)
 * (round half to even, as numpy's rint), in one pass. x: (N, H, W, C) fp32 with pixel stride C (channels
 * contiguous) and the given row and image strides (a cropped view); q: contiguous (N, H, W, C) uint8 (bits 8) or
 * uint16 (bits 16). rows [r0, r1) of the N*H rows.
 */
int esc_quantize(const float *restrict x, void *restrict q, int64_t h, int64_t w, int64_t c, int64_t x_row,
                 int64_t x_img, int bits, int64_t r0, int64_t r1) {
    if ((bits != 8 && bits != 16) || h <= 0 || w <= 0 || c <= 0 || r0 < 0 || r1 < r0)
        return 1;
    const float peak = bits == 8 ? 255.0f : 65535.0f;
    const int64_t n_row = w * c;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + (r / h) * x_img + (r % h) * x_row;
        float v;
        if (bits == 8) {
            uint8_t *qr = (uint8_t *)q + r * n_row;
            for (int64_t k = 0; k < n_row; k++) {
                v = xr[k] > 0.0f ? (xr[k] < 1.0f ? xr[k] : 1.0f) : 0.0f;
                qr[k] = (uint8_t)__builtin_rintf(v * peak);
            }
        } else {
            uint16_t *qr = (uint16_t *)q + r * n_row;
            for (int64_t k = 0; k < n_row; k++) {
                v = xr[k] > 0.0f ? (xr[k] < 1.0f ? xr[k] : 1.0f) : 0.0f;
                qr[k] = (uint16_t)__builtin_rintf(v * peak);
            }
        }
    }
    return 0;
}

/* The kernels above with their range split over the OpenMP team (parallel.h); `threads` is the team size. */
#include "parallel.h"

int esc_openmp(void) { return ESC_OPENMP; }

int esc_spectral_mix_par(const float *x, const float *s, float *y, int64_t ci, int64_t co, int64_t cols, int64_t f0,
                         int64_t f1, int threads) {
    ESC_PARALLEL_RANGE(f0, f1, a, b, esc_spectral_mix(x, s, y, ci, co, cols, a, b));
}

int esc_layer_norm_rows_par(const float *x, float *y, const float *weight, const float *bias, int64_t c, float eps,
                            int64_t r0, int64_t r1, int threads) {
    ESC_PARALLEL_RANGE(r0, r1, a, b, esc_layer_norm_rows(x, y, weight, bias, c, eps, a, b));
}

int esc_shuffle_add_par(const float *t, const float *lr, float *out, int64_t h, int64_t w, int64_t s, int64_t t_row,
                        int64_t t_img, int64_t lr_row, int64_t lr_img, int64_t r0, int64_t r1, int threads) {
    ESC_PARALLEL_RANGE(r0, r1, a, b, esc_shuffle_add(t, lr, out, h, w, s, t_row, t_img, lr_row, lr_img, a, b));
}

int esc_quantize_par(const float *x, void *q, int64_t h, int64_t w, int64_t c, int64_t x_row, int64_t x_img,
                     int bits, int64_t r0, int64_t r1, int threads) {
    ESC_PARALLEL_RANGE(r0, r1, a, b, esc_quantize(x, q, h, w, c, x_row, x_img, bits, a, b));
}
