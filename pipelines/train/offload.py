"""Low-memory training (`TrainConfig.memory` low and lowest): AdamW state and fp32 master weights in host memory.

The training device keeps only the working copy of each trainable tensor, in the run's precision (bf16 or fp32),
and its gradient. Each optimizer step copies the gradients to the host, runs AdamW there on fp32 master weights,
and copies the updated weights back, cast to the working precision on the host so that half the bytes cross the
bus in bf16. Gradient clipping and the skip of non-finite steps act on the working gradients before the step, as
in the default mode.

With fp32 working copies the updates are those of `torch.optim.AdamW` to float32 rounding (the host runs AdamW's
fused CPU kernel). With bf16 working copies the forward sees the same bf16 weights as autocast makes of fp32 ones,
but gradients arrive in bf16 and the weights the run checkpoints are the working copies: the master weights and
AdamW state travel in the optimizer's state dict (`optimizer.pt`), so a resumed run continues from the fp32 values.

memory=lowest also keeps what the forward saves for backward in host memory (`saved_activations`): it moves the
same tensors there and back, so it gives the updates of memory=low.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

MASTER_WEIGHTS = "master_weights"


class HostAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies in host memory of the working parameters it is given.

    The optimizer's own parameters (`param_groups`) are the master copies; `step`, `zero_grad`, `state_dict` and
    `load_state_dict` act on the working parameters as `torch.optim.AdamW` would. Construction casts the working
    parameters to `working_dtype` in place, after taking their values as the masters: pass the fp32 trainable set.
    """

    def __init__(self, params: Iterable[nn.Parameter], working_dtype: torch.dtype, lr: float,
                 betas: tuple[float, float], weight_decay: float):
        self.working = list(params)
        if not self.working:
            raise ValueError("HostAdamW needs at least one trainable parameter; the trainable set is empty")
        device = self.working[0].device
        if any(param.device != device for param in self.working):
            raise ValueError(f"HostAdamW needs every working parameter on one device; got "
                             f"{sorted({str(param.device) for param in self.working})}")
        # Page-locked host memory lets the copies to and from the GPU run without a staging copy by the driver.
        pin = device.type == "cuda"
        masters = [nn.Parameter(_host_copy(param.detach(), torch.float32, pin)) for param in self.working]
        # The fused CPU kernel updates each tensor in one pass over its weights, gradient and moments.
        super().__init__(masters, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
        with torch.no_grad():
            for param in self.working:
                param.data = param.data.to(working_dtype)
        self.staging = [_host_copy(param.detach(), working_dtype, pin) for param in self.working]
        # fp32 working gradients arrive directly in the masters' gradient buffers.
        self.grad_buffers = [stage if stage.dtype == torch.float32 else torch.empty_like(master)
                             for stage, master in zip(self.staging, masters)]

    @property
    def masters(self) -> list[nn.Parameter]:
        """The fp32 host copies that AdamW updates, in the order of the working parameters."""
        return self.param_groups[0]["params"]

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """Copy the working gradients to the host, run AdamW on the masters, copy the new weights back."""
        if closure is not None:
            raise ValueError("HostAdamW.step takes no closure: compute the loss and gradients before calling it")
        self._download_gradients()
        super().step()
        self._upload_weights()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the working gradients (the host buffers are overwritten by the next step)."""
        for param in self.working:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()

    def state_dict(self) -> dict:
        """AdamW's state dict over the masters, plus the master weights themselves (index -> fp32 tensor)."""
        state = super().state_dict()
        state[MASTER_WEIGHTS] = {index: master.detach() for index, master in enumerate(self.masters)}
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore AdamW's state and the master weights, then the working copies from them.

        A state dict without master weights (one written by `torch.optim.AdamW` in the default mode) takes the
        masters from the working parameters, so load the checkpoint's weights into the model first.
        """
        saved = state_dict.get(MASTER_WEIGHTS)
        super().load_state_dict({key: value for key, value in state_dict.items() if key != MASTER_WEIGHTS})
        if saved is not None and len(saved) != len(self.masters):
            raise ValueError(f"the optimizer state holds {len(saved)} master weights for {len(self.masters)} "
                             "trainable tensors; it was written for another trainable set")
        for index, (master, param) in enumerate(zip(self.masters, self.working)):
            master.copy_(saved[index] if saved is not None else param.detach())
        self._upload_weights()

    def _download_gradients(self) -> None:
        pending = []
        for param, master, stage, buffer in zip(self.working, self.masters, self.staging, self.grad_buffers):
            if param.grad is None:  # AdamW skips tensors without a gradient, as the default mode does
                master.grad = None
                continue
            stage.copy_(param.grad, non_blocking=True)
            pending.append((master, stage, buffer))
        self._wait_for_copies()
        for master, stage, buffer in pending:
            if buffer is not stage:
                buffer.copy_(stage)
            master.grad = buffer

    def _upload_weights(self) -> None:
        # The previous step's uploads read the staging buffers: wait for them before writing there.
        self._wait_for_copies()
        for param, master, stage in zip(self.working, self.masters, self.staging):
            stage.copy_(master)
            param.copy_(stage, non_blocking=True)

    def _wait_for_copies(self) -> None:
        device = self.working[0].device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


def _host_copy(tensor: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    copy = torch.empty(tensor.shape, dtype=dtype, pin_memory=pin)
    copy.copy_(tensor)
    return copy


def saved_activations(memory: str, device: torch.device) -> AbstractContextManager:
    """Where the forward of a step run under this context keeps the tensors backward needs: for memory=lowest in
    host memory (`torch.autograd.graph.save_on_cpu`, page-locked on a GPU), else on `device`."""
    if memory == "lowest":
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
    return nullcontext()
