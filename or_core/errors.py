"""Errors caused by what a person typed or pointed at, as opposed to errors in the code.

The command line (:mod:`or_core.__main__`) prints an :class:`InputError` as one line on stderr,
``error: <message>``, and exits with code 2; any other exception is a bug and keeps its
traceback. A message names the problem and the fix (the field, file or folder, and what to do).

The subclasses also derive from the built-in exception a caller would expect (``ValueError``,
``FileNotFoundError``), so library code can catch either.
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = [
    "InputError",
    "ConfigError",
    "DataError",
    "MissingPathError",
    "disk_error",
    "input_error_message",
]


class InputError(Exception):
    """A problem with the input (names, values, files, folders, configs, disk) that the user
    fixes; its message is one line that says what is wrong and how to fix it."""


class ConfigError(InputError, ValueError):
    """A configuration field has a wrong name, type or value."""


class DataError(InputError, ValueError):
    """A data set folder or file cannot be used as it is (layout, classes, images)."""


class MissingPathError(InputError, FileNotFoundError):
    """A file or folder the input names does not exist."""


#: ``errno`` values of an ``OSError`` that the user, not the code, has to fix.
_DISK_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def disk_error(error: OSError) -> InputError | None:
    """The :class:`InputError` for a full, read-only or forbidden disk (naming the path and a
    fix), or ``None`` for any other ``OSError``."""
    reason = _DISK_PROBLEMS.get(error.errno or -1)
    if reason is None:
        return None
    path = error.filename if error.filename is not None else "the output path"
    fix = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable folder"
    return InputError(f"cannot write {Path(str(path))}: {reason}; {fix} (or use another --out / OR_CORE_CACHE)")


def input_error_message(error: BaseException) -> str | None:
    """The one-line message of an error caused by the input, or ``None`` for a bug."""
    if isinstance(error, InputError):
        return " ".join(str(error).split("\n"))
    if isinstance(error, OSError):
        found = disk_error(error)
        if found is not None:
            return str(found)
    return None
