"""The one exception type a user can cause; everything else is a bug and keeps its traceback."""


class PatchqError(Exception):
    """Base of every error a user can cause; the CLI prints it as one line."""
