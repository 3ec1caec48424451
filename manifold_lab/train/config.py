"""``TrainConfig``: every choice of a training run, as a frozen dataclass that round-trips through JSON.

Defaults are the paper's recipe (Section 6.1) where it has one: RMSProp with decay 0.9 and momentum
0.9, learning rate 0.045 decayed by 0.98 per epoch, weight decay 4e-5, batch 96. Where the paper is
silent the choice is documented on the field. ``None`` fields are resolved by :meth:`TrainConfig.resolved`
(learning rate and weight decay per optimiser, the stride layout per dataset). Every number has
bounds (:class:`~manifold_lab.cli.Bounds`, on the field): finite, and no larger than a machine can
train, so a wrong one stops with one line before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from manifold_lab.cli import Bounds, UsageError
from manifold_lab.models.config import NetworkOptions
from manifold_lab.options import option

OPTIMIZERS: tuple[str, ...] = ("paper", "sgd", "adamw")
LR_SCHEDULES: tuple[str, ...] = ("staircase", "cosine")
MODEL_NAMES: tuple[str, ...] = ("mobilenet_v2", "mobilenet_v1")
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
RESERVED_KEYS: tuple[str, ...] = ("resolved", "model_config", "environment", "init_from")
#: Former names of fields, still read from older ``config.json`` files: old name -> field.
RENAMED_FIELDS: dict[str, str] = {"preset": "layout", "bn_momentum": "bn_decay"}
#: Fields that say where things are, not what is trained: no part of a run's identity (its digest,
#: :func:`~manifold_lab.train.run_dir.config_digest`, and a sweep's run ids), free to change on resume.
LOCATION_FIELDS: tuple[str, ...] = ("data_dir",)
#: Fields added after runs were recorded, whose default reproduces what those runs did: a config that
#: holds the default, or lacks the field, is the same run (its id and digest do not change when a
#: field is added).
ADDED_FIELDS: tuple[str, ...] = ("block_impl", "max_bad_images")

#: Bounds of the numbers (steps, batches and sizes a machine can hold; rates finite in float32).
STEPS = Bounds(1, 10**9, integral=True)
COUNT = Bounds(0, 10**9, integral=True)
BATCH = Bounds(1, 65536, integral=True)
IMAGE_SIZE = Bounds(1, 4096, integral=True)
FLOAT32_MAX = 3.4028234663852886e38
POSITIVE = Bounds(0.0, FLOAT32_MAX, open_low=True)
NONNEGATIVE = Bounds(0.0, FLOAT32_MAX)
FRACTION = Bounds(0.0, 1.0)
#: Seeds: one uint32 key each; and how many one command trains (``--seeds``, a sweep's seed count).
SEED = Bounds(0, 2**32 - 1, integral=True)
SEED_COUNT = Bounds(1, 10_000, integral=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig(NetworkOptions):
    """One training run (or one configuration of a multi-seed run): the network's fields
    (:class:`~manifold_lab.models.config.NetworkOptions`, written once there) and the training
    choices below. Each field carries its help, group and flag, from which the command line is
    generated. Invalid values raise UsageError."""

    # model (the network's own fields come from NetworkOptions)
    layout: str | None = option(None, NetworkOptions.__dataclass_fields__["layout"].metadata["help"],
                                choices=NetworkOptions.__dataclass_fields__["layout"].metadata["choices"],
                                default_text="imagenet for imagefolder, small otherwise")
    model: str = option("mobilenet_v2", "network", choices=MODEL_NAMES)
    # data
    dataset: str = option("fashion_mnist", "data set (manifold_lab.data.DATASETS)", group="data", kind=str)
    data_dir: str | None = option(None, "dataset location (npz: the file)", group="data", kind=str,
                                  default_text="the dataset's standard place")
    image_size: int | None = option(None, "resize images to this size", group="data", bounds=IMAGE_SIZE,
                                    default_text="native size; imagefolder 224")
    augment: bool = option(True, "no random crop and flip", flag="--no-augment", group="data")
    max_bad_images: int = option(10, "imagefolder: corrupt image files tolerated, each named on stderr "
                                 "(a training file is replaced by the next one in file order, an evaluation "
                                 "file left out); one more stops the run", group="data", bounds=COUNT)
    # schedule
    epochs: float = option(10.0, "training epochs (the paper trains ImageNet far longer)", group="schedule",
                           bounds=Bounds(0.0, 100_000.0, open_low=True))
    steps: int | None = option(None, "training steps, instead of --epochs", group="schedule",
                               bounds=STEPS, default_text="from --epochs")
    batch_size: int = option(96, "global batch", group="schedule", bounds=BATCH)
    lr_schedule: str | None = option(None, "staircase (per-epoch decay) or cosine (to 0)", choices=LR_SCHEDULES,
                                     group="schedule", default_text="staircase for paper, cosine otherwise")
    lr_decay: float = option(0.98, "staircase: decay factor per epoch", group="schedule", bounds=FRACTION)
    warmup_steps: int = option(0, "linear warm-up steps before the schedule", group="schedule",
                               bounds=COUNT)
    # optimisation
    optimizer: str = option("paper", "paper (RMSProp, Section 6.1), sgd (momentum) or adamw",
                            choices=OPTIMIZERS, group="optimisation")
    lr: float | None = option(None, "initial learning rate", group="optimisation", bounds=POSITIVE,
                              default_text="paper 0.045, sgd 0.1, adamw 1e-3")
    weight_decay: float | None = option(None, "weight decay (paper, sgd: L2; adamw: decoupled)",
                                        group="optimisation", bounds=NONNEGATIVE,
                                        default_text="paper and sgd 4e-5, adamw 0.05")
    momentum: float = option(0.9, "paper and sgd: momentum", group="optimisation", bounds=FRACTION)
    rmsprop_decay: float = option(0.9, "paper: RMSProp decay", group="optimisation", bounds=FRACTION)
    rmsprop_eps: float = option(1.0, "paper: RMSProp epsilon (paper silent; TF-Slim's default)",
                                group="optimisation", bounds=POSITIVE)
    label_smoothing: float = option(0.0, "label smoothing (authors' code: 0.1)", group="optimisation",
                                    bounds=Bounds(0.0, 1.0, open_high=True))
    ema_decay: float | None = option(None, "evaluate an EMA of the weights and BatchNorm statistics "
                                     "(authors' code: 0.9999)", flag="--ema", metavar="DECAY",
                                     group="optimisation", bounds=Bounds(0.0, 1.0, open_low=True, open_high=True),
                                     default_text="off")
    # run
    seed: int = option(0, "random seed", group="run", bounds=SEED)
    eval_every: int | None = option(None, "steps between evaluations (and always at the end)", group="run",
                                    bounds=STEPS, default_text="one epoch")
    log_every: int = option(50, "steps between log lines", group="run", bounds=STEPS)
    checkpoint_every: int | None = option(None, "steps between checkpoints (and always at the end)",
                                          group="run", bounds=STEPS, default_text="one epoch")
    eval_batch_size: int = option(1000, "evaluation batch", group="run", bounds=BATCH)
    eval_bn: str = option("precise", "BatchNorm statistics at evaluation: precise (re-estimated over "
                          "training batches), running (the debiased running averages) or both "
                          "(precise reported)", choices=EVAL_BN_CHOICES, group="run")
    eval_bn_batches: int = option(50, "training batches that estimate the precise statistics", group="run",
                                  bounds=Bounds(1, 100_000, integral=True))
    # distributed
    num_devices: int | None = option(None, "data-parallel devices", flag="--devices", group="distributed",
                                     bounds=Bounds(1, 65536, integral=True), default_text="all local devices")

    def __post_init__(self) -> None:
        try:
            super().__post_init__()  # the choices and bounds of every field (options.check_fields)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.model == "mobilenet_v1" and (self.bottleneck_activation != "linear"
                                             or self.residual != "bottleneck"):
            raise UsageError("--bottleneck-activation and --residual apply to mobilenet_v2 only")

    def resolved(self) -> TrainConfig:
        """A copy with the ``None`` defaults that do not depend on the data filled in."""
        defaults = OPTIMIZER_DEFAULTS[self.optimizer]
        return dataclasses.replace(
            self,
            layout=self.layout or ("imagenet" if self.dataset == "imagefolder" else "small"),
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
        are ignored; former field names, :data:`RENAMED_FIELDS`, are read as the new ones).
        Unknown keys raise UsageError."""
        data = {RENAMED_FIELDS.get(k, k): v for k, v in data.items()}
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


def identity_fields(train_fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that make a run what it is: all but :data:`LOCATION_FIELDS`, and the
    :data:`ADDED_FIELDS` only where they differ from their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in ADDED_FIELDS}
    return {k: v for k, v in train_fields.items()
            if k not in LOCATION_FIELDS and not (k in defaults and v == defaults[k])}
