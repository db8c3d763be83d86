"""The errors a user can fix, for every layer: the launcher maps each kind to its exit status.

`UserError` is the base: a message that names the file, key or value, and what to do. Its kinds say what
went wrong, not where it was noticed: a config that cannot be read (`ConfigError`), settings that are each
valid but do not fit this launch, data set or checkpoint (`IncompatibleSettings`), an optional dependency
that is not installed (`MissingExtraError`); the data pipeline adds `DatasetError`.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message says which file, key or value and how."""


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message names the key, the value and where it came from."""


class IncompatibleSettings(UserError, ValueError):
    """Settings that are each valid but do not fit together, or do not fit this launch, data set or checkpoint."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message gives the command that installs it."""
