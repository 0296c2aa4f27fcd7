"""Issue 17: which differences between the RoutingEncoder and a minimal routing model cost accuracy.

Every variant is the *reference recipe* (the outsider's minimal model: 1 decoder layer, d 128, 8 heads,
FFN 256, no dropout, no final LayerNorm, tokens z-scored per channel on the training rows, sine code on
the keys, AdamW 1e-3 / wd 1e-4, clip 1.0, batch 32, 30 epochs, constant learning rate, best epoch on 10 %
of the training rows) with **one** thing changed back to what the package did (or to an alternative),
fitted through the public ``RoutingEncoder`` on a pipeline run folder's prepared data and cached tokens.
Two further rows are the package's configurations as whole recipes (``old default``: the paper's preset on
raw tokens, as the package shipped before; ``package default``: ``RoutingEncoder()`` today), and the
models the run folder's pipeline fitted are read from its evaluate stage for reference.

Scores: mean clip(r, 0)^2 / noise ceiling (capped at 1 per voxel, as the quickstart's evaluate) on the
test split, per voxel group of the simulator's ground truth (``early`` = pRF voxels, ``category``, ``mixed``) and over all voxels; per-ROI means in the JSON.

Usage::

    brainenc run quickstart                                  # a run folder with prepare + features
    python kernels/bench/routing_ablation.py <data root>/runs/quickstart/subj01 --seeds 0 1 \\
        --out kernels/results/routing_ablation_quickstart.json
    python kernels/bench/routing_ablation.py RUN --seeds 0 --isolate \
        --only "package default" "old default (paper preset, raw tokens)"       # time and peak memory

``--isolate`` runs each variant in a fresh process so that ``peak_rss_mb`` (the process's peak resident
memory) belongs to that variant alone; without it the value is the running maximum of one process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import h5py
import numpy as np

import brainenc
import brainenc.models
from brainenc.datasets.prepare import load_prepared
from brainenc.encoding.routing import RoutingEncoder
from brainenc.features import load_feature_set
from brainenc.metrics import ScoreSet, pearson_r
from brainenc.models import RoutingEncoderModel
from brainenc.workflows import read_stage_record

FAMILIES = ["prf-visualrois", "floc-faces", "floc-bodies", "floc-places", "floc-words"]
REFERENCE = {
    # every field given (over the "paper" preset = the dataclass defaults), so a change of the default
    # preset does not change the reference
    "est": {"preset": "paper", "standardize_tokens": True, "val_fraction": 0.1, "queries": "rois",
            "families": FAMILIES},
    "model": {"d_model": 128, "n_heads": 8, "d_ffn": 256, "n_layers": 1, "dropout": 0.0, "final_norm": False,
              "positional": "sine", "positional_scale": 1.0, "value_proj": True, "queries_per_group": 1},
    "train": {"epochs": 30, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 1.0,
              "schedule": "constant", "device": "cpu"},
}


def _variant(est=None, model=None, train=None, hook=None, replace=False):
    return {"est": est or {}, "model": model or {}, "train": train or {}, "hook": hook, "replace": replace}


CANDIDATE = {"positional_scale": 10.0, "dropout": 0.1, "final_norm": True}

#: name -> changes to REFERENCE (``replace``: the tables are the whole configuration, not changes)
VARIANTS = {
    "reference recipe": _variant(),
    "raw tokens (no standardisation)": _variant(est={"standardize_tokens": False}),
    "+ final LayerNorm": _variant(model={"final_norm": True}),
    "dropout 0.1": _variant(model={"dropout": 0.1}),
    "grad clip 0.1": _variant(train={"grad_clip": 0.1}),
    "no value projection": _variant(model={"value_proj": False}),
    "no input projection (d_model 112)": _variant(model={"d_model": 112, "input_proj": False}),
    "positional code x0.1": _variant(model={"positional_scale": 0.1}),
    "positional code x3": _variant(model={"positional_scale": 3.0}),
    "positional code x10": _variant(model={"positional_scale": 10.0}),
    "positional code x30": _variant(model={"positional_scale": 30.0}),
    "no positional code": _variant(model={"positional": "none"}),
    "learned positional code": _variant(model={"positional": "learned"}),
    "query init N(0, 0.02^2)": _variant(hook=("query_std", 0.02)),
    "cosine schedule": _variant(train={"schedule": "cosine"}),
    "warm-up 3 + cosine": _variant(train={"schedule": "warmup_cosine", "warmup_epochs": 3}),
    "no validation selection (last epoch)": _variant(est={"val_fraction": 0.0}),
    "15 epochs": _variant(train={"epochs": 15}),
    "60 epochs": _variant(train={"epochs": 60}),
    "lr 5e-4, batch 16 (paper optimiser)": _variant(train={"lr": 5e-4, "batch_size": 16}),
    "d 64, 4 heads, FFN 128": _variant(model={"d_model": 64, "n_heads": 4, "d_ffn": 128}),
    "2 decoder layers": _variant(model={"n_layers": 2}),
    "4 queries per ROI": _variant(model={"queries_per_group": 4}),
    "8 queries per ROI": _variant(model={"queries_per_group": 8}),
    "voxel queries (routing variant)": _variant(est={"queries": "voxels"}),
    "voxel queries, 20 epochs lr 3e-3": _variant(est={"queries": "voxels"}, train={"epochs": 20, "lr": 3e-3}),
    # combinations of what helped
    "pos x10 + dropout 0.1 + final LayerNorm": _variant(model=CANDIDATE),
    "  same, raw tokens": _variant(model=CANDIDATE, est={"standardize_tokens": False}),
    "  same, d 64 / 4 heads / FFN 128": _variant(model={**CANDIDATE, "d_model": 64, "n_heads": 4, "d_ffn": 128}),
    "  same, 4 queries per ROI": _variant(model={**CANDIDATE, "queries_per_group": 4}),
    "  same, voxel queries": _variant(model=CANDIDATE, est={"queries": "voxels"}),
    # whole recipes
    "old quickstart config": _variant(replace=True, est={"standardize_tokens": False, "queries": "rois", "families": FAMILIES},
                                      model={"d_model": 64, "n_heads": 4, "d_ffn": 128, "n_layers": 1, "positional": "sine"},
                                      train={"epochs": 30, "batch_size": 32, "lr": 1e-3, "device": "cpu"}),
    "old default (paper preset, raw tokens)": _variant(replace=True, est={"preset": "paper", "standardize_tokens": False,
                                                                      "queries": "rois", "families": FAMILIES},
                                                       train={"device": "cpu"}),
    "package default": _variant(replace=True, est={"queries": "rois", "families": FAMILIES}, train={"device": "cpu"}),
}


def _patched_model(hook):
    kind, value = hook

    class Patched(RoutingEncoderModel):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            if kind == "query_std":
                with __import__("torch").no_grad():
                    self.query_embed.normal_(0.0, value)
            else:
                raise ValueError(kind)
    return Patched


def load_run(run: Path):
    ds = load_prepared(read_stage_record(run, "prepare")["outputs"]["prepared"])
    fs = load_feature_set(read_stage_record(run, "features")["outputs"]["path"])
    tok = np.asarray(fs.tokens, dtype=np.float32)[fs.rows_for(ds.image_ids)][:, fs.n_prefix:]
    gt_file = read_stage_record(run, "simulate")["outputs"].get("ground_truth")
    groups = {}
    if gt_file:
        with h5py.File(gt_file, "r") as f:
            codes = json.loads(f.attrs["model_codes"])
            ijk = f["voxels/ijk"][:].astype(np.int64)
            model = f["voxels/model"][:]
        pos = {tuple(v): i for i, v in enumerate(ijk)}
        order = np.array([pos[tuple(v)] for v in np.asarray(ds.geometry["indices"], dtype=np.int64)])
        model = model[order]
        groups = {"early": model == codes["prf"], "category": model == codes["category"], "mixed": model == codes["mixed"]}
    return ds, tok, groups


def _nc_norm(r, nc):
    """The quickstart's evaluate options: clip(r, 0)^2 / NC, voxels with NC <= 0 excluded, capped at 1."""
    return np.minimum(np.clip(r, 0, None) ** 2 / np.where(nc > 0, nc, np.nan), 1.0)


