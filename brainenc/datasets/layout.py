"""The NSD release layout: file paths, per-subject constants and ROI label tables.

Single source of truth shared by the readers (:mod:`brainenc.datasets.nsd`) and the
simulator (:mod:`brainenc.datasets.simulate`). Spec: ``shared/reference/nsd_format.md``.
Paths are relative to an *NSD root* holding ``nsddata/``, ``nsddata_betas/`` and
``nsddata_stimuli/`` exactly as in the public release.
"""
from __future__ import annotations

import json
from pathlib import Path

from brainenc._utils.validation import check_option, check_subject
from brainenc.exceptions import DataFormatError

TRIALS_PER_SESSION = 750
N_IMAGES_73K = 73000
N_SLOTS_10K = 10000
N_SHARED = 1000
IMAGE_SIZE = 425
FSAVERAGE_VERTICES = 163842

SUBJECTS = tuple(f"subj{i:02d}" for i in range(1, 9))
#: completed NSD sessions per subject (nsd_format.md §1.5); never derived from a glob.
N_SESSIONS = {"subj01": 40, "subj02": 40, "subj03": 32, "subj04": 30,
              "subj05": 40, "subj06": 32, "subj07": 40, "subj08": 30}
GRID_1PT8MM = {"subj01": (81, 104, 83), "subj02": (82, 106, 84), "subj03": (81, 106, 82),
               "subj04": (85, 99, 80), "subj05": (79, 97, 78), "subj06": (85, 113, 83),
               "subj07": (78, 95, 81), "subj08": (80, 103, 78)}
GRID_1MM = {"subj01": (145, 186, 148), "subj02": (146, 190, 150), "subj03": (145, 190, 146),
            "subj04": (152, 177, 143), "subj05": (141, 173, 139), "subj06": (152, 202, 148),
            "subj07": (139, 170, 145), "subj08": (143, 184, 139)}
VOXEL_SIZE = {"func1pt8mm": 1.8, "func1mm": 1.0}
TR = {"func1pt8mm": 4.0 / 3.0, "func1mm": 1.0}

SPACES = ("func1pt8mm", "func1mm", "fsaverage")
VOLUME_SPACES = ("func1pt8mm", "func1mm")
BETA_VERSIONS = ("betas_assumehrf", "betas_fithrf", "betas_fithrf_GLMdenoise_RR")
BETA_FORMATS = ("nifti", "hdf5")
HEMIS = ("lh", "rh")

