"""Brain-IT estimators (reference_systems.md §b): universal voxel encoder, functional clusters, the
Brain Interaction Transformer decoder, and one-session transfer to a new subject.

Three estimators, each with the package's contract (sklearn parameters, ``save_pretrained`` /
``from_pretrained``, ``brainenc.load``):

- :class:`UniversalBrainEncoder` (``"brainit_encoder"``): one encoder for all subjects (b.1); its
  learned per-voxel embeddings ``e_v`` are what the clusters are built from.
- :class:`FunctionalClusters` (``"brainit_clusters"``): ``sklearn.mixture.GaussianMixture`` on the
  L2-normalised embeddings of every subject's voxels at once (b.2); a new subject's voxels take the
  cluster of their nearest reference voxel.
- :class:`BrainITDecoder` (``"brainit"``): voxels -> image feature tokens (b.3), one decoder per
  target (semantic tokens with MSE, low-level multi-scale tokens with multi-scale InfoNCE).

Both networks are trained by :class:`~brainenc.training.Trainer` with the objectives of this module
(:class:`VoxelSubsetRegression`, :class:`TokenDecoding`), so checkpoints, bitwise resume, AMP and DDP
come from the trainer. Training data are *lazy*: per-example responses come from
:class:`~brainenc.datasets.PaddedResponses` (memmap rows, zero-padded to the largest
subject) and features from the feature cache by image id; nothing is loaded whole.

Transfer (b.7): :meth:`UniversalBrainEncoder.fit_new_subject` and :meth:`BrainITDecoder.fit_new_subject`
return a *copy* with one more subject whose voxel embeddings are the only trained parameters (every
other parameter bitwise unchanged); the decoder's new embeddings start from the nearest reference
voxel's (the code's better-than-random initialisation).

Deviations from the paper, on purpose: decoder targets are standardised per channel with the
training statistics (and predictions mapped back), which makes the unnormalised InfoNCE logits of
``logit_scale = 1`` well scaled for any backbone; the selection metric of both decoders is the mean
per-image Pearson correlation of predicted and true (standardised) tokens on the validation rows.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator

from brainenc._utils.tensors import load_module_state
from brainenc._utils.validation import check_option
from brainenc.config import nested_config, to_dict
from brainenc.estimator import EstimatorMixin, register_estimator, to_json_value
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["UniversalBrainEncoder", "FunctionalClusters", "BrainITDecoder", "VoxelSubsetRegression",
           "TokenDecoding", "maps_to_tokens", "concat_token_scales", "sample_voxels"]

_NESTED = ("model", "train")

#: training defaults over TrainConfig's (reference b.5): encoder Adam(amsgrad) 1e-3 batch 32; BIT AdamW 5e-4
ENCODER_TRAIN = {"optimizer": "adam", "amsgrad": True, "lr": 1e-3, "batch_size": 32, "epochs": 30,
                 "weight_decay": 0.0, "schedule": "constant", "grad_clip": 1.0}
DECODER_TRAIN = {"optimizer": "adamw", "lr": 5e-4, "batch_size": 64, "epochs": 75, "weight_decay": 1e-2,
                 "schedule": "warmup_cosine", "warmup_epochs": 15, "grad_clip": 1.0}


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------
def sample_voxels(index, subject, counts, k: int, seed: int, epoch: int, stream: int = 0) -> np.ndarray:
    """Voxel ids drawn with replacement per example, a function of ``(seed, stream, epoch, index)`` only.

    Parameters
    ----------
    index, subject : int arrays [b]
        Dataset rows and subject indices of the examples.
    counts : int sequence [S]
        Voxels per subject.
    k : int
        Voxels per example (the paper: 5000 for the encoder, 15 000 for BIT).

    Returns
    -------
    int64 ndarray [b, k] of local voxel ids (``0 <= id < counts[subject]``).
    """
    index = np.asarray(index, dtype=np.int64)
    subject = np.asarray(subject, dtype=np.int64)
    out = np.empty((index.size, int(k)), dtype=np.int64)
    for i, (row, s) in enumerate(zip(index.tolist(), subject.tolist())):
        rng = np.random.default_rng([int(seed), int(stream), int(epoch), int(row)])
        out[i] = rng.integers(0, int(counts[s]), int(k))
    return out


def concat_token_scales(tokens: Sequence[np.ndarray], dim: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Several token arrays ``[n, T_l, C_l]`` -> one ``[n, sum T_l, dim]`` (the multi-scale target layout, b.4).

    Channels are tiled (duplicated, as Brain-IT duplicates 256-d VGG tokens to 512) and truncated
    to ``dim`` (default: the largest ``C_l``).

    Returns
    -------
    tokens : float32 ndarray [n, sum_l T_l, dim]
    group_sizes : list of int
        Tokens per scale, in order (the groups of the multi-scale InfoNCE).
    """
    if not tokens:
        raise DataFormatError("concat_token_scales needs at least one token array [n, T, C]")
    dim = int(dim or max(int(np.shape(t)[2]) for t in tokens))
    parts, sizes = [], []
    for t in tokens:
        t = np.asarray(t, dtype=np.float32)
        if t.ndim != 3 or len(t) != len(tokens[0]):
            raise DataFormatError(f"token arrays must be [n, T, C] with one n; got shape {t.shape}")
        reps = -(-dim // t.shape[2])
        parts.append(np.tile(t, (1, 1, reps))[..., :dim])
        sizes.append(int(t.shape[1]))
    return np.ascontiguousarray(np.concatenate(parts, axis=1)), sizes


def maps_to_tokens(maps: Sequence[np.ndarray], dim: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Multi-scale CNN maps ``[n, C_l, H_l, W_l]`` -> tokens ``[n, sum H_l W_l, dim]`` (see :func:`concat_token_scales`)."""
    toks = []
    for m in maps:
        m = np.asarray(m, dtype=np.float32)
        if m.ndim != 4:
            raise DataFormatError(f"maps must be [n, C, H, W]; got shape {m.shape}")
        toks.append(m.reshape(m.shape[0], m.shape[1], -1).transpose(0, 2, 1))
    return concat_token_scales(toks, dim)


def _check_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"'{name}' must be an integer >= {lo}; {value!r} was provided")
    return int(value)


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"'{name}' must be a number in [0, 1); {value!r} was provided")
    return float(value)


def _split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    n_val = int(round(fraction * n))
    if n_val < 2:
        return np.arange(n), None
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _subset(arrays: Mapping[str, Any], index) -> dict:
    """Rows ``index`` of every array: 1-D arrays copied, the rest lazy (:class:`~brainenc.training.data.RowSubset`)."""
    from brainenc.training.data import RowSubset

    return {k: (np.asarray(v)[index] if isinstance(v, np.ndarray) and v.ndim == 1 else RowSubset(v, index))
            for k, v in arrays.items()}


def _subject_names(subjects, counts) -> list[str]:
    names = list(subjects) if subjects is not None else [f"s{i}" for i in range(len(counts))]
    if len(names) != len(counts):
        raise DataFormatError(f"'subjects' names {len(names)} subjects for {len(counts)} voxel counts")
    if len(set(names)) != len(names):
        raise DataFormatError(f"'subjects' must be distinct; got {names}")
    return [str(n) for n in names]


def _counts_check(voxel_counts, n_subjects_needed: int | None = None) -> list[int]:
    counts = [int(c) for c in np.asarray(voxel_counts).ravel()]
    if not counts or min(counts) < 1:
        raise DataFormatError(f"'voxel_counts' must list >= 1 voxels per subject; got {counts}")
    return counts


def _check_subject_rows(subject, counts, n) -> np.ndarray:
    subject = np.asarray(subject, dtype=np.int64).ravel()
    if subject.size != n:
        raise DataFormatError(f"'subject' has {subject.size} entries for {n} examples")
    if subject.size and (subject.min() < 0 or subject.max() >= len(counts)):
        raise DataFormatError(f"'subject' indices must be in 0..{len(counts) - 1}; got {subject.min()}..{subject.max()}")
    return subject


def _pearson_rows(a, b):
    """Per-row Pearson r of two [n, ...] tensors (flattened), float32."""
    a = a.reshape(a.shape[0], -1).float()
    b = b.reshape(b.shape[0], -1).float()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


# ------------------------------------------------------------------------------------------------
# objectives
# ------------------------------------------------------------------------------------------------
def _objectives():
    """Objective classes (defined on first use: torch is imported lazily by this module)."""
    global VoxelSubsetRegression, TokenDecoding
    if not isinstance(VoxelSubsetRegression, type):
        VoxelSubsetRegression, TokenDecoding = _define_objectives()
    return VoxelSubsetRegression, TokenDecoding


VoxelSubsetRegression = None  # defined by _objectives()
TokenDecoding = None


def _define_objectives():
    import torch
    import torch.nn.functional as F

    from brainenc.training.losses import multiscale_infonce
    from brainenc.training.objectives import LossSum, Objective, Validation

    class _VoxelSubsetRegression(Objective):
        """Universal-encoder loss (b.1): ``MSE(y_hat, y) - cos_weight * cos(y_hat, y)`` on ``k`` voxels drawn
        per example (cosine across the drawn voxels); validation: per-voxel Pearson r over all voxels.

        Data keys: ``x0 .. x{L-1}`` (tokens per layer [n, P_l, D_l]), ``y`` (responses [n, V_max],
        zero-padded), ``subject`` (int [n]).
        """

        metric, mode = "val_r", "max"

        def __init__(self, n_layers: int, counts: Sequence[int], k: int, cos_weight: float = 0.1, seed: int = 0):
            self.n_layers, self.counts, self.k = int(n_layers), [int(c) for c in counts], int(k)
            self.cos_weight, self.seed, self.epoch = float(cos_weight), int(seed), 0
            self.keys = tuple(f"x{i}" for i in range(self.n_layers)) + ("y", "subject")

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def loss(self, model, batch) -> LossSum:
            subj = batch["subject"]
            vox = torch.from_numpy(sample_voxels(batch["index"].cpu().numpy(), subj.cpu().numpy(), self.counts,
                                                 self.k, self.seed, self.epoch)).to(subj.device)
            pred = model([batch[f"x{i}"] for i in range(self.n_layers)], subj, vox).float()
            y = batch["y"].float().gather(1, vox)
            per = ((pred - y) ** 2).mean(1) - self.cos_weight * F.cosine_similarity(pred, y, dim=1, eps=1e-8)
            return LossSum(per.sum(), int(pred.shape[0]), per_sample=1)

        def validate(self, model, batches) -> Validation:
            sums = [None] * len(self.counts)
            for batch in batches:
                subj = batch["subject"]
                for s in torch.unique(subj).tolist():
                    m = subj == s
                    V = self.counts[s]
                    vox = torch.arange(V, device=subj.device).expand(int(m.sum()), V)
                    pred = model([batch[f"x{i}"][m] for i in range(self.n_layers)], subj[m], vox).double()
                    y = batch["y"][m][:, :V].double()
                    acc = torch.stack([pred.sum(0), y.sum(0), (pred * pred).sum(0), (y * y).sum(0),
                                       (pred * y).sum(0), torch.full_like(pred[0], pred.shape[0])])
                    sums[s] = acc if sums[s] is None else sums[s] + acc
            rs = []
            for s, acc in enumerate(sums):
                if acc is None:
                    rs.append(np.full(self.counts[s], np.nan, dtype=np.float32))
                    continue
                sx, sy, sxx, syy, sxy, n = acc
                cov = sxy - sx * sy / n
                r = cov / torch.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n)).clamp_min(1e-12)
                rs.append(r.cpu().numpy().astype(np.float32))
            scores = np.concatenate(rs)
            return Validation({"val_r": float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")},
                              scores)

    class _TokenDecoding(Objective):
        """BIT loss (b.5): ``k`` voxels drawn per example (values ``beta``, their clusters), predicted
        tokens vs the (standardised) target tokens: ``"mse"`` over all tokens, or ``"infonce"``, the
        multi-scale InfoNCE of ``group_samples[g]`` tokens per image drawn from scale ``g`` (batch tokens
        flattened, symmetric, unnormalised logits times ``logit_scale``).

        Data keys: ``y`` (responses [n, V_max]), ``subject`` (int [n]), ``target`` (tokens [n, M, D]).
        Validation: mean per-image Pearson r of predicted vs standardised true tokens, all voxels.

        Under DDP the InfoNCE negatives are the tokens of this rank's shard (the loss of a shard is
        returned per sample, ``per_sample=1``), like per-GPU contrastive losses without a gather.
        """

        metric, mode = "val_corr", "max"
        keys = ("y", "subject", "target")

        def __init__(self, counts, clusters, *, k: int, loss: str, group_sizes, group_samples, logit_scale: float,
                     mean, std, seed: int = 0):
            self.counts = [int(c) for c in counts]
            self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
            self.clusters = torch.as_tensor(np.asarray(clusters, dtype=np.int64))
            self.k, self.loss_kind, self.seed, self.epoch = int(k), loss, int(seed), 0
            self.group_sizes = [int(g) for g in group_sizes]
            self.group_samples = [int(g) for g in group_samples]
            self.logit_scale = float(logit_scale)
            self.mean = torch.as_tensor(np.asarray(mean, dtype=np.float32))
            self.std = torch.as_tensor(np.asarray(std, dtype=np.float32))

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def _inputs(self, batch, vox):
            subj = batch["subject"]
            dev = subj.device
            off = torch.as_tensor(self.offsets, device=dev)[subj][:, None]
            cl = self.clusters.to(dev)[off + vox]
            beta = batch["y"].float().gather(1, vox)
            return beta, subj, vox, cl

        def _target(self, batch):
            t = batch["target"].float()
            return (t - self.mean.to(t.device)) / self.std.to(t.device)

        def _query_index(self, index) -> np.ndarray:
            out = np.empty((len(index), sum(self.group_samples)), dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(self.group_sizes)])
            for i, row in enumerate(np.asarray(index).tolist()):
                rng = np.random.default_rng([self.seed, 1, self.epoch, int(row)])
                out[i] = np.concatenate([starts[g] + rng.integers(0, size, n) for g, (size, n)
                                         in enumerate(zip(self.group_sizes, self.group_samples))])
            return out

        def loss(self, model, batch) -> LossSum:
            subj = batch["subject"]
            idx = batch["index"].cpu().numpy()
            vox = torch.from_numpy(sample_voxels(idx, subj.cpu().numpy(), self.counts, self.k, self.seed,
                                                 self.epoch)).to(subj.device)
            inputs = self._inputs(batch, vox)
            target = self._target(batch)
            b = int(subj.shape[0])
            if self.loss_kind == "mse":
                pred = model(*inputs).float()
                per = ((pred - target) ** 2).mean((1, 2))
                return LossSum(per.sum(), b, per_sample=1)
            qi = torch.from_numpy(self._query_index(idx)).to(subj.device)
            pred = model(*inputs, query_index=qi).float()
            tgt = target.gather(1, qi[..., None].expand(-1, -1, target.shape[-1]))
            loss = multiscale_infonce(pred, tgt, self.group_samples, logit_scale=self.logit_scale)
            return LossSum(loss * b, b, per_sample=1)

        def validate(self, model, batches) -> Validation:
            rs = []
            for batch in batches:
                subj = batch["subject"]
                target = self._target(batch)
                for s in torch.unique(subj).tolist():
                    m = subj == s
                    V = self.counts[s]
                    sub = {"y": batch["y"][m], "subject": subj[m]}
                    vox = torch.arange(V, device=subj.device).expand(int(m.sum()), V)
                    pred = model(*self._inputs(sub, vox)).float()
                    rs.append(_pearson_rows(pred, target[m]).cpu().numpy())
            r = np.concatenate(rs) if rs else np.array([np.nan])
            return Validation({"val_corr": float(np.nanmean(r))})

    return _VoxelSubsetRegression, _TokenDecoding


def _train_split(model, train_cfg, objective, data: Mapping[str, Any], split, run_dir, resume, extra=None):
    """Train ``model`` on the rows ``split = (train, val or None)`` of ``data``; returns the FitResult.

    ``extra`` (same keys as ``data``) are rows appended to the training rows only (never validated on).
    """
    from brainenc.training import Trainer
    from brainenc.training.data import ConcatRows

    ti, vi = split
    val = _subset(data, vi) if vi is not None else None
    train = _subset(data, ti)
    if extra is not None:
        train = {k: (np.concatenate([v, np.asarray(extra[k], dtype=v.dtype)]) if isinstance(v, np.ndarray)
                     else ConcatRows([v, extra[k]])) for k, v in train.items()}
    res = Trainer(model, train_cfg, objective=objective, run_dir=run_dir).fit(train, val=val, resume=resume)
    model.eval()
    return res


def _device_of(model):
    return next(model.parameters()).device


class _MultiSubjectNet(EstimatorMixin, BaseEstimator):
    """What the two Brain-IT networks share: subjects, the resolved config, the trained-network state and
    the transfer recipe (copy, add a subject, train only its embedding blocks)."""

    _nested_params = _NESTED
    _tag = ""  # registry name, for error messages

    def _config_json(self):
        return self._resolved_config_json()

    def _is_fitted(self) -> bool:
        return hasattr(self, "model_")

    def subject_index(self, subject) -> int:
        """Index of a subject given by name or index (a one-line error for an unknown one)."""
        self._check_fitted()
        if isinstance(subject, str):
            if subject not in self.subjects_:
                raise ConfigError(f"subject {subject!r} is not in this {self._tag} (it has {self.subjects_})")
            return self.subjects_.index(subject)
        s = int(subject)
        if not 0 <= s < len(self.subjects_):
            raise ConfigError(f"subject index {s} out of range 0..{len(self.subjects_) - 1}")
        return s

    def _offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.voxel_counts_)]).astype(np.int64)

    def _set_trained(self, model, res, subjects, counts) -> None:
        self.model_ = model.cpu()
        self.subjects_, self.voxel_counts_ = list(subjects), list(counts)
        self.history_, self.best_epoch_ = res.history, res.best_epoch

    # ---- transfer -----------------------------------------------------------------------------
    def _transfer_copy(self, name: str, train) -> tuple["_MultiSubjectNet", Any]:
        """A deep copy to receive subject ``name``, with ``train`` overriding the training table."""
        self._check_fitted()
        if name in self.subjects_:
            raise ConfigError(f"subject {name!r} is already in this {self._tag}")
        new = copy.deepcopy(self)
        if train is not None:
            new.train = {**to_dict(self._check_params()[1]), **dict(train)}
        return new, new._check_params()[1]

    def _train_new_subject(self, s: int, V: int, name: str, train_cfg, objective, data, run_dir, resume):
        """Train only block ``s`` (``V`` voxels) of every VoxelEmbedding of ``self.model_`` (a transfer copy)."""
        n = len(data["y"])
        _freeze_except_block(self.model_, s)
        try:
            res = _train_split(self.model_, train_cfg, objective, data, _split_rows(n, self.val_fraction, self.val_seed),
                               run_dir, resume)
        finally:
            _unfreeze(self.model_)
        self._set_trained(self.model_, res, self.subjects_ + [name], self.voxel_counts_ + [int(V)])
        return res

    # ---- persistence --------------------------------------------------------------------------
    def _network_state(self) -> tuple[dict, dict]:
        arrays = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        meta = {"subjects": list(self.subjects_), "voxel_counts": list(self.voxel_counts_),
                "best_epoch": int(self.best_epoch_), "history": to_json_value(self.history_)}
        return arrays, meta

    def _restore_network(self, build, arrays, meta) -> None:
        """Build the network with ``build()`` (under a forked rng) and load the saved weights into it."""
        import torch

        with torch.random.fork_rng(devices=[]):
            model = build()
        load_module_state(model, {k[6:]: v for k, v in arrays.items() if k.startswith("model.")}, f"({self._tag})")
        self.model_ = model.eval()
        self.subjects_, self.voxel_counts_ = list(meta["subjects"]), [int(c) for c in meta["voxel_counts"]]
        self.best_epoch_, self.history_ = int(meta["best_epoch"]), list(meta["history"])


# ------------------------------------------------------------------------------------------------
# universal encoder
# ------------------------------------------------------------------------------------------------
@register_estimator("brainit_encoder")
class UniversalBrainEncoder(_MultiSubjectNet):
    """One image -> voxel encoder for many subjects with a learned embedding per voxel (reference b.1).

    Parameters
    ----------
    model : UniversalEncoderArchitecture or mapping, optional
        Network hyper-parameters (:class:`~brainenc.models.brainit.UniversalEncoderArchitecture`).
    train : TrainConfig or mapping, optional
        Over ``ENCODER_TRAIN`` (the paper's Adam with amsgrad, 1e-3, batch 32, 30 epochs).
    voxels_per_example : int
        Voxels drawn (with replacement) per training image; the paper: 5000.
    cos_weight : float
        Weight of the cosine term of the loss (the paper: 0.1).
    val_fraction, val_seed : float, int
        Rows held out for best-epoch selection (per-voxel r).

    Attributes
    ----------
    model_ : UniversalEncoderModel
    subjects_ : list of str
    voxel_counts_ : list of int
    layer_shapes_ : list of (n_tokens, dim)
    history_, best_epoch_, val_scores_ : the training record
        ``val_scores_``: validation per-voxel r [sum V], in subject order.

    Examples
    --------
    >>> enc = UniversalBrainEncoder(model={"embed_dim": 32, "token_dim": 16}, train={"epochs": 2})
    >>> enc.fit([tokens_l1, tokens_l2], padded_responses, subject, voxel_counts=[500, 600])  # doctest: +SKIP
    >>> enc.voxel_embeddings(0).shape                                                        # doctest: +SKIP
    (500, 32)
    """

    _tag = "brainit_encoder"

    def __init__(self, model=None, train=None, voxels_per_example: int = 5000, cos_weight: float = 0.1,
                 val_fraction: float = 0.1, val_seed: int = 0):
        self.model = model
        self.train = train
        self.voxels_per_example = voxels_per_example
        self.cos_weight = cos_weight
        self.val_fraction = val_fraction
        self.val_seed = val_seed

    def _check_params(self, prefix: str = ""):
        from brainenc.models.brainit import UniversalEncoderArchitecture
        from brainenc.training import TrainConfig

        _check_int(f"{prefix}voxels_per_example", self.voxels_per_example)
        if isinstance(self.cos_weight, bool) or not isinstance(self.cos_weight, (int, float)) or self.cos_weight < 0:
            raise ConfigError(f"'{prefix}cos_weight' must be a number >= 0; {self.cos_weight!r} was provided")
        _check_fraction(f"{prefix}val_fraction", self.val_fraction)
        _check_int(f"{prefix}val_seed", self.val_seed, lo=0)
        return (nested_config(UniversalEncoderArchitecture, self.model, "model", prefix),
                nested_config(TrainConfig, self.train, "train", prefix, base=ENCODER_TRAIN))

    @staticmethod
    def _check_tokens(tokens, n=None) -> list:
        if isinstance(tokens, np.ndarray) or not isinstance(tokens, Sequence) or not tokens:
            raise DataFormatError("'tokens' must be a list of arrays [n, n_tokens, dim], one per backbone layer")
        for i, t in enumerate(tokens):
            if len(np.shape(t)) != 3:
                raise DataFormatError(f"'tokens[{i}]' must be [n, n_tokens, dim]; got shape {np.shape(t)}")
            if n is not None and len(t) != n:
                raise DataFormatError(f"'tokens[{i}]' has {len(t)} rows; expected {n}")
        return list(tokens)

    def fit(self, tokens: Sequence, responses, subject, *, voxel_counts: Sequence[int],
            subjects: Sequence[str] | None = None, run_dir=None, resume: bool = False) -> "UniversalBrainEncoder":
        """Train on examples of several subjects at once.

        Parameters
        ----------
        tokens : list of arrays [n, P_l, D_l]
            Backbone tokens per layer for every example (lazy views welcome).
        responses : array [n, V_max]
            Responses of each example's subject in its first ``voxel_counts[subject]`` columns (e.g.
            :class:`~brainenc.datasets.PaddedResponses`).
        subject : int array [n]
            Subject index of each example.
        voxel_counts : int sequence [S]
        subjects : list of str, optional
            Names (default ``"s0", "s1", ...``).
        run_dir, resume : trainer checkpoints (see :class:`~brainenc.training.Trainer`).
        """
        from brainenc.models.brainit import UniversalEncoderModel
        from brainenc.training import seed_everything

        arch, train = self._check_params()
        counts = _counts_check(voxel_counts)
        n = len(responses)
        tokens = self._check_tokens(tokens, n)
        subject = _check_subject_rows(subject, counts, n)
        if np.shape(responses)[1] < max(counts):
            raise DataFormatError(f"'responses' has {np.shape(responses)[1]} columns; the largest subject has {max(counts)}")
        names = _subject_names(subjects, counts)
        Obj, _ = _objectives()
        shapes = [(int(np.shape(t)[1]), int(np.shape(t)[2])) for t in tokens]
        seed_everything(train.seed)
        model = UniversalEncoderModel(arch, layer_shapes=shapes, voxel_counts=counts)
        data = {**{f"x{i}": t for i, t in enumerate(tokens)}, "y": responses, "subject": subject}
        objective = Obj(len(tokens), counts, self.voxels_per_example, self.cos_weight, seed=train.seed)
        res = _train_split(model, train, objective, data, _split_rows(n, self.val_fraction, self.val_seed),
                           run_dir, resume)
        self._set_trained(model, res, names, counts)
        self.layer_shapes_, self.val_scores_ = shapes, res.val_scores
        return self

    # ---- inference ----------------------------------------------------------------------------
    def voxel_embeddings(self, subject) -> np.ndarray:
        """The learned ``e_v`` of a subject's voxels, float32 [V_s, embed_dim]."""
        return self.model_.voxel_embed.table(self.subject_index(subject)).cpu().numpy().astype(np.float32)

    def predict(self, tokens: Sequence, subject, batch_size: int = 16) -> np.ndarray:
        """Predicted responses of every voxel of one subject, float32 [n, V_s]."""
        import torch

        self._check_fitted()
        s = self.subject_index(subject)
        tokens = self._check_tokens(tokens)
        if [(int(np.shape(t)[1]), int(np.shape(t)[2])) for t in tokens] != [tuple(x) for x in self.layer_shapes_]:
            raise DataFormatError(f"'tokens' layer shapes {[np.shape(t)[1:] for t in tokens]} differ from the "
                                  f"fitted {self.layer_shapes_}")
        n, V = len(tokens[0]), self.voxel_counts_[s]
        out = np.empty((n, V), dtype=np.float32)
        model = self.model_.eval()
        dev = _device_of(model)
        with torch.no_grad():
            for a in range(0, n, batch_size):
                xs = [torch.as_tensor(np.asarray(t[a:a + batch_size], dtype=np.float32), device=dev) for t in tokens]
                b = xs[0].shape[0]
                subj = torch.full((b,), s, dtype=torch.long, device=dev)
                vox = torch.arange(V, device=dev).expand(b, V)
                out[a:a + b] = model(xs, subj, vox).float().cpu().numpy()
        return out

    def score(self, tokens, Y, subject) -> np.ndarray:
        """Per-voxel Pearson r of the predictions of one subject, float32 [V_s]."""
        from brainenc.metrics import pearson_r

        return np.asarray(pearson_r(np.asarray(Y, dtype=np.float32), self.predict(tokens, subject)), dtype=np.float32)

    # ---- transfer -----------------------------------------------------------------------------
    def fit_new_subject(self, tokens: Sequence, responses, *, name: str, train=None, run_dir=None,
                        resume: bool = False) -> "UniversalBrainEncoder":
        """A copy of this encoder with one more subject, trained on that subject's data only.

        Everything but the new voxels' embeddings is frozen (bitwise unchanged); the new embeddings
        start from a fresh initialisation (reference b.7 step 1).

        Parameters
        ----------
        tokens : list of arrays [n, P_l, D_l]
        responses : array [n, V_new]
        name : str
        train : mapping, optional
            Overrides of this encoder's training table (e.g. fewer epochs).
        """
        self._check_fitted()
        n = len(responses)
        tokens = self._check_tokens(tokens, n)
        V = int(np.shape(responses)[1])
        new, train_cfg = self._transfer_copy(name, train)
        s = new.model_.add_subject(V)
        Obj, _ = _objectives()
        data = {**{f"x{i}": t for i, t in enumerate(tokens)}, "y": responses,
                "subject": np.full(n, s, dtype=np.int64)}
        objective = Obj(len(tokens), self.voxel_counts_ + [V], min(self.voxels_per_example, 4 * V), self.cos_weight,
                        seed=train_cfg.seed)
        res = new._train_new_subject(s, V, name, train_cfg, objective, data, run_dir, resume)
        new.val_scores_ = res.val_scores
        return new

    # ---- persistence --------------------------------------------------------------------------
    def _fitted_state(self):
        arrays, meta = self._network_state()
        if self.val_scores_ is not None:
            arrays["val_scores"] = np.asarray(self.val_scores_, dtype=np.float32)
        meta["layer_shapes"] = [list(s) for s in self.layer_shapes_]
        return arrays, meta

    def _restore_fitted(self, arrays, meta):
        from brainenc.models.brainit import UniversalEncoderModel

        arch, _ = self._check_params()
        shapes = [tuple(int(x) for x in s) for s in meta["layer_shapes"]]
        self._restore_network(lambda: UniversalEncoderModel(arch, layer_shapes=shapes,
                                                            voxel_counts=list(meta["voxel_counts"])), arrays, meta)
        self.layer_shapes_ = shapes
        self.val_scores_ = arrays.get("val_scores")


def _freeze_except_block(model, s: int) -> None:
    """requires_grad only for subject ``s``'s block of every VoxelEmbedding (embeddings, biases)."""
    from brainenc.models.brainit import VoxelEmbedding

    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for m in model.modules():
        if isinstance(m, VoxelEmbedding):
            m.blocks[s].requires_grad_(True)
            found += 1
    if not found:
        raise RuntimeError("the model has no VoxelEmbedding: nothing to train for the new subject")


def _unfreeze(model) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# functional clusters
# ------------------------------------------------------------------------------------------------
def _normalise(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@register_estimator("brainit_clusters")
class FunctionalClusters(EstimatorMixin, BaseEstimator):
    """Clusters of voxels shared across subjects: a Gaussian mixture on L2-normalised voxel embeddings (b.2).

    Parameters
    ----------
    n_clusters : int
        Mixture components (the paper: 128).
    covariance_type : {'full', 'diag', 'tied', 'spherical'}
        sklearn's option (the paper: the default, full).
    max_iter, n_init, reg_covar, seed :
        sklearn ``GaussianMixture`` settings (``seed`` -> ``random_state``).

    Attributes
    ----------
    subjects_ : list of str
    offsets_ : int64 [S + 1]
        Subject ``s``'s voxels are rows ``offsets_[s]:offsets_[s+1]`` of ``labels_`` / ``reference_``.
    labels_ : int64 [sum V]
        Cluster of every reference voxel (``gmm.predict``).
    reference_ : float32 [sum V, d]
        The normalised reference embeddings (new voxels are matched to them).
    means_, weights_ : GMM parameters (float32 [C, d], [C]).
    """

    def __init__(self, n_clusters: int = 128, covariance_type: str = "full", max_iter: int = 100, n_init: int = 1,
                 reg_covar: float = 1e-6, seed: int = 0):
        self.n_clusters = n_clusters
        self.covariance_type = covariance_type
        self.max_iter = max_iter
        self.n_init = n_init
        self.reg_covar = reg_covar
        self.seed = seed

    _fitted_arrays = ("offsets_", "labels_", "reference_", "means_", "weights_")
    _fitted_meta = ("subjects_",)

    def _check_params(self, prefix: str = ""):
        _check_int(f"{prefix}n_clusters", self.n_clusters)
        check_option(f"{prefix}covariance_type", self.covariance_type, ("full", "diag", "tied", "spherical"))
        _check_int(f"{prefix}max_iter", self.max_iter)
        _check_int(f"{prefix}n_init", self.n_init)
        _check_int(f"{prefix}seed", self.seed, lo=0)
        if not (isinstance(self.reg_covar, (int, float)) and self.reg_covar >= 0):
            raise ConfigError(f"'{prefix}reg_covar' must be a number >= 0; {self.reg_covar!r} was provided")

    def fit(self, embeddings: Sequence[np.ndarray], subjects: Sequence[str] | None = None) -> "FunctionalClusters":
        """Fit the mixture on every subject's voxel embeddings at once.

        Parameters
        ----------
        embeddings : list of float arrays [V_s, d]
        subjects : list of str, optional
        """
        from sklearn.mixture import GaussianMixture

        self._check_params()
        if isinstance(embeddings, np.ndarray) or not embeddings:
            raise DataFormatError("'embeddings' must be a list of [V_s, d] arrays, one per subject")
        dims = {np.shape(e)[1] for e in embeddings}
        if len(dims) != 1 or any(np.ndim(e) != 2 for e in embeddings):
            raise DataFormatError(f"'embeddings' must be [V_s, d] arrays of one d; got {[np.shape(e) for e in embeddings]}")
        X = _normalise(np.concatenate(embeddings))
        if X.shape[0] < self.n_clusters:
            raise DataFormatError(f"{X.shape[0]} voxels cannot make {self.n_clusters} clusters (lower 'n_clusters')")
        gmm = GaussianMixture(self.n_clusters, covariance_type=self.covariance_type, max_iter=self.max_iter,
                              n_init=self.n_init, reg_covar=self.reg_covar, random_state=self.seed).fit(X)
        self.labels_ = gmm.predict(X).astype(np.int64)
        self.offsets_ = np.concatenate([[0], np.cumsum([len(e) for e in embeddings])]).astype(np.int64)
        self.reference_ = X.astype(np.float32)
        self.means_, self.weights_ = gmm.means_.astype(np.float32), gmm.weights_.astype(np.float32)
        self.subjects_ = list(subjects) if subjects is not None else [f"s{i}" for i in range(len(embeddings))]
        if len(self.subjects_) != len(embeddings):
            raise DataFormatError(f"'subjects' names {len(self.subjects_)} subjects for {len(embeddings)} embedding sets")
        return self

    def labels(self, subject) -> np.ndarray:
        """Cluster ids of one reference subject's voxels, int64 [V_s]."""
        self._check_fitted()
        s = self.subjects_.index(subject) if isinstance(subject, str) else int(subject)
        return self.labels_[self.offsets_[s]:self.offsets_[s + 1]]

    def cluster_table(self) -> np.ndarray:
        """Labels of all reference voxels in global voxel order, int64 [sum V]."""
        self._check_fitted()
        return self.labels_

    def assign(self, embeddings, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Clusters of new voxels from their nearest reference voxel (L2 on normalised embeddings).

        Returns
        -------
        labels : int64 [V_new]
        nearest : int64 [V_new]
            Global row (in ``reference_``) of each new voxel's nearest reference voxel.
        """
        self._check_fitted()
        E = np.asarray(embeddings)
        if E.ndim != 2 or E.shape[1] != self.reference_.shape[1]:
            raise DataFormatError(f"'embeddings' must be [V_new, {self.reference_.shape[1]}]; got {E.shape}")
        X = _normalise(E).astype(np.float32)
        R = self.reference_
        nearest = np.empty(len(X), dtype=np.int64)
        for a in range(0, len(X), chunk):
            # |x - r|^2 = 2 - 2 x.r for unit vectors: the nearest is the largest dot product
            nearest[a:a + chunk] = np.argmax(X[a:a + chunk] @ R.T, axis=1)
        return self.labels_[nearest], nearest

    def sizes(self) -> np.ndarray:
        """Voxels per (subject, cluster), int64 [S, n_clusters]."""
        self._check_fitted()
        return np.stack([np.bincount(self.labels(s), minlength=self.n_clusters) for s in range(len(self.subjects_))])

    def _restore_fitted(self, arrays, meta):
        super()._restore_fitted(arrays, meta)
        self.offsets_ = np.asarray(self.offsets_, dtype=np.int64)
        self.labels_ = np.asarray(self.labels_, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# Brain Interaction Transformer
# ------------------------------------------------------------------------------------------------
@register_estimator("brainit")
class BrainITDecoder(_MultiSubjectNet):
    """Voxels of many subjects -> image feature tokens through functional clusters (reference b.3).

    Parameters
    ----------
    model : BrainITArchitecture or mapping, optional
        :class:`~brainenc.models.brainit.BrainITArchitecture` (width 512, 8 heads, 5 blocks).
    train : TrainConfig or mapping, optional
        Over ``DECODER_TRAIN`` (AdamW 5e-4, warm-up then cosine).
    loss : {'mse', 'infonce'}
        ``mse``: the semantic branch; ``infonce``: the low-level branch's multi-scale InfoNCE.
    voxels_per_example : int
        Voxels drawn with replacement per training image (the paper: 15 000; all voxels at test).
    group_samples : list of int, optional
        InfoNCE tokens drawn per image from each scale (the paper: 512, 512, 128, 64, 16); default
        ``min(size, 64)`` per scale.
    logit_scale : float
        InfoNCE logit multiplier (the paper: 1.0, unnormalised tokens).
    val_fraction, val_seed : validation rows for best-epoch selection.

    Attributes
    ----------
    model_ : BrainIT
    voxel_counts_, subjects_, n_tokens_, token_dim_, group_sizes_
    clusters_ : int64 [sum V] cluster id per global voxel (the tokenizer's membership)
    target_mean_, target_std_ : float32 [token_dim] (predictions are returned in target units)
    n_augmented_ : int
        Synthetic examples trained on besides the real ones (``fit(augment=...)``).
    """

    _tag = "brainit"

    def __init__(self, model=None, train=None, loss: str = "mse", voxels_per_example: int = 15000,
                 group_samples: Sequence[int] | None = None, logit_scale: float = 1.0,
                 val_fraction: float = 0.1, val_seed: int = 0):
        self.model = model
        self.train = train
        self.loss = loss
        self.voxels_per_example = voxels_per_example
        self.group_samples = group_samples
        self.logit_scale = logit_scale
        self.val_fraction = val_fraction
        self.val_seed = val_seed

    def _check_params(self, prefix: str = ""):
        from brainenc.models.brainit import BrainITArchitecture
        from brainenc.training import TrainConfig

        check_option(f"{prefix}loss", self.loss, ("mse", "infonce"))
        _check_int(f"{prefix}voxels_per_example", self.voxels_per_example)
        gs = self.group_samples
        if gs is not None and (isinstance(gs, (str, bytes)) or not isinstance(gs, Sequence)
                               or not all(isinstance(g, int) and g >= 1 for g in gs)):
            raise ConfigError(f"'{prefix}group_samples' must be None or a list of integers >= 1; {gs!r} was provided")
        if not (isinstance(self.logit_scale, (int, float)) and self.logit_scale > 0):
            raise ConfigError(f"'{prefix}logit_scale' must be a number > 0; {self.logit_scale!r} was provided")
        _check_fraction(f"{prefix}val_fraction", self.val_fraction)
        _check_int(f"{prefix}val_seed", self.val_seed, lo=0)
        return (nested_config(BrainITArchitecture, self.model, "model", prefix),
                nested_config(TrainConfig, self.train, "train", prefix, base=DECODER_TRAIN))

    def _groups(self, group_sizes, n_tokens) -> tuple[list[int], list[int]]:
        sizes = [int(n_tokens)] if group_sizes is None else [int(g) for g in group_sizes]
        if sum(sizes) != n_tokens or min(sizes) < 1:
            raise DataFormatError(f"'group_sizes' {sizes} must be positive and sum to the {n_tokens} target tokens")
        samples = ([min(s, 64) for s in sizes] if self.group_samples is None
                   else [int(g) for g in self.group_samples])
        if len(samples) != len(sizes):
            raise ConfigError(f"'group_samples' lists {len(samples)} scales; the targets have {len(sizes)}")
        return sizes, samples

    def fit(self, responses, subject, targets, *, voxel_counts: Sequence[int], clusters, n_clusters: int,
            group_sizes: Sequence[int] | None = None, subjects: Sequence[str] | None = None, augment=None,
            run_dir=None, resume: bool = False) -> "BrainITDecoder":
        """Train on examples of several subjects.

        Parameters
        ----------
        responses : array [n, V_max]
            Each example's subject's responses in its first ``voxel_counts[subject]`` columns.
        subject : int array [n]
        targets : array [n, M, D]
            Target tokens per example (lazy rows welcome, e.g. feature-cache rows by image id).
        voxel_counts : int sequence [S]
        clusters : int array [sum V]
            Cluster id (0..n_clusters-1) of every voxel in global order
            (:meth:`FunctionalClusters.cluster_table`).
        n_clusters : int
        group_sizes : int sequence, optional
            Tokens per scale of ``targets`` (``loss='infonce'``; default one scale).
        augment : (responses [m, V_max], subject [m], targets [m, M, D]), optional
            Synthetic examples (the paper's EXT set: the universal encoder's predicted responses to
            images no subject saw), added to the training rows only: never validated on, and not in
            the target statistics.
        """
        from brainenc.models.brainit import BrainIT
        from brainenc.training import seed_everything
        from brainenc.training.data import RowSubset, channel_statistics

        arch, train = self._check_params()
        counts = _counts_check(voxel_counts)
        n = len(responses)
        subject = _check_subject_rows(subject, counts, n)
        if len(np.shape(targets)) != 3 or len(targets) != n:
            raise DataFormatError(f"'targets' must be [n={n}, n_tokens, dim]; got shape {np.shape(targets)}")
        clusters = np.asarray(clusters, dtype=np.int64).ravel()
        n_clusters = _check_int("n_clusters", n_clusters)
        if clusters.size != sum(counts) or clusters.min() < 0 or clusters.max() >= n_clusters:
            raise DataFormatError(f"'clusters' must hold one id in 0..{n_clusters - 1} per voxel ({sum(counts)}); "
                                  f"got {clusters.size} values in {clusters.min()}..{clusters.max()}")
        names = _subject_names(subjects, counts)
        M, D = int(np.shape(targets)[1]), int(np.shape(targets)[2])
        extra = None
        if augment is not None:
            extra = self._check_augment(augment, counts, np.shape(responses)[1], (M, D))
        sizes, samples = self._groups(group_sizes, M)
        split = _split_rows(n, self.val_fraction, self.val_seed)
        mean, std = channel_statistics(RowSubset(targets, split[0]))
        std = np.where(std > 1e-6 * max(float(std.max()), 1e-30), std, 1.0)
        seed_everything(train.seed)
        model = BrainIT(arch, voxel_counts=counts, n_clusters=n_clusters, n_queries=M, out_dim=D)
        _, Obj = _objectives()
        objective = Obj(counts, clusters, k=self.voxels_per_example, loss=self.loss, group_sizes=sizes,
                        group_samples=samples, logit_scale=self.logit_scale, mean=mean, std=std, seed=train.seed)
        data = {"y": responses, "subject": subject, "target": targets}
        res = _train_split(model, train, objective, data, split, run_dir, resume, extra)
        self._set_trained(model, res, names, counts)
        self.n_augmented_ = 0 if extra is None else len(extra["y"])
        self.clusters_, self.n_clusters_ = clusters, n_clusters
        self.n_tokens_, self.token_dim_, self.group_sizes_ = M, D, sizes
        self.target_mean_, self.target_std_ = mean.astype(np.float32), std.astype(np.float32)
        return self

    @staticmethod
    def _check_augment(augment, counts, width, target_shape) -> dict:
        if not isinstance(augment, (tuple, list)) or len(augment) != 3:
            raise DataFormatError("'augment' must be (responses [m, V_max], subject [m], targets [m, M, D])")
        y, subj, tgt = augment
        m = len(y)
        if np.ndim(y) != 2 or np.shape(y)[1] != width:
            raise DataFormatError(f"'augment' responses must be [m, {width}] like 'responses'; got {np.shape(y)}")
        subj = _check_subject_rows(subj, counts, m)
        if tuple(np.shape(tgt)) != (m,) + tuple(target_shape):
            raise DataFormatError(f"'augment' targets must be [{m}, {target_shape[0]}, {target_shape[1]}]; "
                                  f"got {np.shape(tgt)}")
        return {"y": y, "subject": subj, "target": tgt}

    # ---- inference ----------------------------------------------------------------------------
    def predict(self, responses, subject, batch_size: int = 16, *, standardized: bool = False) -> np.ndarray:
        """Predicted target tokens from all of one subject's voxels, float32 [n, M, D].

        ``standardized=True`` returns them in the standardised units the model was trained in.
        """
        import torch

        self._check_fitted()
        s = self.subject_index(subject)
        V = self.voxel_counts_[s]
        if np.ndim(responses) != 2 or np.shape(responses)[1] < V:
            raise DataFormatError(f"'responses' must be [n, {V}] for subject {self.subjects_[s]!r}; got {np.shape(responses)}")
        n = len(responses)
        out = np.empty((n, self.n_tokens_, self.token_dim_), dtype=np.float32)
        model = self.model_.eval()
        dev = _device_of(model)
        cl = torch.as_tensor(self.clusters_[self._offsets()[s]:self._offsets()[s] + V], device=dev)
        with torch.no_grad():
            for a in range(0, n, batch_size):
                beta = torch.as_tensor(np.asarray(responses[a:a + batch_size], dtype=np.float32)[:, :V], device=dev)
                b = beta.shape[0]
                vox = torch.arange(V, device=dev).expand(b, V)
                subj = torch.full((b,), s, dtype=torch.long, device=dev)
                out[a:a + b] = model(beta, subj, vox, cl.expand(b, V)).float().cpu().numpy()
        if not standardized:
            out = out * self.target_std_ + self.target_mean_
        return out

    # ---- transfer -----------------------------------------------------------------------------
    def fit_new_subject(self, responses, targets, *, name: str, clusters, init_from=None, train=None,
                        run_dir=None, resume: bool = False) -> "BrainITDecoder":
        """A copy of this decoder with one more subject; only the new voxels' embeddings are trained.

        Parameters
        ----------
        responses : array [n, V_new]
        targets : array [n, M, D]
        name : str
        clusters : int array [V_new]
            Cluster of each new voxel (:meth:`FunctionalClusters.assign`).
        init_from : int array [V_new], optional
            Global voxel id of each new voxel's nearest reference voxel: its embedding starts as that
            voxel's (reference b.7 step 4); None = a fresh initialisation.
        train : mapping, optional
            Overrides of the training table (e.g. ``{"epochs": 20}``).
        """
        import torch

        self._check_fitted()
        n, V = len(responses), int(np.shape(responses)[1])
        clusters = np.asarray(clusters, dtype=np.int64).ravel()
        if clusters.size != V or clusters.min() < 0 or clusters.max() >= self.n_clusters_:
            raise DataFormatError(f"'clusters' must hold one id in 0..{self.n_clusters_ - 1} per new voxel ({V})")
        if tuple(np.shape(targets)[1:]) != (self.n_tokens_, self.token_dim_) or len(targets) != n:
            raise DataFormatError(f"'targets' must be [{n}, {self.n_tokens_}, {self.token_dim_}]; got {np.shape(targets)}")
        new, train_cfg = self._transfer_copy(name, train)
        init = None
        if init_from is not None:
            init_from = np.asarray(init_from, dtype=np.int64).ravel()
            if init_from.size != V or init_from.min() < 0 or init_from.max() >= sum(self.voxel_counts_):
                raise DataFormatError(f"'init_from' must hold one reference voxel id in 0..{sum(self.voxel_counts_) - 1} "
                                      f"per new voxel ({V})")
            # global voxel ids follow the subjects' blocks in order
            table = torch.cat([new.model_.voxel_embed.table(s) for s in range(len(self.voxel_counts_))])
            init = table[torch.as_tensor(init_from)]
        s = new.model_.add_subject(V, init)
        all_clusters = np.concatenate([self.clusters_, clusters])
        _, Obj = _objectives()
        objective = Obj(self.voxel_counts_ + [V], all_clusters, k=min(self.voxels_per_example, 4 * V), loss=self.loss,
                        group_sizes=self.group_sizes_, group_samples=self._groups(self.group_sizes_, self.n_tokens_)[1],
                        logit_scale=self.logit_scale, mean=self.target_mean_, std=self.target_std_, seed=train_cfg.seed)
        data = {"y": responses, "subject": np.full(n, s, dtype=np.int64), "target": targets}
        new.clusters_ = all_clusters
        new._train_new_subject(s, V, name, train_cfg, objective, data, run_dir, resume)
        return new

    # ---- persistence --------------------------------------------------------------------------
    def _fitted_state(self):
        arrays, meta = self._network_state()
        arrays.update({"clusters": np.asarray(self.clusters_, dtype=np.int64),
                       "target_mean": self.target_mean_, "target_std": self.target_std_})
        meta.update({"n_clusters": int(self.n_clusters_), "n_tokens": int(self.n_tokens_),
                     "token_dim": int(self.token_dim_), "group_sizes": list(self.group_sizes_),
                     "n_augmented": int(getattr(self, "n_augmented_", 0))})
        return arrays, meta

    def _restore_fitted(self, arrays, meta):
        from brainenc.models.brainit import BrainIT

        arch, _ = self._check_params()
        self._restore_network(lambda: BrainIT(arch, voxel_counts=[int(c) for c in meta["voxel_counts"]],
                                              n_clusters=int(meta["n_clusters"]), n_queries=int(meta["n_tokens"]),
                                              out_dim=int(meta["token_dim"])), arrays, meta)
        self.clusters_ = np.asarray(arrays["clusters"], dtype=np.int64)
        self.n_clusters_, self.n_tokens_, self.token_dim_ = int(meta["n_clusters"]), int(meta["n_tokens"]), int(meta["token_dim"])
        self.group_sizes_ = [int(g) for g in meta["group_sizes"]]
        self.n_augmented_ = int(meta.get("n_augmented", 0))
        self.target_mean_ = np.asarray(arrays["target_mean"], dtype=np.float32)
        self.target_std_ = np.asarray(arrays["target_std"], dtype=np.float32)
