"""Image-reconstruction metrics of the NSD literature (PixCorr, SSIM, AlexNet(2)/(5), Inception, CLIP,
EfficientNet-B1, SwAV), reproducing the MindEye2 reference recipe.

Semantics follow ``/work/shared/reference/recon_metrics.md`` (cited as "recon_metrics §N"):
preprocessing §2, metric definitions §3, SSIM variants §4, two-way identification §6, module spec §10.

Image inputs (every function below that takes ``real`` / ``pred``):

* numpy arrays ``[N, H, W, 3]`` (channels last), or
* torch tensors ``[N, 3, H, W]`` (channels first, as MindEye2's ``all_images.pt``),

either ``uint8`` (0..255, divided by 255) or floating point, assumed in [0, 1] (not clipped, so affine
intensity changes are passed through unchanged). Images are first resized to 256×256 (``resize_first``,
recon_metrics §2; ``None`` skips it), then to ``size×size`` for each metric with bilinear interpolation and
``antialias=False`` (the behaviour of torchvision 0.16 on tensors, which MindEye2 pins). For square images
``size×size`` equals MindEye2's ``Resize(size)``.

No pretrained weights are ever downloaded: feature metrics take ``weights="random"`` (random-init stand-in
networks, for tests) or a local weights file. torch / torchvision / scikit-image / scipy / open_clip are
imported inside the functions, never at module import.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Sequence

import numpy as np

from brainenc.exceptions import ConfigError, DataFormatError, MissingDependencyError, MissingWeightsError

__all__ = [
    "pixcorr",
    "ssim",
    "ssim_mindeye2",
    "ssim_columnwise_legacy",
    "ssim_skimage",
    "two_way_identification",
    "feature_metric",
    "extract_features",
    "score_reconstructions",
    "score_reconstruction_sets",
    "NETWORKS",
    "METRIC_NAMES",
    "DEFAULT_SIZES",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Per-network spec (recon_metrics §3): layer name -> feature node, input size, normalisation, score kind
#: and the file name of the real weights (named in the MissingWeightsError hint).
NETWORKS: dict[str, dict[str, Any]] = {
    "alexnet": {
        "layers": {"2": "features.4", "5": "features.11"},
        "default_layer": None,
        "size": 256,
        "norm": (IMAGENET_MEAN, IMAGENET_STD),
        "score": "two_way",
        "weights_hint": "torchvision AlexNet_Weights.IMAGENET1K_V1 state dict (alexnet-owt-7be5be79.pth)",
    },
    "inception": {
        "layers": {"avgpool": "avgpool"},
        "default_layer": "avgpool",
        "size": 342,
        "norm": (IMAGENET_MEAN, IMAGENET_STD),
        "score": "two_way",
        "weights_hint": "torchvision Inception_V3_Weights.IMAGENET1K_V1 state dict (inception_v3_google-0cc3c7bd.pth)",
    },
    "clip": {
        "layers": {"encode_image": "encode_image"},
        "default_layer": "encode_image",
        "size": 224,
        "norm": (CLIP_MEAN, CLIP_STD),
        "score": "two_way",
        "weights_hint": "OpenAI CLIP ViT-L/14 file (ViT-L-14.pt, loaded with open_clip.load_openai_model)",
    },
    "efficientnet": {
        "layers": {"avgpool": "avgpool"},
        "default_layer": "avgpool",
        "size": 255,
        "norm": (IMAGENET_MEAN, IMAGENET_STD),
        "score": "distance",
        "weights_hint": "torchvision EfficientNet_B1_Weights.IMAGENET1K_V2 state dict (efficientnet_b1-c27df63c.pth)",
    },
    "swav": {
        "layers": {"avgpool": "avgpool"},
        "default_layer": "avgpool",
        "size": 224,
        "norm": (IMAGENET_MEAN, IMAGENET_STD),
        "score": "distance",
        "weights_hint": "SwAV ResNet-50 checkpoint (swav_800ep_pretrain.pth.tar, 'module.' prefix is stripped)",
    },
}
_NETWORK_ALIASES = {
    "inception_v3": "inception",
    "clip_vit_l14": "clip",
    "efficientnet_b1": "efficientnet",
    "effnet": "efficientnet",
    "swav_resnet50": "swav",
}

#: metric name -> (network, layer); ``None`` network = pixel metric. Order = MindEye2 table order.
METRIC_NAMES: dict[str, tuple[str | None, str | None]] = {
    "pixcorr": (None, None),
    "ssim": (None, None),
    "alexnet2": ("alexnet", "2"),
    "alexnet5": ("alexnet", "5"),
    "inception": ("inception", "avgpool"),
    "clip": ("clip", "encode_image"),
    "effnet": ("efficientnet", "avgpool"),
    "swav": ("swav", "avgpool"),
}

#: Per-metric resize (recon_metrics §3 / §10).
DEFAULT_SIZES: dict[str, int] = {
    "pixcorr": 425,
    "ssim": 425,
    "alexnet": 256,
    "inception": 342,
    "clip": 224,
    "efficientnet": 255,
    "swav": 224,
}

DEFAULT_CLIP_MODEL = "ViT-L-14-quickgelu"
SSIM_MODES = ("2d", "columnwise_legacy")


# ----------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------
def _to_nchw(name: str, x):
    """numpy [N,H,W,3] or torch [N,3,H,W] (uint8 or float) -> float32 torch [N,3,H,W] in the input's scale."""
    import torch

    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.ndim != 4 or t.shape[1] != 3:
            raise DataFormatError(f"'{name}' as a torch tensor must be [N, 3, H, W]; got shape {tuple(t.shape)}")
    else:
        a = np.asarray(x)
        if a.ndim != 4 or a.shape[-1] != 3:
            raise DataFormatError(f"'{name}' as a numpy array must be [N, H, W, 3]; got shape {a.shape}")
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not torch.is_floating_point(t):
        raise DataFormatError(f"'{name}' must be uint8 or floating point; got dtype {t.dtype}")
    return t.float()


