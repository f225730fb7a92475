"""Writing files and stage outputs so that a crash or Ctrl-C never leaves half of one where a whole one was.

- :func:`write_text` / :func:`write_json`: a small file (a manifest, ``stage_state.json``, a config dump)
  is written to a temporary file in the same folder, flushed to disk and renamed over the old one
  (``os.replace``): a reader sees the old file or the new one, never a mix, and a crash before the rename
  leaves the old file as it was.
- :class:`StagedDir`: a stage output folder is written beside its final place, ``<out>.tmp-<pid>``, and
  swapped in whole by :meth:`StagedDir.commit` once the stage succeeded. Until then the previous output
  (rows, manifest, state) stays untouched, so a failed or interrupted re-run leaves the last good one.
  A failed attempt is kept as ``<out>.failed`` for inspection (its ``errors.jsonl``); an interrupted one
  is removed (training keeps it as ``<out>.interrupted``: its checkpoints can be continued). Leftovers of a
  killed process (``<out>.tmp-<pid>``, ``<out>.old-<pid>`` of a pid that no longer runs) are cleaned up the
  next time the same output is written.

This module imports nothing from eqrlhf: every other module may import it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

FAILED_SUFFIX = ".failed"
INTERRUPTED_SUFFIX = ".interrupted"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse to open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, doc, indent: int | None = 2, **dumps_kwargs) -> Path:
    """``doc`` as JSON at ``path``, atomically (:func:`write_text`)."""
    return write_text(path, json.dumps(doc, indent=indent, **dumps_kwargs))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _leftovers(final: Path) -> list[tuple[Path, str, int]]:
    """``(path, kind, pid)`` of every ``<final>.tmp-<pid>`` / ``<final>.old-<pid>`` beside ``final``."""
    if not final.parent.is_dir():
        return []
    pattern = re.compile(re.escape(final.name) + r"\.(tmp|old)-(\d+)$")
    found = []
    for entry in final.parent.iterdir():
        m = pattern.match(entry.name)
        if m:
            found.append((entry, m.group(1), int(m.group(2))))
    return found


def clean_leftovers(final: str | os.PathLike) -> None:
    """Remove what a killed writer of ``final`` left beside it. A ``.old-<pid>`` folder is the previous
    output set aside during a swap: when the writer died between the two renames it is put back."""
    final = Path(final)
    for path, kind, pid in _leftovers(final):
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another process is writing it now
        if kind == "old" and not (final.exists() or final.is_symlink()):
            os.rename(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)


def swap_in(staging: Path, final: Path) -> None:
    """Replace the folder ``final`` with ``staging``: the old one is renamed aside, the new one renamed into
    place, then the old one removed. Between the two renames ``final`` is missing for an instant; if the
    process dies there, :func:`clean_leftovers` puts the old one back."""
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    had_old = final.exists() or final.is_symlink()
    if had_old:
        os.rename(final, old)
    try:
        os.rename(staging, final)
    except BaseException:
        if had_old:
            os.rename(old, final)
        raise
    _fsync_dir(final.parent)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


class StagedDir:
    """A stage output written beside its final place (``<final>.tmp-<pid>``) and swapped in on success.

    ``path`` is where to write; :meth:`commit` makes it ``final`` (and removes earlier failed or interrupted
    attempts);
    :meth:`fail` keeps it as ``<final>.failed`` (replacing an older one); :meth:`discard` removes it. Used as a context manager, an
    exception leaving the block fails it (an ``Exception``) or discards it (Ctrl-C, ``SystemExit``) unless it
    was committed.
    """

    def __init__(self, final: str | os.PathLike, keep_interrupted: bool = False):
        self.final = Path(final)
        self.path = self.final.with_name(f"{self.final.name}.tmp-{os.getpid()}")
        self.failed_path = self.final.with_name(self.final.name + FAILED_SUFFIX)
        self.interrupted_path = self.final.with_name(self.final.name + INTERRUPTED_SUFFIX)
        self.keep_interrupted = keep_interrupted  # training: its checkpoints can be continued from there
        self.done = False
        clean_leftovers(self.final)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def commit(self) -> Path:
        if not self.done:
            swap_in(self.path, self.final)
            self.done = True
            for earlier in (self.failed_path, self.interrupted_path):  # earlier attempts are now history
                shutil.rmtree(earlier, ignore_errors=True)
        return self.final

    def fail(self) -> Path:
        """Keep the attempt as ``<final>.failed`` (what its errors point at); the previous output stays."""
        return self._keep_as(self.failed_path)

    def interrupt(self) -> Path | None:
        """Ctrl-C: remove the attempt, or keep it as ``<final>.interrupted`` (``keep_interrupted``)."""
        if self.keep_interrupted:
            return self._keep_as(self.interrupted_path)
        self.discard()
        return None

    def _keep_as(self, target: Path) -> Path:
        if not self.done:
            self.done = True
            shutil.rmtree(target, ignore_errors=True)
            if self.path.exists():
                os.rename(self.path, target)
        return target

    def final_path(self, path: str | os.PathLike) -> str:
        """Where ``path``, a file written under :attr:`path`, will be once committed (other paths as given)."""
        given, root = Path(os.path.abspath(path)), Path(os.path.abspath(self.path))  # links stay links
        for p, r in ((given, root), (given.resolve(), root.resolve())):
            if p.is_relative_to(r):
                return str(self.final / p.relative_to(r))
        return str(path)

    def discard(self) -> None:
        if not self.done:
            self.done = True
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            self.discard()  # left without commit: nothing to keep
        elif issubclass(kind, Exception):
            self.fail()
        else:
            self.interrupt()


class InPlaceDir(StagedDir):
    """The :class:`StagedDir` interface for an output that must be written where it is (a training run
    continuing its own checkpoints, ``train.resume``): nothing is moved, kept or removed."""

    def __init__(self, final: str | os.PathLike):
        self.final = self.path = Path(final)
        self.failed_path = self.interrupted_path = self.final
        self.keep_interrupted = True
        self.done = False
        self.final.mkdir(parents=True, exist_ok=True)

    def commit(self) -> Path:
        self.done = True
        return self.final

    def _keep_as(self, target: Path) -> Path:
        self.done = True
        return self.final

    def discard(self) -> None:
        self.done = True
