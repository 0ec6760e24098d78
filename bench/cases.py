"""The benchmark cases: vitune against the transformers reference on one preset's models.

Every case returns a `CaseResult` whose `ratio` is vitune / reference for speeds (higher is
better for vitune), and vitune / the machine's bound for `mfu` and `decode_bw`:

- `decode_b1`: new tokens per second, batch 1, greedy, `new_tokens` after an image prompt, both
  forced to full length (vitune: a `Decoder` with no end ids and no stop strings, its compiled
  step where the model is small, the eager step timed beside it as `eager`; the reference:
  `min_new_tokens` = `max_new_tokens`). Timed end to end: prefill plus decoding.
- `decode_b8`: total new tokens per second, 8 prompts with different images and lengths in one
  batch (left-padded by both).
- `prefill`: time to first token of the decode_b1 prompt (image encoding + prompt forward + the
  first token), reported as a rate (prefills per second) so the ratio reads as a speed-up.
- `train_step`: stage-2 training samples per second over epochs of the synthetic set: vitune
  through `vitune.train.run_training` (timed from its `on_step` callback), the reference through
  `bench.reference.ReferenceTrainer` (random batches padded to the longest). Each epoch's first
  step is its warm-up; the rate is over the remaining steps, the same number for both. It also
  reports each system's work (`gflop_per_sample`: vitune's as in `mfu`, the reference's as its
  loop computes it, padded, the head on every position, the whole tower), `flop_ratio`
  (reference / vitune) and `gflop_per_s`: ratio = flop_ratio x vitune's rate / the reference's.
- `mfu`: vitune's training model FLOPs per second (the work the step needs: decoder layers
  forward+backward on real tokens, the last layer past its keys and values and the output head
  on label positions only, the frozen tower's forward up to the feature layer) over this
  machine's fp32 matmul throughput.
- `decode_bw`: vitune's batch-1 decoding speed (the decode part of decode_b1: (N - 1) tokens over
  its time minus the time to first token) over the memory-bandwidth bound: bytes read per token
  (LLM weights except the input embedding table, plus the KV cache) against a large copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import measure, reference, workloads
from bench.presets import Built, Preset
from vitune.model import fast_lm
from vitune.train import label_positions

CASES = ("decode_b1", "decode_b8", "prefill", "train_step", "mfu", "decode_bw")


@dataclass
class CaseResult:
    name: str
    preset: str
    vitune: float
    reference: float
    unit: str
    ratio: float
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset, "vitune": _round(self.vitune), "reference": _round(self.reference),
                "unit": self.unit, "ratio": _round(self.ratio), **self.details}


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of rows whose tokens agree up to the first difference, averaged (1.0 = identical)."""
    scores = []
    for x, y in zip(a, b, strict=True):
        same = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        scores.append(same / max(len(x), len(y), 1))
    return round(sum(scores) / len(scores), 3)


