"""What a task is: one small protocol every ``engine/tasks/<task>.py`` module implements, and the registry.

A task owns what depends on it and nothing else: the columns it reads, its torch-free checks (the
preflight and the job schema call them), the preprocessing function Ray Data maps over batches, how its
model is loaded (the ``transformers`` Auto class, config overrides, which modules are the head), its
evaluation metrics, and what its export saves beside the weights. Code outside ``engine/tasks/`` never
compares a task's name: it asks the task, and the task does the work that differs (``task.packs_rows(job)``,
``task.forgetting_measure(job)``, ``task.head_names(model)``, ...), so no caller branches on a yes/no flag.

Task modules are importable without torch (the driver's ``validate``/``submit`` paths use them); anything
heavy is imported inside the method that needs it. Shared modality code (tokenization, chat templates,
audio decoding, featurising, decoding transcripts, image decoding and processing) lives below the tasks, in
``engine.preprocessing.text*``, ``engine.preprocessing.chat``, ``engine.preprocessing.seq2seq``, ``engine.preprocessing.image``,
``engine.evaluation.asr``, ``engine.models.speech`` and ``engine.models.vision``, and never imports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from engine.config.schema import JobSpec

TASK_MODULES: dict[str, str] = {
    "sequence_classification": "engine.tasks.sequence_classification",
    "causal_lm": "engine.tasks.causal_lm",
    "seq2seq": "engine.tasks.seq2seq",
    "audio_classification": "engine.tasks.audio_classification",
    "ctc": "engine.tasks.ctc",
    "speech_seq2seq": "engine.tasks.speech_seq2seq",
    "image_classification": "engine.tasks.image_classification",
}
"""Task name (``model.task``) -> the module that defines it (its ``TASK``), in the schema's order."""

DEFAULT_TASK = "sequence_classification"
"""The task of a job (or an export) that names none."""


