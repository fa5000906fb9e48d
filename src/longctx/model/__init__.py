"""The decoder language model and its config. Single-device code (no torch.distributed)."""

from .config import ModelConfig
from .lm import DecoderLM

__all__ = ["DecoderLM", "ModelConfig"]
