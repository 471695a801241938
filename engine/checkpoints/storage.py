"""The one filesystem layer: data, checkpoints, exports and tune experiments on a local path or a URI alike.

Every location is a string: a local path (``~`` and relative paths allowed, ``file://`` too) or a URI that
``pyarrow.fs.FileSystem.from_uri`` opens (``s3://bucket/key``, ``gs://bucket/key``, ``hdfs://...``). Credentials
come from the environment only, as each cloud's own tools read them (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...); a
URI's query may name the endpoint (``?endpoint_override=...&scheme=http``) but never a secret, because job
files travel into checkpoints, exports and logs. Torch-free and Ray-free: the driver and the workers use it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from engine.checkpoints.atomic import atomic_path, published_once, write_atomic
from engine.errors import JobError

SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token")
"""URI query keys pyarrow would take credentials from: refused, credentials belong in the environment."""
CREDENTIAL_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_STORAGE_")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                  "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                  "AWS_EC2_METADATA_DISABLED", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                  "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY")
"""Environment variables that tell a storage client where and who it is: passed to Ray workers through the
runtime environment (never written to a file)."""


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a remote filesystem (``s3://``, ``gs://``, ...) rather than a local path."""
    path = str(path)
    return "://" in path and not path.startswith("file://")


def split_query(location: str) -> tuple[str, str]:
    """(``location`` without its query, ``?query`` or "")."""
    if is_uri(location) and "?" in location:
        base, query = location.split("?", 1)
        return base, "?" + query
    return location, ""


def local_path(location: str | os.PathLike) -> str:
    """A local location as an absolute path (``~`` expanded, ``file://`` dropped)."""
    return os.path.abspath(os.path.expanduser(str(location).removeprefix("file://")))


def normalize(location: str | os.PathLike) -> str:
    """A URI as it is (without a trailing slash), a local path made absolute."""
    location = str(location)
    if is_uri(location):
        base, query = split_query(location)
        return base.rstrip("/") + query
    return local_path(location)


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location``/``parts`` (a URI's query stays at the end)."""
    location = str(location)
    if not is_uri(location):
        return os.path.join(local_path(location), *parts)
    base, query = split_query(location)
    return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts]) + query


def name(location: str | os.PathLike) -> str:
    """The last part of a location (a file's or folder's name)."""
    return posixpath.basename(split_query(str(location))[0].rstrip("/")) if is_uri(location) else Path(str(location)).name


def check_no_secrets(location: str, key: str = "location") -> None:
    """Refuse a URI that carries credentials in its query: job files are copied into checkpoints and logs."""
    if not is_uri(location):
        return
    found = sorted(set(parse_qs(urlsplit(location).query)) & set(SECRET_QUERY_KEYS))
    if found:
        raise JobError(f"{key}: '{split_query(location)[0]}?...' carries {', '.join(found)} in its query; job files are "
                       "copied into checkpoints, exports and logs, so credentials must come from the environment "
                       "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or a profile). Remove them from the URI.")


def resolve(location: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow ``FileSystem``, path on it) for a local path or URI; credentials from the environment."""
    import pyarrow.fs

    location = str(location)
    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), local_path(location)
    check_no_secrets(location)
    return pyarrow.fs.FileSystem.from_uri(location)


def as_location(location: str, fs_path: str) -> str:
    """The location (URI or local path) of ``fs_path``, a path on the filesystem ``location`` resolves to."""
    if not is_uri(location):
        return fs_path
    base, query = split_query(location)
    return f"{urlsplit(base).scheme}://{fs_path.lstrip('/')}{query}"


def file_type(location: str) -> str:
    """``file``, ``dir`` or ``missing``."""
    import pyarrow.fs

    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    return {pyarrow.fs.FileType.File: "file", pyarrow.fs.FileType.Directory: "dir"}.get(kind, "missing")


def exists(location: str) -> bool:
    """Whether a file or folder is at ``location``."""
    return file_type(location) != "missing"


def list_folder(location: str, recursive: bool = False) -> list[tuple[str, str]]:
    """(location, ``file`` | ``dir``) of everything in a folder (nothing when it is missing)."""
    import pyarrow.fs

    fs, path = resolve(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=recursive))
    kinds = {pyarrow.fs.FileType.File: "file", pyarrow.fs.FileType.Directory: "dir"}
    return sorted((as_location(location, info.path), kinds[info.type]) for info in infos if info.type in kinds)


def file_sizes(locations: list[str]) -> list[int]:
    """The sizes in bytes of files (local or on one object store: one listing request per batch of paths)."""
    if not locations:
        return []
    if not is_uri(locations[0]):
        return [os.path.getsize(local_path(f)) for f in locations]
    fs = resolve(locations[0])[0]
    infos = fs.get_file_info([resolve(f)[1] for f in locations])
    missing = [f for f, info in zip(locations, infos) if info.size is None]
    if missing:
        raise FileNotFoundError(f"'{missing[0]}' does not exist")
    return [info.size for info in infos]


def read_bytes(location: str) -> bytes:
    """The bytes of a file."""
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str) -> str:
    """The text (UTF-8) of a file."""
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file: a local one through a temporary name renamed into place; an object store's
    single upload is atomic already."""
    if not is_uri(location):
        path = Path(local_path(location))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(location: str, text: str) -> None:
    """Write a whole text file (UTF-8), atomically as :func:`write_bytes`."""
    write_bytes(location, text.encode("utf-8"))


