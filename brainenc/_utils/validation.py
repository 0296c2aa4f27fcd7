"""Argument validation with nilearn-style one-line messages."""
from __future__ import annotations

import difflib
from typing import Any, Iterable

import numpy as np

from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["check_option", "check_array", "check_subject", "check_positive"]


def check_option(name: str, value: Any, options: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``options``, else raise naming ``name``.

    >>> check_option("space", "fsavg", ["func1pt8mm", "fsaverage"])
    Traceback (most recent call last):
    ...
    brainenc.exceptions.ConfigError: 'space' must be one of {'func1pt8mm', 'fsaverage'}; 'fsavg' was provided. Did you mean 'fsaverage'?
    """
    options = list(options)
    if value in options:
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(o) for o in options], n=1, cutoff=0.4)
        if close:
            hint = f" Did you mean {close[0]!r}?"
    opts = "{" + ", ".join(repr(o) for o in options) + "}"
    raise ConfigError(f"'{name}' must be one of {opts}; {value!r} was provided.{hint}")


def check_subject(subject: Any) -> str:
    """Normalise a subject to the NSD string form ``'subj01'`` (accepts 1, '1', 'subj1')."""
    s = str(subject).strip().lower()
    if s.startswith("subj"):
        s = s[4:]
    if s.isdigit() and 1 <= int(s) <= 99:
        return f"subj{int(s):02d}"
    raise ConfigError(f"'subject' must look like 'subj01' (or 1..8); {subject!r} was provided")


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False):
    ok = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"'{name}' must be a {kind} {bound}; {value!r} was provided")
    return value


def check_array(
    x: Any,
    *,
    name: str = "X",
    ndim: int | tuple[int, ...] | None = None,
    dtype: Any = None,
    finite: bool = True,
    source: str | None = None,
) -> np.ndarray:
    """Convert to ndarray and validate ndim and finiteness.

    ``source`` (a file name) goes into the message when the data came from disk.
    """
    arr = np.asarray(x)
    where = f"{source}: " if source else ""
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            raise DataFormatError(f"{where}'{name}' must have {' or '.join(map(str, allowed))} dimensions; got shape {arr.shape}")
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if finite and arr.dtype.kind in "fc" and arr.size and not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise DataFormatError(f"{where}'{name}' contains {n_bad} NaN/inf values")
    return arr
