"""What a sweep runs: its configuration, its arms and every run, keyed for the results file.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), §3.3: every method is compared paired against Kaiming — same seed, same base weights, same
data order — so a pair differs only by the initialisation. An *arm* is an initialiser with its
options (``prewarm`` with ``n_patches=25`` is one arm of the grid); a *run* is an arm on one
dataset and seed (:class:`RunSpec`, whose :attr:`~RunSpec.key` names it in ``results.jsonl``).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..checks import is_int, is_real
from ..data import DATASETS
from ..models import BASELINES, MODELS, build_model
from ..training.checkpoint import parse_every
from ..training.protocol import TrainConfig
from ..training.step import GRAPHS
from .datarule import dataset_rule
from .jsonable import jsonable

SEEDS = (42, 7, 13, 99, 2025, 1, 8, 21)  # §3.3
DEFAULT_ARCH = "simplecnn"
BASELINE = "kaiming"
PROTOCOL = 4  # bump when a change to the training code changes results: old runs then rerun
# (a change to one initialiser's results bumps that initialiser's registry version instead)
# 3: one trainer for one run and many, with a fused Adam (results move by float rounding)
# 4: IEEE fp32 and deterministic cuDNN on CUDA, Adam capturable there, bf16 autocast per forward
#    pass. CPU fp32/tf32 results are bit-identical to 3's: they keep 3 (:func:`protocol_of`).


def protocol_of(device_type: str, precision: str) -> int:
    """The protocol version in a run's key: :data:`PROTOCOL`, except 3 for CPU fp32/tf32 runs,
    whose results protocol 4 left bit-identical (so their recorded runs keep their keys)."""
    return 3 if device_type == "cpu" and precision != "bf16" else PROTOCOL


@dataclass
class SweepConfig:
    """One sweep; ``None`` fields take the dataset's Table 1 value."""

    datasets: list[str] = field(default_factory=lambda: ["digits"])
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    inits: list[str] = field(default_factory=lambda: [BASELINE, "prewarm"])
    init_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # init → its keywords
    out: Path = Path("runs/digits")
    device: str = "cpu"
    data_dir: Path | None = None  # None: ./data, else /usr/share/datasets/<name>
    download: bool = False
    resume: bool = False
    retry_failed: bool = False  # with resume: rerun runs recorded as failed
    save_models: bool = False  # write models/<dataset>-<init>-<seed>.pt
    plot: bool = False
    progress: bool = True  # tqdm bar on stderr
    steps: int | None = None  # N (Table 1: 5000; digits: 150)
    batch_size: int = 256
    lr_start: float | None = None
    lr_end: float | None = None
    eval_points: int = 10
    loss_points: int = 100
    aux_weight: float = 0.3
    target_loss: float = 0.5
    channels_last: bool = True  # NHWC model, single-run trainer (both arms alike): ~30 % faster
    batch: bool = True  # train the runs of a dataset together as one stacked model (issue 5)
    precision: str = "fp32"  # fp32 (as the paper) | tf32 | bf16 (autocast; batched trainer)
    backend: str = "auto"  # auto | grouped | vmap | loop | bmm (prewarm_gpu.training.backends)
    graphs: str = "auto"  # the step as a CUDA graph: auto (on CUDA) | on | off (training.step)
    compile: bool = False  # the step's forward through torch.compile (no faster on the CPU)
    baseline: str = "torch-default"  # models.BASELINES: every conv/linear re-drawn before both arms
    checkpoint_every: str | None = "10m"  # in-run checkpoints: steps ("500"), "10m", "90s"; None
    report_only: bool = False  # rewrite summary, table (and plots) from results.jsonl; train none
    group_size: int | None = None  # most runs trained together (None: all of an architecture)
    executor: str = "local"  # local (this process) | ray (groups as Ray tasks; optional extra)
    ray_address: str | None = None  # ray.init(address=…): None starts a local Ray, or "auto"
    schedule_steps: int | None = None  # T of the cosine schedule (None: steps); >= steps
    rule_source: str = "dataset"  # Pre-Warm's n_patches rule: dataset (§3.4) | batch (per seed)
    dataset_rules: dict[str, dict[str, Any]] = field(default_factory=dict)  # dataset → its rule
    # (datarule.dataset_rule), filled by prepare when rule_source is "dataset"

    def train_config(self, dataset: str) -> TrainConfig:
        """The protocol for ``dataset``: Table 1's N and learning rates unless overridden."""
        spec = DATASETS[dataset]
        return TrainConfig(
            steps=spec.steps if self.steps is None else self.steps,  # 0 is refused, not 150
            batch_size=self.batch_size,
            lr_start=spec.lr_start if self.lr_start is None else self.lr_start,
            lr_end=spec.lr_end if self.lr_end is None else self.lr_end,
            eval_points=self.eval_points,
            loss_points=self.loss_points,
            aux_weight=self.aux_weight,
            target_loss=self.target_loss,
            schedule_steps=self.schedule_steps,
        )


