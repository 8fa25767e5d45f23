"""What a training checkpoint holds, and writing / reading it.

A checkpoint directory holds

    adapter.safetensors      the trainable tensors (exvideo.save_adapter), usable on its own
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

from exvideo import apply_adapter, save_adapter
from exvideo.adapter import adapter_metadata, read_adapter, write_adapter

ADAPTER = "adapter.safetensors"
EMA_ADAPTER = "ema_adapter.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


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


class EMA:
    """Exponential moving average of the trainable tensors (fp32, on the training device)."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)


def save_checkpoint(directory: Path, unet: nn.Module, optimizer_state: dict | None, state: TrainState,
                    ema: EMA | None, base_model: str) -> None:
    """Write a checkpoint into `directory` (a fresh temporary folder that Ray then persists)."""
    save_adapter(unet, directory / ADAPTER, dtype=torch.float32, base_model=base_model)
    if ema is not None:
        write_adapter(ema.shadow, directory / EMA_ADAPTER, adapter_metadata(unet, base_model))
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / OPTIMIZER)
    (directory / STATE).write_text(json.dumps(asdict(state), indent=1))


def load_checkpoint(directory: Path, unet: nn.Module, ema: EMA | None) -> tuple[dict | None, TrainState]:
    """Restore adapter (and EMA) into `unet` from `directory`; return the optimizer state dict and counters."""
    tensors, metadata = read_adapter(directory / ADAPTER)
    apply_adapter(unet, tensors, metadata)
    if ema is not None and (directory / EMA_ADAPTER).is_file():
        for name, tensor in read_adapter(directory / EMA_ADAPTER)[0].items():
            ema.shadow[name].copy_(tensor)
    optimizer_state = None
    if (directory / OPTIMIZER).is_file():
        optimizer_state = torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True)
    state = TrainState(**json.loads((directory / STATE).read_text()))
    return optimizer_state, state
