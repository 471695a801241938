"""Prompt/completion and chat rows for ``causal_lm``: rendered with a chat template, labels on the answers only.

numpy in, numpy out, no Ray. A row becomes a list of ``{role, content}`` messages; the chat template (the
tokenizer's own, or ``data.chat_template``) renders it to text, and the characters of every assistant turn
are found by rendering the conversation up to that turn twice: once ending with the generation prompt
(``add_generation_prompt=True``: the text before the answer) and once with the answer (the text after it).
Tokens whose characters overlap those spans are targets; every other token is ``-100``. This works with
any template that renders earlier turns the same whatever follows (ChatML/Qwen, Llama 3, Mistral, Gemma);
one that does not is refused by name. The end-of-turn marker the template writes after an answer counts
as part of the answer, so the model learns to stop.

Without any chat template, ``prompt_completion`` rows are plain text: ``prompt + completion + EOS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
TRUNCATED = "truncated"
"""Per-row flag column (1 = the row was longer than ``data.max_length`` and cut) of the training split."""

Message = dict[str, str]


def as_messages(value: Any) -> list[Message]:
    """A chat cell (a list or numpy array of mappings, as pyarrow and Ray Data give them) as plain dicts."""
    return [{"role": str(m["role"]), "content": "" if m.get("content") is None else str(m["content"])} for m in list(value)]


def with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """``messages`` with ``system_prompt`` first, unless it is empty or the chat already starts with a system message."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def row_messages(batch: dict[str, np.ndarray], i: int, layout: str, columns: dict[str, str], system_prompt: str | None) -> list[Message]:
    """Row ``i`` of a batch as messages. ``columns``: ``prompt``/``completion`` or ``messages`` -> column name."""
    if layout == "chat":
        messages = as_messages(batch[columns["messages"]][i])
    else:
        messages = [
            {"role": "user", "content": str(batch[columns["prompt"]][i])},
            {"role": "assistant", "content": str(batch[columns["completion"]][i])},
        ]
    return with_system(messages, system_prompt)


def template_of(tokenizer: Any, chat_template: str | None) -> str | None:
    """The template that renders rows: the job's, else the tokenizer's own, else None."""
    return chat_template or getattr(tokenizer, "chat_template", None) or None


def render(tokenizer: Any, messages: list[Message], template: str, generation_prompt: bool = False) -> str:
    """``messages`` rendered to text by ``template`` (with the assistant header at the end when asked)."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt)


def prompt_text(tokenizer: Any, messages: list[Message], template: str | None) -> str:
    """The text a model continues to answer ``messages`` (which end with a user turn): training and
    ``shoulders generate`` build prompts the same way."""
    if template is not None:
        return render(tokenizer, messages, template, generation_prompt=True)
    system = [m["content"] for m in messages if m["role"] == "system"]
    user = [m["content"] for m in messages if m["role"] == "user"]
    return "".join(s + "\n\n" for s in system) + "\n\n".join(user)


def answer_spans(tokenizer: Any, messages: list[Message], template: str | None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of its assistant turns.

    Raises:
        ValueError: no assistant turn, an assistant turn first, or a template that renders a turn
            differently once later turns follow (its spans cannot be found by prefix).
    """
    if template is None:  # plain prompt + completion + EOS (prompt_completion only; preflight refuses chat)
        prompt = prompt_text(tokenizer, messages[:-1], None)
        text = prompt + messages[-1]["content"] + (tokenizer.eos_token or "")
        return text, [(len(prompt), len(text))]
    full = render(tokenizer, messages, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if not any(m["role"] == "user" for m in messages[:i]):
            raise ValueError(f"message {i} is an assistant turn before any user turn")
        before = render(tokenizer, messages[:i], template, generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], template)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(
                "the chat template renders a turn differently once later turns follow, so the answer tokens cannot "
                "be found; give a template that does not (data.chat_template)"
            )
        spans.append((len(before), len(upto)))
    if not spans:
        raise ValueError("the conversation has no assistant turn to learn from")
    return full, spans


