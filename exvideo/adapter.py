"""ExVideo adapters: safetensors files holding only the post-tuned tensors.

Two layouts are read:

* ours (`format=exvideo-adapter` in the metadata): diffusers parameter names, plus num_frames, format version, the
  model family (`svd` or `animatediff`; an adapter without one is SVD's) and a fingerprint of the base UNet;
* the released reference checkpoint (`ExVideo-SVD-128f-v1`): names `blocks.N.<name>` by the reference
  implementation's flat block index, mapped to diffusers modules as in docs/method.md, section 5.

`load_adapter` detects which it got, extends the UNet if needed, and refuses, naming every problem, when names,
shapes, num_frames or the base config do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from exvideo.trainable import trainable_parameters
from exvideo.unet import CONFIG_KEY, extend_unet, extended_num_frames, spatio_temporal_transformers, unet_family

FORMAT = "exvideo-adapter"
FORMAT_VERSION = "1"

# Reference flat block index of each diffusers spatio-temporal transformer (SVD / SVD-XT topology).
REFERENCE_BLOCKS = {
    7: "down_blocks.0.attentions.0", 17: "down_blocks.0.attentions.1",
    29: "down_blocks.1.attentions.0", 39: "down_blocks.1.attentions.1",
    51: "down_blocks.2.attentions.0", 61: "down_blocks.2.attentions.1",
    83: "mid_block.attentions.0",
    113: "up_blocks.1.attentions.0", 123: "up_blocks.1.attentions.1", 133: "up_blocks.1.attentions.2",
    144: "up_blocks.2.attentions.0", 154: "up_blocks.2.attentions.1", 164: "up_blocks.2.attentions.2",
    175: "up_blocks.3.attentions.0", 185: "up_blocks.3.attentions.1", 195: "up_blocks.3.attentions.2",
}

# (reference name prefix within a block, diffusers name prefix within a transformer); specific entries first.
_TB = "temporal_transformer_blocks.0."
REFERENCE_RENAMES = (
    ("positional_embedding.embeddings", "time_proj.embeddings"),
    ("positional_embedding_proj.0.", "time_pos_embed.linear_1."),
    ("positional_embedding_proj.2.", "time_pos_embed.linear_2."),
    ("norm_out.", _TB + "norm3."),
    ("act_fn_in.proj.", _TB + "ff_in.net.0.proj."),
    ("ff_in.", _TB + "ff_in.net.2."),
    ("act_fn_out.proj.", _TB + "ff.net.0.proj."),
    ("ff_out.", _TB + "ff.net.2."),
    ("attn1.to_out.", _TB + "attn1.to_out.0."),
    ("attn2.to_out.", _TB + "attn2.to_out.0."),
    ("", _TB),
)

# Config entries that decide tensor names and shapes; an adapter only fits a UNet that agrees on all of them.
ARCHITECTURE_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim", "layers_per_block",
    "cross_attention_dim", "transformer_layers_per_block", "num_attention_heads",
    # AnimateDiff's motion modules (absent from SVD configs, so SVD fingerprints are unchanged).
    "motion_max_seq_length", "motion_num_attention_heads", "temporal_transformer_layers_per_block",
    "use_motion_mid_block",
)


class AdapterMismatchError(ValueError):
    """An adapter does not fit the UNet it is loaded into; the message lists every mismatch."""


def _rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for source, target in renames:
        if name.startswith(source):
            return target + name[len(source):]
    raise KeyError(name)


def reference_to_diffusers_name(name: str) -> str:
    """`blocks.7.ff_out.weight` -> `down_blocks.0.attentions.0.temporal_transformer_blocks.0.ff.net.2.weight`."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match is None or int(match.group(1)) not in REFERENCE_BLOCKS:
        raise KeyError(f"{name!r} is not a reference ExVideo tensor name "
                       f"(blocks.N.* with N in {sorted(REFERENCE_BLOCKS)})")
    return f"{REFERENCE_BLOCKS[int(match.group(1))]}.{_rename(match.group(2), REFERENCE_RENAMES)}"