@dataclass(frozen=True)
class RunSpec:
    """One training run; :attr:`key` identifies it in ``results.jsonl`` (for ``--resume``)."""

    dataset: str
    arch: str
    init: str
    seed: int
    options: tuple[tuple[str, Any], ...]  # the initialiser's keywords, sorted
    train: TrainConfig
    device_type: str  # "cpu"/"cuda": the data order (randperm) depends on it
    channels_last: bool
    precision: str = "fp32"
    baseline: str = "torch-default"  # models.BASELINES: the weights both arms start from
    # Where a Pre-Warm arm's n_patches came from (:func:`rule_of`; None: given by the user, or not
    # Pre-Warm). Not in :attr:`config`: with the dataset rule, ``options`` holds the value itself.
    rule: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def config(self) -> dict[str, Any]:
        """Everything that changes the run's result (``target_loss`` does not: it is recomputed
        from the stored loss curve; ``eval_batch_size`` does not either)."""
        t = asdict(self.train)
        for k in ("target_loss", "eval_batch_size"):
            t.pop(k)
        if t["schedule_steps"] in (None, t["steps"]):  # T = N: the key of every run before T
            t.pop("schedule_steps")
        config = {"dataset": self.dataset, "arch": self.arch, "init": self.init,
                  "options": jsonable(dict(self.options)), "train": t,
                  "device_type": self.device_type, "channels_last": self.channels_last,
                  "precision": self.precision, "baseline": self.baseline,
                  "protocol": protocol_of(self.device_type, self.precision)}
        version = getattr(registry.get(self.init), "version", 1)
        if version > 1:  # version 1 adds nothing, so the keys of runs recorded before it stay
            config["init_version"] = version
        return config

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.config, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.init}/seed={self.seed}/{self.config_hash}"

    @property
    def label(self) -> str:
        arch = "" if self.arch == DEFAULT_ARCH else f"@{self.arch}"
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.dataset} {self.init}{f'({opts})' if opts else ''}{arch} seed {self.seed}"

    @property
    def arm(self) -> Arm:
        return Arm(self.init, self.options)


# --- planning ------------------------------------------------------------------------------------

def arch_of(init: str) -> str:
    """The architecture an initialiser needs (its ``requires_model``), else SimpleCNN."""
    return getattr(registry.get(init), "requires_model", None) or DEFAULT_ARCH


def methods_of(config: SweepConfig) -> list[str]:
    """The non-baseline initialisations, in the order given."""
    return [i for i in dict.fromkeys(config.inits) if i != BASELINE]


@dataclass(frozen=True)
class Arm:
    """An initialiser with its options: what one side of a pair runs."""

    init: str
    options: tuple[tuple[str, Any], ...] = ()  # sorted (keyword, value) pairs

    @classmethod
    def of(cls, init: str, options: dict[str, Any] | None = None) -> Arm:
        return cls(init, tuple(sorted((options or {}).items())))


def arms_of(config: SweepConfig) -> list[Arm]:
    """``reproduce``'s arms: each method of ``--init`` with its ``--init-option`` keywords."""
    return [Arm.of(m, config.init_options.get(m)) for m in methods_of(config)]


@functools.cache
def batchable(arch: str) -> bool:
    """Whether runs of ``arch`` can train stacked: models with auxiliary heads cannot (probed
    once per architecture on a tiny instance)."""
    return not hasattr(build_model(arch, in_channels=1, n_classes=2, image_size=8), "aux_logits")


