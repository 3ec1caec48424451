"""The paper's ablations as data: studies (base overrides + variants) and presets (scale).

A run's training configuration is ``preset.train`` updated with the study's ``overrides``, then the
variant's ``overrides``, then ``seed``. Runs are identified by a hash of that resolved configuration
(see :mod:`ablations.plan`), so a configuration that appears in several studies (the baseline: linear
bottleneck, shortcuts between bottlenecks, the preset's width) trains once and is shared.

Studies
-------
- ``fig6a``: bottleneck activation, ``linear`` (paper) vs ``relu6`` (Fig. 6a).
- ``fig6b``: shortcut placement, between ``bottleneck`` s (paper) vs between ``expansion`` s vs
  ``none`` (Fig. 6b), all with linear bottlenecks.
- ``fig5``: width multipliers 0.35 / 0.5 / 0.75 / 1.0 (accuracy against multiply-adds; Fig. 5 and the
  Table 4 analogue).
- ``fig7``: the trained baseline (first seed) whose expansion activations Appendix A's Fig. 7 analyses.

``all`` selects these four (:data:`ALL_STUDIES`). Studies beyond the paper run only when named:

- ``residual_readings``: the toolkit's readings of "shortcuts connecting the expanded layers" side by
  side (``expansion``, ``expansion_preact``, ``inner``; see :mod:`manifold_lab.models.mobilenet_v2`)
  with ``bottleneck`` and ``none``, all with linear bottlenecks
  (``python -m ablations.run residual_readings --preset quick``).

Presets are functions returning a :class:`Preset` (big_vision's ``get_config`` style); each docstring
holds the command, the recipe and the expected outcome (its first sentence describes the preset in
the report). Measured numbers (accuracies, timings) belong to the results and ``REPORT.md``, not to
the docstrings. Change scale there: ``train`` (epochs, width, batch, ...), ``seeds`` and
``width_seeds``. ``python -m ablations.run`` ends a sweep that completes the preset's plan with the
measuring step (:mod:`ablations.measure`); ``python -m ablations.figures`` then renders the report.

Every preset keeps the paper's BatchNorm decay (0.997) and evaluates with precise BatchNorm
statistics, recording the running averages beside them (``eval_bn="both"``; see
:mod:`manifold_lab.train.bn_stats`), so the report gives its verdicts under both protocols.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of a study: a legend label (the paper's wording) and TrainConfig overrides."""

    name: str
    label: str
    overrides: Mapping[str, Any]
    paper_top1: float | None = None  # the paper's end value (ImageNet top-1, %), where it gives one


@dataclasses.dataclass(frozen=True)
class Study:
    """An ablation: overrides shared by its variants, the variants, and which one is the baseline.

    ``kind`` selects the figure: ``curves`` (accuracy against step, Fig. 6), ``width`` (accuracy
    against multiply-adds, Fig. 5) or ``activations`` (positive-channel statistics, Fig. 7).
    ``seed_policy``: ``"seeds"`` (the preset's ``seeds``), ``"width_seeds"`` or ``"first"`` (seed 0 only)."""

    name: str
    title: str
    kind: str
    variants: tuple[Variant, ...]
    baseline: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _frozen({}))
    seed_policy: str = "seeds"
    claim: str = ""
    comparisons: tuple[tuple[str, str], ...] = ()  # extra (variant, reference) pairs to test

    def pairs(self, names: tuple[str, ...]) -> list[tuple[str, str]]:
        """(variant, reference) pairs to compare among ``names``: each variant against the baseline,
        then the extra ``comparisons``."""
        base = [(n, self.baseline) for n in names if n != self.baseline and self.baseline in names]
        return base + [(a, b) for a, b in self.comparisons if a in names and b in names]

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"study {self.name} has no variant {name!r}")


