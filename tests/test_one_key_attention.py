"""The one-key cross-attention shortcut computes diffusers' attention, and trains the same weights the same way."""

from __future__ import annotations

import copy
import gc
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from conftest import _tiny_unet_template, benchmark, float64_backward, unet_inputs
from exvideo import SpeedOptions
from exvideo.one_key_attention import OneKeyCrossAttnProcessor, set_one_key_cross_attention
from exvideo.speed import apply_speed

SHORTCUT_ONLY = replace(SpeedOptions.plain(), one_key_cross_attention=True)


def _outputs_and_grads(attn: Attention, processor, hidden: torch.Tensor, context: torch.Tensor, **kwargs):
    attn.set_processor(processor)
    attn.zero_grad(set_to_none=True)
    context = context.detach().requires_grad_()
    output = attn(hidden, encoder_hidden_states=context, **kwargs)
    weights = torch.randn(output.shape, dtype=output.dtype, generator=torch.Generator().manual_seed(1))
    (output * weights).sum().backward()
    return output.detach(), context.grad, {name: param.grad for name, param in attn.named_parameters()}


def test_one_key_attention_equals_diffusers_attention_with_zero_query_gradients():
    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8, out_bias=True).double()
    hidden = torch.randn(3, 7, 16, dtype=torch.float64)
    context = torch.randn(3, 1, 12, dtype=torch.float64)
    plain = _outputs_and_grads(attn, AttnProcessor2_0(), hidden, context)
    shortcut = _outputs_and_grads(attn, OneKeyCrossAttnProcessor(), hidden, context)
    assert shortcut[0].shape == plain[0].shape == (3, 7, 16)
    torch.testing.assert_close(shortcut[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shortcut[1], plain[1], rtol=1e-12, atol=1e-12)
    for name, grad in plain[2].items():
        torch.testing.assert_close(shortcut[2][name], grad, rtol=1e-12, atol=1e-12)
    # The query and key cannot move the output: the plain path's gradient there is rounding noise, ours is zero.
    assert plain[2]["to_q.weight"].abs().max() < 1e-12 and plain[2]["to_v.weight"].abs().max() > 1e-2
    assert not shortcut[2]["to_q.weight"].any() and not shortcut[2]["to_k.weight"].any()


@pytest.mark.parametrize("keys, masked", [(2, False), (1, True)])
def test_other_attention_calls_run_diffusers_processor_unchanged(keys, masked):
    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8)
    hidden, context = torch.randn(3, 7, 16), torch.randn(3, keys, 12)
    kwargs = {"attention_mask": torch.zeros(3, 1, keys)} if masked else {}
    plain = _outputs_and_grads(attn, AttnProcessor2_0(), hidden, context, **kwargs)
    other = _outputs_and_grads(attn, OneKeyCrossAttnProcessor(), hidden, context, **kwargs)
    assert torch.equal(other[0], plain[0])
    assert other[2]["to_q.weight"].abs().max() > 0  # the query counts here, and was computed


def test_the_switch_covers_every_transformer_block_and_keeps_the_weights_names():
    unet = copy.deepcopy(_tiny_unet_template())
    blocks = [m for m in unet.modules() if isinstance(m, (BasicTransformerBlock, TemporalBasicTransformerBlock))]
    names = sorted(unet.state_dict())
    apply_speed(unet, SHORTCUT_ONLY)
    assert blocks and all(isinstance(b.attn2.processor, OneKeyCrossAttnProcessor) for b in blocks)
    assert all(b.attn2.processor.query_norm is b.norm2 for b in blocks)
    assert all(type(b.attn1.processor) is AttnProcessor2_0 for b in blocks)  # self-attention has many keys
    assert sorted(unet.state_dict()) == names
    processors = [b.attn2.processor for b in blocks]
    apply_speed(unet, SHORTCUT_ONLY)  # again: the same processors stay
    assert [b.attn2.processor for b in blocks] == processors
    apply_speed(unet, SpeedOptions.plain())
    assert all(type(b.attn2.processor) is AttnProcessor2_0 for b in blocks)
    assert set_one_key_cross_attention(unet, True) == len(blocks)


LR, WEIGHT_DECAY = 1e-2, 0.5


