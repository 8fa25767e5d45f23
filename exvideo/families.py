"""Which model family a diffusers-format checkpoint directory holds, read from its model_index.json.

Torch-free on purpose: drivers (a spec's validation, a stage's set-up on the head node) ask for the family before
any model loads, and need not import diffusers to learn it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FAMILY_OF_PIPELINE = {"StableVideoDiffusionPipeline": "svd", "AnimateDiffPipeline": "animatediff"}
FAMILIES = tuple(FAMILY_OF_PIPELINE.values())


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
