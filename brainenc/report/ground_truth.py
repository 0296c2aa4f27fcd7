"""Compare fitted scores with the simulator's ground truth (simulated subjects only).

The simulator (:mod:`brainenc.datasets.simulate`) writes ``brainenc_ground_truth_subjXX.h5`` with,
per nsdgeneral voxel, its grid position ``voxels/ijk``, its response model ``voxels/model``
(``model_codes`` attribute: pRF = early visual, category = category-selective, mixed = the
remaining weakly tuned voxels) and its true ``voxels/snr`` (std of the clean response over
images / std of the trial noise). From the SNR and the number of repeats averaged in the test
split the *true* noise ceiling is ``NC = SNR² / (SNR² + 1/n)`` (fraction of variance), which the
report sets against the estimated ceiling and the models' scores, per voxel group.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from brainenc._utils.io import write_json
from brainenc.datasets.noise_ceiling import noise_ceiling
from brainenc.exceptions import DataFormatError

__all__ = ["load_ground_truth", "match_voxels", "true_noise_ceiling", "compare_ground_truth"]

GROUP_TITLES = {"prf": "early visual (pRF)", "category": "category-selective", "mixed": "other nsdgeneral (mixed)"}


def load_ground_truth(path: str | Path) -> dict:
    """Read the per-voxel part of a simulator ground-truth file.

    Returns
    -------
    dict
        ``ijk`` int (m, 3), ``model`` int (m,), ``snr`` float (m,), ``codes`` {name: int},
        ``n_repeats`` float (trials per image), ``subject`` str.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            out = {
                "ijk": np.asarray(f["voxels/ijk"], dtype=np.int64),
                "model": np.asarray(f["voxels/model"], dtype=np.int64),
                "snr": np.asarray(f["voxels/snr"], dtype=np.float64),
                "codes": json.loads(f.attrs["model_codes"]),
                "subject": str(f.attrs.get("subject", "")),
            }
            rows = np.asarray(f["trials/image_row"], dtype=np.int64)
            shared = np.asarray(f["images/is_shared"], dtype=bool)
    except (OSError, KeyError) as exc:
        raise DataFormatError(f"{path}: not a readable brainenc ground-truth file ({exc})") from None
    counts = np.bincount(rows, minlength=shared.size)
    sel = counts[shared] if shared.any() else counts
    out["n_repeats"] = float(sel[sel > 0].mean()) if (sel > 0).any() else 1.0
    return out


def match_voxels(geometry: Mapping, ijk: np.ndarray) -> np.ndarray:
    """For each dataset voxel, its row in the ground truth (-1 if the simulator has none).

    Parameters
    ----------
    geometry : dict
        Volume geometry with ``shape`` and ``indices`` (n_voxels, 3).
    ijk : int array of shape (m, 3)

    Returns
    -------
    rows : int64 array of shape (n_voxels,)
    """
    if "indices" not in geometry:
        raise DataFormatError("ground-truth comparison needs a volume geometry (the simulator writes func1pt8mm)")
    shape = tuple(int(s) for s in geometry["shape"])
    lin_ds = np.ravel_multi_index(np.asarray(geometry["indices"], dtype=np.int64).T, shape)
    lin_gt = np.ravel_multi_index(np.asarray(ijk, dtype=np.int64).T, shape)
    order = np.argsort(lin_gt)
    pos = np.clip(np.searchsorted(lin_gt[order], lin_ds), 0, max(len(order) - 1, 0))
    rows = order[pos] if len(order) else np.zeros_like(lin_ds)
    found = (lin_gt[rows] == lin_ds) if len(order) else np.zeros(lin_ds.shape, bool)
    return np.where(found, rows, -1)


def true_noise_ceiling(snr, n_repeats: float) -> np.ndarray:
    """Noise ceiling (fraction of variance) of an ``n_repeats`` average at signal-to-noise ``snr``.

    ``NC = SNR² / (SNR² + 1/n)``, the NSD definition with the true SNR in place of ncsnr: the
    formula lives in :func:`brainenc.datasets.noise_ceiling.noise_ceiling` (``n_repeats`` here is
    the mean trials per test image, so ``1/n`` is ``1/n_repeats``).
    """
    return noise_ceiling(snr, float(n_repeats))


