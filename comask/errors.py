"""Errors whose message is meant for the user: one line naming the file/field and the fix."""

from __future__ import annotations

import re

# torch's DataLoader re-raises an exception from a worker process as `type(e)(text)`, where text is
# "Caught DataError in DataLoader worker process N.\nOriginal Traceback ...\n<module>.DataError: <message>".
_WORKER_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)
_QUALNAME_PREFIX = re.compile(r"^(?:\w+\.)*\w+: ")


class UserError(Exception):
    """Base class; the CLI prints these as `comask: error: ...` without a traceback.

    A UserError raised inside a DataLoader worker reaches the main process wrapped in the worker's
    traceback; the original one-line message is recovered here (the traceback stays available as
    `worker_traceback`) so users see the same line with or without `data.num_workers`.
    """

    def __init__(self, *args: object) -> None:
        self.worker_traceback: str | None = None
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_WRAPPED.match(args[0]):
            self.worker_traceback = args[0]
            last = next((ln for ln in reversed(args[0].splitlines()) if ln.strip()), args[0])
            args = (_QUALNAME_PREFIX.sub("", last, count=1),)
        super().__init__(*args)


class DataError(UserError):
    """A data set, image or annotation problem."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is unsafe, or does not match the model."""
