/* exp2 for AVX-512, shared by the native kernels of esc_stream (MIT). */
#ifndef ESC_SIMD_EXP2_H
#define ESC_SIMD_EXP2_H
#include <immintrin.h>

#if defined(__AVX512F__)
/* 2^t for t <= 0: a degree-6 polynomial on [-0.5, 0.5] and a power-of-two scaling, within 2e-7 relative. */
static inline __m512 exp2_nonpositive(__m512 t) {
    /* below -126 the result is 0, not a subnormal (slow in later arithmetic); a NaN stays NaN (the constant is
     * max's first operand and the comparison is unordered-true, so a NaN score is never silently dropped) */
    const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
    t = _mm512_max_ps(_mm512_set1_ps(-126.0f), t);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n); /* [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(keep, p, n);
}
#endif

#endif
