"""Synthetic "shapes" instance-segmentation data in COCO format: the embedded benchmark.

COCO cannot be downloaded here, so this module draws a proxy task that keeps what makes COCO hard
for instance segmentation while staying small enough to train on two CPU cores:

* 10 object classes told apart by SHAPE (circle, ellipse, square, triangle, arrow, star, ring,
  cross, heart, crescent), each instance with its own colour, texture (flat, stripes, gradient,
  checker, noise), rotation and aspect jitter, so colour never identifies the class;
* textured, cluttered backgrounds (smooth noise, gradients, stripes) with distractors that are not
  objects (irregular blobs, straight lines, thin scribbles) and sensor noise;
* 1-20 instances per image (preset dependent), drawn mostly back-to-front by size with random
  depth swaps, so later instances partially occlude earlier ones.  The annotation is the VISIBLE
  mask; an instance whose visible area falls below ``MIN_VISIBLE_AREA`` pixels or
  ``MIN_VISIBLE_FRAC`` of its full area is removed from the scene entirely (not drawn), so no
  unannotated fragments remain in the image;
* object diameters drawn log-uniformly, so every split fills COCO's small (< 32^2 px), medium and
  large (> 96^2 px) area ranges; ``write_dataset`` prints and returns the counts.

Annotation format: COCO instances JSON.  ``segmentation`` is compressed RLE (``counts`` a str) of
the visible mask, exactly what was drawn; RLE rather than polygons because rings and occluded shapes
have holes.  ``bbox`` ([x, y, w, h]) and ``area`` are of the visible mask; ``iscrowd`` is 0.
Category ids are NON-contiguous on purpose, ``id = 2 * k + 1`` for the class's index k in
``CLASSES`` (circle=1, ellipse=3, ..., crescent=19), so every consumer must map ids to contiguous
labels and back; a preset that uses a subset of the classes keeps the same ids.
Images are ``SPLIT/NNNNNN.png`` (RGB) with NNNNNN the image id: 1..N in train and val; a held-out
``test`` split (presets with ``num_test``, drawn from its own ``test_seed``) numbers its images from
``TEST_ID_BASE + 1``, so no test image id or file name is also a val or train one.  The shorter image side is
``size``; presets may also draw landscape/portrait images (aspect ratios 1.25 and 0.8), which keeps
aspect-ratio grouping honest.

Output is byte-identical for the same arguments: every image has its own random generator seeded
from (seed, split, index) (test_seed for the test split), so the result does not depend on the number of worker processes.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from comask.errors import DataError

# Bump when the drawing changes, so that `ensure_synth` regenerates sets written by older code.
GENERATOR_VERSION = 2

CLASSES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "square",
    "triangle",
    "arrow",
    "star",
    "ring",
    "cross",
    "heart",
    "crescent",
)


def category_id(name: str) -> int:
    """COCO category id of a class: 1, 3, 5, ... (non-contiguous on purpose)."""
    return 2 * CLASSES.index(name) + 1


# The standard splits, defined here and nowhere else.  Generator knobs: `classes` (names from
# CLASSES), `instances` [min, max] drawn per image (before occlusion drops some), `area` [lo, hi]
# log-uniform object areas as fractions of size^2, `large_prob` the chance that an image also holds
# one object with area in `large_area` (fractions of size^2; one at most, two would bury each other),
# `aspect_ratios` image width/height choices (the shorter side is always `size`).
#
# shapes-bench (the accuracy benchmark): shorter side 160 px.  128-192 px is
#   the practical range for CPU training, and 192 -> 128 px saves only ~1.36x per iteration,
#   while COCO's "large" range needs VISIBLE objects > 96^2 px = 36% of a 160^2 image (56% of 128^2,
#   where only a few shapes can reach it); 160 px keeps all three ranges populated with normal
#   scenes.  All 10 classes, 1-20 instances (about 10 visible per image; COCO has ~7).  2000
#   training images are more than a 2-core budget of a few thousand image-iterations consumes;
#   200 validation images hold ~2000 instances (1109 small, 723 medium, 138 large), enough for
#   stable AP / APs / APm / APl, and evaluate in about a minute on the CPU.  Model choices (options,
#   test size, thresholds, schedules) are made on val; the reported numbers are on the 500 held-out
#   `test` images, drawn by the same generator from their own seed (`test_seed`), which no
#   choice has seen.
# demo (`comask demo`, 15 minutes on 2 cores): same generator, clutter and occlusion on, but 128 px
#   square images, 4 classes (circle, triangle, star, ring: round, angular, spiky and holed), 1-10
#   instances and a higher minimum object area (0.02 * 128^2 = 328 px), so that a small CPU model can
#   reach good masks within the budget.
PRESETS: dict[str, dict[str, Any]] = {
    "shapes-bench": {
        "num_train": 2000,
        "num_val": 200,
        "num_test": 500,
        "size": 160,
        "seed": 2024,
        "test_seed": 4202,
        "classes": list(CLASSES),
        "instances": [1, 20],
        "area": [0.006, 0.2],
        "large_prob": 0.9,
        "large_area": [0.5, 1.0],
        "aspect_ratios": [1.0, 1.25, 0.8],
    },
    "demo": {
        "num_train": 1000,
        "num_val": 100,
        "size": 128,
        "seed": 7,
        "classes": ["circle", "triangle", "star", "ring"],
        "instances": [1, 10],
        "area": [0.02, 0.3],
        "large_prob": 0.9,
        "large_area": [0.65, 1.0],
        "aspect_ratios": [1.0],
    },
}
# demo-pretrain: the demo generator with another seed and 4x the images, for the <= 10 MB checkpoint that
# `comask demo` starts from (docs/PRETRAINED.md); its images never overlap the demo's validation set.
PRESETS["demo-pretrain"] = {**PRESETS["demo"], "num_train": 4000, "num_val": 100, "seed": 1001}

# Generator settings used when no preset is named (the bench's, minus its sizes and seed).
_GEN_KEYS = ("classes", "instances", "area", "large_prob", "large_area", "aspect_ratios")
_DEFAULT_GEN = {k: PRESETS["shapes-bench"][k] for k in _GEN_KEYS}

_PLACE_TRIES = 6
MIN_VISIBLE_AREA = 16  # pixels; smaller fragments are not recognisable at these image sizes
MIN_VISIBLE_FRAC = 0.15  # of the instance's unoccluded, in-image area
SMALL_MAX = 32**2  # COCO area ranges
LARGE_MIN = 96**2
_MARKER = ".synth-complete.json"
_SPLITS = {"train": 0, "val": 1, "test": 2}
# the test split's image ids (and file names) start above this, so they never coincide with val's or train's
TEST_ID_BASE = 100000
_ID_BASE = {"train": 0, "val": 0, "test": TEST_ID_BASE}


# ----------------------------------------------------------------------------------------------
# Shapes: implicit inside-tests in a unit frame (the shape fits in the unit disc), evaluated on the
# instance's pixel grid after undoing its rotation and aspect scaling.  All vectorised in numpy.
# ----------------------------------------------------------------------------------------------


def _regular_polygon(u: np.ndarray, v: np.ndarray, n: int, phase: float) -> np.ndarray:
    # Intersection of n half-planes whose normals point at the edge midpoints.
    ang = phase + (np.arange(n) + 0.5) * (2 * math.pi / n)
    proj = u[..., None] * np.cos(ang) + v[..., None] * np.sin(ang)
    return proj.max(axis=-1) <= math.cos(math.pi / n)


def _star(u: np.ndarray, v: np.ndarray, inner: float, points: int = 5) -> np.ndarray:
    # Fold the angle into one half-sector [0, pi/points]; there the boundary is the segment from the
    # outer vertex (1, 0) to the inner vertex at angle pi/points.
    half = math.pi / points
    r = np.hypot(u, v)
    a = np.mod(np.arctan2(v, u) + math.pi / 2, 2 * half)  # +pi/2: a point of the star faces up
    a = np.abs(a - half)
    a = half - a
    px, py = r * np.cos(a), r * np.sin(a)
    x2, y2 = inner * math.cos(half), inner * math.sin(half)
    nx, ny = y2, 1.0 - x2  # normal of the edge (1,0)->(x2,y2), pointing away from the origin
    return nx * (px - 1.0) + ny * py <= 0.0


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """Inside-test of shape `name`; `p` in [0, 1) is a per-instance shape parameter."""
    r2 = u * u + v * v
    if name in ("circle", "ellipse"):  # the ellipse's elongation comes from its aspect range
        return r2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.7071
    if name == "triangle":
        return _regular_polygon(u, v, 3, math.pi / 2 - math.pi / 3)
    if name == "arrow":
        w = 0.14 + 0.08 * p
        shaft = (u >= -0.9) & (u <= 0.15) & (np.abs(v) <= w)
        head = (u >= 0.1) & (np.abs(v) <= 0.6 * (0.95 - u) / 0.85)
        return shaft | head
    if name == "star":
        return _star(u, v, inner=0.38 + 0.12 * p)
    if name == "ring":
        inner = 0.45 + 0.2 * p
        return (r2 <= 1.0) & (r2 >= inner * inner)
    if name == "cross":
        w = 0.22 + 0.1 * p
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= 0.9)) | ((av <= w) & (au <= 0.9))
    if name == "heart":
        x, y = 1.25 * u, -1.25 * v + 0.1
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if name == "crescent":
        off = 0.35 + 0.2 * p
        return (r2 <= 1.0) & ((u - off) ** 2 + v * v > 0.8**2)
    raise ValueError(f"unknown shape {name!r}")


def _unit_areas() -> dict[str, float]:
    # Area of each shape in its unit frame (p = 0.5), so that a target pixel area gives a radius.
    g = (np.arange(400, dtype=np.float32) + 0.5) / 200.0 - 1.0
    u, v = g[None, :], g[:, None]
    return {n: float(np.count_nonzero(_shape_mask(n, u, v, 0.5))) / 200.0**2 for n in CLASSES}


_FILL = _unit_areas()

# Aspect (x-scale / y-scale) range per class: circles stay round, ellipses are clearly elongated.
_ASPECT = {"circle": (0.92, 1.08), "ellipse": (0.35, 0.6), "square": (0.8, 1.25)}
_ASPECT_DEFAULT = (0.75, 1.33)


# ----------------------------------------------------------------------------------------------
# Colours, textures, backgrounds
# ----------------------------------------------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.15, 1.0), rng.uniform(0.2, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _texture(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, base: np.ndarray) -> np.ndarray:
    """(n, 3) float colours of n object pixels at frame coordinates (u, v): the texture is defined
    in the instance's own frame, so it rotates and stretches with the object."""
    second = _random_colour(rng)
    kind = rng.integers(0, 5)
    psi = rng.uniform(0, 2 * math.pi)
    t = u * math.cos(psi) + v * math.sin(psi)
    if kind == 0:  # flat
        w = np.zeros(u.shape, np.float32)
    elif kind == 1:  # stripes
        w = (np.sin(t * rng.uniform(6.0, 18.0)) > 0).astype(np.float32)
    elif kind == 2:  # linear gradient
        w = np.clip((t + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)
    elif kind == 3:  # checker
        k = rng.uniform(2.0, 5.0)
        w = ((np.floor(u * k) + np.floor(v * k)) % 2).astype(np.float32)
    else:  # speckle
        w = (rng.random(u.shape, dtype=np.float32) < rng.uniform(0.2, 0.5)).astype(np.float32)
    out = base + w[:, None] * (second - base)
    sigma = rng.uniform(0.0, 12.0)
    # Luminance grain (one draw per pixel, not per channel): a third of the cost, looks the same.
    out += (rng.standard_normal(u.shape, dtype=np.float32) * np.float32(sigma))[:, None]
    return out


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int) -> np.ndarray:
    # Random values on a coarse grid, bicubically upsampled: cheap low-frequency noise in [0, 1].
    gh, gw = max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w))
    grid = (rng.random((gh, gw, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
    up = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return up.reshape(h, w, channels)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1, c2 = _random_colour(rng), _random_colour(rng)
    kind = rng.integers(0, 3)
    if kind == 0:  # coloured smooth noise
        wgt = _smooth_noise(rng, h, w, int(rng.integers(3, 9)), 1)
        bg = c1 + wgt * (c2 - c1)
        bg += (_smooth_noise(rng, h, w, int(rng.integers(8, 20)), 3) - 0.5) * 60.0
    elif kind == 1:  # gradient with mottling
        psi = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xx * math.cos(psi) + yy * math.sin(psi)) / max(h, w)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        bg = c1 + t[..., None] * (c2 - c1)
        bg += (_smooth_noise(rng, h, w, int(rng.integers(10, 30)), 3) - 0.5) * 50.0
    else:  # soft stripes (like a floor or fabric)
        psi = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        s = np.sin((xx * math.cos(psi) + yy * math.sin(psi)) * rng.uniform(0.1, 0.5)) * 0.5 + 0.5
        bg = c1 + s[..., None] * (c2 - c1) * rng.uniform(0.3, 0.8)
        bg += (_smooth_noise(rng, h, w, int(rng.integers(4, 12)), 3) - 0.5) * 40.0
    return bg.astype(np.float32)


def _distractors(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    """Irregular blobs, straight lines and thin scribbles: clutter that is not an object."""
    h, w = bg.shape[:2]
    for _ in range(int(rng.integers(0, 5))):  # blobs: thresholded smooth noise in a random window
        bh, bw = int(rng.integers(h // 8, h // 2)), int(rng.integers(w // 8, w // 2))
        y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        field = _smooth_noise(rng, bh, bw, int(rng.integers(3, 6)), 1)[..., 0]
        yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
        fall = ((yy / bh - 0.5) ** 2 + (xx / bw - 0.5) ** 2) * 2.0  # fade out towards the window edge
        m = field - fall > rng.uniform(0.25, 0.45)
        region = bg[y0 : y0 + bh, x0 : x0 + bw]
        region[m] = region[m] * 0.3 + _random_colour(rng) * 0.7
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 7))):  # straight lines
        pts = [tuple(int(a) for a in rng.integers(0, (w, h))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(c) for c in _random_colour(rng)), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 4))):  # scribbles: smooth random walks
        n = int(rng.integers(6, 20))
        steps = np.cumsum(rng.normal(0, 1, (n, 2)) * 0.6, axis=0)
        ang = np.cumsum(steps[:, 0]) * 0.3
        d = rng.uniform(3, 10)
        xy = np.stack([np.cos(ang), np.sin(ang)], 1) * d
        xy = np.cumsum(xy, 0) + rng.uniform((0, 0), (w, h))
        draw.line(
            [(float(x), float(y)) for x, y in xy], fill=tuple(int(c) for c in _random_colour(rng)), width=1
        )
    return np.asarray(img, dtype=np.float32).copy()


