"""Datasets: digits, readers of the real file formats, their error reports, downloading, preprocessing."""

import functools
import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxcnn import data


def test_digits_split_is_fixed_and_stratified():
    ds = data.load("digits")
    assert ds.x_train.shape == (1347, 8, 8, 1) and ds.x_test.shape == (450, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.x_train.min() >= 0 and ds.x_train.max() <= 1
    assert ds.y_train.dtype == np.int32 and set(np.unique(ds.y_test)) == set(range(10))
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # stratified: about 45 per class
    np.testing.assert_array_equal(data.load("digits").x_test, ds.x_test)


def test_validation_split_and_mean_image():
    x, y = np.arange(200, dtype=np.float32).reshape(100, 2, 1, 1), np.arange(100) % 10
    xf, _, xv, _ = data.split(x, y, 0.2, seed=1)
    assert len(xv) == 20 and len(xf) == 80
    assert sorted(np.concatenate([xf, xv])[:, 0, 0, 0].tolist()) == x[:, 0, 0, 0].tolist()
    again = data.split(x, y, 0.2, seed=1)
    other = data.split(x, y, 0.2, seed=2)
    np.testing.assert_array_equal(again[2], xv)
    assert not np.array_equal(other[2], xv)
    np.testing.assert_allclose(data.mean_image(xf), xf.mean(axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"validation fraction must be in \[0, 1\)"):
        data.split(x, y, 1.0, seed=0)


# Writers of the real formats, for small fake datasets.

def idx_bytes(array: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(folder: Path, n_train=12, n_test=5, seed=0, gz=True) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    ds = data.load("mnist", tmp_path)
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["train-images-idx3-ubyte"] / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_missing_files_are_listed_with_their_addresses(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load("fashion-mnist", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz") in message
    assert "fashion-mnist.s3-website" in message and "--download" in message


@pytest.mark.parametrize("corrupt,match", [
    (lambda raw: b"\x00\x00\x09\x03" + raw[4:], r"not an IDX file of unsigned bytes \(magic 00000903"),
    (lambda raw: raw[:-10], r"header promises shape \(12, 28, 28\)"),
])
def test_corrupt_idx_is_reported_with_the_file(tmp_path, corrupt, match):
    write_mnist(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(data.DataError, match=match) as err:
        data.load("mnist", tmp_path)
    assert str(path) in str(err.value)


def test_truncated_gzip_and_bad_labels_are_reported(tmp_path):
    write_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(data.DataError, match=r"unreadable .* truncated"):
        data.load("mnist", tmp_path)
    write_mnist(tmp_path / "mnist")
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.array([1, 2, 10, 3, 4], np.uint8))))
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz: labels must lie in 0..9, got 1..10"):
        data.load("mnist", tmp_path)
    labels.write_bytes(gzip.compress(idx_bytes(np.array([1, 2, 3], np.uint8))))
    with pytest.raises(data.DataError, match=r"expected 5 labels for t10k-images-idx3-ubyte.gz, got shape \(3,\)"):
        data.load("mnist", tmp_path)


def cifar_batch(n, seed) -> tuple[bytes, np.ndarray, list]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # CIFAR rows: the R, G and B planes, row-major
    batch = {b"batch_label": b"batch", b"labels": labels, b"data": rows, b"filenames": [b"x.png"] * n}
    return pickle.dumps(batch, protocol=2), images, labels


@pytest.mark.parametrize("layout", ["archive", "extracted"])
def test_cifar10_python_batches(tmp_path, layout):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    batches = {name: cifar_batch(3, seed) for seed, name in enumerate(data.CIFAR_BATCHES)}
    if layout == "archive":
        with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, (raw, _, _) in batches.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        (folder / "cifar-10-batches-py").mkdir()
        for name, (raw, _, _) in batches.items():
            (folder / "cifar-10-batches-py" / name).write_bytes(raw)
    ds = data.load("cifar10", tmp_path)
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.x_train[3:6], batches["data_batch_2"][1] / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][2])


@pytest.mark.parametrize("field,value,match", [
    (b"labels", [0, 1, 0.7], r"labels must be whole numbers, got 0.7"),
    (b"labels", [0, float("nan"), 2], r"labels must be whole numbers, got nan"),
    (b"data", "300", r"pixel values must lie in 0..255, got 0..300"),
    (b"data", "nan", r"pixel values must be whole numbers, got nan"),
])
def test_cifar_nan_fractions_and_out_of_range_pixels_are_refused(tmp_path, field, value, match):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for seed, name in enumerate(data.CIFAR_BATCHES):
        raw = cifar_batch(3, seed)[0]
        if name == "data_batch_2":
            batch = pickle.loads(raw)
            if field == b"data":
                rows = batch[b"data"].astype(np.float64)
                rows[1, 5] = float(value)
                rows[0, 0] = 0
                batch[b"data"] = rows
            else:
                batch[b"labels"] = value
            raw = pickle.dumps(batch, protocol=2)
        (folder / name).write_bytes(raw)
    with pytest.raises(data.DataError, match=rf"data_batch_2: {match}"):
        data.load("cifar10", tmp_path)


def test_a_cifar_archive_member_that_is_not_a_file_is_refused(tmp_path):
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in data.CIFAR_BATCHES:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.type = tarfile.FIFOTYPE if name == "data_batch_1" else tarfile.DIRTYPE
            tar.addfile(info)
    with pytest.raises(data.DataError, match=r"its member cifar-10-batches-py/data_batch_1 is not a regular file"):
        data.load("cifar10", tmp_path)


def test_cifar_pickles_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    for name in data.CIFAR_BATCHES:
        (tmp_path / "cifar10" / "cifar-10-batches-py" / name).write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(data.DataError, match=r"data_batch_1: not a CIFAR-10 python batch .*refusing to load "
                                             r"builtins.print"):
        data.load("cifar10", tmp_path)


def test_svhn_mat_files(tmp_path):
    import scipy.io

    rng = np.random.default_rng(0)
    (tmp_path / "svhn").mkdir()
    for name, n in [("train_32x32.mat", 4), ("test_32x32.mat", 3)]:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [9], [5]][:n], np.uint8)
        scipy.io.savemat(tmp_path / "svhn" / name, {"X": x, "y": y})
    ds = data.load("svhn", tmp_path)
    assert ds.x_train.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 9, 5])  # label 10 is the digit 0
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 1), np.uint8),
                                                           "y": np.array([[11]], np.uint8)})
    with pytest.raises(data.DataError, match=r"test_32x32.mat: SVHN labels must lie in 1..10"):
        data.load("svhn", tmp_path)
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": np.full((32, 32, 3, 1), 300.0),
                                                           "y": np.array([[1]], np.uint8)})
    with pytest.raises(data.DataError, match=r"test_32x32.mat: pixel values must lie in 0..255, got 300..300"):
        data.load("svhn", tmp_path)
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 1), np.uint8),
                                                           "y": np.array([[np.nan]])})
    with pytest.raises(data.DataError, match=r"test_32x32.mat: labels must be whole numbers, got nan"):
        data.load("svhn", tmp_path)


