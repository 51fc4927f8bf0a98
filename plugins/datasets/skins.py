"""Character skins in the classic Minecraft 64x32 layout: procedural generation and PNG I/O.

A skin is a ``(3, 32, 64)`` float tensor in [0, 1] (rows = v, columns = u). The player is six
boxes, each unwrapped as described in :mod:`.boxes`:

    part        UV origin   size (w, h, d) in texels
    head        (0, 0)      8 x 8 x 8
    body        (16, 16)    8 x 12 x 4
    right arm   (40, 16)    4 x 12 x 4    (the left arm mirrors it)
    right leg   (0, 16)     4 x 12 x 4    (the left leg mirrors it)

The hat overlay (u >= 32, v < 16) is not used; procedural skins leave it black.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

SKIN_HEIGHT, SKIN_WIDTH = 32, 64

# name -> (u0, v0, (w, h, d))
PARTS: dict[str, tuple[int, int, tuple[int, int, int]]] = {
    "head": (0, 0, (8, 8, 8)),
    "body": (16, 16, (8, 12, 4)),
    "right_arm": (40, 16, (4, 12, 4)),
    "right_leg": (0, 16, (4, 12, 4)),
}

SKIN_TONES = [
    (255, 224, 196), (241, 194, 158), (224, 172, 130), (198, 134, 86), (161, 102, 62), (120, 72, 40), (89, 54, 30)
]  # fmt: skip
HAIR_COLOURS = [
    (25, 20, 18), (60, 40, 25), (105, 68, 38), (160, 115, 60), (225, 195, 120), (170, 70, 30), (190, 190, 190)
]  # fmt: skip
EYE_COLOURS = [(70, 45, 25), (40, 90, 160), (50, 120, 60), (30, 30, 30), (110, 110, 120)]
TOP_PATTERNS = ("solid", "stripes", "two-tone", "front-back", "vertical", "logo", "jacket")
SLEEVES = ("none", "short", "long")
TROUSERS = ("long", "shorts", "capri")
HAIR_STYLES = ("bald", "short", "medium", "long")


class _Atlas:
    """Painting helpers over a (32, 64, 3) uint8 array, addressed by part and face."""

    def __init__(self):
        self.a = np.zeros((SKIN_HEIGHT, SKIN_WIDTH, 3), np.uint8)

    def sides(self, part: str, r0: int, r1: int, colour, faces=("right", "front", "left", "back")):
        """Rows r0:r1 (from the part's top) of the named side faces."""
        u0, v0, (w, h, d) = PARTS[part]
        cols = {"right": (u0, u0 + d), "front": (u0 + d, u0 + d + w), "left": (u0 + d + w, u0 + 2 * d + w)}
        cols["back"] = (u0 + 2 * d + w, u0 + 2 * d + 2 * w)
        for f in faces:
            c0, c1 = cols[f]
            self.a[v0 + d + r0 : v0 + d + r1, c0:c1] = colour

    def cap(self, part: str, which: str, colour):
        u0, v0, (w, h, d) = PARTS[part]
        c0 = u0 + d if which == "top" else u0 + d + w
        self.a[v0 : v0 + d, c0 : c0 + w] = colour

    def whole(self, part: str, colour):
        self.sides(part, 0, PARTS[part][2][1], colour)
        self.cap(part, "top", colour)
        self.cap(part, "bottom", colour)

    def front(self, part: str, row: int, col: int, colour):
        u0, v0, (w, h, d) = PARTS[part]
        self.a[v0 + d + row, u0 + d + col] = colour


def _jitter(rng: np.random.Generator, rgb, amount: float = 12.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, float) + rng.normal(0, amount, 3), 0, 255)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.15:  # greys, black and white are common in clothes
        return np.full(3, rng.uniform(20, 240))
    h, s, v = rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 0.95)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255


def _distinct_colour(rng: np.random.Generator, other: np.ndarray) -> np.ndarray:
    """A random colour far enough from ``other`` to be told apart at a glance."""
    for _ in range(20):
        c = _random_colour(rng)
        if np.abs(c - other).sum() > 150:
            return c
    return 255 - other


