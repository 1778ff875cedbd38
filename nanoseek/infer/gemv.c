/* Native GEMV kernels for decoding on x86 CPUs with AVX-512 (BF16 and VNNI), built on first use
 * by nanoseek/infer/native.py with the system C compiler and called through ctypes.
 *
 * Shape legend: G matrices, M activation rows (a few: decode, verify), K in, O out features.
 *
 *   y[g, m, o] = sum_k x[g, m, k] * W_g[o, k]          (W_g matrix g, or ids[g], of w [E, O, K])
 *
 * Decoding reads every weight once per step, so these stream W once and keep the M activation
 * rows in L1: each weight vector is loaded (and widened) once for up to 4 activation rows, and
 * four output rows at a time share each activation load.
 * - bf16: one vdpbf16ps multiplies 32 bf16 pairs and accumulates in fp32 (the rounding of a
 *   bf16 GEMM with fp32 accumulation, as PyTorch's).
 * - q8: the weights int8 with one scale per output row; the activations are quantised here to
 *   int16 with one scale per row (~15 bits: as exact as fp32 next to the weights' int8), and
 *   one vpdpwssd multiplies 32 int16 pairs into int32, the int8 weights widened on the fly.
 * - fp32 (an fp32 model's own weights): vfmadd of 16 fp32 pairs; the sums are added in another
 *   order than MKL's, so results differ from PyTorch's in the last bits.
 * Matrices of G in one call: the heads of MLA's absorbed attention, or the chosen experts.
 * And, each in one call, RMSNorm, the MoE router, a token's gate-weighted sum of its
 * experts, a few tokens' SwiGLU FFNs (both products, silu(g) * u, the sum) and a few tokens'
 * MLA over their latent cache row (projections, norms, rope, cache write, attention): PyTorch
 * runs them as chains of operators, each slow right after a kernel that streamed megabytes
 * through the caches (~40 us a norm inside a decode step).
 * Threads: OpenMP, which binds to the runtime torch already loaded (libgomp.so.1), so
 * torch.set_num_threads applies here too.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ABI 12
int nanoseek_gemv_abi(void) { return ABI; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && \
    defined(__AVX512VNNI__)
#include <immintrin.h>
#include <omp.h>
int nanoseek_gemv_supported(void) { return 1; }

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

/* Software prefetch PF bytes ahead in each weight row (the next rows' start once past the end:
 * the rows this thread reads next): measured 5-15% more bandwidth for one row on one core */
#define PF 2048
#define PREFETCH(w, K, k, R, size)                                                              \
  for (int r = 0; r < R; r++)                                                                  \
    _mm_prefetch((const char *)(w + (int64_t)r * K + k) + PF, _MM_HINT_T0);

/* fp32 rows of PF_F32_BELOW values or more stream faster on the hardware prefetcher alone:
 * 10-15% at K = 1024, ~4% at 2048, where software prefetch gains ~4% at K = 512 (a C harness
 * over 1.2 GB of matrices, 1 and 2 threads, Intel Xeon, 2026-12-07) */
#define PF_F32_BELOW 1024

/* Up to 4 output rows (r0..r0+R) of one matrix against MT <= 4 activation rows: each weight
 * vector is loaded (and widened) once and used for all MT rows. */
#define TILE(MT_)                                                                                \
  static inline __attribute__((always_inline)) void tile_bf16_##MT_(                          \
      const uint16_t *x, const uint16_t *w, void *y, int64_t y0, int R, int K, int O,           \
      int out_bf16) {                                                                          \
    __m512 acc[MT_][4];                                                                        \
    for (int m = 0; m < MT_; m++)                                                              \
      for (int r = 0; r < 4; r++) acc[m][r] = _mm512_setzero_ps();                             \
    for (int k = 0; k < K; k += 32) {                                                          \
      __m512bh wv[4];                                                                          \
      for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w + (int64_t)r * K + k); \
      PREFETCH(w, K, k, R, 2)                                                                  \
      for (int m = 0; m < MT_; m++) {                                                          \
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (int64_t)m * K + k);              \
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);         \
      }                                                                                        \
    }                                                                                          \
    for (int m = 0; m < MT_; m++)                                                              \
      for (int r = 0; r < R; r++)                                                              \
        store(y, y0 + (int64_t)m * O + r, _mm512_reduce_add_ps(acc[m][r]), out_bf16);          \
  }                                                                                            \
  static inline __attribute__((always_inline)) void tile_f32_##MT_(                           \
      const float *x, const float *w, void *y, int64_t y0, int R, int K, int O, int out_bf16) {  \
    __m512 acc[MT_][4];                                                                        \
    for (int m = 0; m < MT_; m++)                                                              \
      for (int r = 0; r < 4; r++) acc[m][r] = _mm512_setzero_ps();                             \
    for (int k = 0; k < K; k += 16) {                                                          \
      __m512 wv[4];                                                                            \
      for (int r = 0; r < R; r++) wv[r] = _mm512_loadu_ps(w + (int64_t)r * K + k);             \
      if (K < PF_F32_BELOW) PREFETCH(w, K, k, R, 4)                                            \
      for (int m = 0; m < MT_; m++) {                                                          \
        const __m512 xv = _mm512_loadu_ps(x + (int64_t)m * K + k);                             \
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);          \
      }                                                                                        \
    }                                                                                          \
    for (int m = 0; m < MT_; m++)                                                              \
      for (int r = 0; r < R; r++)                                                              \
        store(y, y0 + (int64_t)m * O + r, _mm512_reduce_add_ps(acc[m][r]), out_bf16);          \
  }                                                                                            \
  static inline __attribute__((always_inline)) void tile_q16_##MT_(                           \
      const int16_t *x, const float *sx, const int8_t *w, const uint16_t *scale, void *y,       \
      int64_t y0, int R, int K, int O, int out_bf16) {                                         \
    float sum[MT_][4] = {{0}};                                                                 \
    for (int k0 = 0; k0 < K; k0 += CHUNK) {                                                    \
      const int k1 = k0 + CHUNK < K ? k0 + CHUNK : K;                                          \
      __m512i acc[MT_][4];                                                                     \
      for (int m = 0; m < MT_; m++)                                                            \
        for (int r = 0; r < 4; r++) acc[m][r] = _mm512_setzero_si512();                        \
      for (int k = k0; k < k1; k += 32) {                                                      \
        __m512i wv[4];                                                                         \
        for (int r = 0; r < R; r++)                                                            \
          wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + (int64_t)r * K + k))); \
        if (!(k & 63)) PREFETCH(w, K, k, R, 1)                                                  \
        for (int m = 0; m < MT_; m++) {                                                        \
          const __m512i xv = _mm512_loadu_si512(x + (int64_t)m * K + k);                       \
          for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], xv, wv[r]);    \
        }                                                                                      \
      }                                                                                        \
      for (int m = 0; m < MT_; m++)                                                            \
        for (int r = 0; r < R; r++) sum[m][r] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[m][r])); \
    }                                                                                          \
    for (int m = 0; m < MT_; m++)                                                              \
      for (int r = 0; r < R; r++)                                                              \
        store(y, y0 + (int64_t)m * O + r, sum[m][r] * sx[m] * bf16_to_float(scale[r]), out_bf16); \
  }
