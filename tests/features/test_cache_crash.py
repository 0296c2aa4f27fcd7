"""Feature cache under SIGKILL: locks of killed writers, stale temporaries, bitwise-identical resume."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from brainenc.features import FeatureSpec, extract_features
from brainenc.features.cache import CacheLockedError

SPECS = {
    "gabor": dict(backbone="gabor", image_size=32, batch_size=2, options={"grid": 4, "cycles_per_image": [2, 4, 8]}),
    "enet": dict(backbone="efficientnet-lite0", pretrained="random", seed=1, image_size=32, batch_size=2,
                 layer="blocks.5", tokens="patch", pooled="mean"),
}
N_IMAGES = 10  # batches of 2: the kills below land in the 3rd batch (rows 4-5)

CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(1)
import brainenc.features.cache as cache
from brainenc._utils.io import temp_dir_name
from brainenc.features import ArrayImages, FeatureSpec, extract_features

SPECS = json.loads(sys.argv[1])
mode, images, jobs = sys.argv[2], np.load(sys.argv[3]), sys.argv[4:]

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

class Src(ArrayImages):
    reads = 0
    def read(self, ids):
        Src.reads += 1
        if mode == "read" and Src.reads == 3:  # killed while computing the 3rd batch
            die()
        return super().read(ids)

if mode == "rows":  # rows 4-5 flushed to the memmap, progress.json still says 4
    real_write_json = cache.write_json
    def write_json(path, obj, **kw):
        if Path(path).name == "progress.json" and obj["n_done"] == 6:
            die()
        return real_write_json(path, obj, **kw)
    cache.write_json = write_json
elif mode in ("temp", "after"):  # progress.json (n_done=6) written as a temporary / just renamed
    real_replace = os.replace
    def replace(src, dst):
        hit = os.path.basename(dst) == "progress.json" and json.loads(Path(src).read_text())["n_done"] == 6
        if hit and mode == "temp":
            die()
        real_replace(src, dst)
        if hit:
            die()
    os.replace = replace
elif mode == "finish":  # arrays renamed to their final names, COMPLETE not written yet
    import brainenc._utils.store as store
    real_write_text = store.write_text
    def write_text(path, text):
        if Path(path).name == "COMPLETE":
            die()
        return real_write_text(path, text)
    store.write_text = write_text

if mode == "hold":  # hold an entry's lock (and leave a temporary folder), wait to be killed
    folder = Path(jobs[0])
    with cache.entry_store(folder.parent).lock(folder.name):
        (folder.parent / temp_dir_name(folder.name)).mkdir()
        print("locked", flush=True)
        time.sleep(120)

out = []
for job in jobs:
    which, root = job.split("=", 1)
    Src.reads = 0
    fs = extract_features(Src(images), np.arange(len(images)), FeatureSpec(**SPECS[which]), root)
    out.append({"reads": Src.reads, "hit": fs.cache_hit, "path": str(fs.path)})
print(json.dumps(out))
"""


def _child(mode, images_path, jobs, **kw):
    env = dict(os.environ, BRAINENC_QUIET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(SPECS), mode, str(images_path), *jobs],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _entry(root):
    (folder,) = [p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith(".")]
    return folder


def _work(root):
    """The resumable work folder ``<backbone>/.<key>.partial`` of the only entry under ``root``."""
    (folder,) = [p for p in root.glob("*/.*.partial") if p.is_dir()]
    return folder


def _lock_of(folder):
    """The lock file of the entry whose final folder is ``folder``."""
    return folder.parent / f".{folder.name}.lock"


