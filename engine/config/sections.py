"""The sections of the job schema (``model:``, ``finetune:``, ...), one pydantic model each; ``data:`` is in
:mod:`engine.config.data_section`.

:class:`engine.config.schema.JobSpec` puts them together. Every section forbids unknown keys and every field
carries a docstring (``shoulders validate --explain`` prints them). No torch or Ray here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator

TaskName = Literal["sequence_classification", "causal_lm", "seq2seq", "audio_classification", "ctc", "speech_seq2seq", "image_classification"]
Strategy = Literal["feature_extraction", "light", "full", "lora"]


class Section(BaseModel):
    """Base of every schema section: unknown keys are errors, docstrings are field descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False)


class ModelSpec(Section):
    name: str
    """Hugging Face hub id (``org/model``) or a local folder written by ``save_pretrained``."""
    task: TaskName = "sequence_classification"
    """What the model is adapted to do; picks the HF Auto class, the head, the loss and the metrics."""
    labels: list[str] | None = None
    """Class names for classification, in index order. Left empty, they are read from the training data."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    from_scratch: bool = False
    """Initialise the same architecture with random weights instead of the pre-trained ones (the baseline
    that tells whether transfer helped)."""
    head: Literal["auto", "new", "keep"] = "auto"
    """The task head: ``new`` gives it fresh seeded weights; ``keep`` continues from the checkpoint's head
    (refused when the checkpoint has none of that shape); ``auto`` keeps it exactly when it fits: the
    checkpoint holds every head weight at the right shape and was trained for the same outputs (its
    ``id2label`` equals ``model.labels``; for ``ctc``, the targets use the checkpoint's own tokenizer)."""
    tokenizer: str | None = None
    """Tokenizer of the targets (hub id or folder); left empty, the checkpoint's own. For ``ctc`` from a
    checkpoint that has no vocabulary (e.g. a pre-trained-only wav2vec2), a character vocabulary is built
    from the training transcripts and saved in the output folder."""
    language: str | None = None
    """``speech_seq2seq`` (Whisper): language token of the transcripts (``en``, ``de``, ...), used for the
    decoder prefix in training and for generation; left empty, the checkpoint's default."""
    asr_task: Literal["transcribe", "translate"] = "transcribe"
    """``speech_seq2seq`` (Whisper): task token of the decoder prefix."""

    @field_validator("labels")
    @classmethod
    def _labels_not_empty(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and not labels:
            raise ValueError("an empty list names no class: list the class names in index order, "
                             "or remove model.labels to read them from the training data")
        return labels

    @model_validator(mode="after")
    def _check_head(self) -> ModelSpec:
        if self.head == "keep" and self.from_scratch:
            raise ValueError("model.head: keep needs the checkpoint's weights, but model.from_scratch is true; use head: auto or new")
        return self


class FinetuneSpec(Section):
    strategy: Strategy | None = None
    """Preset that fills the fields below when they are not set: ``feature_extraction`` (freeze the whole
    backbone, train the head as a linear probe at ``head_lr`` 1e-2), ``light`` (train the top 2 blocks and the head), ``full`` (train everything,
    backbone at ``backbone_lr_ratio``), ``lora`` (LoRA adapters on every block, base weights frozen)."""
    freeze_depth: int | Literal["all"] | None = None
    """Number of bottom transformer blocks to freeze; ``all`` freezes every block, a negative number -k
    freezes all but the top k. The embeddings are frozen whenever any block is."""
    freeze_embeddings: bool | None = None
    """Freeze the embeddings; left empty, they are frozen exactly when ``freeze_depth`` freezes a block."""
    head_lr: float = Field(5e-4, gt=0)
    """Learning rate of the new task head (and of new adapter weights, see ``adapter_lr_ratio``)."""
    backbone_lr_ratio: float = Field(0.1, gt=0, le=10)
    """Learning rate of the pre-trained weights as a fraction of ``head_lr``; 0.01-0.1 is common practice."""
    adapter_lr_ratio: float = Field(1.0, gt=0, le=10)
    """Learning rate of PEFT adapter weights as a fraction of ``head_lr`` (they are new, not pre-trained)."""
    freeze_feature_encoder: bool = True
    """Speech models: freeze the convolutional feature encoder (wav2vec2/HuBERT/WavLM conv stack, Whisper's
    input convolutions) whatever ``freeze_depth`` says; common practice. Ignored for text models."""
    mask_time_prob: float | None = Field(None, ge=0, lt=1)
    """Speech models: SpecAugment, the share of time steps masked while training; left empty, the checkpoint
    config's value (wav2vec2 family: 0.05; Whisper: off unless its config turns it on)."""


class PeftSpec(Section):
    method: Literal["none", "lora", "dora", "ia3"] = "none"
    """Parameter-efficient method wrapped around the backbone; the new head is always fully trainable."""
    r: int = Field(8, gt=0)
    """LoRA/DoRA rank."""
    alpha: float = Field(16, gt=0)
    """LoRA/DoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] | None = None
    """Module names to adapt, or ``all-linear``; left empty, PEFT's default for the architecture."""


class OptimSpec(Section):
    optimizer: Literal["adamw"] = "adamw"
    """Optimizer (torch AdamW, fused on GPU)."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay; never applied to biases and norm weights."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    """Share of the optimizer steps spent warming the learning rate up from zero."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up."""
    epochs: float | None = Field(3.0, gt=0)
    """Passes over the training data (ignored when ``max_steps`` is set)."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; overrides ``epochs``."""
    batch_size: int = Field(16, gt=0)
    """Micro-batch size per worker."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step; global batch = batch_size x grad_accum x workers."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; empty disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision: ``auto`` is bf16 autocast on GPUs that support it and fp32 on CPU. Trainable
    weights always stay fp32 (master weights)."""


class ScalingSpec(Section):
    num_workers: int = Field(1, gt=0)
    """Ray Train workers (one process each; one GPU each when ``use_gpu``)."""
    use_gpu: bool | Literal["auto"] = "auto"
    """Train on GPUs; ``auto`` uses them when the Ray cluster has any."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Logical CPUs reserved per worker. Keep at least one CPU free for Ray Data on small machines."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on nodes."""
    max_failures: int = Field(0, ge=-1)
    """Worker failures to recover from by restarting at the latest checkpoint (-1: unlimited)."""
    node_loss_timeout_s: float = Field(600.0, gt=0)
    """After a node of the cluster dies mid-run, seconds the run may go without a training step (Ray Train
    restarting the workers from the last checkpoint on the nodes left) before it fails with one line naming
    the node and how to resume, instead of waiting for resources that may never come."""


class BackendSpec(Section):
    name: Literal["ddp", "deepspeed"] = "ddp"
    """Distributed backend wrapping the model: ``ddp`` (torch DistributedDataParallel) or ``deepspeed``
    (ZeRO; batch sizes, accumulation, clipping and precision still come from ``optim``)."""
    zero_stage: int | None = Field(None, ge=0, le=3)
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded), 2 (+ gradients),
    3 (+ parameters). Left empty, the stage in ``backend.config``, else 2."""
    offload_optimizer: bool | None = None
    """DeepSpeed: keep the optimizer state on the CPU (ZeRO >= 1). Left empty, as ``backend.config`` says, else no."""
    offload_params: bool | None = None
    """DeepSpeed: keep the parameters on the CPU between uses (ZeRO-3 only). Left empty, as ``backend.config``
    says, else no."""
    config: str | dict[str, Any] | None = None
    """DeepSpeed: path of an existing DeepSpeed JSON config (or its content inline) for settings the job has no
    key for. It is merged with the job; a value that contradicts the job (micro-batch size, accumulation,
    clipping, stage, offload, precision) is an error naming both, and ``optimizer``/``scheduler`` sections are
    refused (the job builds them). A path is read once at validation and carried inline to the workers."""

    @field_validator("config", mode="before")
    @classmethod
    def _read_config_file(cls, value: Any) -> Any:
        if isinstance(value, str):
            from engine.backends.ds_config import read_ds_json

            return read_ds_json(value)
        return value


class PerfSpec(Section):
    """Speed settings. Every default is the fast choice; each one that does not apply (no GPU, a library
    not installed, an architecture it does not know) is skipped with a log line, never an error."""

    liger_kernels: bool = True
    """Liger Triton kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE) on architectures Liger
    supports, when ``liger-kernel`` is installed and the model runs on a GPU."""
    fp8_frozen: Literal["auto", "on", "off"] = "auto"
    """FP8 matmuls (rowwise-scaled e4m3, bf16 output) for *frozen* linear weights, which are quantized
    once; trainable weights (LoRA, heads) stay bf16/fp32. ``auto``: on GPUs with FP8 tensor cores
    (compute capability 8.9+, e.g. H100/H200) when bf16 autocast is on; ``on`` also emulates it on CPU."""
    fused_lora: bool = True
    """Compute a LoRA layer over a frozen base as one autograd function (base matmul, then the adapter
    added in the same GEMM epilogue), instead of PEFT's separate matmul, scale and add."""
    frozen_weights_in_compute_dtype: bool = True
    """Store frozen weights in the autocast dtype (bf16) instead of fp32: half the memory and no per-step
    casts. Trainable weights always stay fp32 (master weights)."""
    trainable_weights_in_compute_dtype: bool = False
    """Train bf16 weights instead of fp32 weights under autocast (``backend.name: ddp``, bf16 compute): the
    model runs entirely in bf16 with no per-use casts and a bf16 residual stream, the optimizer steps fp32
    master copies, gradients are summed over micro-batches and averaged over workers in fp32 (DDP's own
    overlapped all-reduce carries only the last micro-batch of a window, in bf16),
    and the loss is computed from fp32 logits. The Megatron / torchtitan recipe; aimed at full fine-tunes,
    where autocast's fp32 traffic dominates. Off until it is timed on a GPU. (DeepSpeed's ``bf16`` mode
    already trains this way.)"""
    packing: bool = True
    """Causal LM: pack several examples into one ``data.max_length`` row, with position ids restarting at
    every example so no token attends across examples and no padding is computed."""
    group_by_length: bool = False
    """Text classification: sort each window of ``group_window`` micro-batches by length before batching,
    so batches are trimmed to similar lengths and carry little padding. Off by default: rows are then not
    shuffled within the stream (the window order is deterministic, the same every epoch), which changes
    the optimisation order; turn it on for long, ragged inputs."""
    group_window: int = Field(8, gt=0)
    """Micro-batches per length-grouping window (larger: less padding, less randomness)."""
    compile: bool = False
    """``torch.compile`` each repeated block (transformer layer) in place: one compile serves every layer,
    parameter names are unchanged. Slow first steps; helps most without Liger kernels."""
    cudnn_benchmark: Literal["auto", "on", "off"] = "auto"
    """Let cuDNN time its convolution algorithms on the first batch of each shape and keep the fastest.
    ``auto``: on for inputs of one fixed shape (Whisper's 30 s windows); ``on`` for other convolutional
    models (wav2vec2) when audio lengths are few (each new length is timed again)."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass: less memory, about a third more compute."""
    prefetch_batches: int = Field(4, ge=0)
    """Batches Ray Data prepares ahead of the training step, so the GPU never waits on input."""
    peak_tflops: float | None = Field(None, gt=0)
    """Dense bf16 peak of one accelerator in TFLOP/s, for MFU; left empty, read from a table of known GPUs
    (H100/H200 989, A100 312) and MFU is omitted on others."""


