"""nanoseek: DeepSeek-V3 and the DeepSeek-R1 recipe in small, readable PyTorch."""

from nanoseek.checkpoint import CheckpointError, load, save
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.infer import Engine, SamplingParams, generate
from nanoseek.malloc import keep_freed_memory
from nanoseek.model import CausalLM, CausalLMOutput

__version__ = "0.1.0"
__all__ = [
    "CausalLM",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "Engine",
    "ModelConfig",
    "SamplingParams",
    "generate",
    "keep_freed_memory",
    "load",
    "save",
]