class PresetBench:
    """Both systems loaded once for a preset; cases share them (and some share measurements)."""

    def __init__(self, preset: Preset, built: Built, root: Path, log: Callable[[str], None] = print, clock: str = "wall",
                 compile_decode: bool = True) -> None:
        from vitune.generation import Decoder
        from vitune.inference import Pipeline

        self.preset = preset
        self.built = built
        self.root = root
        self.log = log
        self.clock = clock
        self.pipe = Pipeline.from_pretrained(built.vitune_dir, device="cpu", dtype="float32")
        self.pad_id = self.pipe.processor.tokenizer.pad_token_id
        # No end ids and no stop strings: every row runs its full budget, like min_new_tokens.
        # The decode cases run vitune's compiled step where the model is one it compiles (small,
        # op-bound models: `vitune.model.compiled_step`) and report its eager step beside it.
        self.decoder = Decoder(self.pipe.model, self.pipe.processor.decode, set(), self.pad_id, compile_step=compile_decode)
        self.eager_decoder = Decoder(self.pipe.model, self.pipe.processor.decode, set(), self.pad_id)
        lm = self.pipe.model.language_model
        self.compiled = compile_decode and fast_lm.supports(lm) and fast_lm.FastLM(lm, 1, 1, compiled=True).compiled
        self.hf = reference.load_reference(built.hf_dir)
        self.prompts = workloads.image_prompts(self.pipe, max(1, preset.work.batch))
        self.memo: dict[str, Any] = {}
        # Prime both (lazy imports, kernel and allocator set-up) before anything is measured.
        self.vitune_generate(self.prompts[:2], 2, eager=True)  # the compiled step compiles in its own cases
        self.reference_generate(self.prompts[:2], 2)

    # -- the two systems' calls --------------------------------------------------------------------
    def vitune_generate(self, prompts: list[workloads.Prompt], new_tokens: int, eager: bool = False) -> list[list[int]]:
        from vitune.generation import SamplingParams

        params = [SamplingParams(max_new_tokens=new_tokens) for _ in prompts]
        decoder = self.eager_decoder if eager else self.decoder
        outs = decoder.generate([p.ids for p in prompts], [p.pixels for p in prompts], params)
        return [o.output_ids for o in outs]

    def reference_generate(self, prompts: list[workloads.Prompt], new_tokens: int) -> list[list[int]]:
        pixels = torch.cat([p.pixels for p in prompts])
        return reference.generate(self.hf, [p.ids for p in prompts], pixels, new_tokens, self.pad_id)

    def _pair(self, prompts: list[workloads.Prompt], new_tokens: int, repeats: int, eager: bool = False) -> dict[str, measure.Timing]:
        """Both systems alternating; with `eager` and a compiled step, vitune's eager step too
        (after one call that compiles the step's shape: a one-time cost, as the priming)."""
        runs = {"vitune": lambda: self.vitune_generate(prompts, new_tokens),
                "reference": lambda: self.reference_generate(prompts, new_tokens)}
        if eager and self.compiled:
            self.vitune_generate(prompts, new_tokens)
            runs["vitune_eager"] = lambda: self.vitune_generate(prompts, new_tokens, eager=True)
        return measure.alternate(runs, repeats=repeats, log=self.log, clock=self.clock)

    def _result(self, name: str, unit: str, work: float, t: dict[str, measure.Timing], **details: Any) -> CaseResult:
        v, r = work / t["vitune"].median, work / t["reference"].median
        if "vitune_eager" in t:
            e = work / t["vitune_eager"].median
            details = {"compiled_step": True, "eager": {"vitune": _round(e), "ratio": _round(e / r), "unit": unit}, **details}
        return CaseResult(name, self.preset.name, v, r, unit, v / r, {
            "seconds": {k: [round(s, 4) for s in timing.seconds] for k, timing in t.items()},
            "peak_mb": {k: timing.peak_mb for k, timing in t.items()},
            **details})

    # -- cases -------------------------------------------------------------------------------------
    def decode_b1(self) -> CaseResult:
        n = self.preset.work.new_tokens
        t = self._pair(self.prompts[:1], n, self.preset.work.repeats, eager=True)
        self.memo["decode_b1"] = t
        same = _agreement(t["vitune"].result, t["reference"].result)
        return self._result("decode_b1", "tokens/s", n, t, new_tokens=n, prompt_tokens=len(self.prompts[0].ids), token_agreement=same)

    def decode_b8(self) -> CaseResult:
        w = self.preset.work
        prompts = self.prompts[: w.batch]
        t = self._pair(prompts, w.batch_new_tokens, w.repeats, eager=True)
        same = _agreement(t["vitune"].result, t["reference"].result)
        return self._result("decode_b8", "tokens/s", w.batch_new_tokens * len(prompts), t, batch=len(prompts),
                            new_tokens_per_row=w.batch_new_tokens, prompt_tokens=[len(p.ids) for p in prompts],
                            token_agreement=same)

    def prefill(self) -> CaseResult:
        t = self._pair(self.prompts[:1], 1, self.preset.work.prefill_repeats)
        self.memo["prefill"] = t
        return self._result("prefill", "prefills/s", 1.0, t, prompt_tokens=len(self.prompts[0].ids),
                            ttft_ms={"vitune": round(1000 * t["vitune"].median, 2), "reference": round(1000 * t["reference"].median, 2)})

    def decode_bw(self) -> CaseResult:
        """Needs decode_b1 and prefill (measured first when not yet)."""
        if "decode_b1" not in self.memo:
            self.decode_b1()
        if "prefill" not in self.memo:
            self.prefill()
        n = self.preset.work.new_tokens
        b1, pf = self.memo["decode_b1"], self.memo["prefill"]
        rate = {k: (n - 1) / max(1e-9, b1[k].median - pf[k].median) for k in ("vitune", "reference")}
        bandwidth = measure.copy_bandwidth(clock=self.clock)
        per_token = self.bytes_per_token(len(self.prompts[0].ids) + n // 2)
        bound = bandwidth / per_token
        return CaseResult("decode_bw", self.preset.name, rate["vitune"], bound, "tokens/s", rate["vitune"] / bound, {
            "bound": "copy bandwidth / bytes read per token",
            "bandwidth_gb_s": round(bandwidth / 1e9, 2), "bytes_per_token_mb": round(per_token / 2**20, 2),
            "transformers_tokens_s": _round(rate["reference"]), "transformers_ratio": round(rate["reference"] / bound, 3)})

    def bytes_per_token(self, context: int) -> float:
        """Weights one decode step reads (all LLM weights but the embedding table, unless tied to the
        head) plus the KV cache at `context` tokens."""
        lm = self.pipe.model.language_model
        embed = lm.get_input_embeddings().weight
        head = lm.get_output_embeddings().weight
        total = sum(p.numel() * p.element_size() for p in lm.parameters())
        if embed.data_ptr() != head.data_ptr():
            total -= embed.numel() * embed.element_size()
        cfg = lm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * context * embed.element_size()
        return float(total + kv)

    # -- training ----------------------------------------------------------------------------------
    def _train_inputs(self) -> tuple[Path, list[dict[str, Any]]]:
        if "train_inputs" in self.memo:
            return self.memo["train_inputs"]
        data_dir = self.root / "data" / f"{self.preset.name}-{_work_digest(self.preset)}"
        data = workloads.training_set(self.preset, data_dir, self.pipe.processor)
        records = json.loads(data.read_text())
        proc = self.pipe.processor
        samples = []
        for r in records:
            enc = proc.encode(r["conversations"], num_images=1 if "image" in r else 0, where=f"record {r['id']}")
            samples.append({"input_ids": enc.input_ids, "labels": enc.labels,
                            "image": str(data_dir / r["image"]) if "image" in r else None})
        self.memo["train_inputs"] = (data, samples)
        return data, samples

    def train_step(self) -> CaseResult:
        """Whole epochs of both systems, alternating; each epoch's first step is its warm-up and
        the rate is over the others (same batch count for both)."""
        w = self.preset.work
        data, samples = self._train_inputs()
        ref = reference.ReferenceTrainer(self.built.hf_dir, samples, self.pipe.processor, w.train_batch)
        scratch = Path(tempfile.mkdtemp(prefix="train-", dir=self.root))
        column = 0 if self.clock == "wall" else 1
        rates: dict[str, list[float]] = {"vitune": [], "reference": []}
        ref_flops: list[float] = []  # per sample, each timed reference epoch
        peak: dict[str, float] = {}
        try:
            runs = {"vitune": lambda: vitune_epoch(self.built.vitune_dir, data, w.train_batch, w.max_length, w.length_window,
                                                   scratch / "run"),
                    "reference": ref.epoch}
            # Epoch 1 of each samples memory; it is timed too only when it is the only one.
            for round_ in range(w.train_epochs):
                for name in (("vitune", "reference") if round_ % 2 == 0 else ("reference", "vitune")):
                    if round_ == 0:
                        with measure.PeakMemory() as mem:
                            marks = runs[name]()
                        peak[name] = round(mem.peak_mb, 1)
                        if w.train_epochs > 1:
                            continue
                    else:
                        marks = runs[name]()
                    if len(marks) < 3:
                        raise RuntimeError(f"{name}: an epoch of {len(marks) - 1} step(s); the train_step case needs >= 2")
                    seconds = marks[-1][column] - marks[1][column]
                    rates[name].append((len(marks) - 2) * w.train_batch / seconds)
                    if name == "reference":  # the timed steps' work, as the reference pads and computes it
                        timed = [[samples[i] for i in rows] for rows in ref.last_epoch[1:]]
                        ref_flops.append(sum(self.sample_flops(s, max(len(r["input_ids"]) for r in rows), reference=True)
                                             for rows in timed for s in rows) / sum(map(len, timed)))
                    self.log(f"    {name:10s} epoch {round_ + 1}: {len(marks) - 2} timed steps of {w.train_batch} in {seconds:.2f}s")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        del ref
        rate = {k: _median(v) for k, v in rates.items()}
        flops = self.flops_per_sample(samples)
        self.memo["train"] = {"rate": rate, "flops_per_sample": flops}
        tokens = [len(s["input_ids"]) for s in samples]
        ref_flop = _median(ref_flops)
        return CaseResult("train_step", self.preset.name, rate["vitune"], rate["reference"], "samples/s",
                          rate["vitune"] / rate["reference"], {
                              "samples_per_s": {k: [round(x, 3) for x in v] for k, v in rates.items()},
                              # The work each system does per sample, and how fast it does it: the ratio
                              # is flop_ratio x (vitune's GFLOP/s / the reference's).
                              "gflop_per_sample": {"vitune": _round(flops / 1e9), "reference": _round(ref_flop / 1e9)},
                              "flop_ratio": round(ref_flop / flops, 3),
                              "gflop_per_s": {"vitune": _round(rate["vitune"] * flops / 1e9),
                                              "reference": _round(rate["reference"] * ref_flop / 1e9)},
                              "peak_mb": peak, "batch": w.train_batch, "samples": len(samples),
                              "with_image": sum(s["image"] is not None for s in samples),
                              "tokens_mean": round(sum(tokens) / len(tokens), 1), "tokens_max": max(tokens)})

    def flops_per_sample(self, samples: list[dict[str, Any]]) -> float:
        """Mean model FLOPs of one stage-2 training sample (see the module doc)."""
        return sum(self.sample_flops(s) for s in samples) / len(samples)

    def sample_flops(self, sample: dict[str, Any], width: int | None = None, reference: bool = False) -> float:
        """Model FLOPs of one training sample: as vitune needs them, or with `reference` as the
        transformers loop spends them (padded to `width`, the output head on every position, the
        vision tower through all its layers)."""
        model = self.pipe.model
        lm = model.language_model
        cfg = lm.config
        layers_params = sum(p.numel() for p in lm.model.layers.parameters())
        d, n_layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
        proj_params = sum(p.numel() for p in model.projector.parameters())
        tower = model.vision.tower
        vcfg = tower.config
        used = max(model.vision.feature_layers, key=lambda x: x % (vcfg.num_hidden_layers + 1)) % (vcfg.num_hidden_layers + 1)
        vision_layer_params = sum(p.numel() for p in getattr(tower, "vision_model", tower).encoder.layers[0].parameters())
        t_img = model.config.num_image_tokens
        t_v = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        t = width or len(sample["input_ids"])
        labels = t if reference else sum(1 for x in sample["labels"][1:] if x != -100)
        total = 6 * layers_params * t + 6 * n_layers * d * t * t  # causal attention: half of 2 matmuls x 2T^2d
        if not reference and label_positions.supported(lm.model, t):
            # vitune's last layer: keys and values everywhere, the rest at the label positions only
            last = lm.model.layers[-1]
            last_params = sum(p.numel() for p in last.parameters())
            kv_params = sum(p.numel() for m in (last.self_attn.k_proj, last.self_attn.v_proj) for p in m.parameters())
            total -= 6 * last_params * t + 6 * d * t * t
            total += 6 * kv_params * t + 6 * (last_params - kv_params) * labels + 6 * d * labels * t
        total += 6 * vocab * d * labels
        if sample["image"] is not None:
            tower_layers = vcfg.num_hidden_layers if reference else used
            total += tower_layers * (2 * vision_layer_params * t_v + 2 * t_v * t_v * vcfg.hidden_size * 2) + 6 * proj_params * t_img
        return float(total)

    def mfu(self) -> CaseResult:
        if "train" not in self.memo:
            self.train_step()
        peak = measure.matmul_flops(clock=self.clock)
        rate, flops = self.memo["train"]["rate"], self.memo["train"]["flops_per_sample"]
        achieved = rate["vitune"] * flops
        return CaseResult("mfu", self.preset.name, achieved / 1e9, peak / 1e9, "GFLOP/s", achieved / peak, {
            "bound": "fp32 matmul throughput (2048x2048 @ 2048x2048)", "flops_per_sample_g": round(flops / 1e9, 3),
            "transformers_ratio": round(rate["reference"] * flops / peak, 3)})

    def run(self, name: str) -> CaseResult:
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")
        return getattr(self, name)()


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def _work_digest(preset: Preset) -> str:
    import hashlib
    from dataclasses import asdict

    blob = json.dumps({"shape": asdict(preset.shape), "work": asdict(preset.work)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def vitune_epoch(model_dir: Path, data: Path, batch: int, max_length: int, length_window: int,
                 out: Path) -> list[tuple[float, float]]:
    """One stage-2 epoch through vitune's trainer, as `run_training` runs it (the frozen tower's
    feature cache off: every image is seen once per epoch here, and the reference has none).
    Returns (elapsed, CPU) seconds after each step, the first entry standing for the start."""
    from vitune.train import load_config, run_training

    config = load_config(None, [
        f"model.path={model_dir}", f"data.path=[{json.dumps(str(data))}]", f"data.max_length={max_length}",
        f"data.length_window={length_window}", "stage.name=finetune", "stage.parts.vision=frozen", "stage.parts.projector=2e-5", "stage.parts.llm=2e-5",
        f"train.batch_size={batch}", f"train.micro_batch_size={batch}", "train.epochs=1", f"train.output_dir={out}",
        "train.overwrite=true", "train.progress=false", "train.log_every=1", "train.save_every=0",
        "train.cache_image_features=off",
    ])
    marks: list[tuple[float, float]] = []

    def on_step(metrics: dict[str, Any]) -> None:
        marks.append((time.perf_counter(), time.process_time()))

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        run_dir = run_training(config, on_step=on_step)
    shutil.rmtree(run_dir, ignore_errors=True)
    # The start of the first step is not observable from outside; its end stands in for it, and
    # callers time from the end of the first step (the warm-up) anyway.
    return [marks[0], *marks]
