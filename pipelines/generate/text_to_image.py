"""First frames from text, with any local diffusers text-to-image pipeline the user names."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import PIL.Image
import torch
from diffusers import DiffusionPipeline


def load_text_to_image(path: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """Load a diffusers text-to-image pipeline directory (Stable Diffusion, SD3, Hunyuan-DiT, ...) offline."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"text_to_image {path} is not a diffusers pipeline directory (no model_index.json); "
                                "save one with `pipeline.save_pretrained(dir)`")
    pipeline = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def first_frame_from_text(pipeline: DiffusionPipeline, prompt: str, width: int, height: int, steps: int,
                          seed: int) -> PIL.Image.Image:
    """The image `pipeline` makes for `prompt` at the video's size, seeded like the video."""
    generator = torch.Generator().manual_seed(seed)
    return pipeline(prompt=prompt, width=width, height=height, num_inference_steps=steps,
                    generator=generator).images[0]


def write_tiny_text_to_image(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion pipeline (real diffusers/transformers classes) for offline tests.

    The tokenizer is a real CLIP BPE tokenizer over a character vocabulary written next to the model, so nothing
    is downloaded.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pipelines.generate.video_io import write_text

    path = Path(path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    source = path.with_name(f".{path.name}.tokenizer-source")
    write_text(source / "vocab.json", json.dumps(vocab))
    write_text(source / "merges.txt", "#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(source / "vocab.json"), str(source / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp)
    os.replace(tmp, path)
    shutil.rmtree(source)
    return path