@pytest.fixture
def images_file(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "images.npy"
    np.save(path, rng.integers(0, 256, size=(N_IMAGES, 40, 48, 3), dtype=np.uint8))
    return path


@pytest.mark.slow
def test_sigkill_anywhere_resumes_bitwise(tmp_path, images_file):
    # kill point -> (backbone, batches the resumed run computes, of 5); "after": rows 4-5 must be on disk
    # before progress.json counts them, or the resumed result differs from the reference
    kills = {"read": ("enet", 3), "rows": ("gabor", 3), "temp": ("gabor", 3), "after": ("enet", 2),
             "finish": ("gabor", 0)}
    for mode, (which, _) in kills.items():
        proc = _child(mode, images_file, [f"{which}={tmp_path / mode}"])
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == -signal.SIGKILL, (mode, err[-2000:])
        work = _work(tmp_path / mode)
        assert not [p for p in work.parent.iterdir() if not p.name.startswith(".")], mode  # nothing final
        folder = work.parent / work.name[1:-len(".partial")]
        assert not (work / "COMPLETE").exists(), mode
        assert _lock_of(folder).exists(), mode  # left behind by the killed writer ...
        assert (work / "progress.json").exists(), mode
        temps = [p.name for p in work.iterdir() if ".tmp" in p.name]
        assert bool(temps) == (mode == "temp"), (mode, temps)
    jobs = [f"{which}={tmp_path / mode}" for mode, (which, _) in kills.items()]
    jobs += [f"gabor={tmp_path / 'ref_gabor'}", f"enet={tmp_path / 'ref_enet'}"]
    proc = _child("run", images_file, jobs)  # ... and does not block this run
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    results = json.loads(out.strip().splitlines()[-1])
    for (mode, (which, n_batches)), res in zip(kills.items(), results):
        assert not res["hit"] and res["reads"] == n_batches, (mode, res)
        ref = _entry(tmp_path / f"ref_{which}")
        folder = _entry(tmp_path / mode)
        assert folder.name == ref.name  # same key
        for name in ("tokens.npy", "pooled.npy", "image_ids.npy"):
            a, b = np.load(folder / name), np.load(ref / name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (mode, name)
        left = sorted(p.name for p in folder.iterdir())
        assert left == ["COMPLETE", "image_ids.npy", "meta.json", "pooled.npy", "tokens.npy"], (mode, left)
        assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], mode  # work folder and lock gone
    # the reference runs were complete from the start: 5 batches each
    assert [r["reads"] for r in results[-2:]] == [5, 5]


@pytest.mark.slow
def test_live_lock_blocks_killed_lock_does_not(tmp_path, images_file):
    images = np.load(images_file)
    spec = FeatureSpec(**SPECS["gabor"])
    first = extract_features(images, np.arange(4), spec, tmp_path)
    folder = first.path
    shutil.rmtree(folder)  # the entry's folder is known; it now has to be computed again
    holder = _child("hold", images_file, [str(folder)])
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()[-2000:]
        with pytest.raises(CacheLockedError) as err:
            extract_features(images, np.arange(4), spec, tmp_path)
        msg = str(err.value)
        assert str(_lock_of(folder)) in msg and f"pid {holder.pid}" in msg and "\n" not in msg
        assert not (folder / "COMPLETE").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    stale_dirs = [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    assert _lock_of(folder).exists() and len(stale_dirs) == 1
    again = extract_features(images, np.arange(4), spec, tmp_path)
    assert not again.cache_hit and again.key == first.key
    assert np.asarray(again.tokens).tobytes() == np.asarray(first.tokens).tobytes()
    assert not _lock_of(folder).exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]  # swept: its writer is dead


@pytest.mark.parametrize("flock", [True, False])  # False: a file system without flock (pid-file fallback)
def test_lock_in_this_process_and_stale_pid_file(tmp_path, monkeypatch, flock):
    import fcntl

    from brainenc.features.cache import entry_store

    if not flock:
        def no_flock(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "entry"
    store = entry_store(tmp_path)
    lock = _lock_of(folder)
    with store.lock(folder.name):
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(CacheLockedError, match=f"pid {os.getpid()}"):
            with store.lock(folder.name):
                pass
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())  # an old-style pid file of a dead process
    with store.lock(folder.name):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()
