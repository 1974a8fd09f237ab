"""Datasets of the paper (§3.2, Table 1), held on the training device, and the seeded data order.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). MNIST and Fashion-MNIST are read from their idx files (each checked against its header
and the other files of its split); CIFAR-10, SVHN and CIFAR-100 with torchvision's own dataset
classes, from a data directory (downloaded only when asked); ``digits`` is scikit-learn's
bundled 8×8 handwritten digits (no download; the default). Each split is loaded once as a uint8
tensor on the device. Pixels are scaled to [0, 1] and standardised with the training set's
per-channel mean and std, batch by batch; the raw [0, 1] images stay available for Pre-Warm's rules.

One job per module, each importing only those above it in this list: :mod:`.catalog` (Table 1's
protocol, names, the two errors), :mod:`.idx` (LeCun's idx format), :mod:`.files` (where the
files are, checking them, reading them into arrays), :mod:`.images` (:class:`ImageData` and
:func:`load_dataset`), :mod:`.order` (the seeded batches). Everything a caller needs is here.
"""

from .catalog import (
    DATASETS,
    PAPER_DATASETS,
    DatasetInvalidError,
    DatasetNotFoundError,
    DatasetSpec,
    canonical_name,
)
from .files import (
    candidate_dirs,
    check_dataset,
    expected_files,
    find_files,
    locate,
    missing_files,
)
from .images import ImageData, data_fingerprint, load_dataset
from .order import EpochStream, epoch_stream, first_batch_indices

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
