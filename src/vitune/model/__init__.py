"""The LLaVA architecture: vision encoder -> projector -> image tokens in the LLM's input embeddings."""

from vitune.model.config import LlavaConfig
from vitune.model.llava import LlavaModel

__all__ = ["LlavaConfig", "LlavaModel"]
