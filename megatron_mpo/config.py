"""Typed run configuration: one YAML file plus dotted ``key.sub=value`` overrides.

Every section is a dataclass; unknown keys, wrong types and bad values stop with one
line (:class:`~megatron_mpo.errors.UserError`) before any process-group work starts.
Each key is declared once with :func:`~megatron_mpo.settings.setting`: default, one-line
help, allowed values, required mark. ``--print-config`` and the README table are generated
from those (megatron_mpo.config_docs), and validation takes allowed values from there too.
A component with its own settings owns its section, which this file only nests: ``data``
is :class:`~megatron_mpo.data.config.DataConfig` (the loader's), ``mpo`` is
:class:`~megatron_mpo.loss_config.MPOLossConfig` (the loss's): one default, one check.
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

from megatron_mpo.data.config import DataConfig
from megatron_mpo.errors import UserError
from megatron_mpo.loss_config import MPOLossConfig
from megatron_mpo.settings import allowed, below_one, one_of, positive, setting


def _preset_names() -> tuple:
    from megatron_mpo.models.presets import preset_names

    return tuple(preset_names())


@dataclass
class ModelSection:
    """The model to train and how its layers are built."""

    init: Optional[str] = setting(None, "Megatron model dir (`megatron-mpo convert` or `megatron-mpo init`): "
                                  "architecture, weights, tokenizer",
                                  required="model.preset")
    preset: Optional[str] = setting(None, "build this architecture randomly initialised instead of "
                                    "`model.init` (demos and tests; name case-insensitive)",
                                    choices=_preset_names, required="model.init")
    tokenizer: Optional[str] = setting(None, "tokenizer dir; null: the one in `model.init`")
    freeze: list[str] = setting(text="parts kept fixed (not all three)", factory=list,
                                choices=("vision", "projector", "language"))
    spec: str = setting("local", "layer implementation: `local` runs anywhere (CPU too) and packs "
                        "shared-prompt rows; `transformer_engine` is needed for FP8",
                        choices=("local", "transformer_engine"))
    recompute: Optional[str] = setting(None, "activation recomputation to save memory (null: off)",
                                       choices=("selective", "full"))
    attention: Optional[str] = setting(None, "LLM core attention: `sdpa` (torch fused; packed rows pair by "
                                       "pair; trains on CPU), `flex` (FlexAttention block-sparse kernel; "
                                       "trains on GPUs only), `te` (Transformer Engine's; packed rows unfused, "
                                       "S x S); null: sdpa for local, te for transformer_engine (flex "
                                       "with packed rows)", choices=("sdpa", "flex", "te"))
    drop_path_rate: float = setting(0.0, "stochastic depth on the vision tower in training, in [0, 1): "
                                    "InternVL's per-layer rates 0 .. this, per image tile (its MPO scripts: "
                                    "0.1, or 0.4 for 26B / 38B / 78B / 241B; 0 for InternVL3.5 1B-4B)")

    def validate(self) -> None:
        below_one("model.drop_path_rate", self.drop_path_rate)
        parts = allowed(self, "freeze")
        bad = sorted(set(self.freeze) - set(parts))
        if bad:
            raise UserError(f"model.freeze: unknown part(s) {bad}; choose from {', '.join(parts)}")
        if len(set(self.freeze)) == len(parts):
            raise UserError("model.freeze freezes every part: nothing would train; drop one of them")
        one_of("model.spec", self.spec, allowed(self, "spec"))
        if self.recompute is not None:
            one_of("model.recompute", self.recompute, allowed(self, "recompute"))
        if self.attention is not None:
            one_of("model.attention", self.attention, allowed(self, "attention"))
            if self.attention == "te" and self.spec != "transformer_engine":
                raise UserError("model.attention=te is Transformer Engine's attention: set "
                                "model.spec=transformer_engine or pick sdpa / flex")


@dataclass
class ParallelSection:
    """Model parallelism; the remaining processes are data-parallel replicas."""

    tensor: int = setting(1, "tensor-parallel size (divides the attention heads; keep it inside a node)")
    pipeline: int = setting(1, "pipeline-parallel stages")
    sequence: bool = setting(False, "sequence parallelism (needs `tensor` >= 2; both specs)")
    expert: int = setting(1, "expert-parallel size for mixture-of-experts LLMs: each of `expert` data-parallel "
                          "ranks holds 1/`expert` of every MoE layer's experts (tokens travel by all-to-all); "
                          "an MoE LLM with `tensor` >= 2 needs `sequence`")
    virtual_pipeline: Optional[int] = setting(None, "interleaved 1F1B: model chunks per stage (needs "
                                              "`pipeline` >= 2; micro-batches per step a multiple of it)")
    pipeline_layers: Optional[list[int]] = setting(None, "LLM layers per stage (and virtual stage) "
                                                   "for an uneven split; null: even")
    timeout_minutes: float = setting(10.0, "how long collectives wait for a lost or hung rank before "
                                     "the job fails (and can be requeued); raise it if a save takes longer")

    def validate(self) -> None:
        positive("parallel.timeout_minutes", self.timeout_minutes)
        self.check()

    def check(self, model: Any = None, world_size: Optional[int] = None) -> None:
        """:func:`~megatron_mpo.parallel_layout.check_layout` of this section (with the
        model and torchrun's world size once they are known)."""
        from megatron_mpo.parallel_layout import check_layout

        check_layout(model, self.tensor, self.pipeline, self.expert, sequence=self.sequence,
                     virtual_pipeline=self.virtual_pipeline, pipeline_layers=self.pipeline_layers,
                     world_size=world_size)


@dataclass
class PrecisionSection:
    """Number formats of training and of the reference pass."""

    dtype: str = setting("fp32", "parameter and compute dtype; bf16 keeps fp32 master weights",
                         choices=("fp32", "bf16"))
    fp8: Optional[str] = setting(None, "FP8 LLM layers (needs `model.spec: transformer_engine`, "
                                 "compute capability >= 8.9; null: off)", choices=("hybrid", "e4m3"))
    fp8_recipe: str = setting("tensorwise", "FP8 scaling recipe: `tensorwise` (current scaling, Hopper and newer) "
                              "lets the reference run in the same FP8 numerics as training; `mxfp8` needs "
                              "Blackwell", choices=("delayed", "tensorwise", "mxfp8"))
    reference_fp8: Optional[bool] = setting(None, "reference values in FP8 too; null: exactly when training "
                                            "uses a current-scaling FP8 recipe (`tensorwise`, `mxfp8`), so "
                                            "policy and reference share numerics; false: in `dtype`")

    def validate(self) -> None:
        one_of("precision.dtype", self.dtype, allowed(self, "dtype"))
        if self.fp8 is not None:
            one_of("precision.fp8", self.fp8, allowed(self, "fp8"))
        one_of("precision.fp8_recipe", self.fp8_recipe, allowed(self, "fp8_recipe"))
        if self.reference_fp8 and self.fp8 is None:
            raise UserError("precision.reference_fp8 needs precision.fp8; turn it off or set fp8")
        if self.reference_fp8 and self.fp8_recipe == "delayed":
            raise UserError(
                "precision.reference_fp8 with fp8_recipe=delayed would quantise every reference GEMM "
                "with uncalibrated scales (the reference pass runs without grad); use fp8_recipe "
                "tensorwise or mxfp8, or leave reference_fp8 off (reference in precision.dtype)"
            )


@dataclass
class TrainSection:
    """Optimizer, schedule and run length."""

    global_batch: int = setting(256, "preference pairs per optimizer step (all data-parallel ranks)")
    micro_batch: int = setting(1, "pairs per micro-batch per data-parallel rank (gradient "
                               "accumulation makes up the rest); with `data.balance` on average: "
                               "the micro-batch count per step stays, a cheap rank's hold more pairs")
    steps: Optional[int] = setting(None, "optimizer steps to run; wins over `epochs`", required="train.epochs")
    epochs: Optional[float] = setting(None, "passes over the shards (needs sample counts in index.json)",
                                      required="train.steps")
    lr: float = setting(5e-6, "peak learning rate (write floats with a dot: 5.0e-6)")
    min_lr: float = setting(0.0, "learning rate at the end of the schedule")
    warmup: float = setting(0.03, "linear warm-up: a fraction of the steps (< 1) or a step count (>= 1)")
    schedule: str = setting("cosine", "decay after warm-up", choices=("cosine", "linear", "constant"))
    weight_decay: float = setting(0.05, "AdamW weight decay")
    clip_grad: float = setting(1.0, "gradient-norm clipping (0: off)")
    adam_beta1: float = setting(0.9, "Adam beta1, in [0, 1)")
    adam_beta2: float = setting(0.999, "Adam beta2, in [0, 1)")
    seed: int = setting(42, "seed of the random number generators (preset weights, dropout)")
    max_bad_steps: int = setting(5, "stop after this many steps in a row with a non-finite loss or gradient")
    device: str = setting("auto", "`auto`: CUDA when present, else CPU (gloo)", choices=("auto", "cuda", "cpu"))

    def validate(self) -> None:
        positive("train.global_batch", self.global_batch)
        positive("train.micro_batch", self.micro_batch)
        if self.steps is None and self.epochs is None:
            raise UserError("set train.steps or train.epochs")
        if self.steps is not None:
            positive("train.steps", self.steps)
        if self.epochs is not None and self.epochs <= 0:
            raise UserError("train.epochs must be > 0")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError("train.lr must be > 0 and 0 <= train.min_lr <= train.lr")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"train.{name} must be in [0, 1), got {getattr(self, name)!r}")
        positive("train.max_bad_steps", self.max_bad_steps)
        if self.warmup < 0:
            raise UserError("train.warmup must be >= 0 (a fraction < 1 or a step count)")
        one_of("train.schedule", self.schedule, allowed(self, "schedule"))
        one_of("train.device", self.device, allowed(self, "device"))
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise UserError("train.weight_decay and train.clip_grad must be >= 0")


