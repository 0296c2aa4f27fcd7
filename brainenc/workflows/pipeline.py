"""``brainenc run``: one pipeline spec, one subject, one run folder, the stage graph of the spec's task.

The run (:class:`RunContext`: subject, data root, NSD root, run folder) is separate from the spec;
each task registers its stage graph (:data:`TASKS`; the encoding task's is
:func:`brainenc.workflows.encoding.build_encoding_graph`: ``simulate -> prepare -> features ->
fit.<model> -> evaluate -> report``), and :func:`run_pipeline` builds it once and hands it to the
engine.

One run folder per (pipeline, subject), ``<data root>/runs/<pipeline>/<subject>`` unless ``out``
is given::

    config.resolved.json   the validated spec, every default filled in
    versions.json          python / package versions, git commit
    logs/run.log           everything logged during runs (appended)
    stages/<stage>.json    finished-stage records (key, timings, outputs); see engine.py
    models/<model>/        the fitted estimator, ``save_pretrained``: model.safetensors + config.json
                           (``brainenc.load(run_dir / "models" / name)``); then ridge: alpha.npy,
                           routing: figures/
    train/<model>/         checkpoints of trained models (a killed fit resumes from its last epoch)
    predictions/<model>/<split>.npy
    scores/<model>/<metric>.npy, scores/noise_ceiling.npy, scores/summary.json
    report/                index.md / index.html, ROI tables, maps, figures
    .lock                  present while a run holds the folder (a killed run's lock is taken over)

Prepared datasets and features live in the shared caches (``<data root>/prepared``,
``<data root>/features``), so several pipelines reuse them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from brainenc import __version__
from brainenc._utils.io import (
    exclusive_lock,
    kill_point,
    kill_scope,
    read_json,
    remove_stale_temps,
    write_json,
)
from brainenc._utils.logging import get_logger
from brainenc._utils.paths import features_root, nsd_root as default_nsd_root, prepared_root, resolve_data_dir, runs_root
from brainenc.exceptions import ConfigError
from brainenc.registry import Registry
from brainenc.workflows.engine import Stage, run_stages, select_stages
from brainenc.workflows.spec import PipelineSpec, load_pipeline

__all__ = ["run_pipeline", "RunContext", "TASKS", "register_task", "task_is_per_subject", "build_stages", "run_dir_for",
           "collect_versions", "load_run_config"]

#: the run folder's lock file (held for the duration of a run)
LOCK_NAME = ".lock"

log = get_logger("workflows")


# ----------------------------------------------------------------------------------------------
# run folder bookkeeping
# ----------------------------------------------------------------------------------------------
def run_dir_for(spec: PipelineSpec, subject: str, data_dir=None, out=None) -> Path:
    """The run folder: ``out`` if given, else ``<data root>/runs/<pipeline>/<subject>``."""
    if out:
        return Path(out).expanduser().resolve()
    return runs_root(data_dir) / spec.name / subject


def _git_commit() -> dict | None:
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def collect_versions() -> dict:
    """Python, platform, package versions and the git commit (when run from a checkout)."""
    from importlib import metadata

    pkgs = {}
    for name in ("numpy", "scipy", "h5py", "nibabel", "scikit-learn", "nilearn", "matplotlib", "torch",
                 "torchvision", "safetensors", "open_clip_torch", "timm", "himalaya", "efficientnet-lite-pytorch"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    return {"brainenc": __version__, "python": platform.python_version(), "executable": sys.executable,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "packages": pkgs, "git": _git_commit(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


@contextlib.contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    """Send the ``brainenc`` logger to ``logs/run.log`` (appended) for the duration of a run."""
    root = get_logger()
    path = run_dir / "logs" / "run.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    old_level = root.level
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    except BaseException as exc:
        root.error("run stopped: %s: %s (finished stages are kept; rerun to resume)", type(exc).__name__, exc)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)


# ----------------------------------------------------------------------------------------------
# the run and the task graphs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunContext:
    """Where one run reads and writes: the subject, data root, NSD root and run folder.

    A pipeline spec never names these; the same spec runs for any subject and machine.

    Attributes
    ----------
    subject : str
        ``"subj01"`` .. ``"subj08"``.
    data_dir : Path
        Data root (shared caches ``prepared/``, ``features/``; run folders under ``runs/``).
    nsd_root : Path
        The NSD release (or the simulated one).
    run_dir : Path
        This run's folder.
    """

    subject: str
    data_dir: Path
    nsd_root: Path
    run_dir: Path

    @classmethod
    def create(cls, spec: PipelineSpec, subject: str | None = None, data_dir=None, nsd_root=None,
               out=None) -> "RunContext":
        """Resolve the defaults: data root (argument > ``$BRAINENC_DATA`` > ``~/brainenc_data``),
        NSD root ``<data root>/nsd``, run folder ``<data root>/runs/<pipeline>/<subject>``."""
        from brainenc._utils.validation import check_option, check_subject
        from brainenc.datasets import layout

        if not task_is_per_subject(spec.pipeline.task):
            subject = "cohort" if subject is None else str(subject)
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", subject):
                raise ConfigError(f"run name {subject!r} must be letters, digits, '_', '-', '.'")
        else:
            subject = check_option("subject", check_subject(subject or "subj01"), layout.SUBJECTS)
        data_dir = resolve_data_dir(data_dir)
        nsd = Path(nsd_root).expanduser().resolve() if nsd_root else default_nsd_root(data_dir)
        return cls(subject=subject, data_dir=data_dir, nsd_root=nsd,
                   run_dir=run_dir_for(spec, subject, data_dir, out))

    @property
    def prepared_root(self) -> Path:
        return prepared_root(self.data_dir)

    @property
    def features_root(self) -> Path:
        return features_root(self.data_dir)

    def prepare_config(self, prepare):
        """``prepare`` (a PrepareConfig) for this run's subject."""
        return dataclasses.replace(prepare, subject=self.subject).check()

    def simulation_config(self, simulation):
        """``simulation`` (a SimulationConfig) for this run's subject."""
        return dataclasses.replace(simulation, subject=self.subject)



