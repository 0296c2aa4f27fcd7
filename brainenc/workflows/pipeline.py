"""``brainenc run``: the per-subject pipeline ``prepare -> features -> fit.<model> -> evaluate -> report``.

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
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from brainenc import __version__
from brainenc._utils.io import (
    exclusive_lock,
    kill_point,
    kill_scope,
    load_npy,
    read_json,
    remove_stale_temps,
    write_json,
)
from brainenc._utils.logging import get_logger
from brainenc._utils.paths import features_root, nsd_root as default_nsd_root, prepared_root, resolve_data_dir, runs_root
from brainenc.config import to_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.workflows.engine import Stage, StageContext, read_stage_record, run_stages, select_stages
from brainenc.workflows.fitters import FitData
from brainenc.workflows.spec import FIT_KINDS, PipelineSpec, load_pipeline

__all__ = ["run_pipeline", "build_stages", "run_dir_for", "data_fingerprint", "split_counts_text", "STAGE_ORDER"]

STAGE_ORDER = ("prepare", "features", "fit", "evaluate", "report")
#: the run folder's lock file (held for the duration of a run)
LOCK_NAME = ".lock"

log = get_logger("workflows")


# ----------------------------------------------------------------------------------------------
# run folder bookkeeping
# ----------------------------------------------------------------------------------------------
def run_dir_for(spec: PipelineSpec, data_dir=None, out=None) -> Path:
    """The run folder: ``out`` if given, else ``<data root>/runs/<pipeline>/<subject>``."""
    if out:
        return Path(out).expanduser().resolve()
    return runs_root(data_dir) / spec.name / spec.prepare.subject


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
# data presence / simulation
# ----------------------------------------------------------------------------------------------
def _simulation_state(nsd: Path, subject: str) -> str | None:
    """``"complete"`` / ``"interrupted"`` for a subject of a simulated NSD root; None if not simulated."""
    from brainenc.datasets import layout

    man = layout.simulation_manifest(nsd)
    if man is None:
        return None
    entry = man.get("subjects", {}).get(subject)
    if entry is None:
        return None
    return "complete" if entry.get("complete", False) else "interrupted"


def _has_subject_data(nsd: Path, spec: PipelineSpec) -> bool:
    from brainenc.datasets import layout

    cfg = spec.prepare
    if _simulation_state(nsd, cfg.subject) == "interrupted":
        return False  # the folders exist, but not every file in them
    return (layout.expdesign_path(nsd).is_file()
            and layout.betas_dir(nsd, cfg.subject, cfg.space, cfg.beta_version).is_dir())


def data_fingerprint(nsd: Path, subject: str) -> dict:
    """A cheap identity of one subject's data in an NSD root, part of the prepare stage's key.

    For a simulated root it is the subject's entry of the simulator's manifest (sizes, seed-dependent
    file checksums), so re-simulating with other settings reruns the pipeline but simulating
    another subject into the same root does not. For a real release it is the root path and the
    experiment design file's size (the release does not change).
    """
    from brainenc.datasets import layout

    out: dict = {"nsd_root": str(Path(nsd).resolve())}
    man = layout.simulation_manifest(nsd)
    if man is not None:
        entry = man.get("subjects", {}).get(subject)
        out["simulated"] = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
    exp = layout.expdesign_path(nsd)
    if exp.is_file():
        out["expdesign_size"] = exp.stat().st_size
    return out


def _maybe_simulate(spec: PipelineSpec, nsd: Path) -> None:
    if _has_subject_data(nsd, spec):
        return
    interrupted = _simulation_state(nsd, spec.prepare.subject) == "interrupted"
    if not spec.simulate:
        if interrupted:
            raise DataFormatError(
                f"{nsd}: the simulation of {spec.prepare.subject} was interrupted; rerun 'brainenc simulate' "
                "(or set [prepare] simulate = true)")
        raise DataFormatError(
            f"{nsd}: no NSD data for {spec.prepare.subject} ({spec.prepare.space}, {spec.prepare.beta_version}); "
            "point --nsd-root at the release, or run 'brainenc simulate' (or set [prepare] simulate = true)")
    from brainenc.datasets.simulate import simulate_subject

    if interrupted:  # the simulator is deterministic: simulating again gives the files it would have written
        log.info("the simulation of %s under %s was interrupted: simulating it again", spec.prepare.subject, nsd)
    else:
        log.info("no data for %s under %s: simulating it first", spec.prepare.subject, nsd)
    t0 = time.perf_counter()
    simulate_subject(nsd, spec.simulation)
    log.info("simulated %s in %.1f s", spec.prepare.subject, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# shared loaders (cached in the run's in-memory state)
# ----------------------------------------------------------------------------------------------
def _dataset(ctx: StageContext):
    from brainenc.datasets.prepare import load_prepared

    path = ctx.inputs["prepare"]["prepared"]
    ds = ctx.state.get("dataset")
    if ds is None or str(ds.path) != path:
        ds = load_prepared(path)
        ctx.state["dataset"] = ds
    return ds


def _feature_set(ctx: StageContext, spec: PipelineSpec, data_dir: Path):
    fs = ctx.state.get("features")
    if fs is None:
        from brainenc.features import HDF5Images, extract_features

        ds = _dataset(ctx)
        if ds.stimuli_path is None:
            raise DataFormatError(f"{ds.path}: prepared dataset has no stimuli file; features need the images")
        ids = np.unique(ds.image_ids)
        fs = extract_features(HDF5Images(ds.stimuli_path), ids, spec.features, cache_dir=features_root(data_dir))
        ctx.state["features"] = fs
    return fs


def _aligned_rows(fs_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each ``wanted`` image id in the feature set (raises if one is missing)."""
    fs_ids = np.asarray(fs_ids, dtype=np.int64)
    order = np.argsort(fs_ids, kind="stable")
    pos = np.searchsorted(fs_ids[order], wanted)
    pos = np.clip(pos, 0, len(order) - 1)
    rows = order[pos]
    bad = fs_ids[rows] != wanted
    if bad.any():
        raise DataFormatError(f"features are missing {int(bad.sum())} image ids of the dataset (e.g. {int(wanted[bad][0])})")
    return rows


