"""The command line's grammar: ``prewarm-gpu``'s parser, its argument types and the
``--init-option`` values. Every choice comes from the constant its code reads (datasets,
baselines, precisions, backends, graphs, executors, rule sources, metrics, filter-bank variants);
:mod:`.cli` runs the commands."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from .data import DATASETS
from .experiment.executors import EXECUTORS
from .experiment.grid import LOSS_WINDOW, METRICS, PAPER_GRID
from .experiment.plan import BASELINE, RULE_SOURCES
from .methods.filterbank import VARIANTS
from .models import BASELINES
from .precision import PRECISIONS
from .training.backends import BACKENDS
from .training.step import GRAPHS

__all__ = ["build_parser", "parse_init_options", "SEED_RANGE"]

DESCRIPTION = ("prewarm-gpu: reproduce the paper's experiment, or print a dataset's Pre-Warm "
               "statistics.")
_NAMES = ", ".join(DATASETS)

_DATA_DIR_HELP = ("where the dataset's files are: torchvision's layout, or MNIST-style idx files "
                  "(.gz or not) flat in the folder; nothing is written there. Default: ./data, "
                  "else /usr/share/datasets/<name> (Debian's dataset-fashion-mnist). Unused for "
                  "digits")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _argument_type(name: str, convert, expected: str, refusal):
    """An argparse type: ``convert(text)`` (a ``ValueError`` reads "expected <expected>, got
    '<text>'"), then ``refusal(value, text)``: why the value is refused, or None to take it."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        why = refusal(value, text)
        if why is not None:
            raise argparse.ArgumentTypeError(why)
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


# argparse type: an integer >= 1 (``--steps 0`` is an error, not "the default").
_positive_int = _argument_type("_positive_int", int, "an integer >= 1",
                               lambda v, text: None if v >= 1 else f"must be >= 1, got {v}")


def _real(lo: float | None = None, *, above: bool = False):
    """argparse type: a finite float, ``>= lo`` (``> lo`` with ``above``); NaN and ±Inf are
    refused here, before any training, not by the JSON writer after it (issue 30)."""
    bound = "" if lo is None else f" {'>' if above else '>='} {lo:g}"

    def refusal(value: float, text: str) -> str | None:
        inside = lo is None or (value > lo if above else value >= lo)
        return None if math.isfinite(value) and inside else (
            f"must be a finite number{bound}, got {text!r}")

    return _argument_type("finite number", float, "a number", refusal)


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes, as an unsigned 64-bit int

# argparse type: a seed ``torch.Generator.manual_seed`` takes, in [0, 2**64 - 1].
_seed = _argument_type(
    "_seed", int, "an integer seed",
    lambda v, text: None if SEED_RANGE[0] <= v <= SEED_RANGE[1] else (
        f"seed {v} is out of range: a seed must be an integer in [0, 2**64 - 1]"))


def _finite(x: Any) -> bool:
    """No NaN or ±Inf anywhere in a parsed JSON value."""
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    return True


def _value(text: str) -> Any:
    """A CLI option value: JSON (numbers, true/false/null, lists) if it parses, else a string.
    A non-finite number (``NaN``, ``inf``, ``1e999``) is a ``ValueError``: no initialiser takes
    one, and it would only fail the runs after the Kaiming runs trained."""
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = float(text)  # "nan", "inf", "-Infinity": strings to JSON, numbers to Python
        except ValueError:
            return text
        if math.isfinite(value):
            return text
    if not _finite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def parse_init_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["prewarm.scale=0.25", "lsuv.tol=0.01"]`` → ``{"prewarm": {"scale": 0.25}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        name_key, sep, value = item.partition("=")
        name, dot, key = name_key.partition(".")
        if not (sep and dot and name and key):
            raise ValueError(f"--init-option expects NAME.KEY=VALUE (e.g. prewarm.scale=0.25), "
                             f"got {item!r}")
        try:
            out.setdefault(name, {})[key] = _value(value)
        except ValueError as e:
            raise ValueError(f"--init-option {item}: {e}") from None
    return out


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``reproduce`` and ``grid`` share (the sweep engine's), in ``--help``'s
    order: how each run trains, then how the sweep runs."""
    _training_arguments(p)
    _sweep_run_arguments(p)


def _training_arguments(p: argparse.ArgumentParser) -> None:
    """Seeds, protocol, device and trainer: what each run of the sweep trains with."""
    p.add_argument("--seeds", nargs="+", type=_seed, default=None, metavar="S",
                   help="default: the paper's 42 7 13 99 2025 1 8 21 (each in [0, 2**64 - 1])")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="(256, §3.3)")
    p.add_argument("--lr-start", type=_real(0, above=True),
                   help="η_start > 0 (default: Table 1's, per dataset)")
    p.add_argument("--lr-end", type=_real(0), help="η_end >= 0 (default: Table 1's, per dataset)")
    p.add_argument("--device", default=_default_device(),
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU threads for torch (default on a CPU device: every core this "
                   "process may use, os.sched_getaffinity; recorded with each run)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="single-run trainer: keep the model in NCHW (default: channels_last)")
    p.add_argument("--no-batch", dest="batch", action="store_false",
                   help="train one run at a time (reproduce's default: the runs of a dataset "
                   "train together as one stacked model; grid's: see --batch)")
    p.add_argument("--baseline", choices=BASELINES,
                   default="torch-default",
                   help="the weights both arms start from: torch-default (PyTorch's "
                   "kaiming_uniform_(a=√5), std 1/√(3·fan_in); the paper's Listing 2) or He et "
                   "al. 2015, std √(2/fan_in), biases 0, for every conv and linear layer")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default, as the paper), tf32, or bf16 autocast around each "
                   "forward pass (docs/experiments.md)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="batched trainer: grouped convolutions, vmap, per-run kernels in one "
                   "step (loop), or batched matrix products over the runs (bmm); auto: the "
                   "fastest measured for the device (prewarm_gpu.training.backends.MEASURED)")
    p.add_argument("--compile", action="store_true",
                   help="the training step's forward (and backward) through torch.compile, "
                   "default mode; off by default (docs/experiments.md)")
    p.add_argument("--graphs", choices=GRAPHS, default="auto",
                   help="capture the training step once as a CUDA graph and replay it (auto: on "
                   "CUDA; a failed capture falls back to eager steps with a warning)")
    p.add_argument("--checkpoint-every", default="10m", metavar="N|Mm|Ss",
                   help="checkpoint the runs in training every N steps, M minutes or S seconds "
                   "(default 10m; 0: never), in <out>/checkpoints; --resume continues an "
                   "interrupted run from its last checkpoint")


def _sweep_run_arguments(p: argparse.ArgumentParser) -> None:
    """Resume, reports, data, progress, executor, schedule and rule source: how the sweep runs."""
    p.add_argument("--resume", action="store_true",
                   help="complete the sweep in --out: run only the runs missing from "
                   "results.jsonl, continuing interrupted ones from their checkpoints")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the tables (reproduce: summary.json, table.md; grid: grid.json, "
                   "grid.md) and, with --plot, the figures from the results in --out; train "
                   "nothing")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume, also rerun runs recorded as failed")
    p.add_argument("--plot", action="store_true",
                   help="write figures (needs matplotlib): reproduce: filters_<dataset>.png and "
                   "curves_<dataset>.png; grid: grid_<dataset>.png")
    p.add_argument("--data-dir", type=Path, default=None, help=_DATA_DIR_HELP)
    p.add_argument("--download", action="store_true",
                   help="let torchvision download missing datasets into --data-dir")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: train in this process (default); ray: each group of runs is a "
                   "task on a Ray cluster's workers, one per GPU (or CPU), the results written "
                   "here (pip install 'prewarm-gpu[ray]')")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="with --executor ray: the cluster to join (default: start a local Ray on "
                   "this machine)")
    p.add_argument("--schedule-steps", type=_positive_int, default=None, metavar="T",
                   help="length T of the cosine schedule (default: --steps); T > --steps stops "
                   "early on the longer schedule: --steps 500 --schedule-steps 5000 is step 500 "
                   "of the paper's 5000-step run")
    p.add_argument("--rule-source", choices=RULE_SOURCES, default="dataset",
                   help="Pre-Warm's n_patches (eq. 5/6) when not given: dataset (default, as the "
                   "paper's §3.4 and Table 1: the statistic of the whole training split, one "
                   "value per dataset, written into each run's options) or batch (n_patches=auto "
                   "on each seed's first batch)")


def build_parser() -> argparse.ArgumentParser:
    """``prewarm-gpu`` and its subcommands: reproduce, grid, stats, report, filterbank build."""
    p = argparse.ArgumentParser(prog="prewarm-gpu", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_reproduce_parser, _grid_parser, _stats_parser, _report_parser,
                _filterbank_parser):
        add(sub)
    return p


def _reproduce_parser(sub) -> None:
    r = sub.add_parser("reproduce", help="run the paired sweep and print Table 3",
                       description="Train every (dataset, seed, init) run of §3's protocol, paired "
                       "on Kaiming, and print Table 3 as Markdown.")
    r.add_argument("--dataset", nargs="+", default=["digits"], metavar="NAME",
                   help=f"{_NAMES}, or 'all' (the paper's five). Default: digits")
    r.add_argument("--init", nargs="+", default=[BASELINE, "prewarm"], metavar="NAME",
                   help="initialisations; each one besides kaiming is compared paired against "
                   "kaiming (default: kaiming prewarm)")
    r.add_argument("--init-option", action="append", metavar="NAME.KEY=VALUE",
                   help="keyword for an initialiser, e.g. prewarm.scale=0.25 (repeatable; the "
                   "value is read as JSON, else as a string)")
    r.add_argument("--bank", metavar="FILE", help="filter bank for 'filterbank' (option bank=FILE)")
    r.add_argument("--steps", type=_positive_int, help="training steps N (default: Table 1's 5000; "
                   "digits: 150)")
    r.add_argument("--aux-weight", type=_real(0), default=0.3,
                   help="weight >= 0 of auxiliary-head losses, for models that have them (0.3)")
    r.add_argument("--target-loss", type=_real(0, above=True), default=0.5,
                   help="report the steps until the training loss falls below this, > 0 (0.5)")
    r.add_argument("--eval-points", type=_positive_int, default=10,
                   help="test-accuracy points per run, for the curves (10)")
    r.add_argument("--out", type=Path, help="output folder (default: runs/<dataset>, "
                   "runs/all for --dataset all)")
    r.add_argument("--save-models", action="store_true",
                   help="save trained state dicts to <out>/models/<dataset>-<init>-<seed>.pt")
    r.add_argument("--group-size", type=_positive_int, metavar="N",
                   help="with stacked training, at most N runs train together (default: all of "
                   "a dataset; with --executor ray, few enough that every worker gets a group)")
    _sweep_arguments(r)


def _grid_parser(sub) -> None:
    g = sub.add_parser("grid", help="the paper's hyperparameter grid (§4.3) against Kaiming",
                       description="Pre-Warm over patch_size × n_clusters × n_patches × scale "
                       "(the paper's grid by default; narrow any axis), one Kaiming run per seed "
                       "shared by every cell; per cell the paired statistics of the training loss "
                       f"at --steps (mean of the last {LOSS_WINDOW} steps) or the final accuracy. "
                       "Writes grid.md, grid.json (and grid_<dataset>.png with --plot).")
    g.add_argument("--dataset", default="fashion-mnist", metavar="NAME",
                   help=f"one of {_NAMES} (default: fashion-mnist, the paper's)")
    for axis, values in PAPER_GRID.items():
        g.add_argument(f"--{axis.replace('_', '-')}", nargs="+",
                       type=_real() if axis == "scale" else _positive_int, metavar="V",
                       default=list(values),
                       help=f"default: the paper's {' '.join(map(str, values))}")
    g.add_argument("--metric", choices=METRICS, default="loss",
                   help=f"loss: training loss at --steps, the mean of the last {LOSS_WINDOW} "
                   "steps (the paper's, default); accuracy: final test accuracy")
    g.add_argument("--steps", type=_positive_int, default=500, help="training steps (500)")
    g.add_argument("--group-size", type=_positive_int, metavar="N",
                   help="with stacked training, at most N runs train together (default on a "
                   "GPU: all; on a CPU with --batch: one seed's runs; with --executor ray, few "
                   "enough that every worker gets a group)")
    g.add_argument("--out", type=Path, help="output folder (default: runs/grid-<dataset>)")
    _sweep_arguments(g)
    g.add_argument("--batch", dest="batch", action="store_true",
                   help="train the runs stacked (default: on a GPU; on a CPU the runs train one "
                   "at a time, docs/experiments.md)")
    g.set_defaults(batch=None)


def _stats_parser(sub) -> None:
    s = sub.add_parser("stats", help="print Table 1's derived quantities for a dataset",
                       description="Otsu τ*, foreground density d, mean patch norm, n_patches (eq. "
                       "5 for grayscale, eq. 6 for colour) and σ, over the whole training split.")
    s.add_argument("--dataset", nargs="+", default=["digits"], metavar="NAME",
                   help=f"{_NAMES}, or 'all'")
    s.add_argument("--data-dir", type=Path, default=None, help=_DATA_DIR_HELP)
    s.add_argument("--download", action="store_true")
    s.add_argument("--device", default=_default_device())
    s.add_argument("--n-filters", type=_positive_int, default=32, help="F, conv1's filters (32)")


def _report_parser(sub) -> None:
    rp = sub.add_parser("report", help="combine replications of one protocol (--pool)",
                        description="Pool replications of one protocol paired by seed: each "
                        "seed's difference averaged over the folders that have it, then the "
                        "one-sided paired t-test on the per-seed means; prints each folder's row "
                        "and the pooled row (not all pairs pooled naively: the folders share "
                        "seeds, so their pairs are not independent).")
    rp.add_argument("--pool", nargs="+", type=Path, required=True, metavar="DIR",
                    help="two or more output folders (each with results.jsonl) of one protocol")


def _filterbank_parser(sub) -> None:
    fb = sub.add_parser("filterbank", help="clustered filter banks of trained models (Ulm et al.)")
    fbs = fb.add_subparsers(dest="fb_command", required=True)
    b = fbs.add_parser("build", help="cluster the conv kernels of a sweep's saved models into a "
                       "bank for --init filterbank --bank FILE",
                       description="Reads <runs>/models/<dataset>-<init>-<seed>.pt (written by "
                       "`reproduce --save-models`), clusters each conv layer's 2-D kernels, and "
                       "saves the centres and cluster-size pdf per layer.")
    b.add_argument("--runs", type=Path, required=True, help="a reproduce --out folder")
    b.add_argument("--out", type=Path, required=True, help="the bank file to write")
    b.add_argument("--dataset", default=None, help="only models of this dataset")
    b.add_argument("--init", default=None, help="only models of this initialisation")
    b.add_argument("--n-clusters", type=_positive_int, default=3, help="centres per layer (3)")
    b.add_argument("--variant", choices=VARIANTS, default="euclidean",
                   help="cluster kernels as they are, or the real part of their 2-D FFT "
                   "(their code's 'fourier': point-symmetric centres)")
    b.add_argument("--seed", type=_seed, default=0, help="k-means seed, in [0, 2**64 - 1] (0)")
    b.add_argument("--device", default="cpu")
