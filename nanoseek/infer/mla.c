/* MLA at decode time in one native call (nanoseek/infer/native.py binds it; nanoseek/model/
 * mla.py `MLA.decode` is the reference): a few tokens' projections, norms, rope, cache write,
 * absorbed attention over each row's latent cache (a few rows' keys split between the threads,
 * many rows themselves shared out) and o_proj. */
#include "native.h"

#ifdef NANOSEEK_KERNELS

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
      float dot[4][4]; /* all 16 reduced at once */
      reduce_4x4(acc, dot);
      for (int j = 0; j < nh; j++)
        for (int i = 0; i < nk; i++) p[(int64_t)(h0 + j) * S + s + i] = dot[j][i] * scale;
    }
  }
  for (int h = 0; h < H; h++) { /* e^(score - the share's max), and their sum */
    float *r = p + (int64_t)h * S;
    __m512 tops = _mm512_set1_ps(-INFINITY); /* (a maximum is the same in any order) */
    for (int s = s0; s < s1; s += 16)
      tops = _mm512_max_ps(tops, _mm512_mask_loadu_ps(tops, lanes(s - s0, s1 - s0), r + s));
    const float top = _mm512_reduce_max_ps(tops);
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

/* The T shares' results (part: T blocks of `per` = [max H, sum H, o H x C]) of head h combined:
 * each share rescaled to the overall maximum, o [H, C] row h = their weighted sum / total */
static void combine_shares(const float *part, int per, int T, int h, int H, int C, float *o) {
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

static void share_of(const float *q, const void *kv, int bf16, int S, int H, int C, int R,
                     float scale, float *p, float *part, int t, int T) {
  float *mx = part + (int64_t)t * H * (2 + C), *sm = mx + H, *op = sm + H;
  if (bf16)
    attention_share(q, kv, 1, S, H, C, R, scale, p, mx, sm, op, t, T);
  else
    attention_share(q, kv, 0, S, H, C, R, scale, p, mx, sm, op, t, T);
}

/* How a token's keys are split into shares depends on their number and the layer's shape
 * alone, so its bits depend neither on the threads nor on the batch: shares of about
 * SHARE_WORK / (H (C + R)) keys (16-128: the speedrun model's 4 x 48 take 128 a share, a
 * 16 x 576 layer 16, so that a few hundred keys still split between the threads), at most
 * MAX_SHARES. */
#define SHARE_WORK (128 * 192)
#define MAX_SHARES 32

static int shares_of(int S, int H, int CR) {
  int keys = SHARE_WORK / (H * CR);
  keys = keys < 16 ? 16 : keys > 128 ? 128 : keys;
  const int T = (S + keys - 1) / keys;
  return T < 1 ? 1 : T > MAX_SHARES ? MAX_SHARES : T;
}

/* Absorbed attention of H query rows q [H, C+R] fp32 over keys 0..S-1 of one cache row kv
 * [S, C+R] (c_KV then k_rope; fp32 or bf16): p = softmax(scale * q . kv) per row, o [H, C] fp32
 * = p @ c_KV. The keys are split into `shares_of` shares, shared out between the threads
 * (each reads its share of the cache once, for every head), each keeps its own softmax maximum
 * and sum, and the shares are combined at the end, the heads split between the threads
 * (split-K, as flash-decoding does). With `serial` the calling thread computes all the shares
 * itself, in the same arithmetic: the same bits whether a step's rows share out their keys or
 * the rows themselves are shared out (`nanoseek_mla_decode`). p: [H, S] scratch; part:
 * shares_of(S, H, C + R) H (2 + C) scratch. */
static void latent_attention(const float *q, const void *kv, int bf16, int S, int H, int C, int R,
                             float scale, float *p, float *part, int serial, float *o) {
  const int per = H * (2 + C), T = shares_of(S, H, C + R); /* a share: max, sum, o [H, C] */
  if (serial || T == 1) {
    for (int t = 0; t < T; t++) share_of(q, kv, bf16, S, H, C, R, scale, p, part, t, T);
    for (int h = 0; h < H; h++) combine_shares(part, per, T, h, H, C, o);
    return;
  }
#pragma omp parallel
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    for (int u = t; u < T; u += nt) share_of(q, kv, bf16, S, H, C, R, scale, p, part, u, T);
#pragma omp barrier
    for (int h = t; h < H; h += nt) combine_shares(part, per, T, h, H, C, o);
  }
}

/* Token m's absorbed attention (of M = B T tokens; `nanoseek_mla_decode`'s q, lat, cos, sin,
 * cache, row_stride and start): its query latents and roped query, `latent_attention` over
 * its row's cache (`serial`: all its shares on this thread), o_lat [H, M, C] row m rounded
 * once to the model's dtype, as the reference's. f: H (C+R) + H C + H S + the shares' floats
 * of scratch. */
static void attend_token(int m, const char *q, int q_stride, const char *lat, const float *cos,
                         const float *sin, const void *cache, int64_t row_stride,
                         const int *start, float scale, char *o_lat, float *f, int serial, int M,
                         int T, int H, int N, int R, int C, int bf16) {
  const int CR = C + R, S = start[m / T] + m % T + 1;
  const size_t es = bf16 ? 2 : 4;
  float *qf = f, *o_f = qf + H * CR, *p = o_f + H * C, *part = p + (int64_t)H * S;
  float qr[R]; /* one head's roped query in the model's dtype (bf16: the first half) */
  for (int h = 0; h < H; h++) {
    const char *qh = q + es * ((int64_t)m * q_stride + h * (N + R) + N);
    rope_one(qh, cos + (int64_t)m * R / 2, sin + (int64_t)m * R / 2, qr, R, bf16);
    for (int c = 0; c < C; c++) qf[h * CR + c] = get_act(lat, ((int64_t)h * M + m) * C + c, bf16);
    for (int r = 0; r < R; r++) qf[h * CR + C + r] = get_act(qr, r, bf16);
  }
  const char *kv = (const char *)cache + es * (m / T) * row_stride;
  latent_attention(qf, kv, bf16, S, H, C, R, scale, p, part, serial, o_f);
  for (int h = 0; h < H; h++)
    for (int c = 0; c < C; c++) store(o_lat, ((int64_t)h * M + m) * C + c, o_f[h * C + c], bf16);
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
#pragma omp parallel for schedule(static) if ((int64_t)M * A >= PAR_MIN)
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
#pragma omp parallel for schedule(static) if ((int64_t)M * QL >= PAR_MIN)
    for (int m = 0; m < M; m++)
      nanoseek_rmsnorm(a + es * m * A, q_norm, qn + es * m * QL, 1, QL, eps_q, bf16);
    q = qn + es * M * QL;
    act_gemv(qn, 0, w[1], s[1], q, 1, M, QL, QH, kind, bf16);
    q_stride = QH;
  }
  /* [H, M, N] queries (nope), [H, M, C] their latents, [H, M, C] o_lat, [H, M, V], [M, H V] */
  char *buf = malloc(es * H * M * (N + 2 * C + 2 * V));
  char *q_nope = buf, *lat = q_nope + es * H * M * N, *o_lat = lat + es * H * M * C;
  char *o_h = o_lat + es * H * M * C, *o = o_h + es * H * M * V;
  for (int h = 0; h < H; h++)
    for (int m = 0; m < M; m++)
      memcpy(q_nope + es * ((int64_t)h * M + m) * N,
             q + es * ((int64_t)m * q_stride + h * (N + R)), es * N);
  act_gemv(q_nope, (int64_t)M * N, w[2], s[2], lat, H, M, N, C, kind, bf16);
  /* each token's attention: its keys shared out between the threads for a few tokens, the
   * tokens themselves for more (each computing all its shares: the same bits either way). Two
   * loops, not one in a conditional parallel region: a parallel region inside an inactive one
   * gets threads of its own beside the spinning pool's, which cost a 1-row step of the 803M
   * model 2-3x. */
  const int64_t scratch = H * CR + H * C + (int64_t)H * S + shares_of(S, H, CR) * H * (2 + C);
  if (M >= 2 * omp_get_max_threads()) {
#pragma omp parallel
    {
      float *f = malloc(sizeof(float) * scratch);
#pragma omp for schedule(dynamic)
      for (int m = 0; m < M; m++)
        attend_token(m, q, q_stride, lat, cos, sin, cache, row_stride, start, scale, o_lat, f, 1,
                     M, T, H, N, R, C, bf16);
      free(f);
    }
  } else {
    float *f = malloc(sizeof(float) * scratch);
    for (int m = 0; m < M; m++)
      attend_token(m, q, q_stride, lat, cos, sin, cache, row_stride, start, scale, o_lat, f, 0, M,
                   T, H, N, R, C, bf16);
    free(f);
  }
  act_gemv(o_lat, (int64_t)M * C, w[3], s[3], o_h, H, M, C, V, kind, bf16);
  for (int m = 0; m < M; m++)
    for (int h = 0; h < H; h++)
      memcpy(o + es * ((int64_t)m * H + h) * V, o_h + es * ((int64_t)h * M + m) * V, es * V);
  act_gemv(o, 0, w[4], s[4], out, 1, M, H * V, D, kind, bf16);
  free(a);
  free(qn);
  free(buf);
}
#endif
