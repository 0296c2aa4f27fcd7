"""The estimator contract every model users fit follows (ridge, banded ridge, routing, ...).

- scikit-learn parameters: ``__init__`` only stores its arguments, ``get_params`` / ``set_params``
  / ``sklearn.base.clone`` work, validation happens in ``fit``, fitted attributes end in ``_``.
- ``save_pretrained(dir)`` writes ``config.json`` (``{"class", "version", "format", "config",
  "fitted"}``) and ``model.safetensors`` (the fitted arrays); ``Cls.from_pretrained(dir)`` reads
  them back and ``brainenc.load(dir)`` picks the class from the ``ESTIMATORS`` registry by the
  ``class`` field. No pickle anywhere: configs are JSON data, weights are safetensors.

A subclass registers itself with ``@register_estimator("name")`` and describes its fitted state
with two hooks, ``_fitted_state() -> (arrays, meta)`` and ``_restore_fitted(arrays, meta)``; the
default hooks save the attributes named in ``_fitted_arrays`` (ndarrays) and ``_fitted_meta``
(JSON values).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from brainenc._version import __version__
from brainenc._utils.io import read_json, remove_stale_temps, temp_dir_name, write_json
from brainenc._utils.tensors import WeightsMismatchError, load_tensors, save_tensors
from brainenc.exceptions import ConfigError, DataFormatError, NotFittedError
from brainenc.registry import Registry

__all__ = ["ESTIMATORS", "register_estimator", "EstimatorMixin", "load_estimator", "CONFIG_FILE", "WEIGHTS_FILE",
           "FORMAT_VERSION", "to_json_value"]

log = logging.getLogger("brainenc.estimator")

#: Registered estimator classes by name (the ``class`` field of ``config.json``).
ESTIMATORS = Registry("estimator")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def register_estimator(name: str):
    """Class decorator: register an estimator under ``name`` for :func:`load_estimator`."""

    def _add(cls):
        cls._estimator_name = name
        ESTIMATORS.register(name, cls)
        return cls

    return _add


_UNSERIALISABLE = object()


def to_json_value(value: Any) -> Any:
    """``value`` as plain JSON data, or a private sentinel when it has no JSON form.

    numpy scalars and arrays become numbers and lists, tuples become lists, mappings are
    converted recursively (string keys only).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.dtype.kind in "biuf" else _UNSERIALISABLE
    if isinstance(value, (list, tuple)):
        items = [to_json_value(v) for v in value]
        return _UNSERIALISABLE if any(i is _UNSERIALISABLE for i in items) else items
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            return _UNSERIALISABLE
        items = {k: to_json_value(v) for k, v in value.items()}
        return _UNSERIALISABLE if any(i is _UNSERIALISABLE for i in items.values()) else items
    return _UNSERIALISABLE


