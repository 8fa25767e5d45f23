"""Loading AnimateDiff from a local diffusers-format directory, and writing tiny ones for tests and demos.

An AnimateDiff checkpoint here is what diffusers' `AnimateDiffPipeline.save_pretrained` writes: `unet/` (a
`UNetMotionModel`: the Stable Diffusion UNet with the motion modules in it), `motion_adapter/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/` and `model_index.json`. As for SVD (exvideo.models), nothing downloads,
and the tiny model uses the real classes and on-disk format, so the real loading code is what tests exercise.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from exvideo.models import write_directory_atomically
from exvideo.storage import require_dir

COMPONENTS = ("unet", "motion_adapter", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class AnimateDiffComponents:
    """The parts of an AnimateDiff checkpoint the stages use."""

    unet: UNetMotionModel
    motion_adapter: MotionAdapter
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler

    def pipeline(self) -> AnimateDiffPipeline:
        """diffusers' own AnimateDiff text-to-video pipeline around these components."""
        return AnimateDiffPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                   unet=self.unet, motion_adapter=self.motion_adapter, scheduler=self.scheduler)


def load_animatediff(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> AnimateDiffComponents:
    """Load the components of a local AnimateDiff checkpoint directory (frozen, in eval mode, on `device`)."""
    path = Path(path)
    require_dir(path, "AnimateDiff checkpoint")
    absent = [name for name in COMPONENTS if not (path / name).is_dir()]
    if absent:
        raise FileNotFoundError(f"AnimateDiff checkpoint {path} lacks component folders {absent}; expected "
                                f"{list(COMPONENTS)} (what AnimateDiffPipeline.save_pretrained writes)")
    common = {"local_files_only": True}
    components = AnimateDiffComponents(
        unet=load_motion_unet(path, dtype),
        motion_adapter=MotionAdapter.from_pretrained(path, subfolder="motion_adapter", torch_dtype=dtype, **common),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **common),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **common),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        scheduler=load_scheduler(path),
    )
    for module in (components.unet, components.motion_adapter, components.vae, components.text_encoder):
        module.to(device).eval().requires_grad_(False)
    return components


def load_motion_unet(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> UNetMotionModel:
    """The `UNetMotionModel` of a local AnimateDiff checkpoint (all training loads: no VAE, no text encoder)."""
    require_dir(Path(path) / "unet", "AnimateDiff UNet")
    return UNetMotionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, local_files_only=True)


def load_scheduler(path: str | os.PathLike) -> DDIMScheduler:
    """The checkpoint's scheduler: its noise schedule and prediction type define the training objective."""
    require_dir(Path(path) / "scheduler", "AnimateDiff scheduler")
    return DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)


def _byte_characters() -> list[str]:
    """The 256 printable characters byte-level BPE tokenizers (CLIP's among them) write bytes as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A real `CLIPTokenizer` over a tiny vocabulary: every byte alone and at a word's end, no merges, CLIP's two
    special tokens (ids 512 and 513), CLIP's 77-token context. Any text tokenizes, one token per byte."""
    characters = _byte_characters()
    tokens = [*characters, *(c + "</w>" for c in characters), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_animatediff_components(seed: int = 0) -> AnimateDiffComponents:
    """Randomly initialised AnimateDiff components of the real classes, small enough for CPU tests.

    The motion modules keep the released adapters' 32-row sinusoids; the VAE keeps Stable Diffusion's 8x spatial
    downsampling and its text encoder the 77-token context.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2,
    )
    motion_adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
                                   motion_num_attention_heads=2, motion_max_seq_length=32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    ))
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = tiny_tokenizer(Path(folder))
    # AnimateDiff's usual sampler: DDIM over Stable Diffusion's linear-beta epsilon schedule.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              steps_offset=1, timestep_spacing="linspace", prediction_type="epsilon")
    return AnimateDiffComponents(UNetMotionModel.from_unet2d(unet, motion_adapter).eval(), motion_adapter.eval(),
                                 vae.eval(), text_encoder.eval(), tokenizer, scheduler)


def write_tiny_animatediff(path: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny random AnimateDiff checkpoint in diffusers format (what `load_animatediff` reads), atomically."""
    return write_directory_atomically(path, overwrite, tiny_animatediff_components(seed).pipeline().save_pretrained)
