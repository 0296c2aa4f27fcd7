# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ROI analysis of a finished run
#
# This notebook reads a finished encoding run (`brainenc run quickstart`) without re-fitting anything:
# the fitted models through `brainenc.load`, the prepared dataset and features through the run's stage
# records, and the scores the `evaluate` stage wrote. It then looks at the ROIs:
#
# 1. per-ROI scores against the noise ceiling, ridge against routing;
# 2. where each routing ROI query looks on the image (attention maps);
# 3. the predicted response profile of each ROI over image categories (the simulator knows what is
#    in every image);
# 4. the images each ROI is predicted to like most and least;
# 5. a voxel map on the brain (nilearn);
# 6. the similarity of ROIs' predicted responses.
#
# Set `BRAINENC_RUN` to a run folder to analyse another run; by default it is the quickstart's
# `subj01` run, made first if it does not exist (about 2 minutes on 2 cores).
#
# *On the documentation site* this notebook was executed on the tiny run of `docs/notebook_run.toml`
# (250 images, Gabor features, a routing encoder trained for 2 epochs), so its numbers are small and
# the routing encoder barely beats chance there. On the quickstart run the routing encoder reaches a
# mean NC-normalised score of 0.77, and every category ROI's predicted preferred category matches the
# measured one.

# %%
import json
import os
from pathlib import Path

import h5py
import matplotlib.pyplot as plt
import numpy as np

import brainenc
from brainenc.datasets.prepare import load_prepared
from brainenc.features.cache import load_feature_set
from brainenc.workflows import read_stage_record

run_dir = Path(os.environ.get("BRAINENC_RUN", "")).expanduser()
if not os.environ.get("BRAINENC_RUN"):
    from brainenc.workflows import run_pipeline

    run_dir = run_pipeline("quickstart", subject="subj01")  # a no-op when the run is finished
config = json.loads((run_dir / "config.resolved.json").read_text())
print("run:", run_dir)
print("pipeline:", config["pipeline"]["name"], "| subject:", config["run"]["subject"])

# %% [markdown]
# ## Load the run
# Each stage recorded its outputs; we open the files it names (nothing is recomputed).

# %%
prep = read_stage_record(run_dir, "prepare")["outputs"]
feat = read_stage_record(run_dir, "features")["outputs"]
sim = read_stage_record(run_dir, "simulate")["outputs"]
ds = load_prepared(prep["prepared"])
features = load_feature_set(feat["path"], expect_key=feat["key"])
models = {f["name"]: brainenc.load(run_dir / "models" / f["name"]) for f in config["fit"]}
kinds = {f["name"]: f["kind"] for f in config["fit"]}
split = config["evaluate"]["split"]
test_rows = ds.splits[split]
test_ids = np.asarray(ds.image_ids)[test_rows]
y_test = np.asarray(ds.responses[test_rows], dtype=np.float32)
predictions = {name: np.load(run_dir / "predictions" / name / f"{split}.npy", allow_pickle=False) for name in models}
scores = {name: {m.stem: np.load(m, allow_pickle=False) for m in sorted((run_dir / "scores" / name).glob("*.npy"))}
          for name in models}
noise_ceiling = np.load(run_dir / "scores" / "noise_ceiling.npy", allow_pickle=False)
masks = ds.roi_masks()
print(ds.describe())
print("models:", {n: type(m).__name__ for n, m in models.items()})

assert all(p.shape == y_test.shape for p in predictions.values())
assert noise_ceiling.shape == (ds.n_voxels,) and np.all((noise_ceiling >= 0) & (noise_ceiling <= 1))

# %% [markdown]
# The saved scores are what the predictions give: recompute the per-voxel Pearson r from the saved
# predictions and compare.

# %%
def pearson_per_voxel(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


for name, pred in predictions.items():
    r = pearson_per_voxel(y_test.astype(np.float64), pred.astype(np.float64))
    ok = np.isfinite(scores[name]["r"])
    np.testing.assert_allclose(r[ok], scores[name]["r"][ok], atol=1e-4, rtol=1e-4)
    print(f"{name}: mean r {np.nanmean(r):.3f} (matches scores/{name}/r.npy)")

# %% [markdown]
# ## 1. Per-ROI scores against the noise ceiling

# %%
families = ("prf-visualrois", "floc-faces", "floc-places", "floc-bodies", "floc-words")
rois = [k for k in masks if k.split("/")[0] in families and masks[k].sum() > 0]
rows = []
for roi in rois:
    m = masks[roi]
    row = {"roi": roi.split("/")[1], "n_voxels": int(m.sum()), "noise_ceiling": float(noise_ceiling[m].mean())}
    for name in models:
        row[f"r {name}"] = float(np.nanmean(scores[name]["r"][m]))
        row[f"nc_norm {name}"] = float(np.nanmean(scores[name]["nc_norm"][m]))
    rows.append(row)
header = list(rows[0])
print(" | ".join(f"{h:>14}" for h in header))
for row in rows:
    print(" | ".join(f"{v:>14.3f}" if isinstance(v, float) else f"{v:>14}" for v in row.values()))

fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rois)), 3.5))
x = np.arange(len(rois))
w = 0.8 / len(models)
for i, name in enumerate(models):
    ax.bar(x + i * w, [r[f"nc_norm {name}"] for r in rows], w, label=name)
