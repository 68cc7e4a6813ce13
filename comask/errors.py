"""Errors whose message is meant for the user: one line naming the file/field and the fix."""


class UserError(Exception):
    """Base class; the CLI prints these as `comask: error: ...` without a traceback."""


class DataError(UserError):
    """A data set, image or annotation problem."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is unsafe, or does not match the model."""
