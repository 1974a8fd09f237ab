"""MNIST-style idx files (LeCun's format), plain or ``.gz``: read, and checked against their
header and against the other file of their split."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .catalog import DATASETS, DatasetInvalidError, cause

__all__ = ["read_idx", "idx_splits"]

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
        raise DatasetInvalidError(f"{path}: cannot be read ({cause(e)})") from e
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


def idx_splits(name: str, files: list[Path], values: bool = True):
    """The four idx files (train images, labels, test images, labels), each split checked;
    with ``values=False`` the images' headers and the labels only (:func:`check_dataset`)."""
    out = []
    for images, labels in (files[:2], files[2:]):
        dims, x = read_idx(images, 3, values=values)
        _, y = read_idx(labels, 1)
        _check_idx_split(name, images, dims, labels, y)
        out += [None if x is None else x[:, None], y]
    return out


