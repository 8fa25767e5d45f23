"""The batch generation job on Ray Data: rows in, one mp4 + first-frame PNG + JSON record per good row out.

The model's family (`family`, else its model_index.json) decides what a row starts from: an SVD model makes each
video from an image (a prompt row's image comes from the text-to-image pipeline first); an AnimateDiff model makes
it from the prompt.

One actor per GPU holds the model (one actor on the CPU when there is no GPU). Every output is written under a
temporary name and renamed, the JSON record last, so a record on disk means the row is done and a rerun skips it.
The record keeps what decided the video (`row_identity`): a rerun whose model, adapter, settings or row differ
from a finished row's is refused, naming the rows and fields, rather than mixing videos of two configurations.
A row that cannot be made (bad id or parameter, missing or unreadable image, a failure while generating) goes to
`failures.jsonl` with its reason and the job goes on.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import PIL.Image
import ray
import torch
from tqdm import tqdm

from exvideo import checkpoint_family
from exvideo.digests import cached_sha256, file_sha256, folder_sha256
from exvideo.outputs import OutputMismatchError, changed_fields
from exvideo.speed_options import compiles_on
from exvideo.storage import check_writable, require_dir
from exvideo.ray_setup import add_count, ensure_ray, format_per_node, node_id
from pipelines.generate.config import GenerateJobConfig
from pipelines.generate.frames import open_image
from pipelines.generate.loading import load_pipeline, resolve_device, resolve_dtype
from pipelines.generate.params import GenerationParams, check_family
from pipelines.generate.rows import Request, check_row, read_rows
from pipelines.generate.text_to_image import first_frame_from_text, load_text_to_image
from pipelines.generate.video_io import discard_temporary, write_json, write_mp4, write_png, write_text

VIDEOS = "videos"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"


def record_path(output: Path, row_id: str, suffix: str = ".json") -> Path:
    return output / VIDEOS / f"{row_id}{suffix}"


def frames_sha256(frames: np.ndarray) -> str:
    """Hex sha256 of uint8 frames `[T, H, W, 3]` in C order, before encoding: equal hashes mean bitwise equal videos."""
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


class VideoMaker:
    """Ray Data actor: loads the model once, then turns checked rows into files on disk."""

    def __init__(self, config_json: str, device: str):
        self.cfg = GenerateJobConfig.model_validate_json(config_json)
        cfg = self.cfg
        self.family = checkpoint_family(cfg.model, cfg.family)
        self.device = resolve_device(device)
        self.pipeline = load_pipeline(cfg.model, cfg.adapter, cfg.params.method, cfg.table_frames,
                                      str(self.device), cfg.dtype, cfg.speed, self.family)
        self.pipeline.set_progress_bar_config(disable=True)
        self._text_to_image = None
        self.node = node_id()

    def text_to_image(self):
        if self._text_to_image is None:
            self._text_to_image = load_text_to_image(self.cfg.text_to_image, self.device,
                                                     resolve_dtype(self.cfg.dtype, self.device))
        return self._text_to_image

    def first_frame(self, request: Request) -> tuple[PIL.Image.Image, dict]:
        """An SVD row's first frame and its `source` record: the row's image, or one made from its prompt."""
        if request.image is not None:
            return open_image(request.image), {"image": request.image}
        params = request.params
        image = first_frame_from_text(self.text_to_image(), request.prompt, params.width, params.height,
                                      self.cfg.text_to_image_steps, params.seed)
        return image, {"prompt": request.prompt, "text_to_image": str(self.cfg.text_to_image)}

    def make(self, request: Request, identity: dict) -> dict:
        """Generate one row's video and write its mp4, PNG and (last) JSON record, which keeps the row's `identity`
        (`row_identity`); return the record."""
        params = request.params
        start = time.perf_counter()
        if self.family == "animatediff":
            source, timings = {"prompt": request.prompt}, {}
            video = self.pipeline.generate(request.prompt, params)
        else:
            image, source = self.first_frame(request)
            timings = {"first_frame_s": time.perf_counter() - start}
            video = self.pipeline.generate(image, params)
        params = video.params  # with the adapter's sampling defaults filled in
        timings.update(video.timings)
        clock = time.perf_counter()
        output = self.cfg.output
        write_mp4(record_path(output, request.id, ".mp4"), video.frames, params.fps)
        write_png(record_path(output, request.id, ".png"), video.first_frame)
        timings["write_s"] = time.perf_counter() - clock
        timings["total_s"] = time.perf_counter() - start
        frames, height, width, _ = video.frames.shape
        record = {
            "id": request.id, "source": source, "method": params.method, "seed": params.seed,
            "params": params.model_dump(mode="json"), "sampling_defaults": video.defaults,
            "frames": frames, "width": width, "height": height,
            "fps": params.fps, "model": str(self.cfg.model),
            # Hashed once, on the driver, into the row's identity.
            "adapter": ({"path": str(self.cfg.adapter), "sha256": identity["adapter_sha256"]} if self.cfg.adapter
                        else None),
            "frames_sha256": frames_sha256(video.frames),
            "outputs": {"video": f"{request.id}.mp4", "first_frame": f"{request.id}.png"},
            "timings": {k: round(v, 4) for k, v in timings.items()},
            # On the CPU the frames' bits depend on torch's thread count too (reductions split by thread).
            "device": str(self.device), "torch_threads": torch.get_num_threads(), "host": platform.node(),
            "node": self.node,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "identity": identity,
        }
        write_json(record_path(output, request.id), record)
        return record

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        results = {"id": [], "reason": [], "node": []}
        for row_id, request_json, identity in zip(batch["id"], batch["request"], batch["identity"]):
            data = json.loads(request_json)
            request = Request(**{**data, "params": GenerationParams.model_validate(data["params"])})
            try:
                self.make(request, json.loads(identity))
                reason = ""
            # The job boundary: whatever one row raises is that row's recorded failure, never the job's.
            except Exception as exc:  # noqa: BLE001
                reason = f"{type(exc).__name__}: {exc}"
            results["id"].append(str(row_id))
            results["reason"].append(reason)
            results["node"].append(self.node)
        return results


def job_identity(cfg: GenerateJobConfig, family: str) -> dict:
    """What decides every row's video besides the row itself: the model's and the adapter's bytes and the job's
    settings (the listing, the output folder and the rows' parameters are per row)."""
    return {**cfg.output_fields(exclude={"input", "output", "params", "adapter"}), "family": family,
            "model_sha256": folder_sha256(cfg.model),
            "adapter_sha256": file_sha256(cfg.adapter) if cfg.adapter else None}


def _images(request: Request) -> list[str]:
    """The images a row reads: its first frame and its keyframes."""
    return [image for image in (request.image, *request.params.frames.values()) if image]


def row_identity(request: Request, job: dict, image_digests: dict[Path, str]) -> dict:
    """What decides one row's video: the job's identity, the row's image or prompt, its parameters, and the bytes of
    each image it reads (`image_digests`): an image replaced under the same path makes another video. (An image
    that is not there has no digest; making the row says so.)"""
    params = request.params.model_dump(mode="json")
    return {**job, "image": request.image, "prompt": request.prompt, **{f"params.{k}": v for k, v in params.items()},
            "images_sha256": [image_digests.get(Path(image)) for image in _images(request)]}


def _triage(cfg: GenerateJobConfig, family: str) -> tuple[list[tuple[Request, dict]], list[str], list[dict]]:
    """Split the listing into rows to make (with their identity), rows already done (ids) and failures (id,
    stage, reason). A finished row made with another identity is refused: videos of two configurations never mix
    in one folder."""
    rows = read_rows(cfg.input)
    job = job_identity(cfg, family)
    checked, pending, done, failures, seen, changed = [], [], [], [], set(), []
    for number, row in enumerate(rows, start=1):
        request = check_row(row, number, cfg.input.parent, cfg.params, cfg.text_to_image is not None, family)
        if request.reason is None and request.id in seen:
            request.reason = f"row {number}: duplicate id {request.id!r} (ids name the output files)"
        if request.reason is not None:
            failures.append({"id": request.id, "stage": "check", "reason": request.reason})
            continue
        seen.add(request.id)
        checked.append(request)
    # All at once, through the digest cache: a rerun of a large listing reads only the images that changed.
    image_digests = cached_sha256(sorted({Path(i) for r in checked for i in _images(r) if Path(i).is_file()}))
    for request in checked:
        identity = row_identity(request, job, image_digests)
        record = record_path(cfg.output, request.id)
        if not record.is_file():
            pending.append((request, identity))
            continue
        difference = changed_fields(json.loads(record.read_text()).get("identity", {}), identity)
        if difference:
            changed.append(f"{request.id} ({'; '.join(difference)})")
        done.append(request.id)
    if changed:
        raise OutputMismatchError(
            f"output {cfg.output} holds videos of {len(changed)} row(s) made with another configuration: "
            f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}. Videos of different configurations "
            f"never mix: write to a new output folder, or delete those rows' files ({VIDEOS}/<id>.*) to make them "
            "again")
    return pending, done, failures