/* int32 accumulation over CHUNK columns: each lane adds two products of at most
 * 32767 * 127 per step of 32, so 2 * 32767 * 127 * CHUNK / 32 < 2^31; the 16 lanes are summed
 * in fp32 (their int32 sum could overflow) */
#define CHUNK 4096
TILE(1)
TILE(2)
TILE(3)
TILE(4)

/* the tile of MT = min(4, M - m) activation rows, MT a constant in each branch */
#define BY_TILE                        \
  switch (M - m < 4 ? M - m : 4) {     \
    case 1: ROWS(1) break;             \
    case 2: ROWS(2) break;             \
    case 3: ROWS(3) break;             \
    default: ROWS(4)                   \
  }

/* one block of up to 4 output rows against all M activation rows, in tiles of 4 rows */
static void block_bf16(const uint16_t *x, const uint16_t *w, void *y, int64_t y0, int R, int M,
                       int K, int O, int out_bf16) {
  for (int m = 0; m < M; m += 4) {
    const uint16_t *xm = x + (int64_t)m * K;
    const int64_t ym = y0 + (int64_t)m * O;
    /* R a constant in each call, so that the accumulators live in registers */
#define ROWS(MT_)                                                                   \
  if (R == 4)                                                                       \
    tile_bf16_##MT_(xm, w, y, ym, 4, K, O, out_bf16);                               \
  else                                                                              \
    for (int r = 0; r < R; r++) tile_bf16_##MT_(xm, w + (int64_t)r * K, y, ym + r, 1, K, O, out_bf16);
    BY_TILE
#undef ROWS
  }
}

static void block_f32(const float *x, const float *w, void *y, int64_t y0, int R, int M, int K,
                      int O, int out_bf16) {
  for (int m = 0; m < M; m += 4) {
    const float *xm = x + (int64_t)m * K;
    const int64_t ym = y0 + (int64_t)m * O;
#define ROWS(MT_)                                                                   \
  if (R == 4)                                                                       \
    tile_f32_##MT_(xm, w, y, ym, 4, K, O, out_bf16);                                \
  else                                                                              \
    for (int r = 0; r < R; r++) tile_f32_##MT_(xm, w + (int64_t)r * K, y, ym + r, 1, K, O, out_bf16);
    BY_TILE
#undef ROWS
  }
}

static void block_q16(const int16_t *x, const float *sx, const int8_t *w, const uint16_t *scale,
                      void *y, int64_t y0, int R, int M, int K, int O, int out_bf16) {
  for (int m = 0; m < M; m += 4) {
    const int16_t *xm = x + (int64_t)m * K;
    const int64_t ym = y0 + (int64_t)m * O;
#define ROWS(MT_)                                                                   \
  if (R == 4)                                                                       \
    tile_q16_##MT_(xm, sx + m, w, scale, y, ym, 4, K, O, out_bf16);                 \
  else                                                                              \
    for (int r = 0; r < R; r++)                                                     \
      tile_q16_##MT_(xm, sx + m, w + (int64_t)r * K, scale + r, y, ym + r, 1, K, O, out_bf16);
    BY_TILE
#undef ROWS
  }
}

/* x bf16 [G|1, M, K] (x_gstride 0: one x for every matrix), w bf16 [E, O, K] of which matrix
 * ids[g] (ids NULL: matrix g) is multiplied, y [G, M, O] fp32 or bf16; K % 32 == 0 */
#define MATRIX(g) ((ids ? ids[g] : (int64_t)(g)) * O)
void nanoseek_gemv_bf16(const uint16_t *x, int64_t x_gstride, const uint16_t *w,
                        const int64_t *ids, void *y, int G, int M, int K, int O, int out_bf16) {
  const int blocks = (O + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < (int64_t)G * blocks; b++) {
    const int g = (int)(b / blocks), o = (int)(b % blocks) * 4;
    const int R = O - o < 4 ? O - o : 4;
    block_bf16(x + g * x_gstride, w + (MATRIX(g) + o) * K, y, (int64_t)g * M * O + o, R, M, K, O,
               out_bf16);
  }
}

/* as nanoseek_gemv_bf16 with fp32 x and w (the model's own weights, nn.Linear's layout) */
void nanoseek_gemv_f32(const float *x, int64_t x_gstride, const float *w, const int64_t *ids,
                       void *y, int G, int M, int K, int O, int out_bf16) {
  const int blocks = (O + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < (int64_t)G * blocks; b++) {
    const int g = (int)(b / blocks), o = (int)(b % blocks) * 4;
    const int R = O - o < 4 ? O - o : 4;
    block_f32(x + g * x_gstride, w + (MATRIX(g) + o) * K, y, (int64_t)g * M * O + o, R, M, K, O,
              out_bf16);
  }
}

