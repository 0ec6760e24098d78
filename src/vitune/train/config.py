"""Training configuration: typed dataclasses nested per concern, YAML presets, `key=value` overrides.

One `Config` holds five sections: `model` (what to start from), `data` (what to read and how to
batch it), `stage` (which parts train at which learning rate, LoRA, the template: what makes a
run stage 1 or stage 2), `optim` (the optimizer, AdamW or Muon, and the schedule) and `train` (the loop: batch sizes,
steps, precision, logging, checkpoints). Presets are YAML files of the same shape (a preset may
`inherit:` another and change a few keys); command-line overrides are `section.key=value`, parsed
by the field's declared type, so `train.cpu=false` is False and `stage.parts.llm=frozen` is data.
The resolved config (every field, defaults included) is written as `config.yaml` in each run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vitune.errors import VituneError

PRESET_DIR = Path(__file__).parent / "presets"
FROZEN = "frozen"
LR = float | Literal["frozen"]  # a learning rate, or the word "frozen"


@dataclass
class ModelConfig:
    path: str = ""  # a vitune model dir (`vitune build`), or a run dir (its model/ is used)
    projector: str | None = None  # a stage-1 projector dir (or stage-1 run dir) loaded over the model's
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    path: list[str] = field(default_factory=list)  # LLaVA JSON/JSONL or messages JSONL files
    image_folder: str | None = None  # relative image paths resolve here (default: each data file's folder)
    format: Literal["auto", "llava", "messages"] = "auto"
    max_length: int = 2048  # tokens, image placeholders included
    on_bad_record: Literal["error", "skip"] = "error"
    quarantine: str | None = None  # skipped records (JSONL); default: RUN/quarantine.jsonl
    check_images: Literal["exists", "open", "decode"] = "open"  # how hard to check images up front
    group_by_modality_length: bool = True
    length_window: int = 1  # global batches sorted by length together (1 = LLaVA's grouping)
    num_workers: int = 0  # DataLoader worker processes for image decoding
    pad_to_multiple_of: int = 1
    limit: int | None = None  # only the first N records (quick runs)


@dataclass
class PartsConfig:
    """The learning rate of each part of the model, or "frozen"."""

    vision: LR = FROZEN
    projector: LR = FROZEN
    llm: LR = FROZEN  # with LoRA: the adapters' learning rate (the base LLM stays frozen)


@dataclass
class LoraConfig:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bits: Literal[16, 4] = 16  # 4 = QLoRA: the base LLM quantized to NF4 (needs CUDA + bitsandbytes)


@dataclass
class StageConfig:
    name: Literal["pretrain", "finetune"] = "finetune"
    template: str | None = None  # chat template for the data; None = the model's own
    parts: PartsConfig = field(default_factory=PartsConfig)
    lora: LoraConfig | None = None  # LoRA on the LLM (parts.llm is then the adapters' lr)


@dataclass
class OptimConfig:
    # adamw; or muon: Muon for the hidden matrices, AdamW for embeddings, head, norms and biases
    # (vitune.train.optim). On the world's stage 2, Muon learned to find the object a question names
    # within ~760 steps where AdamW had not (see the README's demo section).
    name: Literal["adamw", "muon"] = "adamw"
    muon_momentum: float = 0.95
    muon_lr_scale: float = 1.0  # the Muon matrices' lr as a multiple of their part's lr
    weight_decay: float = 0.0  # applied to matrices only (not biases, norms)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_ratio: float = 0.2  # wsd: the share of the run spent cooling down linearly to min_lr_ratio
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio
    min_lr_ratio: float = 0.0  # the schedule's floor, as a fraction of each part's lr


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    overwrite: bool = False  # allow a fresh run in a directory that holds an earlier one
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    # End the run once this many seconds of training have passed (at a step boundary, on every
    # process together) and finish it as if done: the model is exported and summary.json says
    # `"stopped_by": "max_seconds"`. The schedule ends with the time: its total is the step the
    # time will run out at (`schedule.time_horizon`); for jobs with a wall-clock allowance.
    max_seconds: float | None = None
    batch_size: int = 128  # global: micro_batch_size x processes x accumulation
    micro_batch_size: int = 16  # per device and forward pass
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    cpu: bool = False  # train on the CPU even when a GPU is there
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # checkpoint every N steps (0: none before the end)
    keep_last: int = 2
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb
    # How the loss averages over label tokens. token: every label token counts the same (LLaVA's
    # mean over the batch's tokens); sample: each sample's tokens share one unit of weight, so a
    # one-word answer counts as much as a paragraph; square: each token weighs 1/sqrt(its sample's
    # label tokens), between the two (InternVL 2.5's "square averaging").
    loss_weighting: Literal["token", "sample", "square"] = "token"
    # torch.compile the LLM's decoder (fuses its norms, RoPE and activations; ~1.4x faster steps
    # on the world's CPU model after ~10 s of compiling). Needs a C++ compiler on CPU.
    compile: bool = False
    cache_image_features: Literal["auto", "on", "off"] = "auto"  # reuse frozen-vision features
    feature_cache_gb: float = 4.0  # "auto" caches only when all features fit in this
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def check(self) -> None:
        """Cross-field rules that a single field's type cannot say."""
        t = self.train
        if t.batch_size < 1 or t.micro_batch_size < 1:
            raise VituneError("train.batch_size and train.micro_batch_size must be >= 1")
        if t.max_seconds is not None and not t.max_seconds > 0:
            raise VituneError(f"train.max_seconds must be a positive number of seconds, got {t.max_seconds!r}")
        if t.batch_size % t.micro_batch_size:
            raise VituneError(f"train.batch_size {t.batch_size} is not a multiple of train.micro_batch_size {t.micro_batch_size}")
        for part in ("vision", "projector", "llm"):
            lr = getattr(self.stage.parts, part)
            if lr != FROZEN and not lr > 0:
                raise VituneError(f"stage.parts.{part} must be a positive learning rate or 'frozen', got {lr!r}")
        if all(getattr(self.stage.parts, p) == FROZEN for p in ("vision", "projector", "llm")):
            raise VituneError("every part is frozen (stage.parts): nothing would train")
        if self.stage.lora is not None and self.stage.parts.llm == FROZEN:
            raise VituneError("stage.lora is set but stage.parts.llm is frozen: give the adapters a learning rate")
        if not self.model.path:
            raise VituneError("model.path is not set: a model directory from `vitune build` (or a run directory)")
        if not self.data.path:
            raise VituneError("data.path is not set: one or more LLaVA JSON/JSONL files")
        if self.data.max_length < 8:
            raise VituneError(f"data.max_length {self.data.max_length} is too small")
        if self.data.length_window < 1:
            raise VituneError("data.length_window must be >= 1")
        if not 0 < self.optim.decay_ratio <= 1:
            raise VituneError(f"optim.decay_ratio must be in (0, 1], got {self.optim.decay_ratio!r}")
        if not self.optim.muon_lr_scale > 0 or not 0 <= self.optim.muon_momentum < 1:
            raise VituneError(f"optim.muon_lr_scale must be > 0 and optim.muon_momentum in [0, 1) "
                              f"(got {self.optim.muon_lr_scale!r}, {self.optim.muon_momentum!r})")


