"""The ``synthesize`` task: BrainDiVE, images synthesised to drive a brain region.

Stage graph (per subject, ``runs/<pipeline>/<subject>``)::

    simulate -> prepare -> encoders -> synthesize -> evaluate -> report

- ``simulate`` / ``prepare``: the encoding task's stages.
- ``encoders``: two ridge encoders on frozen-backbone features of the training images. The
  *guiding* encoder (``[guide]``) steers the diffusion; the *held-out* encoder (``[heldout]``:
  other features, by default another layer, and the other half of the training images) scores the
  results, so that the evaluation is not the circular "the encoder that guided says it worked" of
  the paper. Both are saved with ``save_pretrained`` and their test-set accuracy per ROI recorded.
- ``synthesize``: the diffusion prior (the shipped pixel prior offline, or a Stable Diffusion
  folder of the user's) sampled with brain guidance (:func:`brainenc.synthesis.synthesize`) for
  every objective (an ROI's mean predicted response, or a contrast A − B), and once without
  guidance from the same seeds (the control). Batches are written when they finish
  (``synthesize/<objective>/batch<k>.npz``; a killed stage resumes at the next batch) with one PNG
  and one JSON record per image (seed, scale, steps, objective value, encoder identity).
- ``evaluate``: per objective, the held-out encoder's objective on guided vs unguided images of the
  same seeds (mean, spread, paired difference, Wilcoxon signed-rank p), after re-ranking by the
  guiding encoder (the top ``keep_fraction``), and on natural test images (all, and the top fraction
  by the measured response of the ROI); ``evaluate/table.{json,csv,md}``.
- ``report``: ``report/index.md`` + ``index.html``: the table, one image grid per objective
  (guided over unguided, same seeds), a bar figure.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from brainenc._utils.io import read_json, write_json, write_text
from brainenc._utils.logging import get_logger, progress_enabled
from brainenc.config import from_dict, to_dict
from brainenc.exceptions import ConfigError, DataFormatError, MissingWeightsError
from brainenc.workflows.engine import Stage, StageContext
from brainenc.workflows.reconstruct import _fresh_folder, _images, data_stages, parse_prepare, parse_simulate

__all__ = ["SynthEncoderSection", "SynthesisSection", "SynthEvaluateSection", "SynthReportSection", "SECTIONS",
           "build_synthesize_graph", "objective_names", "UNGUIDED"]

log = get_logger("workflows")

#: folder / row name of the unguided control
UNGUIDED = "unguided"


# ----------------------------------------------------------------------------------------------
# spec tables
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SynthEncoderSection:
    """``[guide]`` / ``[heldout]``: a ridge encoder on frozen-backbone features.

    Attributes
    ----------
    features : dict
        A :class:`brainenc.features.FeatureSpec` table (backbone, layer, pretrained, weights, ...).
    inputs : {"pooled", "tokens"}
        Which features the ridge reads: the layer's pooled vector, or its patch tokens (with
        ``grid_pool`` > 0: means over a ``grid_pool`` × ``grid_pool`` grid of image regions).
    grid_pool : int
    alphas : list of float
    cv : int
    rows : {"all", "half-a", "half-b"}
        Training images used: all, or the even / odd ones of the training split (the default guide
        and held-out encoders use disjoint halves).
    unit_norm : bool
        L2-normalise each feature row before the ridge (:class:`~brainenc.encoding.RidgeEncoder`
        ``unit_norm``): the paper's encoder reads the unit-norm CLIP embedding.
    """

    features: dict = dataclasses.field(default_factory=lambda: {"backbone": "efficientnet-lite0",
                                                                "layer": "blocks.15"})
    inputs: str = "pooled"
    grid_pool: int = 0
    alphas: list = dataclasses.field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0])
    cv: int = 5
    rows: str = "all"
    unit_norm: bool = False

    def check(self, name: str = "guide") -> "SynthEncoderSection":
        from brainenc.features.extract import FeatureSpec

        if self.inputs not in ("pooled", "tokens"):
            raise ConfigError(f"'{name}.inputs' must be 'pooled' or 'tokens'; {self.inputs!r} was provided")
        if self.rows not in ("all", "half-a", "half-b"):
            raise ConfigError(f"'{name}.rows' must be all, half-a or half-b; {self.rows!r} was provided")
        if self.grid_pool and self.inputs != "tokens":
            raise ConfigError(f"'{name}.grid_pool' needs inputs = 'tokens'")
        from_dict(FeatureSpec, dict(self.features), _prefix=f"{name}.features.").check()
        return self

    def feature_spec(self):
        from brainenc.features.extract import FeatureSpec

        spec = dict(self.features)
        if self.inputs == "pooled":
            spec.setdefault("tokens", "none")
        else:
            spec.setdefault("pooled", "none")
        return from_dict(FeatureSpec, spec).check()


def _heldout_default() -> SynthEncoderSection:
    return SynthEncoderSection(features={"backbone": "efficientnet-lite0", "layer": "blocks.10"},
                               inputs="tokens", grid_pool=4, rows="half-b")


@dataclasses.dataclass
class SynthesisSection:
    """``[synthesis]``: what to synthesise and how (:class:`brainenc.synthesis.GuidanceConfig`).

    Attributes
    ----------
    prior : str
        ``"shipped"`` (the package's pixel prior of the simulated scenes, 32 px), a prior record
        written by ``brainenc train-prior`` (``.json``), or a local Stable Diffusion folder in
        diffusers format (SD-2.1-base as the paper).
    rois : list of str
        One objective per entry: the mean predicted response of the ROI (``"FFA-1"``,
        ``"floc-faces/FFA-1"``; ``"A+B"`` unites ROIs).
    contrasts : list of [str, str]
        Contrast objectives ``mean(A) − mean(B)`` (e.g. ``["OFA", "FFA-1"]``).
    n : int
        Images per objective (seeds ``seed .. seed + n − 1``, the same for every objective and for the
        unguided control).
    seed : int
    steps, scale, scheduler, sag_scale, gradient_checkpointing, dtype, batch_size, augment, max_shift
        :class:`brainenc.synthesis.GuidanceConfig`.
    keep_fraction : float
        Re-ranking by the guiding encoder keeps this top fraction (BrainDiVE: 20 %).
    device : str
    """

    prior: str = "shipped"
    rois: list = dataclasses.field(default_factory=lambda: ["FFA-1", "PPA", "EBA", "VWFA-1"])
    contrasts: list = dataclasses.field(default_factory=list)
    n: int = 20
    seed: int = 0
    steps: int = 50
    scale: float = 130.0
    scheduler: str = "dpm-multistep"
    sag_scale: float = 0.0
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    batch_size: int = 10
    augment: int = 0
    max_shift: float = 0.125
    keep_fraction: float = 0.2
    device: str = "cpu"

    def guidance(self):
        from brainenc.synthesis import GuidanceConfig

        return GuidanceConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GuidanceConfig)})

    def check(self) -> "SynthesisSection":
        self.guidance().check()
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ConfigError(f"'synthesis.n' must be a positive integer; {self.n!r} was provided")
        if not (0 < float(self.keep_fraction) <= 1):
            raise ConfigError(f"'synthesis.keep_fraction' must be in (0, 1]; {self.keep_fraction!r} was provided")
        if not self.rois and not self.contrasts:
            raise ConfigError("'synthesis' names no objective: give 'rois' and/or 'contrasts'")
        for c in self.contrasts:
            if not (isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(v, str) for v in c)):
                raise ConfigError(f"'synthesis.contrasts' entries must be [roi_a, roi_b]; {c!r} was provided")
            if c[0] == c[1]:
                raise ConfigError(f"'synthesis.contrasts' entry {c!r} contrasts an ROI with itself")
        names = objective_names(self)
        if len(set(names)) != len(names):
            raise ConfigError(f"'synthesis' names an objective twice: {names}")
        return self


@dataclasses.dataclass
class SynthEvaluateSection:
    """``[evaluate]``.

    Attributes
    ----------
    natural_split : str
        Natural images compared with the synthesised ones (the held-out encoder's objective on all of
        them, and on the top ``keep_fraction`` by the *measured* response).
    clip : dict, optional
        CLIP zero-shot 5-way classification (faces / places / bodies / words / food) of the kept
        guided images, the unguided images and the top natural images: ``{arch = "ViT-B-32-quickgelu",
        weights = "<path>"}`` (an OpenAI / open_clip checkpoint of ``arch``); ``weights = "random"``
        runs the plumbing with random weights (no meaningful category). Objectives on a floc ROI report
        the fraction classified as that ROI's category.
    """

    natural_split: str = "test"
    clip: dict | None = None

    def check(self) -> "SynthEvaluateSection":
        if self.clip is not None:
            unknown = set(self.clip) - {"arch", "weights", "batch_size"}
            if unknown or "weights" not in self.clip:
                raise ConfigError("'evaluate.clip' takes arch, weights (a path or \"random\") and batch_size; "
                                  f"{sorted(self.clip)} was provided")
        return self


@dataclasses.dataclass
class SynthReportSection:
    """``[report]``: ``n_show`` images per objective in the grids; figure ``dpi``."""

    n_show: int = 10
    dpi: int = 110


_FAMILY_CATEGORY = {"floc-faces": "faces", "floc-places": "places", "floc-bodies": "bodies",
                    "floc-words": "words"}


def _category_of(obj) -> str | None:
    names = (obj.describe().get("names") or [])
    fams = {str(n).split("/")[0] for n in names}
    cats = {_FAMILY_CATEGORY.get(f) for f in fams}
    return cats.pop() if len(cats) == 1 else None


def _parse_guide(table, prefix: str) -> SynthEncoderSection:
    return from_dict(SynthEncoderSection, table, _prefix=prefix).check(prefix.rstrip("."))


def _parse_heldout(table, prefix: str) -> SynthEncoderSection:
    base = to_dict(_heldout_default())
    base.update(dict(table or {}))
    return from_dict(SynthEncoderSection, base, _prefix=prefix).check(prefix.rstrip("."))


def _parse_synthesis(table, prefix: str) -> SynthesisSection:
    return from_dict(SynthesisSection, table, _prefix=prefix).check()


SECTIONS = {"prepare": parse_prepare, "simulate": parse_simulate, "guide": _parse_guide,
            "heldout": _parse_heldout, "synthesis": _parse_synthesis, "evaluate": SynthEvaluateSection,
            "report": SynthReportSection}


def objective_names(syn: SynthesisSection) -> list[str]:
    """Folder names of the objectives: ROI names, ``A-minus-B`` for contrasts (``/`` -> ``_``)."""
    def clean(s):
        return str(s).replace("/", "_")
    return [clean(r) for r in syn.rois] + [f"{clean(a)}-minus-{clean(b)}" for a, b in syn.contrasts]


def _objectives(syn: SynthesisSection, masks: dict):
    from brainenc.synthesis import ResponseObjective

    out = {}
    for name, roi in zip(objective_names(syn)[:len(syn.rois)], syn.rois):
        out[name] = ResponseObjective.from_masks(masks, roi.split("+"))
    for name, (a, b) in zip(objective_names(syn)[len(syn.rois):], syn.contrasts):
        out[name] = ResponseObjective.from_masks(masks, a.split("+"), b.split("+"))
    return out


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def _train_rows(ds, which: str) -> np.ndarray:
    rows = np.asarray(ds.splits["train"])
    if which == "half-a":
        return rows[0::2]
    if which == "half-b":
        return rows[1::2]
    return rows


def _design(fs, enc: SynthEncoderSection, order: np.ndarray) -> np.ndarray:
    from brainenc.features.pooling import pool_grid

    if enc.inputs == "pooled":
        return np.asarray(fs.pooled[order], np.float32)
    tok = np.asarray(fs.tokens[order], np.float32)
    if enc.grid_pool:
        return pool_grid(tok, fs.grid, enc.grid_pool, fs.n_prefix)
    return tok.reshape(tok.shape[0], -1)


def _stage_encoders(sec: dict, run, loaded):
    def body(ctx: StageContext) -> dict:
        from brainenc.encoding import RidgeEncoder
        from brainenc.features import HDF5Images, extract_features
        from brainenc.metrics.voxelwise import pearson_r

        ds = loaded.dataset(ctx)
        if ds.stimuli_path is None:
            raise DataFormatError(f"{ds.path}: the prepared dataset has no stimuli file; synthesis needs the images")
        ids = np.asarray(ds.image_ids)
        Y = np.asarray(ds.responses, np.float32)
        te = np.asarray(ds.splits["test"])
        masks = ds.roi_masks()
        out: dict[str, Any] = {"encoders": {}}
        for role in ("guide", "heldout"):
            enc: SynthEncoderSection = sec[role]
            spec = enc.feature_spec()
            fs = extract_features(HDF5Images(ds.stimuli_path), np.unique(ids), spec, cache_dir=run.features_root)
            order = np.searchsorted(np.asarray(fs.image_ids), ids)
            rows = _train_rows(ds, enc.rows)
            X = _design(fs, enc, order)
            t0 = time.perf_counter()
            est = RidgeEncoder(alphas=list(enc.alphas), cv=enc.cv, standardize=True, unit_norm=enc.unit_norm).fit(X[rows], Y[rows])
            r = pearson_r(Y[te], est.predict(X[te]))
            roi_r = {k: float(np.nanmean(r[m])) for k, m in masks.items() if m.any()}
            folder = ctx.run_dir / "encoders" / role
            est.save_pretrained(folder)
            log.info("encoders: %s ridge on %s %s (%s, %d training images): test r %.3f (%.1f s)", role,
                     spec.backbone, spec.layer, enc.inputs, len(rows), float(np.nanmean(r)),
                     time.perf_counter() - t0)
            out["encoders"][role] = {"model": str(folder), "features": to_dict(spec),
                                     "inputs": {"features": enc.inputs, "grid_pool": int(enc.grid_pool)},
                                     "feature_key": fs.key, "n_train": int(len(rows)),
                                     "test_r_mean": float(np.nanmean(r)), "test_r_roi": roi_r}
        out["files"] = [str(ctx.run_dir / "encoders")]
        return out
    return body


def _load_encoder(record: dict, device: str):
    from brainenc.workflows.differentiable import differentiable_encoder

    return differentiable_encoder(record["model"], record["features"], inputs=record["inputs"], device=device,
                                  info={"role_model": record["model"]})


def _load_prior(syn: SynthesisSection):
    import torch

    from brainenc.synthesis import load_prior, load_sd_prior

    if syn.prior == "shipped":
        return load_prior(None, device=syn.device)
    p = Path(syn.prior).expanduser()
    if p.suffix == ".json":
        return load_prior(p, device=syn.device)
    if not p.exists():
        raise MissingWeightsError(f"synthesis.prior: {p} does not exist (a Stable Diffusion folder in diffusers "
                                  "format, a prior .json from `brainenc train-prior`, or \"shipped\")")
    dtype = torch.float16 if syn.dtype == "float16" else torch.float32
    return load_sd_prior(p, dtype=dtype, device=syn.device, scheduler=syn.scheduler)


def _batch_path(folder: Path, k: int) -> Path:
    return folder / f"batch{k:03d}.npz"


def _save_batch(path: Path, images, values, seeds) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, images=images, values=values, seeds=seeds)
    tmp.replace(path)


def _load_batch(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _stage_synthesize(sec: dict, loaded):
    syn: SynthesisSection = sec["synthesis"]

    def body(ctx: StageContext) -> dict:
        from brainenc.report.reconstruction import save_png
        from brainenc.synthesis import synthesize

        ds = loaded.dataset(ctx)
        objectives = _objectives(syn, ds.roi_masks())
        prior = _load_prior(syn)
        guide_rec = ctx.inputs["encoders"]["encoders"]["guide"]
        guide = _load_encoder(guide_rec, syn.device)
        cfg = syn.guidance()
        seeds = np.arange(syn.seed, syn.seed + syn.n, dtype=np.int64)
        root = ctx.run_dir / "synthesize"
        _fresh_folder(root, ctx.key)   # batches of another configuration are never reused
        runs = [(UNGUIDED, objectives[next(iter(objectives))], False)] + [(k, o, True) for k, o in objectives.items()]
        out: dict[str, Any] = {"objectives": {}, "prior": prior.describe(), "guide": guide.describe(),
                               "config": cfg.to_dict()}
        n_batches = -(-len(seeds) // syn.batch_size)
        done = 0
        t_all = time.perf_counter()
        for name, obj, guided in runs:
            folder = root / name
            for k in range(n_batches):
                path = _batch_path(folder, k)
                if path.is_file():
                    done += 1
                    continue
                batch = seeds[k * syn.batch_size:(k + 1) * syn.batch_size]
                t0 = time.perf_counter()
                res = synthesize(prior, guide, obj, batch.tolist(), cfg, guided=guided, progress=progress_enabled())
                for i, s in enumerate(batch):
                    save_png(res["images"][i], folder / f"seed{int(s):05d}.png")
                    write_json(folder / f"seed{int(s):05d}.json", {
                        "seed": int(s), "guided": guided, "objective": obj.describe() if guided else None,
                        "scale": float(syn.scale) if guided else 0.0, "steps": syn.steps,
                        "scheduler": syn.scheduler, "guide_value": float(res["values"][i]),
                        "guide_objective_of": name if guided else "unguided control (value of the first objective)",
                        "encoder": guide.describe(), "prior": res["prior"]})
                _save_batch(path, res["images"], res["values"], np.asarray(batch))
                log.info("synthesize: %s batch %d/%d in %.1f s", name, k + 1, n_batches, time.perf_counter() - t0)
            out["objectives"][name] = {"folder": str(folder), "guided": guided,
                                       "objective": obj.describe(), "batches": n_batches}
        out["seconds"] = time.perf_counter() - t_all
        out["batches_reused"] = done
        out["files"] = [str(root)]
        return out
    return body


def _gather(folder: Path) -> dict:
    parts = [_load_batch(p) for p in sorted(Path(folder).glob("batch*.npz"))]
    if not parts:
        raise DataFormatError(f"{folder}: no synthesised batches")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _summ(v: np.ndarray) -> dict:
    v = np.asarray(v, np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def _predict(encoder, images_u8: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(images_u8), batch):
            x = torch.from_numpy(np.ascontiguousarray(images_u8[s:s + batch])).permute(0, 3, 1, 2).float() / 255
            out.append(encoder(x.to(_encoder_device(encoder))).float().cpu().numpy())
    return np.concatenate(out)


def _encoder_device(module):
    try:
        return next(module.parameters()).device
    except StopIteration:
        return "cpu"


def _stage_evaluate(sec: dict, loaded):
    syn: SynthesisSection = sec["synthesis"]
    ev: SynthEvaluateSection = sec["evaluate"]

    def body(ctx: StageContext) -> dict:
        import torch
        from scipy.stats import wilcoxon

        from brainenc.synthesis import rerank

        ds = loaded.dataset(ctx)
        objectives = _objectives(syn, ds.roi_masks())
        encs = ctx.inputs["encoders"]["encoders"]
        guide = _load_encoder(encs["guide"], syn.device)
        held = _load_encoder(encs["heldout"], syn.device)
        syn_out = ctx.inputs["synthesize"]["objectives"]
        ung = _gather(Path(syn_out[UNGUIDED]["folder"]))
        ung_held_y = _predict(held, ung["images"])
        ung_guide_y = _predict(guide, ung["images"])
        if ev.natural_split not in ds.splits:
            raise ConfigError(f"'evaluate.natural_split' {ev.natural_split!r} is not a split of the dataset "
                              f"({sorted(ds.splits)})")
        nat_rows = np.asarray(ds.splits[ev.natural_split])
        nat_ids = np.asarray(ds.image_ids)[nat_rows]
        nat_imgs = _images(ds, nat_ids)
        nat_held_y = _predict(held, nat_imgs)
        Y = np.asarray(ds.responses, np.float32)[nat_rows]
        clip = None
        if ev.clip is not None:
            from brainenc.features.openclip import build_clip_model, zero_shot_classify

            w = ev.clip["weights"]
            arch = ev.clip.get("arch", "ViT-B-32-quickgelu")
            clip_model = build_clip_model(arch, weights=None if w == "random" else w, device=syn.device)

            def clip(images):
                return zero_shot_classify(images, clip_model, arch=arch, batch_size=int(ev.clip.get("batch_size", 32)))
            ung_clip = clip(ung["images"])
        rows, table = [], {}
        for name, obj in objectives.items():
            def f(y):
                return obj(torch.from_numpy(np.asarray(y, np.float32))).numpy().astype(np.float64)
            g = _gather(Path(syn_out[name]["folder"]))
            if not np.array_equal(g["seeds"], ung["seeds"]):
                raise DataFormatError(f"{name}: guided and unguided seeds differ; rerun the synthesize stage")
            held_g, held_u = f(_predict(held, g["images"])), f(ung_held_y)
            guide_g, guide_u = g["values"].astype(np.float64), f(ung_guide_y)   # stored by synthesize
            keep_g = rerank(guide_g, syn.keep_fraction)
            keep_u = rerank(guide_u, syn.keep_fraction)
            measured = f(Y)
            top_nat = rerank(measured, syn.keep_fraction)
            nat = f(nat_held_y)
            diff = held_g - held_u
            p = float(wilcoxon(held_g, held_u).pvalue) if len(diff) >= 6 and np.any(diff != 0) else float("nan")
            rec = {
                "objective": obj.describe(),
                "heldout": {"guided": _summ(held_g), "unguided": _summ(held_u),
                            "guided_kept": _summ(held_g[keep_g]), "unguided_kept": _summ(held_u[keep_u]),
                            "natural_all": _summ(nat), "natural_top_measured": _summ(nat[top_nat]),
                            "paired_diff": _summ(diff), "frac_guided_higher": float(np.mean(diff > 0)),
                            "wilcoxon_p": p},
                "guide": {"guided": _summ(guide_g), "unguided": _summ(guide_u)},
                "kept_seeds": g["seeds"][keep_g].tolist(),
            }
            if clip is not None:
                cat = _category_of(obj)
                zs = {"guided_kept": clip(g["images"][keep_g]), "guided": clip(g["images"]), "unguided": ung_clip,
                      "natural_top_measured": clip(nat_imgs[top_nat])}
                labels = zs["guided"]["labels"]
                rec["clip_zero_shot"] = {
                    "category": cat, "labels": labels, "weights": ev.clip["weights"],
                    **{k: {"fraction": (np.bincount(v["pred"], minlength=len(labels)) / len(v["pred"])).tolist(),
                           "category_fraction": (float(np.mean(np.asarray(labels)[v["pred"]] == cat))
                                                 if cat else None)} for k, v in zs.items()}}
            table[name] = rec
            h = rec["heldout"]
            rows.append([name, f"{h['guided']['mean']:.3f} ± {h['guided']['sd']:.3f}",
                         f"{h['unguided']['mean']:.3f} ± {h['unguided']['sd']:.3f}",
                         f"{h['paired_diff']['mean']:+.3f}", f"{h['frac_guided_higher']:.2f}", f"{p:.2g}",
                         f"{h['guided_kept']['mean']:.3f}", f"{h['unguided_kept']['mean']:.3f}",
                         f"{h['natural_top_measured']['mean']:.3f}", f"{h['natural_all']['mean']:.3f}",
                         f"{rec['guide']['guided']['mean']:.3f} / {rec['guide']['unguided']['mean']:.3f}"])
        headers = ["objective", "held-out: guided", "unguided (same seeds)", "paired diff", "frac guided >",
                   "Wilcoxon p", f"guided top {syn.keep_fraction:.0%}", f"unguided top {syn.keep_fraction:.0%}",
                   f"natural top {syn.keep_fraction:.0%} (measured)", "natural all", "guiding enc: guided / unguided"]
        folder = ctx.run_dir / "evaluate"
        res = {"n": int(syn.n), "keep_fraction": syn.keep_fraction, "natural_split": ev.natural_split,
               "n_natural": int(len(nat_rows)), "objectives": table, "headers": headers, "rows": rows,
               "encoders": {k: {kk: v[kk] for kk in ("features", "inputs", "n_train", "test_r_mean")}
                            for k, v in encs.items()}}
        files = [write_json(folder / "table.json", res)]
        files.append(write_text(folder / "table.csv", "\n".join(",".join(f'"{c}"' for c in r)
                                                               for r in [headers] + rows) + "\n"))
        md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        files.append(write_text(folder / "table.md", "\n".join(md) + "\n"))
        return {"table": str(folder / "table.json"), "files": [str(f) for f in files]}
    return body


def _stage_report(sec: dict, run, title: str):
    rep: SynthReportSection = sec["report"]
    syn: SynthesisSection = sec["synthesis"]

    def body(ctx: StageContext) -> dict:
        from brainenc.report.synthesis import build_synthesis_report

        res = read_json(ctx.inputs["evaluate"]["table"])
        syn_out = ctx.inputs["synthesize"]["objectives"]
        images = {k: _gather(Path(v["folder"]))["images"] for k, v in syn_out.items()}
        files = build_synthesis_report(ctx.run_dir / "report", res, images, unguided=UNGUIDED, title=title,
                                       subject=run.subject, encoders=ctx.inputs["encoders"]["encoders"],
                                       synthesis=ctx.inputs["synthesize"], n_show=rep.n_show, dpi=rep.dpi,
                                       scale=syn.scale, steps=syn.steps)
        return {"report": str(ctx.run_dir / "report" / "index.md"), "files": [str(f) for f in files]}
    return body


def build_synthesize_graph(spec, run) -> list[Stage]:
    """The synthesize task's stages for ``spec`` (its ``sections``) and ``run`` (one subject).

    A prior path that does not exist stops the run before any work.
    """
    sec = spec.sections
    syn: SynthesisSection = sec["synthesis"]
    if syn.prior != "shipped" and not Path(syn.prior).expanduser().exists():
        raise MissingWeightsError(f"synthesis.prior: {syn.prior} does not exist (weights are never downloaded: "
                                  "a local Stable Diffusion folder, a prior .json from `brainenc train-prior`, "
                                  "or \"shipped\")")
    clip = sec["evaluate"].clip
    if clip is not None and clip["weights"] != "random" and not Path(str(clip["weights"])).expanduser().exists():
        raise MissingWeightsError(f"evaluate.clip.weights: {clip['weights']} does not exist (weights are never "
                                  "downloaded; give a local CLIP checkpoint or \"random\")")
    loaded, stages = data_stages(sec, run)
    enc_cfg = {"guide": to_dict(sec["guide"]), "heldout": to_dict(sec["heldout"])}
    syn_cfg = {k: v for k, v in to_dict(syn).items() if k not in ("keep_fraction",)}
    return stages + [
        Stage("encoders", _stage_encoders(sec, run, loaded), enc_cfg, deps=["prepare"]),
        Stage("synthesize", _stage_synthesize(sec, loaded), syn_cfg, deps=["prepare", "encoders"]),
        Stage("evaluate", _stage_evaluate(sec, loaded), {"evaluate": to_dict(sec["evaluate"]),
                                                         "keep_fraction": syn.keep_fraction},
              deps=["prepare", "encoders", "synthesize"]),
        Stage("report", _stage_report(sec, run, spec.pipeline.name), to_dict(sec["report"]),
              deps=["encoders", "synthesize", "evaluate"]),
    ]