def _trained_copy(options: SpeedOptions, inputs: dict) -> tuple[torch.Tensor, dict, dict, dict]:
    """Output, gradients, and weights before and after one AdamW step (weight decay on) of the tiny UNet, in
    float64."""
    trainable, output = float64_backward(options, True, inputs)
    grads = {name: param.grad.clone() for name, param in trainable.items()}  # every one present: DDP needs it
    before = {name: param.detach().clone() for name, param in trainable.items()}
    torch.optim.AdamW(trainable.values(), lr=LR, weight_decay=WEIGHT_DECAY).step()
    return output, grads, before, {name: param.detach() for name, param in trainable.items()}


def test_the_unet_trains_the_same_weights_the_same_way_with_the_shortcut():
    plain_output, plain_grads, _, plain_weights = _trained_copy(SpeedOptions.plain(), unet_inputs(6, batch=2))
    output, grads, before, weights = _trained_copy(SHORTCUT_ONLY, unet_inputs(6, batch=2))
    torch.testing.assert_close(output, plain_output, rtol=1e-10, atol=1e-10)
    assert grads.keys() == plain_grads.keys()
    skipped = [name for name in grads if ".attn2.to_q." in name or ".attn2.to_k." in name or ".norm2." in name]
    assert skipped and all(not grads[name].any() for name in skipped)
    flat = torch.cat([g.flatten() for g in grads.values()])
    plain_flat = torch.cat([g.flatten() for g in plain_grads.values()])
    assert float((flat - plain_flat).norm() / plain_flat.norm()) < 1e-8
    # AdamW decayed the skipped weights and nothing else moved them; on the plain path Adam's normalisation turns the
    # rounding noise of their gradient into steps of about 1e-8.
    for name in skipped:
        torch.testing.assert_close(weights[name], before[name] * (1 - LR * WEIGHT_DECAY), rtol=1e-15, atol=0)
        torch.testing.assert_close(plain_weights[name], weights[name], rtol=0, atol=1e-6)


def _train_two_steps_under_ddp(block: torch.nn.Module) -> None:
    model = torch.nn.parallel.DistributedDataParallel(block, find_unused_parameters=False)
    for _ in range(2):
        tokens, context = torch.randn(4 * 3, 5, 16), torch.randn(3 * 5, 1, 12)
        model(tokens, num_frames=4, encoder_hidden_states=context).square().mean().backward()


def test_ddp_sees_every_parameter_used_under_the_shortcut(tmp_path):
    """DDP (find_unused_parameters=False, as the training stage wraps the UNet) fails on the second step if a
    trainable weight got no gradient in the first."""
    torch.manual_seed(0)
    block = TemporalBasicTransformerBlock(16, 16, 2, 8, cross_attention_dim=12)
    block.attn2.set_processor(OneKeyCrossAttnProcessor(block.norm2))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        _train_two_steps_under_ddp(block)
    finally:
        # Only after the DDP wrapper is gone: freed later, its reducer would destroy the process group itself, and
        # that teardown once hung the whole test run (joining gloo's threads).
        gc.collect()
        dist.destroy_process_group()
    assert all(param.grad is not None for param in block.parameters())
    assert not block.attn2.to_q.weight.grad.any() and not block.norm2.weight.grad.any()


def test_the_shortcut_removes_matrix_work_and_traffic_inside_the_blocks_only():
    traffic = benchmark("memory_traffic")
    shortcut = traffic.count(16, size=256)
    without = traffic.count(16, size=256, options=replace(traffic.EAGER_DEFAULTS, one_key_cross_attention=False))
    # At 128 frames 512x512: 413.9 -> 400.8 TFLOP and a fused floor of 617 -> 546 GB per guided step.
    assert 0.95 * without["executed_tflop"] < shortcut["executed_tflop"] < 0.99 * without["executed_tflop"]
    assert shortcut["fused_floor_gb"] < 0.92 * without["fused_floor_gb"]
    assert shortcut["gb"]["inside blocks, matrix"] < without["gb"]["inside blocks, matrix"]
    assert shortcut["gb"]["outside blocks, memory-bound"] == without["gb"]["outside blocks, memory-bound"]
