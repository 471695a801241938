"""A model's files on this machine, from a local folder or a hub id's cache, and the checks that read only them.

A hub id and a local folder take the same path: a hub id's files come from the Hugging Face cache (or the
hub), a folder's from disk. What is checked: ``config.json`` is a model config whose architecture can do the
task, the weights file is there and its header consistent (safetensors headers, or a readable torch zip),
the tokenizer is there for text tasks, ``finetune.freeze_depth`` (also in a tune search space) fits the
block count, and ``peft.target_modules`` name modules the architecture has.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.schema import JobSpec
from engine.errors import JobError
from engine.tasks import get_task

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
"""What a Hugging Face hub id looks like: ``name`` or ``org/name``."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
MAX_HEADER_BYTES = 100 * 2**20


@dataclass
class ModelFiles:
    """Where a model's files are: a local folder, or a hub id's cached snapshot (``folder`` None when not cached)."""

    name: str
    config: dict[str, Any]
    folder: Path | None
    hub: bool

    def find(self, filename: str) -> Path | None:
        """The local path of one of the model's files, or None when it is not on this machine."""
        if self.folder is not None and (self.folder / filename).is_file():
            return self.folder / filename
        return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def locate_model(name: str, revision: str | None) -> ModelFiles:
    """A model's config and the folder of its files, from a local folder or a hub id (cache first)."""
    local = Path(name).expanduser()
    if local.is_file():
        raise JobError(f"model.name: '{name}' is a file, not a model folder. Give the folder that holds config.json, or a hub id.")
    if local.is_dir():
        return ModelFiles(name, read_config(local / "config.json", name), local, hub=False)
    first = local.parts[0] if local.parts else ""
    if not HUB_ID.match(name) or ".." in name or (len(local.parts) > 1 and Path(first).is_dir()):
        raise JobError(f"model.name: folder '{name}' does not exist. Give an existing folder written by save_pretrained, or a hub id (org/model).")
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(name, "config.json", revision=revision))
    except Exception as exc:  # hub errors come in many types; all mean the same to the user
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if hub_offline() else "the hub"
        raise JobError(
            f"model.name: '{name}' is neither a local folder nor a model in {where}: {str(exc).splitlines()[0]} "
            "Check the hub id (org/model) and model.revision, or give a folder written by save_pretrained."
        ) from None
    return ModelFiles(name, read_config(path, name), path.parent, hub=True)


def read_config(path: Path, name: str) -> dict[str, Any]:
    """``config.json`` as a dict with a ``model_type``."""
    if not path.is_file():
        raise JobError(f"model.name: folder '{name}' is not a model: it has no config.json. Point it at a folder written by save_pretrained, or use a hub id.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise JobError(f"model.name: '{path}' is not a JSON model config ({str(exc).splitlines()[0]}). Re-save the model with save_pretrained.") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        got = type(config).__name__ if not isinstance(config, dict) else "an object without model_type"
        raise JobError(f"model.name: '{path}' holds {got}, not a transformers model config (an object with model_type). Re-save the model with save_pretrained.")
    return config


def check_architecture(files: ModelFiles, task: str) -> None:
    """The architecture can do the task; a causal LM is a decoder."""
    from engine.models.loading import supported_model_types

    model_type = files.config["model_type"]
    supported = supported_model_types(get_task(task))
    if model_type not in supported:
        raise JobError(
            f"model.name '{files.name}' is a '{model_type}' model, which cannot do model.task '{task}'. "
            f"Pick a model whose architecture supports {task} (e.g. {', '.join(list(supported)[:5])}, ...) or another task."
        )
    get_task(task).check_architecture(files.config, files.name)


# ---------------------------------------------------------------------------------------------------
# Weights


def safetensors_names(path: Path) -> list[str]:
    """Tensor names of a safetensors file, after checking its header against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"its header claims {length:,} bytes but the file has {size:,}: not safetensors, or cut short")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    names, end = [], 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or len(entry.get("data_offsets", ())) != 2:
            raise ValueError(f"its header entry for '{key}' has no data offsets")
        end = max(end, int(entry["data_offsets"][1]))
        names.append(key)
    if 8 + length + end > size:
        raise ValueError(f"the tensors need {8 + length + end:,} bytes but the file has {size:,}: cut short (an interrupted download or copy?)")
    return names


def torch_zip_names(path: Path) -> list[str]:
    """A ``pytorch_model.bin`` must be a readable torch zip archive (no names: reading them needs torch)."""
    with zipfile.ZipFile(path) as archive:
        archive.infolist()
    return []


def weight_names(files: ModelFiles) -> list[str] | None:
    """Names of the checkpoint's tensors after checking every weights file; None when they are not on this
    machine (a hub model not yet downloaded: the workers fetch it)."""
    found = next(((f, files.find(f)) for f in WEIGHT_FILES if files.find(f)), None)
    if found is None:
        if files.hub and not hub_offline():
            return None
        where = f"folder '{files.folder}'" if not files.hub else f"the local cache of '{files.name}' (HF_HUB_OFFLINE is set)"
        raise JobError(
            f"model.name: {where} has no weights ({', '.join(WEIGHT_FILES)}). Save the model with save_pretrained, "
            "download it, or set model.from_scratch: true to train the architecture from random weights."
        )
    filename, path = found
    shards = [path]
    if filename.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())
            shard_names = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JobError(f"model.name: '{path}' is not a weights index ({exc}). Re-save the model with save_pretrained.") from None
        shards = []
        for shard in shard_names:
            shard_path = files.find(shard)
            if shard_path is None:
                raise JobError(f"model.name: weights shard '{shard}' listed in '{path}' is missing. Download or copy the model again.")
            shards.append(shard_path)
    names: list[str] = []
    for shard in shards:
        reader = safetensors_names if shard.name.endswith(".safetensors") else torch_zip_names
        try:
            names += reader(shard)
        except (OSError, ValueError, zipfile.BadZipFile, struct.error) as exc:
            raise JobError(
                f"model.name: weights file '{shard}' is unreadable: {exc}. Download or copy the model again, or re-save it with save_pretrained."
            ) from None
    return names


def check_tokenizer(files: ModelFiles, job: JobSpec) -> None:
    """Text inputs need the checkpoint's tokenizer (or ``model.tokenizer``)."""
    if job.model.tokenizer:
        return
    present = [f for f in TOKENIZER_FILES if files.find(f)]
    if not present:
        if files.hub and not hub_offline():
            return
        raise JobError(
            f"model.name: '{files.folder}' has no tokenizer ({', '.join(TOKENIZER_FILES[:4])}, ...): the text must be "
            "tokenized exactly as in pre-training. Save the tokenizer beside the model (tokenizer.save_pretrained), "
            "or name one in model.tokenizer."
        )
    if "tokenizer.json" in present:
        try:
            json.loads(files.find("tokenizer.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise JobError(f"model.name: '{files.find('tokenizer.json')}' is not a tokenizer ({str(exc).splitlines()[0]}). Save the tokenizer again.") from None


# ---------------------------------------------------------------------------------------------------
# Settings that depend on the architecture


