"""Atomic writes and safe reads. Every file brainenc writes goes through here:
written to a temporary file in the same folder, fsynced, then renamed into place, so a
killed process never leaves a half-written output under the final name."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from brainenc.exceptions import DataFormatError

__all__ = [
    "atomic_path",
    "write_json",
    "read_json",
    "save_npy",
    "load_npy",
    "sha256_file",
    "write_text",
    "temp_prefix",
    "temp_dir_name",
    "remove_stale_temps",
    "default_file_mode",
]

# Temporary names carry their writer's host and pid: ``.<name>.<host>-<pid>.<random>.tmp<suffix>``
# (files) and ``.tmp-<name>-<host>-<pid>-<random>`` (folders), so a later run can tell a
# temporary left by a killed process (removable) from one a live process is still writing.
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
_TEMP_FILE_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)\.[^.]+\.tmp(\..*)?$")
_TEMP_DIR_RE = re.compile(r"^\.tmp-.+-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]+$")
_umask_lock = threading.Lock()


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``.

    ``tempfile.mkstemp`` creates files 0600; without this, every atomically written file
    would be unreadable to the rest of a lab's group on a shared server.
    """
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def temp_prefix(name: str) -> str:
    """Prefix of a temporary file for final name ``name`` (host and pid of this process)."""
    return f".{name}.{_HOST}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_dead(match: re.Match) -> bool:
    # A temporary from another host (shared file system) is left alone: its pid means nothing here.
    return match.group("host") == _HOST and not _pid_alive(int(match.group("pid")))


def remove_stale_temps(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete temporaries under ``folder`` whose writing process (same host) is dead.

    Matches only the names this module makes (see ``temp_prefix`` and ``atomic_dir``'s
    ``.tmp-`` folders), so user files are never touched. Returns the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    entries: Iterable[Path] = folder.rglob(".*") if recursive else folder.glob(".*")
    for p in sorted(entries, key=lambda q: len(q.parts)):
        if any(r in p.parents for r in removed):
            continue
        m = _TEMP_DIR_RE.match(p.name) if p.is_dir() else _TEMP_FILE_RE.match(p.name)
        if m is None or not _owner_dead(m):
            continue
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        removed.append(p)
    return removed


def temp_dir_name(name: str) -> str:
    """Name of a temporary folder to be renamed onto ``name`` (see ``remove_stale_temps``)."""
    return f".tmp-{name}-{_HOST}-{os.getpid()}-{os.urandom(3).hex()}"


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary name keeps ``path``'s suffix (libraries such as nibabel pick the
    format from it). On error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp" + sfx, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            # Writers may have replaced the file (nibabel, h5py): set the mode on what is there now.
            os.chmod(tmp_path, default_file_mode() | (stat.S_IMODE(os.stat(tmp_path).st_mode) & 0o111))
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (numpy scalars/arrays converted)."""

    def _default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` atomically (never pickles: object arrays are rejected)."""
    array = np.asarray(array)
    if array.dtype == object:
        raise TypeError("refusing to save an object array (it would need pickle)")
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)
    return Path(path)


def load_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    """``np.load`` with ``allow_pickle=False`` and a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: not a readable .npy file ({exc})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
