"""The encoding task's stage graph: ``simulate -> prepare -> features -> fit.<model> -> evaluate -> report``.

Each stage body is a short call into a lower layer (``datasets.simulate_subject``,
``datasets.prepare_subject``, ``features.extract_features``, an estimator's ``fit``,
``metrics.score_predictions``, ``report.build_report``). Stages learn what their dependencies
produced only from the dependencies' records (``ctx.inputs``): every file a stage reads is a path
its producer recorded. What a stage loads (the prepared dataset, the feature set) is memoised by
that recorded path for the duration of one call, never passed around as state.

Other tasks (decoding, reconstruction, synthesis, pretraining) register their own graph with
:func:`brainenc.workflows.register_task`; nothing here needs to change for them.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from brainenc import __version__
from brainenc._utils.io import load_npy
from brainenc._utils.logging import get_logger
from brainenc.config import to_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.workflows.engine import Stage, StageContext, read_stage_record
from brainenc.workflows.fitters import FitData
from brainenc.workflows.spec import FIT_KINDS, PipelineSpec

__all__ = ["build_encoding_graph", "data_fingerprint", "split_counts_text"]

log = get_logger("workflows")


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


def _has_subject_data(nsd: Path, subject: str, prepare) -> bool:
    from brainenc.datasets import layout

    if _simulation_state(nsd, subject) == "interrupted":
        return False  # the folders exist, but not every file in them
    return (layout.expdesign_path(nsd).is_file()
            and layout.betas_dir(nsd, subject, prepare.space, prepare.beta_version).is_dir())


def data_fingerprint(nsd: Path, subject: str) -> dict:
    """A cheap identity of one subject's data in an NSD root (the simulate stage's output).

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


def _stage_simulate(spec: PipelineSpec, run):
    """Volatile: make sure the subject's data exist (simulating them when allowed) and fingerprint them."""

    def body(ctx: StageContext) -> dict:
        nsd, subject = run.nsd_root, run.subject
        if not _has_subject_data(nsd, subject, spec.prepare):
            interrupted = _simulation_state(nsd, subject) == "interrupted"
            if not spec.simulate:
                if interrupted:
                    raise DataFormatError(
                        f"{nsd}: the simulation of {subject} was interrupted; rerun 'brainenc simulate' "
                        "(or set [prepare] simulate = true)")
                raise DataFormatError(
                    f"{nsd}: no NSD data for {subject} ({spec.prepare.space}, {spec.prepare.beta_version}); "
                    "point --nsd-root at the release, or run 'brainenc simulate' (or set [prepare] simulate = true)")
            from brainenc.datasets.simulate import simulate_subject

            # the simulator is deterministic: simulating again gives the files it would have written
            if interrupted:
                log.info("the simulation of %s under %s was interrupted: simulating it again", subject, nsd)
            else:
                log.info("no data for %s under %s: simulating it first", subject, nsd)
            t0 = time.perf_counter()
            simulate_subject(nsd, run.simulation_config(spec.simulation))
            log.info("simulated %s in %.1f s", subject, time.perf_counter() - t0)
        from brainenc.datasets.layout import ground_truth_path

        gt = ground_truth_path(nsd, subject)
        return {"data": data_fingerprint(nsd, subject), "ground_truth": None if gt is None else str(gt)}

    return body


# ----------------------------------------------------------------------------------------------
# what stages load, memoised by the path its producer recorded
# ----------------------------------------------------------------------------------------------
class _Loaded:
    """Objects opened from recorded paths, kept for the duration of one call (by path)."""

    def __init__(self):
        self._memo: dict[tuple[str, str], object] = {}

    def get(self, kind: str, path: str, opener: Callable[[str], object]):
        key = (kind, str(path))
        if key not in self._memo:
            self._memo[key] = opener(path)
        return self._memo[key]

    def put(self, kind: str, path: str, obj) -> None:
        self._memo[(kind, str(path))] = obj

    def dataset(self, ctx: StageContext):
        from brainenc.datasets.prepare import load_prepared

        return self.get("dataset", ctx.inputs["prepare"]["prepared"], load_prepared)

    def features(self, ctx: StageContext):
        from brainenc.features import load_feature_set

        return self.get("features", ctx.inputs["features"]["path"], load_feature_set)


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


def _recorded(ctx: StageContext, stage: str, *keys: str):
    """``ctx.inputs[stage][keys...]``, or a one-line error naming the record when it is absent."""
    value = ctx.inputs.get(stage)
    for k in keys:
        if not isinstance(value, dict) or k not in value:
            raise DataFormatError(f"{ctx.run_dir / 'stages' / (stage + '.json')}: the record has no "
                                  f"'{'.'.join(keys)}' (written by an older brainenc? rerun with --force {stage})")
        value = value[k]
    return value


