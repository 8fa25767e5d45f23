"""The failures ledger: every source or clip that did not become a sample, with the stage and a readable reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa

# Stable codes the summary counts by; the free-text reason says the specifics (sizes, counts, decoder message).
REASON_CODES = {
    "bad_manifest_row": "the manifest row names no video",
    "duplicate": "the manifest lists the video more than once",
    "missing_file": "no file at the path",
    "read_error": "the file exists but cannot be read (permissions, network, unknown URI scheme)",
    "empty_file": "the file has zero bytes",
    "not_a_video": "the file is not a video container",
    "corrupt_stream": "a video container the decoder cannot read (truncated or damaged)",
    "too_short": "fewer frames than one clip needs",
    "too_small": "the frame is too small to upscale to the target size",
    "portrait": "the frame is taller than wide and portrait sources are not allowed",
    "variable_frame_rate": "frame intervals vary more than the tolerance",
    "decode_error": "decoding the clip's frames failed",
    "no_caption": "the model family trains on captions and the source has none (and no default prompt is set)",
    "encode_error": "the VAE or CLIP encoder failed on the clip",
}

LEDGER_SCHEMA = pa.schema([
    ("source", pa.string()), ("stage", pa.string()), ("reason_code", pa.string()), ("reason", pa.string()),
    ("clip_index", pa.int32()),
])


@dataclass(frozen=True)
class Failure:
    """One ledger row; clip_index is -1 when the whole source failed."""

    source: str
    stage: str
    reason_code: str
    reason: str
    clip_index: int = -1

    def __post_init__(self) -> None:
        if self.reason_code not in REASON_CODES:
            raise ValueError(f"unknown ledger reason code {self.reason_code!r}; known: {sorted(REASON_CODES)}")

    def identity(self) -> tuple[str, str, int]:
        """What makes two ledger rows the same failure (a rerun must not record it twice)."""
        return self.source, self.stage, self.clip_index

    def to_row(self) -> dict:
        return asdict(self)


class SourceError(Exception):
    """A source (or one of its clips) cannot become a sample; carries the ledger fields."""

    def __init__(self, stage: str, reason_code: str, reason: str):
        super().__init__(f"{stage}: {reason_code}: {reason}")
        self.stage, self.reason_code, self.reason = stage, reason_code, reason

    def failure(self, source: str, clip_index: int = -1) -> Failure:
        return Failure(source, self.stage, self.reason_code, self.reason, clip_index)