# ----------------------------------------------------------------------------------------------
# stage functions
# ----------------------------------------------------------------------------------------------
def _stage_prepare(spec: PipelineSpec, data_dir: Path, nsd: Path):
    def run(ctx: StageContext) -> dict:
        from brainenc.datasets.prepare import prepare_subject

        ds = prepare_subject(nsd, spec.prepare, cache_root=prepared_root(data_dir))
        ctx.state["dataset"] = ds
        from brainenc.datasets.layout import ground_truth_path

        gt = ground_truth_path(nsd, spec.prepare.subject)
        return {"prepared": str(ds.path), "cache_hit": ds.cache_hit, "n_samples": ds.n_samples,
                "n_voxels": ds.n_voxels, "splits": ds.split_counts(), "space": ds.geometry.get("space"),
                "ground_truth": None if gt is None else str(gt), "files": [str(ds.path)]}
    return run


def _stage_features(spec: PipelineSpec, data_dir: Path):
    def run(ctx: StageContext) -> dict:
        fs = _feature_set(ctx, spec, data_dir)
        out = {"key": getattr(fs, "key", None), "cache_hit": bool(getattr(fs, "cache_hit", False)),
               "n_images": int(len(fs.image_ids)), "grid": list(fs.grid) if getattr(fs, "grid", None) else None}
        pooled = getattr(fs, "pooled", None)
        tokens = getattr(fs, "tokens", None)
        out["pooled_shape"] = list(pooled.shape) if pooled is not None else None
        out["tokens_shape"] = list(tokens.shape) if tokens is not None else None
        path = getattr(fs, "path", None)
        if path is not None:
            out["files"] = [str(path)]
        return out
    return run


def _image_reader(ds):
    """``rows -> uint8 [n, H, W, 3]`` stimuli of dataset rows, or None without a stimulus file."""
    path = getattr(ds, "stimuli_path", None)
    if path is None or not Path(path).is_file():
        return None
    from brainenc.features import HDF5Images

    source = HDF5Images(path)
    return lambda rows: source.read(np.asarray(ds.image_ids)[np.asarray(rows)])


def _stage_fit(spec: PipelineSpec, data_dir: Path, cfg):
    def run(ctx: StageContext) -> dict:
        ds = _dataset(ctx)
        fs = _feature_set(ctx, spec, data_dir)
        rows = _aligned_rows(fs.image_ids, ds.image_ids)

        def features(kind: str) -> np.ndarray:
            arr = fs.pooled if kind == "pooled" else fs.tokens
            if arr is None:
                raise ConfigError(f"'fit.{cfg.name}.features' = {kind!r} but the feature set has no {kind} output; "
                                  "change [features]")
            return np.asarray(arr)[rows]

        data = FitData(responses=ds.responses, splits=ds.splits, features=features,
                       grid=tuple(fs.grid) if getattr(fs, "grid", None) else None,
                       n_prefix=int(getattr(fs, "n_prefix", 0)), roi_masks=ds.roi_masks(),
                       roi_labels=ds.roi_labels, roi_names=ds.roi_names, hemi=ds.geometry.get("hemi"),
                       read_images=_image_reader(ds))
        return FIT_KINDS.get(cfg.kind)["fit"](ctx, cfg, data)
    return run


