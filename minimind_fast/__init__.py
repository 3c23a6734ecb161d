"""minimind_fast: a kernel-backed trainer for MiniMind-family small language models."""

from minimind_fast.config import PRESETS, ModelConfig, get_preset
from minimind_fast.model import KVCache, MiniMindForCausalLM

__version__ = "0.1.0"
__all__ = ["PRESETS", "KVCache", "MiniMindForCausalLM", "ModelConfig", "get_preset", "__version__"]
