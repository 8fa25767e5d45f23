"""The AnimateDiff family through the workflow: the spec's cross-checks and the family's demo, end to end on a tiny
random AnimateDiff of the real diffusers classes, a real local Ray and a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_the_spec_refuses_what_an_animatediff_model_cannot_do_before_any_stage(tiny_animatediff_dir, tmp_path):
    from exvideo.config import ConfigError
    from orchestration.demo import FAMILY_DEMOS
    from orchestration.spec import load_spec

    spec = FAMILY_DEMOS["animatediff"][0]
    paths = [f"workdir={tmp_path / 'work'}", f"model={tiny_animatediff_dir}", f"corpus={tmp_path / 'none.json'}"]
    with pytest.raises(ConfigError, match=r"method 'chain' is a SVD \(image-to-video\) method.*"
                                          r"train.cond_dropout 0.2 drops SVD's image conditioning"):
        load_spec(spec, [*paths, "generate.params.method=chain", "train.cond_dropout=0.2"])
    with pytest.raises(ConfigError, match="declares model family 'svd' but .* holds a AnimateDiffPipeline"):
        load_spec(spec, [*paths, "family=svd"])
    assert load_spec(spec, paths).model_family == "animatediff"
    assert not (tmp_path / "work").exists()


def test_the_animatediff_demo_runs_end_to_end(ray_local, tiny_animatediff_dir, tmp_path):
    import contextlib
    import io
    import re
    import shutil

    from orchestration.cli import main

    workdir = tmp_path / "demo"
    shutil.copytree(tiny_animatediff_dir, workdir / "tiny-animatediff")
    shrink = ["preprocess.num_frames=8", "train.num_frames=32", "train.max_steps=2", "generate.params.num_frames=32",
              "generate.params.steps=2"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--set", "family=animatediff", "--set", f"workdir={workdir}",
                     "--set", f"spec_overrides=[{', '.join(shrink)}]"])
    out = printed.getvalue()
    assert code == 0, out[-3000:]
    for stage in ("preprocess", "train", "generate", "evaluate"):
        assert re.search(rf"^  {stage} +ran ", out, re.M), out[-2000:]
    videos = Path(re.search(r"^  videos +(\S+)$", out, re.M).group(1))
    records = [json.loads(path.read_text()) for path in sorted(videos.glob("*.json"))]
    assert [r["id"] for r in records] == ["video0", "video1"]
    captions = {e["cap"] for e in json.loads((workdir / "corpus" / "metadata.json").read_text())}
    for record in records:
        assert record["frames"] == 32 and (record["height"], record["width"]) == (64, 64)
        assert record["method"] == "exvideo" and record["source"]["prompt"] in captions | {"a moving shape"}
        assert record["adapter"] is not None
    assert Path(re.search(r"^  report +(\S+)$", out, re.M).group(1)).is_file()
