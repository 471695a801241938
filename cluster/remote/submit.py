"""Submitting a job to a Ray cluster through the Ray Jobs API, and watching or stopping it.

``submit`` validates the job here first (schema, data files, columns, labels, model: the driver-side
checks of :mod:`cluster.preflight.job`), so a broken job never reaches the cluster. It then packs the job file
and every local file the job names (data splits, a local model folder, retention data) into the runtime
environment's ``working_dir``, rewrites those paths relative to it (the job driver and every worker run
with the unpacked ``working_dir`` as their current directory), and ships this checkout's ``engine`` and
``cluster`` packages as ``py_modules`` so the cluster runs the same code as the laptop. The cluster must
already have the Python dependencies (a Ray image with shoulders installed, see ``cluster/deploy``);
``--pip`` declares them in the runtime environment instead. Remote paths (``s3://``, ``gs://``, ...) and
hub ids are left as they are.

Token authentication: the token comes from ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
or ``~/.ray/auth_token`` (Ray's own order) and is sent as a bearer token. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from cluster.ingest.splits import is_uri, resolve_files
from cluster.preflight.data import check_data
from cluster.preflight.job import check_model
from engine.config.data_section import DatasetSource
from engine.config.schema import JobSpec, build_job, load_job
from engine.errors import JobError

JOB_FILE = "job.yaml"
INPUTS_DIR = "inputs"
MAX_PACKAGE_BYTES = int(os.environ.get("RAY_max_grpc_message_size", 512 * 2**20))
"""Ray refuses a ``working_dir`` package at or above its gRPC message limit (512 MiB unless configured)."""
DATA_KEYS = ("data.train", "data.validation", "data.test", "safeguards.retention_data")
"""Job keys naming data (a file, folder or glob) that is packed when local."""
FOLDER_KEYS = ("model.name", "model.tokenizer")
"""Job keys naming a model or tokenizer folder (packed when it is a local folder, else a hub id)."""
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR",
                 "SHOULDERS_FAULTS")
"""Environment variables passed on to the cluster when they are set here (never secrets; ``SHOULDERS_FAULTS`` is
the recovery tests' fault injection, :mod:`engine.loop.faults`)."""
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
"""Process exit code for each final job state; a job not finished yet gives ``EXIT_NOT_FINISHED``."""
EXIT_NOT_FINISHED = 4
FINAL_STATES = set(EXIT_CODES)


class ClusterError(JobError):
    """The cluster could not be reached, refused us, or does not know a job."""


# ---------------------------------------------------------------------------------------------------
# Address and token


def resolve_address(address: str | None) -> str:
    """The Jobs API address: ``--address``, else ``RAY_ADDRESS`` (``shoulders cluster up`` prints it)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard / Jobs API) or set RAY_ADDRESS; "
            "`shoulders cluster up` starts a local cluster and prints the line to set."
        )
    if "://" not in address and address != "auto":
        address = f"http://{address}"
    if address != "auto":
        check_address(address)
    return address


def check_address(address: str) -> None:
    """A Jobs API address is ``http(s)://HOST[:PORT]`` (or ``ray://HOST:PORT``), refused otherwise before any connection."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address)
        port = parts.port
        ok = parts.scheme in ("http", "https", "ray") and bool(parts.hostname) and not any(c.isspace() for c in address)
    except ValueError:
        ok, port = False, None
    if not ok or (port is not None and not 0 < port < 65536):
        raise ClusterError(
            f"--address / RAY_ADDRESS '{address}' is not a cluster address: give http://HOST:PORT of the Ray dashboard "
            "(Jobs API, port 8265 by default), e.g. http://127.0.0.1:8265."
        )


def find_token() -> tuple[str | None, str]:
    """(token, where it came from): ``RAY_AUTH_TOKEN``, the ``RAY_AUTH_TOKEN_PATH`` file, or ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path_env:
        path = Path(path_env).expanduser()
        if not path.is_file():
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH is '{path_env}', but that file does not exist; point it at the cluster's token file.")
        return path.read_text().strip(), f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip(), str(default)
    return None, "nowhere (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token are all unset)"


def connect(address: str | None = None):
    """A ``JobSubmissionClient`` for the cluster, authenticated with the token; clear errors when refused."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    token, source = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        if token:
            raise ClusterError(
                f"the Ray cluster at {address} refused the authentication token from {source}. Use the cluster's "
                "token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to its token file (`shoulders cluster up` prints it)."
            ) from None
        raise ClusterError(
            f"the Ray cluster at {address} requires an authentication token and none was found ({source}). Set "
            "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to the cluster's token file (`shoulders cluster up` prints it)."
        ) from None
    except ConnectionError as exc:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({exc}). Is it running, and is this its dashboard address?") from None


# ---------------------------------------------------------------------------------------------------
# Packing the job and its local files


@dataclass
class Package:
    """What goes into ``working_dir``: the rewritten job and the local files, by their path inside it."""

    job: JobSpec
    files: dict[str, Path]
    total_bytes: int


def get_key(job: JobSpec, dotted: str) -> Any:
    """The value of a dotted key (``None`` when the job's schema has no such key)."""
    node: Any = job
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node


def plan_package(job: JobSpec) -> Package:
    """Map every local file the job names to a path under ``inputs/<key>/`` and rewrite the job to match.

    Raises :class:`JobError` naming the key when a local file is missing. Pure: copies nothing.
    """
    files: dict[str, Path] = {}
    rewrites: dict[str, str] = {}
    disk_folders: dict[str, str] = {}
    for key in DATA_KEYS:
        value = get_key(job, key)
        if isinstance(value, DatasetSource):  # a hub id is read from the cluster's own cache; a save_to_disk folder travels
            if value.hf_disk is not None:
                folder = Path(os.path.expanduser(value.hf_disk))
                for source in sorted(p for p in folder.rglob("*") if p.is_file()):
                    files[f"{INPUTS_DIR}/{key}/{source.relative_to(folder).as_posix()}"] = source
                disk_folders[key] = f"{INPUTS_DIR}/{key}"
            continue
        if not value or is_uri(value):
            continue
        sources = [Path(f) for f in resolve_files(value, key)]
        single = len(sources) == 1 and os.path.isfile(os.path.expanduser(value.removeprefix("file://")))
        base = sources[0].parent if single else Path(os.path.commonpath([s.parent for s in sources]))
        for source in sources:
            files[f"{INPUTS_DIR}/{key}/{source.relative_to(base).as_posix()}"] = source
        rewrites[key] = f"{INPUTS_DIR}/{key}/{sources[0].name}" if single else f"{INPUTS_DIR}/{key}"
    for key in FOLDER_KEYS:
        value = get_key(job, key)
        folder = Path(os.path.expanduser(value)) if value else None
        if folder is None or not folder.is_dir():
            continue
        for source in sorted(p for p in folder.rglob("*") if p.is_file()):
            files[f"{INPUTS_DIR}/{key}/{source.relative_to(folder).as_posix()}"] = source
        rewrites[key] = f"{INPUTS_DIR}/{key}"
    raw = job.model_dump(mode="json")
    for key, value in rewrites.items():
        section, field = key.split(".")
        raw[section][field] = value
    for key, value in disk_folders.items():
        section, field = key.split(".")
        raw[section][field]["hf_disk"] = value
    total = sum(path.stat().st_size for path in files.values())
    return Package(job=build_job(raw, "packed job"), files=files, total_bytes=total)


def check_package_size(package: Package, limit: int = MAX_PACKAGE_BYTES) -> None:
    """Refuse a package Ray would reject, naming the biggest inputs and the fix (shared storage)."""
    if package.total_bytes < limit:
        return
    by_key: dict[str, int] = {}
    for arcname, path in package.files.items():
        key = arcname.split("/")[1]
        by_key[key] = by_key.get(key, 0) + path.stat().st_size
    biggest = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(by_key.items(), key=lambda kv: -kv[1]))
    raise JobError(
        f"the job's local files total {package.total_bytes / 2**20:.1f} MiB ({biggest}), over Ray's "
        f"{limit / 2**20:.0f} MiB limit for a runtime_env working_dir. Put the big inputs on storage every node "
        "reaches (s3://..., gs://..., or a shared filesystem path) and name that path in the job, or use a hub id "
        "for the model."
    )


