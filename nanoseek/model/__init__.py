"""Pure model modules: no file I/O, no training or serving machinery."""

from nanoseek.model.compile import compile_model
from nanoseek.model.transformer import IGNORE_INDEX, CausalLM, CausalLMOutput

__all__ = ["CausalLM", "CausalLMOutput", "IGNORE_INDEX", "compile_model"]
