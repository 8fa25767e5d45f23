"""The shard sample contract and the motion-bucket score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REFERENCE
from exvideo.motion import motion_bucket_id, motion_bucket_thresholds
from exvideo.samples import ClipRecord, LatentClip, SampleFormatError, collate, decode_sample, encode_sample


def clip(num_frames=5, key="abc_0000", bucket=10):
    rng = np.random.default_rng(0)
    return LatentClip(
        key=key,
        latents=rng.standard_normal((num_frames, 4, 8, 8)).astype(np.float16),
        cond_latent=rng.standard_normal((4, 8, 8)).astype(np.float16),
        image_embeds=rng.standard_normal((1, 32)).astype(np.float16),
        record=ClipRecord(source="a.mp4", fps=24.0, frame_indices=list(range(num_frames)), motion_bucket=bucket),
    )


def test_sample_round_trip_and_batch():
    original = clip()
    entries = encode_sample(original)
    assert set(entries) == {"__key__", "latents.npy", "cond_latent.npy", "image_embeds.npy", "json"}
    back = decode_sample(entries)
    assert back.key == "abc_0000" and back.record == original.record
    assert np.array_equal(back.latents, original.latents) and back.latents.dtype == np.float16
    batch = collate([back, decode_sample(encode_sample(clip(bucket=99)))])
    assert batch.latents.shape == (2, 5, 4, 8, 8) and batch.image_embeds.shape == (2, 1, 32)
    assert batch.added_time_ids.tolist() == [[23.0, 10.0, 0.0], [23.0, 99.0, 0.0]]


def test_pickled_arrays_and_bad_shapes_are_refused():
    entries = encode_sample(clip())
    import io
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SampleFormatError, match="latents.npy is not a plain .npy array"):
        decode_sample({**entries, "latents.npy": buffer.getvalue()})
    with pytest.raises(SampleFormatError, match=r"lacks \['json'\]"):
        decode_sample({k: v for k, v in entries.items() if k != "json"})
    bad = clip()
    bad.record.frame_indices = [0, 1]
    with pytest.raises(SampleFormatError, match="5 latent frames but the record lists 2"):
        encode_sample(bad)
    with pytest.raises(SampleFormatError, match="different shapes"):
        collate([clip(5), clip(6)])


def test_thresholds_match_reference_file():
    reference = [float(v) for v in (REFERENCE / "motion_bucket_thresholds.txt").read_text().split()]
    thresholds = motion_bucket_thresholds()
    assert len(thresholds) == 128 and thresholds[0] == 0 and thresholds.tolist() == reference
    assert bool((thresholds[1:] > thresholds[:-1]).all())


def test_motion_bucket_of_static_and_moving_clips():
    static = torch.zeros(8, 3, 16, 16)
    assert motion_bucket_id(static) == (0, 0.0)
    flicker = torch.ones(8, 3, 16, 16)
    flicker[::2] = -1  # std over time of alternating +-1 with Bessel correction: sqrt(8/7)
    bucket, score = motion_bucket_id(flicker)
    assert score == pytest.approx((8 / 7) ** 0.5)
    thresholds = motion_bucket_thresholds()
    assert thresholds[bucket] <= score and (bucket == 127 or thresholds[bucket + 1] > score)
    with pytest.raises(ValueError, match="at least 2 frames"):
        motion_bucket_id(torch.zeros(1, 3, 4, 4))
