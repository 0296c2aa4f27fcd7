"""A fitted encoder of a finished run as a differentiable image -> voxel-response module.

>>> enc = load_differentiable_encoder("~/brainenc_data/runs/quickstart/subj01", "ridge")  # doctest: +SKIP
>>> y = enc(images)        # float [n, 3, H, W] in [0, 1] -> [n, n_voxels]; gradients reach images
>>> enc.describe()         # run, fit, estimator, backbone identity, layer, inputs (for records)

What a run folder records, and where this reads it (never from conventions or the current spec):

- ``stages/features.json``: ``config`` is the run's ``[features]`` table (a ``FeatureSpec``),
  ``key`` the stage key, ``outputs.path`` the feature-cache entry whose ``meta.json`` holds the
  identity the features were computed with (``backbone``: ``Backbone.describe()``, ``layer``:
  the canonical layer name, ``key``: the cache key).
- ``stages/fit.<name>.json``: ``config`` is the resolved ``[[fit]]`` table (``kind``,
  ``inputs = {features, grid_pool}``, the estimator's parameters), ``deps.features`` the key of
  the features stage it was fitted after, ``outputs.model`` the ``save_pretrained`` folder
  (``models/<name>``, read with :func:`brainenc.load`).

The backbone is rebuilt from the recorded feature spec and its ``describe()`` and layer must equal
the cache entry's (same weights file content, preprocessing, config); the fit record must name the
current features stage's key. The estimator's own head (``est.to_torch()``) is composed with
:class:`brainenc.features.differentiable.ImageToFeatures`: nothing is re-implemented here.
"""
from __future__ import annotations

from pathlib import Path

from brainenc._utils.io import read_json
from brainenc._utils.logging import get_logger
from brainenc.config import canonical_json, from_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.workflows.engine import STAGES_DIR, read_stage_record

__all__ = ["load_differentiable_encoder", "differentiable_encoder", "list_fits"]

log = get_logger("workflows")

#: default ``inputs`` of an estimator used outside a pipeline (the fit kinds' defaults)
_DEFAULT_FEATURES = {"routing": "tokens"}


def _estimator_name(estimator) -> str:
    return getattr(type(estimator), "_estimator_name", "") or type(estimator).__name__


def _as_inputs(inputs, estimator):
    from brainenc.workflows.spec import FitInputs

    if inputs is None:
        return FitInputs(features=_DEFAULT_FEATURES.get(_estimator_name(estimator), "pooled"))
    if isinstance(inputs, FitInputs):
        inputs.check()
        return inputs
    if isinstance(inputs, dict):
        return from_dict(FitInputs, inputs, _prefix="inputs.")
    raise ConfigError(f"'inputs' must be None, a FitInputs or a table {{features, grid_pool}}; "
                      f"{type(inputs).__name__} was provided")


def _identity_mismatch(built: dict, recorded: dict) -> str:
    """One-line description of where two identities differ."""
    for key in ("layer", "name", "family", "weights", "preprocess", "config"):
        a, b = built.get(key), recorded.get(key)
        if canonical_json(a) != canonical_json(b):
            return f"{key}: built {a!r} != recorded {b!r}"
    return "they differ"


