/* What nanoseek's native decode kernels share (gemv.c, moe.c, mla.c, layer.c; built together by
 * nanoseek/infer/native.py): the vector helpers, the weight kinds and the functions one file
 * calls in another. Everything but the ABI exists only on x86-64 with AVX-512 BF16 and VNNI
 * (NANOSEEK_KERNELS); elsewhere gemv.c says so and nanoseek keeps PyTorch's kernels. */
#ifndef NANOSEEK_NATIVE_H
#define NANOSEEK_NATIVE_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && \
    defined(__AVX512VNNI__)
#define NANOSEEK_KERNELS 1
#include <immintrin.h>
#include <omp.h>

static inline void store(void *y, int64_t i, float v, int out_bf16) {
  if (!out_bf16) {
    ((float *)y)[i] = v;
    return;
  }
  uint32_t u;
  memcpy(&u, &v, 4);
  u += 0x7fff + ((u >> 16) & 1); /* round to nearest even */
  ((uint16_t *)y)[i] = (uint16_t)(u >> 16);
}

static inline float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* 16 bf16 values widened to fp32 (exact: bf16 is fp32's upper half) */
static inline __m512 widen16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 lanes of fp32, or of bf16 widened to fp32; m masks a tail */
static inline __m512 load16(const void *p, int64_t i, __mmask16 m, int bf16) {
  if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
  return widen16(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
}

static inline void store16(void *p, int64_t i, __mmask16 m, __m512 v, int bf16) {
  if (!bf16)
    _mm512_mask_storeu_ps((float *)p + i, m, v);
  else /* round to nearest even */
    _mm256_mask_storeu_epi16((uint16_t *)p + i, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __m512 round_bf16(__m512 v) { /* fp32 -> bf16 (nearest even) -> fp32 */
  return widen16((__m256i)_mm512_cvtneps_pbh(v));
}

/* sum[j][i] = _mm512_reduce_add_ps(acc[j][i]) for 4 x 4 vectors, bit for bit (the same tree:
 * lane l + lane l+8, then + 4, + 2, + 1), as if transposed: 15 adds and 30 shuffles where 16
 * reductions take ~110 instructions (a 4 x 4 tile over 128 values spends as long reducing as
 * multiplying) */
static inline void reduce_4x4(__m512 acc[4][4], float sum[4][4]) {
  __m512 s[8], w[4], y[2];
  for (int i = 0; i < 8; i++) { /* lane l + l+8: acc 2i's 8 sums, then acc 2i+1's */
    const __m512 a = acc[i / 2][2 * (i % 2)], b = acc[i / 2][2 * (i % 2) + 1];
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; i++) /* + 4 */
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++) /* + 2 */
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  float v[16]; /* + 1: acc n = 4 j + i lands in lane 4 (n % 4) + n / 4 */
  _mm512_storeu_ps(v, _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88),
                                    _mm512_shuffle_ps(y[0], y[1], 0xDD)));
  for (int j = 0; j < 4; j++)
    for (int i = 0; i < 4; i++) sum[j][i] = v[4 * i + j];
}

/* values of work from which a row-wise loop is shared out between the threads (each row's
 * arithmetic is the same whichever thread does it) */
#define PAR_MIN (1 << 14)

/* the lanes of the 16 at k that lie before n */
static inline __mmask16 lanes(int k, int n) {
  return n - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - k)) - 1);
}

/* e^v for 16 lanes: v = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
 * (relative error < 2e-7 in fp32), times 2^n by vscalefps (which also gives 0 and inf at the
 * ends of the range) */
static inline __m512 exp16(__m512 v) {
  v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(88.f)), _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v); /* ln2 = hi + lo */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

/* silu(g) * u [V3 §2.1.2], fp32 */
static inline __m512 silu_mul(__m512 g, __m512 u) {
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(-g))), u);
}

/* The weights of a call that multiplies several times (their activations): bf16 rows (bf16),
 * int8 rows with bf16 scales (fp32, int16 inside), fp32 rows (fp32) */
enum { W_BF16 = 0, W_Q8 = 1, W_F32 = 2 };

/* gemv.c: the products and what the other files call of it */
void nanoseek_gemv_bf16(const uint16_t *x, int64_t x_gstride, const uint16_t *w,
                        const int64_t *ids, void *y, int G, int M, int K, int O, int out_bf16);
void nanoseek_gemv_f32(const float *x, int64_t x_gstride, const float *w, const int64_t *ids,
                       void *y, int G, int M, int K, int O, int out_bf16);
void nanoseek_gemv_q8(const float *x, int64_t x_gstride, const int8_t *w, const uint16_t *scale,
                      const int64_t *ids, void *y, int G, int M, int K, int O, int out_bf16);
void gemv_kind(int kind, const void *x, int64_t xs, const void *w, const uint16_t *s,
               const int64_t *ids, void *y, int G, int M, int K, int O, int out_bf16);
void block_bf16(const uint16_t *x, const uint16_t *w, void *y, int64_t y0, int R, int M, int K,
                int O, int out_bf16);
void block_f32(const float *x, const float *w, void *y, int64_t y0, int R, int M, int K, int O,
               int out_bf16);
void block_q16(const int16_t *x, const float *sx, const int8_t *w, const uint16_t *scale, void *y,
               int64_t y0, int R, int M, int K, int O, int out_bf16);
void quantize_row(const float *x, int K, int16_t *q, float *scale);
void nanoseek_rmsnorm(const void *x, const void *w, void *y, int64_t rows, int D, float eps,
                      int bf16);
void combine_rows(const float *h, int64_t stride, const float *gates, void *acc, int G, int O,
                  int acc_bf16);
/* moe.c */
void nanoseek_experts_ffn(const void *x, const void *w1, const uint16_t *s1, const void *w2,
                          const uint16_t *s2, const int64_t *ids, const float *gates, void *out,
                          int K, int M, int D, int F, int kind, int out_bf16);
void nanoseek_experts_grouped(const void *x, const void *w1, const uint16_t *s1, const void *w2,
                              const uint16_t *s2, const int64_t *ids, const float *gates,
                              void *out, int N, int K, int D, int F, int kind, int out_bf16);
void nanoseek_route(const void *x, const void *w, const float *bias, float *gates, int64_t *ids,
                    int64_t N, int D, int E, int G, int topk_group, int K, int softmax, int method,
                    int norm, float scale, int x_bf16, int w_bf16);
/* mla.c */
void nanoseek_mla_decode(const void *x, const void *const *w, const uint16_t *const *s,
                         const void *q_norm, const void *kv_norm, float eps_q, float eps_kv,
                         const float *cos, const float *sin, void *cache, int64_t row_stride,
                         const int *start, float scale, void *out, int B, int T, int D, int QL,
                         int H, int N, int R, int C, int V, int kind, int bf16);
#endif
#endif
