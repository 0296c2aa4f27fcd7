"""Logging and progress bars (tqdm), quiet under ``BRAINENC_QUIET=1`` or when not a TTY-less CI log."""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

_LOGGER_NAME = "brainenc"


def get_logger(name: str | None = None) -> logging.Logger:
    logger = logging.getLogger(_LOGGER_NAME if name is None else f"{_LOGGER_NAME}.{name}")
    root = logging.getLogger(_LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[brainenc] %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("BRAINENC_LOGLEVEL", "INFO").upper())
        root.propagate = False
    return logger


def progress_enabled() -> bool:
    return os.environ.get("BRAINENC_QUIET", "0") not in ("1", "true", "yes")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm progress bar (disabled with ``BRAINENC_QUIET=1``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress_enabled(),
                leave=False, dynamic_ncols=True, file=sys.stderr)
