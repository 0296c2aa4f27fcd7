"""Keyed-folder store: crash-safe, lock-protected entries ``<root>/<name>/`` published by one rename.

Both on-disk caches (prepared datasets, :mod:`brainenc.datasets.prepare`; features,
:mod:`brainenc.features.cache`) are a :class:`KeyedFolderStore`. Layout under ``root``::

    <name>/                          a complete entry: its marker file (``COMPLETE``) is in it
    .<name>.lock                     flock of the entry's writer (holds its pid and host)
    .<name>.partial/                 resumable work folder (kept after a crash, resumed next time)
    .tmp-<name>-<host>-<pid>-<hex>/  per-process work folder (non-resumable writes), or an entry
                                     moved aside to be deleted

Rules:

* An entry folder exists under its final name only once it is complete: a writer builds in a work
  folder, writes the marker there **last**, then renames the work folder onto ``<name>``. Readers
  use :meth:`KeyedFolderStore.complete`, which returns only folders holding the marker, so a killed
  writer never leaves an entry that looks complete.
* One writer per entry: :meth:`KeyedFolderStore.write` holds :func:`brainenc._utils.io.exclusive_lock`
  on ``.<name>.lock`` (an ``flock``: the kernel drops it when the holder dies, so a lock left by a
  killed process never blocks). A second writer either fails at once with a one-line
  :class:`~brainenc._utils.io.LockedError` naming the lock file and the holder's pid (``wait=0``, the
  default; the feature cache) or waits until the holder is done (``wait=None`` or a number of
  seconds; the prepared-dataset cache), then finds the entry complete (``entry.existing``) and
  builds nothing.
* Non-resumable writes (``resumable=False``) build in a fresh per-process ``.tmp-*`` folder that is
  removed on failure; one left by a killed process is removed by the next writer
  (:func:`~brainenc._utils.io.remove_stale_temps`; those of live processes are left alone).
  Resumable writes build in the stable ``.<name>.partial/`` folder, kept on failure so that the
  next writer resumes from what is there (the caller's own progress files). A work folder that
  already holds the marker (killed between the marker and the rename) is published as it is.
* Publishing keeps race safety against writers that do not take the lock (older versions, other
  tools): a marker-less folder under the final name is moved aside and deleted (put back should it
  turn out complete), and a complete entry found there is kept (ours is dropped).
* :meth:`KeyedFolderStore.invalidate` (or :meth:`EntryWriter.invalidate` under a write) turns a
  complete entry back into a missing one: moved aside under the lock, then deleted.

stdlib + numpy only (via :mod:`brainenc._utils.io`); the bottom layer of the package.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from brainenc._utils import io as _io
from brainenc._utils.io import LockedError, exclusive_lock, remove_stale_temps, temp_dir_name, write_json, write_text
from brainenc._utils.logging import get_logger
from brainenc.exceptions import DataFormatError

__all__ = ["KeyedFolderStore", "EntryWriter", "LockedError"]

_log = get_logger("store")
#: a fail-fast lock (``wait=0``) still retries this long: a sweep of a stale lock file of another
#: entry holds it for an instant, and an arrival in that instant must not fail
_GRACE_S = 0.25


class EntryWriter:
    """The handle :meth:`KeyedFolderStore.write` yields (used under the entry's lock only).

    Attributes
    ----------
    name : str
    final : Path
        ``<root>/<name>``.
    existing : Path or None
        The complete entry found once the lock was held (another process finished it while this one
        waited or checked): nothing is published then, unless :meth:`invalidate` is called.
    path : Path or None
        The work folder to fill (None while ``existing`` is set).
    resumable : bool
    """

    def __init__(self, store: "KeyedFolderStore", name: str, resumable: bool, marker: Any, scratch: tuple[str, ...]):
        self.store = store
        self.name = name
        self.final = store.root / name
        self.resumable = resumable
        self.marker = marker
        self.scratch = scratch
        self.existing: Path | None = None
        self.path: Path | None = None

    def _open_work(self) -> None:
        if self.resumable:
            self.path = self.store.work_path(self.name)
            self.path.mkdir(exist_ok=True)
        else:
            self.path = self.store.root / temp_dir_name(self.name)
            self.path.mkdir()

    def invalidate(self) -> None:
        """Discard the complete entry (if any) and any resumable progress: build from scratch."""
        self.store._remove(self.final)
        if self.resumable:
            self.store._remove(self.store.work_path(self.name))
            self.path = None
        self.existing = None
        if self.path is None:
            self._open_work()


class KeyedFolderStore:
    """Entries ``<root>/<name>/`` written under a lock, completed by a marker, published by a rename.

    Parameters
    ----------
    root : path
        The folder holding the entries (created on the first write).
    marker : str
        Name of the completion marker file, written last into every entry.
    what : str
        What an entry is, for lock messages ("this feature-cache entry").
    locked_error : type
        :class:`~brainenc._utils.io.LockedError` or a subclass, raised when the lock is held.
    """

    def __init__(self, root, *, marker: str = "COMPLETE", what: str = "this entry",
                 locked_error: type[LockedError] = LockedError):
        self.root = Path(root).expanduser()
        self.marker = marker
        self.what = what
        self.locked_error = locked_error

    # ------------------------------------------------------------------ names
    def _check(self, name: str) -> str:
        if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\0" in name \
                or name != os.path.basename(name):
            raise ValueError(f"invalid store entry name {name!r} (one non-hidden path component)")
        return name

    def path(self, name: str) -> Path:
        """The final folder of ``name`` (complete or not, existing or not)."""
        return self.root / self._check(name)

    def lock_path(self, name: str) -> Path:
        return self.root / f".{self._check(name)}.lock"

    def work_path(self, name: str) -> Path:
        """The resumable work folder of ``name``."""
        return self.root / f".{self._check(name)}.partial"

    def complete(self, name: str) -> Path | None:
        """The final folder of ``name`` if it holds the marker, else None (never a partial entry)."""
        final = self.path(name)
        return final if (final / self.marker).is_file() else None

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, name: str, wait: float | None = 0.0) -> Iterator[Path]:
        """Hold the entry's writer lock (``.<name>.lock``).

        Parameters
        ----------
        wait : float or None
            Seconds to wait for a live holder (polling); None = as long as it takes; 0 = fail at once
            (after a short grace) with ``locked_error``, a one-line message naming the lock file and
            the holder's pid.
        """
        path = self.lock_path(name)
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = None if wait is None else time.monotonic() + max(float(wait), _GRACE_S)
        delay, told = 0.02, False
        while True:
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(exclusive_lock(path, self.what))
                break
            except LockedError as exc:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise self.locked_error(str(exc)) from None
                if not told and (wait is None or wait > _GRACE_S):
                    _log.info("waiting for the lock: %s", exc)
                    told = True
                time.sleep(delay if left is None else max(0.0, min(delay, left)))
                delay = min(delay * 1.5, 1.0)
        with stack:
            yield path

    # ------------------------------------------------------------------ write
    @contextlib.contextmanager
    def write(self, name: str, *, resumable: bool = False, marker: Any = None, scratch: Iterable[str] = (),
              wait: float | None = 0.0) -> Iterator[EntryWriter]:
        """Write (or find complete) the entry ``name``; yields an :class:`EntryWriter`.

        Under the lock: temporaries of dead processes are swept, a marker-less final folder is
        discarded, and either ``entry.existing`` is the complete entry (then nothing is written
        unless ``entry.invalidate()`` is called) or ``entry.path`` is the work folder to fill. On a
        normal exit the marker is written last into the work folder, the ``scratch`` files are
        removed and the work folder is renamed onto the final name. On an exception a non-resumable
        work folder is removed; a resumable one is kept for the next writer.

        Parameters
        ----------
        resumable : bool
            Build in the stable ``.<name>.partial/`` (kept after a failure) instead of a fresh
            per-process temporary folder.
        marker : str, dict or None
            Marker content: a str is written as text, anything else as JSON
            (:func:`brainenc._utils.io.write_json`), None as an empty file.
        scratch : iterable of str
            Names in the work folder removed after the marker is written, before the rename
            (progress records of a resumable writer: never part of the published entry).
        wait : float or None
            See :meth:`lock`.

        Raises
        ------
        LockedError (``locked_error``)
            The lock is held by a live process and ``wait`` ran out.
        """
        self._check(name)
        entry = EntryWriter(self, name, bool(resumable), marker, tuple(scratch))
        with self.lock(name, wait=wait):
            self.sweep(name)
            work = self.work_path(name)
            if entry.resumable and (work / self.marker).is_file():  # killed between the marker and the rename
                self._drop_scratch(work, entry.scratch)
                self._publish(work, entry.final)
            if (entry.final / self.marker).is_file():
                entry.existing = entry.final
            else:
                self._discard_incomplete(entry.final)  # not ours: we only ever rename complete folders
                entry._open_work()
            try:
                yield entry
                if entry.existing is None:
                    self._seal(entry)
            except BaseException:
                if not entry.resumable and entry.path is not None:
                    shutil.rmtree(entry.path, ignore_errors=True)
                raise

    def _seal(self, entry: EntryWriter) -> None:
        path = entry.path
        target = path / self.marker
        if isinstance(entry.marker, str):
            write_text(target, entry.marker)
        elif entry.marker is None:
            write_text(target, "")
        else:
            write_json(target, entry.marker)
        self._drop_scratch(path, entry.scratch)  # after the marker: a kill before this still publishes
        self._publish(path, entry.final)
        entry.path = None

    @staticmethod
    def _drop_scratch(folder: Path, scratch: tuple[str, ...]) -> None:
        for s in scratch:
            with contextlib.suppress(FileNotFoundError):
                (folder / s).unlink()

    # ------------------------------------------------------------------ invalidate / sweep
    def invalidate(self, name: str, wait: float | None = 0.0) -> bool:
        """Delete the entry ``name`` and its resumable progress (under the lock).

        Returns True when a complete entry was removed.
        """
        with self.lock(name, wait=wait):
            was = self.complete(name) is not None
            self._remove(self.path(name))
            self._remove(self.work_path(name))
        return was

    def sweep(self, name: str | None = None) -> list[Path]:
        """Remove what dead processes left under ``root`` (never anything of a live one).

        Temporaries (``.tmp-*`` folders, atomic-write temporaries) next to the entries; temporaries
        inside the resumable work folder of ``name``; lock files of other entries whose recorded
        holder is dead on this host (taken, then released, which deletes them).
        """
        removed: list[Path] = []
        with contextlib.suppress(OSError):
            removed += remove_stale_temps(self.root, recursive=False)
            if name is not None and self.work_path(name).is_dir():
                removed += remove_stale_temps(self.work_path(name), recursive=True)
            own = None if name is None else self.lock_path(name)
            for lock in sorted(self.root.glob(".*.lock")):
                if lock == own or not lock.is_file():
                    continue
                pid, host = _io._lock_holder(lock)
                if pid is None or host != _io._HOST or _io._pid_alive(pid):
                    continue
                try:
                    with exclusive_lock(lock, self.what):
                        pass  # released: the file is gone
                except LockedError:
                    continue
                removed.append(lock)
        return removed

    # ------------------------------------------------------------------ renames
    def _remove(self, folder: Path) -> None:
        """Move ``folder`` aside (a temporary name of this process), then delete it."""
        aside = folder.parent / temp_dir_name(folder.name.lstrip(".") or "entry")
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    def _discard_incomplete(self, final: Path) -> None:
        """Remove a marker-less folder at ``final``.

        It is first renamed to a temporary name of this process, so a concurrent (lock-less)
        writer's rename onto ``final`` is never deleted by mistake: should the folder moved aside
        turn out complete (another process renamed its result in between), it is put back.
        """
        aside = final.parent / temp_dir_name(final.name)
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            return
        if (aside / self.marker).is_file():
            try:
                os.rename(aside, final)
                return
            except OSError:  # yet another result is in place now
                pass
        shutil.rmtree(aside, ignore_errors=True)

    def _publish(self, work: Path, final: Path) -> None:
        """Rename the complete folder ``work`` onto ``final``; a complete entry already there is kept."""
        for _ in range(3):
            try:
                os.rename(work, final)
                return
            except OSError:
                if (final / self.marker).is_file():  # another process finished the same key first
                    shutil.rmtree(work, ignore_errors=True)
                    return
                if not final.exists():
                    raise
                self._discard_incomplete(final)
        raise DataFormatError(f"{final}: could not move the entry into place (the folder keeps reappearing "
                              f"without a {self.marker} marker; is another program writing there?)")
