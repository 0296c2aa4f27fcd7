"""``brainenc run --subjects``: one pipeline spec for several subjects, locally or on a SLURM cluster.

Each subject is an ordinary single-subject run (:func:`brainenc.workflows.run_pipeline`) in its own
run folder, so each job is resumable exactly as a single run: rerunning the same command skips
finished stages and redoes only what a killed or failed job left. Executors:

``local``
    a process pool (``spawn``) of ``min(n_subjects, cores // cpus, available memory // memory_gb)``
    workers (``[resources]`` of the spec, or ``--jobs``); each worker's torch/BLAS threads are
    ``cores // workers``.
``slurm``
    one job per subject through `submitit <https://github.com/facebookincubator/submitit>`_
    (``pip install 'brainenc[cluster]'``): partition, time, GPUs, memory and CPUs from ``[resources]``
    or flags; job logs under ``<runs>/<pipeline>/slurm/``. submitit ships the job's arguments (strings
    and paths) to the node with cloudpickle; no data or weights travel that way.
``serial``
    one subject after another in this process (debugging).

When the spec simulates missing subjects, the simulations run here first, one after another: the
simulator writes shared files (design, stimuli) in the NSD root and allows one writer at a time.

When every subject has finished, :func:`write_summary` writes the table across subjects
(``<runs>/<pipeline>/summary/summary.{csv,md,json}``): per subject and model the mean and median
test r, the mean noise-ceiling-normalised score and the per-ROI means, plus the mean and standard
deviation over subjects.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import io
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from brainenc._utils.io import read_json, write_json, write_text
from brainenc._utils.logging import get_logger, progress
from brainenc._utils.paths import nsd_root as default_nsd_root, resolve_data_dir, runs_root
from brainenc.exceptions import BrainencError, ConfigError, MissingDependencyError

__all__ = ["parse_subjects", "plan_local_workers", "run_subjects", "SubjectOutcome", "MultiRunResult",
           "write_summary", "summary_rows", "EXECUTORS", "TABLE_FAMILIES"]

log = get_logger("workflows")

EXECUTORS = ("local", "slurm", "serial")


def parse_subjects(text: str | Sequence[str]) -> list[str]:
    """``"subj01,subj02"``, ``"1,2"``, ``"subj01-subj04"`` or ``"all"`` -> sorted unique NSD subject names.

    Raises
    ------
    ConfigError
        An empty list or a subject NSD does not have (one line naming it).
    """
    from brainenc._utils.validation import check_option, check_subject
    from brainenc.datasets import layout

    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if not items:
        raise ConfigError("'--subjects' is empty; give e.g. subj01,subj02 or all")
    out: list[str] = []
    for item in items:
        if item == "all":
            out.extend(layout.SUBJECTS)
            continue
        if "-" in item:
            lo, hi = (check_option("subjects", check_subject(x), layout.SUBJECTS) for x in item.split("-", 1))
            i, j = layout.SUBJECTS.index(lo), layout.SUBJECTS.index(hi)
            if i > j:
                raise ConfigError(f"'--subjects' range {item!r} runs backwards")
            out.extend(layout.SUBJECTS[i:j + 1])
            continue
        out.append(check_option("subjects", check_subject(item), layout.SUBJECTS))
    return sorted(set(out), key=layout.SUBJECTS.index)


def _available_memory_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available / 2**30
    except ImportError:  # pragma: no cover - psutil comes with the dev stack; Linux fallback
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        except (ValueError, OSError, AttributeError):
            return math.inf


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_local_workers(n_subjects: int, *, cpus: int = 1, memory_gb: float = 4.0, jobs: int | None = None,
                       cores: int | None = None, available_gb: float | None = None) -> tuple[int, int]:
    """How many subjects the local executor runs at once, and the threads each gets.

    Parameters
    ----------
    n_subjects : int
    cpus : int
        Cores one subject needs (``[resources] cpus``).
    memory_gb : float
        Peak memory of one subject's run (``[resources] memory_gb``).
    jobs : int, optional
        An explicit worker count (``--jobs``); still capped by ``n_subjects``.
    cores, available_gb : optional
        This machine's usable cores and available memory (measured when omitted).

    Returns
    -------
    (workers, threads) : tuple of int
        ``workers = min(n_subjects, cores // cpus, available_gb // memory_gb)`` (at least 1),
        ``threads = max(1, cores // workers)``.
    """
    cores = _cpu_count() if cores is None else int(cores)
    available_gb = _available_memory_gb() if available_gb is None else float(available_gb)
    if jobs is not None:
        if int(jobs) < 1:
            raise ConfigError(f"'--jobs' must be >= 1; {jobs!r} was provided")
        workers = min(int(jobs), n_subjects)
    else:
        by_mem = int(available_gb // memory_gb) if math.isfinite(available_gb) else n_subjects
        workers = max(1, min(n_subjects, max(1, cores // max(1, cpus)), by_mem))
    return workers, max(1, cores // workers)


@dataclasses.dataclass
class SubjectOutcome:
    """How one subject's run ended.

    Attributes
    ----------
    subject : str
    run_dir : Path
    status : str
        ``"ok"``, ``"failed"`` or ``"submitted"`` (SLURM, not waited for).
    seconds : float
    error : str
        One line (``"DataFormatError: ..."``) when failed.
    job_id : str
        The SLURM job id (slurm executor).
    """

    subject: str
    run_dir: Path
    status: str
    seconds: float = 0.0
    error: str = ""
    job_id: str = ""


@dataclasses.dataclass
class MultiRunResult:
    """What :func:`run_subjects` returns.

    Attributes
    ----------
    pipeline : str
        The spec's name.
    outcomes : list of SubjectOutcome
        In subject order.
    summary_dir : Path or None
        Where the summary table was written (None until every subject succeeded).
    """

    pipeline: str
    outcomes: list
    summary_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return all(o.status == "ok" for o in self.outcomes)

    @property
    def failed(self) -> list:
        return [o for o in self.outcomes if o.status == "failed"]


def _set_threads(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["BRAINENC_QUIET"] = "1"  # one progress bar (the driver's), not interleaved ones


def _run_one(pipeline: str, subject: str, data_dir: str, nsd_root: str, out: str | None,
             overrides: list[str], stages: list[str] | None, threads: int | None) -> dict:
    """One subject's run in a worker process or SLURM job (top level: spawn and submitit import it)."""
    if threads:
        _set_threads(threads)
        import torch

        torch.set_num_threads(threads)
    from brainenc.workflows.pipeline import run_pipeline

    t0 = time.perf_counter()
    try:
        run_dir = run_pipeline(pipeline, subject=subject, data_dir=data_dir, nsd_root=nsd_root, out=out,
                               overrides=overrides, stages=stages)
    except BrainencError as exc:  # expected failures: one line, the run folder keeps what finished
        return {"subject": subject, "status": "failed", "seconds": time.perf_counter() - t0,
                "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a bug in one subject must not lose the others' results
        return {"subject": subject, "status": "failed", "seconds": time.perf_counter() - t0,
                "error": f"{type(exc).__name__}: {exc} (see logs/run.log of its run folder)"}
    return {"subject": subject, "status": "ok", "seconds": time.perf_counter() - t0, "run_dir": str(run_dir)}


def _slurm_executor(folder: Path, resources, name: str, cluster: str | None):
    try:
        import submitit
    except ImportError:
        raise MissingDependencyError("'--executor slurm' needs submitit: pip install 'brainenc[cluster]'") from None
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster or "slurm")
    params: dict[str, Any] = {"name": f"brainenc-{name}", "timeout_min": int(resources.time_min),
                              "mem_gb": float(resources.memory_gb), "cpus_per_task": int(resources.cpus),
                              "nodes": 1, "tasks_per_node": 1}
    if resources.gpus:
        params["gpus_per_node"] = int(resources.gpus)
    if ex.cluster == "slurm":
        if resources.partition:
            params["slurm_partition"] = resources.partition
        if resources.slurm:
            params["slurm_additional_parameters"] = dict(resources.slurm)
    ex.update_parameters(**params)
    return ex


def run_subjects(pipeline, subjects: str | Sequence[str], *, executor: str = "local", jobs: int | None = None,
                 data_dir=None, nsd_root=None, out=None, overrides: list[str] | None = None,
                 stages: Sequence[str] | None = None, resources: dict | None = None, wait: bool = True,
                 slurm_cluster: str | None = None) -> MultiRunResult:
    """Run a pipeline spec for several subjects; write the summary table when all succeed.

    Parameters
    ----------
    pipeline : str or Path
        A TOML path or a name under ``pipelines/``.
    subjects : str or sequence of str
        See :func:`parse_subjects` (``"subj01,subj02"``, ``"all"``).
    executor : {"local", "slurm", "serial"}
    jobs : int, optional
        Local executor: subjects at once (default from ``[resources]`` and this machine).
    data_dir, nsd_root : path, optional
        As :func:`~brainenc.workflows.run_pipeline`.
    out : path, optional
        A root folder: subject ``s`` runs in ``out/s`` (default ``<data root>/runs/<pipeline>/<s>``).
    overrides : list of str, optional
        ``table.key=value`` overrides applied to every subject.
    stages : sequence of str, optional
        Stages to bring up to date (default all).
    resources : dict, optional
        Overrides of the spec's ``[resources]`` table (``{"partition": "gpu", "gpus": 1}``).
    wait : bool
        SLURM: wait for the jobs and summarise (default); ``False`` returns after submission.
    slurm_cluster : str, optional
        submitit's ``cluster`` for the slurm executor (``None`` = SLURM; ``"local"`` / ``"debug"``
        run the same submission path on this machine, as the tests do).

    Returns
    -------
    MultiRunResult

    Raises
    ------
    ConfigError
        Bad spec, subject list, executor or resources, before any work starts.
    """
    from brainenc._utils.validation import check_option
    from brainenc.config import from_dict, to_dict
    from brainenc.workflows.engine import select_stages
    from brainenc.workflows.pipeline import RunContext, build_stages, run_pipeline
    from brainenc.workflows.spec import ResourceConfig, load_pipeline, resolve_pipeline_path

    executor = check_option("executor", executor, EXECUTORS)
    names = parse_subjects(subjects)
    spec = load_pipeline(pipeline, overrides=overrides)
    from brainenc.workflows.pipeline import task_is_per_subject

    if not task_is_per_subject(spec.pipeline.task):
        raise ConfigError(f"the {spec.pipeline.task} task runs once over a whole group; run it without --subjects")
    res = from_dict(ResourceConfig, dict(to_dict(spec.resources), **(resources or {})), _prefix="resources.")
    data_dir = resolve_data_dir(data_dir)
    nsd = Path(nsd_root).expanduser().resolve() if nsd_root else default_nsd_root(data_dir)
    root = Path(out).expanduser().resolve() if out else runs_root(data_dir) / spec.name
    runs = {s: RunContext.create(spec, s, data_dir, nsd, root / s) for s in names}
    select_stages(build_stages(spec, runs[names[0]]), stages)  # unknown stage names fail before any work
    path = str(resolve_pipeline_path(pipeline))
    stage_list = list(stages) if stages else None
    ov = list(overrides or [])

    if spec.simulate:  # the simulator allows one writer per NSD root: simulate here, one subject at a time
        for s in progress(names, desc="simulate", unit="subject"):
            run_pipeline(path, subject=s, data_dir=data_dir, nsd_root=nsd, out=runs[s].run_dir, overrides=ov,
                         stages=["simulate"])

    t0 = time.perf_counter()
    outcomes: dict[str, SubjectOutcome] = {}
    args = {s: (path, s, str(data_dir), str(nsd), str(runs[s].run_dir), ov, stage_list) for s in names}
    if executor == "serial":
        for s in progress(names, desc=f"{spec.name}: subjects", unit="subject"):
            outcomes[s] = _outcome(runs[s].run_dir, _run_one(*args[s], None))
            _log_outcome(outcomes[s])
    elif executor == "local":
        workers, threads = plan_local_workers(len(names), cpus=res.cpus, memory_gb=res.memory_gb, jobs=jobs)
        log.info("%s: %d subjects, %d at once, %d thread(s) each", spec.name, len(names), workers, threads)
        ctx = multiprocessing.get_context("spawn")  # no forked torch / thread-pool state in the workers
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_run_one, *args[s], threads): s for s in names}
            for fut in progress(cf.as_completed(futures), desc=f"{spec.name}: subjects", total=len(names),
                                unit="subject"):
                s = futures[fut]
                try:
                    outcomes[s] = _outcome(runs[s].run_dir, fut.result())
                except Exception as exc:  # noqa: BLE001 - a worker killed by the OS (memory) and the like
                    outcomes[s] = SubjectOutcome(s, runs[s].run_dir, "failed",
                                                 error=f"worker died: {type(exc).__name__}: {exc}")
                _log_outcome(outcomes[s])
    else:
        folder = root / "slurm"
        ex = _slurm_executor(folder, res, spec.name, slurm_cluster)
        threads = int(res.cpus)
        with ex.batch():
            pending = {s: ex.submit(_run_one, *args[s], threads) for s in names}
        ids = {s: str(job.job_id) for s, job in pending.items()}
        log.info("%s: submitted %d job(s) (%s); logs under %s", spec.name, len(names),
                 ", ".join(f"{s}={ids[s]}" for s in names), folder)
        for s in names:
            outcomes[s] = SubjectOutcome(s, runs[s].run_dir, "submitted", job_id=ids[s])
        if wait:
            for s in progress(names, desc=f"{spec.name}: subjects", unit="subject"):
                try:
                    outcomes[s] = _outcome(runs[s].run_dir, pending[s].result())
                except Exception as exc:  # noqa: BLE001 - the job itself failed (time limit, node loss, ...)
                    outcomes[s] = SubjectOutcome(s, runs[s].run_dir, "failed",
                                                 error=f"job {ids[s]} failed: {str(exc).strip().splitlines()[-1:]}")
                outcomes[s].job_id = ids[s]
                _log_outcome(outcomes[s])
    result = MultiRunResult(spec.name, [outcomes[s] for s in names])
    log.info("%s: %d/%d subjects ok in %.1f s", spec.name, sum(o.status == "ok" for o in result.outcomes),
             len(names), time.perf_counter() - t0)
    if result.ok:
        result.summary_dir = write_summary(root / "summary", {o.subject: o.run_dir for o in result.outcomes},
                                           pipeline=spec.name)
    return result


