"""Issue 17, first pass: RoutingEncoder variants (token z-scoring, grad clip, dropout, final norm) on a quickstart run.

Usage: python kernels/bench/ablate_routing_quickstart.py <data root>/runs/quickstart/subj01 [--only NAME ...]
Scores: mean clip(r, 0)^2 / noise ceiling on the test split, early = prf-visualrois voxels, category = floc ROIs.
"""
import json, sys, time
import numpy as np
from brainenc.datasets.prepare import load_prepared
from brainenc.features import load_feature_set
from brainenc.encoding.routing import RoutingEncoder
from brainenc.metrics import pearson_r
from brainenc.workflows import read_stage_record
import argparse
ap = argparse.ArgumentParser(description="issue 17 ablation (preliminary): RoutingEncoder variants on a quickstart run folder")
ap.add_argument("run"); ap.add_argument("--only", nargs="*", default=[]); ap.add_argument("--out", default="routing_ablation.json")
args = ap.parse_args()
run = args.run
ds = load_prepared(read_stage_record(run, "prepare")["outputs"]["prepared"])
fs = load_feature_set(read_stage_record(run, "features")["outputs"]["path"])
rows = fs.rows_for(ds.image_ids)
tok = np.asarray(fs.tokens, dtype=np.float32)[rows][:, fs.n_prefix:]
tr, te = ds.splits["train"], ds.splits["test"]
Y = np.asarray(ds.responses, dtype=np.float32)
nc = np.asarray(ds.noise_ceiling)
masks = ds.roi_masks()
early = np.zeros(Y.shape[1], bool)
for k, m in masks.items():
    if k.startswith("prf-visualrois/"): early |= m
cat = np.zeros(Y.shape[1], bool)
for k, m in masks.items():
    if k.startswith(("floc-faces/", "floc-bodies/", "floc-places/", "floc-words/")): cat |= m
def z(x, ref):
    mu = ref.mean((0, 1), keepdims=True); sd = ref.std((0, 1), keepdims=True) + 1e-6
    return (x - mu) / sd
base_model = dict(d_model=64, n_heads=4, d_ffn=128, n_layers=1, positional="sine")
base_train = dict(epochs=30, batch_size=32, lr=1e-3, device="cpu")
variants = {
    "quickstart config": ({}, {}, False),
    "+ z-scored tokens": ({}, {}, True),
    "+ z + grad_clip 1.0": ({}, {"grad_clip": 1.0}, True),
    "+ z + clip1 + dropout 0": ({"dropout": 0.0}, {"grad_clip": 1.0}, True),
    "+ z + clip1 + drop0 + no final norm": ({"dropout": 0.0, "final_norm": False}, {"grad_clip": 1.0}, True),
    "raw + clip1 + drop0 + no final norm": ({"dropout": 0.0, "final_norm": False}, {"grad_clip": 1.0}, False),
}
only = args.only
out = {}
for name, (m, t, zs) in variants.items():
    if only and name not in only: continue
    X = z(tok, tok[tr]) if zs else tok
    enc = RoutingEncoder(queries="rois", families=["prf-visualrois","floc-faces","floc-bodies","floc-places","floc-words"],
                         model={**base_model, **m}, train={**base_train, **t}, val_fraction=0.1)
    t0 = time.perf_counter()
    enc.fit(X[tr], Y[tr], roi_labels=ds.roi_labels, roi_names=ds.roi_names, hemi=ds.geometry.get("hemi"))
    secs = time.perf_counter() - t0
    r = pearson_r(Y[te], np.asarray(enc.predict(X[te])))
    s = np.clip(r, 0, None) ** 2 / np.where(nc > 0, nc, np.nan)
    out[name] = {"early": float(np.nanmean(s[early])), "category": float(np.nanmean(s[cat])),
                 "all": float(np.nanmean(s)), "seconds": round(secs, 1), "best_epoch": int(enc.best_epoch_)}
    print(name, out[name], flush=True)
json.dump(out, open(args.out, "w"), indent=1)
