"""The decoder language model, its config, checkpoints and generation. Single-device code
(it never imports torch.distributed)."""

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from .config import ModelConfig
from .generate import CACHE_POLICIES, Generation, generate, prefill_chunk
from .hf import ConversionError, export_hf, from_hf
from .lm import DecoderBlock, DecoderLM, LossTerms

__all__ = [
    "CACHE_POLICIES",
    "CheckpointError",
    "ConversionError",
    "DecoderBlock",
    "DecoderLM",
    "Generation",
    "LossTerms",
    "ModelConfig",
    "export_hf",
    "from_hf",
    "generate",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "prefill_chunk",
    "save_checkpoint",
]
