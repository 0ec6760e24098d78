"""`make bench`: vitune against transformers' LLaVA on the same weights (see bench/README.md)."""
