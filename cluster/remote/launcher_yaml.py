"""The Ray cluster-launcher YAML (``ray up``) for AWS and Google Cloud: a CPU head, one GPU worker group.

Every node runs the same container image; ``--source`` installs torch and then shoulders in it
(``setup_commands``). Storage credentials reach every node without a secret in the file:

- ``role`` (default): AWS gives every node the instance profile ``--instance-profile``; Google Cloud the service
  account ``--service-account``. Ray Train's pyarrow filesystems find them through the instance metadata.
- ``keys``: static keys for S3 or a generic S3 endpoint. The file names the variables only; their values live
  in ``~/.shoulders/storage.env`` on the laptop (written by the command in the header), which ``ray up`` copies
  to every node, and every ``ray start`` exports them, so the job driver and every worker inherit them.
"""

from __future__ import annotations

import shlex

from cluster.remote.cloud_options import (
    RAY_VERSION,
    STORAGE_KEY_ENV,
    STORAGE_OPTIONAL_ENV,
    CloudOptions,
)

TOKEN_ON_NODE = "/home/ray/.ray/auth_token"
STORAGE_ENV_LOCAL = "~/.shoulders/storage.env"
STORAGE_ENV_ON_NODE = "/home/ray/.shoulders/storage.env"
DEFAULT_AWS_PROFILE = "ray-autoscaler-v1"
HEAD_TYPE = "head_cpu"
WORKER_TYPE = "worker_gpu"


def launcher_files(options: CloudOptions) -> dict[str, tuple[str, dict]]:
    """``{file name: (header comment, cluster-launcher document)}`` for aws or gcp; ``options`` resolved."""
    node_configs = aws_node_configs if options.provider == "aws" else gcp_node_configs
    head_config, worker_config = node_configs(options)

    file_mounts = {TOKEN_ON_NODE: "~/.ray/auth_token"}
    if options.credential_mode == "keys":
        file_mounts[STORAGE_ENV_ON_NODE] = STORAGE_ENV_LOCAL
    wheel = options.local_wheel()
    if wheel:
        file_mounts[options.node_wheel_path()] = str(wheel)

    load_env = f"set -a && . {STORAGE_ENV_ON_NODE} && set +a && " if options.credential_mode == "keys" else ""
    document = {
        "cluster_name": options.name,
        "max_workers": options.max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": provider_section(options),
        "auth": {"ssh_user": "ubuntu"},
        "docker": {
            "image": options.image_or_stock,
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": [
                "--ulimit nofile=65536:65536",
                "--env RAY_AUTH_MODE=token",
                f"--env RAY_AUTH_TOKEN_PATH={TOKEN_ON_NODE}",
                "--env RAY_USAGE_STATS_ENABLED=0",
            ],
        },
        "available_node_types": {
            HEAD_TYPE: {
                "resources": {"CPU": options.head_cpus, "GPU": 0},
                "node_config": head_config,
            },
            WORKER_TYPE: {
                "min_workers": options.min_workers,
                "max_workers": options.max_workers,
                "resources": {"CPU": options.cpus_per_worker, "GPU": options.gpus_per_worker},
                "node_config": worker_config,
            },
        },
        "head_node_type": HEAD_TYPE,
        "file_mounts": file_mounts,
        "setup_commands": options.install_commands(),
        "head_setup_commands": ["pip install --no-cache-dir google-api-python-client"] if options.provider == "gcp" else [],
        # The dashboard / Jobs API stays on the head's loopback: `ray dashboard` tunnels it over SSH.
        "head_start_ray_commands": [
            "ray stop",
            (f"ulimit -n 65536; {load_env}ray start --head --port=6379 --num-gpus=0 --dashboard-host=127.0.0.1 "
             "--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats"),
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; {load_env}ray start --address=$RAY_HEAD_IP:6379 --disable-usage-stats",
        ],
    }
    name = f"ray-cluster-{options.provider}.yaml"
    return {name: (usage_comment(options, name), document)}


def provider_section(options: CloudOptions) -> dict:
    if options.provider == "aws":
        return {"type": "aws", "region": options.region, "cache_stopped_nodes": False}
    zone = options.zone or f"{options.region}-a"
    return {"type": "gcp", "region": options.region, "availability_zone": zone, "project_id": options.project}


