"""Predict the training step's activation memory per checkpointing policy, on the CPU, without a GPU.

    python benchmarks/train_memory.py                       # SVD-XT shapes, 128 frames at 512x512
    python benchmarks/train_memory.py --frames 64 --policies full lean

Runs forward and backward of the post-tuning loss on fake tensors (no data, no arithmetic) and follows every
tensor storage the step creates: the peak of what is alive at once is the activation memory (plus the fp32
gradients of the trainable set). Weights, AdamW state, fp32 norms under CUDA autocast and allocator slack come on
top: at 128 frames on an H200 the measured peaks were these figures + 13.7 to 15.5 GiB (benchmarks/RESULTS.md).
Use it to compare policies and clip lengths before renting a card.
"""

from __future__ import annotations

import argparse
import weakref

import torch
from diffusers import UNetSpatioTemporalConditionModel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from exvideo import LatentBatch, SpeedOptions, added_time_ids, extend_unet, freeze_for_post_tuning, post_tuning_loss
from exvideo.speed import enable_checkpointing


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of tensor storage created under this mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._release, key)
        self.peak = max(self.peak, self.current)
        return out


def predict(policy: str, frames: int, size: int) -> dict[str, float]:
    """GiB alive after forward and at the peak of one bf16 training step with checkpointing `policy`."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_default_dtype(torch.bfloat16)  # frozen weights in bf16, as the training path holds them
        try:
            unet = UNetSpatioTemporalConditionModel()
        finally:
            torch.set_default_dtype(torch.float32)
        extend_unet(unet, frames)
        for param in freeze_for_post_tuning(unet).values():
            param.data = param.data.float()
        if policy != "none":
            enable_checkpointing(unet, policy)
        unet.train()
        latent = size // 8
        batch = LatentBatch(torch.randn(1, frames, 4, latent, latent), torch.randn(1, 4, latent, latent),
                            torch.randn(1, 1, unet.config.cross_attention_dim), added_time_ids(30, 127))
        with LiveStorageBytes() as tracker:
            # CPU autocast keeps norms in bf16 where CUDA's runs them in fp32: the GPU pays a little more.
            with torch.autocast("cpu", torch.bfloat16):
                loss = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(0))
            after_forward = tracker.current
            loss.backward()
    return {"after_forward_gib": after_forward / 2**30, "peak_gib": tracker.peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    policies = ["full", "selective", "lean"]
    parser.add_argument("--policies", nargs="+", default=policies, choices=[*policies, "none"])
    args = parser.parse_args()
    print(f"SVD-XT UNet, {args.frames} frames at {args.size}x{args.size}, batch 1; default policy: "
          f"{SpeedOptions().checkpointing}")
    print("| checkpointing | alive after forward (GiB) | peak in the step (GiB) |\n|---|---|---|")
    for policy in args.policies:
        row = predict(policy, args.frames, args.size)
        print(f"| {policy} | {row['after_forward_gib']:.2f} | {row['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