FIG6A = Study(
    name="fig6a",
    title="Fig. 6a: impact of non-linearity in the bottleneck layer",
    kind="curves",
    variants=(
        Variant("linear", "Linear bottleneck", _frozen({"bottleneck_activation": "linear"}), 71.0),
        Variant("relu6", "Relu6 in bottleneck", _frozen({"bottleneck_activation": "relu6"}), 70.35),
    ),
    baseline="linear",
    overrides=_frozen({"residual": "bottleneck"}),
    claim=("Linear bottlenecks improve performance: a ReLU6 on the projection output lowers accuracy "
           "(\"non-linearity destroys information in low-dimensional space\")."),
)

FIG6B = Study(
    name="fig6b",
    title="Fig. 6b: impact of residual connections",
    kind="curves",
    variants=(
        Variant("bottleneck", "Shortcut between bottlenecks", _frozen({"residual": "bottleneck"}), 71.0),
        Variant("expansion", "Shortcut between expansions", _frozen({"residual": "expansion"}), 70.45),
        Variant("none", "No residual", _frozen({"residual": "none"}), 69.6),
    ),
    baseline="bottleneck",
    overrides=_frozen({"bottleneck_activation": "linear"}),
    claim=("Shortcuts connecting the bottlenecks perform better than shortcuts connecting the expanded "
           "layers, which perform better than no residual connection."),
    comparisons=(("none", "expansion"),),
)

FIG5 = Study(
    name="fig5",
    title="Fig. 5 / Table 4 analogue: accuracy against multiply-adds over width multipliers",
    kind="width",
    variants=tuple(
        Variant(f"w{w:g}", f"MobileNetV2 ({w:g})", _frozen({"width": w}), top1)
        for w, top1 in ((0.35, 60.3), (0.5, 65.4), (0.75, 69.8), (1.0, 71.8))
    ),
    baseline="w0.35",
    overrides=_frozen({"bottleneck_activation": "linear", "residual": "bottleneck"}),
    seed_policy="width_seeds",
    claim=("Accuracy rises with the width multiplier and multiply-adds (published checkpoints, 224 px: "
           "60.3 / 65.4 / 69.8 / 71.8 top-1 at 59 / 97 / 209 / 300 M MACs for 0.35 / 0.5 / 0.75 / 1.0)."),
)

FIG7 = Study(
    name="fig7",
    title="Fig. 7: distribution of activation patterns after the expansion ReLU6",
    kind="activations",
    variants=(Variant("baseline", "Trained baseline", _frozen({})),),
    baseline="baseline",
    overrides=_frozen({"bottleneck_activation": "linear", "residual": "bottleneck"}),
    seed_policy="first",
    claim=("At step 0 the average fraction of positive channels after each expansion sits near one half, "
           "tightly concentrated; after training the average is unchanged but the spread grows, and all "
           "but two layers stay above the invertibility threshold (1/6 of the channels)."),
)

FIG6B_READINGS = Study(
    name="residual_readings",
    title="Readings of \"shortcuts connecting the expanded layers\" (beyond the paper, beside Fig. 6b)",
    kind="curves",
    variants=(
        Variant("bottleneck", "Shortcut between bottlenecks", _frozen({"residual": "bottleneck"}), 71.0),
        Variant("expansion", "Shortcut between expansions", _frozen({"residual": "expansion"}), 70.45),
        Variant("expansion_preact", "Pre-activation shortcut between expansions",
                _frozen({"residual": "expansion_preact"})),
        Variant("inner", "Shortcut around the depthwise", _frozen({"residual": "inner"})),
        Variant("none", "No residual", _frozen({"residual": "none"}), 69.6),
    ),
    baseline="bottleneck",
    overrides=_frozen({"bottleneck_activation": "linear"}),
    claim=("The paper makes no claim about these readings: ``expansion_preact`` (the stream between "
           "expansions carries the pre-activation sum, added before the expansion's ReLU6) and ``inner`` "
           "(a shortcut from the expansion output to the depthwise output inside each stride-1 block) are "
           "this toolkit's further readings of Fig. 6b's \"shortcuts connecting the expanded layers\", "
           "beside its ``expansion`` reading. Tested: whether each reading differs from the shortcut "
           "between bottlenecks (Fig. 6b: 71.0 vs 70.45 top-1 for the paper's own wording), from the "
           "``expansion`` reading, and, for ``inner``, from no residual."),
    comparisons=(("expansion_preact", "expansion"), ("inner", "expansion"), ("inner", "none")),
)

