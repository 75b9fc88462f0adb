/* Window attention with its backward pass, for training on CPUs with AVX-512 or AVX2 + FMA (esc_stream, MIT).
 *
 * The forward pass computes softmax(q k^T * scale + bias) v per (window, head) and keeps only the log-sum-exp of
 * each score row; the backward pass recomputes the probabilities from it (as flash attention does), so no
 * (tokens x tokens) matrix per window ever reaches memory. Everything one (window, head) touches (q, k^T, v,
 * the score rows of a block of queries and the dk/dv accumulators: 16 KB each at 256 tokens) stays in the
 * L1/L2 caches, where PyTorch's math path writes and reads several (windows x heads x tokens x tokens) tensors.
 *
 * Layout (fp32, C = heads * 16 channels, N tokens per window, N a multiple of 16), as window_attention.c:
 *   qkv  (windows * N, 3 * C): q of head h at column h * 16, k at C + h * 16, v at 2 * C + h * 16
 *   bias (heads, N, N)
 *   out  (windows * N, C): head h's output at columns h * 16 .. h * 16 + 15
 *   lse  (windows, heads, N): base-2 log-sum-exp of each score row (scores in base 2: natural * log2 e)
 * Backward, with S = q k^T * scale + bias and P = softmax(S):
 *   dP = dout v^T, dS = P (dP - rowsum(dout * out)), dq = dS k * scale, dk = dS^T q * scale, dv = P^T dout,
 *   dbias = sum over windows of dS.
 *   dqkv (windows * N, 3 * C) gets every column of the windows it is given; dbias (heads, N, N) is added to
 *   (+=), so that each thread sums its windows into a buffer of its own.
 * AVX-512 builds run blocks of 8 query rows in zmm registers, AVX2 + FMA builds blocks of 4 in pairs of ymm; without
 * either the entry points return 2 and esc_attention_train_supported() is 0 (callers keep PyTorch).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_exp2.h"

#define HD 16 /* head size: one zmm */
#define QB 8  /* query rows per block */
#define LOG2E 1.4426950408889634f

#if defined(__AVX512F__)

int esc_attention_train_supported(void) { return 1; }

/* Stage head h of window w: qs = q * qscale (N x 16), kt = k^T (16 x N); krows = k, vrows = v (N x 16) and
 * vt = v^T (16 x N) when asked for. */
static void stage(const float *qkv, int64_t c, int64_t n, int64_t w, int64_t h, float qscale, float *qs, float *kt,
                  float *krows, float *vrows, float *vt) {
    const int64_t rs = 3 * c;
    const float *base = qkv + w * n * rs + h * HD;
    const __m512 qsc = _mm512_set1_ps(qscale);
    for (int64_t t = 0; t < n; t++) {
        const float *row = base + t * rs;
        _mm512_store_ps(qs + t * HD, _mm512_mul_ps(_mm512_loadu_ps(row), qsc));
        if (krows) _mm512_store_ps(krows + t * HD, _mm512_loadu_ps(row + c));
        if (vrows) _mm512_store_ps(vrows + t * HD, _mm512_loadu_ps(row + 2 * c));
    }
    for (int64_t t = 0; t < n; t++) {
        const float *row = base + t * rs;
        for (int d = 0; d < HD; d++) kt[d * n + t] = row[c + d];
        if (vt)
            for (int d = 0; d < HD; d++) vt[d * n + t] = row[2 * c + d];
    }
}

/* acc[r] (keys j..j+15) = sum_d a[r][d] * bt[d][j..j+15] (+ the initial acc) for QB rows of a */
#define ROWS_TIMES_T(acc, a, bt, n, j)                                                                \
    for (int d = 0; d < HD; d++) {                                                                    \
        const __m512 col = _mm512_load_ps((bt) + d * (n) + (j));                                      \
        for (int r = 0; r < QB; r++) (acc)[r] = _mm512_fmadd_ps(_mm512_set1_ps((a)[r * HD + d]), col, (acc)[r]); \
    }

/* out[r] = sum_j p[r][j] * rows[j] for QB rows of p (stride n) */
static inline void weighted_sum(const float *p, const float *rows, int64_t n, __m512 out[QB]) {
    for (int r = 0; r < QB; r++) out[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const __m512 row = _mm512_load_ps(rows + j * HD);
        for (int r = 0; r < QB; r++) out[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * n + j]), row, out[r]);
    }
}

