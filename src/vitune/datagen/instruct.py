"""`vitune datagen instruct`: annotations -> teacher -> validated LLaVA-format instruction data.

The story: read the scenes, plan the jobs (every scene x every kind, or `--mix` counts per kind
drawn with the seed), let the teacher answer them (cached, resumable), send invalid responses to
the quarantine file, and write the samples in LLaVA's JSON format

    {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}],
     "kind", "source_id", "teacher", "teacher_model", "prompt_version", "time"}

as a list (`.json`) or one per line (`.jsonl`), plus a summary (counts, lengths, quarantine
reasons, tokens, cost).
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vitune.io import atomic_write_json, atomic_write_jsonl
from vitune.datagen.parse import Quarantine
from vitune.datagen.teachers import KINDS, Generated, Job, Teacher
from vitune.errors import VituneError
from vitune.world.scene import Scene

IMAGE_TOKEN = "<image>"


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            raise VituneError(f"--kinds: unknown kind {k!r}; known: {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds) or not kinds:
        raise VituneError(f"--kinds: give each kind once, got {text!r}")
    return kinds


def parse_mix(text: str) -> dict[str, int]:
    """'conversation=1000,detail=300,complex=500' -> counts per kind."""
    mix: dict[str, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, count = part.partition("=")
        name = name.strip()
        if not sep or name not in KINDS:
            raise VituneError(f"--mix: expected KIND=COUNT with KIND in {', '.join(KINDS)}, got {part!r}")
        if name in mix:
            raise VituneError(f"--mix: {name} given twice")
        try:
            mix[name] = int(count)
        except ValueError as err:
            raise VituneError(f"--mix: {name}={count!r} is not a whole number") from err
        if mix[name] < 0:
            raise VituneError(f"--mix: {name} count must be >= 0")
    if not mix:
        raise VituneError("--mix: no KIND=COUNT given")
    return mix


def plan_jobs(scenes: Sequence[Scene], kinds: Sequence[str], mix: dict[str, int] | None, seed: int) -> list[Job]:
    """Every scene x kind in order, or with `mix`, COUNT distinct scenes per kind, shuffled."""
    ids = [s.id for s in scenes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise VituneError(f"annotations: scene id {dup!r} appears more than once")
    if mix is None:
        return [Job(scene, kind) for scene in scenes for kind in kinds]
    rng = random.Random(seed)
    jobs = []
    for kind, count in mix.items():
        if count > len(scenes):
            raise VituneError(f"--mix: {kind}={count} needs {count} scenes, the annotations have {len(scenes)}")
        jobs += [Job(scene, kind) for scene in rng.sample(list(scenes), count)]
    rng.shuffle(jobs)
    return jobs


def to_llava(gen: Generated) -> dict:
    assert gen.turns is not None
    conversations = []
    for i, turn in enumerate(gen.turns):
        value = turn.text
        if i == 0:
            value = f"{IMAGE_TOKEN}\n{value}"
        conversations.append({"from": turn.role, "value": value})
    return {
        "id": f"{gen.job.scene.id}-{gen.job.kind}",
        "image": gen.job.scene.image,
        "conversations": conversations,
        "kind": gen.job.kind,
        "source_id": gen.job.scene.id,
        "teacher": gen.teacher,
        "teacher_model": gen.teacher_model,
        "prompt_version": gen.prompt_version,
        "time": datetime.fromtimestamp(gen.created, tz=timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Summary:
    jobs: int = 0
    written: int = 0
    per_kind: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)
    turns_mean: float = 0.0
    answer_words_mean: float = 0.0
    answer_words_max: int = 0
    engine: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "jobs": self.jobs,
            "written": self.written,
            "per_kind": dict(self.per_kind),
            "quarantined": dict(self.quarantined),
            "turns_mean": round(self.turns_mean, 2),
            "answer_words_mean": round(self.answer_words_mean, 1),
            "answer_words_max": self.answer_words_max,
            "engine": self.engine,
        }

    def text(self) -> str:
        lines = [f"jobs {self.jobs}, written {self.written} ({', '.join(f'{k} {v}' for k, v in sorted(self.per_kind.items()))})"]
        lines.append(f"turns per sample {self.turns_mean:.1f}, answer words mean {self.answer_words_mean:.1f} max {self.answer_words_max}")
        q = sum(self.quarantined.values())
        lines.append(f"quarantined {q}" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(self.quarantined.items()))})" if q else ""))
        if self.engine.get("requests"):
            e = self.engine
            lines.append(
                f"requests {e['requests']}: cached {e['cache_hits']}, sent {e['sent']} (retries {e['retries']}), "
                f"failed {e['failed']}, not sent (budget) {e['skipped_budget']}"
            )
            lines.append(f"tokens in {e['prompt_tokens']} out {e['completion_tokens']}, cost ${e['cost']:.4f}")
        return "\n".join(lines)


def generate_dataset(
    teacher: Teacher, jobs: Sequence[Job], out: Path, quarantine_path: Path | None
) -> tuple[list[dict], Summary]:
    """Run the teacher over the jobs, quarantine the bad responses, write `out`; returns the samples."""
    generated = teacher.generate(jobs)
    records: list[dict] = []
    summary = Summary(jobs=len(jobs))
    with Quarantine(quarantine_path) as quarantine:
        for gen in generated:
            if gen.turns is None:
                assert gen.reason is not None
                quarantine.add(gen.reason, source_id=gen.job.scene.id, kind=gen.job.kind, key=gen.job.key,
                               detail=gen.detail, text=gen.raw_text)
                continue
            records.append(to_llava(gen))
        summary.quarantined = quarantine.counts
    write_samples(out, records)
    summary.written = len(records)
    summary.per_kind = Counter(r["kind"] for r in records)
    if records:
        summary.turns_mean = statistics.fmean(len(r["conversations"]) for r in records)
        answer_words = [len(t["value"].split()) for r in records for t in r["conversations"] if t["from"] == "gpt"]
        summary.answer_words_mean = statistics.fmean(answer_words)
        summary.answer_words_max = max(answer_words)
    summary.engine = teacher.stats.summary()
    return records, summary


def write_samples(path: Path, records: list[dict]) -> None:
    if path.suffix == ".jsonl":
        atomic_write_jsonl(path, records)
    else:
        atomic_write_json(path, records, indent=1)


def read_samples(path: Path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)