def _corr(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _mean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _f(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.3f}"


def compare_ground_truth(path: str | Path, scores: Mapping[str, Mapping[str, np.ndarray]],
                         geometry: Mapping, noise_ceiling: np.ndarray | None, out_dir: str | Path,
                         make_figures: bool = True) -> dict:
    """Set fitted scores against the simulator's truth, per voxel group.

    Parameters
    ----------
    path : path
        ``brainenc_ground_truth_subjXX.h5``.
    scores : dict of model -> dict of metric -> array of shape (n_voxels,)
        Uses ``r`` (squared, negatives as 0: variance explained) and ``nc_norm``.
    geometry : dict
        Volume geometry of the dataset.
    noise_ceiling : array of shape (n_voxels,) or None
        The estimated ceiling (fraction).
    out_dir : path
        Report folder; writes ``ground_truth.json`` and ``figures/ground_truth_*.png``.
    make_figures : bool

    Returns
    -------
    dict
        ``text`` (list of sentences), ``table`` (header row + rows), ``figures`` [(caption, rel)],
        ``files`` [rel paths], ``summary`` (numbers, also in ``ground_truth.json``).
    """
    out_dir = Path(out_dir)
    gt = load_ground_truth(path)
    rows = match_voxels(geometry, gt["ijk"])
    have = rows >= 0
    n_vox = rows.shape[0]
    nc_true = np.full(n_vox, np.nan)
    nc_true[have] = true_noise_ceiling(gt["snr"][rows[have]], gt["n_repeats"])
    group = np.full(n_vox, "none", dtype=object)
    code_to_name = {int(v): k for k, v in gt["codes"].items()}
    group[have] = [code_to_name.get(int(c), "other") for c in gt["model"][rows[have]]]
    nc_est = None if noise_ceiling is None else np.asarray(noise_ceiling, dtype=np.float64)

    summary: dict = {"ground_truth": str(path), "n_matched_voxels": int(have.sum()), "n_voxels": int(n_vox),
                     "n_repeats_test": gt["n_repeats"], "nc_estimate_vs_true_r": None, "models": {}, "groups": {}}
    if nc_est is not None:
        summary["nc_estimate_vs_true_r"] = _corr(nc_est[have], nc_true[have])
    var_expl = {}
    for model, s in scores.items():
        r = np.asarray(s.get("r", np.full(n_vox, np.nan)), dtype=np.float64)
        var_expl[model] = np.where(r > 0, r * r, 0.0)
        summary["models"][model] = {
            "r2_vs_true_nc_r": _corr(var_expl[model][have], nc_true[have]),
            "fraction_of_true_ceiling": _mean(var_expl[model][have]) / max(_mean(nc_true[have]), 1e-12),
        }
    models = list(scores)
    header = ["voxel group", "n voxels", "true NC", "estimated NC"]
    for m in models:
        header += [f"{m} r²", f"{m} r² / true NC", f"{m} NC-norm"]
    table = [header]
    for g in ("prf", "category", "mixed"):
        sel = group == g
        if not sel.any():
            continue
        entry = {"n_voxels": int(sel.sum()), "true_nc": _mean(nc_true[sel]),
                 "estimated_nc": _mean(nc_est[sel]) if nc_est is not None else float("nan"), "models": {}}
        row = [GROUP_TITLES.get(g, g), str(entry["n_voxels"]), _f(entry["true_nc"]), _f(entry["estimated_nc"])]
        for m in models:
            ve = _mean(var_expl[m][sel])
            nn = _mean(np.asarray(scores[m].get("nc_norm", np.full(n_vox, np.nan)))[sel])
            frac = ve / entry["true_nc"] if entry["true_nc"] > 0 else float("nan")
            entry["models"][m] = {"r2": ve, "r2_over_true_nc": frac, "nc_norm": nn}
            row += [_f(ve), _f(frac), _f(nn)]
        summary["groups"][g] = entry
        table.append(row)

    text = [f"Ground truth: {Path(path).name}; {summary['n_matched_voxels']} of {n_vox} analysed voxels have a "
            f"simulated tuning; the test split averages {gt['n_repeats']:.1f} repeats, so the true noise ceiling "
            "is SNR² / (SNR² + 1/n)."]
    if summary["nc_estimate_vs_true_r"] is not None:
        text.append(f"The estimated noise ceiling correlates r = {_f(summary['nc_estimate_vs_true_r'])} with the true one "
                    "across voxels.")
    for m in models:
        mm = summary["models"][m]
        text.append(f"{m}: variance explained correlates r = {_f(mm['r2_vs_true_nc_r'])} with the true ceiling across "
                    f"voxels and reaches {_f(mm['fraction_of_true_ceiling'])} of it on average.")
        groups = summary["groups"]
        if "prf" in groups and "category" in groups:
            a = groups["prf"]["models"][m]["r2_over_true_nc"]
            b = groups["category"]["models"][m]["r2_over_true_nc"]
            verdict = ("early visual voxels are better explained than category-selective ones" if a > b
                       else "category-selective voxels are explained as well as or better than early visual ones")
            text.append(f"{m}: {verdict} ({_f(a)} vs {_f(b)} of the true ceiling).")

    figs: list[tuple[str, str]] = []
    files: list[str] = []
    if make_figures:
        from brainenc.report.figures import plot_scatter

        groups = {GROUP_TITLES[g]: group == g for g in ("prf", "category", "mixed") if (group == g).any()}
        if nc_est is not None:
            p = plot_scatter(nc_true[have], nc_est[have], out_dir / "figures" / "ground_truth_nc.png",
                             "true noise ceiling", "estimated noise ceiling",
                             title="Noise ceiling: estimate vs truth", groups={k: v[have] for k, v in groups.items()})
            figs.append(("Estimated vs true noise ceiling per voxel", str(p.relative_to(out_dir))))
        for m in models:
            p = plot_scatter(nc_true[have], var_expl[m][have], out_dir / "figures" / f"ground_truth_{m}.png",
                             "true noise ceiling", f"{m} variance explained (r², test)",
                             title=f"{m}: score vs true ceiling", groups={k: v[have] for k, v in groups.items()})
            figs.append((f"{m}: variance explained vs the true noise ceiling (dashed: ceiling)", str(p.relative_to(out_dir))))
        files += [rel for _, rel in figs]
    write_json(out_dir / "ground_truth.json", summary)
    files.append("ground_truth.json")
    return {"text": text, "table": table if len(table) > 1 else [], "figures": figs, "files": files, "summary": summary}
