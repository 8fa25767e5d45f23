"""ExVideo on AnimateDiff (`UNetMotionModel`): the motion modules' position tables and 3D convolutions, their
trainable set and their adapters, on a tiny random UNet of diffusers' own classes; and the tiny AnimateDiff
checkpoint `exvideo make-tiny-model --family animatediff` writes."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNetMotionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

from exvideo import (
    AdapterMismatchError,
    cyclic_position_ids,
    extend_unet,
    extended_num_frames,
    freeze_for_post_tuning,
    load_adapter,
    load_animatediff,
    model_family,
    prepare_for_post_tuning,
    save_adapter,
    tiny_animatediff_components,
    trainable_parameters,
    write_tiny_animatediff,
)
from exvideo.speed_options import SpeedOptions
from exvideo.motion_unet import MOTION_BASE_FRAMES, ExVideoAnimateDiffTransformer3D, motion_modules


def tiny_motion_unet(seed: int = 0) -> UNetMotionModel:
    """A tiny AnimateDiff UNet: two resolutions, a motion module in every block and in the middle, with 32-row
    sinusoids like the released motion adapters (`motion_max_seq_length`)."""
    torch.manual_seed(seed)
    return UNetMotionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), norm_num_groups=8, cross_attention_dim=16,
        num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=32, use_motion_mid_block=True,
    ).eval()


@pytest.fixture(scope="module")
def base() -> UNetMotionModel:
    return tiny_motion_unet()


def run(unet: UNetMotionModel, num_frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, num_frames, 8, 8, generator=g)
    # One prompt's embedding per frame, as diffusers' AnimateDiff pipelines hand it to the UNet.
    text = torch.randn(1, 5, 16, generator=g).repeat_interleave(num_frames, dim=0)
    with torch.no_grad():
        return unet(sample, torch.tensor(500), encoder_hidden_states=text, return_dict=False)[0]


def test_every_motion_block_gets_the_sinusoid_at_cyclic_ids_and_an_identity_conv(base):
    unet = extend_unet(copy.deepcopy(base), num_frames=48)
    assert extended_num_frames(unet) == 48 and unet.config["exvideo_num_frames"] == 48
    modules = motion_modules(unet)
    # One per layer: 1 in each of the 2 down blocks, 2 in each of the 2 up blocks, 1 in the middle.
    assert len(modules) == 7 and all(isinstance(m, ExVideoAnimateDiffTransformer3D) for m in modules.values())
    ids = cyclic_position_ids(48, MOTION_BASE_FRAMES, 4)
    assert ids[:16] == list(range(16)) and ids[16:20] == [14, 13, 12, 11] and max(ids) == 15
    for name, module in modules.items():
        sinusoid = dict(base.named_modules())[f"{name}.transformer_blocks.0.pos_embed"].pe[0]
        table = module.transformer_blocks[0].pos_embed.embeddings
        assert table.shape == (48, module.proj_in.out_features)
        assert torch.equal(table.detach(), sinusoid[ids])
        conv = module.positional_conv
        assert torch.equal(conv.weight[:, :, 1, 1, 1], torch.eye(conv.in_channels))
        assert conv.weight.abs().sum() == conv.in_channels and conv.bias.abs().sum() == 0


@pytest.mark.parametrize("num_frames", [1, 7, 16])
def test_extended_equals_the_base_up_to_its_training_length(base, num_frames):
    extended = extend_unet(copy.deepcopy(base), num_frames=128)
    assert torch.equal(run(extended, num_frames), run(base, num_frames))


def test_extended_differs_beyond_the_base_length_and_refuses_more_than_its_table(base):
    extended = extend_unet(copy.deepcopy(base), num_frames=40)
    # Frames 16.. sit at bounced positions instead of the base's own sinusoid rows 16..23.
    assert (run(extended, 24) - run(base, 24)).abs().max() > 1e-4
    assert run(extended, 40).shape == (1, 4, 40, 8, 8)
    with pytest.raises(ValueError, match="asked for 41 frames but the ExVideo position tables hold 40"):
        run(extended, 41)
    with pytest.raises(ValueError, match="already extended to 40 frames"):
        extend_unet(extended, num_frames=64)


def test_the_new_conv_and_tables_are_in_the_forward_path(base):
    extended = extend_unet(copy.deepcopy(base), num_frames=16)
    before = run(extended, 8)
    module = next(iter(motion_modules(extended).values()))
    with torch.no_grad():
        module.positional_conv.weight[:, :, 0, 1, 1] += 0.1
    after_conv = run(extended, 8)
    with torch.no_grad():
        module.transformer_blocks[0].pos_embed.embeddings[3] += 0.1
    assert (after_conv - before).abs().max() > 1e-4 and (run(extended, 8) - after_conv).abs().max() > 1e-4


def test_the_trainable_set_is_the_motion_modules_and_the_rest_stays_frozen(base):
    unet = copy.deepcopy(base)
    motion_count = sum(p.numel() for m in motion_modules(unet).values() for p in m.parameters())
    extend_unet(unet, num_frames=32)
    new = sum(block.pos_embed.embeddings.numel() for m in motion_modules(unet).values()
              for block in m.transformer_blocks)
    new += sum(p.numel() for m in motion_modules(unet).values() for p in m.positional_conv.parameters())
    trainable = freeze_for_post_tuning(unet)
    assert sum(p.numel() for p in trainable.values()) == motion_count + new
    assert all(".motion_modules." in name for name in trainable)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(trainable)
    frozen = [n for n, p in unet.named_parameters() if not p.requires_grad]
    assert any(n.startswith("down_blocks.0.attentions.") for n in frozen) and "conv_in.weight" in frozen
    prepared = copy.deepcopy(base)
    assert set(prepare_for_post_tuning(prepared, 32)) == set(trainable)
    assert prepared.is_gradient_checkpointing and prepared.training
    # SVD's speed switches would silently do nothing on diffusers' motion modules: refused by name.
    with pytest.raises(ValueError, match=r"speed switches \['cudnn_autotune'\]"):
        prepare_for_post_tuning(copy.deepcopy(base), 32, speed=SpeedOptions(cudnn_autotune=True))


def test_adapter_round_trip_records_the_family(base, tmp_path):
    trained = extend_unet(copy.deepcopy(base), num_frames=32)
    with torch.no_grad():
        for param in trainable_parameters(trained).values():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    path = save_adapter(trained, tmp_path / "motion.safetensors", base_model="tiny-animatediff")
    fresh = copy.deepcopy(base)
    meta = load_adapter(fresh, path)  # extends the base on the fly
    assert meta["family"] == "animatediff" and meta["num_frames"] == "32"
    assert torch.equal(run(fresh, 32), run(trained, 32))


def test_adapters_of_the_other_family_or_shape_are_refused_by_name(base, tmp_path, tiny_unet):
    motion = save_adapter(extend_unet(copy.deepcopy(base), num_frames=32), tmp_path / "motion.safetensors")
    svd = save_adapter(extend_unet(tiny_unet, num_frames=32), tmp_path / "svd.safetensors")
    with pytest.raises(AdapterMismatchError, match="adapter for the svd family, but the UNet is UNetMotionModel"):
        load_adapter(copy.deepcopy(base), svd)
    with pytest.raises(AdapterMismatchError, match="adapter for the animatediff family, but the UNet is "
                                                   "UNetSpatioTemporalConditionModel"):
        load_adapter(copy.deepcopy(tiny_unet), motion)
    wider = UNetMotionModel.from_config({**base.config, "block_out_channels": (32, 96)})
    with pytest.raises(AdapterMismatchError, match=r"block_out_channels: adapter \[32, 64\] vs UNet \[32, 96\]"):
        load_adapter(wider, motion)


def test_a_base_length_beyond_the_sinusoid_is_refused_before_any_module_changes(base):
    unet = copy.deepcopy(base)
    with pytest.raises(ValueError, match="base_frames 40 exceeds the motion modules' 32 sinusoid rows"):
        extend_unet(unet, num_frames=64, base_frames=40)
    assert all(type(m) is AnimateDiffTransformer3D for m in motion_modules(unet).values())
    assert extended_num_frames(unet) is None and "exvideo_num_frames" not in unet.config


# -- a tiny AnimateDiff checkpoint on disk -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_animatediff_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("animatediff") / "tiny-animatediff"
    done = subprocess.run([str(Path(sys.executable).parent / "exvideo"), "make-tiny-model", str(folder),
                           "--family", "animatediff"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote tiny AnimateDiff checkpoint to {folder}" in done.stdout
    return folder


def test_the_tiny_checkpoint_is_diffusers_animatediff_and_loads_with_the_real_classes(tiny_animatediff_dir):
    assert model_family(tiny_animatediff_dir) == "animatediff"
    assert sorted(p.name for p in tiny_animatediff_dir.iterdir() if p.is_dir()) == sorted(
        ("unet", "motion_adapter", "vae", "text_encoder", "tokenizer", "scheduler"))
    loaded = load_animatediff(tiny_animatediff_dir)
    written = tiny_animatediff_components(seed=0)
    assert isinstance(loaded.unet, UNetMotionModel) and len(motion_modules(loaded.unet)) == 7
    for part in ("unet", "motion_adapter", "vae", "text_encoder"):
        theirs = getattr(written, part).state_dict()
        assert all(torch.equal(tensor, theirs[name]) for name, tensor in getattr(loaded, part).state_dict().items())
        assert not any(p.requires_grad for p in getattr(loaded, part).parameters())
    ids = loaded.tokenizer(["a red ball", "?"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (2, 77) and ids[0, 0] == 512 and ids[0, 11] == 513  # start, 10 byte tokens, end
    assert loaded.text_encoder(ids).last_hidden_state.shape == (2, 77, 16)


def test_diffusers_own_pipeline_makes_a_video_from_the_extended_unet(tiny_animatediff_dir):
    parts = load_animatediff(tiny_animatediff_dir)
    extend_unet(parts.unet, num_frames=24)
    frames = parts.pipeline()("a red ball", num_frames=24, height=64, width=64, num_inference_steps=2,
                              guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 24, 64, 64, 3) and np.isfinite(frames).all()


def test_missing_components_and_foreign_checkpoints_are_named(tiny_animatediff_dir, tmp_path, tiny_svd_dir):
    partial = shutil.copytree(tiny_animatediff_dir, tmp_path / "partial")
    shutil.rmtree(partial / "motion_adapter")
    with pytest.raises(FileNotFoundError, match=r"lacks component folders \['motion_adapter'\]"):
        load_animatediff(partial)
    with pytest.raises(FileNotFoundError, match="does not exist; point to a local diffusers-format checkpoint"):
        load_animatediff(tmp_path / "nowhere")
    assert model_family(tiny_svd_dir) == "svd"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline; exvideo serves"):
        model_family(tmp_path / "other")
    with pytest.raises(FileExistsError, match="already exists"):
        write_tiny_animatediff(tiny_animatediff_dir)


def test_the_objective_targets_what_the_schedulers_prediction_type_names(base):
    from diffusers import DDIMScheduler

    from exvideo.motion_objective import TextLatentBatch, noise_prediction_loss, predict

    unet = extend_unet(copy.deepcopy(base), num_frames=32)
    g = torch.Generator().manual_seed(3)
    batch = TextLatentBatch(torch.randn(2, 6, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g))
    noise, timesteps = torch.randn(batch.latents.shape, generator=g), torch.tensor([100, 900])
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
        abar = scheduler.alphas_cumprod[timesteps].reshape(2, 1, 1, 1, 1)
        noisy = abar.sqrt() * batch.latents + (1 - abar).sqrt() * noise  # the schedule's forward process
        velocity = abar.sqrt() * noise - (1 - abar).sqrt() * batch.latents
        with torch.no_grad():
            output = predict(unet, noisy, timesteps, batch.text_embeds)
            losses[kind] = noise_prediction_loss(unet, scheduler, batch, timesteps=timesteps, noise=noise)
        target = noise if kind == "epsilon" else velocity
        torch.testing.assert_close(losses[kind], torch.nn.functional.mse_loss(output, target), rtol=1e-5, atol=1e-6)
    assert abs(losses["epsilon"] - losses["v_prediction"]) > 1e-3
    with pytest.raises(ValueError, match="predicts 'sample'; AnimateDiff post-tuning trains"):
        noise_prediction_loss(unet, DDIMScheduler(prediction_type="sample"), batch)
