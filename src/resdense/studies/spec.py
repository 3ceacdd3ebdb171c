"""What a study is: its arms (group -> model, settings, labels) times its seeds, the claims it
tests, and its figures.

A :class:`StudySpec` is data plus three functions of the :class:`StudyConfig`: its arms
(:class:`Arm`), its claims and its figures. :func:`expand` makes the runs of every study from
its arms and seeds; the engine (:mod:`.engine`) trains them, and the report (:mod:`.report`)
decides the claims from the runs' result rows. Specs register themselves in :data:`STUDIES` by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

from ..errors import ConfigError
from ..train.config import TrainConfig, apply_overrides
from ..train.recipes import recipe
from .budget import PaperBudget, PaperNumbers
from .stats import Claim

# Row fields every result row carries (besides the spec's own labels, e.g. kind and depth).
METRICS = ("train_error", "running_train_error", "val_error", "test_error")


# Every study's `quick` preset: for a 2-core CPU. Sized on the degradation study so that three
# seeds of depths 20 and 56 (twelve runs) decide its claims within 15 minutes of a fresh clone in
# fp32 on the AVX2 machine: one-cycle over 10 epochs of a seeded 1,000-image subset (150 steps of
# 64). Plain-56 stays far behind while the other three fit. With 8 epochs (120 steps) ResNet-56
# was still 10 points behind ResNet-20; with batch 32 and lr 0.05 (310 steps) plain-56 caught up
# enough that three seeds no longer decided the shortcuts claim. Evaluation is made cheap: the
# eval-mode training error of 1,000 images, 500 validation images per epoch, the test error on a
# fixed 2,000-image subset, in batches of 100 (twice as fast as 1,000 for the 56-layer nets on a
# CPU). The other studies choose their nets and depths to fit the same budget.
QUICK_CPU: Mapping[str, Any] = MappingProxyType(dict(
    recipe="quick", epochs=10, batch_size=64, lr=0.1, schedule="onecycle", warmup=0.3, label_smoothing=0.0,
    weight_decay=1e-4, tta_flip=False, min_scale=1.0, train_subset=1000, val_size=500, test_subset=2000,
    eval_batch_size=100, curve_every=5))

# Every study's `smoke` preset: the quick recipe cut to one step of 16 images (16 validation and 16
# test images), to check a study end to end (tests, a new machine) in under a minute on 2 cores
# with its default options and seeds. Its cost is the nets' forward passes (about 25 ms per image
# for a 56-layer net on a loaded 2-core CPU) and each run's fixed start (data, model, checkpoint).
# Its claims are decided as any preset's, on numbers that mean nothing: it decides nothing worth reading.
SMOKE: Mapping[str, Any] = MappingProxyType(dict(epochs=1, batch_size=16, train_subset=16, val_size=16, test_subset=16,
                                                 eval_batch_size=16, curve_every=1))


# Every study's `standard` preset: where the papers' claims about trained nets are meant to be
# decided. The papers' recipe shape on all training images (Fashion-MNIST: 55,000): batch 128, SGD
# momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 50% and 75% of the run, pad-4 crop and
# flip (He et al. 2015, Sec. 4.2), over 30 epochs (12,870 steps; the paper's 64k steps are 182 epochs
# of CIFAR-10). Why 30: Fashion-MNIST is learnt far faster than CIFAR-10. At lr 0.1 the running
# training error of ResNet-20 was 6.1% after 49 epochs and that of ResNet-56 7.6% after 29 (an H100,
# an earlier round), about where it stood after a few epochs here (README, "The standard preset"):
# the lr 0.1 phase is flat long before 15 epochs, and the two decays, not more epochs at 0.1, carry a
# net to its training-error floor. The cost is the point of a preset between quick and paper: on a
# 2-core CPU a 56-layer net trains 128-144 images/s in fp32, so the degradation study's twelve runs
# are days there; on one GPU they are minutes (the README projects both). Not yet calibrated: no
# full run of it has been seen (see UNCALIBRATED).
STANDARD: Mapping[str, Any] = MappingProxyType(dict(
    recipe="resnet-cifar-paper", iterations=None, epochs=30, milestones=[0.5, 0.75], curve_every=100,
    eval_batch_size=500))

# What a preset's numbers rest on, where that is not a run seen to the end: `study list`, the
# report and the README say it beside the preset.
UNCALIBRATED: Mapping[str, str] = MappingProxyType({
    "standard": "its length is derived from a few epochs on a CPU, and no full run of it has been seen",
})

# The presets long enough to decide the claims the papers make about fully trained nets (a deeper
# ResNet ending below a shallower one): the others leave such claims measured, not decided.
TRAINED_PRESETS = ("standard", "paper")


@dataclass
class StudyConfig:
    """One study's settings, saved as ``study.json`` in its folder.

    ``options`` are the spec's own (degradation: ``depths``, ``shortcut``); ``overrides`` reach
    every run's :class:`TrainConfig` (``--set key=value``).
    """

    study: str = "degradation"
    data: str = "fashion-mnist"
    data_dir: Optional[str] = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    preset: str = "quick"
    out: str = "runs/study"
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its folder name, its group (the runs a claim averages over seeds),
    its labels (columns of the result rows) and its full training configuration."""

    name: str
    group: str
    seed: int
    labels: dict[str, Any]
    config: TrainConfig


