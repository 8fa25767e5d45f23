"""The PNG figures of a report: contact sheets, optical-flow colour maps, and curves over frame index.

Figures are written into the report's staging folder, which is published as a whole (see report.publish_dir).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipelines.evaluate.metrics import curve_frame_index, farneback_flow  # noqa: E402

# Width of each frame in contact sheets and flow rows: readable labels, bounded PNG size whatever the resolution.
TILE_WIDTH = 160
# Flow below this magnitude (pixels) stays dark in colour maps, so numerical noise of a still video is not shown.
MIN_FLOW_SCALE = 1.0
# Curves drawn per video, in this order, when the metrics have them.
CURVE_PANELS = (
    ("flicker", "flicker (mean |frame t+1 - frame t|)"),
    ("motion", "flow magnitude (px / frame)"),
    ("warp_error", "flow warping error"),
    ("contrast", "contrast (luma std)"),
    ("saturation", "saturation"),
    ("brightness", "brightness (luma mean)"),
    ("ssim_to_first", "SSIM to frame 0"),
    ("ssim_to_previous", "SSIM to previous frame"),
    ("clip_to_first", "CLIP similarity to frame 0"),
    ("clip_to_conditioning", "CLIP similarity to conditioning image"),
)


def evenly_spaced(length: int, count: int) -> list[int]:
    """`count` indices spread over 0..length-1, first and last included (fewer when the video is shorter)."""
    return sorted(set(np.linspace(0, length - 1, min(count, length)).round().astype(int).tolist()))


def _save_png(image: Image.Image, path: Path) -> Path:
    image.save(path, format="PNG")
    return path


def _tile(image: np.ndarray, width: int) -> np.ndarray:
    """`image` scaled to `width` pixels wide: small videos are enlarged (pixels kept sharp), large ones reduced."""
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    enlarge = width > image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST if enlarge else cv2.INTER_AREA)


def _labelled_row(tiles: list[np.ndarray], labels: list[str], tile_width: int = TILE_WIDTH, gap: int = 4,
                  label_height: int = 14) -> Image.Image:
    tiles = [_tile(tile, tile_width) for tile in tiles]
    height = tiles[0].shape[0]
    sheet = Image.new("RGB", (len(tiles) * (tile_width + gap) - gap, height + label_height), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (tile, label) in enumerate(zip(tiles, labels)):
        x = column * (tile_width + gap)
        sheet.paste(Image.fromarray(tile), (x, label_height))
        draw.text((x + 2, 1), label, fill="black")
    return sheet


def contact_sheet(frames: np.ndarray, path: Path, count: int = 8) -> Path:
    """One row of frames at fixed intervals (first and last included), each labelled with its index."""
    indices = evenly_spaced(len(frames), count)
    return _save_png(_labelled_row([frames[i] for i in indices], [f"frame {i}" for i in indices]), path)


def flow_to_colour(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """The usual flow colour coding as RGB uint8: hue is the direction, brightness the magnitude."""
    magnitude, angle = cv2.cartToPolar(flow[..., 0], flow[..., 1], angleInDegrees=True)
    scale = max_magnitude if max_magnitude else max(float(magnitude.max()), 1e-6)
    hsv = np.empty((*flow.shape[:2], 3), np.uint8)
    hsv[..., 0] = (angle / 2).astype(np.uint8)  # OpenCV hue runs 0..179
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(magnitude / scale * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def flow_sheet(frames: np.ndarray, path: Path, count: int = 4) -> Path:
    """Flow colour maps of `count` transitions at fixed intervals, on one shared magnitude scale (so brightness
    compares across the row; at least MIN_FLOW_SCALE), each labelled with its transition and mean magnitude."""
    starts = evenly_spaced(len(frames) - 1, count)
    flows = [farneback_flow(frames[t], frames[t + 1]) for t in starts]
    peak = max(max(float(np.linalg.norm(f, axis=-1).max()) for f in flows), MIN_FLOW_SCALE)
    labels = [f"{t}->{t + 1}: {np.linalg.norm(f, axis=-1).mean():.2f}px" for t, f in zip(starts, flows)]
    return _save_png(_labelled_row([flow_to_colour(f, peak) for f in flows], labels), path)


def _save_figure(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path, format="png", dpi=80)
    plt.close(figure)
    return path


def curves_figure(curves: dict[str, np.ndarray], path: Path, title: str = "") -> Path:
    """A grid of one video's curves against frame index, with the quarter boundaries marked."""
    panels = [(name, label) for name, label in CURVE_PANELS if name in curves]
    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.4 * rows), squeeze=False)
    num_frames = max(len(curve) for curve in curves.values())
    for axis, (name, label) in zip(axes.flat, panels):
        axis.plot(curve_frame_index(name, curves[name]), curves[name], linewidth=1.2)
        for boundary in (num_frames / 4, 3 * num_frames / 4):
            axis.axvline(boundary, color="grey", linewidth=0.6, linestyle=":")
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("frame", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save_figure(figure, path)


def comparison_figure(series: list[tuple[str, dict[str, np.ndarray]]], path: Path,
                      names: tuple[str, ...] = ("flicker", "contrast", "saturation", "ssim_to_first")) -> Path:
    """Chosen curves of every video on shared axes, coloured by group label (method / run)."""
    groups = sorted({label for label, _ in series})
    colours = {group: plt.get_cmap("tab10")(i % 10) for i, group in enumerate(groups)}
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names):
        seen = set()
        for label, curves in series:
            if name in curves:
                axis.plot(curve_frame_index(name, curves[name]), curves[name], color=colours[label], linewidth=1,
                          label=None if label in seen else label)
                seen.add(label)
        axis.set_title(dict(CURVE_PANELS).get(name, name), fontsize=9)
        axis.set_xlabel("frame", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return _save_figure(figure, path)
