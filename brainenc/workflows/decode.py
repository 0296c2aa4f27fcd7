"""The ``decode`` task: Brain-IT multi-subject decoding (voxels -> image feature tokens).

Stage graph (one run over a group of subjects, ``runs/<pipeline>/<run name>``)::

    data -> features -> encoder [-> augment] -> clusters -> bit.semantic, bit.lowlevel, ridge -> evaluate
         -> transfer -> report

- ``data``: every subject of ``[data] subjects`` and the transfer subject exists (simulated first when
  ``simulate = true``: same design, each subject its own anatomy with ``[simulate] anatomy_jitter``) and
  is prepared (``[prepare]``); the transfer subject also with its first ``k`` sessions for every ``k``
  of ``transfer_sessions``.
- ``features``: frozen-backbone tokens of every image (shared feature cache): the encoder's layers,
  the semantic target layer and the low-level layers (tiled to one width, ``features/lowlevel.npy``).
- ``encoder``: the universal encoder on the training rows of all base subjects (models/encoder).
- ``augment`` (with ``[augment] n_images > 0``): synthetic fMRI, the paper's EXT set. ``n_images``
  extra images: rows of ``[augment] images`` (an HDF5 image brick, e.g. COCO images outside NSD, as
  the paper) or, by default, 73k images that no subject of the run saw (never the shared1000; rendered
  on a simulated root). Each is given to one base subject (balanced, seeded), whose responses the
  universal encoder predicts; their target tokens too (``augment/``).
- ``clusters``: the Gaussian mixture on its voxel embeddings (models/clusters).
- ``bit.semantic`` / ``bit.lowlevel``: one BIT per target (MSE / multi-scale InfoNCE), on the real
  training rows plus the synthetic ones when ``augment`` ran (validation on real rows only).
- ``ridge``: the reference decoder, one ridge per subject and target on the same rows.
- ``transfer``: the transfer subject from ``k`` sessions: encoder embeddings, nearest-voxel clusters,
  BIT embeddings (initialised from the nearest reference voxel), vs a ridge on the same ``k`` sessions.
- ``evaluate``: top-1 retrieval (both directions) and 2-way identification among the shared test images
  per subject, model and target (``evaluate/results.json``).
- ``report``: table, cluster maps (NIfTI / MGH per subject) and figure, transfer curve, index page.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from brainenc._utils.io import read_json, write_json
from brainenc._utils.logging import get_logger
from brainenc.config import from_dict, to_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.workflows.engine import Stage, StageContext
from brainenc.workflows.reconstruct import parse_prepare, parse_simulate

__all__ = ["DecodeData", "DecodeFeatures", "DecodeAugment", "DecodeTransfer", "DecodeEvaluate", "SECTIONS",
           "build_decode_graph", "TARGETS"]

log = get_logger("workflows")

TARGETS = ("semantic", "lowlevel")


# ----------------------------------------------------------------------------------------------
# spec tables
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodeData:
    """``[data]``: which subjects.

    Attributes
    ----------
    subjects : list of str
        Subjects trained together (the paper: all 8).
    transfer_subject : str or None
        Held out of every base model; the transfer experiment fits it from ``k`` sessions.
    transfer_sessions : list of int
        Session counts of the transfer curve (1 = NSD's "1 hour"); values above the subject's
        sessions are an error at the ``data`` stage.
    simulate : bool
        Simulate missing subjects (same design, each with its own anatomy).
    """

    subjects: list = dataclasses.field(default_factory=lambda: ["subj01", "subj02", "subj03", "subj04"])
    transfer_subject: Optional[str] = "subj05"
    transfer_sessions: list = dataclasses.field(default_factory=lambda: [1, 3])
    simulate: bool = True

    def check(self) -> None:
        from brainenc._utils.validation import check_subject
        from brainenc.datasets import layout

        if not self.subjects or len(set(self.subjects)) != len(self.subjects):
            raise ConfigError(f"'data.subjects' must list distinct subjects; {self.subjects!r} was provided")
        self.subjects = [check_subject(s) for s in self.subjects]
        for s in self.subjects + ([self.transfer_subject] if self.transfer_subject else []):
            if s not in layout.SUBJECTS:
                raise ConfigError(f"'data.subjects': {s!r} is not one of subj01..subj08")
        if self.transfer_subject is not None:
            self.transfer_subject = check_subject(self.transfer_subject)
            if self.transfer_subject in self.subjects:
                raise ConfigError(f"'data.transfer_subject' {self.transfer_subject} must not be in 'data.subjects'")
            if not self.transfer_sessions or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                                 for k in self.transfer_sessions):
                raise ConfigError(f"'data.transfer_sessions' must be positive integers; {self.transfer_sessions!r} "
                                  "was provided")
            self.transfer_sessions = sorted(set(self.transfer_sessions))


@dataclasses.dataclass
class DecodeFeatures:
    """``[features]``: the backbone layers (one frozen backbone; tokens from the shared cache).

    Attributes
    ----------
    backbone : str
        Any ``features`` backbone (the paper: DINOv2 ViT-L/14 for the encoder, OpenCLIP bigG for the
        semantic target; offline default EfficientNet-Lite0).
    encoder_layers : list of str
        Layers whose patch tokens the universal encoder attends over.
    semantic_layer : str
        Layer whose patch tokens are the semantic target.
    lowlevel_layers : list of str
        Layers whose patch tokens, tiled to ``lowlevel_dim`` channels, are the low-level target scales.
    lowlevel_dim : int or None
        Width of the low-level tokens (None = the largest layer width).
    weights, pretrained, image_size, options, batch_size, device, dtype : as ``FeatureSpec``.
    """

    backbone: str = "efficientnet-lite0"
    encoder_layers: list = dataclasses.field(default_factory=lambda: ["blocks.10", "blocks.15"])
    semantic_layer: str = "blocks.15"
    lowlevel_layers: list = dataclasses.field(default_factory=lambda: ["blocks.5", "blocks.10"])
    lowlevel_dim: Optional[int] = None
    weights: Optional[str] = None
    pretrained: Optional[str] = None
    image_size: Optional[int] = None
    options: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "float16"

    def check(self) -> None:
        for name in ("encoder_layers", "lowlevel_layers"):
            v = getattr(self, name)
            if not v or not all(isinstance(x, (str, int)) for x in v):
                raise ConfigError(f"'features.{name}' must be a non-empty list of layer names; {v!r} was provided")
        self.spec("x")  # validates backbone/dtype/... through FeatureSpec

    def spec(self, layer):
        from brainenc.features import FeatureSpec

        return from_dict(FeatureSpec, {"backbone": self.backbone, "layer": layer, "tokens": "patch", "pooled": "none",
                                       "dtype": self.dtype, "batch_size": self.batch_size, "device": self.device,
                                       "weights": self.weights, "pretrained": self.pretrained,
                                       "image_size": self.image_size, "options": dict(self.options)},
                         _prefix="features.")

    def layers(self) -> list:
        out = []
        for layer in list(self.encoder_layers) + [self.semantic_layer] + list(self.lowlevel_layers):
            if layer not in out:
                out.append(layer)
        return out


@dataclasses.dataclass
class DecodeAugment:
    """``[augment]``: synthetic-fMRI augmentation of the BIT training set (reference b.4, the EXT set).

    Attributes
    ----------
    n_images : int
        Unseen images to add (0 = off). Each is given to one base subject (balanced over subjects), the
        universal encoder predicts that subject's responses, and BIT trains on them with the real rows.
    seed : int
        Which unseen images, and which subject each goes to.
    images : str
        ``""`` (default): the NSD root's 73k images that no subject of the run saw, minus the shared1000.
        A run over all 8 NSD subjects leaves none (every 73k image is in some subject's design): give
        instead the path of an HDF5 file whose dataset ``imgBrick`` holds uint8 ``[n, H, W, 3]`` extra
        images (the paper uses COCO images outside NSD); ``n_images`` of its rows are drawn with ``seed``.
        The stage is keyed by the file's identity, so replacing the file re-runs it.
    """

    n_images: int = 0
    seed: int = 0
    images: str = ""

    def check(self) -> None:
        for name in ("n_images", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"'augment.{name}' must be an integer >= 0; {v!r} was provided")
        if not isinstance(self.images, str):
            raise ConfigError(f"'augment.images' must be a path string (\"\" = the NSD root's unseen images); "
                              f"{self.images!r} was provided")

    def image_file(self):
        """The external image brick (:class:`~brainenc.features.HDF5Images`), checked against ``n_images``;
        None for the NSD root's unseen images. A missing or malformed file is a one-line error."""
        if not self.images:
            return None
        from brainenc.features import HDF5Images

        path = Path(self.images).expanduser()
        if not path.is_file():
            raise DataFormatError(f"augment.images: {path} does not exist (an HDF5 file with an 'imgBrick' "
                                  "dataset of uint8 [n, H, W, 3] images)")
        brick = HDF5Images(path)
        if self.n_images > len(brick):
            raise DataFormatError(f"augment.images: {path} holds {len(brick)} images; n_images = "
                                  f"{self.n_images} were asked for")
        return brick


@dataclasses.dataclass
class DecodeTransfer:
    """``[transfer]``: training overrides for the new subject (only its voxel embeddings train).

    Attributes
    ----------
    encoder_train, bit_train : dict
        ``TrainConfig`` fields over the base models' tables (e.g. ``{epochs = 20}``).
    init_from_nearest : bool
        Start the new BIT embeddings from the nearest reference voxel's (reference b.7) instead of random.
    """

    encoder_train: dict = dataclasses.field(default_factory=dict)
    bit_train: dict = dataclasses.field(default_factory=dict)
    init_from_nearest: bool = True


@dataclasses.dataclass
class DecodeEvaluate:
    """``[evaluate]``: ``similarity`` of predicted and true tokens (``pearson`` | ``cosine``)."""

    similarity: str = "pearson"

    def check(self) -> None:
        from brainenc._utils.validation import check_option

        check_option("evaluate.similarity", self.similarity, ("pearson", "cosine"))


@dataclasses.dataclass
class DecodeReport:
    """``[report]``: figure resolution."""

    dpi: int = 110


def _estimator_table(cls_path: str, defaults: dict | None = None):
    def parse(table, prefix):
        import importlib

        mod, name = cls_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(mod), name)
        return cls.from_config({**(defaults or {}), **dict(table)}, prefix=prefix).to_config()
    return parse


SECTIONS = {
    "data": DecodeData, "prepare": parse_prepare, "simulate": parse_simulate, "features": DecodeFeatures,
    "encoder": _estimator_table("brainenc.decoding.brainit.UniversalBrainEncoder"),
    "clusters": _estimator_table("brainenc.decoding.brainit.FunctionalClusters"),
    "bit_semantic": _estimator_table("brainenc.decoding.brainit.BrainITDecoder", {"loss": "mse"}),
    "bit_lowlevel": _estimator_table("brainenc.decoding.brainit.BrainITDecoder", {"loss": "infonce"}),
    "ridge": _estimator_table("brainenc.decoding.ridge.RidgeDecoder"),
    "augment": DecodeAugment, "transfer": DecodeTransfer, "evaluate": DecodeEvaluate, "report": DecodeReport,
}


# ----------------------------------------------------------------------------------------------
# helpers shared by the stages
# ----------------------------------------------------------------------------------------------
class _Data:
    """Opened inputs of a run (prepared datasets and feature sets), built once per process."""

    def __init__(self, sec, run):
        self.sec, self.run, self._cache = sec, run, {}

    def multi(self, record: dict):
        from brainenc.datasets.multisubject import MultiSubjectDataset
        from brainenc.datasets.prepare import load_prepared

        key = ("multi", tuple(record["prepared"].values()))
        if key not in self._cache:
            subj = self.sec["data"].subjects
            self._cache[key] = MultiSubjectDataset([load_prepared(record["prepared"][s]) for s in subj])
        return self._cache[key]

    def prepared(self, path: str):
        from brainenc.datasets.prepare import load_prepared

        if path not in self._cache:
            self._cache[path] = load_prepared(path)
        return self._cache[path]

    def features(self, layer, image_ids, stimuli):
        import hashlib

        from brainenc.features import HDF5Images, extract_features

        ids = np.ascontiguousarray(np.asarray(image_ids, dtype=np.int64))
        key = ("features", str(layer), str(stimuli), hashlib.sha256(ids.tobytes()).hexdigest())
        if key not in self._cache:
            self._cache[key] = extract_features(HDF5Images(stimuli), ids, self.sec["features"].spec(layer),
                                                cache_dir=self.run.features_root)
        return self._cache[key]


def _rows_of(fs, ids):
    from brainenc.datasets.multisubject import feature_rows

    return feature_rows(fs.tokens, fs.image_ids, ids)


def _lowlevel(record: dict):
    arr = np.load(record["lowlevel"]["path"], mmap_mode="r", allow_pickle=False)
    ids = np.load(record["lowlevel"]["image_ids"], allow_pickle=False)
    return arr, ids


def _targets(data: _Data, frec: dict, target: str, ids):
    from brainenc.datasets.multisubject import feature_rows

    if target == "semantic":
        return _rows_of(data.features(data.sec["features"].semantic_layer, np.asarray(frec["image_ids_all"]),
                                      frec["stimuli"]), ids)
    arr, all_ids = _lowlevel(frec)
    return feature_rows(arr, all_ids, ids)


def _encoder_tokens(data: _Data, frec: dict, ids) -> list:
    all_ids = np.asarray(frec["image_ids_all"])
    return [_rows_of(data.features(layer, all_ids, frec["stimuli"]), ids) for layer in data.sec["features"].encoder_layers]


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def _stage_data(sec, run):
    def body(ctx: StageContext) -> dict:
        import dataclasses as dc

        from brainenc.datasets.prepare import prepare_subject
        from brainenc.datasets.simulate import simulate_subject
        from brainenc.workflows.encoding import _has_subject_data

        d: DecodeData = sec["data"]
        prep = sec["prepare"].config
        everyone = list(d.subjects) + ([d.transfer_subject] if d.transfer_subject else [])
        for s in everyone:  # serially: the simulator allows one writer per NSD root
            if not _has_subject_data(run.nsd_root, s, prep):
                if not d.simulate:
                    raise DataFormatError(f"{run.nsd_root}: no NSD data for {s}; point --nsd-root at the release or "
                                          "set [data] simulate = true")
                t0 = time.perf_counter()
                simulate_subject(run.nsd_root, dc.replace(sec["simulate"].config, subject=s))
                log.info("data: simulated %s in %.1f s", s, time.perf_counter() - t0)
        out: dict[str, Any] = {"prepared": {}, "transfer": {}, "files": []}
        for s in everyone:
            ds = prepare_subject(run.nsd_root, dc.replace(prep, subject=s).check(), cache_root=run.prepared_root)
            out["prepared"][s] = str(ds.path)
            out["files"].append(str(ds.path))
            log.info("data: %s: %d voxels, %s", s, ds.n_voxels, ds.split_counts())
        if d.transfer_subject:
            from brainenc.datasets import layout

            n_have = layout.n_sessions(run.nsd_root, d.transfer_subject)
            for k in d.transfer_sessions:
                if k > n_have:
                    raise ConfigError(f"'data.transfer_sessions': {d.transfer_subject} has {n_have} sessions; {k} "
                                      "was asked for")
                ds = prepare_subject(run.nsd_root, dc.replace(prep, subject=d.transfer_subject, n_sessions=k).check(),
                                     cache_root=run.prepared_root)
                out["transfer"][str(k)] = str(ds.path)
                out["files"].append(str(ds.path))
        return out
    return body


def _write_lowlevel(path: Path, low: list, dim: int) -> list[int]:
    """The low-level layers' tokens tiled to ``dim`` channels, streamed into float16 ``path``
    (``[n, sum T_l, dim]``, written under a temporary name); returns the tokens per scale."""
    from brainenc.decoding.brainit import concat_token_scales

    n, n_tok = len(low[0]), sum(int(t.shape[1]) for t in low)
    tmp = path.with_name(path.stem + ".partial.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, n_tok, dim))
    sizes = [int(t.shape[1]) for t in low]
    for a in range(0, n, 256):  # streamed: the tiled array is never in memory whole
        block, sizes = concat_token_scales([np.asarray(t[a:a + 256], np.float32) for t in low], dim)
        arr[a:a + 256] = block
    arr.flush()
    del arr
    tmp.replace(path)
    return sizes


def _stage_features(sec, run, data: _Data):
    def body(ctx: StageContext) -> dict:
        rec = ctx.inputs["data"]
        paths = list(rec["prepared"].values()) + list(rec["transfer"].values())
        dss = [data.prepared(p) for p in paths]
        stimuli = dss[0].stimuli_path
        if stimuli is None:
            raise DataFormatError(f"{dss[0].path}: the prepared dataset has no stimuli file; decoding needs the images")
        ids = np.unique(np.concatenate([np.asarray(ds.image_ids) for ds in dss])).astype(np.int64)
        f: DecodeFeatures = sec["features"]
        layers = {}
        for layer in f.layers():
            fs = data.features(layer, ids, str(stimuli))
            layers[str(layer)] = {"key": fs.key, "path": str(fs.path), "shape": list(fs.tokens.shape)}
        folder = ctx.run_dir / "features"
        folder.mkdir(parents=True, exist_ok=True)
        low = [data.features(layer, ids, str(stimuli)).tokens for layer in f.lowlevel_layers]
        dim = int(f.lowlevel_dim or max(int(t.shape[2]) for t in low))
        path = folder / "lowlevel.npy"
        sizes = _write_lowlevel(path, low, dim)
        np.save(folder / "image_ids.npy", ids)
        return {"stimuli": str(stimuli), "image_ids_all": ids.tolist(), "layers": layers,
                "lowlevel": {"path": str(path), "image_ids": str(folder / "image_ids.npy"), "group_sizes": sizes,
                             "dim": dim},
                "files": [str(path), str(folder / "image_ids.npy")]}
    return body


def _stage_encoder(sec, data: _Data):
    def body(ctx: StageContext) -> dict:
        from brainenc.decoding.brainit import UniversalBrainEncoder

        ms = data.multi(ctx.inputs["data"])
        frec = ctx.inputs["features"]
        table = ms.examples("train")
        est = UniversalBrainEncoder.from_config(sec["encoder"], prefix="encoder.")
        t0 = time.perf_counter()
        est.fit(_encoder_tokens(data, frec, table.image_id), ms.padded_responses(table), table.subject,
                voxel_counts=ms.n_voxels.tolist(), subjects=ms.subjects, run_dir=ctx.checkpoint_dir("encoder"),
                resume=True)
        test_r = {}
        for s in ms.subjects:
            rows = ms.test_rows(s)
            ids = np.asarray(ms.datasets[ms.subject_index(s)].image_ids)[rows]
            r = est.score(_encoder_tokens(data, frec, ids), np.asarray(ms.responses(s)[rows]), s)
            test_r[s] = float(np.nanmean(r))
        folder = ctx.run_dir / "models" / "encoder"
        est.save_pretrained(folder)
        log.info("encoder: %d examples, %.1f s, test r %s", len(table), time.perf_counter() - t0,
                 {k: round(v, 3) for k, v in test_r.items()})
        return {"model": str(folder), "test_r": test_r, "best_epoch": est.best_epoch_, "files": [str(folder)]}
    return body


def _augment_source(root: Path, a: "DecodeAugment", seen, folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """(stimuli file, its rows, image ids) of the ``a.n_images`` augmentation images.

    With ``a.images`` the rows are drawn (seeded, ascending, no repeats) from that file, used in place,
    and the ids are those rows. Otherwise the ids are 73k ids of ``root`` outside ``seen`` and the
    shared1000 (:func:`~brainenc.datasets.unseen.unseen_image_ids`) and the file comes from
    :func:`_augment_stimuli`.
    """
    brick = a.image_file()
    if brick is not None:
        rows = np.sort(np.random.default_rng([int(a.seed), 0xE72]).choice(len(brick), size=int(a.n_images),
                                                                          replace=False)).astype(np.int64)
        return brick.path.resolve(), rows, rows
    from brainenc.datasets.unseen import unseen_image_ids

    ids = unseen_image_ids(root, seen, a.n_images, a.seed)
    stim, rows = _augment_stimuli(root, ids, folder)
    return stim, rows, ids


def _augment_stimuli(root: Path, ids: np.ndarray, folder: Path) -> tuple[Path, np.ndarray]:
    """(stimuli file, its rows) holding the unseen images ``ids`` of ``root``.

    A real NSD root's ``nsd_stimuli.hdf5`` already has every 73k image (row = 0-based id): it is used
    in place. A simulated root renders the images once into ``folder/stimuli.hdf5`` (row = position
    in ``ids``), written atomically.
    """
    import h5py

    from brainenc._utils.io import atomic_path
    from brainenc._utils.logging import progress
    from brainenc.datasets import layout
    from brainenc.datasets.unseen import read_images

    ids = np.asarray(ids, dtype=np.int64)
    if layout.simulation_manifest(root) is None:
        path = layout.stimuli_path(root)
        if not path.is_file():
            raise DataFormatError(f"{path}: missing; augmentation images come from the NSD stimuli file")
        return path, ids
    stim, n = folder / "stimuli.hdf5", len(ids)
    first = read_images(root, ids[:1])
    with atomic_path(stim) as tmp:
        with h5py.File(tmp, "w") as h:
            dset = h.create_dataset("imgBrick", shape=(n,) + first.shape[1:], dtype=np.uint8,
                                    chunks=(1,) + first.shape[1:], compression="gzip", compression_opts=1)
            for b in progress(range(0, n, 32), desc="augment: rendering unseen images", total=-(-n // 32),
                              unit="block"):
                dset[b:b + 32] = read_images(root, ids[b:b + 32])
    return stim, np.arange(n, dtype=np.int64)


def _stage_augment(sec, run, data: _Data):
    def body(ctx: StageContext) -> dict:
        from brainenc.decoding.brainit import UniversalBrainEncoder
        from brainenc.training.data import RowSubset

        a: DecodeAugment = sec["augment"]
        f: DecodeFeatures = sec["features"]
        frec = ctx.inputs["features"]
        ms = data.multi(ctx.inputs["data"])
        t0 = time.perf_counter()
        folder = ctx.run_dir / "augment"
        folder.mkdir(parents=True, exist_ok=True)
        stim, local, ids = _augment_source(run.nsd_root, a, frec["image_ids_all"], folder)
        n = len(ids)
        np.save(folder / "image_ids.npy", ids)
        np.save(folder / "feature_ids.npy", local)
        enc = UniversalBrainEncoder.from_pretrained(ctx.inputs["encoder"]["model"])
        tokens = [_rows_of(data.features(layer, local, str(stim)), local) for layer in f.encoder_layers]
        S = len(ms.subjects)
        subject = np.random.default_rng([a.seed, 0x5B]).permutation(np.arange(n) % S).astype(np.int64)
        width = int(ms.n_voxels.max())
        resp_path = folder / "responses.npy"
        tmp = folder / "responses.partial.npy"
        resp = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, width))
        for s in range(S):  # zero-padded like PaddedResponses: subject s in its first V_s columns
            rows = np.nonzero(subject == s)[0]
            V = int(ms.n_voxels[s])
            for b in range(0, rows.size, 256):
                r = rows[b:b + 256]
                resp[r, :V] = enc.predict([RowSubset(t, r) for t in tokens], s)
        resp.flush()
        del resp
        tmp.replace(resp_path)
        np.save(folder / "subject.npy", subject)
        data.features(f.semantic_layer, local, str(stim))  # cached for the bit stages
        low = [data.features(layer, local, str(stim)).tokens for layer in f.lowlevel_layers]
        low_path = folder / "lowlevel.npy"
        sizes = _write_lowlevel(low_path, low, int(frec["lowlevel"]["dim"]))
        if sizes != list(frec["lowlevel"]["group_sizes"]):
            raise DataFormatError(f"{low_path}: low-level scales {sizes} differ from the real images' "
                                  f"{frec['lowlevel']['group_sizes']} (image sizes differ?)")
        per = np.bincount(subject, minlength=S).tolist()
        log.info("augment: %d %s (%s per subject) in %.1f s", n, f"images of {stim}" if a.images else "unseen images",
                 per, time.perf_counter() - t0)
        files = [str(resp_path), str(low_path), str(folder / "subject.npy"), str(folder / "image_ids.npy"),
                 str(folder / "feature_ids.npy")] + ([str(stim)] if stim.parent == folder else [])
        return {"stimuli": str(stim), "source": "file" if a.images else "nsd_unseen",
                "feature_ids": str(folder / "feature_ids.npy"), "n_images": n,
                "image_ids": str(folder / "image_ids.npy"),
                "subject": str(folder / "subject.npy"), "responses": str(resp_path), "per_subject": per,
                "lowlevel": str(low_path), "files": files}
    return body


def _augment_set(data: _Data, arec: dict, target: str) -> tuple:
    """(responses [m, V_max], subject [m], targets [m, M, D]) of the synthetic examples (lazy)."""
    y = np.load(arec["responses"], mmap_mode="r", allow_pickle=False)
    subject = np.load(arec["subject"], allow_pickle=False)
    local = np.load(arec["feature_ids"], allow_pickle=False)
    if target == "semantic":
        tgt = _rows_of(data.features(data.sec["features"].semantic_layer, local, arec["stimuli"]), local)
    else:
        tgt = np.load(arec["lowlevel"], mmap_mode="r", allow_pickle=False)
    return y, subject, tgt


def _stage_clusters(sec, data: _Data):
    def body(ctx: StageContext) -> dict:
        from brainenc.decoding.brainit import FunctionalClusters, UniversalBrainEncoder

        enc = UniversalBrainEncoder.from_pretrained(ctx.inputs["encoder"]["model"])
        emb = [enc.voxel_embeddings(s) for s in enc.subjects_]
        cl = FunctionalClusters.from_config(sec["clusters"], prefix="clusters.").fit(emb, enc.subjects_)
        folder = ctx.run_dir / "models" / "clusters"
        cl.save_pretrained(folder)
        sizes = cl.sizes()
        shared = int((sizes > 0).all(axis=0).sum())
        log.info("clusters: %d clusters, %d with voxels of every subject", cl.n_clusters, shared)
        return {"model": str(folder), "n_clusters": int(cl.n_clusters), "shared_by_all": shared,
                "sizes": sizes.tolist(), "files": [str(folder)]}
    return body


def _stage_bit(sec, data: _Data, target: str):
    def body(ctx: StageContext) -> dict:
        from brainenc.decoding.brainit import BrainITDecoder, FunctionalClusters

        ms = data.multi(ctx.inputs["data"])
        frec = ctx.inputs["features"]
        cl = FunctionalClusters.from_pretrained(ctx.inputs["clusters"]["model"])
        table = ms.examples("train")
        est = BrainITDecoder.from_config(sec[f"bit_{target}"], prefix=f"bit_{target}.")
        sizes = frec["lowlevel"]["group_sizes"] if target == "lowlevel" else None
        augment = _augment_set(data, ctx.inputs["augment"], target) if "augment" in ctx.inputs else None
        t0 = time.perf_counter()
        est.fit(ms.padded_responses(table), table.subject, _targets(data, frec, target, table.image_id),
                voxel_counts=ms.n_voxels.tolist(), clusters=cl.cluster_table(), n_clusters=cl.n_clusters,
                group_sizes=sizes, subjects=ms.subjects, augment=augment, run_dir=ctx.checkpoint_dir(f"bit_{target}"), resume=True)
        folder = ctx.run_dir / "models" / f"bit_{target}"
        est.save_pretrained(folder)
        log.info("bit.%s: %d examples + %d synthetic, %.1f s (best epoch %d)", target, len(table), est.n_augmented_,
                 time.perf_counter() - t0, est.best_epoch_)
        return {"model": str(folder), "best_epoch": est.best_epoch_, "n_augmented": est.n_augmented_,
                "files": [str(folder)]}
    return body


def _ridge_fit_predict(sec, X_train, T_train, X_test) -> np.ndarray:
    from brainenc.decoding.ridge import RidgeDecoder

    T = np.asarray(T_train, np.float32)
    dec = RidgeDecoder.from_config(sec["ridge"], prefix="ridge.").fit(np.asarray(X_train, np.float32),
                                                                     T.reshape(len(T), -1))
    return dec.predict_flat(np.asarray(X_test, np.float32)).reshape((len(X_test),) + T.shape[1:])


def _stage_ridge(sec, data: _Data):
    def body(ctx: StageContext) -> dict:
        ms = data.multi(ctx.inputs["data"])
        frec = ctx.inputs["features"]
        folder = ctx.run_dir / "predictions" / "ridge"
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for s in ms.subjects:
            ds = ms.datasets[ms.subject_index(s)]
            tr, te = np.sort(ds.splits["train"]), ms.test_rows(s)
            ids = np.asarray(ds.image_ids)
            out[s] = {}
            for target in TARGETS:
                pred = _ridge_fit_predict(sec, ds.responses[tr], _targets(data, frec, target, ids[tr]),
                                          ds.responses[te])
                p = folder / f"{s}_{target}.npy"
                np.save(p, pred.astype(np.float16))
                out[s][target] = str(p)
            log.info("ridge: %s done", s)
        return {"predictions": out, "files": [str(folder)]}
    return body


def _retrieval(pred, true, kind) -> dict:
    from brainenc.metrics.retrieval import feature_retrieval

    return feature_retrieval(np.asarray(pred, np.float32), np.asarray(true, np.float32), kind=kind)


def _stage_transfer(sec, data: _Data):
    def body(ctx: StageContext) -> dict:
        from brainenc.decoding.brainit import BrainITDecoder, FunctionalClusters, UniversalBrainEncoder

        d: DecodeData = sec["data"]
        tr_cfg: DecodeTransfer = sec["transfer"]
        kind = sec["evaluate"].similarity
        rec, frec = ctx.inputs["data"], ctx.inputs["features"]
        ms = data.multi(rec)
        enc = UniversalBrainEncoder.from_pretrained(ctx.inputs["encoder"]["model"])
        cl = FunctionalClusters.from_pretrained(ctx.inputs["clusters"]["model"])
        bit = BrainITDecoder.from_pretrained(ctx.inputs["bit.semantic"]["model"])
        full = data.prepared(rec["prepared"][d.transfer_subject])
        test_ids = ms.shared_test_ids
        te_ids_full = np.asarray(full.image_ids)[np.asarray(full.splits["test"])]
        test_ids = test_ids[np.isin(test_ids, te_ids_full)]
        te_rows = _rows_for_ids(full, test_ids)
        Y_test = np.asarray(full.responses[te_rows], np.float32)
        true = np.asarray(_targets(data, frec, "semantic", test_ids), np.float32)
        curve: dict[str, dict] = {"bit": {"sessions": [], "two_way": [], "top1_brain_to_image": []},
                                  "ridge": {"sessions": [], "two_way": [], "top1_brain_to_image": []}}
        details = {}
        for k in d.transfer_sessions:
            ds = data.prepared(rec["transfer"][str(k)])
            tr = np.sort(np.asarray(ds.splits["train"]))
            ids = np.asarray(ds.image_ids)[tr]
            Y = ds.responses[tr]
            t0 = time.perf_counter()
            enc_k = enc.fit_new_subject(_encoder_tokens(data, frec, ids), Y, name=d.transfer_subject,
                                        train=tr_cfg.encoder_train or None,
                                        run_dir=ctx.checkpoint_dir(f"transfer{k}_encoder"), resume=True)
            labels, nearest = cl.assign(enc_k.voxel_embeddings(d.transfer_subject))
            bit_k = bit.fit_new_subject(Y, _targets(data, frec, "semantic", ids), name=d.transfer_subject,
                                        clusters=labels, init_from=nearest if tr_cfg.init_from_nearest else None,
                                        train=tr_cfg.bit_train or None,
                                        run_dir=ctx.checkpoint_dir(f"transfer{k}_bit"), resume=True)
            r_bit = _retrieval(bit_k.predict(Y_test, d.transfer_subject), true, kind)
            r_ridge = _retrieval(_ridge_fit_predict(sec, Y, _targets(data, frec, "semantic", ids), Y_test), true, kind)
            for name, r in (("bit", r_bit), ("ridge", r_ridge)):
                curve[name]["sessions"].append(int(k))
                curve[name]["two_way"].append(float(r["two_way"]))
                curve[name]["top1_brain_to_image"].append(float(r["top1_brain_to_image"]))
            details[str(k)] = {"n_train": int(len(tr)), "bit": r_bit, "ridge": r_ridge,
                               "seconds": time.perf_counter() - t0,
                               "cluster_counts": np.bincount(labels, minlength=cl.n_clusters).tolist()}
            log.info("transfer: %s, %d session(s), %d images: two-way BIT %.3f, ridge %.3f", d.transfer_subject, k,
                     len(tr), r_bit["two_way"], r_ridge["two_way"])
            if k == max(d.transfer_sessions):
                np.save(ctx.run_dir / "transfer_clusters.npy", labels)
        path = ctx.run_dir / "evaluate" / "transfer.json"
        write_json(path, {"subject": d.transfer_subject, "metric": "two_way", "chance": 0.5, "curve": curve,
                          "details": details, "n_test": int(len(test_ids)), "target": "semantic"})
        return {"transfer": str(path), "clusters": str(ctx.run_dir / "transfer_clusters.npy"),
                "files": [str(path), str(ctx.run_dir / "transfer_clusters.npy")]}
    return body


def _rows_for_ids(ds, ids) -> np.ndarray:
    """Rows of ``ds``'s test split showing ``ids`` (one row per image: averaged repeats)."""
    rows = np.asarray(ds.splits["test"])
    have = np.asarray(ds.image_ids)[rows]
    order = np.argsort(have)
    pos = np.searchsorted(have[order], ids)
    if np.any(pos >= len(have)) or np.any(have[order][np.minimum(pos, len(have) - 1)] != ids):
        raise DataFormatError(f"{ds.path}: some shared test images have no test row")
    return rows[order][pos]


def _stage_evaluate(sec, data: _Data):
    def body(ctx: StageContext) -> dict:
        from brainenc.decoding.brainit import BrainITDecoder

        kind = sec["evaluate"].similarity
        ms = data.multi(ctx.inputs["data"])
        frec = ctx.inputs["features"]
        bits = {t: BrainITDecoder.from_pretrained(ctx.inputs[f"bit.{t}"]["model"]) for t in TARGETS}
        ridge = ctx.inputs["ridge"]["predictions"]
        results: dict[str, dict] = {}
        for s in ms.subjects:
            rows = ms.test_rows(s)
            ids = np.asarray(ms.datasets[ms.subject_index(s)].image_ids)[rows]
            Y = np.asarray(ms.responses(s)[rows], np.float32)
            results[s] = {"bit": {}, "ridge": {}}
            for t in TARGETS:
                true = np.asarray(_targets(data, frec, t, ids), np.float32)
                results[s]["bit"][t] = _retrieval(bits[t].predict(Y, s), true, kind)
                results[s]["ridge"][t] = _retrieval(np.load(ridge[s][t], allow_pickle=False), true, kind)
            log.info("evaluate: %s two-way semantic BIT %.3f ridge %.3f; lowlevel BIT %.3f ridge %.3f", s,
                     results[s]["bit"]["semantic"]["two_way"], results[s]["ridge"]["semantic"]["two_way"],
                     results[s]["bit"]["lowlevel"]["two_way"], results[s]["ridge"]["lowlevel"]["two_way"])
        summary = {m: {t: {k: float(np.mean([results[s][m][t][k] for s in ms.subjects]))
                           for k in ("top1_brain_to_image", "top1_image_to_brain", "two_way")}
                       for t in TARGETS} for m in ("bit", "ridge")}
        path = ctx.run_dir / "evaluate" / "results.json"
        write_json(path, {"results": results, "summary": summary, "similarity": kind,
                          "n_test": int(len(ms.shared_test_ids))})
        return {"results": str(path), "summary": summary, "files": [str(path)]}
    return body


def _stage_report(sec, run, data: _Data, title: str):
    def body(ctx: StageContext) -> dict:
        from brainenc.decoding.brainit import FunctionalClusters
        from brainenc.report.brainit import DecodeReportInputs, build_decode_report

        d: DecodeData = sec["data"]
        res = read_json(ctx.inputs["evaluate"]["results"])
        rec = ctx.inputs["data"]
        cl = FunctionalClusters.from_pretrained(ctx.inputs["clusters"]["model"])
        labels = {s: cl.labels(s) for s in cl.subjects_}
        geometry = {s: data.prepared(rec["prepared"][s]).geometry for s in cl.subjects_}
        transfer = None
        if "transfer" in ctx.inputs:
            transfer = read_json(ctx.inputs["transfer"]["transfer"])
            labels[d.transfer_subject] = np.load(ctx.inputs["transfer"]["clusters"], allow_pickle=False)
            geometry[d.transfer_subject] = data.prepared(rec["prepared"][d.transfer_subject]).geometry
        n = res["n_test"]
        notes = [f"Feature-space retrieval among the {n} shared test images ({res['similarity']} similarity of predicted "
                 f"and true tokens): chance top-1 = 1/{n} = {1 / n:.3f}, chance two-way = 0.5.",
                 f"Clusters: {cl.n_clusters} Gaussian-mixture components on the universal encoder's voxel embeddings, "
                 f"{ctx.inputs['clusters']['shared_by_all']} of them hold voxels of every subject."]
        files = build_decode_report(ctx.run_dir / "report", DecodeReportInputs(
            results=res["results"], cluster_labels=labels, geometry=geometry, n_clusters=cl.n_clusters,
            transfer=transfer, notes=notes, title=title), dpi=sec["report"].dpi)
        return {"report": str(files["index_md"]), "files": [str(f) for f in files["files"]]}
    return body


def build_decode_graph(spec, run) -> list[Stage]:
    """The decode task's stages for ``spec`` (its ``sections``) and ``run`` (one group run)."""
    sec = spec.sections
    d: DecodeData = sec["data"]
    data = _Data(sec, run)
    data_cfg = {"data": to_dict(d), "prepare": sec["prepare"].config.key_dict() if hasattr(sec["prepare"].config, "key_dict")
                else to_dict(sec["prepare"].config), "simulate": sec["simulate"].to_dict()}
    stages = [
        Stage("data", _stage_data(sec, run), data_cfg),
        Stage("features", _stage_features(sec, run, data), to_dict(sec["features"]), deps=["data"]),
        Stage("encoder", _stage_encoder(sec, data), sec["encoder"], deps=["data", "features"]),
        Stage("clusters", _stage_clusters(sec, data), sec["clusters"], deps=["encoder"]),
    ]
    bit_deps = ["data", "features", "clusters"]
    if sec["augment"].n_images > 0:
        brick = sec["augment"].image_file()  # a missing or too small image file stops the run here, before any work
        aug_cfg = {k: v for k, v in to_dict(sec["augment"]).items() if k != "images"}  # "" keeps older run keys
        if brick is not None:
            aug_cfg.update(images=str(brick.path.resolve()), images_identity=brick.identity())
        stages.append(Stage("augment", _stage_augment(sec, run, data), aug_cfg,
                            deps=["data", "features", "encoder"]))
        bit_deps.append("augment")
    stages += [
        Stage("bit.semantic", _stage_bit(sec, data, "semantic"), sec["bit_semantic"], deps=bit_deps),
        Stage("bit.lowlevel", _stage_bit(sec, data, "lowlevel"), sec["bit_lowlevel"], deps=bit_deps),
        Stage("ridge", _stage_ridge(sec, data), sec["ridge"], deps=["data", "features"]),
        Stage("evaluate", _stage_evaluate(sec, data), to_dict(sec["evaluate"]),
              deps=["data", "features", "bit.semantic", "bit.lowlevel", "ridge"]),
    ]
    report_deps = ["data", "clusters", "evaluate"]
    if d.transfer_subject:
        stages.append(Stage("transfer", _stage_transfer(sec, data),
                            {"transfer": to_dict(sec["transfer"]), "evaluate": to_dict(sec["evaluate"]),
                             "ridge": sec["ridge"]},
                            deps=["data", "features", "encoder", "clusters", "bit.semantic"]))
        report_deps.append("transfer")
    stages.append(Stage("report", _stage_report(sec, run, data, spec.pipeline.name), to_dict(sec["report"]),
                        deps=report_deps))
    return stages