class EstimatorMixin:
    """Save/load and fitted-state checks shared by brainenc estimators (see the module docstring)."""

    _estimator_name: str = ""
    #: attributes written to model.safetensors by the default hooks
    _fitted_arrays: tuple[str, ...] = ()
    #: attributes written to config.json["fitted"] by the default hooks
    _fitted_meta: tuple[str, ...] = ()
    #: constructor parameters that are data-dependent arrays (saved with the weights, not as JSON)
    _array_params: tuple[str, ...] = ()

    # ---- parameters --------------------------------------------------------------------------
    def _check_params(self, prefix: str = "") -> Any:
        """Validate every constructor parameter (hook; :class:`ConfigError` naming ``prefix + name``).

        Called by :meth:`from_config` and by ``fit``; never changes a parameter. The default
        checks nothing.
        """
        return None

    @classmethod
    def _unknown_key_hint(cls, key: str, prefix: str) -> str | None:
        """Hook: a hint for an unknown configuration key (e.g. "it belongs in the 'train' table")."""
        return None

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, *, prefix: str = ""):
        """Build from a plain mapping (a TOML table, a ``to_config()`` result) and validate it at once.

        Parameters
        ----------
        config : mapping, optional
            Constructor parameters by name (nested tables where a parameter takes one).
        prefix : str
            Prepended to key names in error messages (``"fit.ridge."``).

        Raises
        ------
        ConfigError
            An unknown key (with a did-you-mean) or an invalid value, one line naming the key.
        """
        import difflib

        config = dict(config or {})
        names = cls._get_param_names()  # type: ignore[attr-defined]
        for key in config:
            if key in names:
                continue
            hint = cls._unknown_key_hint(key, prefix)
            if hint is None:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{prefix}{key}' for {cls.__name__}{hint}")
        est = cls(**config)
        est._check_params(prefix)
        return est

    def to_config(self) -> dict[str, Any]:
        """The constructor parameters as JSON data, every default filled in (``from_config`` inverts it)."""
        return self._config_json()

    # ---- fitted state ------------------------------------------------------------------------
    def _is_fitted(self) -> bool:
        names = self._fitted_arrays or self._fitted_meta
        return bool(names) and all(hasattr(self, n) for n in names)

    def _check_fitted(self) -> None:
        if not self._is_fitted():
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit first")

    def _fitted_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        arrays = {n: getattr(self, n) for n in self._fitted_arrays}
        meta = {n: to_json_value(getattr(self, n)) for n in self._fitted_meta}
        return arrays, meta

    def _restore_fitted(self, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        for n in self._fitted_arrays:
            setattr(self, n, arrays[n])
        for n in self._fitted_meta:
            setattr(self, n, meta[n])

    # ---- persistence -------------------------------------------------------------------------
    def _config_json(self) -> dict[str, Any]:
        """Constructor parameters as JSON (array parameters go to the weights file)."""
        params = self.get_params(deep=False)  # type: ignore[attr-defined]
        out, dropped = {}, []
        for k, v in params.items():
            if k in self._array_params:
                continue
            j = to_json_value(v)
            if j is _UNSERIALISABLE:
                dropped.append(k)
                continue
            out[k] = j
        if dropped:
            log.warning("%s.save_pretrained: parameters %s have no JSON form and are saved as their defaults "
                        "(they only affect fit, not predict)", type(self).__name__, ", ".join(dropped))
        return out

    def _resolved_config_json(self) -> dict[str, Any]:
        """Constructor parameters as JSON for estimators whose ``_check_params()`` returns the resolved
        ``(model, train)`` configs: those two are written whole (presets and defaults applied), so a
        saved model does not depend on what a preset holds in a later version. A parameter without a
        JSON form is an error (nothing is silently dropped)."""
        from brainenc.config import to_dict

        model, train = self._check_params()  # type: ignore[attr-defined]
        resolved = {"model": model, "train": train}
        out = {}
        for key, value in self.get_params(deep=False).items():  # type: ignore[attr-defined]
            j = to_json_value(to_dict(resolved.get(key, value)))
            if j is _UNSERIALISABLE:
                raise ConfigError(f"'{key}' has no JSON form ({type(value).__name__}); use plain values")
            out[key] = j
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the fitted estimator to ``directory`` (``config.json`` + ``model.safetensors``).

        The folder is built under a temporary name and renamed into place, so a killed process
        never leaves a half-written model under ``directory``; an existing model there is replaced.

        Returns
        -------
        Path
            ``directory``.
        """
        self._check_fitted()
        if not self._estimator_name:
            raise ConfigError(f"{type(self).__name__} is not registered with @register_estimator")
        directory = Path(directory).expanduser()
        directory.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(directory.parent, recursive=False)
        arrays, meta = self._fitted_state()
        params = self.get_params(deep=False)  # type: ignore[attr-defined]
        for k in self._array_params:
            if params.get(k) is not None:
                for sub, arr in _flatten_array_param(k, params[k]).items():
                    arrays[sub] = arr
        tmp = directory.parent / temp_dir_name(directory.name)
        tmp.mkdir()
        try:
            save_tensors(tmp / WEIGHTS_FILE, arrays, metadata={"format": f"brainenc.{self._estimator_name}"})
            write_json(tmp / CONFIG_FILE, {"class": self._estimator_name, "version": __version__,
                                           "format": FORMAT_VERSION, "config": self._config_json(),
                                           "array_params": {k: _array_param_layout(params.get(k))
                                                            for k in self._array_params},
                                           "fitted": meta})
            if directory.exists():
                old = directory.parent / temp_dir_name(directory.name + "-old")
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, **params):
        """Load an estimator written by :meth:`save_pretrained`.

        Parameters
        ----------
        directory : path
        **params
            Constructor parameters to override (e.g. ``device="cuda"``). For a parameter named in the
            class's ``_nested_params`` (tables such as ``model`` / ``train``), a mapping updates the
            saved table key by key (``train={"device": "cpu"}``).
        """
        directory = Path(directory).expanduser()
        meta = read_pretrained_config(directory)
        for k in getattr(cls, "_nested_params", ()):
            if isinstance(params.get(k), Mapping) and isinstance(meta["config"].get(k), Mapping):
                params[k] = {**meta["config"][k], **params[k]}
        if meta["class"] != cls._estimator_name and cls is not EstimatorMixin:
            raise DataFormatError(f"{directory / CONFIG_FILE}: holds a {meta['class']!r} estimator, "
                                  f"not {cls._estimator_name!r} (use brainenc.load to get the right class)")
        arrays = load_tensors(directory / WEIGHTS_FILE)
        config = dict(meta["config"])
        for k, layout in (meta.get("array_params") or {}).items():
            config[k] = _unflatten_array_param(k, layout, arrays)
        config.update(params)
        try:
            est = cls(**config)
        except TypeError as exc:
            raise DataFormatError(f"{directory / CONFIG_FILE}: config does not fit {cls.__name__} ({exc})") from None
        try:
            est._restore_fitted(arrays, meta["fitted"])
        except KeyError as exc:
            raise DataFormatError(f"{directory}: saved state lacks {exc.args[0]!r}") from None
        except WeightsMismatchError as exc:  # raised by load_module_state: name the file
            raise DataFormatError(f"{directory / WEIGHTS_FILE}: {exc}") from None
        return est


def _flatten_array_param(name: str, value: Any) -> dict[str, np.ndarray]:
    if isinstance(value, Mapping):
        return {f"param.{name}.{k}": np.asarray(v) for k, v in value.items()}
    return {f"param.{name}": np.asarray(value)}


def _array_param_layout(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {"keys": list(value)}
    return "array"


def _unflatten_array_param(name: str, layout: Any, arrays: Mapping[str, Any]) -> Any:
    if layout is None:
        return None
    if isinstance(layout, Mapping):
        return {k: arrays[f"param.{name}.{k}"] for k in layout["keys"]}
    return arrays[f"param.{name}"]


def read_pretrained_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a saved estimator, validated (one-line errors naming the file)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataFormatError(f"{directory}: no saved estimator here (folder not found)")
    path = directory / CONFIG_FILE
    meta = read_json(path)
    if not isinstance(meta, dict) or not all(k in meta for k in ("class", "config", "fitted")):
        raise DataFormatError(f"{path}: not a brainenc estimator config (needs 'class', 'config', 'fitted')")
    if int(meta.get("format", 1)) > FORMAT_VERSION:
        raise DataFormatError(f"{path}: written by a newer brainenc (format {meta['format']}, "
                              f"this is {__version__}); upgrade brainenc")
    return meta


def load_estimator(directory: str | Path, **params):
    """Load any registered estimator saved with ``save_pretrained``; the class comes from ``config.json``."""
    meta = read_pretrained_config(directory)
    cls = ESTIMATORS.get(meta["class"])
    return cls.from_pretrained(directory, **params)
