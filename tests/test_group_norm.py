"""Group norm with parallel statistics computes PyTorch's group norm, and only where it is meant to."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from exvideo import SpeedOptions, extend_unet, tiny_svd_components
from exvideo.group_norm import ParallelStatsGroupNorm, group_norm_parallel_stats, set_parallel_group_norm
from exvideo.speed import apply_decoder_speed, apply_speed
from pipelines.generate.decode import decode_video
from pipelines.generate.guidance import Conditioning, guided_model_output


class _OpsSeen(TorchDispatchMode):
    """Records the aten operations that run inside it."""

    def __init__(self):
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


class _LayoutsSeen(TorchDispatchMode):
    """Counts, per aten operation and rank, the memory layouts of the first 4D or 5D tensor each call reads."""

    def __init__(self):
        super().__init__()
        self.layouts: dict[tuple[str, int], Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() in (4, 5)), None)
        if first is not None:
            last = torch.channels_last if first.dim() == 4 else torch.channels_last_3d
            layout = ("contiguous" if first.is_contiguous() else
                      "channels last" if first.is_contiguous(memory_format=last) else "other")
            self.layouts[func.overloadpacket.__name__, first.dim()][layout] += 1
        return func(*args, **(kwargs or {}))


def _inputs(layout: str, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if layout == "5d permuted":  # a temporal ResNet block's (B, C, T, H, W) view of frames stored (T, C, H, W)
        frames = torch.randn(5, 8, 6, 7, generator=generator, dtype=dtype) * 3 + 1
        return frames[None].permute(0, 2, 1, 3, 4)
    x = torch.randn(3, 8, 6, 7, generator=generator, dtype=dtype) * 3 + 1
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels last" else x


@pytest.mark.parametrize("layout", ["contiguous", "5d permuted", "channels last"])
@pytest.mark.parametrize("affine", [True, False])
def test_parallel_statistics_give_pytorchs_group_norm_in_float64(layout, affine):
    x = _inputs(layout, torch.float64)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, generator=generator, dtype=torch.float64) if affine else None
    bias = torch.randn(8, generator=generator, dtype=torch.float64) if affine else None
    ours = group_norm_parallel_stats(x, 4, weight, bias, eps=1e-6)
    assert ours.shape == x.shape and ours.dtype == x.dtype and ours.stride() == x.stride()  # the input's layout
    torch.testing.assert_close(ours, F.group_norm(x, 4, weight, bias, eps=1e-6), rtol=1e-12, atol=1e-12)
    # Normalised per (sample, group): mean 0 and variance 1 before the affine part.
    if not affine:
        rows = ours.reshape(x.shape[0], 4, -1)
        torch.testing.assert_close(rows.mean(-1), torch.zeros(x.shape[0], 4, dtype=torch.float64), atol=1e-12,
                                   rtol=0)
        torch.testing.assert_close(rows.var(-1, correction=0), torch.ones(x.shape[0], 4, dtype=torch.float64),
                                   atol=1e-5, rtol=0)


def test_bf16_parallel_statistics_round_no_worse_than_pytorchs_bf16_group_norm():
    x = _inputs("5d permuted", torch.float32)
    norm = nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(2))
        norm.bias.normal_(generator=torch.Generator().manual_seed(3))
        exact = F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
        norm = norm.bfloat16()
        native = F.group_norm(x.bfloat16(), 4, norm.weight, norm.bias, norm.eps).float()
        ours = group_norm_parallel_stats(x.bfloat16(), 4, norm.weight, norm.bias, norm.eps)
    assert ours.dtype == torch.bfloat16

    def error(y: torch.Tensor) -> float:
        return float((y.float() - exact).norm() / exact.norm())

    assert error(ours) <= 1.5 * error(native) + 1e-4 and error(ours) < 1e-2


def test_group_count_that_does_not_divide_the_channels_is_refused():
    with pytest.raises(ValueError, match="12 channels cannot split them into 5 groups"):
        group_norm_parallel_stats(torch.randn(2, 12, 4), 5)


def test_the_module_uses_parallel_statistics_only_without_gradients_and_outside_compiled_code():
    norm = ParallelStatsGroupNorm(4, 8)
    x = _inputs("contiguous", torch.float32)
    with torch.no_grad(), _OpsSeen() as seen:
        inference = norm(x)
    assert torch.ops.aten.var_mean in seen.ops and torch.ops.aten.native_group_norm not in seen.ops
    with _OpsSeen() as seen:
        training = norm(x)
    assert torch.ops.aten.native_group_norm in seen.ops and training.requires_grad
    torch.testing.assert_close(inference, training.detach(), rtol=1e-5, atol=1e-5)

    graphs: list[torch.fx.GraphModule] = []

    def record(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return graph.forward

    with torch.no_grad():
        compiled = torch.compile(norm, backend=record)(x)
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes}
    assert graphs and any("group_norm" in target for target in targets)
    assert not any("var_mean" in target for target in targets)
    torch.testing.assert_close(compiled, inference, rtol=1e-5, atol=1e-5)


def test_the_switch_covers_the_unets_and_the_decoders_group_norms_and_switches_back():
    components = tiny_svd_components()
    unet, vae = components.unet, components.vae
    names = list(unet.state_dict())
    norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    apply_speed(unet, SpeedOptions(parallel_group_norm=True))
    assert norms and all(type(m) is ParallelStatsGroupNorm for m in norms)
    assert list(unet.state_dict()) == names  # the checkpoint's names do not change
    apply_speed(unet, SpeedOptions())
    assert all(type(m) is nn.GroupNorm for m in norms)
    assert not SpeedOptions().parallel_group_norm and not SpeedOptions.plain().parallel_group_norm

    latents = torch.randn(1, 10, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = decode_video(vae, latents)
        apply_decoder_speed(vae, SpeedOptions(parallel_group_norm=True))
        assert set_parallel_group_norm(vae.decoder, True) == sum(
            isinstance(m, nn.GroupNorm) for m in vae.decoder.modules()) > 0
        assert all(type(m) is nn.GroupNorm for m in vae.encoder.modules() if isinstance(m, nn.GroupNorm))
        parallel = decode_video(vae, latents)
    assert parallel.shape == native.shape and parallel.shape[:3] == (1, 10, 3)
    np.testing.assert_allclose(parallel.numpy(), native.numpy(), rtol=1e-4, atol=1e-5)


def test_a_channels_last_decoder_keeps_one_layout_and_decodes_the_same_video():
    vae = tiny_svd_components().vae
    latents = torch.randn(1, 10, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = decode_video(vae, latents)
        apply_decoder_speed(vae, SpeedOptions(parallel_group_norm=True, decoder_channels_last=True))
        with _LayoutsSeen() as seen:
            channels_last = decode_video(vae, latents)
    np.testing.assert_allclose(channels_last.numpy(), native.numpy(), rtol=1e-4, atol=1e-5)
    # Every 2D convolution but the first (whose input is the latents) reads channels-last frames, and every group
    # norm and SiLU of the clips reads them in place, as the temporal blocks' NDHWC view. (The CPU's 3D
    # convolutions return NCDHW whatever their input; cuDNN's keep NDHWC.)
    assert seen.layouts["convolution", 4] == {"contiguous": 2, "channels last": 44}
    assert seen.layouts["var_mean", 4] == {"channels last": 38}
    assert "contiguous" not in seen.layouts["silu", 4] and seen.layouts["silu", 5]["channels last"] == 18
    apply_decoder_speed(vae, SpeedOptions())
    convs = [m.weight for m in vae.decoder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert all(w.is_contiguous() for w in convs)  # switched back


def test_a_channels_last_unet_gives_the_same_guided_output_with_channels_last_convolutions(tiny_unet):
    unet = extend_unet(tiny_unet, 32).requires_grad_(False)
    generator = torch.Generator().manual_seed(4)
    # 16x16 latents: the tiny UNet's lowest level is then 2x2. At 1x1 a tensor is contiguous in both layouts, and
    # which strides an operation gives it there varies with torch's thread count (one thread gave NCHW strides).
    latents = torch.randn(1, 10, 4, 16, 16, generator=generator)
    cond = Conditioning(torch.randn(2, 1, 32, generator=generator), torch.randn(2, 1, 4, 16, 16, generator=generator),
                        torch.tensor([[29.0, 127.0, 0.02]] * 2), guided=True)
    ramp = torch.linspace(1.0, 3.0, 10)
    inputs: dict[str, bool] = {}

    def record(name: str):
        def hook(module, args):
            inputs[name] = args[0].is_contiguous(memory_format=torch.channels_last)
        return hook

    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(record(name))
    with torch.no_grad():
        apply_speed(unet, SpeedOptions(parallel_group_norm=True))
        nchw = guided_model_output(unet, latents, torch.tensor(0.5), cond, ramp, batched=True)
        apply_speed(unet, SpeedOptions(parallel_group_norm=True, unet_channels_last=True))
        nhwc = guided_model_output(unet, latents, torch.tensor(0.5), cond, ramp, batched=True)
    # The two layouts' float32 kernels sum in different orders (which ones depends on the CPU's instruction set):
    # agreement to a few 1e-4 of the output's norm; a wrong layout anywhere would be off by O(1).
    assert float((nhwc - nchw).norm() / nchw.norm()) < 5e-4
    # Every 2D convolution but the first, whose input is the latents, reads channels-last frames.
    assert len(inputs) > 20 and [name for name, last in inputs.items() if not last] == ["conv_in"]
    apply_speed(unet, SpeedOptions())
    assert all(m.weight.is_contiguous() for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