# ----------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLITS[split], int(index)]))


def _keep_visible(shapes: list[dict], h: int, w: int) -> list[dict]:
    """Visibility from the front: an instance too occluded to recognise is removed from the scene (it does
    not occlude anything and is not drawn), so every drawn object is annotated. Sets each kept one's "vis"."""
    covered = np.zeros((h, w), bool)
    kept = []
    for sh in reversed(shapes):
        y0, y1, x0, x1 = sh["box"]
        cov = covered[y0:y1, x0:x1]
        vis = sh["m"] & ~cov
        va = int(np.count_nonzero(vis))
        if va < MIN_VISIBLE_AREA or va < MIN_VISIBLE_FRAC * sh["u"].size:
            continue
        sh["vis"] = vis
        cov |= sh["m"]
        kept.append(sh)
    kept.reverse()
    return kept


def render_image(
    gen: dict[str, Any], size: int, seed: int, split: str, index: int
) -> tuple[np.ndarray, list[dict]]:
    """Draw image `index` of `split`.

    Returns the (H, W, 3) uint8 RGB image and its kept instances in drawing order (back to front),
    each ``{"name", "mask" (full shape, HxW bool, unoccluded), "visible" (HxW bool)}``.
    """
    rng = _image_rng(seed, split, index)
    ar = float(gen["aspect_ratios"][int(rng.integers(0, len(gen["aspect_ratios"])))])
    h, w = (size, round(size * ar)) if ar >= 1 else (round(size / ar), size)
    img = _distractors(rng, _background(rng, h, w))

    lo, hi = gen["instances"]
    n = int(rng.integers(lo, hi + 1))
    names = [gen["classes"][int(i)] for i in rng.integers(0, len(gen["classes"]), n)]
    # Sizes are drawn as pixel AREAS (the quantity COCO's ranges are defined on), log-uniform over
    # the small/medium range, plus a share from a separate large range: log-uniform sizes alone put
    # almost nothing above 96^2 px once borders and occlusion take their part.
    a_lo, a_hi = (f * size * size for f in gen["area"])
    areas = np.exp(rng.uniform(math.log(a_lo), math.log(a_hi), n))
    # At most one large object per image: two of them would mostly bury each other.
    big = np.zeros(n, bool)
    big[0] = rng.random() < gen["large_prob"]
    l_lo, l_hi = (f * size * size for f in gen["large_area"])
    areas[big] = rng.uniform(l_lo, l_hi, int(big.sum()))
    # Mostly back-to-front by size (a scene has a few big things behind many small ones), with
    # noise so that small objects are sometimes occluded by large ones too.
    order = np.argsort(-np.log(areas) + rng.normal(0.0, 1.2, n), kind="stable")

    shapes = []
    placed = np.zeros((h, w), bool)
    for k in order:
        name = names[k]
        asp_lo, asp_hi = _ASPECT.get(name, _ASPECT_DEFAULT)
        aspect = math.exp(rng.uniform(math.log(asp_lo), math.log(asp_hi)))
        sx, sy = math.sqrt(aspect), 1.0 / math.sqrt(aspect)
        if name == "ellipse":  # keep r the semi-major axis
            sx, sy = sx / max(sx, sy), sy / max(sx, sy)
        r = math.sqrt(float(areas[k]) / (_FILL[name] * sx * sy))
        ext = r * max(sx, sy)
        # Objects may leave the image by up to 40% of their radius, big ones less.
        keep_in = 0.95 if big[k] else 0.6
        margin = min(keep_in * ext, w / 2), min(keep_in * ext, h / 2)
        cands = rng.uniform((margin[0], margin[1]), (w - margin[0], h - margin[1]), (_PLACE_TRIES, 2))
        # Of a few candidate centres take the one overlapping least with what is already placed:
        # occlusion stays partial (as in real scenes) instead of burying the big objects behind.
        best = None
        for cx, cy in cands:
            x0, x1 = max(0, int(cx - ext) - 1), min(w, int(cx + ext) + 2)
            y0, y1 = max(0, int(cy - ext) - 1), min(h, int(cy + ext) + 2)
            overlap = np.count_nonzero(placed[y0:y1, x0:x1]) / ((y1 - y0) * (x1 - x0))
            if best is None or overlap < best[0]:
                best = (overlap, float(cx), float(cy), x0, x1, y0, y1)
        _, cx, cy, x0, x1, y0, y1 = best
        theta = rng.uniform(0, 2 * math.pi)
        param = rng.random()
        # Pixel centres of the instance's window, rotated and scaled into the shape's unit frame.
        dx = (np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - cx))[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - cy))[:, None]
        c, s = math.cos(theta), math.sin(theta)
        u = dx * np.float32(c / (r * sx)) + dy * np.float32(s / (r * sx))
        v = dx * np.float32(-s / (r * sy)) + dy * np.float32(c / (r * sy))
        m = _shape_mask(name, u, v, param)
        placed[y0:y1, x0:x1] |= m
        shapes.append({"name": name, "m": m, "box": (y0, y1, x0, x1), "u": u[m], "v": v[m]})

    kept = _keep_visible(shapes, h, w)

    for sh in kept:
        y0, y1, x0, x1 = sh["box"]
        m = sh["m"]
        region = img[y0:y1, x0:x1]
        # Re-draw the colour until it stands out from what lies underneath (a camouflaged object
        # would be unlabelable); a few tries, then accept.
        under = region[m].mean(axis=0)
        for _ in range(4):
            base = _random_colour(rng)
            if np.abs(base - under).sum() > 90:
                break
        region[m] = _texture(rng, sh["u"], sh["v"], base)

    sensor_noise = np.float32(rng.uniform(1.0, 6.0))
    img += rng.standard_normal(img.shape, dtype=np.float32) * sensor_noise
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    insts = []
    for sh in kept:
        y0, y1, x0, x1 = sh["box"]
        full, vis = np.zeros((h, w), bool), np.zeros((h, w), bool)
        full[y0:y1, x0:x1] = sh["m"]
        vis[y0:y1, x0:x1] = sh["vis"]
        insts.append({"name": sh["name"], "mask": full, "visible": vis})
    return out, insts


