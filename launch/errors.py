"""Errors the launchers raise, importable without their optional dependencies."""


class RunFailed(RuntimeError):
    """The workers failed more often than launch.max_failures allows; the message names the last checkpoint."""