def _pair_images(real, pred):
    r = _to_nchw("real", real)
    p = _to_nchw("pred", pred)
    if r.shape[0] != p.shape[0]:
        raise DataFormatError(f"'real' and 'pred' must hold the same number of images; got {r.shape[0]} and {p.shape[0]}")
    if r.shape[0] < 1:
        raise DataFormatError("'real' holds no images")
    return r, p


def _resize(t, size: int | None, antialias: bool = False):
    """Bilinear resize to size×size (no-op when already that size or ``size is None``)."""
    if size is None or (t.shape[-2] == size and t.shape[-1] == size):
        return t
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    return TF.resize(t, [int(size), int(size)], interpolation=InterpolationMode.BILINEAR, antialias=antialias)


def _prep(real, pred, size: int | None, resize_first: int | None, antialias: bool):
    r, p = _pair_images(real, pred)
    r = _resize(_resize(r, resize_first, antialias), size, antialias)
    p = _resize(_resize(p, resize_first, antialias), size, antialias)
    return r, p


def _check_size(name: str, v) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"'{name}' must be a positive integer or None; {v!r} was provided")
    return int(v)


# ----------------------------------------------------------------------------------------------------------
# pixel metrics
# ----------------------------------------------------------------------------------------------------------
def pixcorr(real, pred, *, size: int = 425, resize_first: int | None = 256, antialias: bool = False,
            return_avg: bool = True):
    """MindEye2 PixCorr (recon_metrics §3): resize to ``size``×``size`` (425, bilinear), flatten the
    3·size·size values of each image, Pearson r per (real_i, pred_i) pair, mean over images.

    ``real`` / ``pred``: numpy ``[N, H, W, 3]`` or torch ``[N, 3, H, W]``, uint8 or float in [0, 1] (see the
    module docstring). ``return_avg=False`` gives the per-image r (``[N]``). A constant image gives NaN.
    """
    size = _check_size("size", size)
    resize_first = _check_size("resize_first", resize_first)
    r, p = _prep(real, pred, size, resize_first, antialias)
    a = r.reshape(r.shape[0], -1).double().numpy()
    b = p.reshape(p.shape[0], -1).double().numpy()
    vals = np.array([np.corrcoef(a[i], b[i])[0, 1] for i in range(a.shape[0])])
    return float(np.mean(vals)) if return_avg else vals


def _grey(t) -> np.ndarray:
    """[N,3,H,W] float tensor -> [N,H,W] float64 grey via ``skimage.color.rgb2gray`` (MindEye2 order)."""
    from skimage.color import rgb2gray

    return rgb2gray(t.permute(0, 2, 3, 1).double().numpy())


_SSIM_KW = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


