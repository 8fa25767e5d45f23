"""Output storage that fails: a filesystem that fills up mid-shard, and a read-only one (real tmpfs mounts).

A full disk stops preprocessing with a StorageError naming the folder and the free space; nothing partial is left
under a final name; after space is freed the same command resumes and ends with exactly the samples of an
undisturbed run. A read-only folder is refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from exvideo.storage import StorageError
from preprocessing.config import PreprocessConfig
from preprocessing.run import run_preprocess
from preprocessing.shards import sample_digests


@pytest.fixture
def small_disk(tmp_path):
    """A 40 KiB tmpfs mounted for the test (root only): a disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def config(output: Path, corpus: Path, model: Path) -> PreprocessConfig:
    return PreprocessConfig(input=str(corpus), output=output, model=model, num_frames=8, height=64, width=64,
                            shard_max_samples=1, encode_device="cpu", progress=False)


@pytest.mark.usefixtures("ray_local")
def test_a_full_disk_stops_cleanly_and_the_rerun_completes_with_the_same_samples(small_disk, tmp_path,
                                                                                  synthetic_corpus, tiny_svd_dir):
    expected = run_preprocess(config(tmp_path / "roomy", synthetic_corpus, tiny_svd_dir))
    undisturbed = sample_digests(tmp_path / "roomy" / "shards")
    assert len(undisturbed) == expected["counts"]["samples"] == 5
    output = small_disk / "out"
    with pytest.raises(StorageError, match=rf"could not write shards in {output}: the filesystem is full "
                                           r"\([\d,]+ bytes free; it needed about [\d,]+ bytes\)\. Free space"):
        run_preprocess(config(output, synthetic_corpus, tiny_svd_dir))
    commits = [json.loads(p.read_text()) for p in sorted((output / "commits").glob("*.json"))]
    committed = {c["shard"]: c["stats"]["sha256"] for c in commits if c["shard"]}
    assert 0 < len(committed) < 5  # it filled up part way
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (output / "shards").glob("*.tar")}
    assert shards == committed  # every tar under a final name is whole and committed; no other file
    assert not [p.name for p in output.rglob(".*")]  # the shard being written was removed

    remount(small_disk, "size=16m")
    again = run_preprocess(config(output, synthetic_corpus, tiny_svd_dir))
    assert again["status"] == "complete" and again["counts"] == expected["counts"]
    assert sample_digests(output / "shards") == undisturbed
    assert again["this_invocation"]["sources_processed"] < expected["this_invocation"]["sources_processed"]


def test_a_read_only_output_is_refused_before_any_work(small_disk, synthetic_corpus, tiny_svd_dir):
    remount(small_disk, "ro")
    with pytest.raises(StorageError, match=rf"could not create files in {small_disk / 'out'}: read-only file "
                                           r"system .*Make the folder writable or choose another output folder"):
        run_preprocess(config(small_disk / "out", synthetic_corpus, tiny_svd_dir))