#: ROI families and their label tables (nsd_format.md §1.7). 0 = unlabelled.
LABEL_TABLES: dict[str, dict[int, str]] = {
    "nsdgeneral": {1: "nsdgeneral"},
    "prf-visualrois": {1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"},
    "prf-eccrois": {1: "ecc0pt5", 2: "ecc1", 3: "ecc2", 4: "ecc4", 5: "ecc4+"},
    "floc-faces": {1: "OFA", 2: "FFA-1", 3: "FFA-2", 4: "mTL-faces", 5: "aTL-faces"},
    "floc-bodies": {1: "EBA", 2: "FBA-1", 3: "FBA-2", 4: "mTL-bodies"},
    "floc-places": {1: "OPA", 2: "PPA", 3: "RSC"},
    "floc-words": {1: "OWFA", 2: "VWFA-1", 3: "VWFA-2", 4: "mfs-words", 5: "mTL-words"},
    "streams": {1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal",
                5: "ventral", 6: "lateral", 7: "parietal"},
}
ROI_FAMILIES = tuple(LABEL_TABLES)

#: file an NSD root may hold to declare a simulated (smaller) design; see simulate.py
SIMULATION_MANIFEST = "brainenc_simulated.json"
#: the simulator's per-subject ground truth, next to the manifest (which names it); see simulate.py
GROUND_TRUTH_FILE = "brainenc_ground_truth_{subject}.h5"


def expdesign_path(root: Path) -> Path:
    return Path(root) / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"


def stim_info_path(root: Path) -> Path:
    return Path(root) / "nsddata" / "experiments" / "nsd" / "nsd_stim_info_merged.csv"


def stimuli_path(root: Path) -> Path:
    return Path(root) / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"


def ppdata_dir(root: Path, subject: str, space: str) -> Path:
    """``nsddata/ppdata/subjXX/<space>`` (brainmask, roi/)."""
    return Path(root) / "nsddata" / "ppdata" / check_subject(subject) / space


def betas_dir(root: Path, subject: str, space: str, beta_version: str) -> Path:
    check_option("space", space, SPACES)
    check_option("beta_version", beta_version, BETA_VERSIONS)
    return Path(root) / "nsddata_betas" / "ppdata" / check_subject(subject) / space / beta_version


def betas_path(root: Path, subject: str, space: str, beta_version: str, session: int,
               fmt: str = "nifti", hemi: str | None = None) -> Path:
    """Path of one session's betas (sessions are 1-based)."""
    d = betas_dir(root, subject, space, beta_version)
    if space == "fsaverage":
        check_option("hemi", hemi, HEMIS)
        return d / f"{hemi}.betas_session{session:02d}.mgh"
    check_option("fmt", fmt, BETA_FORMATS)
    ext = "nii.gz" if fmt == "nifti" else "hdf5"
    return d / f"betas_session{session:02d}.{ext}"


def ncsnr_path(root: Path, subject: str, space: str, beta_version: str, hemi: str | None = None) -> Path:
    d = betas_dir(root, subject, space, beta_version)
    if space == "fsaverage":
        check_option("hemi", hemi, HEMIS)
        return d / f"{hemi}.ncsnr.mgh"
    return d / "ncsnr.nii.gz"


def brainmask_path(root: Path, subject: str, space: str) -> Path:
    return ppdata_dir(root, subject, space) / "brainmask.nii.gz"


def roi_path(root: Path, subject: str, space: str, family: str, hemi: str | None = None) -> Path:
    """Volume ROI NIfTI, or fsaverage label ``.mgz`` (``hemi`` required for fsaverage)."""
    check_option("roi family", family, ROI_FAMILIES)
    if space == "fsaverage":
        check_option("hemi", hemi, HEMIS)
        return Path(root) / "nsddata" / "freesurfer" / "fsaverage" / "label" / f"{hemi}.{family}.mgz"
    prefix = f"{hemi}." if hemi else ""
    return ppdata_dir(root, subject, space) / "roi" / f"{prefix}{family}.nii.gz"


def ctab_path(root: Path, subject: str, family: str, space: str = "fsaverage") -> Path:
    who = "fsaverage" if space == "fsaverage" else check_subject(subject)
    return Path(root) / "nsddata" / "freesurfer" / who / "label" / f"{family}.mgz.ctab"


def simulation_manifest(root: Path) -> dict | None:
    """The simulator's manifest if ``root`` holds a simulated design, else None."""
    p = Path(root) / SIMULATION_MANIFEST
    if not p.is_file():
        return None
    try:
        man = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{p}: not a text file (byte {exc.start} is not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{p}: invalid JSON ({exc.msg})") from None
    except OSError as exc:
        raise DataFormatError(f"{p}: cannot read the file ({exc.strerror or exc})") from None
    if not isinstance(man, dict) or not isinstance(man.get("subjects", {}), dict):
        raise DataFormatError(f"{p}: must be a JSON object with a 'subjects' table (rerun brainenc simulate)")
    return man


def ground_truth_file(root: Path, subject: str) -> Path:
    """Where the simulator writes ``subject``'s ground truth: ``<root>/brainenc_ground_truth_subjXX.h5``.

    The naming rule only (the writer's target); readers use :func:`ground_truth_path`.
    """
    return Path(root) / GROUND_TRUTH_FILE.format(subject=check_subject(subject))


def ground_truth_path(root: Path, subject: str) -> Path | None:
    """``subject``'s simulated ground-truth file, or None when ``root`` holds no such file.

    Read from the simulation manifest (``subjects.<subject>.ground_truth``, or a top-level
    ``ground_truth`` name or ``{subject: name}`` table), relative to ``root`` unless absolute.
    None for a real NSD release (no manifest), a subject the manifest does not name, or a file
    that is missing on disk.
    """
    subject = check_subject(subject)
    man = simulation_manifest(root)
    if man is None:
        return None
    entry = man.get("subjects", {}).get(subject, {})
    rel = (entry.get("ground_truth") if isinstance(entry, dict) else None) or man.get("ground_truth")
    if isinstance(rel, dict):
        rel = rel.get(subject)
    if not rel or not isinstance(rel, str):
        return None
    p = Path(rel)
    p = p if p.is_absolute() else Path(root) / p
    return p if p.is_file() else None


def n_sessions(root: Path, subject: str) -> int:
    """Completed sessions of ``subject``: the NSD table, or the simulated design's own count."""
    subject = check_subject(subject)
    man = simulation_manifest(root)
    if man is not None:
        subs = man.get("subjects", {})
        if subject in subs:
            n = subs[subject].get("n_sessions") if isinstance(subs[subject], dict) else None
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 40:
                raise DataFormatError(f"{Path(root) / SIMULATION_MANIFEST}: subjects.{subject}.n_sessions must be an "
                                      f"integer in 1..40; found {n!r} (rerun brainenc simulate)")
            return n
    check_option("subject", subject, SUBJECTS)
    return N_SESSIONS[subject]


# ----------------------------------------------------------------------------------------------
# nsddata_timeseries (NSD data manual; not in nsd_format.md, so unverified)
# ----------------------------------------------------------------------------------------------
_TIMESERIES_RUN_RE = r"timeseries_session(\d+)_run(\d+)\.nii(\.gz)?$"


def timeseries_dir(root: Path, subject: str, space: str) -> Path:
    """``nsddata_timeseries/ppdata/subjXX/<space>``, holding ``timeseries/``, ``design/`` and ``motion/``.

    Layout from the public NSD data manual (unverified: not in brainenc's format notes). Volume spaces only.
    """
    check_option("space", space, VOLUME_SPACES)
    return Path(root) / "nsddata_timeseries" / "ppdata" / check_subject(subject) / space


def _run_name(kind: str, session: int, run: int, ext: str) -> str:
    for name, v in (("session", session), ("run", run)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            from brainenc.exceptions import ConfigError

            raise ConfigError(f"'{name}' must be a positive integer (1-based); {v!r} was provided")
    return f"{kind}_session{session:02d}_run{run:02d}.{ext}"


def timeseries_path(root: Path, subject: str, space: str, session: int, run: int) -> Path:
    """``.../<space>/timeseries/timeseries_sessionNN_runNN.nii.gz`` (4-D pre-processed run; 1-based numbers)."""
    return timeseries_dir(root, subject, space) / "timeseries" / _run_name("timeseries", session, run, "nii.gz")


def timeseries_design_path(root: Path, subject: str, space: str, session: int, run: int) -> Path:
    """``.../<space>/design/design_sessionNN_runNN.tsv`` (one row per volume)."""
    return timeseries_dir(root, subject, space) / "design" / _run_name("design", session, run, "tsv")


def timeseries_motion_path(root: Path, subject: str, space: str, session: int, run: int) -> Path:
    """``.../<space>/motion/motion_sessionNN_runNN.tsv`` (one row of motion parameters per volume)."""
    return timeseries_dir(root, subject, space) / "motion" / _run_name("motion", session, run, "tsv")


def list_timeseries_runs(root: Path, subject: str, space: str) -> list[tuple[int, int]]:
    """The (session, run) pairs with a time-series file on disk, sorted (found by globbing)."""
    import re

    folder = timeseries_dir(root, subject, space) / "timeseries"
    found = set()
    for p in folder.glob("timeseries_session*_run*.nii*"):
        m = re.match(_TIMESERIES_RUN_RE, p.name)
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
    return sorted(found)
