"""Datasets of the paper (§3.2, Table 1), held on the training device, and the seeded data order.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). MNIST, Fashion-MNIST, CIFAR-10, SVHN and CIFAR-100 are read with torchvision's own dataset
classes from a data directory (downloaded only when asked); ``digits`` is scikit-learn's bundled 8×8
handwritten digits (no download; the default). Each split is loaded once as a uint8 tensor on the
device. Pixels are scaled to [0, 1] and standardised per channel with training-set statistics,
batch by batch; the raw [0, 1] images stay available for Pre-Warm's rules.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DatasetSpec",
    "DATASETS",
    "PAPER_DATASETS",
    "ImageData",
    "DatasetNotFoundError",
    "canonical_name",
    "expected_files",
    "missing_files",
    "load_dataset",
    "epoch_stream",
    "first_batch_indices",
]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing from the data directory (and downloading was not allowed)."""


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


@dataclass
class ImageData:
    """A dataset on one device: uint8 images (N, C, H, W), int64 labels, training-set statistics.

    ``raw(x) = x / max_value`` is in [0, 1]; ``standardise(x) = (raw(x) - mean) / std`` per channel.
    """

    spec: DatasetSpec
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor  # uint8 (M, C, H, W)
    test_y: torch.Tensor  # int64 (M,)
    max_value: float = 255.0  # raw = x / max_value (16 for digits)
    mean: torch.Tensor = field(init=False)  # (C,) of the raw training images
    std: torch.Tensor = field(init=False)  # (C,)

    def __post_init__(self) -> None:
        self.mean, self.std = _channel_stats(self.train_x, self.max_value)
        # standardise(x) = x · a + b, one fused multiply-add per batch.
        self._a = (1.0 / (self.max_value * self.std)).view(1, -1, 1, 1)
        self._b = (-self.mean / self.std).view(1, -1, 1, 1)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images → float32 in [0, 1]."""
        return x.to(torch.float32) / self.max_value

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images → float32 standardised with the training set's per-channel mean and std."""
        return torch.addcmul(self._b, x.to(torch.float32), self._a)


def _channel_stats(x: torch.Tensor, max_value: float, chunk: int = 8192):
    """Per-channel mean and (population) std of ``x / max_value``, in float64, chunked."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s)
    for i in range(0, x.shape[0], chunk):
        v = x[i : i + chunk].to(torch.float64) / max_value
        s += v.sum((0, 2, 3))
        s2 += v.square().sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.to(torch.float32), std.to(torch.float32)


# --- on-disk layouts (torchvision's) ----------------------------------------------------------

_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def expected_files(name: str, root: str | os.PathLike) -> list[Path]:
    """The files torchvision reads for dataset ``name`` under ``root`` (empty for ``digits``)."""
    name, root = canonical_name(name), Path(root)
    if name in ("mnist", "fashion-mnist"):
        folder = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        return [folder / f for f in _MNIST_FILES]
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        return [folder / f for f in names]
    if name == "cifar100":
        return [root / "cifar-100-python" / f for f in ("train", "test", "meta")]
    if name == "svhn":
        return [root / "train_32x32.mat", root / "test_32x32.mat"]
    return []


def missing_files(name: str, root: str | os.PathLike) -> list[Path]:
    """:func:`expected_files` that are absent (an MNIST-style ``X.gz`` counts for ``X``)."""
    return [p for p in expected_files(name, root)
            if not p.is_file() and not p.with_name(p.name + ".gz").is_file()]


def _not_found(name: str, root: str | os.PathLike, cause: Exception | None = None):
    files = expected_files(name, root)
    lines = "\n".join(f"  {p}" for p in files)
    gz = " (MNIST-style files may be .gz)" if name in ("mnist", "fashion-mnist") else ""
    msg = (f"dataset {name!r} not found under data dir {str(Path(root).resolve())!r}; expected "
           f"these files{gz}:\n{lines}\nPut them there, point --data-dir at them, or pass "
           f"--download to fetch them.")
    if cause is not None:
        msg += f"\n(torchvision said: {cause})"
    return DatasetNotFoundError(msg)


def _gunzip_mnist(name: str, root: Path) -> None:
    """Unpack ``raw/X.gz`` → ``raw/X`` where only the archive exists (what torchvision's download
    does after fetching; its loader reads the unpacked files)."""
    for p in expected_files(name, root):
        gz = p.with_name(p.name + ".gz")
        if not p.is_file() and gz.is_file():
            tmp = p.with_name(p.name + ".part")
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, p)


def _torchvision_splits(name: str, root: Path, download: bool):
    """(train_x uint8 NCHW, train_y, test_x, test_y) as numpy arrays, via torchvision's classes."""
    from torchvision import datasets as tvd

    if name in ("mnist", "fashion-mnist"):
        _gunzip_mnist(name, root)
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        tr, te = (cls(str(root), train=t, download=download) for t in (True, False))
        return (tr.data.numpy()[:, None], tr.targets.numpy(),
                te.data.numpy()[:, None], te.targets.numpy())
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr, te = (cls(str(root), train=t, download=download) for t in (True, False))
        # torchvision holds CIFAR as N×H×W×C; the network wants N×C×H×W.
        return (tr.data.transpose(0, 3, 1, 2), np.asarray(tr.targets),
                te.data.transpose(0, 3, 1, 2), np.asarray(te.targets))
    if name == "svhn":
        tr, te = (tvd.SVHN(str(root), split=s, download=download) for s in ("train", "test"))
        return tr.data, tr.labels, te.data, te.labels  # already N×C×H×W; labels 10 → 0
    raise AssertionError(name)


