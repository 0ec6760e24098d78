"""`vitune datagen instruct` end to end: the openai teacher against the fake server, and the rules teacher."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Reply, client_error

from vitune.datagen.commands import main
from vitune.world.scene import Instance, Scene

SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_annotations(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            insts = (
                Instance("circle", (0.1, 0.1, 0.2, 0.2), "red", "small"),
                Instance("square", (0.6, 0.6 - 0.01 * (i % 5), 0.9, 0.9), "blue", "large"),
            )[: 1 + i % 2]
            scene = Scene(f"img{i:03d}", f"images/img{i:03d}.png", (f"Scene number {i}.",), insts)
            f.write(json.dumps(scene.to_json()) + "\n")
    return path


def kind_of(body: dict) -> str:
    system = body["messages"][0]["content"]
    if "Write a conversation" in system:
        return "conversation"
    if "Write one question" in system:
        return "complex"
    return "detail"


def scene_number(body: dict) -> int:
    return int(re.search(r"Scene number (\d+)", body["messages"][-1]["content"]).group(1))


def good_reply(body: dict) -> str:
    n = scene_number(body)
    kind = kind_of(body)
    objects = len([ln for ln in body["messages"][-1]["content"].splitlines() if ": [" in ln])
    if kind == "detail":
        return f"The image number {n} shows {objects} simple shapes arranged on a plain background, with plenty of empty space around them in every direction."
    if kind == "complex":
        return f"Question:\nWhat would happen if one shape were removed from image {n}?\n===\nAnswer:\nThere are {objects} shapes, so {objects - 1} would remain.\n==="
    return (f"Question:\nHow many shapes are there?\n===\nAnswer:\nThere are {objects} shapes.\n===\n"
            f"Question:\nIs this image {n}?\n===\nAnswer:\nYes.\n===")


def run_cli(*args: str) -> int:
    return main(["instruct", *args])


def openai_args(server: FakeOpenAI, ann: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--annotations", str(ann), "--teacher", "openai", "--base-url", server.base_url, "--model", "fake-model",
            "--api-key-env", "VITUNE_TEST_NO_SUCH_KEY", "--out", str(out), "--cache-dir", str(cache), "--no-progress",
            *extra]


def strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.fixture()
def server():
    with FakeOpenAI(reply=good_reply) as s:
        yield s


def test_openai_teacher_writes_llava_json_with_provenance(server, tmp_path):
    ann = write_annotations(tmp_path / "ann.jsonl", 4)
    out = tmp_path / "out.json"
    assert run_cli(*openai_args(server, ann, out, tmp_path / "cache")) == 0
    records = json.loads(out.read_text())
    assert len(records) == 12 and server.request_count == 12
    assert len({r["id"] for r in records}) == 12
    for r in records:
        conv = r["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum("<image>" in t["value"] for t in conv) == 1
        assert r["teacher"] == "openai" and r["teacher_model"] == "fake-model"
        assert r["prompt_version"] == f"{r['kind']}/v1" and r["source_id"] + "-" + r["kind"] == r["id"]
        assert r["image"] == f"images/{r['source_id']}.png" and r["time"].endswith("+00:00")
    detail = next(r for r in records if r["kind"] == "detail")
    assert detail["conversations"][0]["value"].removeprefix("<image>\n").startswith(
        ("Describe", "Provide", "Give", "Share", "Offer", "Explain", "Clarify", "Characterize", "Break", "Walk",
         "Portray", "Narrate", "Analyze", "Illustrate", "Examine", "Write"))
    # the teacher saw the paper's context: captions, then `category: [x1, y1, x2, y2]` lines
    sent = server.completion_requests()[0].body["messages"]
    assert sent[0]["role"] == "system" and sent[1]["role"] == "user" and sent[2]["role"] == "assistant"
    assert re.search(r"^small red circle: \[0\.100, 0\.100, 0\.200, 0\.200\]$", sent[-1]["content"], re.M)


def test_second_run_makes_zero_requests_and_same_output(server, tmp_path):
    ann = write_annotations(tmp_path / "ann.jsonl", 3)
    args = openai_args(server, ann, tmp_path / "a.jsonl", tmp_path / "cache")
    assert run_cli(*args) == 0
    server.reset()
    args2 = openai_args(server, ann, tmp_path / "b.jsonl", tmp_path / "cache")
    assert run_cli(*args2) == 0
    assert server.request_count == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_quarantine_reasons(server, tmp_path):
    ann = write_annotations(tmp_path / "ann.jsonl", 8)
    bad = {
        0: "",
        1: "I'm sorry, but I can't help with that.",
        2: "Here is a nice conversation about the picture.",
        3: "Question:\nWhat is it?\n===\nQuestion:\nAnd now?\n===\nAnswer:\nA shape.\n===",
        4: "Question:\nWhere is the circle?\n===\nAnswer:\nIts bounding box is [0.1, 0.1, 0.2, 0.2].\n===",
        5: Reply("Question:\nWhat is", finish_reason="length"),
        6: client_error(400, "context length exceeded"),
    }

    def reply(body):
        n = scene_number(body)
        if kind_of(body) == "conversation" and n in bad:
            return bad[n]
        return good_reply(body)

    server.set_reply(reply)
    out, quarantine = tmp_path / "out.json", tmp_path / "q.jsonl"
    summary = tmp_path / "summary.json"
    assert run_cli(*openai_args(server, ann, out, tmp_path / "cache", "--quarantine", str(quarantine),
                                "--summary", str(summary))) == 0
    rows = [json.loads(line) for line in quarantine.read_text().splitlines()]
    reasons = {r["source_id"]: r["reason"] for r in rows}
    assert reasons == {
        "img000": "empty", "img001": "refusal", "img002": "unparseable", "img003": "wrong_turn_structure",
        "img004": "leaked_context", "img005": "truncated", "img006": "request_failed",
    }
    assert all(r["kind"] == "conversation" and r["detail"] for r in rows)
    assert "context length exceeded" in next(r for r in rows if r["reason"] == "request_failed")["detail"]
    records = json.loads(out.read_text())
    assert len(records) == 24 - 7
    s = json.loads(summary.read_text())
    assert s["quarantined"]["refusal"] == 1 and sum(s["quarantined"].values()) == 7 and s["written"] == 17


def test_budget_stop_and_resume(server, tmp_path):
    ann = write_annotations(tmp_path / "ann.jsonl", 10)
    # 1000 $/1M tokens: each request's worst case (prompt ~1.2k tokens + 64 out) is about $1.3
    prices = ["--price-input", "1000", "--price-output", "1000", "--max-tokens", "64", "--concurrency", "2"]
    out = tmp_path / "out.json"
    code = run_cli(*openai_args(server, ann, out, tmp_path / "cache", *prices, "--max-cost", "10",
                                "--summary", str(tmp_path / "s.json")))
    assert code == 3
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["engine"]["cost"] <= 10 and s["engine"]["skipped_budget"] > 0
    first = server.request_count
    assert 0 < first < 30 and s["written"] == first
    server.reset()
    assert run_cli(*openai_args(server, ann, out, tmp_path / "cache", *prices)) == 0
    assert server.request_count == 30 - first  # the rest only: nothing paid twice
    assert len(json.loads(out.read_text())) == 30


def test_dry_run_sends_nothing(server, tmp_path, capsys):
    ann = write_annotations(tmp_path / "ann.jsonl", 5)
    out = tmp_path / "out.json"
    assert run_cli(*openai_args(server, ann, out, tmp_path / "cache", "--dry-run",
                                "--price-input", "2.5", "--price-output", "10")) == 0
    printed = capsys.readouterr().out
    assert server.request_count == 0 and not out.exists()
    assert "15 distinct requests, 0 cached, 15 to send" in printed
    low, high = map(float, re.search(r"\$([\d.]+) \(input only\) to \$([\d.]+)", printed).groups())
    assert 0 < low < high and high == pytest.approx(low + 15 * 1024 * 10 / 1e6, rel=1e-3)


def test_batch_round_trip(server, tmp_path):
    ann = write_annotations(tmp_path / "ann.jsonl", 4)
    batch_in, batch_out = tmp_path / "batch_in.jsonl", tmp_path / "batch_out.jsonl"
    assert run_cli(*openai_args(server, ann, tmp_path / "out.json", tmp_path / "cache", "--batch-write", str(batch_in))) == 0
    lines = [json.loads(line) for line in batch_in.read_text().splitlines()]
    assert len(lines) == 12 and server.request_count == 0
    assert {tuple(sorted(r)) for r in lines} == {("body", "custom_id", "method", "url")}
    assert all(r["method"] == "POST" and r["url"] == "/v1/chat/completions" and r["body"]["model"] == "fake-model" for r in lines)
    # what the Batch API returns: one line per request, in any order, one of them failed
    results = []
    for i, r in enumerate(reversed(lines)):
        if i == 0:
            results.append({"id": "batch_req_0", "custom_id": r["custom_id"], "response": None,
                            "error": {"code": "server_error", "message": "boom"}})
            continue
        body = {"id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1700000000, "model": "fake-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": good_reply(r["body"])},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
        results.append({"id": f"batch_req_{i}", "custom_id": r["custom_id"],
                        "response": {"status_code": 200, "request_id": f"req_{i}", "body": body}, "error": None})
    batch_out.write_text("".join(json.dumps(r) + "\n" for r in results))
    out = tmp_path / "out.json"
    assert run_cli(*openai_args(server, ann, out, tmp_path / "cache", "--batch-ingest", str(batch_out))) == 0
    assert server.request_count == 0
    batched = json.loads(out.read_text())
    assert len(batched) == 11
    failed = (tmp_path / "out.quarantine.jsonl").read_text()
    assert "not cached" in failed and lines[-1]["custom_id"].split("/")[0] in failed
    # a live run over the same cache fetches only the failed one, and matches a clean live run
    assert run_cli(*openai_args(server, ann, out, tmp_path / "cache")) == 0
    assert server.request_count == 1
    server.reset()
    assert run_cli(*openai_args(server, ann, tmp_path / "live.json", tmp_path / "cache2")) == 0
    assert strip_time(json.loads(out.read_text())) == strip_time(json.loads((tmp_path / "live.json").read_text()))
    # the batch file lists only what is still uncached
    assert run_cli(*openai_args(server, ann, tmp_path / "o.json", tmp_path / "cache", "--batch-write", str(batch_in))) == 0
    assert batch_in.read_text() == ""


def test_killed_run_resumes_to_the_same_output(tmp_path):
    ann = write_annotations(tmp_path / "ann.jsonl", 12)
    with FakeOpenAI(reply=lambda body: Reply(good_reply(body), delay=0.15)) as server:
        out = tmp_path / "out.json"
        cmd = [sys.executable, "-m", "vitune.datagen", "instruct",
               *openai_args(server, ann, out, tmp_path / "cache", "--concurrency", "3")]
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while server.request_count < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        killed_at = server.request_count
        assert 12 <= killed_at < 36 and not out.exists()
        cached = len(list((tmp_path / "cache").rglob("*.json")))
        assert cached >= killed_at - 3  # at most the requests in flight are lost

        server.reset()
        resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert server.request_count == 36 - cached  # nothing that was answered is asked again
        records = json.loads(out.read_text())
        assert len(records) == 36 and len({r["id"] for r in records}) == 36

        server.reset()
        reference = tmp_path / "reference.json"
        assert run_cli(*openai_args(server, ann, reference, tmp_path / "fresh-cache")) == 0
        assert strip_time(records) == strip_time(json.loads(reference.read_text()))


def test_mix_counts_and_shuffles_with_rules_teacher(tmp_path):
    ann = write_annotations(tmp_path / "ann.jsonl", 20)
    out = tmp_path / "mix.jsonl"
    assert run_cli("--annotations", str(ann), "--teacher", "rules", "--out", str(out),
                   "--mix", "conversation=12,detail=5,complex=7", "--seed", "3") == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert {k: kinds.count(k) for k in set(kinds)} == {"conversation": 12, "detail": 5, "complex": 7}
    assert kinds != sorted(kinds, key=["conversation", "detail", "complex"].index)  # shuffled
    assert len({r["id"] for r in records}) == 24
    assert all(r["teacher"] == "rules" and r["prompt_version"] == "rules/v1" for r in records)
    again = tmp_path / "again.jsonl"
    assert run_cli("--annotations", str(ann), "--teacher", "rules", "--out", str(again),
                   "--mix", "conversation=12,detail=5,complex=7", "--seed", "3") == 0
    assert strip_time([json.loads(x) for x in again.read_text().splitlines()]) == strip_time(records)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "gpt"], "unknown teacher 'gpt'"),
        (["--teacher", "rules", "--kinds", "conversation,chat"], "unknown kind 'chat'"),
        (["--teacher", "rules", "--mix", "detail=100"], "needs 100 scenes"),
        (["--teacher", "rules", "--mix", "detail:3"], "KIND=COUNT"),
        (["--teacher", "openai", "--max-cost", "1"], "--price-input"),
        (["--teacher", "rules", "--dry-run"], "openai teacher"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, capsys, args, message):
    ann = write_annotations(tmp_path / "ann.jsonl", 3)
    assert run_cli("--annotations", str(ann), "--out", str(tmp_path / "o.json"), *args) == 2
    assert message in capsys.readouterr().err


def test_bad_annotation_line_names_file_and_line(tmp_path, capsys):
    ann = write_annotations(tmp_path / "ann.jsonl", 2)
    with ann.open("a") as f:
        f.write('{"id": "x", "instances": [{"bbox": [0, 0, 1, 1]}]}\n')
    assert run_cli("--annotations", str(ann), "--teacher", "rules", "--out", str(tmp_path / "o.json")) == 2
    assert f"{ann}:3" in capsys.readouterr().err
