"""KubeRay manifests (``apiVersion: ray.io/v1``): a long-lived RayCluster, and a RayJob that brings up the same
cluster, runs one training job on it and deletes it.

The head pod has no GPU (the job driver runs there); the workers form one group, each pod asking for
``nvidia.com/gpu``. Shoulders is in the image (``cluster/deploy/Dockerfile``), or each pod pip-installs torch and
``--source`` before KubeRay's own ``ray start`` (``$KUBERAY_GEN_RAY_START_CMD``). Storage credentials come from a
Kubernetes Secret by ``secretKeyRef`` (``--credentials keys``, the default) or from the pods' service account
(``--credentials role``: IRSA on EKS, Workload Identity on GKE); no value is written into a manifest. Token
authentication is on (``authOptions``: KubeRay >= 1.5.1 generates the token Secret).
"""

from __future__ import annotations

import shlex

from cluster.remote.cloud_options import (
    RAY_VERSION,
    STORAGE_KEY_ENV,
    STORAGE_OPTIONAL_ENV,
    CloudOptions,
)

GPU_RESOURCE = "nvidia.com/gpu"
OVERWRITE_COMMAND = "ray.io/overwrite-container-cmd"
IMAGE_WORKDIR = "/home/ray/shoulders"
"""Where cluster/deploy/Dockerfile puts the checkout (so ``jobs/...`` paths resolve in the image)."""


def kuberay_files(options: CloudOptions) -> dict[str, tuple[str, dict]]:
    """``{file name: (header comment, manifest)}``: ``raycluster.yaml`` and ``rayjob.yaml``; ``options`` resolved."""
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": options.name},
        "spec": cluster_spec(options, fixed_size=False),
    }
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"{options.name}-job"},
        "spec": {
            "entrypoint": entrypoint(options),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": cluster_spec(options, fixed_size=True),
        },
    }
    common = credentials_comment(options) + install_comment(options)
    return {
        "raycluster.yaml": (cluster_comment(options) + common, cluster),
        "rayjob.yaml": (job_comment(options) + common, job),
    }


def entrypoint(options: CloudOptions) -> str:
    """The RayJob's command: train ``--job`` on every GPU of the group, checkpoints in ``--storage``."""
    workers = options.max_workers * options.gpus_per_worker
    cpus = max(1, options.cpus_per_worker // options.gpus_per_worker // 2)  # the rest feeds Ray Data's preprocessing
    return shlex.join([
        "python", "-m", "cluster.cli.main", "train", options.job, "scaling.use_gpu=true", f"scaling.num_workers={workers}",
        f"scaling.cpus_per_worker={cpus}", "scaling.placement_strategy=SPREAD", f"run.storage_path={options.storage}",
    ])


def cluster_spec(options: CloudOptions, fixed_size: bool) -> dict:
    """A RayCluster spec. ``fixed_size`` (the RayJob's) starts every worker; otherwise KubeRay's autoscaler scales them."""
    head_resources = {"cpu": str(options.head_cpus), "memory": options.head_memory}
    worker_resources = {"cpu": str(options.cpus_per_worker), "memory": options.worker_memory, GPU_RESOURCE: options.gpus_per_worker}
    autoscale = not fixed_size and options.min_workers < options.max_workers
    spec = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": autoscale,
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # inside the pod network; token-protected; no Service exposes it outside the cluster
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": pod_template(options, "ray-head", head_resources, gpu=False),
        },
        "workerGroupSpecs": [{
            "groupName": "gpu",
            "replicas": options.max_workers if fixed_size else options.min_workers,
            "minReplicas": options.max_workers if fixed_size else options.min_workers,
            "maxReplicas": options.max_workers,
            "rayStartParams": {},
            "template": pod_template(options, "ray-worker", worker_resources, gpu=True),
        }],
    }
    return spec