@dataclass
class CheckpointSection:
    """Where training state is saved and resumed from."""

    save: Optional[str] = setting(None, "dir for training checkpoints (null: none)")
    interval: int = setting(500, "save every this many steps, and at the last step and on SIGTERM / SIGUSR1")
    load: Optional[str] = setting(None, "resume from a checkpoint dir, or `auto`: the latest in `save` "
                                  "if any (null: start from `model.init`)")
    keep_last: Optional[int] = setting(3, "checkpoints kept in `save` (null: all)")
    optimizer_format: str = setting("reshardable", "how Adam state is saved: `reshardable` (resumes at any "
                                    "tensor / pipeline / expert / virtual-pipeline / data-parallel layout; "
                                    "gathered over data-parallel ranks at save: 12+ bytes per parameter of "
                                    "the rank's model shard in host memory while saving and loading) or "
                                    "`dp_reshardable` (no gather; resumes only at the saved tensor / pipeline "
                                    "/ expert / virtual-pipeline layout, any data-parallel size)",
                                    choices=("reshardable", "dp_reshardable"))

    def validate(self) -> None:
        positive("checkpoint.interval", self.interval)
        one_of("checkpoint.optimizer_format", self.optimizer_format, allowed(self, "optimizer_format"))
        if self.save:
            _check_writable_dir("checkpoint.save", self.save)
        if self.keep_last is not None:
            positive("checkpoint.keep_last", self.keep_last)
        if self.load == "auto" and not self.save:
            raise UserError("checkpoint.load=auto looks in checkpoint.save: set checkpoint.save")


