"""Logging and progress bars (tqdm).

The library only logs: the ``brainenc`` logger has a ``NullHandler`` and propagates, as the
Python logging guide asks of libraries, so an application (or a notebook's ``logging.basicConfig``)
decides where messages go. ``brainenc.set_log_level("DEBUG")`` changes the level;
the CLI calls :func:`configure_cli_logging` to print ``[brainenc] ...`` lines on stderr.
Progress bars are off under ``BRAINENC_QUIET=1``.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

_LOGGER_NAME = "brainenc"


logging.getLogger(_LOGGER_NAME).addHandler(logging.NullHandler())

_CLI_HANDLER_NAME = "brainenc-cli"


def get_logger(name: str | None = None) -> logging.Logger:
    """The package logger (``brainenc``) or one of its children (``brainenc.<name>``)."""
    return logging.getLogger(_LOGGER_NAME if name is None else f"{_LOGGER_NAME}.{name}")


def set_log_level(level: int | str) -> None:
    """Set the level of brainenc's messages (``"DEBUG"``, ``"INFO"``, ``"WARNING"``, ... or an int)."""
    if isinstance(level, str):
        levels = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
                  "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
        if level.upper() not in levels:
            from brainenc.exceptions import ConfigError

            raise ConfigError(f"'level' must be one of {', '.join(levels)}; {level!r} was provided")
        level = levels[level.upper()]
    logging.getLogger(_LOGGER_NAME).setLevel(level)


def configure_cli_logging(level: int | str | None = None) -> logging.Handler:
    """Print brainenc's messages on stderr as ``[brainenc] ...`` (what the CLI shows).

    Idempotent: a second call replaces the level, not the handler. The level defaults to
    ``$BRAINENC_LOGLEVEL`` or ``INFO``. Messages then stop propagating to the root logger, so
    an application's own root handler does not print them twice.
    """
    root = logging.getLogger(_LOGGER_NAME)
    handler = next((h for h in root.handlers if h.get_name() == _CLI_HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_CLI_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("[brainenc] %(message)s"))
        root.addHandler(handler)
    root.propagate = False
    set_log_level(level if level is not None else os.environ.get("BRAINENC_LOGLEVEL", "INFO"))
    return handler


def progress_enabled() -> bool:
    return os.environ.get("BRAINENC_QUIET", "0") not in ("1", "true", "yes")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm progress bar (disabled with ``BRAINENC_QUIET=1``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress_enabled(),
                leave=False, dynamic_ncols=True, file=sys.stderr)
