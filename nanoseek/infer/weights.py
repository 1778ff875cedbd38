"""Decode-time weight layouts: the `weights` object the model's forward multiplies with when
the engine decodes (nanoseek/model/weights.py has the interface and the modules' own layout).

Shape legend: H heads, N nope head dim, C kv latent rank, V value head dim, E experts.

Decoding a few tokens on CPU is bound by reading weights and by per-kernel overhead, so the
engine keeps the matrices a decode step multiplies in the layout that streams fastest:
- where the native kernels run (nanoseek/infer/native.py: x86-64 with AVX-512 BF16 / VNNI),
  nn.Linear's own [out, in] rows, views with no copies: the kernels stream them, and up to
  FEW_TOKENS rows of a step (an fp32 model's up to native.F32_ROWS: a rollout's batch) run a
  layer in one call, in fp32, bf16 or int8;
- for fp32 decoding through PyTorch's operators (`exact` engines, or no native kernels) one
  row at a time, every matrix as a contiguous W^T [in, out] copy: MKL
  streams it up to 1.4x faster than the [out, in] layout F.linear reads (the head; 1.0-1.2x for
  expert-sized matrices, `python bench/gemv.py`) once weights fall out of cache, which they do
  every step. For 2-3 rows (a speculative verify step) the [out, in] layout streams up to 2x
  faster (`bench/gemv.py --rows 2 --shapes big`), and for bf16 at any row count up to 1.9x
  (one or two bf16 rows go through the native kernel, nanoseek/infer/native.py, or torch.mv;
  Intel Xeon, 2026-12-07), so there the runner keeps nn.Linear's layout (`transpose=False`:
  views, no copies); so does a GPU;
- projections of the same input (q_a and kv_a, gate and up) as one W^T of their concatenation:
  one GEMM instead of several;
- MLA's absorbed weights W_UK [H,N,C] and W_UV^T [H,C,V] as contiguous copies: views of
  kv_b_proj would be copied by every batched matmul of every step. Where the native kernels
  (nanoseek/infer/native.py) run, bf16 copies are kept as per-head rows ([H,C,N], [H,V,C]:
  the layout those kernels stream) and int8 engines quantise them too;
- or, with `quantize="int8"`, weight-only int8 copies of the projections, experts and head
  (nanoseek/infer/quant.py).
Entries are made on first use and re-made when a weight changes (`refresh`, keyed on the
tensor's storage and version counter, checked at every prefill: a request decodes with the
weights it was admitted with), so an optimizer step is seen by the next generate call (GRPO
rollouts rely on it). They cost one extra copy of those weights (`nbytes`), nothing
for the views.

`exact=True` keeps fp32 decoding in PyTorch's operators (`_fusable`): the bits of a machine
without the native kernels. The native fp32 path computes the same maths with the sums in other
orders (logits ~1e-6 relative apart, tests/infer/test_mla_decode.py), and a row's results there
depend neither on the other rows nor on the threads (tests/infer/test_layer_decode.py): the
training stack's rollouts and evaluations decode through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanoseek.infer import native
from nanoseek.infer.quant import QUANTIZE, Int8Weight, bf16_kernels, bmm, f32_kernels, mm
from nanoseek.model.moe import MoE
from nanoseek.model.weights import combine, experts_ffn, grouped_experts_ffn, swiglu

# tokens `decoder_layer`, `mla_decode` and `swiglu` take in one native call: a decode step of
# up to 8 rows, a verify step (a few tokens of a row); an fp32 model's up to native.F32_ROWS
FEW_TOKENS = native.MAX_ROWS
MAX_ROUTED = 4096  # routed experts the native router takes (its scores live on the C stack)


@dataclass
class _Entry:
    weights: tuple[torch.Tensor, ...]  # the module weights it was made from
    kind: str  # "t": W^T (fused when several) or int8; "absorbed": MLA's W_UK, W_UV^T
    mla: nn.Module | None = None
    key: tuple | None = None  # (storage, version) of each weight when it was made
    value: object = None  # the copy (or view)
    split: list | None = None  # per-expert pieces of a stacked expert weight
    frozen: bool = False  # given, not made: its module weights live on the meta device


@dataclass
class _MLAPlan:
    """What `DecodeWeights.mla_decode` passes for one MLA module: `mats()` gives the five
    (weight rows, scales) pairs from the current entries; `args` their C pointers, made when
    `made` (DecodeWeights._made at the time) falls behind."""

    mats: object
    norms: tuple
    dims: tuple
    kind: int  # native.BF16, Q8 or F32
    dtype: torch.dtype
    args: tuple | None = None
    made: int = -1


@dataclass
class _LayerPlan:
    """What `DecodeWeights.decoder_layer` passes for one decoder layer: `build()` gives the
    (native.LayerPlan, the tensors it points into) from the current entries; `args` that, made
    when `made` (DecodeWeights._made at the time) falls behind."""

    kernels: object
    build: object
    args: tuple | None = None
    made: int = -1


class DecodeWeights:
    """Copies of the weights in the decode layout; see the module docstring."""

    def __init__(self, transpose: bool, quantize: str | None = None, exact: bool = False):
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        if exact and quantize:
            raise ValueError(f"exact decoding takes no quantize (got {quantize!r})")
        self.transpose, self.quantize, self.exact = transpose, quantize, exact
        # ATen's int8 kernel takes bf16 activations: the experts' input is cast once per layer
        self.expert_dtype = torch.bfloat16 if quantize and native.kernels() is None else None
        self._entries: dict[tuple, _Entry] = {}
        # modules -> (their weights, split sizes, biases), MLA -> its kv_b_proj weight: modules
        # hash by identity, and their parameters are updated in place (optimizer steps,
        # load_state_dict), so what a module holds is looked up once
        self._plans: dict[tuple, tuple] = {}
        # False when the modules hold no weights of their own (a model streamed into int8,
        # nanoseek/infer/streamed.py): every forward, prefill included, multiplies through here
        self.modules_hold_weights = True
        self._made = 0  # entries made so far: cached pointers into them are stale when it moves

    def put(self, weight: torch.Tensor, value: Int8Weight) -> None:
        """Give the int8 copy of a module weight that lives on the meta device."""
        self._entries[("t", id(weight))] = _Entry((weight,), "t", value=value, frozen=True)
        self.modules_hold_weights = False

    # ------------------------------------------------------------------ the weights interface
    def few_tokens(self, x: torch.Tensor) -> int:
        """The tokens of x the native calls take, or 0 where they do not run: a decode step of
        that many rows takes `MoE.forward_few`, whose pieces they run."""
        return self._rows(x) if self._fusable(x) and native.kernels_for(x) is not None else 0

    def linear(self, x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
        """Each module's output for input x [...,in], from one GEMM over their fused W^T."""
        weights, sizes, biases = self._plan(modules)
        y = self.mm(x, self._entry("t", *weights).value)  # [..., sum of outs]
        if sizes is None:
            return (y if biases[0] is None else y + biases[0],)
        outs = y.split_with_sizes(sizes, dim=-1)  # (not Tensor.split: a Python wrapper)
        return tuple(o if b is None else o + b for o, b in zip(outs, biases))

    def experts(self, param: torch.Tensor) -> list:
        """The E experts' W^T (or Int8Weight) of a stacked [E, out, in] weight, split once per
        refresh (indexing a tensor per expert per step is an operator call each)."""
        entry = self._entry("t", param)
        if entry.split is None:
            entry.split = [entry.value[e] for e in range(param.shape[0])]
        return entry.split

    def mm(self, x: torch.Tensor, w) -> torch.Tensor:
        """x @ W^T for a decode weight (quant.py `mm`); up to native.F32_ROWS fp32 rows against
        fp32 rows (nn.Linear's layout) through the native kernel, unless exact."""
        if (kernels := self._f32_kernels(x, w, 0)) is not None:
            return kernels.f32(x, w.transpose(-1, -2))
        return mm(x, w)

    def bmm(self, x: torch.Tensor, w) -> torch.Tensor:
        """x [G, N, K] @ W_g^T per matrix g (quant.py `bmm`); fp32 as `mm`."""
        if (kernels := self._f32_kernels(x, w, 1)) is not None:
            return kernels.f32(x, w.transpose(-1, -2))
        return bmm(x, w)

    def _f32_kernels(self, x: torch.Tensor, w, rows_dim: int) -> native.Kernels | None:
        """The native kernels where fp32 x (at most native.F32_ROWS rows along `rows_dim`, the
        matrices before it) goes through them against the fp32 rows of the decode weight w
        (W^T a view of contiguous rows, in K a multiple of 16); else None (exact engines)."""
        if self.exact or x.dtype != torch.float32 or not isinstance(w, torch.Tensor):
            return None
        rows = x.numel() // x.shape[-1] // (x.shape[0] if rows_dim else 1)
        return f32_kernels(x, w.transpose(-1, -2)) if rows <= native.F32_ROWS else None

    def experts_mm(self, x: torch.Tensor, param: torch.Tensor, ids: list[int],
                   gates: list[float] | None = None, out: torch.Tensor | None = None):  # fmt: skip
        """x [in] (shared) or [K, in] (row i for expert ids[i]) through experts `ids` of a
        stacked [E, out, in] weight -> [K, out], or with `gates` their weighted sum added to
        out (the interface's `experts_mm`): one native call for all K where it runs (one token's
        experts at decode) and one more for the sum, else one `mm` per expert and the modules'
        sum."""
        value = self._entry("t", param).value
        # the sum is taken from fp32 products
        found = _native_experts(x, value, ids, x.dtype if gates is None else torch.float32,
                                not self.exact)  # fmt: skip
        if found is None:
            split = self.experts(param)
            h = torch.stack([self.mm(x if x.dim() == 1 else x[i], split[e])
                             for i, e in enumerate(ids)])  # fmt: skip
            return h if gates is None else combine(h, gates, out)
        kernels, h = found
        if gates is None:
            return h
        if out.dtype in native.DTYPES and out.is_contiguous():
            return kernels.combine(h, gates, out)
        return combine(h.to(out.dtype), gates, out)

    def experts_ffn(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    ids: list[int], gates: list[float], out: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """One token through experts `ids` as SwiGLU FFNs, their gate-weighted sum added to out
        (the interface's `experts_ffn`). Where the native kernels run for both weights (int8,
        bf16 rows and a bf16 x, fp32 rows and an fp32 x), one native call: the two products,
        silu(g) * u and the sum, ~7 operators and 3 calls fewer per MoE layer of a decode step.
        Elsewhere (exact fp32 engines included) `experts_ffn` of nanoseek/model/weights.py
        through `experts_mm`."""
        w1, w2 = self._entry("t", gate_up).value, self._entry("t", down).value
        if (found := _ffn_kernels(x, w1, w2, out, not self.exact)) is not None:
            kernels, weights = found
            return kernels.experts_ffn(x, *weights, ids, gates, out)
        return experts_ffn(self, x, gate_up, down, ids, gates, out)

    def grouped_experts_ffn(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                            ids: torch.Tensor, gates: torch.Tensor, out: torch.Tensor):  # fmt: skip
        """Several tokens through their chosen experts (the interface's `grouped_experts_ffn`):
        for up to FEW_TOKENS tokens (fp32: F32_ROWS) where the native kernels run for both
        weights, one native call that reads each chosen expert once (the composition is ~5
        operators per chosen expert: ~35 experts and ~1.4 ms per MoE layer of an 8-row decode
        step of the 803M model); elsewhere `grouped_experts_ffn` of nanoseek/model/weights.py."""
        if x.shape[0] <= self._rows(x):
            w1, w2 = self._entry("t", gate_up).value, self._entry("t", down).value
            if (found := _ffn_kernels(x, w1, w2, out, not self.exact)) is not None:
                kernels, weights = found
                return kernels.experts_grouped(x, *weights, ids, gates, out)
        return grouped_experts_ffn(self, x, gate_up, down, ids, gates, out)

    def swiglu(self, x: torch.Tensor, gate_proj: nn.Module, up_proj: nn.Module,
               down_proj: nn.Module) -> torch.Tensor:  # fmt: skip
        """The dense FFN or shared experts (the interface's `swiglu`): for up to FEW_TOKENS
        tokens (fp32: F32_ROWS) where the native kernels run, one call (`experts_ffn`'s kernel
        over the fused gate/up weight as a single expert of gate 1); elsewhere `swiglu` of
        nanoseek/model/weights.py."""
        if self._takes(x):
            (w1s, _, b1), (w2s, _, b2) = self._plan((gate_proj, up_proj)), self._plan((down_proj,))
            if b1 == [None, None] and b2 == [None]:
                w1, w2 = self._entry("t", *w1s).value, self._entry("t", *w2s).value
                out = torch.zeros_like(x)
                if (found := _ffn_kernels(x, w1, w2, out, not self.exact)) is not None:
                    kernels, weights = found
                    return kernels.experts_ffn(x, *weights, [0], [1.0], out)
        return swiglu(self, x, gate_proj, up_proj, down_proj)

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An RMSNorm module applied to x. One native call where the kernels run (PyTorch's
        RMSNorm is ~8 operators: 1.4 ms of a 16 ms decode step of the 803M model,
        `bench/vs_llamacpp.py`); its sum of squares is added in another order, so fp32 results
        may differ in the last bit. Exact fp32 engines call the module: their
        decoding stays bit-identical to its forward's norms."""
        w = module.weight
        if self._fusable(x) and x.dtype == w.dtype:
            if (kernels := native.kernels_for(x)) is not None:
                return kernels.rmsnorm(x, w, module.eps)
        return module(x)

    def route(self, router: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's gate weights [N,K] fp32 and expert ids [N,K] for x [N,D]. Where `norm`
        is native, one native call (the router is ~20 operators, ~120 us of every MoE layer of
        a decode step of the 803M model); exact fp32 engines call the module."""
        if self._fusable(x) and router.weight.dtype in native.DTYPES:
            if router.n_experts <= MAX_ROUTED and (kernels := native.kernels_for(x)) is not None:
                return kernels.route(router, x)
        return router(x)[:2]

    def mla_decode(self, mla: nn.Module, x: torch.Tensor, cache) -> torch.Tensor:
        """MLA for x [B,T,D] after the tokens in `cache` (the interface's `mla_decode`). For up to
        FEW_TOKENS tokens (fp32: F32_ROWS; a decode step of a few rows, a verify step) where the
        native kernels run for every matrix (int8, or the rows of a bf16 or fp32 model), one call:
        projections, norms, rope, the cache write, attention and o_proj (`MLA.decode` is ~40
        operators, ~0.3 ms of every layer of an 8-bit decode step of the 803M model beyond reading
        its weights); elsewhere (exact fp32 engines included) `MLA.decode`."""
        if self._takes(x):
            plan = self._mla_plan(mla, x.dtype)
            if plan is not None and (kernels := native.kernels_for(x)) is not None:
                st, kv = cache.step, cache.step.cache
                if kv.kv.dtype == x.dtype == plan.dtype and st.start is not None:
                    if plan.made != self._made:  # an entry was re-made: new pointers
                        plan.args, plan.made = kernels.mla_args(plan.mats(), plan.norms), self._made
                    return kernels.mla_decode(x, plan.args, st.cos, st.sin,
                                              kv.row_address(cache.i, st.row0), kv.row_stride(),
                                              st.start, mla.softmax_scale, plan.dims,
                                              plan.kind)  # fmt: skip
        return mla.decode(x, cache)

    def decoder_layer(self, layer: nn.Module, x: torch.Tensor, cache) -> torch.Tensor:
        """A decoder layer for x [B,T,D] after the tokens in `cache` (the interface's
        `decoder_layer`). For up to FEW_TOKENS tokens (fp32: F32_ROWS) where every piece of it runs
        native (its norms, `mla_decode`, the router and the FFN calls, all of one weight kind), one
        call that makes the same native calls in the same order (`DecoderLayer.decode`, the
        composition, makes ~8 calls and ~10 operators a layer: ~0.1 ms of Python a layer); elsewhere
        `DecoderLayer.decode`."""
        if self._takes(x) and not layer.training:
            plan = self._layer_plan(layer, x)
            st = cache.step
            if plan is not None and st.start is not None and st.cache.kv.dtype == x.dtype:
                if plan.made != self._made:  # an entry was re-made: new pointers
                    plan.args, plan.made = plan.build(), self._made
                if plan.args is not None and not torch.is_grad_enabled():
                    return plan.kernels.layer_decode(x, plan.args[0], st.cos, st.sin,
                                                     st.cache.row_address(cache.i, st.row0),
                                                     st.cache.row_stride(), st.start,
                                                     st.last_only)  # fmt: skip
        return layer.decode(x, cache)

    def _layer_plan(self, layer: nn.Module, x: torch.Tensor) -> _LayerPlan | None:
        """How `decoder_layer` calls the native layer for `layer` (x: a decode input), or None
        where some piece of it would not run native."""
        key = ("layer", layer)
        if key in self._plans:
            return self._plans[key]
        self._plans[key] = plan = None
        kernels, mla_plan = native.kernels_for(x), self._mla_plan(layer.self_attn, x.dtype)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if kernels is None or mla_plan is None or self.expert_dtype is not None:
            return None
        kind, mlp = mla_plan.kind, layer.mlp
        if mla_plan.dtype != x.dtype or any(n.weight.dtype != x.dtype for n in norms):
            return None  # (the kernels read every norm's weight in the activations' dtype)
        router, shared, routed = None, mlp, None
        if isinstance(mlp, MoE):
            router, shared = mlp.gate, mlp.shared_experts
            routed = (mlp.experts.gate_up_proj, mlp.experts.down_proj)
            if not mlp.experts.all_local or router.weight.dtype not in native.DTYPES:
                return None
            if router.n_experts > MAX_ROUTED:
                return None

        def ffn(w1s, w2s):  # (w1 rows, scales, w2 rows, scales) of the FFN kernels, or None
            w1, w2 = self._entry("t", *w1s).value, self._entry("t", *w2s).value
            found = _ffn_kernels(x, w1, w2, x, not self.exact)
            if found is None or native.weight_kind(found[1][0], found[1][1]) != kind:
                return None
            return found[1]

        def build():  # (the LayerPlan, the tensors it points into) from the current entries
            sw = None
            if shared is not None:
                (w1s, _, b1), (w2s, _, b2) = self._plan((shared.gate_proj, shared.up_proj)), \
                    self._plan((shared.down_proj,))  # fmt: skip
                sw = ffn(w1s, w2s) if b1 == [None, None] and b2 == [None] else None
            ew = ffn(routed[:1], routed[1:]) if routed else None
            mats = mla_plan.mats()
            if (shared is not None and sw is None) or (routed and ew is None) or None in mats:
                return None
            args = native.layer_plan(mats, mla_plan.norms, mla_plan.dims,
                                     layer.self_attn.softmax_scale, norms, sw, ew, router, kind,
                                     x.dtype == torch.bfloat16)  # fmt: skip
            return args, (mats, sw, ew)

        if build() is not None:
            plan = self._plans[key] = _LayerPlan(kernels, build)
        return plan

    def _mla_plan(self, mla: nn.Module, dtype: torch.dtype):
        """(a function giving the five (rows, scales) pairs `Kernels.mla_decode` takes, the
        norms, dims, the weights' kind) for `mla`, or None where the fused call does not apply
        to it (dtype: the activations', which fp32 and bf16 rows must have)."""
        key = ("mla", mla)
        if key in self._plans:
            return self._plans[key]
        plan = None
        first = mla.q_proj if mla.q_lora_rank is None else mla.q_a_proj
        projs = [(first, mla.kv_a_proj_with_mqa), (mla.q_b_proj,) if mla.q_lora_rank else None,
                 (mla.o_proj,)]  # fmt: skip
        has_bias = any(m.bias is not None for p in projs if p for m in p)
        c, n, v, r = mla.kv_lora_rank, mla.nope_dim, mla.v_dim, mla.rope_dim
        d = mla.kv_a_proj_with_mqa.in_features
        widths = [d, mla.q_lora_rank or 32, n, c, mla.n_heads * v]
        if not has_bias and all(k % 32 == 0 for k in widths) and r % 2 == 0:
            q8 = self.quantize == "int8"
            kind = native.Q8 if q8 else native.weight_kind(mla.o_proj.weight, None)

            def rows_of(value):  # (rows, scales) the kernels stream, or None
                if isinstance(value, Int8Weight):
                    return (value.q, value.scale) if q8 and value.kernels_for(value.q) else None
                rows = value.transpose(-1, -2)
                fits = rows.is_contiguous() and rows.dtype == dtype and not q8
                return (rows, None) if fits else None

            def mats():
                got = [rows_of(self._entry("t", *(m.weight for m in projs[0])).value)]
                got.append(rows_of(self._entry("t", mla.q_b_proj.weight).value) if projs[1]
                           else (None, None))  # fmt: skip
                got += [rows_of(w) for w in self.absorbed(mla)]
                got.append(rows_of(self._entry("t", mla.o_proj.weight).value))
                return got

            if all(m is not None for m in mats()):
                qn = mla.q_a_layernorm if mla.q_lora_rank else None
                norms = (None if qn is None else qn.weight, qn.eps if qn else 0.0,
                         mla.kv_a_layernorm.weight, mla.kv_a_layernorm.eps)  # fmt: skip
                dims = (d, mla.q_lora_rank or 0, mla.n_heads, n, r, c, v)
                plan = _MLAPlan(mats, norms, dims, kind, norms[2].dtype)
        self._plans[key] = plan
        return plan

    def absorbed(self, mla: nn.Module) -> tuple:
        """W_UK [H,N,C] and W_UV^T [H,C,V] (see the module docstring for their layouts)."""
        w = self._plans.get(mla)
        if w is None:
            w = self._plans[mla] = mla.kv_b_proj.weight
        return self._entry("absorbed", w, mla=mla).value

    # ------------------------------------------------------------------ bookkeeping
    def _rows(self, x: torch.Tensor) -> int:
        """Tokens a native call takes for activations x: an fp32 model's F32_ROWS, else
        FEW_TOKENS (for more rows MKL's bf16 and ATen's int8 GEMMs are the faster)."""
        return native.F32_ROWS if x.dtype == torch.float32 and not self.quantize else FEW_TOKENS

    def _takes(self, x: torch.Tensor) -> bool:
        """Whether a fused native call (`swiglu`, `mla_decode`, `decoder_layer`) may take x
        [..., D]: its maths may run native and its tokens are few enough (`_rows`)."""
        return self._fusable(x) and x.numel() <= self._rows(x) * x.shape[-1]

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether the model's maths beyond the products (norms, router, FFN activations,
        attention) may run in native calls for x, in the dtypes the kernels take: always but
        for fp32 in exact engines, which keep PyTorch's operators, and with them their bits."""
        return x.dtype in native.DTYPES and not (self.exact and x.dtype == torch.float32)

    def _plan(self, modules: tuple) -> tuple:
        """(their weights, split sizes or None, biases) of modules sharing an input: a decode
        step multiplies ~5 times per layer, so module attributes are read once, not per call."""
        plan = self._plans.get(modules)
        if plan is None:
            weights = tuple(m.weight for m in modules)
            sizes = [w.shape[0] for w in weights] if len(modules) > 1 else None
            plan = self._plans[modules] = (weights, sizes, [m.bias for m in modules])
        return plan

    def refresh(self) -> None:
        """Re-make the entries whose weights changed since they were made (at every prefill)."""
        for entry in self._entries.values():
            self._update(entry)

    def nbytes(self) -> int:
        """Extra memory the copies take (W^T views cost nothing)."""
        total = 0
        for e in self._entries.values():
            if e.kind == "absorbed":
                total += sum(t.nbytes if isinstance(t, Int8Weight) else t.numel() * t.element_size()
                             for t in e.value)  # fmt: skip
            elif isinstance(e.value, Int8Weight):
                total += e.value.nbytes
            elif self.transpose or len(e.weights) > 1:
                total += e.value.numel() * e.value.element_size()
        return total

    def _entry(self, kind: str, *weights: torch.Tensor, mla: nn.Module | None = None) -> _Entry:
        key = (kind, *map(id, weights))
        entry = self._entries.get(key)
        if (
            entry is None
            and len(weights) > 1
            and all(("t", id(w)) in self._entries for w in weights)
        ):
            # fuse given int8 copies: per-output-channel scales concatenate along `out`
            parts = [self._entries.pop(("t", id(w))).value for w in weights]
            value = Int8Weight(torch.cat([p.q for p in parts], dim=-2),
                               torch.cat([p.scale for p in parts], dim=-1))  # fmt: skip
            self._entries[key] = entry = _Entry(weights, kind, value=value, frozen=True)
            self._made += 1
        if entry is None:
            self._entries[key] = entry = _Entry(weights, kind, mla)
            self._update(entry)
        return entry

    def _update(self, e: _Entry) -> None:
        # in-place updates (optimizer steps, load_state_dict) bump _version; weights created
        # under inference_mode have no version counter (and no optimizer to change them).
        # Fused optimizer kernels (torch.optim.AdamW(fused=True)) do not bump it: after such a
        # step call torch.autograd.graph.increment_version(params), as nanoseek's trainer does
        # (train/loop.py: make_optimizer), or the copies go stale
        if e.frozen:
            return
        key = tuple((w.data_ptr(), None if w.is_inference() else w._version) for w in e.weights)
        if key == e.key:
            return
        e.key, e.split = key, None
        self._made += 1
        with torch.no_grad():
            if e.kind == "absorbed":
                w_uk, w_uv = e.mla.absorbed_weights()  # [H,N,C], [H,V,C]
                # per-head rows, the layout the kernels stream, where they run for both
                rows = (
                    native.kernels_for(w_uk) is not None
                    and w_uk.shape[1] % 32 == 0 == w_uk.shape[2] % 32
                )
                if rows and self.quantize == "int8":  # per-head rows, int8
                    e.value = (Int8Weight.quantize(w_uk.transpose(1, 2)), Int8Weight.quantize(w_uv))
                elif rows and (w_uk.dtype == torch.bfloat16 or not self.exact):  # bf16, fp32
                    per_head = (w_uk.transpose(1, 2).contiguous(), w_uv.contiguous())
                    e.value = tuple(r.transpose(1, 2) for r in per_head)
                else:
                    e.value = (w_uk.contiguous(), w_uv.transpose(1, 2).contiguous())
                return
            ws = [w.detach() for w in e.weights]
            w = ws[0] if len(ws) == 1 else torch.cat(ws, dim=-2)  # [..., out, in]
            if self.quantize == "int8":
                e.value = Int8Weight.quantize(w)
            else:
                w_t = w.transpose(-1, -2)
                e.value = w_t.contiguous() if self.transpose else w_t


def _ffn_kernels(x: torch.Tensor, w1, w2, out: torch.Tensor, f32: bool):
    """(the kernels, (w1 rows, scales, w2 rows, scales)) for the native FFN calls
    (`experts_ffn`, `experts_grouped`) with decode weights w1 (gate/up, [E,] 2F x D) and w2
    (down, [E,] D x F), where they run for both (int8, or bf16 rows and a bf16 x, or with `f32`
    fp32 rows and an fp32 x) and can add into out; else None."""
    if out.dtype not in native.DTYPES or not out.is_contiguous():
        return None
    if isinstance(w1, Int8Weight) and isinstance(w2, Int8Weight):
        if w1.kernels_for(x) is not None and (kernels := w2.kernels_for(x)) is not None:
            return kernels, (w1.q, w1.scale, w2.q, w2.scale)
    elif x.dtype == torch.bfloat16 and not isinstance(w1, Int8Weight):
        rows1, rows2 = w1.transpose(-1, -2), w2.transpose(-1, -2)  # [E,]2F x D, [E,]D x F
        fits = rows2.shape[-1] % 32 == 0 and rows2.is_contiguous()  # F (bf16_kernels: D)
        if fits and (kernels := bf16_kernels(x, rows1)) is not None:
            return kernels, (rows1, None, rows2, None)
    elif f32 and x.dtype == torch.float32 and not isinstance(w1, Int8Weight):
        rows1, rows2 = w1.transpose(-1, -2), w2.transpose(-1, -2)
        fits = rows2.shape[-1] % 16 == 0 and rows2.is_contiguous()  # F (f32_kernels: D)
        if fits and (kernels := f32_kernels(x, rows1)) is not None:
            return kernels, (rows1, None, rows2, None)
    return None


def _native_experts(x: torch.Tensor, value, ids: list[int], out_dtype, f32: bool):
    """(the kernels, x through experts `ids` of a stacked decode weight `value` in one call),
    where the native kernels run for them (int8, bf16 rows, or with `f32` fp32 rows), else
    None."""
    if isinstance(value, Int8Weight):
        if (kernels := value.kernels_for(x)) is not None:
            return kernels, kernels.q8(x, value.q, value.scale, out_dtype, ids=ids)
    elif x.dtype == torch.bfloat16:
        w_rows = value.transpose(1, 2)
        if (kernels := bf16_kernels(x, w_rows)) is not None:
            return kernels, kernels.bf16(x, w_rows, out_dtype, ids=ids)
    elif f32:
        w_rows = value.transpose(1, 2)
        if (kernels := f32_kernels(x, w_rows)) is not None:
            return kernels, kernels.f32(x, w_rows, out_dtype, ids=ids)
    return None
