"""The training loop, as one linear story: config -> model -> stage -> data -> accelerate -> steps -> outputs.

`run_training(config)` runs stage 1 or stage 2 alike (what differs is the config) and returns
the run directory:

    RUN/config.yaml        the resolved configuration
    RUN/metrics.jsonl      one line per logged step: step, epoch, loss, lr, lr/<part>, grad_norm, ...
    RUN/checkpoints/       step-NNNNNN/ every `train.save_every` steps (atomic; the last K kept)
    RUN/model/             the full model (LoRA merged), loadable by `Pipeline.from_pretrained`
    RUN/projector/         the trained projector alone (stage 1's product; stage 2 starts from it)
    RUN/lora/              the LoRA adapter (LoRA runs)
    RUN/quarantine.jsonl   skipped records with their reasons (when any)
    RUN/summary.json       steps, samples, seconds, final loss, data report

Distribution, mixed precision and gradient accumulation are accelerate's (`accelerate launch`
with a DDP / FSDP / DeepSpeed config). The loss of a step is the weighted mean over all label
tokens of the global batch (`train.loss_weighting`: per token, per sample or in between), whatever
its split into processes and micro-batches, so one process with accumulation and N processes
without give the same numbers. A frozen vision tower's features
are cached per image (optional) so repeated images skip decoding and the encoder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitune.errors import VituneError
from vitune.io import atomic_dir, atomic_write_json, atomic_write_text
from vitune.train.config import FROZEN, Config

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
RATE_WINDOW = 32  # steps over which a time-budgeted run measures its step rate


# -- small pieces ----------------------------------------------------------------------------------


def resolve_precision(requested: str, on_gpu: bool, bf16_ok: bool) -> str:
    """accelerate's mixed_precision value: bf16 (or fp16) on a GPU, none on the CPU."""
    if not on_gpu:
        if requested in ("bf16", "fp16"):
            print(f"train.precision={requested} ignored on the CPU (far slower there): training in fp32", file=sys.stderr)
        return "no"
    if requested == "auto":
        return "bf16" if bf16_ok else "fp16"
    return {"fp32": "no"}.get(requested, requested)


class MetricsLog:
    """metrics.jsonl, appended and flushed per line (a kill loses at most the line in flight)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        self._file = None
        if not enabled:
            return
        if keep_until_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            # Resuming: lines logged after the checkpoint are redone, so drop them.
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line)
            atomic_write_text(path, "".join(x + "\n" for x in kept))
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class FeatureCache:
    """Vision features per image key, for a frozen vision tower: each image is encoded once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.store: dict[int, torch.Tensor] = {}

    def features(self, batch: dict[str, Any], encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 dataset: Any) -> torch.Tensor | None:
        keys = batch["image_keys"].tolist()
        if not keys:
            return None
        pixel_keys = batch["pixel_keys"].tolist()
        todo = [row for row, k in enumerate(pixel_keys) if k not in self.store]
        if todo:
            pixels = batch["pixel_values"][todo].to(device, non_blocking=True)
            with torch.no_grad():
                feats = encode(pixels)
            for row, f in zip(todo, feats, strict=True):
                self.store[pixel_keys[row]] = f.detach()
                dataset.cached[pixel_keys[row]] = True
        missing = [k for k in keys if k not in self.store]
        if missing:
            raise RuntimeError(f"feature cache: no pixels nor features for images {missing[:4]}")
        return torch.stack([self.store[k] for k in keys])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(run_dir: Path, resume: bool | str) -> Path | None:
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("latest", "true"):
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise VituneError(f"--resume {path}: not a checkpoint directory (no {STATE_FILE})")
        return path
    found = checkpoint_dirs(run_dir)
    if not found:
        raise VituneError(f"--resume: no checkpoint in {run_dir / CHECKPOINT_DIR}")
    return found[-1]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


# -- the run ---------------------------------------------------------------------------------------