/* one row of K fp32 activations as int16 with one scale (amax / 32767) */
static void quantize_row(const float *x, int K, int16_t *q, float *scale) {
  float amax = 0.f;
  for (int k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
  const float inv = amax > 0.f ? 32767.f / amax : 0.f;
  for (int k = 0; k < K; k++) q[k] = (int16_t)lrintf(x[k] * inv);
  *scale = amax / 32767.f;
}

/* x fp32 [G|1, M, K] -> int16 with one scale per row (amax / 32767: the activations keep ~15
 * bits, so the weights' int8 is the only rounding that matters), w int8 [E, O, K] with bf16
 * scales [E, O], matrices chosen as in nanoseek_gemv_bf16, y [G, M, O] fp32 or bf16;
 * K % 32 == 0 */
void nanoseek_gemv_q8(const float *x, int64_t x_gstride, const int8_t *w, const uint16_t *scale,
                      const int64_t *ids, void *y, int G, int M, int K, int O, int out_bf16) {
  const int64_t xg = x_gstride ? G : 1, rows = xg * M;
  int16_t *q = malloc((size_t)rows * K * sizeof(int16_t));
  float *sx = malloc((size_t)rows * sizeof(float));
  for (int64_t gm = 0; gm < rows; gm++)
    quantize_row(x + (gm / M) * x_gstride + (gm % M) * (int64_t)K, K, q + gm * K, sx + gm);
  const int blocks = (O + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < (int64_t)G * blocks; b++) {
    const int g = (int)(b / blocks), o = (int)(b % blocks) * 4;
    const int R = O - o < 4 ? O - o : 4;
    const int64_t xo = x_gstride ? (int64_t)g * M : 0;
    block_q16(q + xo * K, sx + xo, w + (MATRIX(g) + o) * K, scale + MATRIX(g) + o, y,
              (int64_t)g * M * O + o, R, M, K, O, out_bf16);
  }
  free(q);
  free(sx);
}

/* The weights of a call that multiplies several times (their activations): bf16 rows (bf16),
 * int8 rows with bf16 scales (fp32, int16 inside), fp32 rows (fp32) */
enum { W_BF16 = 0, W_Q8 = 1, W_F32 = 2 };

/* y [G, M, O] (fp32, or bf16 if out_bf16) = x @ W^T through the kind's kernel, x as it takes it */
static void gemv_kind(int kind, const void *x, int64_t xs, const void *w, const uint16_t *s,
                      const int64_t *ids, void *y, int G, int M, int K, int O, int out_bf16) {
  if (kind == W_Q8)
    nanoseek_gemv_q8(x, xs, w, s, ids, y, G, M, K, O, out_bf16);
  else if (kind == W_F32)
    nanoseek_gemv_f32(x, xs, w, ids, y, G, M, K, O, out_bf16);
  else
    nanoseek_gemv_bf16(x, xs, w, ids, y, G, M, K, O, out_bf16);
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

/* the lanes of the 16 at k that lie before n */
static inline __mmask16 lanes(int k, int n) {
  return n - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - k)) - 1);
}

/* RMSNorm of `rows` rows of D: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32. fp32:
 * (x * rstd) * w, F.rms_norm's order. bf16 (x, w, y all bf16): x * rstd rounded to bf16, then
 * times w rounded again, the order of nanoseek's RMSNorm and transformers' for bf16. The sum of
 * squares is added in another order than PyTorch's, so results may differ in the last bit. */
void nanoseek_rmsnorm(const void *x, const void *w, void *y, int64_t rows, int D, float eps,
                      int bf16) {
#pragma omp parallel for schedule(static) if (rows * D >= (1 << 18))
  for (int64_t r = 0; r < rows; r++) {
    const int64_t row = r * D;
    __m512 acc = _mm512_setzero_ps();
    for (int k = 0; k < D; k += 16) {
      const __m512 v = load16(x, row + k, lanes(k, D), bf16);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const __m512 rstd = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps));
    for (int k = 0; k < D; k += 16) {
      const __mmask16 m = lanes(k, D);
      const __m512 n = _mm512_mul_ps(load16(x, row + k, m, bf16), rstd);
      store16(y, row + k, m, _mm512_mul_ps(bf16 ? round_bf16(n) : n, load16(w, k, m, bf16)), bf16);
    }
  }
}

/* acc[o] += sum_g gates[g] * h[g, o], g in order (a token's chosen experts weighted by their
 * gates [V3 eq. 12]); h fp32 [G, O] (rows `stride` apart), acc fp32 or bf16 [O] (bf16: summed in
 * fp32, rounded once) */
static void combine_rows(const float *h, int64_t stride, const float *gates, void *acc, int G,
                         int O, int acc_bf16) {
  for (int o = 0; o < O; o += 16) {
    const __mmask16 m = lanes(o, O);
    __m512 a = load16(acc, o, m, acc_bf16);
    for (int g = 0; g < G; g++)
      a = _mm512_fmadd_ps(_mm512_set1_ps(gates[g]), _mm512_maskz_loadu_ps(m, h + g * stride + o),
                          a);
    store16(acc, o, m, a, acc_bf16);
  }
}

