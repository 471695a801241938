"""Torch-free checks of prompt/completion and chat data (``data.layout``) before any worker starts.

The chat template is read from the checkpoint's files (``chat_template.jinja`` or ``tokenizer_config.json``),
never through ``transformers``; rows are read with pyarrow, a column at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.ingest.rows import iter_column
from engine.config.schema import JobSpec
from engine.errors import JobError
from engine.preprocessing.chat import ROLES

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def text_required_columns(job: JobSpec) -> list[str]:
    """The ``data.*_column`` keys a ``data.layout`` reads."""
    if job.data.layout == "chat":
        return ["messages_column"]
    return ["prompt_column", "completion_column"]


def _read_file(name: str, filename: str, revision: str | None) -> str | None:
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / filename
        return path.read_text() if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, filename, revision=revision)).read_text()
    except Exception:  # not on the hub, or offline and not cached: unknown here
        return None


def checkpoint_chat_template(name: str, revision: str | None = None) -> str | None | bool:
    """The checkpoint's chat template text; None when it has none; False when its tokenizer files cannot
    be read here (a hub id offline and not cached: the workers find out)."""
    found_any = False
    for filename in TEMPLATE_FILES:
        text = _read_file(name, filename, revision)
        if text is None:
            continue
        found_any = True
        if filename.endswith(".jinja"):
            return text
        template = json.loads(text).get("chat_template")
        if template:
            return template if isinstance(template, str) else json.dumps(template)
    return None if found_any else False


def check_chat_template(job: JobSpec) -> None:
    """``layout: chat`` needs a chat template: the job's (``data.chat_template``) or the checkpoint's."""
    if job.data.layout != "chat" or job.data.chat_template:
        return
    if checkpoint_chat_template(job.model.name, job.model.revision) is None:
        raise JobError(
            f"data.layout is chat but model.name '{job.model.name}' has no chat template (chat_template.jinja or "
            "tokenizer_config.json's chat_template). Give one in data.chat_template (Jinja text or a .jinja file), "
            "or use an instruct model."
        )


def chat_row_problem(value: Any) -> str | None:
    """What is wrong with one chat cell, or None."""
    if not isinstance(value, list) or not value:
        return "is not a non-empty list of {role, content} messages"
    assistant = False
    for j, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message:
            return f"message {j} is not a {{role, content}} mapping"
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            return f"message {j} has role '{role}'; roles must be one of {', '.join(ROLES)}"
        if role == "assistant":
            if not (isinstance(content, str) and content.strip()):
                return f"message {j} is an assistant turn with empty content"
            if not any(m.get("role") == "user" for m in value[:j]):
                return f"message {j} is an assistant turn before any user turn"
            assistant = True
    return None if assistant else "has no assistant turn to learn from"


def check_rows(job: JobSpec, split: Any) -> None:
    """Refuse the first bad row of a split: an unknown role, an empty answer, a chat without an answer."""
    data, key = job.data, f"data.{split.name}"
    if data.layout == "chat":
        for i, value in enumerate(iter_column(split.files, split.format, data.messages_column)):
            problem = chat_row_problem(value)
            if problem:
                raise JobError(f"{key} row {i}: column '{data.messages_column}' (data.messages_column) {problem}. Fix or remove the row.")
        return
    for column, column_key in ((data.prompt_column, "prompt_column"), (data.completion_column, "completion_column")):
        for i, value in enumerate(iter_column(split.files, split.format, column)):
            if value is None or not str(value).strip():
                raise JobError(f"{key} row {i}: column '{column}' (data.{column_key}) is empty. Fix or remove the row.")


def check_text(job: JobSpec, splits: dict[str, Any]) -> None:
    """All prompt/completion and chat checks of a job (nothing for ``data.layout: text``)."""
    if job.data.layout == "text":
        return
    check_chat_template(job)
    for split in splits.values():
        check_rows(job, split)


def check_retention_text(job: JobSpec) -> None:
    """``safeguards.retention_data``: readable files with the text column, not empty."""
    from cluster.ingest.rows import open_dataset
    from cluster.ingest.splits import detect_format, is_uri, resolve_files

    spec = job.safeguards
    if not (spec.track_forgetting and spec.retention_data) or is_uri(spec.retention_data):
        return
    key = "safeguards.retention_data"
    files = resolve_files(spec.retention_data, key)
    fmt = detect_format(files, "auto", key)
    try:
        dataset = open_dataset(files, fmt)
        columns, rows = dataset.schema.names, dataset.count_rows()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise JobError(f"{key}: could not read '{spec.retention_data}' as {fmt}: {str(exc).splitlines()[0]}") from None
    if job.data.text_column not in columns:
        raise JobError(f"{key}: '{spec.retention_data}' has no column '{job.data.text_column}' (data.text_column); its columns are {sorted(columns)}.")
    if rows == 0:
        raise JobError(f"{key}: '{spec.retention_data}' has no rows. Give general text of the source domain, or remove {key}.")
