"""Opt-in `torch.compile` of the training forward and backward (the eager model is the default).

Each decoder layer (main and MTP) is compiled on its own rather than the whole model: layers of
the same kind share one compiled graph (parameters are graph inputs), so a training run compiles
one graph per layer kind and shape - dense, MoE, and one per MTP depth (its sequence is k
tokens shorter) - forward and backward, instead of one per layer. The cross-entropy is compiled
too, one graph per logits shape (nanoseek/model/loss.py `compiled_loss`); the embedding, the
head and the Python control flow stay eager. Inductor fuses the element-wise work between the
GEMMs (norms, RoPE, SwiGLU, routing and gate weights, residual adds, the balance loss, the
cast, log-softmax and gather of the loss) forward and backward;
the GEMMs themselves still run in oneDNN / MKL (CPU) or cuBLAS.

`TrainingCompiler` is what the trainers use (`--compile`): the compiled layers are installed only
inside `with compiler():` around the training forward, so evaluation and generation (the
inference engine, GRPO rollouts) always run the eager modules, in any mode, at any shape. Inside
it nothing falls back to eager silently: every layer is compiled with `fullgraph=True` (a graph
break is an error) and past `max_variants` graphs (all layer kinds together) dynamo raises
instead of running the eager code (`fail_on_recompile_limit_hit`). `compile_model` (bench/train_step.py) compiles
the layers for good, for every call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.callback import callback_handler

from nanoseek.model.loss import compiled_loss, reference_loss
from nanoseek.model.transformer import CausalLM

# graphs of one code object (all layers share `nn.Module._call_impl`): dense + MoE + one per MTP
# depth is 3-5 for every preset; 8 (dynamo's default) leaves room for a second sequence length
MAX_VARIANTS = 8
# micro-batches whose shape changes every step (RL completions, `varying_shapes`) are padded to
# a multiple of SEQ_BUCKET tokens and to the most rows seen: graphs = layer kinds x buckets
# (GRPO: dense + MoE, 3 buckets for completions of up to ~190 tokens), at most 63 padding
# tokens per row. Symbolic shapes (`dynamic=True`) were tried instead: dynamo still
# specialised the batch size and added a graph per new shape
SEQ_BUCKET = 64
MAX_VARIANTS_BUCKETED = 16
# what TrainingCompiler compiles with unless told otherwise; tests swap in "aot_eager" (the same
# dynamo and AOTAutograd tracing, so the same graph breaks and guards, without the C++ build)
BACKEND = "inductor"


def compiled_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, main then MTP, of a CausalLM (or of a wrapper holding one)."""
    inner: CausalLM = getattr(model, "module", model)
    return [*inner.model.layers, *inner.mtp]


def compile_model(model: CausalLM, **compile_kwargs) -> CausalLM:
    """Compile every decoder layer of `model` in place, for every later call (extra kwargs go to
    `torch.compile`, e.g. `mode="max-autotune"`). Returns the model. Undo with
    `model.layers[i]._compiled_call_impl = None`, or build a fresh model."""
    for layer in compiled_layers(model):
        layer.compile(**compile_kwargs)
    return model


class CompileClock:
    """Wall time spent compiling (dynamo tracing, AOTAutograd, inductor codegen and the C++
    build, the lazily compiled backward included) since it was made, in this process."""

    def __init__(self):
        self.seconds = 0.0
        self._start: float | None = None
        self._lock = threading.Lock()
        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)

    def _on_start(self, args) -> None:
        with self._lock:
            self._start = time.perf_counter()

    def _on_end(self, args) -> None:
        with self._lock:
            if self._start is not None:
                self.seconds += time.perf_counter() - self._start
                self._start = None

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            callback_handler.remove_start_callback(self._on_start)
            callback_handler.remove_end_callback(self._on_end)