#: Every study, by name (each one selectable by name, e.g. ``python -m ablations.run fig6a``).
STUDIES: Mapping[str, Study] = _frozen({s.name: s for s in (FIG6A, FIG6B, FIG5, FIG7, FIG6B_READINGS)})
#: The paper's studies: what ``all`` selects (the figures and REPORT.md cover these).
ALL_STUDIES: tuple[str, ...] = (FIG6A.name, FIG6B.name, FIG5.name, FIG7.name)

#: Published top-1 (224 px) and MACs (millions) of the authors' width checkpoints (Fig. 5 reference).
PAPER_WIDTH_CHECKPOINTS: tuple[tuple[float, int, float], ...] = (
    (0.35, 59, 60.3), (0.5, 97, 65.4), (0.75, 209, 69.8), (1.0, 300, 71.8), (1.3, 509, 74.4), (1.4, 582, 75.0),
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Scale of a sweep: the TrainConfig fields every run shares, and seed counts.

    ``seeds``: seeds per variant of the curve studies (fig6a, fig6b); ``width_seeds``: per width of
    fig5; ``widths``: restricts fig5's widths (None: all four). ``spiral_points``/``spiral_trials``,
    ``fig7_images``, ``latency_repeats``, ``audit_train_images`` and ``audit_decoder_features`` size
    the measuring step (:mod:`ablations.measure`): Fig. 7 and the Appendix A audit look at the first
    ``fig7_images`` test images; the audit's block-input decoders are fitted on, and its step-0
    networks take their BatchNorm statistics from, the first ``audit_train_images`` training
    images, and only blocks whose output has at most ``audit_decoder_features`` values get a
    decoder (the fit costs the cube of that number)."""

    name: str
    doc: str
    train: Mapping[str, Any]
    seeds: int
    width_seeds: int = 1
    widths: tuple[float, ...] | None = None
    spiral_points: int = 2000
    spiral_trials: int = 256
    fig7_images: int = 256
    latency_repeats: int = 50
    audit_train_images: int = 4096
    audit_decoder_features: int = 4096

    @property
    def summary(self) -> str:
        """The first sentence of the preset's docstring: what it is, in one line (for the report)."""
        paragraph = " ".join(self.doc.strip().split("\n\n")[0].split())
        return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph, maxsplit=1)[0]


def _preset(fn: Callable[[], Preset]) -> Callable[[], Preset]:
    PRESETS[fn.__name__] = fn
    return fn


PRESETS: dict[str, Callable[[], Preset]] = {}


@_preset
def smoke() -> Preset:
    """For the tests: every study end to end on scikit-learn's digits (always available), width 0.35,
    3 steps, one seed, fig5 at the baseline width only: the 4 distinct configurations fig6a/fig6b
    need (each run's cost is compiling its train step). Accuracy is meaningless at this scale.

    Command: ``python -m ablations.run all --preset smoke && python -m ablations.figures --preset smoke``
    (the sweep ends with the measuring step).
    Expected: the measurements, every figure and REPORT.md produced; verdicts "not resolved at this
    scale".
    """
    return Preset(
        name="smoke", doc=smoke.__doc__ or "",
        train=_frozen({"model": "mobilenet_v2", "dataset": "digits", "layout": "imagenet", "width": 0.35,
                       "bottleneck_activation": "linear", "residual": "bottleneck", "eval_bn": "both",
                       "steps": 3, "batch_size": 32, "eval_every": 3}),
        seeds=1, width_seeds=1, widths=(0.35,),
        spiral_points=300, spiral_trials=16, fig7_images=32, latency_repeats=3, audit_train_images=64,
        audit_decoder_features=512,
    )


