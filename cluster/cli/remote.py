"""Commands for Ray clusters: ``submit``, ``status``, ``logs``, ``stop``, ``list`` and ``cluster up|down|status``.

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

    cluster = sub.add_parser("cluster", help="a real multi-node Ray cluster on this machine (loopback, token auth)")
    cluster.add_argument("action", choices=["up", "down", "status"])
    cluster.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    cluster.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs of each node")
    cluster.add_argument("--head-cpus", type=int, help="logical CPUs of the head (default: --cpus-per-node)")
    cluster.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless you mean it)")
    cluster.add_argument("--auth", choices=["token", "disabled"], default="token", help="Ray token authentication")
    cluster.add_argument("--object-store-mb", type=int, default=256, help="object store size of each node")
    cluster.add_argument("--dir", help="folder for state, token and logs (default: $SHOULDERS_CLUSTER_DIR or ~/.shoulders/cluster)")


def cmd_submit(args: argparse.Namespace) -> int:
    return submit_command(args.job, args.overrides, args.address, args.run_command, args.wait, not args.no_ship_code, args.pip)


def submit_command(job: str, overrides: list[str], address: str | None, command: str = "train", wait: bool = False,
                   ship_code: bool = True, pip: bool = False) -> int:
    """Submit ``shoulders <command> job`` to the cluster and print the job id (``shoulders tune --address`` too)."""
    from cluster.remote import submit as remote

    job_id = remote.submit(job, overrides, address, command=command, ship_code=ship_code, pip=pip)
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
    from cluster.remote import local_cluster

    folder = args.dir or local_cluster.default_cluster_dir()
    if args.action == "up":
        cluster = local_cluster.start_cluster(
            workers=args.workers, cpus_per_node=args.cpus_per_node, head_cpus=args.head_cpus, host=args.host,
            auth=args.auth, folder=folder, object_store_mb=args.object_store_mb,
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


REMOTE_COMMANDS = {
    "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "list": cmd_list, "cluster": cmd_cluster,
}
