"""The datasets of the paper (Table 1): their protocol, their names, and the two errors a dataset
raises (missing, or present but unusable)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DatasetSpec", "DATASETS", "PAPER_DATASETS", "canonical_name", "DatasetNotFoundError",
           "DatasetInvalidError", "cause"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing from the data directory (and downloading was not allowed)."""


class DatasetInvalidError(ValueError):
    """A dataset's files are there but unusable: unreadable or corrupt, truncated, or
    inconsistent (images and labels of different counts, images of the wrong size, a label out of
    range), or without what a statistic needs (all-zero images for Otsu's rule). The message
    names the file and what is wrong with it: bad data, not a bug and not a missing dataset."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's protocol (Table 1)."""

    name: str  # canonical name, as on the command line
    title: str  # as printed in tables
    in_channels: int  # C_in
    image_size: tuple[int, int]  # (H, W)
    n_classes: int
    lr_start: float  # η_start of the cosine schedule
    lr_end: float  # η_end
    steps: int  # default N
    paper_n_patches: int | None = None  # Table 1, for comparison in `prewarm-gpu stats`
    paper_scale: float | None = None  # Table 1 σ


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        # 1437 training digits: 150 steps ≈ 27 epochs (test accuracy plateaus by ~100 steps).
        DatasetSpec("digits", "Digits (8×8)", 1, (8, 8), 10, 3e-3, 3e-5, 150),
        DatasetSpec("mnist", "MNIST", 1, (28, 28), 10, 3e-3, 3e-5, 5000, 58, 0.20),
        DatasetSpec("fashion-mnist", "Fashion-MNIST", 1, (28, 28), 10, 3e-3, 3e-5, 5000, 22, 0.20),
        DatasetSpec("cifar10", "CIFAR-10", 3, (32, 32), 10, 3e-3, 3e-5, 5000, 28, 0.25),
        DatasetSpec("svhn", "SVHN", 3, (32, 32), 10, 5e-4, 3e-6, 5000, 16, 0.25),
        DatasetSpec("cifar100", "CIFAR-100", 3, (32, 32), 100, 2e-3, 3e-5, 5000, 16, 0.25),
    ]
}
PAPER_DATASETS = ("mnist", "fashion-mnist", "cifar10", "svhn", "cifar100")  # what `all` means


def canonical_name(name: str) -> str:
    """``"FashionMNIST"``, ``"fashion_mnist"``, ``"CIFAR-10"`` … → the key in :data:`DATASETS`."""
    key = name.lower().replace("-", "").replace("_", "")
    for canon in DATASETS:
        if canon.replace("-", "") == key:
            return canon
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or 'all')")


def cause(e: BaseException) -> str:
    """An exception as ``Type: message`` (an ``assert`` of a parser has no message)."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
