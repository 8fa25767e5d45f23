"""What a training checkpoint holds, and writing / reading it.

A checkpoint directory holds

    adapter.safetensors      the trainable tensors (exvideo.save_adapter), usable on its own; when training a base
                             model (trainable=all) every UNet tensor instead (format exvideo-unet-weights)
    ema_adapter.safetensors  their EMA, when enabled (also usable on its own)
    optimizer.pt             AdamW state (tensors and numbers only; read with weights_only=True)
    state.json               step, clips consumed per rank, loss so far, MLflow run id
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from exvideo import apply_adapter
from exvideo.adapter import adapter_metadata, adapter_state_dict, read_adapter, write_adapter
from exvideo.unet import extended_num_frames

ADAPTER = "adapter.safetensors"
EMA_ADAPTER = "ema_adapter.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
FULL_UNET_FORMAT = "exvideo-unet-weights"


@dataclass
class TrainState:
    """Counters that make a resumed run continue exactly where the last checkpoint left it."""

    step: int = 0
    clips_consumed: int = 0  # per rank: every rank consumes batch_size clips per step
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    best_loss: float = float("inf")
    mlflow_run_id: str = ""
    history: list[dict] = field(default_factory=list)  # one entry per checkpoint: step, interval loss
    fps_seen: dict[str, int] = field(default_factory=dict)  # this rank's clips per conditioning fps (rounded)
    worker_steps_by_node: dict[str, int] = field(default_factory=dict)  # Ray node id -> steps its workers ran

    def training_metadata(self, fps_condition: int | str) -> dict[str, str]:
        """What the adapter records of its conditioning: the policy, and the fps generation should default to
        (for `clip`, the rate most of this rank's clips had)."""
        if fps_condition != "clip":
            return {"fps_condition": str(fps_condition), "fps": str(fps_condition)}
        common = max(self.fps_seen, key=self.fps_seen.get) if self.fps_seen else "30"
        return {"fps_condition": "clip", "fps": common}


class EMA:
    """Exponential moving average of the trainable tensors, fp32 in host memory: it changes only at checkpoints, so
    it need not take GPU memory (with memory=low the GPU holds nothing else of the trainable set but its working
    copies)."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().to("cpu", torch.float32), 1 - self.decay)


def checkpoint_metadata(unet: nn.Module, base_model: str, training: dict[str, str]) -> dict[str, str]:
    """Adapter metadata for an extended UNet; for an unextended one (base training) the file holds every tensor."""
    if extended_num_frames(unet) is None:
        return {"format": FULL_UNET_FORMAT, "base_model": base_model, **training}
    return adapter_metadata(unet, base_model, training)


def checkpoint_tensors(unet: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint saves: the ExVideo trainable set of an extended UNet, else every UNet parameter."""
    if extended_num_frames(unet) is None:
        return {name: p.detach() for name, p in unet.named_parameters()}
    return adapter_state_dict(unet)


def load_unet_weights(unet: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a full set of UNet parameters (a base-training checkpoint) into `unet`, refusing any mismatch."""
    expected = dict(unet.named_parameters())
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or extra or wrong:
        raise ValueError(f"UNet weights do not fit this UNet: missing {missing[:5]} ({len(missing)}), unexpected "
                         f"{extra[:5]} ({len(extra)}), wrong shapes {wrong[:5]} ({len(wrong)}); the checkpoint was "
                         "written for another UNet config")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def save_checkpoint(directory: Path, unet: nn.Module, optimizer_state: dict | None, state: TrainState,
                    ema: EMA | None, metadata: dict[str, str]) -> None:
    """Write a checkpoint into `directory` (a fresh temporary folder that Ray then persists); `metadata` goes
    into its adapter files (`checkpoint_metadata`)."""
    write_adapter(checkpoint_tensors(unet), directory / ADAPTER, metadata, torch.float32)
    if ema is not None:
        write_adapter(ema.shadow, directory / EMA_ADAPTER, metadata)
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / OPTIMIZER)
    (directory / STATE).write_text(json.dumps(asdict(state), indent=1))


def load_checkpoint(directory: Path, unet: nn.Module, ema: EMA | None) -> tuple[dict | None, TrainState]:
    """Restore adapter (and EMA) into `unet` from `directory`; return the optimizer state dict and counters."""
    tensors, metadata = read_adapter(directory / ADAPTER)
    if metadata.get("format") == FULL_UNET_FORMAT:
        load_unet_weights(unet, tensors)
    else:
        apply_adapter(unet, tensors, metadata)
    if ema is not None and (directory / EMA_ADAPTER).is_file():
        for name, tensor in read_adapter(directory / EMA_ADAPTER)[0].items():
            ema.shadow[name].copy_(tensor)
    optimizer_state = None
    if (directory / OPTIMIZER).is_file():
        optimizer_state = torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True)
    state = TrainState(**json.loads((directory / STATE).read_text()))
    return optimizer_state, state
