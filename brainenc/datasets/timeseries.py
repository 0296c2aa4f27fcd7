"""ROI time series from 4-D fMRI: volumes through an atlas, surfaces through a parcellation, pre-extracted
ROI tables, and NSD's pre-processed run time series.

- :func:`extract_roi_timeseries`: a 4-D NIfTI reduced with a label or probabilistic atlas (nilearn
  ``NiftiLabelsMasker`` / ``NiftiMapsMasker``), with confound regression, detrending and band-pass.
- :func:`surface_roi_timeseries`: fsaverage MGH / GIfTI / array data averaged within the labels of an
  ``.annot`` / label GIfTI / MGH / array parcellation (one file or an (lh, rh) pair).
- :func:`read_roi_table`: one subject's pre-extracted table (ABIDE-PCP ``.1D``, CSV, TSV, TXT);
  :func:`read_confounds_table` for confound TSVs (``n/a`` cells allowed).
- :func:`load_nsd_timeseries`: one run of ``nsddata_timeseries`` reduced with the subject's NSD ROIs.

Every function returns ``(series, roi_names)`` (plus the TR for NSD) with ``series`` float32
[n_timepoints, n_rois]. numpy/nibabel/nilearn only; nilearn is imported on first use.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from brainenc._utils.validation import check_option
from brainenc.datasets import layout
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = [
    "extract_roi_timeseries",
    "surface_roi_timeseries",
    "read_roi_table",
    "read_confounds_table",
    "load_nsd_timeseries",
    "header_tr",
]

_STANDARDIZE = ("zscore_sample", "zscore", "psc")
_NA_TOKENS = frozenset({"n/a", "na", "nan", ""})
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(nan|inf|infinity)$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _short(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:200]}"


def _standardize_arg(standardize) -> str | None:
    """nilearn's ``standardize`` value: True -> 'zscore_sample', False/None -> None, or a strategy name."""
    if standardize is True:
        return "zscore_sample"
    if standardize is False or standardize is None:
        return None
    if isinstance(standardize, str) and standardize in _STANDARDIZE:
        return standardize
    raise ConfigError(f"'standardize' must be True, False, None or one of {', '.join(_STANDARDIZE)}; "
                      f"{standardize!r} was provided")


def _check_tr(t_r) -> float | None:
    if t_r is None:
        return None
    if isinstance(t_r, bool) or not isinstance(t_r, (int, float, np.number)) or not np.isfinite(t_r) or t_r <= 0:
        raise ConfigError(f"'t_r' must be a positive number of seconds; {t_r!r} was provided")
    return float(t_r)


def header_tr(img) -> float | None:
    """Repetition time in seconds from a NIfTI header (``pixdim[4]``), or None when it is not set.

    Time units ``msec``/``usec`` are converted; 'unknown' units are taken as seconds. A zero,
    negative or non-finite ``pixdim[4]`` (and a 3-D image) gives None.
    """
    zooms = img.header.get_zooms()
    if len(zooms) < 4:
        return None
    tr = float(zooms[3])
    if not np.isfinite(tr) or tr <= 0:
        return None
    try:
        unit = img.header.get_xyzt_units()[1]
    except Exception:  # noqa: BLE001 - non-NIfTI headers
        unit = "sec"
    return tr / 1000.0 if unit == "msec" else tr / 1e6 if unit == "usec" else tr


def _load_nifti(img, what: str):
    """A nibabel image from a path or an image (paths are validated: missing, unreadable, truncated)."""
    import nibabel as nib

    if isinstance(img, (str, Path)):
        from brainenc.datasets.nsd import _volume_header

        p = Path(img)
        if not p.is_file():
            raise DataFormatError(f"{p}: {what} file not found")
        return _volume_header(p, what)
    if isinstance(img, nib.spatialimages.SpatialImage):
        return img
    raise ConfigError(f"'{what}' must be a NIfTI path or a nibabel image; a {type(img).__name__} was provided")


def _source(x, what: str) -> str:
    return str(x) if isinstance(x, (str, Path)) else f"the {what} argument"


