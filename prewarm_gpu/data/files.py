"""Where a dataset's files are on disk (torchvision's layouts, MNIST-style idx files flat in a
folder, Debian's system folder), checking them, and reading them into numpy arrays (through
torchvision for CIFAR and SVHN; scikit-learn's bundled ``digits`` need no file)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .catalog import (
    DATASETS,
    DatasetInvalidError,
    DatasetNotFoundError,
    DatasetSpec,
    canonical_name,
    cause,
)
from .idx import idx_splits

__all__ = ["DEFAULT_DATA_DIR", "SYSTEM_DATA_DIR", "expected_files", "find_files", "missing_files",
           "candidate_dirs", "locate", "check_dataset", "read_splits"]

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
        idx_splits(name, find_files(name, root), values=False)
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
        return idx_splits(name, find_files(name, root))
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


def read_splits(name: str, data_dir: str | os.PathLike | None, download: bool
                ) -> tuple[tuple, float, Path | None, list[Path] | None]:
    """Dataset ``name`` (canonical) as ``((train_x, train_y, test_x, test_y), max_value, folder,
    files)``: uint8 (N, C, H, W) images and integer labels as numpy arrays, both splits checked
    against the dataset's shape; the folder and files read are ``None`` for the bundled ``digits``.
    See :func:`prewarm_gpu.data.load_dataset` for ``data_dir`` and ``download``.
    """
    if name == "digits":
        return _digits_splits(), 16.0, None, None
    try:
        root = locate(name, data_dir)
    except DatasetNotFoundError:
        if not download:
            raise
        root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
        _download(name, root)
    arrays = tuple(_read_through_torchvision(name, root))
    files = find_files(name, root) or expected_files(name, root)
    _check_shapes(DATASETS[name], arrays, f"read from {', '.join(str(p) for p in files)}")
    return arrays, 255.0, root, files


def _read_through_torchvision(name: str, root: Path):
    """:func:`_torchvision_splits`, an unreadable file reported as bad data, naming the files."""
    try:
        return _torchvision_splits(name, root)
    except DatasetInvalidError:
        raise
    except (RuntimeError, OSError, EOFError, AssertionError, ValueError, TypeError,
            KeyError, IndexError) as e:
        # torchvision's "Dataset not found or corrupted" (a checksum), a bad pickle or .mat:
        # the files were found, so they are not "not found"
        files = ", ".join(str(p) for p in expected_files(name, root))
        raise DatasetInvalidError(f"dataset {name!r}: its files under {root} are present but "
                                  f"cannot be read ({files}); torchvision said: "
                                  f"{cause(e)}") from e


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


