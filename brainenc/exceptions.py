"""Exception hierarchy. Every error a user can trigger derives from :class:`BrainencError`
and carries a one-line message naming the file or parameter at fault."""


class BrainencError(Exception):
    """Base class of brainenc's own errors (the CLI prints these as one line)."""


class ConfigError(BrainencError, ValueError):
    """A configuration value or key is invalid."""


class DataFormatError(BrainencError, ValueError):
    """A data file is missing, truncated, or has the wrong shape, dtype or content."""


class MissingDependencyError(BrainencError, ImportError):
    """An optional dependency is needed for the requested feature."""


class MissingWeightsError(BrainencError, FileNotFoundError):
    """Pretrained weights are not available locally (brainenc never downloads silently)."""


class NotFittedError(BrainencError, AttributeError):
    """An estimator was used before ``fit``."""