def _outcome(run_dir: Path, rec: dict) -> SubjectOutcome:
    return SubjectOutcome(rec["subject"], Path(rec.get("run_dir", run_dir)), rec["status"],
                          float(rec.get("seconds", 0.0)), rec.get("error", ""))


def _log_outcome(o: SubjectOutcome) -> None:
    if o.status == "ok":
        log.info("%s finished in %.1f s: %s", o.subject, o.seconds, o.run_dir)
    else:
        log.error("%s failed: %s", o.subject, o.error)


# ----------------------------------------------------------------------------------------------
# the table across subjects
# ----------------------------------------------------------------------------------------------
def summary_rows(run_dirs: dict[str, Path]) -> list[dict]:
    """One row per (subject, model) from each run's ``scores/summary.json``.

    Columns: ``subject``, ``model``, ``n_test``, ``r_mean``, ``r_median``, ``nc_norm_mean`` and
    ``nc_norm/<roi>`` for every ROI of the run (family prefix dropped when unambiguous).

    Raises
    ------
    DataFormatError
        A run without scores (naming its folder).
    """
    from brainenc.exceptions import DataFormatError

    rows = []
    for subject, run_dir in run_dirs.items():
        path = Path(run_dir) / "scores" / "summary.json"
        if not path.is_file():
            raise DataFormatError(f"{path}: missing; the run of {subject} has not been evaluated")
        summ = read_json(path)
        for model in summ.get("model_order") or sorted(summ["models"]):
            m = summ["models"][model]
            row: dict[str, Any] = {"subject": subject, "model": model, "n_test": summ.get("n_test"),
                                   "r_mean": m["r"]["mean"], "r_median": m["r"]["median"]}
            if "nc_norm" in m:
                row["nc_norm_mean"] = m["nc_norm"]["mean"]
                for roi, value in m["nc_norm"]["rois"].items():
                    row[f"nc_norm/{roi}"] = value
            rows.append(row)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.3f}"
    return "" if v is None else str(v)


