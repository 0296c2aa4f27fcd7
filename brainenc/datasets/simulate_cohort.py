"""A simulated multi-site patient/control cohort of ROI time series from a known network model.

``simulate_cohort(root, config)`` writes, under ``root``, a cohort in exactly the layout that
:func:`brainenc.datasets.cohort.load_cohort` reads (see :mod:`brainenc.datasets.cohort`), like an
ADHD-200 / ABIDE-PCP release: ``N`` subjects of ``R`` ROI time series, balanced controls and
patients within each of ``S`` sites, with a group difference in one chosen pair of networks,
site effects, motion-like confounds and the ground truth.

Model
-----
Notation: ``R`` ROIs split into ``M`` contiguous modules (networks) ``m(r) in 0..M-1``
(``np.array_split`` sizes; ROI ``r`` of module ``k`` is named ``net{k+1}_roi{j:02d}``), ``T``
time points, ``phi`` = ``autocorrelation``. Module indices in the config are **0-based**.

1. Group coupling (population correlation) matrices::

       C_control[i, j] = 1                 if i == j
                       = within            if m(i) == m(j)
                       = between           otherwise

   made positive definite (minimum eigenvalue >= ``PD_FLOOR``) by shrinking towards the
   identity, ``C <- (1 - lam) C + lam I`` (smallest ``lam`` by bisection; the defaults need none).
   ``C_patient = C_control + Delta`` where ``Delta`` is ``effect_size`` on the edges between
   modules ``a = effect_module`` and ``b = effect_partner`` (both triangles; if ``a == b``, the
   off-diagonal edges inside module ``a``) and 0 elsewhere. If ``C_patient`` is not positive
   definite, ``Delta`` is scaled down (bisection) until it is; the *realised* change (the mean of
   ``Delta`` on the affected edges) is stored as ``effect_size`` in the ground truth, the request
   as ``effect_size_requested``. Units of ``effect_size``: change of the population correlation
   of the affected edges of the latent signal (observed correlations are attenuated by the
   measurement noise and diluted by the motion artefact, see 4-5).

2. Subject coupling: ``C_s = C_group(s) + E_s`` with ``E_s[i, j] = D_s[m(i), m(j)]`` for
   ``i != j`` (0 on the diagonal), ``D_s`` a symmetric ``M x M`` matrix of independent
   ``N(0, subject_variability^2)`` entries: every subject's within- and between-network
   couplings deviate from the group value. ``D_s`` is halved until ``C_s - PD_FLOOR * I`` has a
   Cholesky factor (kept positive definite).

3. Latent signal ``x_t`` (``R``-vector), a stationary Gaussian AR(1) with covariance ``C_s``::

       x_0 = L z_0,   x_t = phi x_{t-1} + sqrt(1 - phi^2) L z_t,   z_t ~ N(0, I),  L L^T = C_s

4. Motion (per subject ``i``, step scale ``sigma_i = 0.1 * motion * f_i * (patient_motion if
   patient else 1)`` mm, ``f_i ~ LogNormal(0, 0.4)``): the 6 rigid-body parameters are random
   walks, translations ``trans_x, trans_y, trans_z`` in mm with ``N(0, sigma_i^2)`` steps and
   rotations ``rot_x, rot_y, rot_z`` in radians with ``N(0, (sigma_i / 50)^2)`` steps, plus
   transient jerks: each frame ``t >= 1`` independently with probability
   ``p_i = min(0.04 * motion * f_i * factor, 0.25)`` gets an extra displacement of
   ``N(0, (5 sigma_i)^2)`` mm (``/50`` rad for rotations) at that frame only. Framewise
   displacement (Power et al. 2012)::

       FD_t = sum_k |d trans_k(t)| + 50 mm * sum_k |d rot_k(t)|,   FD_0 = 0

   computed from the parameters as written (6 decimals). Motion artefact in the ROI signals::

       A_t = W_i (P_t - mean_t P) + g * FD_t * [FD_t > 0.5 mm]      (FD in mm, per mm)

   with ``P_t`` the 6 parameters in mm (rotations x 50 mm), ``W_i = W + 0.5 * N(0, 0.3^2)``
   ``[R, 6]`` (``W ~ N(0, 0.3^2)`` per mm shared by all subjects: a fixed spatial pattern of
   motion sensitivity), and ``g ~ U(0.5, 1)`` ``[R]`` positive loadings of a global spike at
   high-motion frames. Patients move ``patient_motion`` (default 1.2) times more: a realistic
   confound, which inflates their correlations a little on every edge.

5. Site effects (site ``k`` of subject ``s``; all per site, shared by its subjects)::

       y_t = mu_k + gain_k * (x_t + A_t + sigma_k * eps_t),   eps_t ~ N(0, I)

   ``gain_k = exp(site_scale * N(0, 1))`` per ROI (multiplicative), ``sigma_k = noise *
   exp(site_scale * N(0, 1))`` (additive measurement noise level: sites differ in SNR, hence in
   the attenuation of observed correlations), ``mu_k = 10 * site_scale * N(0, 1)`` per ROI (mean
   offset). Sites can also differ in length: ``T_k = round(n_timepoints * (1 + timepoint_spread
   * u_k))``, ``u_k ~ U(-1, 1)`` (``timepoint_spread = 0``: all equal).

Phenotype: subjects are split over sites as evenly as possible (``np.array_split``), half
controls and half patients in each site (one more control when odd), the diagnosis order
shuffled within a site; ``age`` ~ ``N(site mean ~ U(9, 16), 2.5)`` clipped to 6..30 years,
``sex`` "M" with probability 0.75 (patients) or 0.5 (controls), ``mean_fd`` = mean of ``FD_t``
over ``t >= 1``, ``split`` "test" for ``round(test_fraction * n)`` randomly chosen subjects of
every (site, diagnosis) cell (stratified), "train" otherwise.

Files (``R`` = ``n_rois``; tables via :func:`~brainenc.datasets.cohort.write_roi_table`)::

    phenotypic.csv                      subject_id, site, diagnosis, age, sex, mean_fd, split
    rois_sim<R>/<site>_<subject_id>_rois_sim<R>.1D
    confounds/<subject_id>_confounds.tsv    trans_x ... rot_z framewise_displacement (tab separated)
    ground_truth.npz                    see :func:`simulate_cohort`
    cohort.json                         written last: its presence marks a complete simulation
    .brainenc_simcohort.json            marker written first (a killed run is recognisably ours)

Randomness: ``np.random.SeedSequence(seed).spawn``: child 0 draws the group-level model (site
effects, loadings), child 1 the phenotype and split, child ``2 + i`` subject ``i`` (so a subject's
data does not depend on how many subjects follow). Same config -> byte-identical files.
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np

from brainenc._utils.io import atomic_path, exclusive_lock, jsonable, read_json, remove_stale_temps, write_json, \
    write_text
from brainenc.exceptions import ConfigError

__all__ = ["CohortSimulationConfig", "CohortSimulation", "simulate_cohort", "load_ground_truth",
           "MOTION_COLUMNS", "framewise_displacement"]

#: minimum eigenvalue kept in every coupling matrix
PD_FLOOR = 1e-3
#: radius (mm) converting rotations to displacements (Power et al. 2012)
HEAD_RADIUS_MM = 50.0
MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
CONFOUND_COLUMNS = MOTION_COLUMNS + ("framewise_displacement",)
LABEL_NAMES = ("control", "patient")
MARKER_NAME = ".brainenc_simcohort.json"
LOCK_NAME = ".brainenc_simcohort.lock"
_SPIKE_FD_MM = 0.5
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass
class CohortSimulationConfig:
    """Sizes, seed and effect strengths of a simulated cohort (the model: module docstring).

    Parameters
    ----------
    name : str
        Cohort name (stored in ``cohort.json``).
    seed : int
        Random seed; the same config gives byte-identical files.
    n_subjects : int
        Subjects, spread evenly over sites, controls/patients balanced within each site.
    n_sites : int
    n_rois : int
    n_modules : int
        Networks; the ROIs are split into contiguous modules.
    n_timepoints : int
        Time points per subject (per site, see ``timepoint_spread``).
    tr : float
        Repetition time (s).
    within, between : float
        Population correlation of the latent signals of two ROIs in the same / different modules.
    effect_module, effect_partner : int
        0-based modules whose between-module edges (within-module if equal) differ in patients.
    effect_size : float
        Change of the population correlation of those edges in patients (patient - control).
    subject_variability : float
        Standard deviation of each subject's deviation of each module-pair coupling.
    site_scale : float
        Spread (log-sd) of the per-site ROI gains and noise levels; mean offsets sd ``10 * site_scale``.
    noise : float
        Typical standard deviation of the additive measurement noise (latent signal sd = 1).
    motion : float
        Strength of the motion-like confounds (step size and jerk rate of the head motion).
    patient_motion : float
        Factor on the motion of patients (>1: patients move more, a realistic confound).
    autocorrelation : float
        AR(1) coefficient of the latent signals.
    timepoint_spread : float
        Relative spread of the per-site number of time points (0: all ``n_timepoints``).
    test_fraction : float
        Fraction of each (site, diagnosis) cell put in the official "test" split.
    """

    name: str = "simcohort"
    seed: int = 0
    n_subjects: int = 120
    n_sites: int = 3
    n_rois: int = 50
    n_modules: int = 5
    n_timepoints: int = 200
    tr: float = 2.0
    within: float = 0.5
    between: float = 0.1
    effect_module: int = 1
    effect_partner: int = 2
    effect_size: float = 0.3
    subject_variability: float = 0.1
    site_scale: float = 0.3
    noise: float = 0.5
    motion: float = 0.5
    patient_motion: float = 1.2
    autocorrelation: float = 0.6
    timepoint_spread: float = 0.0
    test_fraction: float = 0.2

    def check(self) -> "CohortSimulationConfig":
        """Validate values; raises :class:`~brainenc.exceptions.ConfigError` naming the field."""
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(f"'name' must be a non-empty name of letters, digits, '.', '_' or '-'; "
                              f"{self.name!r} was provided")
        ints = (("seed", 0, 2**63 - 1), ("n_sites", 1, 1000), ("n_modules", 1, 1000),
                ("n_rois", 2, 100000), ("n_subjects", 2, 10**6), ("n_timepoints", 10, 10**6))
        for field, lo, hi in ints:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise ConfigError(f"'{field}' must be an integer in {lo}..{hi}; {v!r} was provided")
            setattr(self, field, int(v))
        if self.n_subjects < 2 * self.n_sites:
            raise ConfigError(f"'n_subjects' must be at least 2 * n_sites = {2 * self.n_sites} (a control and "
                              f"a patient per site); {self.n_subjects!r} was provided")
        if self.n_rois < self.n_modules:
            raise ConfigError(f"'n_rois' must be at least n_modules = {self.n_modules}; {self.n_rois!r} was provided")
        for field in ("effect_module", "effect_partner"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < self.n_modules:
                raise ConfigError(f"'{field}' must be a 0-based module index in 0..{self.n_modules - 1}; "
                                  f"{v!r} was provided")
            setattr(self, field, int(v))
        if self.effect_module == self.effect_partner and self.n_rois // self.n_modules < 2:
            raise ConfigError("'effect_module' == 'effect_partner' needs modules of at least 2 ROIs")
        # (field, low, high, low open, high open)
        floats = (("tr", 0.0, 100.0, True, False), ("within", 0.0, 1.0, False, True),
                  ("between", -1.0, 1.0, True, True), ("effect_size", -1.0, 1.0, True, True),
                  ("subject_variability", 0.0, 1.0, False, False), ("site_scale", 0.0, 2.0, False, False),
                  ("noise", 0.0, 10.0, False, False), ("motion", 0.0, 5.0, False, False),
                  ("patient_motion", 0.1, 10.0, False, False), ("autocorrelation", 0.0, 0.99, False, False),
                  ("timepoint_spread", 0.0, 0.9, False, False), ("test_fraction", 0.0, 0.9, False, False))
        for field, lo, hi, lo_open, hi_open in floats:
            v = getattr(self, field)
            ok = not isinstance(v, bool) and isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v)
            ok = ok and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
            if not ok:
                raise ConfigError(f"'{field}' must be a number in {'(' if lo_open else '['}{lo}, {hi}"
                                  f"{')' if hi_open else ']'}; {v!r} was provided")
            setattr(self, field, float(v))
        return self

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class CohortSimulation:
    """What :func:`simulate_cohort` wrote: the folder, the config and the ground truth."""

    root: Path
    config: CohortSimulationConfig
    ground_truth: dict
    seconds: float = 0.0
    reused: bool = False


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def module_labels(n_rois: int, n_modules: int) -> np.ndarray:
    """Module index (0-based, int64 [n_rois]) of contiguous, near-equal modules."""
    return np.concatenate([np.full(len(c), k, dtype=np.int64)
                           for k, c in enumerate(np.array_split(np.arange(n_rois), n_modules))])


def roi_names(modules: np.ndarray) -> list[str]:
    """``net{k+1}_roi{j:02d}`` (j 1-based within the module)."""
    names, count = [], {}
    for k in modules:
        count[k] = count.get(k, 0) + 1
        names.append(f"net{k + 1}_roi{count[k]:02d}")
    return names


def _min_eig(c: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(c)[0])


def _shrink_to_pd(c: np.ndarray) -> tuple[np.ndarray, float]:
    """``(1 - lam) c + lam I`` with the smallest lam (bisection) giving min eigenvalue >= PD_FLOOR."""
    if _min_eig(c) >= PD_FLOOR:
        return c, 0.0
    eye = np.eye(len(c))
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _min_eig((1 - mid) * c + mid * eye) >= PD_FLOOR:
            hi = mid
        else:
            lo = mid
    return (1 - hi) * c + hi * eye, hi


def coupling_matrices(cfg: CohortSimulationConfig) -> dict:
    """The group coupling matrices and the affected edges (step 1 of the model)."""
    modules = module_labels(cfg.n_rois, cfg.n_modules)
    same = modules[:, None] == modules[None, :]
    c = np.where(same, cfg.within, cfg.between).astype(np.float64)
    np.fill_diagonal(c, 1.0)
    c_control, shrink = _shrink_to_pd(c)
    a, b = cfg.effect_module, cfg.effect_partner
    edges = ((modules[:, None] == a) & (modules[None, :] == b)) | ((modules[:, None] == b) & (modules[None, :] == a))
    np.fill_diagonal(edges, False)
    delta = np.where(edges, cfg.effect_size, 0.0)
    scale = 1.0
    if _min_eig(c_control + delta) < PD_FLOOR:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if _min_eig(c_control + mid * delta) >= PD_FLOOR:
                lo = mid
            else:
                hi = mid
        scale = lo
    c_patient = c_control + scale * delta
    diff = c_patient - c_control
    realised = float(diff[edges].mean()) if edges.any() else 0.0
    return {"coupling_control": c_control, "coupling_patient": c_patient, "difference": diff,
            "difference_edges": edges, "modules": modules, "effect_size": realised,
            "effect_size_requested": float(cfg.effect_size), "control_shrinkage": float(shrink),
            "effect_scale": float(scale)}


def framewise_displacement(params: np.ndarray) -> np.ndarray:
    """Power FD [T] of motion parameters [T, 6] (trans mm, rot rad; radius 50 mm); FD_0 = 0."""
    p = np.asarray(params, dtype=np.float64)
    d = np.abs(np.diff(p, axis=0))
    fd = d[:, :3].sum(1) + HEAD_RADIUS_MM * d[:, 3:6].sum(1)
    return np.concatenate([[0.0], fd])


def _cholesky_pd(c: np.ndarray) -> np.ndarray | None:
    try:
        np.linalg.cholesky(c - PD_FLOOR * np.eye(len(c)))
        return np.linalg.cholesky(c)
    except np.linalg.LinAlgError:
        return None


def _subject(cfg, gt, group_params, i, rng, patient, site, n_t):
    """One subject: (observed series [T, R] float64, confounds [T, 7], block deviation [M, M], step scale)."""
    from scipy.signal import lfilter

    R, M = cfg.n_rois, cfg.n_modules
    modules = gt["modules"]
    base = gt["coupling_patient"] if patient else gt["coupling_control"]
    d = rng.normal(0.0, cfg.subject_variability, (M, M))
    d = np.triu(d) + np.triu(d, 1).T
    chol = None
    for _ in range(30):
        e = d[modules][:, modules]
        np.fill_diagonal(e, 0.0)
        chol = _cholesky_pd(base + e)
        if chol is not None:
            break
        d = 0.5 * d
    if chol is None:  # pragma: no cover - the group matrix itself is PD
        d[:] = 0.0
        chol = np.linalg.cholesky(base)
    # latent AR(1) with stationary covariance C_s
    phi = cfg.autocorrelation
    z = rng.standard_normal((n_t, R)) @ chol.T
    b0 = np.sqrt(1.0 - phi * phi)
    x = lfilter([b0], [1.0, -phi], z, axis=0, zi=((1.0 - b0) * z[:1]))[0]
    # motion
    factor = cfg.patient_motion if patient else 1.0
    f = float(np.exp(rng.normal(0.0, 0.4)))
    sigma = 0.1 * cfg.motion * f * factor
    steps = rng.normal(0.0, 1.0, (n_t, 6)) * sigma
    steps[0] = 0.0
    params_mm = np.cumsum(steps, axis=0)
    p_jerk = min(0.04 * cfg.motion * f * factor, 0.25)
    jerk = rng.random(n_t) < p_jerk
    jerk[0] = False
    jerks = rng.normal(0.0, 5.0 * sigma, (n_t, 6))
    params_mm = params_mm + jerks * jerk[:, None]
    params = params_mm.copy()
    params[:, 3:] /= HEAD_RADIUS_MM  # rotations in radians
    params = np.round(params, 6)
    fd = np.round(framewise_displacement(params), 6)
    p_mm = params.copy()
    p_mm[:, 3:] *= HEAD_RADIUS_MM
    w = group_params["motion_loadings"] + 0.5 * rng.normal(0.0, 0.3, (R, 6))
    artefact = (p_mm - p_mm.mean(0)) @ w.T
    spike = np.where(fd > _SPIKE_FD_MM, fd, 0.0)
    artefact += spike[:, None] * group_params["spike_loadings"][None, :]
    # site effects and measurement noise
    eps = rng.standard_normal((n_t, R))
    y = group_params["site_offset"][site] + group_params["site_gain"][site] * (
        x + artefact + group_params["site_noise"][site] * eps)
    confounds = np.column_stack([params, fd])
    return y, confounds, d, sigma


def _group_params(cfg: CohortSimulationConfig, rng: np.random.Generator) -> dict:
    S, R = cfg.n_sites, cfg.n_rois
    return {
        "site_gain": np.exp(cfg.site_scale * rng.standard_normal((S, R))),
        "site_noise": cfg.noise * np.exp(cfg.site_scale * rng.standard_normal(S)),
        "site_offset": 10.0 * cfg.site_scale * rng.standard_normal((S, R)),
        "site_timepoints": np.round(cfg.n_timepoints * (1 + cfg.timepoint_spread * rng.uniform(-1, 1, S)))
        .astype(np.int64).clip(10),
        "motion_loadings": rng.normal(0.0, 0.3, (R, 6)),
        "spike_loadings": rng.uniform(0.5, 1.0, R),
    }


def _design(cfg: CohortSimulationConfig, rng: np.random.Generator) -> dict:
    n, S = cfg.n_subjects, cfg.n_sites
    site_idx = np.concatenate([np.full(len(c), k, dtype=np.int64)
                               for k, c in enumerate(np.array_split(np.arange(n), S))])
    labels = np.zeros(n, dtype=np.int64)
    split = np.array(["train"] * n, dtype="<U5")
    site_age = rng.uniform(9.0, 16.0, S)
    for k in range(S):
        idx = np.flatnonzero(site_idx == k)
        lab = np.zeros(len(idx), dtype=np.int64)
        lab[(len(idx) + 1) // 2:] = 1
        labels[idx] = rng.permutation(lab)
    for k in range(S):
        for g in (0, 1):
            cell = np.flatnonzero((site_idx == k) & (labels == g))
            n_test = int(round(cfg.test_fraction * len(cell)))
            split[rng.permutation(cell)[:n_test]] = "test"
    age = np.clip(site_age[site_idx] + rng.normal(0.0, 2.5, n), 6.0, 30.0).round(2)
    sex = np.where(rng.random(n) < np.where(labels == 1, 0.75, 0.5), "M", "F")
    return {"site_index": site_idx, "labels": labels, "split": split, "age": age, "sex": sex}


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _atlas(cfg) -> str:
    return f"sim{cfg.n_rois}"


def _subject_id(i: int) -> str:
    return f"sub-{i + 1:04d}"


def _site_name(k: int) -> str:
    return f"site{k + 1}"


def _confounds_text(conf: np.ndarray) -> str:
    lines = ["\t".join(CONFOUND_COLUMNS)]
    lines += ["\t".join(f"{v:.6f}" for v in row) for row in conf]
    return "\n".join(lines) + "\n"


def _owned_files(root: Path) -> list[Path]:
    """Files a simulation writes (only names of our patterns: nothing else is ever removed)."""
    out = [root / n for n in ("phenotypic.csv", "ground_truth.npz", "cohort.json") if (root / n).is_file()]
    for d in root.glob("rois_sim*"):
        if d.is_dir():
            out += [p for p in d.glob("site*_sub-*_rois_sim*.1D") if p.is_file()]
    if (root / "confounds").is_dir():
        out += [p for p in (root / "confounds").glob("sub-*_confounds.tsv") if p.is_file()]
    return out


def _remove_owned(root: Path) -> None:
    for p in _owned_files(root):
        p.unlink(missing_ok=True)
    for d in list(root.glob("rois_sim*")) + [root / "confounds"]:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def load_ground_truth(root: str | Path) -> dict:
    """The arrays of ``root/ground_truth.npz`` (``allow_pickle=False``; 0-d arrays as scalars)."""
    from brainenc.exceptions import DataFormatError

    path = Path(root) / "ground_truth.npz"
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found (not a simulated cohort, or an unfinished simulation)")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for k in z.files:
                v = z[k]
                out[k] = v.item() if v.ndim == 0 else v
            return out
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: not a readable .npz file ({exc})") from None


def _check_root(root: Path, cfg: CohortSimulationConfig, overwrite: bool) -> bool:
    """True if ``root`` holds this simulation complete; clears our files when it must be redone."""
    meta_path = root / "cohort.json"
    marker = root / MARKER_NAME
    if meta_path.is_file():
        meta = read_json(meta_path)
        if not (isinstance(meta, dict) and meta.get("simulated") is True):
            raise ConfigError(f"{root}: holds a cohort not written by simulate_cohort (cohort.json has no "
                              f"'simulated': true); refusing to write a simulated cohort into it")
        if meta.get("config") == cfg.to_dict() and (root / "ground_truth.npz").is_file():
            return True
        if not overwrite:
            old = meta.get("config") or {}
            diff = sorted(k for k, v in cfg.to_dict().items() if old.get(k) != v)
            raise ConfigError(f"{root}: holds a simulated cohort with another config (differs in {diff}); "
                              f"pass overwrite=True to replace it, or use another folder")
    elif not marker.is_file():
        foreign = [p for p in root.iterdir() if not p.name.startswith(".")] if root.is_dir() else []
        if foreign:
            raise ConfigError(f"{root}: is not empty and holds no simulated cohort ({foreign[0].name} exists); "
                              f"refusing to write a simulated cohort into it")
    _remove_owned(root)
    return False


def simulate_cohort(root: str | Path, config: CohortSimulationConfig | None = None, *,
                    overwrite: bool = False) -> CohortSimulation:
    """Write a simulated cohort (model and files: module docstring) under ``root``.

    Parameters
    ----------
    root : path
        Cohort folder (created). Must be empty, or hold a simulated cohort.
    config : CohortSimulationConfig, optional
        Default ``CohortSimulationConfig()``.
    overwrite : bool
        Replace a complete simulated cohort of another config.

    Returns
    -------
    CohortSimulation
        ``ground_truth`` holds (also in ``root/ground_truth.npz``): ``coupling_control``,
        ``coupling_patient``, ``difference`` (patient - control) float [R, R];
        ``difference_edges`` bool [R, R] (symmetric, no diagonal); ``modules`` int [R];
        ``roi_names`` str [R]; ``effect_size`` (realised mean change on the affected edges),
        ``effect_size_requested``, ``effect_scale`` (realised / requested),
        ``control_shrinkage`` (lam of step 1); ``site_names`` str [S], ``site_gain`` [S, R],
        ``site_noise`` [S], ``site_offset`` [S, R], ``site_timepoints`` int [S];
        ``motion_loadings`` [R, 6], ``spike_loadings`` [R]; per subject (rows in subject order):
        ``subject_ids`` str [N], ``labels`` int [N] (0 control, 1 patient), ``site_index`` int
        [N], ``subject_deviation`` [N, M, M] (``D_s``), ``motion_scale`` [N] (``sigma_i``, mm),
        ``mean_fd`` [N].

    Raises
    ------
    ConfigError
        An invalid config (naming the field); ``root`` holds a simulated cohort of another config
        (without ``overwrite``), or files that are not a simulated cohort.

    Notes
    -----
    A complete cohort of the same config is returned as is (nothing rewritten). A killed
    simulation (no ``cohort.json``) is redone from scratch.
    """
    cfg = dataclasses.replace(config) if config is not None else CohortSimulationConfig()
    cfg.check()
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with exclusive_lock(root / LOCK_NAME, f"simulated cohort {root}"):
        remove_stale_temps(root)
        if _check_root(root, cfg, overwrite):
            return CohortSimulation(root, cfg, load_ground_truth(root), time.perf_counter() - t0, reused=True)
        gt = _simulate(root, cfg)
    return CohortSimulation(root, cfg, gt, time.perf_counter() - t0)


def _simulate(root: Path, cfg: CohortSimulationConfig) -> dict:
    from brainenc.datasets.cohort import write_cohort_json, write_roi_table

    write_json(root / MARKER_NAME, {"simulated": True, "complete": False, "config": cfg.to_dict()})
    ss = np.random.SeedSequence(cfg.seed)
    children = ss.spawn(2 + cfg.n_subjects)
    group = _group_params(cfg, np.random.Generator(np.random.PCG64(children[0])))
    design = _design(cfg, np.random.Generator(np.random.PCG64(children[1])))
    gt = coupling_matrices(cfg)
    names = roi_names(gt["modules"])
    atlas = _atlas(cfg)
    n, M = cfg.n_subjects, cfg.n_modules
    ids = [_subject_id(i) for i in range(n)]
    sites = [_site_name(k) for k in design["site_index"]]
    deviation = np.zeros((n, M, M))
    motion_scale = np.zeros(n)
    mean_fd = np.zeros(n)
    for i in range(n):
        rng = np.random.Generator(np.random.PCG64(children[2 + i]))
        k = int(design["site_index"][i])
        y, conf, d, sigma = _subject(cfg, gt, group, i, rng, bool(design["labels"][i]), k,
                                     int(group["site_timepoints"][k]))
        write_roi_table(root / f"rois_{atlas}" / f"{sites[i]}_{ids[i]}_rois_{atlas}.1D", y, names)
        write_text(root / "confounds" / f"{ids[i]}_confounds.tsv", _confounds_text(conf))
        deviation[i], motion_scale[i] = d, sigma
        mean_fd[i] = float(conf[1:, -1].mean()) if len(conf) > 1 else 0.0
    rows = ["subject_id,site,diagnosis,age,sex,mean_fd,split"]
    for i in range(n):
        rows.append(f"{ids[i]},{sites[i]},{LABEL_NAMES[design['labels'][i]]},{design['age'][i]:.2f},"
                    f"{design['sex'][i]},{mean_fd[i]:.6f},{design['split'][i]}")
    write_text(root / "phenotypic.csv", "\n".join(rows) + "\n")
    gt.update({k: group[k] for k in ("site_gain", "site_noise", "site_offset", "site_timepoints",
                                      "motion_loadings", "spike_loadings")})
    gt.update({"roi_names": np.array(names), "site_names": np.array([_site_name(k) for k in range(cfg.n_sites)]),
               "subject_ids": np.array(ids), "labels": design["labels"], "site_index": design["site_index"],
               "subject_deviation": deviation, "motion_scale": motion_scale, "mean_fd": mean_fd})
    gt = {k: (np.asarray(v) if not isinstance(v, float) else v) for k, v in gt.items()}
    with atomic_path(root / "ground_truth.npz", suffix=".npz") as tmp:
        np.savez(tmp, **gt)
    write_cohort_json(root, name=cfg.name, tr=cfg.tr, atlas=atlas, roi_names=names, id_column="subject_id",
                      label_column="diagnosis", label_names=list(LABEL_NAMES), site_column="site",
                      split_column="split", tables=f"rois_{atlas}/*.1D", confounds="confounds/*_confounds.tsv",
                      simulated=True, config=cfg.to_dict())
    write_json(root / MARKER_NAME, {"simulated": True, "complete": True, "config": cfg.to_dict()})
    return {k: (v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v) for k, v in gt.items()}
