"""Encoder metrics: CLIP consistency with the (tiny) SVD image encoder, and FVD with a local TorchScript detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evaluation_videos import (
    fading_to_grey_video, static_video, texture, translating_video, write_generated, write_mp4,
)

import exvideo
from pipelines.evaluate.clip_metrics import (
    clip_consistency, clip_embeddings, compute_fvd, frechet_distance, fvd_skip_reason, sample_frames,
)
from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.run import run_evaluation


@pytest.fixture(scope="module")
def tiny_svd(tiny_svd_dir):
    return exvideo.load_svd(tiny_svd_dir)


def test_clip_consistency_is_perfect_for_a_still_video_and_drops_as_it_fades(tiny_svd):
    still = clip_consistency(tiny_svd, static_video(4), conditioning=static_video(1)[0])
    np.testing.assert_allclose(still.curves["clip_to_previous"], 1.0, atol=1e-5)
    np.testing.assert_allclose(still.curves["clip_to_conditioning"], 1.0, atol=1e-5)
    assert still.scalars["clip_to_first.last"] == pytest.approx(1.0, abs=1e-5)
    fading = clip_consistency(tiny_svd, fading_to_grey_video(8))
    assert fading.curves["clip_to_first"].shape == (8,) and fading.curves["clip_to_previous"].shape == (7,)
    assert fading.scalars["clip_to_first.last"] < fading.scalars["clip_to_first.first"]
    assert "clip_to_conditioning" not in fading.curves


def test_clip_embeddings_are_unit_length_and_batched_consistently(tiny_svd):
    images = np.stack([texture(64, 64, seed=s) for s in range(5)])
    embeddings = clip_embeddings(tiny_svd, images, batch_size=2)
    assert embeddings.shape == (5, 32)
    np.testing.assert_allclose(embeddings.norm(dim=-1), 1.0, atol=1e-5)
    torch.testing.assert_close(embeddings, clip_embeddings(tiny_svd, images, batch_size=5), atol=1e-5, rtol=0)


def test_frechet_distance_of_shifted_features_is_the_squared_shift():
    features = np.random.default_rng(0).normal(size=(50, 6))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0, 0, 0, 0])
    assert frechet_distance(features, features + shift) == pytest.approx(5.0, rel=1e-6)


class TinyI3DInterface(torch.nn.Module):
    """A small random 3D conv net with the call signature of the FVD I3D TorchScript detector (for plumbing tests;
    it says nothing about video quality)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, stride=2)

    def forward(self, videos: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        return self.conv(videos).mean(dim=(2, 3, 4))


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "tiny_i3d_torchscript.pt"
    torch.jit.script(TinyI3DInterface()).save(str(path))
    return path


def test_fvd_is_zero_against_itself_and_grows_with_a_different_set(tmp_path, detector_path):
    moving = [translating_video(dx, 1, num_frames=8) for dx in (1, 2, 3)]
    still = [np.repeat(texture(64, 64, seed=s)[None], 8, axis=0) for s in (4, 5, 6)]
    for index, video in enumerate(moving):
        write_mp4(video, tmp_path / f"real{index}.mp4")
    decoded_reference = compute_fvd(detector_path, moving, tmp_path, num_frames=4)  # reference read from mp4s
    assert decoded_reference.value is not None and decoded_reference.num_reference == 3
    same = compute_fvd(detector_path, moving, tmp_path, reference_videos=moving, num_frames=4)
    different = compute_fvd(detector_path, still, tmp_path, reference_videos=moving, num_frames=4)
    assert same.value == pytest.approx(0.0, abs=1e-6)
    assert different.value > 10 * max(decoded_reference.value, 1e-6)


def test_fvd_is_skipped_with_a_recorded_reason_never_estimated(tmp_path, detector_path):
    videos = [static_video(4), static_video(4)]
    assert "no I3D TorchScript file" in compute_fvd(None, videos, tmp_path).reason
    assert compute_fvd(None, videos, tmp_path).value is None
    assert "does not exist" in fvd_skip_reason(tmp_path / "absent.pt", tmp_path)
    assert "no reference videos" in fvd_skip_reason(detector_path, None)
    assert "fvd_reference_dir" in fvd_skip_reason(detector_path, tmp_path / "absent")
    too_few = compute_fvd(detector_path, videos[:1], tmp_path, reference_videos=videos, num_frames=4)
    assert too_few.value is None and "at least 2 generated" in too_few.reason
    with pytest.raises(ValueError, match="lower fvd_num_frames"):
        sample_frames(static_video(4), 16)


def test_evaluate_stage_reports_fvd_per_method_when_a_detector_and_references_are_given(tmp_path, detector_path):
    generated, reference = tmp_path / "generated", tmp_path / "reference"
    reference.mkdir()
    for dx in (1, 2):
        write_generated(generated, f"pan{dx}", translating_video(dx, 0, 8), method="exvideo")
        write_generated(generated, f"fade{dx}", fading_to_grey_video(8 + dx), method="chained")
        write_mp4(translating_video(dx, 1, 8), reference / f"real{dx}.mp4")
    outcome = run_evaluation(EvaluateConfig(
        videos_dir=generated, output_dir=tmp_path / "out", i3d_path=detector_path, fvd_reference_dir=reference,
        fvd_num_frames=4,
    ))
    fvd = {group.method: group.fvd for group in outcome["groups"]}
    assert fvd["exvideo"].value is not None and fvd["chained"].value is not None
    assert fvd["exvideo"].num_reference == 2 and fvd["exvideo"].num_generated == 2
    assert f"<td>{fvd['chained'].value:.2f}</td>" in outcome["report"].read_text()