def run_training(
    config: Config,
    resume: bool | str = False,
    on_step: Callable[[dict[str, Any]], bool | None] | None = None,
) -> Path:
    """Train as `config` says and return the run directory.

    `resume`: True/"latest" continues from the last checkpoint of `train.output_dir`, a path from
    that checkpoint. `on_step(metrics)` is called after every optimizer step on every process;
    returning True stops the run cleanly after a checkpoint (as SIGTERM/SIGINT do), without the
    final export, so `resume` can continue it. Subnormal floats are flushed while it runs
    (`vitune.cpu.flush_subnormals`).
    """
    from vitune.cpu import flush_subnormals

    with flush_subnormals():
        return _run_training(config, resume, on_step)


def _run_training(
    config: Config,
    resume: bool | str,
    on_step: Callable[[dict[str, Any]], bool | None] | None,
) -> Path:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, broadcast_object_list, set_seed

    from vitune.data.collate import Collator
    from vitune.data.dataset import Quarantine, SupervisedDataset, prepare_data
    from vitune.data.sampler import plan_epoch, rank_micro_batches
    from vitune.train.model_setup import TrainingModule, apply_stage, load_for_training, param_groups, set_train_modes
    from vitune.train.optim import build_optimizer
    from vitune.train.schedule import lr_factor, time_horizon, warmup_steps_for

    config.check()
    tc = config.train
    run_dir = Path(tc.output_dir)

    # -- processes, precision, the run directory --------------------------------------------------
    # Processes started by torchrun (`accelerate launch --multi_gpu`) on a machine without CUDA:
    # DDP on the CPU over gloo, which accelerate only sets up when told it is on the CPU.
    cpu = tc.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    on_gpu = state.device.type == "cuda"
    precision = resolve_precision(tc.precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    W = state.num_processes
    if tc.batch_size % (tc.micro_batch_size * W):
        raise VituneError(f"train.batch_size {tc.batch_size} is not a multiple of micro_batch_size {tc.micro_batch_size} "
                          f"x {W} processes")
    accum = tc.batch_size // (tc.micro_batch_size * W)
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for tracker in tc.report_to:
        if tracker not in available:
            raise VituneError(f"train.report_to: unknown tracker {tracker!r} (tensorboard, wandb)")
        if not available[tracker]():
            raise VituneError(f"train.report_to: {tracker} is not installed (`pip install {tracker}`); "
                              "metrics.jsonl is always written")
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=accum,
                              log_with=list(tc.report_to) or None, project_dir=str(run_dir))
    main = accelerator.is_main_process
    say = accelerator.print
    checkpoint = find_checkpoint(run_dir, resume)
    if main:
        _prepare_run_dir(run_dir, fresh=checkpoint is None, overwrite=tc.overwrite)
        atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    accelerator.wait_for_everyone()
    set_seed(tc.seed)

    # -- model and stage --------------------------------------------------------------------------
    model, processor = load_for_training(config)
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    plan = apply_stage(model, config, compute_dtype)
    set_train_modes(model, config.model.gradient_checkpointing)
    for part in plan:
        say(f"  {part.name:9s} {'frozen' if part.lr is None else f'lr {part.lr:g}'}"
            f"{'' if part.lr is None else f', {part.params / 1e6:.3f}M trainable parameters'}"
            f"{' (LoRA adapters)' if part.name == 'llm' and config.stage.lora is not None else ''}")
    vision_frozen = config.stage.parts.vision == FROZEN

    # -- data -------------------------------------------------------------------------------------
    dc = config.data
    quarantine_path = Path(dc.quarantine) if dc.quarantine else run_dir / "quarantine.jsonl"
    quarantine = Quarantine(quarantine_path, write=main)
    with contextlib.suppress(FileNotFoundError):
        if main:
            quarantine_path.unlink()  # rewritten from scratch: preparation is deterministic
    data = prepare_data(dc.path, processor, processor.template, dc.max_length, dc.image_folder, dc.format,
                        dc.on_bad_record, dc.check_images, quarantine, dc.limit, progress=main and tc.progress)
    quarantine.close()
    report = data.summary()
    say(f"data: {report['records']} records, {report['kept']} kept, {report['skipped']} skipped"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(report['skipped_by_kind'].items()))}) -> {quarantine_path}" if report["skipped"] else "")
        + (f", {report['truncated']} truncated" if report["truncated"] else ""))
    if len(data) < tc.batch_size:
        raise VituneError(f"only {len(data)} usable samples, fewer than one global batch (train.batch_size={tc.batch_size})")
    dataset = SupervisedDataset(data, processor, dc.on_bad_record)
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    collator = Collator(pad_id, dc.pad_to_multiple_of, processor.preprocess_images)
    has_image = data.has_image
    spe = len(data) // tc.batch_size
    total_steps = tc.max_steps if tc.max_steps is not None else max(1, math.ceil(tc.epochs * spe))
    warmup = warmup_steps_for(total_steps, config.optim.warmup_ratio, config.optim.warmup_steps)
    left_out = len(data) - spe * tc.batch_size
    say(f"steps: {total_steps} ({spe} per epoch, global batch {tc.batch_size} = {tc.micro_batch_size} x {W} processes "
        f"x {accum} accumulation; warmup {warmup}; precision {precision}; {left_out} samples per epoch left out of the last batch)")

    # -- optimizer, accelerate --------------------------------------------------------------------
    module = TrainingModule(model, compile_decoder=tc.compile)
    oc = config.optim
    groups = param_groups(model, plan, oc.weight_decay)
    fused_ok = precision != "fp16"  # fused AdamW runs on CPU too (torch >= 2.4), several times faster than foreach
    if oc.name == "muon" and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise VituneError("optim.name=muon orthogonalises whole weight matrices: it runs on one device or under DDP, "
                          "not under FSDP or DeepSpeed (use optim.name=adamw there)")
    optimizer = build_optimizer(oc.name, model, groups, tuple(oc.betas), oc.eps, fused_ok, oc.muon_momentum, oc.muon_lr_scale)
    _configure_deepspeed(accelerator, tc.micro_batch_size, accum, oc.max_grad_norm)
    module, optimizer = accelerator.prepare(module, optimizer)
    unwrapped = accelerator.unwrap_model(module)
    _register_checkpoint_hooks(accelerator, unwrapped)
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]

    start_step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        saved = json.loads((checkpoint / STATE_FILE).read_text())
        if saved.get("steps_per_epoch") != spe or saved.get("total_steps") != total_steps:
            raise VituneError(f"{checkpoint}: saved with {saved.get('steps_per_epoch')} steps per epoch and "
                              f"{saved.get('total_steps')} total, this run has {spe} and {total_steps}: the data or "
                              "the config changed since")
        start_step = int(saved["step"])
        say(f"resumed from {checkpoint} at step {start_step}")
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", main, start_step if checkpoint is not None else None)
    if tc.report_to:
        accelerator.init_trackers(run_dir.name, config=_flat(config.to_dict()))

    # -- feature cache ----------------------------------------------------------------------------
    cache_mode = tc.cache_image_features
    if cache_mode == "on" and not vision_frozen:
        raise VituneError("train.cache_image_features=on needs a frozen vision tower (stage.parts.vision=frozen)")
    feat_bytes = len(data.image_paths) * model.config.num_image_tokens * model.vision.hidden_size * (2 if precision != "no" else 4)
    if cache_mode == "on" and _sharded(accelerator):
        raise VituneError("train.cache_image_features=on cannot run under FSDP / ZeRO-3 (the encoder's weights are sharded)")
    cache = FeatureCache(vision_frozen and not _sharded(accelerator) and (
        cache_mode == "on" or (cache_mode == "auto" and feat_bytes <= tc.feature_cache_gb * 1024**3)))
    if cache.enabled:
        say(f"caching frozen vision features: {len(data.image_paths)} images, up to {feat_bytes / 1024**2:.1f} MiB")

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():
            return unwrapped.llava.vision(pixels.to(dtype=next(unwrapped.llava.vision.parameters()).dtype))

    # -- the loop ---------------------------------------------------------------------------------
    stop = {"flag": False}

    def request_stop(signum: int, frame: Any) -> None:
        stop["flag"] = True

    previous_handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread
            previous_handlers[sig] = signal.signal(sig, request_stop)

    # Each label token of a sample with n of them weighs n ** -power; a step divides by the global
    # batch's total weight. Computed from the plan, so every process agrees without talking.
    power = {"token": 0.0, "sample": 1.0, "square": 0.5}[tc.loss_weighting]
    token_weight = np.zeros(len(data.num_supervised), dtype=np.float64)
    supervised = data.num_supervised > 0
    token_weight[supervised] = data.num_supervised[supervised].astype(np.float64) ** -power
    sample_weight = token_weight * data.num_supervised  # a sample's share of its step's total

    def step_batches(first: int, last: int) -> Iterator[tuple[int, list[dict[str, Any]], float]]:
        """(step, this process's micro-batches, total loss weight of the global batch) for steps [first, last)."""
        step = first
        while step < last:
            epoch, pos = divmod(step, spe)
            epoch_plan = plan_epoch(data.lengths, has_image, tc.batch_size, tc.micro_batch_size, tc.seed, epoch,
                                    dc.group_by_modality_length, dc.length_window)
            end = min(spe, pos + (last - step))
            mine = [rank_micro_batches(epoch_plan[s], accelerator.process_index, W) for s in range(pos, end)]
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=[mb for step_mbs in mine for mb in step_mbs], collate_fn=collator,
                num_workers=dc.num_workers, pin_memory=on_gpu, persistent_workers=False,
                prefetch_factor=4 if dc.num_workers > 0 else None,
            )
            it = iter(loader)
            for s in range(pos, end):
                total_weight = float(sample_weight[np.concatenate(epoch_plan[s])].sum())
                yield step, [next(it) for _ in range(accum)], total_weight
                step += 1

    bar = None
    if main and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"{config.stage.name}", unit="step", file=sys.stderr,
                   dynamic_ncols=True)
    device = accelerator.device
    if cache.enabled and start_step > 0:
        # An image's features depend on the batch it was first encoded in (CPU kernels round by
        # batch shape and row), so a resumed run refills the cache as the interrupted run filled it:
        # the same micro-batches in the same order, until every image is in (measured without
        # this: weights 1 ulp off the uninterrupted run's from the first step of the next epoch).
        for _, micro_batches, _ in step_batches(0, start_step):
            for mb in micro_batches:
                if mb["indices"]:
                    cache.features(mb, encode, device, dataset)
            if len(cache.store) >= len(data.image_paths):
                break
    t_start = time.perf_counter()
    t_log, samples_since, tokens_since = time.perf_counter(), 0, 0
    pending: list[tuple[torch.Tensor, float]] = []
    samples_seen = start_step * tc.batch_size
    last_metrics: dict[str, Any] = {}
    bad_count = 0
    grad_norm: Any = None
    step = start_step
    stopped = False
    stopped_by = None
    done = start_step
    lr_now: dict[str, float] = {}
    # The schedule's end: the planned steps, or with train.max_seconds the step the time will run
    # out at, from the step rate over the last RATE_WINDOW steps (compile stalls age out of it).
    horizon = total_steps
    clock: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)
    try:
        for step, micro_batches, total_weight in step_batches(start_step, total_steps):
            factor = lr_factor(step, horizon, warmup, oc.schedule, oc.min_lr_ratio, oc.decay_ratio)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
                lr_now[g["name"].split("/")[0]] = g["lr"]
            loss_local = torch.zeros((), device=device)
            for mb in micro_batches:
                for bad in mb["bad"]:
                    bad_count += 1
                    if main:
                        say(f"skipped at load time: {bad}")
                        late = Quarantine(quarantine_path, write=True)
                        late.add(bad)
                        late.close()
                if not mb["indices"]:
                    if W > 1:
                        raise VituneError("a whole micro-batch failed to load in a distributed run; "
                                          "check images up front with data.check_images=decode")
                    continue
                with accelerator.accumulate(module):
                    ids = mb["input_ids"].to(device, non_blocking=True)
                    kwargs: dict[str, Any] = {}
                    if cache.enabled:
                        kwargs["vision_features"] = cache.features(mb, encode, device, dataset)
                    elif mb["pixel_values"] is not None:
                        kwargs["pixel_values"] = mb["pixel_values"].to(device, non_blocking=True)
                    if power:
                        kwargs["sample_weights"] = torch.from_numpy(token_weight[mb["indices"]]).to(device)
                    loss_sum = module(ids, mb["attention_mask"].to(device, non_blocking=True),
                                      mb["labels"].to(device, non_blocking=True), **kwargs)
                    # Weighted mean over the global batch's label tokens, whatever the split (see the module doc).
                    accelerator.backward(loss_sum * (W * accum / max(1e-12, total_weight)))
                    if accelerator.sync_gradients and oc.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(trainable, oc.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_local += loss_sum.detach()
                samples_since += len(mb["indices"])
                tokens_since += int(mb["attention_mask"].sum())
            pending.append((loss_local, total_weight))
            done = step + 1
            samples_seen += tc.batch_size
            if bar is not None:
                bar.update(1)
            out_of_time = False
            if tc.max_seconds is not None:
                elapsed = time.perf_counter() - t_start
                if W > 1:  # clocks differ: every process takes the slowest one's, so all stop and decay together
                    elapsed = float(accelerator.reduce(torch.tensor(elapsed, device=device, dtype=torch.float64), "max").item())
                out_of_time = done < total_steps and elapsed >= tc.max_seconds
                clock.append((elapsed, done))
                if len(clock) > 1 and clock[-1][0] > clock[0][0]:
                    rate = (clock[-1][1] - clock[0][1]) / (clock[-1][0] - clock[0][0])
                    horizon = time_horizon(done, total_steps, elapsed, tc.max_seconds, rate)
            if done % tc.log_every == 0 or done == total_steps or out_of_time:
                sums = accelerator.reduce(torch.stack([p[0] for p in pending]), reduction="sum")
                loss = float((sums.cpu() / torch.tensor([max(1e-12, p[1]) for p in pending], dtype=torch.float32)).mean())
                pending.clear()
                elapsed = time.perf_counter() - t_log
                rate = accelerator.reduce(torch.tensor([samples_since, tokens_since], device=device, dtype=torch.float64), "sum").tolist()
                last_metrics = {"step": done, "epoch": round(done / spe, 4), "loss": round(loss, 6),
                                "lr": max(lr_now.values()), **{f"lr/{k}": v for k, v in lr_now.items()},
                                "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                                "samples": samples_seen, "samples_per_s": round(rate[0] / max(elapsed, 1e-9), 2),
                                "tokens_per_s": round(rate[1] / max(elapsed, 1e-9), 1),
                                "elapsed_s": round(time.perf_counter() - t_start, 2)}
                metrics_log.write(last_metrics)
                if tc.report_to:
                    accelerator.log({k: v for k, v in last_metrics.items() if isinstance(v, (int, float))}, step=done)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{last_metrics['lr']:.2e}", samples_s=f"{last_metrics['samples_per_s']:.1f}")
                t_log, samples_since, tokens_since = time.perf_counter(), 0, 0
            want_stop = bool(on_step(dict(last_metrics, step=done)) if on_step is not None else False) or stop["flag"]
            if W > 1:
                want_stop = bool(accelerator.reduce(torch.tensor(int(want_stop), device=device), "sum").item())
            if (tc.save_every and done % tc.save_every == 0 and done < total_steps) or (want_stop and done < total_steps):
                with _write_errors(f"checkpoint step-{done:06d}", run_dir, 3 * _nbytes(trainable)):  # weights + 2 Adam moments
                    _save_checkpoint(accelerator, run_dir, done, tc.keep_last, {"steps_per_epoch": spe, "total_steps": total_steps,
                                     "samples_seen": samples_seen}, broadcast_object_list)
            if want_stop and done < total_steps:
                stopped = True
                say(f"stopped at step {done}; continue with --resume")
                break
            if out_of_time:
                stopped_by = "max_seconds"
                say(f"train.max_seconds={tc.max_seconds:g} reached at step {done} of {total_steps}: finishing the run there")
                break
    finally:
        if bar is not None:
            bar.close()
        metrics_log.close()
        for sig, handler in previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)

    if not stopped:
        with _write_errors("the trained model", run_dir, _nbytes(list(unwrapped.parameters()))):
            _export(accelerator, module, unwrapped, processor, config, run_dir, plan)
        if main:
            atomic_write_json(run_dir / "summary.json", {
                "steps": done, "planned_steps": total_steps, "stopped_by": stopped_by, "samples": samples_seen, "seconds": round(time.perf_counter() - t_start, 2),
                "final_loss": last_metrics.get("loss"), "data": report, "skipped_at_load": bad_count,
                "processes": W, "accumulation": accum, "precision": precision,
                "feature_cache": cache.enabled})
            say(f"done: {run_dir} (final loss {last_metrics.get('loss')})")
    if tc.report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return run_dir


