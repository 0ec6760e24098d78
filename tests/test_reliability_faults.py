"""Killed runs lose nothing that was paid for: data generation and evaluation phase 1 are SIGKILLed
several times in a row at random points (while requests are in flight) and rerun; every reply the
teacher / endpoint produced is on disk before the kill lands, the total number of paid replies
equals the number of distinct prompts, and the finished outputs equal an uninterrupted run's.

The fake server's `PaidGate` counts the replies it produces ("paid"). To kill at a random point
without racing a reply on the wire, the test closes the gate (new replies wait; the requests stay
in flight), waits until every paid reply is persisted by the client (this is what is tested: a
client that kept replies in memory would never get there), then SIGKILLs it and reopens the gate;
the held requests' client is gone and they are never paid."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_openai import Fault, FakeOpenAI, Reply

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "TRANSFORMERS_VERBOSITY": "error"}


class PaidGate:
    """A reply function for `FakeOpenAI` that counts the replies it produces and can hold new ones."""

    def __init__(self, reply: Callable[[dict], Any], max_delay_s: float = 0.04, seed: int = 0) -> None:
        self.reply = reply
        self.max_delay_s = max_delay_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.open = threading.Event()
        self.open.set()
        self.epoch = 0
        self.entered = 0  # calls so far: the server has handed every request it read to the gate
        self.paid: list[str] = []

    def __call__(self, body: dict) -> Any:
        with self.lock:
            self.entered += 1
            epoch, delay = self.epoch, self.rng.uniform(0, self.max_delay_s)
        time.sleep(delay)
        while True:
            self.open.wait()
            with self.lock:
                if not self.open.is_set():
                    continue
                if epoch != self.epoch:  # the client that asked was killed while this was held
                    return Fault(503, {"error": {"message": "client gone"}})
                self.paid.append(json.dumps(body.get("messages"), sort_keys=True))
                return self.reply(body)

    def close(self) -> None:
        with self.lock:
            self.open.clear()

    def reopen(self) -> None:
        with self.lock:
            self.epoch += 1
            self.open.set()


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def settle(server: FakeOpenAI, gate: PaidGate, quiet_s: float = 0.5, timeout_s: float = 20) -> None:
    """Wait until the server has read every request a killed client sent and handed it to the
    (closed) gate: a request still in the socket buffer when the gate reopens would take the new
    epoch and be paid for a client that is gone (seen under load: 17 paid, 15 on disk)."""
    deadline = time.monotonic() + timeout_s
    seen, since = -1, time.monotonic()
    while True:
        n = server.request_count
        if n != seen:
            seen, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s and gate.entered >= n:
            return
        assert time.monotonic() < deadline, "the server kept receiving requests after the client was killed"
        time.sleep(0.02)


def kill_repeatedly(cmd: list[str], gate: PaidGate, persisted: Callable[[], int], thresholds: list[int],
                    server: FakeOpenAI) -> list[int]:
    """Start `cmd` once per threshold; when that many replies are paid in all, close the gate, wait
    until all paid replies are persisted, SIGKILL, and let the killed client's last requests reach
    the closed gate. Returns the paid count at each kill."""
    killed_at = []
    for k in thresholds:
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: len(gate.paid) >= k or proc.poll() is not None, 120, f"no progress towards {k} paid replies")
            gate.close()
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            wait_for(lambda: persisted() >= len(gate.paid), 20,
                     f"{len(gate.paid)} replies were paid but only {persisted()} are on disk: a kill now would lose them")
            assert persisted() == len(gate.paid)
            killed_at.append(len(gate.paid))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            settle(server, gate)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            gate.reopen()
    return killed_at


# -- data generation ------------------------------------------------------------------------------------
def write_annotations(path: Path, n: int) -> Path:
    from vitune.world.scene import Instance, Scene

    with path.open("w") as f:
        for i in range(n):
            insts = (Instance("circle", (0.1, 0.1, 0.2, 0.2), "red", "small"),
                     Instance("square", (0.6, 0.6, 0.9, 0.9 - 0.01 * (i % 5)), "blue", "large"))[: 1 + i % 2]
            f.write(json.dumps(Scene(f"img{i:03d}", f"images/img{i:03d}.png", (f"Scene number {i}.",), insts).to_json()) + "\n")
    return path


def teacher_reply(body: dict) -> Any:
    """Good replies, except a few kinds of bad ones on fixed scenes (each must end in quarantine)."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    n = int(re.search(r"Scene number (\d+)", user).group(1))
    kind = "conversation" if "Write a conversation" in system else "complex" if "Write one question" in system else "detail"
    bad = {(1, "conversation"): "", (2, "detail"): "I'm sorry, but I can't help with that.",
           (3, "complex"): Reply("Question:\nWhat if the", finish_reason="length"),
           (4, "conversation"): "Question:\nWhat is it?\n===\nQuestion:\nAnd now?\n===",
           (5, "detail"): "Sure! Here is a conversation.\nQuestion: what?\nAnswer: this."}
    if (n, kind) in bad:
        return bad[(n, kind)]
    if kind == "detail":
        return f"Image {n} shows a few simple shapes on a plain background, spread out with plenty of empty space around each one of them."
    if kind == "complex":
        return f"Question:\nWhat changes if one shape in image {n} is removed?\n===\nAnswer:\nFewer shapes remain, {n} fewer.\n==="
    return f"Question:\nHow many shapes are there in image {n}?\n===\nAnswer:\nThere are a few.\n===\nQuestion:\nIs it image {n}?\n===\nAnswer:\nYes.\n==="