class EvalSpec(Section):
    every_n_steps: int | None = Field(None, gt=0)
    """Evaluate (and checkpoint) every N optimizer steps; left empty, once per epoch."""
    metric: str | None = None
    """Validation metric that picks the best checkpoint and drives early stopping; left empty, ``accuracy``
    for classification and ``loss`` for language modelling."""
    mode: Literal["max", "min"] | None = None
    """Whether the metric is better higher or lower; left empty, inferred from the metric name."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations without improvement of the metric."""
    batch_size: int | None = Field(None, gt=0)
    """Evaluation batch size; left empty, twice ``optim.batch_size``."""
    answer_samples: int = Field(4, ge=0, validation_alias=AliasChoices("answer_samples", "generation_samples"))
    """Tasks that answer prompts (``causal_lm`` with ``data.layout`` prompt_completion or chat, ``seq2seq``): at
    every evaluation, greedy answers to the first this many validation prompts are generated, scored against
    their references (exact match, ROUGE-L) and written to ``answers.jsonl`` in the output folder; 0 turns
    this off. Also read from ``generation_samples``."""
    max_new_tokens: int = Field(64, gt=0)
    """Tokens generated at most per answer in those evaluations."""
    cache_mib: int = Field(256, ge=0)
    """Each worker keeps its validation batches in memory after the first evaluation when they take at most
    this many MiB, so later evaluations skip the Ray Data pass (the split does not change); 0 streams them
    every time."""


