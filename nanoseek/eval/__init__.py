"""Evaluation on held-out task problems, and the sampling path it shares with base choice,
rejection sampling, distillation and GRPO's rollouts.

passk.py     the unbiased pass@k estimator (Chen et al. 2021)
sampling.py  problems -> prompts (chat or raw template) -> engine completions cut at stop ids ->
             Samples -> scores (accuracy, pass@k, format, length)
evaluate.py  evaluate(model, tokenizer, task, n_problems, k): held-out problems, the report
"""

from nanoseek.eval.evaluate import (
    evaluate,
    evaluate_checkpoint,
    format_result,
    heldout_across,
    heldout_problems,
)
from nanoseek.eval.passk import mean_pass_at_k, pass_at_k
from nanoseek.eval.sampling import (
    CHAT,
    Sample,
    SampleFn,
    cut_at_stop,
    encode_prompt,
    end_ids,
    engine_sample_fn,
    sample_problems,
    score_samples,
    stop_ids,
    to_sample,
)

__all__ = [
    "CHAT",
    "Sample",
    "SampleFn",
    "cut_at_stop",
    "encode_prompt",
    "end_ids",
    "engine_sample_fn",
    "evaluate",
    "evaluate_checkpoint",
    "format_result",
    "heldout_across",
    "heldout_problems",
    "mean_pass_at_k",
    "pass_at_k",
    "sample_problems",
    "score_samples",
    "stop_ids",
    "to_sample",
]