int esc_attention_train_forward(const float *qkv, const float *bias, float *out, float *lse, int64_t c, int64_t n,
                                int64_t w0, int64_t w1, int64_t h0, int64_t h1, float scale2) {
    const int64_t heads = c / HD;
    float *buf = (float *)aligned_alloc(64, sizeof(float) * (size_t)(3 * n * HD + QB * n));
    if (!buf) return 1;
    float *qs = buf, *kt = qs + n * HD, *v = kt + n * HD, *s = v + n * HD;
    const __m512 l2e = _mm512_set1_ps(LOG2E);
    for (int64_t w = w0; w < w1; w++)
        for (int64_t h = h0; h < h1; h++) {
            stage(qkv, c, n, w, h, scale2, qs, kt, NULL, v, NULL);
            const float *bh = bias + h * n * n;
            float *lrow = lse + (w * heads + h) * n;
            for (int64_t i = 0; i < n; i += QB) {
                const float *brow = bh + i * n;
                __m512 mx[QB];
                for (int r = 0; r < QB; r++) mx[r] = _mm512_set1_ps(-3.0e38f);
                for (int64_t j = 0; j < n; j += 16) {
                    __m512 acc[QB];
                    for (int r = 0; r < QB; r++) acc[r] = _mm512_mul_ps(_mm512_loadu_ps(brow + r * n + j), l2e);
                    ROWS_TIMES_T(acc, qs + i * HD, kt, n, j)
                    for (int r = 0; r < QB; r++) {
                        _mm512_store_ps(s + r * n + j, acc[r]);
                        mx[r] = _mm512_max_ps(mx[r], acc[r]);
                    }
                }
                float inv[QB];
                for (int r = 0; r < QB; r++) {
                    const float m = _mm512_reduce_max_ps(mx[r]);
                    const __m512 mv = _mm512_set1_ps(m);
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t j = 0; j < n; j += 16) {
                        const __m512 p = exp2_nonpositive(_mm512_sub_ps(_mm512_load_ps(s + r * n + j), mv));
                        _mm512_store_ps(s + r * n + j, p);
                        sum = _mm512_add_ps(sum, p);
                    }
                    const float total = _mm512_reduce_add_ps(sum);
                    inv[r] = 1.0f / total;
                    lrow[i + r] = m + log2f(total);
                }
                __m512 o[QB];
                weighted_sum(s, v, n, o);
                for (int r = 0; r < QB; r++)
                    _mm512_storeu_ps(out + (w * n + i + r) * c + h * HD, _mm512_mul_ps(o[r], _mm512_set1_ps(inv[r])));
            }
        }
    free(buf);
    return 0;
}

