"""``prewarm-gpu``: reproduce the paper's experiment, or print a dataset's Pre-Warm statistics.

Usage::

    prewarm-gpu reproduce        # digits, 8 seeds, Kaiming vs Pre-Warm (about a minute on CPU)
    prewarm-gpu reproduce --dataset all --data-dir data --download --plot   # the paper's Table 3
    prewarm-gpu reproduce --dataset mnist --seeds 42 7 --steps 500 --init kaiming prewarm lsuv
    prewarm-gpu reproduce --out runs/digits --resume   # finish an interrupted sweep
    prewarm-gpu stats --dataset mnist --data-dir data   # Table 1's derived quantities
    prewarm-gpu report --pool runs/cpu runs/h100   # replications pooled by seed

Exit status: 0 done; 1 some run failed (NaN/Inf loss or an error; see the table's notes);
2 bad arguments (checked before any training), missing or bad data files, a ``--bank`` that is
not a bank, an unavailable device, results
already in ``--out`` without ``--resume``, ``--resume`` with nothing to resume, or ``--out`` in
use by another sweep; 3 an internal error (a bug: its traceback is printed; finished runs are
kept); 4 ``--out`` not writable or full (before training: nothing trained; later: every record
written before is intact); 130 interrupted (the message says which runs were kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from .data import (
    DATASETS,
    PAPER_DATASETS,
    DatasetInvalidError,
    DatasetNotFoundError,
    canonical_name,
)
from .training.backends import BACKENDS
from .training.step import GRAPHS

__all__ = ["main", "build_parser", "parse_init_options"]


_DATA_DIR_HELP = ("where the dataset's files are: torchvision's layout, or MNIST-style idx files "
                  "(.gz or not) flat in the folder; nothing is written there. Default: ./data, "
                  "else /usr/share/datasets/<name> (Debian's dataset-fashion-mnist). Unused for "
                  "digits")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--steps 0`` is an error, not "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _real(lo: float | None = None, *, above: bool = False):
    """argparse type: a finite float, ``>= lo`` (``> lo`` with ``above``); NaN and ±Inf are
    refused here, before any training, not by the JSON writer after it (issue 30)."""
    bound = "" if lo is None else f" {'>' if above else '>='} {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or (lo is not None and (value <= lo if above
                                                            else value < lo)):
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}")
        return value

    parse.__name__ = "finite number"  # argparse names the type in some messages
    return parse


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes, as an unsigned 64-bit int


def _seed(text: str) -> int:
    """argparse type: a seed ``torch.Generator.manual_seed`` takes, in [0, 2**64 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range: a seed must be an "
                                         f"integer in [0, 2**64 - 1]")
    return value