def scores(ds, groups, pred, test):
    Y = np.asarray(ds.responses, dtype=np.float32)[test]
    nc = np.asarray(ds.noise_ceiling, dtype=np.float64)
    r = pearson_r(Y, pred)
    s = _nc_norm(r, nc)
    out = {g: float(np.nanmean(s[m])) for g, m in groups.items()}
    out["all"] = float(np.nanmean(s))
    out["rois"] = {k: float(np.nanmean(s[m])) for k, m in ds.roi_masks().items()
                   if k.startswith(tuple(f + "/" for f in FAMILIES)) and m.any()}
    return out


def run_variant(ds, tok, groups, name, seed):
    v = VARIANTS[name]
    if v["replace"]:
        est, model, train = dict(v["est"]), dict(v["model"]), dict(v["train"])
    else:
        est = {**REFERENCE["est"], **v["est"]}
        model = {**REFERENCE["model"], **v["model"]}
        train = {**REFERENCE["train"], **v["train"]}
    train["seed"] = seed
    if est.get("queries") == "voxels":
        model.pop("queries_per_group", None)
        est.pop("families", None)
    enc = RoutingEncoder(**est, model=model or None, train=train)
    tr, te = ds.splits["train"], ds.splits["test"]
    patch = (mock.patch.object(brainenc.models, "RoutingEncoderModel", _patched_model(v["hook"]))
             if v["hook"] else contextlib.nullcontext())
    t0 = time.perf_counter()
    with patch:
        enc.fit(tok[tr], np.asarray(ds.responses, dtype=np.float32)[tr], roi_labels=ds.roi_labels,
                roi_names=ds.roi_names, hemi=ds.geometry.get("hemi"))
    secs = time.perf_counter() - t0
    pred = enc.predict(tok[te])
    out = scores(ds, groups, pred, te)
    out.update(seconds=round(secs, 2), best_epoch=int(enc.best_epoch_), seed=seed,
               n_parameters=int(sum(p.numel() for p in enc.model_.parameters())),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               config=enc.to_config())
    return out


