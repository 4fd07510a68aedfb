"""Offline datasets as in-memory uint8 tensors, with vectorized batching and augmentation.

Sources (no downloads):
- cifar10: `cifar10-jpeg.tar.gz` (train/<class>/NNNN.jpg, test/...; JPEG-compressed, so report
  it as "CIFAR-10 (JPEG)"), or the standard python folder `cifar-10-batches-py`.
- mnist: `mnist.npz` (x_train, y_train, x_test, y_test).
- fashion-mnist: the idx `.gz` files of Debian's `dataset-fashion-mnist`
  (/usr/share/datasets/fashion-mnist) or any folder holding them.
- digits: scikit-learn's bundled 8x8 digits (a fixed stratified 80/20 split).

Where: the `data_dir` argument, else $MIRRORPRUNE_DATA, else `../shared/data` and `shared/data`
beside the source checkout (never relative to the working directory: a folder you merely run
in cannot supply data files). Decoded JPEGs are cached as .npz under $MIRRORPRUNE_CACHE
(default ~/.cache/mirrorprune).

No data file can run code: the CIFAR-10 python batches (pickles) are read by an unpickler that
builds only the numpy arrays, lists, bytes and numbers those files hold and refuses anything
else.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError
from .files import atomic_write

DATASETS = ("cifar10", "mnist", "fashion-mnist", "digits")
#: (channels, height, width) of each dataset's images, known without loading them.
SHAPES = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28),
          "digits": (1, 8, 8)}
#: Training-set sizes of the standard copies: experiments use them to check their options
#: before loading anything, and check again with the real size if a copy differs.
TRAIN_SIZES = {"cifar10": 50_000, "mnist": 60_000, "fashion-mnist": 60_000, "digits": 1438}
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
_NORM = {  # per-channel mean and std of the training images, in [0, 1] units
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3061,), (0.3769,)),
}
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataNotFoundError(UsageError, FileNotFoundError):
    """A dataset is not where it was looked for (the message says where, and how to get it)."""


@dataclass
class ImageData:
    """Images as uint8 (N, C, H, W), labels as int64, and how to turn them into inputs."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False  # random crop (pad 4) + horizontal flip, for CIFAR training

    @property
    def num_classes(self) -> int:
        """Classes 0 … max label (the labels are class indices)."""
        return int(self.y.max()) + 1 if len(self.y) else 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: str | torch.device) -> ImageData:
        """The same data held on `device` (still uint8: a GPU then crops, flips and normalizes
        its batches itself; the random draws stay on the CPU, so they match any device)."""
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def subset(self, n: int, seed: int = 0) -> ImageData:
        """A fixed class-balanced subset of n examples (for CPU budgets): n // classes of each
        class present (all of a class with fewer)."""
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        classes = self.y.unique()
        idx = torch.cat([c[torch.randperm(len(c), generator=g)[: n // len(classes)]]
                         for c in (torch.nonzero(self.y == k).flatten() for k in classes)])
        idx = idx.sort().values
        return ImageData(self.name, self.x[idx], self.y[idx], self.mean, self.std, self.augment)

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, augment: bool | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized float batches; with shuffle, the order and augmentation depend only on
        `seed`, so an epoch can be replayed exactly (resume). Everything random is drawn on
        the CPU before the first batch and sent to the data's device once, so that no batch
        waits for a host-to-device copy."""
        g = torch.Generator().manual_seed(seed)
        n = len(self)
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        aug = self.augment if augment is None else augment
        # per batch (dy, dx, flip) in the order the batches draw them, stacked as (3, n)
        draws = (torch.cat([crop_flip_draws(len(order[i:i + batch_size]), g)
                            for i in range(0, n, batch_size)], 1) if aug else None)
        dev = self.x.device
        order = order.to(dev)
        draws = draws.to(dev) if draws is not None else None
        mean = torch.tensor(self.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, -1, 1, 1)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            xb = self.x[idx]
            if draws is not None:
                xb = crop_flip(xb, draws[:, i : i + batch_size])
            yield (xb.float().div_(255) - mean) / std, self.y[idx]


def crop_flip_draws(batch: int, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """(3, batch) int64 on the CPU: each image's crop offsets dy, dx in [0, 2·pad] and whether
    it is flipped."""
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5
    return torch.stack([dy, dx, flip.long()])


def crop_flip(x: torch.Tensor, draws: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per image, vectorized;
    `draws` from `crop_flip_draws`, on x's device."""
    B, C, H, W = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx, flip = draws
    rows = (dy[:, None] + torch.arange(H, device=dev))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W, device=dev))[:, None, None, :]
    cols = torch.where(flip.bool()[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(B, device=dev)[:, None, None, None],
                  torch.arange(C, device=dev)[None, :, None, None], rows, cols]


# ----------------------------------------------------------------------------------------------
# finding files


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where datasets are looked for: `data_dir` alone if given (it must exist), else
    $MIRRORPRUNE_DATA, then `../shared/data` and `shared/data` beside the source checkout."""
    if data_dir is not None:
        d = Path(data_dir)
        if not d.exists():
            raise DataNotFoundError(f"data directory {d} does not exist; pass --data-dir (or "
                                    "data_dir=) pointing at the folder that holds the dataset")
        return [d]
    dirs = [Path(os.environ["MIRRORPRUNE_DATA"])] if os.environ.get("MIRRORPRUNE_DATA") else []
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():  # a source checkout, not an installed package
        dirs += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    return list(dict.fromkeys(dirs))


def _find(names: list[str], dirs: list[Path], what: str, how: str) -> Path:
    for d in dirs:
        for n in names:
            if (d / n).exists():
                return d / n
        if d.name in names and d.exists():  # the path points at the file or folder itself
            return d
    looked = ", ".join(str(d / n) for d in dirs for n in names)
    raise DataNotFoundError(f"{what} not found; looked for {looked}. {how}")


def _corrupt(path: Path, e: Exception) -> UsageError:
    return UsageError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); replace it with "
                      "a fresh copy (and delete any cached .npz under $MIRRORPRUNE_CACHE)")


# ----------------------------------------------------------------------------------------------
# loaders


def load(name: str, split: str = "train", data_dir: str | Path | None = None) -> ImageData:
    """Load `split` ("train" or "test") of dataset `name` (one of DATASETS)."""
    _check_name(name)
    if split not in ("train", "test"):
        raise UsageError(f"split must be 'train' or 'test', got {split!r}")
    x, y = {"cifar10": _cifar10, "mnist": _mnist, "fashion-mnist": _fashion,
            "digits": _digits}[name](split, data_dir)
    if x.ndim == 3:
        x = x[:, None]
    mean, std = _NORM[name]
    return ImageData(name, torch.from_numpy(np.ascontiguousarray(x)),
                     torch.from_numpy(y.astype(np.int64)), mean, std,
                     augment=name == "cifar10" and split == "train")


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def locate(name: str, data_dir: str | Path | None = None) -> Path:
    """The file or folder `name` would be loaded from, without reading it (DataNotFoundError,
    saying where it was looked for, if there is none). `digits` ships with scikit-learn."""
    _check_name(name)
    search_dirs(data_dir)  # a --data-dir that does not exist is a mistake for every dataset
    if name == "digits":
        try:
            import sklearn.datasets
        except ImportError:
            raise DataNotFoundError("the digits dataset needs scikit-learn: "
                                    "pip install 'mirrorprune[data]'") from None
        return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    return {"cifar10": _cifar10_path, "mnist": _mnist_path, "fashion-mnist": _fashion_path
            }[name](data_dir)


def _cifar10_path(data_dir) -> Path:
    return _find(["cifar10-jpeg.tar.gz", "cifar-10-batches-py"], search_dirs(data_dir),
                 "CIFAR-10", "Pass data_dir=/ --data-dir pointing at cifar10-jpeg.tar.gz or the "
                 "python version's cifar-10-batches-py folder (cs.toronto.edu/~kriz/cifar.html).")


def _cifar10(split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    path = _cifar10_path(data_dir)
    if path.is_dir():
        return _cifar_python(path, split)
    return _cifar_jpeg(path, split)


def _cifar_python(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for f in files:
        p = folder / f
        if not p.exists():
            raise DataNotFoundError(f"{p} is missing: {folder} is not a complete "
                                    "cifar-10-batches-py folder")
        try:
            with open(p, "rb") as fh:
                d = _CifarUnpickler(fh, encoding="bytes").load()
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        except _Refused as e:
            raise UsageError(f"{p} is not a CIFAR-10 batch: {e}; a data file never needs "
                             "that, so it was not loaded. Replace the folder with a fresh copy"
                             ) from None
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError,
                AttributeError, IndexError) as e:
            raise _corrupt(p, e) from None
    return np.concatenate(xs), np.concatenate(ys)


class _Refused(pickle.UnpicklingError):
    pass


def _numpy_global(name: str):
    try:  # numpy >= 2 moved numpy.core to numpy._core (the old name warns)
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
            "_frombuffer": numeric._frombuffer, "ndarray": np.ndarray, "dtype": np.dtype}[name]


# What the CIFAR-10 python batches need (written by Python 2's cPickle; re-pickled copies by
# Python 3 and numpy 1 or 2): numpy arrays and dtypes, and latin-1 encoded bytes. Nothing else.
_CIFAR_GLOBALS = {
    **{(mod, name): lambda name=name: _numpy_global(name)
       for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")},
    **{(mod, "_frombuffer"): lambda: _numpy_global("_frombuffer")
       for mod in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds; any other global (a function, a class) is
    refused before it is looked up, so nothing in the file can run."""

    def find_class(self, module: str, name: str):
        make = _CIFAR_GLOBALS.get((module, name))
        if make is None:
            raise _Refused(f"it asks for {module}.{name}")
        return make()


_CACHE_VERSION = "v2"  # v2: CIFAR-10 JPEG classes interleaved (v1: grouped by class)


def _cache_path(src: Path) -> Path:
    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("MIRRORPRUNE_CACHE", Path.home() / ".cache" / "mirrorprune"))
    return root / f"{src.name}.{key}.{_CACHE_VERSION}.npz"


