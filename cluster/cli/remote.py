"""Commands for Ray clusters: ``submit``, ``status``, ``logs``, ``stop``, ``list``, ``cluster up|down|status|config``.

Exit codes follow the job's final state: 0 succeeded, 1 failed, 3 stopped, 4 not finished yet; 2 is a bad
job or a cluster that cannot be reached or refuses the token (the message says which).
"""

from __future__ import annotations

import argparse
import sys


def add_remote_commands(sub: argparse._SubParsersAction) -> None:
    """Add the cluster subcommands to the ``shoulders`` parser."""
    address_help = "Ray Jobs API address, http://HEAD:8265 (default: $RAY_ADDRESS)"

    submit = sub.add_parser("submit", help="validate a job here, then run it on a Ray cluster (Ray Jobs API)")
    submit.add_argument("job", help="job YAML file")
    submit.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. scaling.num_workers=4")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--wait", action="store_true", help="follow the logs until the job ends; exit with its state")
    submit.add_argument("--pip", action="store_true", help="declare the Python packages in the runtime env (the cluster installs them)")
    submit.add_argument("--no-ship-code", action="store_true", help="use the shoulders installed on the cluster instead of this checkout")
    submit.add_argument("--command", dest="run_command", choices=["train", "tune"], default="train", help="what the cluster runs: a training run or a search")
    submit.add_argument("--resume", action="store_true", help="continue the job's run in run.storage_path from its latest checkpoint (or the search, with --command tune)")

    for name, text in (("status", "state of a submitted job"), ("logs", "logs of a submitted job"), ("stop", "stop a submitted job")):
        command = sub.add_parser(name, help=text)
        command.add_argument("job_id")
        command.add_argument("--address", help=address_help)
        if name == "status":
            command.add_argument("--wait", action="store_true", help="wait until the job ends")
        if name == "logs":
            command.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit with its state")
        if name == "stop":
            command.add_argument("--timeout", type=float, default=60, help="seconds to wait for the job to end")

    jobs = sub.add_parser("list", help="jobs on the cluster")
    jobs.add_argument("--address", help=address_help)

    cluster = sub.add_parser("cluster", help="a multi-node Ray cluster on this machine (up|down|status), or a cloud cluster's config files (config)")
    actions = cluster.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start a head and worker nodes on this machine (loopback, token auth)")
    up.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    up.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs of each node")
    up.add_argument("--head-cpus", type=int, help="logical CPUs of the head (default: --cpus-per-node)")
    up.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless you mean it)")
    up.add_argument("--auth", choices=["token", "disabled"], default="token", help="Ray token authentication")
    up.add_argument("--object-store-mb", type=int, default=256, help="object store size of each node")
    up.add_argument("--private-disks", action="store_true",
                    help="every node gets its own /tmp, home and working folder (Linux mount namespaces), as a real cluster's "
                         "nodes share no local disk: data, checkpoints and outputs must then live in object storage or be packed by submit")
    up.add_argument("--share", action="append", default=[], metavar="FOLDER",
                    help="with --private-disks: a folder every node still sees, read-only (e.g. a model cache); repeatable")
    for action, text in (("down", "stop exactly the processes `cluster up` started"), ("status", "alive nodes and the lines that reach them")):
        actions.add_parser(action, help=text)
    for command in (up, actions.choices["down"], actions.choices["status"]):
        command.add_argument("--dir", help="folder for state, token and logs (default: $SHOULDERS_CLUSTER_DIR or ~/.shoulders/cluster)")
    add_config_options(actions.add_parser(
        "config", help="write a cloud cluster's files: Ray cluster launcher YAML (aws, gcp) or KubeRay RayCluster + RayJob",
    ))


def add_config_options(config: argparse.ArgumentParser) -> None:
    """The options of ``shoulders cluster config`` (each names a field of ``CloudOptions``)."""
    config.add_argument("--provider", required=True, choices=["aws", "gcp", "kuberay"], help="where the cluster runs")
    config.add_argument("-o", "--out", default=".", help="folder to write the files into (default: here)")
    config.add_argument("--name", default="shoulders", help="cluster name")
    config.add_argument("--source", help="pip requirement that installs shoulders on every node: git+https://...@TAG, a wheel URL, "
                                         "or (aws, gcp) a local .whl; without it --image must hold shoulders")
    config.add_argument("--image", help="container image of every node (default: Ray's CUDA image, rayproject/ray:2.60.0-py311-gpu)")
    config.add_argument("--torch", default="torch", help="pip requirement for torch, installed before --source (default: torch)")
    config.add_argument("--head-type", help="head instance type, no GPU (aws m5.2xlarge, gcp n2-standard-8)")
    config.add_argument("--worker-type", help="GPU worker instance type (aws g5.2xlarge, gcp g2-standard-8)")
    config.add_argument("--head-cpus", type=int, help="CPUs of the head (aws, gcp 8; kuberay 4)")
    config.add_argument("--cpus-per-worker", type=int, help="CPUs of each GPU worker node or pod (default 8)")
    config.add_argument("--gpus-per-worker", type=int, help="GPUs of each worker node or pod (default 1)")
    config.add_argument("--min-workers", type=int, default=0, help="GPU workers kept up (default 0)")
    config.add_argument("--max-workers", type=int, default=4, help="GPU workers at most; the RayJob starts all of them (default 4)")
    config.add_argument("--region", help="aws us-west-2, gcp us-central1")
    config.add_argument("--zone", help="gcp availability zone (default: REGION-a)")
    config.add_argument("--project", help="gcp project id (required for gcp)")
    config.add_argument("--credentials", choices=["role", "keys"],
                        help="storage credentials: role (instance profile / service account; aws, gcp default) or keys "
                             "(AWS_* variables, by name only; kuberay default, from a Secret)")
    config.add_argument("--instance-profile", default="ray-autoscaler-v1", help="aws, role: IAM instance profile of every node")
    config.add_argument("--service-account", help="gcp, role: service account email; kuberay, role: Kubernetes service account")
    config.add_argument("--secret", default="shoulders-storage", help="kuberay, keys: the Secret holding the AWS_* keys")
    config.add_argument("--storage", help="s3://BUCKET/PREFIX or gs://...: run.storage_path of the RayJob (required for kuberay)")
    config.add_argument("--job", default="jobs/quickstart.yaml", help="kuberay: the job file the RayJob trains (a path in the head pod)")
    config.add_argument("--head-memory", default="16Gi", help="kuberay: memory of the head pod")
    config.add_argument("--worker-memory", default="32Gi", help="kuberay: memory of each GPU worker pod")