def check_data(config: Config, quarantine: str | Path | None = None) -> dict[str, Any]:
    """Validate and tokenize the config's data as training would, without a model or a run:
    the report (records, kept, skipped by kind, truncated, tokens); skipped records go to
    `quarantine` (default: data.quarantine, else none)."""
    from vitune.data.dataset import Quarantine, prepare_data
    from vitune.processor import LlavaProcessor
    from vitune.templates import get_template
    from vitune.train.model_setup import resolve_model_dir

    dc = config.data
    processor = LlavaProcessor.from_pretrained(resolve_model_dir(config.model.path))
    if config.stage.template:
        processor.template = get_template(config.stage.template)
    target = quarantine or dc.quarantine
    if target is not None:
        with contextlib.suppress(FileNotFoundError):
            Path(target).unlink()
    q = Quarantine(target)
    try:
        data = prepare_data(dc.path, processor, processor.template, dc.max_length, dc.image_folder, dc.format,
                            dc.on_bad_record, dc.check_images, q, dc.limit, progress=config.train.progress)
    finally:
        q.close()
    report = data.summary()
    report["quarantine"] = str(target) if target is not None and report["skipped"] else None
    return report


# -- run directory, checkpoints, export -------------------------------------------------------------


_RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "quarantine.jsonl", "model", "projector", "lora", CHECKPOINT_DIR)


