"""Datasets: tiny files in each torchvision on-disk format, read offline by torchvision's classes.

Writers here (``write_mnist``, ``write_cifar``, ``write_svhn``) are reused by test_cli.py.
"""

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets as tvd

from prewarm_gpu import data as D
from prewarm_gpu.data import files as data_files

# --- writers -------------------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    """Big-endian IDX (LeCun's format): magic 0x0000, type 0x08 (uint8), ndim, dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, folder: str | None = "MNIST", n_train: int = 12, n_test: int = 6,
                gz: bool = False, seed: int = 0, images: np.ndarray | None = None):
    """``<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; flat in
    ``root`` when ``folder`` is None (Debian's package, the authors' release)."""
    rng = np.random.default_rng(seed)
    raw = root if folder is None else root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = images if (images is not None and split == "train") else rng.integers(
            0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, len(x), dtype=np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = raw / f"{split}-{kind}-ubyte"
            blob = _idx(arr)
            if gz:
                with gzip.open(name.with_name(name.name + ".gz"), "wb") as f:
                    f.write(blob)
            else:
                name.write_bytes(blob)
        arrays[split] = (x, y)
    return arrays


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, monkeypatch, hundred: bool = False, n_per_file: int = 4, seed: int = 0):
    """CIFAR python pickles (``data`` N×3072 uint8 in CHW order, ``labels``/``fine_labels``).

    torchvision checks each file's md5 against its class attributes; the tiny files cannot match
    the real checksums, so the test points those attributes at the tiny files' md5 (the loading and
    checking code that runs is torchvision's own).
    """
    rng = np.random.default_rng(seed)
    cls = tvd.CIFAR100 if hundred else tvd.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    test = ["test"] if hundred else ["test_batch"]
    label_key = "fine_labels" if hundred else "labels"
    n_classes = 100 if hundred else 10
    arrays = {"train": [], "test": []}
    for split, files in (("train", names), ("test", test)):
        for name in files:
            x = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
            y = rng.integers(0, n_classes, n_per_file).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump({"data": x, label_key: y}, f)
            arrays[split].append((x, y))
    meta_name, meta_key = cls.meta["filename"], cls.meta["key"]
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(n_classes)]}, f)
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n in names])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n in test])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / meta_name)})
    join = {s: (np.concatenate([a for a, _ in v]), sum((b for _, b in v), [])) for s, v in
            arrays.items()}
    return join


