"""User errors: what was asked for cannot be done as asked (an option, a file, a dataset).

They are ValueErrors, so API callers catch them as before; the CLI prints the message as one
paragraph on stderr and exits with status 2, with no traceback. Internal failures keep their own
exception types (and their tracebacks)."""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # .../mirrorprune/


class UsageError(ValueError):
    """A mistake in the input, with the problem and the fix in its message."""


class MirrorpruneWarning(UserWarning):
    """Something to know about a model or a run that does not stop it."""


def warn_user(message: str) -> None:
    """A MirrorpruneWarning attributed to the first caller outside this package (the user's
    line), whichever entry point and depth it came through."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, MirrorpruneWarning, stacklevel=level)


def cli_warnings(prefix: str) -> None:
    """In this process, show MirrorpruneWarnings as the command line shows errors: one
    paragraph, `PREFIX: warning: MESSAGE`, without a source line; other warnings as Python
    does."""
    python = warnings.formatwarning

    def form(message, category, filename, lineno, line=None):  # noqa: ANN001 - warnings' API
        if issubclass(category, MirrorpruneWarning):
            return f"{prefix}: warning: {message}\n"
        return python(message, category, filename, lineno, line)

    warnings.formatwarning = form


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