def ridge_rows(run: Path, ds, groups):
    rec = read_stage_record(run, "evaluate")
    sset = ScoreSet.load(Path(run) / rec["outputs"]["scores"], ds.roi_masks())
    out = {}
    for model in sset.models:
        r = np.asarray(sset.scores[model]["r"], dtype=np.float64)
        nc = np.asarray(ds.noise_ceiling, dtype=np.float64)
        s = _nc_norm(r, nc)
        out[model] = {g: float(np.nanmean(s[m])) for g, m in groups.items()}
        out[model]["all"] = float(np.nanmean(s))
    return out


def machine():
    import torch
    return {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "brainenc": brainenc.__version__}


def table(result) -> str:
    groups = [g for g in ("early", "category", "mixed", "all")]
    lines = ["| variant | " + " | ".join(groups) + " | train s | best epoch |", "|---" + "|---:" * (len(groups) + 2) + "|"]
    for name, row in result["variants"].items():
        m = row["mean"]
        lines.append(f"| {name} | " + " | ".join(f"{m.get(g, float('nan')):.3f}" for g in groups)
                     + f" | {m['seconds']:.0f} | {m['best_epoch']:.0f} |")
    for name, m in result.get("ridge", {}).items():
        lines.append(f"| pipeline fit '{name}' | " + " | ".join(f"{m.get(g, float('nan')):.3f}" for g in groups) + " | - | - |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="pipeline run folder with prepare + features (+ evaluate for ridge rows)")
    ap.add_argument("--only", nargs="*", default=[], help="variant names (default: all)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--isolate", action="store_true", help="one process per variant (exact peak memory)")
    ap.add_argument("--out", type=Path, default=Path("routing_ablation.json"))
    args = ap.parse_args(argv)
    names = args.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    ds, tok, groups = load_run(args.run)
    result = {"run": str(args.run), "machine": machine(), "n_train": int(ds.splits["train"].size),
              "n_test": int(ds.splits["test"].size), "n_voxels": int(ds.responses.shape[1]),
              "tokens": list(tok.shape[1:]), "reference": REFERENCE, "group_sizes": {g: int(m.sum()) for g, m in groups.items()},
              "variants": {}}
    try:
        result["ridge"] = ridge_rows(args.run, ds, groups)
    except (KeyError, FileNotFoundError):
        pass
    for name in names:
        if args.isolate:
            with tempfile.TemporaryDirectory() as tmp:
                sub = Path(tmp) / "one.json"
                subprocess.run([sys.executable, __file__, str(args.run), "--only", name, "--seeds",
                                *map(str, args.seeds), "--out", str(sub)], check=True)
                result["variants"][name] = json.loads(sub.read_text())["variants"][name]
        else:
            runs = [run_variant(ds, tok, groups, name, s) for s in args.seeds]
            mean = {k: float(np.mean([r[k] for r in runs])) for k in ("early", "category", "mixed", "all", "seconds", "best_epoch")
                    if all(k in r for r in runs)}
            mean["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            result["variants"][name] = {"mean": mean, "runs": runs}
        m = result["variants"][name]["mean"]
        print(f"{name:45s} early {m.get('early', float('nan')):.3f}  category {m.get('category', float('nan')):.3f}  "
              f"mixed {m.get('mixed', float('nan')):.3f}  all {m['all']:.3f}  {m['seconds']:.0f} s", flush=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)  # written after every variant: a killed run keeps what it measured
    print(table(result))


if __name__ == "__main__":
    main()
