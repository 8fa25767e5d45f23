"""Which frames of a source become clips: fixed-length windows at a frame stride, first window or several."""

from __future__ import annotations

from preprocessing.config import PreprocessConfig


def clip_windows(num_source_frames: int, cfg: PreprocessConfig) -> list[list[int]]:
    """Frame indices of each clip: window i starts at i * spacing (spacing defaults to the window's span).

    Windows are deterministic (no random offsets) so a rerun makes the same clips; at most
    `cfg.clips_per_video` windows, each fully inside the video. A video shorter than one window gives none.
    """
    spacing = cfg.clip_spacing or cfg.clip_span
    windows = []
    start = 0
    while start + cfg.clip_span <= num_source_frames and len(windows) < cfg.clips_per_video:
        windows.append(list(range(start, start + cfg.clip_span, cfg.frame_stride)))
        start += spacing
    return windows
