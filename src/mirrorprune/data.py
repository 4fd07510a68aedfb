"""Offline datasets as in-memory tensors. (Now: scikit-learn's bundled digits.)"""

from __future__ import annotations

import torch


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), flattened to 64 features.

    Returns x_train, y_train, x_test, y_test: a stratified split fixed by `seed`, features scaled
    to [0, 1] and centered with the training mean.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install 'mirrorprune[data]'"
        ) from e
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = _load()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):  # stratified: the same fraction of every class in the test split
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(test_fraction * len(idx))]] = True
    mean = x[~test].mean(0)
    return x[~test] - mean, y[~test], x[test] - mean, y[test]
