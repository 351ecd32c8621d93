"""One source of truth for training and sampling settings (docs/design.md, "Plugins").

- `TrainConfig`: every setting of the shared trainer, with its default. The CLI's defaults,
  `run_training`'s and `train`'s all come from here; a plugin's preset replaces the fields
  its model needs (learning rate, warm-up, batch size, ...).
- `Preset`: a named model size plus the training settings that go with it. Every plugin has
  `paper` (the paper / official code) and `tiny` (CPU smoke runs that visibly learn in a few
  dozen steps with no flags). `--weights tiny` picks `tiny`, the other weights modes `paper`.
- `SampleSettings`: how a plugin samples (steps, guidance, scheduler, unconditional branch).
  A plugin names its recipes (`official`, `paper`, ...); the first one is its default.
- `PluginOption`: an extra command-line option a plugin declares (IMAGPose's `--stage`,
  RePoseDM's `--pose-guidance`); the CLI adds it to that plugin's `train` / `sample` command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from posedata.extractors.base import WEIGHTS_MODES

MIXED_PRECISION = ("no", "fp16", "bf16")
# `--scheduler` names (diffusers classes in posedata.train.diffusion.SCHEDULERS)
SCHEDULER_NAMES = ("ddim", "ddpm", "unipc", "dpmpp", "euler", "euler_a", "unclip")
ATTENTION_MODES = ("sdpa", "keep")
LR_SCHEDULES = ("constant_with_warmup", "constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `posedata.train.trainer.train` needs besides the plugin and the data.

    `batch_size` is per process (global batch = batch_size x processes x
    gradient_accumulation). `ema_decay` None: no EMA. `attention`: "sdpa" sets torch's
    scaled_dot_product_attention on every plain diffusers attention layer, "keep" leaves the
    model's processors."""

    max_steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    lr_schedule: str = "constant_with_warmup"
    max_grad_norm: float = 1.0
    gradient_accumulation: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    ema_decay: float | None = None
    gradient_checkpointing: bool = False
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        checks = [
            (self.max_steps >= 0, "max_steps must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.gradient_accumulation >= 1, "gradient_accumulation must be >= 1"),
            (self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}"),
            (self.attention in ATTENTION_MODES, f"attention must be one of {ATTENTION_MODES}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.ema_decay is None or 0.0 < self.ema_decay < 1.0, "ema_decay must be in (0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (TrainConfig: {self})")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes`; None values are ignored (a CLI flag that was not given)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default(name: str) -> Any:
    """The TrainConfig default of one field (what the CLI shows)."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


@dataclass(frozen=True)
class SampleSettings:
    """How one model samples. Keyword names are diffusers' pipeline arguments.

    `guidance_scale` <= 1 turns classifier-free guidance off (as diffusers' pipelines do).
    `uncond` names what the unconditional branch feeds; each plugin documents its modes
    (e.g. "null": the stored null embeddings training dropped to; "zeros": zero embeddings,
    what most official pipelines do)."""

    num_inference_steps: int = 50
    guidance_scale: float = 2.0
    guidance_rescale: float = 0.0
    scheduler: str = "ddim"
    uncond: str = "null"

    def replace(self, **changes: Any) -> SampleSettings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Preset:
    """A model size (`model`: keyword arguments the plugin's model builder reads) and the
    training settings that go with it."""

    model: Mapping[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class PluginOption:
    """One extra option of a plugin's `train` or `sample` command: `--<name with dashes>`,
    passed to the plugin as keyword `name`. `choices` makes it a choice; `type` is a Python
    type (str, int, float, bool: bool makes a flag)."""

    name: str
    help: str
    default: Any = None
    type: type = str
    choices: tuple[str, ...] | None = None


def preset_name(weights: str, preset: str | None = None) -> str:
    """`--weights tiny` trains the tiny preset, the full-size modes the paper preset."""
    if weights not in WEIGHTS_MODES:
        raise ValueError(f"weights must be one of {WEIGHTS_MODES}, got {weights!r}")
    return preset or ("tiny" if weights == "tiny" else "paper")
