"""TrainConfig.memory: AdamW state and fp32 master weights in host memory (pipelines/train/offload.py), on a tiny
real SVD UNet. On the CPU every tensor is in host memory anyway: these tests check the mechanism (separate masters,
their updates, the working copies, checkpoints), and the memory prediction the GPU figures will be set against."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import benchmark
from exvideo import LatentBatch, added_time_ids, post_tuning_loss, prepare_for_post_tuning
from pipelines.train import TrainConfig
from pipelines.train.loop import make_optimizer, weights_fingerprint
from pipelines.train.offload import MASTER_WEIGHTS, HostAdamW, saved_activations
from pipelines.train.state import EMA, TrainState, checkpoint_metadata, load_checkpoint, save_checkpoint

FRAMES = 8


def train_config(memory: str) -> TrainConfig:
    return TrainConfig(svd_dir="unused", shards="unused", memory=memory, lr=1e-3, num_frames=32)


def prepared(unet):
    """The tiny UNet extended and frozen as the training stage prepares it, in fp32 on the CPU (without gradient
    checkpointing, which only changes what backward recomputes, and is slow to start on the CPU)."""
    return unet, prepare_for_post_tuning(unet, 32, "fp32", False, "cpu")


def clip(step: int) -> LatentBatch:
    g = torch.Generator().manual_seed(1000 + step)
    return LatentBatch(torch.randn(1, FRAMES, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g),
                       torch.randn(1, 1, 32, generator=g), added_time_ids(30, 127))


def train(unet, trainable, optimizer, steps: range, memory: str = "low") -> None:
    """The loop's step: loss, backward, clipping, AdamW, gradients cleared."""
    for step in steps:
        with saved_activations(memory, torch.device("cpu")):
            loss = post_tuning_loss(unet, clip(step), generator=torch.Generator().manual_seed(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def weights(trainable) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in trainable.values()])


@pytest.mark.parametrize("memory", ["low", "lowest"])
def test_low_memory_modes_train_the_weights_adamw_trains_in_fp32(tiny_unet, memory):
    default_unet, default_trainable = prepared(copy.deepcopy(tiny_unet))
    unet, trainable = prepared(tiny_unet)
    start = weights(trainable)
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    frozen_before = weights_fingerprint(frozen)

    optimizer = make_optimizer(train_config(memory), list(trainable.values()))
    assert isinstance(optimizer, HostAdamW)
    train(unet, trainable, optimizer, range(2), memory)
    # The same AdamW kernel on the weights themselves, as the default mode runs it on a GPU (fused).
    cfg = train_config("default")
    direct = torch.optim.AdamW(default_trainable.values(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                               fused=True)
    train(default_unet, default_trainable, direct, range(2), "default")

    assert (weights(default_trainable) - start).abs().max() > 1e-3
    assert torch.equal(weights(trainable), weights(default_trainable))
    assert weights_fingerprint(frozen) == frozen_before
    assert all(p.dtype == torch.float32 for p in trainable.values())


def test_one_low_memory_step_matches_the_default_modes_step_to_float32_rounding(tiny_unet):
    default_unet, default_trainable = prepared(copy.deepcopy(tiny_unet))
    unet, trainable = prepared(tiny_unet)
    start = weights(trainable)
    train(unet, trainable, make_optimizer(train_config("low"), list(trainable.values())), range(1))
    train(default_unet, default_trainable,
          make_optimizer(train_config("default"), list(default_trainable.values())), range(1), "default")
    # On the CPU the default mode runs AdamW's single-tensor kernel, which rounds differently from the fused one;
    # later steps then differ by more wherever a gradient is near zero (AdamW divides by its running size).
    assert (weights(trainable) - start).abs().max() > 1e-4
    torch.testing.assert_close(weights(trainable), weights(default_trainable), rtol=1e-6, atol=1e-7)


def test_the_state_lives_with_host_masters_not_with_the_working_weights(tiny_unet):
    unet, trainable = prepared(tiny_unet)
    working = list(trainable.values())
    optimizer = make_optimizer(train_config("low"), working)
    train(unet, trainable, optimizer, range(1))

    assert len(optimizer.masters) == len(working)
    for param, master in zip(working, optimizer.masters):
        assert master.untyped_storage().data_ptr() != param.untyped_storage().data_ptr()
        assert master.dtype == torch.float32 and master.device.type == "cpu"
        assert torch.equal(master.detach(), param.detach())  # the working copy is the updated master
        assert param not in optimizer.state
        assert all(moment.device.type == "cpu" for moment in optimizer.state[master].values())
    assert sum(optimizer.state[master]["exp_avg_sq"].sum() for master in optimizer.masters) > 0
    assert all(p.grad is None for p in working)


def test_bf16_working_copies_take_their_values_from_fp32_masters():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 16)), torch.nn.Parameter(torch.randn(16))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = HostAdamW(params, torch.bfloat16, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)
    plain = torch.optim.AdamW(reference, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)
    assert all(p.dtype == torch.bfloat16 for p in params)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).bfloat16() for p in params]
        for param, ref, grad in zip(params, reference, grads):
            param.grad, ref.grad = grad, grad.float()
        optimizer.step()
        plain.step()
    for param, master, ref in zip(params, optimizer.masters, reference):
        # Updates of 1e-4 are below bf16's resolution at these weights: only fp32 masters keep them.
        torch.testing.assert_close(master.detach(), ref.detach(), rtol=1e-5, atol=1e-7)
        assert not torch.equal(master.detach().bfloat16().float(), master.detach())
        assert torch.equal(param.detach(), master.detach().bfloat16())


