"""Distributed training on the CPU: two processes over gloo, started by `accelerate launch`, match
the single-process loss trajectory for the same global batch (there: 2 micro-batches accumulated).

accelerate 1.x's `--cpu --num_processes 2` starts one process unless mpirun is configured, so the
launch uses the shipped `cpu-ddp.yaml` (its torchrun-based launcher): without CUDA, each process
trains on the CPU and DDP runs over gloo.
Text-only micro-batches are in the mix, which DDP only survives if the idle projector still joins
the graph.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import vitune.train
from vitune.data.tiny import make_tiny_dataset
from vitune.train.config import load_config
from vitune.train.trainer import run_training


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_cpu_processes_match_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "data", n=32, stage=2, text_only=0.25, seed=2)
    overrides = [f"model.path={tiny_model_dir}", f"data.path={data}", "stage.parts.projector=3e-3", "stage.parts.llm=3e-3",
                 "train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=5", "optim.warmup_steps=1",
                 "train.progress=false", "train.save_every=3", "train.cpu=true"]
    preset = tmp_path / "run.yaml"
    preset.write_text(load_config(None, overrides).to_yaml())
    single = run_training(load_config(preset, [f"train.output_dir={tmp_path / 'single'}"]))

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    launch_config = Path(vitune.train.__file__).parent / "accelerate" / "cpu-ddp.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
           "--main_process_port", str(free_port()),
           "-m", "vitune.cli", "train", str(preset), f"train.output_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = tmp_path / "ddp"
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["accumulation"] == 1
    assert json.loads((single / "summary.json").read_text())["accumulation"] == 2
    a, b = losses(single), losses(ddp)
    assert len(a) == len(b) == 5
    assert b == pytest.approx(a, rel=1e-4), (a, b)
    assert (ddp / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-000003"]