def _encode(visible: np.ndarray) -> tuple[dict, list[float], int]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    bbox = [float(x) for x in mask_utils.toBbox(rle)]
    area = int(mask_utils.area(rle))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}, bbox, area


def _make_one(job: tuple) -> tuple[dict, list[dict]]:
    """Render, write the PNG, return the image record and its annotations (ids filled in later)."""
    gen, size, seed, split, index, out_dir = job
    img, insts = render_image(gen, size, seed, split, index)
    image_id = _ID_BASE[split] + index + 1
    fname = f"{image_id:06d}.png"
    # compress_level 1: PNGs of noisy images barely shrink at higher levels, and writing is the
    # slowest step of generation.
    Image.fromarray(img).save(Path(out_dir) / fname, format="PNG", compress_level=1)
    anns = []
    for inst in insts:
        seg, bbox, area = _encode(inst["visible"])
        anns.append(
            {
                "image_id": image_id,
                "category_id": category_id(inst["name"]),
                "segmentation": seg,
                "area": area,
                "bbox": bbox,
                "iscrowd": 0,
            }
        )
    return {"id": image_id, "file_name": fname, "height": img.shape[0], "width": img.shape[1]}, anns


# ----------------------------------------------------------------------------------------------
# Whole data sets
# ----------------------------------------------------------------------------------------------


