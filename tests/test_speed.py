"""The speed switches compute what the plain path computes (tiny model, CPU); benchmarks/gpu_check.py at full size."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from torch.utils.checkpoint import checkpoint

from conftest import benchmark, float64_backward, unet_inputs
from exvideo import LatentBatch, SpeedOptions, added_time_ids, extend_unet, post_tuning_loss, prepare_for_post_tuning
from exvideo.speed import (
    SAVE_MIN_FLOPS_PER_ELEMENT, ChunkCheckpointedFeedForward, attention_backend, compile_repeated_blocks,
    compiles_blocks, enable_checkpointing, flops_per_output_element, set_conv_layout, speed_context,
)
from exvideo.speed_options import compiles_on
from exvideo.one_key_attention import OneKeyCrossAttnProcessor
from exvideo.unet import (
    gather_pad_channels_last, reflect_conv3d, reflect_conv3d_channels_last, reflect_pad_channels_last,
)
from pipelines.generate import GenerationParams, load_pipeline
from pipelines.generate.decode import decode_video
from pipelines.generate.guidance import Conditioning, guided_model_output
from pipelines.train.config import TrainConfig

PLAIN = SpeedOptions.plain()
aten = torch.ops.aten


@pytest.mark.parametrize("shape", [(2, 5, 4, 3, 6), (1, 1, 1, 1, 6), (1, 3, 1, 4, 6), (1, 1, 5, 5, 6)])
def test_channels_last_conv_equals_the_permuted_one_at_every_size(shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 6, 3)
    video = torch.randn(shape)  # [B, T, H, W, C]; size-1 dimensions are replicated, the others reflected
    expected = reflect_conv3d(conv, video.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(reflect_conv3d_channels_last(conv, video), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 4, 3, 6), (1, 1, 1, 1, 6), (1, 3, 1, 4, 6)])
def test_channels_last_conv_has_the_permuted_ones_gradients(shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 6, 3).double()
    video = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(shape, dtype=torch.float64)
    inputs = [video, conv.weight, conv.bias]
    permuted = reflect_conv3d(conv, video.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
    expected = torch.autograd.grad(permuted, inputs, grad_out)
    for mine, theirs in zip(torch.autograd.grad(reflect_conv3d_channels_last(conv, video), inputs, grad_out), expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 5, 4, 3, 6), (1, 1, 1, 1, 6), (1, 3, 1, 2, 6)])
def test_the_gather_pad_compiled_code_uses_equals_the_eager_pad_with_its_gradient(shape):
    video = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn([shape[0], *(n + 2 for n in shape[1:4]), shape[4]], dtype=torch.float64)
    eager = reflect_pad_channels_last(video)  # outside compiled code: the buffer-and-faces autograd function
    gathered = gather_pad_channels_last(video)
    assert torch.equal(gathered, eager)
    torch.testing.assert_close(torch.autograd.grad(gathered, video, grad_out)[0],
                               torch.autograd.grad(eager, video, grad_out)[0], rtol=1e-12, atol=1e-12)


def _perturbed_extended(tiny_unet, frames: int = 32):
    """An extended UNet moved off the identity initialisation, so the 3D convolutions really mix."""
    unet = extend_unet(tiny_unet, frames)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, torch.nn.Conv3d) and module.kernel_size == (3, 3, 3):
                module.weight.add_(0.05 * torch.randn(module.weight.shape, generator=generator))
    return unet.requires_grad_(False).eval()


def test_conv_layouts_give_the_same_unet_output(tiny_unet):
    unet = _perturbed_extended(tiny_unet)
    inputs = unet_inputs(30)
    outputs = []
    for layout in ("channels_first", "channels_last"):
        set_conv_layout(unet, layout)
        outputs.append(unet(**inputs, return_dict=False)[0])
    assert (outputs[0] - unet_inputs(30)["sample"][:, :, :4]).abs().mean() > 0  # the UNet computed something
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["math", "cudnn", "flash"])
def test_attention_backends_fall_back_and_agree(tiny_unet, name):
    unet = _perturbed_extended(tiny_unet)
    inputs = unet_inputs(12)
    reference = unet(**inputs, return_dict=False)[0]
    # On the CPU cuDNN is never available: its calls must fall back rather than fail.
    with attention_backend(name):
        output = unet(**inputs, return_dict=False)[0]
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-5)


def _loss_and_grads(base, gradient_checkpointing: bool, options: SpeedOptions):
    unet = copy.deepcopy(base)
    trainable = prepare_for_post_tuning(unet, 32, "fp32", gradient_checkpointing, "cpu", options)
    torch.manual_seed(5)
    with torch.no_grad():
        for param in trainable.values():
            param.add_(0.01 * torch.randn_like(param))
    batch = LatentBatch(latents=torch.randn(1, 6, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
                        cond_latent=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
                        image_embeds=torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3)),
                        added_time_ids=added_time_ids(30, 127))
    with speed_context(options):
        loss = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(3))
        loss.backward()
    return unet, loss.detach(), torch.cat([p.grad.flatten() for p in trainable.values()])


@pytest.fixture(scope="module")
def no_checkpointing(request):
    from conftest import _tiny_unet_template

    base = copy.deepcopy(_tiny_unet_template())
    return base, _loss_and_grads(base, False, PLAIN)


@pytest.mark.parametrize("options, tolerance", [
    (PLAIN, 1e-6),
    (replace(PLAIN, checkpointing="selective"), 1e-6),
    # Chunked matmuls sum in another order, amplified by depth: 5.07e-3 measured on one thread. Exactness is
    # test_switches_give_the_same_gradients_in_float64's; here float32 must agree to 1%.
    (replace(PLAIN, checkpointing="lean"), 1e-2),
    (SpeedOptions(), 1e-2),
])
def test_checkpointing_policies_give_the_same_loss_and_gradients(no_checkpointing, options, tolerance):
    base, (_, loss, grads) = no_checkpointing
    _, checkpointed_loss, checkpointed_grads = _loss_and_grads(base, True, options)
    assert grads.norm() > 0
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=0)
    assert float((checkpointed_grads - grads).norm() / grads.norm()) < tolerance


def _float64_gradients(options: SpeedOptions, checkpointing: bool) -> torch.Tensor:
    trainable, _ = float64_backward(options, checkpointing, unet_inputs(6))
    return torch.cat([param.grad.flatten() for param in trainable.values()])


@functools.cache
def _plain_float64_gradients() -> torch.Tensor:
    """The plain path's gradients, which every switch is compared with: computed once."""
    return _float64_gradients(PLAIN, False)