def delete_folder(location: str) -> None:
    """Remove a folder and everything in it (nothing when it is missing)."""
    fs, path = resolve(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


def upload_folder(local: str | os.PathLike, location: str) -> str:
    """Copy a local folder's files to ``location`` (replacing what is there); returns ``location``.

    On local storage the copy goes to a temporary sibling renamed into place, so a reader never sees
    half a folder; on an object store each file is one atomic upload.
    """
    if not is_uri(location):
        dest = Path(local_path(location))
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copytree(local, tmp)
        return str(dest)
    import pyarrow.fs

    fs, path = resolve(location)
    delete_folder(location)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
    return location


def download_folder(location: str, local: str | os.PathLike) -> Path:
    """Copy the files under ``location`` into the local folder ``local``; returns it."""
    import pyarrow.fs

    fs, path = resolve(location)
    Path(local).mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return Path(local)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
"""Model-sized files a preprocessing copy leaves out."""


def preprocessing_source(name: str) -> str:
    """Where ``from_pretrained`` finds a tokenizer / feature extractor / image processor named ``name``: ``name``
    itself (a hub id or a local folder), or, for a URI (an export in object storage), a copy of its small files
    (weights left out) in this node's temp folder, made once per node and export. So Ray Data's preprocessing tasks,
    on whichever node they run, read an export's preprocessing from the bucket rather than a path on one node."""
    if not is_uri(name):
        return name
    import hashlib

    import pyarrow.fs

    fs, root = resolve(name)
    files = [info for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
             if info.type == pyarrow.fs.FileType.File and not info.path.endswith(WEIGHT_SUFFIXES)]
    # keyed by the files' names, sizes and times too: an export written again at the same URI is copied again
    key = "\n".join([name, *sorted(f"{f.path} {f.size} {f.mtime_ns}" for f in files)])
    dest = Path(tempfile.gettempdir()) / "shoulders-preprocessing" / hashlib.sha1(key.encode()).hexdigest()[:16]
    if dest.is_dir():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with published_once(dest) as tmp:  # the data tasks of one node may all ask at once
        for info in files:
            target = Path(tmp) / posixpath.relpath(info.path, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
    return str(dest)


@contextlib.contextmanager
def local_folder(location: str) -> Iterator[Path]:
    """A local folder with the files at ``location``: the folder itself when local, else a temporary download."""
    if not is_uri(location):
        yield Path(local_path(location))
        return
    with tempfile.TemporaryDirectory(prefix="shoulders-download-") as tmp:
        yield download_folder(location, Path(tmp) / name(location))


def credential_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The storage variables set here (:data:`CREDENTIAL_ENV`, and any other ``AWS_``/``GOOGLE_``-prefixed one),
    for Ray's runtime environment ``env_vars`` so workers on other nodes reach the same storage."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k in CREDENTIAL_ENV or k.startswith(CREDENTIAL_ENV_PREFIXES)}


def storage_error(location: str, exc: BaseException) -> str:
    """What failed reaching ``location``, in a few words (no credentials, no bucket, denied, unreachable)."""
    text = str(exc)
    upper = text.upper()
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper or "BUCKET DOES NOT EXIST" in upper:
        return "the bucket does not exist (create it, or fix the bucket name)"
    if any(s in upper for s in ("SIGNATURE_DOES_NOT_MATCH", "SIGNATUREDOESNOTMATCH", "INVALID_ACCESS_KEY", "INVALIDACCESSKEYID")):
        return "access denied: the credentials were refused (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if any(s in upper for s in ("NO CREDENTIALS", "UNABLE TO LOCATE CREDENTIALS", "NO AUTH", "MISSING_AUTHENTICATION", "ANONYMOUS")):
        return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if "ACCESS_DENIED" in upper or "ACCESSDENIED" in upper or "ACCESS DENIED" in upper or "FORBIDDEN" in upper:
        return "access denied (wrong credentials, or they may not write there: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if any(s in upper for s in ("NETWORK_CONNECTION", "COULDN'T CONNECT", "COULD NOT CONNECT", "CONNECTION REFUSED", "TIMEOUT", "RESOLVE")):
        return "the storage endpoint did not answer (check AWS_ENDPOINT_URL / the network)"
    return text.splitlines()[0] if text else type(exc).__name__


def check_writable(location: str, key: str) -> None:
    """A remote ``location`` is reachable and writable: a probe object written and removed, in about a second.

    Raises:
        JobError: one line naming ``key``, the URI and what failed.
    """
    check_no_secrets(location, key)
    import pyarrow.fs

    probe = join(location, f".shoulders-write-probe-{os.getpid()}")
    try:
        fs, path = resolve(location)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise OSError("NO_SUCH_BUCKET")
        _, probe_path = resolve(probe)
        with fs.open_output_stream(probe_path) as stream:
            stream.write(b"")
        fs.delete_file(probe_path)
    except JobError:
        raise
    except Exception as exc:  # pyarrow raises OSError and ArrowInvalid for storage failures
        raise JobError(f"{key} '{split_query(location)[0]}' is not writable: {storage_error(location, exc)}") from None
