"""Finding and decoding generated videos: good ones are evaluated, every bad one is reported with its reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from evaluation_videos import static_video, translating_video, write_generated

from pipelines.evaluate.videos import decode, find_videos, load_conditioning


def test_good_video_decodes_with_its_record_and_conditioning_image(tmp_path):
    frames = translating_video(1, 0, num_frames=6)
    write_generated(tmp_path, "a", frames, method="exvideo", seed=3)
    found, skipped = find_videos(tmp_path)
    assert skipped == [] and len(found) == 1
    video = found[0]
    assert (video.record.id, video.record.method, video.record.seed, video.run) == ("a", "exvideo", 3, tmp_path.name)
    decoded = decode(video)
    assert decoded.shape == (6, 64, 64, 3) and decoded.dtype == np.uint8
    # Close to the source; the gap is mostly yuv420p chroma subsampling of a fine colour texture.
    assert np.abs(decoded.astype(int) - frames).mean() < 8
    assert np.array_equal(load_conditioning(video), frames[0])


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    write_generated(tmp_path, "good", static_video(4), method="exvideo")
    write_generated(tmp_path, "no_record", static_video(4), method="exvideo")
    (tmp_path / "no_record.json").unlink()
    (tmp_path / "orphan.json").write_text(json.dumps({"id": "orphan", "method": "m", "num_frames": 4, "fps": 8,
                                                      "seed": 0}))
    write_generated(tmp_path, "bad_record", static_video(4), method="exvideo")
    (tmp_path / "bad_record.json").write_text(json.dumps({"id": "bad_record", "num_frames": 4, "fps": 8, "seed": 0}))
    found, skipped = find_videos(tmp_path)
    assert [v.record.id for v in found] == ["good"]
    reasons = {s.path.name: s.reason for s in skipped}
    assert "no record no_record.json" in reasons["no_record.mp4"]
    assert "record without a video" in reasons["orphan.json"]
    assert "invalid record" in reasons["bad_record.json"] and "method" in reasons["bad_record.json"]


def test_unreadable_video_wrong_frame_count_and_missing_image_raise_naming_the_file(tmp_path):
    write_generated(tmp_path, "broken", static_video(4), method="m")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    write_generated(tmp_path, "short", static_video(4), method="m")
    record = json.loads((tmp_path / "short.json").read_text())
    (tmp_path / "short.json").write_text(json.dumps({**record, "num_frames": 9}))
    write_generated(tmp_path, "lost_image", static_video(4), method="m")
    (tmp_path / "lost_image.png").unlink()
    videos = {v.record.id: v for v in find_videos(tmp_path)[0]}
    with pytest.raises(ValueError, match="broken.mp4 cannot be decoded"):
        decode(videos["broken"])
    with pytest.raises(ValueError, match="has 4 frames but its record says num_frames=9"):
        decode(videos["short"])
    with pytest.raises(ValueError, match="lost_image.png named by its record does not exist"):
        load_conditioning(videos["lost_image"])


def test_missing_folder_is_an_error_that_says_what_to_point_at(tmp_path):
    with pytest.raises(FileNotFoundError, match="videos_dir"):
        find_videos(tmp_path / "absent")