def _datasets(names: list[str]) -> list[str]:
    if any(n.lower() == "all" for n in names):
        return list(PAPER_DATASETS)
    return list(dict.fromkeys(canonical_name(n) for n in names))


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
    """The arguments ``reproduce`` and ``grid`` share (the sweep engine's)."""
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
    p.add_argument("--baseline", choices=["torch-default", "he-normal", "he-uniform"],
                   default="torch-default",
                   help="the weights both arms start from: torch-default (PyTorch's "
                   "kaiming_uniform_(a=√5), std 1/√(3·fan_in); the paper's Listing 2) or He et "
                   "al. 2015, std √(2/fan_in), biases 0, for every conv and linear layer")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                   help="fp32 (default, as the paper), tf32, or bf16 autocast. bf16 did not "
                   "reproduce fp32's result on an H100 (Fashion-MNIST: 1.3 points lower, p 0.11 "
                   "instead of 0.012); do not use it for Table 3")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="batched trainer: grouped convolutions, vmap, per-run kernels in one "
                   "step (loop), or batched matrix products over the runs (bmm); auto: the "
                   "fastest measured for the device (prewarm_gpu.training.backends.MEASURED)")
    p.add_argument("--compile", action="store_true",
                   help="the training step's forward (and backward) through torch.compile, "
                   "default mode; off by default (measured no faster on the CPU)")
    p.add_argument("--graphs", choices=GRAPHS, default="auto",
                   help="capture the training step once as a CUDA graph and replay it (auto: on "
                   "CUDA; a failed capture falls back to eager steps with a warning)")
    p.add_argument("--checkpoint-every", default="10m", metavar="N|Mm|Ss",
                   help="checkpoint the runs in training every N steps, M minutes or S seconds "
                   "(default 10m; 0: never), in <out>/checkpoints; --resume continues an "
                   "interrupted run from its last checkpoint")
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
    p.add_argument("--executor", choices=["local", "ray"], default="local",
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
    p.add_argument("--rule-source", choices=["dataset", "batch"], default="dataset",
                   help="Pre-Warm's n_patches (eq. 5/6) when not given: dataset (default, as the "
                   "paper's §3.4 and Table 1: the statistic of the whole training split, one "
                   "value per dataset, written into each run's options) or batch (n_patches=auto "
                   "on each seed's first batch)")


def build_parser() -> argparse.ArgumentParser:
    from .experiment.grid import LOSS_WINDOW, METRICS, PAPER_GRID

    summary = __doc__.split("\n\n")[0].replace("``", "")
    p = argparse.ArgumentParser(prog="prewarm-gpu", description=summary,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    names = ", ".join(DATASETS)

    r = sub.add_parser("reproduce", help="run the paired sweep and print Table 3",
                       description="Train every (dataset, seed, init) run of §3's protocol, paired "
                       "on Kaiming, and print Table 3 as Markdown.")
    r.add_argument("--dataset", nargs="+", default=["digits"], metavar="NAME",
                   help=f"{names}, or 'all' (the paper's five). Default: digits")
    r.add_argument("--init", nargs="+", default=["kaiming", "prewarm"], metavar="NAME",
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

    g = sub.add_parser("grid", help="the paper's hyperparameter grid (§4.3) against Kaiming",
                       description="Pre-Warm over patch_size × n_clusters × n_patches × scale "
                       "(the paper's grid by default; narrow any axis), one Kaiming run per seed "
                       "shared by every cell; per cell the paired statistics of the training loss "
                       f"at --steps (mean of the last {LOSS_WINDOW} steps) or the final accuracy. "
                       "Writes grid.md, grid.json (and grid_<dataset>.png with --plot).")
    g.add_argument("--dataset", default="fashion-mnist", metavar="NAME",
                   help=f"one of {names} (default: fashion-mnist, the paper's)")
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
                   help="train the runs stacked (the default on a GPU; on a CPU, one at a time "
                   "measured faster)")
    g.set_defaults(batch=None)

    s = sub.add_parser("stats", help="print Table 1's derived quantities for a dataset",
                       description="Otsu τ*, foreground density d, mean patch norm, n_patches (eq. "
                       "5 for grayscale, eq. 6 for colour) and σ, over the whole training split.")
    s.add_argument("--dataset", nargs="+", default=["digits"], metavar="NAME",
                   help=f"{names}, or 'all'")
    s.add_argument("--data-dir", type=Path, default=None, help=_DATA_DIR_HELP)
    s.add_argument("--download", action="store_true")
    s.add_argument("--device", default=_default_device())
    s.add_argument("--n-filters", type=_positive_int, default=32, help="F, conv1's filters (32)")

    rp = sub.add_parser("report", help="combine replications of one protocol (--pool)",
                        description="Pool replications of one protocol paired by seed: each "
                        "seed's difference averaged over the folders that have it, then the "
                        "one-sided paired t-test on the per-seed means; prints each folder's row "
                        "and the pooled row (not all pairs pooled naively: the folders share "
                        "seeds, so their pairs are not independent).")
    rp.add_argument("--pool", nargs="+", type=Path, required=True, metavar="DIR",
                    help="two or more output folders (each with results.jsonl) of one protocol")

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
    b.add_argument("--variant", choices=["euclidean", "fourier"], default="euclidean",
                   help="cluster kernels as they are, or the real part of their 2-D FFT "
                   "(their code's 'fourier': point-symmetric centres)")
    b.add_argument("--seed", type=_seed, default=0, help="k-means seed, in [0, 2**64 - 1] (0)")
    b.add_argument("--device", default="cpu")
    return p


def _check_bank_out(out: Path) -> None:
    """``filterbank build --out``: its folder can be created and written (a probe file), or a
    :class:`~.experiment.ResultsWriteError` (exit 4) before any clustering."""
    from .experiment import ResultsWriteError

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".probe-"):
            pass
    except OSError as e:
        raise ResultsWriteError(f"--out {out}: its folder cannot be written "
                                f"({e.strerror or e}); nothing was clustered") from e


def _filterbank(args: argparse.Namespace) -> int:
    from .experiment import ResultsWriteError
    from .experiment.records import build_bank_from_runs
    from .methods.filterbank import save_bank

    bank = build_bank_from_runs(args.runs, dataset=args.dataset, init=args.init,
                                n_clusters=args.n_clusters, variant=args.variant,
                                generator=args.seed)
    try:
        save_bank(bank, args.out)
    except OSError as e:
        raise ResultsWriteError(f"--out {args.out}: {e}") from e
    print(f"bank of {len(bank['sources'])} models, variant {args.variant}, "
          f"{args.n_clusters} clusters per layer: {args.out}")
    return 0


# --- reproduce -----------------------------------------------------------------------------------

def _sweep_config(args: argparse.Namespace):
    from .experiment import SweepConfig

    datasets = _datasets(args.dataset)
    options = parse_init_options(args.init_option)
    if args.bank:
        options.setdefault("filterbank", {})["bank"] = args.bank
    for name in options:
        if name not in args.init:
            warnings.warn(f"options given for {name!r}, which is not in --init; ignored",
                          stacklevel=2)
    out = args.out or Path("runs") / ("all" if list(datasets) == list(PAPER_DATASETS)
                                      else "+".join(datasets))
    return SweepConfig(
        datasets=datasets, inits=list(args.init), init_options=options, out=out,
        save_models=args.save_models, eval_points=args.eval_points, aux_weight=args.aux_weight,
        target_loss=args.target_loss, **_engine_fields(args))


_ENGINE_FIELDS = ("device", "data_dir", "download", "resume", "retry_failed", "plot", "progress",
                  "steps", "batch_size", "lr_start", "lr_end", "channels_last", "batch",
                  "precision", "backend", "graphs", "compile", "baseline", "checkpoint_every",
                  "report_only", "executor", "ray_address", "group_size", "schedule_steps",
                  "rule_source")


def _engine_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep engine's fields, shared by ``reproduce`` and ``grid``: each is the flag of the
    same name (:func:`_sweep_arguments`); the seeds default to the paper's."""
    from .experiment import SEEDS

    return {"seeds": list(dict.fromkeys(args.seeds or SEEDS)),
            **{name: getattr(args, name) for name in _ENGINE_FIELDS}}


def _grid_config(args: argparse.Namespace):
    from .experiment.grid import GridConfig

    (dataset,) = _datasets([args.dataset])
    return GridConfig(
        datasets=[dataset], out=args.out or Path("runs") / f"grid-{dataset}",
        patch_size=args.patch_size, n_clusters=args.n_clusters, n_patches=args.n_patches,
        scale=args.scale, metric=args.metric, **_engine_fields(args))


def _grid(config) -> int:
    from .experiment.grid import GRID_JSON, GRID_MD, run_grid

    outcome = run_grid(config)
    print(outcome.table, flush=True)
    print(f"\nresults: {config.out / 'results.jsonl'}, {GRID_JSON}, {GRID_MD}", file=sys.stderr)
    return 1 if outcome.failed else 0


def _reproduce(args: argparse.Namespace, config) -> int:
    from .experiment import RESULTS, SUMMARY, reproduce

    outcome = reproduce(config)
    print(outcome.table, flush=True)
    print(f"\nresults: {config.out / RESULTS}, {SUMMARY}, table.md", file=sys.stderr)
    return 1 if outcome.failed else 0


# --- stats ---------------------------------------------------------------------------------------

def _stats(args: argparse.Namespace) -> int:
    from .experiment.report import stats_row, stats_table

    rows = [stats_row(n, data_dir=args.data_dir, download=args.download, device=args.device,
                      n_filters=args.n_filters, log=_err) for n in _datasets(args.dataset)]
    print(stats_table(rows))
    print("\nτ*, d over every training pixel; mean ‖p̃‖₂ over every 3×3 patch position of the raw "
          "[0, 1] training images; n_patches by the rule for the dataset's channel count; σ of "
          "Table 2 capped at the Kaiming parity bound.", file=sys.stderr)
    return 0


# --- entry point ---------------------------------------------------------------------------------

def _cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; a container's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _threads(args: argparse.Namespace) -> int | None:
    """``--threads``, else every core this process may use for a CPU device (else torch's
    default). Each run records the count it trained with (``env.torch_threads``)."""
    if getattr(args, "threads", None):
        return args.threads
    if torch.device(getattr(args, "device", "cpu")).type == "cpu":
        return _cores()
    return None


def check_device(name: str) -> torch.device:
    """``--device`` parsed and present, or a :class:`UsageError` in one line."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {name!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: only cpu, cuda and mps are supported")
    return dev


class UsageError(ValueError):
    """A bad argument, found before any work: exit 2."""


def _on_sigterm(signum, frame):  # a kill ends the sweep like Ctrl-C: finished runs are on disk
    raise KeyboardInterrupt


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


def _prepare(args: argparse.Namespace):
    """Every check that needs no work, then the command to run (a zero-argument callable).
    Raises what :data:`_USER_ERRORS` lists for bad arguments, missing data or a bad ``--out``."""
    if hasattr(args, "device"):
        check_device(args.device)
    if args.command == "filterbank":
        from .experiment.records import trained_models
        from .methods.filterbank import pool_kernels

        files = trained_models(args.runs, args.dataset, args.init)
        if not files:
            raise UsageError(f"no trained models in {args.runs / 'models'} (looked for "
                             f"<dataset>-<init>-<seed>.pt, dataset={args.dataset!r}, "
                             f"init={args.init!r}); run reproduce --save-models first")
        if args.out.is_dir():
            raise UsageError(f"--out {args.out} is a folder; give the bank file to write")
        _check_bank_out(args.out)  # exit 4, before any clustering
        try:  # every check build_bank makes before clustering: a bad file, too many clusters
            pool_kernels(files, n_clusters=args.n_clusters)
        except OSError as e:
            raise UsageError(f"--runs {args.runs}: cannot read a model file ({e})") from e
        return lambda: _filterbank(args)
    if args.command == "report":
        from .experiment.pool import pool

        text = pool(args.pool)  # PoolError (a ValueError): exit 2 before printing anything
        return lambda: print(text) or 0
    if args.command == "stats":
        from .data import check_dataset

        names = _datasets(args.dataset)
        if not args.download:
            for n in names:
                check_dataset(n, args.data_dir)
        return lambda: _stats(args)
    if args.command == "grid":
        from .experiment.grid import prepare_grid

        config, _ = prepare_grid(_grid_config(args))
        args.out = config.out
        return lambda: _grid(config)
    from .experiment import prepare_sweep

    sweep = _sweep_config(args)
    _check_bank_option(sweep)
    config, _ = prepare_sweep(sweep)
    args.out = config.out
    return lambda: _reproduce(args, config)


def _check_bank_option(config) -> None:
    """``--init filterbank`` needs a bank (``--bank FILE``), readable and a bank: checked now,
    not when the first filterbank run starts (after the Kaiming runs trained)."""
    if "filterbank" not in config.inits:
        return
    from .methods.filterbank import load_bank

    bank = config.init_options.get("filterbank", {}).get("bank")
    if bank is None:
        raise UsageError("--init filterbank needs --bank FILE, a bank from `prewarm-gpu "
                         "filterbank build`")
    if isinstance(bank, str):
        try:
            load_bank(bank)
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise UsageError(f"--bank {bank}: {reason}") from None


def _user_errors():
    from .experiment import NothingToResumeError, ResultsExistError, SweepLockedError
    from .experiment.ray_executor import ExecutorUnavailableError

    return (UsageError, ResultsExistError, NothingToResumeError, DatasetNotFoundError,
            DatasetInvalidError, SweepLockedError, ExecutorUnavailableError)


def _error(e: BaseException, code: int = 2) -> int:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"prewarm-gpu: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console script ``prewarm-gpu`` (and ``python -m prewarm_gpu``).

    Arguments are checked first (exit 2, one line, nothing written); then the command runs, and
    an exception that is not a user error is an internal error (exit 3, with its traceback).
    """
    args = build_parser().parse_args(argv)
    threads, old_threads = _threads(args), torch.get_num_threads()
    old_showwarning, old_sigterm = warnings.showwarning, signal.getsignal(signal.SIGTERM)
    warnings.showwarning = _show_warning
    if old_sigterm is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    from .experiment import ResultsWriteError
    from .experiment.errors import WorkersLost

    try:
        try:
            command = _prepare(args)
        except ResultsWriteError as e:
            return _error(e, 4)
        except (*_user_errors(), KeyError, ValueError, ImportError) as e:
            return _error(e)  # everything here is about the arguments, the data or --out
        if threads:
            torch.set_num_threads(threads)
        return command()
    except _user_errors() as e:
        return _error(e)
    except ResultsWriteError as e:
        return _error(e, 4)
    except WorkersLost as e:
        return _error(e, 5)
    except KeyboardInterrupt as e:
        from .experiment import SweepInterrupted

        if isinstance(e, SweepInterrupted):
            print(f"\nprewarm-gpu: interrupted. {e}", file=sys.stderr)
        else:
            print("\nprewarm-gpu: interrupted.", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 — a bug: say so, keep the traceback, distinct exit code
        traceback.print_exc()
        out = getattr(args, "out", None)
        sweep = args.command in ("reproduce", "grid")
        kept = f"; finished runs are kept in {out}" if out and sweep else ""
        print(f"prewarm-gpu: internal error (a bug, please report it with the traceback above)"
              f"{kept}", file=sys.stderr)
        return 3
    finally:
        torch.set_num_threads(old_threads)
        warnings.showwarning = old_showwarning
        if old_sigterm is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, old_sigterm)


if __name__ == "__main__":
    sys.exit(main())
