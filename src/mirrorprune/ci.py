"""Mean and 95% confidence interval over seeds (Student's t), without SciPy."""

from __future__ import annotations

import math
from collections.abc import Sequence

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% CI); the half-width is nan for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * sd / math.sqrt(n)


def show(mean: float, half: float, scale: float = 100, sign: bool = False) -> str:
    """"mean ± half" scaled (default: fractions as %), 2 decimals, "+" first with `sign`; the
    half-width is left out when it is nan (one value)."""
    text = f"{scale * mean:{'+' if sign else ''}.2f}"
    return text if math.isnan(half) else f"{text} ± {scale * half:.2f}"