def _digits_splits(test_fraction: float = 0.2, random_state: int = 0):
    """scikit-learn's 1797 digits (values 0..16), a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), integers 0..16
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction,
                                          stratify=d.target, random_state=random_state)
    return xtr, ytr, xte, yte


def load_dataset(name: str, *, data_dir: str | os.PathLike = "data", download: bool = False,
                 device: str | torch.device = "cpu") -> ImageData:
    """Load dataset ``name`` (both splits) onto ``device`` as uint8 tensors.

    Args:
        name: one of :data:`DATASETS` (case and dashes ignored).
        data_dir: torchvision's ``root``; unused for ``digits``.
        download: let torchvision download missing files; otherwise a missing dataset raises
            :class:`DatasetNotFoundError` naming the files expected and where.
        device: where the tensors live.

    Returns:
        :class:`ImageData` with training-set per-channel statistics.
    """
    name = canonical_name(name)
    spec = DATASETS[name]
    root = Path(data_dir)
    if name == "digits":
        arrays, max_value = _digits_splits(), 16.0
    else:
        if not download and missing_files(name, root):
            raise _not_found(name, root)
        try:
            arrays = _torchvision_splits(name, root, download)
        except (RuntimeError, OSError) as e:  # "Dataset not found or corrupted"; a failed download
            raise _not_found(name, root, e) from e
        max_value = 255.0
    xtr, ytr, xte, yte = arrays
    dev = torch.device(device)

    def images(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.uint8).to(dev)

    def labels(a):
        return torch.as_tensor(np.asarray(a, dtype=np.int64)).to(dev)

    data = ImageData(spec, images(xtr), labels(ytr), images(xte), labels(yte), max_value)
    _check_shapes(data)
    return data


def _check_shapes(data: ImageData) -> None:
    s = data.spec
    want = (s.in_channels, *s.image_size)
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        if tuple(x.shape[1:]) != want or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            shape = ", ".join(map(str, want))
            raise ValueError(f"{s.name} {split} split: got images {tuple(x.shape)} and labels "
                             f"{tuple(y.shape)}; expected (N, {shape}) and (N,)")
        if int(y.min()) < 0 or int(y.max()) >= s.n_classes:
            raise ValueError(f"{s.name} {split} labels must be in [0, {s.n_classes}), got "
                             f"[{int(y.min())}, {int(y.max())}]")


# --- data order ----------------------------------------------------------------------------------

def epoch_stream(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Batches of indices, forever: consecutive ``batch_size`` slices of a stream of per-epoch
    ``randperm(n)`` drawn on the generator's device. Every batch is full (a batch may straddle two
    epochs), so the order depends only on the seed, ``n`` and ``batch_size``."""
    device = generator.device
    buf = torch.empty(0, dtype=torch.long, device=device)
    while True:
        while buf.numel() < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator, device=device)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def first_batch_indices(n: int, batch_size: int, seed: int,
                        device: str | torch.device) -> torch.Tensor:
    """The first training batch of seed ``seed`` (what Pre-Warm sees), without consuming the
    training order: the same as the first item of ``epoch_stream`` on a fresh generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    return next(epoch_stream(n, batch_size, g))
