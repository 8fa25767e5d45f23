"""Generation as the reference does it, on the tiny real SVD checkpoint: weight-dependent sampling defaults, contrast,
the fps policy through the adapter, the second pass's schedule, frame conditioning and continuation past the table."""

from __future__ import annotations


import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from conftest import benchmark
from exvideo import adapter_state_dict, extend_unet, load_unet, trainable_parameters
from exvideo.config import load_config
from pipelines.generate import GenerateJobConfig, GenerationParams, generate_video, load_pipeline
from pipelines.generate.defaults import BASE_MODEL, REFERENCE_CHECKPOINT
from pipelines.generate.rows import check_row
from pipelines.train.state import TrainState, checkpoint_metadata, save_checkpoint

TINY = {"height": 64, "width": 64, "steps": 2}


def tiny_adapter(tiny_svd_dir, num_frames: int = 16):
    unet = extend_unet(load_unet(tiny_svd_dir), num_frames)
    with torch.no_grad():
        for param in trainable_parameters(unet).values():
            param.add_(0.01)
    return unet


@pytest.fixture(scope="module")
def reference_adapter(tiny_svd_dir, tmp_path_factory):
    """The tiny adapter in the released checkpoint's layout (names `blocks.N.*`, no metadata)."""
    path = tmp_path_factory.mktemp("reference") / "model.fp16.safetensors"
    tensors = adapter_state_dict(tiny_adapter(tiny_svd_dir), "reference")
    save_file({k: v.contiguous().half() for k, v in tensors.items()}, str(path))
    return path


def our_adapter(tiny_svd_dir, directory, fps_seen: dict[str, int], policy) -> str:
    """An adapter written by the training checkpoint code, with a state that saw clips at `fps_seen`."""
    unet = tiny_adapter(tiny_svd_dir)
    state = TrainState(fps_seen=fps_seen)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory, unet, None, state, None,
                    checkpoint_metadata(unet, "tiny", state.training_metadata(policy)))
    return directory / "adapter.safetensors"


@pytest.fixture(scope="module")
def first_frame():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_the_released_layout_gets_the_reference_defaults_and_says_why(tiny_svd_dir, reference_adapter, first_frame):
    pipe = load_pipeline(tiny_svd_dir, reference_adapter)
    assert pipe.sampling_defaults == REFERENCE_CHECKPOINT
    video = generate_video(pipe, first_frame, num_frames=4, **TINY)
    assert (video.params.fps, video.params.renormalize, video.params.contrast) == (30, True, 1.2)
    assert video.defaults["filled"] == {"fps": 30, "renormalize": True, "contrast": 1.2}
    assert "released ExVideo checkpoint" in video.defaults["why"]
    # What the caller sets stays, and the record says only the rest was filled.
    video = generate_video(pipe, first_frame, num_frames=4, contrast=1.0, **TINY)
    assert video.params.contrast == 1.0 and video.defaults["filled"] == {"fps": 30, "renormalize": True}


def test_contrast_alone_scales_the_decoders_latents_by_exactly_its_value(tiny_svd_dir, first_frame, monkeypatch):
    import pipelines.generate.pipeline as pipeline_module

    decoded = []
    decode = pipeline_module.decode_video
    monkeypatch.setattr(pipeline_module, "decode_video", lambda vae, latents, *a: decoded.append(latents) or
                        decode(vae, latents, *a))
    pipe = load_pipeline(tiny_svd_dir, table_frames=16)
    assert pipe.sampling_defaults == BASE_MODEL
    for contrast in (1.0, 1.5):
        generate_video(pipe, first_frame, num_frames=4, contrast=contrast, **TINY)
    assert torch.equal(decoded[1], decoded[0] * 1.5)


