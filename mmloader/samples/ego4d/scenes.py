"""Scenes: one 360° panorama style per activity (the place the frames are cut from)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .constants import TAU

__all__ = ["PANO_ROWS", "panorama"]

_FOV_RAD = math.pi / 2  # horizontal field of view of the rendered window
PANO_ROWS = 3  # panorama height in frame heights (the pitch range the frames can follow)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] → RGB float in [0, 255]."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, r = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, r, p), (q, v, p), (p, v, r), (p, q, v), (r, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _colour(rng: np.random.Generator, h: tuple[float, float], s: tuple[float, float],
            v: tuple[float, float]) -> np.ndarray:
    """A random colour inside an HSV box (hue wraps)."""
    return _hsv(float(rng.uniform(*h)) % 1.0, float(rng.uniform(*s)), float(rng.uniform(*v)))


@dataclass(frozen=True)
class _Canvas:
    """Panorama coordinates: ``u`` azimuth in [0, 1) (wraps), ``v`` elevation in [0, 1] (0 = top,
    0.5 = horizon), both (H, W); ``img`` float RGB."""

    u: np.ndarray
    v: np.ndarray
    img: np.ndarray

    @classmethod
    def new(cls, height: int, width: int, fill: np.ndarray) -> _Canvas:
        v, u = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
        return cls(u=u, v=v, img=np.broadcast_to(fill, (height, width, 3)).astype(np.float64))

    def du(self, centre: float) -> np.ndarray:
        """Signed wrapped azimuth distance to ``centre``, in [-0.5, 0.5)."""
        return (self.u - centre + 0.5) % 1.0 - 0.5

    def paint(self, mask: np.ndarray, colour: np.ndarray) -> None:
        self.img[mask] = colour

    def rect(self, u0: float, width: float, v0: float, v1: float, colour: np.ndarray) -> None:
        d = self.du(u0 + width / 2)
        self.paint((np.abs(d) < width / 2) & (self.v >= v0) & (self.v < v1), colour)

    def ellipse(self, uc: float, vc: float, ru: float, rv: float, colour: np.ndarray) -> None:
        self.paint((self.du(uc) / ru) ** 2 + ((self.v - vc) / rv) ** 2 < 1.0, colour)


def _perspective_angle(c: _Canvas, vanishing: int, phase: float) -> np.ndarray:
    """Angle (rad) of floor points around the nearest of ``vanishing`` evenly spaced vanishing points
    on the horizon (0 = straight ahead)."""
    d = ((c.u - phase) * vanishing + 0.5) % 1.0 - 0.5
    return np.arctan2(d * 3.0, np.maximum(c.v - 0.5, 1e-3))


def _scene_corridor(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Walking: beige corridor, doors, ceiling lights, floor with perspective stripes."""
    c = _Canvas.new(h, w, _colour(rng, (0.07, 0.15), (0.12, 0.3), (0.72, 0.9)))
    c.paint(c.v < 0.3, _colour(rng, (0.07, 0.15), (0.02, 0.1), (0.88, 0.98)))
    floor_colour = _colour(rng, (0.0, 1.0), (0.05, 0.25), (0.3, 0.45))
    c.paint(c.v > 0.55, floor_colour)
    angle = _perspective_angle(c, 2, float(rng.uniform(0, 1)))
    n_lines = int(rng.integers(5, 9))
    c.paint((c.v > 0.55) & (np.cos(angle * n_lines) > 0.75), floor_colour + 60.0)
    door = _colour(rng, (0.03, 0.1), (0.4, 0.7), (0.3, 0.5))
    for _ in range(int(rng.integers(5, 10))):
        c.rect(float(rng.uniform(0, 1)), float(rng.uniform(0.025, 0.045)), 0.3, 0.56, door)
    for k in range(int(rng.integers(6, 11))):
        c.rect(k / 8 + float(rng.uniform(0, 0.05)), 0.03, 0.18, 0.22, np.array([255.0, 252.0, 235.0]))
    return c.img


