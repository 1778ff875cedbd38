"""What a fine-tuning run (SFT, GRPO, distillation) does before its first step: find the
checkpoint's tokenizer, load the model to train, and write the run's own files into OUT.

    tok_src, tokenizer, model = load_for_training("runs/tiny/model")
    tok_files = write_run_files(par, opts, tok_src)  # OUT/tokenizer, OUT/options.json

Scaffolding shared by the methods, so a method never imports another method's module for it.
"""

from __future__ import annotations

import os

import torch

from nanoseek.checkpoint.io import load
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.fsio import copy_dir, write_json
from nanoseek.train.options import to_dict

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
)  # fmt: skip


def tokenizer_dir(model_dir: str, tokenizer: str | None = None) -> str:
    """The directory holding the tokenizer: `tokenizer` if given, else the model's own."""
    d = tokenizer or model_dir
    if not os.path.isfile(os.path.join(d, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {d} (pass --tokenizer=DIR)")
    return d


def copy_tokenizer(src_dir: str, out_dir: str) -> list[str]:
    """Copy the tokenizer files of `src_dir` to OUT/tokenizer; returns the copied paths (the
    `extra_files` of every checkpoint and of the final model)."""
    found = [os.path.join(src_dir, n) for n in TOKENIZER_FILES]
    # the folder is replaced as a whole (atomic), and not at all when it already matches
    return copy_dir([p for p in found if os.path.isfile(p)], os.path.join(out_dir, "tokenizer"))


def write_run_files(par, opts, tok_src: str, **json_files: dict) -> list[str]:
    """OUT/tokenizer (copied from `tok_src`), OUT/options.json and OUT/<name>.json for each
    keyword, written by rank 0; returns the tokenizer files' paths on every rank."""

    def write() -> list[str]:
        files = copy_tokenizer(tok_src, opts.out)
        for name, obj in {"options": to_dict(opts), **json_files}.items():
            write_json(os.path.join(opts.out, f"{name}.json"), obj)
        return files

    return par.broadcast(par.on_main(write))


def load_for_training(model_dir: str, tokenizer: str | None = None):
    """(tokenizer directory, Tokenizer, fp32 model) of a checkpoint to fine-tune (SFT, GRPO),
    refusing a tokenizer with more ids than the model's vocabulary."""
    tok_src = tokenizer_dir(model_dir, tokenizer)
    tok = Tokenizer.load(tok_src)
    model = load(model_dir, dtype=torch.float32)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer in {tok_src} has {tok.vocab_size} ids, more than the model's "
            f"vocab_size {model.config.vocab_size}: not this model's tokenizer"
        )
    return tok_src, tok, model


def routed_experts(model_dir: str) -> int | None:
    """n_routed_experts of a checkpoint (expert parallelism must divide it); None when the
    directory has no readable config (the loader then reports what is wrong)."""
    try:
        return ModelConfig.from_pretrained(model_dir).n_routed_experts
    except Exception:  # noqa: BLE001 - load_for_training raises the proper error
        return None
