"""Metrics from learned encoders: CLIP-feature consistency with SVD's own image encoder, and FVD with a local I3D.

CLIP consistency needs only the SVD checkpoint the videos came from (its `image_encoder`). FVD needs the I3D
TorchScript detector used by the common FVD implementations (`i3d_torchscript.pt`) as a local file plus a folder of
real reference videos; when either is missing FVD is skipped and the reason is recorded, never estimated otherwise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exvideo import SVDComponents
from pipelines.evaluate.metrics import VideoMetrics, segment_summary
from pipelines.evaluate.videos import read_frames


@torch.no_grad()
def clip_embeddings(svd: SVDComponents, images: np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """Unit-length CLIP image embeddings `[N, D]` of uint8 RGB images `[N, H, W, 3]`, via SVD's feature extractor
    and image encoder (the embedding SVD conditions on)."""
    device = svd.image_encoder.device
    dtype = svd.image_encoder.dtype
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = svd.feature_extractor(images=list(images[start:start + batch_size]), return_tensors="pt").pixel_values
        chunks.append(svd.image_encoder(pixels.to(device, dtype)).image_embeds.float().cpu())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def clip_consistency(svd: SVDComponents, frames: np.ndarray, conditioning: np.ndarray | None = None) -> VideoMetrics:
    """Cosine similarity of CLIP embeddings: frame to previous frame, frame to frame 0, frame to the conditioning
    image; each as a curve over frame index, its mean and its first / middle / last quarter."""
    embeddings = clip_embeddings(svd, frames)
    curves = {
        "clip_to_previous": (embeddings[1:] * embeddings[:-1]).sum(-1).numpy(),
        "clip_to_first": (embeddings @ embeddings[0]).numpy(),
    }
    if conditioning is not None:
        curves["clip_to_conditioning"] = (embeddings @ clip_embeddings(svd, conditioning[None])[0]).numpy()
    scalars = {name: float(curve.mean()) for name, curve in curves.items()}
    scalars.update(segment_summary(curves))
    return VideoMetrics(scalars, curves)


@dataclass
class FVDResult:
    """FVD between generated and reference videos, or the reason it was not computed."""

    value: float | None
    reason: str = ""
    num_generated: int = 0
    num_reference: int = 0


def fvd_skip_reason(i3d_path: Path | None, reference_dir: Path | None) -> str | None:
    """Why FVD cannot run with these inputs, or None when it can."""
    if i3d_path is None:
        return "no I3D TorchScript file given (set i3d_path to a local i3d_torchscript.pt)"
    if not Path(i3d_path).is_file():
        return f"i3d_path {i3d_path} does not exist"
    if reference_dir is None:
        return "no reference videos given (set fvd_reference_dir to a folder of real mp4 videos)"
    if not Path(reference_dir).is_dir():
        return f"fvd_reference_dir {reference_dir} does not exist"
    return None


def sample_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """`count` frames spread evenly over the whole video, so FVD sees its end as much as its start."""
    if len(frames) < count:
        raise ValueError(f"FVD needs {count} frames per video, a video has {len(frames)}; lower fvd_num_frames")
    return frames[np.linspace(0, len(frames) - 1, count).round().astype(int)]


@torch.no_grad()
def i3d_features(detector: torch.jit.ScriptModule, videos: list[np.ndarray], num_frames: int) -> np.ndarray:
    """I3D features `[N, D]` of uint8 videos; the detector gets `[1, 3, T, H, W]` in [-1, 1] and resizes itself."""
    features = []
    for frames in videos:
        clip = torch.from_numpy(sample_frames(frames, num_frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        features.append(detector(clip, rescale=False, resize=True, return_features=True).cpu().numpy())
    return np.concatenate(features).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets `a` and `b` (rows are samples)."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # trace(sqrtm(cov_a @ cov_b)) is the sum of square roots of its eigenvalues (real and >= 0 up to rounding).
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eigenvalues).sum()
    return float(max(distance, 0.0))


def compute_fvd(i3d_path: Path | None, generated: list[np.ndarray], reference_dir: Path | None,
                reference_videos: list[np.ndarray] | None = None, num_frames: int = 16) -> FVDResult:
    """FVD of `generated` against the reference videos (decoded from `reference_dir` unless given), or a skip."""
    reason = fvd_skip_reason(i3d_path, reference_dir)
    if reason is not None:
        return FVDResult(None, reason)
    if reference_videos is None:
        reference_videos = [read_frames(path) for path in sorted(Path(reference_dir).glob("*.mp4"))]
    if len(generated) < 2 or len(reference_videos) < 2:
        return FVDResult(None, f"FVD needs at least 2 generated and 2 reference videos, got {len(generated)} and "
                               f"{len(reference_videos)}", len(generated), len(reference_videos))
    with warnings.catch_warnings():
        # The FVD detector is published only as TorchScript, which torch now flags as deprecated.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load.*")
        detector = torch.jit.load(str(i3d_path), map_location="cpu").eval()
    value = frechet_distance(i3d_features(detector, generated, num_frames),
                             i3d_features(detector, reference_videos, num_frames))
    return FVDResult(value, "", len(generated), len(reference_videos))