def cmd_submit(args: argparse.Namespace) -> int:
    return submit_command(args.job, args.overrides, args.address, args.run_command, args.wait, not args.no_ship_code, args.pip, args.resume)


def submit_command(job: str, overrides: list[str], address: str | None, command: str = "train", wait: bool = False,
                   ship_code: bool = True, pip: bool = False, resume: bool = False) -> int:
    """Submit ``shoulders <command> job`` to the cluster and print the job id (``shoulders tune --address`` too)."""
    from cluster.remote import submit as remote

    job_id = remote.submit(job, overrides, address, command=command, ship_code=ship_code, pip=pip, resume=resume)
    print(job_id)
    if not wait:
        return 0
    state = remote.follow_logs(remote.connect(address), job_id)
    print(f"job {job_id}: {state}", file=sys.stderr)
    return remote.exit_code(state)


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.remote import submit as remote

    client = remote.connect(args.address)
    state = remote.wait_for_final(client, args.job_id) if args.wait else remote.job_status(client, args.job_id)
    print(state)
    return remote.exit_code(state)


def cmd_logs(args: argparse.Namespace) -> int:
    from cluster.remote import submit as remote

    client = remote.connect(args.address)
    if args.follow:
        state = remote.follow_logs(client, args.job_id)
        print(f"job {args.job_id}: {state}", file=sys.stderr)
        return remote.exit_code(state)
    remote.job_status(client, args.job_id)
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from cluster.remote import submit as remote

    state = remote.stop(remote.connect(args.address), args.job_id, args.timeout)
    print(f"job {args.job_id}: {state}")
    return 0 if state in remote.FINAL_STATES else 1


def cmd_list(args: argparse.Namespace) -> int:
    from cluster.remote import submit as remote

    rows = remote.list_jobs(remote.connect(args.address))
    for row in rows:
        print(f"{row['id']:<40} {row['state']:<10} {row['name']:<20} {row['entrypoint']}")
    if not rows:
        print("no jobs", file=sys.stderr)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    if args.action == "config":
        return cluster_config(args)
    from cluster.remote import local_cluster

    folder = args.dir or local_cluster.default_cluster_dir()
    if args.action == "up":
        cluster = local_cluster.start_cluster(
            workers=args.workers, cpus_per_node=args.cpus_per_node, head_cpus=args.head_cpus, host=args.host,
            auth=args.auth, folder=folder, object_store_mb=args.object_store_mb, private_disks=args.private_disks,
            share=args.share,
        )
        print(f"Ray cluster up: head + {args.workers} worker node(s), logs in {cluster.dir}", file=sys.stderr)
        for key, value in cluster.env().items():
            print(f"{key}={value}")
        return 0
    if args.action == "down":
        stopped = local_cluster.stop_cluster(folder)
        print(f"Ray cluster in {folder} stopped ({stopped} processes)", file=sys.stderr)
        return 0
    cluster = local_cluster.LocalCluster.load(folder)
    for node in local_cluster.alive_nodes(cluster):
        role = "head" if node["is_head_node"] else "worker"
        print(f"{node['node_id']}  {role:<6} CPU {node['resources_total'].get('CPU', 0):g}")
    for key, value in cluster.env().items():
        print(f"{key}={value}")
    return 0


def cluster_config(args: argparse.Namespace) -> int:
    """``shoulders cluster config``: write the provider's files and print their paths."""
    from cluster.remote.cloud_config import write_config

    for path in write_config(config_options(args), args.out):
        print(path)
    return 0


def config_options(args: argparse.Namespace):
    """The ``CloudOptions`` that ``shoulders cluster config``'s arguments describe."""
    from dataclasses import fields

    from cluster.remote.cloud_config import CloudOptions

    return CloudOptions(**{item.name: getattr(args, item.name) for item in fields(CloudOptions)})


REMOTE_COMMANDS = {
    "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "list": cmd_list, "cluster": cmd_cluster,
}
