"""The long-video pipeline on a tiny real SVD checkpoint: lengths, sizes, seeds, methods, guidance, decode, mp4."""

from __future__ import annotations

import decord
import numpy as np
import PIL.Image
import pytest
import torch

from pipelines.generate import GenerationParams, generate_video, load_pipeline, write_mp4
from pipelines.generate.decode import decode_video
from pipelines.generate.guidance import guidance_ramp, guided_model_output
from pipelines.generate.latents import post_process_latents
from pipelines.generate.noise import shuffled_window_noise
from pipelines.generate.windows import blended_map, window_starts

TINY = {"height": 64, "width": 64, "steps": 2}


@pytest.fixture(scope="module")
def exvideo_pipe(tiny_svd_dir):
    pipe = load_pipeline(tiny_svd_dir, method="exvideo", table_frames=64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_pipe(tiny_svd_dir):
    pipe = load_pipeline(tiny_svd_dir, method="direct")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def first_frame() -> PIL.Image.Image:
    # Not square on purpose: the pipeline centre-crops to the requested aspect ratio.
    pixels = np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def forty_frames(exvideo_pipe, first_frame):
    return generate_video(exvideo_pipe, first_frame, num_frames=40, seed=7, **TINY)


def test_forty_frame_exvideo_video_decodes_to_forty_frames(forty_frames, tmp_path):
    assert forty_frames.frames.shape == (40, 64, 64, 3) and forty_frames.frames.dtype == np.uint8
    path = write_mp4(tmp_path / "v.mp4", forty_frames.frames, fps=30)
    reader = decord.VideoReader(str(path))
    decoded = reader.get_batch(list(range(len(reader)))).asnumpy()
    assert len(reader) == 40 and decoded.shape == (40, 64, 64, 3)
    assert reader.get_avg_fps() == pytest.approx(30)
    # H.264 is lossy; an unrelated video would be ~80 grey levels away on this noise-like content.
    assert np.abs(decoded.astype(int) - forty_frames.frames).mean() < 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no temporary left behind
    assert forty_frames.first_frame.size == (64, 64)


def test_same_seed_same_frames_other_seed_other_frames(exvideo_pipe, first_frame):
    first, again, other = (generate_video(exvideo_pipe, first_frame, num_frames=12, seed=seed, **TINY)
                           for seed in (7, 7, 8))
    assert np.array_equal(again.frames, first.frames)
    assert np.abs(other.frames.astype(int) - first.frames).mean() > 5


@pytest.mark.parametrize("method", ["direct", "chain", "windows"])
def test_every_baseline_yields_the_requested_length(base_pipe, first_frame, method):
    # Short clips keep the chain and the windows cheap while still needing several of them for 14 frames.
    video = generate_video(base_pipe, first_frame, method=method, num_frames=14, clip_frames=6, window_stride=3,
                           **TINY)
    assert video.frames.shape == (14, 64, 64, 3)
    assert video.frames.std() > 1  # something was drawn


def test_methods_refuse_the_wrong_model(exvideo_pipe, base_pipe, first_frame):
    with pytest.raises(ValueError, match="needs an ExVideo-extended UNet"):
        generate_video(base_pipe, first_frame, num_frames=10, **TINY)
    with pytest.raises(ValueError, match="training-free baseline"):
        generate_video(exvideo_pipe, first_frame, method="windows", num_frames=10, **TINY)
    with pytest.raises(ValueError, match="exceeds the UNet's 64-frame position table"):
        generate_video(exvideo_pipe, first_frame, num_frames=65, **TINY)


@pytest.mark.parametrize("bad, match", [({"num_frames": 1}, "num_frames"), ({"height": 60}, "multiple of 8"),
                                        ({"decode_stride": 9}, "exceeds decode_window"),
                                        ({"window_stride": 25}, "must be below clip_frames"),
                                        ({"method": "magic"}, "method"), ({"speed": 2}, "speed")])
def test_bad_parameters_are_refused_by_name(exvideo_pipe, first_frame, bad, match):
    with pytest.raises(ValueError, match=match):
        generate_video(exvideo_pipe, first_frame, **{**TINY, **bad})


def test_second_pass_makes_the_larger_video(exvideo_pipe, first_frame):
    video = generate_video(exvideo_pipe, first_frame, num_frames=6, renormalize=True,
                           second_pass={"height": 96, "width": 128, "strength": 0.5}, **TINY)
    assert video.frames.shape == (6, 96, 128, 3)
    assert video.first_frame.size == (128, 96)
    assert "second_pass_s" in video.timings


def test_guidance_runs_both_branches_in_one_call_with_a_per_frame_ramp(exvideo_pipe, first_frame):
    params = GenerationParams(num_frames=5, min_guidance=1.0, max_guidance=3.0, **TINY)
    cond = exvideo_pipe.encode_condition(first_frame.resize((64, 64)), params, torch.Generator().manual_seed(0))
    latents = torch.randn(1, 5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor(0.5)
    ramp = guidance_ramp(1.0, 3.0, 5)
    calls = []
    hook = exvideo_pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        guided = guided_model_output(exvideo_pipe.unet, latents, timestep, cond, ramp)
    finally:
        hook.remove()
    assert calls == [2]  # one UNet call holding both branches

    def branch(index):
        inputs = torch.cat([latents, cond.image_latents[index:index + 1].expand(-1, 5, -1, -1, -1)], dim=2)
        return exvideo_pipe.unet(inputs, timestep, cond.image_embeddings[index:index + 1],
                                 added_time_ids=cond.added_time_ids[index:index + 1]).sample

    uncond, conditional = branch(0), branch(1)
    torch.testing.assert_close(guided[:, 0], conditional[:, 0], atol=1e-4, rtol=1e-4)  # scale 1: conditional only
    torch.testing.assert_close(guided[:, 4], uncond[:, 4] + 3.0 * (conditional[:, 4] - uncond[:, 4]),
                               atol=1e-4, rtol=1e-4)


def _hard_cut_error(vae, latents, reference):
    cut = decode_video(vae, latents, window=8, stride=8)[0]
    return (cut - reference).abs().mean(dim=(1, 2, 3)).max()


def test_windowed_decode_matches_a_single_window_and_blends_without_seams(exvideo_pipe):
    vae = exvideo_pipe.vae
    latents = torch.randn(1, 24, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    single = exvideo_pipe.decode_latents(latents, 24, decode_chunk_size=24)[0].transpose(0, 1)  # diffusers' decode
    covering = decode_video(vae, latents, window=24, stride=4)[0]
    torch.testing.assert_close(covering, single, atol=1e-5, rtol=1e-5)

    blended = decode_video(vae, latents, window=8, stride=4)[0]
    per_frame_error = (blended - single).abs().mean(dim=(1, 2, 3))
    assert blended.shape == single.shape
    assert per_frame_error.mean() < 0.05
    # Cutting windows without overlap leaves a jump at every cut; cross-fading overlaps must do clearly better.
    assert per_frame_error.max() < 0.5 * _hard_cut_error(vae, latents, single)


def test_blending_is_exact_for_a_function_that_treats_positions_independently(exvideo_pipe):
    pixels = torch.rand(19, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encode = exvideo_pipe.vae.encoder  # SVD's encoder is a per-frame 2D network

    with torch.no_grad():
        whole = encode(pixels)
        windowed = blended_map(encode, pixels, dim=0, window=8, stride=3)
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=1e-5)
    assert window_starts(40, 8, 4)[-1] == 32 and window_starts(5, 8, 4) == [0]


def test_tiled_decode_keeps_shape_and_stays_close(exvideo_pipe):
    latents = torch.randn(1, 6, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    untiled = decode_video(exvideo_pipe.vae, latents, window=8, stride=4)
    tiled = decode_video(exvideo_pipe.vae, latents, window=8, stride=4, tile=64, tile_overlap=32)
    assert tiled.shape == untiled.shape == (1, 6, 3, 96, 128)
    assert (tiled - untiled).abs().mean() < 0.25


def test_renormalize_gives_every_frame_the_video_statistics_times_contrast():
    latents = torch.randn(2, 6, 4, 8, 8) * torch.linspace(0.5, 2, 6).view(1, 6, 1, 1, 1) + 3
    out = post_process_latents(latents, renormalize=True, contrast=1.2)
    for video in range(2):
        mean, std = latents[video].mean(), latents[video].std()
        torch.testing.assert_close(out[video].mean(dim=(1, 2, 3)), (mean * 1.2).expand(6), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[video].std(dim=(1, 2, 3)), (std * 1.2).expand(6), atol=1e-4, rtol=1e-4)


def test_freenoise_windows_share_one_pool_of_noise_in_new_orders():
    noise = shuffled_window_noise((1, 20, 2, 3, 3), window=8, stride=4, generator=torch.Generator().manual_seed(0),
                                  device=torch.device("cpu"), dtype=torch.float32)
    assert noise.shape == (1, 20, 2, 3, 3)
    first = {tuple(frame.flatten().tolist()) for frame in noise[0, :8]}
    for start in window_starts(20, 8, 4):
        assert {tuple(frame.flatten().tolist()) for frame in noise[0, start:start + 8]} == first
    assert not torch.equal(noise[:, 8:16], noise[:, :8])  # reordered, not repeated


def test_mp4_writer_refuses_frames_it_cannot_encode(tmp_path):
    with pytest.raises(ValueError, match="even sizes"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((3, 63, 64, 3), np.uint8), fps=30)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "float.mp4", np.zeros((3, 64, 64, 3), np.float32), fps=30)
    assert list(tmp_path.iterdir()) == []


def test_chain_conditions_each_clip_on_the_previous_clips_last_frame(base_pipe, first_frame, monkeypatch):
    seen, decoded = [], []
    encode, decode_frame = base_pipe.encode_condition, base_pipe._decode_frame
    monkeypatch.setattr(base_pipe, "encode_condition", lambda image, *a: seen.append(image) or encode(image, *a))
    monkeypatch.setattr(base_pipe, "_decode_frame", lambda latent: decoded.append(decode_frame(latent)) or decoded[-1])
    video = generate_video(base_pipe, first_frame, method="chain", num_frames=10, clip_frames=4, window_stride=2,
                           **TINY)
    assert video.frames.shape == (10, 64, 64, 3)  # 4 + 3 + 3: a continuation drops its repeated first frame
    assert len(seen) == 3
    assert seen[1] is decoded[0] and seen[2] is decoded[1]
