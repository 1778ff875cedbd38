/* DeepSeekMoE at decode time, each piece in one native call (nanoseek/infer/native.py binds
 * them; nanoseek/model/weights.py and router.py hold the references): a few tokens' SwiGLU FFNs
 * through the same experts, a few tokens through their chosen experts with each expert read
 * once, and the router. */
#include "native.h"

#ifdef NANOSEEK_KERNELS

/* M tokens through the same chosen experts' SwiGLU FFNs, added to their outputs [V3 eq. 12]
 * (one token's routed experts: M = 1; a dense FFN or the shared experts of a few tokens: one
 * expert of gate 1): out[m, D] += sum_k gates[k] * W2_e (silu(W1g_e x_m) * W1u_e x_m),
 * e = ids[k], k in order. x [M, D]; w1 [E, 2F, D] (each expert's gate rows, then its up rows),
 * w2 [E, D, F] of the `kind`: bf16 rows (x bf16), int8 with bf16 scales s1 [E, 2F], s2 [E, D]
 * (x fp32) or fp32 rows (x fp32). The gate/up products and silu(g) * u stay fp32 (rounded to
 * bf16 once for the bf16 kernel's input); out fp32 or bf16. D % 32 == 0 == F % 32 (fp32: 16).
 * nanoseek/model/weights.py `experts_ffn` and `swiglu` (three calls and two operators) are the
 * references. */
void nanoseek_experts_ffn(const void *x, const void *w1, const uint16_t *s1, const void *w2,
                          const uint16_t *s2, const int64_t *ids, const float *gates, void *out,
                          int K, int M, int D, int F, int kind, int out_bf16) {
  const int64_t KM = (int64_t)K * M;
  float *h = malloc(sizeof(float) * KM * 2 * F), *y = malloc(sizeof(float) * KM * D);
  void *a = malloc(sizeof(float) * KM * F); /* [K, M, F] fp32, or bf16 for bf16 weights */
  gemv_kind(kind, x, 0, w1, s1, ids, h, K, M, D, 2 * F, 0);
#pragma omp parallel for schedule(static) if (KM * F >= PAR_MIN)
  for (int64_t km = 0; km < KM; km++)
    for (int j = 0; j < F; j += 16) {
      const __mmask16 m = lanes(j, F);
      const __m512 g = _mm512_maskz_loadu_ps(m, h + km * 2 * F + j);
      const __m512 u = _mm512_maskz_loadu_ps(m, h + km * 2 * F + F + j);
      store16(a, km * F + j, m, silu_mul(g, u), kind == W_BF16);
    }
  gemv_kind(kind, a, (int64_t)M * F, w2, s2, ids, y, K, M, F, D, 0);
  const size_t es = out_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if ((int64_t)M * K * D >= PAR_MIN)
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
#pragma omp parallel for schedule(static) if ((int64_t)NK * D >= PAR_MIN)
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
#pragma omp parallel for schedule(static) if ((int64_t)NK * F >= PAR_MIN)
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
#pragma omp parallel for schedule(static) if ((int64_t)NK * D >= PAR_MIN)
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
#endif