def _channels_last(config: SweepConfig, arch: str) -> bool:
    """channels_last applies to the single-run trainer only (the batched one stacks weights)."""
    return config.channels_last and not (config.batch and batchable(arch))


# The protocol's floats and what each may be: a NaN or an Inf would train, then fail the record.
_TRAIN_FLOATS = {"lr_start": (0.0, True), "lr_end": (0.0, False), "aux_weight": (0.0, False),
                 "target_loss": (0.0, True)}  # name: (bound, exclusive)


def check_train_floats(tc: TrainConfig) -> None:
    """Every float of the protocol finite and in range (``lr_start``, ``target_loss`` > 0;
    ``lr_end``, ``aux_weight`` >= 0), or a ``ValueError`` naming it: before any training."""
    for name, (lo, exclusive) in _TRAIN_FLOATS.items():
        v = getattr(tc, name)
        if not is_real(v) or (v <= lo if exclusive else v < lo):
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a finite number "
                             f"{'>' if exclusive else '>='} {lo:g}, got {v!r}")


def check_plan(config: SweepConfig, arms: list[Arm]) -> None:
    """Refuse a sweep that cannot run, before any training: unknown initialisers, options or
    models, bad seeds, a bad checkpoint interval or baseline, CUDA graphs off CUDA."""
    named = [Arm.of(i, config.init_options.get(i)) for i in config.inits]  # typos: now
    checked: list[Arm] = []  # each (init, options) once; options may hold lists: no set
    for arm in named + arms:
        if arm not in checked:
            registry.get(arm.init)  # KeyError listing the known names
            registry.check_options(arm.init, dict(arm.options))
            checked.append(arm)
    if config.graphs not in GRAPHS:
        raise ValueError(f"--graphs must be one of {GRAPHS}, got {config.graphs!r}")
    if config.graphs == "on" and torch.device(config.device).type != "cuda":
        raise ValueError(f"--graphs on needs a CUDA device (a CUDA graph), got --device "
                         f"{config.device}; use auto or off")
    bad = [s for s in config.seeds if not is_int(s) or not 0 <= s < 2**64]
    if not config.seeds or bad:  # torch.Generator.manual_seed takes [0, 2**64) (and negatives)
        raise ValueError(f"seeds must be ints in [0, 2**64 - 1], got {bad or config.seeds}")
    if len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct, got {config.seeds}")
    if not arms:
        raise ValueError(f"nothing to compare: --init needs a method besides {BASELINE!r}, "
                         f"got {config.inits}")
    for arch in dict.fromkeys(arch_of(a.init) for a in arms):
        if arch not in MODELS:
            raise KeyError(f"unknown model {arch!r} (required by an initialiser); known: "
                           f"{sorted(MODELS)}")
    for ds in config.datasets:
        check_train_floats(config.train_config(ds))
    parse_every(config.checkpoint_every)  # ValueError now, not after the first run
    if config.baseline not in BASELINES:
        raise ValueError(f"--baseline must be one of {BASELINES}, got {config.baseline!r}")
    if config.rule_source not in RULE_SOURCES:
        raise ValueError(f"--rule-source must be one of {RULE_SOURCES}, got "
                         f"{config.rule_source!r}")


RULE_SOURCES = ("dataset", "batch")
RULE_INIT = "prewarm"  # the initialiser whose n_patches="auto" the rule source decides


def needs_rule(arm: Arm) -> bool:
    """A Pre-Warm arm whose n_patches the user did not give: the paper's rule (eq. 5/6) sets it."""
    return arm.init == RULE_INIT and "n_patches" not in dict(arm.options)


@functools.cache
def target_filters(arch: str, in_channels: int, image_size: tuple[int, int],
                   layer: str | None) -> int:
    """F of eq. 5/6: out_channels of the conv Pre-Warm targets in ``arch`` (as
    prewarm_gpu.layers.find_conv picks it), probed once on a CPU instance built under a
    forked RNG (nothing leaks)."""
    from ..layers import find_conv

    with torch.random.fork_rng(devices=[]):
        model = build_model(arch, in_channels=in_channels, n_classes=2, image_size=image_size)
    return find_conv(model, in_channels, layer)[1].out_channels


