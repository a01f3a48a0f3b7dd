"""Head motion: one model per activity, blended over a video's segments and integrated into the head track
that drives both the IMU readings and the camera window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .constants import GRAVITY, TAU
from .plan import Segment

__all__ = ["HeadTrack", "simulate_head"]

_GRID_HZ = 400.0  # internal simulation grid
_SHORT_RAMP_SEC = 0.6  # blend between activities (motion, orientation)
_LONG_RAMP_SEC = 1.2  # blend of the posture height (seated / standing)
_HEADING_SD_RAD = 0.1  # per-segment offset of the heading from the place's direction
_GAZE_PITCH_RAD = 0.3  # amplitude of the slow look-up / look-down on top of every activity's pitch
_GAZE_HZ = (0.015, 0.05)  # its frequencies


@dataclass(frozen=True)
class _Motion:
    """One activity's head motion on the grid. Heading frame: x right, y down, z forward.

    Displacements in m (``bob``: fast vertical motion, ``height``: posture level, 0 standing, ~0.45
    seated, both + down); ``pitch``/``roll`` in rad (pitch + up); ``yaw_rate`` in rad/s (+ = turn right).
    """

    lateral: np.ndarray
    bob: np.ndarray
    height: np.ndarray
    forward: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    yaw_rate: np.ndarray


@dataclass(frozen=True)
class HeadTrack:
    """The simulated head on a regular grid ``t`` (s, canonical). ``gyro``/``accl`` are noise-free
    body-frame readings (rad/s, m/s^2 incl. gravity); ``yaw``/``pitch`` are integrated from the rates."""

    t: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    bob: np.ndarray
    height: np.ndarray
    gyro: np.ndarray  # (N, 3)
    accl: np.ndarray  # (N, 3)


def _sin(tau: np.ndarray, freq: float, phase: float) -> np.ndarray:
    return np.sin(TAU * freq * tau + phase)


def _disp(accel_amplitude: float, freq: float) -> float:
    """Displacement amplitude (m) of a sinusoid whose acceleration amplitude is ``accel_amplitude``."""
    return accel_amplitude / (TAU * freq) ** 2


def _min_jerk(x: np.ndarray) -> np.ndarray:
    """Minimum-jerk profile 0 → 1 over x in [0, 1], clamped outside."""
    x = np.clip(x, 0.0, 1.0)
    return x**3 * (10 - 15 * x + 6 * x**2)


def _gait(tau: np.ndarray, rng: np.random.Generator, step_hz: tuple[float, float], bounce: tuple[float, float],
          sway: tuple[float, float], surge: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """Step-driven translation: vertical bounce at the step rate (+ 2nd harmonic), lateral sway at half
    of it, fore-aft surge. Amplitudes are acceleration amplitudes (m/s^2). Returns
    (step_hz, phase, lateral, bob, forward)."""
    f = float(rng.uniform(*step_hz))
    ph = float(rng.uniform(0, TAU))
    b, s, g = (float(rng.uniform(*r)) for r in (bounce, sway, surge))
    bob = -_disp(b, f) * _sin(tau, f, ph) - _disp(0.3 * b, 2 * f) * _sin(tau, 2 * f, 2 * ph + 0.5)
    lateral = -_disp(s, f / 2) * _sin(tau, f / 2, ph)
    forward = -_disp(g, f) * _sin(tau, f, ph + math.pi / 2)
    return f, ph, lateral, bob, forward


def _wander(tau: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Slow heading changes: a yaw rate (rad/s) at 0.05-0.15 Hz."""
    return amplitude * _sin(tau, float(rng.uniform(0.05, 0.15)), float(rng.uniform(0, TAU)))


