"""User errors: what was asked for cannot be done as asked (an option, a file, a dataset).

They are ValueErrors, so API callers catch them as before; the CLI prints the message as one
paragraph on stderr and exits with status 2, with no traceback. Internal failures keep their own
exception types (and their tracebacks)."""

from __future__ import annotations

import math
import numbers


class UsageError(ValueError):
    """A mistake in the input, with the problem and the fix in its message."""


def check_number(value: object, what: str, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> float:
    """`value` as a float if it is a finite real number (Python or numpy scalar, not a bool)
    inside the given bounds; a UsageError naming `what` and the range otherwise."""
    if low is not None and high is not None:
        rng = (f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    elif low is not None:
        rng = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rng = f" {'<' if high_open else '<='} {high:g}"
    else:
        rng = ""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (math.isfinite(v)
              and (low is None or (v > low if low_open else v >= low))
              and (high is None or (v < high if high_open else v <= high)))
    if not ok:
        raise UsageError(f"{what} must be a finite number{rng}, got {value!r}")
    return float(value)
