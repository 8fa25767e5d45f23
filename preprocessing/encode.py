"""The accelerator half of the pipeline: an actor that holds SVD's VAE and CLIP image encoder and encodes clips.

Per clip, as the reference trains on (docs/method.md, section 2):
    latents       VAE posterior mean of every frame x vae.config.scaling_factor     [T, 4, H/8, W/8]
    cond_latent   unscaled posterior mode of frame 0 (the mean: the posterior is a diagonal Gaussian)
    image_embeds  CLIP image embedding of frame 0, prepared as diffusers' SVD pipeline prepares it   [1, D]
SVD's VAE encoder works frame by frame, so frame 0's latent inside the clip is exactly its single-image latent.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from diffusers import AutoencoderKLTemporalDecoder
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from exvideo.ray_setup import node_id
from exvideo.samples import ARRAYS, ClipRecord, LatentClip, encode_sample
from preprocessing.config import PreprocessConfig

ENCODER_COMPONENTS = ("vae", "image_encoder", "feature_extractor")
# Sample entries travel from the actors to the driver as binary columns, one per WebDataset entry.
ENTRY_COLUMNS = {**{f"{name}.npy": f"entry_{name}" for name in ARRAYS}, "json": "entry_json"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encoder_fingerprint(model: str | os.PathLike) -> str:
    """Hash of the encoder components' files (weights and configs): which encoder made a shard set."""
    model = Path(model)
    missing = [c for c in ENCODER_COMPONENTS if not (model / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"SVD checkpoint {model} lacks {missing}; preprocessing needs {ENCODER_COMPONENTS} "
                                "(write a tiny one with `exvideo make-tiny-model DIR`)")
    digest = hashlib.sha256()
    for component in ENCODER_COMPONENTS:
        for file in sorted((model / component).iterdir()):
            digest.update(f"{component}/{file.name}".encode())
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def resolve_device(cfg: PreprocessConfig, cluster_gpus: float) -> str:
    """'cuda' when asked for, or on auto when the cluster has GPUs; else 'cpu'."""
    if cfg.encode_device == "auto":
        return "cuda" if cluster_gpus > 0 else "cpu"
    if cfg.encode_device == "cuda" and cluster_gpus <= 0:
        raise ValueError("encode_device=cuda but the Ray cluster has no GPUs; use encode_device=auto or cpu")
    return cfg.encode_device


class ClipEncoder:
    """Ray Data actor: pyarrow batches of prepared clip rows -> rows with the sample's WebDataset entries.

    Only the encoders are loaded (not SVD's 1.5B-parameter UNet), with `local_files_only` as `exvideo.load_svd`.
    """

    def __init__(self, cfg: PreprocessConfig, device: str, config_hash: str, fingerprint: str):
        dtype_name = cfg.encode_dtype if cfg.encode_dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        self.dtype, self.device, self.cfg = _DTYPES[dtype_name], torch.device(device), cfg
        self.config_hash, self.fingerprint = config_hash, fingerprint
        common = {"local_files_only": True}
        self.vae = AutoencoderKLTemporalDecoder.from_pretrained(cfg.model, subfolder="vae", torch_dtype=self.dtype,
                                                                **common).to(self.device).eval()
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            cfg.model, subfolder="image_encoder", dtype=self.dtype, **common).to(self.device).eval()
        self.feature_extractor = CLIPImageProcessor.from_pretrained(cfg.model, subfolder="feature_extractor",
                                                                    **common)
        self.clip_size = self.image_encoder.config.image_size
        self.node = node_id()

    @torch.no_grad()
    def encode_pixels(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(latents, cond_latent, image_embeds) as float16 arrays from uint8 frames [T, H, W, 3]."""
        pixels = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1
        means = [self.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(self.cfg.vae_chunk_frames)]
        posterior_mean = torch.cat(means).float()
        # The image processor works on CPU tensors, as diffusers' SVD pipeline hands it.
        first = _resize_with_antialiasing(pixels[:1].float(), (self.clip_size, self.clip_size)).cpu()
        clip_input = self.feature_extractor(images=(first + 1) / 2, do_normalize=True, do_center_crop=False,
                                            do_resize=False, do_rescale=False, return_tensors="pt").pixel_values
        embeds = self.image_encoder(clip_input.to(self.device, self.dtype)).image_embeds.float()
        scaled = posterior_mean * self.vae.config.scaling_factor
        return (scaled.cpu().numpy().astype(np.float16), posterior_mean[0].cpu().numpy().astype(np.float16),
                embeds.cpu().numpy().astype(np.float16))

    def _sample_row(self, row: dict) -> dict:
        shape = (len(row["frame_indices"]), self.cfg.height, self.cfg.width, 3)
        # A writable copy: torch refuses to wrap read-only buffers without a warning.
        frames = np.frombuffer(row.pop("pixels"), dtype=np.uint8).reshape(shape).copy()
        latents, cond_latent, image_embeds = self.encode_pixels(frames)
        record = ClipRecord(
            source=row["source"], fps=row["fps"], frame_indices=list(row["frame_indices"]),
            motion_bucket=row["motion_bucket"], caption=row["caption"], motion_score=row["motion_score"],
            crop=list(row["crop"]), height=self.cfg.height, width=self.cfg.width, config_hash=self.config_hash,
            encoder_fingerprint=self.fingerprint, vae_scaling_factor=float(self.vae.config.scaling_factor),
        )
        entries = encode_sample(LatentClip(row["key"], latents, cond_latent, image_embeds, record))
        row.update({column: entries[name] for name, column in ENTRY_COLUMNS.items()})
        row.update(latent_mean=float(latents.astype(np.float32).mean()),
                   latent_std=float(latents.astype(np.float32).std()))
        return row

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            if not row["stage"]:
                try:
                    row = self._sample_row(row)
                except Exception as exc:  # out of memory, a broken weight file: the clip fails, the job goes on
                    row.update(stage="encode", reason_code="encode_error", reason=f"{type(exc).__name__}: {exc}"[:400])
            row.pop("pixels", None)
            row["encode_node"] = self.node
            for column in ENTRY_COLUMNS.values():
                row.setdefault(column, b"")
            row.setdefault("latent_mean", 0.0)
            row.setdefault("latent_std", 0.0)
            out.append(row)
        return pa.Table.from_pylist(out)