def _ssim_pair(rec: np.ndarray, gt: np.ndarray, mode: str) -> float:
    from skimage.metrics import structural_similarity

    if mode == "2d":
        return float(structural_similarity(rec, gt, **_SSIM_KW))
    # skimage <= 0.19 with multichannel=True on a 2-D array: the last axis (W) is the channel axis, i.e.
    # SSIM of each column as a 1-D signal, averaged over columns (recon_metrics §4).
    return float(structural_similarity(rec, gt, channel_axis=-1, **_SSIM_KW))


def _check_mode(mode) -> str:
    if mode not in SSIM_MODES:
        raise ConfigError(f"'mode' must be one of {SSIM_MODES}; {mode!r} was provided")
    return mode


def ssim(real, pred, *, mode: str = "2d", size: int = 425, resize_first: int | None = 256,
         antialias: bool = False, return_avg: bool = True):
    """SSIM of the reconstruction literature (recon_metrics §3, §4).

    Resize to ``size``×``size`` (425) → ``skimage.color.rgb2gray`` → ``structural_similarity(rec, gt,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)`` per pair, mean.

    ``mode`` (§4, never a ``multichannel`` flag):

    * ``"2d"`` (default): true 2-D SSIM, what MindEye2 / MindEye1 / Brain-IT get with scikit-image ≥ 0.20;
    * ``"columnwise_legacy"``: scikit-image ≤ 0.19 behaviour of ``multichannel=True`` on a 2-D array (each
      image column scored as a 1-D signal, averaged over columns), what Brain-Diffuser's pinned 0.17.2 computes.
      It is higher than 2-D SSIM (≈ +0.08..0.11 on real photos vs a blur).
    """
    mode = _check_mode(mode)
    size = _check_size("size", size)
    resize_first = _check_size("resize_first", resize_first)
    r, p = _prep(real, pred, size, resize_first, antialias)
    gr, gp = _grey(r), _grey(p)
    vals = np.array([_ssim_pair(gp[i], gr[i], mode) for i in range(gr.shape[0])])
    return float(np.mean(vals)) if return_avg else vals


def ssim_mindeye2(real, pred, **kwargs):
    """SSIM exactly as MindEye2 computes it with its pinned scikit-image 0.22 (``mode="2d"``, recon_metrics
    §3/§4). Keyword arguments as :func:`ssim` (except ``mode``)."""
    if "mode" in kwargs:
        raise ConfigError("'mode' cannot be passed to ssim_mindeye2 (it is always '2d'); use ssim(mode=...)")
    return ssim(real, pred, mode="2d", **kwargs)


def ssim_columnwise_legacy(real, pred, **kwargs):
    """Legacy column-wise SSIM of scikit-image ≤ 0.19 / Brain-Diffuser (``mode="columnwise_legacy"``,
    recon_metrics §4). Keyword arguments as :func:`ssim` (except ``mode``)."""
    if "mode" in kwargs:
        raise ConfigError("'mode' cannot be passed to ssim_columnwise_legacy; use ssim(mode=...)")
    return ssim(real, pred, mode="columnwise_legacy", **kwargs)