class Task:
    """The protocol: class attributes describe the task, methods do what differs between tasks.

    A new task subclasses :class:`Task` (or a modality base: ``engine.tasks.text.TextTask``,
    ``engine.tasks.audio.AudioTask``, ``engine.tasks.image.ImageTask``), sets the attributes, overrides the methods whose defaults do not
    fit, and is listed in :data:`TASK_MODULES` (and the schema's ``Task`` literal).
    """

    name: ClassVar[str]
    """``model.task``."""
    modality: ClassVar[str] = "text"
    """What the model reads: ``text`` (a tokenizer), ``audio`` (a feature extractor) or ``image`` (an image processor)."""
    auto_class: ClassVar[str]
    """The ``transformers`` Auto class that builds the model with the task's head."""
    architectures: ClassVar[str]
    """The ``transformers`` table (``MODEL_FOR_..._MAPPING_NAMES``) of architectures that support the task."""
    metrics: ClassVar[tuple[str, ...]]
    """Validation metrics the task reports (``eval.metric`` and ``tune.metric`` pick one)."""
    default_metric: ClassVar[str] = "loss"
    """The validation metric that picks checkpoints when ``eval.metric`` is not set."""
    layouts: ClassVar[tuple[str, ...]] = ("text",)
    """The ``data.layout`` values the task trains on."""
    next_token_loss: ClassVar[bool] = False
    """Declarative, a fact of the model's loss rather than a capability to branch on: the loss is transformers' own
    next-token loss (causal LM), which upcasts its logits itself and needs no KV cache while training. The
    backends and the speed features read it for that reason only."""
    answers_prompts: ClassVar[bool] = False
    """Declarative: it writes text answers to text prompts (exact match / ROUGE-L at evaluation); read only by
    :func:`prompt_task`, which picks the task ``shoulders generate`` loads an export as."""
    head_modules: ClassVar[tuple[str, ...]] = ()
    """Attribute names of the task head the engine creates (the first present is used)."""
    freeze_stack: ClassVar[str | None] = None
    """Which stack ``finetune.freeze_depth`` counts in encoder-decoder models (``encoder``), or None."""
    peft_task_type: ClassVar[str | None] = None
    """PEFT's ``task_type`` for the task's model, or None."""

    # ---------------------------------------------------------------- torch-free: schema and preflight

    def check_job(self, job: JobSpec) -> None:
        """Schema checks of a job for this task (pydantic turns the ``ValueError`` into a validation error).

        Raises:
            ValueError: the job's data layout or labels do not fit the task.
        """
        layout = job.data.layout
        if layout != "text" and layout not in self.layouts:
            allowed = [task.name for task in all_tasks() if layout in task.layouts]
            raise ValueError(f"data.layout is '{layout}' but model.task is '{self.name}': {layout} data trains model.task {' or '.join(allowed)}")

    def check_settings(self, job: JobSpec) -> None:
        """Preflight checks of the job's settings for this task (no data read).

        Raises:
            engine.errors.JobError: a setting that cannot work for this task.
        """

    def required_columns(self, job: JobSpec) -> list[str]:
        """The ``data.*_column`` keys the task reads (``data.layout: text``); ``label_column`` among them means
        the targets are class names (the preflight then settles and checks the labels)."""
        raise NotImplementedError

    def check_architecture(self, config: dict[str, Any], name: str) -> None:
        """Preflight check that the checkpoint's config (``config.json`` as a dict) can start this task well.

        Raises:
            engine.errors.JobError: naming the model and what to use instead.
        """

    def settle_target_tokenizer(self, job: JobSpec, transcripts: Callable[[], list[str]], out_dir: Any) -> JobSpec:
        """The job with the tokenizer its targets use settled before the run (default: the checkpoint's)."""
        return job

    def forgetting_measure(self, job: JobSpec) -> str | None:
        """How forgetting is measured on a retention set when ``safeguards.forgetting_measure`` is ``auto``:
        ``cka`` of pooled hidden states by default; None when no retention measure applies to the task."""
        return "cka"

    def packs_rows(self, job: JobSpec) -> bool:
        """Whether training rows are packed into full-length sequences (``perf.packing`` where the task supports it)."""
        return False

    def groups_by_length(self, job: JobSpec) -> bool:
        """Whether training micro-batches group rows of similar length (``perf.group_by_length``)."""
        return job.perf.group_by_length

    def eval_metric(self, job: JobSpec) -> str:
        """The validation metric that picks checkpoints: ``eval.metric`` or the task's default."""
        return job.eval.metric or self.default_metric

    # ---------------------------------------------------------------- preprocessing (Ray Data maps it)

    def batch_preprocessor(self, job: JobSpec, labels: list[str] | None, *, source: str | None = None, keep_ids: bool = False,
                           base_dir: str | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The picklable function ``map_batches`` applies: raw rows (numpy columns) in, model inputs out.

        Args:
            job: the validated job.
            labels: class names (tasks with classes).
            source: where the tokenizer / feature extractor is (default: the job's checkpoint; an export folder for ``shoulders eval``).
            keep_ids: keep ``sample_id`` (and truncation marks) for the training split's resume audits.
            base_dir: the folder relative audio paths are resolved against.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- model and evaluation (worker side)

    def config_overrides(self, job: JobSpec, config: Any) -> dict[str, Any]:
        """Config attributes set on the checkpoint's ``config`` before the model is built: SpecAugment's
        ``finetune.mask_time_prob`` when the job sets it, switched on where the config gates it off
        (``apply_spec_augment: false``, as Whisper's configs ship)."""
        overrides: dict[str, Any] = {}
        if job.finetune.mask_time_prob is not None:
            overrides["mask_time_prob"] = job.finetune.mask_time_prob
            if getattr(config, "apply_spec_augment", None) is not None:
                overrides["apply_spec_augment"] = bool(config.apply_spec_augment) or job.finetune.mask_time_prob > 0
        return overrides

    def head_names(self, model: Any) -> list[str]:
        """Attribute names of the task head the engine creates, present on ``model`` (the first of :attr:`head_modules`)."""
        return [name for name in self.head_modules if hasattr(model, name)][:1]

    def kept_head_misfit(self, own_tokenizer: bool) -> str | None:
        """Why a checkpoint's head cannot be kept for this job's targets beyond its labels (None: it can)."""
        return None

    def preprocessors(self, job: JobSpec) -> tuple[list[Any], int | None]:
        """What an export saves beside the weights (tokenizer, feature extractor), and the model's pad id."""
        raise NotImplementedError

    def text_tokenizer(self, job: JobSpec) -> Any:
        """The tokenizer of the model's text inputs (None when its inputs are not text)."""
        return None

    def build_metrics(self, job: JobSpec, num_labels: int | None, device: Any, model: Any = None, amp_dtype: Any = None,
                      tokenizer: Any = None) -> Any:
        """The metrics of one evaluation pass (``update(outputs, batch)``, ``compute()``); see ``engine.evaluation.metrics``."""
        from engine.evaluation.metrics import TaskMetrics

        return TaskMetrics(num_labels, device, self.next_token_loss)

    def train_augmentation(self, job: JobSpec) -> Callable[[dict[str, Any], Any], dict[str, Any]] | None:
        """``(batch, numpy Generator) -> batch``: random augmentation of a training batch (numpy columns) on the
        worker, or None. The loop seeds the generator from ``job.seed``, the rank and the batch's position in the
        epoch, so a resumed run draws exactly what the interrupted one would have; evaluation never augments."""
        return None

    def export_metrics(self, job: JobSpec, model: Any, export_dir: Any, device: str) -> Any:
        """Metrics for evaluating an exported folder (None: the default :meth:`build_metrics` of a plain pass)."""
        return None


_REGISTRY: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The task named ``name`` (``model.task``).

    Raises:
        ValueError: an unknown task, naming the known ones.
    """
    task = _REGISTRY.get(name)
    if task is None:
        if name not in TASK_MODULES:
            raise ValueError(f"unknown model.task '{name}': one of {', '.join(TASK_MODULES)}")
        task = _REGISTRY[name] = importlib.import_module(TASK_MODULES[name]).TASK
    return task


def find_task(name: str | None) -> Task | None:
    """The task named ``name``, or None for no name or an unknown one."""
    return get_task(name) if name in TASK_MODULES else None


def prompt_task(name: str | None) -> Task:
    """The task that answers prompts for an export trained as ``name``: that task when it generates answers,
    else the causal LM (an export that names no task, or a classifier's backbone asked to generate)."""
    task = find_task(name)
    if task is None or not task.answers_prompts:
        task = next(t for t in all_tasks() if t.answers_prompts)
    return task


def all_tasks() -> list[Task]:
    """Every registered task, in the schema's order."""
    return [get_task(name) for name in TASK_MODULES]
