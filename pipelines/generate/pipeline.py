"""The long-video pipeline: diffusers' SVD pipeline with ExVideo's inference and the training-free baselines.

`LongVideoPipeline` subclasses `StableVideoDiffusionPipeline` and reuses its image encoding, VAE conditioning,
added time ids and scheduler; it replaces only the denoising loop (so it can average overlapping windows, start
part-way for a second pass and chain clips) and the decode (windowed over time, optionally tiled in space).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from diffusers import StableVideoDiffusionPipeline

from exvideo import SpeedOptions, extended_num_frames
from exvideo.speed import apply_decoder_speed, apply_speed, speed_context
from pipelines.generate.decode import decode_video
from pipelines.generate.guidance import Conditioning, guidance_ramp, guided_model_output
from pipelines.generate.latents import renormalize_frames
from pipelines.generate.noise import shuffled_window_noise, video_noise
from pipelines.generate.params import GenerationParams
from pipelines.generate.windows import window_starts


@dataclass
class GeneratedVideo:
    """One generated video: uint8 frames `[T, H, W, 3]`, the first frame it was conditioned on, and timings."""

    frames: np.ndarray
    first_frame: PIL.Image.Image
    params: GenerationParams
    timings: dict[str, float] = field(default_factory=dict)


def fit_image(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """RGB, centre-cropped to the target aspect ratio and resized: the first frame as the video will show it."""
    return PIL.ImageOps.fit(image.convert("RGB"), (width, height), PIL.Image.Resampling.LANCZOS)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Frames `[T, 3, H, W]` in [-1, 1] -> uint8 `[T, H, W, 3]`."""
    return ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class LongVideoPipeline(StableVideoDiffusionPipeline):
    """SVD image-to-video for long videos: ExVideo (extended UNet) or a training-free baseline (base UNet)."""

    speed: SpeedOptions = SpeedOptions()

    def set_speed(self, options: SpeedOptions) -> None:
        """Switch how the UNet and the VAE decoder compute (exvideo.speed); the videos stay the same within bf16
        rounding."""
        apply_speed(self.unet, options)
        apply_decoder_speed(self.vae, options)
        self.speed = options

    def check_method(self, params: GenerationParams) -> None:
        """Refuse a method the loaded UNet cannot run, saying how to load one that can."""
        table = extended_num_frames(self.unet)
        if params.method == "exvideo":
            if table is None:
                raise ValueError("method 'exvideo' needs an ExVideo-extended UNet: load the pipeline with "
                                 "load_pipeline(model, adapter=..., method='exvideo')")
            if params.num_frames > table:
                raise ValueError(f"num_frames {params.num_frames} exceeds the UNet's {table}-frame position table; "
                                 f"ask for at most {table} frames or use an adapter trained for more")
        elif table is not None:
            raise ValueError(f"method {params.method!r} is a training-free baseline of the base model, but this UNet "
                             f"is ExVideo-extended; load the pipeline with method={params.method!r} and no adapter")

    def encode_condition(self, image: PIL.Image.Image, params: GenerationParams, generator: torch.Generator,
                         ) -> Conditioning:
        """CLIP embedding, noise-augmented VAE latent and added time ids of the first frame (diffusers' helpers)."""
        device = self._execution_device
        embeddings = self._encode_image(image, device, 1, params.guided)
        pixels = self.video_processor.preprocess(image, height=image.height, width=image.width).to(device)
        pixels = pixels + params.noise_aug_strength * video_noise(pixels.shape, generator, device, pixels.dtype)
        image_latents = self._encode_vae_image(pixels, device, 1, params.guided).to(self.unet.dtype)
        # SVD was micro-conditioned on fps - 1.
        time_ids = self._get_add_time_ids(params.fps - 1, params.motion_bucket_id, params.noise_aug_strength,
                                          embeddings.dtype, 1, 1, params.guided).to(device)
        return Conditioning(embeddings.to(self.unet.dtype), image_latents[:, None], time_ids.to(self.unet.dtype),
                            params.guided)

    def denoise(self, noise: torch.Tensor, cond: Conditioning, guidance: torch.Tensor, steps: int,
                window: int | None = None, stride: int | None = None, strength: float = 1.0,
                init_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Run the Euler EDM sampler over latents `[B, T, C, h, w]`; return the denoised latents.

        `window`/`stride`: denoise overlapping temporal windows separately and average their outputs at every
        step (the `windows` baseline); None denoises all frames in one call. `strength` < 1 with `init_latents`
        starts from those latents re-noised to that point of the schedule (video-to-video).
        """
        device = self._execution_device
        self.scheduler.set_timesteps(steps, device=device)
        start = steps - min(max(round(steps * strength), 1), steps)
        self.scheduler.set_begin_index(start)
        timesteps = self.scheduler.timesteps[start:]
        if init_latents is None:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = init_latents + noise * self.scheduler.sigmas[start].to(noise.dtype)
        frames = latents.shape[1]
        window = window or frames
        starts = window_starts(frames, window, stride or window)
        coverage = torch.zeros(frames, device=device)
        for first in starts:
            coverage[first:first + window] += 1
        coverage = coverage.view(1, frames, 1, 1, 1)
        for t in self.progress_bar(timesteps):
            scaled = self.scheduler.scale_model_input(latents, t)
            output = torch.zeros_like(latents)
            for first in starts:
                span = slice(first, first + window)
                output[:, span] += guided_model_output(self.unet, scaled[:, span], t, cond, guidance[span],
                                                       self.speed.batched_guidance)
            latents = self.scheduler.step(output / coverage.to(output.dtype), t, latents).prev_sample
        return latents

    def _noise(self, params: GenerationParams, frames: int, height: int, width: int, generator: torch.Generator,
               ) -> torch.Tensor:
        shape = (1, frames, self.unet.config.in_channels // 2, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if params.method == "windows":
            return shuffled_window_noise(shape, params.clip_frames, params.window_stride, generator,
                                         self._execution_device, self.unet.dtype)
        return video_noise(shape, generator, self._execution_device, self.unet.dtype)

    def _windows(self, params: GenerationParams) -> dict:
        """Window arguments of `denoise` for a method: the base model never sees more than its clip length."""
        if params.method in ("windows", "chain"):
            return {"window": params.clip_frames, "stride": params.window_stride}
        return {}

    def _decode_frame(self, latent: torch.Tensor) -> PIL.Image.Image:
        pixels = self.vae.decode(latent.to(self.vae.dtype) / self.vae.config.scaling_factor, num_frames=1).sample
        return PIL.Image.fromarray(to_uint8(pixels)[0])

    def _chain(self, image: PIL.Image.Image, params: GenerationParams, generator: torch.Generator) -> torch.Tensor:
        """Base-model clips one after another, each conditioned on the previous clip's decoded last frame."""
        clip = params.clip_frames
        ramp = guidance_ramp(params.min_guidance, params.max_guidance, clip)
        pieces, made = [], 0
        while made < params.num_frames:
            cond = self.encode_condition(image, params, generator)
            noise = self._noise(params, clip, image.height, image.width, generator)
            latents = self.denoise(noise, cond, ramp, params.steps)
            # A continuation's first frame re-creates the frame it was conditioned on: keep the earlier copy.
            fresh = latents if not pieces else latents[:, 1:]
            pieces.append(fresh[:, :params.num_frames - made])
            made += pieces[-1].shape[1]
            image = self._decode_frame(latents[0, -1:])
        return torch.cat(pieces, dim=1)

    def _first_pass(self, image: PIL.Image.Image, params: GenerationParams, generator: torch.Generator,
                    ) -> torch.Tensor:
        if params.method == "chain":
            return self._chain(image, params, generator)
        cond = self.encode_condition(image, params, generator)
        noise = self._noise(params, params.num_frames, image.height, image.width, generator)
        ramp = guidance_ramp(params.min_guidance, params.max_guidance, params.num_frames)
        return self.denoise(noise, cond, ramp, params.steps, **self._windows(params))

    def _second_pass(self, source: PIL.Image.Image, pixels: torch.Tensor, params: GenerationParams,
                     generator: torch.Generator) -> tuple[torch.Tensor, PIL.Image.Image]:
        """Upscale the decoded video, encode it and denoise it again from `strength` of the schedule."""
        second = params.second_pass
        device = self._execution_device
        upscaled = F.interpolate(pixels[0], size=(second.height, second.width), mode="bicubic",
                                 antialias=True).clamp(-1, 1)
        # SVD's encoder works frame by frame, so encoding in chunks is exact and bounds memory.
        with torch.no_grad():
            init = torch.cat([self.vae.encode(chunk.to(device, self.vae.dtype)).latent_dist.mode()
                              for chunk in upscaled.split(params.decode_window)])
        init = (init * self.vae.config.scaling_factor)[None].to(self.unet.dtype)
        image = fit_image(source, second.width, second.height)
        cond = self.encode_condition(image, params, generator)
        noise = video_noise(init.shape, generator, device, self.unet.dtype)
        ramp = guidance_ramp(params.min_guidance, params.max_guidance, params.num_frames)
        latents = self.denoise(noise, cond, ramp, params.steps, strength=second.strength, init_latents=init,
                               **self._windows(params))
        return latents, image

    def _decode(self, latents: torch.Tensor, params: GenerationParams) -> torch.Tensor:
        if params.renormalize:
            latents = renormalize_frames(latents, params.contrast)
        return decode_video(self.vae, latents, params.decode_window, params.decode_stride, params.decode_tile,
                            params.decode_tile_overlap)

    @torch.no_grad()
    def generate(self, image: PIL.Image.Image, params: GenerationParams) -> GeneratedVideo:
        """Make one video of `params.num_frames` frames at `params.height` x `params.width` from a first frame."""
        with speed_context(self.speed):
            return self._generate(image, params)

    def _generate(self, image: PIL.Image.Image, params: GenerationParams) -> GeneratedVideo:
        self.check_method(params)
        # A CPU generator draws the same numbers on every device: the same seed gives the same video anywhere.
        generator = torch.Generator().manual_seed(params.seed)
        source, image = image, fit_image(image, params.width, params.height)
        timings = {}
        clock = time.perf_counter()
        latents = self._first_pass(image, params, generator)
        timings["denoise_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        pixels = self._decode(latents, params)
        timings["decode_s"] = time.perf_counter() - clock
        first_frame = image
        if params.second_pass is not None:
            clock = time.perf_counter()
            latents, first_frame = self._second_pass(source, pixels, params, generator)
            pixels = self._decode(latents, params)
            timings["second_pass_s"] = time.perf_counter() - clock
        return GeneratedVideo(to_uint8(pixels[0]), first_frame, params, timings)