@_preset
def quick() -> Preset:
    """The README main job: every study with one seed on Fashion-MNIST and all figures, sized for a
    sweep of minutes on 2 CPU cores (5 distinct configurations: fig5 at widths 0.35 and 1.0 only; each
    run pays one train-step compilation). One seed gives no interval, so the Fig. 6 verdicts read
    "not resolved at this scale".

    Command: ``python -m ablations.run all --preset quick && python -m ablations.figures --preset quick``
    Expected: all figures; baseline test accuracy a little above 80% after 500 steps; every run ends
    within a few tenths of a point of its best evaluation.
    Recipe: the paper's RMSProp and learning rate with a 50-step linear warm-up and a cosine decay to
    zero over the 500 steps: at the paper's per-epoch decay the rate would stay at 0.045 for the whole
    run (500 steps are under one epoch), where a run can end on a late loss spike far below its best
    evaluation. No crop/flip augmentation (it slows a network that underfits at this budget).
    Scale knobs: ``steps`` below, ``widths``.
    """
    return Preset(
        name="quick", doc=quick.__doc__ or "",
        train=_frozen({"model": "mobilenet_v2", "dataset": "fashion_mnist", "layout": "imagenet", "width": 0.35,
                       "bottleneck_activation": "linear", "residual": "bottleneck", "eval_bn": "both",
                       "augment": False, "lr_schedule": "cosine", "warmup_steps": 50,
                       "steps": 500, "batch_size": 96, "eval_every": 100}),
        seeds=1, width_seeds=1, widths=(0.35, 1.0),
        spiral_points=2000, spiral_trials=256, fig7_images=256, latency_repeats=30,
    )


@_preset
def cpu() -> Preset:
    """The full CPU reproduction on Fashion-MNIST: 8 seeds per variant of fig6a and fig6b (4 distinct
    configurations, the baseline shared: 32 runs), one seed per width of fig5 (0.35, 0.5, 1.0): 34
    runs, trained side by side, one per core (``--workers auto``). The sweep's log gives each run's
    time, and the measurements record the machine the report's latencies come from.

    Command: ``python -m ablations.run all --preset cpu && python -m ablations.figures --preset cpu``
    Expected: baseline (linear bottleneck, bottleneck shortcuts) near 90% test accuracy after 6
    epochs; REPORT.md gives paired intervals over 8 seeds, Holm-corrected per figure, the smallest
    difference each comparison can detect, and verdicts under precise and running BatchNorm
    statistics. Eight paired seeds resolve differences of about 1.2 standard deviations of the
    per-seed differences at 80% power (one comparison at 5%).

    Recipe, chosen on Fashion-MNIST at width 0.35: the ``bneck1`` stride layout (Table 2 with its first
    stride-2 bottleneck stage at stride 1: 28 px keeps 14x14 through that stage and ends at 2x2, where
    Table 2's strides reduce 28 px to 1x1); no augmentation (crop + flip slow down a
    network that underfits at this budget); the paper's RMSProp at twice its learning rate (0.09)
    with a 300-step linear warm-up and a cosine decay to zero over the 6 epochs, so that the rate
    anneals within the run.
    Scale knobs: ``epochs``, ``width``, ``widths`` below (width 1.0 is the longest run).
    """
    return Preset(
        name="cpu", doc=cpu.__doc__ or "",
        train=_frozen({"model": "mobilenet_v2", "dataset": "fashion_mnist", "layout": "bneck1", "width": 0.35,
                       "bottleneck_activation": "linear", "residual": "bottleneck", "eval_bn": "both",
                       "augment": False, "lr": 0.09, "lr_schedule": "cosine", "warmup_steps": 300,
                       "epochs": 6, "batch_size": 96, "eval_every": 625}),
        seeds=8, width_seeds=1, widths=(0.35, 0.5, 1.0),
        spiral_points=2000, spiral_trials=1000, fig7_images=512, latency_repeats=50,
    )


