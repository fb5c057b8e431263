"""Errors a user can act on.

Anything raised as a KoifishError is printed by the CLI as one clear line (no traceback) and
ends the command with exit code 2. Messages name the file, the key path and what was expected.
"""


class KoifishError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(KoifishError):
    """A case file that cannot be used: syntax, unknown key, wrong type, impossible value."""


class DataError(KoifishError):
    """A token shard or text file that cannot be read as promised."""


class ModelError(KoifishError):
    """A model folder or checkpoint that cannot be loaded."""


class CheckpointError(KoifishError):
    """A checkpoint that is missing, incomplete or inconsistent with the case."""