# ----------------------------------------------------------------------------------------------
# stage functions
# ----------------------------------------------------------------------------------------------
def _stage_prepare(spec: PipelineSpec, run, loaded: _Loaded):
    def body(ctx: StageContext) -> dict:
        from brainenc.datasets.prepare import prepare_subject

        ds = prepare_subject(run.nsd_root, run.prepare_config(spec.prepare), cache_root=run.prepared_root)
        loaded.put("dataset", str(ds.path), ds)
        return {"prepared": str(ds.path), "cache_hit": ds.cache_hit, "n_samples": ds.n_samples,
                "n_voxels": ds.n_voxels, "splits": ds.split_counts(), "space": ds.geometry.get("space"),
                "files": [str(ds.path)]}
    return body


def _stage_features(spec: PipelineSpec, run, loaded: _Loaded):
    def body(ctx: StageContext) -> dict:
        from brainenc.features import HDF5Images, extract_features

        ds = loaded.dataset(ctx)
        if ds.stimuli_path is None:
            raise DataFormatError(f"{ds.path}: prepared dataset has no stimuli file; features need the images")
        fs = extract_features(HDF5Images(ds.stimuli_path), np.unique(ds.image_ids), spec.features,
                              cache_dir=run.features_root)
        loaded.put("features", str(fs.path), fs)
        return {"path": str(fs.path), "key": fs.key, "cache_hit": bool(fs.cache_hit), "n_images": int(len(fs.image_ids)),
                "grid": list(fs.grid) if fs.grid else None,
                "pooled_shape": list(fs.pooled.shape) if fs.pooled is not None else None,
                "tokens_shape": list(fs.tokens.shape) if fs.tokens is not None else None,
                "files": [str(fs.path)]}
    return body


def _image_reader(ds):
    """``rows -> uint8 [n, H, W, 3]`` stimuli of dataset rows, or None without a stimulus file."""
    path = getattr(ds, "stimuli_path", None)
    if path is None or not Path(path).is_file():
        return None
    from brainenc.features import HDF5Images

    source = HDF5Images(path)
    return lambda rows: source.read(np.asarray(ds.image_ids)[np.asarray(rows)])


def _stage_fit(fit, loaded: _Loaded):
    def body(ctx: StageContext) -> dict:
        ds = loaded.dataset(ctx)
        fs = loaded.features(ctx)
        rows = _aligned_rows(fs.image_ids, ds.image_ids)

        def features(kind: str) -> np.ndarray:
            arr = fs.pooled if kind == "pooled" else fs.tokens
            if arr is None:
                raise ConfigError(f"'fit.{fit.name}.inputs.features' = {kind!r} but the feature set has no {kind} "
                                  "output; change [features]")
            return np.asarray(arr)[rows]

        data = FitData(responses=ds.responses, splits=ds.splits, features=features,
                       grid=tuple(fs.grid) if fs.grid else None, n_prefix=int(fs.n_prefix),
                       roi_masks=ds.roi_masks(), roi_labels=ds.roi_labels, roi_names=ds.roi_names,
                       hemi=ds.geometry.get("hemi"), read_images=_image_reader(ds))
        return FIT_KINDS.get(fit.kind).fit(ctx, fit, data)
    return body


def _stage_evaluate(spec: PipelineSpec, loaded: _Loaded):
    def body(ctx: StageContext) -> dict:
        from brainenc.metrics.scoreset import NormalizeOptions, score_predictions

        ev = spec.evaluate
        ds = loaded.dataset(ctx)
        if ev.split not in ds.splits:
            raise ConfigError(f"'evaluate.split' must be one of {sorted(ds.splits)}; {ev.split!r} was provided")
        y = np.asarray(ds.responses[ds.splits[ev.split]], dtype=np.float32)
        preds = {}
        for fit in spec.fits:  # memory-mapped: score_predictions reads one model at a time
            rel = _recorded(ctx, f"fit.{fit.name}", "predictions", ev.split)
            pred = load_npy(ctx.run_dir / rel, mmap=True)
            if pred.shape != y.shape:
                raise DataFormatError(f"{rel} has shape {pred.shape}; expected {y.shape}")
            preds[fit.name] = pred
        options = NormalizeOptions(normalize=ev.normalize, clip_negative=ev.clip_negative, nc_floor=ev.nc_floor,
                                   below_floor=ev.below_floor, cap=ev.effective_cap)
        scores = score_predictions(y, preds, ds.noise_ceiling, roi_masks=ds.roi_masks(), metrics=ev.metrics,
                                   split=ev.split, options=options)
        folder = ctx.path("scores", "x").parent
        files = [ctx.rel(p) for p in scores.save(folder)]
        summary = scores.summary()
        for name, model_sum in summary["models"].items():
            log.info("evaluate %s: mean r %.3f, median r %.3f, mean NC-norm %.3f", name,
                     model_sum["r"]["mean"], model_sum["r"]["median"], model_sum["nc_norm"]["mean"])
        return {"files": files, "split": ev.split, "scores": ctx.rel(folder),
                "mean_r": {k: v["r"]["mean"] for k, v in summary["models"].items()}}
    return body


