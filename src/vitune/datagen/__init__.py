"""Instruction data generation with a language-only teacher (LLaVA's first contribution).

Symbolic image contexts (captions + object boxes) go to a teacher, an OpenAI-compatible chat model
or the offline rules teacher, which writes conversations, detailed descriptions and reasoning
Q&A; the results are parsed, validated and written in the LLaVA JSON format with provenance.
Modules: `context` (COCO -> annotations, teacher context text), `prompts/` (versioned system
messages and few-shot examples), `teachers` (registry), `rules` (offline teacher), `engine`
(async requests, limits, retries, cache, cost), `batch` (OpenAI Batch API files), `parse`
(teacher text -> turns, quarantine), `captions` (stage-1 data), `commands` (the CLI).
"""
