"""The one exception family for "the input or the config is wrong".

``eqrlhf <command>`` prints a :class:`UserError` as one message without a traceback and exits 2; any other
exception is a bug in eqrlhf (or a dependency) and keeps its traceback. Library callers can catch
``UserError``; the subclasses also derive from the built-in class the same check raised before
(``ValueError``, ``FileNotFoundError``), so existing ``except ValueError`` code keeps working.

This module imports nothing from eqrlhf: every other module may import it.
"""

from __future__ import annotations

import os
from pathlib import Path

# How a relative path in a config is resolved, printed wherever a configured path is not found.
PATH_RULE = "relative paths resolve against the working directory: run the shipped configs from the repository root"


class UserError(Exception):
    """The input or the config is wrong. ``file``, ``row`` (1-based line or record) and ``field`` (a column of
    the input, or a dotted config key when there is no file) say where, when known; ``str()`` puts them in
    front of the message as ``file:row: field 'name': message`` or ``config.key: message``."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, row=None, field: str | None = None):
        super().__init__(message)  # args stay (message,): the exception pickles into Ray workers and back
        self.message = message
        self.file = None if file is None else str(file)
        self.row = row
        self.field = field

    def __str__(self) -> str:
        where = ":".join(str(part) for part in (self.file, self.row) if part is not None)
        if self.field is None:
            field = ""
        else:
            field = f"field '{self.field}'" if where else self.field
        return ": ".join(part for part in (where, field, self.message) if part)


class ConfigError(UserError, ValueError):
    """A setting that cannot be used; the message (or ``field``) names the config key."""


class InputError(UserError, ValueError):
    """Input data that cannot be used: a bad row or file content, an empty or inconsistent input."""


class InputNotFound(UserError, FileNotFoundError):
    """A configured file, folder, model or earlier stage output that does not exist."""


def tried(path: str | os.PathLike) -> str:
    """``path`` as the message should show it: a relative path with the rule and the absolute path it became,
    so a run started from the wrong folder says so."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return str(given)
    return f"{path} (tried {Path.cwd() / given}; {PATH_RULE})"


def listing(head: str, problems: list[str]) -> str:
    """Checks report every problem at once: one on the line of ``head``, several one per indented line."""
    if len(problems) == 1:
        return f"{head}: {problems[0]}"
    return f"{head}:\n  " + "\n  ".join(problems)


def find_user_error(err: BaseException) -> UserError | None:
    """The UserError ``err`` is or carries from a Ray process, else None (a bug). Ray re-raises a task's or an
    actor's exception as a RayTaskError that is also an instance of the original class, but whose ``str`` is
    the remote traceback: the original is its ``cause``. Ray Train raises WorkerGroupError with each worker's
    exception in ``worker_failures`` (a user error only when every worker failed with one: one bug among them
    keeps the traceback), and ControllerError with ``controller_failure``. Ray Data (an exception in a
    ``map_batches`` function) and an actor whose constructor raised (ActorDiedError) keep only the traceback
    text, so a user error raised there shows as a bug. Attributes are read by name: this module needs no Ray."""
    for _ in range(8):  # Ray nests wrappers a few levels deep at most; a cycle must not loop forever
        cause = err.__dict__.get("cause")  # set on the instance by RayTaskError only (its class forwards lookups)
        failures = getattr(err, "worker_failures", None)
        if isinstance(cause, BaseException):
            err = cause
        elif isinstance(failures, dict) and failures:
            found = [find_user_error(failure) for _, failure in sorted(failures.items())]
            return found[0] if all(found) else None
        elif isinstance(getattr(err, "controller_failure", None), BaseException):
            err = err.controller_failure
        else:
            return err if isinstance(err, UserError) else None
    return None