def _names_for(ids: Sequence[int], labels, what: str) -> list[str]:
    """ROI names for region ids: ``labels`` is None (str of the id), a {id: name} mapping or a name sequence."""
    ids = [int(i) for i in ids]
    if labels is None:
        return [str(i) for i in ids]
    if isinstance(labels, Mapping):
        table = {int(k): str(v) for k, v in labels.items()}
        missing = [i for i in ids if i not in table]
        if missing:
            raise ConfigError(f"'labels' has no name for {what} {missing[:10]}")
        return [table[i] for i in ids]
    names = [str(v) for v in labels]
    if len(names) != len(ids):
        raise ConfigError(f"'labels' has {len(names)} names; the {what}s are {len(ids)} ({ids[:10]})")
    return names


# ----------------------------------------------------------------------------------------------
# text tables
# ----------------------------------------------------------------------------------------------
def _is_number(token: str) -> bool:
    return bool(_NUMBER_RE.match(token.strip()))


def _split(line: str, delimiter: str | None) -> list[str]:
    return [t.strip() for t in line.split(delimiter)] if delimiter is not None else line.split()


def _default_delimiter(path: Path, first: str) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return ","
    if suffix == ".tsv":
        return "\t"
    if suffix == ".txt" and "," in first:
        return ","
    return None  # .1D, .txt and anything else: any whitespace


def _header_names(line: str, delimiter: str | None) -> list[str]:
    """Names of a header line: leading '#' dropped, cells split on tab (else the delimiter), quotes/'#' stripped."""
    body = line.strip().lstrip("\ufeff")
    if body.startswith("#"):
        body = body[1:]
    sep = "\t" if "\t" in body else delimiter
    cells = _split(body, sep) if sep is not None else body.split()
    return [c.strip().strip('"').strip("'").lstrip("#").strip() for c in cells if sep is not None or c]


