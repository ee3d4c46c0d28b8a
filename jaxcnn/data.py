"""Datasets as NHWC float32 images in [0, 1] with int32 labels, and simpleNN's preprocessing.

``digits`` (scikit-learn's bundled 8x8 handwritten digits) needs no files and no network. MNIST, Fashion-MNIST,
CIFAR-10 and SVHN are read from their standard files under ``data_dir/<name>/``:

    mnist, fashion-mnist   train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz  t10k-images-...  t10k-labels-...
    cifar10                cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)
    svhn                   train_32x32.mat  test_32x32.mat

``fetch`` downloads them from their usual addresses, checking size and SHA-256 before an atomic rename; a
missing file is reported with the paths looked at and where to get it. Readers check magic numbers, shapes and
label ranges and name the file at fault.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import struct
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from jaxcnn._io import atomic_path


class DataError(ValueError):
    """A dataset file is present but unreadable, corrupt, or not what it claims to be."""


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not in ``data_dir``."""


@dataclass(frozen=True)
class Remote:
    """One file of a dataset: its name under ``data_dir/<dataset>/``, where to get it, and its size and hash."""

    name: str
    url: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Dataset:
    """Train and test images [N, H, W, C] float32 in [0, 1] and labels [N] int32."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int = 10

    def __post_init__(self):
        """A user's own arrays are checked here: images [N, H, W, C] of one size, one integer label in
        [0, classes) per image."""
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if getattr(x, "ndim", None) != 4:
                raise ValueError(f"{self.name}: x_{split} must be images [N, H, W, C], got shape "
                                 f"{getattr(x, 'shape', type(x).__name__)}")
            if getattr(y, "shape", None) != (x.shape[0],) or not np.issubdtype(np.asarray(y).dtype, np.integer):
                raise ValueError(f"{self.name}: y_{split} must be {x.shape[0]} integer labels (one per image), got "
                                 f"{getattr(y, 'dtype', type(y).__name__)} of shape {getattr(y, 'shape', None)}")
            _check_labels(f"{self.name}: y_{split}", y, self.classes)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train and test images differ in size: {self.x_train.shape[1:]} and "
                             f"{self.x_test.shape[1:]}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def load(name: str, data_dir: str | os.PathLike = "data", *, download: bool = False, progress: bool = True,
         sources: dict | None = None) -> Dataset:
    """Load dataset ``name`` (see ``DATASETS``); with ``download=True`` fetch missing files first."""
    if name == "digits":
        return _digits()
    sources = SOURCES if sources is None else sources
    if name not in sources:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(['digits', *sources])}")
    files, reader = sources[name]
    folder = Path(data_dir) / name
    if download:
        fetch(files, folder, progress=progress)
    x_train, y_train, x_test, y_test = reader(folder, files)
    return Dataset(name, _scale(x_train), _labels(y_train), _scale(x_test), _labels(y_test))


def split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Hold out ``fraction`` of (x, y), chosen at random by ``seed``: returns (x_fit, y_fit, x_val, y_val)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = round(fraction * len(x))
    val, fit = np.sort(order[:n_val]), np.sort(order[n_val:])
    return x[fit], y[fit], x[val], y[val]


def mean_image(x_train: np.ndarray) -> np.ndarray:
    """simpleNN's preprocessing constant: the mean training image [H, W, C], subtracted from every input."""
    return x_train.mean(axis=0, dtype=np.float64).astype(np.float32)


# ---------------------------------------------------------------------------------------------- downloading

def fetch(files: tuple[Remote, ...], folder: Path, *, progress: bool = True, timeout: float = 60.0) -> None:
    """Download every file of ``files`` missing from ``folder``; verify size and SHA-256 before renaming it in.

    A file already present is checked and kept; one that fails the check is left alone and reported (we never
    overwrite a file we did not write). An interrupted or wrong download leaves nothing behind.
    """
    for remote in files:
        target = folder / remote.name
        if target.exists():
            digest = _sha256(target)
            if digest != remote.sha256:
                raise DataError(f"{target} exists but its SHA-256 is {digest}, not the official {remote.sha256}; "
                                f"move it away and fetch again")
            continue
        _download(remote, target, progress=progress, timeout=timeout)