def ssim_skimage(real_grey, pred_grey, *, mode: str = "2d", return_avg: bool = True):
    """The bare scikit-image call on **already grey** images, no resizing (recon_metrics §4, the
    "equivalent explicit call"): ``structural_similarity(pred, real, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0)`` (``channel_axis=-1`` added for
    ``mode="columnwise_legacy"``). Inputs: ``[H, W]`` or ``[N, H, W]`` float arrays in [0, 1]."""
    mode = _check_mode(mode)
    a = np.asarray(real_grey, dtype=np.float64)
    b = np.asarray(pred_grey, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise DataFormatError(
            f"'real_grey' and 'pred_grey' must be [H, W] or [N, H, W] of the same shape; got {a.shape} and {b.shape}")
    if a.ndim == 2:
        return _ssim_pair(b, a, mode)
    vals = np.array([_ssim_pair(b[i], a[i], mode) for i in range(a.shape[0])])
    return float(np.mean(vals)) if return_avg else vals


# ----------------------------------------------------------------------------------------------------------
# two-way identification and distances
# ----------------------------------------------------------------------------------------------------------
def two_way_identification(real_feats, pred_feats, return_avg: bool = True, *, metric: str = "pearson"):
    """MindEye2 two-way identification (recon_metrics §6) on ``[N, F]`` features (any trailing shape is
    flattened), rows in the same image order::

        r = np.corrcoef(reals, preds)[:N, N:]     # r[i, j] = corr(gt_i, rec_j)
        success = r < np.diag(r)                  # success[i, j] = r[i, j] < r[j, j]
        per_image = success.sum(axis=0) / (N - 1)

    For each reconstruction j: the fraction of the N−1 distractor ground truths i whose features correlate
    less with rec_j than gt_j does. The diagonal never counts; ties count as failures (strict ``<``);
    NaN correlations (constant features) count as failures. Returns a fraction in [0, 1] (papers report
    ×100; chance 0.5): the mean over j if ``return_avg`` else the ``[N]`` per-image fractions.
    ``metric``: only ``"pearson"`` (the reference similarity; not cosine).
    """
    if metric != "pearson":
        raise ConfigError(f"'metric' must be 'pearson'; {metric!r} was provided")
    a = np.asarray(real_feats, dtype=np.float64)
    b = np.asarray(pred_feats, dtype=np.float64)
    if a.ndim < 1 or a.shape[0] != b.shape[0]:
        raise DataFormatError(
            f"'real_feats' and 'pred_feats' must have the same number of rows; got {a.shape} and {b.shape}")
    n = a.shape[0]
    a = a.reshape(n, -1)
    b = b.reshape(n, -1)
    if a.shape != b.shape:
        raise DataFormatError(f"'real_feats' and 'pred_feats' must have the same feature size; got {a.shape} and {b.shape}")
    if n < 2:
        raise DataFormatError(f"two-way identification needs at least 2 images; got {n}")
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(a, b)[:n, n:]
    congruents = np.diag(r)
    success = r < congruents
    per_image = np.sum(success, axis=0) / (n - 1)
    return float(np.mean(per_image)) if return_avg else per_image


def _correlation_distance(real_feats, pred_feats, return_avg: bool = True):
    """Mean over images of ``scipy.spatial.distance.correlation(gt_i, rec_i)`` = 1 − r (recon_metrics §3)."""
    from scipy.spatial.distance import correlation

    a = np.asarray(real_feats, dtype=np.float64)
    b = np.asarray(pred_feats, dtype=np.float64)
    n = a.shape[0]
    a, b = a.reshape(n, -1), b.reshape(n, -1)
    vals = np.array([correlation(a[i], b[i]) for i in range(n)])
    return float(np.mean(vals)) if return_avg else vals


# ----------------------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------------------
def _canonical_network(network) -> str:
    key = str(network).lower() if isinstance(network, str) else network
    key = _NETWORK_ALIASES.get(key, key)
    if key not in NETWORKS:
        raise ConfigError(f"'network' must be one of {sorted(NETWORKS)}; {network!r} was provided")
    return key


def _node_for(network: str, layer) -> str:
    spec = NETWORKS[network]
    if layer is None:
        layer = spec["default_layer"]
    key = str(layer)
    if key in spec["layers"]:
        return spec["layers"][key]
    if key in spec["layers"].values():
        return key
    allowed = sorted(set(spec["layers"]) | set(spec["layers"].values()))
    raise ConfigError(f"'layer' for network {network!r} must be one of {allowed}; {layer!r} was provided")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torchvision_arch(network: str):
    from torchvision import models

    if network == "alexnet":
        return models.alexnet(weights=None)
    if network == "inception":
        # the flags torchvision sets when real weights are passed (diffusers_offline.md §4)
        return models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    if network == "efficientnet":
        return models.efficientnet_b1(weights=None)
    if network == "swav":
        return models.resnet50(weights=None)
    raise AssertionError(network)


def _load_state_dict(path: str):
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one-line error naming the file
        raise DataFormatError(f"cannot load weights file '{path}' as a tensor state dict: {str(exc).splitlines()[0]}") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise DataFormatError(f"weights file '{path}' does not hold a state dict")
    return dict(sd)


def _build_network(network: str, weights, *, clip_model=DEFAULT_CLIP_MODEL, seed: int = 0, device: str = "cpu"):
    """Return (model in eval mode, weight identity dict)."""
    import torch

    spec = NETWORKS[network]
    if weights is None:
        raise MissingWeightsError(
            f"no offline weights for network {network!r}; pass weights=<path to the {spec['weights_hint']}> "
            f"(or weights='random' for a random-init stand-in)")
    if network == "clip" and not isinstance(clip_model, str):
        # a ready-made module with ``encode_image`` (e.g. a tiny open_clip CLIP for tests)
        if not hasattr(clip_model, "encode_image"):
            raise ConfigError("'clip_model' must be an open_clip model name or a module with encode_image")
        ident = {"source": "user-module", "class": type(clip_model).__name__}
        return clip_model.to(device).eval(), ident
    random_init = isinstance(weights, str) and weights == "random"
    if not random_init:
        path = os.path.expanduser(os.fspath(weights))
        if not os.path.isfile(path):
            raise MissingWeightsError(f"weights file for network {network!r} not found: '{path}'; supply the {spec['weights_hint']}")
        ident = {"source": os.path.abspath(path), "sha256": _sha256(path)}
    else:
        ident = {"source": "random-init", "seed": seed}

    if network == "clip":
        from brainenc.features.openclip import build_clip_model

        model = build_clip_model(clip_model, weights=None if random_init else ident["source"], seed=seed,
                                 device=device)
        ident["architecture"] = clip_model if random_init else "openai"
        return model.to(device).eval(), ident

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _torchvision_arch(network)
    if not random_init:
        sd = _load_state_dict(ident["source"])
        try:
            if network == "swav":
                sd = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in sd.items()}
                res = model.load_state_dict(sd, strict=False)
                missing = [k for k in res.missing_keys if not k.startswith("fc.")]
                if missing:
                    raise DataFormatError(
                        f"weights file '{ident['source']}' lacks {len(missing)} ResNet-50 keys (first: {missing[0]})")
            else:
                model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise DataFormatError(
                f"weights file '{ident['source']}' does not match {network!r}: {str(exc).splitlines()[0]}") from None
    ident["architecture"] = type(model).__name__
    return model.to(device).eval(), ident


