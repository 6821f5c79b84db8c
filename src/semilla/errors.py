"""User-facing errors. The CLI turns these into one line and exit code 2."""


class SemillaError(ValueError):
    """Bad input from the user: a flag, a file, a field. The message names the problem."""


class ConfigError(SemillaError):
    """One or more configuration values are invalid (the message lists every problem)."""


class DataError(SemillaError):
    """A corpus or prepared dataset cannot be used."""


class CheckpointError(SemillaError):
    """A checkpoint directory is missing, incomplete, corrupt or incompatible."""