int esc_attention_train_backward(const float *qkv, const float *bias, const float *out, const float *dout,
                                 const float *lse, float *dqkv, float *dbias, int64_t c, int64_t n, int64_t w0,
                                 int64_t w1, int64_t h0, int64_t h1, float scale, float scale2) {
    /* scale2 must be the forward's (scale * log2 e as rounded there): P is recomputed from the same scores */
    const int64_t heads = c / HD, rs = 3 * c;
    float *buf = (float *)aligned_alloc(64, sizeof(float) * (size_t)(7 * n * HD + 2 * QB * n + QB * HD));
    if (!buf) return 1;
    float *q2 = buf, *kt = q2 + n * HD, *k = kt + n * HD, *vt = k + n * HD, *dk = vt + n * HD, *dv = dk + n * HD;
    float *qs = dv + n * HD, *p = qs + n * HD, *ds = p + QB * n, *go = ds + QB * n;
    const __m512 l2e = _mm512_set1_ps(LOG2E), sc = _mm512_set1_ps(scale);
    for (int64_t w = w0; w < w1; w++)
        for (int64_t h = h0; h < h1; h++) {
            stage(qkv, c, n, w, h, scale2, q2, kt, k, NULL, vt);
            const float *qbase = qkv + w * n * rs + h * HD;
            for (int64_t t = 0; t < n; t++) _mm512_store_ps(qs + t * HD, _mm512_mul_ps(_mm512_loadu_ps(qbase + t * rs), sc));
            memset(dk, 0, sizeof(float) * (size_t)(n * HD));
            memset(dv, 0, sizeof(float) * (size_t)(n * HD));
            const float *bh = bias + h * n * n;
            float *dbh = dbias + h * n * n;
            const float *lrow = lse + (w * heads + h) * n;
            for (int64_t i = 0; i < n; i += QB) {
                __m512 gor[QB], qr[QB], dlt[QB], lsev[QB];
                for (int r = 0; r < QB; r++) {
                    const int64_t row = (w * n + i + r) * c + h * HD;
                    gor[r] = _mm512_loadu_ps(dout + row);
                    _mm512_store_ps(go + r * HD, gor[r]);
                    dlt[r] = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_mul_ps(gor[r], _mm512_loadu_ps(out + row))));
                    lsev[r] = _mm512_set1_ps(lrow[i + r]);
                }
                const float *brow = bh + i * n;
                float *dbrow = dbh + i * n;
                for (int64_t j = 0; j < n; j += 16) {
                    __m512 acc[QB];
                    for (int r = 0; r < QB; r++) acc[r] = _mm512_mul_ps(_mm512_loadu_ps(brow + r * n + j), l2e);
                    ROWS_TIMES_T(acc, q2 + i * HD, kt, n, j)
                    __m512 pr[QB];
                    for (int r = 0; r < QB; r++) {
                        pr[r] = exp2_nonpositive(_mm512_sub_ps(acc[r], lsev[r])); /* the forward's P */
                        _mm512_store_ps(p + r * n + j, pr[r]);
                        acc[r] = _mm512_setzero_ps();
                    }
                    ROWS_TIMES_T(acc, go, vt, n, j) /* dP */
                    for (int r = 0; r < QB; r++) {
                        const __m512 d = _mm512_mul_ps(pr[r], _mm512_sub_ps(acc[r], dlt[r]));
                        _mm512_store_ps(ds + r * n + j, d);
                        float *db = dbrow + r * n + j;
                        _mm512_storeu_ps(db, _mm512_add_ps(_mm512_loadu_ps(db), d));
                    }
                }
                __m512 dq[QB];
                weighted_sum(ds, k, n, dq);
                for (int r = 0; r < QB; r++) _mm512_storeu_ps(dqkv + (w * n + i + r) * rs + h * HD, _mm512_mul_ps(dq[r], sc));
                for (int r = 0; r < QB; r++) qr[r] = _mm512_load_ps(qs + (i + r) * HD);
                for (int64_t j = 0; j < n; j++) {
                    __m512 a = _mm512_load_ps(dk + j * HD), b = _mm512_load_ps(dv + j * HD);
                    for (int r = 0; r < QB; r++) {
                        a = _mm512_fmadd_ps(_mm512_set1_ps(ds[r * n + j]), qr[r], a);
                        b = _mm512_fmadd_ps(_mm512_set1_ps(p[r * n + j]), gor[r], b);
                    }
                    _mm512_store_ps(dk + j * HD, a);
                    _mm512_store_ps(dv + j * HD, b);
                }
            }
            for (int64_t t = 0; t < n; t++) {
                float *row = dqkv + (w * n + t) * rs + h * HD;
                _mm512_storeu_ps(row + c, _mm512_load_ps(dk + t * HD));
                _mm512_storeu_ps(row + 2 * c, _mm512_load_ps(dv + t * HD));
            }
        }
    free(buf);
    return 0;
}

#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 + FMA: the same algorithm with 8-wide vectors, a head row (16 channels) being two of them, and blocks of
 * 4 query rows, so that the 8 score accumulators and their operands fit the 16 ymm registers. */

#undef QB
#define QB 4

int esc_attention_train_supported(void) { return 1; }

/* sum of the 16 products a[d] * b[d] */
static inline float dot16(const float *a, const float *b) {
    const __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    return hsum8(_mm256_fmadd_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(b + 8), lo));
}

