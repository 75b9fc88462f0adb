/* Exact fp32 window attention for head size 16 on AVX-512 CPUs (esc_stream, MIT).
 *
 * softmax(q k^T * scale + bias) v for every (window, head) of a block of windows, reading q, k and v straight
 * from the rows of the fused q/k/v projection and writing each head's output into its columns of `out`.
 *
 * Layout (fp32, C = heads * 16 channels, N tokens per window, N a multiple of 16):
 *   qkv   (windows * N, 3 * C): token t of window w is row w * N + t; q of head h at column h * 16,
 *         k at C + h * 16, v at 2 * C + h * 16.
 *   bias2 (heads, N, N): the relative-position bias already multiplied by log2(e).
 *   out   (windows * N, C): the attention output of head h goes to columns h * 16 .. h * 16 + 15.
 *
 * The softmax runs in base 2 (scores are scaled by log2(e) up front, exp2 by a degree-6 polynomial and
 * scalef), exact to float rounding. Work is ordered for the caches: k^T and v of a group of windows are
 * staged once per head (k^T packed 16 keys at a time, so a key chunk's 16 rows are one contiguous 1 KB
 * block rather than 16 lines 4 KB apart that fight over one L1 set), then each block of 8 query rows is run
 * against every window of the group, so the block's bias rows are read once per group, not once per window.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HD 16      /* head size: one zmm */
#define QB 8       /* query rows per block */
#define GROUP 4    /* windows whose k^T and v are staged together */

static inline __m512 exp2_nonpositive(__m512 t) {
    t = _mm512_max_ps(t, _mm512_set1_ps(-127.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n); /* [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* One block of QB query rows of one window against all N keys of that window. */
static void query_block(const float *qrows, int64_t qstride, const float *kt, const float *vc, const float *brow,
                        float *s, float *orows, int64_t ostride, int64_t n, float scale2) {
    float qs[QB][HD];
    for (int r = 0; r < QB; r++)
        for (int d = 0; d < HD; d++) qs[r][d] = qrows[r * qstride + d] * scale2;

    __m512 mx[QB];
    for (int r = 0; r < QB; r++) mx[r] = _mm512_set1_ps(-3.0e38f);
    for (int64_t j = 0; j < n; j += 16) {
        __m512 acc[QB];
        for (int r = 0; r < QB; r++) acc[r] = _mm512_loadu_ps(brow + r * n + j);
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

/* Windows [w0, w1) x heads [h0, h1). Returns 0, or -1 when the work buffers cannot be allocated. */
int esc_window_attention(const float *qkv, const float *bias2, float *out, int64_t channels, int64_t n,
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
                const float *brow = bias2 + (h * n + q0) * n;
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