def aws_node_configs(options: CloudOptions) -> tuple[dict, dict]:
    """EC2 launch parameters; Ray picks the region's Deep Learning AMI (drivers and Docker) when ``ImageId`` is unset.

    ``ray up`` gives the head its own profile ``ray-autoscaler-v1`` (EC2 and S3 access) when the head names none;
    workers get no profile unless named, so with ``role`` every worker names ``--instance-profile``.
    """
    def disk() -> list[dict]:
        return [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 200, "VolumeType": "gp3"}}]

    head = {"InstanceType": options.head_type, "BlockDeviceMappings": disk()}
    worker = {"InstanceType": options.worker_type, "BlockDeviceMappings": disk()}
    if options.credential_mode == "role":
        worker["IamInstanceProfile"] = {"Name": options.instance_profile}
        if options.instance_profile != DEFAULT_AWS_PROFILE:  # it must also let the head launch workers and pass the role
            head["IamInstanceProfile"] = {"Name": options.instance_profile}
    return head, worker


def gcp_node_configs(options: CloudOptions) -> tuple[dict, dict]:
    """Compute Engine instance parameters: a Deep Learning VM image (drivers and Docker) on every node.

    ``ray up`` always runs the head as ``ray-autoscaler-sa-v1@PROJECT`` (storage.objectAdmin, compute.admin);
    workers would get the project's default account with read-only storage, so with ``role`` they name one.
    """
    def disk(family: str) -> list[dict]:
        return [{"boot": True, "autoDelete": True, "type": "PERSISTENT", "initializeParams": {
            "diskSizeGb": 200, "sourceImage": f"projects/deeplearning-platform-release/global/images/family/{family}"}}]

    head = {"machineType": options.head_type, "disks": disk("common-cpu")}
    worker = {
        "machineType": options.worker_type, "disks": disk("common-cu124"),
        "metadata": {"items": [{"key": "install-nvidia-driver", "value": "True"}]},
        "scheduling": [{"onHostMaintenance": "TERMINATE"}],  # required on GPU machines
    }
    if options.credential_mode == "role":
        account = options.service_account or f"ray-autoscaler-sa-v1@{options.project}.iam.gserviceaccount.com"
        worker["serviceAccounts"] = [{"email": account, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]
    return head, worker


def usage_comment(options: CloudOptions, name: str) -> str:
    """The header comment: how to start, use and stop this cluster, and where the credentials come from."""
    on_gcs = options.provider == "gcp" and options.credential_mode == "role"
    storage = options.storage or ("gs://YOUR-BUCKET/shoulders" if on_gcs else "s3://YOUR-BUCKET/shoulders")
    if options.credential_mode == "keys":
        names = "|".join(STORAGE_KEY_ENV + STORAGE_OPTIONAL_ENV)
        credentials = (
            "# Storage credentials: static keys. This file names them only; write their values once on this machine:\n"
            f"#   mkdir -p ~/.shoulders && (umask 077 && env | grep -E '^({names})=' > {STORAGE_ENV_LOCAL})\n"
            "# `ray up` copies that file to every node and each `ray start` exports it.\n"
        )
    elif options.provider == "aws":
        credentials = (f"# Storage credentials: the GPU workers run with the IAM instance profile {options.instance_profile!r} (the head\n"
                       "# with the one `ray up` gives it); its role must read and write the bucket. No key is written here or on the nodes.\n")
    else:
        credentials = ("# Storage credentials: the GPU workers run as the service account below (the head as ray-autoscaler-sa-v1);\n"
                       "# it must read and write the bucket. No key is written here or on the nodes.\n")
    install = (f"# Every node runs {options.image_or_stock} and pip-installs {options.torch!r}, then {options.source!r}.\n"
               if options.source else f"# Every node runs {options.image_or_stock}, which holds shoulders (cluster/deploy/Dockerfile).\n")
    submit = shlex.join(["shoulders", "submit", "JOB.yaml", "scaling.use_gpu=true", f"scaling.num_workers={options.max_workers * options.gpus_per_worker}",
                         f"run.storage_path={storage}"])
    return (
        f"# Ray cluster launcher ({options.provider}, Ray {RAY_VERSION}): a head without a GPU (the job driver runs there) and up to\n"
        f"# {options.max_workers} GPU workers with {options.gpus_per_worker} GPU(s) each.\n"
        + install + credentials +
        "# Token authentication: create the token once (`ray get-auth-token --generate`); it is copied to every node.\n"
        f"#   ray up {name}\n"
        f"#   ray dashboard {name}     # forwards the Jobs API to http://127.0.0.1:8265\n"
        f"#   RAY_ADDRESS=http://127.0.0.1:8265 {submit}\n"
        f"#   ray down {name}\n"
    )
