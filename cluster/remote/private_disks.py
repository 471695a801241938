"""Nodes that share no local disk, on one machine: ``shoulders cluster up --private-disks``.

A real cluster's nodes each have their own disk; a loopback cluster's nodes all see one. So that nothing can
pass between nodes through a local path (a driver writing a file a worker on another node then reads), every
node of a private-disk cluster runs in its own Linux mount namespace in which:

- ``/tmp`` is the node's own folder (``<cluster dir>/nodes/<role>/tmp``): Ray's session and runtime-env
  folders, unpacked ``working_dir``\\s, ``tempfile``'s files and anything a job writes below ``/tmp`` stay on
  that node;
- ``HOME`` is ``/tmp/home`` and the node starts in ``/tmp/work`` (its working folder), so ``~/.cache``,
  ``~/.ray`` and relative paths are the node's own too;
- what every node of a real cluster has installed is still there, read-only: this Python environment and the
  shoulders source it imports, plus the folders given with ``--share`` (e.g. a model cache standing in for
  the hub, which each real node downloads from).

The network is shared (nodes talk over loopback and reach an S3 server on loopback, as cloud nodes reach
their bucket). Mount namespaces need root or unprivileged user namespaces; without either ``cluster up
--private-disks`` refuses with what to enable.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

from engine.errors import JobError

NODE_TMP = "/tmp"
"""Where a node's own temp folder is mounted, inside its namespace."""
NODE_HOME = "/tmp/home"
NODE_WORK = "/tmp/work"
TOKEN_INSIDE = "/tmp/.ray-auth-token"
UNSHARE_VARIANTS = (["--mount"], ["--user", "--map-root-user", "--mount"])
"""``unshare`` options tried in order: a plain mount namespace (root), then one inside a user namespace."""


@cache
def unshare_options() -> list[str]:
    """The ``unshare`` options that give this process a private mount namespace here; a clear error if none do."""
    unshare = shutil.which("unshare")
    if unshare:
        for options in UNSHARE_VARIANTS:
            probe = [unshare, *options, "--propagation", "private", "sh", "-c", f"mount --bind {NODE_TMP} {NODE_TMP}"]
            if subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0:
                return list(options)
    raise JobError(
        "cluster up --private-disks needs Linux mount namespaces: run it as root, or allow unprivileged user "
        "namespaces (sysctl kernel.unprivileged_userns_clone=1 / kernel.apparmor_restrict_unprivileged_userns=0); "
        "without --private-disks the nodes share this machine's disk."
    )


def code_paths() -> list[Path]:
    """The folders every node needs to run shoulders: this Python environment, its base installation and the
    folders the ``engine`` and ``cluster`` packages are imported from (a checkout on ``PYTHONPATH`` or an
    editable install)."""
    import cluster
    import engine

    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(engine.__file__).parent.parent, Path(cluster.__file__).parent.parent}
    paths.update(Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    return sorted(p.resolve() for p in paths if p.exists())


def under(path: Path, folder: str) -> bool:
    return path == Path(folder) or Path(folder) in path.parents


def namespace_script(node_tmp: Path, shared: list[Path], command: list[str]) -> str:
    """The shell script that, run inside a fresh mount namespace, makes ``node_tmp`` the node's ``/tmp`` (with
    the ``shared`` folders that lie below ``/tmp`` bound into it read-only), then runs ``command`` in the node's
    working folder. Shared folders outside ``/tmp`` stay where they are."""
    lines = ["set -e"]
    for path in shared:
        if not under(path, NODE_TMP) or under(node_tmp, str(path)):
            continue
        inside = node_tmp / path.relative_to(NODE_TMP)
        lines += [f"mkdir -p {shlex.quote(str(inside))}", f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(inside))}",
                  f"mount -o remount,bind,ro {shlex.quote(str(inside))}"]
    lines += [f"mount --rbind {shlex.quote(str(node_tmp))} {NODE_TMP}", f"mkdir -p {NODE_HOME} {NODE_WORK}", f"cd {NODE_WORK}",
              "exec " + shlex.join(command)]
    return "\n".join(lines)


def private_node(command: list[str], env: dict[str, str], node_dir: Path, shared: list[Path],
                 token_path: Path | None) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that run a node's ``command`` with a private ``/tmp``, home and working folder
    (``node_dir/tmp`` seen as ``/tmp``). The cluster's token is copied into the node's own folder; the storage
    credentials of this shell are left out (a submitted job brings them in its runtime environment, as it must
    for a cloud node)."""
    from engine.checkpoints.storage import credential_env

    node_tmp = node_dir / "tmp"
    node_tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in env.items() if k not in credential_env(env)}
    env.update(HOME=NODE_HOME, TMPDIR=NODE_TMP, RAY_TMPDIR=NODE_TMP)
    if token_path:
        inside = node_tmp / Path(TOKEN_INSIDE).name
        shutil.copyfile(token_path, inside)
        inside.chmod(0o600)
        env["RAY_AUTH_TOKEN_PATH"] = TOKEN_INSIDE
    script = namespace_script(node_tmp.resolve(), [*code_paths(), *shared], command)
    return [shutil.which("unshare") or "unshare", *unshare_options(), "--propagation", "private", "sh", "-c", script], env