@pytest.mark.parametrize("options, checkpointing", [
    (replace(PLAIN, conv_layout="channels_last"), False), (replace(PLAIN, checkpointing="lean"), True),
    (SpeedOptions(), True), (SpeedOptions(checkpointing="selective"), True),
])
def test_switches_give_the_same_gradients_in_float64(options, checkpointing):
    """Exact up to float64 rounding: the tiny random model's float32 gradients move by percents with the mere
    summation order (its 1x1 bottom level normalises over a handful of values), which tolerances could not tell
    from a wrong gradient."""
    gradients = [_plain_float64_gradients(), _float64_gradients(options, checkpointing)]
    assert gradients[0].norm() > 0
    assert float((gradients[1] - gradients[0]).norm() / gradients[0].norm()) < 1e-8


def test_lean_checkpointing_switches_feed_forwards_and_full_switches_them_back(tiny_unet):
    unet = extend_unet(tiny_unet, 32)
    feed_forwards = [m for m in unet.modules() if isinstance(m, FeedForward)]
    names = sorted(unet.state_dict())
    enable_checkpointing(unet, "lean")
    assert feed_forwards and all(type(m) is ChunkCheckpointedFeedForward for m in feed_forwards)
    assert sorted(unet.state_dict()) == names  # a class switch: checkpoints and adapters keep their keys
    enable_checkpointing(unet, "full")
    assert all(type(m) is FeedForward for m in feed_forwards)


