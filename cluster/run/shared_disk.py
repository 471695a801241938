"""Refuse local paths that the nodes of a multi-node cluster do not all see, before any worker starts.

Ray Train writes checkpoints to ``run.storage_path`` from every worker and the driver reads them back; the export
task writes ``output.dir``/model on whichever node it runs on. On one machine, or with a shared filesystem (NFS,
a mounted bucket) at the same path on every node, local paths do; on a real cluster, whose nodes share no disk,
they scatter a run over private disks: checkpoints the driver never finds, an export on a worker's disk. So on a
cluster with more than one node each local folder the run writes is probed: the driver writes a marker file
there and a zero-CPU task on every other alive node looks for it. A node that does not see it fails the run in
seconds, in one line naming the key, the node and the fix (a URI such as ``s3://``, or a shared filesystem).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray

from engine.checkpoints import storage
from engine.config.schema import JobSpec
from engine.errors import JobError

PROBE_TIMEOUT_S = 120.0
"""How long the probe tasks may take (a busy node starts a worker process first)."""


def local_write_locations(job: JobSpec, checkpoints: str) -> dict[str, str]:
    """The job keys whose run writes go to a local folder on a cluster node, with that folder: the checkpoints
    (``checkpoints``: ``run.storage_path``, or ``output.dir`` when unset) and the export (``output.dir`` unless
    ``output.uri``)."""
    locations = {}
    if not storage.is_uri(checkpoints):
        locations["run.storage_path" if job.run.storage_path else "output.dir (the checkpoints: run.storage_path is unset)"] = checkpoints
    if job.output.export != "none" and not storage.is_uri(job.results_location):
        locations["output.dir (the export: output.uri is unset)"] = job.results_location
    return locations


FIXES = {"run.storage_path": "set run.storage_path", "output.dir (the checkpoints": "set run.storage_path",
         "output.dir (the search": "set run.storage_path", "output.dir (the export": "set output.uri"}


def search_write_locations(job: JobSpec, experiment: str) -> dict[str, str]:
    """The local folder a search writes on a cluster node: its Tune experiment and trial runs (``experiment``)."""
    if storage.is_uri(experiment):
        return {}
    return {"run.storage_path" if job.run.storage_path else "output.dir (the search: run.storage_path is unset)": experiment}


def check_shared_locations(locations: dict[str, str]) -> None:
    """On a cluster of several alive nodes, every local folder of ``locations`` (job key -> folder the run
    writes) is visible from every node."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in nodes if n["NodeID"] != here]
    if not others or not locations:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    markers = {}
    for key, folder in locations.items():
        Path(folder).mkdir(parents=True, exist_ok=True)
        markers[key] = marker = Path(folder) / f".shoulders-shared-{uuid.uuid4().hex[:12]}"
        marker.write_text("written by the job's driver")
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_visible)
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote([str(m) for m in markers.values()]) for n in others}
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    for node in others:
        for (key, folder), visible in zip(locations.items(), seen[node["NodeID"]]):
            if not visible:
                fix = next(text for prefix, text in FIXES.items() if key.startswith(prefix))
                raise JobError(
                    f"{key} '{folder}' is a folder on the driver's node only: node {node['NodeManagerAddress']} "
                    f"({node['NodeID'][:12]}) of this cluster does not see it (the nodes share no disk); {fix} to an "
                    "object-storage URI (s3://bucket/..., gs://...) or a shared filesystem mounted at the same path on every node."
                )


def _visible(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]
