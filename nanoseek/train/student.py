"""A smaller student initialised from a pre-trained base: some of its layers, everything else as is.

student_from_base("runs/speedrun/pretrain/model", 2, "runs/student_init")  # 4 layers -> 2
"""

from __future__ import annotations

import os
import re

import torch

from nanoseek.checkpoint.io import load, save
from nanoseek.config import ConfigError
from nanoseek.model.transformer import CausalLM
from nanoseek.train.sft import TOKENIZER_FILES


def student_from_base(base_dir: str, n_layers: int, out_dir: str) -> str:
    """A smaller student initialised from the pre-trained base: its embedding, head, final norm,
    MTP module and `n_layers` of its decoder layers, spread evenly from first to last (the
    layer-selection initialisation of DistilBERT, Sanh et al. 2019). R1-Distill likewise starts
    its students from pre-trained bases, never from scratch [R1 §2.4]."""
    base = load(base_dir, dtype=torch.float32)
    cfg = base.config
    L = cfg.num_hidden_layers
    if n_layers > L:
        raise ConfigError(f"option 'student_layers' ({n_layers}) exceeds the base's {L} layers")
    picked = [round(i * (L - 1) / max(1, n_layers - 1)) for i in range(n_layers)]  # 4, 2: [0, 3]
    dense = min(cfg.first_k_dense_replace, n_layers - 1)
    if any((j < cfg.first_k_dense_replace) != (i < dense) for i, j in enumerate(picked)):
        raise ConfigError(f"student layers {picked} do not keep the base's dense/MoE layout")
    student = CausalLM(cfg.replace(num_hidden_layers=n_layers, first_k_dense_replace=dense))
    state = {}
    for key, value in base.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in picked:
            state[f"model.layers.{picked.index(int(m.group(1)))}.{m.group(2)}"] = value
    student.load_state_dict(state, strict=True)
    save(student, out_dir, extra_files=[os.path.join(base_dir, f) for f in TOKENIZER_FILES
                                        if os.path.isfile(os.path.join(base_dir, f))])  # fmt: skip
    return out_dir