def _normalize(t, mean, std):
    import torch

    m = torch.tensor(mean, dtype=t.dtype, device=t.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=t.dtype, device=t.device).view(1, 3, 1, 1)
    return (t - m) / s


def _run_network(network: str, model, nodes: Sequence[str], images, *, size, resize_first, antialias,
                 batch_size: int, device: str) -> dict[str, np.ndarray]:
    """Features ``{node: [N, F] float64}`` of ``images`` ([N,3,H,W] float tensor), batched."""
    import torch

    spec = NETWORKS[network]
    mean, std = spec["norm"]
    if network == "clip":
        fn = lambda x: {"encode_image": model.encode_image(x)}  # noqa: E731
    else:
        from torchvision.models.feature_extraction import create_feature_extractor

        import warnings

        with warnings.catch_warnings():
            # inception's train/eval graphs differ (aux head); we only ever run eval mode
            warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
            extractor = create_feature_extractor(model, return_nodes=list(nodes)).eval()
        fn = extractor
    out: dict[str, list[np.ndarray]] = {n: [] for n in nodes}
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size]
            x = _resize(_resize(x, resize_first, antialias), size, antialias)
            x = _normalize(x.to(device), mean, std)
            feats = fn(x)
            for n in nodes:
                f = feats[n]
                out[n].append(f.reshape(f.shape[0], -1).double().cpu().numpy())
    return {n: np.concatenate(v, axis=0) for n, v in out.items()}


def _check_batch(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"'batch_size' must be a positive integer; {batch_size!r} was provided")
    return int(batch_size)


def extract_features(network: str, layer, images, *, weights=None, batch_size: int = 32, size: int | None = None,
                     resize_first: int | None = 256, antialias: bool = False, clip_model=DEFAULT_CLIP_MODEL,
                     device: str = "cpu", seed: int = 0) -> np.ndarray:
    """Flattened ``[N, F]`` features of one network/layer with its recon_metrics §3 preprocessing
    (resize to the per-network size, ImageNet or CLIP mean/std, no centre crop)."""
    net = _canonical_network(network)
    node = _node_for(net, layer)
    batch_size = _check_batch(batch_size)
    size = _check_size("size", NETWORKS[net]["size"] if size is None else size)
    model, _ = _build_network(net, weights, clip_model=clip_model, seed=seed, device=device)
    imgs = _to_nchw("images", images)
    return _run_network(net, model, [node], imgs, size=size, resize_first=_check_size("resize_first", resize_first),
                        antialias=antialias, batch_size=batch_size, device=device)[node]


