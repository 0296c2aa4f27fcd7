"""Execute the notebooks for the documentation site (``make docs`` runs this before Sphinx).

Each ``notebooks/<name>.py`` (jupytext percent format) is executed with nbclient and written, with
its outputs, to ``docs/notebooks/<name>.ipynb`` (generated, not committed), which myst-nb renders
as it is (no execution during the Sphinx build). The notebooks run on ``$BRAINENC_RUN`` when set,
else on the small run of ``docs/notebook_run.toml`` made under ``docs/_build/notebook_data`` (about
30 s the first time, then up to date). A notebook whose source and run did not change is not
executed again.

Usage::

    python docs/build_notebooks.py [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "notebooks"
DATA = ROOT / "docs" / "_build" / "notebook_data"


def _run_dir() -> Path:
    if os.environ.get("BRAINENC_RUN"):
        return Path(os.environ["BRAINENC_RUN"]).expanduser().resolve()
    from brainenc.workflows import run_pipeline

    return run_pipeline(ROOT / "docs" / "notebook_run.toml", subject="subj01", data_dir=DATA)


def _stamp(source: Path, run_dir: Path) -> str:
    h = hashlib.sha256(source.read_bytes())
    for rec in sorted((run_dir / "stages").glob("*.json")):  # stage keys, not timings (a volatile stage reruns)
        h.update(rec.name.encode() + json.loads(rec.read_text()).get("key", "").encode())
    return h.hexdigest()


def build(force: bool = False) -> list[Path]:
    """Execute what is out of date; one builder at a time (a second one waits, then finds it up to date:
    the test suite builds the site from several pytest-xdist workers at once)."""
    import fcntl

    DATA.mkdir(parents=True, exist_ok=True)
    with open(DATA.parent / ".build_notebooks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocking; released when the process ends, even if killed
        return _build(force)


def _build(force: bool) -> list[Path]:
    import jupytext
    import nbclient
    import nbformat

    os.environ.setdefault("BRAINENC_QUIET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = _run_dir()
    OUT.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted((ROOT / "notebooks").glob("*.py")):
        target = OUT / f"{source.stem}.ipynb"
        stamp = _stamp(source, run_dir)
        if not force and target.is_file():
            meta = json.loads(target.read_text()).get("metadata", {}).get("brainenc", {})
            if meta.get("stamp") == stamp:
                continue
        t0 = time.perf_counter()
        nb = jupytext.read(source)
        env = dict(BRAINENC_RUN=str(run_dir), MPLBACKEND="module://matplotlib_inline.backend_inline")
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                    resources={"metadata": {"path": str(ROOT)}}).execute()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        nb.metadata["brainenc"] = {"stamp": stamp, "run": run_dir.name}
        tmp = target.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, target)
        written.append(target)
        print(f"executed {source.relative_to(ROOT)} -> {target.relative_to(ROOT)} in {time.perf_counter() - t0:.1f} s")
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="execute every notebook again")
    build(ap.parse_args().force)
    sys.exit(0)
