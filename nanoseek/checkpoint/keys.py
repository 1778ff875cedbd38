"""Names between our modules and the Hugging Face DeepseekV3 checkpoint keys.

Two differences only:
- routed experts are 3D tensors here (`mlp.experts.gate_up_proj [E,2F,D]`, `down_proj [E,D,F]`)
  and per-expert matrices on disk (`mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`);
- MTP module k is `mtp.{k-1}.*` here and `model.layers.{num_hidden_layers+k-1}.*` on disk, where it
  also carries copies of the shared `embed_tokens` and `shared_head.head` (the output head), as the
  official release does; we write them and ignore them on load.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def hf_to_ours(key: str, num_hidden_layers: int) -> str | None:
    """HF key -> our parameter name (experts keep their per-expert suffix: see split_expert_key).
    None for keys we deliberately drop (the MTP layers' copies of shared weights)."""
    m = _LAYER.match(key)
    if m and int(m.group(1)) >= num_hidden_layers:
        rest = m.group(2)
        if rest in SHARED_COPIES:
            return None
        return f"mtp.{int(m.group(1)) - num_hidden_layers}.{rest}"
    return key


def ours_to_hf(name: str, num_hidden_layers: int) -> str:
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{num_hidden_layers + int(k)}.{rest}"
    return name


def split_expert_key(key: str) -> tuple[str, int, str] | None:
    """'...mlp.experts.7.up_proj.weight' -> ('...mlp.experts', 7, 'up_proj'), else None."""
    m = _EXPERT.match(key)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def hf_state_items(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF key, tensor) for every tensor a checkpoint of `model` holds, experts split,
    MTP renamed, shared copies added. Tensors are views; nothing is copied here.
    A tied head is not written (as transformers does): it is the embedding. Neither is the router
    bias of a V2-style (softmax-routed) model, which has no such tensor (`has_correction_bias`)."""
    L = model.config.num_hidden_layers
    tied = model.config.tie_word_embeddings
    bias = model.config.has_correction_bias
    state = model.state_dict()
    for name, t in state.items():
        if name.startswith("rotary.") or (tied and name == "lm_head.weight"):
            continue
        if not bias and name.endswith("e_score_correction_bias"):
            continue
        hf = ours_to_hf(name, L)
        if hf.endswith("mlp.experts.gate_up_proj"):
            base = hf[: -len(".gate_up_proj")]
            F = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{base}.{e}.gate_proj.weight", t[e, :F]
                yield f"{base}.{e}.up_proj.weight", t[e, F:]
        elif hf.endswith("mlp.experts.down_proj"):
            base = hf[: -len(".down_proj")]
            for e in range(t.shape[0]):
                yield f"{base}.{e}.down_proj.weight", t[e]
        else:
            yield hf, t
    for k in range(len(model.mtp)):
        prefix = f"model.layers.{L + k}."
        yield prefix + "embed_tokens.weight", state["model.embed_tokens.weight"]
        yield prefix + "shared_head.head.weight", state["lm_head.weight"]


def expected_hf_keys(model) -> list[str]:
    return [k for k, _ in hf_state_items(model)]
