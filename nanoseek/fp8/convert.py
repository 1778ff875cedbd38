"""Turn a CausalLM into an FP8-training model, in place [V3 §3.3.1].

FP8 (nanoseek/fp8/linear.py, grouped.py): every GEMM of
- attention projections: q_proj | q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj,
- the dense FFN and the shared experts (gate/up/down_proj),
- the routed experts, through the `RoutedExperts.linear_fn` hook (fp8_experts_hook).
Kept in bf16/fp32, as V3 keeps them [V3 §3.3.1]: embedding, output head, MoE gate (router),
norms, and the attention core (softmax: it is not a Linear, nothing to convert).
MTP `eh_proj` stays in high precision by default: the V3 release stores it in BF16, the only
projection of its kind not in FP8 (nanoseek/checkpoint/fp8_format.py), and its input
concatenates two differently normalised halves. `convert_eh_proj=True` converts it anyway.

Parameters are shared, never copied: state-dict keys, dtypes (fp32 master weights) and the
optimizer's parameter objects stay as they were, so checkpoints save in full precision and
the official FP8 export can write them. Convert before wrapping with FSDP or torch.compile.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from nanoseek.fp8.backends import AutoBackend, FP8Backend, get_backend
from nanoseek.fp8.grouped import make_fp8_grouped_linear
from nanoseek.fp8.linear import FP8Linear, check_fp8_weight
from nanoseek.model.ffn import SwiGLU
from nanoseek.model.mla import MLA
from nanoseek.model.moe import RoutedExperts
from nanoseek.model.mtp import MTPLayer
from nanoseek.model.norm import RMSNorm
from nanoseek.model.router import Router

ATTN_PROJ = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


@dataclass
class FP8Report:
    """Which modules run their GEMMs in FP8 and which stay in high precision, and why."""

    backend: str
    converted: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)

    def summary(self) -> str:
        """Compact form for logs: layer indices folded into `*`, with counts."""

        def fold(name: str) -> str:
            return re.sub(r"\.\d+\.", ".*.", name)

        lines = [f"FP8 ({self.backend}): {len(self.converted)} converted, {len(self.kept)} kept"]
        for name, n in Counter(fold(c) for c in self.converted).items():
            lines.append(f"  fp8   {name}" + (f" (x{n})" if n > 1 else ""))
        kept = Counter((fold(k), why) for k, why in self.kept)
        for (name, why), n in kept.items():
            lines.append(f"  keep  {name}" + (f" (x{n})" if n > 1 else "") + f": {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _backend_label(backend: FP8Backend, device) -> str:
    if isinstance(backend, AutoBackend):
        return f"auto -> {backend.resolve(device).name} on {device}"
    return backend.name


def _plan(model: nn.Module, convert_eh_proj: bool, report: FP8Report):
    """Walk the model: [(name, parent, attr, linear)] to convert; reasons for the rest."""
    todo = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, FP8Linear):  # converting twice is a no-op
                report.converted.append(name)
            elif isinstance(child, nn.Linear):
                if (isinstance(parent, MLA) and attr in ATTN_PROJ) or isinstance(parent, SwiGLU):
                    todo.append((name, parent, attr, child))
                elif isinstance(parent, MTPLayer) and attr == "eh_proj":
                    if convert_eh_proj:
                        todo.append((name, parent, attr, child))
                    else:
                        report.kept.append((name, "MTP eh_proj, BF16 in the V3 release"))
                elif attr == "lm_head":
                    report.kept.append((name, "output head [V3 §3.3.1]"))
                else:
                    report.kept.append((name, "not a projection of the FP8 recipe"))
            elif isinstance(child, nn.Embedding):
                report.kept.append((name, "embedding [V3 §3.3.1]"))
            elif isinstance(child, Router):
                report.kept.append((name, "MoE gate [V3 §3.3.1]"))
            elif isinstance(child, RMSNorm):
                report.kept.append((name, "norm [V3 §3.3.1]"))
            elif isinstance(child, MLA):
                report.kept.append((f"{name}.<core>", "attention core, softmax [V3 §3.3.1]"))
    return todo


def _check_experts(name: str, m: RoutedExperts) -> None:
    check_fp8_weight(f"{name}.gate_up_proj", m.gate_up_proj, ndim=3)  # [E,2F,D]
    check_fp8_weight(f"{name}.down_proj", m.down_proj, ndim=3)  # [E,D,F]


def fp8_experts_hook(
    model: nn.Module,
    backend: str | FP8Backend = "auto",
    pow2_scales: bool = False,
    report: FP8Report | None = None,
) -> list[str]:
    """Set `linear_fn = fp8_grouped_linear` on every RoutedExperts; returns their names.

    Takes effect only where RoutedExperts calls `self.linear_fn` (the model declares the
    attribute); elsewhere the report says the experts stayed in high precision."""
    fn = make_fp8_grouped_linear(backend, pow2_scales)
    hooked = []
    for name, m in model.named_modules():
        if not isinstance(m, RoutedExperts):
            continue
        wired = hasattr(m, "linear_fn")  # the model reads this attribute
        _check_experts(name, m)
        m.linear_fn = fn
        hooked.append(name)
        if report is not None:
            if wired:
                report.converted.append(f"{name} (routed experts, linear_fn)")
            else:
                report.kept.append((name, "RoutedExperts has no linear_fn hook yet"))
    return hooked


def convert_to_fp8(
    model: nn.Module,
    backend: str | FP8Backend = "auto",
    pow2_scales: bool = False,
    convert_eh_proj: bool = False,
    experts: bool = True,
) -> FP8Report:
    """Swap the recipe's Linear layers for FP8Linear in place (same Parameter objects) and hook
    the routed experts; returns the report (print it, or `.summary()`).

    Raises ValueError naming the layer, before anything is swapped, when a layer cannot train
    in FP8 (nanoseek.fp8.linear.check_fp8_weight), and for an unknown or unavailable backend."""
    device = next(model.parameters()).device
    backend = get_backend(backend, device)
    report = FP8Report(backend=_backend_label(backend, device))
    todo = _plan(model, convert_eh_proj, report)
    for name, _, _, linear in todo:  # validate everything first: no half-converted model
        check_fp8_weight(name, linear.weight)
    if experts:
        for name, m in model.named_modules():
            if isinstance(m, RoutedExperts):
                _check_experts(name, m)
    for name, parent, attr, linear in todo:
        setattr(parent, attr, FP8Linear.from_linear(linear, backend, pow2_scales, name=name))
        report.converted.append(name)
    if experts:
        fp8_experts_hook(model, backend, pow2_scales, report)
    else:
        for name, m in model.named_modules():
            if isinstance(m, RoutedExperts):
                report.kept.append((name, "experts=False"))
    return report


def convert_for_fp8(model, verbose: bool = True) -> None:
    """precision=fp8: swap the recipe's Linear layers for FP8 GEMMs [V3 §3.3] unless the method
    already did (`parallelize` converts before sharding, so FSDP wraps the swapped layers).
    Every method (pre-training, SFT, distillation, GRPO) trains in FP8 this way; the parameters stay the same
    objects, so checkpoints and rollouts are unchanged."""
    if not any(isinstance(m, FP8Linear) for m in model.modules()):
        report = convert_to_fp8(model)
        if verbose:
            print(report, file=sys.stderr)