def token_labels(offsets: Sequence[tuple[int, int]], ids: Sequence[int], spans: list[tuple[int, int]]) -> list[int]:
    """Labels of one tokenized row: the token id where its characters overlap an answer span, else -100."""
    labels = []
    for token, (start, end) in zip(ids, offsets):
        inside = end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(int(token) if inside else IGNORE_INDEX)
    return labels


def keep_answer(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut a row to ``max_length`` tokens keeping its last answer: the start of the conversation goes first
    (earlier turns, then the prompt's beginning); only an answer longer than ``max_length`` loses its end.
    Returns the ids, the labels and whether anything was cut."""
    n = len(ids)
    if n <= max_length:
        return ids, labels, False
    targets = [j for j, label in enumerate(labels) if label != IGNORE_INDEX]
    last_start = targets[-1] if targets else n - max_length
    while last_start > 0 and labels[last_start - 1] != IGNORE_INDEX:
        last_start -= 1  # back to the first token of the last answer
    start = max(min(n - max_length, last_start), 0)
    return ids[start : start + max_length], labels[start : start + max_length], True


def encode_row(tokenizer: Any, messages: list[Message], template: str | None, max_length: int) -> tuple[list[int], list[int], bool]:
    """One conversation -> (input ids, labels, truncated)."""
    text, spans = answer_spans(tokenizer, messages, template)
    # A template writes its own BOS and control tokens; plain text gets the tokenizer's usual ones.
    encoded = tokenizer(text, add_special_tokens=template is None, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    return keep_answer(ids, token_labels(encoded["offset_mapping"], ids, spans), max_length)


def encode_conversations(
    batch: dict[str, np.ndarray], *, tokenizer: Any, layout: str, columns: dict[str, str], max_length: int,
    system_prompt: str | None = None, chat_template: str | None = None, mark_truncated: bool = False, id_column: str | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize a batch of prompt/completion or chat rows into fixed-length arrays.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (answer tokens only) padded to ``max_length``
    on the right, plus ``truncated`` (1 per cut row) when ``mark_truncated`` and ``sample_id`` from
    ``id_column`` when given.

    Raises:
        ValueError: a row that cannot be rendered, naming its position in the batch.
    """
    template = template_of(tokenizer, chat_template)
    n = len(next(iter(batch.values())))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((n, max_length), pad, dtype=np.int64)
    mask = np.zeros((n, max_length), dtype=np.int64)
    labels = np.full((n, max_length), IGNORE_INDEX, dtype=np.int64)
    cut = np.zeros(n, dtype=np.int64)
    for i in range(n):
        try:
            row_ids, row_labels, cut[i] = encode_row(tokenizer, row_messages(batch, i, layout, columns, system_prompt), template, max_length)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"data.layout {layout}: row {i} of a batch cannot be encoded: {exc}") from None
        ids[i, : len(row_ids)] = row_ids
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_labels)] = row_labels
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if mark_truncated:
        out[TRUNCATED] = cut
    if id_column is not None:
        out["sample_id"] = np.asarray(batch[id_column], dtype=np.int64)
    return out


def layout_columns(data: Any) -> dict[str, str]:
    """The columns a job's ``data.layout`` reads (role -> column name)."""
    if data.layout == "chat":
        return {"messages": data.messages_column}
    if data.layout == "prompt_completion":
        return {"prompt": data.prompt_column, "completion": data.completion_column}
    return {"text": data.text_column}


def retention_column(job: Any) -> str:
    """The column whose first rows form the forgetting retention set (``safeguards.track_forgetting``): the
    text, the prompts, or the chats of instruction data (for tasks that measure forgetting)."""
    if job.safeguards.retention_data:
        return job.data.text_column
    columns = layout_columns(job.data)
    return columns.get("text") or columns.get("prompt") or columns["messages"]


def retention_text(value: Any) -> str:
    """One retention row as text: a chat's messages joined by newlines, anything else as it is."""
    if isinstance(value, (list, tuple)):
        return "\n".join(str(m.get("content") or "") for m in value if isinstance(m, dict))
    return str(value)