def datagen_args(base_url: str, ann: Path, out: Path, cache: Path) -> list[str]:
    return ["instruct", "--annotations", str(ann), "--teacher", "openai", "--base-url", base_url, "--model", "fake-model",
            "--api-key-env", "VITUNE_TEST_NO_SUCH_KEY", "--out", str(out), "--cache-dir", str(cache), "--no-progress",
            "--summary", str(out.with_suffix(".summary.json")), "--concurrency", "4", "--max-retries", "2"]


def cache_files(cache: Path) -> int:
    return sum(1 for p in cache.rglob("*.json") if not p.name.startswith("."))


def strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def run_datagen_with_kills(tmp_path: Path, scenes: int, kills: int, seed: int) -> dict[str, Any]:
    """Kill `vitune datagen instruct` `kills` times at random points, rerun to the end, compare with
    an uninterrupted run; returns the accounting (used by `make stress` too)."""
    from vitune.datagen.commands import main

    ann = write_annotations(tmp_path / "ann.jsonl", scenes)
    distinct = 3 * scenes
    rng = random.Random(seed)
    thresholds = sorted(rng.sample(range(1, distinct - 1), kills))
    gate = PaidGate(teacher_reply, seed=seed)
    out, cache = tmp_path / "out.json", tmp_path / "cache"
    with FakeOpenAI(reply=gate) as server:
        cmd = [sys.executable, "-m", "vitune.datagen", *datagen_args(server.base_url, ann, out, cache)]
        killed_at = kill_repeatedly(cmd, gate, lambda: cache_files(cache), thresholds, server)
        assert not out.exists(), "the output is written once, whole, at the end"
        final = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr[-3000:]
        requests_seen = server.request_count
    with FakeOpenAI(reply=teacher_reply) as clean:
        reference = tmp_path / "reference.json"
        assert main(datagen_args(clean.base_url, ann, reference, tmp_path / "fresh-cache")) == 0
        assert clean.request_count == distinct
    records = json.loads(out.read_text())
    assert len({r["id"] for r in records}) == len(records), "duplicates"
    assert strip_time(records) == strip_time(json.loads(reference.read_text()))
    # no reply paid twice, none lost: exactly one paid reply per distinct prompt
    assert len(gate.paid) == distinct and len(set(gate.paid)) == distinct, (len(gate.paid), len(set(gate.paid)), distinct)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    ref_summary = json.loads(reference.with_suffix(".summary.json").read_text())
    assert summary["quarantined"] == ref_summary["quarantined"]
    assert summary["quarantined"] == {"empty": 1, "refusal": 1, "truncated": 1, "wrong_turn_structure": 2}
    quarantined = [json.loads(line) for line in out.with_suffix(".quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["reason"] for q in quarantined) == ["empty", "refusal", "truncated", "wrong_turn_structure", "wrong_turn_structure"]
    assert summary["written"] == len(records) == distinct - 5
    return {"scenes": scenes, "distinct_prompts": distinct, "kills": len(killed_at), "killed_at_paid": killed_at,
            "paid_replies": len(gate.paid), "requests_received": requests_seen, "records": len(records),
            "quarantined": summary["quarantined"], "equal_to_uninterrupted": True}


def test_datagen_killed_three_times_pays_each_prompt_once(tmp_path: Path) -> None:
    result = run_datagen_with_kills(tmp_path, scenes=8, kills=3, seed=1)
    assert result["kills"] == 3
    # requests held at the gate when their client died were received but never paid
    assert result["requests_received"] >= result["paid_replies"]


def test_malformed_http_replies_end_in_quarantine_counted(tmp_path: Path) -> None:
    """A 200 whose body is not a completion is retried, then quarantined as a failed request."""
    from vitune.datagen.commands import main

    ann = write_annotations(tmp_path / "ann.jsonl", 2)

    def reply(body: dict) -> Any:
        if "Scene number 1." in body["messages"][-1]["content"] and "Write a conversation" in body["messages"][0]["content"]:
            return Fault(200, b'{"choices": [ not json', {"content-type": "application/json"})
        return teacher_reply(body)

    out = tmp_path / "out.json"
    with FakeOpenAI(reply=reply) as server:
        args = datagen_args(server.base_url, ann, out, tmp_path / "cache")
        args[args.index("--max-retries") + 1] = "1"
        assert main(args) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["quarantined"] == {"request_failed": 1}
    assert summary["written"] == 5 and summary["engine"]["retries"] == 1
    (line,) = [json.loads(x) for x in out.with_suffix(".quarantine.jsonl").read_text().splitlines()]
    assert line["reason"] == "request_failed" and line["source_id"] == "img001" and "malformed" in line["detail"]


# -- evaluation phase 1 -----------------------------------------------------------------------------------
LB_IMAGE = Path(__file__).parent / "fixtures" / "eval" / "llava_bench" / "images" / "001.png"


def endpoint_reply(body: dict) -> str:
    content = body["messages"][-1]["content"]
    text = " ".join(p.get("text", "") for p in content if isinstance(p, dict)) if isinstance(content, list) else content
    return f"answer to: {text.strip()}"


def eval_args(base_url: str, questions: Path, out: Path) -> list[str]:
    return ["eval", "answer", "llava-bench", "--questions", str(questions), "--images", str(LB_IMAGE.parent),
            "--endpoint", base_url, "--model", "other-vlm", "--out", str(out), "--api-key-env", "NO_SUCH_VAR",
            "--quiet", "--concurrency", "3"]


def log_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def run_eval_with_kills(tmp_path: Path, questions: int, kills: int, seed: int) -> dict[str, Any]:
    from vitune.cli import main

    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": i, "image": LB_IMAGE.name, "text": f"What is shown, number {i}?",
                                         "category": "conv"}) + "\n" for i in range(questions)))
    rng = random.Random(seed)
    gate = PaidGate(endpoint_reply, seed=seed)
    out = tmp_path / "answers.jsonl"
    with FakeOpenAI(reply=gate) as server:
        cmd = [sys.executable, "-m", "vitune.cli", *eval_args(server.base_url, qfile, out)]
        killed_at = kill_repeatedly(cmd, gate, lambda: log_lines(out), sorted(rng.sample(range(1, questions - 1), kills)), server)
        before_final = len(gate.paid)
        final = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr[-3000:]
    # the last run asked only what the killed runs had not answered
    assert len(gate.paid) - before_final == questions - before_final
    with FakeOpenAI(reply=endpoint_reply) as clean:
        reference = tmp_path / "reference.jsonl"
        assert main(eval_args(clean.base_url, qfile, reference)) == 0

    def strip(path: Path) -> list[dict]:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        for r in rows:
            r.get("metadata", {}).pop("seconds", None)
        return rows

    # every question asked exactly once over all the runs, and the log is the uninterrupted one
    assert len(gate.paid) == questions and len(set(gate.paid)) == questions, (len(gate.paid), len(set(gate.paid)))
    assert strip(out) == strip(reference)
    return {"questions": questions, "kills": len(killed_at), "killed_at_answered": killed_at,
            "model_calls": len(gate.paid), "equal_to_uninterrupted": True}


