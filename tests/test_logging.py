"""Library logging follows the Python guide: NullHandler, propagation, levels set by the caller."""
import logging

import pytest

import brainenc
from brainenc._utils.logging import configure_cli_logging, get_logger
from brainenc.exceptions import ConfigError


@pytest.fixture
def clean_logger():
    root = logging.getLogger("brainenc")
    saved = (list(root.handlers), root.level, root.propagate)
    yield root
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def test_library_logger_is_silent_and_propagates(clean_logger, caplog):
    assert any(isinstance(h, logging.NullHandler) for h in clean_logger.handlers)
    assert not [h for h in clean_logger.handlers if isinstance(h, logging.StreamHandler)]
    assert clean_logger.propagate
    with caplog.at_level(logging.INFO):
        get_logger("workflows").info("hello from a stage")
    assert "hello from a stage" in caplog.text  # an application's root handler sees it


def test_set_log_level(clean_logger):
    brainenc.set_log_level("debug")
    assert clean_logger.level == logging.DEBUG
    brainenc.set_log_level(logging.WARNING)
    assert clean_logger.level == logging.WARNING
    with pytest.raises(ConfigError, match="'level' must be one of"):
        brainenc.set_log_level("loud")


def test_cli_logging_prints_once(clean_logger, capsys):
    configure_cli_logging("INFO")
    configure_cli_logging("INFO")  # idempotent: one handler
    get_logger("x").info("stage done")
    err = capsys.readouterr().err
    assert err.count("[brainenc] stage done") == 1
    assert not clean_logger.propagate