def pod_template(options: CloudOptions, container_name: str, resources: dict, gpu: bool) -> dict:
    """The pod of a head or worker: the image, the install step, the credentials and the resources."""
    container: dict = {"name": container_name, "image": options.image_or_stock}
    metadata: dict = {}
    if options.source:
        metadata["annotations"] = {OVERWRITE_COMMAND: "true"}  # KubeRay runs our command, which ends in its ray start
        install = " && ".join(options.install_commands())
        container["command"] = ["/bin/bash", "-c", "--"]
        container["args"] = [f"{install} && {{ ulimit -n 65536; $KUBERAY_GEN_RAY_START_CMD; }}"]
    else:
        container["workingDir"] = IMAGE_WORKDIR
    container["env"] = storage_env(options)
    container["resources"] = {"requests": dict(resources), "limits": dict(resources)}
    spec: dict = {"containers": [container]}
    if options.credential_mode == "role":
        spec["serviceAccountName"] = options.service_account
    if gpu:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": metadata, "spec": spec} if metadata else {"spec": spec}


def storage_env(options: CloudOptions) -> list[dict]:
    """Environment of every pod: the storage variables by reference to the Secret (keys mode), never a value."""
    env = [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}]
    if options.credential_mode == "keys":
        for name in STORAGE_KEY_ENV + STORAGE_OPTIONAL_ENV:
            ref = {"name": options.secret, "key": name, "optional": name in STORAGE_OPTIONAL_ENV}
            env.append({"name": name, "valueFrom": {"secretKeyRef": ref}})
    return env


def credentials_comment(options: CloudOptions) -> str:
    if options.credential_mode == "role":
        return (f"# Storage credentials: the pods run as the service account {options.service_account!r}, bound to a cloud role that\n"
                "# reads and writes the bucket (IRSA on EKS, Workload Identity on GKE). No key is written here.\n")
    literals = " ".join(f'--from-literal={name}="${name}"' for name in STORAGE_KEY_ENV)
    return (
        f"# Storage credentials: from the Secret {options.secret!r} (secretKeyRef; no value is written here). Create it with\n"
        f"#   kubectl create secret generic {options.secret} {literals}\n"
        f"# adding {', '.join(STORAGE_OPTIONAL_ENV)} the same way when the storage needs them\n"
        "# (AWS_ENDPOINT_URL for a generic S3 endpoint such as MinIO or SeaweedFS).\n"
    )


def install_comment(options: CloudOptions) -> str:
    if options.source:
        return f"# Every pod runs {options.image_or_stock} and pip-installs {options.torch!r}, then {options.source!r}, before `ray start`.\n"
    return f"# Every pod runs {options.image_or_stock}, which holds shoulders (cluster/deploy/Dockerfile) in {IMAGE_WORKDIR}.\n"


def cluster_comment(options: CloudOptions) -> str:
    return (
        f"# KubeRay RayCluster (Ray {RAY_VERSION}, KubeRay >= 1.5.1): a head pod without a GPU (the job driver runs there) and\n"
        f"# {options.min_workers} to {options.max_workers} GPU worker pods with {options.gpus_per_worker} GPU(s) each; token authentication on.\n"
        "#   kubectl apply -f raycluster.yaml\n"
        f"#   kubectl port-forward svc/{options.name}-head-svc 8265\n"
        f"#   export RAY_AUTH_TOKEN=$(kubectl get secret {options.name} -o jsonpath='{{.data.auth_token}}' | base64 -d)\n"
        f"#   RAY_ADDRESS=http://127.0.0.1:8265 shoulders submit JOB.yaml scaling.use_gpu=true run.storage_path={options.storage}\n"
    )


def job_comment(options: CloudOptions) -> str:
    return (
        f"# KubeRay RayJob (Ray {RAY_VERSION}, KubeRay >= 1.5.1): starts a cluster of {options.max_workers} GPU worker pods and a head\n"
        f"# pod without a GPU, trains {options.job} (a path in the head pod) with checkpoints in {options.storage},\n"
        "# and deletes the cluster when the job ends.\n"
        "#   kubectl apply -f rayjob.yaml\n"
        f"#   kubectl get rayjob {options.name}-job -w\n"
        f"#   kubectl logs -l job-name={options.name}-job -f\n"
    )
