/* Native GEMV kernels for decoding on x86 CPUs with AVX-512 (BF16 and VNNI), built on first use
 * by nanoseek/infer/native.py with the system C compiler and called through ctypes.
 *
 * Shape legend: G matrices, M activation rows (a few: decode, verify), K in, O out features.
 *
 *   y[g, m, o] = sum_k x[g, m, k] * W_g[o, k]          (W_g matrix g, or ids[g], of w [E, O, K])
 *
 * Decoding reads every weight once per step, so these stream W once and keep the M activation
 * rows in L1: each weight vector is loaded (and widened) once for up to 4 activation rows. A few
 * activation rows (a decode or verify step) read W row after row, one stream through memory
 * that the hardware prefetchers follow; more rows take 4 x 4 tiles, four output rows sharing
 * each activation load, where arithmetic rather than memory sets the pace.
 * - bf16: one vdpbf16ps multiplies 32 bf16 pairs and accumulates in fp32 (the rounding of a
 *   bf16 GEMM with fp32 accumulation, as PyTorch's).
 * - q8: the weights int8 with one scale per output row; the activations are quantised here to
 *   int16 with one scale per row (~15 bits: as exact as fp32 next to the weights' int8), and
 *   one vpdpwssd multiplies 32 int16 pairs into int32, the int8 weights widened on the fly.
 * - fp32 (an fp32 model's own weights): vfmadd of 16 fp32 pairs; the sums are added in another
 *   order than MKL's, so results differ from PyTorch's in the last bits.
 * Matrices of G in one call: the heads of MLA's absorbed attention, or the chosen experts.
 * Here also RMSNorm and a token's gate-weighted sum of its experts; in moe.c the router and a
 * few tokens' SwiGLU FFNs, in mla.c a few tokens' MLA over their latent cache rows, in layer.c
 * a whole decoder layer, each one call: PyTorch runs them as chains of operators, each slow
 * right after a kernel that streamed megabytes through the caches (~40 us a norm inside a
 * decode step).
 * Threads: OpenMP, which binds to the runtime torch already loaded (libgomp.so.1), so
 * torch.set_num_threads applies here too.
 */
#include "native.h"

#define ABI 13
int nanoseek_gemv_abi(void) { return ABI; }

#ifdef NANOSEEK_KERNELS
int nanoseek_gemv_supported(void) { return 1; }

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

/* sum[m][r] = the sum of acc[m][r]'s lanes for the tile's MT activation rows: one row's 4 sums
 * reduced one by one, more rows' all 16 at once (reduce_4x4: the same bits, fewer instructions) */
#define REDUCE_INTO(MT_, acc, sum)                                                   \
  if (MT_ >= 2)                                                                      \
    reduce_4x4(acc, sum);                                                            \
  else                                                                               \
    for (int r = 0; r < 4; r++) sum[0][r] = _mm512_reduce_add_ps(acc[0][r]);
#define REDUCE(MT_) REDUCE_INTO(MT_, acc, sum)

/* Up to 4 output rows (r0..r0+R) of one matrix against MT <= 4 activation rows: each weight
 * vector is loaded (and widened) once and used for all MT rows. */