def _stage_evaluate(spec: PipelineSpec):
    def run(ctx: StageContext) -> dict:
        from brainenc.metrics.scoreset import NormalizeOptions, score_predictions

        ev = spec.evaluate
        ds = _dataset(ctx)
        if ev.split not in ds.splits:
            raise ConfigError(f"'evaluate.split' must be one of {sorted(ds.splits)}; {ev.split!r} was provided")
        rows = ds.splits[ev.split]
        y = np.asarray(ds.responses[rows], dtype=np.float32)
        preds = {}
        for cfg in spec.fits:  # memory-mapped: score_predictions reads one model at a time
            pred = load_npy(ctx.run_dir / "predictions" / cfg.name / f"{ev.split}.npy", mmap=True)
            if pred.shape != y.shape:
                raise DataFormatError(f"predictions/{cfg.name}/{ev.split}.npy has shape {pred.shape}; expected {y.shape}")
            preds[cfg.name] = pred
        options = NormalizeOptions(normalize=ev.normalize, clip_negative=ev.clip_negative, nc_floor=ev.nc_floor,
                                   below_floor=ev.below_floor, cap=ev.effective_cap)
        scores = score_predictions(y, preds, ds.noise_ceiling, roi_masks=ds.roi_masks(), metrics=ev.metrics,
                                   split=ev.split, options=options)
        files = [ctx.rel(p) for p in scores.save(ctx.run_dir / "scores")]
        summary = scores.summary()
        for name, model_sum in summary["models"].items():
            log.info("evaluate %s: mean r %.3f, median r %.3f, mean NC-norm %.3f", name,
                     model_sum["r"]["mean"], model_sum["r"]["median"], model_sum["nc_norm"]["mean"])
        return {"files": files, "split": ev.split,
                "mean_r": {k: v["r"]["mean"] for k, v in summary["models"].items()}}
    return run


def split_counts_text(counts: dict) -> str:
    """``"train 650, test 100"``: rows per split in a fixed order (train, val, test, then by name).

    The order never comes from the mapping, whose key order differs between outputs passed in
    memory and outputs read back from a (sorted-key) stage record.
    """
    first = {"train": 0, "val": 1, "test": 2}
    names = sorted(counts, key=lambda k: (first.get(k, 3), k))
    return ", ".join(f"{k} {counts[k]}" for k in names)


def _stage_report(spec: PipelineSpec, stage_names: Sequence[str]):
    def run(ctx: StageContext) -> dict:
        from brainenc.report import ReportInputs, build_report

        ds = _dataset(ctx)
        run_dir = ctx.run_dir
        ev = spec.evaluate
        scores = {}
        predictions = {}
        figures: list = []
        for cfg in spec.fits:
            sdir = run_dir / "scores" / cfg.name
            scores[cfg.name] = {p.stem: load_npy(p) for p in sorted(sdir.glob("*.npy"))}
            extras = ctx.inputs.get(f"fit.{cfg.name}", {}).get("extras", {})
            for metric, rel in extras.items():
                scores[cfg.name][metric] = load_npy(run_dir / rel)
            predictions[cfg.name] = load_npy(run_dir / "predictions" / cfg.name / f"{ev.split}.npy", mmap=True)
            figures += [(caption, rel) for caption, rel in
                        ctx.inputs.get(f"fit.{cfg.name}", {}).get("figures", [])]
        rows = ds.splits[ev.split]
        timings = []
        for name in stage_names:
            rec = read_stage_record(run_dir, name)
            if rec is not None:
                timings.append((name, "finished " + rec.get("started", ""), float(rec.get("seconds", 0.0))))
        prep = ctx.inputs["prepare"]
        fit_desc = "; ".join(f"{f.name} ({f.kind})" for f in spec.fits)
        summary = [
            ("pipeline", f"{spec.name}" + (f" — {spec.pipeline.description}" if spec.pipeline.description else "")),
            ("subject", spec.prepare.subject),
            ("data", f"{prep['n_samples']} samples × {prep['n_voxels']} voxels, space {prep.get('space')}, "
                     f"split {spec.prepare.split} ({split_counts_text(prep['splits'])})"),
            ("prepared dataset", prep["prepared"]),
            ("features", ", ".join(f"{k}={v}" for k, v in to_dict(spec.features).items() if v not in (None, "", [], {}))),
            ("models", fit_desc),
            ("scored on", f"'{ev.split}' split ({rows.size} rows); NC-normalised {ev.normalize}"
                          f"{'²' if ev.normalize == 'r' else ''}, clip negative {ev.clip_negative}, "
                          f"NC floor {ev.nc_floor}, cap {ev.effective_cap if ev.effective_cap is not None else 'none'}"),
            ("brainenc", __version__),
        ]
        gt = prep.get("ground_truth")
        inputs = ReportInputs(
            title=f"brainenc report: {spec.name} / {spec.prepare.subject}",
            scores=scores, roi_masks=ds.roi_masks(), geometry=ds.geometry, noise_ceiling=ds.noise_ceiling,
            y_true=np.asarray(ds.responses[rows], dtype=np.float32), predictions=predictions, summary=summary, timings=timings,
            config_text=json.dumps(spec.resolved(), indent=2, default=str),
            links=[("resolved config", "../config.resolved.json"), ("versions", "../versions.json"),
                   ("run log", "../logs/run.log"), ("score summary", "../scores/summary.json")],
            ground_truth_path=Path(gt) if gt else None,
            model_figures=[(caption, "../" + rel) for caption, rel in figures])
        res = build_report(ctx.path("report", "index.md").parent, inputs, spec.report)
        return {"files": ["report/" + f for f in res["files"]], "seconds": res["seconds"]}
    return run