def _download(remote: Remote, target: Path, *, progress: bool, timeout: float) -> None:
    from tqdm import tqdm

    request = urllib.request.Request(remote.url, headers={"User-Agent": "jaxcnn"})
    digest, received = hashlib.sha256(), 0
    try:
        with atomic_path(target) as tmp, open(tmp, "wb") as out, \
                urllib.request.urlopen(request, timeout=timeout) as response, \
                tqdm(total=remote.size, unit="B", unit_scale=True, desc=f"downloading {remote.name}",
                     disable=not progress, leave=False) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            out.flush()
            if received != remote.size or digest.hexdigest() != remote.sha256:
                raise DataError(f"{remote.url}: got {received} bytes with SHA-256 {digest.hexdigest()}, expected "
                                f"{remote.size} bytes with SHA-256 {remote.sha256}; nothing was saved")
    except (OSError, http.client.HTTPException) as err:  # URLError is an OSError; DataError passes through
        raise DataError(f"could not download {remote.url} ({err}); nothing was saved. Without internet, place "
                        f"the file at {target} yourself") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _find(folder: Path, files: tuple[Remote, ...]) -> dict[str, Path]:
    """Paths of ``files`` in ``folder`` by file name; a .gz file may also be present unzipped."""
    found, missing = {}, []
    for remote in files:
        candidates = [folder / remote.name, folder / remote.name.removesuffix(".gz")]
        path = next((p for p in candidates if p.exists()), None)
        if path:
            found[remote.name] = path
        else:
            missing.append(remote)
    if missing:
        listing = "\n".join(f"  {folder / r.name}   <- {r.url}" for r in missing)
        raise DatasetNotFoundError(f"missing dataset files in {folder}:\n{listing}\n"
                              f"Download them there (the command line does it with --download), or point "
                              f"--data-dir at the folder that holds {folder.name}/.")
    return found


# ---------------------------------------------------------------------------------------------- readers

def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format), gzip-compressed or not."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable ({err}); it may be truncated: delete it and download it again") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex() or 'empty'}, expected "
                        f"00000801 for labels or 00000803 for images)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    size = math.prod(dims)  # Python ints: numpy's product of large dims would wrap around
    if len(dims) != ndim or len(data) != header + size:
        raise DataError(f"{path}: {len(data)} bytes, but its header promises shape {dims} "
                        f"({header + size if len(dims) == ndim else '?'} bytes); it is truncated or corrupt")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_mnist(folder: Path, files) -> tuple:
    paths = _find(folder, files)
    out = []
    for split_name in ("train", "t10k"):
        images_path = paths[f"{split_name}-images-idx3-ubyte.gz"]
        labels_path = paths[f"{split_name}-labels-idx1-ubyte.gz"]
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3:
            raise DataError(f"{images_path}: expected images [N, rows, cols], got shape {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{labels_path}: expected {len(images)} labels for {images_path.name}, "
                            f"got shape {labels.shape}")
        _check_labels(labels_path, labels)
        if out and images.shape[1:] != out[0].shape[1:3]:
            raise DataError(f"{images_path}: images of {images.shape[1]}x{images.shape[2]}, but the training images "
                            f"({paths['train-images-idx3-ubyte.gz'].name}) are {out[0].shape[1]}x{out[0].shape[2]}")
        out += [images[..., None], labels]
    return tuple(out)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch cannot run code on load."""

    ALLOWED: ClassVar[frozenset] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
        ("numpy", "dtype"), ("_codecs", "encode"),  # how Python 3's protocol 2 writes bytes: a pure str -> bytes
    })

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays and lists")


def _read_cifar_batch(name: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except Exception as err:
        raise DataError(f"{name}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    data, labels = _pixels(name, data), _integers(name, "labels", labels)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{name}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    _check_labels(name, labels)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # rows of R, G, B planes -> NHWC


CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _read_cifar(folder: Path, files) -> tuple:
    extracted = folder / "cifar-10-batches-py"
    if extracted.is_dir():
        raws = {}
        for b in CIFAR_BATCHES:
            if not (extracted / b).exists():
                raise DatasetNotFoundError(f"{extracted / b} is missing from the extracted CIFAR-10 folder")
            raws[b] = (str(extracted / b), (extracted / b).read_bytes())
    else:
        archive = _find(folder, files)["cifar-10-python.tar.gz"]
        raws = {}
        try:
            with tarfile.open(archive, "r:gz") as tar:  # read members in memory: nothing is extracted to disk
                for b in CIFAR_BATCHES:
                    info = tar.getmember(f"cifar-10-batches-py/{b}")
                    if not info.isfile():  # a directory, FIFO, link or device: nothing to read
                        raise DataError(f"{archive}: its member {info.name} is not a regular file; delete the "
                                        f"archive and download it again")
                    raws[b] = (f"{archive}:{b}", tar.extractfile(info).read())
        except (tarfile.TarError, OSError, EOFError, KeyError) as err:
            raise DataError(f"{archive}: not a readable CIFAR-10 archive ({err}); delete it and download it "
                            f"again") from None
    parts = [_read_cifar_batch(*raws[b]) for b in CIFAR_BATCHES]
    train = parts[:5]
    return (np.concatenate([p[0] for p in train]), np.concatenate([p[1] for p in train]), *parts[5])


def _read_svhn(folder: Path, files) -> tuple:
    import scipy.io

    out = []
    paths = _find(folder, files)
    for path in (paths["train_32x32.mat"], paths["test_32x32.mat"]):
        try:
            mat = scipy.io.loadmat(path)
            x, y = mat["X"], mat["y"].reshape(-1)
        except Exception as err:
            raise DataError(f"{path}: not an SVHN .mat file ({type(err).__name__}: {err})") from None
        x, y = _pixels(path, x), _integers(path, "labels", y)
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
            raise DataError(f"{path}: expected X [32, 32, 3, N] and y [N, 1], got {x.shape} and {mat['y'].shape}")
        if y.min(initial=1) < 1 or y.max(initial=10) > 10:
            raise DataError(f"{path}: SVHN labels must lie in 1..10 (10 is the digit 0), got {y.min()}..{y.max()}")
        out += [np.moveaxis(x, 3, 0), y % 10]
    return tuple(out)


def _digits() -> Dataset:
    """scikit-learn's 1797 8x8 digits (0..16 intensities), split 75/25 with stratification and a fixed seed so
    that the test set never depends on the training seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, stratify=digits.target,
                                                        random_state=0)
    return Dataset("digits", x_train, _labels(y_train), x_test, _labels(y_test))