def _paint_head(atlas: _Atlas, rng: np.random.Generator, p: dict, skin, hair):
    atlas.whole("head", skin)
    style = p["hair_style"]
    if style != "bald":
        atlas.cap("head", "top", hair)
        back = {"short": 3, "medium": 5, "long": 8}[style]
        atlas.sides("head", 0, back, hair, faces=("back",))
        atlas.sides("head", 0, back - 1, hair, faces=("right", "left"))
        atlas.sides("head", 0, p["fringe"], hair, faces=("front",))
    eye_row = 4
    white = (240, 240, 240)
    for col, colour in ((1, white), (2, p["eye_colour"]), (5, p["eye_colour"]), (6, white)):
        atlas.front("head", eye_row, col, colour)
    brow = np.clip(np.asarray(hair) * 0.8, 0, 255)
    if p["eyebrows"]:
        for col in (1, 2, 5, 6):
            atlas.front("head", eye_row - 1, col, brow)
    mouth = np.clip(np.asarray(skin) * np.array([0.75, 0.45, 0.45]), 0, 255)
    for col in (3, 4):
        atlas.front("head", 6, col, mouth)
    if p["beard"]:
        atlas.sides("head", 6, 8, hair, faces=("front",))
        for col in (3, 4):
            atlas.front("head", 6, col, mouth)


def _paint_top(atlas: _Atlas, p: dict, c1, c2):
    pattern = p["top"]
    atlas.whole("body", c1)
    if pattern == "stripes":
        for r in range(p["stripe_offset"], 12, p["stripe_period"]):
            atlas.sides("body", r, r + 1, c2)
    elif pattern == "two-tone":
        atlas.sides("body", 6, 12, c2)
        atlas.cap("body", "bottom", c2)
    elif pattern == "front-back":
        atlas.sides("body", 0, 12, c2, faces=("back",))
    elif pattern == "vertical":
        u0, v0, (w, h, d) = PARTS["body"]
        for c in range(u0 + 1, u0 + 2 * d + 2 * w, 2):
            atlas.a[v0 + d : v0 + d + h, c] = c2
    elif pattern == "logo":
        u0, v0, (w, h, d) = PARTS["body"]
        atlas.a[v0 + d + 3 : v0 + d + 7, u0 + d + 2 : u0 + d + 6] = c2
    elif pattern == "jacket":
        u0, v0, (w, h, d) = PARTS["body"]
        atlas.a[v0 + d : v0 + d + h, u0 + d + 3 : u0 + d + 5] = c2
    if p["belt"]:
        atlas.sides("body", 11, 12, p["belt_colour"])


def _paint_limbs(atlas: _Atlas, p: dict, skin, c1, c2, trousers, shoes):
    atlas.whole("right_arm", skin)
    sleeve = {"none": 0, "short": 4, "long": 11}[p["sleeves"]]
    if sleeve:
        atlas.sides("right_arm", 0, sleeve, c1)
        atlas.cap("right_arm", "top", c1)
        if p["top"] == "stripes":
            for r in range(p["stripe_offset"], sleeve, p["stripe_period"]):
                atlas.sides("right_arm", r, r + 1, c2)
        if p["top"] == "front-back":
            atlas.sides("right_arm", 0, sleeve, c2, faces=("back",))
    atlas.whole("right_leg", skin)
    leg = {"long": 12, "shorts": 5, "capri": 8}[p["trousers"]]
    atlas.sides("right_leg", 0, leg, trousers)
    atlas.cap("right_leg", "top", trousers)
    atlas.sides("right_leg", 12 - p["shoe_height"], 12, shoes)
    atlas.cap("right_leg", "bottom", shoes)