def rule_n_patches(rule: dict[str, Any], n_filters: int) -> int:
    """Eq. 5 (grayscale, ``rule["rule"] == "otsu"``) or eq. 6 (colour) on a dataset's statistic."""
    from .. import rules

    if rule["rule"] == "otsu":
        return rules.n_patches_grayscale(rule["statistic"], n_filters)
    return rules.n_patches_color(rule["statistic"], n_filters)


def rule_text(rule: dict[str, Any] | None) -> str:
    """How a Pre-Warm arm's n_patches was chosen, for records and captions: "n_patches 22 from the
    dataset rule (Otsu τ* = 0.3809, d = 0.3602)"."""
    if rule is None:
        return "n_patches given"
    if rule["source"] == "batch":
        return ("n_patches from each seed's first training batch (eq. 5/6 on that batch; "
                "--rule-source batch)")
    stat = (f"Otsu τ* = {rule['otsu_threshold']:.4f}, d = {rule['statistic']:.4f}"
            if rule["rule"] == "otsu" else f"eq. 6, mean ‖p̃‖₂ = {rule['statistic']:.4f}")
    n = rule.get("n_patches")
    return f"n_patches {'' if n is None else f'{n} '}from the dataset rule ({stat})"


def rule_of(config: SweepConfig, dataset: str, arm: Arm) -> tuple[Arm, dict[str, Any] | None]:
    """``arm`` with the n_patches the rule source gives it on ``dataset``, and the rule's record.

    With ``rule_source="dataset"`` (the paper's §3.4: n_patches "from dataset statistics", one
    value per dataset in Table 1) the statistic is the whole raw training split's
    (``config.dataset_rules[dataset]``, filled by :func:`.engine.prepare`; computed here when
    missing) and the value becomes an explicit option, so the run's key says it. With ``"batch"``
    the arm is unchanged: ``n_patches="auto"`` on each seed's first batch."""
    if not needs_rule(arm):
        return arm, None
    if config.rule_source == "batch":
        return arm, {"source": "batch"}
    rule = config.dataset_rules.get(dataset)
    if rule is None:
        rule = _load_rules(config, [dataset])[dataset]
    s = DATASETS[dataset]
    opts = dict(arm.options)
    n = rule_n_patches(rule, target_filters(arch_of(arm.init), s.in_channels, s.image_size,
                                            opts.get("layer")))
    return Arm.of(arm.init, {**opts, "n_patches": n}), {**rule, "n_patches": n}


def _load_rules(config: SweepConfig, datasets: list[str]) -> dict[str, dict[str, Any]]:
    from ..data import load_dataset

    return {ds: dataset_rule(load_dataset(ds, data_dir=config.data_dir, download=config.download,
                                          device=config.device)) for ds in datasets}


def plan_runs(config: SweepConfig, arms: list[Arm] | None = None) -> list[RunSpec]:
    """Every run of the sweep, grouped by dataset then seed, Kaiming first within a seed — so an
    interrupted sweep leaves complete pairs. Kaiming runs once per (architecture, seed), shared by
    every arm on that architecture. ``arms``: default :func:`arms_of` (``reproduce``)."""
    arms = arms_of(config) if arms is None else arms
    check_plan(config, arms)
    archs = list(dict.fromkeys(arch_of(a.init) for a in arms))
    dev = torch.device(config.device).type
    specs = []
    for ds in config.datasets:
        tc = config.train_config(ds)
        ruled = [rule_of(config, ds, arm) for arm in arms]  # one rule per dataset, every seed
        for seed in config.seeds:
            for arch in archs:
                specs.append(RunSpec(ds, arch, BASELINE, seed, (), tc, dev,
                                     _channels_last(config, arch), config.precision,
                                     config.baseline))
            for arm, rule in ruled:
                arch = arch_of(arm.init)
                specs.append(RunSpec(ds, arch, arm.init, seed, arm.options, tc, dev,
                                     _channels_last(config, arch), config.precision,
                                     config.baseline, rule))
    return specs