def _prepare_run_dir(run_dir: Path, fresh: bool, overwrite: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not fresh:
        return
    existing = [name for name in _RUN_OUTPUTS if (run_dir / name).exists()]
    # A start that died before its first step (bad data, a typo) left nothing worth protecting.
    worth = [n for n in existing if n not in ("config.yaml", "quarantine.jsonl", "metrics.jsonl")
             or (n == "metrics.jsonl" and (run_dir / n).stat().st_size > 0)]
    if worth and not overwrite:
        raise VituneError(f"{run_dir} already holds a run ({', '.join(worth)}): continue it with --resume, "
                          "or start over with train.overwrite=true, or pick another train.output_dir")
    for name in existing:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def _trainable_params(unwrapped: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters a checkpoint holds, by name, ties removed (safetensors refuses shared storage)."""
    out = []
    seen: set[int] = set()
    for name, p in unwrapped.named_parameters():
        if p.requires_grad and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out.append((name, p))
    return out


def _trainable_state(unwrapped: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The trainable tensors, copied to the CPU for saving."""
    return OrderedDict((name, p.detach().contiguous().cpu()) for name, p in _trainable_params(unwrapped))


def _load_trainable(unwrapped: torch.nn.Module, weights: Path) -> None:
    """Load a checkpoint's trainable weights into the training module they were saved from."""
    from safetensors.torch import load_file

    where = weights.parent
    state = load_file(str(weights))
    missing = [k for k, _ in _trainable_params(unwrapped) if k not in state]  # names only: no copy of the weights
    if missing:
        raise VituneError(f"{where}: checkpoint lacks trainable weights {missing[:4]}: saved by a different stage config?")
    unexpected = unwrapped.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise VituneError(f"{where}: checkpoint holds weights the model does not have {unexpected[:4]}: saved by a different stage config?")


def _register_checkpoint_hooks(accelerator: Any, unwrapped: torch.nn.Module) -> None:
    """Checkpoints hold the trainable weights only (a stage-1 checkpoint is the projector, not 7B of
    frozen weights); DeepSpeed and FSDP keep their own sharded formats."""
    from accelerate.utils import SAFE_WEIGHTS_NAME, DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if weights:
            weights[0] = _trainable_state(unwrapped)

    def load_hook(models: list[Any], input_dir: str) -> None:
        if not models:
            return
        models.pop(0)  # loaded here, not by accelerate's strict full-model load
        _load_trainable(unwrapped, Path(input_dir) / SAFE_WEIGHTS_NAME)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _nbytes(params: list[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@contextlib.contextmanager
def _write_errors(what: str, run_dir: Path, need_bytes: int) -> Iterator[None]:
    """A checkpoint or model write that fails for lack of space or permission ends in a VituneError
    saying what, where and how to go on. torch and safetensors report a full disk in their own words
    ("unexpected pos ..."), so the free space is compared with what the write needs as well."""
    try:
        yield
    except VituneError:
        raise
    except Exception as err:
        code = err.errno if isinstance(err, OSError) else None
        try:
            free: int | None = shutil.disk_usage(run_dir).free
        except OSError:
            free = None
        full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err) or "os error 28" in str(err) \
            or (free is not None and free < need_bytes)
        if not full and code not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        valid = checkpoint_dirs(run_dir)
        resume = (f"the last valid checkpoint, {valid[-1].name}, is intact: continue with --resume" if valid
                  else "no checkpoint was written yet")
        if full:
            space = f" ({free / 2**20:.1f} MiB free, about {need_bytes / 2**20:.1f} MiB needed)" if free is not None else ""
            raise VituneError(f"could not write {what} under {run_dir}: no space left on the device{space}; "
                              f"free some space, then {resume}") from err
        raise VituneError(f"could not write {what} under {run_dir}: {err.strerror} ({err.filename}); "  # type: ignore[union-attr]
                          f"fix the permissions or pick another train.output_dir; {resume}") from err


def _save_checkpoint(accelerator: Any, run_dir: Path, step: int, keep_last: int, extra: dict[str, Any],
                     broadcast_object_list: Callable[..., Any]) -> None:
    final = run_dir / CHECKPOINT_DIR / f"step-{step:06d}"
    with contextlib.ExitStack() as stack:
        name = [None]
        if accelerator.is_main_process:
            name = [str(stack.enter_context(atomic_dir(final)))]
        if accelerator.num_processes > 1:
            broadcast_object_list(name)
        accelerator.save_state(name[0])
        if accelerator.is_main_process:
            atomic_write_json(Path(name[0]) / STATE_FILE, {"step": step, **extra})
        accelerator.wait_for_everyone()
    if accelerator.is_main_process and keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _configure_deepspeed(accelerator: Any, micro: int, accum: int, max_grad_norm: float) -> None:
    """Fill DeepSpeed's "auto" values that accelerate cannot infer without a prepared DataLoader."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = micro
    if ds.get("gradient_accumulation_steps", "auto") == "auto":
        ds["gradient_accumulation_steps"] = accum
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = max_grad_norm
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = micro * accum * accelerator.num_processes


def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3
    return False


def _export(accelerator: Any, module: Any, unwrapped: Any, processor: Any, config: Config, run_dir: Path, plan: list[Any]) -> None:
    """The run's outputs (`write_outputs`), gathered from the shards of an FSDP or DeepSpeed run."""
    if _sharded(accelerator):
        # Parameters live in shards: gather a full state dict and rebuild the model on the CPU.
        state = accelerator.get_state_dict(module)
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return
        from vitune.model.llava import LlavaModel
        from vitune.train import lora as lora_mod

        lora = config.stage.lora
        llava = LlavaModel(unwrapped.llava.config)
        if lora is not None:
            lora_mod.apply_lora(llava, lora.r, lora.alpha, lora.dropout, lora.target_modules, 16)
        llava.load_state_dict({k.removeprefix("llava."): v for k, v in state.items()}, strict=False)
    else:
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return
        llava = unwrapped.llava
    write_outputs(llava, processor, config, run_dir, plan)
    accelerator.wait_for_everyone()


def write_outputs(llava: Any, processor: Any, config: Config, run_dir: Path, plan: list[Any]) -> None:
    """A run's model outputs from its trained LlavaModel: model/ (LoRA merged), projector/ when the
    projector trained, lora/ for LoRA runs. Merging LoRA changes `llava` in place."""
    from vitune.templates import get_template
    from vitune.train import lora as lora_mod

    trained = {p.name for p in plan if p.lr is not None}
    lora = config.stage.lora
    llava.eval()
    if config.stage.template and config.stage.template != "plain":
        # The chat template a model was tuned with is the one it must be served with; `plain` is
        # stage 1's alignment format, not a chat format, so the model keeps its own.
        llava.config.template = config.stage.template
    processor.template = get_template(llava.config.template)
    if "projector" in trained:
        llava.save_projector(run_dir / "projector")
    if lora is not None:
        from vitune.train.model_setup import resolve_model_dir, resolve_projector_dir

        meta = {"base_model": str(resolve_model_dir(config.model.path).resolve()), "template": llava.config.template,
                "projector_in_adapter": False, "projector_trained": "projector" in trained, "r": lora.r, "alpha": lora.alpha}
        lora_mod.save_adapter(llava, run_dir / "lora", meta)
        if lora.bits == 4:
            lora_mod.merge_lora(meta["base_model"], run_dir / "lora", run_dir / "model",
                                projector=run_dir / "projector" if "projector" in trained
                                else resolve_projector_dir(config.model.projector) if config.model.projector else None,
                                template=llava.config.template)
            return
        lora_mod.merge_into(llava)
    llava.save_pretrained(run_dir / "model", processor)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a training checkpoint as a finished run's outputs under `out` (`model/`, and
    `projector/` and `lora/` where the run trains them), so that any step can be evaluated, chatted
    with or exported like the end of a run. A checkpoint holds the trainable weights only; its
    run's `config.yaml` says which model and stage they complete (its paths as given at training
    time). `checkpoint` is a `RUN/checkpoints/step-NNNNNN` directory, or a run directory (its last
    checkpoint); returns the checkpoint directory used."""
    from accelerate.utils import SAFE_WEIGHTS_NAME

    from vitune.train.config import config_from_yaml
    from vitune.train.model_setup import TrainingModule, apply_stage, load_for_training

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / STATE_FILE).is_file():
        found = checkpoint_dirs(checkpoint)
        if not found:
            raise VituneError(f"{checkpoint}: neither a training checkpoint (no {STATE_FILE}) nor a run directory "
                              f"with checkpoints ({CHECKPOINT_DIR}/step-NNNNNN; saved every train.save_every steps)")
        checkpoint = found[-1]
    weights = checkpoint / SAFE_WEIGHTS_NAME
    if not weights.is_file():
        raise VituneError(f"{checkpoint}: no {SAFE_WEIGHTS_NAME}, so an FSDP or DeepSpeed checkpoint in its sharded "
                          f"format: merge its shards into {checkpoint / SAFE_WEIGHTS_NAME} first (`accelerate "
                          "merge-weights` for FSDP, DeepSpeed's zero_to_fp32.py), then export it")
    run_config = checkpoint.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise VituneError(f"{checkpoint}: its run's config.yaml is missing ({run_config}): it says which model the "
                          "checkpoint's trainable weights belong to")
    if (out / "model").exists():
        raise VituneError(f"{out / 'model'} already exists: pick another output directory or remove it")
    config = config_from_yaml(run_config)
    model, processor = load_for_training(config)
    plan = apply_stage(model, config, torch.float32)
    _load_trainable(TrainingModule(model), weights)
    write_outputs(model, processor, config, out, plan)
    return checkpoint