static void stage8(const float *qkv, int64_t c, int64_t n, int64_t w, int64_t h, float qscale, float *qs, float *kt,
                   float *krows, float *vrows, float *vt) {
    const int64_t rs = 3 * c;
    const float *base = qkv + w * n * rs + h * HD;
    const __m256 qsc = _mm256_set1_ps(qscale);
    for (int64_t t = 0; t < n; t++) {
        const float *row = base + t * rs;
        for (int half = 0; half < HD; half += 8) {
            _mm256_store_ps(qs + t * HD + half, _mm256_mul_ps(_mm256_loadu_ps(row + half), qsc));
            if (krows) _mm256_store_ps(krows + t * HD + half, _mm256_loadu_ps(row + c + half));
            if (vrows) _mm256_store_ps(vrows + t * HD + half, _mm256_loadu_ps(row + 2 * c + half));
        }
    }
    for (int64_t t = 0; t < n; t++) {
        const float *row = base + t * rs;
        for (int d = 0; d < HD; d++) kt[d * n + t] = row[c + d];
        if (vt)
            for (int d = 0; d < HD; d++) vt[d * n + t] = row[2 * c + d];
    }
}

/* lo[r] / hi[r] (keys j..j+7 / j+8..j+15) += sum_d a[r][d] * bt[d][j..j+15] for QB rows of a */
#define ROWS_TIMES_T8(lo, hi, a, bt, n, j)                                              \
    for (int d = 0; d < HD; d++) {                                                      \
        const __m256 c0 = _mm256_load_ps((bt) + d * (n) + (j));                         \
        const __m256 c1 = _mm256_load_ps((bt) + d * (n) + (j) + 8);                     \
        for (int r = 0; r < QB; r++) {                                                  \
            const __m256 x = _mm256_broadcast_ss((a) + r * HD + d);                     \
            (lo)[r] = _mm256_fmadd_ps(x, c0, (lo)[r]);                                  \
            (hi)[r] = _mm256_fmadd_ps(x, c1, (hi)[r]);                                  \
        }                                                                               \
    }

/* out[r] = scale * sum_j p[r][j] * rows[j] for QB rows of p (stride n); stored at dst + r * stride */
static inline void weighted_sum8(const float *p, const float *rows, int64_t n, const float *scale, float *dst,
                                 int64_t stride) {
    __m256 lo[QB], hi[QB];
    for (int r = 0; r < QB; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const __m256 r0 = _mm256_load_ps(rows + j * HD), r1 = _mm256_load_ps(rows + j * HD + 8);
        for (int r = 0; r < QB; r++) {
            const __m256 x = _mm256_broadcast_ss(p + r * n + j);
            lo[r] = _mm256_fmadd_ps(x, r0, lo[r]);
            hi[r] = _mm256_fmadd_ps(x, r1, hi[r]);
        }
    }
    for (int r = 0; r < QB; r++) {
        const __m256 sc = _mm256_set1_ps(scale[r]);
        _mm256_storeu_ps(dst + r * stride, _mm256_mul_ps(lo[r], sc));
        _mm256_storeu_ps(dst + r * stride + 8, _mm256_mul_ps(hi[r], sc));
    }
}

int esc_attention_train_forward(const float *qkv, const float *bias, float *out, float *lse, int64_t c, int64_t n,
                                int64_t w0, int64_t w1, int64_t h0, int64_t h1, float scale2) {
    const int64_t heads = c / HD;
    float *buf = (float *)aligned_alloc(64, sizeof(float) * (size_t)(3 * n * HD + QB * n));
    if (!buf) return 1;
    float *qs = buf, *kt = qs + n * HD, *v = kt + n * HD, *s = v + n * HD;
    const __m256 l2e = _mm256_set1_ps(LOG2E);
    for (int64_t w = w0; w < w1; w++)
        for (int64_t h = h0; h < h1; h++) {
            stage8(qkv, c, n, w, h, scale2, qs, kt, NULL, v, NULL);
            const float *bh = bias + h * n * n;
            float *lrow = lse + (w * heads + h) * n;
            for (int64_t i = 0; i < n; i += QB) {
                const float *brow = bh + i * n;
                __m256 mx[QB];
                for (int r = 0; r < QB; r++) mx[r] = _mm256_set1_ps(-3.0e38f);
                for (int64_t j = 0; j < n; j += 16) {
                    __m256 lo[QB], hi[QB];
                    for (int r = 0; r < QB; r++) {
                        lo[r] = _mm256_mul_ps(_mm256_loadu_ps(brow + r * n + j), l2e);
                        hi[r] = _mm256_mul_ps(_mm256_loadu_ps(brow + r * n + j + 8), l2e);
                    }
                    ROWS_TIMES_T8(lo, hi, qs + i * HD, kt, n, j)
                    for (int r = 0; r < QB; r++) {
                        _mm256_store_ps(s + r * n + j, lo[r]);
                        _mm256_store_ps(s + r * n + j + 8, hi[r]);
                        mx[r] = _mm256_max_ps(mx[r], _mm256_max_ps(lo[r], hi[r]));
                    }
                }
                float inv[QB];
                for (int r = 0; r < QB; r++) {
                    const float m = hmax8(mx[r]);
                    const __m256 mv = _mm256_set1_ps(m);
                    __m256 sum = _mm256_setzero_ps();
                    for (int64_t j = 0; j < n; j += 8) {
                        const __m256 p = exp2_nonpositive8(_mm256_sub_ps(_mm256_load_ps(s + r * n + j), mv));
                        _mm256_store_ps(s + r * n + j, p);
                        sum = _mm256_add_ps(sum, p);
                    }
                    const float total = hsum8(sum);
                    inv[r] = 1.0f / total;
                    lrow[i + r] = m + log2f(total);
                }
                weighted_sum8(s, v, n, inv, out + (w * n + i) * c + h * HD, c);
            }
        }
    free(buf);
    return 0;
}

