"""Stimulus composition for the simulated NSD subject.

Scenes are built from real photographs shipped inside installed packages (scikit-image,
scikit-learn, matplotlib; see ``shared/reference/offline_assets.md`` §1): a natural
background photo, plus objects of five categories (faces, places/buildings, bodies, words,
food) pasted at random positions and sizes, so that category content moves around the image.
Every scene is a pure function of ``(seed, nsd_id)``: the same 73k id renders the same pixels
for every subject and every run.

The module also computes the two image descriptors the simulated brain responds to:
a local band-pass *contrast energy* map (early visual cortex) and the visible *area fraction*
of every category (category-selective cortex).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from brainenc.exceptions import MissingDependencyError

__all__ = [
    "CATEGORIES",
    "IMAGE_SIZE",
    "ENERGY_GRID",
    "Placement",
    "Scene",
    "render_scene",
    "contrast_energy",
    "source_inventory",
]

IMAGE_SIZE = 425
#: side of the contrast-energy grid (pixels of the map cover the full 425 px image)
ENERGY_GRID = 64
#: object categories in a fixed order; index = category code in the ground truth
CATEGORIES = ("faces", "places", "bodies", "words", "food")
#: probability that an image holds at least one object of each category (independent draws)
CATEGORY_PROB = (0.4, 0.35, 0.35, 0.35, 0.3)

_WORDS = (
    "house", "river", "table", "green", "light", "music", "paper", "stone", "water", "night",
    "train", "apple", "cloud", "bread", "chair", "plant", "smile", "dream", "north", "ocean",
    "tiger", "piano", "storm", "glass", "sugar", "brain", "voice", "field", "quiet", "metro",
    "STOP", "EXIT", "OPEN", "CAFE", "HOTEL", "SALE", "PARK", "BUS", "TAXI", "BANK",
)
_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
          "DejaVuSansMono-Bold.ttf")


@dataclass(frozen=True)
class Placement:
    """One pasted object: category code, source index and its pixel box ``[y0, y1) x [x0, x1)``."""

    category: int
    source: int
    y0: int
    x0: int
    y1: int
    x1: int


@dataclass
class Scene:
    """A rendered scene.

    Attributes
    ----------
    image : uint8 ndarray, shape (425, 425, 3)
    background : int
        Index into ``source_inventory()["backgrounds"]``.
    placements : list of Placement
        In paste order (later objects occlude earlier ones).
    category_fraction : float64 ndarray, shape (n_categories,)
        Visible area fraction of each category (after occlusion), order of ``CATEGORIES``.
    """

    image: np.ndarray
    background: int
    placements: list
    category_fraction: np.ndarray


def _rgb(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        x = np.clip(np.asarray(x, dtype=np.float64) * (255.0 if x.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    return np.ascontiguousarray(x[:, :, :3])


@functools.lru_cache(maxsize=1)
def _sources() -> dict:
    """Load the packaged photos once; returns category name -> list of uint8 RGB crops."""
    import skimage.data as skd
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = np.asarray(Image.open(fh).convert("RGB"))
    # scikit-learn's sample photos, read from the package folder (importing sklearn costs seconds)
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("scikit-learn is needed for its sample photos: pip install scikit-learn")
    img_dir = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    china, flower = (np.asarray(Image.open(img_dir / f"{n}.jpg").convert("RGB")) for n in ("china", "flower"))
    astro = skd.astronaut()
    coffee = skd.coffee()
    rocket = skd.rocket()
    moto = skd.stereo_motorcycle()[0]
    lfw = skd.lfw_subset()[:100]  # first 100 entries are faces, the rest non-faces

    faces = [astro[20:195, 145:305], hopper[105:345, 150:375]]
    faces += [_rgb(f) for f in lfw]
    bodies = [astro[150:512, 15:370], hopper[300:600, 0:512], astro[0:512, 20:370],
              hopper[100:600, 60:470]]
    places = [china[20:427, 0:640], china[0:300, 100:540], rocket[0:427, 120:520],
              rocket[150:427, 0:640], _rgb(skd.brick())]
    food = [coffee[20:380, 80:520], coffee[100:400, 0:600], coffee[0:250, 300:600]]
    backgrounds = [skd.chelsea(), moto, flower, skd.hubble_deep_field(),
                   _rgb(skd.grass()), _rgb(skd.gravel()), _rgb(skd.moon()), _rgb(skd.coins()),
                   skd.retina()]
    # backgrounds are at most 425 px after cropping: pre-shrink big photos once (min side 480)
    backgrounds = [_shrink(b, 480) for b in backgrounds]
    return {
        "faces": [np.ascontiguousarray(f) for f in faces],
        "places": [np.ascontiguousarray(p) for p in places],
        "bodies": [np.ascontiguousarray(b) for b in bodies],
        "words": list(_WORDS),
        "food": [np.ascontiguousarray(f) for f in food],
        "backgrounds": [np.ascontiguousarray(b) for b in backgrounds],
    }


def _shrink(img: np.ndarray, min_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    f = min_side / min(h, w)
    if f >= 1:
        return np.ascontiguousarray(img)
    return _resize(np.ascontiguousarray(img), int(round(h * f)), int(round(w * f)))


def source_inventory() -> dict:
    """Names and counts of the source material (for the ground-truth record).

    Returns
    -------
    dict
        ``{"faces": n, "places": n, "bodies": n, "words": [...], "food": n, "backgrounds": n}``.
    """
    src = _sources()
    return {k: (list(v) if k == "words" else len(v)) for k, v in src.items()}


@functools.lru_cache(maxsize=64)
def _font(name: str, size: int):
    from matplotlib import get_data_path
    from PIL import ImageFont

    return ImageFont.truetype(f"{get_data_path()}/fonts/ttf/{name}", size)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


@functools.lru_cache(maxsize=256)
def _ellipse_alpha(h: int, w: int) -> np.ndarray:
    yy = (np.arange(h) + 0.5) / h * 2 - 1
    xx = (np.arange(w) + 0.5) / w * 2 - 1
    r = np.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    return np.clip((1.0 - r) / 0.15, 0.0, 1.0)  # feathered edge


@functools.lru_cache(maxsize=256)
def _rect_alpha(h: int, w: int) -> np.ndarray:
    e = max(2, min(h, w) // 25)
    ay = np.clip(np.minimum(np.arange(h) + 1, h - np.arange(h)) / e, 0, 1)
    ax = np.clip(np.minimum(np.arange(w) + 1, w - np.arange(w)) / e, 0, 1)
    return np.minimum(ay[:, None], ax[None, :])


def _random_crop(rng: np.random.Generator, img: np.ndarray, min_frac: float) -> np.ndarray:
    h, w = img.shape[:2]
    fh, fw = rng.uniform(min_frac, 1.0, size=2)
    ch, cw = max(8, int(h * fh)), max(8, int(w * fw))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    return img[y0:y0 + ch, x0:x0 + cw]


def _jitter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Random horizontal flip and per-channel gain (colour/brightness jitter)."""
    if rng.random() < 0.5:
        img = img[:, ::-1]
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.9, 1.1, size=3)
    return np.clip(img.astype(np.float32) * gain.astype(np.float32), 0, 255)