def test_the_fps_policy_round_trips_through_the_adapter_into_generation(tiny_svd_dir, tmp_path, first_frame):
    fixed = our_adapter(tiny_svd_dir, tmp_path / "fixed", {"24": 9}, 30)
    clip = our_adapter(tiny_svd_dir, tmp_path / "clip", {"24": 3, "12": 7}, "clip")
    seen = {}
    for name, path in (("fixed", fixed), ("clip", clip)):
        pipe = load_pipeline(tiny_svd_dir, path)
        encode = pipe.encode_condition
        pipe.encode_condition = lambda image, params, generator: seen.setdefault(
            name, encode(image, params, generator))
        video = generate_video(pipe, first_frame, num_frames=4, **TINY)
        assert (video.params.renormalize, video.params.contrast) == (False, 1.0)  # one latent scale, as trained
        assert video.params.fps == {"fixed": 30, "clip": 12}[name]
    assert seen["fixed"].added_time_ids[0, 0] == 29 and seen["clip"].added_time_ids[0, 0] == 11


def test_the_second_pass_runs_the_reference_sigmas(tiny_svd_dir, first_frame):
    pipe = load_pipeline(tiny_svd_dir, table_frames=16)

    def reference(steps: int, strength: float) -> np.ndarray:  # the reference scheduler's set_timesteps, float64
        ramp = np.linspace(1 - strength, 1, steps)
        high, low = 700.0 ** (1 / 7), 0.002 ** (1 / 7)
        return (high + ramp * (low - high)) ** 7

    pipe.set_schedule(25, 0.5)
    sigmas = pipe.scheduler.sigmas.double().numpy()
    np.testing.assert_allclose(sigmas[:-1], reference(25, 0.5), rtol=1e-6)
    assert sigmas[-1] == 0 and sigmas[0] == pytest.approx(15.6, abs=0.05)
    # At full strength the scheduler's own schedule is the reference's.
    pipe.set_schedule(10)
    np.testing.assert_allclose(pipe.scheduler.sigmas.double().numpy()[:-1], reference(10, 1.0), rtol=1e-5)

    calls = []
    set_schedule = pipe.set_schedule
    pipe.set_schedule = lambda steps, strength=1.0: calls.append((steps, strength)) or set_schedule(steps, strength)
    video = generate_video(pipe, first_frame, num_frames=4, second_pass={"height": 96, "width": 96, "strength": 0.4},
                           **TINY)
    assert calls == [(2, 1.0), (2, 0.4)] and video.frames.shape == (4, 96, 96, 3)


def gradient(colour: tuple[int, int, int], size: int = 64) -> np.ndarray:
    ramp = np.linspace(0.2, 1, size)[None, :, None]
    return (np.array(colour)[None, None] * ramp * np.ones((size, 1, 1))).astype(np.uint8)


def test_given_frames_decode_back_and_the_others_do_not(tiny_svd_dir, first_frame, tmp_path, monkeypatch):
    """The latents handed to the decoder hold, at the given frames, those frames' own VAE latents (so they decode as
    the VAE's round trip of them decodes); every other frame's latent differs from them."""
    import pipelines.generate.pipeline as pipeline_module

    decoded = []
    decode = pipeline_module.decode_video
    monkeypatch.setattr(pipeline_module, "decode_video", lambda vae, latents, *a: decoded.append(latents) or
                        decode(vae, latents, *a))
    pipe = load_pipeline(tiny_svd_dir, table_frames=16)
    given = {3: gradient((250, 40, 40)), 6: gradient((40, 40, 250))}
    for index, pixels in given.items():
        PIL.Image.fromarray(pixels).save(tmp_path / f"f{index}.png")
    frames = {index: str(tmp_path / f"f{index}.png") for index in given}
    video = generate_video(pipe, first_frame, num_frames=8, frames=frames, steps=4, height=64, width=64)
    assert video.frames.shape == (8, 64, 64, 3)
    stack = torch.stack([torch.from_numpy(given[i]).permute(2, 0, 1).float() / 127.5 - 1 for i in (3, 6)])
    with torch.no_grad():
        own = pipe.encode_frames(stack, 8)[0]
    final = decoded[0][0]
    # Known frames are last noised to the schedule's sigma_min (0.002); the step from there adds c_out * F, a few
    # sigma_min at most.
    for k, index in enumerate((3, 6)):
        error = (final[index] - own[k]).abs()
        assert error.max() < 5 * 0.002
        assert min((final[j] - own[k]).abs().mean() for j in (0, 1, 7)) > 10 * error.mean()


