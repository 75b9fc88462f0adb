/* Exact fp32 window attention for head size 16 on x86-64 CPUs with AVX-512 or AVX2+FMA (esc_stream, MIT).
 *
 * softmax(q k^T * scale + bias) v for every (window, head) of a block of windows, reading q, k and v straight
 * from the rows of the fused q/k/v projection and writing each head's output into its columns of `out`.
 *
 * Layout (fp32, C = heads * 16 channels, N tokens per window, N a multiple of 16):
 *   qkv   (windows * N, 3 * C): token t of window w is row w * N + t; q of head h at column h * 16,
 *         k at C + h * 16, v at 2 * C + h * 16.
 *   bias  (heads, N, N): the relative-position bias (shared by all windows).
 *   out   (windows * N, C): the attention output of head h goes to columns h * 16 .. h * 16 + 15.
 *
 * The softmax runs in base 2 (scores and bias are scaled by log2(e) as they are formed; exp2 is a degree-6
 * polynomial and a power-of-two scaling, within 2e-7 relative). Work is ordered for the caches: k^T and v of
 * a group of windows are staged once per head (k^T packed 16 keys at a time, so a key chunk's 16 rows are
 * one contiguous 1 KB block rather than 16 lines 4 KB apart that fight over one L1 set), then each block of
 * query rows is run against every window of the group, so the block's bias rows are read once per group,
 * not once per window.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_exp2.h"

#define HD 16      /* head size: one zmm */
#if defined(__AVX512F__)
#define QB 8       /* query rows per block: 8 zmm accumulators */
#else
#define QB 4       /* AVX2: 4 rows x 2 ymm accumulators */
#endif
#define GROUP 4    /* windows whose k^T and v are staged together */
#define LOG2E 1.4426950408889634f

#if defined(__AVX512F__)
/* One block of QB query rows of one window against all N keys of that window. */
static void query_block(const float *qrows, int64_t qstride, const float *kt, const float *vc, const float *brow,
                        float *s, float *orows, int64_t ostride, int64_t n, float scale2) {
    float qs[QB][HD];
    for (int r = 0; r < QB; r++)
        for (int d = 0; d < HD; d++) qs[r][d] = qrows[r * qstride + d] * scale2;

    const __m512 log2e = _mm512_set1_ps(LOG2E);
    __m512 mx[QB];
    for (int r = 0; r < QB; r++) mx[r] = _mm512_set1_ps(-3.0e38f);
    for (int64_t j = 0; j < n; j += 16) {
        __m512 acc[QB];
        for (int r = 0; r < QB; r++) acc[r] = _mm512_mul_ps(_mm512_loadu_ps(brow + r * n + j), log2e);
        for (int d = 0; d < HD; d++) {
            const __m512 kd = _mm512_load_ps(kt + j * HD + d * 16);
            for (int r = 0; r < QB; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r][d]), kd, acc[r]);
        }
        for (int r = 0; r < QB; r++) {
            _mm512_store_ps(s + r * n + j, acc[r]);
            mx[r] = _mm512_max_ps(mx[r], acc[r]);
        }
    }

    float inv[QB];
    for (int r = 0; r < QB; r++) {
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]));
        __m512 sum = _mm512_setzero_ps();
        float *sr = s + r * n;
        for (int64_t j = 0; j < n; j += 16) {
            const __m512 p = exp2_nonpositive(_mm512_sub_ps(_mm512_load_ps(sr + j), m));
            _mm512_store_ps(sr + j, p);
            sum = _mm512_add_ps(sum, p);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }

    __m512 o[QB];
    for (int r = 0; r < QB; r++) o[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const __m512 vj = _mm512_load_ps(vc + j * HD);
        for (int r = 0; r < QB; r++) o[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * n + j]), vj, o[r]);
    }
    for (int r = 0; r < QB; r++) _mm512_storeu_ps(orows + r * ostride, _mm512_mul_ps(o[r], _mm512_set1_ps(inv[r])));
}

#else /* AVX2 + FMA: the same algorithm with 8-wide vectors, a head row being two of them */