def _cifar_jpeg(archive: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    cache = _cache_path(archive)
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return z[f"x_{split}"], z[f"y_{split}"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            cache.unlink(missing_ok=True)  # a broken cache is rebuilt, never trusted
    from PIL import Image

    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    try:
        with tarfile.open(archive) as tf:
            for m in tf:
                parts = m.name.split("/")
                if not m.isfile() or len(parts) != 3 or parts[0] not in out:
                    continue
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                out[parts[0]][0].append((parts[1], parts[2], np.asarray(img)))
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise _corrupt(archive, e) from e
    arrays = {}
    for s, (items, _) in out.items():
        if not items:
            raise _corrupt(archive, ValueError(f"no {s}/<class>/*.jpg images inside"))
        # classes interleaved (the first image of each class, then the second, ...), not one
        # class after the other: any contiguous part, e.g. the validation split (the last
        # 10%), holds every class alike. Within a class, file-name order.
        items.sort(key=lambda t: (t[1], CIFAR_CLASSES.index(t[0])))
        arrays[f"x_{s}"] = np.stack([t[2] for t in items]).transpose(0, 3, 1, 2)
        arrays[f"y_{s}"] = np.array([CIFAR_CLASSES.index(t[0]) for t in items], dtype=np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)

    def save(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.savez adds no ".npz" to its name
            np.savez(f, **arrays)
    atomic_write(cache, save)
    return arrays[f"x_{split}"], arrays[f"y_{split}"]


def _mnist_path(data_dir) -> Path:
    return _find(["mnist.npz"], search_dirs(data_dir), "MNIST",
                 "Pass --data-dir pointing at a folder with mnist.npz (x_train, y_train, x_test, "
                 "y_test), as in the project's shared/data.")


def _mnist(split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    path = _mnist_path(data_dir)
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[f"x_{split}"], z[f"y_{split}"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise _corrupt(path, e) from e


def _idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape).copy()
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise _corrupt(path, e) from e


def _fashion_path(data_dir, prefix: str = "t10k") -> Path:
    dirs = search_dirs(data_dir)
    if data_dir is None:
        dirs += [FASHION_SYSTEM_DIR]
    return _find([f"{prefix}-images-idx3-ubyte.gz"], dirs + [d / "fashion-mnist" for d in dirs],
                 "Fashion-MNIST", "Install it with `apt-get install dataset-fashion-mnist` (files "
                 f"land in {FASHION_SYSTEM_DIR}) or pass --data-dir with the idx .gz files.")


def _fashion(split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = _fashion_path(data_dir, prefix)
    labels = images.parent / f"{prefix}-labels-idx1-ubyte.gz"
    return _idx(images), _idx(labels)


def _digits(split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataNotFoundError("the digits dataset needs scikit-learn: "
                                "pip install 'mirrorprune[data]'") from None
    d = _load()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    test = _stratified_test_mask(d.target, 0.2, seed=0)
    keep = test if split == "test" else ~test
    return x[keep], d.target[keep]


def _stratified_test_mask(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        test[idx[: round(fraction * len(idx))]] = True
    return test


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits flattened to 64 features in [0, 1], centered with the training mean:
    x_train, y_train, x_test, y_test (the demo's data)."""
    if not 0 < test_fraction < 1:
        raise UsageError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    test = torch.from_numpy(_stratified_test_mask(d.target, test_fraction, seed))
    mean = x[~test].mean(0)
    return x[~test] - mean, y[~test], x[test] - mean, y[test]
