"""Input rows of a generation job: reading JSONL/CSV/parquet with Ray Data, and checking each row before work.

A row holds `id`, either `image` (a path, relative to the input file's folder) or `prompt`, and optionally any
`GenerationParams` field, which overrides the job's value for that row. For an SVD model a prompt row needs the
job's text-to-image pipeline to make its first frame; an AnimateDiff model makes videos from prompts directly and
takes no `image` rows. Checking happens on the driver so a bad row costs no model time and every one is reported
with its reason.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import ray
from pydantic import ValidationError

from pipelines.generate.params import FAMILY_NAMES, GenerationParams, check_family

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SOURCE_KEYS = ("image", "prompt")
TEXT_COLUMNS = ("id", "image", "prompt")


def read_rows(path: Path) -> list[dict]:
    """All rows of a .jsonl/.json, .csv or .parquet listing, read with Ray Data."""
    if not path.is_file():
        raise FileNotFoundError(f"input listing {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        dataset = ray.data.read_json(str(path), lines=suffix == ".jsonl")
    elif suffix == ".csv":
        # Keep ids like 007 and paths as text; arrow would otherwise infer numbers.
        types = {name: pa.string() for name in TEXT_COLUMNS}
        dataset = ray.data.read_csv(str(path), convert_options=pyarrow.csv.ConvertOptions(column_types=types))
    elif suffix == ".parquet":
        dataset = ray.data.read_parquet(str(path))
    else:
        raise ValueError(f"input listing {path} must end in .jsonl, .json, .csv or .parquet")
    return dataset.take_all()


def _present(value) -> bool:
    """CSV and parquet give every column to every row: empty cells, nulls and NaN mean 'not given'."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return False
    return not (isinstance(value, float) and math.isnan(value))


@dataclass
class Request:
    """A checked row: what to generate, or why it cannot be."""

    id: str
    image: str | None = None
    prompt: str | None = None
    params: GenerationParams | None = None
    reason: str | None = None


def _plain(value):
    """numpy scalars from arrow -> Python values pydantic validates strictly."""
    return value.item() if hasattr(value, "item") else value


def frames_mapping(value, base_dir: Path) -> dict[str, str]:
    """A row's `frames` (an object, or its JSON text in CSV) as index -> path, relative paths under `base_dir`.

    Arrow gives every row every key any row has, so keys whose value is null are dropped.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be an object of frame index -> image path, got {value!r}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be an object of frame index -> image path, got {value!r}")
    mapping = {}
    for index, path in value.items():
        if _present(path):
            path = Path(str(path)).expanduser()
            mapping[str(index)] = str(path if path.is_absolute() else base_dir / path)
    return mapping


def check_row(row: dict, number: int, base_dir: Path, defaults: GenerationParams, has_text_to_image: bool,
              family: str = "svd") -> Request:
    """Validate one row for a model of `family`; on any problem return a Request whose `reason` names the field
    and the fix."""
    given = {key: _plain(value) for key, value in row.items() if _present(value)}
    row_id = str(given.pop("id", "")).strip()
    if not ID_PATTERN.fullmatch(row_id):
        label = row_id or f"row-{number}"
        return Request(label, reason=f"row {number}: id {row_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
                                     "(it names the output files)")
    sources = {key: str(given.pop(key)) for key in SOURCE_KEYS if key in given}
    if len(sources) != 1:
        return Request(row_id, reason=f"row {number}: give exactly one of image or prompt, got "
                                      f"{sorted(sources) or 'neither'}")
    unknown = sorted(set(given) - set(GenerationParams.model_fields))
    if unknown:
        return Request(row_id, reason=f"row {number}: unknown parameter(s) {unknown}; per-row parameters are "
                                      f"{sorted(GenerationParams.model_fields)}")
    if "frames" in given:
        try:
            given["frames"] = frames_mapping(given["frames"], base_dir)
        except ValueError as exc:
            return Request(row_id, reason=f"row {number}: frames: {exc}")
    try:
        params = GenerationParams.model_validate({**defaults.model_dump(), **given})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                             for e in exc.errors())
        return Request(row_id, reason=f"row {number}: bad parameter: {problems}")
    try:
        check_family(params, family)
    except ValueError as exc:
        return Request(row_id, reason=f"row {number}: {exc}")
    if family == "animatediff":
        if "image" in sources:
            return Request(row_id, reason=f"row {number} gives an image, but the model is "
                                          f"{FAMILY_NAMES[family]}, which starts from a prompt; give a prompt")
        return Request(row_id, prompt=sources["prompt"], params=params)
    if "prompt" in sources:
        if not has_text_to_image:
            return Request(row_id, reason=f"row {number} gives a prompt but the job has no text_to_image pipeline; "
                                          "set text_to_image=DIR (a local diffusers text-to-image pipeline)")
        return Request(row_id, prompt=sources["prompt"], params=params)
    image = Path(sources["image"]).expanduser()
    return Request(row_id, image=str(image if image.is_absolute() else base_dir / image), params=params)