void nanoseek_combine(const float *h, const float *gates, void *acc, int G, int O, int acc_bf16) {
  combine_rows(h, O, gates, acc, G, O, acc_bf16);
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

/* M tokens through the same chosen experts' SwiGLU FFNs, added to their outputs [V3 eq. 12]
 * (one token's routed experts: M = 1; a dense FFN or the shared experts of a few tokens: one
 * expert of gate 1): out[m, D] += sum_k gates[k] * W2_e (silu(W1g_e x_m) * W1u_e x_m),
 * e = ids[k], k in order. x [M, D]; w1 [E, 2F, D] (each expert's gate rows, then its up rows),
 * w2 [E, D, F] of the `kind`: bf16 rows (x bf16), int8 with bf16 scales s1 [E, 2F], s2 [E, D]
 * (x fp32) or fp32 rows (x fp32). The gate/up products and silu(g) * u stay fp32 (rounded to
 * bf16 once for the bf16 kernel's input); out fp32 or bf16. D % 32 == 0 == F % 32. nanoseek/model/weights.py
 * `experts_ffn` and `swiglu` (three calls and two operators) are the references. */
void nanoseek_experts_ffn(const void *x, const void *w1, const uint16_t *s1, const void *w2,
                          const uint16_t *s2, const int64_t *ids, const float *gates, void *out,
                          int K, int M, int D, int F, int kind, int out_bf16) {
  const int64_t KM = (int64_t)K * M;
  float *h = malloc(sizeof(float) * KM * 2 * F), *y = malloc(sizeof(float) * KM * D);
  void *a = malloc(sizeof(float) * KM * F); /* [K, M, F] fp32, or bf16 for bf16 weights */
  gemv_kind(kind, x, 0, w1, s1, ids, h, K, M, D, 2 * F, 0);
  for (int64_t km = 0; km < KM; km++)
    for (int j = 0; j < F; j += 16) {
      const __mmask16 m = lanes(j, F);
      const __m512 g = _mm512_maskz_loadu_ps(m, h + km * 2 * F + j);
      const __m512 u = _mm512_maskz_loadu_ps(m, h + km * 2 * F + F + j);
      store16(a, km * F + j, m, silu_mul(g, u), kind == W_BF16);
    }
  gemv_kind(kind, a, (int64_t)M * F, w2, s2, ids, y, K, M, F, D, 0);
  const size_t es = out_bf16 ? 2 : 4;
  for (int m = 0; m < M; m++)
    combine_rows(y + (int64_t)m * D, (int64_t)M * D, gates, (char *)out + es * m * D, K, D,
                 out_bf16);
  free(h);
  free(y);
  free(a);
}

/* N tokens through their chosen experts' SwiGLU FFNs, each chosen expert's weights read once
 * for all the tokens that chose it [V3 eq. 12]: out[n, D] += sum_k gates[n, k] * FFN_e(x_n),
 * e = ids[n, k], k in order (a decode step of a few rows; nanoseek/model/weights.py
 * `grouped_experts_ffn` is the reference). x [N, D] as the weights' kind takes it (int8: fp32,
 * quantised to int16 once per row), ids, gates [N, K]; weights as nanoseek_experts_ffn's; out
 * fp32 or bf16. */
void nanoseek_experts_grouped(const void *x, const void *w1, const uint16_t *s1, const void *w2,
                              const uint16_t *s2, const int64_t *ids, const float *gates,
                              void *out, int N, int K, int D, int F, int kind, int out_bf16) {
  const int NK = N * K;
  /* the distinct experts in order of first choice, and each (n, k) pair's row among theirs */
  int64_t *experts = malloc(sizeof(int64_t) * NK);
  int *first = malloc(sizeof(int) * (NK + 1)), *row_of = malloc(sizeof(int) * NK);
  int *token = malloc(sizeof(int) * NK), U = 0;
  for (int i = 0; i < NK; i++) {
    int u = 0;
    while (u < U && experts[u] != ids[i]) u++;
    if (u == U) experts[U++] = ids[i];
  }
  for (int u = 0, r = 0; u < U; u++) { /* rows grouped by expert, tokens in order */
    first[u] = r;
    for (int i = 0; i < NK; i++)
      if (ids[i] == experts[u]) token[r] = i / K, row_of[i] = r++;
  }
  first[U] = NK;
  /* the gathered activations, the gate/up products, silu(g) * u, the down products */
  const int q8 = kind == W_Q8;
  const size_t xs = kind == W_F32 ? sizeof(float) : 2; /* int16 or bf16 */
  char *xg = malloc(xs * NK * (int64_t)(D > F ? D : F));
  float *sx = malloc(sizeof(float) * NK), *h = malloc(sizeof(float) * NK * 2 * (int64_t)F);
  float *y = malloc(sizeof(float) * NK * (int64_t)D);
  for (int r = 0; r < NK; r++) { /* row r: token[r]'s x, int16 with its scale (q8) or as is */
    if (!q8) {
      memcpy(xg + xs * r * D, (const char *)x + xs * token[r] * D, xs * D);
      continue;
    }
    quantize_row((const float *)x + (int64_t)token[r] * D, D, (int16_t *)xg + (int64_t)r * D,
                 sx + r);
  }
  /* gate/up: every distinct expert's rows against its 2F weight rows, in blocks of 4 rows */
  const int b1 = (2 * F + 3) / 4, b2 = (D + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < (int64_t)U * b1; b++) {
    const int u = (int)(b / b1), o = (int)(b % b1) * 4, R = 2 * F - o < 4 ? 2 * F - o : 4;
    const int r0 = first[u], M = first[u + 1] - r0;
    const int64_t w = experts[u] * 2 * F + o;
    if (q8)
      block_q16((const int16_t *)xg + (int64_t)r0 * D, sx + r0, (const int8_t *)w1 + w * D,
                s1 + w, h, (int64_t)r0 * 2 * F + o, R, M, D, 2 * F, 0);
    else if (kind == W_F32)
      block_f32((const float *)xg + (int64_t)r0 * D, (const float *)w1 + w * D, h,
                (int64_t)r0 * 2 * F + o, R, M, D, 2 * F, 0);
    else
      block_bf16((const uint16_t *)xg + (int64_t)r0 * D, (const uint16_t *)w1 + w * D, h,
                 (int64_t)r0 * 2 * F + o, R, M, D, 2 * F, 0);
  }
  for (int r = 0; r < NK; r++) { /* silu(g) * u, as the down products' input */
    float *a = h + (int64_t)r * 2 * F; /* (written over its own gate half) */
    for (int j = 0; j < F; j += 16) {
      const __mmask16 m = lanes(j, F);
      const __m512 v = silu_mul(_mm512_maskz_loadu_ps(m, a + j),
                                _mm512_maskz_loadu_ps(m, a + F + j));
      if (q8)
        _mm512_mask_storeu_ps(a + j, m, v);
      else
        store16(xg + xs * r * F, j, m, v, kind == W_BF16);
    }
    if (q8) quantize_row(a, F, (int16_t *)xg + (int64_t)r * F, sx + r);
  }
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < (int64_t)U * b2; b++) {
    const int u = (int)(b / b2), o = (int)(b % b2) * 4, R = D - o < 4 ? D - o : 4;
    const int r0 = first[u], M = first[u + 1] - r0;
    const int64_t w = experts[u] * D + o;
    if (q8)
      block_q16((const int16_t *)xg + (int64_t)r0 * F, sx + r0, (const int8_t *)w2 + w * F,
                s2 + w, y, (int64_t)r0 * D + o, R, M, F, D, 0);
    else if (kind == W_F32)
      block_f32((const float *)xg + (int64_t)r0 * F, (const float *)w2 + w * F, y,
                (int64_t)r0 * D + o, R, M, F, D, 0);
    else
      block_bf16((const uint16_t *)xg + (int64_t)r0 * F, (const uint16_t *)w2 + w * F, y,
                 (int64_t)r0 * D + o, R, M, F, D, 0);
  }
  const size_t es = out_bf16 ? 2 : 4;
  for (int n = 0; n < N; n++) { /* each token's experts added in its order of choice */
    float g[K];
    int64_t rows[K];
    for (int k = 0; k < K; k++) g[k] = gates[n * K + k], rows[k] = row_of[n * K + k];
    for (int o = 0; o < D; o += 16) {
      const __mmask16 m = lanes(o, D);
      char *acc = (char *)out + es * (int64_t)n * D;
      __m512 a = load16(acc, o, m, out_bf16);
      for (int k = 0; k < K; k++)
        a = _mm512_fmadd_ps(_mm512_set1_ps(g[k]), _mm512_maskz_loadu_ps(m, y + rows[k] * D + o), a);
      store16(acc, o, m, a, out_bf16);
    }
  }
  free(experts);
  free(first);
  free(row_of);
  free(token);
  free(xg);
  free(sx);
  free(h);
  free(y);
}