# Downloading, against a local HTTP server.

@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def remote_for(root: Path, url: str, name: str, content: bytes, sha=None) -> data.Remote:
    (root / name).write_bytes(content)
    return data.Remote(name, url + name, len(content), sha or hashlib.sha256(content).hexdigest())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_a_whole_dataset_then_load_it(server, tmp_path):
    root, url = server
    write_mnist(root / "src")
    files = tuple(remote_for(root, url, p.name, p.read_bytes()) for p in sorted((root / "src").iterdir()))
    sources = {"mnist": (files, data.SOURCES["mnist"][1])}
    ds = data.load("mnist", tmp_path / "data", download=True, progress=False, sources=sources)
    assert ds.x_train.shape == (12, 28, 28, 1)
    assert leftovers(tmp_path / "data" / "mnist") == sorted(f.name for f in files)  # no temporary files
    data.fetch(files, tmp_path / "data" / "mnist", progress=False)  # present and verified: nothing to do


def test_wrong_checksum_leaves_nothing_behind(server, tmp_path):
    root, url = server
    remote = remote_for(root, url, "f.bin", b"payload", sha="0" * 64)
    with pytest.raises(data.DataError, match=r"f.bin: got 7 bytes with SHA-256 .* nothing was saved"):
        data.fetch((remote,), tmp_path / "d", progress=False)
    assert leftovers(tmp_path / "d") == []


def test_unreachable_server_and_missing_file(server, tmp_path):
    _, url = server
    missing = data.Remote("nope.bin", url + "nope.bin", 1, "0" * 64)
    with pytest.raises(data.DataError, match=r"could not download .*nope.bin .*404.* place the file at"):
        data.fetch((missing,), tmp_path / "d", progress=False)
    closed = data.Remote("x.bin", "http://127.0.0.1:9/x.bin", 1, "0" * 64)
    with pytest.raises(data.DataError, match="could not download"):
        data.fetch((closed,), tmp_path / "d", progress=False, timeout=5)
    assert leftovers(tmp_path / "d") == []


def test_existing_file_with_other_content_is_never_overwritten(server, tmp_path):
    root, url = server
    remote = remote_for(root, url, "f.bin", b"official")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(b"mine")
    with pytest.raises(data.DataError, match=r"exists but its SHA-256 .* move it away"):
        data.fetch((remote,), tmp_path / "d", progress=False)
    assert (tmp_path / "d" / "f.bin").read_bytes() == b"mine"