#define TILE(MT_)                                                                                \
  static inline __attribute__((always_inline)) void tile_bf16_##MT_(                          \
      const uint16_t *x, const uint16_t *w, void *y, int64_t y0, int R, int K, int O,           \
      int out_bf16) {                                                                          \
    __m512 acc[4][4];                                                                          \
    for (int m = 0; m < 4; m++)                                                                \
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
    float sum[4][4];                                                                           \
    REDUCE(MT_)                                                                                \
    for (int m = 0; m < MT_; m++)                                                              \
      for (int r = 0; r < R; r++) store(y, y0 + (int64_t)m * O + r, sum[m][r], out_bf16);       \
  }                                                                                            \
  static inline __attribute__((always_inline)) void tile_f32_##MT_(                           \
      const float *x, const float *w, void *y, int64_t y0, int R, int K, int O, int out_bf16) {  \
    __m512 acc[4][4];                                                                          \
    for (int m = 0; m < 4; m++)                                                                \
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
    float sum[4][4];                                                                           \
    REDUCE(MT_)                                                                                \
    for (int m = 0; m < MT_; m++)                                                              \
      for (int r = 0; r < R; r++) store(y, y0 + (int64_t)m * O + r, sum[m][r], out_bf16);       \
  }                                                                                            \
  static inline __attribute__((always_inline)) void tile_q16_##MT_(                           \
      const int16_t *x, const float *sx, const int8_t *w, const uint16_t *scale, void *y,       \
      int64_t y0, int R, int K, int O, int out_bf16) {                                         \
    float sum[4][4] = {{0}};                                                                   \
    for (int k0 = 0; k0 < K; k0 += CHUNK) {                                                    \
      const int k1 = k0 + CHUNK < K ? k0 + CHUNK : K;                                          \
      __m512i acc[4][4];                                                                       \
      for (int m = 0; m < 4; m++)                                                              \
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
      __m512 accf[4][4];                                                                       \
      float part[4][4];                                                                        \
      for (int m = 0; m < 4; m++)                                                              \
        for (int r = 0; r < 4; r++) accf[m][r] = _mm512_cvtepi32_ps(acc[m][r]);                \
      REDUCE_INTO(MT_, accf, part)                                                             \
      for (int m = 0; m < MT_; m++)                                                            \
        for (int r = 0; r < R; r++) sum[m][r] += part[m][r];                                   \
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
/* q8: one weight row against MT <= 4 activation rows, its K bytes read in order, the rows of a
 * block one after another: one stream that the prefetchers follow (four int8 rows read side by
 * side streamed 25-45% slower, 1 and 2 threads, AMD EPYC, 2026-12-07).
 * U accumulators per activation row hide vpdpwssd's latency; they are added in int32 (exact),
 * so the sums are a single accumulator's. */
#define ROW_Q16(MT_, U_)                                                                         \
  static inline __attribute__((always_inline)) void row_q16_##MT_(                            \
      const int16_t *x, const float *sx, const int8_t *w, float scale, void *y, int64_t y0,     \
      int K, int O, int out_bf16) {                                                            \
    float sum[4] = {0};                                                                        \
    for (int k0 = 0; k0 < K; k0 += CHUNK) {                                                    \
      const int k1 = k0 + CHUNK < K ? k0 + CHUNK : K;                                          \
      __m512i acc[MT_][U_];                                                                    \
      for (int m = 0; m < MT_; m++)                                                            \
        for (int u = 0; u < U_; u++) acc[m][u] = _mm512_setzero_si512();                       \
      int k = k0;                                                                              \
      for (; k + 32 * U_ <= k1; k += 32 * U_)                                                  \
        for (int u = 0; u < U_; u++) {                                                         \
          const int ku = k + 32 * u;                                                           \
          if (!(ku & 63)) _mm_prefetch((const char *)(w + ku) + PF, _MM_HINT_T0);              \
          const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + ku))); \
          for (int m = 0; m < MT_; m++) {                                                      \
            const __m512i xv = _mm512_loadu_si512(x + (int64_t)m * K + ku);                    \
            acc[m][u] = _mm512_dpwssd_epi32(acc[m][u], xv, wv);                                \
          }                                                                                    \
        }                                                                                      \
      for (; k < k1; k += 32) {                                                                \
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k))); \
        for (int m = 0; m < MT_; m++) {                                                        \
          const __m512i xv = _mm512_loadu_si512(x + (int64_t)m * K + k);                       \
          acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], xv, wv);                                  \
        }                                                                                      \
      }                                                                                        \
      for (int m = 0; m < MT_; m++) {                                                          \
        __m512i a = acc[m][0];                                                                 \
        for (int u = 1; u < U_; u++) a = _mm512_add_epi32(a, acc[m][u]);                       \
        sum[m] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(a));                                 \
      }                                                                                        \
    }                                                                                          \
    for (int m = 0; m < MT_; m++)                                                              \
      store(y, y0 + (int64_t)m * O, sum[m] * sx[m] * scale, out_bf16);                         \
  }
ROW_Q16(1, 4)
ROW_Q16(2, 2)
ROW_Q16(3, 1)
ROW_Q16(4, 1)

/* F(NAME, MT) for the tile of MT = min(4, M - m) activation rows, MT a constant in each branch */
#define BY_TILE(F, NAME)               \
  switch (M - m < 4 ? M - m : 4) {     \
    case 1: F(NAME, 1) break;          \
    case 2: F(NAME, 2) break;          \
    case 3: F(NAME, 3) break;          \
    default: F(NAME, 4)                \
  }

