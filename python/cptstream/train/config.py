"""Run configuration: one dataclass per component, read from a YAML file in configs/.

A YAML file is the whole config, with one mapping per section (`model`, `lora`, `optim`, `data`,
`train`, `checkpoint`, `log`). Command-line flags override single named fields (`--set
lora.r=16`, `--max-steps 100`). Every field is checked in `__post_init__`, and `load_config`
prefixes the error with the file or flag the bad value came from.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LogConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "parse_override",
]


class ConfigError(ValueError):
    """Raised for an invalid config value; the message names the source, the field and the value."""


def _require(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{name} = {value!r} is invalid: expected {expected}")


def _check_types(config: Any, section: str) -> None:
    """Check each field against its annotation; YAML floats written without a dot (5e-5) are strings."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        name = f"{section}.{item.name}"
        hint = hints[item.name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        list_types = [typing.get_args(kind)[0] for kind in allowed if typing.get_origin(kind) is list]

        if value is None:
            _require(type(None) in allowed, name, value, "a value, not null")
        elif list_types:
            element = float if list_types[0] is float else list_types[0]
            ok = isinstance(value, list) and all(_is_instance(entry, element) for entry in value)
            _require(ok, name, value, f"a list of {element.__name__}")
        elif float in allowed:
            try:
                setattr(config, item.name, float(value))
            except (TypeError, ValueError):
                _require(False, name, value, "a number")
            _require(not isinstance(value, bool), name, value, "a number")
        elif int in allowed:
            _require(_is_instance(value, int), name, value, "an integer")
        elif bool in allowed:
            _require(isinstance(value, bool), name, value, "true or false")
        elif str in allowed:
            _require(isinstance(value, str), name, value, "a string")


def _is_instance(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    path: str = ""
    """Local directory of the base model: config.json, safetensors weights and tokenizer.json."""
    backend: str = "auto"
    """`unsloth` (FastLanguageModel), `hf` (transformers + peft), or `auto`: unsloth when CUDA and the package are present."""
    max_seq_length: int = 4096
    """Tokens per training row; must equal the shard manifest's `seq_len`."""
    precision: str = "auto"
    """`bf16`, `fp32`, or `auto`: bf16 on a GPU that supports it, else fp32."""
    attn_implementation: str = "auto"
    """transformers attention for the hf backend; `auto` is flash_attention_2 when installed on GPU, else sdpa."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (Unsloth's offloaded variant on that backend)."""
    load_in_4bit: bool = False
    """Load the frozen base weights in 4 bit (QLoRA); unsloth backend only."""
    trust_remote_code: bool = False
    """Run Python code shipped in the model directory (`auto_map`); off, because that code is an input."""

    def __post_init__(self) -> None:
        _check_types(self, "model")
        _require(self.backend in ("auto", "unsloth", "hf"), "model.backend", self.backend, "auto, unsloth or hf")
        _require(self.max_seq_length >= 2, "model.max_seq_length", self.max_seq_length, "an integer >= 2")
        _require(self.precision in ("auto", "bf16", "fp32"), "model.precision", self.precision, "auto, bf16 or fp32")


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    r: int = 32
    """LoRA rank."""
    alpha: int = 32
    """LoRA scale numerator: the update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA."""
    dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1)."""
    use_rslora: bool = True
    """Rank-stabilized LoRA scaling alpha/sqrt(r), which keeps high ranks from learning slower."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers that get LoRA adapters."""
    modules_to_save: list[str] = field(default_factory=lambda: ["embed_tokens", "lm_head"])
    """Modules trained in full (peft `modules_to_save`), for new domain vocabulary use."""

    def __post_init__(self) -> None:
        _check_types(self, "lora")
        _require(self.r >= 1, "lora.r", self.r, "an integer >= 1")
        _require(self.alpha >= 1, "lora.alpha", self.alpha, "an integer >= 1")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a number in [0, 1)")
        _require(bool(self.target_modules), "lora.target_modules", self.target_modules, "at least one module name")
        overlap = sorted(set(self.target_modules) & set(self.modules_to_save))
        _require(not overlap, "lora.modules_to_save", self.modules_to_save, f"no module of target_modules {overlap}")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 5e-5
    """Peak learning rate of the LoRA weights (AdamW)."""
    embedding_lr: float | None = 5e-6
    """Peak learning rate of the fully trained `modules_to_save`; null uses `lr`."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW beta1 and beta2."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    warmup_ratio: float = 0.05
    """Fraction of the steps with a linear warmup from 0."""
    schedule: str = "cosine"
    """Decay after warmup: `cosine`, `linear` or `constant`."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""

    def __post_init__(self) -> None:
        _check_types(self, "optim")
        _require(self.lr > 0, "optim.lr", self.lr, "a number > 0")
        _require(self.embedding_lr is None or self.embedding_lr > 0, "optim.embedding_lr", self.embedding_lr, "> 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        ok = len(self.betas) == 2 and all(0 <= beta < 1 for beta in self.betas)
        _require(ok, "optim.betas", self.betas, "two numbers in [0, 1)")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", self.max_grad_norm, "a number >= 0")
        _require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        _require(
            self.schedule in ("cosine", "linear", "constant"),
            "optim.schedule",
            self.schedule,
            "cosine, linear or constant",
        )
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = ""
    """Shard directory written by `cptstream shard` (contains manifest.json)."""
    micro_batch_size: int = 1
    """Rows per forward pass on each rank."""
    grad_accum: int = 8
    """Micro-batches per optimizer step."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process."""
    shuffle_block: int = 2048
    """Rows permuted together (the shuffle buffer); a worker keeps about this many rows decoded."""
    eval_max_batches: int | None = 50
    """Validation micro-batches per evaluation; null evaluates the whole split."""

    def __post_init__(self) -> None:
        _check_types(self, "data")
        _require(self.micro_batch_size >= 1, "data.micro_batch_size", self.micro_batch_size, "an integer >= 1")
        _require(self.grad_accum >= 1, "data.grad_accum", self.grad_accum, "an integer >= 1")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        _require(self.shuffle_block >= 1, "data.shuffle_block", self.shuffle_block, "an integer >= 1")
        ok = self.eval_max_batches is None or self.eval_max_batches >= 1
        _require(ok, "data.eval_max_batches", self.eval_max_batches, "an integer >= 1 or null")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    output: str = ""
    """Run directory: checkpoints/, adapter/, metrics.jsonl and the lock."""
    epochs: int = 2
    """Passes over the train split; sets max_steps when that is null."""
    max_steps: int | None = None
    """Optimizer steps; null derives them from the manifest's rows so the schedule ends with the data."""
    seed: int = 3407
    """Seed of the shuffle, LoRA initialization and dropout."""

    def __post_init__(self) -> None:
        _check_types(self, "train")
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps, ">= 1 or null")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every: int = 500
    """Save a checkpoint every this many steps (and on SIGTERM/SIGINT and at the end)."""
    keep: int = 2
    """Number of newest checkpoints kept; older ones are deleted."""

    def __post_init__(self) -> None:
        _check_types(self, "checkpoint")
        _require(self.every >= 1, "checkpoint.every", self.every, "an integer >= 1")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")


@dataclass(kw_only=True, slots=True)
class LogConfig:
    every: int = 10
    """Log one line and one metrics.jsonl record every this many steps."""
    eval_every: int = 500
    """Evaluate validation perplexity every this many steps, and at the end."""
    tensorboard: bool = False
    """Also write TensorBoard events to OUTPUT/tensorboard (needs the tensorboard package)."""
    peak_tflops: float | None = None
    """Accelerator peak bf16 dense TFLOP/s for MFU; null looks the GPU name up in a small table."""

    def __post_init__(self) -> None:
        _check_types(self, "log")
        _require(self.every >= 1, "log.every", self.every, "an integer >= 1")
        _require(self.eval_every >= 1, "log.eval_every", self.eval_every, "an integer >= 1")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<defaults>"
    """The file the config came from, for error messages."""

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain data, for checkpoints and logs."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.field=value` into the dotted key and the value parsed as YAML.

    Raises:
        ConfigError: the text has no `=` or the key is not `section.field`.
    """
    key, sep, raw = text.partition("=")
    if not sep or key.count(".") != 1:
        raise ConfigError(f"--set {text!r} is invalid: expected SECTION.FIELD=VALUE, e.g. lora.r=16")
    return key.strip(), yaml.safe_load(raw)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config and apply command-line overrides.

    Args:
        path: the YAML file.
        overrides: dotted `section.field` keys to values, applied after the file; a value of None
            leaves the field as the file sets it.

    Returns:
        The checked config.

    Raises:
        ConfigError: unknown section or field, or an invalid value; names the file or flag.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the config: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {sorted(SECTIONS)}, got {type(raw).__name__}")

    sections: dict[str, dict[str, Any]] = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {name!r}; valid sections are {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {name!r} must be a mapping, got {values!r}")
        sections[name] = dict(values)

    origin: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        name, _, field_name = key.partition(".")
        if name not in SECTIONS:
            raise ConfigError(f"override {key}: unknown section {name!r}; valid sections are {sorted(SECTIONS)}")
        sections.setdefault(name, {})[field_name] = value
        origin[key] = f"command-line override {key}={value!r}"

    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = sections.get(name, {})
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown field {name}.{unknown[0]}; fields of {name} are {sorted(known)}")
        try:
            built[name] = cls(**values)
        except ConfigError as err:
            bad_key = str(err).split(" = ", 1)[0]
            raise ConfigError(f"{origin.get(bad_key, str(path))}: {err}") from None
    return RunConfig(**built, source=str(path))


def derive_max_steps(config: RunConfig, train_rows: int, world_size: int) -> int:
    """Return the configured max_steps, or the steps that cover `epochs` passes over `train_rows`.

    A step consumes `world_size * micro_batch_size * grad_accum` rows. When that does not divide
    the rows, the last step rounds up and reads the first rows of the next pass.
    """
    if config.train.max_steps is not None:
        return config.train.max_steps
    rows_per_step = world_size * config.data.micro_batch_size * config.data.grad_accum
    return max(1, math.ceil(config.train.epochs * train_rows / rows_per_step))
