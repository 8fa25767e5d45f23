"""The accelerator half of the pipeline: an actor that holds the model family's encoders and encodes clips.

Per SVD clip, as the reference trains on (docs/method.md, section 2), `ClipEncoder`:
    latents       VAE posterior mean of every frame x vae.config.scaling_factor     [T, 4, H/8, W/8]
    cond_latent   unscaled posterior mode of frame 0 (the mean: the posterior is a diagonal Gaussian)
    image_embeds  CLIP image embedding of frame 0, prepared as diffusers' SVD pipeline prepares it   [1, D]
SVD's VAE encoder works frame by frame, so frame 0's latent inside the clip is exactly its single-image latent.

Per AnimateDiff clip, `TextClipEncoder`:
    latents       Stable Diffusion VAE posterior mean of every frame x its scaling factor   [T, 4, H/8, W/8]
    text_embeds   CLIP text encoder's last hidden state of the caption, padded to the tokenizer's context [L, D]
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from exvideo.ray_setup import node_id
from exvideo.samples import ALL_ARRAYS, ClipRecord, LatentClip, encode_sample
from preprocessing.config import PreprocessConfig

# Sample entries travel from the actors to the driver as binary columns, one per WebDataset entry (empty when
# the family has no such entry).
ENTRY_COLUMNS = {**{f"{name}.npy": f"entry_{name}" for name in ALL_ARRAYS}, "json": "entry_json"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: PreprocessConfig, cluster_gpus: float) -> str:
    """'cuda' when asked for, or on auto when the cluster has GPUs; else 'cpu'."""
    if cfg.encode_device == "auto":
        return "cuda" if cluster_gpus > 0 else "cpu"
    if cfg.encode_device == "cuda" and cluster_gpus <= 0:
        raise ValueError("encode_device=cuda but the Ray cluster has no GPUs; use encode_device=auto or cpu")
    return cfg.encode_device


class _EncoderActor:
    """Ray Data actor base: pyarrow batches of prepared clip rows -> rows with the sample's WebDataset entries.

    Subclasses load their family's encoders (never the UNet), with `local_files_only` as the model loaders, and
    say how a clip's frames and caption become arrays.
    """

    family: str

    def __init__(self, cfg: PreprocessConfig, device: str, config_hash: str, fingerprint: str):
        dtype_name = cfg.encode_dtype if cfg.encode_dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        self.dtype, self.device, self.cfg = _DTYPES[dtype_name], torch.device(device), cfg
        self.config_hash, self.fingerprint = config_hash, fingerprint
        self.node = node_id()

    def model(self, cls: type, subfolder: str, **dtype) -> torch.nn.Module:
        """One network of the checkpoint (diffusers or transformers class), in eval mode on the actor's device."""
        return cls.from_pretrained(self.cfg.model, subfolder=subfolder, local_files_only=True,
                                   **dtype).to(self.device).eval()

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 VAE posterior means of frames in [-1, 1], `vae_chunk_frames` at a time (unscaled)."""
        means = [self.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(self.cfg.vae_chunk_frames)]
        return torch.cat(means).float()

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1

    def encode_arrays(self, frames: np.ndarray, caption: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _sample_row(self, row: dict) -> dict:
        shape = (len(row["frame_indices"]), self.cfg.height, self.cfg.width, 3)
        # A writable copy: torch refuses to wrap read-only buffers without a warning.
        frames = np.frombuffer(row.pop("pixels"), dtype=np.uint8).reshape(shape).copy()
        arrays = self.encode_arrays(frames, row["caption"])
        record = ClipRecord(
            source=row["source"], fps=row["fps"], frame_indices=list(row["frame_indices"]),
            motion_bucket=row["motion_bucket"], caption=row["caption"], motion_score=row["motion_score"],
            crop=list(row["crop"]), height=self.cfg.height, width=self.cfg.width, config_hash=self.config_hash,
            encoder_fingerprint=self.fingerprint, vae_scaling_factor=float(self.vae.config.scaling_factor),
            model_family=self.family,
        )
        entries = encode_sample(LatentClip(row["key"], record=record, **arrays))
        row.update({column: entries[name] for name, column in ENTRY_COLUMNS.items() if name in entries})
        latents = arrays["latents"].astype(np.float32)
        row.update(latent_mean=float(latents.mean()), latent_std=float(latents.std()))
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


class ClipEncoder(_EncoderActor):
    """SVD's encoders: the temporal-decoder VAE's encoder and the CLIP image encoder."""

    family = "svd"

    def __init__(self, cfg: PreprocessConfig, device: str, config_hash: str, fingerprint: str):
        super().__init__(cfg, device, config_hash, fingerprint)
        self.vae = self.model(AutoencoderKLTemporalDecoder, "vae", torch_dtype=self.dtype)
        self.image_encoder = self.model(CLIPVisionModelWithProjection, "image_encoder", dtype=self.dtype)
        self.feature_extractor = CLIPImageProcessor.from_pretrained(cfg.model, subfolder="feature_extractor",
                                                                    local_files_only=True)
        self.clip_size = self.image_encoder.config.image_size

    @torch.no_grad()
    def encode_pixels(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(latents, cond_latent, image_embeds) as float16 arrays from uint8 frames [T, H, W, 3]."""
        pixels = self.pixels(frames)
        posterior_mean = self.latents(pixels)
        # The image processor works on CPU tensors, as diffusers' SVD pipeline hands it.
        first = _resize_with_antialiasing(pixels[:1].float(), (self.clip_size, self.clip_size)).cpu()
        clip_input = self.feature_extractor(images=(first + 1) / 2, do_normalize=True, do_center_crop=False,
                                            do_resize=False, do_rescale=False, return_tensors="pt").pixel_values
        embeds = self.image_encoder(clip_input.to(self.device, self.dtype)).image_embeds.float()
        scaled = posterior_mean * self.vae.config.scaling_factor
        return (scaled.cpu().numpy().astype(np.float16), posterior_mean[0].cpu().numpy().astype(np.float16),
                embeds.cpu().numpy().astype(np.float16))

    def encode_arrays(self, frames: np.ndarray, caption: str) -> dict[str, np.ndarray]:
        latents, cond_latent, image_embeds = self.encode_pixels(frames)
        return {"latents": latents, "cond_latent": cond_latent, "image_embeds": image_embeds}