def diffusers_to_reference_name(name: str) -> str:
    """Inverse of `reference_to_diffusers_name`."""
    for index, prefix in REFERENCE_BLOCKS.items():
        if name.startswith(prefix + "."):
            inner = _rename(name[len(prefix) + 1:], tuple((d, r) for r, d in REFERENCE_RENAMES))
            return f"blocks.{index}.{inner}"
    raise KeyError(f"{name!r} is not inside a transformer the reference layout names")


def _check_reference_topology(unet: nn.Module) -> None:
    names = set(spatio_temporal_transformers(unet))
    if names != set(REFERENCE_BLOCKS.values()):
        raise AdapterMismatchError(
            "the reference checkpoint layout needs the SVD UNet topology (16 spatio-temporal transformers: "
            f"{sorted(REFERENCE_BLOCKS.values())}); this UNet has {sorted(names)}"
        )


def base_config(unet: nn.Module) -> dict:
    """The architecture part of a UNet's config, which decides whether an adapter fits it."""
    return {key: _jsonable(unet.config[key]) for key in ARCHITECTURE_KEYS if key in unet.config}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def base_fingerprint(unet: nn.Module) -> str:
    """sha256 of the base architecture and of the frozen input/output convolutions' weights.

    Hashing two small frozen tensors tells different base checkpoints apart without reading 1.5B parameters.
    """
    digest = hashlib.sha256(json.dumps(base_config(unet), sort_keys=True).encode())
    for name in ("conv_in.weight", "conv_out.weight"):
        tensor = unet.get_parameter(name)
        if tensor.device.type != "meta":
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def adapter_state_dict(unet: nn.Module, layout: str = "diffusers") -> dict[str, torch.Tensor]:
    """The trainable tensors of an extended UNet, named in `layout` ("diffusers" or "reference")."""
    state = {name: p.detach() for name, p in trainable_parameters(unet).items()}
    if layout == "diffusers":
        return state
    if layout == "reference":
        _check_reference_topology(unet)
        return {diffusers_to_reference_name(name): t for name, t in state.items()}
    raise ValueError(f"unknown adapter layout {layout!r}; use 'diffusers' or 'reference'")