/* The DeepSeekMoE router [V3 §2.1.2, eqs. 12-16; V2 §2.1.2], nanoseek/model/router.py's
 * Router.forward (the reference) for rows x [N, D] against the gate's rows w [E, D] (each fp32
 * or bf16): logits and scores in fp32 (sigmoid, or softmax over E); the expert choice on the
 * scores plus the bias (method NOAUX_TC) inside the best topk_group of G groups (a group scores
 * the sum of its top 2 choices, or its best score: GROUP_LIMITED; GREEDY and G = 1 skip groups);
 * gates = the unbiased scores of the K chosen, normalised to sum 1 if `norm`, times `scale`.
 * Ties go to the lower index. ids [N, K] int64 in descending order of choice, gates fp32. */
enum { GREEDY = 0, GROUP_LIMITED = 1, NOAUX_TC = 2 };

static int argmax_of(const float *v, int n) {
  int best = 0;
  for (int i = 1; i < n; i++)
    if (v[i] > v[best]) best = i;
  return best;
}

void nanoseek_route(const void *x, const void *w, const float *bias, float *gates, int64_t *ids,
                    int64_t N, int D, int E, int G, int topk_group, int K, int softmax, int method,
                    int norm, float scale, int x_bf16, int w_bf16) {
  float *logits = malloc(sizeof(float) * N * E);
#pragma omp parallel for collapse(2) schedule(static) if (N * E * D >= (1 << 20))
  for (int64_t n = 0; n < N; n++)
    for (int e = 0; e < E; e++) {
      __m512 acc = _mm512_setzero_ps();
      for (int k = 0; k < D; k += 16) {
        const __mmask16 m = lanes(k, D);
        acc = _mm512_fmadd_ps(load16(x, n * D + k, m, x_bf16),
                              load16(w, (int64_t)e * D + k, m, w_bf16), acc);
      }
      logits[n * E + e] = _mm512_reduce_add_ps(acc);
    }
  for (int64_t n = 0; n < N; n++) {
    float *s = logits + n * E, choice[E], group_score[G];
    if (softmax) {
      const float top = s[argmax_of(s, E)];
      float sum = 0.f;
      for (int e = 0; e < E; e++) sum += (s[e] = expf(s[e] - top));
      for (int e = 0; e < E; e++) s[e] /= sum;
    } else {
      for (int e = 0; e < E; e++) s[e] = 1.f / (1.f + expf(-s[e]));
    }
    for (int e = 0; e < E; e++) choice[e] = method == NOAUX_TC ? s[e] + bias[e] : s[e];
    if (G > 1 && method != GREEDY) {
      const int per = E / G;
      for (int g = 0; g < G; g++) {
        const float *c = choice + g * per;
        const int a = argmax_of(c, per);
        float score = c[a];
        if (method == NOAUX_TC && per > 1) { /* plus the second best */
          int b = a == 0 ? 1 : 0;
          for (int i = 0; i < per; i++)
            if (i != a && c[i] > c[b]) b = i;
          score += c[b];
        }
        group_score[g] = score;
      }
      int keep[G];
      memset(keep, 0, sizeof keep);
      for (int t = 0; t < topk_group; t++) {
        const int g = argmax_of(group_score, G);
        keep[g] = 1;
        group_score[g] = -INFINITY;
      }
      for (int e = 0; e < E; e++)
        if (!keep[e / per]) choice[e] = -INFINITY;
    }
    float total = 0.f;
    for (int k = 0; k < K; k++) {
      const int e = argmax_of(choice, E);
      choice[e] = -INFINITY;
      ids[n * K + k] = e;
      total += (gates[n * K + k] = s[e]);
    }
    const float denom = (K > 1 && norm) ? total + 1e-20f : 1.f;
    for (int k = 0; k < K; k++) gates[n * K + k] = gates[n * K + k] / denom * scale;
  }
  free(logits);
}

/* activations of the model's dtype: fp32, or bf16 (bf16 = 1) */
static inline float get_act(const void *p, int64_t i, int bf16) {
  return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* y [G, M, O] = x_g [M, K] @ W_g^T for G matrices of w (of the `kind`; int8 with bf16 scales
 * s), x_g at x + g * xs elements (xs 0: one x for all), x and y of the model's dtype (bf16 and
 * fp32 weights come with a model of their dtype) */
static void act_gemv(const void *x, int64_t xs, const void *w, const uint16_t *s, void *y, int G,
                     int M, int K, int O, int kind, int bf16) {
  if (kind != W_Q8 || !bf16) {
    gemv_kind(kind, x, xs, w, s, NULL, y, G, M, K, O, bf16);
    return;
  }
  const int64_t n = (int64_t)(xs ? G : 1) * M * K; /* the q8 kernel takes fp32 activations */
  float *xf = malloc(sizeof(float) * n);
  for (int64_t i = 0; i < n; i++) xf[i] = bf16_to_float(((const uint16_t *)x)[i]);
  nanoseek_gemv_q8(xf, xs ? (int64_t)M * K : 0, w, s, NULL, y, G, M, K, O, 1);
  free(xf);
}

/* rope of one vector x [R] (interleaved pairs) into y [R] = [rotated reals, rotated
 * imaginaries] (nanoseek/model/rope.py apply_rope: fp32 inside, y in the model's dtype) */