def feature_metric(network: str, layer, real, pred, *, weights=None, batch_size: int = 32, size: int | None = None,
                   resize_first: int | None = 256, antialias: bool = False, clip_model=DEFAULT_CLIP_MODEL,
                   device: str = "cpu", seed: int = 0, return_avg: bool = True):
    """One network metric of recon_metrics §3.

    * ``network="alexnet"``, ``layer`` 2 / 5 (nodes ``features.4`` / ``features.11``), ``"inception"``
      (``avgpool``), ``"clip"`` (``encode_image``): two-way identification (§6) of flattened features,
      a fraction in [0, 1], higher is better;
    * ``"efficientnet"`` (B1, ``avgpool``) and ``"swav"`` (ResNet-50, ``avgpool``): mean correlation
      distance 1 − r per (gt_i, rec_i) pair, lower is better.

    ``layer=None`` takes the only layer of single-layer networks. ``weights``: ``"random"`` (seeded random
    init, for tests), a local weights file (tensor state dict loaded with ``weights_only=True``; the OpenAI
    CLIP file via ``open_clip.load_openai_model``), or ``None`` → :class:`~brainenc.exceptions.MissingWeightsError`.
    ``clip_model``: open_clip architecture name for random init (default ``"ViT-L-14-quickgelu"``; a smaller
    name such as ``"ViT-B-32"`` for tests), or a ready module with ``encode_image``.
    """
    net = _canonical_network(network)
    node = _node_for(net, layer)
    batch_size = _check_batch(batch_size)
    size = _check_size("size", NETWORKS[net]["size"] if size is None else size)
    resize_first = _check_size("resize_first", resize_first)
    r, p = _pair_images(real, pred)
    model, _ = _build_network(net, weights, clip_model=clip_model, seed=seed, device=device)
    kw = dict(size=size, resize_first=resize_first, antialias=antialias, batch_size=batch_size, device=device)
    fr = _run_network(net, model, [node], r, **kw)[node]
    fp = _run_network(net, model, [node], p, **kw)[node]
    if NETWORKS[net]["score"] == "two_way":
        return two_way_identification(fr, fp, return_avg=return_avg)
    return _correlation_distance(fr, fp, return_avg=return_avg)


# ----------------------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for key, dist in (("numpy", "numpy"), ("scipy", "scipy"), ("torch", "torch"), ("torchvision", "torchvision"),
                      ("scikit-image", "scikit-image"), ("open_clip", "open_clip_torch"), ("clip", "clip")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def score_reconstructions(real, pred, metrics: Sequence[str] = tuple(METRIC_NAMES), *, weights=None,
                          blurry=None, blurry_blend: float = 0.25, resize_first: int | None = 256,
                          sizes: Mapping[str, int] | None = None, ssim_mode: str = "2d",
                          brain_diffuser_compat: bool = False, antialias: bool = False, batch_size: int = 32,
                          clip_model=DEFAULT_CLIP_MODEL, device: str = "cpu", seed: int = 0,
                          n_test: int | None = None, subjects: Sequence[Any] | None = None,
                          repeat_handling: str | None = None) -> dict:
    """Score reconstructions with the MindEye2 suite (recon_metrics §3, §10); each network runs once over
    all images (batched), AlexNet once for both layers.

    ``metrics``: names from :data:`~brainenc.metrics.RECONSTRUCTION_METRICS` (pixcorr, ssim, alexnet2, alexnet5, inception, clip,
    effnet, swav). ``weights``: ``"random"`` for every network, a mapping ``{network: path | "random"}``
    (network names as in ``NETWORKS``), or ``None`` (then any network metric raises
    :class:`~brainenc.exceptions.MissingWeightsError`). ``blurry``: optional low-level reconstructions (same layout as ``pred``);
    when given, the evaluated image is ``(1 − blurry_blend)·pred + blurry_blend·blurry`` (§2, 0.25 = MindEye2;
    ``blurry_blend=0`` = raw). ``sizes`` overrides entries of ``DEFAULT_SIZES``.
    ``brain_diffuser_compat``: every network at 224 and column-wise SSIM (§5; PixCorr/SSIM still at 425).
    ``n_test``: score only the first ``n_test`` pairs (MindEye2 reports the first 1000 shared images;
    fewer images than ``n_test`` is an error, not a silent shortfall).

    Returns ``{"n", "metrics": {name: value}, "directions", "variants", "weights", "versions", "options",
    "subjects", "repeat_handling"}``; identification values are fractions in [0, 1].
    To score several prediction sets (a model and its controls) against the same images with one
    network build and one pass over the real images, use :func:`score_reconstruction_sets`.
    """
    sets = {"pred": pred}
    blurs = None if blurry is None else {"pred": blurry}
    out = score_reconstruction_sets(real, sets, metrics, weights=weights, blurry=blurs, blurry_blend=blurry_blend,
                                    resize_first=resize_first, sizes=sizes, ssim_mode=ssim_mode,
                                    brain_diffuser_compat=brain_diffuser_compat, antialias=antialias,
                                    batch_size=batch_size, clip_model=clip_model, device=device, seed=seed,
                                    n_test=n_test, subjects=subjects, repeat_handling=repeat_handling)
    res = out.pop("sets")["pred"]
    out["metrics"] = res["metrics"]
    out["options"]["blurry_blend"] = res["blurry_blend"]
    return out


