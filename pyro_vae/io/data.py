"""Data sets for the VAE benchmarks, loaded into flat float32 tensors.

Every loader returns a :class:`Dataset`: ``train`` and ``test`` (and ``valid``
where the benchmark defines one) as float32 tensors of shape ``[N, D]``, grey
images scaled to ``[0, 1]``, with the image shape kept for plotting. Loaders
join :data:`DATASETS` with ``@DATASETS.register("name")``; :func:`load_dataset`
also accepts a path to a user's ``.npy`` / ``.npz`` file.

The standard files are read where they lie (``.gz`` or unpacked) and nothing is
ever written into the data directory, because the shared copies are read-only;
downloads go to :func:`default_data_dir`.

References:
    LeCun, Bottou, Bengio, Haffner (1998). Gradient-based learning applied to
    document recognition. (MNIST; the IDX format is described at
    http://yann.lecun.com/exdb/mnist/)
    Xiao, Rasul, Vollgraf (2017). Fashion-MNIST: a novel image dataset for
    benchmarking machine learning algorithms. arXiv:1708.07747
    Larochelle, Murray (2011). The neural autoregressive distribution
    estimator. AISTATS. (the statically binarized MNIST split)
    Salakhutdinov, Murray (2008). On the quantitative analysis of deep belief
    networks. ICML. (binarizing grey MNIST by one Bernoulli draw per pixel)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import PyroVAEError
from ..registry import Registry

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "binarize_static",
    "default_data_dir",
    "hold_out",
    "load_dataset",
    "read_amat",
    "read_idx",
]

SPLITS = ("train", "valid", "test")

# The seed of every fixed train/test split, so a split is the same on every machine.
SPLIT_SEED = 0

BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"

# Seconds to wait on a silent server before giving up on a download.
DOWNLOAD_TIMEOUT = 30.0


class DataError(PyroVAEError):
    """A data set that cannot be found or read; the message is one line saying what to do."""


@dataclass(frozen=True, eq=False)  # eq=False: `==` on tensors has no single truth value.
class Dataset:
    """A data set as flat float32 tensors, one row per data point.

    ``train``, ``test`` and the optional ``valid`` are ``[N, D]`` float32 tensors;
    ``image_shape`` is the shape each row is reshaped to for plotting (``None``
    for data that are not images); labels, where known, are int64 ``[N]``.
    """

    name: str
    train: torch.Tensor  # (n_train, D)
    test: torch.Tensor  # (n_test, D)
    image_shape: tuple[int, ...] | None
    train_labels: torch.Tensor | None = None  # (n_train,) int64
    test_labels: torch.Tensor | None = None  # (n_test,) int64
    valid: torch.Tensor | None = None  # (n_valid, D)
    valid_labels: torch.Tensor | None = None  # (n_valid,) int64
    # A user's file: its absolute path and the SHA-256 of the bytes read (None for a registered data set).
    source: Path | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        dim = None
        for split in SPLITS:
            x = getattr(self, split)
            if x is None:
                if split != "valid":
                    raise DataError(f"{self.name}: the {split} split is missing; pass a [N, D] tensor")
                if self.valid_labels is not None:
                    raise DataError(f"{self.name}: valid_labels given without a valid split; pass both")
                continue
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.float32:
                raise DataError(
                    f"{self.name}: {split} must be a float32 tensor of shape [N, D], got "
                    f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
                )
            if dim is not None and x.shape[1] != dim:
                raise DataError(
                    f"{self.name}: {split} has {x.shape[1]} columns but train has {dim}; "
                    "every split needs the same data dimension"
                )
            dim = x.shape[1]
            y = getattr(self, f"{split}_labels")
            if y is not None and (y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],)):
                raise DataError(
                    f"{self.name}: {split}_labels must be int64 of shape ({x.shape[0]},), "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
        if self.image_shape is not None and int(np.prod(self.image_shape)) != dim:
            raise DataError(
                f"{self.name}: image_shape {self.image_shape} does not hold {dim} values per row; "
                "pass the shape of one image or None"
            )

    @property
    def input_dim(self) -> int:
        """D, the number of values in one data point."""
        return int(self.train.shape[1])

    @cached_property
    def is_binary(self) -> bool:
        """Whether every value of every split is exactly 0 or 1 (what a Bernoulli likelihood needs)."""
        return all(bool(((x == 0) | (x == 1)).all()) for x in self._present_splits().values())

    def split(self, name: str) -> torch.Tensor:
        """The ``[N, D]`` tensor of the split called ``name`` ("train", "valid" or "test")."""
        splits = self._present_splits()
        if name not in splits:
            raise DataError(f"{self.name} has no split {name!r}; choose one of: {', '.join(splits)}")
        return splits[name]

    def labels(self, name: str) -> torch.Tensor | None:
        """The int64 labels of the split called ``name``, or None when the data set has none."""
        self.split(name)  # the same error for a split that does not exist
        return getattr(self, f"{name}_labels")

    def _present_splits(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, s) for s in SPLITS if getattr(self, s) is not None}


DATASETS: Registry[Callable[..., Dataset]] = Registry("data set")


def default_data_dir() -> Path:
    """Where downloads are cached: ``$PYRO_VAE_DATA`` if set, else ``~/.cache/pyro_vae``."""
    env = os.environ.get("PYRO_VAE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pyro_vae"


def load_dataset(
    name_or_path: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    sha256: str | None = None,
) -> Dataset:
    """Load a registered data set by name, or a user's ``.npy`` / ``.npz`` file by path.

    ``data_dir`` is where the standard files are looked for (torchvision's
    layout; default :func:`default_data_dir`); it is only read. With
    ``download=True`` missing files are fetched into :func:`default_data_dir`.

    A user's file is read once; the Dataset keeps its absolute path
    (``source``) and the SHA-256 of the bytes it was parsed from (``sha256``).
    Given ``sha256`` (the digest a run was trained on), a file whose bytes
    have another digest is refused with a DataError naming both.
    """
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name_or_path in DATASETS:
        return DATASETS.get(name_or_path)(data_dir=root, download=download)
    path = Path(name_or_path).expanduser()
    if path.suffix in (".npy", ".npz") or path.is_file():
        return _load_user_file(path, sha256=sha256)
    raise DataError(
        f"unknown data set {name_or_path!r}; choose one of: {', '.join(DATASETS.names())}, "
        "or pass a path to a .npy / .npz file"
    )


def hold_out(dataset: Dataset, size: int | float) -> Dataset:
    """``dataset`` with ``size`` of its training points moved to a ``valid`` split, the same on every machine.

    ``size`` is a number of points (1 to N - 1) or a fraction in (0, 1) of the
    N training points (rounded, at least 1). The points are the first of a
    fixed permutation (numpy ``default_rng(SPLIT_SEED)``), so train and valid
    never share a point and a run scored later gets back the same split; both
    keep the data set's order. A data set with its own ``valid`` split
    (binarized-mnist) is refused: its benchmark numbers use that split.
    """
    if dataset.valid is not None:
        raise DataError(
            f"{dataset.name} has its own valid split of {dataset.valid.shape[0]} points; use it (drop "
            "--validation) so the numbers compare with the published ones"
        )
    n = dataset.train.shape[0]
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise DataError(f"the validation size must be a number of points or a fraction, got {size!r}")
    if isinstance(size, float):
        if not 0 < size < 1:
            raise DataError(f"a validation fraction must lie in (0, 1), got {size!r}")
        count = max(1, round(size * n))
    else:
        count = size
    if not 1 <= count < n:
        raise DataError(
            f"cannot hold out {count} validation points of {dataset.name}'s {n} training points; "
            f"hold out 1 to {n - 1} (or a fraction in (0, 1))"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    valid_rows = torch.from_numpy(np.sort(order[:count]))
    train_rows = torch.from_numpy(np.sort(order[count:]))
    labels = dataset.train_labels
    return dataclasses.replace(
        dataset,
        train=dataset.train[train_rows],
        valid=dataset.train[valid_rows],
        train_labels=None if labels is None else labels[train_rows],
        valid_labels=None if labels is None else labels[valid_rows],
    )


# ---------------------------------------------------------------------------
# Readers


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {_one_line(e)}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or ``.gz``) of unsigned bytes into a uint8 array of its stored shape.

    The header is big-endian: two zero bytes, a type byte (0x08 = uint8, the
    only type the MNIST files use), the number of dimensions, then one uint32
    per dimension, then the data; magic 0x00000803 is an image file
    ``[N, rows, cols]``, 0x00000801 a label file ``[N]``.

    References:
        LeCun, Cortes, Burges. The MNIST database of handwritten digits.
        http://yann.lecun.com/exdb/mnist/ ("file formats" section)
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(data)} bytes); check the file is complete")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{path}: not an IDX file (magic {data[:4].hex()} does not start with 0000); "
            "check the file name and that it is unpacked or ends in .gz"
        )
    if data[2] != 0x08:
        raise DataError(f"{path}: IDX type 0x{data[2]:02x} is not supported; only unsigned bytes (0x08) are")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header for {ndim} dimensions is incomplete; the file is truncated")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    # Python ints, so a garbage header cannot overflow the product.
    expected = 1
    for n in shape:
        expected *= n
    if len(data) - header != expected:
        raise DataError(
            f"{path}: the IDX header promises shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes of data; the file is truncated or corrupt"
        )
    # A copy, so the caller gets a writable array rather than a view of immutable bytes.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


# Each byte of an .amat file is a value (0 or 1), a separator, or an error.
_BAD, _BLANK, _DIGIT = 0, 1, 2
_AMAT_KIND = np.full(256, _BAD, dtype=np.uint8)
_AMAT_KIND[[ord(c) for c in " \t\r\n"]] = _BLANK
_AMAT_KIND[[ord("0"), ord("1")]] = _DIGIT


def read_amat(path: str | os.PathLike) -> np.ndarray:
    """Read a ``.amat`` (or ``.amat.gz``) text file of 0/1 values into a float32 ``[N, D]`` array.

    One data point per line, values separated by whitespace; the binarized
    MNIST files have D = 784. Every value is one character, so the text is
    parsed as a byte array (about a second for the 50k-line training file,
    where ``np.loadtxt`` takes a minute). Blank lines are skipped.

    References:
        Larochelle, Murray (2011). The neural autoregressive distribution
        estimator. AISTATS.
    """
    path = Path(path)
    chars = np.frombuffer(_read_bytes(path), dtype=np.uint8)  # (n_bytes,)
    kind = _AMAT_KIND[chars]
    is_digit = kind == _DIGIT
    # A value other than a lone 0 or 1 shows as a byte of another kind or two digits in a row ("10").
    bad = kind == _BAD
    bad[:-1] |= is_digit[:-1] & is_digit[1:]
    if bad.any():
        line = int(np.count_nonzero(chars[: int(np.argmax(bad))] == ord("\n")))  # 0-based
        text = bytes(chars).split(b"\n")[line]
        token = next((t for t in text.split() if t not in (b"0", b"1")), text.strip())
        raise DataError(
            f"{path}, line {line + 1}: value {token.decode(errors='replace')[:20]!r} is not 0 or 1; "
            "expected one image per line of whitespace-separated 0/1 values"
        )
    starts = np.concatenate([[0], np.flatnonzero(chars == ord("\n")) + 1])
    starts = starts[starts < len(chars)]
    # Values per line; reduceat over uint8 into uint32 is ~20x faster than a cumsum of the whole file.
    per_line = np.add.reduceat(is_digit.view(np.uint8), starts, dtype=np.uint32) if len(starts) else starts
    lines = np.flatnonzero(per_line)  # (n_rows,) 0-based line numbers of the non-blank lines
    if len(lines) == 0:
        raise DataError(f"{path}: no data rows; expected one image per line of 0/1 values")
    width = int(per_line[lines[0]])
    ragged = lines[per_line[lines] != width]
    if len(ragged):
        raise DataError(
            f"{path}, line {int(ragged[0]) + 1}: {int(per_line[ragged[0]])} values where line "
            f"{int(lines[0]) + 1} has {width}; every row needs the same number of values"
        )
    return (chars[is_digit] == ord("1")).astype(np.float32).reshape(len(lines), width)


def binarize_static(x: torch.Tensor, *, seed: int) -> torch.Tensor:
    """One fixed Bernoulli draw per value: ``b ~ Bernoulli(x)``, the same for the same seed.

    ``x`` holds probabilities in ``[0, 1]`` (grey pixel intensities). The draw
    uses its own ``torch.Generator``, so the global RNG is left untouched and
    a test set binarized once stays the same across runs.

    References:
        Salakhutdinov, Murray (2008). On the quantitative analysis of deep
        belief networks. ICML.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DataError(
            f"binarize_static needs a floating-point tensor of probabilities, got "
            f"{getattr(x, 'dtype', type(x).__name__)}; scale images to [0, 1] first (e.g. x.float() / 255)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"binarize_static needs an integer seed, got {seed!r}")
    outside = int((~((x >= 0) & (x <= 1))).sum())  # NaN counts as outside
    if outside:
        raise DataError(
            f"binarize_static: {outside} values lie outside [0, 1] (or are NaN); pass probabilities"
        )
    generator = torch.Generator(device=x.device).manual_seed(seed)
    # u < p with u ~ U[0, 1) is 1 with probability p, exactly 0 for p = 0 and 1 for p = 1.
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (u < x).to(x.dtype)


# ---------------------------------------------------------------------------
# Registered data sets


def _fixed_split(n: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices of a random split that is the same on every machine."""
    # PCG64 (numpy's default_rng) gives the same stream on every platform.
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = min(max(1, round(test_fraction * n)), n - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


@DATASETS.register("digits")
def load_digits(*, data_dir: Path, download: bool) -> Dataset:
    """8x8 handwritten digits bundled with scikit-learn (1,797 images, grey in [0, 1]); no files needed.

    A fixed 80/20 train/test split (numpy ``default_rng(0)``). ``data_dir`` and
    ``download`` are unused: the data ship inside scikit-learn.

    References:
        Alpaydin, Kaynak (1998). Optical recognition of handwritten digits.
        UCI Machine Learning Repository.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)  # (1797, 64), grey levels 0..16
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = _fixed_split(len(x), 0.2)
    return Dataset(
        name="digits",
        train=x[train],
        test=x[test],
        image_shape=(8, 8),
        train_labels=y[train],
        test_labels=y[test],
    )


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _find(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or its unpacked twin ``folder/stem``, whichever exists."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(files: dict[str, Path | None]) -> dict[str, Path] | None:
    """``files`` if every one was found, else None."""
    return {s: p for s, p in files.items() if p is not None} if all(files.values()) else None


def _locate(
    name: str,
    candidates: Sequence[Path],
    stems: Sequence[str],
    *,
    download: bool,
    fetch: Callable[[], Path],
    layout: str,
) -> dict[str, Path]:
    """The files ``stems`` from the first folder of ``candidates`` that holds them all.

    Falls back to the download cache (fetching into it when ``download``) and
    otherwise raises a one-line DataError naming what is missing and where.
    """
    found = [{s: _find(c, s) for s in stems} for c in candidates]
    for files in found:
        if (complete := _complete(files)) is not None:
            return complete
    reason = "download=False"
    if download:
        try:
            folder = fetch()
        except Exception as e:  # offline, server gone, bad checksum: the message below covers all
            reason = f"download failed: {_one_line(e)}"
        else:
            if (complete := _complete({s: _find(folder, s) for s in stems})) is not None:
                return complete
            reason = f"download left {folder} incomplete"
    # Name the missing files of the folder that came closest, so a half-copied folder is obvious.
    best = max(range(len(candidates)), key=lambda i: sum(p is not None for p in found[i].values()))
    missing = ", ".join(s + ".gz" for s, p in found[best].items() if p is None)
    others = [str(c) for i, c in enumerate(candidates) if i != best]
    also = f" (also searched {', '.join(others)})" if others else ""
    raise DataError(
        f"{name}: missing {missing} in {candidates[best]}{also} ({reason}); "
        f"pass --data-dir DIR with {layout} or go online"
    )


def _load_idx_dataset(
    name: str, folder: str, torchvision_class: str, *, data_dir: Path, download: bool
) -> Dataset:
    """MNIST-like data from IDX files in torchvision's layout ``<data_dir>/<folder>/raw``."""
    # data_dir may be the root, the <folder> folder itself or its raw/ folder; the folder names are
    # required because MNIST and Fashion-MNIST use the same file names.
    candidates = [data_dir / folder / "raw"]
    if data_dir.name == folder:
        candidates.append(data_dir / "raw")
    if data_dir.name == "raw" and data_dir.parent.name == folder:
        candidates.append(data_dir)
    cache = default_data_dir()

    def fetch() -> Path:
        cached = cache / folder / "raw"
        if not all(_find(cached, s) for s in _IDX_FILES):
            import torchvision.datasets

            cache.mkdir(parents=True, exist_ok=True)
            getattr(torchvision.datasets, torchvision_class)(root=str(cache), download=True)
        return cached

    files = _locate(
        name,
        candidates,
        _IDX_FILES,
        download=download,
        fetch=fetch,
        layout=f"DIR/{folder}/raw/*.gz (torchvision's layout)",
    )
    arrays = {stem: read_idx(path) for stem, path in files.items()}
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise DataError(
                f"{name}: {split} images {images.shape} and labels {labels.shape} in "
                f"{files[f'{prefix}-images-idx3-ubyte'].parent} do not match [N, 28, 28] and [N]; "
                "check the files are the originals"
            )
        # (N, 28, 28) uint8 -> (N, 784) float32 in [0, 1]
        splits[split] = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
        splits[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    return Dataset(name=name, image_shape=(28, 28), **splits)


@DATASETS.register("mnist")
def load_mnist(*, data_dir: Path, download: bool) -> Dataset:
    """MNIST handwritten digits, 60k train / 10k test, 28x28 grey in [0, 1], labels 0-9.

    Read from ``<data_dir>/MNIST/raw/*-ubyte[.gz]`` (torchvision's layout).

    References:
        LeCun, Bottou, Bengio, Haffner (1998). Gradient-based learning applied
        to document recognition. Proc. IEEE 86(11).
    """
    return _load_idx_dataset("mnist", "MNIST", "MNIST", data_dir=data_dir, download=download)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(*, data_dir: Path, download: bool) -> Dataset:
    """Fashion-MNIST clothing images, 60k train / 10k test, 28x28 grey in [0, 1], labels 0-9.

    Read from ``<data_dir>/FashionMNIST/raw/*-ubyte[.gz]`` (torchvision's layout).

    References:
        Xiao, Rasul, Vollgraf (2017). Fashion-MNIST: a novel image dataset for
        benchmarking machine learning algorithms. arXiv:1708.07747
    """
    return _load_idx_dataset(
        "fashion-mnist", "FashionMNIST", "FashionMNIST", data_dir=data_dir, download=download
    )


_AMAT_FILES = tuple(f"binarized_mnist_{split}.amat" for split in ("train", "valid", "test"))


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` to ``target`` through a temporary file, so an interrupted download leaves nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            try:
                shutil.copyfileobj(response, tmp)
            except BaseException:
                os.unlink(tmp.name)
                raise
    os.replace(tmp.name, target)


@DATASETS.register("binarized-mnist")
def load_binarized_mnist(*, data_dir: Path, download: bool) -> Dataset:
    """Statically binarized MNIST of Larochelle & Murray, 50k train / 10k valid / 10k test, no labels.

    Read from ``binarized_mnist_{train,valid,test}.amat[.gz]`` in
    ``<data_dir>/BinarizedMNIST`` or ``<data_dir>``; the fixed binarization
    behind the "static MNIST" log-likelihood tables.

    References:
        Larochelle, Murray (2011). The neural autoregressive distribution
        estimator. AISTATS.
    """
    candidates = list(dict.fromkeys([data_dir / "BinarizedMNIST", data_dir]))
    cached = default_data_dir() / "BinarizedMNIST"

    def fetch() -> Path:
        for stem in _AMAT_FILES:
            if not _find(cached, stem):
                _download(BINARIZED_MNIST_URL + stem, cached / stem)
        return cached

    files = _locate(
        "binarized-mnist",
        candidates,
        _AMAT_FILES,
        download=download,
        fetch=fetch,
        layout="DIR/BinarizedMNIST/binarized_mnist_{train,valid,test}.amat[.gz]",
    )
    splits = {}
    for split, stem in zip(("train", "valid", "test"), _AMAT_FILES, strict=True):
        x = read_amat(files[stem])
        if x.shape[1] != 28 * 28:
            raise DataError(f"{files[stem]}: rows of {x.shape[1]} values, expected 784 (28x28 images)")
        splits[split] = torch.from_numpy(x)
    return Dataset(name="binarized-mnist", image_shape=(28, 28), **splits)


# ---------------------------------------------------------------------------
# User files

_NPZ_DATA_KEYS = ("train", "valid", "test")
_NPZ_KEYS = frozenset(_NPZ_DATA_KEYS + tuple(f"{k}_labels" for k in _NPZ_DATA_KEYS))


def _as_rows(array: np.ndarray, where: str) -> np.ndarray:
    """A numeric ``[N, ...]`` array as finite float32 ``[N, D]``; DataError saying what is wrong otherwise."""
    if array.dtype != np.bool_ and not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise DataError(f"{where}: dtype {array.dtype} is not numeric; save real-valued data")
    if array.ndim < 2:
        raise DataError(
            f"{where}: shape {array.shape} has no data axis; expected [N, D] or [N, H, W] with one row "
            "per data point (reshape scalars to [N, 1])"
        )
    if array.size == 0:
        raise DataError(f"{where}: the array is empty (shape {array.shape}); save at least 2 rows of data")
    rows = array.reshape(len(array), -1)  # [N, D] in the file's own dtype
    # NaN and inf are looked for in the file's values, before float32 could turn a large finite one into inf.
    for count, kind in ((np.isnan(rows), "NaN"), (np.isinf(rows), "infinite")):
        if count.any():
            row = int(np.flatnonzero(count.any(axis=1))[0])
            raise DataError(
                f"{int(count.sum())} {kind} values in {where} (first in row {row}); "
                "remove or impute them before training"
            )
    if np.issubdtype(rows.dtype, np.floating):
        big = np.abs(rows) > np.finfo(np.float32).max
        if big.any():
            row = int(np.flatnonzero(big.any(axis=1))[0])
            raise DataError(
                f"{int(big.sum())} values in {where} are finite but beyond float32's range (|x| > 3.4e38, "
                f"first in row {row}); rescale the data"
            )
    x = rows.astype(np.float32)
    return x


def _as_labels(array: np.ndarray, n: int, where: str) -> torch.Tensor:
    if not np.issubdtype(array.dtype, np.integer) or array.shape != (n,):
        raise DataError(f"{where}: labels must be integers of shape ({n},), got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))


def _image_shape(array: np.ndarray) -> tuple[int, ...] | None:
    return tuple(int(n) for n in array.shape[1:]) if array.ndim == 3 else None


def _split_single(name: str, array: np.ndarray, where: str) -> Dataset:
    x = _as_rows(array, where)
    if len(x) < 2:
        raise DataError(f"{where}: {len(x)} row; at least 2 are needed to split into train and test")
    train, test = _fixed_split(len(x), 0.1)
    return Dataset(
        name=name,
        train=torch.from_numpy(x[train]),
        test=torch.from_numpy(x[test]),
        image_shape=_image_shape(array),
    )


def _load_user_file(path: Path, *, sha256: str | None = None) -> Dataset:
    """A user's ``.npy`` (one array, split 90/10) or ``.npz`` (``train``/``test`` keys, or one array).

    The bytes are read once, then hashed and parsed, so the digest kept is
    that of exactly the data loaded.
    """
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; pass a registered data set name or an existing .npy / .npz file"
        )
    path = path.resolve()
    try:
        content = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {_one_line(e)}") from None
    digest = hashlib.sha256(content).hexdigest()
    if sha256 is not None and digest != sha256:
        raise DataError(
            f"{path} has changed since the run was trained on it: its SHA-256 was {sha256} and is now "
            f"{digest}; put the original file back, or train a new run on this one"
        )
    dataset = _parse_user_file(path, io.BytesIO(content))
    return dataclasses.replace(dataset, source=path, sha256=digest)


def _parse_user_file(path: Path, content: io.BytesIO) -> Dataset:
    try:
        loaded = np.load(content, allow_pickle=False)
    except Exception as e:  # numpy raises many kinds on a bad file
        raise DataError(f"cannot read {path} as a numpy .npy / .npz file: {_one_line(e)}") from None
    name = path.stem
    if isinstance(loaded, np.ndarray):
        return _split_single(name, loaded, str(path))
    with loaded:
        try:
            arrays = {key: loaded[key] for key in loaded.files}
        except Exception as e:
            raise DataError(f"cannot read {path}: {_one_line(e)}") from None
    if len(arrays) == 1:
        ((key, array),) = arrays.items()
        return _split_single(name, array, f"{path}[{key!r}]")
    keys = set(arrays)
    if (
        not {"train", "test"} <= keys
        or not keys <= _NPZ_KEYS
        or ("valid_labels" in keys and "valid" not in keys)
    ):
        raise DataError(
            f"{path}: keys {sorted(keys)} are not a known layout; save 'train' and 'test' (optionally "
            "'valid' and '<split>_labels'), or a single array to split 90/10"
        )
    fields: dict[str, torch.Tensor] = {}
    for split in _NPZ_DATA_KEYS:
        if split not in arrays:
            continue
        x = _as_rows(arrays[split], split)
        if arrays[split].shape[1:] != arrays["train"].shape[1:]:
            raise DataError(
                f"{path}: {split} rows have shape {arrays[split].shape[1:]} but train rows have "
                f"{arrays['train'].shape[1:]}; every split needs the same shape"
            )
        fields[split] = torch.from_numpy(x)
        if f"{split}_labels" in arrays:
            fields[f"{split}_labels"] = _as_labels(
                arrays[f"{split}_labels"], len(x), f"{path}[{split}_labels]"
            )
    return Dataset(name=name, image_shape=_image_shape(arrays["train"]), **fields)


def _one_line(error: BaseException) -> str:
    """An exception as one short line, for messages that must stay one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