@pytest.mark.parametrize("change, match", [
    ({"frames": {8: "x.png"}}, r"frames indices \[8\] lie outside the video's 8 frames"),
    ({"frames": {2: "missing.png"}}, "frame missing.png does not exist"),
    ({"frames": {2: "small.png"}}, r"frames\[2\] .*small.png is 32x32 but the video is 64x64"),
    ({"frames": {2: "clip.mp4#99"}}, r"has 4 frames, so N in .*clip.mp4#N must be 0..3"),
    ({"method": "chain", "frames": {2: "x.png"}}, "chain conditions each clip"),
    ({"num_frames": 40}, "set overlap"),
    ({"num_frames": 40, "overlap": 16}, "overlap 16 must be below the UNet's 16-frame position table"),
])
def test_bad_frames_and_lengths_are_refused_by_name(tiny_svd_dir, first_frame, tmp_path, monkeypatch, change,
                                                     match):
    from pipelines.generate.video_io import write_mp4

    monkeypatch.chdir(tmp_path)
    PIL.Image.fromarray(gradient((1, 2, 3), 32)).save("small.png")
    write_mp4(tmp_path / "clip.mp4", np.zeros((4, 64, 64, 3), np.uint8), fps=8)
    pipe = load_pipeline(tiny_svd_dir, table_frames=16, method="chain" if change.get("method") else "exvideo")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        generate_video(pipe, first_frame, **{"num_frames": 8, **TINY, **change})


def test_frames_come_from_the_api_the_cli_and_batch_rows(tmp_path):
    cfg = load_config(GenerateJobConfig, overrides=["params.frames={3: a.png, 7: 'clip.mp4#2'}"])
    assert cfg.params.frames == {3: "a.png", 7: "clip.mp4#2"}
    row = check_row({"id": "r", "image": "first.png", "frames": '{"2": "f.png", "5": null}'}, 1, tmp_path,
                    GenerationParams(num_frames=8), False)
    assert row.reason is None and row.params.frames == {2: str(tmp_path / "f.png")}
    bad = check_row({"id": "r", "image": "first.png", "frames": "{2: f.png"}, 1, tmp_path, GenerationParams(), False)
    assert bad.reason.startswith("row 1: frames: must be an object")


def test_a_512_frame_video_from_a_32_frame_table_stays_within_one_windows_memory(tiny_svd_dir, first_frame):
    LiveStorageBytes = benchmark("train_memory").LiveStorageBytes
    pipe = load_pipeline(tiny_svd_dir, table_frames=32)
    pipe.set_progress_bar_config(disable=True)
    peaks = {}
    first_pass = pipe._first_pass

    def measured(image, params, generator, pixels):
        with LiveStorageBytes() as tracker:
            latents = first_pass(image, params, generator, pixels)
        peaks[params.num_frames] = tracker.peak
        return latents

    pipe._first_pass = measured
    small = {"height": 32, "width": 32, "steps": 1}
    window = generate_video(pipe, first_frame, num_frames=32, **small)
    long = generate_video(pipe, first_frame, num_frames=512, overlap=8, **small)
    assert long.frames.shape == (512, 32, 32, 3) and window.frames.shape == (32, 32, 32, 3)
    assert peaks[512] <= 1.2 * peaks[32], peaks
    # The first window is the 32-frame video itself: continuation only adds windows after it (and cross-fades the
    # first's last 8 frames, which the decode's 8-frame windows carry 4 frames further back).
    assert np.array_equal(long.frames[:20], window.frames[:20])
