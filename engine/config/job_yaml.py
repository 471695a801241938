"""Reading a job file as YAML, refusing what ``yaml.safe_load`` alone lets through.

``safe_load`` constructs no Python objects, but it still accepts files that are not text, alias bombs
(a few lines that expand to billions of nodes, which then hang validation) and duplicate keys (the last
one silently wins). Each is refused here with the file, the line and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from engine.errors import JobError

MAX_JOB_BYTES = 1 << 20
"""Largest job file read (1 MiB): a job is a page of settings, never data."""
MAX_EXPANDED_NODES = 100_000
"""Largest number of YAML nodes a job may expand to once aliases are followed (billion-laughs guard)."""


class _JobLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys, naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise JobError(
                    f"{self.name}: key '{key}' appears twice (lines {first} and {line}); the second would silently "
                    "replace the first. Keep one of them."
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in the tree ``node`` stands for, with every alias followed (shared subtrees counted each time)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_EXPANDED_NODES + 1  # a cycle (a recursive alias) is also too large
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    size = 1
    for child in children:
        size += _expanded_size(child, memo)
        if size > MAX_EXPANDED_NODES:
            break
    memo[id(node)] = size
    return size


def read_text(path: Path) -> str:
    """The job file's text: a UTF-8 file of at most :data:`MAX_JOB_BYTES`."""
    if path.is_dir():
        raise JobError(f"Job file '{path}' is a folder. Pass the path of a YAML job file, e.g. jobs/quickstart.yaml.")
    if not path.is_file():
        raise JobError(f"Job file '{path}' does not exist. Pass the path of a YAML job file, e.g. jobs/quickstart.yaml.")
    try:
        size = os.path.getsize(path)
        if size > MAX_JOB_BYTES:
            raise JobError(f"Job file '{path}' is {size:,} bytes; a job file is at most {MAX_JOB_BYTES:,}. Is it a data file?")
        data = path.read_bytes()
    except OSError as exc:
        raise JobError(f"Job file '{path}' cannot be read: {exc.strerror or exc}.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise JobError(
            f"Job file '{path}' is not UTF-8 text (byte {exc.start}, line {line}). Save it as UTF-8; is it really a YAML job file?"
        ) from None


def load_yaml(text: str, source: str) -> Any:
    """Parse ``text`` with the safe loader, refusing duplicate keys and alias bombs."""
    if "\x00" in text:
        raise JobError(f"{source}: holds NUL bytes: it is a binary file, not a YAML job file.")
    loader = _JobLoader(text)
    loader.name = source
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        if _expanded_size(root, {}) > MAX_EXPANDED_NODES:
            raise JobError(
                f"{source}: its aliases (&anchor / *alias) expand to more than {MAX_EXPANDED_NODES:,} values. "
                "A job needs a few dozen; write the values out or use fewer nested aliases."
            )
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise JobError(f"{source} is not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def read_job_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A job file as a dict of sections, safely loaded."""
    path = Path(path)
    raw = load_yaml(read_text(path), f"Job file '{path}'")
    if not isinstance(raw, dict):
        raise JobError(f"Job file '{path}' must hold a mapping of sections (model:, data:, ...), not {type(raw).__name__}.")
    return raw
