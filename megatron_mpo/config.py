"""Typed run configuration: one YAML file plus dotted ``key.sub=value`` overrides.

Every section is a dataclass; unknown keys, wrong types and bad values stop with one
line (:class:`~megatron_mpo.errors.UserError`) before any process-group work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from megatron_mpo.errors import UserError


@dataclass
class ModelSection:
    init: Optional[str] = None  # Megatron checkpoint dir written by tools/convert_hf_to_megatron.py
    preset: Optional[str] = None  # build a randomly initialised preset instead (demo/tests)
    tokenizer: Optional[str] = None  # defaults to `init`
    freeze: list[str] = field(default_factory=list)  # any of vision, projector, language
    spec: str = "local"  # local | transformer_engine
    recompute: Optional[str] = None  # null | selective | full (activation recomputation)

    def validate(self) -> None:
        bad = sorted(set(self.freeze) - {"vision", "projector", "language"})
        if bad:
            raise UserError(f"model.freeze: unknown part(s) {bad}; choose from vision, projector, language")
        if len(set(self.freeze)) == 3:
            raise UserError("model.freeze freezes every part: nothing would train; drop one of them")
        _choice("model.spec", self.spec, ("local", "transformer_engine"))
        if self.recompute is not None:
            _choice("model.recompute", self.recompute, ("selective", "full"))


@dataclass
class ParallelSection:
    tensor: int = 1
    pipeline: int = 1
    sequence: bool = False
    virtual_pipeline: Optional[int] = None
    pipeline_layers: Optional[list[int]] = None  # LLM layers per stage, for uneven splits
    # How long a collective waits for a lost or hung rank before the job fails (and a
    # scheduler can requeue it). Raise it if one checkpoint save takes longer.
    timeout_minutes: float = 10.0

    def validate(self) -> None:
        _positive("parallel.timeout_minutes", self.timeout_minutes)
        _positive("parallel.tensor", self.tensor)
        _positive("parallel.pipeline", self.pipeline)
        if self.virtual_pipeline is not None:
            _positive("parallel.virtual_pipeline", self.virtual_pipeline)
            if self.pipeline < 2:
                raise UserError("parallel.virtual_pipeline needs parallel.pipeline >= 2")
        if self.sequence and self.tensor < 2:
            raise UserError("parallel.sequence (sequence parallel) needs parallel.tensor >= 2")
        chunks = self.pipeline * (self.virtual_pipeline or 1)
        if self.pipeline_layers is not None and len(self.pipeline_layers) != chunks:
            raise UserError(
                f"parallel.pipeline_layers has {len(self.pipeline_layers)} entries; it needs one per "
                f"pipeline stage{' and virtual stage' if self.virtual_pipeline else ''} ({chunks})"
            )


@dataclass
class PrecisionSection:
    dtype: str = "fp32"  # fp32 | bf16 (bf16 keeps fp32 master weights)
    fp8: Optional[str] = None  # null | hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8
    # Reference values in FP8 too (current-scaling recipes only); default: precision.dtype.
    reference_fp8: bool = False

    def validate(self) -> None:
        _choice("precision.dtype", self.dtype, ("fp32", "bf16"))
        if self.fp8 is not None:
            _choice("precision.fp8", self.fp8, ("hybrid", "e4m3"))
        _choice("precision.fp8_recipe", self.fp8_recipe, ("delayed", "tensorwise", "mxfp8"))
        if self.reference_fp8 and self.fp8 is None:
            raise UserError("precision.reference_fp8 needs precision.fp8; turn it off or set fp8")
        if self.reference_fp8 and self.fp8_recipe == "delayed":
            raise UserError(
                "precision.reference_fp8 with fp8_recipe=delayed would quantise every reference GEMM "
                "with uncalibrated scales (the reference pass runs without grad); use fp8_recipe "
                "tensorwise or mxfp8, or leave reference_fp8 off (reference in precision.dtype)"
            )


@dataclass
class DataSection:
    shards: Optional[str] = None  # dir with index.json, brace pattern, pipe: or http(s) URL
    ref_logps: Optional[str] = None  # dir of reference sidecars from tools/precompute_ref_logps.py
    on_missing_ref: str = "skip"  # skip | error
    max_length: int = 8192
    max_tiles: int = 6
    template: Optional[str] = None  # default: the model's own
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 1234
    # pipe: shard sources (in data.shards or an index.json) run a shell command; refused
    # unless this is true. http(s) shards are fetched in-process (urllib), never by a shell.
    allow_pipe_sources: bool = False
    # Shared-prompt packing; null = on for the local spec, off for transformer_engine (TE
    # has no fused kernel for the packed mask: its unfused path keeps [b, heads, S, S]).
    packing: Optional[bool] = None

    def validate(self) -> None:
        _positive("data.max_length", self.max_length)
        _positive("data.max_tiles", self.max_tiles)
        _choice("data.on_missing_ref", self.on_missing_ref, ("skip", "error"))
        if self.num_workers < 0:
            raise UserError("data.num_workers must be >= 0")
        if self.shuffle_buffer < 0:
            raise UserError("data.shuffle_buffer must be >= 0")


@dataclass
class LossWeightsSection:
    preference: float = 0.8
    quality: float = 0.2
    generation: float = 1.0


@dataclass
class MPOSection:
    beta: float = 0.1
    preference: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0
    weights: LossWeightsSection = field(default_factory=LossWeightsSection)
    average_log_probs: bool = False
    delta_update: str = "step"  # step (paper) | micro_batch (TRL)

    def validate(self) -> None:
        try:
            self.loss_config()  # the losses module owns these checks
        except UserError as exc:
            raise UserError(f"mpo section: {exc}") from None

    def loss_config(self):
        from megatron_mpo.losses import LossWeights, MPOLossConfig

        return MPOLossConfig(
            beta=self.beta,
            preference=self.preference,
            label_smoothing=self.label_smoothing,
            weights=LossWeights(**dataclasses.asdict(self.weights)),
            average_log_probs=self.average_log_probs,
            delta_update=self.delta_update,
        )


@dataclass
class TrainSection:
    global_batch: int = 256  # preference pairs per optimizer step
    micro_batch: int = 1  # pairs per micro-batch per data-parallel rank
    steps: Optional[int] = None
    epochs: Optional[float] = None
    lr: float = 5e-6
    min_lr: float = 0.0
    warmup: float = 0.03  # fraction of steps (< 1) or a number of steps (>= 1)
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    seed: int = 42
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    device: str = "auto"  # auto | cuda | cpu

    def validate(self) -> None:
        _positive("train.global_batch", self.global_batch)
        _positive("train.micro_batch", self.micro_batch)
        if self.steps is None and self.epochs is None:
            raise UserError("set train.steps or train.epochs")
        if self.steps is not None:
            _positive("train.steps", self.steps)
        if self.epochs is not None and self.epochs <= 0:
            raise UserError("train.epochs must be > 0")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError("train.lr must be > 0 and 0 <= train.min_lr <= train.lr")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"train.{name} must be in [0, 1), got {getattr(self, name)!r}")
        _positive("train.max_bad_steps", self.max_bad_steps)
        if self.warmup < 0:
            raise UserError("train.warmup must be >= 0 (a fraction < 1 or a step count)")
        _choice("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice("train.device", self.device, ("auto", "cuda", "cpu"))
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise UserError("train.weight_decay and train.clip_grad must be >= 0")


@dataclass
class CheckpointSection:
    save: Optional[str] = None
    interval: int = 500
    load: Optional[str] = None  # a checkpoint dir, or `auto` = latest in `save`
    keep_last: Optional[int] = 3

    def validate(self) -> None:
        _positive("checkpoint.interval", self.interval)
        if self.save:
            _check_writable_dir("checkpoint.save", self.save)
        if self.keep_last is not None:
            _positive("checkpoint.keep_last", self.keep_last)
        if self.load == "auto" and not self.save:
            raise UserError("checkpoint.load=auto looks in checkpoint.save: set checkpoint.save")


@dataclass
class LoggingSection:
    metrics: Optional[str] = None  # JSONL path
    tensorboard: Optional[str] = None
    wandb_project: Optional[str] = None
    interval: int = 1

    def validate(self) -> None:
        _positive("logging.interval", self.interval)
        if self.metrics:
            _check_writable_dir("logging.metrics", self.metrics, for_file=True)
        if self.tensorboard:
            _check_writable_dir("logging.tensorboard", self.tensorboard)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    data: DataSection = field(default_factory=DataSection)
    mpo: MPOSection = field(default_factory=MPOSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def validate(self) -> "RunConfig":
        """Check every section; raise UserError on the first problem."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.model.init is None and self.model.preset is None:
            raise UserError("set model.init (a converted checkpoint) or model.preset")
        if self.precision.fp8 is not None and self.model.spec != "transformer_engine":
            raise UserError("precision.fp8 runs through Transformer Engine: set model.spec=transformer_engine")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML file (optional), apply ``a.b=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise UserError(f"config file {path} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(raw).validate()


def from_dict(raw: dict) -> RunConfig:
    """Build a RunConfig from nested dicts, refusing unknown keys and wrong types."""
    return _build(RunConfig, raw, "")


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise UserError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        name = f"{prefix}{unknown[0]}"
        raise UserError(f"unknown config key {name!r}; valid keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{name}.")
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value] if not isinstance(value, str) else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise UserError(f"{name} must be a list, got {value!r}")
        return [_coerce(args[0], v, name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-6" as a string
            value = float(value) if tp is float or not value.strip().lstrip("-").isdigit() else int(value)
        except ValueError:
            raise UserError(f"{name} must be a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):  # every float setting: nan / inf would pass range checks
            raise UserError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def _check_writable_dir(name: str, path: str, for_file: bool = False) -> None:
    """``path`` is (or can be created as) a directory this process may write -- with
    ``for_file``, a file in one: found at start-up rather than at the first save, after
    the training time is spent."""
    target = Path(path).absolute()
    if for_file:
        if target.is_dir():
            raise UserError(f"{name} {path} is a directory; give a file path")
        target = target.parent
    elif target.exists() and not target.is_dir():
        raise UserError(f"{name} {path} exists and is not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{name} {path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{name} {path} is not writable: no write permission on {existing}")


def _positive(name: str, value: Any) -> None:
    if value is None or value <= 0:
        raise UserError(f"{name} must be a positive number, got {value!r}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
