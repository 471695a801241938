"""A real multi-node Ray cluster on this machine, for development and tests (``shoulders cluster up|down``).

A head and N worker nodes run as separate ``ray start --block`` processes bound to loopback, each with its
own CPUs and its own Ray temp folder. With ``private_disks`` every node also has a private ``/tmp``, home and
working folder (:mod:`cluster.remote.private_disks`), so they share no local disk, as a real cluster's nodes. Token authentication stays on: ``up`` writes a fresh token to the
cluster folder and starts every node with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` pointing at it.
``down`` stops exactly the processes ``up`` started (never a global ``ray stop``).

Ray binds its dashboard / Jobs API to ``--dashboard-host``, but the GCS, raylets and agents also listen on
other interfaces whatever ``--node-ip-address`` says; the token is what guards them. That is why a cluster
bound to a non-loopback address with authentication disabled is refused.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import JobError

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
START_ATTEMPTS = 3


class NodeExitedError(JobError):
    """A ``ray start`` process ended while its node was starting."""


def default_cluster_dir() -> Path:
    """Where ``cluster up`` keeps its state, token and logs: ``$SHOULDERS_CLUSTER_DIR`` or ``~/.shoulders/cluster``."""
    return Path(os.environ.get("SHOULDERS_CLUSTER_DIR") or Path.home() / ".shoulders" / "cluster").expanduser()


def secure_embedded_token() -> Path | None:
    """Token authentication for an embedded ``ray.init()`` with the token file readable by its owner only.

    Left to itself, Ray 2.60 writes ``~/.ray/auth_token`` with the default umask (mode 644: every user of
    the machine could read it and run code through the cluster) and logs a warning that it turned token
    authentication on. Here the file is created first with mode 600 (or an existing one narrowed to it);
    Ray then turns token mode on and uses it. (Setting ``RAY_AUTH_MODE`` here instead would come too late:
    Ray reads its configuration when it is imported.) Nothing changes when the environment already chooses
    a mode or a token (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``). Returns the token file.
    """
    if any(os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return None
    path = Path.home() / ".ray" / TOKEN_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    return path


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (only this machine can connect)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_binding(host: str, auth: str) -> None:
    """Refuse a cluster that anyone on the network could use: non-loopback with authentication disabled."""
    if auth not in ("token", "disabled"):
        raise JobError(f"cluster auth must be 'token' or 'disabled', not '{auth}'.")
    if auth == "disabled" and not is_loopback(host):
        raise JobError(
            f"refusing to start a Ray cluster bound to '{host}' with authentication disabled: anyone who can reach "
            "that address could run code on this machine. Keep --auth token, or bind to 127.0.0.1."
        )


@dataclass
class NodeProcess:
    """One ``ray start --block`` process: its pid, start time (guards against pid reuse) and log file."""

    role: str
    pid: int
    create_time: float
    log: str


@dataclass
class LocalCluster:
    """A running local cluster as ``cluster up`` left it (saved as ``cluster.json`` in its folder)."""

    dir: str
    address: str
    """Jobs API / dashboard address, ``http://127.0.0.1:PORT`` (what ``RAY_ADDRESS`` is set to)."""
    gcs_address: str
    temp_dir: str
    token_path: str | None
    nodes: list[NodeProcess] = field(default_factory=list)
    private_disks: bool = False
    """Whether every node has its own ``/tmp``, home and working folder (``<dir>/nodes/<role>``)."""

    def env(self) -> dict[str, str]:
        """The environment lines that point ``shoulders submit|status|logs|stop`` and Ray's own CLI
        (``ray job list``, ``ray job logs``) at this cluster: Ray's client sends the token only when
        ``RAY_AUTH_MODE=token`` is set, whatever ``RAY_AUTH_TOKEN_PATH`` says."""
        env = {"RAY_ADDRESS": self.address}
        if self.token_path:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path)
        return env

    def save(self) -> Path:
        path = Path(self.dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LocalCluster:
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise JobError(f"no local cluster recorded in '{folder}' ({STATE_FILE} missing); start one with `shoulders cluster up`.")
        raw = json.loads(path.read_text())
        raw["nodes"] = [NodeProcess(**n) for n in raw["nodes"]]
        return cls(**raw)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ray_executable() -> str:
    """The ``ray`` CLI of this Python environment."""
    sibling = Path(sys.executable).parent / "ray"
    return str(sibling) if sibling.is_file() else (shutil.which("ray") or "ray")


def node_command(head: bool, host: str, gcs_port: int, cpus: int, temp_dir: str, object_store_mb: int,
                 dashboard_port: int | None = None) -> list[str]:
    """The ``ray start --block`` command of one node; every port this node opens is chosen free, not Ray's default.

    ``temp_dir`` is the node's own: nodes sharing one would share their runtime-env folders, and one node's
    clean-up would delete a ``working_dir`` another node's job driver still runs in.
    """
    cmd = [ray_executable(), "start", "--block", "--node-ip-address", host, f"--num-cpus={int(cpus)}",
           f"--object-store-memory={object_store_mb * 2**20}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           f"--dashboard-agent-listen-port={free_port(host)}", f"--metrics-export-port={free_port(host)}"]
    if head:
        cmd += ["--head", f"--port={gcs_port}", "--dashboard-host", host,
                f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port(host)}"]
    else:
        cmd += ["--address", f"{host}:{gcs_port}"]
    return cmd


def node_temp_dir(temp_dir: str, role: str, private_disks: bool) -> str:
    """A node's Ray temp folder. Nodes sharing a disk each need their own (see :func:`node_command`); on private
    disks every node uses the same path in its own ``/tmp``, as every node of a real cluster uses ``/tmp/ray``, so
    a job's unpacked ``working_dir`` has the same path on every node, as Ray's file readers expect."""
    return f"{temp_dir}/ray" if private_disks else f"{temp_dir}/{role}"


def node_env(auth: str, token_path: Path | None, gcs_address: str) -> dict[str, str]:
    """The environment of every node: token mode with the cluster's own token file, no usage stats, and
    ``RAY_ADDRESS`` set to this cluster's GCS (Ray processes that look a cluster up would otherwise find every
    Ray instance on this machine and give up)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["RAY_ADDRESS"] = gcs_address
    env["RAY_AUTH_MODE"] = auth
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("RAY_DEDUP_LOGS", "0")  # every worker's lines (e.g. which node it runs on) reach the job log
    # Job drivers run `python ...`: make that this environment's Python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    return env


def start_cluster(
    workers: int = 2, cpus_per_node: int = 1, head_cpus: int | None = None, host: str = "127.0.0.1",
    auth: str = "token", folder: str | os.PathLike | None = None, object_store_mb: int = 256, timeout_s: float = 180,
    private_disks: bool = False, share: list[str | os.PathLike] = (),
) -> LocalCluster:
    """Start a head and ``workers`` worker nodes as separate ``ray start`` processes and wait until all are alive.

    ``private_disks``: each node gets a private ``/tmp``, home and working folder; ``share``: folders every node
    still sees, read-only (e.g. a model cache standing in for the hub).
    """
    check_binding(host, auth)
    if share and not private_disks:
        raise JobError("--share names folders a private-disk cluster's nodes still see: use it with --private-disks.")
    if private_disks:
        from cluster.remote.private_disks import unshare_options

        unshare_options()  # refuse now, with what to enable, where mount namespaces are not allowed
    folder = Path(folder or default_cluster_dir()).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / STATE_FILE).exists():
        raise JobError(f"a local cluster is already recorded in '{folder}'; stop it with `shoulders cluster down` first.")
    token_path = None
    if auth == "token":
        token_path = folder / TOKEN_FILE
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    # Short temp folder: Ray's unix sockets live below it and their paths must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="shr-", dir="/tmp")
    gcs_port, dashboard_port = free_port(host), free_port(host)
    cluster = LocalCluster(str(folder), f"http://{host}:{dashboard_port}", f"{host}:{gcs_port}", temp_dir,
                           str(token_path) if token_path else None, private_disks=private_disks)
    env = node_env(auth, token_path, f"{host}:{gcs_port}")
    shared = [Path(p).expanduser().resolve() for p in share]
    try:
        head_cmd = node_command(True, host, gcs_port, head_cpus if head_cpus is not None else cpus_per_node,
                                node_temp_dir(temp_dir, "head", private_disks), object_store_mb, dashboard_port)
        cluster.nodes.append(_spawn("head", head_cmd, env, cluster, shared))
        cluster.save()
        wait_for_nodes(cluster, 1, timeout_s)
        for i in range(workers):  # one at a time: a loaded machine can miss Ray's fixed 30 s node start-up wait
            for attempt in range(START_ATTEMPTS):
                cmd = node_command(False, host, gcs_port, cpus_per_node, node_temp_dir(temp_dir, f"w{i + 1}", private_disks), object_store_mb)
                cluster.nodes.append(_spawn(f"worker{i + 1}", cmd, env, cluster, shared))
                cluster.save()
                try:
                    wait_for_nodes(cluster, 2 + i, timeout_s)
                    break
                except NodeExitedError:
                    if attempt == START_ATTEMPTS - 1:
                        raise
                    cluster.nodes.pop()
    except BaseException:
        if (folder / STATE_FILE).exists():
            stop_cluster(folder)
        raise
    return cluster


def _spawn(role: str, cmd: list[str], env: dict[str, str], cluster: LocalCluster, shared: list[Path]) -> NodeProcess:
    """Start one node; on a private-disk cluster inside its own mount namespace (``<dir>/nodes/<role>``)."""
    import psutil

    folder = Path(cluster.dir)
    if cluster.private_disks:
        from cluster.remote.private_disks import private_node

        node_dir = folder / "nodes" / role
        shutil.rmtree(node_dir, ignore_errors=True)  # a worker started again after a failed try starts clean
        token = Path(cluster.token_path) if cluster.token_path else None
        cmd, env = private_node(cmd, env, node_dir, shared, token)
    log = folder / f"{role}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return NodeProcess(role, proc.pid, psutil.Process(proc.pid).create_time(), str(log))


def auth_headers(token_path: str | None) -> dict[str, str]:
    """The Authorization header for a cluster's token file (empty when authentication is disabled)."""
    return {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"} if token_path else {}


def alive_nodes(cluster: LocalCluster) -> list[dict]:
    """The cluster's alive nodes from the dashboard's state API (node_id, node_ip, is_head_node, resources)."""
    import requests

    reply = requests.get(f"{cluster.address}/api/v0/nodes", headers=auth_headers(cluster.token_path), timeout=10)
    reply.raise_for_status()
    return [n for n in reply.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


def wait_for_nodes(cluster: LocalCluster, count: int, timeout_s: float) -> None:
    """Wait until ``count`` nodes are alive; fail early, with the log tail, if a node process exits."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        for node in cluster.nodes:
            if not _alive(node):
                tail = Path(node.log).read_text()[-2000:] if Path(node.log).exists() else ""
                raise NodeExitedError(f"Ray {node.role} node exited while starting; its log ({node.log}) ends:\n{tail}")
        try:
            if len(alive_nodes(cluster)) >= count:
                return
        except (requests.RequestException, KeyError, ValueError):
            pass  # the dashboard is not up yet
        if time.monotonic() > deadline:
            raise JobError(f"the local Ray cluster did not reach {count} alive node(s) in {timeout_s:.0f} s; see the logs in {cluster.dir}")
        time.sleep(1.0)


def _process(node: NodeProcess):
    import psutil

    try:
        proc = psutil.Process(node.pid)
        return proc if abs(proc.create_time() - node.create_time) < 1.0 else None
    except psutil.NoSuchProcess:
        return None


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # psutil.NoSuchProcess / AccessDenied: gone or not ours to read
        return "?"


def _alive(node: NodeProcess) -> bool:
    import psutil

    proc = _process(node)
    return proc is not None and proc.status() != psutil.STATUS_ZOMBIE


def cluster_processes(cluster: LocalCluster) -> list:
    """Every live process of this cluster: the ``ray start`` processes, their descendants, and any process
    whose command line names the cluster's private temp folder (Ray workers re-parented after a crash)."""
    import psutil

    procs = {}
    for node in cluster.nodes:
        proc = _process(node)
        if proc is not None:
            procs[proc.pid] = proc
            for child in proc.children(recursive=True):
                procs[child.pid] = child
    for proc in psutil.process_iter(["cmdline"]):
        if any(cluster.temp_dir in part for part in (proc.info["cmdline"] or [])):
            procs[proc.pid] = proc
    procs.pop(os.getpid(), None)
    return list(procs.values())


def listening_addresses(cluster: LocalCluster) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every socket the cluster's processes listen on."""
    import psutil

    names = {p.pid: p.name() for p in cluster_processes(cluster) if p.is_running()}
    return sorted(
        (c.laddr.ip, c.laddr.port, names[c.pid])
        for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in names
    )


def stop_cluster(folder: str | os.PathLike | None = None, timeout_s: float = 10) -> int:
    """Stop the cluster recorded in ``folder``: SIGTERM its ``ray start`` processes (workers, then the head),
    then every process of the cluster still running half-way through ``timeout_s`` (a job's workers and
    agents outlived their raylet by 20-30 s), SIGKILL what is left at ``timeout_s`` (nothing of a stopped
    cluster is worth keeping: its state lives in these processes), remove its temp folder. Returns the
    processes stopped."""
    import psutil

    cluster = LocalCluster.load(folder or default_cluster_dir())
    procs = cluster_processes(cluster)
    for node in reversed(cluster.nodes):
        proc = _process(node)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout_s / 2)
    for proc in alive:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=timeout_s / 2)
    if alive:
        log.info("cluster down: %d process(es) still running after SIGTERM, killed: %s", len(alive),
                 ", ".join(sorted({_name(p) for p in alive})))
    for proc in alive + [p for p in cluster_processes(cluster) if p.is_running()]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    shutil.rmtree(Path(cluster.dir) / "nodes", ignore_errors=True)  # the private disks' folders
    (Path(cluster.dir) / STATE_FILE).unlink(missing_ok=True)
    return len(procs)
