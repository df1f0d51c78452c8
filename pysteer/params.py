"""The one check of scalar parameters, for the API and the CLI alike: an int is an int (not a bool, a float or
a string), a number is a finite real."""

from __future__ import annotations

import math

import numpy as np


def integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, not {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        want = (f"in [{lo}, {hi}]" if lo is not None and hi is not None else f"at most {hi}" if lo is None
                else "a positive int" if lo == 1 else "a non-negative int" if lo == 0 else f"at least {lo}")
        raise ValueError(f"{name} must be {want}, not {value}")
    return int(value)


def number(name: str, value) -> float:
    """``value`` as a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)
