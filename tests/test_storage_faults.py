"""Output storage that fails: a filesystem that fills up mid-shard, and a read-only one (real tmpfs mounts).

A full disk stops preprocessing with a StorageError naming the folder and the free space; nothing partial is left
under a final name; after space is freed the same command resumes and ends with exactly the samples of an
undisturbed run. A read-only folder is refused before any work, by every stage command; so is a folder another
command holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from exvideo.storage import LOCK, StorageError, hold_folder
from orchestration.cli import main
from orchestration.stages import STAGES
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
    ended = json.loads((output / "run.json").read_text())
    assert ended["status"] == "failed" and "StorageError: could not write shards in" in ended["error"]

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


def stage_settings(stage: str, output: Path, tmp_path: Path, corpus: Path, model: Path) -> list[str]:
    """`--set` arguments of a valid config for `stage`, writing to `output` (train: its run folder); every local
    input exists."""
    listing = tmp_path / "rows.jsonl"
    listing.write_text("")
    fields = {"preprocess": {"input": corpus, "model": model, "output": output},
              "reshard": {"input": tmp_path, "output": output},
              "train": {"svd_dir": model, "shards": tmp_path, "storage_path": output.parent, "name": output.name},
              "generate": {"input": listing, "model": model, "output": output},
              "evaluate": {"videos_dir": f"[{tmp_path}]", "output_dir": output}}[stage]
    return [f"--set={name}={value}" for name, value in fields.items()]


@pytest.mark.parametrize("stage", [stage.name for stage in STAGES])
def test_every_stage_command_refuses_a_read_only_output_at_once(stage, small_disk, tmp_path, synthetic_corpus,
                                                                 tiny_svd_dir, capsys):
    remount(small_disk, "ro")
    output = small_disk / "out"
    assert main([stage, *stage_settings(stage, output, tmp_path, synthetic_corpus, tiny_svd_dir)]) == 2
    assert capsys.readouterr().err == (f"exvideo {stage}: error: could not create files in {output}: read-only file "
                                       f"system ({output}). Make the folder writable or choose another output folder\n")


@pytest.mark.parametrize("stage", [stage.name for stage in STAGES])
def test_a_stage_command_on_a_folder_another_command_holds_is_refused(stage, tmp_path, synthetic_corpus,
                                                                      tiny_svd_dir, capsys):
    output = tmp_path / "out"
    with hold_folder(output, "exvideo preprocess"):  # as another process running on it would
        assert main([stage, *stage_settings(stage, output, tmp_path, synthetic_corpus, tiny_svd_dir)]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"exvideo {stage}: error: {output} is in use by exvideo preprocess (pid {os.getpid()} on ")
    assert said.endswith("; wait for it to end, or give this command another folder\n")
    assert [p.name for p in output.iterdir()] == [LOCK]  # nothing else made


def test_the_workflows_train_stage_refuses_a_run_folder_exvideo_train_holds(tmp_path, synthetic_corpus,
                                                                            tiny_svd_dir):
    """`exvideo train` pointed at a workflow's train folder holds its run folder, not the stage folder the runner
    holds: the runner's train stage holds the run folder too, so the two never write one run."""
    from orchestration.spec import validate_spec
    from orchestration.stages import STAGE, StageRun

    spec = validate_spec({"workdir": str(tmp_path / "work"), "corpus": str(synthetic_corpus),
                          "model": str(tiny_svd_dir)})
    folder = tmp_path / "work" / "train-key"
    with hold_folder(folder / "train", "exvideo train"):
        with pytest.raises(FileExistsError, match=rf"^{folder / 'train'} is in use by exvideo train \(pid "):
            STAGE["train"].run(StageRun(spec, folder, {"preprocess": {"shards": str(tmp_path)}}, "parent"))
    assert [p.name for p in (folder / "train").iterdir()] == [LOCK]  # nothing else made



def test_a_stage_log_on_a_full_disk_lets_the_stages_own_error_through(small_disk, capfd):
    from exvideo.console import stage_log

    folder = small_disk / "stage"
    with pytest.raises(StorageError, match="no room"), stage_log(folder, libraries=()):
        with pytest.raises(OSError):
            (small_disk / "filler").write_bytes(b"x" * 64 * 1024)  # the disk is full from here on
        # As a stage's storage_errors raises it; the log's last line cannot be written.
        raise StorageError(28, "no room")
    assert "Logging error" not in capfd.readouterr().err  # no traceback of the logging module on the console