def _walking(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """≈1.8 Hz steps, ±2 m/s^2 bounce, sway at half the step rate, small yaw."""
    f, ph, lateral, bob, forward = _gait(tau, rng, (1.6, 2.0), (1.6, 2.4), (0.5, 0.9), (0.5, 0.9))
    pitch = -0.12 + 0.03 * _sin(tau, f, ph) + 0.05 * _sin(tau, 0.1, float(rng.uniform(0, TAU)))
    roll = 0.04 * _sin(tau, f / 2, ph)
    yaw_rate = 0.12 * _sin(tau, f / 2, ph + 0.3) + _wander(tau, rng, 0.2)
    return _Motion(lateral, bob, np.zeros_like(tau), forward, pitch, roll, yaw_rate)


def _running(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """≈2.8 Hz steps, ±6-8 m/s^2 bounce, strong sway and head nodding."""
    f, ph, lateral, bob, forward = _gait(tau, rng, (2.6, 3.0), (6.0, 8.0), (1.5, 2.5), (1.5, 2.5))
    pitch = -0.08 + 0.05 * _sin(tau, f, ph + 0.4)
    roll = 0.07 * _sin(tau, f / 2, ph)
    yaw_rate = 0.2 * _sin(tau, f / 2, ph + 0.3) + _wander(tau, rng, 0.1)
    return _Motion(lateral, bob, np.zeros_like(tau), forward, pitch, roll, yaw_rate)


def _climbing_stairs(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """≈1.4 Hz steps with an asymmetric ±3 m/s^2 bounce, head pitched down at the steps."""
    f, ph, lateral, bob, forward = _gait(tau, rng, (1.2, 1.6), (2.5, 3.5), (0.6, 1.0), (1.0, 1.6))
    pitch = -0.32 + 0.04 * _sin(tau, f, ph + 0.8)
    roll = 0.05 * _sin(tau, f / 2, ph)
    yaw_rate = 0.1 * _sin(tau, f / 2, ph) + _wander(tau, rng, 0.1)
    return _Motion(lateral, bob, np.zeros_like(tau), forward, pitch, roll, yaw_rate)


def _cycling(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """≈1.2 Hz pedalling sway + 12-35 Hz road vibration, head pitched towards the road."""
    f = float(rng.uniform(1.0, 1.4))
    ph = float(rng.uniform(0, TAU))
    sway = float(rng.uniform(0.6, 1.2))
    lateral = -_disp(sway, f) * _sin(tau, f, ph)
    forward = -_disp(0.4, 2 * f) * _sin(tau, 2 * f, 2 * ph)
    bob = -_disp(0.3, 0.5) * _sin(tau, 0.5, float(rng.uniform(0, TAU)))
    pitch = -0.2 + 0.02 * _sin(tau, f, ph)
    envelope = 1.0 + 0.5 * _sin(tau, float(rng.uniform(0.2, 0.5)), float(rng.uniform(0, TAU)))
    for _ in range(6):
        fv, pv = float(rng.uniform(12.0, 35.0)), float(rng.uniform(0, TAU))
        bob = bob - envelope * _disp(float(rng.uniform(0.3, 0.6)), fv) * _sin(tau, fv, pv)
        pitch = pitch + 0.0008 * envelope * _sin(tau, fv, pv + 1.0)
    roll = 0.06 * _sin(tau, f, ph)
    yaw_rate = 0.05 * _sin(tau, 0.07, ph)
    return _Motion(lateral, bob, np.zeros_like(tau), forward, pitch, roll, yaw_rate)


def _posture_change(tau: np.ndarray, rng: np.random.Generator, *, sit: bool) -> _Motion:
    """Sitting down (head drops ~0.45 m, leans forward, ends pitched down and still) or standing up
    (head rises, leans forward, then light sway)."""
    t0, dur = float(rng.uniform(0.3, 1.2)), float(rng.uniform(1.4, 2.4))
    s = _min_jerk((tau - t0) / dur)
    lean = np.sin(math.pi * s)
    drop = float(rng.uniform(0.4, 0.5))
    p_seated, p_standing = float(rng.uniform(-0.45, -0.3)), -0.08
    ph = float(rng.uniform(0, TAU))
    if sit:
        height = drop * s
        pitch = p_standing + (p_seated - p_standing) * s - 0.25 * lean + 0.015 * _sin(tau, 0.2, ph)
        lateral = np.zeros_like(tau)
        roll = 0.01 * _sin(tau, 0.13, ph)
        yaw_rate = 0.03 * _sin(tau, 0.17, ph)
    else:
        height = drop * (1.0 - s)
        pitch = p_seated + (p_standing - p_seated) * s - 0.3 * lean
        lateral = 0.02 * s * _sin(tau, 0.3, ph)
        roll = 0.02 * s * _sin(tau, 0.3, ph + 0.5)
        yaw_rate = 0.08 * s * _sin(tau, 0.15, ph)
    bob = 0.002 * _sin(tau, 0.25, ph)  # breathing
    forward = 0.15 * lean
    return _Motion(lateral, bob, height, forward, pitch, roll, yaw_rate)


def _sitting_down(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    return _posture_change(tau, rng, sit=True)


def _standing_up(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    return _posture_change(tau, rng, sit=False)


def _looking_around(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """Slow, large yaw sweeps (±0.6-0.9 rad, peak ≈1-1.4 rad/s) and pitch nods; body nearly still."""
    a, f, ph = float(rng.uniform(0.6, 0.9)), float(rng.uniform(0.15, 0.22)), float(rng.uniform(0, TAU))
    a2, f2, ph2 = float(rng.uniform(0.03, 0.1)), float(rng.uniform(0.3, 0.4)), float(rng.uniform(0, TAU))
    yaw_rate = a * TAU * f * np.cos(TAU * f * tau + ph) + a2 * TAU * f2 * np.cos(TAU * f2 * tau + ph2)
    pitch = -0.05 + 0.25 * _sin(tau, float(rng.uniform(0.08, 0.15)), float(rng.uniform(0, TAU)))
    roll = 0.03 * _sin(tau, 0.11, ph)
    lateral = 0.01 * _sin(tau, 0.2, ph2)
    zeros = np.zeros_like(tau)
    return _Motion(lateral, 0.002 * _sin(tau, 0.25, ph), zeros, zeros, pitch, roll, yaw_rate)


_MOTION_MODELS: dict[str, Callable[[np.ndarray, np.random.Generator], _Motion]] = {
    "walking": _walking,
    "running": _running,
    "sitting down": _sitting_down,
    "standing up": _standing_up,
    "looking around": _looking_around,
    "cycling": _cycling,
    "climbing stairs": _climbing_stairs,
}


def _gaze(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slow looking up and down (rad, + up) that every activity shares: two sinusoids at ``_GAZE_HZ``,
    peak ≈ ±``_GAZE_PITCH_RAD``. It tilts gravity in the accelerometer and moves the horizon in the frames,
    so it is what lets a window's IMU tell *which* frame of an activity it belongs to."""
    out = np.zeros_like(t)
    for share in (0.6, 0.4):
        f, ph = float(rng.uniform(*_GAZE_HZ)), float(rng.uniform(0, TAU))
        out += share * _GAZE_PITCH_RAD * _sin(t, f, ph)
    return out


def _blend_weights(segments: Sequence[Segment], t: np.ndarray, ramp_sec: float) -> np.ndarray:
    """(S, N) partition of unity: segment indicators smoothed by a Hann window of ``ramp_sec``."""
    starts = np.array([s.start_sec for s in segments])
    idx = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(segments) - 1)
    ind = (idx[None, :] == np.arange(len(segments))[:, None]).astype(np.float64)
    k = max(3, int(ramp_sec * _GRID_HZ) | 1)
    kernel = np.hanning(k + 2)[1:-1]
    kernel /= kernel.sum()
    half = k // 2
    padded = np.pad(ind, ((0, 0), (half, half)), mode="edge")
    return np.stack([np.convolve(row, kernel, mode="valid") for row in padded])


def _cumtrapz(y: np.ndarray, dt: float) -> np.ndarray:
    """Cumulative trapezoidal integral starting at 0."""
    out = np.zeros_like(y)
    out[1:] = np.cumsum(0.5 * (y[1:] + y[:-1])) * dt
    return out


def _rot_x_t(v: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """R_x(angle)^T v for (N, 3) vectors (rotation about the right axis)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([v[:, 0], c * v[:, 1] + s * v[:, 2], -s * v[:, 1] + c * v[:, 2]], axis=1)


def _rot_z_t(v: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """R_z(angle)^T v for (N, 3) vectors (rotation about the forward axis)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * v[:, 0] + s * v[:, 1], -s * v[:, 0] + c * v[:, 1], v[:, 2]], axis=1)


def simulate_head(segments: Sequence[Segment], duration: float, rng: np.random.Generator) -> HeadTrack:
    """Blend the activity models over the video, integrate the orientation from the angular rates and
    derive the noise-free body-frame gyro and accelerometer readings."""
    dt = 1.0 / _GRID_HZ
    t = np.arange(int(math.ceil(duration * _GRID_HZ)) + 1) * dt
    parts = [_MOTION_MODELS[s.activity](t - s.start_sec, rng) for s in segments]
    w_short = _blend_weights(segments, t, _SHORT_RAMP_SEC)
    w_long = _blend_weights(segments, t, _LONG_RAMP_SEC)

    def mix(name: str, w: np.ndarray) -> np.ndarray:
        return np.sum([wi * np.broadcast_to(getattr(p, name), t.shape) for wi, p in zip(w, parts)], axis=0)

    lateral, bob, forward = mix("lateral", w_short), mix("bob", w_short), mix("forward", w_short)
    height = mix("height", w_long)
    pitch_target, roll_target = mix("pitch", w_short) + _gaze(t, rng), mix("roll", w_short)
    pitch_rate, roll_rate = np.gradient(pitch_target, dt), np.gradient(roll_target, dt)
    # Heading: during a segment the head turns about the direction of its place (azimuth 0 of the
    # activity's panorama, + a small per-segment offset), e.g. along the corridor; between segments it
    # turns to the next one within the blend.
    yaw_parts = []
    for seg, part in zip(segments, parts):
        turn = _cumtrapz(np.broadcast_to(part.yaw_rate, t.shape), dt)
        inside = (t >= seg.start_sec) & (t < seg.end_sec)
        yaw_parts.append(float(rng.normal(0.0, _HEADING_SD_RAD)) + turn - turn[inside].mean())
    yaw_target = np.sum([wi * y for wi, y in zip(w_short, yaw_parts)], axis=0)
    yaw_rate = np.gradient(yaw_target, dt)
    # Orientation = integral of the Euler rates (what the gyro below measures).
    pitch = float(pitch_target[0]) + _cumtrapz(pitch_rate, dt)
    roll = float(roll_target[0]) + _cumtrapz(roll_rate, dt)
    yaw = float(yaw_target[0]) + _cumtrapz(yaw_rate, dt)

    zeros = np.zeros_like(t)
    yaw_body = _rot_z_t(_rot_x_t(np.stack([zeros, yaw_rate, zeros], axis=1), pitch), roll)
    pitch_body = _rot_z_t(np.stack([pitch_rate, zeros, zeros], axis=1), roll)
    gyro = yaw_body + pitch_body + np.stack([zeros, zeros, roll_rate], axis=1)

    accel = np.stack([np.gradient(np.gradient(x, dt), dt) for x in (lateral, bob + height, forward)], axis=1)
    accel[:, 1] += GRAVITY
    accl = _rot_z_t(_rot_x_t(accel, pitch), roll)
    return HeadTrack(t=t, yaw=yaw, pitch=pitch, bob=bob, height=height, gyro=gyro, accl=accl)