class TextClipEncoder(_EncoderActor):
    """AnimateDiff's encoders: Stable Diffusion's VAE encoder and the CLIP text encoder with its tokenizer."""

    family = "animatediff"

    def __init__(self, cfg: PreprocessConfig, device: str, config_hash: str, fingerprint: str):
        super().__init__(cfg, device, config_hash, fingerprint)
        self.vae = self.model(AutoencoderKL, "vae", torch_dtype=self.dtype)
        self.text_encoder = self.model(CLIPTextModel, "text_encoder", dtype=self.dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(cfg.model, subfolder="tokenizer", local_files_only=True)

    @torch.no_grad()
    def encode_text(self, caption: str) -> torch.Tensor:
        """[L, D] last hidden state of the caption, tokenized as diffusers' AnimateDiff pipeline does (padded to
        the tokenizer's context, truncated beyond it)."""
        ids = self.tokenizer(caption, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0][0].float()

    @torch.no_grad()
    def encode_arrays(self, frames: np.ndarray, caption: str) -> dict[str, np.ndarray]:
        scaled = self.latents(self.pixels(frames)) * self.vae.config.scaling_factor
        return {"latents": scaled.cpu().numpy().astype(np.float16),
                "text_embeds": self.encode_text(caption).cpu().numpy().astype(np.float16)}


ENCODERS: dict[str, type[_EncoderActor]] = {"svd": ClipEncoder, "animatediff": TextClipEncoder}
