"""Long text-to-video for the AnimateDiff family: ExVideo and two training-free baselines from the same base.

`TextToVideoPipeline` subclasses diffusers' `AnimateDiffPipeline` and keeps all of what it does: prompt encoding,
classifier-free guidance, initial latents, the scheduler loop and the VAE decode in chunks. Methods differ only in
how the motion modules see a video longer than the 16 frames they were trained on:

* `exvideo`: the UNet is ExVideo-extended (exvideo.motion_unet: trainable position tables of `table_frames` rows,
  from an adapter or the identity initialisation) and denoises all frames in one pass.
* `naive`: the unchanged base motion modules, run at the full length in one pass. Their frame sinusoid has
  `motion_max_seq_length` rows (32 in the released adapters), too few for a long video, so for the call every
  motion block's `SinusoidalPositionalEmbedding` gets more rows of the same formula: rows below 32 stay the
  base's own, later frames sit at positions the motion modules never saw. This is "ask the base for more frames",
  the baseline that shows what extrapolating the positions does.
* `freenoise`: diffusers' own FreeNoise (`enable_free_noise`): the motion modules attend within windows of the
  base's 16 training frames, `freenoise_stride` frames apart, and average them; every frame after the first
  window starts from the noise of a frame one window earlier (shuffled within groups of `freenoise_stride`).

Both baselines leave the base UNet as it was once the call returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import PIL.Image
import torch
from diffusers import AnimateDiffPipeline, UNetMotionModel
from diffusers.models.embeddings import SinusoidalPositionalEmbedding

from exvideo.motion_unet import MOTION_BASE_FRAMES, motion_modules
from pipelines.generate.defaults import ANIMATEDIFF, SamplingDefaults
from pipelines.generate.params import GenerationParams, check_family
from pipelines.generate.pipeline import GeneratedVideo, to_uint8, unet_table_for


@contextmanager
def longer_sinusoids(unet: UNetMotionModel, num_frames: int) -> Iterator[None]:
    """For the duration, every motion block's frame sinusoid has at least `num_frames` rows (the `naive` method).

    The added rows continue diffusers' formula; the existing rows are kept as loaded, so any clip the base could
    already take computes exactly as before. The original embeddings are put back on exit.
    """
    replaced = {}
    for module in motion_modules(unet).values():
        for block in module.transformer_blocks:
            pe = block.pos_embed.pe
            if pe.shape[1] >= num_frames:
                continue
            longer = SinusoidalPositionalEmbedding(pe.shape[2], max_seq_length=num_frames).to(pe.device, pe.dtype)
            longer.pe[:, : pe.shape[1]] = pe
            replaced[block] = block.pos_embed
            block.pos_embed = longer
    try:
        yield
    finally:
        for block, original in replaced.items():
            block.pos_embed = original


class TextToVideoPipeline(AnimateDiffPipeline):
    """AnimateDiff text-to-video for long videos: ExVideo (extended UNet) or a training-free baseline (base UNet)."""

    sampling_defaults: SamplingDefaults = ANIMATEDIFF

    def check_method(self, params: GenerationParams) -> None:
        """Refuse a method the loaded UNet cannot run, or settings it cannot run with, saying what to do."""
        check_family(params, "animatediff")
        table = unet_table_for(params.method, self.unet)
        if table is not None and params.num_frames > table:
            raise ValueError(f"num_frames {params.num_frames} exceeds the UNet's {table}-frame position table; ask "
                             f"for at most {table} frames or load an adapter trained for more")
        if params.method == "freenoise" and params.freenoise_stride >= MOTION_BASE_FRAMES:
            raise ValueError(f"freenoise_stride {params.freenoise_stride} must be below FreeNoise's "
                             f"{MOTION_BASE_FRAMES}-frame windows so that neighbouring windows overlap")

    @contextmanager
    def motion_for(self, params: GenerationParams) -> Iterator[None]:
        """The motion modules set up for `params.method` for the duration (see the module docstring)."""
        if params.method == "naive":
            with longer_sinusoids(self.unet, params.num_frames):
                yield
        elif params.method == "freenoise":
            self.enable_free_noise(context_length=MOTION_BASE_FRAMES, context_stride=params.freenoise_stride)
            try:
                yield
            finally:
                self.disable_free_noise()
        else:
            yield

    @torch.no_grad()
    def generate(self, prompt: str, params: GenerationParams) -> GeneratedVideo:
        """Make one video of `params.num_frames` frames at `params.height` x `params.width` from a prompt."""
        # 1. Check the method against the loaded UNet; fill unset fields from the sampling defaults.
        self.check_method(params)
        params, defaults = self.sampling_defaults.apply(params)

        # 2. Denoise with diffusers' own loop, the motion modules set up for the method. A CPU generator draws the
        #    same numbers on every device: the same seed gives the same video anywhere.
        generator = torch.Generator().manual_seed(params.seed)
        clock = time.perf_counter()
        with self.motion_for(params):
            latents = self(prompt=prompt, negative_prompt=params.negative_prompt, num_frames=params.num_frames,
                           height=params.height, width=params.width, num_inference_steps=params.steps,
                           guidance_scale=params.guidance_scale, generator=generator, output_type="latent").frames
        timings = {"denoise_s": time.perf_counter() - clock}

        # 3. Decode a few frames at a time, so that a long video's decode fits in memory.
        clock = time.perf_counter()
        video = self.decode_latents(latents, decode_chunk_size=params.decode_chunk_size)  # [1, 3, T, H, W]
        frames = to_uint8(video[0].transpose(0, 1))
        timings["decode_s"] = time.perf_counter() - clock
        return GeneratedVideo(frames, PIL.Image.fromarray(frames[0]), params, timings, defaults)
