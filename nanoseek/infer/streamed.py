"""Load a checkpoint straight into int8 decode weights: models larger than memory in bf16.

Shape legend: E routed experts, F expert width, D model dim.

A DeepSeek-V2-Lite-sized model (15.7B parameters, 31 GB in bf16) does not fit a 24 GB machine
as a `CausalLM` of bf16 parameters, but its int8 decode weights do (~16 GB): the routed experts
are 92% of the parameters and a token reads only 6 of 64 per layer. `load_int8` streams the
checkpoint tensor by tensor (`checkpoint.io.load` with a sink; FP8 block-scaled tensors are
dequantised first) and quantises every matrix the forward multiplies through its weights
object (the projections, shared and routed experts, the output head) into `Int8Weight`s as it
arrives; those parameters stay on the meta device. What stays in `dtype`: the embedding, the
norms, the routers and MLA's `kv_b_proj` (prefill decompresses with it; decoding reads it as the
absorbed W_UK / W_UV, of which the engine keeps int8 copies where the native kernels run).

The model runs only through the engine: every forward, prefill included, multiplies through
the returned `DecodeWeights` (`modules_hold_weights` is False), and the MoE runs the chosen
experts per expert for any number of tokens (`MoE.forward_few`). Training, `model(...)` and
saving need the real weights: load with `checkpoint.io.load` for those.
"""

from __future__ import annotations

import os

import torch

from nanoseek.checkpoint.io import load
from nanoseek.checkpoint.keys import split_expert_key
from nanoseek.config import ModelConfig
from nanoseek.infer.quant import Int8Weight
from nanoseek.infer.weights import DecodeWeights
from nanoseek.model.transformer import CausalLM

# the projections the forward multiplies through its weights object (not kv_b_proj: MLA reads
# it as the absorbed W_UK / W_UV, and prefill decompresses with it)
QUANTIZED = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj",
             "up_proj", "down_proj", "eh_proj")  # fmt: skip


class Int8Sink:
    """Takes the matrices a forward multiplies and quantises them per output channel."""

    def __init__(self, n_experts: int, tie_word_embeddings: bool, dtype: torch.dtype):
        self.n_experts, self.tied = n_experts, tie_word_embeddings
        self.dtype = dtype  # each tensor is rounded to it first: as if loaded, then quantised
        self.values: dict[str, Int8Weight] = {}  # our parameter name -> its int8 copy

    def keeps(self, name: str) -> bool:
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return True
        if name == "lm_head.weight":
            return not self.tied  # a tied head is the embedding, which stays
        parts = name.split(".")
        return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED

    def take(self, name: str, t: torch.Tensor) -> None:
        t = t.to(self.dtype)
        split = split_expert_key(name)
        if split is None:
            self.values[name] = Int8Weight.quantize(t)
            return
        base, e, kind = split  # one expert's [F,D] gate/up or [D,F] down
        q = Int8Weight.quantize(t)
        if kind == "down_proj":
            self._stacked(f"{base}.down_proj", q, e, 0)
        else:
            self._stacked(f"{base}.gate_up_proj", q, e, 0 if kind == "gate_proj" else 1)

    def _stacked(self, name: str, q: Int8Weight, e: int, half: int) -> None:
        """Write expert e's rows into the stacked [E, out, in] copy (gate rows, then up rows)."""
        rows = q.q.shape[0]
        halves = 2 if name.endswith("gate_up_proj") else 1
        stacked = self.values.get(name)
        if stacked is None:
            E = self.n_experts
            stacked = self.values[name] = Int8Weight(
                torch.zeros(E, halves * rows, q.q.shape[1], dtype=torch.int8),  # [E,out,in]
                torch.zeros(E, halves * rows, dtype=q.scale.dtype),
            )
        stacked.q[e, half * rows : (half + 1) * rows] = q.q
        stacked.scale[e, half * rows : (half + 1) * rows] = q.scale


def load_for_engine(directory, dtype: torch.dtype, device="cpu", quantize: str | None = None):
    """(model, decode weights or None) for `Engine(model, ..., weights=...)`: int8 streams the
    checkpoint into int8 copies (`load_int8`), anything else loads the model whole."""
    if quantize == "int8":
        return load_int8(directory, dtype, device)
    return load(directory, dtype=dtype, device=device), None


def load_int8(
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    check_finite: bool | None = None,
) -> tuple[CausalLM, DecodeWeights]:
    """(model, its int8 decode weights) of a HF checkpoint directory (bf16/fp32/FP8), read
    tensor by tensor; pass both to `Engine(model, ..., weights=...)`. See the module docstring."""
    config = ModelConfig.from_pretrained(os.fspath(directory))
    sink = Int8Sink(config.n_routed_experts, config.tie_word_embeddings, dtype)
    model = load(directory, dtype=dtype, device=device, check_finite=check_finite, sink=sink)
    weights = DecodeWeights(transpose=False, quantize="int8")
    for name, value in sink.values.items():
        weights.put(model.get_parameter(name), value)
    sink.values.clear()
    return model, weights