def _resolve(num_train, num_val, size, seed, preset, num_test=None, test_seed=None) -> dict[str, Any]:
    if preset is not None and preset not in PRESETS:
        raise DataError(f"synthetic preset '{preset}' is unknown: use one of {', '.join(PRESETS)}")
    base = dict(PRESETS[preset]) if preset is not None else {**_DEFAULT_GEN}
    given = {"num_train": num_train, "num_val": num_val, "size": size, "seed": seed}
    for k, v in given.items():
        if v is not None:
            base[k] = int(v)
        elif k not in base:
            flag = "--" + k.replace("_", "-")
            raise DataError(f"comask data synth: {flag} is required when no --preset is given")
    base["num_test"] = int(num_test) if num_test is not None else int(base.get("num_test", 0))
    base["test_seed"] = int(test_seed) if test_seed is not None else base.get("test_seed")
    if base["num_test"] < 0:
        raise DataError("comask data synth: --num-test must be >= 0")
    if base["num_test"] and base["test_seed"] is None:
        raise DataError("comask data synth: --num-test needs --test-seed (the test split's own seed)")
    if base["num_test"] and base["test_seed"] == base["seed"]:
        raise DataError(f"comask data synth: --test-seed must differ from --seed ({base['seed']})")
    if base["num_train"] < 0 or base["num_val"] < 0:
        raise DataError("comask data synth: --num-train and --num-val must be >= 0")
    if base["size"] < 32:
        raise DataError(
            f"comask data synth: --size {base['size']} is too small; use >= 32 (>= 128 for large objects)"
        )
    base["preset"] = preset
    return base