static void rope_one(const void *x, const float *cos, const float *sin, void *y, int R, int bf16) {
  for (int j = 0; j < R / 2; j++) {
    const float re = get_act(x, 2 * j, bf16), im = get_act(x, 2 * j + 1, bf16);
    store(y, j, re * cos[j] - im * sin[j], bf16);
    store(y, R / 2 + j, re * sin[j] + im * cos[j], bf16);
  }
}

/* Thread t's share (of T) of `latent_attention`: keys s0..s1-1 for every head. mx, sm [H]: the
 * share's softmax maximum and sum; op [H, C]: its sum of e^(score - max) c_KV. Inlined with
 * bf16 a constant, so that each cache dtype gets its own loops. */
static inline __attribute__((always_inline)) void attention_share(
    const float *q, const void *kv, const int bf16, int S, int H, int C, int R, float scale,
    float *p, float *mx, float *sm, float *op, int t, int T) {
  const int CR = C + R;
  const int s0 = (int)((int64_t)S * t / T), s1 = (int)((int64_t)S * (t + 1) / T);
  for (int s = s0; s < s1; s += 4) { /* scores in tiles of 4 heads x 4 keys */
    const int nk = s1 - s < 4 ? s1 - s : 4;
    for (int h0 = 0; h0 < H; h0 += 4) {
      const int nh = H - h0 < 4 ? H - h0 : 4;
      int64_t key[4], qh[4];
      for (int j = 0; j < 4; j++) qh[j] = (int64_t)(h0 + (j < nh ? j : nh - 1)) * CR;
      for (int i = 0; i < 4; i++) key[i] = (int64_t)(s + (i < nk ? i : nk - 1)) * CR;
      __m512 acc[4][4];
      for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) acc[j][i] = _mm512_setzero_ps();
      for (int k = 0; k < CR; k += 16) {
        const __mmask16 m = lanes(k, CR);
        __m512 kk[4];
        for (int i = 0; i < 4; i++) kk[i] = load16(kv, key[i] + k, m, bf16);
        for (int j = 0; j < 4; j++) {
          const __m512 qv = _mm512_maskz_loadu_ps(m, q + qh[j] + k);
          for (int i = 0; i < 4; i++) acc[j][i] = _mm512_fmadd_ps(qv, kk[i], acc[j][i]);
        }
      }
      float dot[4][4]; /* all 16 reduced (constant indices keep acc in registers) */
      for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) dot[j][i] = _mm512_reduce_add_ps(acc[j][i]) * scale;
      for (int j = 0; j < nh; j++)
        for (int i = 0; i < nk; i++) p[(int64_t)(h0 + j) * S + s + i] = dot[j][i];
    }
  }
  for (int h = 0; h < H; h++) { /* e^(score - the share's max), and their sum */
    float *r = p + (int64_t)h * S, top = -INFINITY;
    for (int s = s0; s < s1; s++) top = fmaxf(top, r[s]);
    __m512 total = _mm512_setzero_ps();
    for (int s = s0; s < s1; s += 16) {
      const __mmask16 m = lanes(s - s0, s1 - s0);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, r + s), _mm512_set1_ps(top)));
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
      _mm512_mask_storeu_ps(r + s, m, e);
    }
    mx[h] = top;
    sm[h] = _mm512_reduce_add_ps(total);
  }
  /* e @ c_KV in tiles of 4 heads x 64 channels, the heads inner: the share's 64 channels are
   * read from memory once and from L2 for the other heads */
  for (int c0 = 0; c0 < C; c0 += 64) {
    __mmask16 m[4];
    for (int i = 0; i < 4; i++) m[i] = lanes(c0 + 16 * i, C);
    for (int h0 = 0; h0 < H; h0 += 4) {
      const int nh = H - h0 < 4 ? H - h0 : 4;
      const float *ph[4]; /* (a tail of heads repeats the last: computed, not stored) */
      for (int j = 0; j < 4; j++) ph[j] = p + (int64_t)(h0 + (j < nh ? j : nh - 1)) * S;
      __m512 acc[4][4];
      for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) acc[j][i] = _mm512_setzero_ps();
      for (int s = s0; s < s1; s++) {
        __m512 v[4];
        for (int i = 0; i < 4; i++) v[i] = load16(kv, (int64_t)s * CR + c0 + 16 * i, m[i], bf16);
        for (int j = 0; j < 4; j++) {
          const __m512 pj = _mm512_set1_ps(ph[j][s]);
          for (int i = 0; i < 4; i++) acc[j][i] = _mm512_fmadd_ps(pj, v[i], acc[j][i]);
        }
      }
      float sums[4][64]; /* (constant indices keep acc in registers) */
      for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(sums[j] + 16 * i, acc[j][i]);
      const int nc = C - c0 < 64 ? C - c0 : 64;
      for (int j = 0; j < nh; j++) memcpy(op + (int64_t)(h0 + j) * C + c0, sums[j], 4 * nc);
    }
  }
}

/* Absorbed attention of H query rows q [H, C+R] fp32 over keys 0..S-1 of one cache row kv
 * [S, C+R] (c_KV then k_rope; fp32 or bf16): p = softmax(scale * q . kv) per row, o [H, C] fp32
 * = p @ c_KV. The keys are split between the threads (each reads its share of the cache once,
 * for every head), each keeps its own softmax maximum and sum, and the shares are combined at
 * the end, the heads split between the threads (split-K, as flash-decoding does). p: [H, S]
 * scratch. */
static void latent_attention(const float *q, const void *kv, int bf16, int S, int H, int C, int R,
                             float scale, float *p, float *o) {
  const int nt = omp_get_max_threads(), per = H * (2 + C); /* a share: max, sum, o [H, C] */
  float *part = malloc(sizeof(float) * nt * per);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    float *mx = part + (int64_t)t * per, *sm = mx + H, *op = sm + H;
    if (bf16)
      attention_share(q, kv, 1, S, H, C, R, scale, p, mx, sm, op, t, T);
    else
      attention_share(q, kv, 0, S, H, C, R, scale, p, mx, sm, op, t, T);
#pragma omp barrier
    for (int h = t; h < H; h += T) { /* the shares rescaled to the overall maximum */
      float top = -INFINITY, total = 0.f, w[T];
      for (int u = 0; u < T; u++) top = fmaxf(top, part[(int64_t)u * per + h]);
      for (int u = 0; u < T; u++) { /* a share without keys (max -inf): weight 0 */
        const float m = part[(int64_t)u * per + h];
        w[u] = m == -INFINITY ? 0.f : expf(m - top);
        total += w[u] * part[(int64_t)u * per + H + h];
      }
      for (int c = 0; c < C; c += 16) {
        const __mmask16 m = lanes(c, C);
        __m512 v = _mm512_setzero_ps();
        for (int u = 0; u < T; u++) {
          const float *share = part + (int64_t)u * per + 2 * H + (int64_t)h * C;
          if (w[u] != 0.f)
            v = _mm512_fmadd_ps(_mm512_set1_ps(w[u]), _mm512_maskz_loadu_ps(m, share + c), v);
        }
        _mm512_mask_storeu_ps(o + (int64_t)h * C + c, m, _mm512_div_ps(v, _mm512_set1_ps(total)));
      }
    }
  }
  free(part);
}

