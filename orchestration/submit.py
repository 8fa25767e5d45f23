"""Run a workflow on an existing Ray cluster through the Ray Jobs API, streaming the job's logs back.

The cluster runs `exvideo run workflow.yaml` as the job's driver, with the spec (config files inlined, overrides
applied, relative paths made absolute on this machine) uploaded as the job's working directory. Its paths must
therefore exist on the cluster: on a real cluster, shared storage mounted at the same path everywhere.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import yaml

from orchestration.spec import WorkflowSpec

SPEC_NAME = "workflow.yaml"


def _absolute(spec: WorkflowSpec) -> dict:
    data = spec.model_dump(mode="json", exclude_none=True)
    for name in ("workdir", "model"):
        data[name] = str(Path(data[name]).resolve())
    if "://" not in spec.corpus:
        data["corpus"] = str(Path(spec.corpus).resolve())
    return data


async def _stream(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit_workflow(spec: WorkflowSpec, address: str, stage_args: list[str]) -> str:
    """Submit the workflow as a Ray job at `address` (the dashboard, e.g. http://head:8265), print its logs as it
    runs, and return its final status (SUCCEEDED, FAILED or STOPPED)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="exvideo-job-") as folder:
        (Path(folder) / SPEC_NAME).write_text(yaml.safe_dump(_absolute(spec), sort_keys=False))
        job_id = client.submit_job(entrypoint=" ".join(["exvideo", "run", SPEC_NAME, *stage_args]),
                                   runtime_env={"working_dir": folder}, metadata={"exvideo.workdir": str(spec.workdir)})
    print(f"submitted job {job_id} to {address}; streaming its logs (Ctrl-C stops following, not the job)")
    asyncio.run(_stream(client, job_id))
    status = str(client.get_job_status(job_id).value)
    print(f"job {job_id}: {status}")
    return status
