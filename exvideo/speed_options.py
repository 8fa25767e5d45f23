"""What the speed switches are, apart from how they act (exvideo.speed): the options, and the rules that decide
whether blocks compile and which switches training refuses.

No torch here: the stage configs hold a `SpeedOptions`, and a process that only reads a config (the CLI, Ray Train's
controller, which unpickles the training config) should not pay for importing torch and diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ConvLayout = Literal["channels_last", "channels_first"]
Attention = Literal["auto", "flash", "cudnn", "efficient", "math"]
Checkpointing = Literal["full", "selective", "lean"]
CompileMode = Literal["default", "max-autotune-no-cudagraphs"]
CompileScope = Literal["blocks", "steps"]

@dataclass(frozen=True)
class SpeedOptions:
    """Speed switches. Generation reads all but checkpointing; training all but batched_guidance, compile_decoder,
    decoder_channels_last and unet_channels_last (which it refuses).

    The defaults are what paid at 128 frames 512x512 (benchmarks/RESULTS.md): channels-last convolution, lean
    checkpointing, batched guidance, the one-key cross-attention shortcut and, on a GPU, compiled blocks. On an H100:
    2.19 s and 30.6 GiB per training step (the reference code: 3.34 s, 55.3 GiB), 1.14 s per guided step (the plain
    path: 1.68 s). cuDNN autotuning and a forced attention backend measured no gain (on an H200).

    conv_layout: ExVideo's 3D convolution on channels-last (NDHWC) activations, the layout the tokens already have,
        instead of permuting them to NCDHW and back around every convolution.
    attention: the scaled-dot-product-attention backend; "auto" lets PyTorch choose.
    checkpointing: what backward keeps and recomputes when gradient checkpointing is on. "full" recomputes whole
        blocks; "selective" also keeps the outputs of the expensive operations (`SAVE_MIN_FLOPS_PER_ELEMENT`):
        faster, more memory; "lean" keeps fewer block boundaries and recomputes each feed-forward in
        `FEED_FORWARD_CHUNKS` pieces once more: less memory, a little slower.
    cudnn_autotune: cuDNN times its algorithms for each new convolution shape and keeps the fastest (the first
        call of a shape pays for the timing).
    compile_blocks: torch.compile diffusers' repeated blocks (regional compilation). "gpu": when the UNet is on a
        CUDA device, unless it trains under selective checkpointing, whose policy cannot see inside compiled code
        (True is refused there). The first call of each new shape waits for the compilation (at 128 frames
        512x512: ~205 s for a training step, ~113 s for a guided step); on the CPU it would take longer than it saves.
    compile_mode: torch.compile's mode for compiled blocks. "max-autotune-no-cudagraphs" also times Triton templates
        for the matrix products and convolutions, into which inductor can then fuse the norms and activations
        around them: compilation takes far longer. Not measured yet (benchmarks/RESULTS.md), hence not the default.
    compile_static_shapes: compile every block call's shapes as constants (torch.compile's dynamic=False). By
        default dynamo makes a block class's sizes symbolic at its first recompilation, so its norm and activation
        kernels are generated for any channel count and resolution; its static weights make it recompile at every
        new width anyway (19 graphs for the 22 distinct calls of an SVD-XT guided step; static: 22, and no longer to
        compile on the CPU). Suits runs of one clip size: each new frame count or resolution compiles every block
        again. Not measured on a GPU yet, hence not the default.
    compile_scope: what each compiled graph holds. "blocks": diffusers' repeated blocks only. "steps": in every
        ExVideo transformer, the two steps each block pair runs as (exvideo.unet): the spatial one with the entry
        group norm and projection, and the temporal one with the position-embedding add, the reflect-padded 3D
        convolution and the mixer, each compiled whole around its block, so the work between blocks fuses too
        (eager it moves 131 GB per guided step at 128 frames 512x512, benchmarks/memory_traffic.py). Applies to
        generation and to lean-checkpointed training; full checkpointing runs the compiled blocks one by one.
        Not measured on a GPU yet, hence not the default.
    compile_decoder: in generation, also torch.compile the VAE decoder's repeated blocks (its spatio-temporal ResNet
        blocks), in `compile_mode` and with `compile_static_shapes`. The windowed decode of a 128-frame 512x512 video
        took 7.6-9.4 s eager on an H200, about four times its fused floor; compiled, not measured yet, hence off.
    batched_guidance: both classifier-free-guidance branches in one UNet call rather than two.
    one_key_cross_attention: SVD's cross-attentions attend to one key, so their output is the projected value for
        every query; compute it once per sequence without the query (exvideo.one_key_attention). The skipped weights
        get the plain path's exact zero gradient.
    parallel_group_norm: group norms that run eagerly without gradients (generation's UNet when not compiled, the
        transformers' entry norms outside compiled blocks, the VAE decoder) compute their statistics with
        `torch.var_mean` (exvideo.group_norm) instead of PyTorch's kernel, which gives each (sample, group) one thread
        block: in the temporal ResNet blocks that leaves most of a GPU idle (2.7 of the 8.1 s of a 128-frame video's
        eager VAE decode on an H100). Not measured with the switch yet, hence off.
    unet_channels_last: in generation, the UNet's convolution weights and hence its activations channels-last
        (NHWC frames). The transformers' tokens are the frames' NHWC memory, so entering and leaving a transformer
        needs no permuted copy and its residual add reads two tensors of one layout; cuDNN's NHWC convolution kernels
        need no conversions (58 ms of a compiled guided step on an H100, where inductor leaves symbolic-size graphs
        NCHW), and the temporal ResNet blocks see NDHWC clips. Needs `parallel_group_norm`, for the same reason as
        `decoder_channels_last`; training, whose group norms are PyTorch's, refuses it. Channels-last for the whole
        UNet in training was measured slower on an H200 (3.22 vs 2.94 s per step) for that reason. Not measured in
        generation yet, hence off.
    decoder_channels_last: in generation, the VAE decoder's convolution weights and hence its activations in
        channels-last memory (NHWC frames, NDHWC clips). Frames stored that way are, viewed as clips, already NDHWC, so
        the 2D and temporal convolutions, the residual adds and the mixers all run on one layout: in the eager decode
        on an H100, cuDNN's layout conversions took 0.92 s, copies of the temporal blocks' permuted inputs 0.37 s and
        a strided residual add 0.95 s. Needs `parallel_group_norm`, whose statistics read channels-last activations in
        place (PyTorch's CUDA group norm copies them to NCHW). Not measured yet, hence off.
    """

    conv_layout: ConvLayout = "channels_last"
    attention: Attention = "auto"
    checkpointing: Checkpointing = "lean"
    cudnn_autotune: bool = False
    compile_blocks: bool | Literal["gpu"] = "gpu"
    compile_mode: CompileMode = "default"
    compile_static_shapes: bool = False
    compile_scope: CompileScope = "blocks"
    compile_decoder: bool = False
    batched_guidance: bool = True
    one_key_cross_attention: bool = True
    parallel_group_norm: bool = False
    unet_channels_last: bool = False
    decoder_channels_last: bool = False

    def __post_init__(self) -> None:
        for name in ("unet_channels_last", "decoder_channels_last"):
            if getattr(self, name) and not self.parallel_group_norm:
                raise ValueError(f"speed.{name} needs speed.parallel_group_norm: PyTorch's CUDA group norm copies "
                                 "channels-last activations to NCHW, which would undo the layout at every norm")

    @classmethod
    def plain(cls) -> SpeedOptions:
        """Every optimisation off: the baseline the benchmarks and checks compare against."""
        return cls(conv_layout="channels_first", attention="auto", checkpointing="full", cudnn_autotune=False,
                   compile_blocks=False, compile_decoder=False, batched_guidance=False, one_key_cross_attention=False,
                   parallel_group_norm=False)


def refuse_generation_switches(options: SpeedOptions) -> None:
    """Refuse, for training, the switches that only generation can use."""
    if options.unet_channels_last:
        raise ValueError("speed.unet_channels_last is for generation: training's group norms are PyTorch's, which copy "
                         "channels-last activations to NCHW at every norm; set it false for training")


def compiles_on(options: SpeedOptions, device_type: str, selective_checkpointing: bool = False) -> bool:
    """Whether `options` compile a UNet's blocks on `device_type` ("cuda", "cpu", ...).

    `selective_checkpointing`: the UNet trains under selective checkpointing, which compiled code would escape:
    "gpu" then leaves the blocks eager, and True is refused.
    """
    if options.compile_blocks is True and selective_checkpointing:
        raise ValueError("speed.compile_blocks=true cannot be combined with speed.checkpointing=selective: its "
                         "policy cannot see inside compiled blocks; use checkpointing lean or full, or "
                         "compile_blocks false or gpu")
    if options.compile_blocks == "gpu":
        return device_type == "cuda" and not selective_checkpointing
    return options.compile_blocks