class OutputSpec(Section):
    dir: str = "runs/{name}"
    """Output folder; ``{name}`` is replaced by the job name. Holds metrics.json, checkpoints, the export."""
    export: Literal["merged", "adapter", "none"] = "merged"
    """What the best checkpoint is exported as: ``merged`` (a plain transformers model folder, adapters
    merged in), ``adapter`` (a PEFT adapter folder; needs ``peft.method``), or nothing."""
    keep_checkpoints: int = Field(2, gt=0)
    """Checkpoints kept besides the best one."""
    uri: str | None = None
    """Where the run's results go besides ``output.dir``: a URI (``s3://bucket/results/{name}``, ``gs://...``)
    or a folder. Set, the export is written there (by the worker that exports it) and metrics.json, report.md
    and the other small result files are copied there at the end; ``output.dir`` keeps the logs. Credentials
    come from the environment (``AWS_ACCESS_KEY_ID`` ...), never from the URI."""

    @field_validator("dir")
    @classmethod
    def _dir_is_local(cls, value: str) -> str:
        if "://" in value and not value.startswith("file://"):
            raise ValueError(f"'{value}' is a URI; output.dir is a local folder (logs, reports). "
                             "Put the export and results in object storage with output.uri instead")
        return value

    @field_validator("uri")
    @classmethod
    def _uri_without_secrets(cls, value: str | None) -> str | None:
        from engine.checkpoints.storage import check_no_secrets

        if value:
            check_no_secrets(value, "output.uri")
        return value