def _parse_table(path: str | Path, delimiter: str | None, header,
                 allow_na: bool) -> tuple[np.ndarray, list[str] | None]:
    """Numbers of a text table (float64 [rows, cols]) and its header names (None without a header)."""
    p = Path(path)
    if header not in ("auto", True, False):
        raise ConfigError(f"'header' must be 'auto', True or False; {header!r} was provided")
    if not p.is_file():
        raise DataFormatError(f"{p}: ROI table not found")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{p}: not a text table (byte {exc.start} is not UTF-8)") from None
    except OSError as exc:
        raise DataFormatError(f"{p}: cannot read the table ({exc.strerror or exc})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    hash_lines = [(n, line) for n, line in lines if line.lstrip().startswith("#")]
    rows = [(n, line) for n, line in lines if not line.lstrip().startswith("#")]
    if not rows:
        raise DataFormatError(f"{p}: the table has no data rows")
    delim = delimiter if delimiter is not None else _default_delimiter(p, rows[0][1])
    names = None
    first_cells = _split(rows[0][1], delim)
    if header is True or (header == "auto" and not all(_is_number(c) or (allow_na and c.lower() in _NA_TOKENS)
                                                        for c in first_cells)):
        names = _header_names(rows[0][1], delim)
        rows = rows[1:]
        if not rows:
            raise DataFormatError(f"{p}: the table has a header line but no data rows")
    cells = [(n, _split(line, delim)) for n, line in rows]
    width = len(cells[0][1])
    for n, c in cells:
        if len(c) != width:
            raise DataFormatError(f"{p}: line {n} has {len(c)} columns; line {cells[0][0]} has {width} "
                                  "(ragged table)")
    if names is None and hash_lines:
        # ABIDE-PCP .1D: '#2001\t#2002 ...' (the first '#' line with one name per column; others are comments)
        for _, line in hash_lines:
            cand = _header_names(line, delim)
            if len(cand) == width:
                names = cand
                break
    if names is not None and len(names) != width:
        raise DataFormatError(f"{p}: the header has {len(names)} names; the rows have {width} columns")
    flat = [t for _, c in cells for t in c]
    if allow_na:
        flat = ["nan" if t.lower() in _NA_TOKENS else t for t in flat]
    try:
        data = np.array(flat, dtype=np.float64).reshape(len(cells), width)
    except ValueError:
        for n, c in cells:
            for j, t in enumerate(c):
                tt = "nan" if allow_na and t.lower() in _NA_TOKENS else t
                if not _is_number(tt):
                    raise DataFormatError(f"{p}: line {n}, column {j + 1}: {t[:40]!r} is not a number") from None
        raise DataFormatError(f"{p}: the table holds cells that are not numbers") from None
    return data, names


def read_roi_table(path: str | Path, *, delimiter: str | None = None,
                   header: str | bool = "auto") -> tuple[np.ndarray, list[str]]:
    """Read one subject's pre-extracted ROI time series (rows = time points, columns = ROIs).

    Parameters
    ----------
    path : str or Path
        ``.1D`` (AFNI / ABIDE-PCP: whitespace-separated numbers; an optional ``#`` line with one label per
        column, e.g. ``#2001<TAB>#2002``, gives the names without the ``#``; other ``#`` lines are comments),
        ``.csv`` (comma), ``.tsv`` (tab) or ``.txt`` (comma if the first line has one, else whitespace).
    delimiter : str, optional
        Cell separator (overrides the suffix rule); None splits on any whitespace for ``.1D``/``.txt``.
    header : {'auto', True, False}
        Whether the first non-``#`` line is a header; 'auto': it is when any of its cells is not a number.
        Header names have quotes and a leading ``#`` stripped.

    Returns
    -------
    series : ndarray of float32, shape (n_timepoints, n_rois)
        NaN cells (``nan``) are kept (the cohort loader reports them).
    roi_names : list of str
        Header names, else ``roi_0``, ``roi_1``, ...

    Raises
    ------
    DataFormatError
        Missing or non-text file, no data rows, ragged rows or a non-numeric cell (the message names the
        file and line), or a header whose length differs from the rows'.
    """
    data, names = _parse_table(path, delimiter, header, allow_na=False)
    if names is None:
        names = [f"roi_{k}" for k in range(data.shape[1])]
    return data.astype(np.float32), names


def read_confounds_table(path: str | Path, *, delimiter: str | None = None,
                         header: str | bool = "auto") -> tuple[np.ndarray, list[str]]:
    """Read a confound table (motion parameters, FD, fMRIPrep ``*_desc-confounds_timeseries.tsv``).

    As :func:`read_roi_table`, except that ``n/a``, ``NA`` and empty cells are allowed and filled with
    their column's mean (fMRIPrep leaves the first row of derivative columns ``n/a``); an all-missing
    column is filled with 0.

    Returns
    -------
    confounds : ndarray of float64, shape (n_timepoints, n_confounds)
    names : list of str
        Header names, else ``confound_0``, ``confound_1``, ...
    """
    data, names = _parse_table(path, delimiter, header, allow_na=True)
    if not np.isfinite(data).all():
        bad = ~np.isfinite(data)
        with np.errstate(all="ignore"):
            col_mean = np.nanmean(np.where(bad, np.nan, data), axis=0)
        col_mean = np.where(np.isfinite(col_mean), col_mean, 0.0)
        data = np.where(bad, col_mean[None, :], data)
    if names is None:
        names = [f"confound_{k}" for k in range(data.shape[1])]
    return data, names


def _confounds_array(confounds, n_t: int) -> np.ndarray | None:
    """Confounds as float64 [n_t, C] from an array or a table path; rows checked against ``n_t``."""
    if confounds is None:
        return None
    if isinstance(confounds, (str, Path)):
        arr, _ = read_confounds_table(confounds)
        if arr.shape[0] != n_t:
            raise DataFormatError(f"{confounds}: the confound table has {arr.shape[0]} rows; the image has "
                                  f"{n_t} time points")
        return arr
    arr = np.asarray(confounds, dtype=np.float64)
    arr = arr[:, None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[0] != n_t:
        raise ConfigError(f"'confounds' must be [n_timepoints={n_t}, n_confounds]; shape {arr.shape} was provided")
    if not np.isfinite(arr).all():
        raise ConfigError(f"'confounds' has {int((~np.isfinite(arr)).sum())} NaN/inf values")
    return arr


# ----------------------------------------------------------------------------------------------
# volumes
# ----------------------------------------------------------------------------------------------
def extract_roi_timeseries(img, atlas, *, kind: str = "labels", confounds=None, standardize="zscore_sample",
                           detrend: bool = False, low_pass: float | None = None, high_pass: float | None = None,
                           t_r: float | None = None, mask_img=None, labels=None,
                           resampling_target: str | None = "data") -> tuple[np.ndarray, list[str]]:
    """Reduce a 4-D NIfTI to ROI time series with a label or probabilistic atlas (nilearn maskers).

    Parameters
    ----------
    img : str, Path or nibabel image
        4-D functional image (X, Y, Z, T).
    atlas : str, Path or nibabel image
        ``kind='labels'``: a 3-D integer label image, 0 = background (``NiftiLabelsMasker``, mean over the
        voxels of each label). ``kind='maps'``: a 4-D image of R weight maps (``NiftiMapsMasker``,
        least-squares fit of the maps to each volume).
    kind : {'labels', 'maps'}
    confounds : array [T, C] or str/Path, optional
        Regressed out of the signals (a TSV/CSV table of numeric columns, read by :func:`read_confounds_table`).
    standardize : {'zscore_sample', 'zscore', 'psc'}, True, False or None
        Per-ROI standardisation after cleaning (True = 'zscore_sample'; False/None = none).
    detrend : bool
        Remove a linear trend.
    low_pass, high_pass : float, optional
        Butterworth band-pass cut-offs in Hz; need a TR.
    t_r : float, optional
        Repetition time in seconds; None reads it from the header (``pixdim[4]``) when filtering.
    mask_img : str, Path or nibabel image, optional
        Restrict the voxels used.
    labels : dict {label value: name} or sequence of str, optional
        ROI names. A sequence names the regions in order (labels: the sorted non-background label values
        present; maps: the maps). Default: the label value as a string ('labels'), the map index ('maps').
    resampling_target : {'data', 'labels'/'maps', None}
        Passed to nilearn: 'data' resamples the atlas onto the image grid (nearest for labels).

    Returns
    -------
    series : ndarray of float32, shape (T, R)
    roi_names : list of str [R]
        Labels absent from the image (e.g. outside ``mask_img``) are dropped, as nilearn does.

    Raises
    ------
    ConfigError
        Bad ``kind``/``standardize``/``t_r``, or band-pass asked for with no TR (argument or header).
    DataFormatError
        Unreadable image or atlas, an image that is not 4-D, or a confound table whose rows differ from T.
    """
    check_option("kind", kind, ("labels", "maps"))
    std = _standardize_arg(standardize)
    t_r = _check_tr(t_r)
    image = _load_nifti(img, "image")
    src = _source(img, "image")
    if len(image.shape) != 4:
        raise DataFormatError(f"{src}: the functional image must be 4-D (X, Y, Z, T); found shape {image.shape}")
    if (low_pass is not None or high_pass is not None) and t_r is None:
        t_r = header_tr(image)
        if t_r is None:
            raise ConfigError(f"'low_pass'/'high_pass' need 't_r' (the header of {src} gives no TR); pass t_r=")
    atlas_img = _load_nifti(atlas, "atlas")
    mask = _load_nifti(mask_img, "mask_img") if mask_img is not None else None
    conf = _confounds_array(confounds, int(image.shape[3]))
    common = dict(mask_img=mask, standardize=std, detrend=bool(detrend), low_pass=low_pass, high_pass=high_pass,
                  t_r=t_r, resampling_target=resampling_target)
    if kind == "labels":
        from nilearn.maskers import NiftiLabelsMasker

        masker = NiftiLabelsMasker(atlas_img, background_label=0, strategy="mean", **common)
    else:
        from nilearn.maskers import NiftiMapsMasker

        masker = NiftiMapsMasker(atlas_img, **common)
    try:
        series = masker.fit_transform(image, confounds=conf)
    except (DataFormatError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - nilearn raises ValueError/TypeError/DimensionError
        raise DataFormatError(f"{src}: nilearn could not reduce it with {_source(atlas, 'atlas')} "
                              f"({_short(exc)})") from None
    series = np.asarray(series, dtype=np.float32).reshape(int(image.shape[3]), -1)
    if kind == "labels":
        ids = [v for k, v in sorted((k, v) for k, v in masker.region_ids_.items() if k != "background")]
        names = _names_for(ids, labels, "label")
    else:
        names = _names_for(range(series.shape[1]), labels, "map")
    return series, names


# ----------------------------------------------------------------------------------------------
# surfaces
# ----------------------------------------------------------------------------------------------
def _is_pair(x) -> bool:
    """An (lh, rh) pair: a 2-tuple/list of paths or arrays (not a 2-vertex label list)."""
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, (str, Path, np.ndarray, list, tuple))
                                                                 for v in x)


def _read_surface_file(p: Path) -> np.ndarray:
    """[V, T] float32 of a functional MGH (V, 1, 1, T) or GIfTI (one darray per TR, or one 2-D [V, T])."""
    import nibabel as nib

    if not p.is_file():
        raise DataFormatError(f"{p}: surface data file not found")
    name = p.name.lower()
    try:
        img = nib.load(str(p))
        if name.endswith((".mgh", ".mgz")):
            data = np.asarray(img.get_fdata(dtype=np.float32))
            if data.ndim == 4 and data.shape[1:3] == (1, 1):
                return data.reshape(data.shape[0], data.shape[3])
            if data.ndim == 3 and data.shape[1:] == (1, 1):
                return data.reshape(-1, 1)
            raise DataFormatError(f"{p}: surface data must have nibabel shape (V, 1, 1, T); found {data.shape}")
        if name.endswith(".gii"):
            arrays = [np.asarray(d.data) for d in img.darrays]
            if not arrays:
                raise DataFormatError(f"{p}: the GIfTI holds no data arrays")
            if len(arrays) == 1 and arrays[0].ndim == 2:
                return arrays[0].astype(np.float32)
            if any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
                raise DataFormatError(f"{p}: GIfTI time series must be one 1-D array of V values per time point; "
                                      f"found shapes {sorted({a.shape for a in arrays})}")
            return np.stack(arrays, axis=1).astype(np.float32)
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataFormatError(f"{p}: not a readable surface file ({_short(exc)})") from None
    raise DataFormatError(f"{p}: surface data must be .mgh, .mgz or .gii")


def _surface_part(x) -> tuple[np.ndarray, str]:
    if isinstance(x, (str, Path)):
        return _read_surface_file(Path(x)), str(x)
    arr = np.asarray(x, dtype=np.float32)
    arr = arr[:, None] if arr.ndim == 1 else arr
    if arr.ndim != 2:
        raise ConfigError(f"'data' arrays must be [n_vertices, n_timepoints]; shape {arr.shape} was provided")
    return arr, "the data array"


def _read_parcellation_file(p: Path) -> tuple[np.ndarray, dict[int, str] | None]:
    """Integer labels [V] and label names (None when the file has none) of an .annot / label GIfTI / MGH."""
    import nibabel as nib

    if not p.is_file():
        raise DataFormatError(f"{p}: parcellation file not found")
    name = p.name.lower()
    try:
        if name.endswith(".annot"):
            lab, _, names = nib.freesurfer.read_annot(str(p))
            table = {k: (n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)) for k, n in enumerate(names)}
            return np.asarray(lab, dtype=np.int64), table
        img = nib.load(str(p))
        if name.endswith(".gii"):
            if len(img.darrays) != 1:
                raise DataFormatError(f"{p}: a label GIfTI must hold one data array; found {len(img.darrays)}")
            data = np.asarray(img.darrays[0].data).reshape(-1)
            table = img.labeltable.get_labels_as_dict() if img.labeltable is not None else {}
            table = {int(k): str(v) for k, v in table.items()} or None
        elif name.endswith((".mgh", ".mgz")):
            data = np.asarray(img.get_fdata(dtype=np.float64))
            if data.ndim > 1 and any(s != 1 for s in data.shape[1:]):
                raise DataFormatError(f"{p}: a parcellation must have nibabel shape (V, 1, 1); found {data.shape}")
            data, table = data.reshape(-1), None
        else:
            raise DataFormatError(f"{p}: a parcellation must be .annot, .label.gii/.gii, .mgh or .mgz")
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataFormatError(f"{p}: not a readable parcellation ({_short(exc)})") from None
    if not np.isfinite(data).all() or (data.size and np.abs(data - np.rint(data)).max() > 1e-3):
        raise DataFormatError(f"{p}: parcellation labels must be integers")
    return np.rint(data).astype(np.int64), table