def test_a_checkpoint_resumes_the_low_mode_exactly(tiny_unet, tmp_path):
    cfg = train_config("low")
    template = copy.deepcopy(tiny_unet)
    unet, trainable = prepared(tiny_unet)
    ema = EMA(trainable, 0.5)
    optimizer = make_optimizer(cfg, list(trainable.values()))
    train(unet, trainable, optimizer, range(1))
    ema.update(trainable)
    save_checkpoint(tmp_path, unet, optimizer.state_dict(), TrainState(step=1), ema,
                    checkpoint_metadata(unet, "tiny", {}))
    train(unet, trainable, optimizer, range(1, 2))

    resumed_unet, resumed = prepared(template)
    resumed_ema = EMA(resumed, 0.5)
    resumed_optimizer = make_optimizer(cfg, list(resumed.values()))
    optimizer_state, state = load_checkpoint(tmp_path, resumed_unet, resumed_ema)
    assert MASTER_WEIGHTS in optimizer_state and state.step == 1
    resumed_optimizer.load_state_dict(optimizer_state)
    assert all(torch.equal(ema.shadow[name], resumed_ema.shadow[name]) for name in trainable)
    train(resumed_unet, resumed, resumed_optimizer, range(1, 2))

    assert torch.equal(weights(resumed), weights(trainable))
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(resumed_optimizer.masters, optimizer.masters))


def test_loading_restores_the_fp32_masters_not_the_rounded_working_copies():
    params = [torch.nn.Parameter(torch.randn(32, 8, generator=torch.Generator().manual_seed(1)))]
    optimizer = HostAdamW(params, torch.bfloat16, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    params[0].grad = torch.ones(32, 8, dtype=torch.bfloat16)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())

    fresh = [torch.nn.Parameter(torch.zeros(32, 8))]
    restored = HostAdamW(fresh, torch.bfloat16, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    restored.load_state_dict(saved)
    assert torch.equal(restored.masters[0].detach(), optimizer.masters[0].detach())
    assert torch.equal(fresh[0].detach(), params[0].detach())
    with pytest.raises(ValueError, match="2 master weights for 1 trainable tensors"):
        restored.load_state_dict({**saved, MASTER_WEIGHTS: {0: fresh[0], 1: fresh[0]}})


def test_memory_is_an_output_field_and_refuses_a_sharded_optimizer():
    assert TrainConfig(svd_dir="x", shards="x", memory="low").output_fields()["memory"] == "low"
    with pytest.raises(ValueError, match="memory=low keeps the whole AdamW state in host memory"):
        TrainConfig(svd_dir="x", shards="x", memory="low", zero_optimizer=True, num_workers=2)


def test_memory_prediction_orders_the_modes():
    predict = benchmark("train_memory").predict_memory_mode

    default, low, lowest = (predict(mode, frames=8, size=128) for mode in ("default", "low", "lowest"))
    # Trainable tensors: default holds fp32 weights and two fp32 moments (12 bytes), low bf16 weights (2 bytes).
    saved_per_trainable = default["held_gib"] - low["held_gib"]
    assert saved_per_trainable > 0 and low["held_gib"] == lowest["held_gib"]
    assert low["peak_gib"] < default["peak_gib"] - saved_per_trainable
    # lowest: nothing but the weights stays on the device after the forward.
    assert lowest["after_forward_gib"] == pytest.approx(lowest["held_gib"], abs=0.01)
    assert low["after_forward_gib"] > lowest["after_forward_gib"] + 0.05
    assert lowest["peak_gib"] < low["peak_gib"]