@_preset
def cifar10() -> Preset:
    """Accelerator preset: CIFAR-10 at 32 px with the ``small`` stem (first stride-2 stage at stride 1),
    width 1.0, the paper's optimiser, 5 seeds per variant.

    Command (one GPU): ``python -m ablations.run all --preset cifar10 --data-dir DIR``; on a cluster,
    one job per shard: ``python -m ablations.run all --preset cifar10 --shard $((i+1))/N``; then
    ``python -m ablations.figures --preset cifar10``.
    Expected: baseline test accuracy around 93%; differences of a few tenths of a percent resolvable.
    """
    return Preset(
        name="cifar10", doc=cifar10.__doc__ or "",
        train=_frozen({"model": "mobilenet_v2", "dataset": "cifar10", "layout": "small", "width": 1.0,
                       "bottleneck_activation": "linear", "residual": "bottleneck",
                       "epochs": 200, "batch_size": 128, "eval_every": 1000}),
        seeds=5, width_seeds=3,
        spiral_points=2000, spiral_trials=1000, fig7_images=512, latency_repeats=50,
    )


@_preset
def imagenet() -> Preset:
    """Accelerator preset: the paper's recipe (Section 6.1) on ImageNet at 224 px from an image folder
    (one sub-folder per class): Table 2 strides, width 1.0, RMSProp (decay 0.9, momentum 0.9), learning
    rate 0.045 decayed 0.98 per epoch, weight decay 4e-5, batch 96, the paper's 7 M steps of Fig. 6.

    Command: ``python -m ablations.run fig6a --preset imagenet --data-dir /data/imagenet --shard i/N``
    (one job per shard), then ``python -m ablations.figures --preset imagenet``.
    Expected: the paper's Fig. 6 end values, ~71.0% top-1 for the baseline.
    """
    return Preset(
        name="imagenet", doc=imagenet.__doc__ or "",
        train=_frozen({"model": "mobilenet_v2", "dataset": "imagefolder", "image_size": 224,
                       "layout": "imagenet", "width": 1.0,
                       "bottleneck_activation": "linear", "residual": "bottleneck",
                       "optimizer": "paper", "steps": 7_000_000, "batch_size": 96, "eval_every": 50_000}),
        seeds=2, width_seeds=1,
        spiral_points=2000, spiral_trials=1000, fig7_images=512, latency_repeats=50,
    )


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (KeyError if unknown)."""
    return PRESETS[name]()


def study_names(selector: str) -> tuple[str, ...]:
    """``"all"`` -> the paper's studies (:data:`ALL_STUDIES`); a study name -> itself (KeyError if
    unknown), which is how the studies beyond the paper are selected."""
    if selector == "all":
        return ALL_STUDIES
    if selector not in STUDIES:
        raise KeyError(selector)
    return (selector,)


# ----------------------------------------------------------------------------- user presets

#: Preset fields that ``apply_overrides`` does not set (``train`` is set key by key).
_FIXED_PRESET_FIELDS = ("doc", "train")


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (``3``, ``0.05``, ``true``, ``null``, ``[0.35, 1.0]``, ``"x"``), else
    the text itself as a string."""
    import json
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _preset_value(field: dataclasses.Field, value: Any) -> Any:
    """``value`` checked against a Preset field's annotation (ValueError if it does not fit): lists
    become tuples, integers stay integers, numbers of float fields become floats."""
    kind = str(field.type)
    if value is None and "None" in kind:
        return None
    if kind.startswith("tuple") and isinstance(value, (list, tuple)):
        inner = float if "float" in kind else (lambda v: v)
        return tuple(inner(v) for v in value)
    if kind.startswith("int") and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind.startswith("str") and isinstance(value, str):
        return value
    raise ValueError(f"{field.name} must be {kind}, got {value!r}")