def _integers(where, what: str, values: np.ndarray) -> np.ndarray:
    """``values`` as int64, refusing NaN, Inf, fractions and non-numbers (a cast would turn 0.7 into 0 and NaN into
    -2^31 silently)."""
    values = np.asarray(values)
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind != "f":
        raise DataError(f"{where}: {what} must be integers, got dtype {values.dtype}")
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        raise DataError(f"{where}: {what} must be whole numbers, got {float(values[bad][0])} ({int(bad.sum())} such "
                        f"values)")
    return values.astype(np.int64)


def _pixels(where, values: np.ndarray) -> np.ndarray:
    """8-bit pixels as uint8, refusing values outside 0..255 (a cast would wrap 300 to 44)."""
    values = _integers(where, "pixel values", values)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise DataError(f"{where}: pixel values must lie in 0..255, got {values.min()}..{values.max()}")
    return values.astype(np.uint8)


def _check_labels(where, labels: np.ndarray, classes: int = 10) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{where}: labels must lie in 0..{classes - 1}, got {labels.min()}..{labels.max()}")


def _scale(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images, np.float32) / 255.0) if images.dtype == np.uint8 else images.astype(np.float32)


def _labels(labels) -> np.ndarray:
    return np.asarray(labels).astype(np.int32)


_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Sizes and SHA-256 as recorded by tensorflow_datasets (url_checksums/) and Keras (cifar10.load_data).
SOURCES: dict[str, tuple[tuple[Remote, ...], Callable]] = {
    "mnist": ((
        Remote("train-images-idx3-ubyte.gz", _MNIST_URL + "train-images-idx3-ubyte.gz", 9912422,
               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        Remote("train-labels-idx1-ubyte.gz", _MNIST_URL + "train-labels-idx1-ubyte.gz", 28881,
               "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        Remote("t10k-images-idx3-ubyte.gz", _MNIST_URL + "t10k-images-idx3-ubyte.gz", 1648877,
               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        Remote("t10k-labels-idx1-ubyte.gz", _MNIST_URL + "t10k-labels-idx1-ubyte.gz", 4542,
               "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ), _read_mnist),
    "fashion-mnist": ((
        Remote("train-images-idx3-ubyte.gz", _FASHION_URL + "train-images-idx3-ubyte.gz", 26421880,
               "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        Remote("train-labels-idx1-ubyte.gz", _FASHION_URL + "train-labels-idx1-ubyte.gz", 29515,
               "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        Remote("t10k-images-idx3-ubyte.gz", _FASHION_URL + "t10k-images-idx3-ubyte.gz", 4422102,
               "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        Remote("t10k-labels-idx1-ubyte.gz", _FASHION_URL + "t10k-labels-idx1-ubyte.gz", 5148,
               "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ), _read_mnist),
    "cifar10": ((
        Remote("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 170498071,
               "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
    ), _read_cifar),
    "svhn": ((
        Remote("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat", 182040794,
               "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8"),
        Remote("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat", 64275384,
               "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b"),
    ), _read_svhn),
}
DATASETS = ("digits", *SOURCES)