def _render_word(rng: np.random.Generator, word: str, h_target: int) -> tuple[np.ndarray, np.ndarray]:
    """Render ``word`` as an RGB patch of height ~``h_target`` and its glyph-based alpha."""
    from PIL import Image, ImageDraw

    size = int(np.clip(h_target, 10, 200)) // 4 * 4 + 4  # few distinct sizes -> font cache hits
    font = _font(_FONTS[int(rng.integers(len(_FONTS)))], size)
    x0, y0, x1, y1 = font.getbbox(word)
    w, h = max(1, x1 - x0), max(1, y1 - y0)
    pad = max(2, size // 6)
    mask = Image.new("L", (w + 2 * pad, h + 2 * pad), 0)
    ImageDraw.Draw(mask).text((pad - x0, pad - y0), word, font=font, fill=255)
    glyph = np.asarray(mask, dtype=np.float32) / 255.0
    ink = rng.integers(0, 256, size=3).astype(np.float32)
    if rng.random() < 0.5:  # text on a plain sign
        paper = 255.0 - ink
        rgb = paper[None, None, :] * (1 - glyph[..., None]) + ink[None, None, :] * glyph[..., None]
        alpha = _rect_alpha(*glyph.shape)
    else:  # bare text over the scene; dilate so thin strokes stay visible
        rgb = np.broadcast_to(ink, glyph.shape + (3,)).astype(np.float32)
        alpha = ndimage.maximum_filter(glyph, size=3)
    return rgb, alpha


def render_scene(seed: int, nsd_id: int) -> Scene:
    """Render the scene of 73k id ``nsd_id`` (0-based) for design seed ``seed``.

    Parameters
    ----------
    seed : int
        Simulation seed.
    nsd_id : int
        0-based NSD 73k id; the image is a pure function of ``(seed, nsd_id)``.

    Returns
    -------
    Scene
        ``image`` uint8 (425, 425, 3), the placements and visible category fractions.
    """
    rng = np.random.default_rng([int(seed), int(nsd_id), 0x5CE7E])
    src = _sources()
    S = IMAGE_SIZE
    bg_index = int(rng.integers(len(src["backgrounds"])))
    bg = _random_crop(rng, src["backgrounds"][bg_index], 0.45)
    canvas = _jitter(rng, _resize(np.ascontiguousarray(bg), S, S))
    labels = np.full((S, S), -1, dtype=np.int8)

    present = [c for c, p in enumerate(CATEGORY_PROB) if rng.random() < p]
    # one or two objects for a present category; shuffled paste order
    objects = [c for c in present for _ in range(1 + int(rng.random() < 0.25))]
    rng.shuffle(objects)
    placements = []
    for c in objects:
        name = CATEGORIES[c]
        side = int(S * rng.uniform(0.2, 0.6))
        if name == "words":
            k = int(rng.integers(len(src["words"])))
            rgb, alpha = _render_word(rng, src["words"][k], max(12, int(side / 2.5)))
            h, w = rgb.shape[:2]
            if w > S - 2:  # never wider than the image
                new_w = S - 2
                new_h = max(4, int(h * new_w / w))
                rgb = _resize(np.clip(rgb, 0, 255).astype(np.uint8), new_h, new_w).astype(np.float32)
                alpha = np.asarray(_resize((alpha * 255).astype(np.uint8), new_h, new_w), np.float32) / 255
                h, w = new_h, new_w
        else:
            k = int(rng.integers(len(src[name])))
            crop = _random_crop(rng, src[name][k], 0.8 if name == "faces" else 0.6)
            aspect = crop.shape[0] / crop.shape[1]
            h, w = (side, max(8, int(side / aspect))) if aspect >= 1 else (max(8, int(side * aspect)), side)
            h, w = min(h, S), min(w, S)
            rgb = _jitter(rng, _resize(np.ascontiguousarray(crop), h, w))
            alpha = _ellipse_alpha(h, w) if name in ("faces", "bodies", "food") else _rect_alpha(h, w)
        y0 = int(rng.integers(0, S - h + 1))
        x0 = int(rng.integers(0, S - w + 1))
        region = canvas[y0:y0 + h, x0:x0 + w]
        a = alpha[..., None]
        canvas[y0:y0 + h, x0:x0 + w] = region * (1 - a) + rgb * a
        labels[y0:y0 + h, x0:x0 + w][alpha > 0.5] = c
        placements.append(Placement(c, k, y0, x0, y0 + h, x0 + w))
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(CATEGORIES))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(image=image, background=bg_index, placements=placements,
                 category_fraction=counts.astype(np.float64) / (S * S))