def _worker_resources(cfg: GenerateJobConfig) -> tuple[int, float]:
    gpus = int(ray.cluster_resources().get("GPU", 0)) if cfg.device != "cpu" else 0
    if cfg.device == "cuda" and not gpus:
        raise ValueError("device=cuda but the Ray cluster has no GPU; use device=auto or cpu")
    return cfg.workers or max(gpus, 1), 1.0 if gpus else 0.0


def run_generate_job(cfg: GenerateJobConfig) -> dict:
    """Run the job; write failures.jsonl and summary.json in the output folder and return the summary."""
    start = time.perf_counter()
    # Checked here so a bad path is one clear error, not a crash inside every actor.
    require_dir(cfg.model, "model")
    family = checkpoint_family(cfg.model, cfg.family)
    check_family(cfg.params, family)
    if family == "animatediff" and cfg.text_to_image is not None:
        raise ValueError(f"text_to_image makes first frames for SVD, but {cfg.model} is an AnimateDiff checkpoint, "
                         "which makes videos from prompts directly; leave text_to_image unset")
    if cfg.text_to_image is not None and not (cfg.text_to_image / "model_index.json").is_file():
        raise FileNotFoundError(f"text_to_image {cfg.text_to_image} is not a diffusers pipeline directory")
    if cfg.adapter is not None and not cfg.adapter.is_file():
        raise FileNotFoundError(f"adapter {cfg.adapter} does not exist")
    check_writable(cfg.output / VIDEOS)
    ensure_ray(cfg.ray_address)
    pending, done, failures = _triage(cfg, family)
    made, per_node = [], {}
    if pending:
        workers, gpus = _worker_resources(cfg)
        items = [{"id": r.id, "request": json.dumps({**asdict(r), "params": r.params.model_dump(mode="json")}),
                  "identity": json.dumps(identity)} for r, identity in pending]
        # The speed options are SVD's (AnimateDiff's pipeline runs as diffusers builds it).
        compiled = [name for name, on in (("the UNet's", compiles_on(cfg.speed, "cuda" if gpus else "cpu")),
                                          ("the VAE decoder's", cfg.speed.compile_decoder))
                    if on and family == "svd"]
        if compiled:
            # The workers' own logs do not reach this console, and the bar would sit still meanwhile.
            print(f"each worker compiles {' and '.join(compiled)} blocks before its first video (about 2 min for "
                  "the UNet at 128 frames on a GPU, less with a warm TORCHINDUCTOR_CACHE_DIR); "
                  "speed.compile_blocks=false and speed.compile_decoder=false skip it", flush=True)
        results = ray.data.from_items(items).map_batches(
            VideoMaker, batch_size=1,
            fn_constructor_kwargs={"config_json": cfg.model_dump_json(), "device": "cuda" if gpus else "cpu"},
            # One row at a time per worker: a video takes minutes, and rows queued behind a busy worker would leave
            # the others idle at the end of the job.
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(pending)), max_tasks_in_flight_per_actor=1),
            num_gpus=gpus, num_cpus=1)
        for result in tqdm(results.iter_rows(), total=len(pending), desc="videos", unit="video"):
            if result["reason"]:
                failures.append({"id": result["id"], "stage": "generate", "reason": result["reason"]})
            else:
                made.append(result["id"])
                add_count(per_node, result["node"], "videos")
    output = cfg.output
    output.mkdir(parents=True, exist_ok=True)
    # Every worker has finished: a temporary file still here is one a killed worker never completed.
    left = discard_temporary(output / VIDEOS)
    if left:
        print(f"removed {len(left)} unfinished file(s) of lost workers (their rows were made again): "
              f"{', '.join(left)}")
    ledger = "".join(json.dumps(failure) + "\n" for failure in failures)
    write_text(output / FAILURES, ledger)
    summary = {"made": sorted(made), "skipped_done": sorted(done), "failed": len(failures),
               "rows": len(made) + len(done) + len(failures), "seconds": round(time.perf_counter() - start, 2),
               "output": str(output), "per_node": per_node}
    write_json(output / SUMMARY, summary)
    print(f"generate: {len(made)} made, {len(done)} already done (skipped), {len(failures)} failed"
          f"{f' (reasons in {output / FAILURES})' if failures else ''}; {summary['seconds']} s; videos in "
          f"{output / VIDEOS}" + (f"\n  nodes: {format_per_node(per_node)}" if len(per_node) > 1 else ""))
    return summary
