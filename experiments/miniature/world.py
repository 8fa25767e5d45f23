"""A synthetic world whose correct continuation of any first frame is known.

Each video shows one saturated disc or square over a plain, static, grey-ish background (its tint drawn per video).
The object moves at a constant speed and bounces off the walls; its colour fixes its initial direction (the world's
law), so frame 0 alone determines every later frame, while a single later frame does not (after a bounce the
direction no longer follows the colour). Everything is a pure function of the video's seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from preprocessing.synthetic import bounce, write_mp4

# Saturated colours, far from the grey-ish background; colour i moves at angle 15 + 60 i degrees.
PALETTE = ((230, 40, 40), (40, 210, 60), (50, 80, 235), (235, 220, 40), (225, 50, 220), (40, 215, 225))
SHAPES = ("disc", "square")


@dataclass(frozen=True)
class WorldVideo:
    """One video of the world: everything needed to render it or to know where its object is."""

    seed: int
    size: int
    radius: int
    speed: float
    colour_index: int
    shape: str
    start: tuple[float, float]

    @property
    def colour(self) -> tuple[int, int, int]:
        return PALETTE[self.colour_index]

    @property
    def velocity(self) -> tuple[float, float]:
        angle = np.deg2rad(15 + 60 * self.colour_index)
        return self.speed * float(np.cos(angle)), self.speed * float(np.sin(angle))

    def positions(self, num_frames: int) -> np.ndarray:
        """True object centres [T, 2] (x, y in pixels), bouncing off the walls."""
        start, velocity = np.array(self.start), np.array(self.velocity)
        return np.array([bounce(start + velocity * t, (self.size, self.size), self.radius)
                         for t in range(num_frames)], dtype=np.float32)


# The world's defaults: a 32 px frame, an object of radius 4 px moving 1.5 px per frame, so that it crosses the free
# span (24 px) in 16 frames and bounces within the first 32 frames of every video.
SIZE, RADIUS, SPEED = 32, 4, 1.5


def sample_video(seed: int, size: int = SIZE, radius: int = RADIUS, speed: float = SPEED) -> WorldVideo:
    """The world video of `seed`: colour, shape and start position drawn from it."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(radius, size - radius, size=2)
    return WorldVideo(seed, size, radius, speed, int(rng.integers(len(PALETTE))), SHAPES[int(rng.integers(2))],
                      (float(start[0]), float(start[1])))


def background(video: WorldVideo) -> np.ndarray:
    """The static float [H, W, 3] background: mid grey with a faint tint drawn from the seed."""
    rng = np.random.default_rng(video.seed + 1_000_003)
    tint = np.clip(130 + rng.uniform(-12, 12, size=3), 0, 255).astype(np.float32)
    return np.broadcast_to(tint, (video.size, video.size, 3)).copy()


def render(video: WorldVideo, num_frames: int) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of the video."""
    y, x = np.mgrid[0:video.size, 0:video.size].astype(np.float32)
    base = background(video)
    frames = np.empty((num_frames, video.size, video.size, 3), dtype=np.uint8)
    for t, (cx, cy) in enumerate(video.positions(num_frames)):
        frame = base.copy()
        if video.shape == "disc":
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= video.radius ** 2
        else:
            inside = (abs(x - cx) <= video.radius) & (abs(y - cy) <= video.radius)
        frame[inside] = video.colour
        frames[t] = frame.astype(np.uint8)
    return frames


def write_world_corpus(root: str | os.PathLike, seeds: list[int], num_frames: int, fps: int, size: int = SIZE,
                       ) -> Path:
    """Write one mp4 per seed under `root/videos` and the corpus manifest `root/metadata.json`; return it."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    entries = []
    for seed in seeds:
        video = sample_video(seed, size)
        name = f"videos/world_{seed:06d}.mp4"
        if not (root / name).is_file():
            write_mp4(root / name, render(video, num_frames), fps)
        entries.append({"path": name, "cap": f"a {video.shape} moving"})
    manifest = root / "metadata.json"
    manifest.write_text(json.dumps(entries, indent=1))
    return manifest


def write_first_frames(folder: str | os.PathLike, seeds: list[int], size: int = SIZE) -> dict[str, str]:
    """Held-out conditioning images and the truth of each (`world.json`: id -> WorldVideo fields) in `folder`;
    return id -> image file name (relative to `folder`, as a generation listing there names it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, truth = {}, {}
    for seed in seeds:
        video = sample_video(seed, size)
        row_id = f"world_{seed:06d}"
        PIL.Image.fromarray(render(video, 1)[0]).save(folder / f"{row_id}.png")
        images[row_id] = f"{row_id}.png"
        truth[row_id] = asdict(video)
    (folder / "world.json").write_text(json.dumps(truth, indent=1))
    return images


def read_truth(folder: str | os.PathLike) -> dict[str, WorldVideo]:
    """Row id -> `WorldVideo`, as `write_first_frames` stored them."""
    stored = json.loads((Path(folder) / "world.json").read_text())
    return {row_id: WorldVideo(**{**fields, "start": tuple(fields["start"])}) for row_id, fields in stored.items()}