# ----------------------------------------------------------------------------------------------
# assembly
# ----------------------------------------------------------------------------------------------
def build_stages(spec: PipelineSpec, data_dir: Path, nsd: Path) -> list[Stage]:
    """The stage graph of ``spec`` (one ``fit.<name>`` stage per ``[[fit]]`` model)."""
    prepare_cfg = {"prepare": spec.prepare.key_dict() if hasattr(spec.prepare, "key_dict") else to_dict(spec.prepare),
                   "data": data_fingerprint(nsd, spec.prepare.subject)}
    stages = [
        Stage("prepare", _stage_prepare(spec, data_dir, nsd), prepare_cfg),
        Stage("features", _stage_features(spec, data_dir), to_dict(spec.features), deps=["prepare"]),
    ]
    fit_names = []
    for cfg in spec.fits:
        name = f"fit.{cfg.name}"
        fit_names.append(name)
        stages.append(Stage(name, _stage_fit(spec, data_dir, cfg), to_dict(cfg), deps=["prepare", "features"]))
    stages.append(Stage("evaluate", _stage_evaluate(spec), {"evaluate": to_dict(spec.evaluate),
                                                           "models": [c.name for c in spec.fits]},
                        deps=["prepare", *fit_names]))
    names = [s.name for s in stages] + ["report"]
    stages.append(Stage("report", _stage_report(spec, names), to_dict(spec.report),
                        deps=["prepare", "evaluate", *fit_names]))
    return stages


def run_pipeline(pipeline, subject: str | None = "subj01", data_dir=None, nsd_root=None, out=None,
                 overrides: list[str] | None = None, stages: Sequence[str] | None = None,
                 force: Sequence[str] = ()) -> Path:
    """Run a pipeline spec for one subject, resumably.

    Parameters
    ----------
    pipeline : str or Path
        A TOML path or a bare name under the repository's ``pipelines/`` (``"quickstart"``).
    subject : str, optional
        Subject (``"subj01"``); None keeps the spec's ``[prepare] subject``.
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
        Invalid spec (raised before any work).
    """
    spec = load_pipeline(pipeline, subject=subject, overrides=overrides)
    data_dir = resolve_data_dir(data_dir)
    nsd = Path(nsd_root).expanduser().resolve() if nsd_root else default_nsd_root(data_dir)
    run_dir = run_dir_for(spec, data_dir, out)
    select_stages(build_stages(spec, data_dir, nsd), stages)  # unknown stage names fail before any work
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # one process per run folder; a lock left by a killed run is taken over (see exclusive_lock)
    with exclusive_lock(run_dir / LOCK_NAME, f"run folder {run_dir}"), _run_log(run_dir):
        log.info("run %s for %s -> %s", spec.name, spec.prepare.subject, run_dir)
        stale = remove_stale_temps(run_dir)  # temporaries of killed runs (atomic writes, checkpoints)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted run", len(stale))
        resolved = spec.resolved()
        resolved["run"] = {"subject": spec.prepare.subject, "nsd_root": str(nsd), "data_dir": str(data_dir),
                           "source": str(spec.source) if spec.source else None}
        write_json(run_dir / "config.resolved.json", resolved)
        write_json(run_dir / "versions.json", collect_versions())
        _maybe_simulate(spec, nsd)
        graph = build_stages(spec, data_dir, nsd)
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