class RunSpec(Section):
    storage_path: str | None = None
    """Where Ray Train writes checkpoints and results: a local path or a pyarrow filesystem URI
    (``s3://bucket/runs``, ``gs://...``). On a multi-node cluster use storage every node reaches, so a run's
    checkpoints survive the loss of a node. Left empty, the output folder (``output.dir``). Credentials come
    from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, a profile)."""

    @field_validator("storage_path")
    @classmethod
    def _storage_without_secrets(cls, value: str | None) -> str | None:
        from engine.checkpoints.storage import check_no_secrets

        if value:
            check_no_secrets(value, "run.storage_path")
        return value


class TrackingSpec(Section):
    tensorboard: bool = True
    """Write TensorBoard event files to ``output.dir/tensorboard`` (every reported metric, each parameter
    group's LR, throughput; a tune writes one folder per trial): ``tensorboard --logdir runs/NAME``."""
    mlflow: str | None = None
    """MLflow tracking URI (``file:./mlruns``, ``http://host:5000``, ``databricks``); set, each run (each
    tune trial) is logged there as an MLflow run with the job as parameters. Needs the ``mlflow`` package."""
    mlflow_experiment: str | None = None
    """MLflow experiment the runs go to; left empty, the job's name."""
    wandb: str | None = None
    """Weights & Biases project; set, each run's metrics are logged there when it ends (needs the ``wandb``
    package and a login, or ``WANDB_MODE=offline``)."""


SearchKind = Literal["choice", "grid", "uniform", "loguniform", "randint"]


