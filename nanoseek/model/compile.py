"""Opt-in `torch.compile` for training and inference (the eager model is the default).

Each decoder layer (main and MTP) is compiled on its own rather than the whole model: layers of
the same kind share one compiled graph (parameters are graph inputs), so compiling takes two
graphs (dense, MoE) instead of one per layer, and the head, loss and Python control flow stay
eager. Inductor fuses the element-wise work between the GEMMs (norms, RoPE, SwiGLU, routing
weights, residual adds) forward and backward; the GEMMs themselves still run in oneDNN / MKL
(CPU) or cuBLAS. bench/train_step.py --compile measures the gain and the compile time.
"""

from __future__ import annotations

from nanoseek.model.transformer import CausalLM


def compile_model(model: CausalLM, **compile_kwargs) -> CausalLM:
    """Compile every decoder layer of `model` in place (extra kwargs go to `torch.compile`,
    e.g. `mode="max-autotune"`). Returns the model. Undo with `model.layers[i]._compiled_call_impl
    = None`, or build a fresh model."""
    for layer in [*model.model.layers, *model.mtp]:
        layer.compile(**compile_kwargs)
    return model
