"""Check that every optimised path computes what the plain path computes, at full size on a GPU.

    python benchmarks/gpu_check.py                                 # SVD-XT shapes, random weights, 32 frames
    python benchmarks/gpu_check.py --tiny --frames 12 --size 64    # the same checks on the tiny model, CPU

Same weights and inputs for every path. Each bf16 path is compared with a float32 run of the plain path: an
optimised path passes when its error is at most 1.5x the plain bf16 path's error plus 5e-3, i.e. it adds no error
beyond bf16 rounding. Checked: the guided UNet output (batched guidance, channels-last convolution, one-key
cross-attention, parallel group-norm statistics, a channels-last UNet, each attention backend) and the training loss
and gradients (checkpointing policies, channels-last convolution, one-key cross-attention, attention); with --compile
also both paths with compiled blocks and with compiled steps (speed.compile_scope).
Prints one table, writes JSON with --json, and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

import torch

from exvideo import SpeedOptions, post_tuning_loss, prepare_for_post_tuning
from exvideo.speed import apply_speed, enable_checkpointing, speed_context
from gpu_bench import PLAIN, build_pipeline, build_unet, fake_batch
from pipelines.generate.guidance import Conditioning, guidance_ramp, guided_model_output

ABS_SLACK = 5e-3
REL_SLACK = 1.5


def selected(variants: dict, only: list[str] | None) -> dict:
    """The variants whose names contain one of `only` (all when None)."""
    return {name: v for name, v in variants.items() if not only or any(word in name for word in only)}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    if not torch.isfinite(value).all():
        return float("inf")
    return float((value - reference).norm() / reference.norm())


def unet_output(unet, options: SpeedOptions, latents, cond: Conditioning, ramp) -> torch.Tensor:
    apply_speed(unet, options)
    with torch.no_grad(), speed_context(options):
        return guided_model_output(unet, latents, torch.tensor(1.0, device=latents.device), cond, ramp,
                                   options.batched_guidance).float()


def compiled_checks(eager: SpeedOptions) -> dict[str, SpeedOptions]:
    """`eager` compiled per block, then per ExVideo transformer step; last, since compiled blocks stay compiled."""
    return {"compiled blocks": replace(eager, compile_blocks=True),
            "compiled steps": replace(eager, compile_blocks=True, compile_scope="steps")}


def check_generation(args, device, compiled: bool) -> list[dict]:
    pipeline = build_pipeline(args.tiny, args.frames, device, torch.bfloat16 if args.bf16 else None)
    unet, dtype = pipeline.unet, pipeline.unet.dtype
    generator = torch.Generator().manual_seed(1)
    latent = args.size // 8
    latents = torch.randn(1, args.frames, 4, latent, latent, generator=generator).to(device)
    cond = Conditioning(torch.randn(2, 1, unet.config.cross_attention_dim, generator=generator).to(device),
                        torch.randn(2, 1, 4, latent, latent, generator=generator).to(device),
                        torch.tensor([[29.0, 127.0, 0.02]] * 2, device=device), guided=True)
    ramp = guidance_ramp(1.0, 3.0, args.frames)
    cast = Conditioning(cond.image_embeddings.to(dtype), cond.image_latents.to(dtype), cond.added_time_ids.to(dtype),
                        True)
    unet.float()
    reference = unet_output(unet, PLAIN, latents, cond, ramp)
    unet.to(dtype)
    plain_error = relative_error(unet_output(unet, PLAIN, latents.to(dtype), cast, ramp), reference)
    variants = {
        "batched guidance": replace(PLAIN, batched_guidance=True),
        "channels-last conv": replace(PLAIN, conv_layout="channels_last"),
        "one-key cross-attention": replace(PLAIN, one_key_cross_attention=True),
        "cudnn autotune": replace(PLAIN, cudnn_autotune=True),
        "parallel group norm": replace(PLAIN, parallel_group_norm=True),
        "channels-last UNet": replace(PLAIN, parallel_group_norm=True, unet_channels_last=True),
        **{f"{name} attention": replace(PLAIN, attention=name) for name in args.attention},
        "all eager switches": replace(SpeedOptions(), compile_blocks=False,
                                      attention=args.attention[-1] if args.attention else "auto"),
    }
    if compiled:
        variants.update(compiled_checks(variants["all eager switches"]))
    rows = [{"check": "guided UNet output, plain bf16", "error": plain_error}]
    for name, options in selected(variants, args.only).items():
        try:
            error = relative_error(unet_output(unet, options, latents.to(dtype), cast, ramp), reference)
        except RuntimeError as exc:  # an attention backend may refuse these shapes on this card
            rows.append({"check": f"guided UNet output, {name}", "error": None, "skipped": str(exc)[:200]})
            continue
        rows.append({"check": f"guided UNet output, {name}", "error": error, "options": asdict(options),
                     "passed": error <= REL_SLACK * plain_error + ABS_SLACK})
    return rows


def loss_and_grads(unet, trainable, options: SpeedOptions, batch, device, autocast: bool) -> tuple[float, torch.Tensor]:
    enable_checkpointing(unet, options.checkpointing)
    apply_speed(unet, options)
    for param in trainable.values():
        param.grad = None
    with speed_context(options):
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(7))
        loss.backward()
    return float(loss), torch.cat([p.grad.flatten().float() for p in trainable.values()])


def check_training(args, device, compiled: bool) -> list[dict]:
    unet = build_unet(args.tiny, device)
    trainable = prepare_for_post_tuning(unet, args.frames, "fp32", True, device, PLAIN)
    with torch.no_grad():  # leave the identity initialisation so the new modules' gradients are not special
        generator = torch.Generator().manual_seed(3)
        for param in trainable.values():
            param.add_(1e-3 * torch.randn(param.shape, generator=generator).to(device))
    batch = fake_batch(unet, args.frames, args.size // 8, device)
    ref_loss, ref_grads = loss_and_grads(unet, trainable, PLAIN, batch, device, autocast=False)
    bf16 = device.type == "cuda" or args.bf16
    if bf16:  # the training path's precision: frozen weights bf16, trainable fp32, autocast
        frozen = [p for p in unet.parameters() if not p.requires_grad]
        for param in frozen:
            param.data = param.data.to(torch.bfloat16)
    plain_loss, plain_grads = loss_and_grads(unet, trainable, PLAIN, batch, device, bf16)
    plain_error = relative_error(plain_grads, ref_grads)
    rows = [{"check": "training gradients, plain", "error": plain_error,
             "loss_error": abs(plain_loss - ref_loss) / abs(ref_loss)}]
    variants = {
        "selective checkpointing": replace(PLAIN, checkpointing="selective"),
        "lean checkpointing": replace(PLAIN, checkpointing="lean"),
        "channels-last conv": replace(PLAIN, conv_layout="channels_last"),
        "one-key cross-attention": replace(PLAIN, one_key_cross_attention=True),
        "cudnn autotune": replace(PLAIN, cudnn_autotune=True),
        **{f"{name} attention": replace(PLAIN, attention=name) for name in args.attention},
        "all eager switches": replace(SpeedOptions(), compile_blocks=False,
                                      attention=args.attention[-1] if args.attention else "auto"),
    }
    if compiled:
        variants.update(compiled_checks(variants["all eager switches"]))
    for name, options in selected(variants, args.only).items():
        try:
            loss, grads = loss_and_grads(unet, trainable, options, batch, device, bf16)
        except RuntimeError as exc:
            rows.append({"check": f"training gradients, {name}", "error": None, "skipped": str(exc)[:200]})
            continue
        error = relative_error(grads, ref_grads)
        rows.append({"check": f"training gradients, {name}", "error": error, "options": asdict(options),
                     "loss_error": abs(loss - ref_loss) / abs(ref_loss),
                     "passed": error <= REL_SLACK * plain_error + ABS_SLACK})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (runs on the CPU)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--attention", nargs="*", default=None, help="backends to check (default: flash cudnn on "
                        "a GPU, math on the CPU)")
    parser.add_argument("--compile", action="store_true", help="also check compiled blocks (slow to compile)")
    parser.add_argument("--bf16", action="store_true", help="the bf16 paths on the CPU too (a GPU always runs them)")
    parser.add_argument("--only", nargs="*", help="check only variants whose names contain one of these words")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.attention is None:
        args.attention = ["flash", "cudnn"] if device.type == "cuda" else ["math"]
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    rows = check_training(args, device, args.compile) + check_generation(args, device, args.compile)
    print(f"\n{'tiny' if args.tiny else 'SVD-XT'} UNet, random weights, {args.frames} frames at {args.size}x{args.size}"
          f", {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; error = relative L2 error against "
          "the plain path in float32")
    print("\n| check | relative error | passed |\n|---|---|---|")
    for row in rows:
        error = "skipped: " + row["skipped"] if row.get("skipped") else f"{row['error']:.2e}"
        print(f"| {row['check']} | {error} | {row.get('passed', 'reference')} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    sys.exit(0 if all(row.get("passed", True) for row in rows) else 1)


if __name__ == "__main__":
    main()
