"""brainenc._utils.store.KeyedFolderStore: marker, lock, atomic publish, resume, invalidate."""
import os
import signal
import subprocess
import sys
import time

import pytest

from brainenc._utils import io
from brainenc._utils.io import LockedError, write_json
from brainenc._utils.store import KeyedFolderStore

#: holds the lock of entry "k" in a child process; publishes it after <delay> s (or waits to be killed)
HOLDER = r"""
import sys, time
from brainenc._utils.store import KeyedFolderStore
root, delay = sys.argv[1], float(sys.argv[2])
with KeyedFolderStore(root).write("k", marker="theirs\n") as e:
    (e.path / "data.txt").write_text("from the child")
    print("locked", flush=True)
    time.sleep(delay)
print("done", flush=True)
"""


def _holder(root, delay):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(delay)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line == "locked", proc.stderr.read()[-2000:]
    return proc


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_publishes_with_marker_last(tmp_path):
    store = KeyedFolderStore(tmp_path / "root")
    assert store.complete("k") is None
    with store.write("k", marker={"key": "abc"}) as e:
        assert e.existing is None and e.path.name.startswith(".tmp-k-") and e.path.parent == store.root
        assert store.complete("k") is None and not store.path("k").exists()  # nothing final while writing
        assert store.lock_path("k").is_file()
        (e.path / "a.txt").write_text("1")
    final = store.complete("k")
    assert final == store.root / "k" and _names(final) == ["COMPLETE", "a.txt"]
    ref = tmp_path / "ref.json"
    write_json(ref, {"key": "abc"})
    assert (final / "COMPLETE").read_bytes() == ref.read_bytes()  # same bytes as write_json
    assert _names(store.root) == ["k"]  # no lock, no temporary left
    with store.write("k", marker="x") as e:  # a second write finds it complete and writes nothing
        assert e.existing == final and e.path is None
    assert (final / "COMPLETE").read_bytes() == ref.read_bytes() and _names(store.root) == ["k"]


def test_markerless_folder_is_never_returned_and_is_replaced(tmp_path):
    store = KeyedFolderStore(tmp_path)
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "junk").write_text("half written")
    assert store.complete("k") is None
    with store.write("k", marker="m\n") as e:
        assert e.existing is None and not (tmp_path / "k").exists()  # discarded under the lock
        (e.path / "good").write_text("1")
    assert _names(tmp_path / "k") == ["COMPLETE", "good"] and (tmp_path / "k" / "COMPLETE").read_text() == "m\n"


def test_failure_leaves_no_final_folder_and_no_temporary(tmp_path):
    store = KeyedFolderStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with store.write("k") as e:
            (e.path / "a").write_text("1")
            raise KeyboardInterrupt
    assert store.complete("k") is None and list(tmp_path.iterdir()) == []


def test_resumable_work_folder_survives_and_is_reused(tmp_path):
    store = KeyedFolderStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.write("k", resumable=True, scratch=("progress.json",)) as e:
            assert e.path == tmp_path / ".k.partial"
            (e.path / "rows.bin").write_text("first half")
            (e.path / "progress.json").write_text("{}")
            raise RuntimeError("killed")
    assert store.complete("k") is None and _names(tmp_path) == [".k.partial"]
    with store.write("k", resumable=True, marker="done\n", scratch=("progress.json",)) as e:
        assert e.path == tmp_path / ".k.partial" and (e.path / "rows.bin").read_text() == "first half"
        (e.path / "rows.bin").write_text("all rows")
    assert _names(tmp_path / "k") == ["COMPLETE", "rows.bin"]  # scratch removed before the rename
    assert _names(tmp_path) == ["k"]


def test_resumable_killed_between_marker_and_rename_is_published(tmp_path):
    store = KeyedFolderStore(tmp_path)
    work = store.work_path("k")
    work.mkdir()
    (work / "rows.bin").write_text("all")
    (work / "progress.json").write_text("{}")
    (work / "COMPLETE").write_text("done\n")
    with store.write("k", resumable=True, scratch=("progress.json",)) as e:
        assert e.existing == tmp_path / "k" and e.path is None
    assert _names(tmp_path) == ["k"] and _names(tmp_path / "k") == ["COMPLETE", "rows.bin"]


def test_resumable_failure_keeps_progress_but_dead_temporaries_inside_go(tmp_path):
    store = KeyedFolderStore(tmp_path)
    work = store.work_path("k")
    work.mkdir()
    dead = work / f".rows.npy.{io._HOST}-999999999.abc.tmp.npy"  # an atomic write of a dead process
    dead.write_text("x")
    with store.write("k", resumable=True) as e:
        assert not dead.exists() and e.path == work


def test_complete_entry_published_by_someone_else_is_kept(tmp_path):
    store = KeyedFolderStore(tmp_path)
    for resumable in (False, True):
        name = f"k{int(resumable)}"
        with store.write(name, resumable=resumable, marker="ours\n") as e:
            (e.path / "ours").write_text("1")
            theirs = tmp_path / name  # a writer that takes no lock renames its result in meanwhile
            theirs.mkdir()
            (theirs / "theirs").write_text("1")
            (theirs / "COMPLETE").write_text("theirs\n")
        assert _names(tmp_path / name) == ["COMPLETE", "theirs"]
        assert (tmp_path / name / "COMPLETE").read_text() == "theirs\n"
    assert _names(tmp_path) == ["k0", "k1"]  # our work folders are gone


