"""`nanoseek.generate`: tensors in, tensors out, on top of the Engine."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.transformer import CausalLM


def generate(
    model: CausalLM,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    speculative: str | None = None,
    num_draft: int = 1,
    ignore_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    return_logprobs: bool = False,
    engine: Engine | None = None,
    quantize: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generate continuations of a batch of prompts; returns the new tokens [B, N].

    input_ids: a LongTensor [B, T] (no padding) or a list of token-id lists of any lengths.
    temperature 0 is greedy; seed makes sampling reproducible (one generator for the batch).
    speculative="mtp" drafts `num_draft` tokens per step with the model's MTP module (same
    output distribution; greedy output identical). With ignore_eos=True (the default, handy for
    benchmarks) every row gets exactly max_new_tokens; otherwise rows stop at the eos token
    (`eos_token_id`, default the config's) or a stop token id, N is the longest row and shorter
    rows are padded with `pad_token_id` (default: the eos id). return_logprobs adds a float
    tensor [B, N] of each token's log-probability (NaN on padding). `engine` reuses an Engine
    (its cache must fit the batch) instead of building one per call. quantize="int8" decodes
    with weight-only int8 weights (faster on CPU, output not identical; see infer/quant.py).
    """
    prompts = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if not prompts:
        raise ValueError("input_ids holds no prompts")
    if engine is None:
        longest = max(len(p) for p in prompts)
        engine = Engine(
            model,
            max_batch_size=len(prompts),
            max_seq_len=longest + max_new_tokens + num_draft,
            speculative=speculative,
            num_draft=num_draft,
            seed=seed,
            quantize=quantize,
        )
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=return_logprobs,
    )
    saved, engine.eos_ids = engine.eos_ids, frozenset(eos_ids)
    try:
        done = engine.generate(prompts, params)
    finally:
        engine.eos_ids = saved
    n = max(len(c.token_ids) for c in done)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    out = torch.full((len(done), n), pad, dtype=torch.long)
    lps = torch.full((len(done), n), float("nan"))
    for b, c in enumerate(done):
        out[b, : len(c.token_ids)] = torch.tensor(c.token_ids)
        if return_logprobs:
            lps[b, : len(c.logprobs)] = torch.tensor(c.logprobs)
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else model.device
    out = out.to(device)
    return (out, lps.to(device)) if return_logprobs else out