def test_chunked_feed_forward_matches_and_skips_chunking_without_grad():
    torch.manual_seed(0)
    plain = FeedForward(16, activation_fn="geglu")
    chunked = copy.deepcopy(plain)
    chunked.__class__ = ChunkCheckpointedFeedForward
    x = torch.randn(3, 7, 16, requires_grad=True)  # 21 tokens: chunks of unequal size
    x_chunked = x.detach().clone().requires_grad_()
    torch.testing.assert_close(chunked(x_chunked), plain(x))
    plain(x).sum().backward()
    chunked(x_chunked).sum().backward()
    torch.testing.assert_close(x_chunked.grad, x.grad)
    for mine, theirs in zip(chunked.parameters(), plain.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_selective_policy_keeps_expensive_outputs_and_recomputes_cheap_ones():
    wide_conv = torch.empty(320, 320, 3, 3)
    narrow_mm = (torch.empty(10, 320), torch.empty(320, 320))
    long_keys = (torch.empty(1, 5, 10, 64), torch.empty(1, 5, 4096, 64), torch.empty(1, 5, 4096, 64))
    single_key = (torch.empty(1, 5, 10, 64), torch.empty(1, 5, 1, 64), torch.empty(1, 5, 1, 64))
    assert flops_per_output_element(aten.convolution.default, (None, wide_conv)) == 2 * 320 * 9
    assert flops_per_output_element(aten.mm.default, narrow_mm) == 640
    assert flops_per_output_element(aten.addmm.default, (None, *narrow_mm)) == 640
    assert flops_per_output_element(aten._scaled_dot_product_flash_attention.default, long_keys) == 4 * 4096
    assert flops_per_output_element(aten.gelu.default, (torch.empty(3),)) == 0
    kept = [flops_per_output_element(aten.convolution.default, (None, wide_conv)),
            flops_per_output_element(aten._scaled_dot_product_flash_attention.default, long_keys)]
    recomputed = [flops_per_output_element(aten.mm.default, narrow_mm),
                  flops_per_output_element(aten._scaled_dot_product_flash_attention.default, single_key)]
    assert min(kept) >= SAVE_MIN_FLOPS_PER_ELEMENT > max(recomputed)


def test_one_call_and_two_calls_of_guidance_agree(tiny_unet):
    unet = _perturbed_extended(tiny_unet)
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 10, 4, 8, 8, generator=generator)
    cond = Conditioning(torch.randn(2, 1, 32, generator=generator), torch.randn(2, 1, 4, 8, 8, generator=generator),
                        torch.tensor([[29.0, 127.0, 0.02]] * 2), guided=True)
    ramp = torch.linspace(1.0, 3.0, 10)
    batched = guided_model_output(unet, latents, torch.tensor(0.5), cond, ramp, batched=True)
    separate = guided_model_output(unet, latents, torch.tensor(0.5), cond, ramp, batched=False)
    # Other batch sizes pick other kernels: the same function up to float32 rounding, amplified by a random model.
    assert float((separate - batched).norm() / batched.norm()) < 1e-4


def test_plain_and_optimised_pipelines_make_the_same_video(tiny_svd_dir):
    image = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    params = GenerationParams(num_frames=12, height=64, width=64, steps=2, seed=11)
    pipe = load_pipeline(tiny_svd_dir, method="exvideo", table_frames=32, speed=PLAIN)
    pipe.set_progress_bar_config(disable=True)
    videos = []
    for options in (PLAIN, SpeedOptions(cudnn_autotune=True, parallel_group_norm=True)):
        pipe.set_speed(options)
        assert pipe.speed == options
        videos.append(pipe.generate(image, params).frames.astype(int))
    assert videos[0].shape == (12, 64, 64, 3)
    assert np.abs(videos[0] - videos[1]).max() <= 2


