"""Load a checkpoint directory and its tokenizer into an `Engine` (for `serve` and `chat`)."""

from __future__ import annotations

import os

import torch

from nanoseek.checkpoint.io import CheckpointError
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.streamed import load_for_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_engine(
    model_dir: str,
    tokenizer_dir: str | None = None,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    max_batch_size: int = 8,
    max_seq_len: int | None = None,
    speculative: str | None = None,
    num_draft: int = 1,
    seed: int | None = None,
    quantize: str | None = None,
    exact: bool = False,
    draft_quantize: str | None = "auto",
) -> tuple[Engine, Tokenizer]:
    """(engine, tokenizer) for a checkpoint directory holding tokenizer.json (or
    `tokenizer_dir`). Everything cheap is checked before the weights load; user errors raise
    CheckpointError / FileNotFoundError / ValueError naming the file or option."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: no such checkpoint directory")
    tok_dir = tokenizer_dir or model_dir
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir} (pass --tokenizer DIR)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if exact and quantize:
        raise ValueError("--exact decodes the model's own weights: it takes no --quantize")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    tokenizer = Tokenizer.load(tok_dir)
    if tokenizer.chat_template is None:
        raise ValueError(f"{tok_dir}: tokenizer_config.json has no chat_template")
    # int8: streamed tensor by tensor into int8 copies (a model larger than memory in bf16)
    model, weights = load_for_engine(model_dir, DTYPES[dtype], dev, quantize)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer in {tok_dir} has {tokenizer.vocab_size} ids, more than the model's "
            f"vocab_size {model.config.vocab_size}: not this model's tokenizer"
        )
    if speculative and not model.config.num_nextn_predict_layers:
        raise ValueError(f"{model_dir}: --speculative mtp needs a model with an MTP module")
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        speculative=speculative,
        num_draft=num_draft,
        seed=seed,
        quantize=quantize,
        exact=exact,
        weights=weights,
        draft_quantize=draft_quantize,
    )
    return engine, tokenizer
