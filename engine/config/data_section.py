"""The ``data:`` section of the job schema: where each split comes from (files or a Hugging Face dataset) and
how its rows are read. :class:`engine.config.schema.JobSpec` puts it together with the other sections
(:mod:`engine.config.sections`). No torch or Ray here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from engine.config.sections import Section


class DatasetSource(Section):
    """A split of a Hugging Face ``datasets`` dataset: ``{hf: org/name, split: train}`` (a hub dataset id, read
    with ``datasets.load_dataset``, from the local cache when ``HF_HUB_OFFLINE=1``) or ``{hf_disk: folder}`` (a
    folder written by ``save_to_disk``, with ``split`` when it holds a ``DatasetDict``). Its columns are named
    by the ``data.*_column`` keys as for files."""

    hf: str | None = None
    """Hub dataset id (``org/name``), read with ``datasets.load_dataset`` (offline: from ``$HF_HOME/datasets``)."""
    hf_disk: str | None = None
    """A folder written by ``datasets``' ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    split: str | None = None
    """The split to read (``train``, ``validation``, ...): required with ``hf``; with ``hf_disk``, required
    when the folder holds a ``DatasetDict`` and left out for a single ``Dataset``. Slices (``train[:100]``)
    are not supported."""
    config: str | None = None
    """``hf``: the dataset's configuration (subset) name; left empty, its default."""
    revision: str | None = None
    """``hf``: hub revision (branch, tag or commit)."""

    @model_validator(mode="after")
    def _check_source(self) -> DatasetSource:
        if (self.hf is None) == (self.hf_disk is None):
            raise ValueError("give exactly one of hf (a hub dataset id) and hf_disk (a save_to_disk folder)")
        if self.hf is not None and not self.split:
            raise ValueError(f"hf '{self.hf}' needs a split, e.g. split: train")
        if self.hf_disk is not None and (self.config or self.revision):
            raise ValueError("config and revision apply to hf (a hub dataset id), not to an hf_disk folder")
        if self.split and any(c in self.split for c in "[]+%"):
            raise ValueError(f"split '{self.split}': slices and split arithmetic are not supported; name one split")
        return self

    def describe(self) -> str:
        """How messages name this source: ``hub dataset 'org/name' split 'train'`` or ``save_to_disk folder '...'``."""
        split = f" split '{self.split}'" if self.split else ""
        if self.hf is not None:
            return f"hub dataset '{self.hf}'{f' config {self.config!r}' if self.config else ''}{split}"
        return f"save_to_disk folder '{self.hf_disk}'{split}"


SOURCE_TAGS = ("path", "dataset")
"""Tags of the :data:`DataSource` union (pydantic puts them in error locations; ``engine.config.schema`` drops them)."""
DataSource = Annotated[
    Annotated[str, Tag("path")] | Annotated[DatasetSource, Tag("dataset")],
    Discriminator(lambda v: "path" if isinstance(v, str) else "dataset"),
]
"""A data split: files (a path, folder, glob or URI) or a :class:`DatasetSource` mapping."""


