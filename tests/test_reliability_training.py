"""Training survives crashes and says clearly when the disk is full or not writable.

- SIGKILL at a random step, then `--resume`: the final weights equal an uninterrupted run's, bit
  for bit (CPU), and so do the logged losses;
- a crash in the middle of writing a checkpoint leaves the previous one valid and loadable, and
  leftovers of the torn write (a temp dir, a step dir without its state file) are ignored; resuming
  loads torch files with `weights_only=True` only;
- a full disk (a real 1 MB-scale tmpfs when we may mount one) and a read-only / unwritable output
  end with one clear line naming what could not be written and how to go on; after freeing space,
  `--resume` finishes with the same weights."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitune.cli import main
from vitune.train.config import load_config
from vitune.train.trainer import STATE_FILE, checkpoint_dirs, run_training

SRC = str(Path(__file__).resolve().parents[1] / "src")
STEPS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vitune.data.tiny import make_tiny_dataset

    root = tmp_path_factory.mktemp("reliability-train-data")
    make_tiny_dataset(root, n=16, stage=2, text_only=0.25, seed=0)
    return root


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "run.yaml"
    path.write_text("train: {seed: 0}\n")
    return path


def overrides(model: Path, data: Path, out: Path) -> list[str]:
    return [f"model.path={model}", f"data.path={data / 'stage2.json'}", f"data.image_folder={data}",
            "stage.parts.projector=2e-3", "stage.parts.llm=2e-3", "stage.lora=null", "train.batch_size=4",
            "train.micro_batch_size=2", f"train.max_steps={STEPS}", "optim.warmup_steps=2", "train.save_every=1",
            "train.keep_last=2", "train.progress=false", "train.log_every=1", "data.check_images=open",
            f"train.output_dir={out}"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    return run_training(load_config(None, overrides(tiny_model_dir, data_dir, tmp_path_factory.mktemp("ref") / "run")))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, ref: Path) -> None:
    a, b = weights(run), weights(ref)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    assert losses(run) == losses(ref)


def metric_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(
        tiny_model_dir: Path, data_dir: Path, preset: Path, tmp_path: Path) -> None:
    # Every run here is a fresh process, as a user's would be: an earlier test in this worker
    # process can leave state behind that changes CPU numerics (seen in 2 of 3 full-suite runs:
    # the in-process reference then differed from a subprocess run in the last ulp).
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "vitune.cli", "train", str(preset), *overrides(tiny_model_dir, data_dir, out), *extra]

    reference = tmp_path / "reference"
    subprocess.run(cmd(reference), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=240)
    out = tmp_path / "run"
    kill_after = random.Random().randint(1, STEPS - 2)
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        # (before the first checkpoint there is nothing to resume: that run is simply started again)
        while metric_lines(out) < kill_after or not checkpoint_dirs(out):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists(), f"killed after step {kill_after}, yet the final model exists"
    assert checkpoint_dirs(out), f"no checkpoint after step {kill_after}"
    resumed = subprocess.run(cmd(out, "--resume"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=240)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert_same_run(out, reference)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(
        tiny_model_dir: Path, data_dir: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitune.train import trainer

    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_model_dir, data_dir, out))
    real = trainer.atomic_write_json

    def crash_at_step_3(path: Path, obj: object, **kw: object) -> None:
        if Path(path).name == STATE_FILE and isinstance(obj, dict) and obj.get("step") == 3:
            raise RuntimeError("simulated crash in the middle of writing checkpoint 3")  # weights and optimizer already written
        real(path, obj, **kw)

    monkeypatch.setattr(trainer, "atomic_write_json", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg)
    monkeypatch.undo()
    ckpt = out / "checkpoints"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000001", "step-000002"]
    assert not (ckpt / "step-000003").exists(), "a half-written checkpoint must not appear under its final name"
    last = ckpt / "step-000002"
    assert json.loads((last / STATE_FILE).read_text())["step"] == 2
    assert load_file(str(last / "model.safetensors")), "the previous checkpoint must load"
    # what a SIGKILL in the middle of a write leaves behind: a temp dir, a step dir without its state
    torn = ckpt / ".step-000003.abc123.tmp"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes((last / "model.safetensors").read_bytes()[:1000])
    (ckpt / "step-000004").mkdir()
    (ckpt / "step-000004" / "model.safetensors").write_bytes(b"torn")

    loads: list[object] = []
    original_load = torch.load

    def spy(*args: object, **kw: object) -> object:
        loads.append(kw.get("weights_only"))
        return original_load(*args, **kw)

    monkeypatch.setattr(torch, "load", spy)
    run_training(cfg, resume=True)
    monkeypatch.undo()
    assert loads and all(w is True for w in loads), f"torch.load calls while resuming: weights_only={loads}"
    assert_same_run(out, reference)


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int) -> Iterator[bool]:
    """A tmpfs of `size_kb` at `path` when this process may mount one (yields True), else a plain dir (False)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = shutil.which("mount") is not None and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def dir_kb(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) // 1024 + 1


