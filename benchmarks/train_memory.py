"""Predict the training step's GPU memory on the CPU, without a GPU: per checkpointing policy, and per memory mode.

    python benchmarks/train_memory.py                       # SVD-XT shapes, 128 frames at 512x512
    python benchmarks/train_memory.py --frames 64 --policies full lean
    python benchmarks/train_memory.py --policies --memory-modes default low lowest   # TrainConfig.memory

Runs forward and backward of the post-tuning loss on fake tensors (no data, no arithmetic) and follows every
tensor storage the step creates: the peak of what is alive at once is the activation memory (plus the fp32
gradients of the trainable set). Weights, AdamW state, fp32 norms under CUDA autocast and allocator slack come on
top: at 128 frames on an H200 the measured peaks were these figures + 13.7 to 15.5 GiB (benchmarks/RESULTS.md).
Use it to compare policies and clip lengths before renting a card.

The memory-mode table counts the whole GPU instead: weights and AdamW state as each mode holds them, then
activations and gradients of one step with the project's eager speed switches (`SpeedOptions()` on the CPU). What
stays uncounted are the terms only CUDA has (fp32 norms under CUDA autocast, library workspaces): the measured eager
default's peak minus its predicted one. For memory=lowest every tensor autograd saves during the forward moves to
host memory, as `torch.autograd.graph.save_on_cpu` moves it.
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from exvideo import LatentBatch, SpeedOptions, added_time_ids, freeze_for_post_tuning, post_tuning_loss
from exvideo.speed import enable_checkpointing, speed_context
from memory_traffic import bf16_unet

MEMORY_MODES = ("default", "low", "lowest")  # TrainConfig.memory


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of tensor storage created under this mode (or passed to `hold`) that are still alive, and their peak.

    Tensors on the `meta` device stand for host memory and are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count the storages of tensors made before the mode (weights) as alive from now on; a view of one later
        is then not mistaken for a new tensor."""
        for tensor in tensors:
            self._count(tensor)
        self.peak = max(self.peak, self.current)

    def _count(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        self.peak = max(self.peak, self.current)
        return out


# What an extended UNet runs with no switch applied: the clip-length figures in RESULTS.md were counted so.
UNSWITCHED = replace(SpeedOptions.plain(), conv_layout="channels_last")


def fake_svd_unet(frames: int, trainable_dtype: torch.dtype, options: SpeedOptions = UNSWITCHED
                  ) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The SVD-XT UNet extended to `frames` under the active FakeTensorMode, with the module-level switches of
    `options`: frozen weights in bf16, as the training path holds them, and the trainable set in `trainable_dtype`."""
    unet = bf16_unet(frames, options)
    trainable = freeze_for_post_tuning(unet)
    for param in trainable.values():
        param.data = param.data.to(trainable_dtype)
    return unet.train(), trainable


def fake_batch(unet: nn.Module, frames: int, size: int) -> LatentBatch:
    latent = size // 8
    return LatentBatch(torch.randn(1, frames, 4, latent, latent), torch.randn(1, 4, latent, latent),
                       torch.randn(1, 1, unet.config.cross_attention_dim), added_time_ids(30, 127))


def predict(policy: str, frames: int, size: int) -> dict[str, float]:
    """GiB alive after forward and at the peak of one bf16 training step with checkpointing `policy`."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet, _ = fake_svd_unet(frames, torch.float32)
        if policy != "none":
            enable_checkpointing(unet, policy)
        batch = fake_batch(unet, frames, size)
        with LiveStorageBytes() as tracker:
            # CPU autocast keeps norms in bf16 where CUDA's runs them in fp32: the GPU pays a little more.
            with torch.autocast("cpu", torch.bfloat16):
                loss = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(0))
            after_forward = tracker.current
            loss.backward()
    return {"after_forward_gib": after_forward / 2**30, "peak_gib": tracker.peak / 2**30}


