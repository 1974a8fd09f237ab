"""Datasets of the paper (§3.2, Table 1), held on the training device, and the seeded data order.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). MNIST and Fashion-MNIST are read from their idx files (each checked against its header
and the other files of its split); CIFAR-10, SVHN and CIFAR-100 with torchvision's own dataset
classes, from a data directory (downloaded only when asked); ``digits`` is scikit-learn's
bundled 8×8 handwritten digits (no download; the default). Each split is loaded once as a uint8
tensor on the device. Pixels are scaled to [0, 1] and standardised per channel with training-set
statistics, batch by batch; the raw [0, 1] images stay available for Pre-Warm's rules.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
import zlib
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
    "DatasetInvalidError",
    "check_dataset",
    "canonical_name",
    "expected_files",
    "find_files",
    "missing_files",
    "candidate_dirs",
    "locate",
    "load_dataset",
    "EpochStream",
    "epoch_stream",
    "first_batch_indices",
    "data_fingerprint",
]


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
    source: Path | None = field(default=None, init=False)  # the folder read (None: bundled)
    files: list[Path] | None = field(default=None, init=False)  # the files read (None: bundled)

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

    @functools.cached_property
    def fingerprint(self) -> str:
        """``sha256:<16 hex>`` of both splits' images and labels (shapes, dtypes and bytes),
        computed once per loaded dataset (≈ 0.1 s for Fashion-MNIST): two records with the same
        fingerprint trained on the same data."""
        return data_fingerprint(self.train_x, self.train_y, self.test_x, self.test_y)


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """``sha256:<first 16 hex digits>`` of the tensors' shapes, dtypes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


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


# --- on-disk layouts --------------------------------------------------------------------------

DEFAULT_DATA_DIR = Path("data")  # looked at first when no data dir is given
SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # Debian's dataset-* packages: <dir>/<name>/…

_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
_MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def expected_files(name: str, root: str | os.PathLike) -> list[Path]:
    """The files torchvision's layout holds for dataset ``name`` under ``root`` (empty for
    ``digits``). MNIST and Fashion-MNIST may also lie flat in ``root`` (see :func:`find_files`)."""
    name, root = canonical_name(name), Path(root)
    if name in _MNIST_FOLDERS:
        return [root / _MNIST_FOLDERS[name] / "raw" / f for f in _MNIST_FILES]
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        return [folder / f for f in names]
    if name == "cifar100":
        return [root / "cifar-100-python" / f for f in ("train", "test", "meta")]
    if name == "svhn":
        return [root / "train_32x32.mat", root / "test_32x32.mat"]
    return []


def _present(p: Path) -> Path | None:
    """``p`` itself, else ``p.gz``, else None."""
    for q in (p, p.with_name(p.name + ".gz")):
        if q.is_file():
            return q
    return None


def find_files(name: str, root: str | os.PathLike) -> list[Path] | None:
    """The dataset's files under ``root`` as they are on disk, or None when a file is missing.

    MNIST and Fashion-MNIST: torchvision's ``<root>/<Folder>/raw/`` or the four idx files flat in
    ``root`` (Debian's ``dataset-fashion-mnist``, the authors' release), each plain or ``.gz``."""
    name, root = canonical_name(name), Path(root)
    expected = expected_files(name, root)
    layouts = [expected]
    if name in _MNIST_FOLDERS:
        layouts.append([root / f for f in _MNIST_FILES])
    for files in layouts:
        found = [_present(p) if name in _MNIST_FOLDERS else (p if p.is_file() else None)
                 for p in files]
        if all(found):
            return found
    return None


def missing_files(name: str, root: str | os.PathLike) -> list[Path]:
    """:func:`expected_files` that are absent; empty when any accepted layout is complete."""
    if find_files(name, root) is not None:
        return []
    return [p for p in expected_files(name, root) if _present(p) is None]


def candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Where dataset ``name`` is looked for: ``data_dir`` when given, else ``./data`` and then the
    system-wide ``/usr/share/datasets/<name>``."""
    if data_dir is not None:
        return [Path(data_dir)]
    return [DEFAULT_DATA_DIR, SYSTEM_DATA_DIR / canonical_name(name)]


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The first of :func:`candidate_dirs` that holds the whole dataset.

    Raises:
        DatasetNotFoundError: naming every place looked at and the files expected there.
    """
    name = canonical_name(name)
    dirs = candidate_dirs(name, data_dir)
    for d in dirs:
        if find_files(name, d) is not None:
            return d
    raise _not_found(name, dirs)


def _not_found(name: str, dirs: list[Path]):
    mnist = name in _MNIST_FOLDERS
    lines = []
    for d in dirs:
        lines += [f"  {p}" for p in expected_files(name, d)]
        if mnist:
            lines.append(f"  or the same four files flat in {d}/")
    where = " or ".join(repr(str(d.resolve())) for d in dirs)
    gz = " (each may be .gz)" if mnist else ""
    apt = (f"\nOn Debian/Ubuntu: apt-get install dataset-{name} (read from "
           f"{SYSTEM_DATA_DIR / name})." if name == "fashion-mnist" else "")
    msg = (f"dataset {name!r} not found under {where}; expected these files{gz}:\n"
           + "\n".join(lines)
           + f"\nPut them there, point --data-dir at them, or pass --download to fetch them.{apt}")
    return DatasetNotFoundError(msg)


def _cause(e: BaseException) -> str:
    """An exception as ``Type: message`` (an ``assert`` of a parser has no message)."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --- MNIST-style idx files (LeCun's format) ------------------------------------------------------

_IDX_UBYTE = 0x08  # the type byte of unsigned-byte values, the only type MNIST files use


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(f, path: Path, ndim: int) -> tuple[int, ...]:
    """The dims of an idx file of ``ndim``-D unsigned bytes, its magic number checked."""
    head = f.read(4)
    if len(head) < 4:
        raise DatasetInvalidError(f"{path}: {len(head)} byte(s), too short for an idx header")
    zero, kind, nd = struct.unpack(">HBB", head)
    if zero != 0 or kind != _IDX_UBYTE or nd != ndim:
        raise DatasetInvalidError(
            f"{path}: magic number 0x{head.hex()} is not that of an idx file of {ndim}-D "
            f"unsigned bytes (0x0000080{ndim}); not an MNIST-style "
            f"{'images' if ndim == 3 else 'labels'} file, or corrupt")
    raw = f.read(4 * nd)
    if len(raw) < 4 * nd:
        raise DatasetInvalidError(f"{path}: truncated inside its idx header")
    return struct.unpack(f">{nd}I", raw)


def read_idx(path: Path, ndim: int, *, values: bool = True) -> tuple[tuple[int, ...],
                                                                    np.ndarray | None]:
    """One idx file (plain or ``.gz``): ``(dims, uint8 array of that shape)``; with
    ``values=False`` only its header, checked against the data's length without keeping it.

    Raises:
        DatasetInvalidError: naming the file: unreadable, a bad magic number, or a length that
            disagrees with the header (truncated or corrupt).
    """
    try:
        with _open(path) as f:
            dims = _idx_header(f, path, ndim)
            want = math.prod(dims)
            if values:
                blob = f.read(want + 1)  # one byte more than the header says: too long?
                n = len(blob)
            elif path.suffix != ".gz":
                n = path.stat().st_size - (4 + 4 * ndim)
            else:
                n = 0
                while chunk := f.read(1 << 22):
                    n += len(chunk)
    except (OSError, EOFError, zlib.error) as e:  # a bad or truncated gzip stream, a read error
        raise DatasetInvalidError(f"{path}: cannot be read ({_cause(e)})") from e
    if n != want:
        held = f"more than {want}" if values and n > want else str(n)
        raise DatasetInvalidError(
            f"{path}: its header says {' × '.join(map(str, dims))} values ({want} bytes) but it "
            f"holds {held} bytes: truncated or corrupt")
    return dims, (np.frombuffer(blob, dtype=np.uint8).reshape(dims).copy() if values else None)


def _check_idx_split(name: str, images: Path, dims: tuple[int, ...], labels: Path,
                     y: np.ndarray) -> None:
    """One split's idx files agree: 28×28 images, one label per image, labels in range."""
    spec = DATASETS[name]
    n, h, w = dims
    if (h, w) != spec.image_size:
        raise DatasetInvalidError(f"{images}: its images are {h}×{w}; {name} images are "
                                  f"{spec.image_size[0]}×{spec.image_size[1]}")
    if n == 0:
        raise DatasetInvalidError(f"{images}: holds no images")
    if len(y) != n:
        raise DatasetInvalidError(f"{labels} holds {len(y)} labels but {images} holds {n} "
                                  "images; each image needs one label")
    bad = np.flatnonzero(y >= spec.n_classes)
    if bad.size:
        raise DatasetInvalidError(f"{labels}: label {int(y[bad[0]])} (item {int(bad[0])}, and "
                                  f"{bad.size - 1} more) is out of range; {name} labels are 0 to "
                                  f"{spec.n_classes - 1}")


