"""Atomic writes, safe reads, stale-temporary sweeping and exclusive folder locks.

Every file brainenc writes goes through here: written to a temporary file in the same folder,
fsynced, then renamed into place, so a killed process never leaves a half-written output under
the final name. Temporaries carry their writer's host and pid, so a later run removes those of
dead processes (:func:`remove_stale_temps`). :func:`exclusive_lock` keeps two processes out of
one folder; a lock whose holder died never blocks.

Crash tests: ``BRAINENC_TEST_KILL_AT=<scope>:<event>:<n>`` makes :func:`kill_point` SIGKILL the
process at the n-th matching event (see there). Nothing else reads that variable.
"""
from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from brainenc.exceptions import BrainencError, DataFormatError

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
    "jsonable",
    "exclusive_lock",
    "LockedError",
    "kill_point",
    "kill_scope",
    "sort_safetensors_metadata",
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
        kill_point(f"write:{path.name}")  # crash tests: the temporary is written, the rename not done
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


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (numpy scalars/arrays converted, keys sorted)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n")


def jsonable(obj: Any) -> Any:
    """``obj`` exactly as :func:`read_json` returns it after :func:`write_json`.

    Keys sorted, tuples as lists, numpy values and paths converted; raises ``TypeError`` for
    what JSON cannot hold. Code that passes a value on in memory *and* stores it (stage outputs)
    uses this so that readers see the same value either way.
    """
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


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


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted (in place).

    The safetensors library serialises the metadata from a Rust ``HashMap``, whose iteration
    order changes from process to process: two runs writing the same tensors and the same
    metadata (two keys or more) produce different bytes. Call this on the file just written (the
    temporary inside :func:`atomic_path`) so that equal content gives equal files.
    """
    path = Path(path)
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataFormatError(f"{path}: not a safetensors file (unreadable header)") from None
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        ordered = {"__metadata__": dict(sorted(meta.items()))}
        ordered.update((k, v) for k, v in header.items() if k != "__metadata__")  # the library's tensor order
        new = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) <= n:  # the same entries: never longer; pad with spaces as the library does
            fh.seek(8)
            fh.write(new.ljust(n, b" "))
            return
        data = fh.read()
    size = -(-len(new) // 8) * 8
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", size) + new.ljust(size, b" ") + data)


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


# ----------------------------------------------------------------------------------------------
# exclusive folder locks
# ----------------------------------------------------------------------------------------------
class LockedError(BrainencError, RuntimeError):
    """Another live process holds the lock."""


def _lock_holder(path: Path) -> tuple[int | None, str]:
    try:
        parts = path.read_text().split()
        return int(parts[0]), parts[1] if len(parts) > 1 else "?"
    except (OSError, ValueError, IndexError):
        return None, "?"


def _locked_error(path: Path, what: str) -> LockedError:
    pid, host = _lock_holder(path)
    who = f"pid {pid} on {host}" if pid is not None else "another process"
    return LockedError(f"{path}: {what} is in use by {who}; wait for it to finish (or stop it) and retry")


#: use ``flock`` (the kernel releases it when the holder dies); False: an O_EXCL pid file whose
#: holder is checked for liveness (file systems without flock; also set by tests)
_USE_FLOCK = True


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str = "this folder") -> Iterator[Path]:
    """Hold an exclusive lock on the file ``path`` (created; removed on release).

    Never waits: a live holder (this or another process on this host, or a process holding a
    ``flock`` through a shared file system) raises :class:`LockedError` at once with a one-line
    message naming the file and the holder's pid. A lock left by a killed process is taken over:
    its ``flock`` died with it, and without ``flock`` a pid file whose pid is dead on this host
    is replaced.

    Parameters
    ----------
    path : path
        The lock file (its folder is created).
    what : str
        What the lock protects, for the message ("run folder /x").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = None
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if fcntl is not None and _USE_FLOCK:
        for _ in range(50):
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
            except FileExistsError:
                try:
                    fd, created = os.open(path, os.O_RDWR), False
                except FileNotFoundError:  # released meanwhile
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _locked_error(path, what) from None
            except OSError:  # no flock on this file system: fall back to a pid file
                os.close(fd)
                fd = None
                if created:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                break
            try:  # the holder before us may have unlinked the file between our open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        else:
            raise LockedError(f"{path}: could not take the lock (the lock file keeps being replaced)")
    if fd is None:
        fd = _pidfile_open(path, what)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {_HOST}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding it: a waiter that opened this inode retries
        os.close(fd)


def _pidfile_open(path: Path, what: str) -> int:
    import time

    for _ in range(100):
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        except FileExistsError:
            pid, host = _lock_holder(path)
            if pid is None:  # created but not yet written by its holder (or garbage): give it a moment
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < 2.0:
                    time.sleep(0.05)
                    continue
            elif host not in (_HOST, "?") or _pid_alive(pid):  # "?": a pid-only file (older brainenc), this host
                raise _locked_error(path, what) from None
            with contextlib.suppress(FileNotFoundError):  # its holder is dead: take the lock over
                path.unlink()
    raise LockedError(f"{path}: could not take the lock")


# ----------------------------------------------------------------------------------------------
# crash-test hook
# ----------------------------------------------------------------------------------------------
_kill_scope: contextvars.ContextVar[str] = contextvars.ContextVar("brainenc_kill_scope", default="-")
_kill_counts: dict[str, int] = {}


@contextlib.contextmanager
def kill_scope(name: str) -> Iterator[None]:
    """Name the scope (a stage: ``"fit.ridge"``; ``"simulate"``, ``"run"``) of the kill points inside."""
    token = _kill_scope.set(name)
    try:
        yield
    finally:
        _kill_scope.reset(token)


def kill_point(event: str) -> None:
    """Test hook: SIGKILL this process at the n-th event matching ``$BRAINENC_TEST_KILL_AT``.

    The variable reads ``<scope>:<event>:<n>`` (``fnmatch`` patterns for scope and event), e.g.
    ``fit.ridge:write:alpha.npy:1`` (the first atomic write of ``alpha.npy`` in stage
    ``fit.ridge``, after its temporary is written and before the rename) or
    ``simulate:stimuli:20``. Events: ``write:<file name>`` (:func:`atomic_path`), ``start`` /
    ``end`` of a stage (the engine; ``end`` is after its record), ``stimuli`` (each image written
    by the simulator), ``checkpoint`` (after a training checkpoint), ``run:end`` (the pipeline
    finished). Unset (always, outside tests), this returns at once.
    """
    spec = os.environ.get("BRAINENC_TEST_KILL_AT")
    if not spec:
        return
    try:
        scope_pat, rest = spec.split(":", 1)
        event_pat, n = rest.rsplit(":", 1)
        n = int(n)
    except ValueError:
        raise ValueError(f"BRAINENC_TEST_KILL_AT={spec!r}: expected <scope>:<event>:<n>") from None
    if fnmatch.fnmatchcase(_kill_scope.get(), scope_pat) and fnmatch.fnmatchcase(event, event_pat):
        _kill_counts[spec] = _kill_counts.get(spec, 0) + 1
        if _kill_counts[spec] == n:
            os.kill(os.getpid(), signal.SIGKILL)
