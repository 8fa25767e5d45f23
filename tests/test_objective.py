"""The training objective: EDM preconditioning algebra, Karras levels, and that post-tuning learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from exvideo import LatentBatch, added_time_ids, edm_preconditioning, extend_unet, freeze_for_post_tuning
from exvideo import karras_sigmas, post_tuning_loss


def tiny_batch(num_frames=6, seed=0) -> LatentBatch:
    g = torch.Generator().manual_seed(seed)
    return LatentBatch(
        latents=torch.randn(1, num_frames, 4, 8, 8, generator=g),
        cond_latent=torch.randn(1, 4, 8, 8, generator=g),
        image_embeds=torch.randn(1, 1, 32, generator=g),
        added_time_ids=added_time_ids(fps=30, motion_bucket=127),
    )


def test_added_time_ids_are_fps_minus_one_bucket_noise():
    ids = added_time_ids(torch.tensor([30.0, 8.0]), torch.tensor([127, 3]), noise_aug=0.02)
    torch.testing.assert_close(ids, torch.tensor([[29.0, 127.0, 0.02], [7.0, 3.0, 0.02]]))


def test_karras_levels():
    levels = karras_sigmas()
    assert len(levels) == 1000
    assert levels[0].item() == pytest.approx(700.0) and levels[-1].item() == pytest.approx(0.002)
    assert bool((levels[1:] < levels[:-1]).all())
    rho_root = levels ** (1 / 7)
    assert torch.allclose(rho_root[1:] - rho_root[:-1], rho_root[1] - rho_root[0], rtol=1e-9)  # linear in s^(1/rho)


@pytest.mark.parametrize("sigma", [0.002, 0.3, 1.0, 14.6, 700.0])
def test_preconditioning_against_float64(sigma):
    pre = edm_preconditioning(torch.tensor([sigma], dtype=torch.float32))
    expected = {
        "c_skip": 1 / (sigma ** 2 + 1), "c_out": -sigma / math.sqrt(sigma ** 2 + 1),
        "c_in": 1 / math.sqrt(sigma ** 2 + 1), "c_noise": 0.25 * math.log(sigma),
        "weight": math.sqrt(1 + sigma ** 2) / sigma,
    }
    for key, value in expected.items():
        assert pre[key].item() == pytest.approx(value, rel=1e-6), key


def test_loss_equals_direct_float64_computation(tiny_unet):
    unet = extend_unet(tiny_unet, num_frames=32)
    batch = tiny_batch()
    sigma = torch.tensor([2.5])
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(3))
    loss = post_tuning_loss(unet, batch, sigma=sigma, noise=noise)

    double = copy.deepcopy(unet).double()
    s = 2.5
    x0, n = batch.latents.double(), noise.double()
    x = x0 + s * n
    cond = batch.cond_latent.double()[:, None].expand(-1, x.shape[1], -1, -1, -1)
    with torch.no_grad():
        model_out = double(torch.cat([x / math.sqrt(s * s + 1), cond], dim=2), torch.tensor([0.25 * math.log(s)]),
                           encoder_hidden_states=batch.image_embeds.double(),
                           added_time_ids=batch.added_time_ids.double(), return_dict=False)[0]
    x0_pred = x / (s * s + 1) - s / math.sqrt(s * s + 1) * model_out
    expected = ((x0_pred - 1.01 * x0) ** 2).mean() * math.sqrt(1 + s * s) / s
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_sigma_and_noise_come_from_the_generator(tiny_unet):
    unet = extend_unet(tiny_unet, num_frames=32)
    batch = tiny_batch()
    with torch.no_grad():
        a = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(5))
        b = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(5))
        c = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() and a.item() != c.item()


def test_few_steps_lower_the_loss_and_leave_frozen_weights_bitwise(tiny_unet):
    unet = extend_unet(tiny_unet, num_frames=32)
    trainable = freeze_for_post_tuning(unet)
    frozen_before = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    batch = tiny_batch(num_frames=30)  # longer than 25: frames the base model never saw
    sigma, noise = torch.tensor([1.0]), torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = post_tuning_loss(unet, batch, sigma=sigma, noise=noise)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for name, before in frozen_before.items():
        assert torch.equal(unet.get_parameter(name), before), name
    changed = [n for n, p in trainable.items() if not torch.equal(p, trainable_before[n])]
    assert len(changed) == len(trainable)