def contrast_energy(images: np.ndarray, grid: int = ENERGY_GRID) -> np.ndarray:
    """Local band-pass contrast energy of images, pooled on a ``grid x grid`` map.

    Luminance is resampled to 128 x 128, band-pass filtered with a difference of Gaussians
    (sigma 1 and 4 px at 128 px, i.e. ~3 cycles/degree for NSD's 8.4 deg images), squared
    and averaged in ``grid x grid`` blocks.

    Parameters
    ----------
    images : uint8 ndarray, shape (n_images, H, W, 3) or (H, W, 3)
    grid : int
        Side of the output map; must divide 128.

    Returns
    -------
    float32 ndarray, shape (n_images, grid, grid)
        Energy in units of (luminance / 255)^2; row 0 is the top of the image.
    """
    from PIL import Image

    images = np.asarray(images)
    single = images.ndim == 3
    if single:
        images = images[None]
    if 128 % grid:
        raise ValueError(f"'grid' must divide 128; {grid} was provided")
    out = np.empty((len(images), grid, grid), dtype=np.float32)
    f = 128 // grid
    for i, img in enumerate(images):
        lum = np.asarray(Image.fromarray(img).convert("L").resize((128, 128), Image.BOX), dtype=np.float64) / 255.0
        band = ndimage.gaussian_filter(lum, 1.0, mode="reflect") - ndimage.gaussian_filter(lum, 4.0, mode="reflect")
        e = band * band
        out[i] = e.reshape(grid, f, grid, f).mean(axis=(1, 3))
    return out[0] if single else out