static void query_block(const float *qrows, int64_t qstride, const float *kt, const float *vc, const float *brow,
                        float *s, float *orows, int64_t ostride, int64_t n, float scale2) {
    float qs[QB][HD];
    for (int r = 0; r < QB; r++)
        for (int d = 0; d < HD; d++) qs[r][d] = qrows[r * qstride + d] * scale2;

    const __m256 log2e = _mm256_set1_ps(LOG2E);
    __m256 mx[QB];
    for (int r = 0; r < QB; r++) mx[r] = _mm256_set1_ps(-3.0e38f);
    for (int64_t j = 0; j < n; j += 16) {
        __m256 lo[QB], hi[QB];
        for (int r = 0; r < QB; r++) {
            lo[r] = _mm256_mul_ps(_mm256_loadu_ps(brow + r * n + j), log2e);
            hi[r] = _mm256_mul_ps(_mm256_loadu_ps(brow + r * n + j + 8), log2e);
        }
        for (int d = 0; d < HD; d++) {
            const __m256 k0 = _mm256_load_ps(kt + j * HD + d * 16), k1 = _mm256_load_ps(kt + j * HD + d * 16 + 8);
            for (int r = 0; r < QB; r++) {
                const __m256 q = _mm256_broadcast_ss(&qs[r][d]);
                lo[r] = _mm256_fmadd_ps(q, k0, lo[r]);
                hi[r] = _mm256_fmadd_ps(q, k1, hi[r]);
            }
        }
        for (int r = 0; r < QB; r++) {
            _mm256_store_ps(s + r * n + j, lo[r]);
            _mm256_store_ps(s + r * n + j + 8, hi[r]);
            mx[r] = _mm256_max_ps(mx[r], _mm256_max_ps(lo[r], hi[r]));
        }
    }

    float inv[QB];
    for (int r = 0; r < QB; r++) {
        const __m256 m = _mm256_set1_ps(hmax8(mx[r]));
        __m256 sum = _mm256_setzero_ps();
        float *sr = s + r * n;
        for (int64_t j = 0; j < n; j += 8) {
            const __m256 p = exp2_nonpositive8(_mm256_sub_ps(_mm256_load_ps(sr + j), m));
            _mm256_store_ps(sr + j, p);
            sum = _mm256_add_ps(sum, p);
        }
        inv[r] = 1.0f / hsum8(sum);
    }

    /* named accumulators (QB = 4): GCC keeps arrays of them in memory here, storing every iteration */
    __m256 lo0 = _mm256_setzero_ps(), lo1 = lo0, lo2 = lo0, lo3 = lo0, hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0;
    const float *s0 = s, *s1 = s + n, *s2 = s + 2 * n, *s3 = s + 3 * n;
    for (int64_t j = 0; j < n; j++) {
        const __m256 v0 = _mm256_load_ps(vc + j * HD), v1 = _mm256_load_ps(vc + j * HD + 8);
        __m256 p = _mm256_broadcast_ss(s0 + j);
        lo0 = _mm256_fmadd_ps(p, v0, lo0);
        hi0 = _mm256_fmadd_ps(p, v1, hi0);
        p = _mm256_broadcast_ss(s1 + j);
        lo1 = _mm256_fmadd_ps(p, v0, lo1);
        hi1 = _mm256_fmadd_ps(p, v1, hi1);
        p = _mm256_broadcast_ss(s2 + j);
        lo2 = _mm256_fmadd_ps(p, v0, lo2);
        hi2 = _mm256_fmadd_ps(p, v1, hi2);
        p = _mm256_broadcast_ss(s3 + j);
        lo3 = _mm256_fmadd_ps(p, v0, lo3);
        hi3 = _mm256_fmadd_ps(p, v1, hi3);
    }
    const __m256 lo[QB] = {lo0, lo1, lo2, lo3}, hi[QB] = {hi0, hi1, hi2, hi3};
    for (int r = 0; r < QB; r++) {
        const __m256 w = _mm256_set1_ps(inv[r]);
        _mm256_storeu_ps(orows + r * ostride, _mm256_mul_ps(lo[r], w));
        _mm256_storeu_ps(orows + r * ostride + 8, _mm256_mul_ps(hi[r], w));
    }
}
#endif

/* Windows [w0, w1) x heads [h0, h1). Returns 0, or -1 when the work buffers cannot be allocated. */
int esc_window_attention(const float *qkv, const float *bias, float *out, int64_t channels, int64_t n,
                         int64_t w0, int64_t w1, int64_t h0, int64_t h1, float scale2) {
    const int64_t row = 3 * channels;
    float *stage = aligned_alloc(64, sizeof(float) * (size_t)(GROUP * 2 * HD * n + QB * n));
    if (!stage) return -1;
    float *s = stage + GROUP * 2 * HD * n;
    for (int64_t h = h0; h < h1; h++) {
        for (int64_t g0 = w0; g0 < w1; g0 += GROUP) {
            const int64_t g1 = g0 + GROUP < w1 ? g0 + GROUP : w1;
            for (int64_t w = g0; w < g1; w++) { /* k^T packed per 16 keys, (n/16, HD, 16), and v (n, HD) */
                float *kt = stage + (w - g0) * 2 * HD * n, *vc = kt + HD * n;
                const float *base = qkv + w * n * row;
                for (int64_t t = 0; t < n; t++) {
                    const float *k = base + t * row + channels + h * HD;
                    for (int d = 0; d < HD; d++) kt[(t & ~15) * HD + d * 16 + (t & 15)] = k[d];
                    memcpy(vc + t * HD, k + channels, sizeof(float) * HD);
                }
            }
            for (int64_t q0 = 0; q0 < n; q0 += QB) {
                const float *brow = bias + (h * n + q0) * n;
                for (int64_t w = g0; w < g1; w++) {
                    const float *kt = stage + (w - g0) * 2 * HD * n;
                    query_block(qkv + (w * n + q0) * row + h * HD, row, kt, kt + HD * n, brow, s,
                                out + (w * n + q0) * channels + h * HD, channels, n, scale2);
                }
            }
        }
    }
    free(stage);
    return 0;
}

#include "parallel.h"

/* The whole call on the OpenMP team (parallel.h): threads take whole heads where they divide evenly (each then
 * reads only its heads' bias), else consecutive windows. */
int esc_window_attention_par(const float *qkv, const float *bias, float *out, int64_t channels, int64_t n,
                             int64_t windows, int64_t heads, float scale2, int threads) {
    if (threads >= 2 && heads % threads == 0)
        ESC_PARALLEL_RANGE(0, heads, a, b, esc_window_attention(qkv, bias, out, channels, n, 0, windows, a, b, scale2));
    ESC_PARALLEL_RANGE(0, windows, a, b, esc_window_attention(qkv, bias, out, channels, n, a, b, 0, heads, scale2));
}