def split_counts_text(counts: dict) -> str:
    """``"train 650, test 100"``: rows per split in a fixed order (train, val, test, then by name).

    The order never comes from the mapping, whose key order differs between outputs passed in
    memory and outputs read back from a (sorted-key) stage record.
    """
    first = {"train": 0, "val": 1, "test": 2}
    names = sorted(counts, key=lambda k: (first.get(k, 3), k))
    return ", ".join(f"{k} {counts[k]}" for k in names)


def _stage_report(spec: PipelineSpec, run, loaded: _Loaded, stage_names: Sequence[str]):
    def body(ctx: StageContext) -> dict:
        from brainenc.metrics.scoreset import ScoreSet
        from brainenc.report import ReportInputs, build_report

        ds = loaded.dataset(ctx)
        run_dir = ctx.run_dir
        ev = spec.evaluate
        scoreset = ScoreSet.load(run_dir / _recorded(ctx, "evaluate", "scores"), ds.roi_masks())
        scores = {}
        predictions = {}
        figures: list = []
        for fit in spec.fits:
            rec = ctx.inputs[f"fit.{fit.name}"]
            scores[fit.name] = dict(scoreset.scores[fit.name])
            for metric, rel in rec.get("extras", {}).items():
                scores[fit.name][metric] = load_npy(run_dir / rel)
            predictions[fit.name] = load_npy(run_dir / _recorded(ctx, f"fit.{fit.name}", "predictions", ev.split),
                                             mmap=True)
            figures += [(caption, rel) for caption, rel in rec.get("figures", [])]
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
            ("subject", run.subject),
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
        gt = ctx.inputs["simulate"].get("ground_truth")
        inputs = ReportInputs(
            title=f"brainenc report: {spec.name} / {run.subject}",
            scores=scores, roi_masks=ds.roi_masks(), geometry=ds.geometry, noise_ceiling=ds.noise_ceiling,
            y_true=np.asarray(ds.responses[rows], dtype=np.float32), predictions=predictions, summary=summary,
            timings=timings, config_text=json.dumps(spec.resolved(), indent=2, default=str),
            links=[("resolved config", "../config.resolved.json"), ("versions", "../versions.json"),
                   ("run log", "../logs/run.log"), ("score summary", "../scores/summary.json")],
            ground_truth_path=Path(gt) if gt else None,
            model_figures=[(caption, "../" + rel) for caption, rel in figures])
        res = build_report(ctx.path("report", "index.md").parent, inputs, spec.report)
        return {"files": ["report/" + f for f in res["files"]], "seconds": res["seconds"]}
    return body


# ----------------------------------------------------------------------------------------------
# the graph
# ----------------------------------------------------------------------------------------------
def build_encoding_graph(spec: PipelineSpec, run) -> list[Stage]:
    """The encoding task's stages for ``spec`` and the run ``run`` (one ``fit.<name>`` per ``[[fit]]``).

    Parameters
    ----------
    spec : PipelineSpec
    run : RunContext

    Returns
    -------
    list of Stage
    """
    loaded = _Loaded()
    prepare_cfg = run.prepare_config(spec.prepare)
    simulate_cfg = {"subject": run.subject, "nsd_root": str(run.nsd_root), "simulate": spec.simulate,
                    "simulation": None if spec.simulation is None
                    else to_dict(run.simulation_config(spec.simulation))}
    stages = [
        Stage("simulate", _stage_simulate(spec, run), simulate_cfg, volatile=True),
        Stage("prepare", _stage_prepare(spec, run, loaded), {"prepare": prepare_cfg.key_dict()}, deps=["simulate"]),
        Stage("features", _stage_features(spec, run, loaded), to_dict(spec.features), deps=["prepare"]),
    ]
    fit_names = []
    for fit in spec.fits:
        name = f"fit.{fit.name}"
        fit_names.append(name)
        stages.append(Stage(name, _stage_fit(fit, loaded), fit.to_dict(), deps=["prepare", "features"]))
    stages.append(Stage("evaluate", _stage_evaluate(spec, loaded),
                        {"evaluate": to_dict(spec.evaluate), "models": [f.name for f in spec.fits]},
                        deps=["prepare", *fit_names]))
    names = [s.name for s in stages] + ["report"]
    stages.append(Stage("report", _stage_report(spec, run, loaded, names), to_dict(spec.report),
                        deps=["simulate", "prepare", "evaluate", *fit_names]))
    return stages