def apply_overrides(preset: Preset, overrides: Mapping[str, Any]) -> Preset:
    """``preset`` with fields replaced: a Preset field by name (``seeds``, ``width_seeds``,
    ``widths``, the measuring sizes, ``name``), any other key a TrainConfig field of
    ``preset.train`` (``epochs``, ``lr``, ...; ``epochs`` drops the preset's ``steps``, as the
    flags do). Study and variant choices still apply on top of ``train``. Raises UsageError (one
    line) for an unknown key or a value that does not fit."""
    from manifold_lab.cli import UsageError
    from manifold_lab.train.config import TrainConfig
    fields = {f.name: f for f in dataclasses.fields(Preset) if f.name not in _FIXED_PRESET_FIELDS}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    changes, train = {}, dict(preset.train)
    for key, value in overrides.items():
        if key in fields:
            try:
                changes[key] = _preset_value(fields[key], value)
            except ValueError as exc:
                raise UsageError(f"--set {key}: {exc}") from None
        elif key in train_fields:
            train[key] = value
            if key == "epochs" and "steps" not in overrides:
                train.pop("steps", None)
        else:
            raise UsageError(f"--set {key}: not a preset field ({', '.join(fields)}) nor a training field "
                             f"(python -m manifold_lab.train --help)")
    try:
        TrainConfig(**train)
    except (TypeError, ValueError, UsageError) as exc:  # one line, naming the field
        raise UsageError(f"--set: {str(exc).splitlines()[0]}") from None
    return dataclasses.replace(preset, **changes, train=_frozen(train))


def preset_to_dict(preset: Preset) -> dict[str, Any]:
    """``preset`` as JSON values (what a ``.json`` preset file holds)."""
    out = {f.name: getattr(preset, f.name) for f in dataclasses.fields(Preset)}
    out["train"] = dict(preset.train)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def preset_from_dict(data: Mapping[str, Any]) -> Preset:
    """Inverse of :func:`preset_to_dict` (ValueError for missing or unknown fields)."""
    fields = {f.name: f for f in dataclasses.fields(Preset)}
    unknown = sorted(set(data) - set(fields))
    if unknown or not {"name", "train", "seeds"} <= set(data):
        raise ValueError(f"a preset needs name, train and seeds; unknown fields: {', '.join(unknown) or 'none'}")
    values = {k: v if k == "train" else _preset_value(fields[k], v) for k, v in data.items() if k != "doc"}
    return Preset(**{**values, "doc": str(data.get("doc", "")), "train": _frozen(dict(data["train"]))})


def _returns_preset(fn: Any) -> bool:
    """Whether ``fn`` is annotated to return a :class:`Preset` (the class or its name as text)."""
    returns = getattr(fn, "__annotations__", {}).get("return")
    return returns is Preset or (isinstance(returns, str) and returns.split(".")[-1] == "Preset")


def _preset_of_module(module: Any) -> Preset:
    """The preset a loaded preset file defines: ``PRESET`` (a Preset or a function returning one),
    else a ``get_preset()`` it defines, else its one function annotated to return a Preset."""
    own = {k: v for k, v in vars(module).items() if getattr(v, "__module__", None) == module.__name__}
    candidate = getattr(module, "PRESET", None) or own.get("get_preset")  # not an imported get_preset
    if candidate is None:
        found = [v for v in own.values() if callable(v) and _returns_preset(v)]
        if len(found) != 1:
            raise ValueError(f"define PRESET, get_preset() or one function returning a Preset "
                             f"(found {len(found)} such functions)")
        candidate = found[0]
    preset = candidate() if callable(candidate) else candidate
    if not isinstance(preset, Preset):
        raise ValueError(f"expected an ablations.studies.Preset, got {type(preset).__name__}")
    return preset


def load_preset_file(path: str | os.PathLike[str]) -> Preset:
    """The preset defined by a user file: a ``.py`` file (see :func:`_preset_of_module`; it imports
    ``Preset`` from ``ablations.studies``) or a ``.json`` file (:func:`preset_to_dict`'s form).
    UsageError (one line) when missing, failing or defining no preset."""
    import hashlib
    import importlib.util
    import json
    from pathlib import Path

    from manifold_lab.cli import UsageError
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no preset file at {path}")
    try:
        if path.suffix == ".json":
            return preset_from_dict(json.loads(path.read_text(encoding="utf-8")))
        name = f"_user_preset_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError("not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return _preset_of_module(module)
    except UsageError:
        raise
    except Exception as exc:  # a user's file: any failure is reported as one line
        raise UsageError(f"preset file {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         ) from None
