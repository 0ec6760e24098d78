"""Teachers and their prompts: the registry (`openai`, `rules`) and the versioned prompt files.

A teacher turns jobs (a scene + a kind) into validated conversation turns. The `openai` teacher
builds chat messages from the kind's prompt (system message + few-shot examples, read from
`prompts/KIND/vN/`), sends them through the engine and parses the replies; the `rules` teacher
writes the turns itself from the annotation. Both return one `Generated` per job, either with
turns or with a quarantine reason.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vitune.datagen import rules
from vitune.datagen.context import context_text
from vitune.datagen.engine import ChatRequest, EngineConfig, EngineStats, run_chat_requests
from vitune.datagen.parse import ParseError, Turn, parse_response
from vitune.errors import VituneError
from vitune.world.scene import Scene

KINDS: tuple[str, ...] = ("conversation", "detail", "complex")
PROMPT_ROOT = Path(__file__).parent / "prompts"


# -- prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSet:
    kind: str
    version: str  # "v1"
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, response)
    instructions: tuple[str, ...]  # human instructions drawn per sample (detail, brief)
    sha: str  # hash of the files' contents: detects a version edited in place

    @property
    def tag(self) -> str:
        """What samples record: 'conversation/v1'."""
        return f"{self.kind}/{self.version}"


def available_versions(kind: str) -> list[str]:
    folder = PROMPT_ROOT / kind
    if not folder.is_dir():
        known = sorted(p.name for p in PROMPT_ROOT.iterdir() if p.is_dir())
        raise VituneError(f"no prompts for kind {kind!r}; known kinds: {', '.join(known)}")
    versions = [p.name for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name)]
    return sorted(versions, key=lambda v: int(v[1:]))


def load_prompt(kind: str, version: str | None = None) -> PromptSet:
    """The prompt files of `kind` at `version` (default: the highest)."""
    versions = available_versions(kind)
    if not versions:
        raise VituneError(f"{PROMPT_ROOT / kind}: no version folders (v1, v2, ...)")
    version = version or versions[-1]
    if version not in versions:
        raise VituneError(f"no prompt version {version!r} for kind {kind!r}; available: {', '.join(versions)}")
    folder = PROMPT_ROOT / kind / version
    digest = hashlib.sha256()
    system = ""
    if (folder / "system.txt").exists():
        system = (folder / "system.txt").read_text(encoding="utf-8").strip()
        digest.update(system.encode())
    examples = []
    ex_dir = folder / "examples"
    if ex_dir.is_dir():
        for ctx_path in sorted(ex_dir.glob("*.context.txt")):
            resp_path = ctx_path.with_name(ctx_path.name.replace(".context.txt", ".response.txt"))
            if not resp_path.exists():
                raise VituneError(f"{ctx_path}: example has no response file {resp_path.name}")
            ctx, resp = ctx_path.read_text(encoding="utf-8").strip(), resp_path.read_text(encoding="utf-8").strip()
            digest.update(ctx.encode())
            digest.update(resp.encode())
            examples.append((ctx, resp))
    instructions: tuple[str, ...] = ()
    if (folder / "instructions.txt").exists():
        lines = (folder / "instructions.txt").read_text(encoding="utf-8").splitlines()
        instructions = tuple(line.strip() for line in lines if line.strip())
        digest.update("\n".join(instructions).encode())
    return PromptSet(kind, version, system, tuple(examples), instructions, digest.hexdigest()[:12])


def build_messages(prompt: PromptSet, context: str) -> list[dict]:
    """System message, the few-shot examples as user/assistant pairs, then the context."""
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for ctx, resp in prompt.examples:
        messages += [{"role": "user", "content": ctx}, {"role": "assistant", "content": resp}]
    messages.append({"role": "user", "content": context})
    return messages


# -- jobs and results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    scene: Scene
    kind: str

    @property
    def key(self) -> str:
        return f"{self.scene.id}/{self.kind}"


@dataclass
class Generated:
    job: Job
    turns: list[Turn] | None  # human/gpt alternating; None when rejected
    reason: str | None = None  # quarantine reason
    detail: str = ""
    raw_text: str | None = None
    teacher: str = ""
    teacher_model: str = ""
    prompt_version: str = ""
    created: float = 0.0
    facts: list = field(default_factory=list)  # rules teacher: per gpt turn


def job_rng(seed: int, job: Job) -> random.Random:
    """A generator per job: a job's sample does not depend on which other jobs run."""
    return random.Random(f"{seed}/{job.scene.id}/{job.kind}")