/* T new tokens in each of B rows of MLA [V3 §2.1.1, eqs. 1-11, with W_UK and W_UV absorbed;
 * V2 §2.1], nanoseek/model/mla.py `MLA.decode` (the reference) in one call (a decode step:
 * T = 1; a speculative verify step: a few). Row b's tokens go at positions start[b]..+T-1 of its
 * latent cache row, cache + b * row_stride elements ([S_max, C+R]); token m = b T + t:
 *   a = x @ [W_DQ ; W_DKV ; W_KR]^T     (w[0]; no query latent, QL = 0: [W_Q ; W_DKV ; W_KR])
 *   q = norm_q(a_q) @ W_UQ^T           (w[1], QL > 0), per head [q_nope (N) ; q_rope (R)]
 *   cache_b[start[b] + t] = [norm_kv(c_kv) ; rope(k_rope)]
 *   q_lat_h = W_UK_h q_nope_h           (w[2]: [H, C, N] rows)
 *   o_lat_h = softmax(scale [q_lat_h ; rope(q_rope_h)] . cache_b[0..start[b]+t]) @ c_KV
 *   out = concat_h(W_UV_h o_lat_h) @ W_O^T  (w[3]: [H, V, C] rows, w[4]: [D, H V])
 * Weights of the `kind`: int8 with bf16 scales s[i], or bf16 or fp32 rows of the model's dtype
 * (s unused); x [B T, D], the
 * norms' weights, the cache and out [B T, D] of the model's dtype (bf16 = 1: bf16, rounded where
 * the reference rounds), the scores, softmax and o_lat in fp32. cos, sin [B T, R/2] fp32. */
void nanoseek_mla_decode(const void *x, const void *const *w, const uint16_t *const *s,
                         const void *q_norm, const void *kv_norm, float eps_q, float eps_kv,
                         const float *cos, const float *sin, void *cache, int64_t row_stride,
                         const int *start, float scale, void *out, int B, int T, int D, int QL,
                         int H, int N, int R, int C, int V, int kind, int bf16) {
  const int QH = H * (N + R), QA = QL ? QL : QH, A = QA + C + R, CR = C + R, M = B * T;
  const size_t es = bf16 ? 2 : 4;
  int S = 0; /* the most keys a token attends to */
  for (int b = 0; b < B; b++) S = start[b] + T > S ? start[b] + T : S;
  char *a = malloc(es * M * A), *q = a, *qn = NULL;
  act_gemv(x, 0, w[0], s[0], a, 1, M, D, A, kind, bf16);
  for (int m = 0; m < M; m++) {
    const char *am = a + es * m * A;
    const int64_t position = start[m / T] + m % T;
    char *entry = (char *)cache + es * ((m / T) * row_stride + position * CR);
    nanoseek_rmsnorm(am + es * QA, kv_norm, entry, 1, C, eps_kv, bf16);
    rope_one(am + es * (QA + C), cos + m * R / 2, sin + m * R / 2, entry + es * C, R, bf16);
  }
  int q_stride = A; /* elements between the tokens' queries */
  if (QL) {
    qn = malloc(es * M * (QL + QH));
    for (int m = 0; m < M; m++)
      nanoseek_rmsnorm(a + es * m * A, q_norm, qn + es * m * QL, 1, QL, eps_q, bf16);
    q = qn + es * M * QL;
    act_gemv(qn, 0, w[1], s[1], q, 1, M, QL, QH, kind, bf16);
    q_stride = QH;
  }
  /* [H, M, N] queries (nope), [H, M, C] their latents, [H, M, C] o_lat, [H, M, V], [M, H V] */
  char *buf = malloc(es * H * M * (N + 2 * C + 2 * V) + es * R);
  char *q_nope = buf, *lat = q_nope + es * H * M * N, *o_lat = lat + es * H * M * C;
  char *o_h = o_lat + es * H * M * C, *o = o_h + es * H * M * V, *qr = o + es * M * H * V;
  for (int h = 0; h < H; h++)
    for (int m = 0; m < M; m++)
      memcpy(q_nope + es * ((int64_t)h * M + m) * N,
             q + es * ((int64_t)m * q_stride + h * (N + R)), es * N);
  act_gemv(q_nope, (int64_t)M * N, w[2], s[2], lat, H, M, N, C, kind, bf16);
  float *qf = malloc(sizeof(float) * (H * CR + H * C + (int64_t)H * S));
  float *o_f = qf + H * CR, *p = o_f + H * C;
  for (int m = 0; m < M; m++) {
    for (int h = 0; h < H; h++) {
      const char *qh = q + es * ((int64_t)m * q_stride + h * (N + R) + N);
      rope_one(qh, cos + m * R / 2, sin + m * R / 2, qr, R, bf16);
      for (int c = 0; c < C; c++)
        qf[h * CR + c] = get_act(lat, ((int64_t)h * M + m) * C + c, bf16);
      for (int r = 0; r < R; r++) qf[h * CR + C + r] = get_act(qr, r, bf16);
    }
    const char *kv = (const char *)cache + es * (m / T) * row_stride;
    latent_attention(qf, kv, bf16, start[m / T] + m % T + 1, H, C, R, scale, p, o_f);
    for (int h = 0; h < H; h++) /* rounded once, as the reference's o_lat */
      for (int c = 0; c < C; c++) store(o_lat, ((int64_t)h * M + m) * C + c, o_f[h * C + c], bf16);
  }
  act_gemv(o_lat, (int64_t)M * C, w[3], s[3], o_h, H, M, C, V, kind, bf16);
  for (int m = 0; m < M; m++)
    for (int h = 0; h < H; h++)
      memcpy(o + es * ((int64_t)m * H + h) * V, o_h + es * ((int64_t)h * M + m) * V, es * V);
  act_gemv(o, 0, w[4], s[4], out, 1, M, H * V, D, kind, bf16);
  free(a);
  free(qn);
  free(buf);
  free(qf);
}
/* What `nanoseek_layer_decode` needs of one decoder layer, made once per set of weights
 * (nanoseek/infer/native.py `LayerPlan` mirrors it field by field) */
