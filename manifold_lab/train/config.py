"""``TrainConfig``: every choice of a training run, as a frozen dataclass that round-trips through JSON.

Defaults are the paper's recipe (Section 6.1) where it has one: RMSProp with decay 0.9 and momentum
0.9, learning rate 0.045 decayed by 0.98 per epoch, weight decay 4e-5, batch 96. Where the paper is
silent the choice is documented on the field. ``None`` fields are resolved by :meth:`TrainConfig.resolved`
(learning rate and weight decay per optimiser, the preset per dataset).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from manifold_lab.cli import UsageError
from manifold_lab.models.config import (BOTTLENECK_ACTIVATIONS, DEPTHWISE_IMPLS, PADDINGS, PRESETS,
                                        RESIDUAL_PLACEMENTS)

OPTIMIZERS: tuple[str, ...] = ("paper", "sgd", "adamw")
LR_SCHEDULES: tuple[str, ...] = ("staircase", "cosine")
MODEL_NAMES: tuple[str, ...] = ("mobilenet_v2", "mobilenet_v1")
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
#: BatchNorm statistics of evaluation (:mod:`manifold_lab.train.bn_stats`); ``both`` reports
#: ``precise`` and records ``running`` beside it.
EVAL_BN_CHOICES: tuple[str, ...] = ("precise", "running", "both")

#: Learning rate and weight decay per optimiser when the config leaves them unset.
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "paper": {"lr": 0.045, "weight_decay": 4e-5},   # Section 6.1
    "sgd": {"lr": 0.1, "weight_decay": 4e-5},      # momentum 0.9, cosine decay to 0
    "adamw": {"lr": 1e-3, "weight_decay": 0.05},   # decoupled decay, cosine decay to 0
}
#: Learning-rate schedule per optimiser when the config leaves it unset.
SCHEDULE_DEFAULTS: dict[str, str] = {"paper": "staircase", "sgd": "cosine", "adamw": "cosine"}

#: Keys that ``config.json`` holds next to the TrainConfig fields (ignored by ``from_dict``).
RESERVED_KEYS: tuple[str, ...] = ("resolved", "model_config", "environment")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (or one configuration of a multi-seed run). Invalid values raise UsageError."""

    # model
    model: str = "mobilenet_v2"
    width: float = 1.0
    preset: str | None = None  # None: "imagenet" for imagefolder, "small" for the 28-32 px datasets
    bottleneck_activation: str = "linear"
    residual: str = "bottleneck"
    depthwise_impl: str = "auto"
    padding: str = "same"
    dropout_rate: float = 0.2  # drop probability before the classifier (authors' code: keep 0.8)
    bn_momentum: float = 0.997  # BatchNorm running-average decay (TF-Slim); zero-debiased in training
    compute_dtype: str = "float32"  # activations; params, optimiser state, BN statistics stay float32
    # data
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    image_size: int | None = None  # resize in-memory datasets (imagefolder: its default 224)
    augment: bool = True  # random crop with padding (+ flip where the dataset allows it)
    # schedule
    epochs: float = 10.0  # the paper trains ImageNet far longer; 10 fits Fashion-MNIST on a CPU
    steps: int | None = None  # total steps; overrides epochs when given
    batch_size: int = 96
    # optimiser
    optimizer: str = "paper"
    lr: float | None = None  # None: OPTIMIZER_DEFAULTS[optimizer]["lr"]
    weight_decay: float | None = None  # None: OPTIMIZER_DEFAULTS[optimizer]["weight_decay"]
    lr_schedule: str | None = None  # None: SCHEDULE_DEFAULTS[optimizer]
    lr_decay: float = 0.98  # "staircase": decay factor per epoch
    momentum: float = 0.9  # "paper" and "sgd"
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1.0  # paper silent; TF-Slim's train_image_classifier default (opt_epsilon)
    warmup_steps: int = 0  # linear warm-up before the schedule
    label_smoothing: float = 0.0  # authors' code: 0.1
    ema_decay: float | None = None  # EMA of weights and BN statistics, evaluated instead; code: 0.9999
    # bookkeeping
    seed: int = 0
    eval_every: int | None = None  # steps; None: once per epoch (and always at the end)
    log_every: int = 50
    checkpoint_every: int | None = None  # steps; None: once per epoch (and always at the end)
    eval_batch_size: int = 1000
    eval_bn: str = "precise"  # BatchNorm statistics at evaluation: precise, running or both (bn_stats)
    eval_bn_batches: int = 50  # training batches that estimate the precise statistics
    num_devices: int | None = None  # data-parallel devices; None: all local devices

    def __post_init__(self) -> None:
        _choice("model", self.model, MODEL_NAMES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if self.lr_schedule is not None:
            _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.preset is not None:
            _choice("preset", self.preset, PRESETS)
        _choice("bottleneck_activation", self.bottleneck_activation, BOTTLENECK_ACTIVATIONS)
        _choice("residual", self.residual, RESIDUAL_PLACEMENTS)
        _choice("depthwise_impl", self.depthwise_impl, DEPTHWISE_IMPLS)
        _choice("padding", self.padding, PADDINGS)
        _choice("eval_bn", self.eval_bn, EVAL_BN_CHOICES)
        if self.model == "mobilenet_v1" and (self.bottleneck_activation != "linear"
                                             or self.residual != "bottleneck"):
            raise UsageError("--bottleneck-activation and --residual apply to mobilenet_v2 only")
        _positive("width", self.width)
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        _positive("log_every", self.log_every)
        _positive("eval_batch_size", self.eval_batch_size)
        _positive("eval_bn_batches", self.eval_bn_batches)
        for name in ("steps", "eval_every", "checkpoint_every", "image_size", "num_devices"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.lr is not None:
            _positive("lr", self.lr)
        for name in ("weight_decay", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"{name} must be >= 0, got {value}")
        for name in ("lr_decay", "momentum", "rmsprop_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        _positive("rmsprop_eps", self.rmsprop_eps)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise UsageError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise UsageError(f"bn_momentum must be in [0, 1), got {self.bn_momentum}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise UsageError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.seed < 0:
            raise UsageError(f"seed must be >= 0, got {self.seed}")

    def resolved(self) -> TrainConfig:
        """A copy with the ``None`` defaults that do not depend on the data filled in."""
        defaults = OPTIMIZER_DEFAULTS[self.optimizer]
        return dataclasses.replace(
            self,
            preset=self.preset or ("imagenet" if self.dataset == "imagefolder" else "small"),
            lr=defaults["lr"] if self.lr is None else self.lr,
            lr_schedule=self.schedule_name,
            weight_decay=defaults["weight_decay"] if self.weight_decay is None else self.weight_decay,
        )

    @property
    def schedule_name(self) -> str:
        """The learning-rate schedule: ``lr_schedule``, or the optimiser's default when unset."""
        return self.lr_schedule or SCHEDULE_DEFAULTS[self.optimizer]

    def replace(self, **changes: Any) -> TrainConfig:
        """``dataclasses.replace`` (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Key-sorted JSON text."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; also accepts a whole ``config.json`` (its reserved keys
        are ignored). Unknown keys raise UsageError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - set(RESERVED_KEYS))
        if unknown:
            raise UsageError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"training config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError("training config JSON must be an object")
        return cls.from_dict(data)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UsageError(f"{name} must be positive, got {value!r}")