def _area_counts(anns: Iterable[dict]) -> dict[str, int]:
    c = {"small": 0, "medium": 0, "large": 0}
    for a in anns:
        ar = a["area"]
        c["small" if ar < SMALL_MAX else "large" if ar > LARGE_MIN else "medium"] += 1
    return c


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def write_dataset(
    out: str | Path,
    num_train: int | None = None,
    num_val: int | None = None,
    size: int | None = None,
    seed: int | None = None,
    preset: str | None = None,
    *,
    workers: int | None = None,
    verbose: bool = True,
    num_test: int | None = None,
    test_seed: int | None = None,
) -> dict[str, Any]:
    """Write ``out/{train,val}/*.png`` and ``out/annotations/{train,val}.json`` (and ``test`` when the
    preset or `num_test` asks for test images: drawn from `test_seed`).

    Arguments given explicitly override the preset's.  Returns a summary: the resolved parameters,
    per split the numbers of images, instances, per-class and per-area-range counts, and the time
    taken; the counts are also printed when `verbose`.  `workers` (default: the usable CPUs) only
    changes the speed, never the bytes written.
    """
    p = _resolve(num_train, num_val, size, seed, preset, num_test, test_seed)
    gen = {k: p[k] for k in _GEN_KEYS}
    out = Path(out)
    categories = [{"id": category_id(n), "name": n, "supercategory": "shape"} for n in p["classes"]]
    n_workers = workers if workers is not None else _default_workers()
    total = p["num_train"] + p["num_val"] + p["num_test"]
    t0 = time.perf_counter()
    summary: dict[str, Any] = {
        "out": str(out),
        "preset": preset,
        "size": p["size"],
        "seed": p["seed"],
        "test_seed": p["test_seed"] if p["num_test"] else None,
        "classes": list(p["classes"]),
        "category_ids": [c["id"] for c in categories],
        "splits": {},
    }
    pool = None
    # Processes only pay off beyond a few dozen images.  fork where the OS has it: spawn would
    # re-import the caller's __main__ (breaking unguarded scripts), and the workers only touch
    # numpy / PIL / pycocotools, never torch, so threads held by the parent do not matter.
    if n_workers > 1 and total >= 64:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(n_workers)
    try:
        splits = [("train", p["num_train"], p["seed"]), ("val", p["num_val"], p["seed"])]
        if p["num_test"]:
            splits.append(("test", p["num_test"], p["test_seed"]))
        for split, count, split_seed in splits:
            img_dir = out / split
            img_dir.mkdir(parents=True, exist_ok=True)
            jobs = [(gen, p["size"], split_seed, split, i, str(img_dir)) for i in range(count)]
            results = pool.imap(_make_one, jobs, chunksize=16) if pool else map(_make_one, jobs)
            images, anns = [], []
            for rec, image_anns in results:
                images.append(rec)
                for a in image_anns:
                    anns.append({"id": len(anns) + 1, **a})
            doc = {
                "info": {
                    "description": "comask synthetic shapes (comask.data.synth)",
                    "version": GENERATOR_VERSION,
                    "preset": preset,
                    "size": p["size"],
                    "seed": split_seed,
                    "split": split,
                },
                "licenses": [],
                "images": images,
                "annotations": anns,
                "categories": categories,
            }
            (out / "annotations").mkdir(parents=True, exist_ok=True)
            (out / "annotations" / f"{split}.json").write_text(json.dumps(doc, separators=(",", ":")))
            per_class = {c["name"]: 0 for c in categories}
            for a in anns:
                per_class[CLASSES[(a["category_id"] - 1) // 2]] += 1
            summary["splits"][split] = {
                "images": len(images),
                "instances": len(anns),
                "areas": _area_counts(anns),
                "per_class": per_class,
            }
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    dt = time.perf_counter() - t0
    summary["seconds"] = round(dt, 3)
    summary["images_per_s"] = round(total / dt, 1) if dt > 0 else None
    if verbose:
        print(format_summary(summary), file=sys.stdout)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"synthetic shapes -> {s['out']} (preset {s['preset']}, size {s['size']}, seed {s['seed']}, "
        + (f"test seed {s['test_seed']}, " if s.get("test_seed") is not None else "")
        + f"{len(s['classes'])} classes)"
    ]
    for split, c in s["splits"].items():
        a = c["areas"]
        lines.append(
            f"  {split:5s}: {c['images']} images, {c['instances']} instances "
            f"(small {a['small']}, medium {a['medium']}, large {a['large']})"
        )
    if s.get("images_per_s") is not None:
        lines.append(f"  {s['seconds']:.1f} s, {s['images_per_s']:.0f} images/s")
    return "\n".join(lines)


def ensure_synth(preset: str, root: str | Path) -> Path:
    """Generate `preset` into `root` unless a complete copy of exactly that preset is there.

    Completeness is a marker file written last, holding the preset's parameters and the generator
    version; anything else (a half-written set, another preset, older generator) is regenerated.
    Generation goes to a temporary sibling folder that is renamed into place, so concurrent callers
    (DDP ranks) never see a partial set.
    """
    if preset not in PRESETS:
        raise DataError(f"data.synth.preset '{preset}' is unknown: use one of {', '.join(PRESETS)}")
    root = Path(root)
    want = {"preset": preset, "version": GENERATOR_VERSION, **PRESETS[preset]}
    if _marker_ok(root, want):
        return root
    if root.exists():
        ours = {"train", "val", "test", "annotations", _MARKER}
        extra = sorted(p.name for p in root.iterdir() if p.name not in ours)
        if extra:
            raise DataError(
                f"data.synth.root {root}: holds files that are not a synthetic set ({', '.join(extra[:3])}); "
                "point data.synth.root at an empty or new folder"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_dataset(tmp, preset=preset)
    (tmp / _MARKER).write_text(json.dumps(want, sort_keys=True))
    if _marker_ok(root, want):  # another process finished first
        shutil.rmtree(tmp)
        return root
    if root.exists():
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:
        if not _marker_ok(root, want):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _marker_ok(root: Path, want: dict) -> bool:
    try:
        return json.loads((root / _MARKER).read_text()) == json.loads(json.dumps(want, sort_keys=True))
    except (OSError, ValueError):
        return False
