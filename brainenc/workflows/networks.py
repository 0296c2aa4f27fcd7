"""The ``networks`` task: subject-level classification from ROI time series.

Stage graph (one run per cohort, ``runs/<pipeline>/<run name>``)::

    cohort -> samples -> folds -> pretrain -> fit.<model> -> evaluate -> report

- ``cohort`` (volatile): finds the cohort (simulates it on first use when ``[cohort] source =
  "simulated"``) and reports a fingerprint of its files, so everything downstream reruns exactly
  when the data changed.
- ``samples``: loads the cohort, regresses its confounds (``nilearn.signal.clean``), writes the
  sample series, labels and groups into the run folder (``samples/``).
- ``folds``: subject-level folds (:func:`brainenc.pretraining.evaluation.make_folds`): stratified
  K-fold, leave-site-out, leave-one-run-out or the cohort's official hold-out.
- ``pretrain``: BrainMAE pretraining, one model per fold on that fold's training rows (and, with
  ``data = "rest"``, unlabelled series of the training groups only), so no test-fold time series is
  seen; ``scope = "all"`` pretrains once on every row (transductive, no labels).
- ``fit.<model>``: every ``[[fit]]`` model on the same folds: BrainMAE fine-tuned from the fold's
  pretrained encoder or from scratch, and the scikit-learn baselines (Dey 2012 network PCA-LDA,
  FC + logistic regression / SVM), every step fitted inside the fold. Each fold is stored as it
  finishes, so a killed stage resumes at the next fold.
- ``evaluate``: per-fold scores with their spread; on a simulated cohort the recovered
  group-difference edges against the ground truth, and the learned ROI graph next to the group
  FC and the simulated coupling.
- ``report``: ``report/index.md`` + ``index.html`` with the score table and figures.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from brainenc._utils.io import load_npy, read_json, save_npy, write_json, write_text
from brainenc._utils.logging import get_logger
from brainenc.config import from_dict, to_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.workflows.engine import Stage, StageContext

__all__ = ["CohortSection", "NetworkEvaluateConfig", "PretrainSection", "NetworkFit", "NetworkReportConfig",
           "NETWORK_FIT_KINDS", "build_networks_graph", "load_samples", "SECTIONS"]

log = get_logger("workflows")

SOURCES = ("simulated", "folder", "haxby")
SCHEMES = ("stratified", "group", "holdout", "leave-one-group-out", "kfold")


# ----------------------------------------------------------------------------------------------
# spec tables
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CohortSection:
    """``[cohort]``: where the samples come from.

    Attributes
    ----------
    source : {'simulated', 'folder', 'haxby'}
        ``simulated``: the simulated cohort (``[cohort.simulate]`` = CohortSimulationConfig keys),
        written once under ``<data root>/cohorts/<name>``; ``folder``: a cohort folder read by
        :func:`brainenc.datasets.cohort.load_cohort` (``root``); ``haxby``: Haxby 2001 subject 1
        (one sample per stimulus block, groups = runs, unlabelled rest stretches for pretraining).
    root : str
        The cohort folder (``folder``; relative paths are taken from the data root); for
        ``simulated`` an optional folder instead of ``<data root>/cohorts/<name>``.
    clean_confounds : bool
        Regress the cohort's confound tables (motion, FD) and linear trends out of every series.
    simulate : dict
        CohortSimulationConfig fields (``source = "simulated"``).
    haxby_rois : {'grid', 'voxels'}
    haxby_grid : int
        Grid patch size in voxels (``haxby_rois = "grid"``).
    shift_trs : int
        Haemodynamic lag applied to the Haxby block boundaries, in TRs.
    """

    source: str = "simulated"
    root: str = ""
    clean_confounds: bool = True
    simulate: dict = dataclasses.field(default_factory=dict)
    haxby_rois: str = "grid"
    haxby_grid: int = 2
    shift_trs: int = 2

    def check(self) -> "CohortSection":
        if self.source not in SOURCES:
            raise ConfigError(f"'cohort.source' must be one of {', '.join(SOURCES)}; {self.source!r} was provided")
        if self.source == "folder" and not self.root:
            raise ConfigError("'cohort.root' must name the cohort folder when cohort.source = \"folder\"")
        if self.simulate and self.source != "simulated":
            raise ConfigError("'cohort.simulate' applies to cohort.source = \"simulated\" only")
        if self.source == "simulated":
            self.simulate = to_dict(self.simulation_config())  # every default filled in (the resolved config)
        if self.haxby_rois not in ("grid", "voxels"):
            raise ConfigError(f"'cohort.haxby_rois' must be 'grid' or 'voxels'; {self.haxby_rois!r} was provided")
        if self.haxby_grid < 1 or self.shift_trs < 0:
            raise ConfigError("'cohort.haxby_grid' must be >= 1 and 'cohort.shift_trs' >= 0")
        return self

    def simulation_config(self):
        from brainenc.datasets.simulate_cohort import CohortSimulationConfig

        return from_dict(CohortSimulationConfig, self.simulate, _prefix="cohort.simulate.")


@dataclasses.dataclass
class NetworkEvaluateConfig:
    """``[evaluate]``: the folds and the scores.

    Attributes
    ----------
    scheme : {'stratified', 'group', 'holdout', 'leave-one-group-out', 'kfold'}
        Subject-level stratified K-fold; ``group`` = GroupKFold over sites (leave-site-out);
        ``leave-one-group-out`` (Haxby: leave-one-run-out); ``holdout`` = the cohort's official split.
    n_splits : int
    seed : int
    positive : str
        Label name of the positive class for sensitivity / specificity / AUROC of a two-class
        task (default: the second label, e.g. "patient").
    edge_alpha : float
        FDR level of the group-difference edge test.
    """

    scheme: str = "stratified"
    n_splits: int = 5
    seed: int = 0
    positive: str = ""
    edge_alpha: float = 0.05

    def check(self) -> "NetworkEvaluateConfig":
        if self.scheme not in SCHEMES:
            raise ConfigError(f"'evaluate.scheme' must be one of {', '.join(SCHEMES)}; {self.scheme!r} was provided")
        if self.n_splits < 2:
            raise ConfigError(f"'evaluate.n_splits' must be >= 2; {self.n_splits} was provided")
        if not 0 < self.edge_alpha < 1:
            raise ConfigError(f"'evaluate.edge_alpha' must be in (0, 1); {self.edge_alpha} was provided")
        return self


@dataclasses.dataclass
class NetworkReportConfig:
    """``[report]``: ``max_rois`` limits the ROI-graph figures' size (larger graphs are drawn whole
    but without tick labels)."""

    max_rois: int = 60
    dpi: int = 110


@dataclasses.dataclass
class PretrainSection:
    """``[pretrain]``: BrainMAE pretraining for the ``[[fit]]`` models with ``pretrained = true``.

    Attributes
    ----------
    data : {'train', 'rest', 'train+rest'}
        What it is pretrained on: the fold's training samples (labels unused), the cohort's
        unlabelled extra series of the training groups (Haxby: rest stretches of the training runs),
        or both.
    scope : {'fold', 'all'}
        ``fold``: one pretraining per fold on its training rows only (the default: no test-fold
        data); ``all``: once on every row of the cohort, test folds included (transductive but
        label-free, as a pretraining corpus is used in practice).
    params : dict
        BrainMAE's configuration (:class:`brainenc.pretraining.BrainMAE`; ``tr`` comes from the
        cohort), every default filled in.
    """

    data: str = "train"
    scope: str = "fold"
    params: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"data": self.data, "scope": self.scope, **self.params}


def parse_pretrain(table: dict, prefix: str) -> PretrainSection:
    table = dict(table)
    data = table.pop("data", "train")
    scope = table.pop("scope", "fold")
    if data not in ("train", "rest", "train+rest"):
        raise ConfigError(f"'{prefix}data' must be 'train', 'rest' or 'train+rest'; {data!r} was provided")
    if scope not in ("fold", "all"):
        raise ConfigError(f"'{prefix}scope' must be 'fold' or 'all'; {scope!r} was provided")
    from brainenc.pretraining import BrainMAE

    if "tr" in table:
        raise ConfigError(f"'{prefix}tr' comes from the cohort; remove it")
    est = BrainMAE.from_config(table, prefix=prefix)
    params = est.to_config()
    params.pop("tr", None)
    return PretrainSection(data=data, scope=scope, params=params)


@dataclasses.dataclass
class NetworkFit:
    """One ``[[fit]]`` model of the networks task.

    Attributes
    ----------
    name : str
    kind : str
        ``brainmae`` (BrainMAEClassifier; ``pretrained = true`` starts from the fold's
        ``[pretrain]`` encoder) or a baseline of :data:`brainenc.pretraining.baselines.BASELINES`
        (``dey_pca_lda``, ``fc_logreg``, ``fc_svm``, ...).
    pretrained : bool
    params : dict
        The estimator's (or baseline factory's) parameters; an FC baseline's connectivity kind is
        ``connectivity = "correlation" | "partial correlation" | "tangent"``.
    """

    name: str
    kind: str
    pretrained: bool = False
    params: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"name": self.name, "kind": self.kind, **self.params}
        if self.kind == "brainmae":
            out["pretrained"] = self.pretrained
        return out

    def build(self, **extra):
        """A new unfitted estimator (``extra``: run-time parameters such as ``tr``)."""
        if self.kind == "brainmae":
            from brainenc.pretraining import BrainMAEClassifier

            return BrainMAEClassifier.from_config({**self.params, **extra}, prefix=f"fit.{self.name}.")
        from brainenc.pretraining.baselines import make_baseline

        params = dict(self.params)
        if "connectivity" in params:  # the FC baselines' ``kind`` (a [[fit]] table's ``kind`` is the model kind)
            params["kind"] = params.pop("connectivity")
        return make_baseline(self.kind, **params)


#: ``[[fit]] kind`` values beyond the baselines registry
NETWORK_FIT_KINDS = ("brainmae",)


def parse_fits(table: dict, prefix: str) -> list[NetworkFit]:
    if not table:
        raise ConfigError("the networks task needs at least one [[fit]] table (e.g. kind = \"dey_pca_lda\")")
    from brainenc.pretraining.baselines import BASELINES

    fits = []
    for name, f in table.items():
        f = dict(f)
        f.pop("name", None)
        kind = f.pop("kind", None)
        if kind is None:
            raise ConfigError(f"'fit.{name}.kind' is required: brainmae or one of {', '.join(BASELINES.list())}")
        if kind not in NETWORK_FIT_KINDS:
            BASELINES.get(kind)  # unknown kind: one line with the known ones
        pretrained = f.pop("pretrained", False)
        if not isinstance(pretrained, bool):
            raise ConfigError(f"'fit.{name}.pretrained' must be true or false; {pretrained!r} was provided")
        if pretrained and kind != "brainmae":
            raise ConfigError(f"'fit.{name}.pretrained' applies to kind = \"brainmae\" only")
        if kind == "brainmae":
            from brainenc.pretraining import BrainMAEClassifier

            if "tr" in f:
                raise ConfigError(f"'fit.{name}.tr' comes from the cohort; remove it")
            est = BrainMAEClassifier.from_config(f, prefix=f"fit.{name}.")
            params = est.to_config()
            for key in ("tr", "pretrained"):
                params.pop(key, None)
        else:
            make = NetworkFit(name=name, kind=kind, params=f)
            make.build()  # validates the parameters now
            params = f
        fits.append(NetworkFit(name=name, kind=kind, pretrained=pretrained, params=params))
    return fits


SECTIONS = {"cohort": CohortSection, "evaluate": NetworkEvaluateConfig, "pretrain": parse_pretrain,
            "fit": parse_fits, "report": NetworkReportConfig}


# ----------------------------------------------------------------------------------------------
# samples on disk: concatenated series + offsets (no pickle)
# ----------------------------------------------------------------------------------------------
def _save_series(folder: Path, name: str, series: list[np.ndarray]) -> list[Path]:
    offsets = np.zeros(len(series) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in series])
    width = series[0].shape[1] if series else 0
    flat = np.concatenate(series, 0).astype(np.float32) if series else np.zeros((0, width), np.float32)
    return [save_npy(folder / f"{name}.npy", flat), save_npy(folder / f"{name}_offsets.npy", offsets)]


def _load_series(folder: Path, name: str) -> list[np.ndarray]:
    flat = load_npy(folder / f"{name}.npy", mmap=True)
    off = load_npy(folder / f"{name}_offsets.npy")
    return [np.asarray(flat[off[i]:off[i + 1]], dtype=np.float32) for i in range(len(off) - 1)]


@dataclasses.dataclass
class Samples:
    """What the ``samples`` stage wrote: the rows every model sees.

    ``series`` [n] of [T_i, R]; ``labels`` int [n]; ``groups`` str [n] (site or run); ``split``
    str [n] or None; ``extra`` unlabelled series for pretraining with ``extra_groups``.
    """

    series: list
    labels: np.ndarray
    label_names: list
    groups: np.ndarray | None
    split: np.ndarray | None
    ids: np.ndarray
    tr: float
    roi_names: list
    extra: list
    extra_groups: np.ndarray
    meta: dict


def load_samples(folder: str | Path) -> Samples:
    """Read the ``samples/`` folder of a networks run."""
    folder = Path(folder)
    meta = read_json(folder / "meta.json")
    extra = _load_series(folder, "extra") if meta.get("n_extra", 0) else []
    return Samples(series=_load_series(folder, "series"), labels=np.asarray(meta["labels"], dtype=np.int64),
                   label_names=meta["label_names"],
                   groups=None if meta["groups"] is None else np.asarray(meta["groups"], dtype=str),
                   split=None if meta["split"] is None else np.asarray(meta["split"], dtype=str),
                   ids=np.asarray(meta["ids"], dtype=str), tr=float(meta["tr"]), roi_names=meta["roi_names"],
                   extra=extra, extra_groups=np.asarray(meta.get("extra_groups", []), dtype=str), meta=meta)


def _clean(series: np.ndarray, confounds: np.ndarray | None, tr: float) -> np.ndarray:
    from nilearn import signal

    out = signal.clean(np.asarray(series, dtype=np.float64), confounds=confounds, detrend=True,
                       standardize="zscore_sample", t_r=tr)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# stage bodies
# ----------------------------------------------------------------------------------------------
def _cohorts_root(data_dir: Path) -> Path:
    return Path(data_dir) / "cohorts"


def _cohort_folder(section: CohortSection, data_dir: Path) -> Path:
    if section.source == "folder" or (section.source == "simulated" and section.root):
        root = Path(section.root).expanduser()
        return root if root.is_absolute() else (Path(data_dir) / root).resolve()
    if section.source == "simulated":
        return _cohorts_root(data_dir) / section.simulation_config().name
    from brainenc.datasets.haxby import haxby_dir

    return haxby_dir()


def _fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of every file under ``folder`` (cheap, deterministic)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _stage_cohort(section: CohortSection, data_dir: Path):
    def run(ctx: StageContext) -> dict:
        root = _cohort_folder(section, data_dir)
        if section.source == "simulated":
            from brainenc.datasets.simulate_cohort import simulate_cohort

            simulate_cohort(root, section.simulation_config())  # a no-op when it exists with this config
        if not root.is_dir():
            raise DataFormatError(f"{root}: cohort folder not found (cohort.root)")
        return {"root": str(root), "source": section.source, "fingerprint": _fingerprint(root)}

    return run


def _stage_samples(section: CohortSection):
    def run(ctx: StageContext) -> dict:
        root = Path(ctx.inputs["cohort"]["root"])
        out = ctx.path("samples", "meta.json").parent
        if section.source == "haxby":
            from brainenc.datasets.haxby import load_haxby

            data = load_haxby(root, rois=section.haxby_rois, grid=section.haxby_grid)
            blocks, labels, runs = data.blocks(shift_trs=section.shift_trs)
            names = list(data.categories)
            index = {n: k for k, n in enumerate(names)}
            series = [np.asarray(b, np.float32) for b in blocks]
            y = np.array([index[str(v)] for v in labels], dtype=np.int64)
            groups = np.array([f"run{int(r) + 1:02d}" for r in runs])
            rest, rest_runs = data.rest_segments()
            extra = [np.asarray(s, np.float32) for s in rest]
            extra_groups = np.array([f"run{int(r) + 1:02d}" for r in rest_runs])
            ids = np.array([f"{g}_block{k:02d}" for k, g in enumerate(groups)])
            meta = {"tr": float(data.tr), "roi_names": list(data.roi_names), "split": None,
                    "name": "haxby2001-sub1", "groups_are": "runs", "ground_truth": None}
        else:
            from brainenc.datasets.cohort import load_cohort

            cohort = load_cohort(root)
            if cohort.labels is None:
                raise DataFormatError(f"{root}: the cohort has no labels (cohort.json label_column)")
            series = []
            for i, s in enumerate(cohort.series):
                conf = cohort.confounds[i] if (section.clean_confounds and cohort.confounds is not None) else None
                series.append(_clean(s, conf, cohort.tr) if section.clean_confounds else np.asarray(s, np.float32))
            y = np.asarray(cohort.labels, dtype=np.int64)
            names = list(cohort.label_names or [str(k) for k in range(int(y.max()) + 1)])
            groups = None if cohort.sites is None else np.asarray(cohort.sites, dtype=str)
            ids = np.asarray(cohort.subject_ids, dtype=str)
            extra, extra_groups = [], np.array([], dtype=str)
            gt = root / "ground_truth.npz"
            meta = {"tr": float(cohort.tr), "roi_names": list(cohort.roi_names),
                    "split": None if cohort.split is None else [str(v) for v in cohort.split],
                    "name": cohort.name, "groups_are": "sites", "ground_truth": str(gt) if gt.is_file() else None}
        files = _save_series(out, "series", series)
        if extra:
            files += _save_series(out, "extra", extra)
        meta.update({"labels": [int(v) for v in y], "label_names": names,
                     "groups": None if groups is None else [str(g) for g in groups], "ids": [str(v) for v in ids],
                     "n_extra": len(extra), "extra_groups": [str(g) for g in extra_groups],
                     "n_rois": int(series[0].shape[1]), "n_samples": len(series),
                     "clean_confounds": section.clean_confounds})
        files.append(write_json(out / "meta.json", meta))
        counts = np.bincount(y, minlength=len(names))
        log.info("samples: %d x %d ROIs (%s)%s", len(series), meta["n_rois"],
                 ", ".join(f"{c} {n}" for n, c in zip(names, counts)),
                 f"; {len(extra)} unlabelled series for pretraining" if extra else "")
        return {"folder": ctx.rel(out), "files": [ctx.rel(f) for f in files], "n_samples": len(series),
                "n_rois": meta["n_rois"], "label_names": names}

    return run


def _samples(ctx: StageContext) -> Samples:
    return load_samples(ctx.run_dir / ctx.inputs["samples"]["folder"])


def _stage_folds(cfg: NetworkEvaluateConfig):
    def run(ctx: StageContext) -> dict:
        from brainenc.pretraining.evaluation import make_folds

        s = _samples(ctx)
        scheme = cfg.scheme
        if scheme in ("group", "leave-one-group-out") and s.groups is None:
            raise ConfigError(f"'evaluate.scheme' = {scheme!r} needs groups (sites or runs); the cohort has none")
        if scheme == "holdout" and s.split is None:
            raise ConfigError("'evaluate.scheme' = 'holdout' needs the cohort's official split column")
        folds = make_folds(s.labels, scheme=scheme, n_splits=cfg.n_splits, groups=s.groups, split=s.split,
                           seed=cfg.seed)
        path = write_json(ctx.path("folds.json"), {"scheme": scheme, "folds": [
            {"train": [int(i) for i in tr], "test": [int(i) for i in te]} for tr, te in folds]})
        log.info("folds: %s, %d folds of %s test rows", scheme, len(folds), "/".join(str(len(te)) for _, te in folds))
        return {"n_folds": len(folds), "files": [ctx.rel(path)]}

    return run


def _folds(ctx: StageContext) -> list[tuple[np.ndarray, np.ndarray]]:
    data = read_json(ctx.run_dir / "folds.json")
    return [(np.asarray(f["train"], dtype=np.int64), np.asarray(f["test"], dtype=np.int64)) for f in data["folds"]]


def _fresh_folder(folder: Path, key: str) -> None:
    """Keep ``folder`` only if it was written for stage key ``key`` (a resumed stage); else empty it."""
    marker = folder / "stage_key.txt"
    if folder.exists() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(marker, key)


def _pretrain_rows(s: Samples, train: np.ndarray, data: str) -> list[np.ndarray]:
    rows: list[np.ndarray] = []
    if data in ("train", "train+rest"):
        rows += [s.series[i] for i in train]
    if data in ("rest", "train+rest"):
        if not s.extra:
            raise ConfigError("'pretrain.data' asks for unlabelled extra series ('rest') but the cohort has none")
        if s.groups is None:
            rows += list(s.extra)
        else:
            allowed = set(s.groups[train].tolist())
            rows += [x for x, g in zip(s.extra, s.extra_groups) if g in allowed]
    return rows


def _stage_pretrain(cfg: PretrainSection):
    def run(ctx: StageContext) -> dict:
        from brainenc.pretraining import BrainMAE

        s = _samples(ctx)
        folds = _folds(ctx)
        root = ctx.run_dir / "models" / "pretrain"
        _fresh_folder(root, ctx.key)
        checkpoints = ctx.run_dir / "train" / "pretrain"
        _fresh_folder(checkpoints, ctx.key)  # never resume a checkpoint written under another config
        units = [("all", np.arange(len(s.series)))] if cfg.scope == "all" else \
            [(f"fold{k}", tr) for k, (tr, _) in enumerate(folds)]
        out, files, seconds = {}, [], {}
        for name, train in units:
            folder = root / name
            if not (folder / "seconds.json").is_file():  # written last: a fold killed mid-save is redone
                t0 = time.perf_counter()
                rows = _pretrain_rows(s, train, cfg.data)
                log.info("pretrain %s: BrainMAE on %d series", name, len(rows))
                est = BrainMAE.from_config({**cfg.params, "tr": s.tr}, prefix="pretrain.")
                est.fit(rows, run_dir=checkpoints / name, resume=True)
                est.save_pretrained(folder)
                write_json(folder / "seconds.json", {"seconds": time.perf_counter() - t0, "n_series": len(rows)})
            seconds[name] = read_json(folder / "seconds.json")["seconds"]
            out[name] = ctx.rel(folder)
            files.append(ctx.rel(folder / "config.json"))
        return {"models": out, "scope": cfg.scope, "files": files, "fit_seconds": seconds}

    return run


def _decision(est, X) -> np.ndarray | None:
    if hasattr(est, "predict_proba"):
        try:
            return np.asarray(est.predict_proba(X), dtype=np.float64)
        except (AttributeError, NotImplementedError):
            pass
    if hasattr(est, "decision_function"):
        return np.asarray(est.decision_function(X), dtype=np.float64)
    return None


def _stage_fit(fit: NetworkFit, scope: str):
    def run(ctx: StageContext) -> dict:
        s = _samples(ctx)
        folds = _folds(ctx)
        folder = ctx.run_dir / "predictions" / fit.name
        _fresh_folder(folder, ctx.key)
        checkpoints = ctx.run_dir / "train" / fit.name
        if fit.kind == "brainmae":
            _fresh_folder(checkpoints, ctx.key)  # never resume a checkpoint written under another config
        pre = ctx.inputs.get("pretrain", {}).get("models", {})
        results = []
        for k, (train, test) in enumerate(folds):
            path = folder / f"fold{k}.json"
            if not path.is_file():
                t0 = time.perf_counter()
                extra = {}
                if fit.kind == "brainmae":
                    extra["tr"] = s.tr
                    if fit.pretrained:
                        extra["pretrained"] = str(ctx.run_dir / pre["all" if scope == "all" else f"fold{k}"])
                est = fit.build(**extra)
                Xtr = [s.series[i] for i in train]
                Xte = [s.series[i] for i in test]
                if fit.kind == "brainmae":
                    est.fit(Xtr, s.labels[train], run_dir=checkpoints / f"fold{k}", resume=True)
                else:
                    est.fit(Xtr, s.labels[train])
                pred = np.asarray(est.predict(Xte)).astype(np.int64)
                score = _decision(est, Xte)
                write_json(path, {"test": [int(i) for i in test], "predictions": [int(v) for v in pred],
                                  "scores": None if score is None else score.tolist(),
                                  "seconds": time.perf_counter() - t0})
                log.info("fit.%s fold %d/%d: accuracy %.3f (%.1f s)", fit.name, k + 1, len(folds),
                         float(np.mean(pred == s.labels[test])), time.perf_counter() - t0)
            results.append(read_json(path))
        combined = write_json(ctx.path("predictions", f"{fit.name}.json"), {"model": fit.name, "folds": results})
        return {"files": [ctx.rel(combined)], "n_folds": len(results),
                "seconds": float(sum(r["seconds"] for r in results))}

    return run


def _positive_index(cfg: NetworkEvaluateConfig, names: list[str]) -> int:
    if cfg.positive:
        if cfg.positive not in names:
            raise ConfigError(f"'evaluate.positive' = {cfg.positive!r} is not a label ({', '.join(names)})")
        return names.index(cfg.positive)
    return 1 if len(names) == 2 else 0


def _fold_metrics(r: dict, labels: np.ndarray, n_classes: int, positive: int) -> dict:
    from brainenc.metrics.classification import classification_scores

    test = np.asarray(r["test"], dtype=np.int64)
    score = None if r["scores"] is None else np.asarray(r["scores"], dtype=np.float64)
    if score is not None and n_classes == 2 and score.ndim == 2:
        score = score[:, positive]
    elif score is not None and n_classes == 2 and positive == 0:
        score = -score
    return classification_scores(labels[test], np.asarray(r["predictions"]), score,
                                 labels=list(range(n_classes)), positive=positive)


def _stage_evaluate(cfg: NetworkEvaluateConfig, fits: list[NetworkFit]):
    def run(ctx: StageContext) -> dict:
        from brainenc.metrics.classification import chance_level

        s = _samples(ctx)
        names = s.label_names
        positive = _positive_index(cfg, names)
        table = {}
        for fit in fits:
            res = read_json(ctx.run_dir / "predictions" / f"{fit.name}.json")
            per_fold = [_fold_metrics(r, s.labels, len(names), positive) for r in res["folds"]]
            keys = list(per_fold[0])
            summary = {}
            for key in keys:
                v = np.array([f[key] for f in per_fold], dtype=np.float64)
                ok = v[np.isfinite(v)]
                summary[key] = {"mean": float(ok.mean()) if len(ok) else float("nan"),
                                "std": float(ok.std(ddof=1)) if len(ok) > 1 else 0.0, "n_folds": int(len(ok))}
            table[fit.name] = {"kind": fit.kind, "pretrained": fit.pretrained, "folds": per_fold,
                               "summary": summary, "fit_seconds": float(sum(r["seconds"] for r in res["folds"]))}
        out = {"models": table, "chance": float(chance_level(s.labels)), "n_samples": len(s.series),
               "label_names": names, "positive": names[positive] if len(names) == 2 else None,
               "scheme": cfg.scheme, "edge_alpha": cfg.edge_alpha}
        out["graphs"] = _graphs(ctx, s, cfg)
        path = write_json(ctx.path("scores", "summary.json"), out)
        for name, row in table.items():
            acc = row["summary"]["accuracy"]
            log.info("%-18s accuracy %.3f +- %.3f", name, acc["mean"], acc["std"])
        return {"files": [ctx.rel(path)]}

    return run


def _graphs(ctx: StageContext, s: Samples, cfg: NetworkEvaluateConfig) -> dict:
    """Group FC, the learned BrainMAE graph, ground truth and the recovered difference edges."""
    from brainenc.pretraining.baselines import correlation_matrices
    from brainenc.pretraining.evaluation import edge_recovery, graph_similarity

    fc = correlation_matrices(s.series)
    group_fc = np.tanh(np.mean(np.arctanh(np.clip(fc, -0.999999, 0.999999)), axis=0))
    np.fill_diagonal(group_fc, 1.0)
    folder = ctx.path("scores", "graphs", "x").parent
    save_npy(folder / "group_fc.npy", group_fc.astype(np.float32))
    out: dict[str, Any] = {"group_fc": ctx.rel(folder / "group_fc.npy")}
    models = ctx.inputs.get("pretrain", {}).get("models", {})
    if models:
        from brainenc.pretraining import BrainMAE

        graphs = [BrainMAE.from_pretrained(ctx.run_dir / p, train={"device": "cpu"}).roi_graph_ for p in models.values()]
        learned = np.mean(graphs, axis=0).astype(np.float32)
        save_npy(folder / "learned_graph.npy", learned)
        out["learned_graph"] = ctx.rel(folder / "learned_graph.npy")
        sym = (learned + learned.T) / 2
        out["similarity"] = {"learned_vs_group_fc": graph_similarity(sym, group_fc, method="spearman")}
    gt_path = s.meta.get("ground_truth")
    if gt_path and len(s.label_names) == 2:
        from brainenc.datasets.simulate_cohort import load_ground_truth

        gt = load_ground_truth(Path(gt_path).parent)
        truth = np.asarray(gt["difference_edges"], dtype=bool)
        coupling = np.asarray(gt["coupling_control"], dtype=np.float64)
        rec = edge_recovery(fc, s.labels, truth, alpha=cfg.edge_alpha)
        save_npy(folder / "edge_t.npy", np.asarray(rec["t"], np.float32))
        save_npy(folder / "edges_detected.npy", np.asarray(rec["detected"], bool))
        save_npy(folder / "edges_true.npy", truth)
        save_npy(folder / "coupling_control.npy", coupling.astype(np.float32))
        out["edge_recovery"] = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                                for k, v in rec.items() if np.ndim(v) == 0}
        out["truth"] = {"edges_true": ctx.rel(folder / "edges_true.npy"), "edge_t": ctx.rel(folder / "edge_t.npy"),
                        "edges_detected": ctx.rel(folder / "edges_detected.npy"),
                        "coupling_control": ctx.rel(folder / "coupling_control.npy"),
                        "effect_size": float(np.asarray(gt.get("effect_size", np.nan)))}
        sim = out.setdefault("similarity", {})
        sim["group_fc_vs_truth"] = graph_similarity(group_fc, coupling, method="spearman")
        if "learned_graph" in out:
            sim["learned_vs_truth"] = graph_similarity((learned + learned.T) / 2, coupling, method="spearman")
    return out


def _stage_report(cfg: NetworkReportConfig, spec_name: str):
    def run(ctx: StageContext) -> dict:
        from brainenc.report.networks import build_network_report

        summary = read_json(ctx.run_dir / "scores" / "summary.json")
        files = build_network_report(ctx.run_dir / "report", summary, ctx.run_dir, title=spec_name,
                                     samples=read_json(ctx.run_dir / ctx.inputs["samples"]["folder"] / "meta.json"),
                                     max_rois=cfg.max_rois, dpi=cfg.dpi)
        return {"files": [ctx.rel(f) for f in files]}

    return run


# ----------------------------------------------------------------------------------------------
# the graph
# ----------------------------------------------------------------------------------------------
def build_networks_graph(spec, run) -> list[Stage]:
    """The networks task's stages for ``spec`` (its ``sections``) and ``run``."""
    sec = spec.sections
    cohort: CohortSection = sec["cohort"]
    evaluate: NetworkEvaluateConfig = sec["evaluate"]
    pretrain: PretrainSection = sec["pretrain"]
    fits: list[NetworkFit] = sec["fit"]
    report: NetworkReportConfig = sec["report"]
    names = [f.name for f in fits]
    if len(set(names)) != len(names):
        raise ConfigError("duplicate model names in [[fit]]")
    if "pretrain" in names:
        raise ConfigError("'fit.pretrain': the name is taken by the pretraining stage; rename the model")
    need_pretrain = any(f.pretrained for f in fits)
    stages = [
        Stage("cohort", _stage_cohort(cohort, run.data_dir), config=to_dict(cohort), volatile=True),
        Stage("samples", _stage_samples(cohort), config=to_dict(cohort), deps=("cohort",)),
        Stage("folds", _stage_folds(evaluate), config={"scheme": evaluate.scheme, "n_splits": evaluate.n_splits,
                                                        "seed": evaluate.seed}, deps=("samples",)),
    ]
    if need_pretrain:
        stages.append(Stage("pretrain", _stage_pretrain(pretrain), config=pretrain.to_dict(),
                            deps=("samples", "folds")))
    for f in fits:
        deps = ("samples", "folds", "pretrain") if f.pretrained else ("samples", "folds")
        stages.append(Stage(f"fit.{f.name}", _stage_fit(f, pretrain.scope), config=f.to_dict(), deps=deps))
    eval_deps = ("samples",) + tuple(f"fit.{f.name}" for f in fits) + (("pretrain",) if need_pretrain else ())
    stages.append(Stage("evaluate", _stage_evaluate(evaluate, fits), config=to_dict(evaluate), deps=eval_deps))
    stages.append(Stage("report", _stage_report(report, spec.name), config=to_dict(report),
                        deps=("samples", "evaluate")))
    return stages
