"""AnimateDiff text-to-video on a tiny random AnimateDiff of diffusers' own classes: the three methods (exvideo,
naive, freenoise), the identity of a freshly extended UNet end to end, the family checks, and the batch job taking
prompt rows."""

from __future__ import annotations

import itertools
import json

import decord
import numpy as np
import pytest
from diffusers.models.attention import BasicTransformerBlock

from exvideo import extend_unet, extended_num_frames, load_animatediff, save_adapter
from exvideo.motion_unet import motion_modules
from pipelines.generate import GenerateJobConfig, GenerationParams, generate_text_video, load_pipeline
from pipelines.generate.job import run_generate_job
from exvideo.families import checkpoint_family
from pipelines.generate.params import check_family
from pipelines.generate.rows import check_row

METHODS = ("exvideo", "naive", "freenoise")
SMALL = {"height": 64, "width": 64, "steps": 2}


@pytest.fixture(scope="module")
def model(tiny_animatediff_dir):
    return tiny_animatediff_dir


@pytest.fixture(scope="module")
def exvideo_pipe(model):
    pipe = load_pipeline(model, method="exvideo", table_frames=64, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_pipe(model):
    # One base pipeline serves both baselines: each sets the motion modules up for its call only.
    pipe = load_pipeline(model, method="naive", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def videos(exvideo_pipe, base_pipe):
    """Each method's 64-frame video, made twice with the same seed (interleaved, so no call leaves state behind)."""
    made = {method: [] for method in METHODS}
    for _, method in itertools.product(range(2), METHODS):
        pipe = exvideo_pipe if method == "exvideo" else base_pipe
        made[method].append(generate_text_video(pipe, "a red kite", method=method, num_frames=64, **SMALL))
    return made


@pytest.mark.parametrize("method", METHODS)
def test_each_method_makes_a_64_frame_video_fixed_by_its_seed(videos, method):
    video, again = videos[method]
    assert video.frames.shape == (64, 64, 64, 3) and video.frames.dtype == np.uint8
    assert np.array_equal(video.frames, again.frames)
    assert np.array_equal(np.asarray(video.first_frame), video.frames[0])
    assert video.params.method == method and video.params.fps == 8 and video.defaults["filled"] == {"fps": 8}
    assert video.timings["denoise_s"] > 0 and video.timings["decode_s"] > 0


def test_the_methods_make_different_videos_and_another_seed_another_video(videos, exvideo_pipe):
    for first, second in itertools.combinations(METHODS, 2):
        assert not np.array_equal(videos[first][0].frames, videos[second][0].frames), (first, second)
    other = generate_text_video(exvideo_pipe, "a red kite", num_frames=64, seed=1, **SMALL)
    assert not np.array_equal(other.frames, videos["exvideo"][0].frames)


@pytest.fixture(scope="module")
def fresh_128(model):
    pipe = load_pipeline(model, method="exvideo", table_frames=128, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("num_frames", [9, 16])
def test_a_fresh_extension_makes_the_base_models_video_up_to_its_training_length(fresh_128, base_pipe, videos,
                                                                                 num_frames):
    # `videos` ran naive and freenoise at 64 frames on base_pipe first: the base must be back as it was.
    for module in motion_modules(base_pipe.unet).values():
        assert all(type(block) is BasicTransformerBlock and block.pos_embed.pe.shape[1] == 32
                   for block in module.transformer_blocks)
    ours = generate_text_video(fresh_128, "a red kite", num_frames=num_frames, **SMALL)
    # naive at no more than the base's 32 sinusoid rows is the base model untouched.
    base = generate_text_video(base_pipe, "a red kite", method="naive", num_frames=num_frames, **SMALL)
    assert np.array_equal(ours.frames, base.frames)


def test_an_adapter_loads_for_exvideo_and_is_refused_by_the_baselines(model, tmp_path):
    unet = extend_unet(load_animatediff(model).unet, num_frames=32)
    adapter = save_adapter(unet, tmp_path / "adapter.safetensors")
    assert extended_num_frames(load_pipeline(model, adapter, device="cpu").unet) == 32
    for method in ("naive", "freenoise"):
        with pytest.raises(ValueError, match=f"method '{method}' is a training-free baseline.*drop the adapter"):
            load_pipeline(model, adapter, method=method, device="cpu")


def test_methods_refuse_the_wrong_pipeline_or_settings(exvideo_pipe, base_pipe):
    with pytest.raises(ValueError, match="'naive' is a training-free baseline.*ExVideo-extended"):
        generate_text_video(exvideo_pipe, "a kite", method="naive", num_frames=16, **SMALL)
    with pytest.raises(ValueError, match="'exvideo' needs an ExVideo-extended UNet"):
        generate_text_video(base_pipe, "a kite", num_frames=16, **SMALL)
    with pytest.raises(ValueError, match="num_frames 65 exceeds the UNet's 64-frame position table"):
        generate_text_video(exvideo_pipe, "a kite", num_frames=65, **SMALL)
    with pytest.raises(ValueError, match="freenoise_stride 16 must be below"):
        generate_text_video(base_pipe, "a kite", method="freenoise", freenoise_stride=16, num_frames=32, **SMALL)


def test_a_method_or_field_of_the_other_family_is_refused_naming_both(model, tiny_svd_dir):
    with pytest.raises(ValueError, match=r"'windows' is a SVD \(image-to-video\) method, but the model is "
                                         r"AnimateDiff \(text-to-video\); its methods are exvideo, naive, freenoise"):
        load_pipeline(model, method="windows", device="cpu")
    with pytest.raises(ValueError, match=r"'freenoise' is a AnimateDiff \(text-to-video\) method, but the model is "
                                         r"SVD \(image-to-video\)"):
        load_pipeline(tiny_svd_dir, method="freenoise", device="cpu")
    with pytest.raises(ValueError, match=r"min_guidance, overlap: SVD \(image-to-video\) parameter"):
        check_family(GenerationParams(min_guidance=3, overlap=4), "animatediff")
    with pytest.raises(ValueError, match=r"negative_prompt: AnimateDiff \(text-to-video\) parameter"):
        check_family(GenerationParams(negative_prompt="blurry"), "svd")
    check_family(GenerationParams(), "svd")
    check_family(GenerationParams(), "animatediff")


def test_the_family_comes_from_the_checkpoint_or_a_declaration(model, tmp_path):
    assert checkpoint_family(model) == "animatediff" and checkpoint_family(tmp_path) == "svd"
    assert checkpoint_family(tmp_path, "animatediff") == "animatediff"
    with pytest.raises(ValueError, match="declares model family 'svd' but"):
        checkpoint_family(model, "svd")


def test_rows_for_animatediff_are_prompts_without_a_text_to_image_pipeline(tmp_path):
    defaults = GenerationParams(num_frames=16)
    prompt = check_row({"id": "a", "prompt": "a kite"}, 1, tmp_path, defaults, False, "animatediff")
    assert (prompt.prompt, prompt.reason) == ("a kite", None)
    image = check_row({"id": "b", "image": "b.png"}, 2, tmp_path, defaults, False, "animatediff")
    assert "gives an image, but the model is AnimateDiff (text-to-video)" in image.reason
    method = check_row({"id": "c", "prompt": "a kite", "method": "chain"}, 3, tmp_path, defaults, False,
                       "animatediff")
    assert "'chain' is a SVD (image-to-video) method" in method.reason


def test_the_job_makes_prompt_rows_refuses_image_rows_and_skips_done_rows_on_rerun(model, tmp_path, ray_local):
    rows = [{"id": "kite", "prompt": "a red kite"}, {"id": "boat", "prompt": "a boat", "seed": 3},
            {"id": "still", "image": "still.png"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = GenerateJobConfig(input=tmp_path / "rows.jsonl", output=tmp_path / "out", model=model, table_frames=32,
                            device="cpu", params=GenerationParams(num_frames=24, **SMALL))
    summary = run_generate_job(cfg)
    assert summary["made"] == ["boat", "kite"] and summary["failed"] == 1
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text())
    assert failure["id"] == "still" and "gives an image" in failure["reason"]
    for row_id, seed in (("kite", 0), ("boat", 3)):
        record = json.loads((tmp_path / "out" / "videos" / f"{row_id}.json").read_text())
        assert record["source"] == {"prompt": rows[[r["id"] for r in rows].index(row_id)]["prompt"]}
        assert (record["method"], record["seed"], record["frames"], record["fps"]) == ("exvideo", seed, 24, 8)
        reader = decord.VideoReader(str(tmp_path / "out" / "videos" / f"{row_id}.mp4"))
        assert len(reader) == 24 and reader[0].shape == (64, 64, 3)
    rerun = run_generate_job(cfg)
    assert rerun["made"] == [] and rerun["skipped_done"] == ["boat", "kite"] and rerun["failed"] == 1