#: tasks: name -> ``build(spec, run) -> list[Stage]`` (``[pipeline] task = "<name>"``)
TASKS = Registry("task")


def register_task(name: str, build: Callable[[PipelineSpec, RunContext], list[Stage]], *,
                  sections: dict | None = None, per_subject: bool = True, description: str = "") -> None:
    """Register the stage graph of a task (``encoding`` today; decoding, reconstruction, ... later).

    Parameters
    ----------
    name : str
        The ``[pipeline] task`` value.
    build : callable
        ``build(spec, run) -> list[Stage]``; the engine runs the stages it returns.
    sections : dict, optional
        The task's own spec tables: name -> a dataclass (``from_dict`` validates it) or a
        ``parse(table, prefix)`` callable. Given, the spec holds ``[pipeline]``, ``[resources]`` and
        these tables only (``PipelineSpec.sections``); None: the encoding tables.
    per_subject : bool
        False for a task over a whole group (a cohort): the run is not one NSD subject, its
        folder is ``runs/<pipeline>/<run name>`` (``subject`` given to :func:`run_pipeline`, default
        ``"cohort"``) and ``brainenc run --subjects`` does not apply.
    description : str
        One line for listings.
    """
    TASKS.register(name, build, overwrite=True, sections=sections, per_subject=per_subject,
                   description=description)


def task_is_per_subject(task: str) -> bool:
    """Whether ``task`` runs once per NSD subject (``register_task(..., per_subject=...)``)."""
    return bool(TASKS.meta(task).get("per_subject", True))


def build_stages(spec: PipelineSpec, run: RunContext) -> list[Stage]:
    """The stage graph of ``spec``'s task for ``run``."""
    return TASKS.get(spec.pipeline.task)(spec, run)


def run_pipeline(pipeline, subject: str | None = None, data_dir=None, nsd_root=None, out=None,
                 overrides: list[str] | None = None, stages: Sequence[str] | None = None,
                 force: Sequence[str] = ()) -> Path:
    """Run a pipeline spec for one subject, resumably.

    Parameters
    ----------
    pipeline : str or Path
        A TOML path or a bare name under the repository's ``pipelines/`` (``"quickstart"``).
    subject : str, optional
        Subject (default ``"subj01"``); for a task over a group (``per_subject=False``) the run's
        name (default ``"cohort"``).
    data_dir : path, optional
        Data root (argument > ``$BRAINENC_DATA`` > ``~/brainenc_data``).
    nsd_root : path, optional
        NSD release root (default ``<data root>/nsd``).
    out : path, optional
        Run folder (default ``<data root>/runs/<pipeline>/<subject>``).
    overrides : list of str, optional
        ``table.key=value`` overrides (``prepare.zscore=false``, ``fit.ridge.cv=3``).
    stages : sequence of str, optional
        Stages (or groups such as ``fit``) to bring up to date, with what they depend on;
        default: all.
    force : sequence of str
        Stage names to rerun even if up to date.

    Returns
    -------
    Path
        The run folder.

    Raises
    ------
    ConfigError
        Invalid spec or stage name (raised before any work).
    """
    spec = load_pipeline(pipeline, overrides=overrides)
    run = RunContext.create(spec, subject, data_dir, nsd_root, out)
    graph = build_stages(spec, run)
    select_stages(graph, stages)  # unknown stage names fail before any work
    run_dir = run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # one process per run folder; a lock left by a killed run is taken over (see exclusive_lock)
    with exclusive_lock(run_dir / LOCK_NAME, f"run folder {run_dir}"), _run_log(run_dir):
        log.info("run %s for %s -> %s", spec.name, run.subject, run_dir)
        stale = remove_stale_temps(run_dir)  # temporaries of killed runs (atomic writes, checkpoints)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted run", len(stale))
        resolved = spec.resolved()
        resolved["run"] = {"subject": run.subject, "nsd_root": str(run.nsd_root), "data_dir": str(run.data_dir),
                           "source": str(spec.source) if spec.source else None}
        write_json(run_dir / "config.resolved.json", resolved)
        write_json(run_dir / "versions.json", collect_versions())
        results = run_stages(run_dir, graph, targets=stages, force=force)
        ran = [r.name for r in results if r.status == "ran"]
        if not ran:
            log.info("all stages up to date (%s)", ", ".join(r.name for r in results))
        log.info("run finished in %.1f s", time.perf_counter() - t0)
        with kill_scope("run"):
            kill_point("end")  # crash tests: everything is written, the process has not exited
    return run_dir


def load_run_config(run_dir: str | Path) -> dict:
    """The resolved config of a run folder."""
    return read_json(Path(run_dir) / "config.resolved.json")
