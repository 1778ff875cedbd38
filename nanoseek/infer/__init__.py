"""Inference: latent KV cache, cached forward, sampling, MTP speculative decoding, the engine.

cache.py        LatentCache: c_KV + k_rope per layer and token, per-row lengths, rollback
runner.py       ModelRunner: prefill (plain MLA) and decode/verify (absorbed MLA) over it
sampling.py     SamplingParams and the one sampling routine (temperature, top-k/p, seeds)
speculative.py  MTP drafting, one-forward verification, the acceptance rule
detokenize.py   incremental text with stop strings
engine.py       Engine: continuous batching, streaming deltas, stop conditions
api.py          nanoseek.generate(model, input_ids, ...) -> new tokens [B, N]
"""

from nanoseek.infer.api import generate
from nanoseek.infer.cache import LatentCache
from nanoseek.infer.engine import Completion, Delta, Engine
from nanoseek.infer.sampling import SamplingParams

__all__ = ["Completion", "Delta", "Engine", "LatentCache", "SamplingParams", "generate"]