/* one block of up to 4 output rows against all M activation rows, in tiles of 4 rows, for float
 * weights of type T (bf16 as uint16_t, fp32) and x of the same type; R a constant in each call,
 * so that the accumulators live in registers. Up to ROWWISE activation rows take the block's
 * rows one after another (R = 1 tiles: one stream through memory, as row_q16 below; 1.2-1.4x
 * the bandwidth of 4 rows side by side for 1-4 fp32 / 1-8 bf16 rows of 512-1024 values, AMD
 * EPYC, 2 threads, 2026-12-07), if they fit ROW_X_BYTES; more rows the 4 x 4 tiles, which load
 * less per product. A product's terms are added in the same order either way: the same bits. */
#define FLOAT_ROWS(NAME, MT_)                                                            \
  if (R == 4)                                                                            \
    tile_##NAME##_##MT_(xm, w, y, ym, 4, K, O, out_bf16);                                \
  else                                                                                   \
    for (int r = 0; r < R; r++)                                                          \
      tile_##NAME##_##MT_(xm, w + (int64_t)r * K, y, ym + r, 1, K, O, out_bf16);
#define ROW_TILES(NAME, MT_) tile_##NAME##_##MT_(xm, wr, y, ym, 1, K, O, out_bf16);
/* Row after row reads the activations once per weight row, so they must stay in L1 (32 KB on
 * Zen 4, 48 KB on Sapphire Rapids): 3 fp32 rows of 4096 (48 KB) streamed a dense MLP's down
 * projection at 31 GB/s row after row, at 39 in 4 x 4 tiles (AMD EPYC, 2 threads) */
#define ROW_X_BYTES (32 << 10)

/* whether M activation rows of K values of x_size bytes read the weights row after row */
static inline int row_after_row(int M, int K, int x_size, int max_rows) {
  return M <= max_rows && (int64_t)M * K * x_size <= ROW_X_BYTES;
}
#define FLOAT_BLOCK(NAME, T, ROWWISE)                                                      \
  void block_##NAME(const T *x, const T *w, void *y, int64_t y0, int R, int M, int K,      \
                    int O, int out_bf16) {                                                 \
    if (row_after_row(M, K, sizeof(T), ROWWISE)) {                                        \
      for (int r = 0; r < R; r++) {                                                        \
        const T *wr = w + (int64_t)r * K;                                                  \
        for (int m = 0; m < M; m += 4) {                                                   \
          const T *xm = x + (int64_t)m * K;                                                \
          const int64_t ym = y0 + (int64_t)m * O + r;                                      \
          BY_TILE(ROW_TILES, NAME)                                                         \
        }                                                                                  \
      }                                                                                    \
      return;                                                                              \
    }                                                                                      \
    for (int m = 0; m < M; m += 4) {                                                       \
      const T *xm = x + (int64_t)m * K;                                                    \
      const int64_t ym = y0 + (int64_t)m * O;                                              \
      BY_TILE(FLOAT_ROWS, NAME)                                                            \
    }                                                                                      \
  }
FLOAT_BLOCK(bf16, uint16_t, 8)
FLOAT_BLOCK(f32, float, 4)

/* q8 products of up to Q16_ROWWISE activation rows (within ROW_X_BYTES as int16) stream the
 * weights row by row (row_q16); more rows are bound by arithmetic, where 4 x 4 tiles widen and
 * load less per product (against row_q16: 1.4x faster at 32 rows, equal at 16, 1.5x slower at
 * 8; 2 threads, AMD EPYC, 2026-12-07). Both give the same bits. */
#define Q16_ROWWISE 8

void block_q16(const int16_t *x, const float *sx, const int8_t *w, const uint16_t *scale,
               void *y, int64_t y0, int R, int M, int K, int O, int out_bf16) {
  if (row_after_row(M, K, sizeof(int16_t), Q16_ROWWISE)) {
    for (int r = 0; r < R; r++) { /* a row's K bytes from memory once, from L1 for more tiles */
      const int8_t *wr = w + (int64_t)r * K;
      const float sr = bf16_to_float(scale[r]);
      for (int m = 0; m < M; m += 4) {
        const int16_t *xm = x + (int64_t)m * K;
        const int64_t ym = y0 + (int64_t)m * O + r;
#define ROWS(_, MT_) row_q16_##MT_(xm, sx + m, wr, sr, y, ym, K, O, out_bf16);
        BY_TILE(ROWS, q16)
#undef ROWS
      }
    }
    return;
  }
  for (int m = 0; m < M; m += 4) {
    const int16_t *xm = x + (int64_t)m * K;
    const int64_t ym = y0 + (int64_t)m * O;
#define ROWS(_, MT_)                                                                \
  if (R == 4)                                                                       \
    tile_q16_##MT_(xm, sx + m, w, scale, y, ym, 4, K, O, out_bf16);                 \
  else                                                                              \
    for (int r = 0; r < R; r++)                                                     \
      tile_q16_##MT_(xm, sx + m, w + (int64_t)r * K, scale + r, y, ym + r, 1, K, O, out_bf16);
    BY_TILE(ROWS, q16)
#undef ROWS
  }
}

