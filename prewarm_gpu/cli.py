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
written before is intact); 5 every worker of ``--executor ray`` died for good (finished runs
are kept); 130 interrupted (the message says which runs were kept).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import traceback
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .cli_parser import build_parser, parse_init_options
from .data import PAPER_DATASETS, DatasetInvalidError, DatasetNotFoundError, canonical_name

__all__ = ["main", "build_parser", "parse_init_options"]


def _datasets(names: list[str]) -> list[str]:
    if any(n.lower() == "all" for n in names):
        return list(PAPER_DATASETS)
    return list(dict.fromkeys(canonical_name(n) for n in names))


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


# --- reproduce and grid --------------------------------------------------------------------------

def _config(cls, args: argparse.Namespace, **given: Any):
    """A ``cls`` (:class:`SweepConfig` or :class:`GridConfig`) whose every field that has a flag
    of the same name is that flag's value; ``given`` the rest (the names the flags do not say
    as the config does). The seeds default to the paper's."""
    from .experiment import SEEDS

    flags = {f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**{**flags, "seeds": list(dict.fromkeys(args.seeds or SEEDS)), **given})


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
    return _config(SweepConfig, args, datasets=datasets, inits=list(args.init),
                   init_options=options, out=out)


def _grid_config(args: argparse.Namespace):
    from .experiment.grid import GridConfig

    (dataset,) = _datasets([args.dataset])
    return _config(GridConfig, args, datasets=[dataset],
                   out=args.out or Path("runs") / f"grid-{dataset}")


def _run(config, specs, outputs, names: str) -> int:
    """Execute a prepared sweep, print its table; 1 when a run failed."""
    from .experiment.engine import execute
    from .experiment.records import RESULTS

    outcome = execute(config, specs, outputs)
    print(outcome.table, flush=True)
    print(f"\nresults: {config.out / RESULTS}, {names}", file=sys.stderr)
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
        from .experiment.grid import GRID_JSON, GRID_MD, grid_outputs, prepare_grid

        config, specs = prepare_grid(_grid_config(args))
        args.out = config.out
        return lambda: _run(config, specs, grid_outputs(config, specs), f"{GRID_JSON}, {GRID_MD}")
    from .experiment.records import SUMMARY, TABLE
    from .experiment.reproduce import prepare_sweep, sweep_outputs

    sweep = _sweep_config(args)
    _check_bank_option(sweep)
    config, specs = prepare_sweep(sweep)
    args.out = config.out
    return lambda: _run(config, specs, sweep_outputs(config, specs), f"{SUMMARY}, {TABLE}")


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
    from .experiment.errors import (
        ExecutorUnavailableError,
        NothingToResumeError,
        ResultsExistError,
        SweepLockedError,
    )

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