@dataclass(frozen=True)
class Arm:
    """One arm of a study: the group of runs that differ only in their seed.

    ``group`` names the group and, unless ``name`` is given, its runs' folders
    (``{name}-seed{n}``); ``model`` and ``model_kwargs`` build its net; ``settings`` are its own
    :class:`TrainConfig` settings (over the preset's); ``labels`` are its columns in the result
    rows. ``about`` says what it is in words (claims, figures); ``shortcuts`` is False for a net
    without shortcut connections.
    """

    group: str
    model: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    about: str = ""
    shortcuts: bool = True

    def at_depth(self, depth: int) -> "Arm":
        """This arm at one depth: group ``{group}-{depth}``, ``depth`` first among its model
        settings and last among its labels."""
        return replace(self, group=f"{self.group}-{depth}", model_kwargs={"depth": depth, **self.model_kwargs},
                       labels={**self.labels, "depth": depth})


@dataclass(frozen=True)
class ArmOrder:
    """The sort key of a group table's entry: the position of its ``label`` among ``arms``, then its depth."""

    arms: tuple[Arm, ...]
    label: str

    def __call__(self, entry: Mapping[str, Any]) -> tuple[int, int]:
        return [a.labels[self.label] for a in self.arms].index(entry[self.label]), entry.get("depth", 0)


@dataclass(frozen=True)
class StudySpec:
    name: str
    title: str
    summary: str                                            # one line, for `resdense study list`
    presets: dict[str, dict[str, Any]]                      # preset -> TrainConfig settings (+ "recipe")
    arms: Callable[[StudyConfig], list[Arm]]
    # The claims, given the group table (mean ± std per group) once there are results: a claim
    # may name a group chosen by the results (efficiency: "the best ResNet"). Without a table
    # (``study list``) such a claim is described by its rule.
    claims: Callable[[StudyConfig, Optional[list[dict[str, Any]]]], list[Claim]]
    figures: Callable[[list[dict[str, Any]], list[dict[str, Any]], Path], list[tuple[str, str]]]
    group_order: Callable[[dict[str, Any]], Any]            # sort key of a table entry (its labels)
    label_columns: tuple[str, ...] = ()                     # labels shown in the table
    setup_note: str = ""                                    # what the report says about the setup
    default_options: dict[str, Any] = field(default_factory=dict)
    option_help: dict[str, str] = field(default_factory=dict)  # option -> what it sets (`--help`)
    # More tables for the report: (title, header, rows) from the study, its rows and group table.
    extra_tables: Optional[Callable[[StudyConfig, list[dict[str, Any]], list[dict[str, Any]]],
                                    list[tuple[str, list[str], list[list[str]]]]]] = None
    # The paper's training budget for the study's claims, and its numbers for the same comparison.
    paper_budget: Optional[PaperBudget] = None
    paper_numbers: Optional[PaperNumbers] = None
    # preset -> its wall time as measured with the default options and seeds, on named hardware.
    measured: Mapping[str, str] = field(default_factory=dict)

    def runs(self, study: StudyConfig) -> list[RunSpec]:
        """Every run of the study: its arms times its seeds."""
        return expand(study, self, self.arms(study))


STUDIES: dict[str, StudySpec] = {}


def register_study(spec: StudySpec) -> StudySpec:
    if spec.name in STUDIES:
        raise ValueError(f"study {spec.name!r} is registered twice")
    STUDIES[spec.name] = spec
    return spec


def get_study(name: str) -> StudySpec:
    try:
        return STUDIES[name]
    except KeyError:
        raise ConfigError(f"unknown study {name!r}; `resdense study list` names them: {', '.join(STUDIES)}") from None


def run_config(study: StudyConfig, spec: StudySpec, name: str, model: str, model_kwargs: dict[str, Any],
               seed: int, settings: Optional[dict[str, Any]] = None) -> TrainConfig:
    """A run's TrainConfig: recipe < preset < the run's own settings < the user's ``--set``."""
    if study.preset not in spec.presets:
        raise ConfigError(f"unknown preset {study.preset!r} for study {spec.name}; choose one of {', '.join(spec.presets)}")
    preset = dict(spec.presets[study.preset])
    recipe_name = preset.pop("recipe")
    values = {**recipe(recipe_name), **preset, **(settings or {}), **study.overrides}
    # Model settings given with --set model_kwargs=... join the ones this run is about.
    kwargs = {**values.get("model_kwargs", {}), **model_kwargs}
    values.update({"recipe": recipe_name, "model": model, "model_kwargs": kwargs, "data": study.data,
                   "data_dir": study.data_dir, "seed": seed, "progress": False, "eval_train": True,
                   # A net that diverges is a result of the study, not a crash of it.
                   "on_divergence": "finish",
                   "out": str(Path(study.out) / name)})
    return apply_overrides(TrainConfig(), values, f"study {spec.name}, preset {study.preset}")


def expand(study: StudyConfig, spec: StudySpec, arms: Sequence[Arm]) -> list[RunSpec]:
    """Every (seed, arm), seed-major: each seed's arms finish together, so a study stopped early
    still has complete seeds."""
    out = []
    for seed in study.seeds:
        for arm in arms:
            name = f"{arm.name or arm.group}-seed{seed}"
            cfg = run_config(study, spec, name, arm.model, dict(arm.model_kwargs), seed, dict(arm.settings))
            out.append(RunSpec(name, arm.group, seed, dict(arm.labels), cfg))
    return out


def cifar_depth(study: StudyConfig, default: int) -> int:
    """The study's one ``--depth`` option, checked as a CIFAR ResNet depth (6n+2)."""
    depth = study.options.get("depth", default)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"the {study.study} study needs a CIFAR ResNet depth 6n+2 (e.g. 20, 32, 56); got {depth}")
    return depth