def test_publish_replaces_leftovers_and_discard_puts_back_a_complete_folder(tmp_path):
    store = KeyedFolderStore(tmp_path)
    final = tmp_path / "key"
    final.mkdir()  # a leftover without marker (not ours) is replaced
    (final / "junk").write_text("x")
    tmp = tmp_path / ".tmp-a"
    tmp.mkdir()
    (tmp / "COMPLETE").write_text("{}")
    store._publish(tmp, final)
    assert (final / "COMPLETE").is_file() and not (final / "junk").exists() and not tmp.exists()
    (final / "theirs").write_text("1")  # another process's complete result is kept and ours dropped
    tmp2 = tmp_path / ".tmp-b"
    tmp2.mkdir()
    (tmp2 / "COMPLETE").write_text("{}")
    store._publish(tmp2, final)
    assert (final / "theirs").is_file() and not tmp2.exists()
    store._discard_incomplete(final)  # a folder that became complete before the discard is put back
    assert (final / "theirs").is_file() and _names(tmp_path) == ["key"]


def test_invalidate(tmp_path):
    store = KeyedFolderStore(tmp_path)
    with store.write("k", marker="1\n") as e:
        (e.path / "v").write_text("old")
    assert store.invalidate("k") is True
    assert store.complete("k") is None and list(tmp_path.iterdir()) == []
    assert store.invalidate("k") is False
    # under a write: the complete entry found is discarded and rebuilt; resumable progress forgotten
    for resumable in (False, True):
        with store.write("k", marker="1\n") as e:
            (e.path / "v").write_text("old")
        if resumable:
            store.work_path("k").mkdir()
            (store.work_path("k") / "progress.json").write_text("stale")
        with store.write("k", resumable=resumable, marker="2\n") as e:
            assert e.existing is not None
            e.invalidate()
            assert e.existing is None and e.path.is_dir() and list(e.path.iterdir()) == []
            assert store.complete("k") is None
            (e.path / "v").write_text("new")
        assert (tmp_path / "k" / "v").read_text() == "new" and (tmp_path / "k" / "COMPLETE").read_text() == "2\n"
        assert _names(tmp_path) == ["k"]
        store.invalidate("k")


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    store = KeyedFolderStore(tmp_path, what="this test entry")
    holder = _holder(tmp_path, 120)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockedError) as err:
            with store.write("k"):
                pytest.fail("entered while another process holds the lock")
        assert time.monotonic() - t0 < 5
        msg = str(err.value)
        assert str(store.lock_path("k")) in msg and f"pid {holder.pid}" in msg and "\n" not in msg
        with pytest.raises(LockedError):
            store.invalidate("k")
        assert store.complete("k") is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # the killed holder's lock file and temporary folder are left behind, and block nothing
    assert store.lock_path("k").is_file() and [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-k-")]
    with store.write("k", marker="mine\n") as e:
        assert e.existing is None
        (e.path / "data.txt").write_text("mine")
    assert _names(tmp_path) == ["k"] and (tmp_path / "k" / "data.txt").read_text() == "mine"


def test_waiting_writer_finds_the_holders_entry_complete(tmp_path):
    store = KeyedFolderStore(tmp_path)
    holder = _holder(tmp_path, 1.5)
    try:
        with store.write("k", marker="mine\n", wait=None) as e:  # waits for the holder, then builds nothing
            assert e.existing == tmp_path / "k" and e.path is None
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (tmp_path / "k" / "COMPLETE").read_text() == "theirs\n"
    assert (tmp_path / "k" / "data.txt").read_text() == "from the child" and _names(tmp_path) == ["k"]
    holder = _holder(tmp_path / "b", 60)
    try:  # a bounded wait gives up with the one-line error
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            with KeyedFolderStore(tmp_path / "b").write("k", wait=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_locked_error_subclass_and_lock_in_this_process(tmp_path):
    class MyLocked(LockedError):
        pass

    store = KeyedFolderStore(tmp_path, locked_error=MyLocked)
    with store.lock("k"):
        assert store.lock_path("k").read_text().split()[0] == str(os.getpid())
        with pytest.raises(MyLocked, match=f"pid {os.getpid()}"):
            with store.write("k"):
                pass
    assert not store.lock_path("k").exists()


def test_stale_lock_files_of_dead_writers_are_swept(tmp_path):
    store = KeyedFolderStore(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = store.lock_path("old")
    stale.write_text(f"{dead.stdout.strip()} {io._HOST}\n")
    live = store.lock_path("busy")
    live.write_text(f"{os.getpid()} {io._HOST}\n")
    foreign = store.lock_path("elsewhere")
    foreign.write_text("1 otherhost\n")
    with store.write("k"):
        pass
    assert not stale.exists() and live.exists() and foreign.exists()


def test_names_are_single_components(tmp_path):
    store = KeyedFolderStore(tmp_path)
    for bad in ("", ".hidden", "a/b", "..", "../x"):
        with pytest.raises(ValueError):
            store.complete(bad)
    assert store.path("k") == tmp_path / "k" and store.lock_path("k") == tmp_path / ".k.lock"
