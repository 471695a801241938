"""Torch-free checks of a split given as a Hugging Face dataset (``data.train: {hf: org/name, split: train}`` or
``{hf_disk: folder}``) before any worker starts: the dataset is found (the local cache when
``HF_HUB_OFFLINE=1``), the split exists, and its rows live in Arrow files that Ray Data then streams.

The dataset is opened with ``datasets`` itself (``load_dataset``, ``load_from_disk``), so ids, configs and
splits resolve exactly as they do for a user of that library; what the split's rows are is then the list of
Arrow stream files behind it (``Dataset.cache_files``), which ``cluster.ingest.datasets`` reads in Ray Data read tasks.
"""

from __future__ import annotations

import os
from typing import Any

from engine.config.data_section import DatasetSource
from engine.errors import JobError


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _offline_note() -> str:
    from datasets import config

    where = f"the local datasets cache ({config.HF_DATASETS_CACHE})"
    return f"{where}, and HF_HUB_OFFLINE=1 keeps the hub out of reach" if config.HF_HUB_OFFLINE else where


def load_hub_split(source: DatasetSource, key: str) -> Any:
    """``datasets.load_dataset(hf, config, split=split, revision=...)``; its failures as one-line errors."""
    import datasets

    try:
        return datasets.load_dataset(source.hf, source.config, split=source.split, revision=source.revision)
    except ValueError as exc:  # datasets says which split or configuration is wrong, and which there are
        message = " ".join(str(exc).split())
        if "split" in message.lower():
            raise JobError(f"{key}.split: {source.describe()} does not exist: {message} Set {key}.split to one of them.") from None
        if "config" in message.lower():
            raise JobError(f"{key}.config: {source.describe()}: {message} Set {key}.config to one of them.") from None
        raise JobError(f"{key}: could not load {source.describe()}: {message}") from None
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise JobError(
            f"{key}.hf: dataset '{source.hf}' was not found in {_offline_note()} ({_first_line(exc)}). Fix the id, "
            f"or load it once where the hub is reachable (datasets.load_dataset('{source.hf}')) with this HF_HOME, "
            "or point HF_HOME at the cache that holds it."
        ) from None
    except Exception as exc:  # noqa: BLE001 (a broken cache, a dataset needing extras, ...)
        raise JobError(f"{key}: could not load {source.describe()}: {type(exc).__name__}: {_first_line(exc)}") from None


def load_disk_split(source: DatasetSource, key: str) -> Any:
    """``datasets.load_from_disk(hf_disk)``, and the named split of a ``DatasetDict`` folder."""
    import datasets

    folder = os.path.expanduser(source.hf_disk)
    if not os.path.isdir(folder):
        raise JobError(f"{key}.hf_disk: folder '{source.hf_disk}' does not exist. Fix the path (relative paths are relative "
                       "to the directory you run shoulders from).")
    try:
        loaded = datasets.load_from_disk(folder)
    except FileNotFoundError:
        raise JobError(
            f"{key}.hf_disk: '{source.hf_disk}' is not a folder written by datasets' save_to_disk (it has neither "
            "state.json with dataset_info.json nor dataset_dict.json). Give the folder passed to save_to_disk, or give "
            f"parquet/jsonl/csv files as a path ({key}: path/to/files)."
        ) from None
    except Exception as exc:  # noqa: BLE001 (a half-written or foreign folder)
        raise JobError(f"{key}.hf_disk: could not read '{source.hf_disk}' with datasets.load_from_disk: {_first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            found = "has no split '{}'".format(source.split) if source.split else "holds several splits"
            raise JobError(f"{key}.split: '{source.hf_disk}' {found}; its splits are {', '.join(loaded)}. "
                           f"Set {key}.split to one of them.")
        return loaded[source.split]
    if source.split:
        raise JobError(f"{key}.split: '{source.hf_disk}' holds one dataset, not splits (split '{source.split}' given). "
                       f"Remove {key}.split.")
    return loaded


def dataset_split_files(source: DatasetSource, key: str) -> tuple[list[str], int]:
    """The Arrow stream files that hold a split of a Hugging Face dataset, and its row count.

    Raises:
        JobError: naming the key (``data.train.hf``, ``.split``, ``.config``, ``.hf_disk``) and the fix.
    """
    dataset = load_hub_split(source, key) if source.hf is not None else load_disk_split(source, key)
    files = [entry["filename"] for entry in dataset.cache_files]
    if not files:
        raise JobError(f"{key}: {source.describe()} has no files on disk (it was built in memory). Save it with "
                       f"save_to_disk and give that folder as {key}: {{hf_disk: folder}}.")
    return [os.path.abspath(f) for f in files], dataset.num_rows