def _idx_splits(name: str, files: list[Path], values: bool = True):
    """The four idx files (train images, labels, test images, labels), each split checked;
    with ``values=False`` the images' headers and the labels only (:func:`check_dataset`)."""
    out = []
    for images, labels in (files[:2], files[2:]):
        dims, x = read_idx(images, 3, values=values)
        _, y = read_idx(labels, 1)
        _check_idx_split(name, images, dims, labels, y)
        out += [None if x is None else x[:, None], y]
    return out


def check_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """:func:`locate` the dataset and, for MNIST-style files, check them without loading the
    images (headers, lengths, labels), so that bad files are refused before any training.

    Raises:
        DatasetNotFoundError: the files are missing.
        DatasetInvalidError: a file is corrupt or the files disagree (naming the file).
    """
    name = canonical_name(name)
    root = locate(name, data_dir)
    if name in _MNIST_FOLDERS:
        _idx_splits(name, find_files(name, root), values=False)
    return root


def _download(name: str, root: Path) -> None:
    """Let torchvision fetch the dataset into ``root`` (its own layout)."""
    from torchvision import datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
           "cifar100": tvd.CIFAR100}.get(name)
    if cls is not None:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    else:
        for split in ("train", "test"):
            tvd.SVHN(str(root), split=split, download=True)


def _torchvision_splits(name: str, root: Path):
    """(train_x uint8 NCHW, train_y, test_x, test_y) as numpy arrays, via torchvision."""
    from torchvision import datasets as tvd

    if name in _MNIST_FOLDERS:
        return _idx_splits(name, find_files(name, root))
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr, te = (cls(str(root), train=t) for t in (True, False))
        # torchvision holds CIFAR as N×H×W×C; the network wants N×C×H×W.
        return (tr.data.transpose(0, 3, 1, 2), np.asarray(tr.targets),
                te.data.transpose(0, 3, 1, 2), np.asarray(te.targets))
    if name == "svhn":
        tr, te = (tvd.SVHN(str(root), split=s) for s in ("train", "test"))
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


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                 device: str | torch.device = "cpu") -> ImageData:
    """Load dataset ``name`` (both splits) onto ``device`` as uint8 tensors.

    Args:
        name: one of :data:`DATASETS` (case and dashes ignored).
        data_dir: where the files are (torchvision's ``root``; MNIST-style idx files may also lie
            flat in it). ``None``: ``./data``, else ``/usr/share/datasets/<name>``
            (:func:`candidate_dirs`). Unused for ``digits``.
        download: let torchvision download a missing dataset into ``data_dir`` (``./data`` when
            ``None``); otherwise a missing dataset raises :class:`DatasetNotFoundError` naming
            every place looked at and the files expected. Only a download writes to disk.
        device: where the tensors live.

    Returns:
        :class:`ImageData` with training-set per-channel statistics; ``source`` says where the
        files were read from.
    """
    name = canonical_name(name)
    spec = DATASETS[name]
    source = None
    if name == "digits":
        arrays, max_value = _digits_splits(), 16.0
    else:
        try:
            root = locate(name, data_dir)
        except DatasetNotFoundError:
            if not download:
                raise
            root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
            _download(name, root)
        try:
            arrays = _torchvision_splits(name, root)
        except DatasetInvalidError:
            raise
        except (RuntimeError, OSError, EOFError, AssertionError, ValueError, TypeError,
                KeyError, IndexError) as e:
            # torchvision's "Dataset not found or corrupted" (a checksum), a bad pickle or .mat:
            # the files were found, so they are not "not found"
            files = ", ".join(str(p) for p in expected_files(name, root))
            raise DatasetInvalidError(f"dataset {name!r}: its files under {root} are present but "
                                      f"cannot be read ({files}); torchvision said: "
                                      f"{_cause(e)}") from e
        max_value, source = 255.0, root
    xtr, ytr, xte, yte = arrays
    dev = torch.device(device)

    def images(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.uint8).to(dev)

    def labels(a):
        return torch.as_tensor(np.asarray(a, dtype=np.int64)).to(dev)

    if source is not None:
        where = ", ".join(str(p) for p in (find_files(name, source) or
                                             expected_files(name, source)))
        _check_shapes(spec, (xtr, ytr, xte, yte), f"read from {where}")
    data = ImageData(spec, images(xtr), labels(ytr), images(xte), labels(yte), max_value)
    data.source = source
    if source is not None:
        data.files = find_files(name, source) or expected_files(name, source)
    return data


