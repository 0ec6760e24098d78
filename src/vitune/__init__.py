"""vitune: visual instruction tuning (LLaVA)."""

__version__ = "0.1.0"