def differentiable_encoder(estimator, feature_spec, backbone=None, *, inputs=None, device="cpu",
                           expect_identity: dict | None = None, info: dict | None = None):
    """A fitted estimator and the feature spec it was fitted on, as one frozen torch module.

    Parameters
    ----------
    estimator : fitted estimator or path
        A fitted RidgeEncoder / BandedRidgeEncoder / RoutingEncoder (anything with
        ``to_torch()``), or a ``save_pretrained`` folder (:func:`brainenc.load`).
    feature_spec : FeatureSpec or dict
        The ``[features]`` table the estimator's inputs were extracted with.
    backbone : Backbone, optional
        A ready backbone (its name must equal ``feature_spec.backbone``); built otherwise.
    inputs : FitInputs or dict, optional
        The fit's ``inputs`` (``features``, ``grid_pool``); default ``{"features": "tokens"}`` for
        the routing encoder, ``{"features": "pooled"}`` otherwise (the fit kinds' defaults).
    device : str or torch.device
        Where the module runs.
    expect_identity : dict, optional
        ``{"backbone": Backbone.describe(), "layer": canonical layer}`` the features were
        computed with (a feature-cache entry's ``meta.json``); a backbone that differs raises.
    info : dict, optional
        Extra entries of ``describe()``.

    Returns
    -------
    ImageEncoder
        ``forward(images [n, 3, H, W] float in [0, 1]) -> [n, n_voxels]``; frozen, eval mode.

    Raises
    ------
    DataFormatError
        When the built backbone is not the one of ``expect_identity``.
    ConfigError
        When the head does not take the features (kind or size).
    """
    from brainenc._utils.device import resolve_device
    from brainenc.features.differentiable import ImageToFeatures, compose

    if isinstance(estimator, (str, Path)):
        import brainenc

        estimator = brainenc.load(estimator)
    if not hasattr(estimator, "to_torch"):
        raise ConfigError(f"{type(estimator).__name__} has no torch head (to_torch); it cannot be differentiated")
    fin = _as_inputs(inputs, estimator)
    dev = resolve_device(device)
    itf = ImageToFeatures.from_spec(feature_spec, fin.features, fin.grid_pool, backbone=backbone, device=dev)
    if expect_identity is not None:
        built = dict(itf.backbone.describe(), layer=itf.layer)
        recorded = dict(expect_identity.get("backbone") or {}, layer=expect_identity.get("layer"))
        if canonical_json(built) != canonical_json(recorded):
            raise DataFormatError(f"backbone {itf.backbone.name!r} built from the feature spec is not the one the "
                                  f"model was fitted on ({_identity_mismatch(built, recorded)})")
    head = estimator.to_torch()
    meta = {"estimator": _estimator_name(estimator),
            "inputs": {"features": fin.features, "grid_pool": int(fin.grid_pool)},
            "backbone": itf.backbone.describe(), "layer": itf.layer, "identity_checked": expect_identity is not None}
    return compose(itf, head, info={**meta, **dict(info or {})})


def _find_run(path: Path, fit_name: str | None) -> tuple[Path, str | None]:
    """(run folder, fit name) of a run folder or of a model folder inside one."""
    if (path / "config.resolved.json").is_file() and (path / STAGES_DIR).is_dir():
        return path, fit_name
    run = path.parent.parent
    if path.parent.name == "models" and (run / "config.resolved.json").is_file():
        if fit_name is not None and fit_name != path.name:
            raise ConfigError(f"fit_name {fit_name!r} does not match the model folder {path}")
        return run, path.name
    if (path / "config.json").is_file():
        raise DataFormatError(f"{path}: a saved estimator outside a run folder records no feature spec; "
                              "use differentiable_encoder(estimator, feature_spec)")
    raise DataFormatError(f"{path}: not a run folder (no config.resolved.json and {STAGES_DIR}/) "
                          "nor a models/<name> folder of one")


def list_fits(run_dir) -> list[str]:
    """Names of the ``[[fit]]`` models of a run folder, in spec order (finished or not)."""
    run_dir = Path(run_dir).expanduser()
    cfg = read_json(run_dir / "config.resolved.json")
    fits = cfg.get("fit") if isinstance(cfg, dict) else None
    names = [f["name"] for f in fits if isinstance(f, dict) and "name" in f] if isinstance(fits, list) else []
    # a fit finished by an earlier spec of this run folder still has its record
    for rec in sorted((run_dir / STAGES_DIR).glob("fit.*.json")):
        name = rec.name[len("fit."):-len(".json")]
        if name not in names:
            names.append(name)
    return names