def test_compile_repeated_blocks_wraps_exactly_the_repeated_blocks_and_keeps_their_function(tiny_unet):
    unet = extend_unet(tiny_unet, 32).requires_grad_(False)
    repeated = [m for m in unet.modules()
                if type(m).__name__ in ("BasicTransformerBlock", "TemporalBasicTransformerBlock",
                                        "SpatioTemporalResBlock")]
    temporal = next(m for m in repeated if type(m).__name__ == "TemporalBasicTransformerBlock")
    eager = copy.deepcopy(temporal)
    assert compile_repeated_blocks(unet) == len(repeated) > 0
    assert all(m._compiled_call_impl is not None for m in repeated)
    compiled = [m._compiled_call_impl for m in repeated]
    assert compile_repeated_blocks(unet) == 0  # the same options again: the compiled code is kept
    assert [m._compiled_call_impl for m in repeated] == compiled
    with pytest.raises(RuntimeError, match="mode=bogus"):  # the mode reaches torch.compile
        compile_repeated_blocks(unet, mode="bogus")
    assert unet._compiled_call_impl is None  # the UNet itself stays eager: only its blocks compile
    # DDP's graph splitting fails on the blocks' symbolic sizes (seen in a 2-worker Ray Train run): it stays off.
    assert torch._dynamo.config.optimize_ddp is False
    # One block through inductor (compiling the whole tiny UNet takes minutes on two cores).
    tokens = torch.randn(6, 16, temporal.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(temporal(tokens, num_frames=6), eager(tokens, num_frames=6), rtol=1e-4, atol=1e-5)


def test_compile_decoder_compiles_the_vae_decoders_blocks_in_the_generation_path(tiny_svd_dir):
    pipe = load_pipeline(tiny_svd_dir, method="exvideo", table_frames=32, speed=PLAIN)
    eager = copy.deepcopy(pipe.vae)
    latents = torch.randn(1, 10, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.set_speed(SpeedOptions(compile_decoder=True))  # on the CPU compile_blocks "gpu" leaves the UNet eager
    decoder_blocks = [m for m in pipe.vae.decoder.modules() if type(m).__name__ == "SpatioTemporalResBlock"]
    assert decoder_blocks and all(m.compiled_with == ("default", False) for m in decoder_blocks)
    assert all(getattr(m, "compiled_with", None) is None for m in pipe.unet.modules())
    assert all(getattr(m, "compiled_with", None) is None for m in pipe.vae.encoder.modules())
    with torch.no_grad():
        torch.testing.assert_close(decode_video(pipe.vae, latents), decode_video(eager, latents),
                                   rtol=1e-4, atol=1e-5)
    assert not PLAIN.compile_decoder and not SpeedOptions().compile_decoder  # off until a GPU shows it pays


def test_a_compiled_block_trains_under_lean_checkpointing_like_its_eager_copy():
    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16, cross_attention_dim=24)
    block.ff.__class__ = ChunkCheckpointedFeedForward  # as lean checkpointing switches it
    block.attn2.set_processor(OneKeyCrossAttnProcessor(block.norm2))  # as the defaults set it
    eager = copy.deepcopy(block)
    block.compile()
    tokens = torch.randn(4, 64, 32, requires_grad=True)
    context = torch.randn(4, 1, 24)
    results = []
    for module, inputs in ((block, tokens), (eager, tokens.detach().clone().requires_grad_())):
        output = checkpoint(module, inputs, None, context, use_reentrant=False)
        output.square().sum().backward()
        results.append((output, inputs.grad, [p.grad for p in module.parameters()]))
    (output, grad, weights), (eager_output, eager_grad, eager_weights) = results
    assert type(block.ff) is ChunkCheckpointedFeedForward and block._compiled_call_impl is not None
    torch.testing.assert_close(output, eager_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(weights, eager_weights):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert block.attn2.to_q.weight.grad is not None and not block.attn2.to_q.weight.grad.any()


def test_compiled_steps_compute_what_the_eager_steps_compute_in_training_and_generation(tiny_unet):
    """compile_scope "steps": one graph per ExVideo transformer step, around its block; float64, so any difference
    beyond rounding is a wrong function, not bf16 noise."""
    unet = extend_unet(tiny_unet, 32).double().requires_grad_(False)
    enable_checkpointing(unet, "lean")
    eager = unet.down_blocks[0].attentions[0]
    compiled = copy.deepcopy(eager)
    assert compile_repeated_blocks(compiled, scope="steps") == 1 + 2  # the transformer's steps, and its two blocks
    assert compiled.units != type(compiled).units and compiled.compiled_with == ("default", False)
    generator = torch.Generator().manual_seed(0)
    frames, channels = 6, compiled.proj_in.in_features
    hidden = torch.randn(2 * frames, channels, 4, 4, dtype=torch.float64, generator=generator)
    context = torch.randn(2 * frames, 1, 32, dtype=torch.float64, generator=generator)
    weights = torch.randn(hidden.shape, dtype=torch.float64, generator=generator)
    indicator = torch.zeros(2, frames, dtype=torch.float64)
    results = []
    for module in (compiled, eager):
        trainable = [p for n, p in module.named_parameters() if "temporal" in n or "time_" in n]
        for param in trainable:
            param.requires_grad_(True)
            param.grad = None
        inputs = hidden.clone().requires_grad_()
        output = module(inputs, context, indicator, return_dict=False)[0]
        (output * weights).sum().backward()
        with torch.no_grad():
            generated = module(hidden, context, indicator, return_dict=False)[0]
        results.append((output, generated, inputs.grad, [p.grad for p in trainable]))
    (output, generated, grad, weight_grads), (eager_output, eager_generated, eager_grad, eager_weight_grads) = results
    torch.testing.assert_close(output, eager_output, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(generated, eager_generated, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-9, atol=1e-10)
    scale = max(float(g.abs().max()) for g in eager_weight_grads)
    assert len(weight_grads) > 10 and scale > 0
    for mine, theirs in zip(weight_grads, eager_weight_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-8, atol=1e-10 * scale)
    assert compile_repeated_blocks(compiled, scope="steps") == 0  # the same settings: nothing compiles again
    assert compile_repeated_blocks(compiled, scope="blocks") == 0 and compiled.units == type(compiled).units


def test_speed_settings_are_validated_by_name(tmp_path):
    with pytest.raises(ValueError, match="speed.attention"):
        TrainConfig(svd_dir=tmp_path, shards="x", speed={"attention": "fastest"})
    with pytest.raises(ValueError, match="compile_blocks=true cannot be combined with speed.checkpointing=selective"):
        TrainConfig(svd_dir=tmp_path, shards="x", speed={"compile_blocks": True, "checkpointing": "selective"})
    with pytest.raises(ValueError, match="speed.compile_blocks"):
        TrainConfig(svd_dir=tmp_path, shards="x", speed={"compile_blocks": "always"})
    with pytest.raises(ValueError, match="speed.compile_mode"):
        TrainConfig(svd_dir=tmp_path, shards="x", speed={"compile_mode": "max-autotune"})  # CUDA graphs: refused
    assert TrainConfig(svd_dir=tmp_path, shards="x", speed={"compile_mode": "max-autotune-no-cudagraphs"}
                       ).speed.compile_mode == "max-autotune-no-cudagraphs"
    assert TrainConfig(svd_dir=tmp_path, shards="x", speed={"compile_static_shapes": True}).speed.compile_static_shapes
    assert TrainConfig(svd_dir=tmp_path, shards="x", speed={"compile_scope": "steps"}).speed.compile_scope == "steps"
    with pytest.raises(ValueError, match="speed.compile_scope"):
        TrainConfig(svd_dir=tmp_path, shards="x", speed={"compile_scope": "unet"})
    assert TrainConfig(svd_dir=tmp_path, shards="x", speed={"compile_blocks": True}).speed.compile_blocks is True
    with pytest.raises(ValueError, match="decoder_channels_last needs speed.parallel_group_norm"):
        TrainConfig(svd_dir=tmp_path, shards="x", speed={"decoder_channels_last": True})
    with pytest.raises(ValueError, match="unet_channels_last is for generation"):
        TrainConfig(svd_dir=tmp_path, shards="x", speed={"unet_channels_last": True, "parallel_group_norm": True})
    with pytest.raises(ValueError, match="unet_channels_last is for generation"):
        prepare_for_post_tuning(torch.nn.Module(), 8, speed=SpeedOptions(unet_channels_last=True,
                                                                           parallel_group_norm=True))
    assert TrainConfig(svd_dir=tmp_path, shards="x", speed={"decoder_channels_last": True, "parallel_group_norm": True}
                       ).speed.decoder_channels_last
    config = TrainConfig(svd_dir=tmp_path, shards="x", speed={"checkpointing": "selective"})
    assert config.speed.compile_blocks == "gpu"  # the default, which leaves selective checkpointing uncompiled
    assert TrainConfig.model_validate(config.model_dump(mode="json")).speed.checkpointing == "selective"


def test_blocks_compile_by_default_only_on_a_gpu_and_never_under_selective_checkpointing(tiny_unet):
    unet = extend_unet(tiny_unet, 32)
    assert SpeedOptions().compile_blocks == "gpu" and not compiles_blocks(unet, SpeedOptions())  # on the CPU
    assert compiles_blocks(unet, SpeedOptions(compile_blocks=True))
    assert not compiles_blocks(unet, PLAIN)
    enable_checkpointing(unet, "selective")
    assert not compiles_blocks(unet, SpeedOptions(checkpointing="selective"))
    with pytest.raises(ValueError, match="checkpointing=selective"):
        compiles_blocks(unet, SpeedOptions(checkpointing="selective", compile_blocks=True))
    assert compiles_on(SpeedOptions(), "cuda") and not compiles_on(SpeedOptions(), "cuda", selective_checkpointing=True)


def test_memory_prediction_orders_the_checkpointing_policies():
    predict = benchmark("train_memory").predict

    full, lean, selective = (predict(policy, frames=32, size=128) for policy in ("full", "lean", "selective"))
    # What the defaults rest on (measured on an H200 at 128 frames: 48.5, 34.0 and 62.6 GiB).
    assert lean["peak_gib"] < full["peak_gib"] < selective["peak_gib"]
    assert lean["after_forward_gib"] < full["after_forward_gib"] < selective["after_forward_gib"]


def test_memory_traffic_splits_the_guided_step_at_the_compiled_blocks():
    count = benchmark("memory_traffic").count

    small_row, large_row = (count(frames, size=256) for frames in (16, 32))
    small, large = small_row["gb"], large_row["gb"]
    # Most memory-bound work sits in the blocks compile_blocks compiles; the rest (padding, mixers, norms of the
    # wrappers) is what compiling larger regions could still fuse. Activations grow with the clip; weights do not.
    assert small["inside blocks, memory-bound"] > 2 * small["outside blocks, memory-bound"] > 0
    assert large["inside blocks, memory-bound"] == pytest.approx(2 * small["inside blocks, memory-bound"], rel=0.02)
    assert 1.5 * small["inside blocks, matrix"] < large["inside blocks, matrix"] < 2 * small["inside blocks, matrix"]
    # The fused floor: at least every matrix kernel's bytes, at most everything.
    floor = small_row["fused_floor_gb"]
    assert small["inside blocks, matrix"] + small["outside blocks, matrix"] <= floor < sum(small.values())


def test_memory_traffic_counts_every_window_of_the_video_decode():
    count = benchmark("memory_traffic").count

    # 8 frames are one decode window; 16 frames are windows at 0, 4 and 8 (window 8, stride 4).
    one, three = (count(frames, size=128, part="decode") for frames in (8, 16))
    assert one["executed_tflop"] > 0 and one["gb"]["all, matrix"] > 0
    assert three["gb"]["all, matrix"] == pytest.approx(3 * one["gb"]["all, matrix"], rel=0.05)
    assert three["fused_floor_gb"] == pytest.approx(3 * one["fused_floor_gb"], rel=0.05)


def test_compiled_traffic_counts_what_inductor_fused_against_the_eager_bytes():
    from torch._inductor import config as inductor_config

    measure_call = benchmark("compiled_traffic").measure_call
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, 2, 32, cross_attention_dim=24).to(torch.bfloat16).requires_grad_(False)
    tokens, context = torch.randn(2, 256, 64).to(torch.bfloat16), torch.randn(2, 1, 24).to(torch.bfloat16)
    torch._logging.set_logs(inductor_metrics=True)
    try:
        with inductor_config.patch(fx_graph_cache=False):
            row = measure_call(block, (tokens,), {"encoder_hidden_states": context})
    finally:
        torch._logging.set_logs()
    # Fused kernels move less than eager's separate operators, and no less than the matrix kernels' own bytes.
    assert row["matrix"] > 0 and row["floor"] >= row["matrix"]
    assert row["matrix"] < row["compiled"] < row["eager_memory_bound"] + row["matrix"]


@pytest.mark.parametrize("static_shapes, graphs", [(False, 2), (True, 3)])
def test_static_shapes_compile_each_new_size_on_its_own(static_shapes, graphs):
    """By default dynamo makes sizes symbolic at the first recompilation, and that graph serves every later size;
    with static shapes each size gets its own graph with constant sizes."""
    torch._dynamo.reset()  # forget what other tests compiled for this block class
    torch.manual_seed(0)
    unet = torch.nn.Module()
    unet.block = BasicTransformerBlock(32, 2, 16, cross_attention_dim=24).requires_grad_(False)
    assert compile_repeated_blocks(unet, static_shapes=static_shapes) == 1
    assert compile_repeated_blocks(unet, static_shapes=not static_shapes) == 1  # other settings: compiled again
    assert compile_repeated_blocks(unet, static_shapes=static_shapes) == 1
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for tokens in (16, 32, 48):
            unet.block(torch.randn(2, tokens, 32), encoder_hidden_states=torch.randn(2, 1, 24))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == graphs


def test_profile_options_and_kernel_kinds():
    profile = benchmark("gpu_profile")
    kernel_kind, parse_options = profile.kernel_kind, profile.parse_options
    assert parse_options([]) == replace(SpeedOptions(), compile_blocks=False)  # eager defaults
    options = parse_options(["compile_blocks=true", "compile_static_shapes=true", "conv_layout=channels_first"])
    assert options == replace(SpeedOptions(), compile_blocks=True, compile_static_shapes=True,
                              conv_layout="channels_first")
    # Inductor names kernels after the operators they fused: the prefix decides, not the names inside.
    assert kernel_kind("triton_poi_fused_add_convolution_mul_3") == "fused pointwise (inductor)"
    assert kernel_kind("triton_per_fused_native_layer_norm_7") == "fused reduction (inductor)"
    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16") == "convolution"
    assert kernel_kind("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN") == "matrix product"


def test_the_benchmark_times_the_new_switches_and_decodes_the_same_video(tmp_path):
    """gpu_bench.py as a GPU session runs it, on the tiny model: eager step rows, a video whose decode takes its own
    switches, and every eager decode row, each computing what the first row computes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--tiny", "--frames", "8", "--size", "64",
                    "--parts", "generate", "decode", "--steps", "1", "--warmup", "1", "--video-steps", "1",
                    "--step-variants", "+one-key cross-attention", "+parallel group norm, channels-last UNet",
                    "--videos", "best", "--decode-options", "parallel_group_norm=true", "decoder_channels_last=true",
                    "--skip-compile", "--json", str(out)], cwd=root, check=True, capture_output=True)
    report = json.loads(out.read_text())
    steps = report["unet_step"]
    assert list(steps) == ["+one-key cross-attention", "+parallel group norm, channels-last UNet"]
    assert steps["+parallel group norm, channels-last UNet"]["options"]["unet_channels_last"] is True
    # The random tiny model amplifies float32 rounding (these two steps differ by ~1e-2 in float32 and agree to 1e-11
    # in float64); a wrong layout would differ by order 1.
    assert all(row["step_s"] > 0 and row["difference_to_first"] < 5e-2 for row in steps.values())
    (video,) = report["video"].values()
    assert video["decode_options"] == {"parallel_group_norm": True, "decoder_channels_last": True}
    assert video["frames"] == 8
    decode = report["decode"]
    assert list(decode) == ["eager", "eager, cuDNN autotune", "eager, parallel group norm",
                            "eager, parallel group norm + channels-last decoder"]
    assert all(row["decode_s"] > 0 and row["difference_to_first"] < 1e-4 for row in decode.values())