def write_svhn(root: Path, monkeypatch, n_train: int = 5, n_test: int = 3, seed: int = 0):
    """``<root>/{train,test}_32x32.mat``: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) in 1..10."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    split_list = {k: list(v) for k, v in tvd.SVHN.split_list.items()}
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # SVHN's label for the digit 0
        path = root / f"{split}_32x32.mat"
        scipy.io.savemat(path, {"X": X, "y": y})
        split_list[split][2] = _md5(path)
        arrays[split] = (X, y)
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    return arrays


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing may download, ever: torchvision's download helpers fail loudly here."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download")

    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.mnist as mnist
    import torchvision.datasets.svhn as svhn

    for mod, name in ((mnist, "download_and_extract_archive"),
                      (cifar, "download_and_extract_archive"), (svhn, "download_url")):
        monkeypatch.setattr(mod, name, refuse)


# --- digits --------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_standardised():
    d = D.load_dataset("digits")
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert d.train_x.dtype == torch.uint8 and int(d.train_x.max()) == 16
    counts = torch.bincount(d.test_y, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: ≈ 36 per class
    again = D.load_dataset("digits")
    assert torch.equal(again.test_x, d.test_x) and torch.equal(again.train_y, d.train_y)
    z = d.standardise(d.train_x)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), unbiased=False), torch.ones(1), atol=1e-5, rtol=0)
    raw = d.raw(d.train_x)
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0


@pytest.mark.parametrize("name, canon", [("FashionMNIST", "fashion-mnist"), ("CIFAR-10", "cifar10"),
                                         ("fashion_mnist", "fashion-mnist"), ("SVHN", "svhn")])
def test_canonical_names(name, canon):
    assert D.canonical_name(name) == canon


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ValueError, match="known: digits, mnist"):
        D.canonical_name("imagenet")


# --- torchvision formats -------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_idx_files_load_through_torchvision(tmp_path, name, folder, gz):
    arrays = write_mnist(tmp_path, folder, gz=gz)
    d = D.load_dataset(name, data_dir=tmp_path)
    x, y = arrays["train"]
    assert d.train_x.shape == (12, 1, 28, 28) and d.test_x.shape == (6, 1, 28, 28)
    assert torch.equal(d.train_x[:, 0], torch.from_numpy(x))
    assert torch.equal(d.train_y, torch.from_numpy(y.astype(np.int64)))
    raw = x.astype(np.float64) / 255
    torch.testing.assert_close(d.mean.double(), torch.tensor([raw.mean()], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(d.std.double(), torch.tensor([raw.std()], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("flat", [False, True])
def test_mnist_style_folder_is_never_written_to(tmp_path, gz, flat):
    arrays = write_mnist(tmp_path, None if flat else "FashionMNIST", gz=gz)
    before = _snapshot(tmp_path)
    modes = {p: p.stat().st_mode for p in [tmp_path, *tmp_path.rglob("*")]}
    for p in modes:  # read-only, as /usr/share/datasets is for an ordinary user
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        d = D.load_dataset("fashion-mnist", data_dir=tmp_path)
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert _snapshot(tmp_path) == before
    assert d.source == tmp_path
    assert torch.equal(d.train_x[:, 0], torch.from_numpy(arrays["train"][0]))
    assert torch.equal(d.test_y, torch.from_numpy(arrays["t10k"][1].astype(np.int64)))


def test_flat_files_load_with_some_gzipped_and_some_not(tmp_path):
    arrays = write_mnist(tmp_path, None, gz=True)
    plain = tmp_path / "t10k-images-idx3-ubyte"
    with gzip.open(plain.with_name(plain.name + ".gz")) as f:
        plain.write_bytes(f.read())
    (plain.with_name(plain.name + ".gz")).unlink()
    d = D.load_dataset("mnist", data_dir=tmp_path)
    assert torch.equal(d.test_x[:, 0], torch.from_numpy(arrays["t10k"][0]))


def test_default_data_dir_is_dot_data_then_the_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "system"
    arrays = write_mnist(system / "fashion-mnist", None, gz=True, seed=1)
    monkeypatch.setattr(data_files, "SYSTEM_DATA_DIR", system)
    monkeypatch.chdir(tmp_path)
    d = D.load_dataset("fashion-mnist")  # no ./data: the system folder
    assert d.source == system / "fashion-mnist"
    assert torch.equal(d.train_x[:, 0], torch.from_numpy(arrays["train"][0]))
    local = write_mnist(tmp_path / "data", "FashionMNIST", seed=2)  # ./data wins when present
    d = D.load_dataset("fashion-mnist")
    assert d.source == Path("data")
    assert torch.equal(d.train_x[:, 0], torch.from_numpy(local["train"][0]))


def test_missing_data_names_every_place_looked_at(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("fashion-mnist")
    msg = str(e.value)
    assert str(tmp_path / "data") in msg and str(tmp_path / "system" / "fashion-mnist") in msg
    assert "FashionMNIST/raw/train-images-idx3-ubyte" in msg and "flat in" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_a_corrupt_gzip_is_a_clear_error_naming_the_file(tmp_path):
    write_mnist(tmp_path, None, gz=True)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"not gzip")
    for load in (D.load_dataset, D.check_dataset):
        with pytest.raises(D.DatasetInvalidError, match="cannot be read .*BadGzipFile") as e:
            load("mnist", data_dir=tmp_path)
        assert str(bad) in str(e.value) and "not found" not in str(e.value)


def _overwrite(path: Path, array: np.ndarray | bytes) -> None:
    path.write_bytes(array if isinstance(array, bytes) else _idx(array))


@pytest.mark.parametrize("fault, file, says", [
    ("fewer labels", "train-labels-idx1-ubyte", "holds 11 labels but"),
    ("27x29 images", "train-images-idx3-ubyte", "its images are 27×29; mnist images are 28×28"),
    ("label 200", "t10k-labels-idx1-ubyte", "label 200 (item 0, and 0 more) is out of range"),
    ("truncated images", "train-images-idx3-ubyte", "truncated or corrupt"),
    ("too long labels", "t10k-labels-idx1-ubyte", "holds more than 6 bytes"),
    ("bad image magic", "train-images-idx3-ubyte", "magic number 0x00000801 is not that of an "
     "idx file of 3-D unsigned bytes"),
    ("empty file", "t10k-images-idx3-ubyte", "0 byte(s), too short for an idx header"),
])
def test_inconsistent_idx_files_are_refused_naming_the_file_and_the_fault(tmp_path, fault, file,
                                                                         says):
    arrays = write_mnist(tmp_path, None)
    x, y = arrays["train"]
    path = tmp_path / file
    if fault == "fewer labels":
        _overwrite(path, y[:-1])
    elif fault == "27x29 images":
        _overwrite(path, np.zeros((len(x), 27, 29), np.uint8))
    elif fault == "label 200":
        _overwrite(path, np.r_[200, arrays["t10k"][1][1:]].astype(np.uint8))
    elif fault == "truncated images":
        path.write_bytes(path.read_bytes()[:-5])
    elif fault == "too long labels":
        path.write_bytes(path.read_bytes() + b"\0")
    elif fault == "bad image magic":
        _overwrite(path, x.reshape(-1))  # a 1-D (labels-like) file where images belong
    else:
        path.write_bytes(b"")
    for load in (D.load_dataset, D.check_dataset):  # the loader and the check before training
        with pytest.raises(D.DatasetInvalidError) as e:
            load("mnist", data_dir=tmp_path)
        msg = str(e.value)
        assert says in msg and str(path) in msg and "not found" not in msg, msg


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickles_load_through_torchvision(tmp_path, monkeypatch, hundred):
    arrays = write_cifar(tmp_path, monkeypatch, hundred=hundred)
    d = D.load_dataset("cifar100" if hundred else "cifar10", data_dir=tmp_path)
    x, y = arrays["train"]
    assert d.train_x.shape == (20 if not hundred else 4, 3, 32, 32)
    # The pickle holds each image as CHW rows; torchvision turns it into HWC; we want CHW again.
    assert torch.equal(d.train_x, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert d.train_y.tolist() == y
    assert d.test_x.shape == (4, 3, 32, 32) and d.spec.n_classes == (100 if hundred else 10)


def test_svhn_mat_loads_through_torchvision_and_maps_label_10_to_0(tmp_path, monkeypatch):
    arrays = write_svhn(tmp_path, monkeypatch)
    d = D.load_dataset("svhn", data_dir=tmp_path)
    X, y = arrays["train"]
    assert torch.equal(d.train_x, torch.from_numpy(X.transpose(3, 2, 0, 1).copy()))
    expect = y[:, 0].astype(np.int64)
    expect[expect == 10] = 0
    assert d.train_y.tolist() == expect.tolist() and int(d.train_y[0]) == 0


@pytest.mark.parametrize("name, must_name", [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
    ("fashion-mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py/data_batch_1"),
    ("cifar100", "cifar-100-python/train"),
    ("svhn", "train_32x32.mat"),
])
def test_missing_dataset_error_names_the_files_and_where(tmp_path, name, must_name):
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset(name, data_dir=tmp_path / "nowhere")
    msg = str(e.value)
    assert must_name in msg and str(tmp_path / "nowhere") in msg and "--download" in msg


def test_corrupt_file_reraises_torchvisions_error_with_the_expected_paths(tmp_path, monkeypatch):
    write_svhn(tmp_path, monkeypatch)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")  # md5 no longer matches
    with pytest.raises(D.DatasetInvalidError, match="present but cannot be read .*torchvision "
                       "said: RuntimeError: Dataset not found or corrupted") as e:
        D.load_dataset("svhn", data_dir=tmp_path)
    assert "test_32x32.mat" in str(e.value)


def test_torchvision_arrays_of_the_wrong_shape_are_bad_data_naming_the_files(tmp_path,
                                                                            monkeypatch):
    write_svhn(tmp_path, monkeypatch)
    real = data_files._torchvision_splits

    def short_labels(name, root):
        xtr, ytr, xte, yte = real(name, root)
        return xtr, ytr[:-1], xte, yte

    monkeypatch.setattr(data_files, "_torchvision_splits", short_labels)
    with pytest.raises(D.DatasetInvalidError, match="svhn train split .*train_32x32.mat"):
        D.load_dataset("svhn", data_dir=tmp_path)


# --- data order ----------------------------------------------------------------------------------


def test_epoch_stream_is_a_seeded_sequence_of_permutations():
    g = torch.Generator().manual_seed(3)
    it = D.epoch_stream(10, 4, g)
    flat = torch.cat([next(it) for _ in range(5)])  # 20 indices = two epochs
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:].tolist()) == list(range(10))
    g2 = torch.Generator().manual_seed(3)
    again = D.epoch_stream(10, 4, g2)
    assert torch.equal(torch.cat([next(again) for _ in range(5)]), flat)
    assert torch.equal(D.first_batch_indices(10, 4, 3, "cpu"), flat[:4])


def test_loading_leaves_global_rng_alone():
    state = torch.get_rng_state()
    D.load_dataset("digits")
    D.first_batch_indices(100, 8, 1, "cpu")
    assert torch.equal(state, torch.get_rng_state())