@dataclass
class TeacherOptions:
    seed: int = 0
    prompt_version: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    temperature: float = 0.2
    max_tokens: int = 1024
    attributes: bool = True  # show colour/size in the context text
    progress: bool = True


class Teacher(Protocol):
    name: str
    stats: EngineStats

    def generate(self, jobs: Sequence[Job]) -> list[Generated]: ...


class RulesTeacher:
    """The offline teacher for synthetic-world scenes (`vitune.datagen.rules`)."""

    name = "rules"

    def __init__(self, options: TeacherOptions) -> None:
        self.options = options
        self.stats = EngineStats()
        self.detail_instructions = list(load_prompt("detail", options.prompt_version).instructions)

    def generate(self, jobs: Sequence[Job]) -> list[Generated]:
        now = time.time()
        out = []
        for job in jobs:
            sample = rules.generate(job.scene, job.kind, job_rng(self.options.seed, job), self.detail_instructions)
            out.append(Generated(job, sample.turns, teacher=self.name, teacher_model=rules.RULES_VERSION,
                                 prompt_version=rules.RULES_VERSION, created=now, facts=sample.facts))
        return out


class OpenAITeacher:
    """Any OpenAI-compatible chat-completions endpoint, through the engine (cache, limits, cost)."""

    name = "openai"

    def __init__(self, options: TeacherOptions) -> None:
        self.options = options
        self.stats = EngineStats()
        self.prompts = {kind: load_prompt(kind, options.prompt_version) for kind in KINDS}

    def prompt_tag(self, kind: str) -> str:
        return f"{self.prompts[kind].tag}@{self.prompts[kind].sha}"

    def requests(self, jobs: Sequence[Job]) -> list[ChatRequest]:
        return [
            ChatRequest(
                key=job.key,
                messages=build_messages(self.prompts[job.kind], context_text(job.scene, self.options.attributes)),
                temperature=self.options.temperature,
                max_tokens=self.options.max_tokens,
            )
            for job in jobs
        ]

    def generate(self, jobs: Sequence[Job]) -> list[Generated]:
        results = run_chat_requests(self.requests(jobs), self.options.engine, self.options.progress, self.stats)
        out = []
        for job, res in zip(jobs, results):
            common = dict(teacher=self.name, teacher_model=self.options.engine.model,
                          prompt_version=self.prompts[job.kind].tag, created=res.created or time.time(), raw_text=res.text)
            if res.text is None:
                out.append(Generated(job, None, reason="request_failed", detail=res.error or "", **common))
                continue
            try:
                turns = parse_response(job.kind, res.text, res.finish_reason)
            except ParseError as err:
                out.append(Generated(job, None, reason=err.reason, detail=err.detail, **common))
                continue
            if job.kind == "detail":
                instruction = job_rng(self.options.seed, job).choice(self.prompts["detail"].instructions)
                turns = [Turn("human", instruction), *turns]
            out.append(Generated(job, turns, **common))
        return out


TEACHERS: dict[str, Callable[[TeacherOptions], Teacher]] = {
    "openai": OpenAITeacher,
    "rules": RulesTeacher,
}


def get_teacher(name: str, options: TeacherOptions) -> Teacher:
    if name not in TEACHERS:
        raise VituneError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}")
    return TEACHERS[name](options)
