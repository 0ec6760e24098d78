"""Checkpoint interop: vitune's model directory <-> the LLaVA layouts the rest of the field uses.

- `vitune.interop.hf`: export to, and import from, transformers' `LlavaForConditionalGeneration`
  layout (what transformers, vLLM and SGLang load), including the processor, preprocessor config
  and a Jinja chat template generated from our own template.
- `vitune.interop.original`: import from the original LLaVA release (`LlavaLlamaForCausalLM`
  checkpoints with `model.mm_projector.*`, the `-200` image sentinel, and stage-1
  `mm_projector.bin` files).
- `vitune.interop.commands`: `vitune export` and `vitune import`.

Every conversion is an explicit table of anchored key patterns (`hf.KeyRule`, `hf.remap`): each
checkpoint key must match exactly one rule, and the result is loaded strictly (nothing missing,
nothing left over, every shape checked). Nothing is unpickled: safetensors, or `torch.load` with
`weights_only=True`; no remote code unless asked.

Heavy imports (torch, transformers) stay inside these submodules, so importing the package (as
the CLI does) is instant.
"""
