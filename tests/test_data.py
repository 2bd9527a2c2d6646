"""Tests for pyro_vae.io.data: readers on tiny files written here, loaders on fake data folders, user files."""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.io.data import (
    DATASETS,
    DataError,
    Dataset,
    binarize_static,
    default_data_dir,
    load_dataset,
    read_amat,
    read_idx,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/datasets (offline copies)")

IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(autouse=True)
def _no_download_cache(tmp_path_factory, monkeypatch):
    # Any download attempt or cache lookup goes to an empty private folder, never ~/.cache.
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path_factory.mktemp("cache")))


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, *, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def fake_idx_dir(raw: Path, *, n_train: int = 5, n_test: int = 3, gz: bool = True, seed: int = 0):
    """Tiny MNIST-shaped IDX files in ``raw``; returns the images and labels written."""
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images.flat[0] = 255  # so the maximum, 1.0 after scaling, is known
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write(raw / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz=gz)
        write(raw / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz=gz)
        written[prefix] = (images, labels)
    return written


def amat_text(rows: np.ndarray) -> bytes:
    return "".join(" ".join(str(int(v)) for v in row) + "\n" for row in rows).encode()


# ---------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_images_and_labels(tmp_path, gz):
    images = np.arange(12, dtype=np.uint8).reshape(3, 2, 2) * 20
    labels = np.array([7, 0, 9], dtype=np.uint8)
    got_images = read_idx(write(tmp_path / "img-idx3-ubyte", idx_bytes(images), gz=gz))
    got_labels = read_idx(write(tmp_path / "lab-idx1-ubyte", idx_bytes(labels), gz=gz))
    assert got_images.dtype == np.uint8 and got_images.shape == (3, 2, 2)
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.shape == (3,)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_truncated_raises(tmp_path, gz):
    data = idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8))
    path = write(tmp_path / "cut-idx3-ubyte", data[:-1], gz=gz)
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x34\x08\x01\x00\x00\x00\x01\x00",  # bad magic
        b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00",  # float32 type, unsupported
        b"\x00\x00\x08\x03\x00\x00",  # header cut short
        b"\x00\x00",  # shorter than a header
        b"\x00\x00\x08\x02\xff\xff\xff\xff\xff\xff\xff\xff\x00",  # huge promised shape: no allocation
    ],
    ids=["bad-magic", "bad-type", "short-header", "tiny", "huge-shape"],
)
def test_read_idx_garbage_raises(tmp_path, data):
    path = write(tmp_path / "bad-idx3-ubyte", data)
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_idx_not_gzip_raises(tmp_path):
    path = tmp_path / "fake-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


# ---------------------------------------------------------------------------
# read_amat


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_amat(tmp_path, gz):
    rows = np.array([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    x = read_amat(write(tmp_path / "x.amat", amat_text(rows), gz=gz))
    assert x.dtype == np.float32 and x.shape == (3, 5)
    np.testing.assert_array_equal(x, rows)


def test_read_amat_tolerates_crlf_and_blank_trailing_line(tmp_path):
    path = write(tmp_path / "x.amat", b"0 1\r\n1 0\r\n\r\n")
    np.testing.assert_array_equal(read_amat(path), [[0, 1], [1, 0]])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"0 1 1\n1 0\n0 0 1\n", "line 2: 2 values where line 1 has 3"),
        (b"0 1 1\n1 0 2\n", "line 2: value '2'"),
        (b"0 1 1\n1 10 1\n", "line 2: value '10'"),
        (b"0 1\n0.5 1\n", "line 2: value '0.5'"),
        (b"", "no data rows"),
    ],
    ids=["ragged", "digit-2", "two-digits", "fraction", "empty"],
)
def test_read_amat_bad_file_raises(tmp_path, text, match):
    path = write(tmp_path / "bad.amat", text)
    with pytest.raises(DataError, match=match) as info:
        read_amat(path)
    assert str(path) in str(info.value)


def test_read_amat_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_amat(tmp_path / "nothing.amat")