@dataclass
class LoggingSection:
    """Where metrics go besides the console."""

    metrics: Optional[str] = setting(None, "JSONL file, one object per logged step")
    tensorboard: Optional[str] = setting(None, "TensorBoard log dir")
    wandb_project: Optional[str] = setting(None, "Weights & Biases project (needs wandb installed)")
    interval: int = setting(1, "log every this many steps (and the first and last)")
    sample_log: Optional[str] = setting(None, "dir of per-step records of the pairs each data-parallel rank "
                                        "trained (dp00000.jsonl ...: step, applied, epoch, keys)")

    def validate(self) -> None:
        positive("logging.interval", self.interval)
        if self.metrics:
            _check_writable_dir("logging.metrics", self.metrics, for_file=True)
        if self.tensorboard:
            _check_writable_dir("logging.tensorboard", self.tensorboard)


@dataclass
class EvalSection:
    """Held-out preference pairs scored during training (no optimizer state, no effect on training)."""

    shards: Optional[str] = setting(None, "held-out shards (a `megatron-mpo shards` dir, as data.shards; null: no "
                                    "evaluation)")
    ref_logps: Optional[str] = setting(None, "reference sidecars of eval.shards (`megatron-mpo reference` writes "
                                       "them with data.ref_logps's)")
    interval: int = setting(500, "evaluate every this many steps, and at the last step")

    def validate(self) -> None:
        positive("eval.interval", self.interval)
        if bool(self.shards) != bool(self.ref_logps):
            raise UserError("eval.shards and eval.ref_logps go together: set both (held-out pairs and their "
                            "reference values) or neither")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    data: DataConfig = field(default_factory=DataConfig)
    mpo: MPOLossConfig = field(default_factory=MPOLossConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)

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
    cfg = read_config(path, overrides)
    if path is not None:
        return cfg.validate()
    try:  # without a file the first gap would read like a fault of the (absent) config
        return cfg.validate()
    except UserError as exc:
        raise UserError(f"no --config given, and the overrides alone are not a complete run config ({exc}); "
                        "pass --config FILE") from None


def read_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """The file and overrides over the defaults, keys and types checked but not validated
    for training: what ``--print-config`` shows for a config still being written."""
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
    return from_dict(raw)


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
