"""Which model family a diffusers-format checkpoint directory holds, read from its model_index.json.

Torch-free on purpose: drivers (a spec's validation, a stage's set-up on the head node) ask for the family before
any model loads, and need not import diffusers to learn it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from exvideo.digests import folder_sha256
from exvideo.storage import require_dir

FAMILY_OF_PIPELINE = {"StableVideoDiffusionPipeline": "svd", "AnimateDiffPipeline": "animatediff"}
FAMILIES = tuple(FAMILY_OF_PIPELINE.values())
# The checkpoint folders that turn a family's clips into training samples (preprocessing reads only these).
ENCODER_COMPONENTS = {"svd": ("vae", "image_encoder", "feature_extractor"),
                      "animatediff": ("vae", "text_encoder", "tokenizer")}


def model_family(path: str | os.PathLike, declared: str | None = None) -> str:
    """"svd" or "animatediff": the family of the diffusers checkpoint at `path`, from its model_index.json.

    `declared` (a spec's override) stands for a directory without model_index.json, and must agree with one
    that has it.
    """
    if declared is not None and declared not in FAMILIES:
        raise ValueError(f"model family {declared!r} is not one of {list(FAMILIES)}")
    index = Path(path) / "model_index.json"
    if not index.is_file():
        if declared is not None:
            return declared
        raise FileNotFoundError(f"{path} has no model_index.json; point to a diffusers-format checkpoint directory "
                                "or declare its family (svd or animatediff)")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in FAMILY_OF_PIPELINE:
        raise ValueError(f"{path} holds a {name}; exvideo serves {sorted(FAMILY_OF_PIPELINE)} checkpoints")
    detected = FAMILY_OF_PIPELINE[name]
    if declared is not None and declared != detected:
        raise ValueError(f"the spec declares model family {declared!r} but {path} holds a {name} ({detected!r}); "
                         "drop the declaration or point to the right checkpoint")
    return detected


def checkpoint_family(path: str | os.PathLike, declared: str | None = None) -> str:
    """`model_family`, where a directory without model_index.json (and no declaration) is SVD's: what the SVD
    stages always read, a bare `unet/` folder among them."""
    if declared is None and not (Path(path) / "model_index.json").is_file():
        return "svd"
    return model_family(path, declared)


def encoder_fingerprint(model: str | os.PathLike, family: str = "svd") -> str:
    """Hash of the family's encoder components' files (weights and configs): which encoder made a shard set.

    Read once per file (`exvideo.digests`): a rerun, or the next run on the same checkpoint, reads no weights.
    """
    model, components = Path(model), ENCODER_COMPONENTS[family]
    require_dir(model, f"{family} checkpoint")
    missing = [c for c in components if not (model / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{family} checkpoint {model} lacks {missing}; preprocessing needs {components} "
                                f"(write a tiny one with `exvideo make-tiny-model DIR --family {family}`)")
    digest = hashlib.sha256()
    for component in components:
        digest.update(f"{component}\0{folder_sha256(model / component)}\n".encode())
    return digest.hexdigest()[:16]