def test_eval_answer_killed_three_times_asks_each_question_once(tmp_path: Path) -> None:
    result = run_eval_with_kills(tmp_path, questions=20, kills=3, seed=2)
    assert result["kills"] == 3 and result["model_calls"] == 20


@pytest.mark.parametrize("cut", [1, 17, -3])
def test_torn_last_answer_line_is_redone_not_duplicated(tmp_path: Path, cut: int) -> None:
    """A kill in the middle of writing a line (a torn tail) costs that one answer, once."""
    from vitune.eval.answer import EndpointAnswerer, EvalItem, run_answers
    from vitune.eval.io import read_jsonl

    items = [EvalItem(f"q{i}", f"question {i}?") for i in range(6)]
    out = tmp_path / "a.jsonl"
    with FakeOpenAI(reply=endpoint_reply) as server:
        run_answers(items[:4], EndpointAnswerer(server.base_url, "m", "k", concurrency=2), out, progress=False)
        whole = out.read_bytes()
        last = whole[: -1].rfind(b"\n") + 1
        out.write_bytes(whole[: last + cut] if cut > 0 else whole[: cut])
        server.reset()
        run = run_answers(items, EndpointAnswerer(server.base_url, "m", "k", concurrency=2), out, progress=False)
        assert server.request_count == 3 and run.written == 3
    assert [r["question_id"] for r in read_jsonl(out)] == [f"q{i}" for i in range(6)]