def _scene_track(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Running: blue sky, tree line, green field, red running track with white lanes."""
    sky = _colour(rng, (0.55, 0.62), (0.3, 0.6), (0.8, 0.95))
    c = _Canvas.new(h, w, sky)
    c.img[...] += (c.v[..., None] * 80.0) * (np.array([255.0, 255.0, 255.0]) - sky) / 255.0
    tree_top = 0.45 - 0.04 * sum(np.abs(np.sin(math.pi * int(rng.integers(3, 15)) * c.u + float(rng.uniform(0, 3))))
                                 for _ in range(3)) / 3
    c.paint((c.v > tree_top) & (c.v <= 0.5), _colour(rng, (0.28, 0.38), (0.5, 0.8), (0.2, 0.35)))
    c.paint(c.v > 0.5, _colour(rng, (0.22, 0.33), (0.55, 0.85), (0.45, 0.7)))
    top = 0.62 + 0.03 * np.sin(TAU * c.u + float(rng.uniform(0, TAU)))
    track = (c.v > top) & (c.v < 0.95)
    c.paint(track, _colour(rng, (0.98, 1.05), (0.5, 0.75), (0.6, 0.8)))
    lanes = int(rng.integers(4, 7))
    for k in range(lanes + 1):
        line = top + (0.95 - top) * k / lanes
        c.paint(track & (np.abs(c.v - line) < 0.006), np.array([245.0, 245.0, 245.0]))
    return c.img


def _scene_desk(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sitting down: muted wall, wooden desk with grain, monitor, papers, a mug."""
    c = _Canvas.new(h, w, _colour(rng, (0.0, 1.0), (0.05, 0.2), (0.55, 0.75)))
    wood = _colour(rng, (0.05, 0.1), (0.5, 0.75), (0.4, 0.65))
    desk = c.v > 0.52
    grain = 1.0 + 0.12 * np.sin(TAU * (c.v * 55.0 + 0.8 * np.sin(TAU * c.u * int(rng.integers(3, 8)))))
    c.img[desk] = (wood[None, :] * grain[desk][:, None])
    c.paint(c.v > 0.92, wood * 0.6)
    for _ in range(int(rng.integers(1, 3))):
        u0 = float(rng.uniform(0, 1))
        c.rect(u0, 0.11, 0.28, 0.5, np.array([25.0, 25.0, 30.0]))
        c.rect(u0 + 0.008, 0.094, 0.3, 0.47, _colour(rng, (0.5, 0.7), (0.3, 0.7), (0.7, 0.95)))
    for _ in range(int(rng.integers(2, 5))):
        c.rect(float(rng.uniform(0, 1)), float(rng.uniform(0.03, 0.06)), float(rng.uniform(0.58, 0.7)), 0.82,
               np.array([240.0, 240.0, 232.0]))
    c.ellipse(float(rng.uniform(0, 1)), 0.6, 0.015, 0.05, _colour(rng, (0.0, 1.0), (0.6, 0.9), (0.6, 0.9)))
    return c.img


def _scene_room(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Standing up: pastel room, windows, carpet, saturated furniture blobs."""
    c = _Canvas.new(h, w, _colour(rng, (0.0, 1.0), (0.15, 0.3), (0.85, 0.95)))
    c.paint(c.v > 0.62, _colour(rng, (0.0, 1.0), (0.3, 0.5), (0.4, 0.55)))
    for _ in range(int(rng.integers(2, 4))):
        c.rect(float(rng.uniform(0, 1)), float(rng.uniform(0.06, 0.1)), 0.22, 0.45, np.array([185.0, 215.0, 245.0]))
    for _ in range(int(rng.integers(5, 9))):
        c.ellipse(float(rng.uniform(0, 1)), float(rng.uniform(0.55, 0.7)), float(rng.uniform(0.03, 0.07)),
                  float(rng.uniform(0.06, 0.12)), _colour(rng, (0.0, 1.0), (0.6, 0.9), (0.5, 0.8)))
    return c.img


def _scene_pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Looking around: room with bold wallpaper (dots, stripes or checks) and framed pictures."""
    hue = float(rng.uniform(0, 1))
    c = _Canvas.new(h, w, _hsv(hue, float(rng.uniform(0.5, 0.8)), float(rng.uniform(0.7, 0.9))))
    second = _colour(rng, (hue + 0.3, hue + 0.7), (0.4, 0.8), (0.2, 0.45))
    ku, kv = int(rng.integers(24, 48)), float(rng.uniform(10, 18))
    su, sv = np.sin(TAU * ku * c.u), np.sin(TAU * kv * c.v)
    kind = int(rng.integers(3))
    pattern = [su * sv > 0.5, np.sin(TAU * (ku * c.u + kv * c.v)) > 0.3, su * sv > 0][kind]
    c.paint(pattern & (c.v < 0.75), second)
    c.paint(c.v >= 0.75, _colour(rng, (0.05, 0.1), (0.4, 0.6), (0.35, 0.5)))
    for _ in range(int(rng.integers(3, 6))):
        u0, v0 = float(rng.uniform(0, 1)), float(rng.uniform(0.25, 0.4))
        c.rect(u0, 0.07, v0, v0 + 0.16, np.array([30.0, 25.0, 20.0]))
        c.rect(u0 + 0.006, 0.058, v0 + 0.015, v0 + 0.145, _colour(rng, (0.0, 1.0), (0.2, 0.9), (0.4, 1.0)))
    return c.img


def _scene_road(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cycling: sky, buildings with windows, asphalt with dashed centre line and edge lines."""
    c = _Canvas.new(h, w, _colour(rng, (0.55, 0.65), (0.15, 0.45), (0.75, 0.92)))
    for _ in range(int(rng.integers(8, 14))):
        u0, width, top = float(rng.uniform(0, 1)), float(rng.uniform(0.04, 0.1)), float(rng.uniform(0.18, 0.42))
        c.rect(u0, width, top, 0.5, _colour(rng, (0.0, 0.15), (0.0, 0.35), (0.35, 0.7)))
    windows = (np.sin(TAU * 90 * c.u) > 0.3) & (np.sin(TAU * 40 * c.v) > 0.3) & (c.v < 0.48)
    building = np.abs(c.img - c.img[0:1]).sum(axis=2) > 1.0
    c.img[windows & building] *= 0.55
    c.paint(c.v > 0.5, _colour(rng, (0.2, 0.35), (0.3, 0.6), (0.35, 0.55)))
    road = c.v > 0.53
    c.paint(road, _colour(rng, (0.0, 1.0), (0.0, 0.06), (0.28, 0.4)))
    angle = _perspective_angle(c, 4, float(rng.uniform(0, 1)))
    dash = np.sin(TAU * 0.15 / np.maximum(c.v - 0.5, 1e-3)) > 0
    c.paint(road & (np.abs(angle) < 0.035) & dash, np.array([240.0, 200.0, 40.0]))
    c.paint(road & (np.abs(np.abs(angle) - 0.9) < 0.03), np.array([235.0, 235.0, 235.0]))
    return c.img


def _scene_stairs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Climbing stairs: concrete wall, steps with dark nosings (spacing grows with depth), handrail."""
    c = _Canvas.new(h, w, _colour(rng, (0.05, 0.12), (0.05, 0.15), (0.6, 0.75)))
    tread = _colour(rng, (0.0, 1.0), (0.0, 0.15), (0.55, 0.75))
    steps = c.v > 0.38
    phase = 0.6 / np.maximum(c.v - 0.3, 1e-3)
    frac = phase % 1.0
    c.paint(steps & (frac < 0.55), tread)
    c.paint(steps & (frac >= 0.55), tread * 0.62)
    c.paint(steps & (frac < 0.06), np.array([35.0, 35.0, 40.0]))
    m = int(rng.integers(2, 5))
    rail = 0.3 + 0.25 * ((c.u * m) % 1.0)
    c.paint(np.abs(c.v - rail) < 0.012, _colour(rng, (0.0, 1.0), (0.5, 0.9), (0.3, 0.6)))
    return c.img


_SCENES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "walking": _scene_corridor,
    "running": _scene_track,
    "sitting down": _scene_desk,
    "standing up": _scene_room,
    "looking around": _scene_pattern,
    "cycling": _scene_road,
    "climbing stairs": _scene_stairs,
}


def panorama(activity: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A 360° panorama (uint8, H_pan x (W_pan + W) x 3, the first W columns repeated at the right so a
    window never needs wrapping). W_pan covers 2π of yaw; H_pan = PANO_ROWS·H covers the pitch range."""
    width, height = size
    pano_w = int(round(width * TAU / _FOV_RAD))
    img = np.clip(_SCENES[activity](rng, PANO_ROWS * height, pano_w), 0, 255).astype(np.uint8)
    return np.concatenate([img, img[:, :width]], axis=1)