class DataSpec(Section):
    train: DataSource
    """Training data: a file, folder or glob of parquet, jsonl or csv files (local path or filesystem URI), or
    a Hugging Face dataset: ``{hf: org/name, split: train}`` (optional ``config``, ``revision``) or
    ``{hf_disk: folder, split: train}`` (a ``save_to_disk`` folder)."""
    validation: DataSource | None = None
    """Validation data (same forms). Left empty, ``validation_fraction`` of the training rows is held out."""
    test: DataSource | None = None
    """Test data, evaluated once on the best checkpoint after training."""
    format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    """File format; ``auto`` picks it from the file extension (Hugging Face datasets need none)."""
    text_column: str = "text"
    """Column with the input text."""
    text_pair_column: str | None = None
    """Optional second text column for sentence-pair tasks."""
    label_column: str = "label"
    """Column with the class label (a class name, or an integer index into ``model.labels``)."""
    layout: Literal["text", "prompt_completion", "chat"] = "text"
    """``causal_lm``: how a row reads. ``text``: one text column, every token a target. ``prompt_completion``:
    a prompt and its answer, rendered with the chat template (the model's, or ``data.chat_template``; without
    any, prompt + answer + EOS), the loss on the answer only. ``chat``: a list of ``{role, content}`` messages
    rendered with the chat template, the loss on every assistant turn."""
    prompt_column: str = "prompt"
    """``layout: prompt_completion``: column with the prompt (instruction)."""
    completion_column: str = "completion"
    """``layout: prompt_completion``: column with the answer the model learns to write."""
    messages_column: str = "messages"
    """``layout: chat``: column with a list of ``{role, content}`` messages (roles system, user, assistant)."""
    system_prompt: str | None = None
    """``prompt_completion`` / ``chat``: a system message put first in every row that has none."""
    chat_template: str | None = None
    """A Jinja chat template (or the path of a ``.jinja`` file) used instead of the tokenizer's own; saved
    with the exported tokenizer. Needed for ``layout: chat`` when the model has none."""
    max_length: int = Field(128, gt=0)
    """Tokens per example after truncation; batches are then trimmed to their longest example."""
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the training rows held out for validation when ``data.validation`` is not given."""
    bad_rows: Literal["error", "skip"] = "error"
    """A row with a null or non-text input, a null or unknown label, or null audio: ``error`` stops the run
    naming the file and row (the first rows of every file are checked before it starts, the rest while
    streaming); ``skip`` drops such rows and logs how many."""
    rows_per_block: int = Field(256, gt=0)
    """Target rows per Ray Data block, so small files still stream as several blocks."""
    id_column: str | None = None
    """Optional column of integer sample ids. When set, each worker records the ids it trained on in every
    checkpoint (``rank-<r>/position.json``), so a resumed run can be audited: no sample skipped or seen twice."""
    audio_column: str = "audio"
    """Speech tasks: column with the audio, as a file path (relative paths are relative to the manifest's
    folder), the encoded file's bytes, or a ``{bytes, path}`` struct as Hugging Face datasets write to parquet."""
    transcript_column: str = "transcript"
    """ASR tasks (``ctc``, ``speech_seq2seq``): column with the transcript of each clip."""
    resample: bool = True
    """Speech tasks: resample audio whose rate differs from the checkpoint's (logged with both rates); ``false``
    refuses such data before training starts."""
    sampling_rate: int | None = Field(None, gt=0)
    """Speech tasks: the rate the model hears; left empty, the checkpoint feature extractor's. A value that
    contradicts the checkpoint is refused (the model would hear sped-up or slowed-down audio)."""
    normalize: bool | None = None
    """Speech tasks: zero-mean unit-variance waveform normalisation; left empty, as the checkpoint's feature
    extractor does it (``do_normalize``). A value that contradicts the checkpoint is refused."""
    max_audio_seconds: float = Field(10.0, gt=0)
    """Speech tasks: clips are cut to this length (Whisper always hears its fixed window); batches are
    padded only to their longest clip, and rows are grouped by length inside each block."""

    image_column: str = "image"
    """Image tasks: column with the image, as a file path (relative paths are relative to the data file's folder),
    the encoded file's bytes (png, jpeg, ...), or a ``{bytes, path}`` struct as Hugging Face datasets write to parquet."""
    image_size: int | None = Field(None, gt=0)
    """Image tasks: the side of the square images the model sees; left empty, the checkpoint image processor's
    (its crop, or its size). A value that contradicts the checkpoint is refused unless ``preprocessing_override``."""
    image_mean: list[float] | None = Field(None, min_length=3, max_length=3)
    """Image tasks: per-channel (RGB) normalisation mean; left empty, the checkpoint's. A value that contradicts the
    checkpoint is refused unless ``preprocessing_override``."""
    image_std: list[float] | None = Field(None, min_length=3, max_length=3)
    """Image tasks: per-channel (RGB) normalisation standard deviation; left empty, the checkpoint's. A value that
    contradicts the checkpoint is refused unless ``preprocessing_override``."""
    preprocessing_override: bool = False
    """Image tasks: train with ``image_size`` / ``image_mean`` / ``image_std`` even where they differ from the
    checkpoint's processor (logged; the export saves the processor as trained, so inference matches)."""
    augment: bool = True
    """Image tasks: augment training images (random resized crop, horizontal flip; validation and test never),
    seeded by ``seed``, the worker and the batch's position, so a resumed run draws the same crops."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Image tasks with ``augment``: the share of the image area a random crop covers (min, max), resized back to
    the model's input size."""
    hflip: bool = True
    """Image tasks with ``augment``: flip training images left-right with probability 1/2 (turn off for data whose
    meaning changes in a mirror: digits, text)."""

    @field_validator("crop_scale")
    @classmethod
    def _check_crop_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.crop_scale is {list(value)}: give (min, max) with 0 < min <= max <= 1")
        return value

    @field_validator("chat_template", mode="before")
    @classmethod
    def _read_chat_template_file(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().endswith(".jinja"):
            from pathlib import Path

            path = Path(value.strip()).expanduser()
            if not path.is_file():
                raise ValueError(f"data.chat_template: file '{value}' does not exist")
            return path.read_text()
        return value