def write_package(package: Package, folder: Path) -> Path:
    """Copy the files and write ``job.yaml`` into ``folder`` (the future ``working_dir``)."""
    for arcname, source in package.files.items():
        target = folder / arcname
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (folder / JOB_FILE).write_text(yaml.safe_dump(package.job.model_dump(mode="json"), sort_keys=False))
    return folder


def declared_packages() -> list[str]:
    """The packages the workers need, from this package's metadata (Ray itself excluded: the cluster runs it)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("shoulders") or []
    except PackageNotFoundError:
        return []
    return [r for r in reqs if "extra ==" not in r and not re.match(r"ray\b", r)]


def uses_object_storage(job: JobSpec) -> bool:
    """Whether the job reads or writes a URI (data splits, ``run.storage_path``, ``output.uri``)."""
    splits = [getattr(job.data, k) for k in ("train", "validation", "test")]
    return any(isinstance(v, str) and is_uri(v) for v in [*splits, job.run.storage_path, job.output.uri] if v)


def build_runtime_env(working_dir: Path, ship_code: bool = True, pip: bool = False, storage_env: bool = False,
                      job_args: str | None = None) -> dict[str, Any]:
    """The runtime environment of a submitted job: the packed folder, this checkout's code, forwarded env vars;
    with ``storage_env``, this machine's storage credentials and endpoint (``AWS_*``, ``GOOGLE_*``) too, so the
    driver and every worker reach the job's object storage (they travel in the runtime environment, never in a file).
    ``job_args``: the job file and overrides as given here, for the hints the driver prints (how to resume)."""
    from cluster.run.node_loss import JOB_ARGS_ENV
    from engine.checkpoints.storage import credential_env

    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "env_vars": {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **(credential_env() if storage_env else {})},
        "excludes": ["__pycache__", "*.pyc"],
    }
    if job_args:
        env["env_vars"][JOB_ARGS_ENV] = job_args
    if ship_code:
        import cluster
        import engine

        env["py_modules"] = [str(Path(engine.__file__).parent), str(Path(cluster.__file__).parent)]
    if pip:
        env["pip"] = {"packages": declared_packages(), "pip_check": False}
    return env


def submission_id(job: JobSpec) -> str:
    """A readable, unique job id: the job name plus a random suffix."""
    slug = re.sub(r"[^a-z0-9-]+", "-", job.name.lower()).strip("-") or "job"
    return f"{slug}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------------
# Submit, watch, stop


def local_splits_only(job: JobSpec) -> JobSpec | None:
    """The job with its remote (URI) validation/test splits dropped, for checking here; ``None`` when the training
    data itself is remote (the cluster may hold credentials this machine lacks; the job driver checks it there)."""
    if isinstance(job.data.train, str) and is_uri(job.data.train):
        return None
    remote = {k: None for k in ("validation", "test") if isinstance(getattr(job.data, k), str) and is_uri(getattr(job.data, k))}
    return job.model_copy(update={"data": job.data.model_copy(update=remote)}) if remote else job


def prepare_submission(job_path: str, overrides: list[str] | None = None) -> Package:
    """Everything checked here before the cluster is contacted: schema, model, data files, package size."""
    job = load_job(job_path, overrides)
    check_model(job)
    local = local_splits_only(job)
    if local is not None:
        check_data(local)
    package = plan_package(job)
    check_package_size(package)
    return package


def submit(job_path: str, overrides: list[str] | None = None, address: str | None = None, command: str = "train",
           ship_code: bool = True, pip: bool = False, log: TextIO = sys.stderr, resume: bool = False) -> str:
    """Validate and pack the job locally, then submit ``python -m cluster.cli.main <command> job.yaml``; returns the job id.

    ``resume``: the cluster's driver runs ``<command> job.yaml --resume`` (continue the run in ``run.storage_path``)."""
    import shlex

    package = prepare_submission(job_path, overrides)
    job = package.job
    if not job.run.storage_path and not os.path.isabs(job.output.dir):
        print(f"note: output.dir '{job.output.dir}' is relative and run.storage_path is empty: results and checkpoints "
              "stay in the job's working folder on the head node. Set run.storage_path (e.g. s3://...) to keep them.", file=log)
    client = connect(address)
    with tempfile.TemporaryDirectory(prefix="shoulders-submit-") as tmp:
        folder = write_package(package, Path(tmp))
        job_id = client.submit_job(
            entrypoint=f"python -m cluster.cli.main {command} {JOB_FILE}" + (" --resume" if resume else ""),
            submission_id=submission_id(job),
            runtime_env=build_runtime_env(folder, ship_code, pip, storage_env=uses_object_storage(job),
                                          job_args=shlex.join([job_path, *(overrides or [])])),
            metadata={"shoulders_job": job.name, "shoulders_command": command},
        )
    print(f"submitted '{job.name}' ({package.total_bytes / 2**20:.1f} MiB packed) as {job_id}", file=log)
    return job_id