# -- typed construction from plain data ----------------------------------------------------------


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from nested dicts, coercing each value to its field's type; unknown
    keys are errors that list the valid ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VituneError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise VituneError(f"{where}: unknown key {_join(where, unknown[0])!r}; valid keys: {', '.join(names)}")
    kwargs = {k: coerce(v, hints[k], _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return key if where == "config" else f"{where}.{key}"


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from YAML or a command-line string) as type `tp`, or a VituneError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except VituneError as err:
                errors.append(str(err))
        raise VituneError(f"{where}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice or (isinstance(value, str) and not isinstance(choice, str) and value == str(choice)):
                return choice
        raise VituneError(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in typing.get_args(tp))}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v.strip()]
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v.strip() if isinstance(v, str) else v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise VituneError(f"{where}: unsupported field type {tp!r}")
        return tuple(coerce(value, list[args[0]], where))  # type: ignore[valid-type]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise VituneError(f"{where}: {value!r} is not a mapping (e.g. {{relation: 1}})")
        return {coerce(k, key_type, where): coerce(v, value_type, _join(where, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise VituneError(f"{where}: {value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise VituneError(f"{where}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                pass
            else:
                if as_float.is_integer():
                    return int(as_float)
        raise VituneError(f"{where}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise VituneError(f"{where}: {value!r} is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string; Python reads it as a number
            except ValueError:
                pass
        raise VituneError(f"{where}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise VituneError(f"{where}: {value!r} is not a string")
    raise VituneError(f"{where}: unsupported field type {tp!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(c) for c in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# -- presets and overrides -----------------------------------------------------------------------


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """A preset by name (exact match, from the package) or by the path of a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    if path.suffix in (".yaml", ".yml"):
        raise VituneError(f"preset file {path} not found")
    raise VituneError(f"unknown preset {str(name_or_path)!r}; choose one of: {', '.join(list_presets())} (or give a YAML file)")


def load_preset_dict(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The preset's nested dict, with `inherit:` resolved (the child's keys win, merged per key)."""
    path = preset_path(name_or_path).resolve()
    if path in _seen:
        raise VituneError(f"preset {path}: inherit loop ({' -> '.join(str(p) for p in (*_seen, path))})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise VituneError(f"preset {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise VituneError(f"preset {path}: expected a mapping at the top level")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    # A parent named by a relative path is looked up beside the child first.
    sibling = path.parent / str(parent)
    base = load_preset_dict(sibling if sibling.is_file() else parent, (*_seen, path))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(data: dict[str, Any], override: str) -> None:
    """`section.key=value` into the nested dict; the value stays a string until typed coercion,
    except a YAML list/mapping literal."""
    if "=" not in override:
        raise VituneError(f"override {override!r} is not key=value (e.g. train.max_steps=100)")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise VituneError(f"override {override!r}: bad key {key!r}")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise VituneError(f"override {override!r}: {part!r} is not a section")
        node = child
    text = value.strip()
    node[parts[-1]] = yaml.safe_load(text) if text[:1] in ("[", "{") else text


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The typed config of a preset (name or YAML path) with `key=value` overrides applied."""
    data = load_preset_dict(preset) if preset is not None else {}
    for override in overrides:
        apply_override(data, override)
    config = from_dict(Config, data)
    return config


def config_from_yaml(path: str | Path) -> Config:
    """A run's saved `config.yaml`."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise VituneError(f"{path}: cannot read the config ({err})") from None
    return from_dict(Config, data, where="config")