def _parcellation_part(x) -> tuple[np.ndarray, dict[int, str] | None, str]:
    if isinstance(x, (str, Path)):
        lab, table = _read_parcellation_file(Path(x))
        return lab, table, str(x)
    arr = np.asarray(x)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or
                             (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.rint(arr)))):
        raise ConfigError(f"'parcellation' arrays must be 1-D integer labels [n_vertices]; "
                          f"{arr.dtype} shape {arr.shape} was provided")
    return arr.astype(np.int64), None, "the parcellation array"


def _label_means(data: np.ndarray, lab: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [R, T] of ``data`` rows per label over the vertices where ``keep``; also the sorted labels [R]."""
    lab_k, rows = lab[keep], data[keep].astype(np.float64)
    order = np.argsort(lab_k, kind="stable")
    lab_s = lab_k[order]
    ids, starts, counts = np.unique(lab_s, return_index=True, return_counts=True)
    if ids.size == 0:
        return np.zeros((0, data.shape[1])), ids
    sums = np.add.reduceat(rows[order], starts, axis=0)
    return sums / counts[:, None], ids


def surface_roi_timeseries(data, parcellation, *, labels=None, background: int = 0, standardize=False,
                           bilateral: bool = False) -> tuple[np.ndarray, list[str]]:
    """Average surface time series within the labels of a parcellation.

    Parameters
    ----------
    data : str, Path, array [V, T], or an (lh, rh) pair of these
        fsaverage MGH/MGZ (nibabel shape (V, 1, 1, T)), functional GIfTI (``.func.gii``: one darray per time
        point, or one 2-D [V, T] darray) or an array. A pair is concatenated lh then rh along vertices.
    parcellation : str, Path, array [V] of int, or an (lh, rh) pair of these
        FreeSurfer ``.annot`` (names from its colour table; -1 = unassigned), label GIfTI (names from its
        label table), MGH/MGZ, or an integer array.
    labels : dict {label value: name} or sequence of str, optional
        ROI names (a sequence names the sorted label values kept). Default: the parcellation's names, else
        the label value as a string.
    background : int
        Label to skip (besides -1, always skipped).
    standardize : {'zscore_sample', 'zscore', 'psc'}, True, False or None
        Per-ROI standardisation (nilearn.signal.clean, no detrending).
    bilateral : bool
        With (lh, rh) pairs: False (default) keeps each hemisphere's labels as separate ROIs named
        ``lh.<name>`` / ``rh.<name>``; True pools the vertices of a label over both hemispheres.

    Returns
    -------
    series : ndarray of float32, shape (T, R)
    roi_names : list of str [R]

    Raises
    ------
    DataFormatError
        Unreadable files, or a parcellation whose vertex count differs from the data's (names the file;
        per hemisphere when both are pairs, else the totals).
    ConfigError
        Bad arrays, ``standardize`` or ``labels``.
    """
    std = _standardize_arg(standardize)
    data_parts = [_surface_part(d) for d in data] if _is_pair(data) else [_surface_part(data)]
    parc_parts = [_parcellation_part(q) for q in parcellation] if _is_pair(parcellation) else \
        [_parcellation_part(parcellation)]
    _check_vertices(data_parts, parc_parts)
    values = np.concatenate([d for d, _ in data_parts]) if len(data_parts) > 1 else data_parts[0][0]
    if len(parc_parts) == 2 and not bilateral:
        means, names, start = [], [], 0
        for hemi, (lab, table, _) in zip(layout.HEMIS, parc_parts):
            m, ids = _label_means(values[start:start + lab.shape[0]], lab, (lab != background) & (lab != -1))
            start += lab.shape[0]
            means.append(m)
            hemi_names = _names_for(ids, labels, "label") if isinstance(labels, Mapping) else _table_names(ids, table)
            names.extend(f"{hemi}.{n}" for n in hemi_names)
        series = np.concatenate(means, axis=0).T
        if labels is not None and not isinstance(labels, Mapping):
            names = _names_for(range(series.shape[1]), labels, "ROI")
    else:
        lab = np.concatenate([q for q, _, _ in parc_parts])
        table: dict[int, str] = {}
        for _, t, _ in reversed(parc_parts):
            table.update(t or {})
        m, ids = _label_means(values, lab, (lab != background) & (lab != -1))
        series = m.T
        names = _names_for(ids, labels, "label") if labels is not None else _table_names(ids, table or None)
    if std is not None and series.size:
        from nilearn.signal import clean

        series = clean(series, detrend=False, standardize=std, filter=False)
    return np.ascontiguousarray(series, dtype=np.float32), names


def _table_names(ids: np.ndarray, table: dict[int, str] | None) -> list[str]:
    """Names of label ``ids`` from a file's label table (the value as a string where it has none)."""
    table = table or {}
    return [table.get(int(i), str(int(i))) for i in ids]