typedef struct {
  const void *ln1, *ln2; /* input_layernorm, post_attention_layernorm weights */
  float eps1, eps2;
  const void *mla_w[5]; /* nanoseek_mla_decode's w, s, norms, eps, scale and dims */
  const uint16_t *mla_s[5];
  const void *q_norm, *kv_norm;
  float eps_q, eps_kv, scale;
  int D, QL, H, N, R, C, V;
  const void *sw1, *sw2; /* the dense FFN or the shared experts, one expert of width SF */
  const uint16_t *ss1, *ss2;
  int SF; /* 0: no shared experts */
  const void *ew1, *ew2; /* the routed experts [E, 2 EF, D], [E, D, EF] */
  const uint16_t *es1, *es2;
  int EF; /* 0: a dense layer */
  const void *gate; /* the router, as nanoseek_route takes it */
  const float *gate_bias;
  float route_scale;
  int E, n_group, topk_group, K, softmax, method, norm, gate_bf16;
  int kind, bf16; /* the weights' kind (fp32 activations for int8), the model's dtype */
} layer_plan;

/* y = a + b over n values of the model's dtype (bf16: added in fp32, rounded once, as
 * PyTorch's bf16 add) */
static void add_rows(const void *a, const void *b, void *y, int64_t n, int bf16) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    store16(y, i, m, _mm512_add_ps(load16(a, i, m, bf16), load16(b, i, m, bf16)), bf16);
  }
}

/* A decoder layer [V3 §2.1] for T new tokens in each of B rows, in one call: nanoseek/model/
 * block.py `DecoderLayer.decode` (the reference; the same native calls it makes, in its order,
 * so the same bits):
 *   h = x + MLA(norm1(x))                       (nanoseek_mla_decode over the rows' caches)
 *   out = h + FFN(norm2(h))                     (a dense SwiGLU, or [V3 eq. 12]: the shared
 *        experts, then each token's routed experts, one token at a time for up to 2 tokens and
 *        grouped by expert for more, added in their order of choice)
 * With last_only, out [B, D] holds each row's last token alone (its FFN the only one run: the MTP
 * module catching up on positions whose cache entries it needs). Weights of the `kind` (int8
 * with a bf16 model: its activations widened to fp32 for the FFN kernels, as their Python
 * bindings do); x and out [B T, D] of the model's dtype; cos, sin, cache, row_stride, start as
 * nanoseek_mla_decode's. */
void nanoseek_layer_decode(const layer_plan *p, const void *x, void *out, const float *cos,
                           const float *sin, void *cache, int64_t row_stride, const int *start,
                           int B, int T, int last_only) {
  int M = B * T;
  const int D = p->D, bf16 = p->bf16;
  const size_t es = bf16 ? 2 : 4, rows = (size_t)M * D;
  char *h = malloc(es * rows), *a = malloc(es * rows), *y = calloc(rows, es);
  nanoseek_rmsnorm(x, p->ln1, h, M, D, p->eps1, bf16);
  nanoseek_mla_decode(h, p->mla_w, p->mla_s, p->q_norm, p->kv_norm, p->eps_q, p->eps_kv, cos, sin,
                      cache, row_stride, start, p->scale, a, B, T, D, p->QL, p->H, p->N, p->R,
                      p->C, p->V, p->kind, bf16);
  add_rows(x, a, out, rows, bf16); /* out holds the residual stream until the FFN is added */
  if (last_only && T > 1) { /* each row's last token only, moved to out's first B rows */
    for (int b = 0; b < B; b++)
      memmove((char *)out + es * b * D, (char *)out + es * ((int64_t)b * T + T - 1) * D, es * D);
    M = B;
  }
  nanoseek_rmsnorm(out, p->ln2, h, M, D, p->eps2, bf16);
  const int64_t one = 0;
  const float unit = 1.f;
  /* the FFN kernels' input: int8 takes fp32 activations (a bf16 model's widened, exactly) */
  float *hf = p->kind == W_Q8 && bf16 ? malloc(sizeof(float) * M * D) : NULL;
  if (hf)
    for (size_t i = 0; i < (size_t)M * D; i++) hf[i] = bf16_to_float(((const uint16_t *)h)[i]);
  const char *hx = hf ? (const char *)hf : h;
  const size_t xs = hf ? sizeof(float) : es;
  if (p->SF)
    nanoseek_experts_ffn(hx, p->sw1, p->ss1, p->sw2, p->ss2, &one, &unit, y, 1, M, D, p->SF,
                         p->kind, bf16);
  if (p->EF) {
    float *gates = malloc(sizeof(float) * M * p->K);
    int64_t *ids = malloc(sizeof(int64_t) * M * p->K);
    nanoseek_route(h, p->gate, p->gate_bias, gates, ids, M, D, p->E, p->n_group, p->topk_group,
                   p->K, p->softmax, p->method, p->norm, p->route_scale, bf16, p->gate_bf16);
    if (M <= 2) /* MoE.forward_few: per token */
      for (int n = 0; n < M; n++)
        nanoseek_experts_ffn(hx + xs * n * D, p->ew1, p->es1, p->ew2, p->es2, ids + n * p->K,
                             gates + n * p->K, y + es * n * D, p->K, 1, D, p->EF, p->kind, bf16);
    else
      nanoseek_experts_grouped(hx, p->ew1, p->es1, p->ew2, p->es2, ids, gates, y, M, p->K, D,
                               p->EF, p->kind, bf16);
    free(gates);
    free(ids);
  }
  add_rows(out, y, out, (int64_t)M * D, bf16);
  free(hf);
  free(h);
  free(a);
  free(y);
}
#else
/* another CPU or compiler: nanoseek keeps PyTorch's kernels */
int nanoseek_gemv_supported(void) { return 0; }
#endif
