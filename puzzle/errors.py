"""Errors a user can cause. The CLI prints them as one line on stderr and exits with code 2."""


class PuzzleError(Exception):
    """A mistake in what the user handed us (a path, a file, a config, a budget), not a bug."""