ax.set_xticks(x + 0.4 - w / 2, [r["roi"] for r in rows], rotation=45, ha="right")
ax.set_ylabel("mean NC-normalised score")
ax.axhline(1.0, color="k", lw=0.5, ls="--")
ax.legend()
ax.set_title("per-ROI scores (1 = the noise ceiling)")
fig.tight_layout()

assert len(rows) > 0 and all(np.isfinite(r["noise_ceiling"]) for r in rows)

# %% [markdown]
# ## 2. Where the routing encoder's ROI queries look
# Mean cross-attention map of each ROI query over the test images (the maps sum to 1 over the patch
# grid). Early visual ROIs should attend where their receptive fields are; category ROIs more broadly.

# %%
routing = [n for n in models if kinds[n] == "routing"]
if routing:
    enc = models[routing[0]]
    rows_of = {int(i): k for k, i in enumerate(features.image_ids)}
    tokens = np.asarray(features.tokens[[rows_of[int(i)] for i in test_ids]])
    n_prefix = int(getattr(features, "n_prefix", 0) or 0)
    tokens = tokens[:, n_prefix:]
    maps = enc.attention_maps(tokens).mean(0)  # [q, h, w]
    names = list(enc.query_names_)
    print("queries:", names, "| map grid", maps.shape[1:])
    np.testing.assert_allclose(maps.reshape(len(names), -1).sum(1), 1.0, rtol=1e-4)
    cols = min(len(names), 6)
    fig, axes = plt.subplots(int(np.ceil(len(names) / cols)), cols, figsize=(2 * cols, 2.2 * np.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, q, name in zip(axes.flat, maps, names):
        ax.imshow(q, cmap="magma")
        ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{routing[0]}: mean attention per query ({split} images)")
    fig.tight_layout()
else:
    print("no routing model in this run")

# %% [markdown]
# ## 3. Predicted response profiles over image categories
# The simulator's ground truth records, for every image, the fraction of the image each object
# category covers. The profile of an ROI is its mean predicted response weighted by each category's
# presence, minus the mean over all images: which categories drive it. The measured profile (from
# the test responses) is drawn beside it; a good model reproduces it.

# %%
gt_path = sim.get("ground_truth")
profiles = {}
if gt_path:
    with h5py.File(gt_path, "r") as f:
        categories = json.loads(f.attrs["categories"])
        gt_ids = np.asarray(f["images/nsd_id"])
        fractions = np.asarray(f["images/category_fraction"], dtype=np.float64)
    where = {int(i): k for k, i in enumerate(gt_ids)}
    frac = fractions[[where[int(i)] for i in test_ids]]  # [n_test, n_categories]
    weights = frac / np.maximum(frac.sum(0, keepdims=True), 1e-12)

    def profile(resp):  # [n_test] -> [n_categories]
        return weights.T @ resp - resp.mean()

    best = max(models, key=lambda n: np.nanmean(scores[n]["nc_norm"]))
    cat_rois = [k for k in rois if k.startswith("floc-")] or rois[:4]
    fig, axes = plt.subplots(1, len(cat_rois), figsize=(3 * len(cat_rois), 3), squeeze=False)
    for ax, roi in zip(axes[0], cat_rois):
        m = masks[roi]
        pred_p = profile(predictions[best][:, m].mean(1))
        true_p = profile(y_test[:, m].mean(1))
        profiles[roi] = (pred_p, true_p)
        xx = np.arange(len(categories))
        ax.bar(xx - 0.2, true_p, 0.4, label="measured")
        ax.bar(xx + 0.2, pred_p, 0.4, label=f"predicted ({best})")
        ax.set_xticks(xx, categories, rotation=60, ha="right", fontsize=7)
        ax.set_title(roi.split("/")[1])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    agree = {roi.split("/")[1]: float(np.corrcoef(p, t)[0, 1]) for roi, (p, t) in profiles.items()}
    print("profile correlation, predicted vs measured:", {k: round(v, 2) for k, v in agree.items()})
    print("preferred category (measured -> predicted):",
          {roi.split("/")[1]: (categories[int(np.argmax(t))], categories[int(np.argmax(p))])
           for roi, (p, t) in profiles.items()})
    # the weighted profile is the category-weighted mean response minus the overall mean (direct loop)
    roi0 = cat_rois[0]
    resp0 = predictions[best][:, masks[roi0]].mean(1)
    direct = [sum(frac[i, c] * resp0[i] for i in range(len(resp0))) / max(frac[:, c].sum(), 1e-12) - resp0.mean()
              for c in range(len(categories))]
    np.testing.assert_allclose(profiles[roi0][0], direct, rtol=1e-5, atol=1e-7)
else:
    print("not a simulated run: no category ground truth")

# %% [markdown]
# ## 4. The images each ROI likes most and least (predicted)

# %%
from brainenc.features import HDF5Images

stimuli = HDF5Images(ds.stimuli_path)
best = max(models, key=lambda n: np.nanmean(scores[n]["nc_norm"]))
show = [k for k in rois if k.startswith("floc-")][:3] or rois[:3]
k = 4
fig, axes = plt.subplots(len(show), 2 * k, figsize=(2 * k * 1.2, 1.4 * len(show)), squeeze=False)
for r_i, roi in enumerate(show):
    resp = predictions[best][:, masks[roi]].mean(1)
    order = np.argsort(resp)
    picks = list(order[::-1][:k]) + list(order[:k])
    imgs = stimuli.read(np.sort(test_ids[picks]))
    by_id = dict(zip(np.sort(test_ids[picks]).tolist(), imgs))
    for c, row in enumerate(picks):
        ax = axes[r_i][c]
        ax.imshow(by_id[int(test_ids[row])])
        ax.set_xticks([])
        ax.set_yticks([])
        if c == 0:
            ax.set_ylabel(roi.split("/")[1], fontsize=8)
    axes[r_i][0].set_title("top", fontsize=8)
    axes[r_i][k].set_title("bottom", fontsize=8)
    assert resp[order[-1]] >= resp[order[0]]
fig.suptitle(f"predicted by {best}: top {k} | bottom {k} test images")
fig.tight_layout()

# %% [markdown]
# ## 5. A voxel map on the brain
# The best model's NC-normalised score per voxel, put back into the subject's volume and drawn with
# nilearn (surface runs: see the run report's surface maps).

# %%
from brainenc.report.maps import is_volume, values_to_volume

if is_volume(ds.geometry):
    import nibabel as nib
    from nilearn import plotting

    vol = values_to_volume(np.nan_to_num(scores[best]["nc_norm"]), ds.geometry)
    img = nib.Nifti1Image(vol.astype(np.float32), np.asarray(ds.geometry["affine"], dtype=np.float64))
    display = plotting.plot_stat_map(img, bg_img=None, display_mode="z", cut_coords=5, cmap="inferno",
                                     vmax=1.0, title=f"{best}: NC-normalised score", draw_cross=False)
    ijk = np.asarray(ds.geometry["indices"])
    np.testing.assert_allclose(vol[tuple(ijk.T)], np.nan_to_num(scores[best]["nc_norm"]), rtol=1e-6)
else:
    print("surface run: maps are in the run report")

# %% [markdown]
# ## 6. How similar are the ROIs' predicted responses?
# Correlation across test images of each ROI's mean predicted response (left) and measured response
# (right). ROIs with similar tuning (early visual areas; the face areas) group together.

# %%
names = [r.split("/")[1] for r in rois]
pred_roi = np.stack([predictions[best][:, masks[r]].mean(1) for r in rois], 1)
true_roi = np.stack([y_test[:, masks[r]].mean(1) for r in rois], 1)
sim_pred, sim_true = np.corrcoef(pred_roi.T), np.corrcoef(true_roi.T)
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, mat, title in zip(axes, (sim_pred, sim_true), ("predicted", "measured")):
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"ROI similarity, {title}")
fig.colorbar(im, ax=axes, shrink=0.8)
np.testing.assert_allclose(np.diag(sim_pred), 1.0, atol=1e-6)
np.testing.assert_allclose(sim_pred, sim_pred.T, atol=1e-12)
iu = np.triu_indices(len(names), 1)
print(f"predicted vs measured ROI similarity: r = {np.corrcoef(sim_pred[iu], sim_true[iu])[0, 1]:.2f}")