# ---------------------------------------------------------------------------
# MNIST-like loaders on fake folders


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "unpacked"])
def test_idx_loader_on_fake_folder(tmp_path, name, folder, gz):
    written = fake_idx_dir(tmp_path / folder / "raw", gz=gz)
    before = snapshot(tmp_path)
    data = load_dataset(name, data_dir=tmp_path, download=False)
    assert snapshot(tmp_path) == before  # nothing unpacked or cached into the data folder
    assert data.name == name and data.image_shape == (28, 28) and data.input_dim == 784
    assert data.train.shape == (5, 784) and data.test.shape == (3, 784) and data.valid is None
    assert data.train.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    assert data.train.min() >= 0 and data.train.max() == 1.0
    images, labels = written["train"]
    np.testing.assert_allclose(data.train.numpy(), images.reshape(5, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.train_labels.numpy(), labels)
    np.testing.assert_array_equal(data.labels("test").numpy(), written["t10k"][1])
    assert not data.is_binary


@pytest.mark.parametrize("sub", ["MNIST", "MNIST/raw"])
def test_mnist_accepts_its_own_folder_as_data_dir(tmp_path, sub):
    fake_idx_dir(tmp_path / "MNIST" / "raw", n_train=4, n_test=2)
    assert load_dataset("mnist", data_dir=tmp_path / sub, download=False).train.shape == (4, 784)


def test_fashion_mnist_does_not_read_mnist_files(tmp_path):
    # The two data sets share file names, so a folder must be named for the data set it holds.
    fake_idx_dir(tmp_path / "MNIST" / "raw")
    with pytest.raises(DataError, match="fashion-mnist: missing"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "MNIST", download=False)


def test_idx_loader_rejects_mismatched_labels(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    fake_idx_dir(raw)
    write(raw / "train-labels-idx1-ubyte", idx_bytes(np.zeros(4, dtype=np.uint8)), gz=True)
    with pytest.raises(DataError, match="do not match"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_missing_files_without_download_is_one_line(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    fake_idx_dir(raw)
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "train-images-idx3-ubyte.gz" not in message  # present files are not called missing
    assert str(raw) in message and "--data-dir" in message and "download=False" in message


def test_binarized_mnist_missing_without_download(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("binarized-mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "BinarizedMNIST") in message
    for split in ("train", "valid", "test"):
        assert f"binarized_mnist_{split}.amat" in message


@pytest.mark.parametrize("sub", ["BinarizedMNIST", ""])
def test_binarized_mnist_on_fake_folder(tmp_path, sub):
    rng = np.random.default_rng(1)
    folder = tmp_path / sub if sub else tmp_path
    written = {}
    for split, n, gz in (("train", 5, True), ("valid", 2, False), ("test", 3, True)):
        written[split] = rng.integers(0, 2, size=(n, 784))
        write(folder / f"binarized_mnist_{split}.amat", amat_text(written[split]), gz=gz)
    before = snapshot(tmp_path)
    data = load_dataset("binarized-mnist", data_dir=tmp_path, download=False)
    assert snapshot(tmp_path) == before
    assert (data.train.shape, data.valid.shape, data.test.shape) == ((5, 784), (2, 784), (3, 784))
    assert data.is_binary and data.image_shape == (28, 28) and data.train_labels is None
    np.testing.assert_array_equal(data.split("valid").numpy(), written["valid"])
    assert data.labels("valid") is None


def test_binarized_mnist_rejects_wrong_width(tmp_path):
    for split in ("train", "valid", "test"):
        write(tmp_path / f"binarized_mnist_{split}.amat", amat_text(np.ones((2, 10))))
    with pytest.raises(DataError, match="expected 784"):
        load_dataset("binarized-mnist", data_dir=tmp_path, download=False)


# ---------------------------------------------------------------------------
# digits, the embedded default


def test_digits():
    data = load_dataset("digits")
    again = load_dataset("digits", download=False)
    assert data.image_shape == (8, 8) and data.input_dim == 64
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == 359
    assert data.train.dtype == torch.float32 and 0 <= data.train.min() and data.train.max() == 1.0
    torch.testing.assert_close(data.train, again.train)
    torch.testing.assert_close(data.test_labels, again.test_labels)
    assert set(data.train_labels.tolist()) == set(range(10))
    # A random split, not the first 80%: the test rows come from the whole file.
    from sklearn.datasets import load_digits

    original = torch.from_numpy(load_digits().data.astype(np.float32) / 16)
    first_test_row = (original == data.test[0]).all(dim=1).nonzero()
    assert len(first_test_row) >= 1 and not torch.equal(data.test, original[-359:])


def test_registry_lists_the_data_sets_with_descriptions():
    assert {"digits", "mnist", "fashion-mnist", "binarized-mnist"} <= set(DATASETS.names())
    assert all(description.strip() for description in DATASETS.describe().values())


def test_unknown_name_lists_choices():
    with pytest.raises(DataError, match=r"unknown data set 'cifar'.*digits.*binarized-mnist"):
        load_dataset("cifar")


# ---------------------------------------------------------------------------
# Dataset


def test_dataset_split_errors_and_validation():
    x = torch.zeros(4, 3)
    data = Dataset(name="toy", train=x, test=x[:2], image_shape=None)
    assert data.split("test").shape == (2, 3) and data.labels("train") is None
    with pytest.raises(DataError, match="no split 'valid'; choose one of: train, test"):
        data.split("valid")
    with pytest.raises(DataError, match="no split 'dev'"):
        data.labels("dev")
    with pytest.raises(DataError, match="columns"):
        Dataset(name="toy", train=x, test=torch.zeros(2, 5), image_shape=None)
    with pytest.raises(DataError, match="image_shape"):
        Dataset(name="toy", train=x, test=x, image_shape=(2, 2))
    with pytest.raises(DataError, match="labels"):
        Dataset(name="toy", train=x, test=x, image_shape=None, train_labels=torch.zeros(3, dtype=torch.int64))


def test_is_binary_looks_at_every_split():
    ones = torch.ones(3, 2)
    assert Dataset(name="b", train=ones, test=ones, image_shape=None).is_binary
    grey_valid = Dataset(name="b", train=ones, test=ones, valid=ones * 0.5, image_shape=None)
    assert not grey_valid.is_binary


# ---------------------------------------------------------------------------
# user files


def test_user_npy_image_stack(tmp_path):
    x = np.random.default_rng(0).random((20, 4, 5))
    path = tmp_path / "faces.npy"
    np.save(path, x)
    data = load_dataset(str(path))
    assert data.name == "faces" and data.image_shape == (4, 5) and data.input_dim == 20
    assert (len(data.train), len(data.test)) == (18, 2)
    # The split is a permutation of the rows: every row appears once.
    rows = torch.cat([data.train, data.test])
    expected = torch.from_numpy(x.reshape(20, -1).astype(np.float32))
    assert torch.equal(rows[rows[:, 0].argsort()], expected[expected[:, 0].argsort()])
    assert torch.equal(load_dataset(str(path)).test, data.test)  # fixed seed


def test_user_npy_flat_rows_have_no_image_shape(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((10, 3), dtype=np.int16))
    data = load_dataset(str(tmp_path / "x.npy"))
    assert data.image_shape is None and data.train.dtype == torch.float32 and data.is_binary


def test_user_npz_with_splits_and_labels(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(
        path,
        train=np.zeros((6, 2, 2)),
        test=np.ones((3, 2, 2)),
        valid=np.ones((2, 2, 2)),
        train_labels=np.arange(6),
        test_labels=np.array([1, 2, 3]),
    )
    data = load_dataset(str(path))
    assert data.image_shape == (2, 2) and data.train.shape == (6, 4) and data.valid.shape == (2, 4)
    assert data.test_labels.tolist() == [1, 2, 3] and data.labels("valid") is None


def test_user_npz_single_array_is_split(tmp_path):
    np.savez(tmp_path / "one.npz", anything=np.zeros((10, 3)))
    data = load_dataset(str(tmp_path / "one.npz"))
    assert (len(data.train), len(data.test)) == (9, 1)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"train": np.zeros((4, 2)), "other": np.zeros((4, 2))}, "not a known layout"),
        ({"train": np.zeros((4, 2)), "test": np.zeros((2, 3))}, "same shape"),
        ({"train": np.zeros((4, 2)), "test": np.zeros((2, 2)), "test_labels": np.zeros(2)}, "integers"),
        ({"train": np.zeros((4, 2)), "test": np.full((2, 2), np.inf)}, "4 infinite values in test"),
    ],
    ids=["unknown-keys", "shape-mismatch", "float-labels", "inf"],
)
def test_user_npz_rejected(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_dataset(str(tmp_path / "bad.npz"))


def test_user_npy_nan_says_how_many_and_where(tmp_path):
    x = np.zeros((10, 4))
    x[3, 1] = x[5, 0] = x[5, 2] = np.nan
    np.save(tmp_path / "n.npy", x)
    with pytest.raises(DataError, match=r"^3 NaN values in .*n\.npy \(first in row 3\)"):
        load_dataset(str(tmp_path / "n.npy"))


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((0, 4)), "empty"),
        (np.zeros((1, 4)), "at least 2"),
        (np.zeros(5), "reshape scalars"),
        (np.array([["a", "b"], ["c", "d"]]), "not numeric"),
    ],
    ids=["empty", "one-row", "1-d", "strings"],
)
def test_user_npy_rejected(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=match):
        load_dataset(str(tmp_path / "bad.npy"))


def test_user_file_missing_or_unreadable(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "absent.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npy"))


