"""Evaluation: ScienceQA, LLaVA-Bench with an LLM judge, and the synthetic-world tasks.

Two phases, as in the field: `answer` (phase 1: a model's answers, one JSON line per question,
resumable and shardable) and `score` (phase 2: importable, unit-tested scoring functions).

- `answer`: EvalItem, the answer log, shards, merge; vitune and OpenAI-compatible answerers
- `tasks`: the exact-match task registry behind `vitune eval answer|score TASK`
- `scienceqa`: the official release, prompt formats, answer extraction, official breakdown
- `ensemble`: the paper's judge ensemble of two models on ScienceQA
- `llava_bench`: LLaVA-Bench files, judge prompts, review parsing, relative score
- `judge_rules`: the offline rules judge for toy-bench
- `toy`: toy-vqa, toy-scienceqa, toy-bench on the synthetic world; `run_toy_task`
- `commands`: the `vitune eval` command line
"""
