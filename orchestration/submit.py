"""Run a workflow on an existing Ray cluster through the Ray Jobs API, streaming the job's logs back.

The cluster runs `exvideo run workflow.yaml` as the job's driver, with the spec as loaded here (config files
inlined, overrides applied, relative paths made absolute on this machine) uploaded as the job's working directory.
Its paths must therefore exist on the cluster: on a real cluster, shared storage mounted at the same path everywhere.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import yaml

from orchestration.spec import WorkflowSpec

SPEC_NAME = "workflow.yaml"
AGENT_WAIT_S = 60.0


def _submit(client, wait_s: float = AGENT_WAIT_S, **job) -> str:
    """Submit, waiting while the cluster's job agent is not up yet (a head that has just started answers the Jobs
    API before its agent accepts jobs, and says to try again)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise
            print(f"the cluster is not ready for jobs yet ({exc}); retrying", flush=True)
            time.sleep(2)


async def _stream(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit_workflow(spec: WorkflowSpec, address: str, stage_args: list[str]) -> str:
    """Submit the workflow as a Ray job at `address` (the dashboard, e.g. http://head:8265), print its logs as it
    runs, and return its final status (SUCCEEDED, FAILED or STOPPED)."""
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except ConnectionError as exc:
        raise ConnectionError(f"cannot reach a Ray Jobs API at {address} ({exc}); give the head's dashboard "
                              "address (http://HEAD:8265), and check the cluster is up (`ray status` on the head)"
                              ) from None
    with tempfile.TemporaryDirectory(prefix="exvideo-job-") as folder:
        resolved = spec.model_dump(mode="json", exclude_none=True)
        (Path(folder) / SPEC_NAME).write_text(yaml.safe_dump(resolved, sort_keys=False))
        job_id = _submit(client, entrypoint=" ".join(["exvideo", "run", SPEC_NAME, *stage_args]),
                         runtime_env={"working_dir": folder}, metadata={"exvideo.workdir": str(spec.workdir)})
    print(f"submitted job {job_id} to {address}; streaming its logs (Ctrl-C stops following, not the job)")
    asyncio.run(_stream(client, job_id))
    status = str(client.get_job_status(job_id).value)
    print(f"job {job_id}: {status}")
    return status