def sample_skin_params(rng: np.random.Generator) -> dict:
    """Random skin parameters (palette, hair, clothes and patterns) as a plain dict."""
    shirt = _random_colour(rng)
    return {
        "skin_tone": _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 8),
        "hair_colour": _jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))])
        if rng.random() < 0.9
        else _random_colour(rng),
        "hair_style": HAIR_STYLES[rng.choice(4, p=[0.1, 0.4, 0.3, 0.2])],
        "fringe": int(rng.integers(1, 3)),
        "eye_colour": np.asarray(EYE_COLOURS[rng.integers(len(EYE_COLOURS))], float),
        "eyebrows": bool(rng.random() < 0.5),
        "beard": bool(rng.random() < 0.12),
        "top": TOP_PATTERNS[rng.integers(len(TOP_PATTERNS))],
        "shirt_colour": shirt,
        "second_colour": _distinct_colour(rng, shirt),
        "stripe_period": int(rng.integers(2, 4)),
        "stripe_offset": int(rng.integers(0, 2)),
        "sleeves": SLEEVES[rng.integers(3)],
        "belt": bool(rng.random() < 0.3),
        "belt_colour": _random_colour(rng) * 0.5,
        "trousers": TROUSERS[rng.choice(3, p=[0.6, 0.25, 0.15])],
        "trouser_colour": _random_colour(rng),
        "shoe_colour": _random_colour(rng) * rng.uniform(0.3, 1.0),
        "shoe_height": int(rng.integers(1, 3)),
        "noise": float(rng.uniform(0.0, 0.06)),
    }


def paint_skin(params: dict, rng: np.random.Generator) -> Tensor:
    """The (3, 32, 64) skin for ``params``; ``rng`` draws the per-texel shade noise."""
    atlas = _Atlas()
    skin, hair = params["skin_tone"], params["hair_colour"]
    c1, c2 = params["shirt_colour"], params["second_colour"]
    _paint_head(atlas, rng, params, skin, hair)
    _paint_top(atlas, params, c1, c2)
    _paint_limbs(atlas, params, skin, c1, c2, params["trouser_colour"], params["shoe_colour"])
    shade = 1 + rng.normal(0, params["noise"], (SKIN_HEIGHT, SKIN_WIDTH, 1))
    pixels = np.clip(np.round(atlas.a * shade), 0, 255).astype(np.uint8)
    pixels[:16, 32:] = 0  # unused hat overlay
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


def procedural_skin(rng: np.random.Generator) -> tuple[Tensor, dict]:
    """A random skin (3, 32, 64) in [0, 1], quantised to 8 bits, and the parameters behind it."""
    params = sample_skin_params(rng)
    return paint_skin(params, rng), params


def flat_skin(rng: np.random.Generator) -> tuple[Tensor, dict]:
    """A skin (3, 32, 64) with one flat colour per box texture: head, body, arms, legs (left limbs
    mirror the right ones, so they share their colour). Colours are saturated and bright enough to
    tell apart, so whether a model reproduces an object's hues shows in every view."""
    a = np.zeros((SKIN_HEIGHT, SKIN_WIDTH, 3), np.uint8)
    params = {}
    for part, (u0, v0, (w, h, d)) in PARTS.items():
        hue, sat, val = rng.uniform(0, 1), rng.uniform(0.45, 1.0), rng.uniform(0.35, 0.95)
        rgb = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255).astype(np.uint8)
        a[v0 : v0 + d + h, u0 : u0 + 2 * (d + w)] = rgb
        params[part] = rgb
    return torch.from_numpy(a).permute(2, 0, 1).float() / 255, params


def load_skin(path: str | Path) -> Tensor:
    """Read a Minecraft skin PNG as (3, 32, 64) in [0, 1].

    64x64 skins keep their top half (the classic layout; their separate left-limb textures are
    dropped, so left limbs mirror the right ones). Transparent texels become black.
    """
    with Image.open(path) as im:
        im = im.convert("RGBA")
        if im.width != SKIN_WIDTH or im.height not in (SKIN_HEIGHT, 2 * SKIN_HEIGHT):
            raise ValueError(f"{path}: expected a 64x32 or 64x64 skin, got {im.width}x{im.height}")
        rgba = np.asarray(im, np.float32)[:SKIN_HEIGHT] / 255
    rgb = rgba[..., :3] * (rgba[..., 3:] > 0.5)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def save_skin(skin: Tensor, path: str | Path) -> None:
    """Write a (3, 32, 64) skin in [0, 1] as an 8-bit RGB PNG."""
    if skin.shape != (3, SKIN_HEIGHT, SKIN_WIDTH):
        raise ValueError(f"skin must be (3, {SKIN_HEIGHT}, {SKIN_WIDTH}), got {tuple(skin.shape)}")
    pixels = (skin.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels, "RGB").save(path)