#: ROI families whose ROIs get a column in ``summary.md`` (every ROI is in ``summary.csv``)
TABLE_FAMILIES = ("prf-visualrois", "floc-faces", "floc-bodies", "floc-places", "floc-words")


def write_summary(folder: str | Path, run_dirs: dict[str, Path], *, pipeline: str = "",
                  families: Sequence[str] = TABLE_FAMILIES) -> Path:
    """Write ``summary.csv`` (every column), ``summary.md`` (the headline columns, mean ± sd over
    subjects per model) and ``summary.json`` under ``folder``; atomically, file by file.

    Parameters
    ----------
    folder : path
    run_dirs : dict
        subject -> run folder (evaluated).
    pipeline : str
        For the title.
    families : sequence of str
        ROI families with a column per ROI in ``summary.md`` (when no ROI of these exists, every
        family's ROIs are shown).

    Returns
    -------
    Path
        ``folder``.
    """
    folder = Path(folder)
    rows = summary_rows(run_dirs)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    write_text(folder / "summary.csv", buf.getvalue())

    roi_cols = [c for c in cols if c.startswith("nc_norm/")]
    shown = [c for c in roi_cols if c.split("/")[1] in set(families)] or roi_cols
    head = ["r_mean", "r_median", "nc_norm_mean"] + shown
    head = [c for c in head if any(c in r for r in rows)]
    label = {c: c.rsplit("/", 1)[1] if c.startswith("nc_norm/") else c for c in head}
    lines = [f"# {pipeline}: {len(run_dirs)} subjects" if pipeline else f"# {len(run_dirs)} subjects", "",
             "Test-split scores per subject and model (`r`: Pearson r per voxel; `nc_norm`: noise-ceiling-"
             "normalised score; ROI columns: mean `nc_norm` over the ROI's voxels; every ROI: `summary.csv`).", "",
             "| subject | model | " + " | ".join(label[c] for c in head) + " |",
             "|---|---|" + "---:|" * len(head)]
    for r in rows:
        lines.append(f"| {r['subject']} | {r['model']} | " + " | ".join(_fmt(r.get(c)) for c in head) + " |")
    stats = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == model]
        stats[model] = {}
        cells = []
        for c in head:
            vals = np.array([r[c] for r in sel if isinstance(r.get(c), float) and math.isfinite(r[c])])
            mean = float(vals.mean()) if vals.size else float("nan")
            sd = float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
            stats[model][c] = {"mean": mean, "sd": sd, "n": int(vals.size)}
            cells.append(f"{_fmt(mean)} ± {_fmt(sd)}" if vals.size > 1 else _fmt(mean))
        lines.append(f"| **mean ± sd** | {model} | " + " | ".join(cells) + " |")
    lines += ["", "Run folders:", ""] + [f"- {s}: `{p}`" for s, p in run_dirs.items()] + [""]
    write_text(folder / "summary.md", "\n".join(lines))
    write_json(folder / "summary.json", {"pipeline": pipeline, "subjects": list(run_dirs),
                                         "run_dirs": {s: str(p) for s, p in run_dirs.items()},
                                         "rows": rows, "across_subjects": stats})
    return folder
