"""Pure model modules: no file I/O, no training or serving machinery."""

from nanoseek.model.compile import compile_model
from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.model.transformer import CausalLM, CausalLMOutput

__all__ = ["CausalLM", "CausalLMOutput", "IGNORE_INDEX", "compile_model"]