def test_disk_full_is_a_clear_message_and_resume_finishes(
        tiny_model_dir: Path, data_dir: Path, preset: Path, reference: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    one_checkpoint = dir_kb(checkpoint_dirs(reference)[-1])
    disk = tmp_path / "disk"
    # room for the config, the metrics and one checkpoint, not two
    with small_disk(disk, one_checkpoint * 3 // 2 + 48) as mounted:
        out = disk / "run"
        args = ["train", str(preset), *overrides(tiny_model_dir, data_dir, out)]
        if not mounted:  # no tmpfs: the writer fails as torch does on a full disk, and no space is left
            import accelerate.checkpointing as acc_checkpointing

            from vitune.train import trainer

            real_save = acc_checkpointing.save

            def full_after_one_checkpoint(obj: object, f: object, *a: object, **kw: object) -> None:
                if ".step-000001." not in str(f):  # the first checkpoint's temp dir fits, nothing after it
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 19392 vs 19280")
                real_save(obj, f, *a, **kw)

            monkeypatch.setattr(acc_checkpointing, "save", full_after_one_checkpoint)
            monkeypatch.setattr(trainer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 20, 1 << 20, 1024))
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitune train: error: could not write checkpoint step-") and "Traceback" not in err
        assert "no space left on the device" in err and "MiB free" in err
        assert "step-000001, is intact: continue with --resume" in err
        valid = checkpoint_dirs(out)
        assert [p.name for p in valid] == ["step-000001"] and load_file(str(valid[0] / "model.safetensors"))
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "the failed write was cleaned up"
        # space is freed: the run continues from the intact checkpoint to the same weights
        if mounted:
            subprocess.run(["mount", "-o", f"remount,size={one_checkpoint * 8 + 2048}k", str(disk)], check=True)
        else:
            monkeypatch.undo()
        assert main([*args, "--resume"]) == 0
        assert_same_run(out, reference)


def test_unwritable_output_is_a_clear_message(tiny_model_dir: Path, data_dir: Path, preset: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    with small_disk(locked, 64) as mounted:
        if mounted:  # root ignores permission bits: a read-only file system refuses even root
            subprocess.run(["mount", "-o", "remount,ro", str(locked)], check=True)
        else:
            locked.chmod(0o555)
        try:
            out = locked / "run"
            assert main(["train", str(preset), *overrides(tiny_model_dir, data_dir, out)]) == 2
            err = capsys.readouterr().err
            assert "Traceback" not in err and str(out) in err
            assert ("read-only" in err) if mounted else ("permission denied" in err)
            # the same for the other writers: evaluation answers and generated data
            questions = tmp_path / "q.jsonl"
            questions.write_text('{"question_id": 0, "image": "001.png", "text": "what?", "category": "conv"}\n')
            ans = locked / "answers.jsonl"
            code = main(["eval", "answer", "llava-bench", "--questions", str(questions), "--images", str(tmp_path),
                         "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(ans), "--quiet"])
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err and str(locked) in err
        finally:
            if not mounted:
                locked.chmod(0o755)