def score_reconstruction_sets(real, preds: Mapping[str, Any], metrics: Sequence[str] = tuple(METRIC_NAMES), *,
                              weights=None, blurry: Mapping[str, Any] | None = None, blurry_blend: float = 0.25,
                              resize_first: int | None = 256, sizes: Mapping[str, int] | None = None,
                              ssim_mode: str = "2d", brain_diffuser_compat: bool = False, antialias: bool = False,
                              batch_size: int = 32, clip_model=DEFAULT_CLIP_MODEL, device: str = "cpu",
                              seed: int = 0, n_test: int | None = None, subjects: Sequence[Any] | None = None,
                              repeat_handling: str | None = None, progress: bool = False) -> dict:
    """Score several named prediction sets (e.g. ``{"recon": ..., "shuffled": ...}``) against ``real``.

    Options as :func:`score_reconstructions`; ``blurry`` maps set names to their low-level images (sets
    without an entry are scored raw). Each network is built once and runs once over ``real`` and once
    over every set. Returns the same record with ``"sets": {name: {"metrics": {...}, "blurry_blend": b}}``
    in place of ``"metrics"``.
    """
    metrics = list(metrics)
    for m in metrics:
        if m not in METRIC_NAMES:
            raise ConfigError(f"'metrics' entries must be among {list(METRIC_NAMES)}; {m!r} was provided")
    if not metrics:
        raise ConfigError("'metrics' must name at least one metric")
    if not isinstance(preds, Mapping) or not preds:
        raise ConfigError("'preds' must be a non-empty mapping {set name: images}")
    blurry = dict(blurry or {})
    for k in blurry:
        if k not in preds:
            raise ConfigError(f"'blurry' key {k!r} is not a prediction set; sets are {sorted(preds)}")
    ssim_mode = _check_mode(ssim_mode) if not brain_diffuser_compat else "columnwise_legacy"
    batch_size = _check_batch(batch_size)
    resize_first = _check_size("resize_first", resize_first)
    eff_sizes = dict(DEFAULT_SIZES)
    if brain_diffuser_compat:
        eff_sizes.update({k: 224 for k in NETWORKS})
    for k, v in dict(sizes or {}).items():
        if k not in eff_sizes:
            raise ConfigError(f"'sizes' keys must be among {sorted(eff_sizes)}; {k!r} was provided")
        eff_sizes[k] = _check_size(f"sizes[{k!r}]", v)
    if not (isinstance(blurry_blend, (int, float)) and 0.0 <= float(blurry_blend) <= 1.0):
        raise ConfigError(f"'blurry_blend' must be a number in [0, 1]; {blurry_blend!r} was provided")
    if n_test is not None and (isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or n_test < 2):
        raise ConfigError(f"'n_test' must be an integer >= 2 or None; {n_test!r} was provided")

    r = None
    ps: dict[str, Any] = {}
    blends: dict[str, float] = {}
    for name, pred in preds.items():
        r_i, p = _pair_images(real, pred)
        if r is None:
            r = r_i
        if n_test is not None:
            if r_i.shape[0] < n_test:
                raise DataFormatError(f"n_test={n_test} but set {name!r} has only {r_i.shape[0]} image pairs")
            p = p[:n_test]
        blends[name] = 0.0
        if name in blurry:
            bl = _to_nchw("blurry", blurry[name])
            if n_test is not None:
                bl = bl[:n_test]
            if bl.shape[0] != p.shape[0]:
                raise DataFormatError(f"'blurry[{name!r}]' must hold {p.shape[0]} images; got {bl.shape[0]}")
            # MindEye2 blends at the first-resize resolution (§2); without it, blurry is resized to pred's H, W
            if resize_first is not None:
                p, bl = _resize(p, resize_first, antialias), _resize(bl, resize_first, antialias)
            elif bl.shape[-2:] != p.shape[-2:]:
                from torchvision.transforms import InterpolationMode
                from torchvision.transforms import functional as TF

                bl = TF.resize(bl, list(p.shape[-2:]), interpolation=InterpolationMode.BILINEAR,
                               antialias=antialias)
            if bl.shape != p.shape:
                raise DataFormatError(f"'blurry' shape {tuple(bl.shape)} does not match 'pred' {tuple(p.shape)}")
            blends[name] = float(blurry_blend)
            p = (1.0 - blends[name]) * p + blends[name] * bl
        ps[name] = p
    if n_test is not None:
        r = r[:n_test]

    if isinstance(weights, Mapping):
        wmap = {}
        for k, v in weights.items():
            wmap[_canonical_network(k)] = v
    else:
        wmap = {k: weights for k in NETWORKS}

    results: dict[str, dict[str, float]] = {name: {} for name in ps}
    variants: dict[str, str] = {}
    weight_ids: dict[str, Any] = {}
    directions: dict[str, str] = {}
    if "pixcorr" in metrics:
        for name, p in ps.items():
            results[name]["pixcorr"] = pixcorr(r, p, size=eff_sizes["pixcorr"], resize_first=resize_first,
                                               antialias=antialias)
        variants["pixcorr"] = f"mindeye2: resize {eff_sizes['pixcorr']} bilinear, Pearson per image, mean"
        directions["pixcorr"] = "higher"
    if "ssim" in metrics:
        for name, p in ps.items():
            results[name]["ssim"] = ssim(r, p, mode=ssim_mode, size=eff_sizes["ssim"], resize_first=resize_first,
                                         antialias=antialias)
        variants["ssim"] = (f"{ssim_mode}: resize {eff_sizes['ssim']}, rgb2gray, gaussian sigma=1.5, "
                            "population covariance, data_range=1.0")
        directions["ssim"] = "higher"

    # group the feature metrics by network so each network runs once
    by_net: dict[str, list[tuple[str, str]]] = {}
    for m in metrics:
        net, layer = METRIC_NAMES[m]
        if net is not None:
            by_net.setdefault(net, []).append((m, _node_for(net, layer)))
    from brainenc._utils.logging import progress as _progress

    net_items = list(by_net.items())
    for net, items in (_progress(net_items, desc="metric networks") if progress else net_items):
        model, ident = _build_network(net, wmap.get(net), clip_model=clip_model, seed=seed, device=device)
        weight_ids[net] = ident
        nodes = sorted({node for _, node in items})
        kw = dict(size=eff_sizes[net], resize_first=resize_first, antialias=antialias, batch_size=batch_size,
                  device=device)
        fr = _run_network(net, model, nodes, r, **kw)
        for name, p in ps.items():
            fp = _run_network(net, model, nodes, p, **kw)
            for m, node in items:
                if NETWORKS[net]["score"] == "two_way":
                    results[name][m] = two_way_identification(fr[node], fp[node])
                else:
                    results[name][m] = _correlation_distance(fr[node], fp[node])
        del model
        for m, node in items:
            if NETWORKS[net]["score"] == "two_way":
                variants[m] = f"two-way identification (pearson, ties fail) on {net}:{node}, resize {eff_sizes[net]}"
                directions[m] = "higher"
            else:
                variants[m] = f"mean correlation distance on {net}:{node}, resize {eff_sizes[net]}"
                directions[m] = "lower"

    return {
        "n": int(r.shape[0]),
        "sets": {name: {"metrics": {m: results[name][m] for m in metrics}, "blurry_blend": blends[name]}
                 for name in ps},
        "directions": {m: directions[m] for m in metrics},
        "variants": {m: variants[m] for m in metrics},
        "weights": weight_ids,
        "versions": _versions(),
        "options": {
            "resize_first": resize_first,
            "sizes": {k: eff_sizes[k] for k in eff_sizes},
            "ssim_mode": ssim_mode,
            "brain_diffuser_compat": bool(brain_diffuser_compat),
            "antialias": bool(antialias),
            "n_test": n_test,
            "clip_model": clip_model if isinstance(clip_model, str) else type(clip_model).__name__,
            "identification_scale": "fraction (x100 for the papers' %)",
        },
        "subjects": list(subjects) if subjects is not None else None,
        "repeat_handling": repeat_handling,
    }