def offloaded_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
    """Hooks that do on fake tensors what `save_on_cpu` does: every tensor saved for backward leaves the device
    (for the `meta` device, which `LiveStorageBytes` does not count) and comes back as a new copy when used."""
    return torch.autograd.graph.saved_tensors_hooks(lambda tensor: (tensor.device, tensor.to("meta")),
                                                    lambda packed: packed[1].to(packed[0]))


def predict_memory_mode(memory: str, frames: int, size: int, options: SpeedOptions = SpeedOptions()
                        ) -> dict[str, float]:
    """GiB on the GPU in one bf16 training step in `TrainConfig.memory` mode `memory` with the eager switches of
    `options`: held throughout (weights and AdamW state), alive after forward, and the step's peak.

    default: trainable weights fp32 under autocast, fp32 gradients, AdamW moments on the device. low: trainable
    weights bf16, bf16 gradients, AdamW state and master weights in host memory (pipelines/train/offload.py).
    lowest: low, and the tensors the forward saves for backward in host memory.
    """
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory mode {memory!r} is not one of {', '.join(MEMORY_MODES)} (TrainConfig.memory)")
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet, trainable = fake_svd_unet(frames, torch.float32 if memory == "default" else torch.bfloat16, options)
        enable_checkpointing(unet, options.checkpointing)
        batch = fake_batch(unet, frames, size)
        with LiveStorageBytes() as tracker:
            tracker.hold(unet.parameters())
            # AdamW's moments exist from the first step on: alive through every later step.
            moments = [torch.zeros_like(p) for p in trainable.values() for _ in range(2)] if memory == "default" \
                else []
            held = tracker.current
            saved = offloaded_saved_tensors() if memory == "lowest" else nullcontext()
            with speed_context(options), torch.autocast("cpu", torch.bfloat16), saved:
                loss = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(0))
            after_forward = tracker.current
            loss.backward()
            del moments
    return {"held_gib": held / 2**30, "after_forward_gib": after_forward / 2**30, "peak_gib": tracker.peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    policies = ["full", "selective", "lean"]
    parser.add_argument("--policies", nargs="*", default=policies, choices=[*policies, "none"])
    parser.add_argument("--memory-modes", nargs="*", default=[], choices=MEMORY_MODES,
                        help="also count the whole GPU per TrainConfig.memory mode, with the eager speed defaults")
    parser.add_argument("--measured-default-gib", type=float, default=32.60,
                        help="measured peak of the eager default training step at these shapes, whose difference "
                             "to its prediction is added to every mode (H100, RESULTS.md: 32.60)")
    args = parser.parse_args()
    print(f"SVD-XT UNet, {args.frames} frames at {args.size}x{args.size}, batch 1; default policy: "
          f"{SpeedOptions().checkpointing}")
    if args.policies:
        print("| checkpointing | alive after forward (GiB) | peak in the step (GiB) |\n|---|---|---|")
    for policy in args.policies:
        row = predict(policy, args.frames, args.size)
        print(f"| {policy} | {row['after_forward_gib']:.2f} | {row['peak_gib']:.2f} |", flush=True)
    if not args.memory_modes:
        return
    rows = {mode: predict_memory_mode(mode, args.frames, args.size) for mode in args.memory_modes}
    # Only the default mode has been measured: its gap to the prediction is what CUDA adds, the same in every mode.
    default = rows.get("default") or predict_memory_mode("default", args.frames, args.size)
    gap = args.measured_default_gib - default["peak_gib"]
    print(f"\nwhole GPU, eager speed defaults; + {gap:.2f} GiB CUDA-only terms (measured eager default "
          f"{args.measured_default_gib} GiB minus its prediction)")
    print("| memory mode | weights + AdamW state (GiB) | alive after forward | peak counted | predicted peak |\n"
          "|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['held_gib']:.2f} | {row['after_forward_gib']:.2f} | {row['peak_gib']:.2f} | "
              f"{row['peak_gib'] + gap:.2f} |", flush=True)


if __name__ == "__main__":
    main()