class TrainingCompiler:
    """Compiled decoder layers for the training forward, active only inside `with self():`.

    Compiled with `dynamic=False`: every graph is specialised to its shapes, so the MoE's padded
    expert layout (a size fixed by the shapes, nanoseek/model/moe.py `expert_rows`) and the
    attention's causal blocks are constants inductor can plan for. A new batch shape is a new
    graph (see `varying_shapes`); a run whose shapes keep changing fails at `max_variants`
    instead of slowing down.
    """

    def __init__(
        self,
        model: nn.Module,
        max_variants: int | None = None,
        varying_shapes: bool = False,
        compile_loss: bool = True,
        **compile_kwargs,
    ):
        """varying_shapes: the micro-batches' rows and length change from step to step (RL
        completions): inside the block, `model(input_ids, ...)` runs on input padded at the
        end to a multiple of SEQ_BUCKET and to the most rows seen (masked out of the router
        statistics and the balance loss, invisible to the real tokens) and returns outputs cut
        back to the real shape, so a new shape rarely needs a new graph.
        compile_loss=False leaves the cross-entropy to the eager hand-chunked Function, and
        options={"cpp_wrapper": False} keeps inductor's Python wrapper (the ablations of
        bench/compile_speedup.py --ablate)."""
        default = MAX_VARIANTS_BUCKETED if varying_shapes else MAX_VARIANTS
        self.model, self.max_variants = model, max_variants or default
        self.varying_shapes, self._rows = varying_shapes, 0
        kwargs = dict(fullgraph=True, dynamic=False, backend=BACKEND) | compile_kwargs
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if kwargs["backend"] == "inductor" and "mode" not in kwargs and on_cpu:
            # the graph's wrapper (buffer allocation, the GEMM calls between fused kernels) in
            # C++ rather than Python: 3-6% off the main job's compiled step on CPU, for a
            # longer first compile (the wrapper is built too; inductor's disk cache keeps it)
            kwargs.setdefault("options", {"cpp_wrapper": True})
        # every layer's graphs hang off one code object (`nn.Module._call_impl`), so an earlier
        # run's graphs in this process would count against this one's limit: the pipeline and
        # the main job run their trainers one after another, each starts afresh (inductor's
        # disk cache still serves shapes compiled before)
        torch._dynamo.reset()
        self.layers = compiled_layers(model)
        self._fns = [torch.compile(layer._call_impl, **kwargs) for layer in self.layers]
        # the cross-entropy on the main and MTP logits: one graph per logits shape (fixed-shape
        # batches: 1 + MTP depths); inductor fuses it into one pass forward, one backward
        self._loss = torch.compile(reference_loss, **kwargs) if compile_loss else None
        self.clock = CompileClock()

    @property
    def compile_s(self) -> float:
        return self.clock.seconds

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Run the model's layers compiled inside the block (forward; the backward of what ran
        compiled is the compiled backward wherever it is called)."""
        limits = dict(recompile_limit=self.max_variants, fail_on_recompile_limit_hit=True)
        for layer, fn in zip(self.layers, self._fns):
            layer._compiled_call_impl = fn
        if self.varying_shapes:  # not compiled itself: pads, calls the module, cuts back
            self.model._compiled_call_impl = self._padded_call
        try:
            loss = compiled_loss(self._loss) if self._loss else contextlib.nullcontext()
            with torch._dynamo.config.patch(**limits), loss:
                yield
        finally:
            for layer in self.layers:
                layer._compiled_call_impl = None
            self.model._compiled_call_impl = None

    def _padded_call(self, input_ids, labels=None, position_ids=None, token_mask=None, mtp=True):
        """CausalLM.__call__ on input_ids padded to a multiple of SEQ_BUCKET tokens and to the
        most rows seen so far, outputs cut back. The real tokens' logits and hidden states are
        those of the unpadded call (rows are independent, attention is causal, the MoE has no
        capacity limit); padding is masked out of the expert loads and the balance loss. Labels
        and position ids are not padded: such calls run as given."""
        if labels is not None or position_ids is not None:
            return self.model._call_impl(input_ids, labels, position_ids, token_mask, mtp)
        B, T = input_ids.shape
        self._rows = max(self._rows, B)  # a run's first micro-batch is usually a full one
        pad, extra = -T % SEQ_BUCKET, self._rows - B
        if token_mask is None:
            token_mask = torch.ones_like(input_ids, dtype=torch.bool)
        ids = F.pad(input_ids, (0, pad, 0, extra))
        mask = F.pad(token_mask, (0, pad, 0, extra), value=False)
        out = self.model._call_impl(ids, token_mask=mask, mtp=mtp)
        out.logits = out.logits[:B, :T]
        out.mtp_logits = [lg[:B, : T - k] for k, lg in enumerate(out.mtp_logits, start=1)]
        if out.hidden_states is not None:
            out.hidden_states = out.hidden_states[:B, :T]
        if extra and out.aux_loss is not None and self.model.config.seq_aux:
            # the sequence-wise loss is a mean over rows, and an all-padding row adds 0
            out.aux_loss = out.aux_loss * (self._rows / B)
        return out

    def close(self) -> None:
        self.clock.close()
