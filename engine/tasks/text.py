"""The text modality's share of the task protocol: the checkpoint's tokenizer, rows tokenized in ``map_batches``.

The functions Ray Data maps (:func:`tokenize_rows`, :func:`encode_conversation_rows`) are module-level so
they pickle; they load the tokenizer once per process (``engine.preprocessing.text.cached_tokenizer``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from engine.tasks.base import Task

if TYPE_CHECKING:
    from engine.config.schema import JobSpec


def tokenize_rows(batch: dict[str, np.ndarray], tokenizer_name: str, revision: str | None, **kwargs: Any) -> dict[str, np.ndarray]:
    """:func:`engine.preprocessing.text.tokenize_batch` with the named checkpoint's tokenizer."""
    from engine.preprocessing.text import cached_tokenizer, tokenize_batch

    return tokenize_batch(batch, tokenizer=cached_tokenizer(tokenizer_name, revision), **kwargs)


def encode_conversation_rows(batch: dict[str, np.ndarray], tokenizer_name: str, revision: str | None, seq2seq: bool = False,
                             **kwargs: Any) -> dict[str, np.ndarray]:
    """Prompt/completion or chat rows encoded for a decoder (``engine.preprocessing.chat``) or an encoder-decoder (``engine.preprocessing.seq2seq``)."""
    from engine.preprocessing.chat import encode_conversations
    from engine.preprocessing.seq2seq import encode_pairs
    from engine.preprocessing.text import cached_tokenizer

    encode = encode_pairs if seq2seq else encode_conversations
    return encode(batch, tokenizer=cached_tokenizer(tokenizer_name, revision), **kwargs)


class TextTask(Task):
    """A task on text read by the checkpoint's own tokenizer (``data.layout`` text, prompt/completion or chat)."""

    modality = "text"
    has_classes: ClassVar[bool] = False
    """Declarative, for this share's column and preprocessing choices: the targets are class names (``data.label_column``)."""
    encoder_decoder_text: ClassVar[bool] = False
    """Declarative, for this share's preprocessing: the prompt feeds the encoder, the completion is the decoder's target."""

    def required_columns(self, job: JobSpec) -> list[str]:
        """``text_column`` (and ``text_pair_column``), plus ``label_column`` for tasks with classes."""
        keys = ["text_column"]
        if job.data.text_pair_column:
            keys.append("text_pair_column")
        if self.has_classes:
            keys.append("label_column")
        return keys

    def batch_preprocessor(self, job: JobSpec, labels: list[str] | None, *, source: str | None = None, keep_ids: bool = False,
                           base_dir: str | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Tokenize with the checkpoint's tokenizer; only model inputs remain (and ``sample_id`` when ``keep_ids``:
        prompt/completion and chat layouts then also mark the rows cut to ``data.max_length``)."""
        from engine.preprocessing.chat import layout_columns

        if job.data.layout != "text":
            return functools.partial(
                encode_conversation_rows, tokenizer_name=source or job.model.name, revision=job.model.revision,
                layout=job.data.layout, columns=layout_columns(job.data), max_length=job.data.max_length,
                system_prompt=job.data.system_prompt, chat_template=job.data.chat_template, mark_truncated=keep_ids,
                id_column=job.data.id_column if keep_ids else None, seq2seq=self.encoder_decoder_text,
            )
        return functools.partial(
            tokenize_rows,
            tokenizer_name=source or job.model.name,
            revision=job.model.revision,
            lm_labels=self.next_token_loss,
            text_column=job.data.text_column,
            text_pair_column=job.data.text_pair_column,
            label_column=job.data.label_column if self.has_classes else None,
            labels=labels,
            max_length=job.data.max_length,
            id_column=job.data.id_column if keep_ids else None,
        )

    def preprocessors(self, job: JobSpec) -> tuple[list[Any], int | None]:
        """The checkpoint's tokenizer (with the job's chat template, which the export keeps) and its pad id."""
        from engine.models.loading import load_tokenizer

        tokenizer = load_tokenizer(job.model.name, job.model.revision)
        if job.data.chat_template:  # the export keeps the template it was trained with
            tokenizer.chat_template = job.data.chat_template
        return [tokenizer], tokenizer.pad_token_id

    def text_tokenizer(self, job: JobSpec) -> Any:
        """The checkpoint's tokenizer (one per process)."""
        from engine.preprocessing.text import cached_tokenizer

        return cached_tokenizer(job.model.name, job.model.revision)
