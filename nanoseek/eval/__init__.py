"""Evaluation on held-out task problems, and the sampling path it shares with rejection sampling.

passk.py     the unbiased pass@k estimator (Chen et al. 2021)
sampling.py  problems -> prompts (chat or raw template) -> engine completions -> Samples
evaluate.py  evaluate(model, tokenizer, task, n_problems, k) -> accuracy, pass@k, format, length
"""

from nanoseek.eval.evaluate import evaluate, evaluate_checkpoint, format_result, heldout_problems
from nanoseek.eval.passk import mean_pass_at_k, pass_at_k
from nanoseek.eval.sampling import (
    CHAT,
    Sample,
    SampleFn,
    encode_prompt,
    engine_sample_fn,
    sample_problems,
    stop_ids,
)

__all__ = [
    "CHAT",
    "Sample",
    "SampleFn",
    "encode_prompt",
    "engine_sample_fn",
    "evaluate",
    "evaluate_checkpoint",
    "format_result",
    "heldout_problems",
    "mean_pass_at_k",
    "pass_at_k",
    "sample_problems",
    "stop_ids",
]