def _check_shapes(s: DatasetSpec, arrays, where: str) -> None:
    """Both splits: (N, C, H, W) images of the dataset's shape, N labels in [0, n_classes)."""
    want = (s.in_channels, *s.image_size)
    xtr, ytr, xte, yte = arrays
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        x, y = np.asarray(x), np.asarray(y)
        if tuple(x.shape[1:]) != want or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            shape = ", ".join(map(str, want))
            raise DatasetInvalidError(
                f"{s.name} {split} split ({where}): got images {tuple(x.shape)} and labels "
                f"{tuple(y.shape)}; expected (N, {shape}) and (N,)")
        if int(y.min()) < 0 or int(y.max()) >= s.n_classes:
            raise DatasetInvalidError(
                f"{s.name} {split} split ({where}): labels must be in [0, {s.n_classes}), got "
                f"[{int(y.min())}, {int(y.max())}]")


# --- data order ----------------------------------------------------------------------------------

class EpochStream:
    """Batches of indices, forever: consecutive ``batch_size`` slices of a stream of per-epoch
    ``randperm(n)`` drawn on the generator's device. Every batch is full (a batch may straddle two
    epochs), so the order depends only on the seed, ``n`` and ``batch_size``. Its position is a
    :meth:`state_dict` (the generator's state and the unread indices), so a training run can stop
    and go on bit-identically."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.buf = torch.empty(0, dtype=torch.long, device=generator.device)

    def __iter__(self) -> EpochStream:
        return self

    def __next__(self) -> torch.Tensor:
        while self.buf.numel() < self.batch_size:
            perm = torch.randperm(self.n, generator=self.generator, device=self.generator.device)
            self.buf = torch.cat([self.buf, perm])
        batch, self.buf = self.buf[: self.batch_size], self.buf[self.batch_size :]
        return batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "buf": self.buf.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.buf = state["buf"].to(self.generator.device)


def epoch_stream(n: int, batch_size: int, generator: torch.Generator) -> EpochStream:
    """The seeded data order (:class:`EpochStream`)."""
    return EpochStream(n, batch_size, generator)


def first_batch_indices(n: int, batch_size: int, seed: int,
                        device: str | torch.device) -> torch.Tensor:
    """The first training batch of seed ``seed`` (what Pre-Warm sees), without consuming the
    training order: the same as the first item of ``epoch_stream`` on a fresh generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    return next(epoch_stream(n, batch_size, g))