def _check_vertices(data_parts: list, parc_parts: list) -> None:
    """Same time points in both hemispheres; parcellation vertices = data vertices (per hemisphere if paired)."""
    if len({d.shape[1] for d, _ in data_parts}) != 1:
        raise DataFormatError(f"{data_parts[1][1]}: {data_parts[1][0].shape[1]} time points; "
                              f"{data_parts[0][1]} has {data_parts[0][0].shape[1]}")
    if len(data_parts) == len(parc_parts):
        pairs = [(d.shape[0], dsrc, q.shape[0], qsrc) for (d, dsrc), (q, _, qsrc) in zip(data_parts, parc_parts)]
    else:  # one side paired, the other not: compare totals
        pairs = [(sum(d.shape[0] for d, _ in data_parts), " + ".join(s for _, s in data_parts),
                  sum(q.shape[0] for q, _, _ in parc_parts), " + ".join(s for _, _, s in parc_parts))]
    for n_data, dsrc, n_parc, qsrc in pairs:
        if n_data != n_parc:
            raise DataFormatError(f"{qsrc}: the parcellation has {n_parc} vertices; the surface data {dsrc} "
                                  f"has {n_data}")


# ----------------------------------------------------------------------------------------------
# NSD time series
# ----------------------------------------------------------------------------------------------
def _nsd_roi_atlas(root: Path, subject: str, space: str, rois):
    """(label image, {label: name}) of the ROI choice: an NSD family, an atlas path/image, or a label array."""
    import nibabel as nib

    from brainenc.datasets import nsd as nsdio

    if isinstance(rois, str) and rois in layout.ROI_FAMILIES:
        p = layout.roi_path(root, subject, space, rois)
        data, affine = nsdio.load_volume(p, what=f"'{rois}' ROI volume")
        lab = nsdio._as_labels(data, p, "ROI volume")
        lab[lab < 0] = 0  # -1 = outside cortex
        ctab = layout.ctab_path(root, subject, rois, space=space)
        table = nsdio.read_ctab(ctab) if ctab.is_file() else dict(layout.LABEL_TABLES[rois])
        present = [int(k) for k in np.unique(lab[lab > 0])]
        unknown = [k for k in present if k not in table]
        if unknown:
            raise DataFormatError(f"{p}: labels {unknown} are not in the {rois} label table "
                                  f"({ctab if ctab.is_file() else 'brainenc.datasets.layout.LABEL_TABLES'})")
        return nib.Nifti1Image(lab.astype(np.int32), affine), table
    return rois, None  # an atlas path/image, or an array (made an image on the run's grid by the caller)


