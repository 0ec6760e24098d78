"""The LLaVA architecture: vision encoder -> projector -> image tokens in the LLM's input embeddings.

Import from the submodules (`vitune.model.llava`, `.build`, `.config`, ...); this package file stays
empty so that `vitune --help` does not pay for importing torch.
"""