def load_differentiable_encoder(run_dir_or_model_dir, fit_name: str | None = None, *, device="cpu"):
    """The differentiable image encoder of one fitted model of a finished encoding run.

    Parameters
    ----------
    run_dir_or_model_dir : path
        A run folder (``<data root>/runs/<pipeline>/<subject>``) or its ``models/<name>`` folder.
    fit_name : str, optional
        The ``[[fit]]`` name; may be omitted when the run has one fit or a model folder is given.
    device : str or torch.device

    Returns
    -------
    ImageEncoder
        ``forward(images [n, 3, H, W] float in [0, 1]) -> [n, n_voxels]``, frozen, eval mode;
        ``describe()`` -> dict with ``run_dir``, ``fit``, ``kind``, ``estimator``, ``model_dir``,
        ``backbone`` (its ``describe()``: name, weights identity, preprocessing, config),
        ``layer``, ``inputs``, ``feature_key``, ``identity_checked`` and the module's own entries.

    Raises
    ------
    ConfigError
        Unknown fit name (the message lists the run's fits), or a fit name that is needed.
    DataFormatError
        Not a run folder, a fit or features stage that has not finished, a model fitted on other
        features than the recorded ones, or a backbone whose identity differs from the recorded one.
    """
    path = Path(run_dir_or_model_dir).expanduser()
    run_dir, fit_name = _find_run(path, fit_name)
    cfg = read_json(run_dir / "config.resolved.json")
    task = (cfg.get("pipeline") or {}).get("task", "encoding") if isinstance(cfg, dict) else "encoding"
    if task != "encoding":
        raise DataFormatError(f"{run_dir}: a '{task}' run has no encoding models")
    names = list_fits(run_dir)
    if fit_name is None:
        if len(names) != 1:
            raise ConfigError(f"{run_dir} has {len(names)} fits; pass fit_name, one of: {', '.join(names) or 'none'}")
        fit_name = names[0]
    if fit_name not in names:
        raise ConfigError(f"unknown fit {fit_name!r} in {run_dir}; available: {', '.join(names) or 'none'}")
    rec = read_stage_record(run_dir, f"fit.{fit_name}")
    if rec is None:
        raise DataFormatError(f"{run_dir}: fit.{fit_name} has not finished (no {STAGES_DIR}/fit.{fit_name}.json); "
                              "run the pipeline first")
    feat = read_stage_record(run_dir, "features")
    if feat is None:
        raise DataFormatError(f"{run_dir}: the features stage has no record ({STAGES_DIR}/features.json)")
    if (rec.get("deps") or {}).get("features") != feat.get("key"):
        raise DataFormatError(f"{run_dir}: models/{fit_name} was fitted on other features than the run's features "
                              f"stage records (a later run changed [features]); rerun the pipeline")
    from brainenc.features.extract import FeatureSpec
    from brainenc.workflows.spec import FitInputs

    fit_table = rec.get("config") or {}
    spec = from_dict(FeatureSpec, feat.get("config") or {}, _prefix="features.")
    inputs = from_dict(FitInputs, fit_table.get("inputs") or {}, _prefix=f"fit.{fit_name}.inputs.")
    out = rec.get("outputs") or {}
    if "model" not in out:
        raise DataFormatError(f"{run_dir / STAGES_DIR / ('fit.' + fit_name + '.json')}: the record has no 'model'")
    model_dir = run_dir / out["model"]
    expect, feature_key = None, (feat.get("outputs") or {}).get("key")
    fs_path = (feat.get("outputs") or {}).get("path")
    meta_path = Path(fs_path) / "meta.json" if fs_path else None
    if meta_path is not None and meta_path.is_file():
        meta = read_json(meta_path)
        if feature_key is not None and meta.get("key") != feature_key:
            raise DataFormatError(f"{meta_path}: cache key {meta.get('key')!r} is not the recorded {feature_key!r}")
        expect = {"backbone": meta.get("backbone"), "layer": meta.get("layer")}
    else:
        log.warning("%s: the feature cache entry %s is gone; the backbone identity is not checked", run_dir, fs_path)
    import brainenc

    est = brainenc.load(model_dir)
    info = {"run_dir": str(run_dir), "fit": fit_name, "kind": fit_table.get("kind"), "model_dir": str(model_dir),
            "feature_key": feature_key, "feature_spec": feat.get("config")}
    return differentiable_encoder(est, spec, inputs=inputs, device=device, expect_identity=expect, info=info)
