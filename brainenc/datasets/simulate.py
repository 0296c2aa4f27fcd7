"""A simulated NSD subject, written in the exact on-disk layout and formats of the NSD release.

``simulate_subject(nsd_root, cfg)`` writes, under ``nsd_root`` (spec: ``shared/reference/nsd_format.md``):

- ``nsddata/experiments/nsd/nsd_expdesign.mat`` (§1.1): ``masterordering`` (1, 30000) 1-based,
  ``subjectim`` (8, 10000) 1-based, ``sharedix`` (1, 1000) ascending = ``subjectim[:, :1000]``,
  ``stimpattern`` (40, 12, 75), ``basiccnt`` (3, 40);
- ``nsddata/experiments/nsd/nsd_stim_info_merged.csv`` (§1.3, optional);
- ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5`` (§1.4): ``imgBrick`` uint8 (73000, 425, 425, 3),
  one gzip-compressed chunk per image; only the images the simulated sessions show are written
  (unwritten chunks read as zeros and cost no disk);
- ``nsddata/ppdata/subjXX/func1pt8mm/{brainmask, roi/[lh.|rh.]FAMILY}.nii.gz`` (§1.7): ROIs with
  -1 outside cortex, 0 cortical unlabelled, k > 0 labels, plus ``FAMILY.mgz.ctab`` label tables;
- ``nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.nii.gz`` (§1.5):
  int16 (X, Y, Z, 750) = round(PSC * 300), zeros outside the brain mask, 1.8 mm voxels, TR 4/3 s
  (optionally also the ``.hdf5`` variant, h5py shape (750, Z, Y, X)), and ``ncsnr.nii.gz`` (§1.8)
  computed from those int16 files;
- ``brainenc_simulated.json`` (the simulated design's manifest, read by :func:`~brainenc.datasets.layout.n_sessions`)
  and ``brainenc_ground_truth_subjXX.h5`` (true tuning, clean responses, ROI membership, SNR).

The design keeps NSD's shape: all 30000 trials of ``masterordering`` are filled (each 10k slot 3x),
but the first ``n_sessions * 750`` trials show only the simulated image set, each image 3 times;
slots ``1..n_shared`` are shared1000 images (the test set), slots ``1001..`` the subject's own.

The simulated brain: two hemi-ellipsoids on a small 1.8 mm grid; early visual ROIs (V1v..hV4) with
Gaussian pRFs on local contrast energy (compressive exponent 0.5), category-selective blobs (OFA,
FFA-1, OPA, PPA, EBA, VWFA-1) responding to the visible area of their category wherever it is
(position invariant), weakly tuned remaining nsdgeneral voxels, and noise-only voxels outside
nsdgeneral; per-voxel SNR, trial noise with a shared (global) component, and per-session
additive offsets and multiplicative scales. Same seed -> byte-identical files.

Several subjects of one root share the design, the stimuli and the functional organisation (pRF maps
and category blobs are placed in normalised hemisphere coordinates); with ``anatomy_jitter > 0`` each
subject also gets its own anatomy (hemi-ellipsoid radii, centres, overall SNR) from a subject-specific
random stream, so voxel counts, positions and SNR differ between subjects (see :func:`subject_anatomy`).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainenc._utils.io import (
    atomic_path,
    exclusive_lock,
    kill_point,
    kill_scope,
    remove_stale_temps,
    sha256_file,
    write_json,
    write_text,
)
from brainenc._utils.logging import get_logger, progress
from brainenc._utils.validation import check_subject
from brainenc.config import to_dict
from brainenc.datasets import _scenes, layout
from brainenc.exceptions import BrainencError, ConfigError, DataFormatError

__all__ = [
    "SimulationConfig",
    "SimulationResult",
    "SimulationExistsError",
    "simulate_subject",
    "render_stimulus",
    "make_design",
    "compute_ncsnr",
    "subject_anatomy",
]

_log = get_logger("simulate")

SPACE = "func1pt8mm"
BETA_VERSION = "betas_fithrf_GLMdenoise_RR"
#: ROI families written for the simulated subject
ROI_FAMILIES = ("nsdgeneral", "prf-visualrois", "prf-eccrois", "floc-faces", "floc-places",
                "floc-bodies", "floc-words", "streams")
#: keys that define the shared design of an NSD root; every subject in one root must agree
DESIGN_KEYS = ("seed", "n_sessions", "n_shared", "stimulus_bits")
#: voxel model codes stored in the ground truth (``voxels/model``)
MODEL_NOISE, MODEL_MIXED, MODEL_PRF, MODEL_CATEGORY = -1, 0, 1, 2
#: reference contrast energy (mean of the energy map over typical scenes), (luminance/255)^2
ENERGY_REF = 0.004
#: half-saturation area fraction of the category response ``1 - exp(-f / F_HALF)``
F_HALF = 0.03
#: category ROIs: (family, label, preferred-category weights over _scenes.CATEGORIES,
#: target direction (lateral, posterior-anterior, inferior-superior) in normalised hemisphere coords)
_CATEGORY_ROIS = (
    ("floc-faces", 1, (1.0, 0.0, 0.25, 0.0, 0.0), (0.95, -0.55, -0.30)),   # OFA
    ("floc-faces", 2, (1.0, 0.0, 0.25, 0.0, 0.0), (0.45, -0.38, -0.85)),   # FFA-1
    ("floc-places", 1, (0.0, 1.0, 0.0, 0.0, 0.1), (0.75, -0.45, 0.60)),    # OPA
    ("floc-places", 2, (0.0, 1.0, 0.0, 0.0, 0.1), (-0.55, -0.30, -0.80)),  # PPA
    ("floc-bodies", 1, (0.2, 0.0, 1.0, 0.0, 0.0), (0.98, -0.30, 0.05)),    # EBA
    ("floc-words", 2, (0.1, 0.0, 0.0, 1.0, 0.0), (0.80, -0.22, -0.60)),    # VWFA-1
)
#: pRF size sigma = a + b * eccentricity (deg) per visual area (V1, V2, V3, hV4, dorsal V3A-like)
_PRF_SIZE = ((0.15, 0.12), (0.25, 0.18), (0.40, 0.25), (0.60, 0.35), (0.55, 0.30))
IMAGE_DEG = 8.4  # NSD stimuli subtend 8.4 x 8.4 degrees
#: lock file held in the NSD root while a simulation writes it
LOCK_NAME = ".brainenc_simulate.lock"


class SimulationExistsError(BrainencError, FileExistsError):
    """The target NSD root already holds data that the simulator must not overwrite."""


@dataclass
class SimulationConfig:
    """Sizes, seed and noise levels of a simulated NSD subject.

    Parameters
    ----------
    subject : str
        NSD subject name, e.g. ``"subj01"``.
    seed : int
        Random seed; the same seed (and config) gives byte-identical files.
    n_sessions : int
        Completed sessions (750 trials each); the subject sees ``250 * n_sessions`` images 3 times.
    n_shared : int
        Number of shared1000 images (slots 1..n_shared) in the simulated set: the test set.
    grid : tuple of 3 int
        Volume shape (X, Y, Z) of the 1.8 mm grid.
    snr_median : float
        Median per-voxel SNR (std of the clean response over images / std of trial noise) of ROI
        voxels; other nsdgeneral voxels get half of it.
    snr_spread : float
        Standard deviation of log SNR across voxels.
    noise_correlation : float
        Fraction (0..1, as a correlation) of trial noise shared by all voxels of a trial.
    session_offset_sd : float
        Standard deviation (PSC) of the per-session, per-voxel additive offset.
    session_scale_sd : float
        Standard deviation of the log of the per-session, per-voxel multiplicative scale.
    stimulus_bits : int
        Bits per colour channel kept in the stored images (8 = no quantisation; 6 keeps the
        default build under 300 MB because gzip compresses quantised photos ~30% better).
    stimulus_compression : int
        gzip level (1..9) of the ``imgBrick`` chunks.
    nifti_compression : int
        gzip level (1..9) of the ``.nii.gz`` files.
    write_hdf5_betas : bool
        Also write ``betas_sessionNN.hdf5`` (``/betas`` int16, h5py shape (750, Z, Y, X)).
    write_stim_info : bool
        Write ``nsd_stim_info_merged.csv`` (§1.3; ~11 MB).
    write_hemi_rois : bool
        Also write ``lh.FAMILY.nii.gz`` / ``rh.FAMILY.nii.gz``.
    anatomy_jitter : float
        Between-subject anatomical variability, in [0, 0.3] (0 = every subject has the reference
        anatomy). When > 0, a subject-specific random stream scales the hemi-ellipsoid radii by
        ``exp(N(0, jitter))`` each, shifts each hemisphere's centre by ``N(0, jitter / 2)`` radii per axis
        and multiplies ``snr_median`` by ``exp(N(0, jitter))``: voxel counts, voxel positions and SNR
        then differ between subjects while the functional organisation (in normalised hemisphere
        coordinates) stays the same. Not a design key: subjects of one root may use different values.
        The realised anatomy is in the ground truth (``anatomy/*``) and the manifest
        (``subjects.<subject>.anatomy``); see :func:`subject_anatomy`.
    """

    subject: str = "subj01"
    seed: int = 0
    n_sessions: int = 3
    n_shared: int = 100
    grid: tuple[int, ...] = (30, 36, 30)
    snr_median: float = 0.6
    snr_spread: float = 0.45
    noise_correlation: float = 0.3
    session_offset_sd: float = 0.5
    session_scale_sd: float = 0.15
    stimulus_bits: int = 6
    stimulus_compression: int = 1
    nifti_compression: int = 4
    write_hdf5_betas: bool = False
    write_stim_info: bool = True
    write_hemi_rois: bool = True
    anatomy_jitter: float = 0.0

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Validate values; raises :class:`~brainenc.exceptions.ConfigError` naming the field."""
        self.subject = check_subject(self.subject)
        if self.subject not in layout.SUBJECTS:
            raise ConfigError(f"'subject' must be one of subj01..subj08; {self.subject!r} was provided")
        if not (isinstance(self.n_sessions, int) and 1 <= self.n_sessions <= 40):
            raise ConfigError(f"'n_sessions' must be an integer in 1..40; {self.n_sessions!r} was provided")
        n_images = 250 * self.n_sessions
        max_shared = min(layout.N_SHARED, n_images)
        if not (isinstance(self.n_shared, int) and 1 <= self.n_shared <= max_shared):
            raise ConfigError(f"'n_shared' must be an integer in 1..{max_shared} "
                              f"(250 * n_sessions images); {self.n_shared!r} was provided")
        if n_images - self.n_shared > layout.N_SLOTS_10K - layout.N_SHARED:
            raise ConfigError(f"'n_shared' = {self.n_shared} leaves more than 9000 non-shared images "
                              f"for n_sessions = {self.n_sessions}; raise 'n_shared'")
        grid = tuple(self.grid)
        if len(grid) != 3 or any((not isinstance(g, int)) or g < 16 or g > 128 for g in grid):
            raise ConfigError(f"'grid' must be 3 integers in 16..128; {self.grid!r} was provided")
        self.grid = grid
        for name, lo, hi in (("snr_median", 1e-3, 100.0), ("snr_spread", 0.0, 3.0),
                             ("noise_correlation", 0.0, 0.99), ("session_offset_sd", 0.0, 20.0),
                             ("session_scale_sd", 0.0, 1.0), ("anatomy_jitter", 0.0, 0.3)):
            v = getattr(self, name)
            if not (lo <= v <= hi):
                raise ConfigError(f"'{name}' must be in [{lo}, {hi}]; {v!r} was provided")
        if self.stimulus_bits not in range(1, 9):
            raise ConfigError(f"'stimulus_bits' must be in 1..8; {self.stimulus_bits!r} was provided")
        for name in ("stimulus_compression", "nifti_compression"):
            if getattr(self, name) not in range(1, 10):
                raise ConfigError(f"'{name}' must be a gzip level in 1..9; {getattr(self, name)!r} was provided")

    @property
    def n_images(self) -> int:
        """Images of the simulated set (each shown 3 times)."""
        return 250 * self.n_sessions

    @property
    def n_trials(self) -> int:
        return layout.TRIALS_PER_SESSION * self.n_sessions


@dataclass
class SimulationResult:
    """What :func:`simulate_subject` wrote.

    Attributes
    ----------
    root : Path
        The NSD root.
    subject : str
    ground_truth_path : Path
        HDF5 file with the true tuning, clean responses and ROI membership.
    manifest_path : Path
        ``<root>/brainenc_simulated.json``.
    files : dict
        Relative path -> sha256 of every file written for this subject (and the shared design files).
    n_images, n_trials, n_voxels : int
        Simulated images, trials and nsdgeneral voxels.
    seconds : float
        Wall time of the build.
    """

    root: Path
    subject: str
    ground_truth_path: Path
    manifest_path: Path
    files: dict = field(default_factory=dict)
    n_images: int = 0
    n_trials: int = 0
    n_voxels: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# design
# --------------------------------------------------------------------------------------------
def make_design(cfg: SimulationConfig) -> dict:
    """Build the experimental design arrays of ``nsd_expdesign.mat`` (all values 1-based).

    Parameters
    ----------
    cfg : SimulationConfig
        Only the design keys (seed, n_sessions, n_shared) matter: every subject of one root shares it.

    Returns
    -------
    dict
        ``masterordering`` int64 (30000,) 10k slots 1..10000; ``subjectim`` int64 (8, 10000) 73k ids
        1..73000; ``sharedix`` int64 (1000,) ascending; ``stimpattern`` uint8 (40, 12, 75);
        ``basiccnt`` int64 (3, 40) trials per session that are 1st/2nd/3rd presentations;
        ``sim_slots`` int64 (n_images,) the simulated 10k slots in ascending order.
    """
    rng = np.random.default_rng([cfg.seed, 0xDE5])
    perm = rng.permutation(layout.N_IMAGES_73K)
    sharedix = np.sort(perm[:layout.N_SHARED]) + 1
    own = perm[layout.N_SHARED:].reshape(8, layout.N_SLOTS_10K - layout.N_SHARED) + 1
    subjectim = np.concatenate([np.broadcast_to(sharedix, (8, layout.N_SHARED)), own], axis=1)

    n_unique = cfg.n_images - cfg.n_shared
    slots = np.arange(1, layout.N_SLOTS_10K + 1)
    is_sim = (slots <= cfg.n_shared) | ((slots > layout.N_SHARED) & (slots <= layout.N_SHARED + n_unique))
    sim_slots, rest_slots = slots[is_sim], slots[~is_sim]
    first = rng.permutation(np.repeat(sim_slots, 3))
    rest = rng.permutation(np.repeat(rest_slots, 3))
    masterordering = np.concatenate([first, rest]).astype(np.int64)

    stimpattern = np.zeros((40, 12, 75), dtype=np.uint8)
    for s in range(40):
        for r in range(12):
            n_on = 63 if r % 2 == 0 else 62  # odd runs (1-based) hold 63 trials, even runs 62
            stimpattern[s, r, np.sort(rng.choice(np.arange(3, 72), n_on, replace=False))] = 1

    occurrence = np.zeros(masterordering.size, dtype=np.int64)
    seen = np.zeros(layout.N_SLOTS_10K + 1, dtype=np.int64)
    for t, k in enumerate(masterordering):
        occurrence[t] = seen[k]
        seen[k] += 1
    sess = np.arange(masterordering.size) // layout.TRIALS_PER_SESSION
    basiccnt = np.zeros((3, 40), dtype=np.int64)
    np.add.at(basiccnt, (occurrence, sess), 1)
    return {"masterordering": masterordering, "subjectim": subjectim.astype(np.int64),
            "sharedix": sharedix.astype(np.int64), "stimpattern": stimpattern, "basiccnt": basiccnt,
            "sim_slots": sim_slots.astype(np.int64), "occurrence": occurrence}


def _write_expdesign(path: Path, design: dict) -> None:
    import scipy.io

    buf = io.BytesIO()
    scipy.io.savemat(buf, {
        "masterordering": design["masterordering"][None, :].astype(np.float64),
        "subjectim": design["subjectim"].astype(np.float64),
        "sharedix": design["sharedix"][None, :].astype(np.float64),
        "stimpattern": design["stimpattern"],
        "basiccnt": design["basiccnt"].astype(np.float64),
    }, format="5", do_compression=False, oned_as="row")
    raw = bytearray(buf.getvalue())
    # the 116-byte MAT v5 text header carries a creation date; fix it for byte-identical files
    text = b"MATLAB 5.0 MAT-file, written by brainenc simulate (NSD-format simulated design)"
    raw[:116] = text.ljust(116, b" ")
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(raw))


def _write_stim_info(path: Path, design: dict) -> None:
    """``nsd_stim_info_merged.csv`` (§1.3) for the full 40-session design of all 8 subjects.

    Columns: unnamed 0-based index, ``cocoId`` (the 73k id stands in: there are no COCO images),
    ``cocoSplit`` ("simulated"), ``cropBox``, ``loss``, ``nsdId``, ``flagged``, ``BOLD5000``,
    ``shared1000``, ``subject1..8`` (0/1 assignment), ``subjectK_repR`` (1-based global trial, 0 = never).
    """
    mo = design["masterordering"]
    order = np.argsort(mo, kind="stable")  # trials grouped by slot, chronological within a slot
    trials_of_slot = order.reshape(layout.N_SLOTS_10K, 3) + 1  # (10000, 3) 1-based global trials
    n = layout.N_IMAGES_73K
    assigned = np.zeros((n, 8), dtype=np.int64)
    reps = np.zeros((n, 8, 3), dtype=np.int64)
    for k in range(8):
        ids0 = design["subjectim"][k] - 1
        assigned[ids0, k] = 1
        reps[ids0, k, :] = trials_of_slot
    shared = np.isin(np.arange(n), design["sharedix"] - 1).tolist()
    header = ["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
    header += [f"subject{k + 1}" for k in range(8)]
    header += [f"subject{k + 1}_rep{r}" for k in range(8) for r in range(3)]
    ints = np.concatenate([assigned, reps.reshape(n, 24)], axis=1)
    buf = io.StringIO()
    np.savetxt(buf, ints, fmt="%d", delimiter=",")
    tails = buf.getvalue().splitlines()
    flag = ("False", "True")
    lines = [",".join(header)]
    lines += [f'{i},{i},simulated,"(0, 0, 0, 0)",0.0,{i},False,False,{flag[shared[i]]},{tail}'
              for i, tail in enumerate(tails)]
    write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# brain
# --------------------------------------------------------------------------------------------
def _rank01(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` scaled to [0, 1] (ties broken by position)."""
    if x.size < 2:
        return np.zeros(x.shape)
    r = np.empty(x.size)
    r[np.argsort(x, kind="stable")] = np.arange(x.size)
    return r / (x.size - 1)


def _affine(shape: tuple[int, int, int], r: float = 1.8) -> np.ndarray:
    """NSD affine (§1.5): diag voxel size, origin at the slab centre."""
    aff = np.diag([r, r, r, 1.0])
    aff[:3, 3] = -((np.asarray(shape, dtype=np.float64) + 1) / 2 - 1) * r
    return aff


#: key of the subject-specific anatomy's random stream (a stream of its own: the others are unchanged by it)
_ANATOMY_STREAM = 0xA7A7


def subject_anatomy(cfg: SimulationConfig) -> dict:
    """The realised anatomy of ``cfg.subject``: hemi-ellipsoid radii and centres, SNR factor.

    With ``anatomy_jitter == 0`` this is the reference anatomy of the grid (``radii = (0.215 X, 0.45 Y,
    0.40 Z)`` voxels, hemisphere centres at ``(0.27 (X-1) | 0.73 (X-1), (Y-1)/2, (Z-1)/2)``, SNR factor 1).
    Otherwise a subject-specific stream ``default_rng([seed, subject index + 1, 0xA7A7])`` draws, in
    this order, 3 radius factors ``exp(N(0, j))``, a (2, 3) centre shift ``N(0, j / 2)`` in units of the
    (jittered) radii and an SNR factor ``exp(N(0, j))``.

    Returns
    -------
    dict
        ``radii`` float64 (3,) voxels (x, y, z); ``centre`` float64 (2, 3) voxel coordinates, row 0 = lh,
        1 = rh; ``radius_factor`` (3,); ``centre_shift`` (2, 3) in radii; ``snr_factor`` float;
        ``snr_median`` float (``cfg.snr_median * snr_factor``); ``jitter`` float.
    """
    X, Y, Z = cfg.grid
    radii = np.array([0.215 * X, 0.45 * Y, 0.40 * Z])
    centre = np.array([[0.27 * (X - 1), (Y - 1) / 2, (Z - 1) / 2],
                       [0.73 * (X - 1), (Y - 1) / 2, (Z - 1) / 2]])
    factor, shift, snr_factor = np.ones(3), np.zeros((2, 3)), 1.0
    j = float(cfg.anatomy_jitter)
    if j > 0:
        sidx = layout.SUBJECTS.index(cfg.subject)
        rng = np.random.default_rng([cfg.seed, sidx + 1, _ANATOMY_STREAM])
        factor = np.exp(rng.normal(0.0, j, 3))
        shift = rng.normal(0.0, j / 2, (2, 3))
        snr_factor = float(np.exp(rng.normal(0.0, j)))
        radii = radii * factor
        centre = centre + shift * radii[None, :]
    return {"radii": radii, "centre": centre, "radius_factor": factor, "centre_shift": shift,
            "snr_factor": snr_factor, "snr_median": cfg.snr_median * snr_factor, "jitter": j}


def _grid_hint(cfg: SimulationConfig) -> str:
    """What to change when a (jittered) anatomy is too small for the grid."""
    if cfg.anatomy_jitter > 0:
        an = subject_anatomy(cfg)
        f = ", ".join(f"{v:.2f}" for v in an["radius_factor"])
        return (f"; raise 'grid' or lower 'anatomy_jitter' ({cfg.anatomy_jitter} scales {cfg.subject}'s radii "
                f"by ({f}) and moves its centres by up to {np.abs(an['centre_shift']).max():.2f} radii)")
    return "; raise 'grid'"


def _make_brain(cfg: SimulationConfig, rng: np.random.Generator, anatomy: dict | None = None) -> dict:
    """Anatomy, ROIs and voxel tuning on the simulated grid.

    ``anatomy`` is :func:`subject_anatomy`'s dict (default: computed from ``cfg``).

    Returns
    -------
    dict with
        ``brainmask`` bool (X, Y, Z); ``cortex`` bool (X, Y, Z); ``rois`` family -> int16 (X, Y, Z)
        label volume (-1/0/k); ``hemi`` int8 (X, Y, Z) 0 = lh, 1 = rh; ``vox`` int64 (n_vox, 3) the
        nsdgeneral voxels in C order, and per-voxel tuning arrays of length n_vox.
    """
    X, Y, Z = cfg.grid
    anatomy = subject_anatomy(cfg) if anatomy is None else anatomy
    i, j, k = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    hemi = (i >= X / 2).astype(np.int8)  # LPI storage: low i = left
    cen = anatomy["centre"]  # (2, 3): lh, rh centres (the reference anatomy: same y, z for both)
    rx, ry, rz = (float(r) for r in anatomy["radii"])
    cx = np.where(hemi == 0, cen[0, 0], cen[1, 0])
    if cfg.anatomy_jitter > 0:
        cy = np.where(hemi == 0, cen[0, 1], cen[1, 1])
        cz = np.where(hemi == 0, cen[0, 2], cen[1, 2])
    else:  # scalars, as always: the reference anatomy's files stay byte-identical
        cy, cz = float(cen[0, 1]), float(cen[0, 2])
    lat = (i - cx) / rx * np.where(hemi == 0, -1, 1)  # +1 lateral surface, -1 medial wall
    t = (j - cy) / ry                                  # -1 occipital pole .. +1 frontal pole
    kz = (k - cz) / rz                                 # -1 inferior .. +1 superior
    rho = np.sqrt(lat ** 2 + t ** 2 + kz ** 2)
    brainmask = rho <= 1.12
    cortex = (rho <= 1.0) & (rho > 0.6)
    nsdgeneral = cortex & (t < -0.15) & (kz < 0.75)
    if nsdgeneral.sum() < 200:
        raise ConfigError(f"'grid' {cfg.grid} is too small: {int(nsdgeneral.sum())} nsdgeneral voxels "
                          f"(at least 200 needed){_grid_hint(cfg)}")

    vox = np.argwhere(nsdgeneral)  # C order == np.nonzero order
    n_vox = len(vox)
    vi = tuple(vox.T)
    v_lat, v_t, v_kz, v_hemi = lat[vi], t[vi], kz[vi], hemi[vi]
    early = v_t < -0.62

    labels = {f: np.zeros(n_vox, dtype=np.int16) for f in ROI_FAMILIES}
    labels["nsdgeneral"][:] = 1
    model = np.full(n_vox, MODEL_MIXED, dtype=np.int8)
    area = np.full(n_vox, -1, dtype=np.int8)
    prf_x = np.full(n_vox, np.nan)
    prf_y = np.full(n_vox, np.nan)
    prf_sigma = np.full(n_vox, np.nan)
    prf_exponent = np.full(n_vox, np.nan)

    for h in (0, 1):
        sel = np.flatnonzero(early & (v_hemi == h))
        if sel.size < 20:
            raise ConfigError(f"'grid' {cfg.grid} is too small for the early visual ROIs{_grid_hint(cfg)}")
        band = _rank01(-v_t[sel])  # 1 at the pole .. 0 anterior
        ventral = v_kz[sel] < 0
        a = np.select([band > 0.65, band > 0.38, band > 0.15], [0, 1, 2], default=3)
        a = np.where((a == 3) & ~ventral, 4, a)  # dorsal last band: V3A-like, unlabelled
        area[sel] = a
        prf_lab = np.where(a < 3, 1 + 2 * a + (~ventral).astype(int), np.where(a == 3, 7, 0))
        labels["prf-visualrois"][sel] = prf_lab
        # polar angle: 0 at the horizontal meridian (kz ~ 0) .. 90 deg away from it
        phi = np.deg2rad(90.0 * _rank01(np.abs(v_kz[sel])))
        ecc = 0.1 + 5.5 * _rank01(-v_lat[sel]) ** 2  # fovea laterally at the pole, periphery medially
        ecc *= np.exp(rng.normal(0, 0.08, sel.size))
        x = (1 if h == 0 else -1) * ecc * np.cos(phi)  # lh sees the right visual field
        y = np.where(ventral, 1.0, -1.0) * ecc * np.sin(phi)  # ventral sees the upper field
        s0 = np.array([_PRF_SIZE[q][0] for q in a])
        s1 = np.array([_PRF_SIZE[q][1] for q in a])
        sigma = (s0 + s1 * ecc) * np.exp(rng.normal(0, 0.1, sel.size))
        prf_x[sel] = x + rng.normal(0, 0.1, sel.size) * sigma
        prf_y[sel] = y + rng.normal(0, 0.1, sel.size) * sigma
        prf_sigma[sel] = sigma
        prf_exponent[sel] = 0.5
        model[sel] = MODEL_PRF
        e = np.hypot(prf_x[sel], prf_y[sel])
        labels["prf-eccrois"][sel] = np.digitize(e, [0.5, 1.0, 2.0, 4.0]) + 1
        labels["streams"][sel] = 1

    # category blobs: nearest target within a radius (disjoint, contiguous)
    cat_w = np.zeros((n_vox, len(_scenes.CATEGORIES)))
    anterior = ~early
    radius = max(2.0, 0.1 * X)
    coords = vox.astype(np.float64)
    for h in (0, 1):
        sel = np.flatnonzero(anterior & (v_hemi == h))
        dists = []
        for fam, lab, w, (dl, dt, dk) in _CATEGORY_ROIS:
            d = np.array([dl, dt, dk])
            d = 0.85 * d / np.linalg.norm(d)
            cxh, cyh, czh = (float(c) for c in cen[h])
            target = np.array([cxh + d[0] * rx * (-1 if h == 0 else 1), cyh + d[1] * ry, czh + d[2] * rz])
            dd = np.linalg.norm(coords[sel] - target, axis=1)
            dists.append(dd)
        dists = np.stack(dists, axis=1)
        best = np.argmin(dists, axis=1)
        ok = dists[np.arange(sel.size), best] <= radius
        for q, (fam, lab, w, _) in enumerate(_CATEGORY_ROIS):
            members = sel[ok & (best == q)]
            if members.size < 3:
                raise ConfigError(f"'grid' {cfg.grid} is too small for the {layout.LABEL_TABLES[fam][lab]} ROI"
                                  f"{_grid_hint(cfg)}")
            labels[fam][members] = lab
            model[members] = MODEL_CATEGORY
            cat_w[members] = np.asarray(w) * rng.uniform(0.7, 1.3, (members.size, len(w)))
    # streams for the rest of nsdgeneral: mid (posterior half) vs far, ventral / lateral / dorsal
    rest = anterior
    far = v_t >= -0.40
    kind = np.select([v_kz < -0.35, v_kz > 0.35], [0, 2], default=1)  # ventral, parietal, lateral
    labels["streams"][rest] = (np.where(far, 5, 2) + kind)[rest]

    mixed = model == MODEL_MIXED
    cat_w[mixed] = rng.uniform(0, 0.35, (int(mixed.sum()), len(_scenes.CATEGORIES)))
    mixed_energy = np.where(mixed, rng.uniform(0.2, 0.8, n_vox), 0.0)
    gain = np.select([model == MODEL_PRF, model == MODEL_CATEGORY],
                     [rng.uniform(1.5, 3.5, n_vox), rng.uniform(1.5, 3.0, n_vox)],
                     default=rng.uniform(0.5, 1.5, n_vox))
    baseline = rng.uniform(0.5, 2.0, n_vox)
    snr = anatomy["snr_median"] * np.where(mixed, 0.5, 1.0) * np.exp(rng.normal(0, cfg.snr_spread, n_vox))
    snr = np.clip(snr, 0.02, 5.0)

    rois = {}
    for fam in ROI_FAMILIES:
        vol = np.where(cortex, 0, -1).astype(np.int16)
        vol[vi] = labels[fam]
        rois[fam] = vol
    return {"brainmask": brainmask, "cortex": cortex, "hemi": hemi, "rois": rois, "vox": vox,
            "labels": labels, "model": model, "area": area, "prf_x": prf_x, "prf_y": prf_y,
            "prf_sigma": prf_sigma, "prf_exponent": prf_exponent, "category_weights": cat_w,
            "mixed_energy_weight": mixed_energy, "gain": gain, "baseline": baseline, "snr": snr}


def _prf_weights(x: np.ndarray, y: np.ndarray, sigma: np.ndarray, grid: int) -> np.ndarray:
    """Gaussian pRF weights on the energy grid, normalised by the full Gaussian mass.

    A pRF partly outside the image therefore sees proportionally less energy.

    Returns
    -------
    float64 ndarray, shape (n_prf, grid * grid)
    """
    c = ((np.arange(grid) + 0.5) / grid - 0.5) * IMAGE_DEG  # pixel centres in degrees
    gx = c[None, :]            # columns: left -> right
    gy = -c[:, None]           # rows: top -> bottom is +y -> -y
    pix = (IMAGE_DEG / grid) ** 2
    w = np.exp(-((gx[None] - x[:, None, None]) ** 2 + (gy[None] - y[:, None, None]) ** 2)
               / (2 * sigma[:, None, None] ** 2))
    w *= pix / (2 * np.pi * sigma[:, None, None] ** 2)
    return w.reshape(len(x), grid * grid)


def _clean_responses(brain: dict, energy: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Noise-free responses (PSC) of the nsdgeneral voxels.

    Parameters
    ----------
    energy : float32 ndarray, shape (n_images, G, G)
    fractions : float64 ndarray, shape (n_images, n_categories)

    Returns
    -------
    float64 ndarray, shape (n_images, n_vox): ``baseline + gain * drive``.
    """
    n_img = energy.shape[0]
    model = brain["model"]
    drive = np.zeros((n_img, model.size))
    prf = np.flatnonzero(model == MODEL_PRF)
    W = _prf_weights(brain["prf_x"][prf], brain["prf_y"][prf], brain["prf_sigma"][prf], energy.shape[1])
    local = energy.reshape(n_img, -1).astype(np.float64) @ W.T / ENERGY_REF
    drive[:, prf] = np.maximum(local, 0) ** brain["prf_exponent"][prf]
    g = 1.0 - np.exp(-fractions / F_HALF)  # (n_img, n_cat) saturating presence
    cat = np.flatnonzero(model != MODEL_PRF)
    drive[:, cat] = g @ brain["category_weights"][cat].T
    mean_energy = energy.reshape(n_img, -1).mean(axis=1, dtype=np.float64) / ENERGY_REF
    drive += np.sqrt(mean_energy)[:, None] * brain["mixed_energy_weight"][None, :]
    return brain["baseline"][None, :] + brain["gain"][None, :] * drive


# --------------------------------------------------------------------------------------------
# file writers
# --------------------------------------------------------------------------------------------
def _write_nifti(path: Path, data: np.ndarray, zooms: tuple, level: int) -> None:
    """NIfTI-1 ``.nii.gz`` with the NSD affine, written byte-reproducibly (gzip mtime 0)."""
    import nibabel as nib

    aff = _affine(data.shape[:3])
    img = nib.Nifti1Image(data, aff)
    img.header.set_data_dtype(data.dtype)
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    raw = img.to_bytes()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh,
                                                  compresslevel=level, mtime=0) as gz:
            gz.write(raw)


def _write_ctab(path: Path, family: str) -> None:
    table = {0: "Unknown", **layout.LABEL_TABLES[family]}
    write_text(path, "".join(f"{k} {name}\n" for k, name in sorted(table.items())))


def compute_ncsnr(sessions: list[np.ndarray], trial_slots: np.ndarray) -> np.ndarray:
    """Noise-ceiling SNR exactly as NSD (§1.8).

    1. z-score each voxel within each session over its 750 trials (ddof 1, as MATLAB ``std``);
    2. keep images (10k slots) that occur exactly 3 times in the completed sessions;
    3. ``v = sqrt(nanmean over images of var(3 trials, ddof 1))``;
    4. ``ncsnr = sqrt(max(0, 1 - v^2)) / v``.

    Parameters
    ----------
    sessions : list of ndarray, each shape (n_voxels, 750)
        Betas of each completed session (any scale, e.g. int16 x 300).
    trial_slots : int ndarray, shape (750 * n_sessions,)
        10k slot of every chronological trial.

    Returns
    -------
    float64 ndarray, shape (n_voxels,)
        NaN where a voxel is constant within a session.
    """
    trial_slots = np.asarray(trial_slots)
    slots, counts = np.unique(trial_slots, return_counts=True)
    keep = slots[counts == 3]
    order = np.argsort(trial_slots, kind="stable")
    idx = order[np.isin(trial_slots[order], keep)].reshape(-1, 3)  # (n_images, 3) trial indices
    n_vox = sessions[0].shape[0]
    out = np.empty(n_vox)
    for lo in range(0, n_vox, 2048):  # voxel blocks keep memory small
        z = []
        for b in sessions:
            b = np.asarray(b[lo:lo + 2048], dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                z.append((b - b.mean(axis=1, keepdims=True)) / b.std(axis=1, ddof=1, keepdims=True))
        z = np.concatenate(z, axis=1)
        var = z[:, idx].var(axis=2, ddof=1)  # (block, n_images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            v = np.sqrt(np.nanmean(var, axis=1))
            out[lo:lo + 2048] = np.sqrt(np.maximum(0.0, 1.0 - v ** 2)) / v
    return out


# --------------------------------------------------------------------------------------------
# main entry point
# --------------------------------------------------------------------------------------------
def _design_config(cfg: SimulationConfig) -> dict:
    return {k: getattr(cfg, k) for k in DESIGN_KEYS}


def _config_dict(cfg: SimulationConfig) -> dict:
    """The config as stored in the manifest and the ground truth.

    ``anatomy_jitter`` is left out at its default 0 so that the reference simulation's files stay
    byte-identical to those written before the field existed (an absent key means 0).
    """
    d = to_dict(cfg)
    if not d.get("anatomy_jitter"):
        d.pop("anatomy_jitter", None)
    return d


def _anatomy_record(anatomy: dict) -> dict:
    """JSON form of :func:`subject_anatomy` (manifest ``subjects.<subject>.anatomy``)."""
    return {"jitter": anatomy["jitter"], "radii": [float(v) for v in anatomy["radii"]],
            "centre": [[float(v) for v in row] for row in anatomy["centre"]],
            "radius_factor": [float(v) for v in anatomy["radius_factor"]],
            "centre_shift": [[float(v) for v in row] for row in anatomy["centre_shift"]],
            "snr_factor": float(anatomy["snr_factor"]), "snr_median": float(anatomy["snr_median"])}


def _check_target(root: Path, cfg: SimulationConfig, overwrite: bool) -> dict | None:
    """Refuse to clobber a real NSD release, another design, or an existing subject."""
    man = layout.simulation_manifest(root)
    if man is None:
        for p in (layout.expdesign_path(root), layout.stimuli_path(root), root / "nsddata_betas"):
            if p.exists():
                raise SimulationExistsError(
                    f"{root} holds NSD data not written by brainenc simulate ({p} exists, no "
                    f"{layout.SIMULATION_MANIFEST}); refusing to write a simulated subject into it")
        return None
    subjects = dict(man.get("subjects", {}))
    others = {s for s in subjects if s != cfg.subject}
    design = man.get("design", {})
    if others and design != _design_config(cfg):
        diff = sorted(k for k in DESIGN_KEYS if design.get(k) != getattr(cfg, k))
        raise SimulationExistsError(
            f"{root / layout.SIMULATION_MANIFEST}: the simulated design of {sorted(others)} differs in "
            f"{diff}; use the same values or another --nsd-root")
    entry = subjects.get(cfg.subject)
    if entry is not None and entry.get("complete", False) and not overwrite:
        raise SimulationExistsError(
            f"{layout.betas_dir(root, cfg.subject, SPACE, BETA_VERSION)}: simulated {cfg.subject} exists; "
            f"pass overwrite=True (brainenc simulate --force) to replace it")
    return man


def _remove_subject_files(root: Path, subject: str) -> None:
    """Delete the files a previous simulation of ``subject`` wrote (only those we own)."""
    bdir = layout.betas_dir(root, subject, SPACE, BETA_VERSION)
    if bdir.is_dir():
        for p in list(bdir.glob("betas_session*.nii.gz")) + list(bdir.glob("betas_session*.hdf5")):
            p.unlink()
    rdir = layout.ppdata_dir(root, subject, SPACE) / "roi"
    if rdir.is_dir():
        for fam in ROI_FAMILIES:
            for pre in ("", "lh.", "rh."):
                (rdir / f"{pre}{fam}.nii.gz").unlink(missing_ok=True)


def quantise_stimulus(image: np.ndarray, bits: int) -> np.ndarray:
    """Round uint8 ``image`` to ``bits`` bits per channel (the simulator's stored stimuli; 8 = unchanged)."""
    step = 1 << (8 - int(bits))
    if step == 1:
        return image
    return np.minimum(255, (image.astype(np.int32) + step // 2) // step * step).astype(np.uint8)


def render_stimulus(root: str | Path, nsd_id: int) -> np.ndarray:
    """The image a simulated NSD root shows (or would show) for 0-based 73k id ``nsd_id``.

    The simulator renders only the images its subjects see; every other id's image is the same pure
    function of the design seed, so this gives a simulated root's *unseen* images too (uint8
    ``(425, 425, 3)``, quantised to the design's ``stimulus_bits``).
    """
    man = layout.simulation_manifest(Path(root))
    if man is None:
        raise DataFormatError(f"{root}: not a simulated NSD root (no {layout.SIMULATION_MANIFEST}); real images "
                              "come from its nsd_stimuli.hdf5")
    nsd_id = int(nsd_id)
    if not 0 <= nsd_id < layout.N_IMAGES_73K:
        raise DataFormatError(f"73k id {nsd_id} out of range 0..{layout.N_IMAGES_73K - 1}")
    design = man.get("design", {})
    seed = int(design.get("seed", man.get("seed", 0)))
    return quantise_stimulus(_scenes.render_scene(seed, nsd_id).image, int(design.get("stimulus_bits", 8)))


def simulate_subject(nsd_root: str | Path, cfg: SimulationConfig | None = None,
                     overwrite: bool = False) -> SimulationResult:
    """Write a simulated subject in the NSD release layout under ``nsd_root``.

    Parameters
    ----------
    nsd_root : path
        NSD root (created if missing). Must not hold a real NSD release.
    cfg : SimulationConfig, optional
        Sizes, seed and noise levels (default: ``SimulationConfig()``).
    overwrite : bool
        Replace an existing simulated subject of the same name.

    Returns
    -------
    SimulationResult

    Raises
    ------
    SimulationExistsError
        ``nsd_root`` holds a real NSD release, a simulated design with other design keys, or
        (without ``overwrite``) the same simulated subject.
    LockedError
        Another live process is simulating into ``nsd_root``.

    Notes
    -----
    A simulation that was killed (its manifest entry says ``complete: false``) is simply done
    again: the output is a function of the config, so the rerun writes the files an
    uninterrupted run would have. Temporaries of killed writers under ``nsd_root`` are removed.
    """
    cfg = cfg or SimulationConfig()
    root = Path(nsd_root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    # one simulator per NSD root (they share the design files and the stimuli file); a lock left
    # by a killed simulation is taken over
    with exclusive_lock(root / LOCK_NAME, f"simulated NSD root {root}"), kill_scope("simulate"):
        return _simulate(root, cfg, overwrite)


def _simulate(root: Path, cfg: SimulationConfig, overwrite: bool) -> SimulationResult:
    import h5py

    t0 = time.perf_counter()
    man = _check_target(root, cfg, overwrite)
    stale = remove_stale_temps(root)  # e.g. a half-written stimuli file of a killed simulation
    if stale:
        _log.info("removed %d temporary file(s) left by an interrupted simulation", len(stale))
    subj = cfg.subject
    sidx = layout.SUBJECTS.index(subj)
    from brainenc._version import __version__

    # manifest first, flagged incomplete: a crashed run stays recognisably ours
    man = man or {"subjects": {}}
    man.update({"format": "nsd", "seed": cfg.seed, "design": _design_config(cfg),
                "brainenc_version": __version__})
    man["subjects"] = dict(man.get("subjects", {}))
    man["subjects"][subj] = {"n_sessions": cfg.n_sessions, "complete": False}
    man["config"] = _config_dict(cfg)
    manifest_path = root / layout.SIMULATION_MANIFEST
    write_json(manifest_path, man)
    _remove_subject_files(root, subj)

    files: dict[str, Path] = {}
    design = make_design(cfg)
    p = layout.expdesign_path(root)
    _write_expdesign(p, design)
    files["expdesign"] = p
    if cfg.write_stim_info:
        p = layout.stim_info_path(root)
        _write_stim_info(p, design)
        files["stim_info"] = p

    # ---- trials and images of this subject
    mo = design["masterordering"][:cfg.n_trials]
    sim_slots = design["sim_slots"]
    row_of_slot = np.full(layout.N_SLOTS_10K + 1, -1, dtype=np.int64)
    row_of_slot[sim_slots] = np.arange(sim_slots.size)
    trial_row = row_of_slot[mo]
    image_ids = design["subjectim"][sidx, sim_slots - 1] - 1  # 0-based 73k ids, rows in slot order
    trial_ids = image_ids[trial_row]
    repeat = design["occurrence"][:cfg.n_trials]

    # ---- stimuli: render, quantise, write chunk by chunk (ascending id: reproducible layout)
    S = _scenes.IMAGE_SIZE
    n_img = image_ids.size
    energy = np.zeros((n_img, _scenes.ENERGY_GRID, _scenes.ENERGY_GRID), dtype=np.float32)
    fractions = np.zeros((n_img, len(_scenes.CATEGORIES)))
    background = np.zeros(n_img, dtype=np.int16)
    placements = []
    stim_path = layout.stimuli_path(root)
    order = np.argsort(image_ids)
    with atomic_path(stim_path) as tmp:
        existing = stim_path.is_file() and bool(man["subjects"].keys() - {subj})
        if existing:  # another simulated subject of the same design: add our images to its file
            shutil.copyfile(stim_path, tmp)
        with h5py.File(tmp, "a" if existing else "w") as f:
            if "imgBrick" in f:
                dset = f["imgBrick"]
            else:
                dset = f.create_dataset("imgBrick", shape=(layout.N_IMAGES_73K, S, S, 3), dtype=np.uint8,
                                        chunks=(1, S, S, 3), compression="gzip",
                                        compression_opts=cfg.stimulus_compression, fillvalue=0,
                                        track_times=False)
            chunk_written = _written_chunks(dset) if existing else set()
            for row in progress(order, desc="rendering stimuli", total=n_img, unit="img"):
                nsd_id = int(image_ids[row])
                scene = _scenes.render_scene(cfg.seed, nsd_id)
                img = quantise_stimulus(scene.image, cfg.stimulus_bits)
                if nsd_id not in chunk_written:
                    dset[nsd_id] = img
                    kill_point("stimuli")  # crash tests: inside the (large) stimuli file write
                energy[row] = _scenes.contrast_energy(img)
                fractions[row] = scene.category_fraction
                background[row] = scene.background
                placements += [(row,) + dataclasses.astuple(pl) for pl in scene.placements]
    files["stimuli"] = stim_path
    placements.sort()

    # ---- brain, ROIs, mask
    rng = np.random.default_rng([cfg.seed, sidx + 1, 0xB8A1])
    anatomy = subject_anatomy(cfg)  # its own stream: with jitter 0 nothing is drawn
    brain = _make_brain(cfg, rng, anatomy)
    clean = _clean_responses(brain, energy, fractions)  # (n_img, n_vox)
    signal_sd = clean.std(axis=0)
    noise_sd_v = signal_sd / brain["snr"]
    zooms3 = (1.8, 1.8, 1.8)
    lvl = cfg.nifti_compression
    p = layout.brainmask_path(root, subj, SPACE)
    _write_nifti(p, brain["brainmask"].astype(np.int16), zooms3, lvl)
    files["brainmask"] = p
    for fam in ROI_FAMILIES:
        vol = brain["rois"][fam]
        p = layout.roi_path(root, subj, SPACE, fam)
        _write_nifti(p, vol, zooms3, lvl)
        files[f"roi/{fam}"] = p
        if cfg.write_hemi_rois:
            for h, hemi in enumerate(layout.HEMIS):
                hv = np.where(brain["hemi"] == h, vol, -1).astype(np.int16)  # other hemisphere: -1
                p = layout.roi_path(root, subj, SPACE, fam, hemi=hemi)
                _write_nifti(p, hv, zooms3, lvl)
                files[f"roi/{hemi}.{fam}"] = p
        for space in (SPACE, "fsaverage"):
            p = layout.ctab_path(root, subj, fam, space=space)
            _write_ctab(p, fam)
            files[f"ctab/{space}/{fam}"] = p

    # ---- betas, session by session
    mask_vox = np.argwhere(brain["brainmask"])  # (n_brain, 3) C order
    n_brain = len(mask_vox)
    flat_brain = np.ravel_multi_index(tuple(mask_vox.T), cfg.grid)
    flat_ng = np.ravel_multi_index(tuple(brain["vox"].T), cfg.grid)
    ng_in_brain = np.searchsorted(flat_brain, flat_ng)
    is_ng = np.zeros(n_brain, dtype=bool)
    is_ng[ng_in_brain] = True
    baseline_all = rng.uniform(-0.5, 1.0, n_brain)
    baseline_all[ng_in_brain] = 0.0  # nsdgeneral baselines live in the clean responses
    noise_all = rng.uniform(1.0, 3.0, n_brain)
    noise_all[ng_in_brain] = noise_sd_v
    offsets = rng.normal(0, cfg.session_offset_sd, (cfg.n_sessions, n_brain)) \
        + rng.normal(0, 0.3 * cfg.session_offset_sd, (cfg.n_sessions, 1))
    scales = np.exp(rng.normal(0, cfg.session_scale_sd, (cfg.n_sessions, n_brain)))
    rho = cfg.noise_correlation
    noise_rng = np.random.default_rng([cfg.seed, sidx + 1, 0x7015E])
    T = layout.TRIALS_PER_SESSION
    sessions_int = []
    bdir = layout.betas_dir(root, subj, SPACE, BETA_VERSION)
    for s in progress(range(cfg.n_sessions), desc="writing betas", total=cfg.n_sessions, unit="session"):
        rows = trial_row[s * T:(s + 1) * T]
        resp = np.broadcast_to(baseline_all[:, None], (n_brain, T)).copy()
        resp[ng_in_brain] += clean[rows].T
        e = noise_rng.standard_normal((n_brain, T))
        gnoise = noise_rng.standard_normal(T)
        resp += noise_all[:, None] * (np.sqrt(1 - rho ** 2) * e + rho * gnoise[None, :])
        beta = offsets[s][:, None] + scales[s][:, None] * resp
        b16 = np.clip(np.rint(beta * 300.0), -32768, 32767).astype(np.int16)
        sessions_int.append(b16)
        vol = np.zeros(cfg.grid + (T,), dtype=np.int16)
        vol[tuple(mask_vox.T)] = b16
        p = layout.betas_path(root, subj, SPACE, BETA_VERSION, s + 1, fmt="nifti")
        _write_nifti(p, vol, zooms3 + (layout.TR[SPACE],), lvl)
        files[f"betas/session{s + 1:02d}"] = p
        if cfg.write_hdf5_betas:
            p = layout.betas_path(root, subj, SPACE, BETA_VERSION, s + 1, fmt="hdf5")
            with atomic_path(p) as tmp, h5py.File(tmp, "w") as f:
                f.create_dataset("betas", data=vol.transpose(3, 2, 1, 0), chunks=(T, 1, 1, 1),
                                 track_times=False)
            files[f"betas_hdf5/session{s + 1:02d}"] = p
        del vol

    ncs = compute_ncsnr(sessions_int, mo)
    vol = np.zeros(cfg.grid, dtype=np.float32)
    vol[tuple(mask_vox.T)] = ncs.astype(np.float32)
    p = bdir / "ncsnr.nii.gz"
    _write_nifti(p, vol, zooms3, lvl)
    files["ncsnr"] = p

    # ---- ground truth
    gt = layout.ground_truth_file(root, subj)
    shared = image_ids[np.isin(image_ids, design["sharedix"] - 1)]
    with atomic_path(gt) as tmp, h5py.File(tmp, "w") as f:
        def put(name, data, **kw):
            f.create_dataset(name, data=data, track_times=False, **kw)

        f.attrs["subject"] = subj
        f.attrs["seed"] = cfg.seed
        f.attrs["config"] = json.dumps(_config_dict(cfg), sort_keys=True)
        f.attrs["categories"] = json.dumps(list(_scenes.CATEGORIES))
        f.attrs["roi_names"] = json.dumps({fam: layout.LABEL_TABLES[fam] for fam in ROI_FAMILIES})
        f.attrs["units"] = "responses in percent signal change (PSC); betas files store round(PSC * 300)"
        f.attrs["model_codes"] = json.dumps({"mixed": MODEL_MIXED, "prf": MODEL_PRF, "category": MODEL_CATEGORY})
        f.attrs["energy_ref"] = ENERGY_REF
        f.attrs["f_half"] = F_HALF
        f.attrs["image_deg"] = IMAGE_DEG
        f.attrs["brainenc_version"] = __version__
        put("images/nsd_id", image_ids)
        put("images/slot", sim_slots)
        put("images/is_shared", np.isin(image_ids, shared))
        put("images/category_fraction", fractions.astype(np.float32))
        put("images/contrast_energy", energy, compression="gzip", compression_opts=4, chunks=True)
        put("images/background", background)
        pl = np.asarray(placements, dtype=np.int32).reshape(-1, 7)
        for c, name in enumerate(("image_row", "category", "source", "y0", "x0", "y1", "x1")):
            put(f"placements/{name}", pl[:, c])
        put("trials/nsd_id", trial_ids)
        put("trials/image_row", trial_row)
        put("trials/session", np.arange(cfg.n_trials) // T + 1)
        put("trials/trial", np.arange(cfg.n_trials) % T)
        put("trials/repeat", repeat)
        put("voxels/ijk", brain["vox"].astype(np.int16))
        for fam in ROI_FAMILIES:
            put(f"voxels/roi/{fam}", brain["labels"][fam])
        for key in ("model", "area", "prf_x", "prf_y", "prf_sigma", "prf_exponent", "category_weights",
                    "mixed_energy_weight", "gain", "baseline", "snr"):
            put(f"voxels/{key}", brain[key])
        put("voxels/noise_sd", noise_sd_v)
        put("voxels/session_offset", offsets[:, ng_in_brain])
        put("voxels/session_scale", scales[:, ng_in_brain])
        put("voxels/ncsnr", ncs[ng_in_brain])
        put("clean_responses", clean.astype(np.float32), compression="gzip", compression_opts=4,
            chunks=(min(n_img, 64), clean.shape[1]))
        if cfg.anatomy_jitter > 0:  # (absent = the reference anatomy: subject_anatomy(cfg) with jitter 0)
            f.attrs["anatomy"] = json.dumps(_anatomy_record(anatomy), sort_keys=True)
            for key in ("radii", "centre", "radius_factor", "centre_shift"):
                put(f"anatomy/{key}", np.asarray(anatomy[key], dtype=np.float64))
            put("anatomy/snr_factor", np.float64(anatomy["snr_factor"]))
    files["ground_truth"] = gt

    shas = {str(p.relative_to(root)): sha256_file(p) for p in files.values()}
    man["subjects"][subj] = {
        "n_sessions": cfg.n_sessions, "complete": True, "n_images": int(n_img),
        "n_trials": cfg.n_trials, "n_shared": cfg.n_shared, "grid": list(cfg.grid),
        "n_nsdgeneral_voxels": int(len(brain["vox"])), "n_brain_voxels": int(n_brain),
        "ground_truth": gt.name, "files": shas,
    }
    if cfg.anatomy_jitter > 0:
        man["subjects"][subj]["anatomy"] = _anatomy_record(anatomy)
    write_json(manifest_path, man)
    secs = time.perf_counter() - t0
    _log.info("simulated %s: %d sessions, %d images, %d nsdgeneral voxels in %.1f s",
              subj, cfg.n_sessions, n_img, len(brain["vox"]), secs)
    return SimulationResult(root=root, subject=subj, ground_truth_path=gt, manifest_path=manifest_path,
                            files=shas, n_images=int(n_img), n_trials=cfg.n_trials,
                            n_voxels=int(len(brain["vox"])), seconds=secs)


def _written_chunks(dset) -> set:
    """73k ids whose chunk is allocated in ``imgBrick`` (images already written)."""
    out = set()
    n = dset.id.get_num_chunks()
    for q in range(n):
        info = dset.id.get_chunk_info(q)
        out.add(int(info.chunk_offset[0]))
    return out
