/* A whole decoder layer of a decode or verify step in one native call (nanoseek/infer/
 * native.py binds it; nanoseek/model/block.py `DecoderLayer.decode` is the reference). */
#include "native.h"

#ifdef NANOSEEK_KERNELS

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
  int64_t bytes; /* of all the weights above */
} layer_plan;

/* y = a + b over n values of the model's dtype (bf16: added in fp32, rounded once, as
 * PyTorch's bf16 add) */
static void add_rows(const void *a, const void *b, void *y, int64_t n, int bf16) {
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    store16(y, i, m, _mm512_add_ps(load16(a, i, m, bf16), load16(b, i, m, bf16)), bf16);
  }
}

/* A decoder layer [V3 §2.1] for T new tokens in each of B rows (`nanoseek_layer_decode` shares
 * them out between the threads or not; this runs them with the threads it has): nanoseek/model/
 * block.py `DecoderLayer.decode` (the reference; the same native calls it makes, in its order,
 * so the same bits):
 *   h = x + MLA(norm1(x))                       (nanoseek_mla_decode over the rows' caches)
 *   out = h + FFN(norm2(h))                     (a dense SwiGLU, or [V3 eq. 12]: the shared
 *        experts, then the routed experts: one token's K in order, or for more tokens each
 *        chosen expert once for its rows, added in each token's order of choice)
 * With last_only, out [B, D] holds each row's last token alone (its FFN the only one run: the MTP
 * module catching up on positions whose cache entries it needs). Weights of the `kind` (int8
 * with a bf16 model: its activations widened to fp32 for the FFN kernels, as their Python
 * bindings do); x and out [B T, D] of the model's dtype; cos, sin, cache, row_stride, start as
 * nanoseek_mla_decode's. */
static void layer_rows(const layer_plan *p, const void *x, void *out, const float *cos,
                       const float *sin, void *cache, int64_t row_stride, const int *start, int B,
                       int T, int last_only) {
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
  if (p->SF)
    nanoseek_experts_ffn(hx, p->sw1, p->ss1, p->sw2, p->ss2, &one, &unit, y, 1, M, D, p->SF,
                         p->kind, bf16);
  if (p->EF) {
    float *gates = malloc(sizeof(float) * M * p->K);
    int64_t *ids = malloc(sizeof(int64_t) * M * p->K);
    nanoseek_route(h, p->gate, p->gate_bias, gates, ids, M, D, p->E, p->n_group, p->topk_group,
                   p->K, p->softmax, p->method, p->norm, p->route_scale, bf16, p->gate_bf16);
    if (M == 1) /* MoE.forward_few: one token's K experts */
      nanoseek_experts_ffn(hx, p->ew1, p->es1, p->ew2, p->es2, ids, gates, y, p->K, 1, D, p->EF,
                           p->kind, bf16);
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

/* `layer_rows` for the B rows, shared out between the threads by rows for a layer of at most
 * SPLIT_BYTES of weights and a step of at least 4 rows a thread: each thread runs the whole
 * layer on its rows alone (no barrier inside it; each reads the weights from the caches: the
 * speedrun model's layers hold 0.8-1.1 MB). Larger layers share out each product's output
 * rows instead, so that each weight is read from memory once. A row's numbers are the same
 * either way. */
#define SPLIT_BYTES (8 << 20)

void nanoseek_layer_decode(const layer_plan *p, const void *x, void *out, const float *cos,
                           const float *sin, void *cache, int64_t row_stride, const int *start,
                           int B, int T, int last_only) {
  const int nt = omp_get_max_threads();
  if (nt == 1 || B < 4 * nt || (last_only && T > 1) || p->bytes > SPLIT_BYTES) {
    layer_rows(p, x, out, cos, sin, cache, row_stride, start, B, T, last_only);
    return;
  }
  const size_t es = p->bf16 ? 2 : 4;
#pragma omp parallel
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const int b0 = (int)((int64_t)B * t / n), b1 = (int)((int64_t)B * (t + 1) / n);
    omp_set_num_threads(1); /* the calls below: this thread alone (this region's setting) */
    const int64_t m0 = (int64_t)b0 * T; /* the first token of the thread's rows */
    if (b1 > b0)
      layer_rows(p, (const char *)x + es * m0 * p->D, (char *)out + es * m0 * p->D,
                 cos + m0 * (p->R / 2), sin + m0 * (p->R / 2), (char *)cache + es * b0 * row_stride,
                 row_stride, start + b0, b1 - b0, T, 0);
  }
}
#endif