# ---------------------------------------------------------------------------
# binarize_static, default_data_dir


def test_binarize_static():
    x = torch.linspace(0, 1, 2000).repeat(50, 1)  # (50, 2000), mean 0.5 with exact 0 and 1 columns
    state = torch.get_rng_state()
    b = binarize_static(x, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(b, binarize_static(x, seed=3))
    assert not torch.equal(b, binarize_static(x, seed=4))
    assert b.dtype == x.dtype and b.shape == x.shape
    assert set(b.unique().tolist()) == {0.0, 1.0}
    assert abs(b.mean().item() - x.mean().item()) < 0.01
    assert (b[:, 0] == 0).all() and (b[:, -1] == 1).all()


@pytest.mark.parametrize(
    "x",
    [torch.tensor([0.5, 1.5]), torch.tensor([0.5, float("nan")]), torch.tensor([0, 1])],
    ids=["above-one", "nan", "integer"],
)
def test_binarize_static_rejects_non_probabilities(x):
    with pytest.raises(DataError):
        binarize_static(x, seed=0)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("PYRO_VAE_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "pyro_vae"


# ---------------------------------------------------------------------------
# the real files, where the offline copies are present


@needs_shared
@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_idx_data_sets(name):
    data = load_dataset(name, data_dir=SHARED, download=False)
    assert data.train.shape == (60000, 784) and data.test.shape == (10000, 784)
    assert data.train.min() == 0 and data.train.max() == 1 and not data.is_binary
    assert sorted(data.train_labels.unique().tolist()) == list(range(10))
    assert sorted(data.test_labels.unique().tolist()) == list(range(10))


@needs_shared
@pytest.mark.shared_data
def test_real_mnist_first_label():
    # The first MNIST training image is the well-known "5".
    assert load_dataset("mnist", data_dir=SHARED, download=False).train_labels[0] == 5


@needs_shared
@pytest.mark.shared_data
def test_real_binarized_mnist():
    data = load_dataset("binarized-mnist", data_dir=SHARED, download=False)
    assert (len(data.train), len(data.valid), len(data.test)) == (50000, 10000, 10000)
    assert data.input_dim == 784 and data.is_binary
    assert 0.1 < data.train.mean().item() < 0.16  # about 13% of binarized MNIST pixels are on


def test_values_beyond_float32_are_refused_as_too_large_not_called_infinite(tmp_path):
    # 1e300 is finite: float32 would make it inf, and numpy would warn about the cast.
    path = tmp_path / "big.npy"
    np.save(path, np.full((6, 3), 1e300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on the way
        with pytest.raises(DataError, match=r"^18 values in .*big\.npy are finite but beyond float32's range"):
            load_dataset(str(path))
