import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from mirrorprune import data
from mirrorprune.data import CIFAR_CLASSES, DataNotFoundError, ImageData, load, search_dirs


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRRORPRUNE_CACHE", str(tmp_path / "cache"))


def _jpeg_archive(path, per_class=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tf:
        for split in ("train", "test"):
            for c in CIFAR_CLASSES:
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                        buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{c}/{i:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tf.addfile(info, io.BytesIO(buf.getvalue()))


def test_cifar_jpeg_stand_in_and_cache(tmp_path):
    pytest.importorskip("PIL")
    _jpeg_archive(tmp_path / "cifar10-jpeg.tar.gz")
    d = load("cifar10", "train", tmp_path)
    assert d.x.shape == (20, 3, 32, 32) and d.x.dtype == torch.uint8
    # classes interleaved, so that the validation split (the last 10%) holds every class
    assert d.y.tolist() == [c for _ in range(2) for c in range(10)] and d.augment
    from mirrorprune.experiments.common import split_validation

    _, val = split_validation(d, 0.5)
    assert sorted(val.y.tolist()) == list(range(10))
    grouped = ImageData(d.name, d.x, d.y.sort().values, d.mean, d.std)
    with pytest.raises(ValueError, match="ordered by class"):
        split_validation(grouped, 0.5)
    assert list((tmp_path / "cache").glob("*.npz"))  # decoded once, cached
    again = load("cifar10", "train", tmp_path)
    assert torch.equal(again.x, d.x)
    t = load("cifar10", "test", tmp_path)
    assert len(t) == 20 and not t.augment


def test_cifar_python_stand_in(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                         b"labels": [0, 1, 2, 3]}, f)
    d = load("cifar10", "train", tmp_path)
    assert d.x.shape == (20, 3, 32, 32) and len(load("cifar10", "test", folder)) == 4


def test_mnist_and_fashion_stand_ins(tmp_path):
    x = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.array([1, 2, 3]), x_test=x[:1],
             y_test=np.array([7]))
    d = load("mnist", "train", tmp_path)
    assert d.x.shape == (3, 1, 28, 28) and d.y.tolist() == [1, 2, 3]

    def idx(path, arr):
        head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        with gzip.open(path, "wb") as f:
            f.write(head + arr.tobytes())

    idx(tmp_path / "t10k-images-idx3-ubyte.gz", x)
    idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 5, 6], dtype=np.uint8))
    f = load("fashion-mnist", "test", tmp_path)
    assert torch.equal(f.x[:, 0], torch.from_numpy(x)) and f.y.tolist() == [4, 5, 6]


def test_missing_and_corrupt_data_say_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar10-jpeg.tar.gz.*cifar-10-batches-py"):
        load("cifar10", "train", tmp_path)
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load("fashion-mnist", "train", tmp_path)
    (tmp_path / "cifar10-jpeg.tar.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load("cifar10", "train", tmp_path)
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load("mnist", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load("imagenet")


def test_batches_normalize_augment_and_replay():
    d = load("digits", "train")
    assert d.x.shape[1:] == (1, 8, 8)
    xb, yb = next(d.batches(64, shuffle=True, seed=3))
    assert xb.dtype == torch.float32 and xb.shape == (64, 1, 8, 8)
    xb2, _ = next(d.batches(64, shuffle=True, seed=3))
    assert torch.equal(xb, xb2)  # an epoch replays exactly from its seed
    img = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    # image 0: shifted down 1 and right 2 (zero padding enters at the top); image 1: flipped
    out = data.crop_flip(img, torch.tensor([[1, 2], [2, 2], [0, 1]]), pad=2)
    assert torch.equal(out[0, :, 1:, :], img[0, :, :5, :]) and (out[0, :, 0] == 0).all()
    assert torch.equal(out[1], img[1].flip(-1))
    sub = d.subset(100)
    assert len(sub) == 100 and torch.bincount(sub.y).tolist() == [10] * 10


@pytest.mark.parametrize("name, n_train, shape", [
    ("cifar10", 50_000, (3, 32, 32)), ("mnist", 60_000, (1, 28, 28)),
    ("fashion-mnist", 60_000, (1, 28, 28))])
def test_real_files_when_present(name, n_train, shape):
    try:
        d = load(name, "test")
    except DataNotFoundError:
        pytest.skip(f"{name} not found in {search_dirs()}")
    assert len(d) == 10_000 and d.shape == shape
    counts = torch.bincount(d.y).tolist()
    assert len(counts) == 10 and sum(counts) == 10_000
    if name != "mnist":  # MNIST's test classes are not balanced
        assert counts == [1000] * 10
    mean = d.x.float().mean() / 255
    assert abs(float(mean) - sum(d.mean) / len(d.mean)) < 0.02
