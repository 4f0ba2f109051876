"""Top-down renders of a highway-env episode, simulated lighting/weather effects, and image files.

highway-env draws the road and vehicles with pygame (`offscreen_rendering`, no window). Lighting and weather
do not exist in the simulator; their look is ours and documented as simulated:

- night: a steep tone curve (gamma 2.2) darkens the road to ~8% while bright vehicles keep about half their
  brightness, a blue cast, and sensor noise (Gaussian, sigma 6);
- rainy: colours are washed out by 15%, thin bright rain streaks are drawn, and mild noise (sigma 3);
- render_shift (a synthetic-pool perturbation, "domain-shifted renders"): a different zoom, per-channel
  colour gains and a gamma curve.

Noise and streaks come from a generator seeded per (episode, frame), so a seed gives the same pixels.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from datasets_cfg.sim.export import RenderTransform, render_transform

VIEW_METERS = 75.0  # metres across a render; pixels per metre = image_size / VIEW_METERS


def setup_viewer(env, image_size: int, pixels_per_meter: float) -> None:
    """Create (or resize) the env's offscreen viewer: square `image_size` px, centred on the ego."""
    u = env.unwrapped
    u.config.update({"screen_width": image_size, "screen_height": image_size, "scaling": pixels_per_meter,
                     "centering_position": [0.5, 0.5], "offscreen_rendering": True})
    if u.viewer is not None and u.viewer.sim_surface.get_size() != (image_size, image_size):
        u.viewer.close()
        u.viewer = None
    if u.viewer is None:
        env.render()
    u.viewer.sim_surface.scaling = pixels_per_meter
    u.viewer.sim_surface.centering_position = [0.5, 0.5]


def render(env) -> tuple[np.ndarray, RenderTransform]:
    """(H, W, 3) uint8 render of the current state and its world -> pixel transform."""
    img = env.render()
    return np.ascontiguousarray(img), render_transform(env)


def apply_effects(img: np.ndarray, lighting: str, weather: str, shift: dict | None, rng: np.random.Generator) -> np.ndarray:
    """Simulated lighting / weather / domain-shift look (see module doc). Returns a new uint8 image."""
    if lighting != "night" and weather != "rainy" and not shift:
        return img
    out = img.astype(np.float32)
    if shift:
        out = 255.0 * np.power(np.clip(out * np.asarray(shift["gains"], np.float32) / 255.0, 0, 1), shift["gamma"])
    if weather == "rainy":
        grey = out.mean(axis=2, keepdims=True)
        out = 0.85 * out + 0.15 * grey
        _rain_streaks(out, rng)
        out += rng.normal(0.0, 3.0, out.shape).astype(np.float32)
    if lighting == "night":
        # a steep tone curve: the grey road sinks to ~8% while lit (bright, saturated) vehicles keep ~half
        out = 255.0 * np.power(out / 255.0, 2.2) * np.array([0.55, 0.6, 0.75], np.float32)
        out += rng.normal(0.0, 6.0, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _rain_streaks(out: np.ndarray, rng: np.random.Generator, density: float = 0.0025) -> None:
    h, w, _ = out.shape
    n = int(density * h * w)
    x0 = rng.uniform(0, w, n)
    y0 = rng.uniform(0, h, n)
    length = rng.uniform(5, 10, n)
    steps = np.linspace(0.0, 1.0, 8)
    # streaks fall at ~70 degrees; one bright pixel per step along each streak
    xs = (x0[:, None] + 0.35 * length[:, None] * steps).astype(int).clip(0, w - 1)
    ys = (y0[:, None] + length[:, None] * steps).astype(int).clip(0, h - 1)
    out[ys.ravel(), xs.ravel()] = 0.55 * out[ys.ravel(), xs.ravel()] + 0.45 * 235.0


def encode(img: np.ndarray, fmt: str) -> bytes:
    """PNG (lossless, fast zlib level 1) or JPEG (quality 90, no chroma subsampling) bytes."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    elif fmt in ("jpg", "jpeg"):
        Image.fromarray(img).save(buf, format="JPEG", quality=90, subsampling=0)
    else:
        raise ValueError(f"image format must be 'png' or 'jpg', got {fmt!r}")
    return buf.getvalue()


def save_image(img: np.ndarray, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(img, fmt))


def image_stats(img: np.ndarray) -> dict:
    """Cheap per-image statistics kept in meta (scene features for the real/synthetic distance)."""
    f = img.astype(np.float32)
    return {"mean": float(f.mean()), "std": float(f.std()), "mean_rgb": [float(c) for c in f.mean(axis=(0, 1))]}