class TuneSpec(Section):
    space: dict[str, dict[SearchKind, list[Any]]] = Field(default_factory=dict)
    """Search space: dotted job key -> one domain, e.g. ``finetune.backbone_lr_ratio: {loguniform: [0.01, 1]}``.
    Domains: ``choice``/``grid`` (list of values; ``grid`` tries each), ``uniform``/``loguniform`` ([low, high]),
    ``randint`` ([low, high], both inclusive). Left empty, the default space: ``finetune.freeze_depth`` over
    0..number of blocks, ``finetune.backbone_lr_ratio`` log-uniform 0.01..1, ``finetune.head_lr`` log-uniform
    around the job's value (/3..x3) and ``finetune.strategy`` in full / lora."""
    num_samples: int = Field(8, gt=0)
    """Trials to sample from the space (with ``grid`` domains: samples per grid point)."""
    include_base: bool = True
    """Run the job's own values of the searched keys as the first trial (counted in ``num_samples``) when
    each lies inside its domain, so the search starts from the job as written."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """Trial scheduler: ``asha`` stops the worst trials early at rungs; ``fifo`` runs every trial to the end."""
    grace_period: int = Field(1, gt=0)
    """ASHA: evaluations every trial runs before it may be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA: share of trials kept at each rung is 1 / reduction_factor."""
    max_concurrent_trials: int | None = Field(None, gt=0)
    """Trials running at once; left empty, computed from the cluster's CPUs/GPUs and each trial's workers."""
    data_cpus: float = Field(1.0, ge=1)
    """Logical CPUs each running trial reserves (in its placement group) for its Ray Data reads and
    preprocessing; at least 1, the CPU of one Ray Data task. Counted when computing concurrency."""
    metric: str | None = None
    """Validation metric ranking the trials (without ``val_``); left empty, ``eval.metric``."""
    mode: Literal["max", "min"] | None = None
    """Whether the metric is better higher or lower; left empty, as for ``eval``."""

    @model_validator(mode="after")
    def _check_space(self) -> TuneSpec:
        for key, domain in self.space.items():
            if len(domain) != 1:
                raise ValueError(f"tune.space.{key} must have exactly one of choice, grid, uniform, loguniform, randint")
            (kind, values), = domain.items()
            if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
                raise ValueError(f"tune.space.{key}: {kind} takes [low, high], got {values}")
            if kind in ("uniform", "loguniform", "randint") and not values[0] < values[1] + (kind == "randint"):
                raise ValueError(f"tune.space.{key}: {kind} needs low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"tune.space.{key}: loguniform needs low > 0, got {values}")
            if kind in ("choice", "grid") and not values:
                raise ValueError(f"tune.space.{key}: {kind} needs at least one value")
        return self


class SafeguardsSpec(Section):
    compare_scratch: bool = False
    """Also train the fair from-scratch twin (same architecture and step budget, random weights, every layer
    trainable, no adapters, backbone LR ratio 1, its own learning rate from ``scratch_lrs``) and give the
    transfer verdict: positive transfer, no measurable gain, negative transfer or no signal."""
    scratch_lrs: list[PositiveFloat] | None = Field(None, min_length=1)
    """Learning rates the scratch twin tries, each for ``scratch_search_fraction`` of the budget, the best on
    validation then trained in full; left empty, ``finetune.head_lr`` x 1/3, 1 and 3. One value: no search."""
    scratch_search_fraction: float = Field(0.25, gt=0, le=1)
    """Share of the step budget each candidate learning rate of the scratch twin trains; 1 trains each in
    full and keeps the best run as the twin."""
    min_gain: float = Field(0.0, ge=0)
    """Smallest gain over scratch counted as real transfer, added to two standard errors of the difference
    (the whole margin for metrics without a standard error: loss, perplexity)."""
    track_forgetting: bool = True
    """Evaluate a retention set at step 0 and at every evaluation and report the forgetting delta."""
    forgetting_measure: Literal["auto", "lm_loss", "mlm_loss", "cka"] = "auto"
    """``lm_loss``: the source objective (causal-LM loss on the retention text; needs a model that keeps its
    LM head); ``mlm_loss``: masked-LM loss on the retention text through the checkpoint's own masked-LM head
    (kept aside, frozen) on the fine-tuned encoder; ``cka``: representation drift, 1 - linear CKA of
    mean-pooled last hidden states against the pre-trained model; ``auto``: ``lm_loss`` for ``causal_lm``,
    ``mlm_loss`` for a checkpoint saved with a masked-LM head (a ``*ForMaskedLM`` in its config's
    ``architectures``), else ``cka``. With ``retention_data``, drift (CKA) on a few validation rows is
    reported beside it."""
    retention_data: str | None = None
    """General text for the retention set (parquet/jsonl/csv with ``data.text_column``); left empty, the
    first ``retention_rows`` validation (else training) rows."""
    retention_rows: int = Field(64, gt=0)
    """Rows of the retention set."""
    max_forgetting: float | None = Field(None, gt=0)
    """Stop the run when the forgetting delta exceeds this (CKA drift in 0..1, or LM-loss increase in nats)."""
    unfreeze_every_steps: int | None = Field(None, gt=0)
    """Gradual unfreezing (ULMFiT): start from ``finetune.freeze_depth`` and unfreeze one more block from the
    top every this many optimizer steps (the embeddings last); unfrozen blocks learn at the backbone LR."""
    unfreeze_every_epochs: int | None = Field(None, gt=0)
    """Gradual unfreezing every this many epochs (instead of steps)."""
    dropout: float | None = Field(None, ge=0, lt=1)
    """Set the rate of every dropout layer of the model (regularisation against overfitting)."""
    token_dropout: float = Field(0.0, ge=0, lt=1)
    """Data augmentation: share of tokens (never the first) hidden from attention in each training batch."""

    @model_validator(mode="after")
    def _check_unfreezing(self) -> SafeguardsSpec:
        if self.unfreeze_every_steps and self.unfreeze_every_epochs:
            raise ValueError("set safeguards.unfreeze_every_steps or safeguards.unfreeze_every_epochs, not both")
        return self
