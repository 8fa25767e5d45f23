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

from exvideo import SpeedOptions, extended_num_frames, karras_sigmas
from exvideo.speed import apply_decoder_speed, apply_speed, speed_context
from pipelines.generate.decode import decode_video
from pipelines.generate.guidance import Conditioning, guidance_ramp, guided_model_output
from pipelines.generate.defaults import BASE_MODEL, SamplingDefaults
from pipelines.generate.frames import KnownFrames, frames_pixels
from pipelines.generate.latents import post_process_latents
from pipelines.generate.noise import shuffled_window_noise, video_noise
from pipelines.generate.params import GenerationParams, check_family
from pipelines.generate.windows import window_starts


@dataclass
class GeneratedVideo:
    """One generated video: uint8 frames `[T, H, W, 3]`, its first frame (SVD: the image it was conditioned on;
    AnimateDiff: the first frame made), the parameters it was made with (unset ones filled from the model's sampling
    defaults), timings, and which defaults applied."""

    frames: np.ndarray
    first_frame: PIL.Image.Image
    params: GenerationParams
    timings: dict[str, float] = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)


def fit_image(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """RGB, centre-cropped to the target aspect ratio and resized: the first frame as the video will show it."""
    return PIL.ImageOps.fit(image.convert("RGB"), (width, height), PIL.Image.Resampling.LANCZOS)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Frames `[T, 3, H, W]` in [-1, 1] -> uint8 `[T, H, W, 3]`."""
    return ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def unet_table_for(method: str, unet: torch.nn.Module) -> int | None:
    """The length of the UNet's ExVideo position tables (None: not extended), after refusing a UNet the method
    cannot run: exvideo needs an extended UNet, every baseline the unchanged base."""
    table = extended_num_frames(unet)
    if method == "exvideo" and table is None:
        raise ValueError("method 'exvideo' needs an ExVideo-extended UNet: load the pipeline with "
                         "load_pipeline(model, adapter=..., method='exvideo')")
    if method != "exvideo" and table is not None:
        raise ValueError(f"method {method!r} is a training-free baseline of the base model, but this UNet is "
                         f"ExVideo-extended; load the pipeline with method={method!r} and no adapter")
    return table


class LongVideoPipeline(StableVideoDiffusionPipeline):
    """SVD image-to-video for long videos: ExVideo (extended UNet) or a training-free baseline (base UNet)."""

    speed: SpeedOptions = SpeedOptions()
    sampling_defaults: SamplingDefaults = BASE_MODEL

    def set_speed(self, options: SpeedOptions) -> None:
        """Switch how the UNet and the VAE decoder compute (exvideo.speed); the videos stay the same within bf16
        rounding."""
        apply_speed(self.unet, options)
        apply_decoder_speed(self.vae, options)
        self.speed = options

    def check_method(self, params: GenerationParams) -> None:
        """Refuse a method the loaded UNet cannot run, saying how to load one that can."""
        check_family(params, "svd")
        table = unet_table_for(params.method, self.unet)
        if params.method == "exvideo":
            if params.overlap is not None and params.overlap >= table:
                raise ValueError(f"overlap {params.overlap} must be below the UNet's {table}-frame position table "
                                 "(each window of the continuation is one table long)")
            if params.num_frames > table and params.overlap is None:
                raise ValueError(f"num_frames {params.num_frames} exceeds the UNet's {table}-frame position table; "
                                 f"ask for at most {table} frames, set overlap (e.g. overlap={table // 4}) to continue "
                                 "window after window, or use an adapter trained for more")
        elif params.method == "direct" and params.overlap is not None and params.overlap >= params.clip_frames:
            raise ValueError(f"overlap {params.overlap} must be below clip_frames {params.clip_frames}, the length of "
                             "each window of the continuation")
        if self._continuation_window(params) is not None and params.second_pass is not None:
            raise ValueError("second_pass runs all frames in one UNet call, which a continued video (num_frames "
                             "above the window) exceeds; generate without second_pass")

    def encode_condition(self, image: PIL.Image.Image, params: GenerationParams, generator: torch.Generator,
                         ) -> Conditioning:
        """CLIP embedding, noise-augmented VAE latent and added time ids of the first frame (diffusers' helpers)."""
        device = self._execution_device
        embeddings = self._encode_image(image, device, 1, params.guided)
        pixels = self.video_processor.preprocess(image, height=image.height, width=image.width).to(device)
        pixels = pixels + params.noise_aug_strength * video_noise(pixels.shape, generator, device, pixels.dtype)
        image_latents = self._encode_vae_image(pixels, device, 1, params.guided).to(self.unet.dtype)
        # SVD was micro-conditioned on fps - 1. Unset: the adapter's (`generate` fills it before it gets here).
        fps = params.fps if params.fps is not None else self.sampling_defaults.fps
        time_ids = self._get_add_time_ids(fps - 1, params.motion_bucket_id, params.noise_aug_strength,
                                          embeddings.dtype, 1, 1, params.guided).to(device)
        return Conditioning(embeddings.to(self.unet.dtype), image_latents[:, None], time_ids.to(self.unet.dtype),
                            params.guided)

    def set_schedule(self, steps: int, strength: float = 1.0) -> None:
        """Noise levels for `steps` Euler steps over the last `strength` of the sampling schedule, as the reference's
        `set_timesteps(steps, denoising_strength)`: the Karras levels (rho 7, the scheduler's sigma_min..sigma_max)
        at `linspace(1 - strength, 1, steps)`, then 0. At strength 1 that is the scheduler's own schedule."""
        device = self._execution_device
        if strength == 1.0:
            self.scheduler.set_timesteps(steps, device=device)
        else:
            config = self.scheduler.config
            sigmas = karras_sigmas(steps, config.sigma_min, config.sigma_max, start=1 - strength)
            self.scheduler.set_timesteps(sigmas=[*sigmas.tolist(), 0.0], device=device)
        self.scheduler.set_begin_index(0)

    def denoise(self, noise: torch.Tensor, cond: Conditioning, guidance: torch.Tensor, window: int | None = None,
                stride: int | None = None, init_latents: torch.Tensor | None = None,
                known: KnownFrames | None = None) -> torch.Tensor:
        """Run the Euler EDM sampler over latents `[B, T, C, h, w]` through the schedule `set_schedule` set; return
        the denoised latents.

        `window`/`stride`: denoise overlapping temporal windows separately and average their outputs at every
        step (the `windows` baseline); None denoises all frames in one call. `init_latents`: start from those
        latents noised to the schedule's first level (video-to-video). `known`: frames whose latents are replaced,
        before every step, by given latents noised to that step's level (frame conditioning).
        """
        device = self._execution_device
        sigmas = self.scheduler.sigmas
        if init_latents is None:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = init_latents + noise * sigmas[0].to(noise.dtype)
        frames = latents.shape[1]
        window = window or frames
        starts = window_starts(frames, window, stride or window)
        coverage = torch.zeros(frames, device=device)
        for first in starts:
            coverage[first:first + window] += 1
        coverage = coverage.view(1, frames, 1, 1, 1)
        for index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if known is not None:
                known.impose(latents, sigmas[index].to(device))
            scaled = self.scheduler.scale_model_input(latents, t)
            output = torch.zeros_like(latents)
            for first in starts:
                span = slice(first, first + window)
                output[:, span] += guided_model_output(self.unet, scaled[:, span], t, cond, guidance[span],
                                                       self.speed.batched_guidance)
            latents = self.scheduler.step(output / coverage.to(output.dtype), t, latents).prev_sample
        return latents

    def encode_frames(self, pixels: torch.Tensor, chunk: int) -> torch.Tensor:
        """VAE latents (posterior mode times the configured factor) of frames `[T, 3, H, W]` in [-1, 1], as
        `[1, T, C, h, w]` in the UNet's dtype. SVD's encoder works frame by frame, so `chunk`s are exact."""
        device = self._execution_device
        latents = torch.cat([self.vae.encode(piece.to(device, self.vae.dtype)).latent_dist.mode()
                             for piece in pixels.split(chunk)])
        return (latents * self.vae.config.scaling_factor)[None].to(self.unet.dtype)

    def _known(self, latents: dict[int, torch.Tensor], noise: torch.Tensor) -> KnownFrames | None:
        """Frame conditioning for the frames in `latents` (index within `noise` -> clean latent `[B, C, h, w]`)."""
        if not latents:
            return None
        indices = sorted(latents)
        return KnownFrames(torch.tensor(indices, device=noise.device),
                           torch.stack([latents[i] for i in indices], dim=1).to(noise.dtype), noise[:, indices])

    def _given_latents(self, pixels: dict[int, torch.Tensor], params: GenerationParams, height: int, width: int,
                       ) -> dict[int, torch.Tensor]:
        """Latents of the given frames (`frames_pixels`) at `height` x `width` (resized for a second pass)."""
        if not pixels:
            return {}
        indices = sorted(pixels)
        stack = torch.stack([pixels[i] for i in indices])
        if stack.shape[-2:] != (height, width):
            stack = F.interpolate(stack, size=(height, width), mode="bicubic", antialias=True).clamp(-1, 1)
        latents = self.encode_frames(stack, params.decode_window)
        return {index: latents[:, k] for k, index in enumerate(indices)}

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
            self.set_schedule(params.steps)
            latents = self.denoise(noise, cond, ramp)
            # A continuation's first frame re-creates the frame it was conditioned on: keep the earlier copy.
            fresh = latents if not pieces else latents[:, 1:]
            pieces.append(fresh[:, :params.num_frames - made])
            made += pieces[-1].shape[1]
            image = self._decode_frame(latents[0, -1:])
        return torch.cat(pieces, dim=1)

    def _continuation_window(self, params: GenerationParams) -> int | None:
        """The window length of a continued video (exvideo: the position table; direct: clip_frames), or None."""
        if params.overlap is None or params.method not in ("exvideo", "direct"):
            return None
        window = extended_num_frames(self.unet) if params.method == "exvideo" else params.clip_frames
        return window if params.num_frames > window else None

    def _continue(self, image: PIL.Image.Image, params: GenerationParams, generator: torch.Generator,
                  window: int, given: dict[int, torch.Tensor]) -> torch.Tensor:
        """A video longer than `window`, window after window: each window is conditioned on the frames already made
        that it overlaps (frame conditioning) and on its own first frame as the image, and cross-fades into them.

        Only one window is denoised at a time, so the UNet's memory is one window's; the whole video's latents are
        small beside it.
        """
        total = params.num_frames
        # Drawn in the order a single window draws them, so the first window is the video `window` frames make.
        cond = self.encode_condition(image, params, generator)
        noise = self._noise(params, total, image.height, image.width, generator)
        result = torch.empty_like(noise)
        ramp = guidance_ramp(params.min_guidance, params.max_guidance, window)
        made, first = 0, 0
        while made < total:
            first = min(first, total - window)  # the last window ends with the video
            span = slice(first, first + window)
            known = {i - first: result[:, i] for i in range(first, made)}
            known.update({i - first: latent for i, latent in given.items() if first <= i < first + window})
            if first > 0:
                cond = self.encode_condition(self._decode_frame(result[0, first:first + 1]), params, generator)
            self.set_schedule(params.steps)
            latents = self.denoise(noise[:, span], cond, ramp, known=self._known(known, noise[:, span]))
            shared = made - first
            if shared:
                fade = (torch.arange(1, shared + 1, device=latents.device) / (shared + 1)).view(1, -1, 1, 1, 1)
                result[:, first:made] = torch.lerp(result[:, first:made], latents[:, :shared], fade.to(latents.dtype))
            result[:, made:first + window] = latents[:, shared:]
            made, first = first + window, first + window - params.overlap
        return result

    def _first_pass(self, image: PIL.Image.Image, params: GenerationParams, generator: torch.Generator,
                    pixels: dict[int, torch.Tensor]) -> torch.Tensor:
        if params.method == "chain":
            return self._chain(image, params, generator)
        given = self._given_latents(pixels, params, image.height, image.width)
        window = self._continuation_window(params)
        if window is not None:
            return self._continue(image, params, generator, window, given)
        cond = self.encode_condition(image, params, generator)
        noise = self._noise(params, params.num_frames, image.height, image.width, generator)
        ramp = guidance_ramp(params.min_guidance, params.max_guidance, params.num_frames)
        self.set_schedule(params.steps)
        return self.denoise(noise, cond, ramp, known=self._known(given, noise), **self._windows(params))

    def _second_pass(self, source: PIL.Image.Image, pixels: torch.Tensor, given: dict[int, torch.Tensor],
                     params: GenerationParams, generator: torch.Generator) -> tuple[torch.Tensor, PIL.Image.Image]:
        """Upscale the decoded video, encode it and denoise it again over the last `strength` of the schedule."""
        second = params.second_pass
        upscaled = F.interpolate(pixels[0], size=(second.height, second.width), mode="bicubic",
                                 antialias=True).clamp(-1, 1)
        init = self.encode_frames(upscaled, params.decode_window)
        image = fit_image(source, second.width, second.height)
        cond = self.encode_condition(image, params, generator)
        noise = video_noise(init.shape, generator, self._execution_device, self.unet.dtype)
        ramp = guidance_ramp(params.min_guidance, params.max_guidance, params.num_frames)
        known = self._known(self._given_latents(given, params, second.height, second.width), noise)
        self.set_schedule(params.steps, second.strength)
        latents = self.denoise(noise, cond, ramp, init_latents=init, known=known, **self._windows(params))
        return latents, image

    def _decode(self, latents: torch.Tensor, params: GenerationParams) -> torch.Tensor:
        latents = post_process_latents(latents, params.renormalize, params.contrast)
        return decode_video(self.vae, latents, params.decode_window, params.decode_stride, params.decode_tile,
                            params.decode_tile_overlap)

    @torch.no_grad()
    def generate(self, image: PIL.Image.Image, params: GenerationParams) -> GeneratedVideo:
        """Make one video of `params.num_frames` frames at `params.height` x `params.width` from a first frame."""
        with speed_context(self.speed):
            return self._generate(image, params)

    def _generate(self, image: PIL.Image.Image, params: GenerationParams) -> GeneratedVideo:
        params, defaults = self.sampling_defaults.apply(params)
        self.check_method(params)
        given = frames_pixels(params.frames, params.width, params.height)
        # A CPU generator draws the same numbers on every device: the same seed gives the same video anywhere.
        generator = torch.Generator().manual_seed(params.seed)
        source, image = image, fit_image(image, params.width, params.height)
        timings = {}
        clock = time.perf_counter()
        latents = self._first_pass(image, params, generator, given)
        timings["denoise_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        pixels = self._decode(latents, params)
        timings["decode_s"] = time.perf_counter() - clock
        first_frame = image
        if params.second_pass is not None:
            clock = time.perf_counter()
            latents, first_frame = self._second_pass(source, pixels, given, params, generator)
            pixels = self._decode(latents, params)
            timings["second_pass_s"] = time.perf_counter() - clock
        return GeneratedVideo(to_uint8(pixels[0]), first_frame, params, timings, defaults)
