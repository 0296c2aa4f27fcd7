"""Model fitters for the ``fit.<name>`` stages: one function per ``[[fit]] kind``.

A fitter receives the stage context, its :class:`~brainenc.workflows.spec.FitSpec` (``name``,
``kind``, ``inputs`` and the estimator's validated configuration; ``fit.build()`` makes the
estimator) and a :class:`FitData` (design matrices already aligned to the prepared dataset's
rows) and must

- save the fitted estimator with ``save_pretrained`` in ``models/<name>/`` (safetensors +
  ``config.json``, never pickle; ``brainenc.load(models/<name>)`` reads it back),
- write predictions for every held-out split (float32, shape (n_rows_in_split, n_voxels)) with
  :func:`write_predictions`, and record them: ``"predictions": {split: path}``; downstream
  stages read them only from there,
- optionally record per-voxel extras ``"extras": {metric: path}`` (ridge: ``alpha``) and figures
  ``"figures": [(caption, path)]``,
- return ``{"files": [...], "model": path, "predictions": {...}, ...}`` for the stage record
  (paths relative to the run folder).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from brainenc._utils.io import load_npy, save_npy
from brainenc._utils.logging import get_logger
from brainenc.exceptions import ConfigError
from brainenc.features.pooling import pool_grid

__all__ = ["FitData", "fit_ridge", "fit_routing", "routing_figures", "write_predictions"]

log = get_logger("workflows")


@dataclasses.dataclass
class FitData:
    """Inputs of a fitter.

    Attributes
    ----------
    responses : array of shape (n_samples, n_voxels)
        The prepared responses (memory-mapped).
    splits : dict of str -> int64 array
        Row indices per split; ``"train"`` is fitted, the others predicted.
    features : callable
        ``features(kind) -> array`` with ``kind`` ``"pooled"`` -> (n_samples, dim) or ``"tokens"``
        -> (n_samples, n_tokens, dim), rows aligned to ``responses``.
    grid : tuple of int or None
        Patch grid (h, w) of the tokens.
    n_prefix : int
        Prefix (CLS/register) tokens before the patch tokens.
    roi_masks : dict of str -> bool array of shape (n_voxels,)
    roi_labels : dict of str -> int array of shape (n_voxels,)
        ROI label per family (0 = none), as ``PreparedDataset.roi_labels``.
    roi_names : dict of str -> dict of int -> str
    hemi : array of shape (n_voxels,) or None
        Hemisphere per voxel when the geometry has one (fsaverage).
    read_images : callable or None
        ``read_images(rows) -> uint8 [n, H, W, 3]``: the stimuli of dataset rows (for figures).
    """

    responses: Any
    splits: dict
    features: Callable[[str], np.ndarray]
    grid: tuple | None
    n_prefix: int
    roi_masks: dict
    roi_labels: dict = dataclasses.field(default_factory=dict)
    roi_names: dict = dataclasses.field(default_factory=dict)
    hemi: Any = None
    read_images: Callable[[np.ndarray], np.ndarray] | None = None


def write_predictions(ctx, name: str, data: FitData, predict: Callable[[np.ndarray], np.ndarray]) -> dict[str, str]:
    """Predict every non-train split and save ``predictions/<name>/<split>.npy``.

    Parameters
    ----------
    ctx : StageContext
    name : str
        Model name.
    data : FitData
    predict : callable
        ``predict(rows) -> float array (len(rows), n_voxels)``.

    Returns
    -------
    dict of str -> str
        ``{split: written file relative to the run folder}``.
    """
    out = {}
    for split, rows in sorted(data.splits.items()):
        if split == "train" or rows.size == 0:
            continue
        pred = np.asarray(predict(rows), dtype=np.float32)
        out[split] = ctx.rel(save_npy(ctx.path("predictions", name, f"{split}.npy"), pred))
    return out


def _design(data: FitData, fit) -> np.ndarray:
    inputs = fit.inputs
    if inputs.features == "tokens" and inputs.grid_pool > 0:
        if data.grid is None:
            raise ConfigError(f"'fit.{fit.name}.inputs.grid_pool' needs patch tokens with a grid")
        return pool_grid(data.features("tokens"), data.grid, inputs.grid_pool, data.n_prefix)
    X = np.asarray(data.features(inputs.features), dtype=np.float32)
    return X.reshape(X.shape[0], -1)


def fit_ridge(ctx, fit, data: FitData) -> dict:
    """Fit :class:`brainenc.encoding.RidgeEncoder` on the train rows; save it and its predictions.

    The encoder gets the raw design rows (its ``standardize`` z-scores them with the train rows'
    statistics, saved with the model) and is saved with ``save_pretrained`` in ``models/<name>/``
    (``config.json`` + ``model.safetensors``; ``brainenc.load`` reads it back); the per-voxel best
    alphas go to ``models/<name>/alpha.npy`` afterwards (an extra of the report's alpha map).

    Parameters
    ----------
    ctx : StageContext
    fit : FitSpec
        ``kind = "ridge"``; ``fit.params`` are RidgeEncoder parameters.
    data : FitData

    Returns
    -------
    dict
        Stage outputs: files, model, predictions, extras, n_train, n_features, alpha counts, fit seconds.
    """
    from brainenc.estimator import CONFIG_FILE, WEIGHTS_FILE

    enc = fit.build()
    X = _design(data, fit)
    train = data.splits["train"]
    Y = np.asarray(data.responses[train], dtype=np.float32)
    t0 = time.perf_counter()
    enc.fit(X[train], Y)  # raw design rows: the encoder z-scores them (and every X it predicts)
    fit_s = time.perf_counter() - t0
    del Y
    mdir = ctx.run_dir / "models" / fit.name
    enc.save_pretrained(mdir)  # replaces the whole folder: the extras are written after it
    alpha = save_npy(mdir / "alpha.npy", np.asarray(enc.best_alphas_, dtype=np.float64))
    preds = write_predictions(ctx, fit.name, data, lambda rows: enc.predict(X[rows]))
    files = [ctx.rel(mdir / WEIGHTS_FILE), ctx.rel(mdir / CONFIG_FILE), ctx.rel(alpha), *preds.values()]
    ba = np.asarray(enc.best_alphas_, dtype=np.float64)
    values, counts = np.unique(ba, return_counts=True)
    log.info("fit %s: %d train rows x %d features -> %d voxels in %.1f s (solver %s)",
             fit.name, train.size, X.shape[1], ba.size, fit_s, enc.solver_)
    return {"files": files, "model": ctx.rel(mdir), "predictions": preds, "n_train": int(train.size),
            "n_features": int(X.shape[1]), "fit_seconds": round(fit_s, 3), "solver": enc.solver_,
            "alpha_counts": {f"{v:g}": int(c) for v, c in zip(values, counts)},
            "extras": {"alpha": ctx.rel(alpha)}}


def fit_routing(ctx, fit, data: FitData) -> dict:
    """Train :class:`brainenc.encoding.RoutingEncoder` on the train rows' patch tokens.

    Checkpoints go to ``train/<name>/<stage key>/`` in the run folder, so a killed fit stage
    resumes from its last epoch on the next run with the same stage key; checkpoints of another
    key (a changed configuration or data) are deleted, never resumed. The fitted encoder is saved with
    ``save_pretrained`` (safetensors + JSON; the folder is replaced atomically) in
    ``models/<name>/``, then its figures are drawn into ``models/<name>/figures/``.

    Parameters
    ----------
    ctx : StageContext
    fit : FitSpec
        ``kind = "routing"``; ``fit.params`` are RoutingEncoder parameters (``model`` and
        ``train`` tables included).
    data : FitData
        Needs patch tokens with a grid (``[features] tokens = "patch"``).

    Returns
    -------
    dict
        Stage outputs: files, model, predictions, figures, n_train, best epoch, query count.
    """
    from brainenc.estimator import CONFIG_FILE, WEIGHTS_FILE

    if fit.inputs.features != "tokens" or fit.inputs.grid_pool:
        raise ConfigError(f"'fit.{fit.name}.inputs' must be {{ features = \"tokens\" }} for the routing encoder; "
                          f"{dataclasses.asdict(fit.inputs)!r} was provided")
    if data.grid is None:
        raise ConfigError(f"'fit.{fit.name}': the routing encoder needs patch tokens with a grid "
                          "([features] tokens = \"patch\")")
    tokens = data.features("tokens")
    if data.n_prefix:
        tokens = tokens[:, data.n_prefix:]
    train = data.splits["train"]
    enc = fit.build()
    mdir = ctx.run_dir / "models" / fit.name
    train_dir = ctx.checkpoint_dir(fit.name)
    resume = any(train_dir.iterdir())
    t0 = time.perf_counter()
    enc.fit(tokens[train], np.asarray(data.responses[train], dtype=np.float32), grid=tuple(data.grid),
            roi_labels=data.roi_labels, roi_names=data.roi_names, hemi=data.hemi, run_dir=train_dir,
            resume=resume)
    fit_s = time.perf_counter() - t0
    enc.save_pretrained(mdir)  # replaces the whole folder: figures come after
    preds = write_predictions(ctx, fit.name, data, lambda rows: enc.predict(tokens[rows]))
    files = [ctx.rel(mdir / WEIGHTS_FILE), ctx.rel(mdir / CONFIG_FILE), *preds.values()]
    n_q = len(enc.query_names_)
    log.info("fit %s: routing encoder (%s queries) on %d train rows in %.1f s, best epoch %s",
             fit.name, n_q, train.size, fit_s, enc.best_epoch_)
    figures = []
    if enc.query_set_ is not None and data.read_images is not None:
        test_pred = ctx.run_dir / preds["test"] if "test" in preds else None
        figures = routing_figures(ctx, fit.name, enc, tokens, data, test_predictions=test_pred)
        files += [rel for _, rel in figures]
    return {"files": files, "model": ctx.rel(mdir), "predictions": preds, "n_train": int(train.size),
            "fit_seconds": round(fit_s, 3),
            "best_epoch": int(enc.best_epoch_), "n_queries": int(n_q), "resumed": bool(resume),
            "figures": figures}


def routing_figures(ctx, name: str, enc, tokens: np.ndarray, data: FitData, *, n_images: int = 6,
                    top_k: int = 6, test_predictions=None) -> list[tuple[str, str]]:
    """Interpretation figures of a fitted ROI-query routing encoder, on held-out images.

    Writes ``models/<name>/figures/attention_<query>.png`` (head-mean attention of each query,
    overlaid on ``n_images`` test stimuli, ROI ``i``'s map labelled with query ``i``'s name) and
    ``top_images.png`` (per ROI, the test images with the highest mean predicted response).

    ``test_predictions`` is the saved prediction file of the test split (read instead of
    predicting again); without it the test rows are predicted.

    Returns
    -------
    list of (caption, path relative to the run folder)
    """
    from brainenc.report.attention import plot_attention_maps, plot_top_images, roi_mean_responses

    rows = np.asarray(data.splits.get("test", data.splits["train"]))
    if rows.size == 0:
        return []
    fig_dir = ctx.path("models", name, "figures", "x").parent
    show = rows[:n_images]
    images = data.read_images(show)
    attn = enc.attention_maps(tokens[show])  # [n, Q, h, w] head mean
    names = list(enc.query_names_)
    paths = plot_attention_maps(images, attn, names, fig_dir, max_images=n_images)
    out = [(f"{name}: attention of query '{p.stem[len('attention_'):]}' (head mean, test images)", ctx.rel(p))
           for p in paths]
    pred = load_npy(test_predictions) if test_predictions is not None else enc.predict(tokens[rows])
    masks = {k: v for k, v in data.roi_masks.items() if not k.startswith(("nsdgeneral", "streams", "prf-eccrois"))}
    roi_names, resp = roi_mean_responses(pred, masks)
    if roi_names:
        top = plot_top_images(data.read_images(rows), resp, roi_names, fig_dir / "top_images.png", k=top_k)
        out.insert(0, (f"{name}: test images with the highest predicted response per ROI", ctx.rel(top)))
    return out