def job_status(client, job_id: str) -> str:
    """The job's state name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise ClusterError(f"the cluster has no job '{job_id}'; `shoulders list` shows the jobs it knows.") from None
        raise


def wait_for_final(client, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a final state (or ``timeout_s`` passes); returns the state."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = job_status(client, job_id)
        if state in FINAL_STATES or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll_s)


def follow_logs(client, job_id: str, out: TextIO | None = None) -> str:
    """Stream the job's logs until it ends (Ray's websocket log tail) to ``out`` (``sys.stdout`` as it is now, so a
    redirection applies); returns the final state."""
    job_status(client, job_id)  # a clear error for an unknown id
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return wait_for_final(client, job_id)


def stop(client, job_id: str, timeout_s: float = 60) -> str:
    """Ask the cluster to stop the job and wait for it to end; returns the final (or current) state."""
    state = job_status(client, job_id)
    if state in FINAL_STATES:
        return state
    client.stop_job(job_id)
    return wait_for_final(client, job_id, timeout_s)


def exit_code(state: str) -> int:
    """The process exit code for a job state: 0 succeeded, 1 failed, 3 stopped, 4 not finished."""
    return EXIT_CODES.get(state, EXIT_NOT_FINISHED)


def list_jobs(client) -> list[dict[str, Any]]:
    """The cluster's jobs, newest first: id, state, shoulders job name, entrypoint."""
    rows = []
    for info in client.list_jobs():
        rows.append({
            "id": info.submission_id or info.job_id,
            "state": str(info.status.value),
            "name": (info.metadata or {}).get("shoulders_job", ""),
            "start_time": info.start_time or 0,
            "entrypoint": info.entrypoint,
        })
    return sorted(rows, key=lambda row: -row["start_time"])
