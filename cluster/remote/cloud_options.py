"""The options of ``shoulders cluster config`` (``CloudOptions``), the providers' defaults, and the storage variables
every node needs. Read by ``cloud_config`` (checks and files) and the two renderers below it."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

PROVIDERS = ("aws", "gcp", "kuberay")
RAY_VERSION = "2.60.0"
STOCK_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
"""Ray's CUDA image: Ray and Python, no torch, no shoulders (``--source`` installs them)."""

STORAGE_KEY_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
"""Static S3 credentials: required when ``--credentials keys``."""
STORAGE_OPTIONAL_ENV = ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
"""Set when the storage needs them (temporary keys, a generic S3 endpoint such as MinIO or SeaweedFS, a region)."""

CREDENTIAL_MODES = ("role", "keys")
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_KUBERAY_NAME = 47 - len("-job")
"""KubeRay refuses a RayJob name over 47 characters (MaxRayJobNameLength) or not a DNS-1035 label."""


@dataclass(frozen=True)
class ProviderDefaults:
    """What a provider's nodes are unless the options say otherwise."""

    head_type: str | None
    """Instance type of the head: no GPU (the job driver runs there, and only reads metrics and writes small files)."""
    head_cpus: int
    worker_type: str | None
    cpus_per_worker: int
    gpus_per_worker: int
    region: str | None


PROVIDER_DEFAULTS = {
    "aws": ProviderDefaults("m5.2xlarge", 8, "g5.2xlarge", 8, 1, "us-west-2"),  # g5.2xlarge: one A10G (24 GB)
    "gcp": ProviderDefaults("n2-standard-8", 8, "g2-standard-8", 8, 1, "us-central1"),  # g2-standard-8: one L4 (24 GB)
    "kuberay": ProviderDefaults(None, 4, None, 8, 1, None),
}


@dataclass
class CloudOptions:
    """What ``shoulders cluster config`` generates; each field is the CLI option of the same name."""

    provider: str
    name: str = "shoulders"
    image: str | None = None
    """Container image of every node. Without ``source`` it must already hold shoulders (cluster/deploy/Dockerfile)."""
    source: str | None = None
    """pip requirement for shoulders: a git URL, a wheel URL, or (aws/gcp) a local ``.whl`` file copied to the nodes."""
    torch: str = "torch"
    """pip requirement for torch, installed before ``source`` (PyPI's Linux wheels carry CUDA)."""
    head_type: str | None = None
    worker_type: str | None = None
    cpus_per_worker: int | None = None
    gpus_per_worker: int | None = None
    min_workers: int = 0
    max_workers: int = 4
    region: str | None = None
    zone: str | None = None
    project: str | None = None
    credentials: str | None = None
    """``role`` (instance profile / service account) or ``keys`` (AWS-style variables); default role, kuberay keys."""
    instance_profile: str = "ray-autoscaler-v1"
    service_account: str | None = None
    secret: str = "shoulders-storage"
    storage: str | None = None
    job: str = "jobs/quickstart.yaml"
    head_cpus: int | None = None
    head_memory: str = "16Gi"
    worker_memory: str = "32Gi"

    def resolved(self) -> CloudOptions:
        """A copy with the provider's defaults filled in where an option was left unset."""
        defaults = PROVIDER_DEFAULTS[self.provider]
        filled = {name: getattr(defaults, name) for name in ProviderDefaults.__dataclass_fields__ if getattr(self, name) is None}
        return replace(self, **filled)

    @property
    def image_or_stock(self) -> str:
        return self.image or STOCK_IMAGE

    @property
    def credential_mode(self) -> str:
        return self.credentials or ("keys" if self.provider == "kuberay" else "role")

    def install_commands(self) -> list[str]:
        """The shell commands that install torch and shoulders on a node (none when the image holds them)."""
        if not self.source:
            return []
        source = self.node_wheel_path() or self.source
        return [f"pip install --no-cache-dir {shlex.quote(self.torch)}", f"pip install --no-cache-dir {shlex.quote(source)}"]

    def local_wheel(self) -> Path | None:
        """The local wheel file ``source`` names, or None when it is a URL or a requirement."""
        if self.source and self.source.endswith(".whl") and "://" not in self.source:
            return Path(self.source).expanduser().resolve()
        return None

    def node_wheel_path(self) -> str | None:
        wheel = self.local_wheel()
        return f"/tmp/shoulders-dist/{wheel.name}" if wheel else None