def adapter_metadata(unet: nn.Module, base_model: str = "", training: dict[str, str] | None = None,
                     ) -> dict[str, str]:
    """The metadata an adapter of `unet` carries: format, num_frames, what base it fits, and `training`'s entries
    (what generation should know of how it was trained: fps_condition and fps)."""
    return {**(training or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": unet_family(unet),
        "num_frames": str(extended_num_frames(unet)),
        "base_config": json.dumps(base_config(unet), sort_keys=True),
        "base_fingerprint": base_fingerprint(unet),
        "base_model": base_model,
    }


def write_adapter(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str],
                  dtype: torch.dtype | None = None) -> Path:
    """Write adapter tensors (diffusers names) and metadata to a safetensors file, atomically."""
    path = Path(path)
    tensors = {name: t.detach().to("cpu", dtype or t.dtype).contiguous() for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def save_adapter(unet: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
                 base_model: str = "") -> Path:
    """Write the trainable tensors of `unet` with metadata to a safetensors file, atomically."""
    return write_adapter(adapter_state_dict(unet), path, adapter_metadata(unet, base_model), dtype)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a readable safetensors adapter: {exc}") from exc
    return tensors, metadata


def detect_layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """"diffusers" for our adapters, "reference" for the released ExVideo checkpoint; anything else is refused."""
    if not tensors:
        raise AdapterMismatchError("adapter holds no tensors")
    if metadata.get("format") == FORMAT:
        if metadata.get("format_version") != FORMAT_VERSION:
            raise AdapterMismatchError(
                f"adapter format version {metadata.get('format_version')}; this exvideo reads {FORMAT_VERSION}"
            )
        return "diffusers"
    if all(key.startswith("blocks.") for key in tensors):
        return "reference"
    raise AdapterMismatchError(
        f"neither an exvideo adapter (metadata format={FORMAT}) nor the reference ExVideo layout "
        f"(blocks.N.*); first keys: {sorted(tensors)[:3]}"
    )


def _table_length(tensors: dict[str, torch.Tensor], layout: str) -> int:
    suffix = "positional_embedding.embeddings" if layout == "reference" else "time_proj.embeddings"
    lengths = {t.shape[0] for key, t in tensors.items() if key.endswith(suffix)}
    if len(lengths) != 1:
        raise AdapterMismatchError(f"adapter position tables have lengths {sorted(lengths)}; expected one length")
    return lengths.pop()


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def load_adapter(unet: nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Load an adapter file (ours or the released reference checkpoint) into `unet`; return its metadata."""
    tensors, metadata = read_adapter(path)
    try:
        return apply_adapter(unet, tensors, metadata)
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"adapter {path}: {exc}") from None


def apply_adapter(unet: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  ) -> dict[str, str]:
    """Load adapter tensors (either layout) into `unet`, checking everything first; return the metadata.

    A UNet that is not extended yet is extended to the adapter's num_frames. Tensors are cast to the UNet's
    parameter dtypes; on a `meta` UNet they are assigned, so full-size layouts can be checked without allocation.
    """
    metadata = metadata or {}
    layout = detect_layout(tensors, metadata)
    family = metadata.get("family", "svd")
    if family != unet_family(unet):
        raise AdapterMismatchError(f"it is an adapter for the {family} family, but the UNet is "
                                   f"{type(unet).__name__} ({unet_family(unet)}); load it into a {family} base model")
    num_frames = int(metadata["num_frames"]) if layout == "diffusers" else _table_length(tensors, layout)
    current = extended_num_frames(unet)
    if current is None:
        extend_unet(unet, num_frames)
    elif current != num_frames:
        raise AdapterMismatchError(
            f"it holds {num_frames}-frame position tables but the UNet is extended to {current} frames "
            f"(config {CONFIG_KEY}); extend a fresh base UNet with num_frames={num_frames}"
        )

    problems = []
    if layout == "reference":
        _check_reference_topology(unet)
        renamed = {}
        for key, tensor in tensors.items():
            try:
                renamed[reference_to_diffusers_name(key)] = tensor
            except KeyError:
                problems.append(f"unknown reference tensor {key}")
        tensors = renamed
    else:
        saved_config = json.loads(metadata.get("base_config", "{}"))
        ours = base_config(unet)
        differing = [f"{k}: adapter {saved_config[k]} vs UNet {ours.get(k)}" for k in saved_config
                     if saved_config[k] != ours.get(k)]
        if differing:
            problems.append("base config differs (" + "; ".join(differing) + ")")
        elif metadata.get("base_fingerprint") and metadata["base_fingerprint"] != base_fingerprint(unet):
            warnings.warn("adapter was trained on other base weights than this UNet's "
                          "(same architecture); loading anyway", stacklevel=2)

    expected = trainable_parameters(unet)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}"
                         for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    for label, names in (("missing tensors", missing), ("unexpected tensors", extra), ("wrong shapes", wrong_shape)):
        if names:
            problems.append(f"{label}: {_listing(names)}")
    if problems:
        raise AdapterMismatchError(f"{layout} layout does not fit this UNet: " + " | ".join(problems))

    on_meta = any(p.device.type == "meta" for p in expected.values())
    cast = {k: tensors[k].to(expected[k].dtype) for k in expected}
    if on_meta:
        unet.load_state_dict(cast, strict=False, assign=True)
        for name in expected:  # assign replaces Parameters; keep their trainable flag.
            unet.get_parameter(name).requires_grad_(expected[name].requires_grad)
    else:
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(cast[name])
    return {**metadata, "layout": layout, "num_frames": str(num_frames)}