def load_nsd_timeseries(nsd_root: str | Path, subject: str, session: int, run: int, *, space: str = "func1pt8mm",
                        rois="nsdgeneral", confounds: str | None = "motion", standardize="zscore_sample",
                        detrend: bool = False, t_r: float | None = None,
                        labels=None) -> tuple[np.ndarray, list[str], float]:
    """One NSD run's pre-processed time series reduced to ROI means.

    The layout follows the public NSD data manual (``nsddata_timeseries``; **not** in brainenc's format
    notes, so unverified): ``nsddata_timeseries/ppdata/subjXX/<space>/timeseries/timeseries_sessionNN_runNN.nii.gz``
    (4-D, the upsampled pre-processed series: func1pt8mm at TR 4/3 s, func1mm at TR 1 s),
    ``.../design/design_sessionNN_runNN.tsv`` and ``.../motion/motion_sessionNN_runNN.tsv`` (one row per
    volume; the motion columns are taken as-is as confounds, header or not). Resting-state runs are other
    (session, run) pairs in the same folders (in NSD, as far as we know, the first and last runs of some
    sessions; unverified): list what is on disk with :func:`brainenc.datasets.layout.list_timeseries_runs`
    and pick them.

    Parameters
    ----------
    nsd_root : str or Path
        NSD root holding ``nsddata/`` (ROIs) and ``nsddata_timeseries/``.
    subject : str or int
    session, run : int
        1-based, as in the file names.
    space : {'func1pt8mm', 'func1mm'}
    rois : str, Path, nibabel image or ndarray
        An NSD ROI family (``'nsdgeneral'``, ``'floc-faces'``, ...: the subject's
        ``nsddata/ppdata/subjXX/<space>/roi/<family>.nii.gz``, names from the family's ``.ctab`` or
        :data:`~brainenc.datasets.layout.LABEL_TABLES`; -1 and 0 are background), an atlas NIfTI path/image,
        or an integer label array on the run's grid (X, Y, Z).
    confounds : {'motion', None}
        'motion' regresses the run's motion table out (missing file -> error).
    standardize, detrend :
        As in :func:`extract_roi_timeseries`.
    t_r : float, optional
        Default: the space's TR (:data:`brainenc.datasets.layout.TR`).
    labels : dict or sequence, optional
        ROI names for an atlas/array ``rois`` (see :func:`extract_roi_timeseries`).

    Returns
    -------
    series : ndarray of float32, shape (T, R)
    roi_names : list of str
    tr : float
    """
    import nibabel as nib

    root = Path(nsd_root)
    check_option("space", space, layout.VOLUME_SPACES)
    if confounds not in ("motion", None):
        raise ConfigError(f"'confounds' must be 'motion' or None; {confounds!r} was provided")
    tr = _check_tr(t_r) or float(layout.TR[space])
    img_path = layout.timeseries_path(root, subject, space, session, run)
    image = _load_nifti(img_path, "NSD time series")
    if len(image.shape) != 4:
        raise DataFormatError(f"{img_path}: NSD time series must be 4-D; found shape {image.shape}")
    atlas, table = _nsd_roi_atlas(root, subject, space, rois)
    if isinstance(atlas, np.ndarray):
        arr = np.asarray(atlas)
        if arr.shape != tuple(image.shape[:3]):
            raise ConfigError(f"'rois' array has shape {arr.shape}; {img_path} has grid {tuple(image.shape[:3])}")
        arr = np.where(arr < 0, 0, arr).astype(np.int32)
        atlas = nib.Nifti1Image(arr, image.affine)
    conf = None
    if confounds == "motion":
        conf = layout.timeseries_motion_path(root, subject, space, session, run)
        if not conf.is_file():
            raise DataFormatError(f"{conf}: motion table not found (pass confounds=None to skip motion regression)")
    series, names = extract_roi_timeseries(img_path, atlas, kind="labels", confounds=conf,
                                           standardize=standardize, detrend=detrend, t_r=tr,
                                           labels=table if table is not None else labels)
    return series, names, tr