/* x [G|1, M, K] (x_gstride 0: one x for every matrix) and w [E, O, K] both bf16 (gemv_bf16) or
 * both fp32 (gemv_f32: an fp32 model's own weights, nn.Linear's layout), of which matrix ids[g]
 * (ids NULL: matrix g) is multiplied; y [G, M, O] fp32 or bf16; K % 32 == 0 (fp32: 16) */
#define MATRIX(g) ((ids ? ids[g] : (int64_t)(g)) * O)
#define FLOAT_GEMV(NAME, T)                                                                   \
  void nanoseek_gemv_##NAME(const T *x, int64_t x_gstride, const T *w, const int64_t *ids,   \
                            void *y, int G, int M, int K, int O, int out_bf16) {              \
    const int blocks = (O + 3) / 4;                                                           \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t b = 0; b < (int64_t)G * blocks; b++) {                                       \
      const int g = (int)(b / blocks), o = (int)(b % blocks) * 4;                             \
      const int R = O - o < 4 ? O - o : 4;                                                    \
      block_##NAME(x + g * x_gstride, w + (MATRIX(g) + o) * K, y, (int64_t)g * M * O + o, R, M, \
                   K, O, out_bf16);                                                           \
    }                                                                                         \
  }
FLOAT_GEMV(bf16, uint16_t)
FLOAT_GEMV(f32, float)

/* one row of K fp32 activations as int16 with one scale (amax / 32767), rounded to nearest even
 * (vcvtps2dq under the default rounding, as lrintf), 16 lanes at a time: a scalar loop calling
 * libm's fmaxf and lrintf per value took 2.4% of a perf profile of the 803M model's int8
 * decoding (on one thread while the other waits), this 0.1% (AMD EPYC, 2026-12-07) */
void quantize_row(const float *x, int K, int16_t *q, float *scale) {
  __m512 vmax = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (; k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
  const float inv = amax > 0.f ? 32767.f / amax : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  for (k = 0; k + 16 <= K; k += 16) /* |x * inv| <= 32767: no saturation */
    _mm256_storeu_si256((__m256i *)(q + k),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(
                            _mm512_mul_ps(_mm512_loadu_ps(x + k), vinv))));
  for (; k < K; k++) q[k] = (int16_t)lrintf(x[k] * inv);
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

/* y [G, M, O] (fp32, or bf16 if out_bf16) = x @ W^T through the kind's kernel, x as it takes it */
void gemv_kind(int kind, const void *x, int64_t xs, const void *w, const uint16_t *s,
                      const int64_t *ids, void *y, int G, int M, int K, int O, int out_bf16) {
  if (kind == W_Q8)
    nanoseek_gemv_q8(x, xs, w, s, ids, y, G, M, K, O, out_bf16);
  else if (kind == W_F32)
    nanoseek_gemv_f32(x, xs, w, ids, y, G, M, K, O, out_bf16);
  else
    nanoseek_gemv_bf16(x, xs, w, ids, y, G, M, K, O, out_bf16);
}

/* RMSNorm of `rows` rows of D: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32. fp32:
 * (x * rstd) * w, F.rms_norm's order. bf16 (x, w, y all bf16): x * rstd rounded to bf16, then
 * times w rounded again, the order of nanoseek's RMSNorm and transformers' for bf16. The sum of
 * squares is added in another order than PyTorch's, so results may differ in the last bit. */
void nanoseek_rmsnorm(const void *x, const void *w, void *y, int64_t rows, int D, float eps,
                      int bf16) {
#pragma omp parallel for schedule(static) if (rows * D >= PAR_MIN)
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
void combine_rows(const float *h, int64_t stride, const float *gates, void *acc, int G,
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
#else
/* another CPU or compiler: nanoseek keeps PyTorch's kernels */
int nanoseek_gemv_supported(void) { return 0; }
#endif