int esc_attention_train_backward(const float *qkv, const float *bias, const float *out, const float *dout,
                                 const float *lse, float *dqkv, float *dbias, int64_t c, int64_t n, int64_t w0,
                                 int64_t w1, int64_t h0, int64_t h1, float scale, float scale2) {
    /* scale2 must be the forward's (scale * log2 e as rounded there): P is recomputed from the same scores */
    const int64_t heads = c / HD, rs = 3 * c;
    float *buf = (float *)aligned_alloc(64, sizeof(float) * (size_t)(7 * n * HD + 2 * QB * n + QB * HD));
    if (!buf) return 1;
    float *q2 = buf, *kt = q2 + n * HD, *k = kt + n * HD, *vt = k + n * HD, *dk = vt + n * HD, *dv = dk + n * HD;
    float *qs = dv + n * HD, *p = qs + n * HD, *ds = p + QB * n, *go = ds + QB * n;
    const __m256 l2e = _mm256_set1_ps(LOG2E), sc = _mm256_set1_ps(scale);
    const float scales[QB] = {scale, scale, scale, scale};
    for (int64_t w = w0; w < w1; w++)
        for (int64_t h = h0; h < h1; h++) {
            stage8(qkv, c, n, w, h, scale2, q2, kt, k, NULL, vt);
            const float *qbase = qkv + w * n * rs + h * HD;
            for (int64_t t = 0; t < n; t++)
                for (int half = 0; half < HD; half += 8)
                    _mm256_store_ps(qs + t * HD + half, _mm256_mul_ps(_mm256_loadu_ps(qbase + t * rs + half), sc));
            memset(dk, 0, sizeof(float) * (size_t)(n * HD));
            memset(dv, 0, sizeof(float) * (size_t)(n * HD));
            const float *bh = bias + h * n * n;
            float *dbh = dbias + h * n * n;
            const float *lrow = lse + (w * heads + h) * n;
            for (int64_t i = 0; i < n; i += QB) {
                __m256 dlt[QB], lsev[QB];
                for (int r = 0; r < QB; r++) {
                    const int64_t row = (w * n + i + r) * c + h * HD;
                    memcpy(go + r * HD, dout + row, sizeof(float) * HD);
                    dlt[r] = _mm256_set1_ps(dot16(dout + row, out + row));
                    lsev[r] = _mm256_set1_ps(lrow[i + r]);
                }
                const float *brow = bh + i * n;
                float *dbrow = dbh + i * n;
                for (int64_t j = 0; j < n; j += 16) {
                    __m256 lo[QB], hi[QB];
                    for (int r = 0; r < QB; r++) {
                        lo[r] = _mm256_mul_ps(_mm256_loadu_ps(brow + r * n + j), l2e);
                        hi[r] = _mm256_mul_ps(_mm256_loadu_ps(brow + r * n + j + 8), l2e);
                    }
                    ROWS_TIMES_T8(lo, hi, q2 + i * HD, kt, n, j)
                    for (int r = 0; r < QB; r++) { /* the forward's P, kept in the block's p rows */
                        _mm256_store_ps(p + r * n + j, exp2_nonpositive8(_mm256_sub_ps(lo[r], lsev[r])));
                        _mm256_store_ps(p + r * n + j + 8, exp2_nonpositive8(_mm256_sub_ps(hi[r], lsev[r])));
                        lo[r] = hi[r] = _mm256_setzero_ps();
                    }
                    ROWS_TIMES_T8(lo, hi, go, vt, n, j) /* dP */
                    for (int r = 0; r < QB; r++) {
                        const __m256 d0 = _mm256_mul_ps(_mm256_load_ps(p + r * n + j), _mm256_sub_ps(lo[r], dlt[r]));
                        const __m256 d1 =
                            _mm256_mul_ps(_mm256_load_ps(p + r * n + j + 8), _mm256_sub_ps(hi[r], dlt[r]));
                        _mm256_store_ps(ds + r * n + j, d0);
                        _mm256_store_ps(ds + r * n + j + 8, d1);
                        float *db = dbrow + r * n + j;
                        _mm256_storeu_ps(db, _mm256_add_ps(_mm256_loadu_ps(db), d0));
                        _mm256_storeu_ps(db + 8, _mm256_add_ps(_mm256_loadu_ps(db + 8), d1));
                    }
                }
                weighted_sum8(ds, k, n, scales, dqkv + (w * n + i) * rs + h * HD, rs); /* dq */
                const float *qb = qs + i * HD;
                for (int64_t j = 0; j < n; j++) { /* dk += dS^T q * scale, dv += P^T dout */
                    __m256 a0 = _mm256_load_ps(dk + j * HD), a1 = _mm256_load_ps(dk + j * HD + 8);
                    __m256 b0 = _mm256_load_ps(dv + j * HD), b1 = _mm256_load_ps(dv + j * HD + 8);
                    for (int r = 0; r < QB; r++) {
                        const __m256 x = _mm256_broadcast_ss(ds + r * n + j), y = _mm256_broadcast_ss(p + r * n + j);
                        a0 = _mm256_fmadd_ps(x, _mm256_load_ps(qb + r * HD), a0);
                        a1 = _mm256_fmadd_ps(x, _mm256_load_ps(qb + r * HD + 8), a1);
                        b0 = _mm256_fmadd_ps(y, _mm256_load_ps(go + r * HD), b0);
                        b1 = _mm256_fmadd_ps(y, _mm256_load_ps(go + r * HD + 8), b1);
                    }
                    _mm256_store_ps(dk + j * HD, a0);
                    _mm256_store_ps(dk + j * HD + 8, a1);
                    _mm256_store_ps(dv + j * HD, b0);
                    _mm256_store_ps(dv + j * HD + 8, b1);
                }
            }
            for (int64_t t = 0; t < n; t++) {
                float *row = dqkv + (w * n + t) * rs + h * HD;
                memcpy(row + c, dk + t * HD, sizeof(float) * HD);
                memcpy(row + 2 * c, dv + t * HD, sizeof(float) * HD);
            }
        }
    free(buf);
    return 0;
}

#else /* neither AVX-512 nor AVX2 + FMA: not built; the Python side keeps scaled_dot_product_attention */

int esc_attention_train_supported(void) { return 0; }

int esc_attention_train_forward(const float *qkv, const float *bias, float *out, float *lse, int64_t c, int64_t n,
                                int64_t w0, int64_t w1, int64_t h0, int64_t h1, float scale2) {
    (void)qkv, (void)bias, (void)out, (void)lse, (void)c, (void)n, (void)w0, (void)w1, (void)h0, (void)h1;
    (void)scale2;
    return 2;
}

int esc_attention_train_backward(const float *qkv, const float *bias, const float *out, const float *dout,
                                 const float *lse, float *dqkv, float *dbias, int64_t c, int64_t n, int64_t w0,
                                 int64_t w1, int64_t h0, int64_t h1, float scale, float scale2) {
    (void)qkv, (void)bias, (void)out, (void)dout, (void)lse, (void)dqkv, (void)dbias, (void)c, (void)n, (void)w0;
    (void)w1, (void)h0, (void)h1, (void)scale, (void)scale2;
    return 2;
}

#endif
